"""Arrays in, numbers out: the pure maths of evaluation and calibration (no I/O, no models, no data frames).

Every metric takes ``weights`` (replicates x images, ``None``: the sample itself) and returns one value per
replicate, so that one matrix product computes a metric for all bootstrap replicates at once. :class:`Bootstrap`
draws those weights (whole units, e.g. identities, resampled; seeded, so paired across models).
McNemar's test and Holm's correction compare models; :func:`fit_temperature` / :func:`apply_temperature` are the
temperature scaling of a model card.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

ECE_BINS = 15
SIGNIFICANCE_LEVEL = 0.05
_MAX_CELLS = 1 << 22  # bootstrap weights held at once (replicates x images), ~32 MB of float64
_EPS = np.finfo(np.float64).eps  # scikit-learn's log-loss clipping


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
    logits = logit(p_male)

    def log_loss(log_temperature):
        z = logits / math.exp(log_temperature)
        return float(np.mean(np.logaddexp(0, z) - male * z))

    return float(math.exp(minimize_scalar(log_loss, bounds=(-4, 4), method="bounded").x))


def logit(p_male) -> np.ndarray:
    clipped = np.clip(np.asarray(p_male, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(clipped / (1 - clipped))


def apply_temperature(p_male, temperature: float | None) -> np.ndarray:
    """``sigmoid(logit(p) / T)``: temperature scaling (Guo et al., 2017); ``None`` or 1 leaves p unchanged."""
    p_male = np.asarray(p_male, dtype=np.float64)
    if not temperature or temperature == 1.0:
        return p_male
    return 1 / (1 + np.exp(-logit(p_male) / float(temperature)))


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
