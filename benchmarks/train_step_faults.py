"""Seconds and minor page faults per training step in a Ray Train worker, with and without ``training.WORKER_ENV``.

The worker is fed the way a run is (``train_data.SplitBatches`` over its dataset shard, ``keras_input``, cached
after the first epoch), on seeded random pixels: only the process's malloc settings differ between the two runs.
A worker whose allocator hands its tensors' pages back after every step faults them in again on the next one;
faults and kernel CPU per step show it, seconds per step show what it costs.

    python benchmarks/train_step_faults.py --size 40 32 --architecture resnet50
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time

import numpy as np
import ray
import ray.train
from ray.train.tensorflow import TensorflowTrainer

from genderrec import engines, images, models, train_data, training
from genderrec.config import load_config, parse_config

BATCH = 32
LOCAL_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "local.yaml")  # --augment's settings


def worker_loop(config: dict) -> None:
    """Two timed epochs after one that fills the cache and traces the step; reports per-step figures."""
    engines.limit_tensorflow_threads(1)
    size, rows, steps = tuple(config["size"]), config["rows"], config["rows"] // BATCH
    cfg = parse_config({"data": {"manifest": "unused", "image_size": list(size)}, "training": {"batch_size": BATCH}})
    model = models.build_model(config["architecture"], "fine_tune", size, "none")
    training.compile_model(model, cfg, steps)
    shard = ray.train.get_dataset_shard("train")
    batches = train_data.SplitBatches(shard, rows, size, BATCH, cache=True, shuffle=True, seed=0)
    augment = images.augmentation(**load_config(LOCAL_CONFIG).augment.model_dump(), seed=0)
    data = train_data.keras_input(batches, size, augment=augment if config["augment"] else None)
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    model.fit(data, epochs=3, initial_epoch=1, steps_per_epoch=steps, verbose=0)
    after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    timed = 2 * steps
    # Ray Train's result carries the metrics of the last report that has a checkpoint
    with tempfile.TemporaryDirectory() as empty:
        ray.train.report(
            {
                "seconds_per_step": seconds / timed,
                "faults_per_step": (after.ru_minflt - before.ru_minflt) / timed,
                "kernel_share": (after.ru_stime - before.ru_stime)
                / max(1e-9, after.ru_stime - before.ru_stime + after.ru_utime - before.ru_utime),
                "malloc_top_pad": os.environ.get("MALLOC_TOP_PAD_", "glibc default"),
            },
            checkpoint=ray.train.Checkpoint.from_directory(empty),
        )


def measure(dataset, args, env: dict, storage: str) -> dict:
    trainer = TensorflowTrainer(
        worker_loop,
        train_loop_config={
            "size": args.size,
            "rows": args.rows,
            "architecture": args.architecture,
            "augment": args.augment,
        },
        datasets={"train": dataset},
        dataset_config=train_data.data_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name="env" if env else "default", storage_path=storage, worker_runtime_env={"env_vars": env}
        ),
    )
    return trainer.fit().metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[40, 32])
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--rows", type=int, default=640, help="images per epoch (a multiple of 32)")
    parser.add_argument("--augment", action="store_true", help="configs/local.yaml's augmentation, as a run has it")
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pixels = np.random.default_rng(0).integers(0, 256, (args.rows, *args.size, 3), dtype=np.uint8)
    dataset = ray.data.from_items([{"pixels": image, "male": float(i % 2)} for i, image in enumerate(pixels)])
    storage = tempfile.mkdtemp(prefix="genderrec-fault-bench-")
    results = {
        label: measure(dataset, args, env, storage)
        for label, env in (("default", {}), ("WORKER_ENV", training.WORKER_ENV))
    }

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; load {os.getloadavg()}")
    print(
        f"{args.architecture} fine_tune {args.size[0]}x{args.size[1]}, batch {BATCH}, 1 thread, cached Ray Data input"
        + (", augmented" if args.augment else "")
    )
    print(f"{'worker env':<12} {'MALLOC_TOP_PAD_':>16} {'s/step':>8} {'faults/step':>12} {'kernel CPU':>10}")
    for label, row in results.items():
        print(
            f"{label:<12} {row['malloc_top_pad']:>16} {row['seconds_per_step']:8.3f} {row['faults_per_step']:12,.0f} "
            f"{row['kernel_share']:10.1%}"
        )
    ratio = results["default"]["seconds_per_step"] / results["WORKER_ENV"]["seconds_per_step"]
    print(f"speed-up with WORKER_ENV: {ratio:.2f}x")


if __name__ == "__main__":
    main()
