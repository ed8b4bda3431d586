"""Report data of a model bundle on a labeled manifest: predictions, metrics with intervals, groups, comparisons.

This module owns the path from a :class:`~genderrec.bundle.ModelBundle` and a manifest to the plain data that
``metrics.json`` holds (layout in ``docs/evaluation.md``): :func:`predict` (decode as in training, the bundle's
``predict_proba``, an ``error`` per unreadable row), one model's evaluation at two thresholds (the one chosen on
the validation split and 0.5), per-group accuracy, the comparison of several models (McNemar, Holm-corrected,
used by ``evaluate --runs`` and ``train_all`` alike) and the temperature fit of ``genderrec calibrate``. The maths
is :mod:`genderrec.metrics`; rendering is :mod:`genderrec.reports`. Nothing here writes a file.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from genderrec import faces as face_stage
from genderrec import images, manifest, metrics, storage
from genderrec.bundle import CARD_FILE, Calibration, ModelBundle, ModelCard, read_card

log = logging.getLogger(__name__)

SCHEMA = "genderrec.evaluation/1"
COMPARISON_SCHEMA = "genderrec.comparison/1"
MIN_GROUP_SIZE = 30
MISTAKES_LISTED = 16
THRESHOLD_METRICS = ("balanced_accuracy", "accuracy")
# Columns of a manifest that describe an image rather than a group of people.
NOT_GROUPS = frozenset(
    {"image_uri", "image_id", "male", "split", "identity", "official_split", "p_male", "p_model", "error"}
)


@dataclass(frozen=True)
class EvaluationOptions:
    """How ``genderrec evaluate`` measures a model (defaults are what the docs' reports use)."""

    split: str = "test"
    group_by: tuple[str, ...] = ()
    threshold_metric: str = "balanced_accuracy"
    replicates: int = 2000
    seed: int = 0
    confidence: float = 0.95
    min_group_size: int = MIN_GROUP_SIZE
    face_images: bool = True
    batch_size: int = 64
    faces: str = "aligned"  # detect/auto: ordinary photos, each scored by its largest face (genderrec.faces)
    face_options: face_stage.FaceOptions | None = None  # detect/auto: which detections count (None: the defaults)

    def __post_init__(self):
        if self.faces not in face_stage.FACES_MODES:
            raise ValueError(f"faces must be one of aligned, detect, auto, got {self.faces!r}")
        if self.threshold_metric not in THRESHOLD_METRICS:
            raise ValueError(f"threshold metric must be one of {THRESHOLD_METRICS}, got {self.threshold_metric!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be between 0 and 1, got {self.confidence}")
        if self.replicates < 100:
            raise ValueError(f"use at least 100 bootstrap replicates, got {self.replicates}")
        if self.min_group_size < 1:
            raise ValueError(f"minimum group size must be at least 1, got {self.min_group_size}")


# --------------------------------------------------------------------------- groups


def group_columns(frame: pd.DataFrame, named=()) -> list[str]:
    """Every 0/1 attribute column (CelebA's 39 others) plus the categorical columns the user names."""
    missing = [column for column in named if column not in frame.columns]
    if missing:
        raise ValueError(f"--group-by {missing}: no such column (the manifest has {sorted(frame.columns)})")
    binary = [
        column
        for column in frame.columns
        if column not in NOT_GROUPS
        and (pd.api.types.is_integer_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column]))
        and set(frame[column].dropna().unique()) <= {0, 1}
    ]
    return binary + [column for column in named if column not in binary]


