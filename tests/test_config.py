"""Config parsing and validation, the derived ds_config, the two-role optimizer, and the
launch-environment discovery (torchrun / deepspeed / SLURM variables)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.config import (Config, ConfigError, flatten, from_dict, load_config, main,
                             save_config, to_dict)
from launcher.distributed import discover, expand_hostlist, tasks_on_node
from launcher.ds_config import build_ds_config, resolve_precision
from launcher.optimizer import MaskWeightOptimizer, build_optimizer, freeze, get_lr, set_lr
from model.schedules import lr_at

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    """Every file under configs/, by the loader of its kind; sweeps and comparisons also
    load the training config they name."""
    from tuning.compare_config import load_compare_config
    from tuning.sweep_config import base_train_config, load_sweep_config

    if path.stem.startswith("sweep_"):
        cfg = base_train_config(load_sweep_config(path))
    elif "compare" in path.stem:
        compare = load_compare_config(path)
        cfg = load_config(compare.train_config, compare.train_overrides)
    else:
        cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.pruning.lambda_w >= 0


def test_paper_recipes():
    c = load_config(CONFIGS / "cifar10.yaml")
    assert (c.data.batch_size, c.model.T, c.optim.lr, c.optim.mask_lr) == (16, 8, 1e-4, 1e-4)
    assert (c.pruning.search_epochs, c.pruning.finetune_epochs, c.optim.schedule) == (800, 200, "none")
    d = load_config(CONFIGS / "dvs_cifar10.yaml")
    assert (d.model.name, d.model.T, d.optim.weight_optimizer, d.optim.nesterov) == ("vggsnn_dvs", 10, "sgd", True)
    assert (d.optim.lr, d.optim.mask_lr, d.optim.finetune_lr, d.optim.schedule) == (0.025, 1e-3, 0.0025, "cosine")
    i = load_config(CONFIGS / "imagenet_sew18.yaml")
    assert (i.model.name, i.model.T, i.model.num_classes, i.data.batch_size) == ("sew_resnet18", 4, 1000, 64)
    assert (i.pruning.search_epochs, i.pruning.finetune_epochs, i.optim.finetune_lr) == (280, 40, 1e-4)


def test_overrides_both_spellings_and_yaml_values():
    cfg = load_config(CONFIGS / "demo.yaml", ["pruning.lambda_w=2e-11", "--optim.lr=0.5",
                                              "pruning.sop_budget=8.5e6", "seed=7",
                                              "model.input_size=null", "deepspeed.zero_stage=2",
                                              "pruning.dense_reference=776000000",
                                              "tracking.log_checkpoint=false"])
    # "2e-11" is a string to YAML 1.1; the float field still takes it.
    assert cfg.pruning.lambda_w == 2e-11 and cfg.optim.lr == 0.5 and cfg.seed == 7
    assert cfg.pruning.sop_budget == 8.5e6 and cfg.model.input_size is None
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.pruning.dense_reference == 776000000.0 and cfg.tracking.log_checkpoint is False
    run = load_config(None, ["pruning.dense_reference=3f2a9c0d1e", "tracking.log_checkpoint=250"])
    assert run.pruning.dense_reference == "3f2a9c0d1e" and run.tracking.log_checkpoint == 250.0


@pytest.mark.parametrize("override, key", [
    ("pruning.lamda_w=1", "pruning.lamda_w"),
    ("prunning.lambda_w=1", "prunning"),
    ("seed.value=1", "seed.value"),
    ("pruning.lambda_w=-1e-11", "pruning.lambda_w"),
    ("pruning.lambda_n=-0.5", "pruning.lambda_n"),
    ("data.batch_size=abc", "data.batch_size"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("data.batch_size=0", "data.batch_size"),
    ("pruning.enabled=maybe", "pruning.enabled"),
    ("optim.weight_optimizer=rmsprop", "optim.weight_optimizer"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage"),
    ("deepspeed.precision=fp16", "deepspeed.precision"),
    ("data.dataset=mnist", "data.dataset"),
    ("pruning.beta_T=1", "pruning.beta_T"),
    ("optim.lr=nan", "optim.lr"),
    ("data=5", "data"),
    ("pruning.lambda_w", "pruning.lambda_w"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("pruning:\n  lambda_w: 1.0e-11\n  lamda_n: 1.0e-11\n")
    with pytest.raises(ConfigError, match=r"pruning\.lamda_n.*lambda_n"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_roundtrip_flatten_and_save(tmp_path):
    cfg = load_config(CONFIGS / "dvs_cifar10.yaml", ["pruning.dense_reference=abc"])
    assert from_dict(to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["pruning.lambda_w"] == 1e-10 and flat["seed"] == 0 and flat["optim.nesterov"] is True
    assert {k.split(".")[0] for k in flat} == {"data", "model", "pruning", "optim", "deepspeed",
                                               "checkpoint", "tracking", "seed",
                                               "steps_per_epoch_limit", "eval_batches_limit"}
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_cli(capsys):
    assert main(["--config", str(CONFIGS / "demo.yaml"), "--pruning.lambda_n=3e-11"]) == 0
    assert "lambda_n: 3.0e-11" in capsys.readouterr().out
    assert main(["--config", str(CONFIGS / "demo.yaml"), "pruning.lambda_w=-1"]) == 2
    assert "pruning.lambda_w" in capsys.readouterr().err


# --------------------------------------------------------------------------- ds_config

@pytest.mark.parametrize("world, accum, on_gpu", [(1, 1, False), (4, 2, True), (3, 4, False)])
def test_ds_config_consistent(world, accum, on_gpu):
    cfg = load_config(CONFIGS / "cifar10.yaml", [f"optim.grad_accum={accum}", "optim.grad_clip=1.5", "deepspeed.precision=auto",
                                                 "deepspeed.zero_stage=2"])
    ds = build_ds_config(cfg, world, on_gpu)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * accum * world
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == accum
    assert ds["gradient_clipping"] == 1.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is on_gpu and ds["fp16"]["enabled"] is False
    assert "optimizer" not in ds and ds["wall_clock_breakdown"] is False


def test_precision_resolution():
    assert resolve_precision("auto", True) == "bf16" and resolve_precision("auto", False) == "fp32"
    assert resolve_precision("bf16", False) == "bf16"
    with pytest.raises(ConfigError, match="deepspeed.precision: fp16 is not supported"):
        load_config(None, ["deepspeed.precision=fp16"])


def test_lr_schedule():
    assert lr_at(10, 100, 0.1, "none") == 0.1
    assert lr_at(0, 100, 0.1, "cosine") == 0.1 and lr_at(100, 100, 0.1, "cosine") == 0.0
    assert math.isclose(lr_at(50, 100, 0.1, "cosine"), 0.05)


# --------------------------------------------------------------------------- optimizer

def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.nn.Parameter(torch.randn(5, generator=g))
    weights = [torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    return logits, weights


def _grads(logits, weights):
    logits.grad = torch.full_like(logits, 0.3)
    for w in weights:
        w.grad = torch.full_like(w, -0.2)


def test_groups_update_with_their_own_lr_mask_first():
    logits, weights = _params()
    cfg = load_config(None, ["optim.mask_lr=0.05", "optim.lr=0.01"])
    opt = build_optimizer([logits], weights, cfg)
    assert [g["role"] for g in opt.param_groups] == ["mask", "weight"]
    order = []
    for role, inner in opt._inner.items():
        inner.register_step_pre_hook(lambda o, a, k, role=role: order.append(role))
    before = [logits.detach().clone()] + [w.detach().clone() for w in weights]
    _grads(logits, weights)
    opt.step()
    assert order == ["mask", "weight"]
    # Adam's first step moves every element by lr against the gradient's sign.
    torch.testing.assert_close(logits.detach() - before[0], torch.full_like(logits, -0.05))
    for w, b in zip(weights, before[1:]):
        torch.testing.assert_close(w.detach() - b, torch.full_like(w, 0.01))


def test_sgd_weights_adam_masks_and_lr_reset():
    logits, weights = _params()
    cfg = load_config(None, ["optim.weight_optimizer=sgd", "optim.lr=0.1", "optim.mask_lr=0.05",
                             "optim.momentum=0.9", "optim.nesterov=true"])
    opt = build_optimizer([logits], weights, cfg)
    assert [g["algorithm"] for g in opt.param_groups] == ["adam", "sgd"]
    w0 = weights[0].detach().clone()
    _grads(logits, weights)
    opt.step()
    # Nesterov SGD, first step: buf = g, update = g + momentum * buf = 1.9 g.
    torch.testing.assert_close(weights[0].detach() - w0, torch.full_like(w0, 0.1 * 1.9 * 0.2))
    set_lr(opt, "weight", 0.0025)
    assert get_lr(opt, "weight") == 0.0025 and get_lr(opt, "mask") == 0.05
    assert "momentum_buffer" in opt.state[weights[0]]  # state kept across the LR reset


def test_freeze_and_state_dict_roundtrip():
    logits, weights = _params()
    opt = build_optimizer([logits], weights, load_config(None))
    _grads(logits, weights)
    opt.step()
    logits2, weights2 = _params()
    with torch.no_grad():
        logits2.copy_(logits)
        for a, b in zip(weights2, weights):
            a.copy_(b)
    opt2 = build_optimizer([logits2], weights2, load_config(None))
    opt2.load_state_dict(opt.state_dict())
    freeze(opt, "mask")
    freeze(opt2, "mask")
    frozen = logits.detach().clone()
    for o, (lg, ws) in ((opt, (logits, weights)), (opt2, (logits2, weights2))):
        _grads(lg, ws)
        o.step()
    assert torch.equal(logits.detach(), frozen) and torch.equal(logits2.detach(), frozen)
    for a, b in zip(weights, weights2):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["frozen"] is True


def test_optimizer_without_masks():
    _, weights = _params()
    opt = MaskWeightOptimizer([], weights, mask_lr=1e-3, lr=1e-3)
    assert [g["role"] for g in opt.param_groups] == ["weight"]
    with pytest.raises(ValueError):
        MaskWeightOptimizer([], [], mask_lr=1e-3, lr=1e-3)


# --------------------------------------------------------------------------- launch environment

def test_expand_hostlist():
    assert expand_hostlist("node[1-3,5]") == ["node1", "node2", "node3", "node5"]
    assert expand_hostlist("gpu[07-09],cpu1") == ["gpu07", "gpu08", "gpu09", "cpu1"]
    assert expand_hostlist("r[1-2]n[01-02]") == ["r1n01", "r1n02", "r2n01", "r2n02"]
    assert expand_hostlist("single") == ["single"]
    assert tasks_on_node("2(x3),1", 2) == 2 and tasks_on_node("2(x3),1", 3) == 1


_LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE",
                "SLURM_TASKS_PER_NODE", "SLURM_NODEID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                "SLURM_JOB_ID"]


@pytest.fixture
def clean_env(monkeypatch):
    for v in _LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def test_discover_torchrun_and_deepspeed(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    clean_env.setenv("MASTER_PORT", "29501")
    assert discover() == ("torchrun", 3, 4, 1, 2, "10.0.0.1", 29501)
    clean_env.delenv("LOCAL_WORLD_SIZE")
    clean_env.delenv("LOCAL_RANK")
    clean_env.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's name; --local_rank as argument
    assert discover(local_rank_arg=1)[:5] == ("deepspeed", 3, 4, 1, 2)


def test_discover_slurm(clean_env):
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "6")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_NODEID", "2")
    clean_env.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x3)")
    clean_env.setenv("SLURM_STEP_NODELIST", "localhost,other[2-3]")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    launcher, rank, world, lrank, lworld, addr, port = discover()
    assert (launcher, rank, world, lrank, lworld, addr) == ("slurm", 5, 6, 1, 2, "localhost")
    assert port == 15000 + 123456 % 20000
    clean_env.setenv("MASTER_ADDR", "10.1.1.1")
    clean_env.setenv("MASTER_PORT", "4000")
    assert discover()[5:] == ("10.1.1.1", 4000)


def test_discover_batch_script_is_single_process(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "4")  # sbatch sets these, but no srun step is running
    with pytest.warns(UserWarning, match="srun"):
        launcher, rank, world, *_ = discover()
    assert (launcher, rank, world) == ("single", 0, 1)


def test_single_process_picks_another_port_when_its_own_is_taken(clean_env, tmp_path):
    """The port _free_port chose is taken before the store binds it (the CI race): a fresh
    process, a real listening socket on that port, a real gloo group on the next one."""
    script = tmp_path / "taken_port.py"
    script.write_text(
        "import socket, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import torch.distributed as dist\n"
        "from launcher import distributed\n"
        "held = socket.socket(); held.bind(('127.0.0.1', 0)); held.listen()\n"
        "taken = held.getsockname()[1]\n"
        "ports = iter([taken])\n"
        "real = distributed._free_port\n"
        "distributed._free_port = lambda: next(ports, None) or real()\n"
        "info = distributed.setup_distributed()\n"
        "assert dist.is_initialized() and info.master_port != taken, (info, taken)\n"
        "distributed.cleanup()\n"
        "print('ok', taken, info.master_port)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("ok ")
