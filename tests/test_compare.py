"""The budget-matched method comparison (tuning/compare.py) end to end: real Ray (local),
real MLflow (SQLite), the launcher's real training runs on a few hundred real Fashion-MNIST
images (configs/compare_quick.yaml); and its bad inputs, each one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from mlflow import MlflowClient

from helpers_train import N_TEST, REPO, clean_env, module_state, new_store, tiny_data, train_cmd
from launcher.checkpoint import safe_load
from model.energy_models import MODELS as ENERGY_MODELS
from tuning.compare import CompareSetup, Outcome, energy_table, summarise, table, trial_key, trial_overrides
from launcher.config import ConfigError
from tuning.compare_config import METHODS, load_compare_config

QUICK = REPO / "configs" / "compare_quick.yaml"


def compare_cmd(*args: str) -> list[str]:
    return [sys.executable, "tuning/compare.py", "--config", str(QUICK), *args]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick comparison, run once: every method on one budget, one seed."""
    base = tmp_path_factory.mktemp("compare")
    store = new_store(base / "mlruns.db")
    doc = yaml.safe_load(QUICK.read_text())
    train = [*doc["train_overrides"], f"data.data_dir={tiny_data(base)}", f"tracking.tracking_uri={store}",
             "tracking.experiment=compare-test"]
    proc = subprocess.run(compare_cmd("train_overrides=[" + ",".join(train) + "]", f"storage_path={base}"),
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = base / "quick"
    return {"out": out, "store": store, "summary": json.loads((out / "summary.json").read_text()),
            "stdout": proc.stdout, "budget": doc["budgets"][0]}


@pytest.mark.slow
def test_every_method_lands_on_the_budget_on_the_full_test_split(quick):
    s, budget = quick["summary"], quick["budget"]
    assert [c["method"] for c in s["cells"]] == list(METHODS)
    trials = {t["method"]: t for t in s["trials"]}
    assert all(t["status"] == "finished" for t in trials.values()), s["notes"]
    for t in trials.values():
        assert t["test_samples"] == N_TEST  # the whole test split, every trial
    dense = trials["dense"]
    assert dense["weight_keep"] == dense["neuron_keep"] == dense["connectivity"] == 1.0
    for method in ("joint", "weights", "neurons", "magnitude"):
        t = trials[method]
        # calibrated on the validation split, reported on the test split (128 images each)
        assert abs(t["sops_per_sample"] / budget - 1) <= 0.25, (method, t["sops_per_sample"])
        cell = next(c for c in s["cells"] if c["method"] == method)
        assert cell["energy_ratio"]["mean"] == pytest.approx(dense["sops_per_sample"] / t["sops_per_sample"])
        for m in ENERGY_MODELS:  # the energy under every hardware model, against the same dense run
            key = f"energy_pj_per_sample/{m}"
            assert cell[f"ratio/{m}"]["mean"] == pytest.approx(dense[key] / t[key])
    assert trials["weights"]["neuron_keep"] == 1.0 and trials["neurons"]["weight_keep"] == 1.0
    assert trials["magnitude"]["neuron_keep"] == 1.0
    text = (quick["out"] / "results.txt").read_text()
    assert all(m in text for m in METHODS) and (quick["out"] / "compare.png").stat().st_size > 10_000
    assert "energy per sample under each hardware model" in text and all(f"{m} pJ/sample" in text for m in ENERGY_MODELS)


@pytest.mark.slow
def test_magnitude_prunes_the_dense_network_by_one_global_threshold(quick):
    runs = quick["out"] / "runs"
    dense = safe_load(runs / "dense_s0" / "best_model.pt")
    key = trial_key({"method": "magnitude", "budget": quick["budget"], "seed": 0})
    config = yaml.safe_load((runs / key / "config.yaml").read_text())
    assert config["pruning"]["magnitude_from"] == str(runs / "dense_s0")
    # Hardened without a search: the subnetwork checkpoint holds the dense weights unchanged (BatchNorm's
    # running statistics re-estimated for the pruned network: launcher.train.calibrate_budget)...
    sub = module_state(runs / key / "checkpoints" / "subnetwork")
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert any(name.endswith(stats) for name in dense)
    for name, w in dense.items():
        if not name.endswith(stats):
            assert torch.equal(sub[name], w), name
    assert any(not torch.equal(sub[name], w) for name, w in dense.items() if name.endswith("running_mean"))
    # ...and the selected masks keep exactly the largest |w| of the dense network, globally
    selected = safe_load(runs / key / "best_model.pt")
    kept, removed = [], []
    for name in (k for k in selected if k.endswith(".logits")):
        w = dense[name.replace(".logits", ".weight")].abs().flatten()
        keep = (selected[name] > 0).flatten()
        kept.append(w[keep])
        removed.append(w[~keep])
    kept, removed = torch.cat(kept), torch.cat(removed)
    assert len(kept) and len(removed) and kept.min() > removed.max()
    report = json.loads((runs / key / "energy_report.json").read_text())
    assert report["dense_reference_sops"] == json.loads((runs / "dense_s0" / "results.json").read_text())["sops_per_sample"]


@pytest.mark.slow
def test_mlflow_parent_run_with_one_nested_run_per_trial(quick):
    client = MlflowClient(quick["store"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.data.tags.get("spikeprune.kind") == "compare"]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        trial_key(t) for t in quick["summary"]["trials"])
    dense_id = next(r.info.run_id for r in children if r.info.run_name == "dense_s0")
    for r in children:
        if r.info.run_name != "dense_s0":
            assert r.data.tags["spikeprune.dense_reference_run"] == dense_id
            assert r.data.metrics["energy_ratio_vs_dense"] > 1
            assert all(r.data.metrics[f"energy_ratio_vs_dense/{m}"] > 1 for m in ENERGY_MODELS)
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"results.txt", "compare.png", "summary.json"} <= artifacts


