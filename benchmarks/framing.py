"""Framing benchmark: a model's accuracy on the test split's aligned faces as they are vs the same faces re-framed.

    nice -n 19 python benchmarks/framing.py --model runs/local_resnet50/selected \
        --manifest runs/local_resnet50/manifest.parquet --seed 0 --output framing.json

Each test face becomes one seeded photo (tests/helpers/framing.py: scale 0.5-2x, ±20°, a generated background,
JPEG quality 40-95), written to a temporary folder only, and is scored through ``--faces auto`` (MTCNN + CelebA
alignment, the labeling and serving path: :func:`genderrec.evaluation.predict`); the aligned faces are scored as
``genderrec evaluate`` scores them. The gap is aligned minus framed accuracy, in points, with a 95 % bootstrap
interval over faces (paired: the same faces both ways), and the framed accuracy by scale and by rotation. With
``--realigned`` also the aligned faces as they are through ``--faces auto`` (MTCNN's alignment without the
re-framing: which part of the gap is the alignment). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from genderrec import bundle, evaluation, images, manifest, storage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers, shared with the tests
from tests.helpers.framing import framed_photo  # noqa: E402 (the CI-tested generator)


def framed_rows(rows: pd.DataFrame, seed: int, folder: Path) -> pd.DataFrame:
    """``rows`` with ``image_uri`` pointing at each face's framed photo, and how each was framed."""
    made = []
    for image_id, uri in zip(rows["image_id"], rows["image_uri"], strict=True):
        photo = framed_photo(images.decode_image(storage.read_bytes(uri)), seed, image_id)
        path = folder / f"{Path(image_id).stem}.jpg"
        path.write_bytes(photo.data)
        made.append({"image_uri": str(path), "scale": photo.scale, "degrees": photo.degrees, "quality": photo.quality})
    return rows.assign(**pd.DataFrame(made, index=rows.index))


def paired_gap(aligned: np.ndarray, framed: np.ndarray, seed: int, replicates: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of mean(aligned) - mean(framed), in points, resampling faces."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(aligned), (replicates, len(aligned)))
    gaps = 100 * (aligned[draws].mean(axis=1) - framed[draws].mean(axis=1))
    low, high = np.percentile(gaps, [2.5, 97.5])
    return float(low), float(high)


def by_bins(rows: pd.DataFrame, correct: np.ndarray, column: str, edges) -> list[dict]:
    bins = pd.cut(rows[column].abs() if column == "degrees" else rows[column], edges, include_lowest=True)
    grouped = pd.DataFrame({"bin": bins, "correct": correct}).groupby("bin", observed=True)["correct"]
    return [
        {"bin": str(name), "faces": int(size), "accuracy": float(mean)}
        for (name, size), mean in zip(grouped.size().items(), grouped.mean(), strict=True)
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory (e.g. runs/<name>/selected)")
    parser.add_argument("--manifest", required=True, help="the manifest the model was trained on (its test split)")
    parser.add_argument("--limit", type=int, default=None, help="the first N test faces only (by image id)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=["tensorflow", "openvino"], default="tensorflow")
    parser.add_argument(
        "--realigned", action="store_true", help="also the aligned faces as they are through --faces auto"
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    model = bundle.ModelBundle.load(args.model, engine=args.engine, precision="f32")
    test = manifest.read_manifest(args.manifest)
    test = test[test["split"] == "test"].sort_values("image_id").head(args.limit).reset_index(drop=True)
    truth = test["male"].to_numpy()
    started = time.perf_counter()
    aligned = evaluation.predict(model, test)
    aligned_seconds = time.perf_counter() - started
    realigned = evaluation.predict(model, test, faces="auto") if args.realigned else None
    with tempfile.TemporaryDirectory(prefix="genderrec-framing-") as folder:
        photos = framed_rows(test, args.seed, Path(folder))
        started = time.perf_counter()
        framed = evaluation.predict(model, photos, faces="auto")
        framed_seconds = time.perf_counter() - started
    threshold = model.card.threshold
    correct = {
        name: ((scored["p_male"].to_numpy() >= threshold) == truth).astype(float)  # NaN (unreadable) counts wrong
        for name, scored in (("aligned", aligned), ("framed", framed), ("realigned", realigned))
        if scored is not None
    }
    accuracy = {name: float(values.mean()) for name, values in correct.items()}
    gap = 100 * (accuracy["aligned"] - accuracy["framed"])
    low, high = paired_gap(correct["aligned"], correct["framed"], args.seed)
    result = {
        "model": args.model,
        "model_name": model.card.name,
        "model_test_accuracy_on_card": model.card.metrics.get("test_accuracy"),
        "manifest": args.manifest,
        "faces": len(test),
        "seed": args.seed,
        "engine": args.engine,
        "aligned_accuracy": accuracy["aligned"],
        "framed_accuracy": accuracy["framed"],
        "realigned_accuracy": accuracy.get("realigned"),
        "gap_points": gap,
        "gap_points_95": [low, high],
        "framed_errors": int(framed["error"].notna().sum()),
        "framed_by_scale": by_bins(photos, correct["framed"], "scale", [0.5, 0.75, 1.0, 1.5, 2.0]),
        "framed_by_abs_degrees": by_bins(photos, correct["framed"], "degrees", [0, 5, 10, 15, 20]),
        "seconds": {"aligned": aligned_seconds, "framed": framed_seconds},
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(
        f"{len(test)} test faces of {args.model}: aligned {accuracy['aligned']:.4f}, framed (--faces auto) "
        f"{accuracy['framed']:.4f}: gap {gap:.2f} points (95 % {low:.2f} to {high:.2f})"
    )
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
