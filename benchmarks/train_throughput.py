"""Training throughput: Ray Train vs a plain ``model.fit`` on the same data, and the Ray Data input vs the old tf.data one.

All runs use the same model, batch size, augmentation and thread count, on a small dataset that is cached: the
Ray Data input (``genderrec.train_data``: decoded by Ray Data tasks, uint8 pixels cached in the worker) in a plain
``model.fit`` in this process and through Ray Train (``training.run_one``), and the tf.data pipeline training used
before (``images.tf_dataset``: decode in the worker, float32 cache). The steady-state epochs (after the first, which
fills the cache and traces the graph) are compared as images/s. Targets: Ray Train / plain >= 0.9, and the Ray Data
input >= 0.9x the old one.

    python benchmarks/train_throughput.py --celeba-dir ../shared/celeba --images 1024 --epochs 3
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time

import keras
import numpy as np
import pandas as pd
import ray

from genderrec import engines, images, manifest, models, train_data, training
from genderrec.config import parse_config


def epoch_timer(times: list[float]):
    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    return EpochTimer()


def plain_fit(cfg, frame, pipeline: str) -> list[float]:
    """Epoch times of ``model.fit`` in this process, configured like a Ray Train worker, on either input pipeline."""
    engines.limit_tensorflow_threads(cfg.resources.cpus_per_run)
    train, val = frame[frame["split"] == "train"], frame[frame["split"] == "val"]
    steps = train_data.steps(len(train), cfg.training.batch_size)
    model = models.build_model("resnet50", "fine_tune", cfg.data.image_size, "none", cfg.models.head)
    training.compile_model(model, cfg, steps)
    augment = images.augmentation(**cfg.augment.model_dump(), seed=0)
    if pipeline == "ray_data":
        inputs = train_data.prepare(cfg, frame)
        shards = {split: ds.iterator() for split, ds in inputs.datasets.items()}
        dataset, validation = train_data.worker_inputs(
            shards, inputs.counts(), cfg, cache=inputs.cache, first_epoch=0, augment=augment
        )
    else:
        common = {"image_size": cfg.data.image_size, "batch_size": cfg.training.batch_size}
        dataset = images.tf_dataset(train["image_uri"], train["male"], training=True, augment=augment, **common)
        validation = images.tf_dataset(val["image_uri"], val["male"], **common)
    times = []
    model.fit(
        dataset,
        validation_data=validation,
        epochs=cfg.training.epochs,
        steps_per_epoch=steps if pipeline == "ray_data" else None,
        class_weight=training.class_weights(train["male"]),
        callbacks=[epoch_timer(times)],
        verbose=0,
    )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--celeba-dir", default="../shared/celeba")
    parser.add_argument("--images", type=int, default=1024, help="training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=[64, 52])
    parser.add_argument("--cpus", type=float, default=2)
    parser.add_argument(
        "--storage", help="Ray Train storage (default: a new temporary folder; an old run there would be resumed)"
    )
    args = parser.parse_args()

    frame, _ = manifest.build_manifest(args.celeba_dir, split="identity", seed=0)
    frame = pd.concat([frame[frame["split"] == "train"].head(args.images), frame[frame["split"] == "val"].head(64)])
    cfg = parse_config(
        {
            "data": {"manifest": "unused", "image_size": args.size, "decode_cpus": 0.25},
            "models": {"weights": "none"},
            "training": {"epochs": args.epochs, "batch_size": 32, "early_stopping": None},
            "resources": {"cpus_per_run": args.cpus},
        }
    )

    # Ray starts its workers at a lower CPU priority (niceness 15 by default); run the plain side at the same one,
    # so that other load on a shared machine slows both alike.
    # One logical CPU more than the training worker holds, for the Ray Data decode tasks (first epoch only: cached).
    ray.init(num_cpus=math.ceil(args.cpus) + 1, include_dashboard=False, log_to_driver=False)
    worker_niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
    os.nice(max(0, worker_niceness - os.nice(0)))
    n = args.images

    def plain_rate(pipeline: str) -> float:
        epochs = plain_fit(cfg, frame, pipeline)
        return n / np.mean(epochs[1:])

    # Plain runs of both pipelines bracket the Ray run, so drifting load shows up as their differences.
    old_before, plain_before = plain_rate("tf_data"), plain_rate("ray_data")
    started = time.perf_counter()
    storage = args.storage or tempfile.mkdtemp(prefix="genderrec-train-bench-")
    summary = training.run_one(cfg, "resnet50", "fine_tune", train_data.prepare(cfg, frame), storage)
    ray_wall = time.perf_counter() - started
    ray_rate = n / np.mean([row["epoch_seconds"] for row in summary["history"]][1:])
    plain_after, old_after = plain_rate("ray_data"), plain_rate("tf_data")
    plain, old = (plain_before + plain_after) / 2, (old_before + old_after) / 2

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.cpus} for training; niceness {os.nice(0)} "
        f"(Ray workers: {worker_niceness}); load {os.getloadavg()}"
    )
    print(f"resnet50 fine_tune, {n} images {args.size[0]}x{args.size[1]}, batch 32, {args.epochs} epochs, cached")
    print(f"plain fit, old tf.data input : {old_before:7.1f} / {old_after:7.1f} images/s before / after the Ray run")
    print(f"plain fit, Ray Data input    : {plain_before:7.1f} / {plain_after:7.1f} images/s before / after")
    print(f"Ray Train, Ray Data input    : {ray_rate:7.1f} images/s (epochs after the first), wall {ray_wall:6.1f} s")
    print(f"ratio Ray Train / plain fit  : {ray_rate / plain:.3f} (steady state)")
    print(f"ratio Ray Data / old tf.data : {plain / old:.3f} (plain fits, steady state)")


if __name__ == "__main__":
    main()
