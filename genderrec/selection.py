"""Leaderboard → the selected run, and the reason in words (what labeling and serving then load).

The run is chosen on ``selection.metric``, a validation-split metric by default: choosing on the test split and then
reporting the test split overstates the winner, so a test metric stays possible but the reason says so. The reason
also says what the comparison of the runs on the test split (:func:`genderrec.evaluation.compare_models`: McNemar's
exact test against the best run, Holm-corrected) makes of the chosen run's difference to the best other run.
"""

from __future__ import annotations

import pandas as pd

from genderrec.config import SelectionConfig

VALIDATION_METRICS = ("val_accuracy", "val_auc", "best_val_accuracy")


def run_name(row) -> str:
    """A leaderboard row's run as ``architecture/mode`` (the form ``selection.pin`` takes)."""
    return f"{row['architecture']}/{row['mode']}"


def model_name(row) -> str:
    """A leaderboard row's model name as in its card and ``models/<name>/``: ``architecture_mode``."""
    return f"{row['architecture']}_{row['mode']}"


def select(board: pd.DataFrame, rule: SelectionConfig, comparison: dict | None = None) -> tuple[pd.Series, str]:
    """Pick a run: the pinned one, else the best ``rule.metric``; near-ties go to the faster model.

    The reason says which split chose it and whether its difference to the best other run on the test split is
    statistically significant (``comparison``: from ``compare_models``; ``None``: not tested).
    """
    if rule.pin:
        architecture, _, mode = rule.pin.partition("/")
        chosen = board[(board["architecture"] == architecture) & (board["mode"] == mode)]
        if chosen.empty:
            raise ValueError(f"pinned run {rule.pin} is not on the leaderboard")
        chosen = chosen.iloc[0]
        return chosen, f"pinned in the config ({rule.pin}); {significance(board, chosen, comparison)}"
    if rule.metric not in board or board[rule.metric].isna().all():
        raise ValueError(f"selection.metric {rule.metric}: no run has a value (a val metric needs a val split)")
    best = board[rule.metric].max()
    contenders = board[board[rule.metric] >= best - rule.tolerance]
    chosen = contenders.sort_values("inference_ms_per_1000").iloc[0]
    reason = f"best {rule.metric} ({best:.4f})"
    if len(contenders) > 1:
        reason = (
            f"fastest of {len(contenders)} runs within {rule.tolerance} of the best {rule.metric} ({best:.4f}); "
            "their differences are within the tolerance"
        )
    return chosen, f"{chosen_on(rule.metric)}: {reason}; {significance(board, chosen, comparison)}"


def chosen_on(metric: str) -> str:
    """Which split chose the run, in words (a test-chosen run's test metrics overstate it)."""
    if metric in VALIDATION_METRICS:
        return "chosen on the validation split"
    return "chosen on the TEST split (its test metrics are optimistic: they also chose it)"


def significance(board: pd.DataFrame, chosen: pd.Series, comparison: dict | None) -> str:
    """Whether ``chosen`` differs from the best other run on the test split beyond its noise, in words."""
    if len(board) < 2:
        return "no other run to compare with"
    if comparison is None:
        return "not tested for significance (no paired test predictions)"
    entries = {entry["name"]: entry for entry in comparison["models"]}
    mine = entries[model_name(chosen)]
    if mine["best"]:  # the runner-up carries the test against it
        other = next(entry for entry in comparison["models"] if not entry["best"])
        difference, versus = -other["vs_best"]["accuracy_difference"]["value"], other["vs_best"]
    else:
        other, versus = entries[comparison["best"]], mine["vs_best"]
        difference = versus["accuracy_difference"]["value"]
    test = (
        f"McNemar exact test on {comparison['images']} paired test images, Holm-adjusted over "
        f"{len(entries) - 1} comparisons, p={versus['p_holm']:.2g}"
    )
    relation = f"test accuracy {difference:+.4f} vs the best other run {other['name']}"
    if versus["significant"]:
        return f"{relation}: significant ({test})"
    return f"{relation}: NOT significant ({test}), the two are tied within the noise of this test set"
