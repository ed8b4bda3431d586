"""Serving load benchmark: the Ray Serve app under concurrent HTTP load, with dynamic batching on and off.

    nice -n 19 python benchmarks/serve_load.py --model runs/local/selected --out docs/serving_benchmark.md

On a local Ray and the loopback interface only, for batching off (``max_batch_size=1``) and on, it deploys the app
with one replica and measures requests/s and p50/p99 latency (client side, one real face per request) at
concurrency 1, 8 and 32, each bounded by ``--requests`` and ``--seconds``. Beside them it times the raw model
(``model.predict`` and ``predict_on_batch``, which the replica calls) on the same batch sizes, so the table shows
what serving adds. Not a test: timings depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

from genderrec import bundle, serving

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers, shared with the tests
from tests.helpers.net import free_port  # noqa: E402

CONCURRENCIES = (1, 8, 32)
HOST = "127.0.0.1"  # loopback only


def time_model(
    served: bundle.ModelBundle, blobs: list[bytes], batch_sizes, repeats: int
) -> dict[int, dict[str, float]]:
    """Median milliseconds of ``model.predict`` and ``predict_on_batch`` per batch size, after warm-up calls."""
    model = served.model
    faces = [served.load_pixels(blob) for blob in blobs]
    timings = {}
    for batch_size in batch_sizes:
        batch = np.stack([faces[index % len(faces)] for index in range(batch_size)])
        calls = {
            "predict": lambda batch=batch, batch_size=batch_size: model.predict(
                batch, batch_size=batch_size, verbose=0
            ),
            "predict_on_batch": lambda batch=batch: model.predict_on_batch(batch),
        }
        timings[batch_size] = {}
        for name, call in calls.items():
            for _ in range(2):  # warm-up: traces the predict function
                call()
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - started)
            timings[batch_size][name] = 1000 * statistics.median(seconds)
    return timings


async def load(url: str, blobs: list[bytes], concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """``concurrency`` clients post faces back to back until ``max_requests`` are done or ``max_seconds`` pass."""
    latencies, batch_sizes = [], []
    numbers = itertools.count()
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=max_seconds + 120, limits=limits) as client:

        async def client_loop():
            while (number := next(numbers)) < max_requests and time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.post(
                    "/v1/predict", content=blobs[number % len(blobs)], headers={"content-type": "image/jpeg"}
                )
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
                batch_sizes.append(response.json()["predictions"][0]["batch_size"])

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies_ms = 1000 * np.asarray(latencies)
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(latencies_ms, 50)),
        "p99_ms": float(np.percentile(latencies_ms, 99)),
        "mean_batch": float(np.mean(batch_sizes)),
        "max_batch": int(max(batch_sizes)),
    }


def run_setting(model_dir: str, port: int, max_batch_size: int, wait_s: float, blobs, args, engine: str) -> list[dict]:
    """Deploy the app with one replica, this batching and engine, warm it up, then load it at each concurrency."""
    overrides = {
        "model": model_dir,
        "engine": engine,
        "precision": args.precision,
        "max_batch_size": max_batch_size,
        "batch_wait_timeout_s": wait_s,
        "num_replicas": 1,
        "num_gpus": 0,
        "max_ongoing_requests": 64,
    }
    url = serving.start(serving.settings(host=HOST, port=port, **overrides)).rstrip("/")  # returns once it is up
    rows = []
    for concurrency in CONCURRENCIES:
        asyncio.run(load(url, blobs, concurrency, 2 * concurrency, args.seconds))  # warm-up, not measured
        result = asyncio.run(load(url, blobs, concurrency, args.requests, args.seconds))
        rows.append({"engine": engine, "max_batch_size": max_batch_size, "concurrency": concurrency, **result})
        print(rows[-1], flush=True)
    return rows


def report(args, card: bundle.ModelCard, raw: dict, rows: list[dict], load_before, load_after) -> str:
    def model_ms(batch: float) -> float:
        """predict_on_batch time at this (mean) batch size, interpolated between the measured ones."""
        sizes = sorted(raw)
        return float(np.interp(batch, sizes, [raw[size]["predict_on_batch"] for size in sizes]))

    lines = [
        "# Serving load benchmark",
        "",
        f"`nice -n 19 python benchmarks/serve_load.py --model {args.model} --requests {args.requests} "
        f"--seconds {args.seconds} --max-batch-size {args.max_batch_size}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU, Python {platform.python_version()}. "
        f"**Shared**: other jobs ran at the same time (load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after, on {os.cpu_count()} cores), so absolute numbers are pessimistic and noisy.",
        f"- Model: `{card.name}` ({card.architecture}, {card.mode}), input {card.input_size[0]}x"
        f"{card.input_size[1]}; one replica, local Ray, loopback HTTP (127.0.0.1), one real CelebA face per request "
        f"(raw JPEG body); batching on = `max_batch_size={args.max_batch_size}`, `batch_wait_timeout_s={args.wait}`.",
        f"- Each cell: at most {args.requests} requests or {args.seconds} s after a warm-up; latency is client-side.",
        "",
        "## Raw model time (same process, no HTTP)",
        "",
        "| batch size | `model.predict` ms | `predict_on_batch` ms | `predict_on_batch` ms per image |",
        "|---:|---:|---:|---:|",
    ]
    for size, timing in raw.items():
        lines.append(
            f"| {size} | {timing['predict']:.1f} | {timing['predict_on_batch']:.1f} | "
            f"{timing['predict_on_batch'] / size:.2f} |"
        )
    lines += [
        "",
        "## Through Ray Serve",
        "",
        "| engine | batching | concurrency | requests | requests/s | p50 ms | p99 ms | mean / max batch "
        "| TF model ms at the mean batch | p50 − TF model ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        batching = "off (1)" if row["max_batch_size"] == 1 else f"on ({row['max_batch_size']})"
        model = model_ms(row["mean_batch"])
        lines.append(
            f"| {row['engine']} | {batching} | {row['concurrency']} | {row['requests']} | {row['rps']:.1f} | {row['p50_ms']:.1f} | "
            f"{row['p99_ms']:.1f} | {row['mean_batch']:.1f} / {row['max_batch']} | {model:.1f} | "
            f"{row['p50_ms'] - model:.1f} |"
        )
    first = rows[0]["engine"]
    by_key = {(row["max_batch_size"] > 1, row["concurrency"]): row for row in rows if row["engine"] == first}
    speedup = by_key[(True, 32)]["rps"] / by_key[(False, 32)]["rps"]
    overhead = by_key[(False, 1)]["p50_ms"] - raw[1]["predict_on_batch"]
    lines += [
        "",
        "## Against the targets",
        "",
        f"- Concurrency 32, batching on vs off: {speedup:.2f}x the requests/s (target >= 2x).",
        f"- Serving overhead at concurrency 1 (p50 minus `predict_on_batch` of one image): {overhead:.1f} ms "
        "(target < 20 ms).",
    ]
    batched_32 = {row["engine"]: row["rps"] for row in rows if row["concurrency"] == 32 and row["max_batch_size"] > 1}
    if {"tensorflow", "openvino"} <= set(batched_32):
        lines.append(
            f"- Concurrency 32, batching on, OpenVINO ({args.precision}) vs TensorFlow float32: "
            f"{batched_32['openvino'] / batched_32['tensorflow']:.2f}x the requests/s (target >= 1.5x)."
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (model.keras + card.json)")
    parser.add_argument("--celeba-dir", default=os.environ.get("GENDERREC_CELEBA_DIR", "../shared/celeba"))
    parser.add_argument("--requests", type=int, default=200, help="most requests per cell (default 200)")
    parser.add_argument("--seconds", type=float, default=60, help="most seconds per cell (default 60)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="max_batch_size with batching on")
    parser.add_argument("--wait", type=float, default=0.01, help="batch_wait_timeout_s with batching on")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats of the raw model per batch size")
    parser.add_argument(
        "--engines", nargs="+", default=["tensorflow"], choices=["tensorflow", "openvino"], help="replica engines"
    )
    parser.add_argument("--precision", default="bf16", choices=["bf16", "f32"], help="OpenVINO precision")
    parser.add_argument("--out", help="write the markdown report here (e.g. docs/serving_load.md)")
    args = parser.parse_args()

    model_dir = str(Path(args.model).absolute())
    faces = sorted((Path(args.celeba_dir) / "img_align_celeba").glob("*.jpg"))[:16]
    blobs = [path.read_bytes() for path in faces]
    load_before = os.getloadavg()
    served = bundle.ModelBundle.load(model_dir)
    powers_of_two = {2**power for power in range(args.max_batch_size.bit_length())}
    raw = time_model(served, blobs, sorted(powers_of_two | {args.max_batch_size, 32}), args.repeats)
    print(raw, flush=True)

    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    rows = []
    try:
        if "openvino" in args.engines and "openvino" not in served.card.exports:
            served.export(model_dir, "openvino", np.stack([served.load_pixels(blob) for blob in blobs]))
        for engine in args.engines:  # batching off and on for the first engine, on for the others
            for max_batch_size in (1, args.max_batch_size) if engine == args.engines[0] else (args.max_batch_size,):
                rows += run_setting(model_dir, port, max_batch_size, args.wait, blobs, args, engine)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    text = report(args, served.card, raw, rows, load_before, os.getloadavg())
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