def test_a_budget_above_the_dense_network_is_reported():
    """Pure summary of finished runs: the budget over the dense SOPs is named in the notes."""
    cfg = load_compare_config(QUICK, ["budgets=[1e9]", "methods=[dense,joint]"])
    res = {"test_top1": 0.5, "sops_per_sample": 1e5, "connectivity": 1.0, "weight_keep": 1.0,
           "neuron_keep": 1.0, "test_samples": 128}
    outcomes = [Outcome("dense", None, 0, "finished", res, None),
                Outcome("joint", 1e9, 0, "finished", res, None)]
    s = summarise(cfg, outcomes)
    assert any("1e+09 at or above the dense network's 1e+05" in n for n in s["notes"])
    assert s["cells"][1]["energy_ratio"]["mean"] == 1.0


def test_energy_budgets_put_every_pruned_method_on_that_models_energy(tmp_path):
    """energy_model=loihi: each pruned trial gets pruning.energy_budget_pj and the model, and
    the summary measures the distance to the budget in loihi pJ (pure, on finished results)."""
    cfg = load_compare_config(QUICK, ["budgets=[2e6]", "methods=[dense,joint,magnitude]", "energy_model=loihi"])
    setup = CompareSetup(str(REPO / cfg.train_config), (), str(tmp_path), None, 1.0, cfg.axis)
    spec = {"method": "magnitude", "budget": 2e6, "seed": 0}
    over = trial_overrides(spec, setup)
    assert "pruning.energy_budget_pj=2000000.0" in over and "pruning.energy_model=loihi" in over
    assert not any(o.startswith("pruning.sop_budget=") for o in over)
    dense = {"test_top1": 0.8, "sops_per_sample": 1e5, "test_samples": 128,
             **{f"energy_pj_per_sample/{m}": 8e6 for m in ENERGY_MODELS}}
    joint = {**dense, "sops_per_sample": 1e4, "energy_pj_per_sample/loihi": 2.1e6}
    s = summarise(cfg, [Outcome("dense", None, 0, "finished", dense, None),
                        Outcome("joint", 2e6, 0, "finished", joint, None),
                        Outcome("magnitude", 2e6, 0, "unfinished", {}, None)])
    cell = s["cells"][1]
    assert cell["budget_error"]["mean"] == pytest.approx(0.05) and cell["cost"]["mean"] == 2.1e6
    assert cell["ratio/loihi"]["mean"] == pytest.approx(8e6 / 2.1e6) and cell["energy_ratio"]["mean"] == 10
    assert "pJ/sample (loihi)" in table(s) and "(3.81x)" in energy_table(s)
    with pytest.raises(ConfigError, match="pruning.sop_budget is set, but the trials' budgets are pJ/sample"):
        load_compare_config(QUICK, ["energy_model=loihi", "train_overrides=[pruning.sop_budget=1e4]"])


@pytest.mark.parametrize("args, message", [
    (["methods=[dense,nope]"], "methods: unknown method 'nope'"),
    (["methods=[magnitude]"], "methods: magnitude prunes the trained dense network: add dense"),
    (["budgets=[]"], "budgets:"),
])
def test_bad_compare_config_is_one_line(args, message, tmp_path):
    proc = subprocess.run(compare_cmd(*args, f"storage_path={tmp_path}"), cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())


def test_magnitude_without_its_dense_run_is_one_line(tmp_path):
    args = [f"checkpoint.run_dir={tmp_path / 'run'}", "tracking.enabled=false", "pruning.search_epochs=0",
            "pruning.prune_neurons=false", "pruning.sop_budget=1e5",
            f"pruning.magnitude_from={tmp_path / 'no_dense'}"]
    proc = subprocess.run(train_cmd(*args), cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pruning.magnitude_from:" in lines[0] and "no_dense holds no finished run" in lines[0]