def group_report(
    scored: pd.DataFrame, threshold: float, columns, bootstrap: metrics.Bootstrap, units, min_size: int
) -> dict:
    """Per-group accuracy and error rates with intervals; each column's gap; the largest gap and the worst group.

    A group with fewer than ``min_size`` images is reported but flagged ``small`` and left out of gaps and of
    the worst group: its interval is too wide to rank it. Each rate also says its own denominator (``n``: the
    group's images, men or women) and whether that is ``small``.
    """
    truth, p_male = scored["male"].to_numpy(), scored["p_male"].to_numpy()
    labels, member_columns, skipped = [], [], []
    for column in columns:
        values = scored[column].astype("string").fillna("<missing>")
        kinds = sorted(values.unique())
        if len(kinds) < 2:
            skipped.append(column)
            continue
        for value in kinds:
            labels.append((column, value))
            member_columns.append((values == value).to_numpy())
    result = {"threshold": threshold, "min_group_size": min_size, "columns": [], "skipped_columns": skipped}
    if not labels:
        return {**result, "largest_gap": None, "worst_group": None}
    members = np.stack(member_columns, axis=1)

    def statistic(weights):
        return metrics.group_statistics(truth, p_male, threshold, members, weights)

    point = {key: value[0] for key, value in statistic(None).items()}
    replicates = bootstrap.replicate(statistic, units)
    groups = []
    for index, (column, value) in enumerate(labels):
        n, n_male = int(point["n"][index]), int(members[:, index][truth == 1].sum())
        # Each rate carries its denominator: a rate over 1 woman has a [0, 0] interval, which is not certainty.
        denominators = {"accuracy": n, "male_as_female_rate": n_male, "female_as_male_rate": n - n_male}
        groups.append(
            {
                "column": column,
                "value": value,
                "n": n,
                "n_male": n_male,
                "n_female": n - n_male,
                "small": n < min_size,
                **{
                    key: {
                        **bootstrap.interval(point[key][index], replicates[key][:, index]),
                        "n": denominator,
                        "small": denominator < min_size,
                    }
                    for key, denominator in denominators.items()
                },
            }
        )
    for column in dict.fromkeys(column for column, _ in labels):
        indices = [index for index, (name, _) in enumerate(labels) if name == column]
        result["columns"].append(
            {
                "column": column,
                "groups": [groups[index] for index in indices],
                "gap": _gap(indices, groups, point, replicates, bootstrap),
            }
        )
    ranked = [column for column in result["columns"] if column["gap"]]
    largest = max(ranked, key=lambda column: column["gap"]["value"], default=None)
    worst = min((group for group in groups if not group["small"]), key=lambda g: g["accuracy"]["value"], default=None)
    result["largest_gap"] = {"column": largest["column"], **largest["gap"]} if largest else None
    result["worst_group"] = worst
    return result


def _gap(indices, groups, point, replicates, bootstrap: metrics.Bootstrap) -> dict | None:
    """Accuracy of the best minus the worst sizeable group of a column, its interval, and whether it excludes 0."""
    sizeable = [index for index in indices if not groups[index]["small"]]
    if len(sizeable) < 2:
        return None
    best = max(sizeable, key=lambda index: point["accuracy"][index])
    worst = min(sizeable, key=lambda index: point["accuracy"][index])
    accuracy = replicates["accuracy"]
    gap = bootstrap.interval(point["accuracy"][best] - point["accuracy"][worst], accuracy[:, best] - accuracy[:, worst])
    return {
        **gap,
        "best": groups[best]["value"],
        "worst": groups[worst]["value"],
        "significant": bool(gap["low"] > 0),
    }


# --------------------------------------------------------------------------- one model's evaluation


