"""Bad input, a changed config on resume, divergence and Ctrl-C: one line each, nothing lost.

Every case runs the real `python -m launcher.train` on real (tiny) FFCV files; a bad input must
end with exit 2 and one `error:` line naming the key or file, and write nothing into the run
directory (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_train import (REPO, TINY_CONFIG, clean_env, free_port, latest_checkpoint, new_store, overrides,
                           reference_run, run_train, tiny_data, train_cmd)
from launcher.checkpoint import open_checkpoint
from launcher.config import ConfigError, load_config
from launcher.train import check_resume_config


def _run(args: list[str], cwd: Path = REPO, config: Path = TINY_CONFIG, timeout: float = 300):
    cmd = train_cmd(*args)
    cmd[cmd.index("--config") + 1] = str(config)
    return subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The last stderr line, checked: `error: ...` naming `words`, no traceback, exit `code`."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    for w in words:
        assert w in line, (w, line)
    return line


@pytest.mark.parametrize("key", ["pruning.lambda_w", "model.width", "optim.lr", "pruning.dense_reference",
                                 "pruning.sop_budget"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        load_config(TINY_CONFIG, [f"{key}={value}"])


@pytest.mark.parametrize("text, words", [("", "is empty"), ("# nothing but a comment\n", "is empty"),
                                         ("- 1\n- 2\n", "expected a mapping"), ("42\n", "expected a mapping")])
def test_empty_or_non_mapping_yaml_is_refused(tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def _write_event_beton(path: Path) -> None:
    """A real .beton with the DVS layout (frames, label): the wrong kind for an image run."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    class Frames:
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return np.full((2, 2, 4, 4), i, dtype=np.int16), i % 10

    DatasetWriter(str(path), {"frames": NDArrayField(np.dtype("int16"), (2, 2, 4, 4)), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Frames())


def _bad_data(base: Path, kind: str) -> Path:
    good, bad = tiny_data(base), base / f"bad_{kind}"
    bad.mkdir()
    for split in ("train", "val", "test"):
        data = (good / f"{split}.beton").read_bytes()
        if kind == "truncated":
            data = data[: len(data) // 3]
        elif kind == "random":
            data = np.random.default_rng(0).bytes(len(data))
        (bad / f"{split}.beton").write_bytes(data)
    if kind == "events":
        _write_event_beton(bad / "train.beton")
    if kind == "other_meta":
        (bad / "meta.json").write_text(json.dumps({"dataset": "cifar10"}))
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated", "random", "events", "other_meta", "width", "run_dir_file",
                                  "run_dir_under_file", "empty_yaml"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path_factory, tmp_path, case):
    base = tmp_path_factory.getbasetemp()
    run_dir, data = tmp_path / "run", tiny_data(base)
    config, cwd, extra, words = TINY_CONFIG, REPO, [], []
    if case in ("truncated", "random", "events", "other_meta"):
        data = _bad_data(tmp_path, case)
        words = [str(data)]
    elif case == "width":
        extra, words = ["model.width=0.001"], ["model:", "width 0.001"]
    elif case == "run_dir_file":
        run_dir.write_text("a file where the run directory should be")
        words = ["checkpoint.run_dir", "is a file"]
    elif case == "run_dir_under_file":
        (tmp_path / "file").write_text("")
        run_dir = tmp_path / "file" / "run"
        words = ["checkpoint.run_dir", "cannot write"]
    elif case == "empty_yaml":
        config, cwd = tmp_path / "empty.yaml", tmp_path
        config.write_text("")
        words = ["is empty"]
    before = run_dir.read_bytes() if run_dir.is_file() else None
    proc = _run(overrides(data, run_dir, None, *extra), cwd=cwd, config=config)
    _one_line_error(proc, 2, *words)
    if before is not None:
        assert run_dir.read_bytes() == before
    else:
        assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))
    if case == "empty_yaml":  # no full-default run started in the working directory
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return reference_run(tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_finished_run_started_again_prints_its_results(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished.run_dir, run_dir)
    def outputs():  # all but the lock and the MLflow pending file, which the restart uses
        return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
                if p.is_file() and p.name not in (".spikeprune.lock", "mlflow_pending.jsonl", "mlflow_run_id")}

    files = outputs()
    args = [a.replace(str(finished.run_dir), str(run_dir)) for a in finished.args]
    proc = run_train(args)
    results = json.loads((run_dir / "results.json").read_text())
    assert f"{run_dir} has finished already: test_top1={results['test_top1']:.4g}" in proc.stdout
    assert f"(test split, {int(results['test_samples'])} samples)" in proc.stdout
    assert outputs() == files  # nothing trained, nothing rewritten


