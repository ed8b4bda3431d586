"""Leaderboard → the selected model; model cards; loading a model by path or URI.

A model directory (local or ``s3://``) holds ``model.keras`` and ``card.json``; labeling and serving
load any such directory, usually ``<run>/selected``.
"""

from __future__ import annotations

import json

import pandas as pd

from genderrec import storage
from genderrec.config import SelectionConfig

MODEL_FILE = "model.keras"
CARD_FILE = "card.json"
CLASS_NAMES = ("female", "male")


def run_name(row) -> str:
    """A leaderboard row's run as ``architecture/mode`` (the form ``selection.pin`` takes)."""
    return f"{row['architecture']}/{row['mode']}"


def select(
    board: pd.DataFrame, rule: SelectionConfig, p_values: pd.DataFrame | None = None, test: str = "paired test"
) -> tuple[pd.Series, str]:
    """Pick a run: the pinned one, else the best ``rule.metric``; near-ties go to the faster model.

    The reason always says whether the chosen run's difference to the best other run is statistically significant
    (``p_values``: runs x runs, named ``architecture/mode``, from ``test``), or that it was not tested.
    """
    if rule.pin:
        architecture, _, mode = rule.pin.partition("/")
        chosen = board[(board["architecture"] == architecture) & (board["mode"] == mode)]
        if chosen.empty:
            raise ValueError(f"pinned run {rule.pin} is not on the leaderboard")
        chosen = chosen.iloc[0]
        return chosen, f"pinned in the config ({rule.pin}); {significance(board, chosen, rule.metric, p_values, test)}"
    best = board[rule.metric].max()
    contenders = board[board[rule.metric] >= best - rule.tolerance]
    chosen = contenders.sort_values("inference_ms_per_1000").iloc[0]
    reason = f"best {rule.metric} ({best:.4f})"
    if len(contenders) > 1:
        reason = (
            f"fastest of {len(contenders)} runs within {rule.tolerance} of the best {rule.metric} ({best:.4f}); "
            "their differences are within the tolerance"
        )
    return chosen, f"{reason}; {significance(board, chosen, rule.metric, p_values, test)}"


def significance(board: pd.DataFrame, chosen: pd.Series, metric: str, p_values, test: str) -> str:
    """Whether ``chosen`` differs from the best other run beyond the noise of the test set, in words."""
    from genderrec.evaluation import SIGNIFICANCE_LEVEL

    others = board[[run_name(row) != run_name(chosen) for _, row in board.iterrows()]]
    if others.empty:
        return "no other run to compare with"
    other = others.sort_values(metric, ascending=False).iloc[0]
    relation = f"{metric} {chosen[metric] - other[metric]:+.4f} vs the best other run {run_name(other)}"
    if p_values is None:
        return f"{relation}, not tested for significance (no paired test predictions for {metric})"
    p_value = float(p_values.loc[run_name(chosen), run_name(other)])
    if p_value < SIGNIFICANCE_LEVEL:
        return f"{relation}: significant ({test}, p={p_value:.2g})"
    return f"{relation}: NOT significant ({test}, p={p_value:.2g}), the two are tied within the noise of this test set"


def export(model, model_dir: str, card: dict) -> None:
    """Write a model directory: ``model.keras`` (no optimizer state needed) and ``card.json``."""
    from genderrec import models

    models.save_model(model, storage.join(model_dir, MODEL_FILE))
    write_card(model_dir, card)


def write_card(model_dir: str, card: dict) -> None:
    storage.write_text(storage.join(model_dir, CARD_FILE), json.dumps(card, indent=2, sort_keys=True))


def read_card(model_dir: str) -> dict:
    uri = storage.join(model_dir, CARD_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{model_dir}: no {CARD_FILE} (expected a model directory written by train_all)")
    return json.loads(storage.read_text(uri))


def load_selected(model_dir: str):
    """Load ``(keras model, card)`` from a model directory (local or ``s3://``)."""
    from genderrec import models

    card = read_card(model_dir)
    model_uri = storage.join(model_dir, MODEL_FILE)
    if not storage.exists(model_uri):
        raise FileNotFoundError(f"{model_dir}: no {MODEL_FILE}")
    return models.load_model(model_uri), card


def apply_calibration(p_male, card: dict):
    """Apply the card's temperature scaling (fitted on the validation split) when present, else return ``p_male``."""
    import numpy as np

    temperature = card.get("temperature")
    p_male = np.asarray(p_male, dtype=np.float64)
    if not temperature:
        return p_male
    clipped = np.clip(p_male, 1e-7, 1 - 1e-7)
    logits = np.log(clipped / (1 - clipped)) / float(temperature)
    return 1 / (1 + np.exp(-logits))
