"""tuning/: the sweep config, the front and the budgets, and real sweeps.

The slow tests run real things: a local Ray with 2 CPUs, the launcher's training on the demo
data (a 1/16-width net, 3 steps per epoch), MLflow on SQLite. One sweep is driven from a
subprocess, SIGKILLed after its first finished trial and started again; one of its trials
crashes once (a wrapper around the real trainable) and must be retried.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers_train import module_state, new_store
from launcher.checkpoint import safe_load
from launcher.config import ConfigError
from model import build_model
from model.energy_models import MODELS as ENERGY_MODELS
from model.energy_report import EnergyReport
from model.masks import load_masks
from tuning import pareto
from tuning.pareto import TrialOutcome
from tuning.sweep import (EXIT_INTERRUPTED, SweepError, main, ray_temp_dir, refuse_changed_restart, run_sweep,
                          run_trial, rung_score, search_algorithm)
from tuning.sweep_config import load_sweep_config

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# A trial in seconds: 1/16 width, T=2, 3 optimizer steps per epoch, one eval batch.
# The demo's whole train and validation splits, but 128 real test images: every trial's final
# report reads its whole test split, and 10,000 images would be most of a tiny trial's time.
SWEEP_DATA = Path(tempfile.gettempdir()) / f"spikeprune_sweep_data_{os.getpid()}"
TINY_TRIAL = [f"data.data_dir={SWEEP_DATA}", "model.width=0.0625", "model.T=2", "data.batch_size=16", "steps_per_epoch_limit=3",
              "eval_batches_limit=1", "pruning.search_epochs=2", "pruning.finetune_epochs=1",
              "optim.lr=1e-2", "optim.mask_lr=1e-2", "checkpoint.every_steps=0"]
# Variables a parent process may have exported that would turn a training run into a rank.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "MLFLOW_TRACKING_URI", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS",
             "RAY_ADDRESS")


@pytest.fixture(scope="module", autouse=True)
def sweep_data(tmp_path_factory):
    from helpers_train import tiny_data

    demo = REPO / "data" / "demo"
    if not (demo / "train.beton").exists():
        from data_pipeline.images import write_demo

        write_demo(out_dir=demo)
    SWEEP_DATA.mkdir(exist_ok=True)
    small = tiny_data(tmp_path_factory.getbasetemp())
    for split, src in (("train", demo), ("val", demo), ("test", small)):
        link = SWEEP_DATA / f"{split}.beton"
        if not link.exists():
            link.symlink_to(src / f"{split}.beton")
    yield SWEEP_DATA
    shutil.rmtree(SWEEP_DATA, ignore_errors=True)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def write_sweep_config(path: Path, base: Path, **changes) -> Path:
    doc = {
        "train_config": str(REPO / "configs" / "demo.yaml"),
        "train_overrides": [*TINY_TRIAL, f"tracking.tracking_uri={new_store(base / 'mlruns.db')}",
                            "tracking.experiment=sweep-test"],
        "budgets": [1.0, 1.0e9],  # 1 SOP/sample: below anything a live network reaches
        "search": {"lambda_w": [1e-12, 1e-10], "lambda_n": [1e-12, 1e-10]},
        "num_trials": 3,
        "max_concurrent_trials": 2,
        "resources": {"cpus": 1},
        "scheduler": {"name": "none"},
        "max_failures": 2,
        "storage_path": str(base / "sweeps"),
        "name": "t",
        "local_cpus": 2,
        **changes,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


# --------------------------------------------------------------------------- the front, budgets

def outcome(i: int, acc: float, sops: float, status: str = "finished") -> TrialOutcome:
    return TrialOutcome(trial_id=f"t{i}", status=status, params={"pruning.lambda_w": 1e-11},
                        val_top1=acc, sops_per_sample=sops, cost=sops, test_top1=acc, connectivity=0.1,
                        energy_pj_per_sample=sops * 0.9)


def test_front_keeps_finished_non_dominated_trials():
    trials = [outcome(0, 0.50, 100), outcome(1, 0.60, 200), outcome(2, 0.55, 300),  # 2 dominated by 1
              outcome(3, 0.70, 400), outcome(4, 0.65, 100),  # 4 dominates 0
              outcome(5, 0.99, 50, status="early_stopped"),  # truncated numbers: never counted
              outcome(6, 0.99, 10, status="error")]
    assert [t.trial_id for t in pareto.pareto_front(trials)] == ["t4", "t3"]


def test_best_per_budget_and_infeasible_budget():
    trials = [outcome(0, 0.50, 100), outcome(1, 0.60, 200), outcome(2, 0.70, 400),
              outcome(3, 0.99, 5, status="early_stopped")]
    low, mid, high = pareto.best_per_budget(trials, [50, 250, 1000])
    assert not low.feasible and low.lowest_cost == 100 and "infeasible" in low.message()
    assert mid.best.trial_id == "t1" and high.best.trial_id == "t2"
    # 5 % over the budget counts only with a tolerance.
    assert not pareto.best_per_budget(trials, [95])[0].feasible
    assert pareto.best_per_budget(trials, [95], tolerance=0.1)[0].best.trial_id == "t0"
    assert "none finished" in pareto.budget_table(pareto.best_per_budget([], [10]), [])


def test_rung_score_ranks_over_budget_trials_last():
    within = [rung_score(acc, sops, 1e4) for acc, sops in ((0.0, 1e4), (0.3, 5e3), (0.9, 0.0))]
    over = [rung_score(acc, sops, 1e4) for acc, sops in ((0.99, 1.01e4), (0.99, 3e4))]
    assert within == [0.0, 0.3, 0.9] and max(over) < min(within) and over[0] > over[1]
    assert rung_score(0.5, 1e9, None) == 0.5  # budget mode: accuracy only


def test_plot_and_tables(tmp_path):
    trials = [outcome(0, 0.5, 100), outcome(1, 0.6, 200), outcome(2, 0.2, 50, "early_stopped")]
    answers = pareto.best_per_budget(trials, [150, 20])
    pareto.plot(tmp_path / "front.png", trials, answers)
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = pareto.budget_table(answers, ["pruning.lambda_w"])
    assert "lambda_w" in text and "t0" in text and "infeasible" in text
    doc = pareto.summary(trials, answers)
    assert doc["pareto_front"] == ["t0", "t1"] and doc["counts"]["early_stopped"] == 1


def test_optuna_searcher_prunes_early_stopped_trials(config_file):
    """Ray reports a scheduler-stopped trial as complete with its last (truncated) result;
    the searcher must store it in Optuna as PRUNED, and a finished one with its constraint."""
    import optuna
    from ray import tune

    cfg = load_sweep_config(config_file)
    searcher = search_algorithm(cfg)
    searcher.set_search_properties(None, None, {"pruning.lambda_w": tune.loguniform(1e-12, 1e-10),
                                                "pruning.lambda_n": tune.loguniform(1e-12, 1e-10)})
    searcher.suggest("stopped")
    searcher.suggest("done")
    searcher.on_trial_complete("stopped", {"val_top1": 0.9, "cost": 10.0})
    searcher.on_trial_complete("done", {"val_top1": 0.5, "cost": 3e9, "finished": True})
    stopped, done = searcher._ot_study.get_trials(deepcopy=False)
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert done.state == optuna.trial.TrialState.COMPLETE and done.values == [0.5, 3e9]
    assert done.constraints == {"over_budget": 3e9 - 1e9}  # over the largest budget: infeasible


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """A valid sweep config (for the tests that need one but run no sweep)."""
    base = tmp_path_factory.mktemp("cfg")
    return write_sweep_config(base / "sweep.yaml", base)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, message", [
    (["num_trail=3"], "unknown config key 'num_trail' (did you mean 'num_trials'?)"),
    (["search.lambda_x=[1,2]"], "unknown config key 'search.lambda_x'"),
    (["search.lambda_w=null", "search.lambda_n=null"], "search: empty search space"),
    (["search.lambda_w=[1e-10,1e-12]"], "search.lambda_w: expected [low, high] with 0 < low < high"),
    (["search.lambda_w=[1e-12]"], "search.lambda_w: expected [low, high]"),
    (["budgets=[]"], "budgets: expected a list of budgets per sample"),
    (["budgets=[-5]"], "budgets: expected a list of budgets per sample"),
    (["energy_model=truenorth"], "energy_model: expected one of"),
    (["budget_mode=true", "search.lambda_w=null", "search.lambda_n=null", "search.lr=[1e-3,1e-2]",
      "scheduler.name=none", "energy_model=loihi", "train_overrides=[pruning.sop_budget=5e4]"],
     "train_config: pruning.sop_budget is set, but the trials' budgets are pJ/sample (loihi)"),
    (["train_overrides=[pruning.lamda_w=1]"], "unknown config key 'pruning.lamda_w'"),
    (["budget_mode=true"], "search.lambda_w: budget mode adapts the lambdas itself"),
    (["budget_mode=true", "search.lambda_w=null", "search.lambda_n=null", "search.lr=[1e-3,1e-2]",
      "scheduler.name=asha", "budgets=[1e4,2e4]"], "scheduler.name: ASHA compares every trial"),
    (["scheduler.name=asha", "scheduler.grace_period=5"], "scheduler.grace_period: 5 search epochs"),
    (["resources.cpus=0"], "resources.cpus: must be > 0"),
])
def test_bad_sweep_config_names_the_key(config_file, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_sweep_config(config_file, overrides)
    assert message in str(err.value)


def test_cli_reports_config_errors_in_one_line(config_file):
    out = subprocess.run([sys.executable, "tuning/sweep.py", "--config", str(config_file), "num_trail=3"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=clean_env(), check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "sweep config error: unknown config key 'num_trail' (did you mean 'num_trials'?)")


def test_unreachable_address_fails_fast(config_file, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    assert main(["--config", str(config_file), "--address", f"127.0.0.1:{port}"]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert f"sweep error: no Ray cluster reachable at 127.0.0.1:{port}" in err


def test_restart_with_other_settings_is_refused(config_file, tmp_path):
    from tuning.sweep_config import sweep_config_yaml

    saved = tmp_path / "sweep_config.yaml"
    saved.write_text(sweep_config_yaml(load_sweep_config(config_file)))

    def check_restart(cfg):
        refuse_changed_restart("sweep", cfg.sweep_dir, sweep_config_yaml(cfg), saved)

    check_restart(load_sweep_config(config_file, ["address=auto", "local_cpus=1"]))  # how, not what
    with pytest.raises(SweepError, match=r"\(budgets, num_trials differ from"):
        check_restart(load_sweep_config(config_file, ["num_trials=5", "budgets=[7]"]))


# --------------------------------------------------------------------------- a real sweep

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from test_sweep import drive
sys.exit(drive({config!r}))
"""


