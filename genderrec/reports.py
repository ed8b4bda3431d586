"""Rendering only: report data (from :mod:`genderrec.evaluation`) → ``metrics.json``, PNG figures and a
self-contained ``report.html`` (Jinja2 templates in ``genderrec/templates/``); the leaderboard and its figures.

A report folder (local or ``s3://``) is readable without the network: figures are embedded in the HTML as
``data:`` URIs, styles are inline, there are no scripts, fonts or links to other sites. Face thumbnails appear
only in ``mistakes.png`` and only when asked for (CelebA's licence forbids publishing its images).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math

import numpy as np
import pandas as pd

from genderrec import storage

# Test-split metrics with their bootstrap intervals: shown on the leaderboard and copied into the model card.
TEST_METRIC_COLUMNS = (
    "test_accuracy",
    "test_accuracy_low",
    "test_accuracy_high",
    "test_balanced_accuracy",
    "test_auc",
    "test_auc_low",
    "test_auc_high",
)
LEADERBOARD_COLUMNS = (
    "rank",
    "architecture",
    "mode",
    "weights",
    "params_total",
    "params_trainable",
    "epochs_run",
    "best_epoch",
    "best_val_accuracy",
    "val_accuracy",
    "val_auc",
    *TEST_METRIC_COLUMNS,
    "p_vs_best_holm",
    "train_minutes",
    "inference_ms_per_1000",
    "selected",
)
METRIC_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "male_as_female_rate": "men labeled female",
    "female_as_male_rate": "women labeled male",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC (male positive)",
    "log_loss": "log-loss",
    "brier": "Brier score",
    "ece": "ECE (15 bins)",
}


# --------------------------------------------------------------------------- files


def to_json(value):
    """Plain JSON values: numpy scalars and arrays become numbers and lists, NaN and infinity become null."""
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        return to_json(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(uri: str, value) -> None:
    storage.write_text(uri, json.dumps(to_json(value), indent=2, allow_nan=False))


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- leaderboard (train_all)


def leaderboard_markdown(board: pd.DataFrame, title: str) -> str:
    shown = board[[column for column in LEADERBOARD_COLUMNS if column in board.columns]]
    return f"# {title}\n\n{shown.to_markdown(index=False, floatfmt='.4f', missingval='n/a')}\n"


def write_leaderboard_figures(board: pd.DataFrame, histories: dict[str, list[dict]], out_dir: str) -> list[str]:
    """Training curves per run, test accuracy (with intervals) fine-tuning vs transfer, and inference time (PNG)."""
    plt = _pyplot()
    written = []

    runs = list(histories)
    columns = min(5, len(runs))
    rows = math.ceil(len(runs) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for axis, run in zip(axes.flat, runs, strict=False):
        history = pd.DataFrame(histories[run])
        for column, style in (("accuracy", "-"), ("val_accuracy", "--")):
            if column in history:
                axis.plot(history["epoch"], history[column], style, marker="o", label=column)
        axis.set_title(run, fontsize=9)
        axis.set_xlabel("epoch")
        axis.set_ylim(0.4, 1.0)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(runs) :]:
        axis.axis("off")
    figure.tight_layout()
    written.append(_save(figure, out_dir, "training_curves.png"))

    architectures = list(dict.fromkeys(board["architecture"]))
    modes = list(dict.fromkeys(board["mode"]))
    width = 0.8 / len(modes)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for index, mode in enumerate(modes):
        runs = board[board["mode"] == mode].set_index("architecture").reindex(architectures)
        errors = None
        if {"test_accuracy_low", "test_accuracy_high"} <= set(board.columns):
            errors = [
                runs["test_accuracy"] - runs["test_accuracy_low"],
                runs["test_accuracy_high"] - runs["test_accuracy"],
            ]
        positions = np.arange(len(architectures)) + (index - (len(modes) - 1) / 2) * width
        axis.bar(positions, runs["test_accuracy"], width, yerr=errors, capsize=3, label=mode)
    axis.set_xticks(np.arange(len(architectures)), architectures)
    axis.set_ylabel("test accuracy (95 % interval)")
    lowest = board.get("test_accuracy_low", board["test_accuracy"])
    axis.set_ylim(max(0.0, float(lowest.min()) - 0.05), 1.0)
    axis.set_title("Test accuracy: fine-tuning vs transfer learning")
    axis.legend()
    written.append(_save(figure, out_dir, "test_accuracy.png"))

    figure, axis = plt.subplots(figsize=(7, 3.5))
    labels = board["architecture"] + "/" + board["mode"]
    axis.barh(labels, board["inference_ms_per_1000"])
    axis.set_xlabel("ms per 1,000 images (model only)")
    axis.set_title("Inference time")
    written.append(_save(figure, out_dir, "inference_time.png"))
    return written


def _save(figure, out_dir: str, name: str) -> str:
    uri = storage.join(out_dir, name)
    storage.write_bytes(uri, _png(figure))
    return uri


# --------------------------------------------------------------------------- evaluation figures


def roc_figure(rows: pd.DataFrame, metrics: dict):
    """ROC and precision-recall curves, with both operating points marked."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _pyplot()
    scored = rows[rows["p_male"].notna() & rows["male"].notna()]
    truth, p_male = scored["male"].astype(int), scored["p_male"]
    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(9, 4))
    if truth.nunique() == 2:
        fpr, tpr, _ = roc_curve(truth, p_male)
        roc_axis.plot(fpr, tpr, label=f"ROC-AUC {_interval_text(metrics['metrics']['roc_auc'])}")
        precision, recall, _ = precision_recall_curve(truth, p_male)
        pr_axis.plot(recall, precision, label=f"PR-AUC {_interval_text(metrics['metrics']['pr_auc'])}")
    for name, marker in (("validation", "o"), ("fixed", "s")):
        point = metrics["at_threshold"][name]
        x, y = point["female_as_male_rate"]["value"], 1 - point["male_as_female_rate"]["value"]
        roc_axis.plot([x], [y], marker, label=f"{name} threshold {point['threshold']:.3f}")
    roc_axis.plot([0, 1], [0, 1], ":", color="grey")
    roc_axis.set(xlabel="women labeled male (FPR)", ylabel="men labeled male (TPR)", title="ROC")
    pr_axis.set(xlabel="recall (male)", ylabel="precision (male)", title="Precision-recall", ylim=(0, 1.02))
    for axis in (roc_axis, pr_axis):
        axis.legend(fontsize=8, loc="lower right" if axis is roc_axis else "lower left")
    figure.tight_layout()
    return figure


