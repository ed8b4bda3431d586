"""Metrics, inference timing, the leaderboard and its figures.

Every model is measured the same way: test-split predictions through the shared input pipeline, and
model-only inference time on the same in-memory batch, one model at a time.
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pandas as pd

from genderrec import storage

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
    "test_accuracy",
    "test_auc",
    "train_minutes",
    "inference_ms_per_1000",
    "selected",
)


def binary_metrics(labels, p_male, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy and ROC-AUC of probabilities against 0/1 labels (AUC is NaN when one class is absent)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    p_male = np.asarray(p_male, dtype=float)
    predicted = (p_male >= threshold).astype(int)
    auc = roc_auc_score(labels, p_male) if len(np.unique(labels)) == 2 else math.nan
    return {"accuracy": float(np.mean(predicted == labels)), "auc": float(auc), "n": int(len(labels))}


def predict_uris(model, uris, image_size, crop_box=None, batch_size: int = 32) -> np.ndarray:
    """p(male) for images by URI, decoded exactly as in training."""
    from genderrec import images

    dataset = images.tf_dataset(uris, np.zeros(len(uris)), image_size, batch_size, crop_box=crop_box, cache=False)
    return model.predict(dataset.map(lambda x, _: x), verbose=0).reshape(-1)


def inference_ms_per_1000(model, batch: np.ndarray, n_images: int = 1000) -> float:
    """Model-only inference time per 1,000 images: ``n_images`` through ``predict_on_batch`` after a warm-up."""
    model.predict_on_batch(batch)
    rounds = max(1, math.ceil(n_images / len(batch)))
    started = time.perf_counter()
    for _ in range(rounds):
        model.predict_on_batch(batch)
    elapsed = time.perf_counter() - started
    return elapsed / (rounds * len(batch)) * 1000 * 1000


def leaderboard_markdown(board: pd.DataFrame, title: str) -> str:
    shown = board[[column for column in LEADERBOARD_COLUMNS if column in board.columns]]
    return f"# {title}\n\n{shown.to_markdown(index=False, floatfmt='.4f')}\n"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def write_figures(board: pd.DataFrame, histories: dict[str, list[dict]], out_dir: str) -> list[str]:
    """Training curves per run, test accuracy fine-tuning vs transfer, and inference time (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

    pivot = board.pivot_table(index="architecture", columns="mode", values="test_accuracy")
    figure, axis = plt.subplots(figsize=(7, 3.5))
    pivot.plot.bar(ax=axis, rot=0)
    axis.set_ylabel("test accuracy")
    axis.set_ylim(max(0.0, float(np.nanmin(pivot.to_numpy())) - 0.05), 1.0)
    axis.set_title("Test accuracy: fine-tuning vs transfer learning")
    written.append(_save(figure, out_dir, "test_accuracy.png"))

    figure, axis = plt.subplots(figsize=(7, 3.5))
    labels = board["architecture"] + "/" + board["mode"]
    axis.barh(labels, board["inference_ms_per_1000"])
    axis.set_xlabel("ms per 1,000 images (model only)")
    axis.set_title("Inference time")
    written.append(_save(figure, out_dir, "inference_time.png"))
    plt.close("all")
    return written


def _save(figure, out_dir: str, name: str) -> str:
    uri = storage.join(out_dir, name)
    storage.write_bytes(uri, _png(figure))
    return uri
