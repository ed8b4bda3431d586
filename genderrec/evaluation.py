"""Trustworthy evaluation: metrics with bootstrap intervals, per-group accuracy, calibration, paired significance.

Every number comes with a seeded 95 % percentile-bootstrap interval. A bootstrap replicate is a row of *weights*
(how many times each image was drawn), so that one matrix product computes a metric for all replicates at once.
When the rows carry an ``identity`` column, whole identities are resampled (images of one person are not
independent evidence); otherwise single images.

Decisions are reported at two thresholds: the one chosen on the validation split (``validation``) and 0.5
(``fixed``). The report layout (``metrics.json`` keys) is documented in ``docs/evaluation.md``.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from genderrec import storage

if TYPE_CHECKING:
    from genderrec.faces import FaceOptions

log = logging.getLogger(__name__)

SCHEMA = "genderrec.evaluation/1"
ECE_BINS = 15
MIN_GROUP_SIZE = 30
SIGNIFICANCE_LEVEL = 0.05
MISTAKES_LISTED = 16
THRESHOLD_METRICS = ("balanced_accuracy", "accuracy")
# Columns of a manifest that describe an image rather than a group of people.
NOT_GROUPS = frozenset({"image_uri", "image_id", "male", "split", "identity", "official_split", "p_male", "error"})
_MAX_CELLS = 1 << 22  # bootstrap weights held at once (replicates x images), ~32 MB of float64
_EPS = np.finfo(np.float64).eps  # scikit-learn's log-loss clipping


@dataclass(frozen=True)
class EvaluationOptions:
    """How ``genderrec evaluate`` measures a model (defaults are what the docs' reports use)."""

    split: str = "test"
    group_by: tuple[str, ...] = ()
    calibrate: bool = False
    threshold_metric: str = "balanced_accuracy"
    replicates: int = 2000
    seed: int = 0
    confidence: float = 0.95
    min_group_size: int = MIN_GROUP_SIZE
    face_images: bool = True
    batch_size: int = 64
    faces: str = "aligned"  # detect/auto: ordinary photos, each scored by its largest face (genderrec.faces)
    face_options: FaceOptions | None = None  # detect/auto: which detections count (None: the defaults)

    def __post_init__(self):
        if self.faces not in ("aligned", "detect", "auto"):
            raise ValueError(f"faces must be one of aligned, detect, auto, got {self.faces!r}")
        if self.threshold_metric not in THRESHOLD_METRICS:
            raise ValueError(f"threshold metric must be one of {THRESHOLD_METRICS}, got {self.threshold_metric!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be between 0 and 1, got {self.confidence}")
        if self.replicates < 100:
            raise ValueError(f"use at least 100 bootstrap replicates, got {self.replicates}")
        if self.min_group_size < 1:
            raise ValueError(f"minimum group size must be at least 1, got {self.min_group_size}")


# --------------------------------------------------------------------------- metrics of weighted samples


def _ratio(numerator, denominator) -> np.ndarray:
    """``numerator / denominator`` with NaN where the denominator is 0 (e.g. a class absent from a replicate)."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)


def _as_weights(weights, n: int) -> np.ndarray:
    return np.ones((1, n)) if weights is None else np.asarray(weights, dtype=float)


def decision_metrics(truth, p_male, threshold: float, weights=None) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, both error rates and confusion counts of ``p_male >= threshold``.

    ``weights`` is (replicates, images); every value returned has one entry per replicate (``None``: the sample).
    ``male_as_female_rate`` is the share of men labeled female (1 - recall of male), ``female_as_male_rate`` the
    share of women labeled male.
    """
    male = np.asarray(truth).astype(bool)
    predicted_male = np.asarray(p_male, dtype=float) >= threshold
    weights = _as_weights(weights, len(male))
    cells = np.stack([~male & ~predicted_male, ~male & predicted_male, male & ~predicted_male, male & predicted_male])
    tn, fp, fn, tp = (weights @ cells.T.astype(float)).T
    male_as_female = _ratio(fn, fn + tp)
    female_as_male = _ratio(fp, fp + tn)
    return {
        "accuracy": _ratio(tn + tp, tn + fp + fn + tp),
        "balanced_accuracy": 1 - (male_as_female + female_as_male) / 2,
        "male_as_female_rate": male_as_female,
        "female_as_male_rate": female_as_male,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


def score_metrics(truth, p_male, weights=None) -> dict[str, np.ndarray]:
    """Threshold-free metrics: ROC-AUC, PR-AUC (average precision, male positive), log-loss, Brier score, ECE.

    ECE uses ``ECE_BINS`` equal-width bins of ``p_male``: the image-weighted mean of |mean p_male - share male|.
    """
    male = np.asarray(truth, dtype=float)
    p_male = np.asarray(p_male, dtype=float)
    weights = _as_weights(weights, len(male))
    total = weights.sum(axis=1)
    clipped = np.clip(p_male, _EPS, 1 - _EPS)
    log_loss = weights @ -(male * np.log(clipped) + (1 - male) * np.log(1 - clipped))
    brier = weights @ (p_male - male) ** 2
    residuals = np.zeros((len(male), ECE_BINS))
    residuals[np.arange(len(male)), ece_bin(p_male)] = p_male - male
    roc_auc, pr_auc = _ranking_metrics(male, p_male, weights)
    return {
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "log_loss": _ratio(log_loss, total),
        "brier": _ratio(brier, total),
        "ece": _ratio(np.abs(weights @ residuals).sum(axis=1), total),
    }


def ece_bin(p_male) -> np.ndarray:
    return np.minimum((np.asarray(p_male) * ECE_BINS).astype(int), ECE_BINS - 1)


def _ranking_metrics(male: np.ndarray, p_male: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC-AUC (ties count half) and average precision for every weights row, from one sort of the scores."""
    order = np.argsort(-p_male, kind="stable")
    ranked = p_male[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # one level per distinct score, descending
    weights = weights[:, order]
    positives = np.add.reduceat(weights * male[order], starts, axis=1)
    negatives = np.add.reduceat(weights * (1 - male[order]), starts, axis=1)
    n_pos, n_neg = positives.sum(axis=1), negatives.sum(axis=1)
    true_pos, false_pos = positives.cumsum(axis=1), negatives.cumsum(axis=1)
    negatives_below = n_neg[:, None] - false_pos + 0.5 * negatives
    roc_auc = _ratio((positives * negatives_below).sum(axis=1), n_pos * n_neg)
    precision = _ratio(true_pos, true_pos + false_pos)
    average_precision = _ratio((positives * np.nan_to_num(precision)).sum(axis=1), n_pos)
    return roc_auc, average_precision


def binary_metrics(labels, p_male, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy and ROC-AUC of probabilities against 0/1 labels (AUC is NaN when one class is absent)."""
    decisions = decision_metrics(labels, p_male, threshold)
    scores = score_metrics(labels, p_male)
    return {"accuracy": float(decisions["accuracy"][0]), "auc": float(scores["roc_auc"][0]), "n": len(labels)}


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Bootstrap:
    """Seeded percentile bootstrap; the same seed gives the same replicates to every statistic (paired)."""

    replicates: int = 2000
    seed: int = 0
    confidence: float = 0.95

    def weights(self, units) -> Iterator[np.ndarray]:
        """Chunks of (replicates, images) weights: how often each image is drawn when whole units are resampled."""
        codes, uniques = pd.factorize(np.asarray(units))
        n_units = len(uniques)
        rng = np.random.default_rng(self.seed)
        chunk = max(1, min(self.replicates, _MAX_CELLS // max(len(codes), 1)))
        for start in range(0, self.replicates, chunk):
            rows = min(chunk, self.replicates - start)
            draws = rng.integers(0, n_units, size=(rows, n_units)) + n_units * np.arange(rows)[:, None]
            counts = np.bincount(draws.ravel(), minlength=rows * n_units).reshape(rows, n_units)
            yield counts[:, codes].astype(float)

    def replicate(self, statistic: Callable[[np.ndarray], dict], units) -> dict[str, np.ndarray]:
        """``statistic(weights)`` over all replicates: each value gets a leading replicate axis."""
        parts = [statistic(weights) for weights in self.weights(units)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def interval(self, value, replicates) -> dict:
        """``{value, low, high}`` (arrays for vector statistics); NaN replicates (an absent class) are ignored."""
        tail = (1 - self.confidence) / 2 * 100
        replicates = np.asarray(replicates, dtype=float)
        flat = replicates.reshape(len(replicates), -1)
        low, high = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
        finite = np.isfinite(flat).any(axis=0)
        if np.isfinite(flat).all():  # the common case; nanpercentile is much slower
            low, high = np.percentile(flat, [tail, 100 - tail], axis=0)
        elif finite.any():
            low[finite], high[finite] = np.nanpercentile(flat[:, finite], [tail, 100 - tail], axis=0)
        if replicates.ndim == 1:
            return {"value": float(value), "low": float(low[0]), "high": float(high[0])}
        return {"value": value, "low": low.reshape(replicates.shape[1:]), "high": high.reshape(replicates.shape[1:])}

    def estimate(self, statistic: Callable[[np.ndarray], dict], units, keys=None) -> dict[str, dict]:
        """Point value (all weights 1) and interval of each key of ``statistic``."""
        point = statistic(None)
        replicates = self.replicate(statistic, units)
        return {key: self.interval(point[key][0], replicates[key]) for key in keys or point}


# --------------------------------------------------------------------------- thresholds and calibration


def choose_threshold(truth, p_male, metric: str = "balanced_accuracy") -> float:
    """The threshold that maximises ``metric`` (ties: the one nearest 0.5), halfway between two observed scores."""
    p_male = np.asarray(p_male, dtype=float)
    male = np.asarray(truth).astype(bool)
    scores = np.unique(p_male)
    candidates = np.unique(np.r_[0.5, (scores[1:] + scores[:-1]) / 2, scores[0] - 1e-9, scores[-1] + 1e-9])
    candidates = candidates[(candidates > 0) & (candidates < 1)]
    # An image is called male by every candidate at or below its score: count, per candidate, the scores below it.
    men_below = np.searchsorted(np.sort(p_male[male]), candidates, side="left")
    women_below = np.searchsorted(np.sort(p_male[~male]), candidates, side="left")
    n_men, n_women = male.sum(), (~male).sum()
    if metric == "balanced_accuracy":
        value = (_ratio(n_men - men_below, n_men) + _ratio(women_below, n_women)) / 2
    else:
        value = (n_men - men_below + women_below) / len(male)
    best = np.flatnonzero(value >= np.nanmax(value) - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def fit_temperature(truth, p_male) -> float:
    """Temperature T minimising the log-loss of ``sigmoid(logit(p_male) / T)`` (Guo et al., 2017)."""
    from scipy.optimize import minimize_scalar

    male = np.asarray(truth, dtype=float)
    logits = _logit(p_male)

    def log_loss(log_temperature):
        z = logits / math.exp(log_temperature)
        return float(np.mean(np.logaddexp(0, z) - male * z))

    return float(math.exp(minimize_scalar(log_loss, bounds=(-4, 4), method="bounded").x))


def _logit(p_male) -> np.ndarray:
    clipped = np.clip(np.asarray(p_male, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(clipped / (1 - clipped))


def reliability_table(truth, p_male) -> list[dict]:
    """Per ``ECE_BINS`` bin of p_male: image count, mean p_male and share of men (the reliability diagram)."""
    male = np.asarray(truth, dtype=float)
    p_male = np.asarray(p_male, dtype=float)
    bins = ece_bin(p_male)
    rows = []
    for index in range(ECE_BINS):
        inside = bins == index
        rows.append(
            {
                "low": index / ECE_BINS,
                "high": (index + 1) / ECE_BINS,
                "count": int(inside.sum()),
                "mean_p_male": float(p_male[inside].mean()) if inside.any() else None,
                "share_male": float(male[inside].mean()) if inside.any() else None,
            }
        )
    return rows


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


def group_statistics(truth, p_male, threshold: float, members: np.ndarray, weights=None) -> dict[str, np.ndarray]:
    """Size, accuracy and both error rates of every group (``members``: images x groups, boolean)."""
    male = np.asarray(truth).astype(bool)
    predicted_male = np.asarray(p_male, dtype=float) >= threshold
    weights = _as_weights(weights, len(male))
    members = members.astype(float)

    def count(mask):
        return weights @ (members * mask[:, None])

    n, n_male, n_female = weights @ members, count(male), count(~male)
    return {
        "n": n,
        "accuracy": _ratio(count(predicted_male == male), n),
        "male_as_female_rate": _ratio(count(male & ~predicted_male), n_male),
        "female_as_male_rate": _ratio(count(~male & predicted_male), n_female),
    }


def group_report(scored: pd.DataFrame, threshold: float, columns, bootstrap: Bootstrap, units, min_size: int) -> dict:
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
        return group_statistics(truth, p_male, threshold, members, weights)

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


def _gap(indices, groups, point, replicates, bootstrap: Bootstrap) -> dict | None:
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


# --------------------------------------------------------------------------- paired comparisons


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test on paired right/wrong outcomes: exact binomial and continuity-corrected chi-square p-values."""
    from scipy.stats import binomtest, chi2

    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    discordant = only_a + only_b
    if discordant == 0:
        return {"only_a_correct": 0, "only_b_correct": 0, "p_exact": 1.0, "p_continuity": 1.0}
    statistic = max(abs(only_a - only_b) - 1, 0) ** 2 / discordant
    return {
        "only_a_correct": only_a,
        "only_b_correct": only_b,
        "p_exact": float(binomtest(only_a, discordant, 0.5).pvalue),
        "p_continuity": float(chi2.sf(statistic, df=1)),
    }


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error control over several comparisons)."""
    p_values = np.asarray(p_values, dtype=float)
    order = np.argsort(p_values)
    scaled = np.maximum.accumulate((len(p_values) - np.arange(len(p_values))) * p_values[order])
    adjusted = np.empty_like(p_values)
    adjusted[order] = np.minimum(scaled, 1.0)
    return adjusted


def bootstrap_p_value(differences) -> float:
    """Two-sided p-value of 'no difference' from bootstrap replicates of a paired difference."""
    differences = np.asarray(differences, dtype=float)
    differences = differences[np.isfinite(differences)]
    return float(min(1.0, 2 * min(np.mean(differences <= 0), np.mean(differences >= 0))))


def _common_rows(rows: pd.DataFrame, predictions: pd.DataFrame):
    """The labeled rows every model (column of ``predictions``) could read, those predictions, and the 0/1 truth."""
    readable = predictions.notna().all(axis=1) & rows["male"].notna()
    return rows[readable], predictions[readable], rows.loc[readable, "male"].astype(int).to_numpy()


def pairwise_p_values(rows: pd.DataFrame, predictions: pd.DataFrame, metric: str, bootstrap: Bootstrap):
    """p-value of every pair of models (columns of ``predictions``) on the images all of them could read:
    McNemar's exact test at 0.5 for ``accuracy``, a paired bootstrap of the difference for ``auc``."""
    rows, predictions, truth = _common_rows(rows, predictions)
    names = list(predictions.columns)
    if metric == "accuracy":
        correct = {name: (predictions[name].to_numpy() >= 0.5) == truth for name in names}

        def p_value(a, b):
            return mcnemar(correct[a], correct[b])["p_exact"]
    else:
        units, _ = bootstrap_units(rows)
        aucs = {  # the same seed gives every model the same replicates, so differences are paired
            name: bootstrap.replicate(
                lambda weights, p=predictions[name].to_numpy(): score_metrics(truth, p, weights), units
            )["roc_auc"]
            for name in names
        }

        def p_value(a, b):
            return bootstrap_p_value(aucs[a] - aucs[b])

    table = pd.DataFrame(1.0, index=names, columns=names)
    for index, a in enumerate(names):
        for b in names[index + 1 :]:
            table.loc[a, b] = table.loc[b, a] = p_value(a, b)
    return table


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
    threshold = choose_threshold(usable["male"].astype(int), usable["p_male"], metric)
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
    bootstrap = Bootstrap(options.replicates, options.seed, options.confidence)
    chosen, why = operating_threshold(val, options.threshold_metric)
    thresholds = {"validation": 0.5 if chosen is None else chosen, "fixed": 0.5}

    at_threshold = {}
    for name, threshold in thresholds.items():
        estimates = bootstrap.estimate(
            lambda weights, threshold=threshold: decision_metrics(truth, p_male, threshold, weights),
            units,
            keys=("accuracy", "balanced_accuracy", "male_as_female_rate", "female_as_male_rate"),
        )
        counts = decision_metrics(truth, p_male, threshold)
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
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
        "metrics": bootstrap.estimate(lambda weights: score_metrics(truth, p_male, weights), units),
        "at_threshold": at_threshold,
        "calibration": {"ece_bins": ECE_BINS, "reliability": reliability_table(truth, p_male)},
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


# --------------------------------------------------------------------------- prediction and timing


def predict(
    model, card: dict, rows: pd.DataFrame, batch_size: int = 64, chunk: int = 1024, faces="aligned", face_options=None
) -> pd.DataFrame:
    """``p_male`` (the card's calibration applied) for every manifest row, decoded exactly as in training.

    A row whose image cannot be read gets NaN and the reason in ``error``: one bad file never stops an
    evaluation. Decoding runs in threads, ``chunk`` images at a time, so memory stays bounded. With ``faces``
    ``detect`` or ``auto`` each image is an ordinary photo scored by its largest face, aligned CelebA-style
    (:func:`genderrec.faces.face_crops`); a photo without one is NaN with ``no face found`` (``detect``) or is
    scored whole (``auto``).
    """
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from genderrec import faces as face_stage
    from genderrec import images, selection

    size = tuple(card["input_size"])
    crop_box = tuple(card["crop_box"]) if card.get("crop_box") else None
    if faces != "aligned":
        face_options = face_options or face_stage.FaceOptions()
        detector, detector_lock = face_stage.load_detector(face_options), threading.Lock()

    def pixels_of(data: bytes) -> np.ndarray | None:
        """The model's input: the image as it is, or its largest face (None: no face)."""
        if faces == "aligned":
            return images.load_image(data, size, crop_box)
        rgb = images.decode_image(data)
        with detector_lock:  # the decoding threads share one detector
            crops = face_stage.face_crops(rgb, detector, face_options, faces, size, crop_box)
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
                outputs = model.predict(batch, batch_size=batch_size, verbose=0)
                raw[start + np.asarray(readable)] = np.asarray(outputs).reshape(-1)
    readable = ~np.isnan(raw)
    p_male = raw.copy()
    p_male[readable] = selection.apply_calibration(raw[readable], card)
    if not readable.all():
        first = next(error for error in errors if error)
        log.warning("%d of %d image(s) could not be read, e.g. %s", (~readable).sum(), len(uris), first)
    return pd.DataFrame({"p_male": p_male, "error": errors}, index=rows.index)


def inference_ms_per_1000(model, batch: np.ndarray, n_images: int = 1000) -> float:
    """Model-only inference time per 1,000 images: ``n_images`` through ``predict_on_batch`` after a warm-up."""
    model.predict_on_batch(batch)
    rounds = max(1, math.ceil(n_images / len(batch)))
    started = time.perf_counter()
    for _ in range(rounds):
        model.predict_on_batch(batch)
    elapsed = time.perf_counter() - started
    return elapsed / (rounds * len(batch)) * 1000 * 1000


# --------------------------------------------------------------------------- model directories and runs


def split_rows(frame: pd.DataFrame, split: str, manifest_uri: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The evaluated rows and the validation rows (``None`` when the manifest has none)."""
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise ValueError(f"{manifest_uri}: no row has split={split!r} (splits: {sorted(frame['split'].unique())})")
    val = frame[frame["split"] == "val"]
    stale = [column for column in ("p_male", "error") if column in frame.columns]  # e.g. a labeling output
    return rows.drop(columns=stale), (val.drop(columns=stale) if len(val) else None)


def calibrate(card: dict, val: pd.DataFrame, source: str) -> dict:
    """Fit temperature scaling on the validation predictions; returns the card with the combined temperature."""
    usable = _scorable(val) if val is not None else None
    if usable is None or usable["male"].nunique() < 2:
        raise ValueError(f"{source}: --calibrate needs a val split with both classes to fit the temperature on")
    fitted = fit_temperature(usable["male"].astype(int), usable["p_male"])
    before = float(score_metrics(usable["male"].astype(int), usable["p_male"])["log_loss"][0])
    after_p = _rescale(usable["p_male"], fitted)
    after = float(score_metrics(usable["male"].astype(int), after_p)["log_loss"][0])
    # Predictions already carry the card's temperature, so the new one multiplies it.
    temperature = float(card.get("temperature") or 1.0) * fitted
    return {
        **card,
        "temperature": temperature,
        "calibration": {
            "method": "temperature scaling: p = sigmoid(logit(p_model) / temperature)",
            "fitted_on": f"{source} split=val ({len(usable)} images)",
            "val_log_loss_before": before,
            "val_log_loss_after": after,
            "fitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def _rescale(p_male, temperature: float) -> np.ndarray:
    return 1 / (1 + np.exp(-_logit(p_male) / temperature))


def evaluate_model_dir(model_dir: str, frame: pd.DataFrame, manifest_uri: str, out_uri: str, options):
    """Predict, optionally calibrate, evaluate and write the report of one model directory.

    Returns ``(metrics, rows with p_male)``; with ``options.calibrate`` the model's ``card.json`` gets the fitted
    ``temperature`` (which labeling and serving apply).
    """
    from genderrec import reports, selection

    rows, val = split_rows(frame, options.split, manifest_uri)
    group_columns(rows, options.group_by)  # a misspelt --group-by fails before the model loads
    model, card = selection.load_selected(model_dir)
    framing = {"faces": options.faces, "face_options": options.face_options}
    rows = rows.join(predict(model, card, rows, options.batch_size, **framing))
    if val is not None:
        val = val.join(predict(model, card, val, options.batch_size, **framing))
    calibration = {"temperature": card.get("temperature"), "fitted_now": False}
    if options.calibrate:
        before = _scorable(rows)
        previous = float(card.get("temperature") or 1.0)
        card = calibrate(card, val, manifest_uri)
        selection.write_card(model_dir, card)
        log.info("%s: temperature %.3f written to its card", model_dir, card["temperature"])
        factor = card["temperature"] / previous
        rows = rows.assign(p_male=_rescale(rows["p_male"], factor))  # NaN (unreadable) stays NaN
        val = val.assign(p_male=_rescale(val["p_male"], factor))
        truth = before["male"].astype(int)
        scores = score_metrics(truth, before["p_male"])
        calibration = {
            "temperature": card["temperature"],
            "fitted_now": True,
            **card["calibration"],
            "before": {
                **{key: float(scores[key][0]) for key in ("log_loss", "brier", "ece")},
                "reliability": reliability_table(truth, before["p_male"]),
            },
        }
    metrics = evaluate_predictions(rows, val, options)
    if options.split == "val":
        metrics["threshold"]["how"] += "; chosen on the evaluated split itself, so its metrics are optimistic"
    metrics["calibration"].update(calibration)
    metrics["model"] = {
        "dir": model_dir,
        **{key: card.get(key) for key in ("name", "architecture", "mode", "input_size", "crop_box", "weights")},
        "card_threshold": card.get("threshold", 0.5),
    }
    metrics["data"]["manifest"] = manifest_uri
    metrics["data"]["faces"] = options.faces
    metrics["data"]["unreadable_examples"] = rows["error"].dropna().head(5).tolist()
    reports.write_model_report(metrics, rows, out_uri, face_images=options.face_images)
    return metrics, rows


def evaluate_model(model_dir: str, manifest_uri: str, out_uri: str, options: EvaluationOptions) -> dict:
    """``genderrec evaluate --model``: one model directory on one split of a labeled manifest."""
    from genderrec import manifest

    frame = manifest.read_manifest(manifest_uri)
    metrics, _ = evaluate_model_dir(model_dir, frame, manifest_uri, out_uri, options)
    return metrics


def run_models(run_dir: str) -> dict[str, str]:
    """``{name: model directory}`` of a train_all run (``<run>/models/*`` holding a card)."""
    from genderrec import selection

    cards = storage.list_files(storage.join(run_dir, "models"), (selection.CARD_FILE,))
    model_dirs = {uri.rsplit("/", 2)[-2]: uri.rsplit("/", 1)[0] for uri in cards}
    if not model_dirs:
        raise FileNotFoundError(f"{run_dir}: no models/<run>/{selection.CARD_FILE} (expected a train_all run)")
    return model_dirs


def evaluate_runs(run_dir: str, manifest_uri: str | None, out_uri: str, options: EvaluationOptions) -> dict:
    """``genderrec evaluate --runs``: every model of a train_all run on the same images, compared pairwise.

    Each model's report goes to ``<out>/models/<name>/``; the comparison (``metrics.json``, ``report.html``) to
    ``<out>``. With ``options.calibrate`` the selected model's card is calibrated as well.
    """
    from genderrec import manifest, reports, selection

    manifest_uri = manifest_uri or storage.join(run_dir, "manifest.parquet")
    frame = manifest.read_manifest(manifest_uri)
    selected_dir = storage.join(run_dir, "selected")
    selected = selection.read_card(selected_dir)["name"] if storage.exists(selected_dir) else None
    results, predictions = {}, {}
    for name, model_dir in run_models(run_dir).items():
        log.info("evaluating %s", name)
        results[name], rows = evaluate_model_dir(
            model_dir, frame, manifest_uri, storage.join(out_uri, "models", name), options
        )
        predictions[name] = rows["p_male"]
        if options.calibrate and name == selected:
            card = selection.read_card(model_dir)
            selection.write_card(selected_dir, {**selection.read_card(selected_dir), **card})
    rows = frame.loc[rows.index]
    comparison = compare_models(rows, pd.DataFrame(predictions), results, options, selected)
    comparison.update(run=run_dir, manifest=manifest_uri)
    reports.write_comparison_report(comparison, out_uri)
    return comparison


def compare_models(rows: pd.DataFrame, predictions: pd.DataFrame, results: dict, options, selected=None) -> dict:
    """Every model on the images all of them could read, at 0.5: intervals, and the difference to the best model
    with McNemar's test (exact; Holm-adjusted over the comparisons) and a paired bootstrap interval."""
    rows, predictions, truth = _common_rows(rows, predictions)
    units, unit_name = bootstrap_units(rows)
    bootstrap = Bootstrap(options.replicates, options.seed, options.confidence)
    correct = {name: (predictions[name].to_numpy() >= 0.5) == truth for name in predictions}
    best = max(correct, key=lambda name: (correct[name].mean(), results[name]["metrics"]["roc_auc"]["value"]))

    def differences(weights, name):
        mine, theirs = predictions[name].to_numpy(), predictions[best].to_numpy()
        return {
            "accuracy_difference": decision_metrics(truth, mine, 0.5, weights)["accuracy"]
            - decision_metrics(truth, theirs, 0.5, weights)["accuracy"],
            "roc_auc_difference": score_metrics(truth, mine, weights)["roc_auc"]
            - score_metrics(truth, theirs, weights)["roc_auc"],
        }

    models = []
    for name in predictions:
        p_male = predictions[name].to_numpy()
        model = results[name]["model"]
        entry = {
            "name": name,
            "architecture": model.get("architecture"),
            "mode": model.get("mode"),
            "selected": name == selected,
            "best": name == best,
            **bootstrap.estimate(
                lambda weights, p_male=p_male: decision_metrics(truth, p_male, 0.5, weights),
                units,
                keys=("accuracy", "balanced_accuracy"),
            ),
            **bootstrap.estimate(
                lambda weights, p_male=p_male: score_metrics(truth, p_male, weights), units, keys=("roc_auc", "ece")
            ),
        }
        if name != best:
            entry["vs_best"] = {
                **bootstrap.estimate(lambda weights, name=name: differences(weights, name), units),
                "mcnemar": mcnemar(correct[name], correct[best]),
            }
        models.append(entry)
    challengers = [entry for entry in models if "vs_best" in entry]
    for entry, adjusted in zip(
        challengers, holm([entry["vs_best"]["mcnemar"]["p_exact"] for entry in challengers]), strict=True
    ):
        entry["vs_best"]["p_holm"] = float(adjusted)
        entry["vs_best"]["significant"] = bool(adjusted < SIGNIFICANCE_LEVEL)
    models.sort(key=lambda entry: -entry["accuracy"]["value"])
    return {
        "schema": "genderrec.comparison/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "split": options.split,
        "images": len(rows),
        "threshold": 0.5,
        "best": best,
        "selected": selected,
        "significance_level": SIGNIFICANCE_LEVEL,
        "bootstrap": {**asdict(bootstrap), "unit": unit_name, "units": len(np.unique(units)), "method": "percentile"},
        "models": models,
    }
