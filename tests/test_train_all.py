"""Integration on a real local Ray: the whole ten-run job on real faces, and a worker killed mid-training."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genderrec import comparison, manifest, models, train_data, training
from genderrec.bundle import ModelBundle
from genderrec.config import ARCHITECTURES, MODES, load_config

REPO = Path(__file__).resolve().parents[1]


def test_train_all_runs_ten_models_and_selects_one(ray_session, tmp_path, celeba_dir):
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"data.celeba_dir={celeba_dir}", f"run.storage_path={tmp_path}", "run.name=tiny"],
    )
    run_dir = Path(comparison.train_all(cfg))

    board = pd.read_parquet(run_dir / "leaderboard.parquet")
    assert len(board) == 10
    assert set(zip(board["architecture"], board["mode"], strict=True)) == {(a, m) for a in ARCHITECTURES for m in MODES}
    assert board["test_accuracy"].between(0, 1).all() and (board["test_images"] == 40).all()
    assert (board["epochs_run"] == 1).all() and (board["inference_ms_per_1000"] > 0).all()
    assert (board["weights"] == "none (random init)").all()
    by_run = board.set_index(["architecture", "mode"])
    for architecture in ARCHITECTURES:
        assert (
            by_run.loc[(architecture, "transfer"), "params_trainable"]
            < by_run.loc[(architecture, "fine_tune"), "params_trainable"]
        )
    assert board["selected"].sum() == 1

    markdown = (run_dir / "leaderboard.md").read_text()
    assert sum(line.startswith("|") for line in markdown.splitlines()) == 12  # header, rule, ten runs
    assert "Selected: **" in markdown
    for figure in ("training_curves.png", "test_accuracy.png", "inference_time.png"):
        assert (run_dir / "figures" / figure).read_bytes()[:4] == b"\x89PNG"

    faces = manifest.read_manifest(str(run_dir / "manifest.parquet"))
    batch = np.stack([training.images.load_image(Path(uri).read_bytes(), (32, 32)) for uri in faces["image_uri"][:4]])
    for row in board.itertuples():
        model_dir = run_dir / "models" / f"{row.architecture}_{row.mode}"
        history = pd.read_csv(model_dir / "history.csv")
        assert list(history["epoch"]) == [1]
        assert models.load_model(str(model_dir / "model.keras")).predict(batch, verbose=0).shape == (4, 1)

    chosen = board[board["selected"]].iloc[0]
    selected = ModelBundle.load(str(run_dir / "selected"))
    card = selected.card
    assert (card.architecture, card.mode) == (chosen["architecture"], chosen["mode"])
    assert card.input_size == (32, 32) and card.class_names == ("female", "male")
    assert card.training_precision == "float32"  # the default (tests/test_precision.py: the mixed policies)
    assert card.metrics["test_accuracy"] == pytest.approx(chosen["test_accuracy"])
    assert card.selection.startswith("chosen on the validation split")  # selection.metric: val_accuracy
    # The leaderboard shows the comparison `genderrec evaluate --runs` makes: McNemar against the best, Holm.
    compared = json.loads((run_dir / "comparison" / "metrics.json").read_text())
    assert compared["schema"] == "genderrec.comparison/1" and compared["selected"] == card.name
    p_holm = {entry["name"]: entry["vs_best"]["p_holm"] for entry in compared["models"] if "vs_best" in entry}
    for row in board.itertuples():
        name = f"{row.architecture}_{row.mode}"
        assert row.p_vs_best_holm == pytest.approx(p_holm[name]) if name in p_holm else np.isnan(row.p_vs_best_holm)
    p_male = selected.predict_proba(batch)
    assert ((p_male >= 0) & (p_male <= 1)).all()


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def train_worker_pids() -> list[int]:
    """PIDs of this test session's Ray Train workers (``ray::RayTrainWorker...``, started under our raylet)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                is_worker = (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker")
            except OSError:
                continue
            if is_worker and descends_from(int(proc.name), os.getpid()):
                pids.append(int(proc.name))
    return pids


def registered_checkpoints(run_dir: Path) -> list:
    """Checkpoints Ray Train's controller has registered (a kill before registration restarts from scratch)."""
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def test_killed_worker_resumes_from_its_last_checkpoint(ray_session, tmp_path, celeba_manifest):
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "data.manifest=unused",
            "data.cache=none",
            "training.epochs=4",
            "training.early_stopping=null",
            "resources.max_failures=1",
        ],
    )
    frame = celeba_manifest[celeba_manifest["split"].isin(["train", "val"])].groupby("split").head(64)
    storage_path = str(tmp_path / "trainer")
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 600
        run_dir = Path(storage_path) / "googlenet_fine_tune"
        while time.monotonic() < deadline:
            if registered_checkpoints(run_dir):
                for pid in train_worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    summary = training.run_one(cfg, "googlenet", "fine_tune", train_data.prepare(cfg, frame), storage_path)
    killer.join(timeout=5)

    assert killed, "no training worker was found to kill"
    assert len(summary["resumed_at_epochs"]) == 1 and 1 <= summary["resumed_at_epochs"][0] < 4, summary
    assert summary["epochs_run"] == 4
    assert [row["epoch"] for row in summary["history"]] == [1, 2, 3, 4]
    assert Path(summary["checkpoint_uri"], training.MODEL_FILE).exists()


def test_a_killed_train_all_rerun_does_not_train_finished_runs_again(tmp_path, celeba_dir):
    command = [
        *(sys.executable, "-m", "genderrec", "train-all", "--config", str(REPO / "configs" / "tiny.yaml")),
        *("--celeba-dir", str(celeba_dir), "--storage-path", str(tmp_path)),
        *("--set", "models.architectures=[googlenet]", "--set", "resources.max_concurrent_trials=1"),
        *("--set", "resources.address=local", "--set", "run.name=resume", "--set", "data.subset=100"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    trainer = tmp_path / "resume" / "trainer"
    with open(tmp_path / "first.log", "wb") as log:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not list(trainer.glob(f"*/{training.SUMMARY_FILE}")) and job.poll() is None:
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    (finished,) = trainer.glob(f"*/{training.SUMMARY_FILE}")
    before = {path: path.stat().st_mtime_ns for path in finished.parent.rglob("*")}

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "training input: 80 images (train + val)" in rerun.stdout  # the printed estimate, before any run
    assert {path: path.stat().st_mtime_ns for path in finished.parent.rglob("*")} == before  # not trained again
    board = pd.read_parquet(tmp_path / "resume" / "leaderboard.parquet")
    assert sorted(board["mode"]) == ["fine_tune", "transfer"] and (board["epochs_run"] == 1).all()
    assert len(list(trainer.glob(f"*/{training.SUMMARY_FILE}"))) == 2
