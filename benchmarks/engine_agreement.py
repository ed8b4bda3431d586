"""OpenVINO vs TensorFlow on one model's test split: agreement of p_male and labels, and model-only images/s.

    python benchmarks/engine_agreement.py --model runs/local_resnet50/selected \
        --manifest runs/local_resnet50/manifest.parquet [--out docs/engine_agreement.json]

Every test image is decoded once (the shared decoder, the card's input contract); the engines then run the same
arrays: TensorFlow float32 (the Keras model), OpenVINO at bf16 (its default on CPUs with AVX512_BF16/AMX) and at
f32. Speed: batches of ``--batch-size``, engines interleaved round by round so that machine load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from genderrec import bundle, engines, manifest, storage


def images_per_second(engine, pixels: np.ndarray, batch_size: int) -> float:
    batches = [pixels[start : start + batch_size] for start in range(0, len(pixels), batch_size)]
    engine.predict(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        engine.predict(batch)
    return len(pixels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--manifest", required=True, help="manifest with a test split")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="speed rounds per engine (interleaved)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    frame = manifest.read_manifest(args.manifest)
    rows = frame[frame["split"] == args.split]
    reference = bundle.ModelBundle.load(args.model)
    pixels = np.stack([reference.load_pixels(storage.read_bytes(uri)) for uri in rows["image_uri"]])
    if "openvino" not in reference.card.exports:
        reference.export(args.model, "openvino", pixels[:16])
    runs = {
        "tensorflow_f32": reference.engine,
        "openvino_bf16": engines.OpenvinoEngine(args.model, threads=os.cpu_count(), precision="bf16"),
        "openvino_f32": engines.OpenvinoEngine(args.model, threads=os.cpu_count(), precision="f32"),
    }
    p_male = {name: reference.calibrate(engine.predict(pixels)) for name, engine in runs.items()}
    tf_labels = reference.label(p_male["tensorflow_f32"])
    results = {
        "model": reference.card.version,
        "images": len(rows),
        "input_size": list(reference.card.input_size),
        "flip_average": reference.card.flip_average,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "agreement": {},
        "images_per_second": {name: [] for name in runs},
    }
    for name in ("openvino_bf16", "openvino_f32"):
        delta = np.abs(p_male[name] - p_male["tensorflow_f32"])
        results["agreement"][name] = {
            "max_abs_dp": float(delta.max()),
            "share_within_0.01": float(np.mean(delta <= 0.01)),
            "same_label": float(np.mean(reference.label(p_male[name]) == tf_labels)),
        }
    for _ in range(args.rounds):
        for name, engine in runs.items():
            results["images_per_second"][name].append(images_per_second(engine, pixels, args.batch_size))
    median = {name: float(np.median(values)) for name, values in results["images_per_second"].items()}
    results["speedup_vs_tensorflow_f32"] = {name: value / median["tensorflow_f32"] for name, value in median.items()}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        storage.write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