def bootstrap_units(rows: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Resample identities when known (images of one person are correlated), else images."""
    if "identity" in rows.columns and rows["identity"].notna().all():
        return rows["identity"].to_numpy(), "identity"
    return np.arange(len(rows)), "image"


def _scorable(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["p_male"].notna() & rows["male"].notna()]


def operating_threshold(val: pd.DataFrame | None, metric: str) -> tuple[float | None, str]:
    """The threshold chosen on the validation predictions, or None (and why) when they cannot choose one."""
    usable = _scorable(val) if val is not None else None
    if usable is None or usable.empty:
        return None, "no validation split: 0.5 is used"
    if usable["male"].nunique() < 2:
        return None, "the validation split has one class only: 0.5 is used"
    threshold = metrics.choose_threshold(usable["male"].astype(int), usable["p_male"], metric)
    return threshold, f"maximises {metric} on the validation split ({len(usable)} images)"


def evaluate_predictions(rows: pd.DataFrame, val: pd.DataFrame | None, options: EvaluationOptions) -> dict:
    """The evaluation of one model from its predictions: ``rows`` (and ``val``) carry ``male`` and ``p_male``
    (NaN where the image could not be read), plus any group columns; returns what ``metrics.json`` holds."""
    scored = _scorable(rows).reset_index(drop=True)
    if scored.empty:
        raise ValueError(f"no image of the {options.split} split has both a label and a prediction")
    truth = scored["male"].astype(int).to_numpy()
    p_male = scored["p_male"].to_numpy(dtype=float)
    units, unit_name = bootstrap_units(scored)
    bootstrap = metrics.Bootstrap(options.replicates, options.seed, options.confidence)
    chosen, why = operating_threshold(val, options.threshold_metric)
    thresholds = {"validation": 0.5 if chosen is None else chosen, "fixed": 0.5}

    at_threshold = {}
    for name, threshold in thresholds.items():
        estimates = bootstrap.estimate(
            lambda weights, threshold=threshold: metrics.decision_metrics(truth, p_male, threshold, weights),
            units,
            keys=("accuracy", "balanced_accuracy", "male_as_female_rate", "female_as_male_rate"),
        )
        counts = metrics.decision_metrics(truth, p_male, threshold)
        at_threshold[name] = {
            "threshold": threshold,
            **estimates,
            "confusion_matrix": {
                "rows": ["true female", "true male"],
                "columns": ["predicted female", "predicted male"],
                "counts": [[int(counts["tn"][0]), int(counts["fp"][0])], [int(counts["fn"][0]), int(counts["tp"][0])]],
            },
        }
    columns = group_columns(scored, options.group_by)
    return {
        "schema": SCHEMA,
        "created": _now(),
        "data": {
            "split": options.split,
            "rows": len(rows),
            "images": len(scored),
            "male": int(truth.sum()),
            "female": int(len(truth) - truth.sum()),
            "identities": int(scored["identity"].nunique()) if "identity" in scored.columns else None,
            "excluded_unreadable": int(rows["p_male"].isna().sum()),
            "excluded_unlabeled": int((rows["p_male"].notna() & rows["male"].isna()).sum()),
        },
        "bootstrap": {**asdict(bootstrap), "unit": unit_name, "units": len(np.unique(units)), "method": "percentile"},
        "threshold": {
            "validation": chosen,
            "metric": options.threshold_metric,
            "how": why,
            "fixed": 0.5,
        },
        "metrics": bootstrap.estimate(lambda weights: metrics.score_metrics(truth, p_male, weights), units),
        "at_threshold": at_threshold,
        "calibration": {"ece_bins": metrics.ECE_BINS, "reliability": metrics.reliability_table(truth, p_male)},
        "groups": group_report(
            scored, thresholds["validation"], columns, bootstrap, units, min_size=options.min_group_size
        ),
        "mistakes": confident_mistakes(scored, thresholds["validation"]),
    }


def confident_mistakes(scored: pd.DataFrame, threshold: float, count: int = MISTAKES_LISTED) -> list[dict]:
    """The wrong answers the model was surest of (ids and URIs only: never image bytes)."""
    predicted_male = scored["p_male"] >= threshold
    wrong = scored[predicted_male != scored["male"].astype(bool)]
    confidence = np.where(wrong["p_male"] >= threshold, wrong["p_male"], 1 - wrong["p_male"])
    top = wrong.assign(confidence=confidence).sort_values("confidence", ascending=False).head(count)
    columns = [column for column in ("image_id", "image_uri", "male", "p_male", "confidence") if column in top]
    return [
        {key: (value.item() if hasattr(value, "item") else value) for key, value in record.items()}
        for record in top[columns].to_dict("records")
    ]


# --------------------------------------------------------------------------- prediction


def predict(
    model: ModelBundle, rows: pd.DataFrame, batch_size: int = 64, chunk: int = 1024, faces="aligned", face_options=None
) -> pd.DataFrame:
    """``p_male`` (the bundle's ``predict_proba``: calibrated) and ``p_model`` (before the card's temperature) for
    every manifest row, decoded exactly as in training.

    A row whose image cannot be read gets NaN and the reason in ``error``: one bad file never stops an
    evaluation. Decoding runs in threads, ``chunk`` images at a time, so memory stays bounded. With ``faces``
    ``detect`` or ``auto`` each image is an ordinary photo scored by its largest face, aligned CelebA-style
    (:func:`genderrec.faces.face_crops`); a photo without one is NaN with ``no face found`` (``detect``) or is
    scored whole (``auto``).
    """
    card = model.card
    if faces != "aligned":
        face_options = face_options or face_stage.FaceOptions()
        detector, detector_lock = face_stage.load_detector(face_options), threading.Lock()

    def pixels_of(data: bytes) -> np.ndarray | None:
        """The model's input: the image as it is, or its largest face (None: no face)."""
        if faces == "aligned":
            return model.load_pixels(data)
        rgb = images.decode_image(data)
        with detector_lock:  # the decoding threads share one detector
            crops = face_stage.face_crops(rgb, detector, face_options, faces, card.input_size, card.crop_box)
        return crops[0].pixels if crops else None

    def load(uri):
        try:
            pixels = pixels_of(storage.read_bytes(uri))
        except (images.ImageDecodeError, OSError) as exc:
            return None, f"{uri}: {exc}"
        return pixels, None if pixels is not None else f"{uri}: {face_stage.NO_FACE}"

    uris = rows["image_uri"].tolist()
    raw = np.full(len(uris), np.nan)
    errors: list[str | None] = [None] * len(uris)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(uris), chunk):
            loaded = list(pool.map(load, uris[start : start + chunk]))
            readable = [index for index, (pixels, _) in enumerate(loaded) if pixels is not None]
            for index, (_, error) in enumerate(loaded):
                errors[start + index] = error
            if readable:
                batch = np.stack([loaded[index][0] for index in readable])
                raw[start + np.asarray(readable)] = np.concatenate(
                    [model.raw_proba(batch[first : first + batch_size]) for first in range(0, len(batch), batch_size)]
                )
    readable = ~np.isnan(raw)
    if not readable.all():
        first = next(error for error in errors if error)
        log.warning("%d of %d image(s) could not be read, e.g. %s", (~readable).sum(), len(uris), first)
    p_male = np.full(len(uris), np.nan)
    p_male[readable] = model.calibrate(raw[readable])
    return pd.DataFrame({"p_male": p_male, "p_model": raw, "error": errors}, index=rows.index)


