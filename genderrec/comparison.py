"""``train_all``: every (architecture, mode) trained in parallel, evaluated the same way, compared and one selected.

Run directory layout (local or ``s3://``)::

    <storage_path>/<name>/manifest.parquet         the manifest the runs were trained on
    <storage_path>/<name>/pretrain/<key>{/,.weights.h5}  attribute pretraining (models.weights: attributes):
                                                   its Ray Train run, and the backbone weights the runs start from
    <storage_path>/<name>/trainer/<arch>_<mode>/   Ray Train runs (checkpoints; summary.json once finished)
    <storage_path>/<name>/models/<arch>_<mode>/    best model per run: model.keras, card.json, history.csv
    <storage_path>/<name>/leaderboard.{parquet,md} and figures/*.png
    <storage_path>/<name>/comparison/              the runs compared on test (as `genderrec evaluate --runs`)
    <storage_path>/<name>/selected/                the model labeling and serving load
"""

from __future__ import annotations

import datetime
import logging

import numpy as np
import pandas as pd

from genderrec import engines, evaluation, manifest, metrics, reports, selection, storage, training
from genderrec.bundle import ModelBundle, ModelCard, read_card, write_card
from genderrec.config import Config, parse_config

log = logging.getLogger(__name__)

# What a model card keeps of its leaderboard row.
CARD_METRICS = (
    *reports.TEST_METRIC_COLUMNS,
    "test_images",
    "val_accuracy",
    "val_auc",
    "best_val_accuracy",
    "inference_ms_per_1000",
)


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


def evaluate_run(summary: dict, test: pd.DataFrame, val: pd.DataFrame, cfg_json: dict, run_dir: str) -> dict:
    """Validation and test metrics (with intervals) and inference time of one run's best checkpoint; exports it as
    a model directory with its ``metrics.json`` (the full evaluation). ``test_p_male`` carries the predictions."""

    from genderrec import models

    cfg = parse_config(cfg_json)
    engines.limit_tensorflow_threads(cfg.resources.cpus_per_run)
    name = f"{summary['architecture']}_{summary['mode']}"
    model = models.served(models.load_model(storage.join(summary["checkpoint_uri"], training.MODEL_FILE)))
    if cfg.training.precision != "float32":
        model = models.as_float32(model)  # evaluated and exported as deployed
    if cfg.models.flip_average:
        model = models.with_flip_average(model)
    monitor = cfg.training.early_stopping.monitor if cfg.training.early_stopping else "val_accuracy"
    row = {
        "architecture": summary["architecture"],
        "mode": summary["mode"],
        "weights": models.describe_weights(cfg.models.weights_for(summary["architecture"]), summary.get("weights_uri")),
        "params_total": summary["params_total"],
        "params_trainable": summary["params_trainable"],
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        f"best_{monitor}": summary[f"best_{monitor}"],
        "train_minutes": summary["train_seconds"] / 60,
        "model_uri": storage.join(run_dir, "models", name),
    }
    bundle = ModelBundle(model, model_card(cfg, row))
    test = test.join(evaluation.predict(bundle, test, cfg.training.batch_size))
    val = val.join(evaluation.predict(bundle, val, cfg.training.batch_size)) if len(val) else None
    result = evaluation.evaluate_predictions(test, val, evaluation.EvaluationOptions(seed=cfg.data.seed))
    at_half, auc = result["at_threshold"]["fixed"], result["metrics"]["roc_auc"]
    accuracy = at_half["accuracy"]
    row.update(
        test_accuracy=accuracy["value"],
        test_accuracy_low=accuracy["low"],
        test_accuracy_high=accuracy["high"],
        test_balanced_accuracy=at_half["balanced_accuracy"]["value"],
        test_auc=auc["value"],
        test_auc_low=auc["low"],
        test_auc_high=auc["high"],
        test_images=result["data"]["images"],
    )
    scored = val[val["p_male"].notna()] if val is not None else None
    if scored is not None and len(scored):  # at 0.5, like the test columns: what selection.metric val_* compares
        on_val = metrics.binary_metrics(scored["male"].astype(int), scored["p_male"])
        row.update(val_accuracy=on_val["accuracy"], val_auc=on_val["auc"])
    first = test["image_uri"].iloc[: cfg.training.batch_size]
    batch = np.stack([bundle.load_pixels(storage.read_bytes(uri)) for uri in first])
    row["inference_ms_per_1000"] = evaluation.inference_ms_per_1000(bundle, batch, cfg.training.inference_timing_images)

    model_dir = row["model_uri"]
    ModelBundle(model, model_card(cfg, row)).save(model_dir)
    storage.write_text(storage.join(model_dir, "history.csv"), pd.DataFrame(summary["history"]).to_csv(index=False))
    result["model"] = {"dir": model_dir, "name": name, "architecture": row["architecture"], "mode": row["mode"]}
    reports.write_json(storage.join(model_dir, "metrics.json"), result)
    return {**row, "test_p_male": test["p_male"].tolist()}


