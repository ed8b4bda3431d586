"""Training throughput through Ray Train vs a plain ``model.fit`` on the same data, same machine, same run.

Both sides use the same model, input pipeline (decode, cache, augmentation), batch size and thread count; the
steady-state epochs (after the first, which fills the cache and traces the graph) are compared as images/s, and
the whole wall clock (process start, checkpoints every epoch) is reported too. Target: ratio >= 0.9.

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

from genderrec import images, manifest, models, training
from genderrec.config import parse_config


def plain_fit(cfg, frame) -> list[float]:
    """Epoch times of ``model.fit`` in this process, configured exactly like a Ray Train worker."""
    training.configure_threads(cfg.resources.cpus_per_run)
    train, val = frame[frame["split"] == "train"], frame[frame["split"] == "val"]
    model = models.build_model("resnet50", "fine_tune", cfg.data.image_size, "none", cfg.models.head)
    training.compile_model(model, cfg, math.ceil(len(train) / cfg.training.batch_size))
    augment = images.augmentation(**cfg.augment.model_dump(), seed=0)
    dataset = images.tf_dataset(
        train["image_uri"], train["male"], cfg.data.image_size, cfg.training.batch_size, training=True, augment=augment
    )
    validation = images.tf_dataset(val["image_uri"], val["male"], cfg.data.image_size, cfg.training.batch_size)
    times = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(
        dataset,
        validation_data=validation,
        epochs=cfg.training.epochs,
        class_weight=training.class_weights(train["male"]),
        callbacks=[EpochTimer()],
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
            "data": {"manifest": "unused", "image_size": args.size},
            "models": {"weights": "none"},
            "training": {"epochs": args.epochs, "batch_size": 32, "early_stopping": None},
            "resources": {"cpus_per_run": args.cpus},
        }
    )

    # Ray starts its workers at a lower CPU priority (niceness 15 by default); run the plain side at the same one,
    # so that other load on a shared machine slows both alike.
    ray.init(num_cpus=max(2, math.ceil(args.cpus)), include_dashboard=False, log_to_driver=False)
    worker_niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
    os.nice(max(0, worker_niceness - os.nice(0)))
    n = args.images

    def timed_plain_fit() -> tuple[float, float]:
        started = time.perf_counter()
        epochs = plain_fit(cfg, frame)
        return n / np.mean(epochs[1:]), time.perf_counter() - started

    # plain, Ray, plain: the two plain runs bracket the Ray run, so drifting load shows up as their difference
    plain_before, wall_before = timed_plain_fit()
    started = time.perf_counter()
    storage = args.storage or tempfile.mkdtemp(prefix="genderrec-train-bench-")
    summary = training.run_one(cfg, "resnet50", "fine_tune", training.run_data(frame), storage)
    ray_wall = time.perf_counter() - started
    ray_rate = n / np.mean([row["epoch_seconds"] for row in summary["history"]][1:])
    plain_after, wall_after = timed_plain_fit()
    plain_rate, plain_wall = (plain_before + plain_after) / 2, (wall_before + wall_after) / 2

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.cpus} for training; niceness {os.nice(0)} (Ray workers: {worker_niceness}); load {os.getloadavg()}"
    )
    print(f"resnet50 fine_tune, {n} images {args.size[0]}x{args.size[1]}, batch 32, {args.epochs} epochs")
    print(f"plain model.fit : {plain_before:7.1f} / {plain_after:7.1f} images/s before / after the Ray run")
    print(f"plain model.fit : {plain_rate:7.1f} images/s (epochs after the first), wall {plain_wall:6.1f} s")
    print(f"Ray Train       : {ray_rate:7.1f} images/s (epochs after the first), wall {ray_wall:6.1f} s")
    print(f"ratio Ray/plain : {ray_rate / plain_rate:.3f} steady state, {plain_wall / ray_wall:.3f} wall clock")


if __name__ == "__main__":
    main()
