"""DeepSpeed engines on CPU (one gloo process): ZeRO 1/2 vs 0 with the two-role optimizer,
crash-safe checkpoints, exact resume, damaged-checkpoint handling, preemption signals.

The first deepspeed.initialize on a machine JIT-compiles DeepSpeed's shm comm op (~65 s,
cached in ~/.cache/torch_extensions); every later run takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal

import deepspeed
import pytest
import torch

from launcher.checkpoint import (LATEST, MARKER, Checkpoint, CheckpointError, TrainState, capture_rng,
                                 find_resumable, load_checkpoint, open_checkpoint, restore_rng,
                                 safe_load, save_checkpoint)
from launcher.config import load_config
from launcher.distributed import setup_distributed
from launcher.ds_config import build_ds_config
from launcher.optimizer import build_optimizer, freeze, overwrite_params
from launcher.preemption import EXIT_REQUEUE, EXIT_TERMINATED, PreemptionHandler
from model.atomic import atomic_torch_save



@pytest.fixture(scope="module")
def dist_info():
    return setup_distributed()


class TinyMasked(torch.nn.Module):
    """Two weight layers, BatchNorm and a neuron-style mask logit vector (soft gate)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.fc2 = torch.nn.Linear(16, 4)
        self.logits = torch.nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))) * torch.sigmoid(5 * self.logits))

    def param_lists(self):
        return [self.logits], [p for n, p in self.named_parameters() if n != "logits"]


def _engine(stage, seed=0, overrides=()):
    torch.manual_seed(seed)
    net = TinyMasked()
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "data.batch_size=8", "optim.lr=1e-2",
                             "optim.mask_lr=3e-2", *overrides])
    opt = build_optimizer(*net.param_lists(), cfg)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=build_ds_config(cfg, 1, False))
    return engine, opt, cfg


def _train(engine, steps):
    """Batches drawn from the global torch RNG, so a resume must restore it to match."""
    for _ in range(steps):
        x, y = torch.randn(8, 8), torch.randn(8, 4)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()


