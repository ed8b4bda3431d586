"""Training speed per ``training.precision``: ResNet50 fine-tune from random init, the policies interleaved.

Real CelebA faces are decoded once into memory, so only the model's compute differs between policies. Each round
trains a fresh model per policy (same data, batch, optimizer, loss and metrics as a run, ``training.compile_model``,
threads as a Ray Train worker) in the order given, and rounds repeat that order, so load that drifts on a shared
machine hits every policy alike. Images/s is taken over the epochs after the first (which traces the graph); the
ratio is each policy's mean images/s over float32's. A policy that fails is reported, not hidden.

    nice -n 19 python benchmarks/train_precision.py --celeba-dir ../shared/celeba --images 256 --epochs 3 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import keras
import numpy as np

from genderrec import engines, images, manifest, models, storage, training
from genderrec.config import parse_config


def epoch_times(model, pixels, labels, cfg) -> list[float]:
    times = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(
        pixels,
        labels,
        batch_size=cfg.training.batch_size,
        epochs=cfg.training.epochs,
        callbacks=[EpochTimer()],
        verbose=0,
    )
    return times


def train_rate(cfg, pixels, labels, precision: str) -> float:
    """Images/s of one fresh ResNet50 trained in ``precision`` (epochs after the first)."""
    keras.config.set_dtype_policy(precision)
    try:
        model = models.build_model("resnet50", "fine_tune", cfg.data.image_size, "none", cfg.models.head)
        training.compile_model(model, cfg, steps_per_epoch=int(np.ceil(len(pixels) / cfg.training.batch_size)))
        times = epoch_times(model, pixels, labels, cfg)
    finally:
        keras.config.set_dtype_policy("float32")
    return len(pixels) / np.mean(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--celeba-dir", default="../shared/celeba")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=[48, 40])
    parser.add_argument("--cpus", type=float, default=2)
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16", "mixed_float16"])
    args = parser.parse_args()

    frame, _ = manifest.build_manifest(args.celeba_dir, split="identity", seed=0)
    train = frame[frame["split"] == "train"].head(args.images)
    size = tuple(args.size)
    pixels = np.stack([images.load_image(storage.read_bytes(uri), size) for uri in train["image_uri"]])
    labels = train["male"].to_numpy(dtype="float32")
    cfg = parse_config(
        {
            "data": {"manifest": "unused", "image_size": list(size)},
            "models": {"weights": "none"},
            "training": {"epochs": args.epochs, "batch_size": 32, "learning_rate": 1e-3, "early_stopping": None},
        }
    )
    engines.limit_tensorflow_threads(args.cpus)

    rates: dict[str, list[float]] = {precision: [] for precision in args.precisions}
    errors: dict[str, str] = {}
    for round_index in range(args.rounds):
        for precision in args.precisions:
            if precision in errors:
                continue
            try:
                rates[precision].append(train_rate(cfg, pixels, labels, precision))
            except Exception as exc:  # noqa: BLE001 - reported below: a policy this CPU cannot train is a result
                errors[precision] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            print(f"round {round_index + 1} {precision:15s} {rates[precision][-1]:7.1f} images/s", flush=True)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.cpus} threads; niceness {os.nice(0)}; "
        f"load {os.getloadavg()}"
    )
    print(f"resnet50 fine_tune, {len(pixels)} images {size[0]}x{size[1]}, batch 32, {args.epochs} epochs per run")
    base = np.mean(rates["float32"]) if rates.get("float32") else None
    for precision, values in rates.items():
        if precision in errors:
            print(f"{precision:15s} failed: {errors[precision]}")
            continue
        ratio = f"{np.mean(values) / base:.2f}x float32" if base else ""
        print(f"{precision:15s} {' / '.join(f'{v:.1f}' for v in values)} images/s, mean {np.mean(values):.1f}  {ratio}")


if __name__ == "__main__":
    main()