def inference_ms_per_1000(model: ModelBundle, batch: np.ndarray, n_images: int = 1000) -> float:
    """Model-only inference time per 1,000 images: ``n_images`` through ``predict_on_batch`` after a warm-up."""
    model.model.predict_on_batch(batch)
    rounds = max(1, math.ceil(n_images / len(batch)))
    started = time.perf_counter()
    for _ in range(rounds):
        model.model.predict_on_batch(batch)
    elapsed = time.perf_counter() - started
    return elapsed / (rounds * len(batch)) * 1000 * 1000


# --------------------------------------------------------------------------- calibration (genderrec calibrate)


def calibrate(model: ModelBundle, frame: pd.DataFrame, source: str, batch_size: int = 64) -> ModelCard:
    """Fit temperature scaling on the model's own outputs for the ``val`` split; returns the card with it.

    The fit starts from the model's raw outputs, so calibrating twice gives the same temperature, not a product.
    """
    rows = frame[frame["split"] == "val"].drop(columns=_stale(frame))
    usable = _scorable(rows.join(predict(model, rows, batch_size)))
    if usable["male"].nunique() < 2:
        raise ValueError(f"{source}: calibration needs a val split with both classes to fit the temperature on")
    truth, raw = usable["male"].astype(int).to_numpy(), usable["p_model"].to_numpy()
    temperature = metrics.fit_temperature(truth, raw)
    calibrated = metrics.apply_temperature(raw, temperature)
    calibration = Calibration(
        fitted_on=f"{source} split=val ({len(usable)} images)",
        val_log_loss_before=float(metrics.score_metrics(truth, raw)["log_loss"][0]),
        val_log_loss_after=float(metrics.score_metrics(truth, calibrated)["log_loss"][0]),
        fitted=_now(),
    )
    return model.card.model_copy(update={"temperature": temperature, "calibration": calibration})


