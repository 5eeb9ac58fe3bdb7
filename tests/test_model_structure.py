"""Structural figures per architecture, forward shapes, bad input, mask files, the summary CLI."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from model import MODELS, build_model
from model.masks import MaskError, load_masks, mask_logits, masked_modules, save_masks
from model.summary import default_num_classes, structure_summary
from model.summary import main as summary_main

REPO = Path(__file__).resolve().parents[1]

# Tiny copies of every topology: (kwargs, one input sample's shape)
TINY = {
    "cifar10_6conv2fc": (dict(width=1 / 32, input_size=8, T=2), (3, 8, 8)),
    "vggsnn_dvs": (dict(width=1 / 32, input_size=16, T=2), (2, 2, 16, 16)),
    "sew_resnet18": (dict(width=1 / 16, input_size=32, T=2), (3, 32, 32)),
    "sew_resnet34": (dict(width=1 / 16, input_size=32, T=2), (3, 32, 32)),
    "sew_resnet50": (dict(width=1 / 16, input_size=32, T=2), (3, 32, 32)),
}


# ---- independent arithmetic for the SEW-ResNets at width 1, 224x224, 1000 classes ----
# Per-axis count of in-bounds (output position, kernel tap) pairs of a conv (padding excluded):
#   3x3/1 pad 1 over H:            every output sees 3 rows, the 2 border outputs only 2 -> 3H - 2
#   3x3/2 pad 1, even input 2H:    H outputs x 3 taps, the first output's top tap is padding -> 3H - 1
#   1x1/s over an input of s*H:    one tap per output -> H
#   7x7/2 pad 3, 224 -> 112:       112 x 7 taps, less 3 + 1 padded taps at the top, 2 at the bottom
def _taps_3x3(h_out: int, stride: int) -> int:
    return 3 * h_out - 2 if stride == 1 else 3 * h_out - 1


STEM_TAPS = 112 * 7 - (3 + 1) - 2
STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (planes, output side) per stage


def sew_reference(depth: int) -> tuple[int, int]:
    """(conv + fc weights, dense connections per step) of SEW-ResNet-depth from closed forms.

    Connectivity as the reference counts it: a block's output map is its last conv's map (1)
    plus the shortcut's (the block input's value m, or 1 after a downsample conv), and the map
    value weights the next convs' counts: m = 1, 2, 3, ... along a stage, back to 2 after a
    downsample. The head is left out."""
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[depth]
    convs = [(7, 3, 64, STEM_TAPS, 1)]  # (kernel, c_in, c_out, taps per axis, input map value)
    c_in, m = 64, 1
    for stage, ((planes, h), n) in enumerate(zip(STAGES, blocks)):
        for i in range(n):
            stride = 2 if i == 0 and stage > 0 else 1
            if depth < 50:
                convs += [(3, c_in, planes, _taps_3x3(h, stride), m), (3, planes, planes, 3 * h - 2, 1)]
                c_out = planes
            else:
                h_in = h * stride
                convs += [(1, c_in, planes, h_in, m), (3, planes, planes, _taps_3x3(h, stride), 1),
                          (1, planes, 4 * planes, h, 1)]
                c_out = 4 * planes
            if stride != 1 or c_in != c_out:
                convs.append((1, c_in, c_out, h, m))
                m = 1 + 1
            else:
                m = 1 + m
            c_in = c_out
    weights = sum(k * k * ci * co for k, ci, co, _, _ in convs) + c_in * 1000
    connections = sum(mult * t * t * ci * co for _, ci, co, t, mult in convs)
    return weights, connections


EXPECTED = {
    "cifar10_6conv2fc": (36_715_264, 1_614_720_000),
    "vggsnn_dvs": (9_677_952, None),
    "sew_resnet18": sew_reference(18),
    "sew_resnet34": sew_reference(34),
    "sew_resnet50": sew_reference(50),
}


def test_sew_reference_known_figures():
    """The closed forms reproduce the well-known torchvision ResNet weight counts
    (parameters less BatchNorm affine terms and the fc bias)."""
    assert sew_reference(18)[0] == 11_689_512 - 1000 - 2 * 4800
    assert sew_reference(34)[0] == 21_797_672 - 1000 - 2 * 8512
    assert sew_reference(50)[0] == 25_557_032 - 1000 - 2 * 26_560


@functools.cache
def width1_figures(name: str) -> dict:
    net = build_model(name, num_classes=default_num_classes(name))
    own = sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return {"own_weight_count": own, **structure_summary(net)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_width1_figures(name):
    weights, connections = EXPECTED[name]
    fig = width1_figures(name)
    assert fig["own_weight_count"] == weights
    assert fig["weights"] == weights
    if connections is not None:
        assert fig["dense_connections_per_step"] == connections


@pytest.mark.parametrize("name", sorted(TINY))
def test_init_stds_follow_the_closed_form(name):
    """The reference's init: weight std = sqrt(2 / fan_out), fan_out = C_out k k (conv) or
    out_features (FC); BatchNorm weight 1, bias 0. Checked per layer against the sample std
    within its sampling error (a few times 1/sqrt(2n) relative)."""
    torch.manual_seed(0)
    kw, _ = TINY[name]
    net = build_model(name, num_classes=10, **{**kw, "width": 1 / 4})
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers
    for lname, m in layers:
        w = m.weight.detach()
        fan_out = w.shape[0] * (w[0, 0].numel() if w.dim() == 4 else 1)
        expected = math.sqrt(2.0 / fan_out)
        tol = 5 / math.sqrt(2 * w.numel()) + 1e-3
        assert abs(float(w.std()) / expected - 1) < tol, (lname, float(w.std()), expected)
        assert abs(float(w.mean())) < 5 * expected / math.sqrt(w.numel()), lname
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


def test_sew_reference_connectivity_by_hand():
    """One line of the closed form checked by hand: SEW-18's first stage at 56 x 56 (3x3 taps
    per axis 3 * 56 - 2 = 166) reads maps of value 1 then 2 into its block entries."""
    taps = 166 * 166 * 64 * 64
    stage1 = (1 + 1) * taps + (2 + 1) * taps  # block 1: conv1 reads m=1, conv2 m=1; block 2: m=2, 1
    stem = STEM_TAPS ** 2 * 3 * 64
    net = build_model("sew_resnet18", num_classes=1000)
    dense = structure_summary(net)["layers"]
    first = {r["name"]: r["dense_connections"] for r in dense[:5]}
    assert sum(first.values()) == stem + stage1
    assert dense[-1]["name"] == "head.fc" and dense[-1]["dense_connections"] == 0


@pytest.mark.slow
def test_prunable_counts_follow_the_paper():
    """Every CIFAR/DVS weight is masked; SEW masks all but the stem and head."""
    assert width1_figures("cifar10_6conv2fc")["prunable_weights"] == 36_715_264
    assert width1_figures("vggsnn_dvs")["prunable_weights"] == 9_677_952
    sew = width1_figures("sew_resnet18")
    assert sew["prunable_weights"] == sew["weights"] - 7 * 7 * 3 * 64 - 512 * 1000
    # CIFAR neuron masks: the 5 spiking convs after the first layer, [256, H, W] each
    assert width1_figures("cifar10_6conv2fc")["prunable_neurons"] == 256 * (2 * 32 * 32 + 3 * 16 * 16)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_forward_shapes(name):
    kw, sample = TINY[name]
    net = build_model(name, num_classes=10, **kw)
    assert tuple(net.input_shape) == sample
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(3, *sample))
    assert out.shape == (kw["T"], 3, 10)
    assert net.logits(out).shape == (3, 10)
    loss = net.loss(out, torch.tensor([0, 1, 2]))
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        build_model("resnet9000")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_without_channels(name):
    with pytest.raises(ValueError, match="width 0.001"):
        build_model(name, width=0.001)


def _random_hard_logits(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mask_logits(net):
            p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.5, 1.0, -1.0))


def test_mask_file_round_trip(tmp_path):
    kw, _ = TINY["sew_resnet18"]
    src = build_model("sew_resnet18", **kw)
    _random_hard_logits(src, 0)
    path = tmp_path / "masks.zip"
    save_masks(src, path, "sew_resnet18")
    # bit-packed: about one bit per logit plus a little zip overhead per layer
    n_logits = sum(p.numel() for p in mask_logits(src))
    assert path.stat().st_size < n_logits / 8 + 400 * len(mask_logits(src))

    dst = build_model("sew_resnet18", **kw)
    load_masks(dst, path, "sew_resnet18")
    src_mods, dst_mods = dict(masked_modules(src)), dict(masked_modules(dst))
    assert src_mods.keys() == dst_mods.keys()
    for name, m in dst_mods.items():
        assert m.mode == "hard"
        if m.logits is not None:
            assert not m.logits.requires_grad
            assert torch.equal(m.keep(), src_mods[name].keep()), name


def test_mask_file_wrong_shape(tmp_path):
    path = tmp_path / "masks.zip"
    save_masks(build_model("cifar10_6conv2fc", width=1 / 32, input_size=8), path, "cifar10_6conv2fc")
    wider = build_model("cifar10_6conv2fc", width=1 / 16, input_size=8)
    with pytest.raises(MaskError, match="shape"):
        load_masks(wider, path, "cifar10_6conv2fc")


def test_mask_file_wrong_model(tmp_path):
    path = tmp_path / "masks.zip"
    save_masks(build_model("cifar10_6conv2fc", width=1 / 32, input_size=8), path, "cifar10_6conv2fc")
    with pytest.raises(MaskError, match="cifar10_6conv2fc"):
        load_masks(build_model("vggsnn_dvs", width=1 / 32, input_size=16), path, "vggsnn_dvs")
    # same name claimed, other topology: the layer sets differ
    with pytest.raises(MaskError, match="do not match"):
        load_masks(build_model("vggsnn_dvs", width=1 / 32, input_size=16), path, "cifar10_6conv2fc")


def test_mask_file_not_a_mask_file(tmp_path):
    path = tmp_path / "masks.zip"
    path.write_text("not a zip")
    with pytest.raises(MaskError, match="not a spikeprune mask file"):
        load_masks(build_model("cifar10_6conv2fc", width=1 / 32, input_size=8), path, "cifar10_6conv2fc")


def _summary_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "model.summary", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_summary_cli_json_matches():
    proc = _summary_cli("--model", "cifar10_6conv2fc", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    fig = width1_figures("cifar10_6conv2fc")
    assert doc["weights"] == 36_715_264
    assert doc["dense_connections_per_step"] == 1_614_720_000
    for key in ("prunable_weights", "prunable_neurons", "penalty_coefficient_sums", "layers"):
        assert doc[key] == fig[key], key


def test_summary_cli_unknown_model():
    proc = _summary_cli("--model", "nope")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'nope'" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["--model", "sew_resnet18", "--width", "0.001"], "width 0.001 leaves 64 channels at 0"),
    (["--model", "sew_resnet18", "--width", "0"], "width must be > 0"),
])
def test_summary_bad_width(args, message, capsys):
    assert summary_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_summary_table_small(capsys):
    """Without --json: a per-layer table, then the global figures, consistent with the rows."""
    assert summary_main(["--model", "cifar10_6conv2fc", "--width", "0.03125", "--input-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["layer", "kind"]
    assert all(f"{layer} " in out for layer in ("stem.conv", "stage2.2.conv", "fc1.fc", "fc2.fc"))
    fig = structure_summary(build_model("cifar10_6conv2fc", width=1 / 32, input_size=8))
    assert f"weights                     {fig['weights']:,}" in out
    assert fig["weights"] == fig["prunable_weights"] == sum(r["weights"] for r in fig["layers"])
    assert fig["dense_connections_per_step"] == sum(r["dense_connections"] for r in fig["layers"])