def test_resume_config_check_names_the_changed_keys(finished):
    """check_resume_config against the real checkpoint of a finished run."""
    ckpt = open_checkpoint(latest_checkpoint(finished.run_dir))
    same = load_config(TINY_CONFIG, finished.args)
    assert check_resume_config(same, ckpt, ()) == {}
    # Where and how the run executes changes freely.
    free = load_config(TINY_CONFIG, [*finished.args, "data.num_workers=2", "checkpoint.keep_last=3",
                                     "tracking.enabled=false", "checkpoint.every_steps=5"])
    assert check_resume_config(free, ckpt, ()) == {}
    lam = load_config(TINY_CONFIG, [*finished.args, "pruning.lambda_w=2e-11"])
    with pytest.raises(ConfigError, match=r"pruning.lambda_w \(1e-11 -> 2e-11\).*"
                                          r"--allow-changed pruning.lambda_w"):
        check_resume_config(lam, ckpt, ())
    assert check_resume_config(lam, ckpt, ("pruning.lambda_w",)) == {"pruning.lambda_w": (1e-11, 2e-11)}
    # The parameters' shapes and the resume position depend on these: never, not even when named.
    for key, value in (("model.width", 0.125), ("data.batch_size", 8), ("optim.grad_accum", 2),
                       ("deepspeed.zero_stage", 1)):
        cfg = load_config(TINY_CONFIG, [*finished.args, f"{key}={value}"])
        with pytest.raises(ConfigError, match=rf"{key} .* cannot change on resume"):
            check_resume_config(cfg, ckpt, (key,))
    with pytest.raises(ConfigError, match="unknown config key 'pruning.lambda_x'"):
        check_resume_config(same, ckpt, ("pruning.lambda_x",))


@pytest.mark.slow
def test_resume_with_a_changed_config_is_one_line(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished.run_dir, run_dir)
    config_yaml = (run_dir / "config.yaml").read_text()
    args = [a.replace(str(finished.run_dir), str(run_dir)) for a in finished.args]
    proc = _run([*args, "pruning.lambda_w=2e-11", "data.batch_size=8"])
    line = _one_line_error(proc, 2, "data.batch_size (16 -> 8)", "pruning.lambda_w (1e-11 -> 2e-11)",
                           "data.batch_size cannot change on resume")
    assert str(latest_checkpoint(run_dir)) in line
    assert (run_dir / "config.yaml").read_text() == config_yaml  # the refused config was not saved


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_saves_and_divergence_keeps_the_checkpoints(tmp_path_factory, tmp_path):
    """Ctrl-C (a real SIGINT) saves like SIGTERM; a resume that drives the loss to inf stops with
    one line before saving, the checkpoints untouched; the run then resumes and finishes."""
    store = new_store(tmp_path / "mlruns.db")
    args = overrides(tiny_data(tmp_path_factory.getbasetemp()), tmp_path / "run", store,
                     "checkpoint.every_steps=2", "pruning.search_epochs=2")
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "run" / "checkpoints" / "latest", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Ctrl-C: saving a checkpoint" in err and "stopped by signal after saving a checkpoint (exit 130)" in err
    saved = latest_checkpoint(tmp_path / "run")
    state = json.loads((saved / "COMPLETE.json").read_text())["state"]
    assert state["phase"] == "search" and 0 < state["step"] < 12

    checkpoints = {p: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").rglob("*") if p.is_file()}
    # Also offline (the store may move on resume): the last lines say what is kept for later.
    diverge = _run(["--allow-changed", "pruning.lambda_w,pruning.lambda_n", *args,
                    f"tracking.tracking_uri=http://127.0.0.1:{free_port()}",
                    "pruning.lambda_w=1e308", "pruning.lambda_n=1e308"])
    _one_line_error(diverge, 1, "the loss is not finite", "stopped without saving")
    pending = diverge.stderr.strip().splitlines()[-2]
    assert "stayed unreachable" in pending and "records are pending" in pending, pending
    assert f"python -m launcher.tracking upload {tmp_path / 'run'}" in pending
    assert {p: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").rglob("*") if p.is_file()} == checkpoints

    done = run_train(args)
    assert f"resuming from {saved}" in done.stdout
    # The offline attempt's records reached the store with the rest: its params under their step.
    from mlflow import MlflowClient

    run_id = json.loads((latest_checkpoint(tmp_path / "run") / "COMPLETE.json").read_text())["state"]["mlflow_run_id"]
    params = MlflowClient(store).get_run(run_id).data.params
    assert params["pruning.lambda_w"] == "1e-11" and params[f"pruning.lambda_w/step{state['step']}"] == "1e+308"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_samples"] == 128
