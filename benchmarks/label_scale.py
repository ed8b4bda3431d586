"""Labeling at scale: driver memory and images/s from 10k to 1M rows, and a SIGKILL half-way through a job.

    nice -n 5 python benchmarks/label_scale.py scale --sizes 10000 100000 1000000
    nice -n 5 python benchmarks/label_scale.py crash --rows 30000

Each job is a real ``genderrec label`` process (its own local Ray) over a Parquet manifest that repeats a few tiny
distinct JPEGs (``--distinct`` of them, ``--image-size`` pixels, written to a temporary folder) with a ``row_id``
column carried through, labeled by a tiny Keras model (global average pooling + one dense unit at ``--input-size``)
so that the per-row cost is the pipeline's own: reading, decoding, moving rows through Ray Data and writing.

``scale`` reports, for each size, the driver's peak RSS (``VmHWM`` of the ``genderrec label`` process, which holds no
row: Ray's own processes are not the driver), the wall time of the process and the images/s the job reports (its
pipeline, from the first read to the last file), and checks that the output holds every row once.

``crash`` runs the job once to learn its wall time T, runs it again and SIGKILLs the whole process group (driver and
its local Ray) at T/2, counts the rows in the files left (every one must be readable: files are whole or absent),
then resumes and checks that every input row is in the output exactly once and that the files kept from the killed
run are untouched (same names, sizes and modification times). Linux only; not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from genderrec import bundle, shards


def tiny_model(model_dir: Path, input_size: tuple[int, int]) -> None:
    """A model whose cost per image is negligible: the benchmark measures the pipeline, not the network."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((*input_size, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    card = bundle.ModelCard(
        name="tiny_scale",
        architecture="global average pooling + dense",
        mode="fine_tune",
        input_size=input_size,
        preprocessing="Rescaling(1/255) inside the model",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    bundle.ModelBundle(model, card).save(str(model_dir))


def manifest(work: Path, rows: int, distinct: int, image_size: int, rows_per_file: int) -> Path:
    """``rows`` rows over ``distinct`` tiny JPEGs, with a unique ``row_id``; row groups of ``rows_per_file``."""
    rng = np.random.default_rng(0)
    uris = []
    for index in range(distinct):
        path = work / "images" / f"{index:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue())
        uris.append(str(path))
    source = work / f"manifest-{rows}.parquet"
    table = pa.table({"image_uri": [uris[index % distinct] for index in range(rows)], "row_id": np.arange(rows)})
    pq.write_table(table, source, row_group_size=rows_per_file)
    return source


def command(args, model_dir: Path, source: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "genderrec",
        "label",
        *("--model", str(model_dir), "--input", str(source), "--output", str(output)),
        *("--batch-size", str(args.batch_size), "--rows-per-file", str(args.rows_per_file)),
        *extra,
    ]


def peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", status)  # absent once the process is a zombie
    return int(found.group(1)) / 1024 if found else None


def run_job(argv: list[str], kill_after: float | None = None) -> dict:
    """Run ``genderrec label``; ``kill_after``: SIGKILL its process group after that many seconds."""
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, peak_rss_mb(process.pid) or 0.0)
            if kill_after is not None and time.perf_counter() - started >= kill_after:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.1)
        wall = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if kill_after is None and process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{output}")
    rate = re.search(r"\(([\d.]+) s, ([\d.]+) images/s\)", output)
    with contextlib.suppress(ProcessLookupError):  # whatever the job left of its process group (a killed local Ray)
        os.killpg(process.pid, signal.SIGKILL)
    return {
        "wall_s": wall,
        "driver_peak_rss_mb": peak,
        "job_s": float(rate.group(1)) if rate else None,
        "job_images_per_second": float(rate.group(2)) if rate else None,
        "returncode": process.returncode,
    }


def output_rows(output: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Rows in the output files (each one opened: a cut-short file would fail here) and each file's size, mtime."""
    parts = shards.written(str(output))
    rows = sum(pq.read_metadata(part).num_rows for part in parts.values())
    stats = {name: (os.stat(part).st_size, os.stat(part).st_mtime_ns) for name, part in parts.items()}
    return rows, stats


def check_once(output: Path, rows: int) -> None:
    """Every input row exactly once (by its carried ``row_id``), read as any Parquet reader would."""
    row_ids = np.sort(pq.read_table(output, columns=["row_id"])["row_id"].to_numpy())
    if not np.array_equal(row_ids, np.arange(rows)):
        raise AssertionError(f"{output}: {len(row_ids)} rows, {len(np.unique(row_ids))} distinct, for {rows} inputs")


def scale(args, work: Path, model_dir: Path) -> dict:
    results = []
    for rows in args.sizes:
        source = manifest(work, rows, args.distinct, args.image_size, args.rows_per_file)
        output = work / f"out-{rows}"
        job = run_job(command(args, model_dir, source, output))
        check_once(output, rows)
        job.update(rows=rows, end_to_end_images_per_second=rows / job["wall_s"])
        print(json.dumps(job), flush=True)
        results.append(job)
        source.unlink()
    first, last = results[0], results[-1]
    return {
        "jobs": results,
        "driver_peak_rss_growth_mb": last["driver_peak_rss_mb"] - first["driver_peak_rss_mb"],
        "job_images_per_second_ratio_last_to_first": last["job_images_per_second"] / first["job_images_per_second"],
    }


def crash(args, work: Path, model_dir: Path) -> dict:
    source = manifest(work, args.rows, args.distinct, args.image_size, args.rows_per_file)
    if args.expected_s:  # T from an earlier uninterrupted run of the same job on this machine
        full = {"wall_s": args.expected_s, "from": "--expected-s"}
    else:
        full = run_job(command(args, model_dir, source, work / "full"))
        check_once(work / "full", args.rows)
    output = work / "crashed"
    killed = run_job(command(args, model_dir, source, output), kill_after=full["wall_s"] / 2)
    kept_rows, kept = output_rows(output)
    print(json.dumps({"killed": killed, "files_kept": len(kept), "rows_kept": kept_rows}), flush=True)
    resumed = run_job(command(args, model_dir, source, output, "--resume"))
    check_once(output, args.rows)
    _, after = output_rows(output)
    untouched = all(after.get(name) == stat for name, stat in kept.items())
    return {
        "rows": args.rows,
        "uninterrupted": full,
        "killed_at_s": full["wall_s"] / 2,
        "killed": killed,
        "files_kept": len(kept),
        "rows_kept": kept_rows,
        "share_kept": kept_rows / args.rows,
        "resumed": resumed,
        "kept_files_untouched": untouched,
        "every_input_once_after_resume": True,  # check_once raised otherwise
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("scale", "crash"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rows", type=int, default=30_000, help="crash: rows of the job")
    parser.add_argument("--expected-s", type=float, help="crash: the job's uninterrupted wall time, if measured")
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--distinct", type=int, default=8, help="distinct JPEGs repeated in the manifest")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, nargs=2, default=[8, 8], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="genderrec-scale-") as tmp:
        work = Path(tmp)
        tiny_model(work / "model", tuple(args.input_size))
        results = (scale if args.mode == "scale" else crash)(args, work, work / "model")
    results.update(
        machine=f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        settings={key: value for key, value in vars(args).items() if key != "json"},
    )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
