"""Labeling throughput: the full Ray Data job vs plain ``model.predict`` on the same images already in memory.

    nice -n 19 python benchmarks/label_throughput.py --celeba-dir ../shared/celeba --images 300

In one run, with one model and one batch size, it measures

1. ``model.predict`` on the images already decoded into one array: the compute ceiling (measured before and after
   the job, to show how much the machine's load moved);
2. the ``genderrec label`` job (Ray Data: read, decode in CPU tasks, inference in the actor pool, Parquet write),
   end to end, and in steady state (minus the fixed start-up cost measured by a one-batch job, after a first
   one-batch job has started Ray's workers: actor start, TensorFlow import, model load);
3. a naive loop: one file at a time, Pillow decode, ``model.predict`` on a batch of one;

and prints images/s and the job / ceiling ratios. Beside wall-clock images/s it reports CPU-seconds per image
(this process and all its descendants, i.e. the local Ray, sampled from ``/proc``): on a machine shared with other
work, wall-clock shares depend on how many threads each side runs, while CPU cost per image does not. Without
``--model`` it exports an untrained ``--architecture`` at ``--input-size`` (throughput does not depend on the
weights). Linux only; not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genderrec import bundle, images, labeling, manifest, storage


def model_to_benchmark(args, work: Path) -> str:
    """``--model``, or an untrained ``--architecture`` exported under ``work``: speed does not depend on the weights."""
    if args.model:
        return args.model
    model_dir = str(work / "model")
    export_untrained(args.architecture, tuple(args.input_size), model_dir)
    return model_dir


def export_untrained(architecture: str, input_size: tuple[int, int], model_dir: str) -> None:
    from genderrec import models

    model = models.build_model(architecture, "fine_tune", input_size, "none")
    card = bundle.ModelCard(
        name=f"{architecture}_untrained",
        architecture=architecture,
        mode="fine_tune",
        input_size=input_size,
        preprocessing=f"{architecture} preprocess_input (inside the model)",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    bundle.ModelBundle(model, card).save(model_dir)


class CpuMeter:
    """CPU seconds used by this process and its descendants (a local Ray's GCS, raylet and workers), from ``/proc``.

    Sampled every ``interval`` seconds while the block runs: Ray workers that exit are not charged to their parent,
    so each process counts up to its last sample (at most ``interval`` of its CPU time is lost).
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.seconds = 0.0

    @staticmethod
    def _snapshot() -> dict[tuple[int, int], int]:
        """``{(pid, start time): user + system ticks}`` for this process tree."""
        parents, ticks = {}, {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while we looked
                continue
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            ticks[(pid, int(fields[19]))] = int(fields[11]) + int(fields[12])  # starttime; utime + stime
        tree, frontier = set(), [os.getpid()]
        while frontier:
            pid = frontier.pop()
            tree.add(pid)
            frontier.extend(child for child, parent in parents.items() if parent == pid and child not in tree)
        return {key: value for key, value in ticks.items() if key[0] in tree}

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._last.update(self._snapshot())

    def __enter__(self):
        self._baseline = self._snapshot()
        self._last = dict(self._baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self._last.update(self._snapshot())
        used = sum(value - self._baseline.get(key, 0) for key, value in self._last.items())
        self.seconds = used / os.sysconf("SC_CLK_TCK")


def measured(function, *args) -> tuple[object, float, float]:
    """``(result, wall seconds, CPU seconds)`` of one call."""
    with CpuMeter() as meter:
        started = time.perf_counter()
        result = function(*args)
        wall = time.perf_counter() - started
    return result, wall, meter.seconds


def rates(images_done: int, wall: float, cpu: float) -> dict:
    return {"images_per_second": images_done / wall, "cpu_seconds_per_image": cpu / images_done, "seconds": wall}


def decode_all(loaded: bundle.ModelBundle, blobs: list[bytes]) -> np.ndarray:
    return np.stack([loaded.load_pixels(blob) for blob in blobs])


def ceiling(model, pixels: np.ndarray, batch_size: int) -> dict:
    """``model.predict`` alone on decoded images, after a warm-up batch."""
    model.predict(pixels[:batch_size], batch_size=batch_size, verbose=0)
    _, wall, cpu = measured(lambda: model.predict(pixels, batch_size=batch_size, verbose=0))
    return rates(len(pixels), wall, cpu)


def naive_loop(loaded: bundle.ModelBundle, uris: list[str]) -> dict:
    """What a first script does: open each file, decode it, predict it alone."""

    def loop():
        for uri in uris:
            loaded.model.predict(loaded.load_pixels(Path(uri).read_bytes())[None], verbose=0)

    _, wall, cpu = measured(loop)
    return rates(len(uris), wall, cpu)


def label_job(model_dir: str, uris: list[str], work: Path, name: str, args, engine: str) -> dict:
    """Run the labeling job on ``uris`` (a manifest of local files) with ``engine``; wall and CPU seconds."""
    source = work / f"{name}_{engine}.parquet"
    pq.write_table(pa.table({"image_uri": uris}), source)
    options = labeling.LabelingOptions(
        model_dir, str(source), str(work / f"{name}_{engine}"), batch_size=args.batch_size, actors=args.actors
    )
    options = dataclasses.replace(options, engine=engine, precision=args.precision)
    result, wall, cpu = measured(labeling.label, options)
    assert result.labeled == len(uris), result.report()
    return {"wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--celeba-dir", default="../shared/celeba")
    parser.add_argument("--images", type=int, default=300, help="real faces to label")
    parser.add_argument("--naive-images", type=int, default=100, help="faces for the one-at-a-time loop")
    parser.add_argument("--model", help="model directory; default: an untrained --architecture")
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--input-size", type=int, nargs=2, default=[218, 178], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument(
        "--engines", nargs="+", default=["tensorflow"], choices=["tensorflow", "openvino"], help="label jobs to run"
    )
    parser.add_argument("--precision", default="bf16", choices=["bf16", "f32"], help="OpenVINO precision")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import ray

    image_dir = storage.join(str(Path(args.celeba_dir).absolute()), manifest.IMAGE_FOLDER)
    uris = storage.list_files(image_dir, images.IMAGE_SUFFIXES)[: args.images]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="genderrec-bench-") as tmp:
        work = Path(tmp)
        model_dir = model_to_benchmark(args, work)
        loaded = bundle.ModelBundle.load(model_dir)
        pixels, decode_wall, decode_cpu = measured(decode_all, loaded, [Path(uri).read_bytes() for uri in uris])
        ceiling_before = ceiling(loaded.model, pixels, args.batch_size)
        if "openvino" in args.engines and "openvino" not in loaded.card.exports:
            loaded.export(model_dir, "openvino", pixels[:16])

        ray.init(include_dashboard=False, log_to_driver=False)
        jobs = {}
        for engine in args.engines:
            # The first job also starts Ray's worker processes; the second shows the cost every job pays.
            label_job(model_dir, uris[: args.batch_size], work, "warm_up", args, engine)
            startup = label_job(model_dir, uris[: args.batch_size], work, "one_batch", args, engine)
            full = label_job(model_dir, uris, work, "all", args, engine)
            jobs[engine] = {
                "end_to_end": rates(len(uris), full["wall"], full["cpu"]),
                "steady_state": rates(
                    len(uris) - args.batch_size, full["wall"] - startup["wall"], full["cpu"] - startup["cpu"]
                ),
                "one_batch_job": startup,
            }
        ray.shutdown()

        ceiling_after = ceiling(loaded.model, pixels, args.batch_size)
        naive = naive_loop(loaded, uris[: args.naive_images])

    job = jobs[args.engines[0]]
    best = max(ceiling_before["images_per_second"], ceiling_after["images_per_second"])
    cheapest = min(ceiling_before["cpu_seconds_per_image"], ceiling_after["cpu_seconds_per_image"])
    results = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "model": loaded.card.version,
        "input_size": loaded.card.input_size,
        "images": len(uris),
        "batch_size": args.batch_size,
        "actors": args.actors,
        "decode_in_memory": rates(len(uris), decode_wall, decode_cpu),
        "ceiling_before": ceiling_before,
        "ceiling_after": ceiling_after,
        "job": job,
        "jobs_by_engine": jobs,
        "openvino_precision": args.precision,
        "naive": naive,
        "wall_ratio_end_to_end": job["end_to_end"]["images_per_second"] / best,
        "wall_ratio_steady_state": job["steady_state"]["images_per_second"] / best,
        "cpu_ratio_end_to_end": cheapest / job["end_to_end"]["cpu_seconds_per_image"],
        "cpu_ratio_steady_state": cheapest / job["steady_state"]["cpu_seconds_per_image"],
    }
    if {"tensorflow", "openvino"} <= set(jobs):
        results["openvino_vs_tensorflow_steady_state"] = (
            jobs["openvino"]["steady_state"]["images_per_second"]
            / jobs["tensorflow"]["steady_state"]["images_per_second"]
        )
    print(json.dumps(results, indent=2))
    rows = [
        ("ceiling: model.predict in memory (before job)", ceiling_before, ""),
        ("ceiling: model.predict in memory (after job)", ceiling_after, ""),
        ("label job, end to end", job["end_to_end"], "end_to_end"),
        ("label job, steady state", job["steady_state"], "steady_state"),
        ("naive one-at-a-time loop", naive, ""),
        *((f"label job ({engine}), steady state", jobs[engine]["steady_state"], "") for engine in args.engines[1:]),
    ]
    print(f"\n| {'what':<46} | images/s | CPU s/image | wall ratio | CPU ratio |\n|{'-' * 48}|---:|---:|---:|---:|")
    for name, rate, key in rows:
        ratios = f"{results['wall_ratio_' + key]:.2f} | {results['cpu_ratio_' + key]:.2f}" if key else "| "
        print(f"| {name:<46} | {rate['images_per_second']:.2f} | {rate['cpu_seconds_per_image']:.3f} | {ratios} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
