"""Peak RSS of a training worker over one full streamed epoch, as the number of images grows.

The shared CelebA faces are repeated in a manifest (never copied) to N rows; each N trains one epoch of a tiny
model (three strided convolutions: the epoch is bounded by the input, not the model) through a real Ray Train worker
fed by genderrec's Ray Data path (``data.cache: none``, the path ``auto`` takes for data that does not fit), at
218x178. The worker reports its peak RSS (``getrusage``: the whole process, TensorFlow included) and the epoch's
images/s. Target: peak RSS grows <= 20 % from the smallest to the largest N. The decoder's own images/s on one core
(``load_image`` in this process) is measured too.

    nice -n 5 python benchmarks/train_input_memory.py --celeba-dir ../shared/celeba --sizes 2000 20000 162770

``--estimate CONFIG`` instead prints what ``train_all`` prints for that config before any run (images, cache bytes,
budget, decision) on the full CelebA's 202,599 faces (``data.subset`` null; the shared faces repeated to that count
and split as the config says), and exits:

    python benchmarks/train_input_memory.py --estimate configs/celeba_seed.yaml
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from genderrec import engines, images, manifest, storage, train_data
from genderrec.config import load_config, parse_config

FULL_CELEBA = 202_599


def tiny_model(image_size):
    import keras

    height, width = image_size
    return keras.Sequential(
        [
            keras.Input((height, width, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(8, 5, strides=4, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )


class PeakMemory:
    """Polls this process's ``/proc/self/status``: peak RSS split into private (anonymous) and shared memory pages.

    Shared pages are Ray's object store (blocks read zero-copy), bounded by its configured size on every node.
    """

    FIELDS = ("RssAnon", "RssShmem", "RssFile")

    def __init__(self, interval: float = 0.2):
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self.samples = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self.thread.start()

    def _poll(self, interval):
        while not self.stop.wait(interval):
            sample = {}
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peaks:
                    sample[key] = int(value.split()[0]) * 1024
                    self.peaks[key] = max(self.peaks[key], sample[key])
            self.samples.append(sample)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        tenths = [self.samples[min(len(self.samples) - 1, len(self.samples) * k // 10)] for k in range(1, 11)]
        return {**self.peaks, "timeline": [(s["RssAnon"] >> 20, s["RssShmem"] >> 20) for s in tenths]}


def epoch_loop(loop_config: dict) -> dict:
    """Ray Train worker: one epoch of the tiny model on the streamed shard; reports peak RSS and images/s."""
    cfg = parse_config(loop_config["config"])
    engines.limit_tensorflow_threads(loop_config["cpus"])
    rows = loop_config["rows"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    memory = PeakMemory()
    train_input, _ = train_data.worker_inputs(
        {"train": ray.train.get_dataset_shard("train")},
        {"train": rows, "val": 0},
        cfg,
        cache=False,
        first_epoch=0,
        augment=images.augmentation(**cfg.augment.model_dump(), seed=0) if loop_config["augment"] else None,
    )
    model = tiny_model(cfg.data.image_size)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    started = time.perf_counter()
    model.fit(train_input, epochs=1, steps_per_epoch=train_data.steps(rows, cfg.training.batch_size), verbose=0)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss": peak, "rss_before_input": before, "seconds": seconds, **memory.finish()}


def run(frame: pd.DataFrame, cfg, args) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    datasets = {
        "train": train_data.dataset(frame, cfg.data.image_size, decode_cpus=cfg.data.decode_cpus, shuffle_seed=0)
    }
    trainer = TensorflowTrainer(
        epoch_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "rows": len(frame),
            "cpus": args.worker_cpus,
            "augment": args.augment,
        },
        datasets=datasets,
        dataset_config=train_data.data_config(),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.worker_cpus}),
        run_config=RunConfig(name=f"n{len(frame)}", storage_path=tempfile.mkdtemp(prefix="genderrec-input-bench-")),
    )
    return trainer.fit().return_value


def decoder_rate(uris: list[str], image_size) -> float:
    """Images/s of the shared decoder (read + decode + resize) on one core, in this process."""
    started = time.perf_counter()
    for uri in uris:
        images.load_image(storage.read_bytes(uri), image_size)
    return len(uris) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--celeba-dir", default="../shared/celeba")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 162770])
    parser.add_argument("--size", type=int, nargs=2, default=[218, 178], help="image height width")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--worker-cpus", type=float, default=0.5, help="CPUs the training worker reserves")
    parser.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs each Ray Data decode task reserves")
    parser.add_argument("--object-store-gib", type=float, default=2.0)
    parser.add_argument("--augment", action="store_true", help="also run the training augmentation in the worker")
    parser.add_argument("--worker-env", nargs="*", default=[], metavar="KEY=VALUE", help="environment of Ray's workers")
    parser.add_argument("--estimate", metavar="CONFIG", help="print the job's input estimate for CONFIG and exit")
    args = parser.parse_args()

    faces, _ = manifest.build_manifest(args.celeba_dir, split="identity", seed=0)
    if args.estimate:
        cfg = load_config(args.estimate, ["data.subset=null"])
        full = faces.iloc[np.arange(FULL_CELEBA) % len(faces)].drop(columns="split")
        split = manifest.assign_splits(full, cfg.data.split, fractions=cfg.data.fractions, seed=cfg.data.seed)
        print(
            f"{args.estimate} with data.subset=null on {FULL_CELEBA:,} faces: {split['split'].value_counts().to_dict()}"
        )
        train_data.estimate(cfg, int(split["split"].isin(train_data.SPLITS).sum()))
        return
    cfg = parse_config(
        {
            "data": {"manifest": "unused", "image_size": args.size, "cache": "none", "decode_cpus": args.decode_cpus},
            "training": {"batch_size": 32},
        }
    )
    rate = decoder_rate(faces["image_uri"].head(1000).tolist(), tuple(args.size))
    ray.init(
        num_cpus=args.cpus,
        object_store_memory=int(args.object_store_gib * 2**30),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": dict(item.split("=", 1) for item in args.worker_env)},
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}; local Ray {args.cpus} CPUs, "
        f"object store {args.object_store_gib} GiB; worker {args.worker_cpus} CPU, decode tasks {args.decode_cpus} "
        f"CPU each; {args.size[0]}x{args.size[1]}, batch 32, data.cache=none"
    )
    print(f"shared decoder, one core in this process: {rate:.0f} images/s")
    results = []
    for n in args.sizes:
        frame = faces.iloc[np.arange(n) % len(faces)].reset_index(drop=True)
        metrics = run(frame, cfg, args)
        per_second = n / metrics["seconds"]
        results.append(metrics["peak_rss"])
        print(
            f"N={n:>7,}: peak RSS {metrics['peak_rss'] / 2**20:6.0f} MiB (private {metrics['RssAnon'] / 2**20:.0f}, "
            f"object store pages {metrics['RssShmem'] / 2**20:.0f}, files {metrics['RssFile'] / 2**20:.0f}; "
            f"{metrics['rss_before_input'] / 2**20:.0f} before the input), epoch {metrics['seconds']:6.1f} s, "
            f"{per_second:6.0f} images/s = {per_second / args.cpus:5.0f} per CPU of the machine; "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        print(
            "  private, object-store MiB at each tenth of the worker's run (input set-up, model build, epoch):",
            metrics["timeline"],
            flush=True,
        )
    print(f"augmentation in the worker: {args.augment}")
    print(f"peak RSS growth from N={args.sizes[0]:,} to N={args.sizes[-1]:,}: {results[-1] / results[0] - 1:+.1%}")


if __name__ == "__main__":
    main()