def flaky_trial(config, setup):
    """`run_trial`, except that the first trial to reach its second epoch report crashes
    there, once. That is after the first epoch's checkpoint, so the retry resumes from it.
    Ray imports this module in its workers (PYTHONPATH holds tests/).
    """
    from ray import tune

    import launcher.train

    trial_id = tune.get_context().get_trial_id()
    marker = Path(setup.sweep_dir) / "crashed_trial"
    if not marker.exists():
        real_train = launcher.train.train

        def crashing_train(cfg, reporter=None, **kwargs):
            reports = []

            def report(metrics):
                reporter(metrics)
                reports.append(metrics)
                if len(reports) == 2:
                    try:  # O_EXCL: only one trial of the sweep crashes
                        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    except FileExistsError:
                        return
                    os.write(fd, trial_id.encode())
                    os.close(fd)
                    raise RuntimeError("injected failure after the second epoch")

            return real_train(cfg, reporter=report, **kwargs)

        launcher.train.train = crashing_train  # this worker process only
    run_trial(config, setup)


def drive(config_path: str) -> int:
    doc = run_sweep(load_sweep_config(config_path), trainable=flaky_trial)
    return EXIT_INTERRUPTED if doc["interrupted"] else 0


def _finished_trials(sweep_dir: Path) -> list[str]:
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(sweep_dir)).trials
    except Exception:  # no state yet, or a state file being replaced
        return []
    return [t.trial_id for t in trials if t.status == "TERMINATED" and (t.last_result or {}).get("finished")]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.fixture(scope="module")