def _tags(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _params(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_zero_1_and_2_match_stage_0(dist_info):
    results = {}
    for stage in (0, 1, 2):
        engine, opt, _ = _engine(stage, overrides=["optim.weight_optimizer=sgd", "optim.grad_clip=0.5"])
        init = _params(engine)
        torch.manual_seed(1)
        _train(engine, 5)
        results[stage] = _params(engine)
        assert not torch.equal(results[stage]["logits"], init["logits"])
        assert not torch.equal(results[stage]["fc1.weight"], init["fc1.weight"])
        assert [g["role"] for g in engine.optimizer.param_groups] == ["mask", "weight"]
    for stage in (1, 2):
        for k in results[0]:
            torch.testing.assert_close(results[stage][k], results[0][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_resume_equals_uninterrupted(dist_info, tmp_path, stage):
    engine, _, cfg = _engine(stage)
    torch.manual_seed(1)
    _train(engine, 3)
    state = TrainState(step=3, epoch=1, batch_in_epoch=2, search_step=3, mlflow_run_id="abc",
                       loader_epoch=1, epoch_loss_sum=0.5, epoch_loss_steps=2, budget={"log_lambda": -25.0})
    save_checkpoint(engine, tmp_path, state, cfg, keep_last=2)
    _train(engine, 3)
    reference = _params(engine)

    torch.manual_seed(99)  # different init and RNG: everything must come from the checkpoint
    fresh, _, _ = _engine(stage, seed=5)
    ckpt = find_resumable(tmp_path)
    assert ckpt.tag == "step000000003" and ckpt.state == state and ckpt.config["deepspeed"]["zero_stage"] == stage
    assert load_checkpoint(fresh, ckpt) == state
    _train(fresh, 3)
    for k, v in _params(fresh).items():
        assert torch.equal(v, reference[k]), k


def test_harden_after_engine_init_freezes_masks_and_resumes(dist_info, tmp_path):
    """The real network under ZeRO 2: build the engine with trainable logits, then harden.

    ZeRO drops parameters with requires_grad=False from its partitions at initialisation, so
    the engine must be built before `harden` (also on resume into fine-tuning), and frozen
    logits must be skipped by the optimizer because ZeRO zero-fills their gradients.
    """
    from model import build_model
    from model.masks import harden, mask_logits, weight_params

    def build(seed):
        torch.manual_seed(seed)
        net = build_model("cifar10_6conv2fc", num_classes=10, T=2, width=1 / 32, input_size=8)
        cfg = load_config(None, ["deepspeed.zero_stage=2", "data.batch_size=4", "optim.lr=1e-2",
                                 "optim.mask_lr=1e-2"])
        opt = build_optimizer(mask_logits(net), weight_params(net), cfg)
        engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=build_ds_config(cfg, 1, False))
        return net, engine, opt, cfg

    def steps(net, engine, n):
        for _ in range(n):
            x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
            engine.backward(net.loss(engine(x), y))
            engine.step()

    net, engine, opt, cfg = build(0)
    torch.manual_seed(1)
    steps(net, engine, 2)
    harden(net)
    freeze(opt, "mask")
    logits = [p.detach().clone() for p in mask_logits(net)]
    save_checkpoint(engine, tmp_path, TrainState(step=2, phase="finetune"), cfg, keep_last=1,
                    tag="subnetwork")
    w0 = [p.detach().clone() for p in weight_params(net)]
    steps(net, engine, 2)
    assert all(torch.equal(a, b) for a, b in zip(logits, mask_logits(net)))
    assert any(not torch.equal(a, b) for a, b in zip(w0, weight_params(net)))
    reference = [p.detach().clone() for p in net.parameters()]

    net2, engine2, opt2, _ = build(7)
    state = load_checkpoint(engine2, find_resumable(tmp_path))
    assert state.phase == "finetune" and opt2.param_groups[0]["frozen"] is True
    harden(net2)
    steps(net2, engine2, 2)
    assert all(torch.equal(a, b) for a, b in zip(reference, net2.parameters()))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_overwritten_frozen_params_survive_steps(dist_info, stage):
    """Budget calibration shifts frozen logits in place; ZeRO 1/2 step their own fp32 copies
    and copy them back over the module, so the shift must reach those copies too."""
    engine, opt, _ = _engine(stage)
    _train(engine, 2)
    freeze(opt, "mask")
    shifted = engine.module.logits.detach() - 0.75
    overwrite_params([engine.module.logits], [shifted])
    w0 = engine.module.fc1.weight.detach().clone()
    _train(engine, 3)
    assert torch.equal(engine.module.logits.detach(), shifted)
    assert not torch.equal(engine.module.fc1.weight.detach(), w0)


def test_truncated_checkpoint_falls_back_to_previous(dist_info, tmp_path):
    engine, _, cfg = _engine(2)
    for step in (2, 4):
        _train(engine, 2)
        save_checkpoint(engine, tmp_path, TrainState(step=step), cfg, keep_last=3)
    newest = tmp_path / "checkpoints" / "step000000004"
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "step000000004"
    victim = newest / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(newest)
    with pytest.warns(UserWarning, match="truncated"):
        ckpt = find_resumable(tmp_path)
    assert ckpt.tag == "step000000002" and ckpt.state.step == 2
    load_checkpoint(_engine(2, seed=3)[0], ckpt)

    # Same size but garbage inside: caught by the weights-only load, not by the size check.
    older = tmp_path / "checkpoints" / "step000000002" / "mp_rank_00_model_states.pt"
    older.write_bytes(b"\0" * older.stat().st_size)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resumable(tmp_path)


def test_half_written_saves_are_ignored_and_cleaned(dist_info, tmp_path):
    engine, _, cfg = _engine(0)
    save_checkpoint(engine, tmp_path, TrainState(step=1), cfg, keep_last=2)
    root = tmp_path / "checkpoints"
    # A crash during a later save: DeepSpeed files partly there, no COMPLETE.json.
    for name in ("step000000003.partial", "step000000005"):
        (root / name).mkdir()
        (root / name / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 half")
    assert find_resumable(tmp_path).tag == "step000000001"
    assert find_resumable(tmp_path / "elsewhere") is None
    # A crash after COMPLETE.json but before the rename: never committed, so not trusted.
    shutil.copytree(root / "step000000001", root / "step000000002.partial")
    marker = json.loads((root / "step000000002.partial" / MARKER).read_text())
    marker["state"]["step"] = 2
    (root / "step000000002.partial" / MARKER).write_text(json.dumps(marker))
    ckpt = find_resumable(tmp_path)
    assert (ckpt.tag, ckpt.state.step) == ("step000000001", 1)
    load_checkpoint(_engine(0, seed=4)[0], ckpt)
    save_checkpoint(engine, tmp_path, TrainState(step=3), cfg, keep_last=2)
    assert _tags(root) == ["step000000001", "step000000003"]


def test_keep_last_pins_named_tags_and_resave_replaces(dist_info, tmp_path):
    engine, _, cfg = _engine(1)
    save_checkpoint(engine, tmp_path, TrainState(step=0), cfg, keep_last=2, tag="subnetwork")
    for step in range(1, 5):
        save_checkpoint(engine, tmp_path, TrainState(step=step), cfg, keep_last=2)
    root = tmp_path / "checkpoints"
    assert _tags(root) == ["step000000003", "step000000004", "subnetwork"]
    assert (root / LATEST).read_text() == "step000000004"
    _train(engine, 1)
    after = _params(engine)
    save_checkpoint(engine, tmp_path, TrainState(step=4, epoch=9), cfg, keep_last=2)
    assert not any(p.name.endswith((".old", ".partial")) for p in root.iterdir())
    fresh = _engine(1, seed=3)[0]
    assert load_checkpoint(fresh, find_resumable(tmp_path)).epoch == 9
    assert all(torch.equal(v, after[k]) for k, v in _params(fresh).items())


class _NotAllowed:
    """Stands for any class a malicious checkpoint could make torch.load instantiate."""


def test_loading_never_unpickles_arbitrary_objects(dist_info, tmp_path):
    engine, _, cfg = _engine(2)
    tag_dir = save_checkpoint(engine, tmp_path, TrainState(step=1), cfg, keep_last=2)
    assert {f.name for f in tag_dir.glob("*.pt")} >= {"mp_rank_00_model_states.pt",
                                                      "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    for f in tag_dir.glob("*.pt"):
        safe_load(f)  # DeepSpeed's ZeRO shard included, through the allow-list
    target = tag_dir / "mp_rank_00_model_states.pt"
    sd = safe_load(target)
    sd["spikeprune"]["extra"] = _NotAllowed()
    torch.save(sd, target)
    marker = json.loads((tag_dir / MARKER).read_text())
    # Sizes and digest match (a hostile writer can edit the marker too): only the load can tell.
    marker["files"][target.name] = target.stat().st_size
    marker["sha256"][target.name] = hashlib.sha256(target.read_bytes()).hexdigest()
    (tag_dir / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="does not load"):
        open_checkpoint(tag_dir)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resumable(tmp_path)
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(_engine(2, seed=2)[0], Checkpoint(tag_dir, tag_dir.name, TrainState(step=1), {}, 1))


def test_atomic_torch_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "masks.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"a": lambda: None}, path)
    assert torch.equal(safe_load(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["masks.pt"]


def test_rng_roundtrip_is_weights_only(tmp_path):
    import random

    import numpy as np

    state = capture_rng()
    atomic_torch_save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(safe_load(tmp_path / "rng.pt"))
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


@pytest.mark.parametrize("signals, code", [((signal.SIGUSR1,), EXIT_REQUEUE),
                                           ((signal.SIGTERM,), EXIT_TERMINATED),
                                           ((signal.SIGUSR1, signal.SIGTERM), EXIT_TERMINATED)])
def test_preemption_handler(dist_info, signals, code):
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as stop:
        assert not stop.should_stop() and stop.exit_code == 0
        for s in signals:
            os.kill(os.getpid(), s)
        assert stop.should_stop() and stop.exit_code == code
    assert signal.getsignal(signal.SIGTERM) is before
