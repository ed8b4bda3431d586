"""``train_all``: every (architecture, mode) trained in parallel, evaluated the same way, compared and one selected.

Run directory layout (local or ``s3://``)::

    <storage_path>/<name>/manifest.parquet         the manifest the runs were trained on
    <storage_path>/<name>/trainer/<arch>_<mode>/   Ray Train runs (checkpoints)
    <storage_path>/<name>/models/<arch>_<mode>/    best model per run: model.keras, card.json, history.csv
    <storage_path>/<name>/leaderboard.{parquet,md} and figures/*.png
    <storage_path>/<name>/selected/                the model labeling and serving load
"""

from __future__ import annotations

import datetime
import logging

import numpy as np
import pandas as pd

from genderrec import evaluation, manifest, selection, storage, training
from genderrec.config import Config, parse_config

log = logging.getLogger(__name__)


def prepare_manifest(cfg: Config, run_dir: str) -> tuple[pd.DataFrame, str]:
    """Use the configured manifest, or build one from CelebA into the run directory."""
    if cfg.data.manifest:
        return manifest.read_manifest(cfg.data.manifest), cfg.data.manifest
    frame, skipped = manifest.build_manifest(
        cfg.data.celeba_dir,
        split=cfg.data.split,
        subset=cfg.data.subset,
        fractions=cfg.data.fractions,
        seed=cfg.data.seed,
        skip_missing=cfg.data.skip_missing,
    )
    uri = storage.join(run_dir, "manifest.parquet")
    manifest.write_manifest(frame, uri)
    if skipped:
        log.warning("skipped %d CelebA item(s); see %s", len(skipped), uri + ".skipped.csv")
        storage.write_text(uri + ".skipped.csv", pd.DataFrame(skipped).to_csv(index=False))
    return frame, uri


def evaluate_run(summary: dict, test: dict, cfg_json: dict, run_dir: str) -> dict:
    """Test metrics and inference time of one run's best checkpoint; exports it as a model directory."""

    from genderrec import images, models

    cfg = parse_config(cfg_json)
    training.configure_threads(cfg.resources.cpus_per_run)
    name = f"{summary['architecture']}_{summary['mode']}"
    model = models.load_model(storage.join(summary["checkpoint_uri"], training.MODEL_FILE))
    p_male = evaluation.predict_uris(
        model, test["image_uri"], cfg.data.image_size, cfg.data.crop_box, cfg.training.batch_size
    )
    metrics = evaluation.binary_metrics(test["male"], p_male)
    first = test["image_uri"][: cfg.training.batch_size]
    batch = np.stack(
        [images.load_image(storage.read_bytes(uri), cfg.data.image_size, cfg.data.crop_box) for uri in first]
    )
    ms_per_1000 = evaluation.inference_ms_per_1000(model, batch, cfg.training.inference_timing_images)

    monitor = cfg.training.early_stopping.monitor if cfg.training.early_stopping else "val_accuracy"
    weights = cfg.models.weights_for(summary["architecture"])
    row = {
        "architecture": summary["architecture"],
        "mode": summary["mode"],
        "weights": models.describe_weights(weights),
        "params_total": summary["params_total"],
        "params_trainable": summary["params_trainable"],
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        f"best_{monitor}": summary[f"best_{monitor}"],
        "test_accuracy": metrics["accuracy"],
        "test_auc": metrics["auc"],
        "test_images": metrics["n"],
        "train_minutes": summary["train_seconds"] / 60,
        "inference_ms_per_1000": ms_per_1000,
        "model_uri": storage.join(run_dir, "models", name),
    }
    model_dir = row["model_uri"]
    selection.export(model, model_dir, model_card(cfg, row))
    storage.write_text(storage.join(model_dir, "history.csv"), pd.DataFrame(summary["history"]).to_csv(index=False))
    return row


def model_card(cfg: Config, row: dict) -> dict:
    """What labeling and serving need to use a model, and what a reader needs to trust it."""
    from genderrec import models

    return {
        "name": f"{row['architecture']}_{row['mode']}",
        "architecture": row["architecture"],
        "mode": row["mode"],
        "input_size": list(cfg.data.image_size),
        "crop_box": list(cfg.data.crop_box) if cfg.data.crop_box else None,
        "input": "RGB, 0..255, resized to input_size (after crop_box, if any)",
        "preprocessing": models.architecture(row["architecture"]).preprocessing_name + " (inside the model)",
        "class_names": list(selection.CLASS_NAMES),
        "threshold": 0.5,
        "weights": row["weights"],
        "metrics": {
            key: row[key]
            for key in ("test_accuracy", "test_auc", "test_images", "best_val_accuracy", "inference_ms_per_1000")
            if key in row
        },
        "split": cfg.data.split,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def train_all(cfg: Config) -> str:
    """Train, evaluate and compare every configured run; export the selected model. Returns the run directory."""
    import ray

    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    frame, manifest_uri = prepare_manifest(cfg, run_dir)
    log.info("manifest %s: %s", manifest_uri, frame["split"].value_counts().to_dict())
    summaries = training.run_grid(cfg, training.run_data(frame), run_dir)

    test = frame[frame["split"] == "test"]
    test_data = {"image_uri": test["image_uri"].tolist(), "male": test["male"].tolist()}
    remote = ray.remote(evaluate_run).options(
        num_cpus=cfg.resources.cpus_per_run, num_gpus=1 if cfg.resources.use_gpu else 0
    )
    cfg_json = cfg.model_dump(mode="json")
    # One at a time, so that every model's inference time is measured on an otherwise idle worker.
    rows = [ray.get(remote.remote(summary, test_data, cfg_json, run_dir)) for summary in summaries]

    board = pd.DataFrame(rows).sort_values(["test_accuracy", "test_auc"], ascending=False).reset_index(drop=True)
    board.insert(0, "rank", np.arange(1, len(board) + 1))
    chosen, reason = selection.select(board, cfg.selection)
    board["selected"] = (board["architecture"] == chosen["architecture"]) & (board["mode"] == chosen["mode"])
    storage.write_bytes(storage.join(run_dir, "leaderboard.parquet"), board.to_parquet(index=False))
    title = f"Leaderboard: {cfg.run.name} ({len(test)} test images, split={cfg.data.split})"
    markdown = (
        evaluation.leaderboard_markdown(board, title)
        + f"\nSelected: **{chosen['architecture']}/{chosen['mode']}** — {reason}.\n"
    )
    storage.write_text(storage.join(run_dir, "leaderboard.md"), markdown)
    histories = {f"{s['architecture']}_{s['mode']}": s["history"] for s in summaries}
    evaluation.write_figures(board, histories, storage.join(run_dir, "figures"))

    selected_dir = storage.join(run_dir, "selected")
    storage.copy(chosen["model_uri"], selected_dir)
    card = selection.read_card(chosen["model_uri"])
    selection.write_card(selected_dir, {**card, "selection": reason, "run": run_dir})
    log.info("selected %s/%s: %s", chosen["architecture"], chosen["mode"], reason)
    return run_dir
