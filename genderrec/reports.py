"""Rendering: ``metrics.json``, PNG figures and a self-contained ``report.html``; the leaderboard and its figures.

A report folder (local or ``s3://``) is readable without the network: figures are embedded in the HTML as
``data:`` URIs, styles are inline, there are no scripts, fonts or links to other sites. Face thumbnails appear
only in ``mistakes.png`` and only when asked for (CelebA's licence forbids publishing its images).
"""

from __future__ import annotations

import base64
import html
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


# --------------------------------------------------------------------------- HTML

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.95em; } td, th { padding: 3px 9px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .ci, .nw { white-space: nowrap; } .ci { color: #555; }
img { max-width: 100%; border: 1px solid #eee; } .small { color: #999; } .bad { color: #b00; font-weight: 600; }
.note { color: #555; font-size: 0.92em; } code { background: #f3f3f3; padding: 0 3px; }
"""


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _fmt(value, digits: int = 3) -> str:
    value = _number(value)
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _interval_text(estimate: dict, digits: int = 3) -> str:
    if not math.isfinite(_number(estimate["value"])):
        return "n/a"
    return f"{_fmt(estimate['value'], digits)} [{_fmt(estimate['low'], digits)}, {_fmt(estimate['high'], digits)}]"


def _plural(unit: str) -> str:
    return {"identity": "identities", "image": "images"}[unit]


def _interval_html(estimate: dict, digits: int = 3) -> str:
    """Value, then its interval (which never breaks across lines)."""
    text = _interval_text(estimate, digits)
    value, _, interval = text.partition(" ")
    return f'{value} <span class="ci">{interval}</span>' if interval else value


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(cell if str(cell).startswith("<td") else f"<td>{cell}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _num(text: str, css: str = "num") -> str:
    return f'<td class="{css}">{text}</td>'


def _figure(png: bytes, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def model_html(metrics: dict, pngs: dict[str, bytes]) -> str:
    """One model's report as a single HTML file (figures embedded, no external resources)."""
    model, data, boot = metrics["model"], metrics["data"], metrics["bootstrap"]
    validation, fixed = metrics["at_threshold"]["validation"], metrics["at_threshold"]["fixed"]
    esc = html.escape
    parts = [
        f"<h1>Evaluation: {esc(str(model.get('name')))}</h1>",
        f'<p class="note">{esc(str(model.get("architecture")))} / {esc(str(model.get("mode")))}, input '
        f"{esc(str(model.get('input_size')))}, weights {esc(str(model.get('weights')))}; model <code>"
        f"{esc(str(model['dir']))}</code>; manifest <code>{esc(str(data.get('manifest')))}</code>, split "
        f"<b>{esc(data['split'])}</b>: {data['images']} images ({data['male']} male, {data['female']} female"
        + (f", {data['identities']} identities" if data.get("identities") else "")
        + f"); {data['excluded_unreadable']} unreadable and {data['excluded_unlabeled']} unlabeled rows excluded. "
        f"Created {esc(metrics['created'])}.</p>",
        "<h2>Headline metrics</h2>",
        f'<p class="note">95 % intervals: percentile bootstrap, {boot["replicates"]} replicates resampling '
        f"{boot['units']} {_plural(boot['unit'])} (seed {boot['seed']}). Validation threshold: "
        f"{_fmt(validation['threshold'])} ({esc(metrics['threshold']['how'])}).</p>",
        _table(
            ["metric", f"validation threshold {_fmt(validation['threshold'])}", "threshold 0.5"],
            [
                [METRIC_LABELS[key], _num(_interval_html(validation[key])), _num(_interval_html(fixed[key]))]
                for key in ("accuracy", "balanced_accuracy", "male_as_female_rate", "female_as_male_rate")
            ],
        ),
        _table(
            ["threshold-free metric", "value [95 % interval]"],
            [[METRIC_LABELS[key], _num(_interval_html(value))] for key, value in metrics["metrics"].items()],
        ),
        _figure(pngs["roc.png"], "ROC and precision-recall curves"),
        _figure(pngs["confusion.png"], "confusion matrices"),
        "<h2>Calibration</h2>",
        _calibration_html(metrics),
        _figure(pngs["reliability.png"], "reliability diagram"),
        "<h2>Per group</h2>",
        _groups_html(metrics["groups"]),
        _figure(pngs["groups.png"], "accuracy per group"),
        "<h2>Most confident mistakes</h2>",
        _mistakes_html(metrics["mistakes"], pngs.get("mistakes.png")),
    ]
    return _page(f"Evaluation: {model.get('name')}", "\n".join(parts))


def _calibration_html(metrics: dict) -> str:
    calibration = metrics["calibration"]
    temperature = calibration.get("temperature")
    if calibration.get("before"):
        before = calibration["before"]
        rows = [
            [METRIC_LABELS[key], _num(_fmt(before[key])), _num(_interval_html(metrics["metrics"][key]))]
            for key in ("log_loss", "brier", "ece")
        ]
        fitted = f" fitted on {html.escape(calibration['fitted_on'])}" if calibration.get("fitted_on") else ""
        return (
            f'<p class="note">The model card\'s temperature {temperature:.3f}{fitted} is applied to every prediction '
            "(as in labeling and serving). Decisions at 0.5 do not change; probabilities do. On the evaluated "
            "split:</p>" + _table(["metric", "without it", "with it [95 % interval]"], rows)
        )
    return (
        '<p class="note">No temperature in the model card (<code>genderrec calibrate --model DIR --manifest M</code> '
        "fits one on the val split).</p>"
    )


def _groups_html(groups: dict) -> str:
    largest, worst = groups["largest_gap"], groups["worst_group"]
    summary = [
        f'<p class="note">Threshold {_fmt(groups["threshold"])}. A group of fewer than {groups["min_group_size"]} '
        "images is flagged <i>small</i>: shown, but left out of gaps and of the worst group. A grey rate rests on "
        f"fewer than {groups['min_group_size']} images (n after it): a [0, 0] interval there is not "
        "certainty.</p>"
    ]
    if largest:
        verdict = "excludes 0" if largest["significant"] else "includes 0: not significant"
        summary.append(
            f"<p>Largest accuracy gap: <b>{html.escape(largest['column'])}</b> "
            f"({html.escape(largest['best'])} vs {html.escape(largest['worst'])}): {_interval_text(largest)} "
            f"(interval {verdict}).</p>"
        )
    if worst:
        summary.append(
            f"<p>Worst group: <b>{html.escape(worst['column'])}={html.escape(worst['value'])}</b> (n={worst['n']}), "
            f"accuracy {_interval_text(worst['accuracy'])}.</p>"
        )
    if groups["skipped_columns"]:
        summary.append(
            f'<p class="note">One value only (no comparison): {html.escape(", ".join(groups["skipped_columns"]))}.</p>'
        )
    ordered = sorted(groups["columns"], key=lambda column: -(column["gap"]["value"] if column["gap"] else -1))
    rows = []
    for column in ordered:
        gap = column["gap"]
        gap_text = "n/a (small groups)" if not gap else _interval_html(gap)
        css = "num bad" if gap and gap["significant"] else "num"
        for index, group in enumerate(column["groups"]):
            rows.append(
                [
                    html.escape(column["column"]) if index == 0 else "",
                    html.escape(group["value"]),
                    _num(f"{group['n']} ({group['n_male']}/{group['n_female']})"),
                    *(_rate_cell(group[key]) for key in ("accuracy", "male_as_female_rate", "female_as_male_rate")),
                    '<td class="small">small</td>' if group["small"] else "",
                    _num(gap_text, css) if index == 0 else "",
                ]
            )
    header = ["column", "group", "n (male/female)", "accuracy", "men labeled female", "women labeled male", "", "gap"]
    return "\n".join(summary) + _table(header, rows)


def _rate_cell(estimate: dict) -> str:
    """A per-group rate; greyed, with its denominator, when that is under the minimum group size."""
    if estimate["small"]:
        return _num(f"{_interval_html(estimate)} (n={estimate['n']})", "num small")
    return _num(_interval_html(estimate))


def _mistakes_html(mistakes: list[dict], png: bytes | None) -> str:
    if not mistakes:
        return "<p>No mistakes.</p>"
    if png is not None:
        return _figure(png, "most confident mistakes")
    rows = [
        [
            html.escape(str(mistake.get("image_id", ""))),
            f"<code>{html.escape(str(mistake['image_uri']))}</code>",
            "male" if mistake["male"] else "female",
            _num(_fmt(mistake["p_male"])),
        ]
        for mistake in mistakes
    ]
    note = '<p class="note">Thumbnails left out (<code>--no-face-images</code>); the images are listed instead.</p>'
    return note + _table(["image id", "image URI", "truth", "p_male"], rows)


def comparison_html(comparison: dict, png: bytes) -> str:
    """The models of a run side by side, with the significance of each one's difference to the best."""
    boot = comparison["bootstrap"]
    rows = []
    for model in comparison["models"]:
        versus = model.get("vs_best")
        if versus:
            mcnemar = versus["mcnemar"]
            css = "num bad" if versus["significant"] else "num"
            tail = [
                _num(_interval_html(versus["accuracy_difference"])),
                _num(f"{mcnemar['only_a_correct']} / {mcnemar['only_b_correct']}"),
                _num(f'<span class="nw">{mcnemar["p_exact"]:.3g}</span>'),
                _num(f'<span class="nw">{versus["p_holm"]:.3g}</span>'),
                _num("yes" if versus["significant"] else "no", css),
            ]
        else:
            tail = [_num("best"), "", "", "", ""]
        rows.append(
            [
                html.escape(model["name"]) + (" <b>(selected)</b>" if model["selected"] else ""),
                _num(_interval_html(model["accuracy"])),
                _num(_interval_html(model["balanced_accuracy"])),
                _num(_interval_html(model["roc_auc"])),
                _num(_interval_html(model["ece"])),
                *tail,
            ]
        )
    header = [
        "model",
        "accuracy",
        "balanced accuracy",
        "ROC-AUC",
        "ECE",
        "accuracy − best",
        "right only here / in best",
        "McNemar p",
        "Holm p",
        "worse?",
    ]
    body = [
        f"<h1>Model comparison: {html.escape(str(comparison.get('run', '')))}</h1>",
        f'<p class="note">Split <b>{html.escape(comparison["split"])}</b>, the {comparison["images"]} images every '
        f"model could read, threshold 0.5. Intervals: percentile bootstrap, {boot['replicates']} replicates over "
        f"{boot['units']} {_plural(boot['unit'])} (seed {boot['seed']}); differences are paired (same "
        "replicates). Each model is compared with the best one by McNemar's exact test on the images where exactly "
        f"one of the two is right; Holm's correction over the {len(comparison['models']) - 1} comparisons, "
        f"significant below {comparison['significance_level']}.</p>",
        _table(header, rows),
        _figure(png, "accuracy and ROC-AUC per model"),
        "<p class=\"note\">Each model's full report: <code>models/&lt;name&gt;/</code> in this report's folder.</p>",
    ]
    return _page("Model comparison", "\n".join(body))