def calibration_report(card: ModelCard, scored: pd.DataFrame) -> dict:
    """The card's temperature and how it was fitted; with one, the evaluated split before it (``before``)."""
    report = {"temperature": card.temperature, **(card.calibration.model_dump() if card.calibration else {})}
    if card.temperature:
        truth, raw = scored["male"].astype(int).to_numpy(), scored["p_model"].to_numpy()
        scores = metrics.score_metrics(truth, raw)
        report["before"] = {
            **{key: float(scores[key][0]) for key in ("log_loss", "brier", "ece")},
            "reliability": metrics.reliability_table(truth, raw),
        }
    return report


# --------------------------------------------------------------------------- model directories and runs


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _stale(frame: pd.DataFrame) -> list[str]:
    """Prediction columns a manifest may carry already (e.g. a labeling output): replaced, never trusted."""
    return [column for column in ("p_male", "p_model", "error") if column in frame.columns]


def split_rows(frame: pd.DataFrame, split: str, manifest_uri: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The evaluated rows and the validation rows (``None`` when the manifest has none)."""
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise ValueError(f"{manifest_uri}: no row has split={split!r} (splits: {sorted(frame['split'].unique())})")
    val = frame[frame["split"] == "val"]
    return rows.drop(columns=_stale(frame)), (val.drop(columns=_stale(frame)) if len(val) else None)


def evaluate_bundle(model_dir: str, frame: pd.DataFrame, manifest_uri: str, options: EvaluationOptions):
    """Predict and evaluate one model directory; returns ``(metrics, rows with p_male)`` (nothing is written)."""
    rows, val = split_rows(frame, options.split, manifest_uri)
    group_columns(rows, options.group_by)  # a misspelt --group-by fails before the model loads
    model = ModelBundle.load(model_dir)
    framing = {"faces": options.faces, "face_options": options.face_options}
    rows = rows.join(predict(model, rows, options.batch_size, **framing))
    if val is not None:
        val = val.join(predict(model, val, options.batch_size, **framing))
    result = evaluate_predictions(rows, val, options)
    if options.split == "val":
        result["threshold"]["how"] += "; chosen on the evaluated split itself, so its metrics are optimistic"
    result["calibration"].update(calibration_report(model.card, _scorable(rows)))
    card = model.card
    result["model"] = {
        "dir": model_dir,
        "name": card.name,
        "architecture": card.architecture,
        "mode": card.mode,
        "input_size": list(card.input_size),
        "crop_box": list(card.crop_box) if card.crop_box else None,
        "weights": card.weights,
        "card_threshold": card.threshold,
    }
    result["data"].update(
        manifest=manifest_uri, faces=options.faces, unreadable_examples=rows["error"].dropna().head(5).tolist()
    )
    return result, rows


def evaluate_model(model_dir: str, manifest_uri: str, options: EvaluationOptions):
    """``genderrec evaluate --model``: one model directory on one split of a labeled manifest."""
    return evaluate_bundle(model_dir, manifest.read_manifest(manifest_uri), manifest_uri, options)


def run_models(run_dir: str) -> dict[str, str]:
    """``{name: model directory}`` of a train_all run (``<run>/models/*`` holding a card)."""
    cards = storage.list_files(storage.join(run_dir, "models"), (CARD_FILE,))
    model_dirs = {uri.rsplit("/", 2)[-2]: uri.rsplit("/", 1)[0] for uri in cards}
    if not model_dirs:
        raise FileNotFoundError(f"{run_dir}: no models/<run>/{CARD_FILE} (expected a train_all run)")
    return model_dirs


def evaluate_runs(run_dir: str, manifest_uri: str | None, options: EvaluationOptions):
    """``genderrec evaluate --runs``: every model of a train_all run on the same images, compared with the best.

    Returns ``(comparison, {name: (metrics, rows)})``: the comparison and each model's evaluation.
    """
    manifest_uri = manifest_uri or storage.join(run_dir, "manifest.parquet")
    frame = manifest.read_manifest(manifest_uri)
    selected_dir = storage.join(run_dir, "selected")
    selected = read_card(selected_dir).name if storage.exists(selected_dir) else None
    results = {}
    for name, model_dir in run_models(run_dir).items():
        log.info("evaluating %s", name)
        results[name] = evaluate_bundle(model_dir, frame, manifest_uri, options)
    rows = next(iter(results.values()))[1]
    predictions = pd.DataFrame({name: model_rows["p_male"] for name, (_, model_rows) in results.items()})
    models = {name: metrics_["model"] for name, (metrics_, _) in results.items()}
    comparison = compare_models(rows, predictions, models, options, selected)
    comparison.update(run=run_dir, manifest=manifest_uri)
    return comparison, results


def _common_rows(rows: pd.DataFrame, predictions: pd.DataFrame):
    """The labeled rows every model (column of ``predictions``) could read, those predictions, and the 0/1 truth."""
    readable = predictions.notna().all(axis=1) & rows["male"].notna()
    return rows[readable], predictions[readable], rows.loc[readable, "male"].astype(int).to_numpy()


def compare_models(rows: pd.DataFrame, predictions: pd.DataFrame, models: dict, options, selected=None) -> dict:
    """Every model (a column of ``predictions``; ``models``: name → architecture and mode) on the images all of them
    could read, at 0.5: intervals, and the difference to the best model with McNemar's test (exact; Holm-adjusted
    over the comparisons) and a paired bootstrap interval. ``evaluate --runs`` and ``train_all`` both use it."""
    rows, predictions, truth = _common_rows(rows, predictions)
    units, unit_name = bootstrap_units(rows)
    bootstrap = metrics.Bootstrap(options.replicates, options.seed, options.confidence)
    correct = {name: (predictions[name].to_numpy() >= 0.5) == truth for name in predictions}
    auc = {name: metrics.score_metrics(truth, predictions[name].to_numpy())["roc_auc"][0] for name in predictions}
    best = max(correct, key=lambda name: (correct[name].mean(), np.nan_to_num(auc[name], nan=-1)))

    def differences(weights, name):
        mine, theirs = predictions[name].to_numpy(), predictions[best].to_numpy()
        return {
            "accuracy_difference": metrics.decision_metrics(truth, mine, 0.5, weights)["accuracy"]
            - metrics.decision_metrics(truth, theirs, 0.5, weights)["accuracy"],
            "roc_auc_difference": metrics.score_metrics(truth, mine, weights)["roc_auc"]
            - metrics.score_metrics(truth, theirs, weights)["roc_auc"],
        }

    entries = []
    for name in predictions:
        p_male = predictions[name].to_numpy()
        entry = {
            "name": name,
            "architecture": models[name].get("architecture"),
            "mode": models[name].get("mode"),
            "selected": name == selected,
            "best": name == best,
            **bootstrap.estimate(
                lambda weights, p_male=p_male: metrics.decision_metrics(truth, p_male, 0.5, weights),
                units,
                keys=("accuracy", "balanced_accuracy"),
            ),
            **bootstrap.estimate(
                lambda weights, p_male=p_male: metrics.score_metrics(truth, p_male, weights),
                units,
                keys=("roc_auc", "ece"),
            ),
        }
        if name != best:
            entry["vs_best"] = {
                **bootstrap.estimate(lambda weights, name=name: differences(weights, name), units),
                "mcnemar": metrics.mcnemar(correct[name], correct[best]),
            }
        entries.append(entry)
    challengers = [entry for entry in entries if "vs_best" in entry]
    adjusted = metrics.holm([entry["vs_best"]["mcnemar"]["p_exact"] for entry in challengers])
    for entry, p_holm in zip(challengers, adjusted, strict=True):
        entry["vs_best"]["p_holm"] = float(p_holm)
        entry["vs_best"]["significant"] = bool(p_holm < metrics.SIGNIFICANCE_LEVEL)
    entries.sort(key=lambda entry: -entry["accuracy"]["value"])
    return {
        "schema": COMPARISON_SCHEMA,
        "created": _now(),
        "split": options.split,
        "images": len(rows),
        "threshold": 0.5,
        "best": best,
        "selected": selected,
        "significance_level": metrics.SIGNIFICANCE_LEVEL,
        "bootstrap": {**asdict(bootstrap), "unit": unit_name, "units": len(np.unique(units)), "method": "percentile"},
        "models": entries,
    }