def killed_and_resumed_sweep(tmp_path_factory):
    """3 trials, 2 at a time, one of them crashing once. The driver is SIGKILLed (with every
    process it started) once a trial has finished, then started again and left to finish."""
    base = tmp_path_factory.mktemp("sw")
    config = write_sweep_config(base / "sweep.yaml", base)
    sweep_dir = base / "sweeps" / "t"
    cmd = [sys.executable, "-c", DRIVER.format(tests=str(TESTS), config=str(config))]
    env = clean_env(PYTHONPATH=str(TESTS))
    start = time.monotonic()
    with open(base / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            while not (done := _finished_trials(sweep_dir)):
                assert first.poll() is None, f"sweep ended before the kill: {(base / 'first.log').read_text()[-3000:]}"
                assert time.monotonic() - start < 420, "no trial finished in 420 s"
                time.sleep(2)
        finally:
            for pid in [first.pid, *_descendants(first.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            first.wait()
    before = {t: _trial_files(sweep_dir, t) for t in done}
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    yield {"base": base, "sweep_dir": sweep_dir, "finished_before_kill": before,
           "second_log": second.stdout + second.stderr,
           "summary": json.loads((sweep_dir / "summary.json").read_text())}
    # pytest's folders are too deep for Ray's socket paths: its session files went to /tmp.
    ray_dir = Path(ray_temp_dir(sweep_dir))
    if base not in ray_dir.parents:
        shutil.rmtree(ray_dir, ignore_errors=True)


def _trial_files(sweep_dir: Path, trial_id: str) -> dict:
    trial = sweep_dir / f"trial_{trial_id}"
    return {"results_mtime": (trial / "run" / "results.json").stat().st_mtime_ns,
            "progress_lines": len((trial / "progress.csv").read_text().splitlines())}


@pytest.mark.slow
def test_sweep_writes_table_plot_and_summary(killed_and_resumed_sweep):
    s = killed_and_resumed_sweep
    sweep_dir, summary = s["sweep_dir"], s["summary"]
    assert summary["counts"]["finished"] == 3, summary["counts"]
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (sweep_dir / "results.txt").read_text()
    assert "Pareto front" in text and "best trial per budget" in text
    low, high = summary["budgets"]
    assert low["budget"] == 1.0 and not low["feasible"] and "infeasible" in text  # not a crash
    assert high["feasible"] and high["best_trial"] in summary["pareto_front"]
    assert (sweep_dir / "best_configs" / "budget_1e+09.yaml").is_file()
    for t in summary["trials"]:
        assert t["status"] == "finished" and 0 <= t["val_top1"] <= 1 and t["sops_per_sample"] >= 0
        assert t["test_top1"] is not None and t["energy_pj_per_sample"] is not None


@pytest.mark.slow
def test_sweep_logs_parent_and_nested_mlflow_runs(killed_and_resumed_sweep):
    from mlflow import MlflowClient

    s = killed_and_resumed_sweep
    client = MlflowClient(f"sqlite:///{s['base']}/mlruns.db")
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("spikeprune.kind") == "sweep"]
    assert len(parents) == 1, "one parent run per sweep, also across the restart"
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_id == s["summary"]["parent_run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "results.txt", "summary.json", "best_configs"} <= artifacts
    assert "budget_1000000000_val_top1" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_id = {t["mlflow_run_id"]: t for t in s["summary"]["trials"]}
    assert sorted(r.info.run_id for r in children) == sorted(by_id), "one child run per trial"
    for child in children:
        trial = by_id[child.info.run_id]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["pruning.lambda_w"]) == pytest.approx(trial["params"]["pruning.lambda_w"])
        assert child.data.metrics["test_top1"] == pytest.approx(trial["test_top1"])


@pytest.mark.slow
def test_crashed_trial_is_retried_from_its_checkpoint(killed_and_resumed_sweep):
    s = killed_and_resumed_sweep
    marker = s["sweep_dir"] / "crashed_trial"
    assert marker.exists(), "the injected failure ran"
    (crashed,) = [t for t in s["summary"]["trials"] if t["trial_id"] == marker.read_text()]
    assert crashed["status"] == "finished"
    epochs = json.loads((Path(crashed["run_dir"]) / "tune_epochs.json").read_text())
    assert sorted(epochs) == ["finetune/0", "search/0", "search/1"]


@pytest.mark.slow
def test_restarted_sweep_does_not_rerun_finished_trials(killed_and_resumed_sweep):
    s = killed_and_resumed_sweep
    assert s["finished_before_kill"], "the kill came after a finished trial"
    assert "continuing the sweep in" in s["second_log"]
    for trial_id, files in s["finished_before_kill"].items():
        assert _trial_files(s["sweep_dir"], trial_id) == files, f"{trial_id} ran again"


# --------------------------------------------------------------------------- budget mode

@pytest.mark.slow
def test_budget_mode_lands_within_ten_percent(tmp_path):
    """The hardened, fine-tuned net's SOPs on the whole test split within +-10 %: the
    calibration sees only validation batches, and fine-tuning moves the firing rates. The mask
    file is the selected network's (the calibration after each fine-tune epoch moves the kept
    set after hardening). Energy budgets: test_energy_budget_sweep_puts_each_trial_on_its_budget."""
    budget = 1.5e4
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launcher.train", "--config", "configs/demo.yaml", *TINY_TRIAL,
           "steps_per_epoch_limit=20", "eval_batches_limit=16", f"pruning.sop_budget={budget}",
           f"checkpoint.run_dir={run_dir}", "tracking.enabled=false"]
    out = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    sops = json.loads((run_dir / "results.json").read_text())["sops_per_sample"]
    print(f"budget {budget:.4g} SOPs/sample -> measured {sops:.4g} ({sops / budget - 1:+.1%})")
    assert abs(sops / budget - 1) <= 0.10
    selected = safe_load(run_dir / "best_model.pt")
    subnetwork = module_state(run_dir / "checkpoints" / "subnetwork")
    net = build_model("cifar10_6conv2fc", num_classes=10, T=2, width=0.0625, input_size=32)
    load_masks(net, run_dir / "masks.spm", "cifar10_6conv2fc")
    from_file = {k: v > 0 for k, v in net.state_dict().items() if k.endswith("logits")}
    assert from_file and from_file.keys() == {k for k in selected if k.endswith("logits")}
    assert all(torch.equal(from_file[k], selected[k] > 0) for k in from_file)
    assert any(not torch.equal(from_file[k], subnetwork[k] > 0) for k in from_file), \
        "calibration did not move the kept set after hardening: the test shows nothing"


def test_budget_axis_sets_the_trials_budget_key(config_file):
    """SOP budgets set pruning.sop_budget; energy budgets pruning.energy_budget_pj, with the
    model named in every trial's overrides, and the trials ranked on that model's energy."""
    from launcher.config import load_config
    from tuning.sweep import first_points, param_space, trial_setup
    from tuning.sweep_config import base_train_config

    on = ["budget_mode=true", "search.lambda_w=null", "search.lambda_n=null", "search.lr=[1e-3,1e-2]"]
    for extra, key, metric in (([], "pruning.sop_budget", "sops_per_sample"),
                               (["energy_model=lemaire"], "pruning.energy_budget_pj", "energy_pj_per_sample/lemaire")):
        cfg = load_sweep_config(config_file, [*on, *extra, "budgets=[5e6,8e6]"])
        assert set(param_space(cfg)) == {"optim.lr", key}
        assert [p[key] for p in first_points(cfg)] == [5e6, 8e6]
        setup = trial_setup(cfg, base_train_config(cfg), None)
        assert setup.cost_metric == metric and setup.cost_limit is None
        trial = load_config(setup.train_config, [*setup.train_overrides, f"{key}=5e6"])
        assert trial.pruning.energy_model == (cfg.energy_model or "horowitz45")
    assert trial_setup(load_sweep_config(config_file, ["energy_model=loihi"]), base_train_config(cfg),
                       None).cost_limit == 1e9  # ranked on loihi energy against the largest budget
    outcomes = [outcome(0, 0.5, 4e6), outcome(1, 0.6, 9e6)]
    answers = pareto.best_per_budget(outcomes, [5e6], unit="pJ/sample (loihi)")
    assert answers[0].best.trial_id == "t0" and "5e+06 pJ/sample (loihi)" in answers[0].message()
    assert "pJ/sample (loihi)" in pareto.table(outcomes, [], "pJ/sample (loihi)")


@pytest.mark.slow
def test_energy_budget_sweep_puts_each_trial_on_its_budget(tmp_path):
    """budget_mode=true on energy budgets under `loihi`: the sampler picks a budget per trial
    (each budget tried first) and searches the other knobs; every finished network sits on its
    own budget under that model, and the outputs say which figure the budgets count."""
    budgets = [5.0e6, 8.0e6]  # pJ/sample; the dense net is ~1.8e7, its unprunable stem ~3e6
    config = write_sweep_config(
        tmp_path / "sweep.yaml", tmp_path, budget_mode=True, budgets=budgets, budget_tolerance=0.1,
        energy_model="loihi", search={"mask_lr": [3e-3, 3e-2]}, num_trials=2, max_failures=0,
        train_overrides=[*TINY_TRIAL, "steps_per_epoch_limit=20", "eval_batches_limit=16",
                         f"tracking.tracking_uri={new_store(tmp_path / 'mlruns.db')}"])
    out = subprocess.run([sys.executable, "tuning/sweep.py", "--config", str(config)], cwd=REPO,
                         env=clean_env(), capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "t"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    trials = summary["trials"]
    assert sorted(t["params"]["pruning.energy_budget_pj"] for t in trials) == budgets
    for t in trials:
        assert t["status"] == "finished", t
        budget = t["params"]["pruning.energy_budget_pj"]
        print(f"budget {budget:.4g} pJ/sample (loihi): validation {t['cost']:.4g}, test {t['test_cost']:.4g}")
        assert abs(t["cost"] / budget - 1) <= 0.10 and abs(t["test_cost"] / budget - 1) <= 0.10, t
        results = json.loads((Path(t["run_dir"]) / "results.json").read_text())
        assert results["energy_pj_per_sample/loihi"] == t["test_cost"]
        assert all(f"energy_pj_per_sample/{m}" in results for m in ENERGY_MODELS)
        report = EnergyReport.from_json(Path(t["run_dir"]) / "energy_report.json")
        assert report.model_energy_pj("loihi") == t["test_cost"]
        assert yaml.safe_load((Path(t["run_dir"]) / "config.yaml").read_text())["pruning"]["energy_model"] == "loihi"
    assert all(b["feasible"] for b in summary["budgets"]), summary["budgets"]
    assert summary["budget_unit"] == "pJ/sample (loihi)"
    assert "budget 5e+06 pJ/sample (loihi): trial" in (sweep_dir / "results.txt").read_text()
