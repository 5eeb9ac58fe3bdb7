"""benchmarks/gpu_check.py: the --smoke run CI can afford (real subprocess, no mocks), and
the lazy-import promise that lets the script start on a GPU machine lacking our optional deps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
CHECKS = {"neuron_kernels", "train_step", "bf16_decisions", "energy_count"}
LAUNCH_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def test_import_loads_no_project_or_optional_module():
    """The GPU machine has no DeepSpeed or FFCV: nothing beyond torch may load at import."""
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
            "mod = sys.modules['gpu_check'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(mod)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    heavy = {"model", "launcher", "data_pipeline", "ffcv", "deepspeed", "spikingjelly", "mlflow", "triton"}
    assert not loaded & heavy


@pytest.mark.slow
def test_smoke_run(tmp_path):
    """~30 s on 2 cores: every check reports a status, the CPU comparisons produce numbers."""
    out_file = tmp_path / "gpu_check.json"
    # Earlier in-process tests export RANK/MASTER_PORT for a group this pytest process still
    # holds: inherited, the script would try to bind that same port.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out_file)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    assert json.loads(out_file.read_text()) == doc
    assert doc["benchmark"] == "gpu_check" and doc["smoke"] is True and doc["failed"] == []
    assert any(line.startswith("check ") for line in lines) and "FAIL" not in proc.stdout

    checks = doc["checks"]
    assert set(checks) == CHECKS
    for name, c in checks.items():
        assert c["status"] in ("ok", "skipped"), (name, c)
        if c["status"] == "skipped":
            assert c["reason"], name
        assert all(isinstance(s, str) and ": " in s for s in c["skipped"]), name
    assert doc["unwanted_modules_loaded"] == []

    kernels = checks["neuron_kernels"]
    assert kernels["status"] == "ok"
    if not torch.cuda.is_available():
        assert any("triton" in s and "no CUDA" in s for s in kernels["skipped"])
        assert "skipped: no CUDA" in proc.stdout
    comparisons = kernels["comparisons"]
    assert {k.split("/")[1] for k in comparisons} == {"fp32", "bf16"} and len(comparisons) == 10
    for key, r in comparisons.items():
        assert r["spikes_equal"] and 0.0 <= r["grad_err_over_tol"] <= 1.0, key
    assert all(t["ours"] > 0 for t in kernels["timing_ms"].values())
    if "spikingjelly_agreement" in kernels:
        for r in kernels["spikingjelly_agreement"].values():
            assert r["spikes_differing"] == 0 and r["grad_err_over_tol"] <= 1.0
        assert all(t["spikingjelly_torch"] > 0 for t in kernels["timing_ms"].values())

    train = checks["train_step"]
    assert train["status"] == "ok"
    plain = {r["precision"]: r for r in train["runs"] if r["engine"] == "plain"}
    assert set(plain) == {"fp32", "bf16"}  # the path the GPU machine (no DeepSpeed) takes
    assert all(r["images_s"] > 0 and r["steps"] >= 1 for r in train["runs"])

    decisions = checks["bf16_decisions"]
    assert decisions["status"] == "ok" and decisions["steps"] >= 1 and decisions["logits"] > 0
    for key in ("fraction_differing", "fraction_differing_weights", "fraction_differing_neurons"):
        assert isinstance(decisions[key], float) and 0.0 <= decisions[key] <= 1.0, key
    assert set(decisions["sops_per_sample"]) == {"fp32", "bf16"}
    assert all(v >= 0 for v in decisions["sops_per_sample"].values())

    energy = checks["energy_count"]
    assert energy["status"] == "ok"
    for dtype in ("fp64", "fp32"):
        e = energy[dtype]
        assert e["layers"] > 0 and e["layers_equal"] == e["layers"], dtype
        ref, other = e["sops_per_sample"]
        assert ref > 0 and ref == other, dtype