def model_card(cfg: Config, row: dict) -> ModelCard:
    """What labeling and serving need to use a model, and what a reader needs to trust it."""
    from genderrec import models

    return ModelCard(
        name=f"{row['architecture']}_{row['mode']}",
        architecture=row["architecture"],
        mode=row["mode"],
        input_size=tuple(cfg.data.image_size),
        crop_box=tuple(cfg.data.crop_box) if cfg.data.crop_box else None,
        preprocessing=models.architecture(row["architecture"]).preprocessing_name + " (inside the model)",
        weights=row["weights"],
        training_precision=cfg.training.precision,
        flip_average=cfg.models.flip_average,
        metrics={key: row[key] for key in CARD_METRICS if key in row},
        split=cfg.data.split,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def train_all(cfg: Config) -> str:
    """Train, evaluate and compare every configured run; export the selected model. Returns the run directory."""
    import ray

    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    frame, manifest_uri = prepare_manifest(cfg, run_dir)
    log.info("manifest %s: %s", manifest_uri, frame["split"].value_counts().to_dict())
    summaries = training.run_grid(cfg, frame, run_dir, source=manifest_uri)

    test, val = frame[frame["split"] == "test"], frame[frame["split"] == "val"]
    remote = ray.remote(evaluate_run).options(
        num_cpus=cfg.resources.cpus_per_run, num_gpus=1 if cfg.resources.use_gpu else 0
    )
    cfg_json = cfg.model_dump(mode="json")
    # One at a time, so that every model's inference time is measured on an otherwise idle worker.
    rows = [ray.get(remote.remote(summary, test, val, cfg_json, run_dir)) for summary in summaries]
    predictions = pd.DataFrame({selection.model_name(row): row.pop("test_p_male") for row in rows}, index=test.index)
    board = pd.DataFrame(rows)
    board = board.sort_values([key for key in (cfg.selection.metric, "test_accuracy") if key in board], ascending=False)
    board = board.reset_index(drop=True)
    board.insert(0, "rank", np.arange(1, len(board) + 1))
    # The runs compared on the test split exactly as `genderrec evaluate --runs` compares them.
    runs = {selection.model_name(row): {"architecture": row["architecture"], "mode": row["mode"]} for row in rows}
    compared = evaluation.compare_models(test, predictions, runs, evaluation.EvaluationOptions(seed=cfg.data.seed))
    chosen, reason = selection.select(board, cfg.selection, compared)
    chosen_name = selection.model_name(chosen)
    compared.update(run=run_dir, manifest=manifest_uri, selected=chosen_name)
    for entry in compared["models"]:
        entry["selected"] = entry["name"] == chosen_name
    board["selected"] = [selection.model_name(row) == chosen_name for _, row in board.iterrows()]
    p_holm = {entry["name"]: entry["vs_best"]["p_holm"] for entry in compared["models"] if "vs_best" in entry}
    board["p_vs_best_holm"] = [p_holm.get(selection.model_name(row), np.nan) for _, row in board.iterrows()]
    storage.write_bytes(storage.join(run_dir, "leaderboard.parquet"), board.to_parquet(index=False))
    reports.write_comparison_report(compared, storage.join(run_dir, "comparison"))
    title = f"Leaderboard: {cfg.run.name} ({len(test)} test images, split={cfg.data.split})"
    markdown = (
        reports.leaderboard_markdown(board, title)
        + f"\nSelected: **{chosen['architecture']}/{chosen['mode']}** — {reason}.\n"
        + f"\nRanked by `{cfg.selection.metric}` (the selection metric). `test_accuracy_low`/`_high`, "
        + "`test_auc_low`/`_high`: 95 % percentile-bootstrap interval (identities resampled when the manifest has "
        + f"them). `p_vs_best_holm`: McNemar's exact test at 0.5 against the best run on test ({compared['best']}), "
        + "Holm-adjusted over the runs, as `genderrec evaluate --runs` computes it (`comparison/report.html`). "
        + "Each run's full evaluation is `models/<run>/metrics.json`.\n"
    )
    storage.write_text(storage.join(run_dir, "leaderboard.md"), markdown)
    histories = {f"{s['architecture']}_{s['mode']}": s["history"] for s in summaries}
    reports.write_leaderboard_figures(board, histories, storage.join(run_dir, "figures"))

    selected_dir = storage.join(run_dir, "selected")
    storage.copy(chosen["model_uri"], selected_dir)
    card = read_card(chosen["model_uri"])
    write_card(selected_dir, card.model_copy(update={"selection": reason, "run": run_dir}))
    log.info("selected %s/%s: %s", chosen["architecture"], chosen["mode"], reason)
    export_for_cpus(selected_dir, test["image_uri"])
    return run_dir


def export_for_cpus(model_dir: str, check_uris) -> None:
    """The OpenVINO export that CPU labeling actors and serving replicas use (``engine: auto``), checked on test
    images. A failure is logged with the command to retry, not raised: the trained models are kept either way."""
    selected = ModelBundle.load(model_dir)
    try:
        selected.export(model_dir, "openvino", selected.check_inputs(check_uris))
    except engines.EngineError as exc:
        log.error(
            "%s; labeling and serving use TensorFlow (retry: genderrec export --model %s --format openvino)",
            exc,
            model_dir,
        )
