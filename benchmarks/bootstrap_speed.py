"""Bootstrap intervals: the weights-matrix engine of ``genderrec.metrics`` vs a per-replicate scikit-learn loop.

Both compute the same eight metrics (accuracy, balanced accuracy, both error rates, ROC-AUC, PR-AUC, log-loss,
Brier) on the same replicates, so the intervals agree; only the time differs.

    python benchmarks/bootstrap_speed.py [--images 1001] [--replicates 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn import metrics as sk

from genderrec import metrics


def engine(truth, p_male, bootstrap):
    def statistic(weights):
        return {
            **metrics.decision_metrics(truth, p_male, 0.5, weights),
            **metrics.score_metrics(truth, p_male, weights),
        }

    return bootstrap.replicate(statistic, np.arange(len(truth)))


def loop(truth, p_male, bootstrap):
    """What one would write without the engine: resample, then call scikit-learn once per metric and replicate."""
    values = {key: [] for key in ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "log_loss", "brier")}
    for weights in bootstrap.weights(np.arange(len(truth))):
        for counts in weights:
            drawn = np.repeat(np.arange(len(truth)), counts.astype(int))
            y, p = truth[drawn], p_male[drawn]
            predicted = (p >= 0.5).astype(int)
            values["accuracy"].append(sk.accuracy_score(y, predicted))
            values["balanced_accuracy"].append(sk.balanced_accuracy_score(y, predicted))
            recall = sk.recall_score(y, predicted, labels=[0, 1], average=None)
            values.setdefault("male_as_female_rate", []).append(1 - recall[1])
            values.setdefault("female_as_male_rate", []).append(1 - recall[0])
            values["roc_auc"].append(sk.roc_auc_score(y, p))
            values["pr_auc"].append(sk.average_precision_score(y, p))
            values["log_loss"].append(sk.log_loss(y, p, labels=[0, 1]))
            values["brier"].append(sk.brier_score_loss(y, p))
    return {key: np.asarray(value) for key, value in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1001)
    parser.add_argument("--replicates", type=int, default=2000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, args.images)
    p_male = np.clip(rng.normal(0.35 + 0.3 * truth, 0.25), 0.001, 0.999)
    bootstrap = metrics.Bootstrap(replicates=args.replicates, seed=0)

    timings = {}
    for name, method in (("engine", engine), ("scikit-learn loop", loop)):
        started = time.perf_counter()
        result = method(truth, p_male, bootstrap)
        timings[name] = time.perf_counter() - started
        print(f"{name:>18}: {timings[name]:7.2f} s for {args.replicates} replicates of {args.images} images")
        if name == "engine":
            reference = result
    for key, values in result.items():
        assert np.allclose(values, reference[key]), key  # same replicates, same numbers
    print(f"speed-up: {timings['scikit-learn loop'] / timings['engine']:.0f}x (identical replicate values)")


if __name__ == "__main__":
    main()