def reliability_figure(metrics: dict):
    """Reliability diagram: share of men per p_male bin against the mean p_male, and the bin sizes."""
    plt = _pyplot()
    calibration = metrics["calibration"]
    figure, (axis, counts) = plt.subplots(2, 1, figsize=(5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    curves = [("as evaluated", calibration["reliability"], "o-")]
    if calibration.get("before"):
        curves.insert(0, ("without the temperature", calibration["before"]["reliability"], "x--"))
    for label, table, style in curves:
        used = [row for row in table if row["count"]]
        axis.plot([row["mean_p_male"] for row in used], [row["share_male"] for row in used], style, label=label)
    axis.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ece = metrics["metrics"]["ece"]
    axis.set(ylabel="share of men", title=f"Reliability (ECE {_interval_text(ece)})", xlim=(0, 1), ylim=(0, 1))
    axis.legend(fontsize=8)
    table = calibration["reliability"]
    counts.bar([row["low"] for row in table], [row["count"] for row in table], width=1 / len(table), align="edge")
    counts.set(xlabel="p_male", ylabel="images")
    figure.tight_layout()
    return figure


def confusion_figure(metrics: dict):
    """Confusion matrices at the validation-chosen threshold and at 0.5."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for axis, name in zip(axes, ("validation", "fixed"), strict=True):
        point = metrics["at_threshold"][name]
        counts = np.asarray(point["confusion_matrix"]["counts"])
        axis.imshow(counts, cmap="Blues")
        for (row, column), value in np.ndenumerate(counts):
            share = value / max(counts[row].sum(), 1)
            colour = "white" if value > counts.max() / 2 else "black"
            axis.text(column, row, f"{value}\n{share:.1%} of row", ha="center", va="center", color=colour)
        axis.set_xticks([0, 1], ["female", "male"])
        axis.set_yticks([0, 1], ["female", "male"])
        axis.set(xlabel="predicted", ylabel="true", title=f"{name} threshold {point['threshold']:.3f}")
    figure.tight_layout()
    return figure


def groups_figure(metrics: dict):
    """Accuracy with its interval for every group, small groups hollow; a line at the overall accuracy."""
    plt = _pyplot()
    groups = [group for column in metrics["groups"]["columns"] for group in column["groups"]]
    figure, axis = plt.subplots(figsize=(7, max(2.5, 0.17 * len(groups) + 1)))
    if not groups:
        axis.text(0.5, 0.5, "no group columns", ha="center", va="center")
        axis.axis("off")
        return figure
    positions = np.arange(len(groups))[::-1]
    values = np.array([_number(group["accuracy"]["value"]) for group in groups])
    lows = np.array([_number(group["accuracy"]["low"]) for group in groups])
    highs = np.array([_number(group["accuracy"]["high"]) for group in groups])
    small = np.array([group["small"] for group in groups])
    for mask, style in ((~small, dict(fmt="o", color="C0")), (small, dict(fmt="o", mfc="white", color="grey"))):
        axis.errorbar(
            values[mask], positions[mask], xerr=[values[mask] - lows[mask], highs[mask] - values[mask]], **style
        )
    axis.axvline(metrics["at_threshold"]["validation"]["accuracy"]["value"], color="black", lw=0.8, ls=":")
    axis.set_yticks(positions, [f"{group['column']}={group['value']} (n={group['n']})" for group in groups], fontsize=7)
    axis.set_ylim(-1, len(groups))
    axis.set_xlabel(f"accuracy at threshold {metrics['groups']['threshold']:.3f} (95 % interval; hollow: small group)")
    axis.set_title("Accuracy per group")
    figure.tight_layout()
    return figure


def mistakes_figure(mistakes: list[dict]):
    """Thumbnails of the most confident mistakes, each titled with the truth and p_male."""
    from genderrec import images

    plt = _pyplot()
    columns = 8
    rows = max(1, math.ceil(len(mistakes) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.9 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, mistake in zip(axes.flat, mistakes, strict=False):
        try:
            axis.imshow(images.decode_image(storage.read_bytes(mistake["image_uri"])))
        except (images.ImageDecodeError, OSError):
            axis.text(0.5, 0.5, "unreadable", ha="center", va="center")
        truth = "male" if mistake["male"] else "female"
        axis.set_title(f"true {truth}\np_male {mistake['p_male']:.3f}", fontsize=7)
    figure.tight_layout()
    return figure


def comparison_figure(comparison: dict):
    """Accuracy and ROC-AUC of every model with intervals; the best model's accuracy as a line."""
    plt = _pyplot()
    models = comparison["models"]
    figure, axes = plt.subplots(1, 2, figsize=(10, max(2.5, 0.35 * len(models) + 1)), sharey=True)
    positions = np.arange(len(models))[::-1]
    for axis, key in zip(axes, ("accuracy", "roc_auc"), strict=True):
        values = np.array([_number(model[key]["value"]) for model in models])
        errors = [
            values - np.array([_number(model[key]["low"]) for model in models]),
            np.array([_number(model[key]["high"]) for model in models]) - values,
        ]
        colours = ["C3" if model["best"] else ("C2" if model["selected"] else "C0") for model in models]
        axis.errorbar(values, positions, xerr=errors, fmt="none", ecolor="grey")
        axis.scatter(values, positions, c=colours, zorder=3)
        axis.set_xlabel(f"{METRIC_LABELS[key]}{' at 0.5' if key == 'accuracy' else ''} (95 % interval)")
    best = next(model for model in models if model["best"])
    axes[0].axvline(best["accuracy"]["value"], color="C3", lw=0.8, ls=":")
    axes[0].set_yticks(positions, [model["name"] for model in models], fontsize=8)
    axes[0].set_title("red: best, green: selected", fontsize=9)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------- report folders


def write_model_report(metrics: dict, rows: pd.DataFrame, out_uri: str, face_images: bool = True) -> list[str]:
    """``metrics.json``, the PNG figures and ``report.html`` of one model (``face_images=False``: no thumbnails)."""
    figures = {
        "roc.png": roc_figure(rows, metrics),
        "reliability.png": reliability_figure(metrics),
        "confusion.png": confusion_figure(metrics),
        "groups.png": groups_figure(metrics),
    }
    if face_images and metrics["mistakes"]:
        figures["mistakes.png"] = mistakes_figure(metrics["mistakes"])
    pngs = {name: _png(figure) for name, figure in figures.items()}
    written = []
    for name, data in pngs.items():
        storage.write_bytes(storage.join(out_uri, name), data)
        written.append(storage.join(out_uri, name))
    write_json(storage.join(out_uri, "metrics.json"), metrics)
    storage.write_text(storage.join(out_uri, "report.html"), model_html(metrics, pngs))
    return [*written, storage.join(out_uri, "metrics.json"), storage.join(out_uri, "report.html")]


def write_comparison_report(comparison: dict, out_uri: str) -> list[str]:
    png = _png(comparison_figure(comparison))
    storage.write_bytes(storage.join(out_uri, "comparison.png"), png)
    write_json(storage.join(out_uri, "metrics.json"), comparison)
    storage.write_text(storage.join(out_uri, "report.html"), comparison_html(comparison, png))
    return [storage.join(out_uri, name) for name in ("comparison.png", "metrics.json", "report.html")]


# --------------------------------------------------------------------------- HTML (genderrec/templates/)


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _fmt(value, digits: int = 3) -> str:
    value = _number(value)
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _interval_text(estimate: dict, digits: int = 3) -> str:
    if not math.isfinite(_number(estimate["value"])):
        return "n/a"
    return f"{_fmt(estimate['value'], digits)} [{_fmt(estimate['low'], digits)}, {_fmt(estimate['high'], digits)}]"


@functools.cache
def _templates():
    """The report templates (autoescaped: every value from a manifest or a card is text, never markup)."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("genderrec", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(
        fmt=_fmt,
        interval_text=_interval_text,
        plural=lambda unit: {"identity": "identities", "image": "images"}[unit],
        base64=lambda data: base64.b64encode(data).decode(),
    )
    return environment


def model_html(metrics: dict, pngs: dict[str, bytes]) -> str:
    """One model's report as a single HTML file (figures embedded, no external resources)."""
    columns = sorted(
        metrics["groups"]["columns"], key=lambda column: -(column["gap"]["value"] if column["gap"] else -1)
    )
    return (
        _templates()
        .get_template("model_report.html.j2")
        .render(
            title=f"Evaluation: {metrics['model'].get('name')}",
            metrics=metrics,
            pngs=pngs,
            columns=columns,
            labels=METRIC_LABELS,
        )
    )


def comparison_html(comparison: dict, png: bytes) -> str:
    """The models of a run side by side, with the significance of each one's difference to the best."""
    return (
        _templates()
        .get_template("comparison_report.html.j2")
        .render(title="Model comparison", comparison=comparison, png=png)
    )
