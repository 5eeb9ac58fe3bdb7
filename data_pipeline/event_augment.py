"""The reference's NDA augmentation of event-frame batches [N, T, 2, H, W], seeded (a resumed
run draws the same augmentations): flip, then one of roll, rotate or cutout per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ROLL_MAX = 5 / 48  # reference NDA (M=1, N=2) at 48x48: roll <= 5 px, rotate <= 30 deg, cutout 1/3
_ROTATE_MAX_DEG = 30.0
_CUTOUT_RATIO = 1 / 3


def nda_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reference NDA augmentation of a batch x [N, T, 2, H, W], one draw per sample for all T.

    Horizontal flip with p=0.5, then one of: roll both axes by up to 5/48 of the size, rotate
    by up to 30 degrees (nearest, zero fill), or zero a square 1/3 the size at a random centre.
    """
    n, T, C, H, W = x.shape
    out = x.reshape(n, T * C, H, W)

    def rand(*shape):  # drawn on the CPU generator so a run is reproducible on any device
        return torch.rand(shape, generator=generator).to(x.device)

    flip = rand(n) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    op = torch.randint(0, 3, (n,), generator=generator).to(x.device)
    out = torch.where((op == 0)[:, None, None, None], _roll(out, rand(n, 2)), out)
    out = torch.where((op == 1)[:, None, None, None], _rotate(out, rand(n)), out)
    out = torch.where((op == 2)[:, None, None, None], _cutout(out, rand(n, 2)), out)
    return out.reshape(n, T, C, H, W)


def _roll(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """torch.roll of each sample by its own integer shifts in [-k, k], k = _ROLL_MAX * size."""
    n, _, H, W = x.shape
    k = round(_ROLL_MAX * H)
    shift = (u * (2 * k + 1)).floor().long() - k  # uniform over -k..k, as random.randint
    rows = (torch.arange(H, device=x.device) - shift[:, :1]) % H
    cols = (torch.arange(W, device=x.device) - shift[:, 1:]) % W
    x = x.gather(2, rows[:, None, :, None].expand_as(x))
    return x.gather(3, cols[:, None, None, :].expand_as(x))


def _rotate(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rotate each sample about its centre by an angle uniform in [-30, 30] degrees.

    Same sampling matrix as torchvision's rotate (nearest, fill 0), written in grid_sample's
    normalised coordinates, hence the aspect-ratio factors.
    """
    n, _, H, W = x.shape
    angle = torch.deg2rad((2 * u - 1) * _ROTATE_MAX_DEG)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin * H / W, zero], 1),
                         torch.stack([sin * W / H, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _cutout(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Zero rows [cy - h/2, cy + h/2) x cols [cx - w/2, cx + w/2) (clipped), h = H/3, w = W/3."""
    n, _, H, W = x.shape
    cy, cx = (u[:, 0] * H).floor().long(), (u[:, 1] * W).floor().long()
    half_h, half_w = int(_CUTOUT_RATIO * H) // 2, int(_CUTOUT_RATIO * W) // 2
    rows = torch.arange(H, device=x.device)[None, :]
    cols = torch.arange(W, device=x.device)[None, :]
    in_rows = (rows >= cy[:, None] - half_h) & (rows < cy[:, None] + half_h)
    in_cols = (cols >= cx[:, None] - half_w) & (cols < cx[:, None] + half_w)
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(hole[:, None], 0)
