"""Faces throughput: detect + align + classify vs classify-only, on the same photos, with the time split.

    nice -n 19 python benchmarks/faces_throughput.py --celeba-dir ../shared/celeba --photos 40

The photos are composites made in memory (never written outside a temporary folder) from real CelebA faces: 1-3
faces at random places and scales on a ``--canvas`` sized background, as the tests make them. In one process, one
stage at a time, it times

1. decoding the JPEGs (shared by both ways);
2. ``--faces detect``'s stages: the detector (MTCNN) on each photo, then aligning and resizing each face found, then
   the model on all faces in batches of ``--batch-size``;
3. classify-only (``--faces aligned``, the whole photo as one input): resizing each photo, then the model;

and reports faces/s (photos/s for classify-only) and wall/CPU seconds per stage. Then it runs the real
``genderrec label`` job (Ray Data: detection actor pool, then the model actors) over the same photos with
``--faces detect`` and with ``--faces aligned``, after a warm-up job, for the end-to-end rate. Without ``--model``
it exports an untrained ``--architecture`` at ``--input-size`` (throughput does not depend on the weights). CPU
seconds are this process and its descendants (the local Ray), from ``/proc``; Linux only. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from label_throughput import measured, model_to_benchmark

from genderrec import bundle, faces, images, labeling

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers, shared with the tests
from tests.helpers.photos import compose  # noqa: E402 (the tests' composite photos)


def random_photos(celeba_dir: Path, count: int, canvas: tuple[int, int], seed: int) -> list[bytes]:
    """``count`` composites of 1-3 CelebA faces, each in its own column of the canvas at a random scale and place."""
    rng = np.random.default_rng(seed)
    sources = sorted((celeba_dir / "img_align_celeba").glob("*.jpg"))
    width, height = canvas
    photos = []
    for _ in range(count):
        count_faces = int(rng.integers(1, 4))
        column = width // count_faces
        placements = []
        for index in range(count_faces):
            scale = rng.uniform(0.5, min(1.6, column / 178, height / 218))
            left = index * column + int(rng.integers(0, max(1, column - round(178 * scale))))
            top = int(rng.integers(0, max(1, height - round(218 * scale))))
            placements.append((left, top, scale))
        chosen = [sources[index] for index in rng.choice(len(sources), count_faces, replace=False)]
        photos.append(compose(chosen, placements, canvas=canvas).data)
    return photos


def stage(wall_cpu: list[float]) -> dict:
    return {"wall_s": wall_cpu[0], "cpu_s": wall_cpu[1]}


def in_process(photos: list[bytes], loaded: bundle.ModelBundle, batch_size: int, options: faces.FaceOptions) -> dict:
    """Each stage of both ways, one at a time, on already loaded detector and model."""
    model, size, crop_box = loaded.model, loaded.card.input_size, loaded.card.crop_box
    detector = faces.load_detector(options)
    detector.detect(images.decode_image(photos[0]))  # warm-up: trace the detector's networks
    for warm_up in (1, 2):  # traced for two batch sizes, Keras generalises to any: no stage pays for tracing
        model.predict_on_batch(np.zeros((warm_up, *size, 3), np.float32))

    def classify(pixels: np.ndarray) -> list:
        return [
            model.predict_on_batch(pixels[start : start + batch_size]) for start in range(0, len(pixels), batch_size)
        ]

    rgbs, *decode = measured(lambda: [images.decode_image(photo) for photo in photos])
    found, *detect = measured(lambda: [faces.select_faces(detector.detect(rgb), options) for rgb in rgbs])
    pixels, *align = measured(
        lambda: np.stack(
            [
                images.resize(faces.align(rgb, face.landmarks), size, crop_box)
                for rgb, in_photo in zip(rgbs, found, strict=True)
                for face in in_photo
            ]
        )
    )
    _, *classify_faces = measured(classify, pixels)
    whole, *resize = measured(lambda: np.stack([images.resize(rgb, size, crop_box) for rgb in rgbs]))
    _, *classify_photos = measured(classify, whole)

    detect_total = sum(part[0] for part in (decode, detect, align, classify_faces))
    only_total = sum(part[0] for part in (decode, resize, classify_photos))
    return {
        "faces": len(pixels),
        "stages": {
            "decode": stage(decode),
            "detect": stage(detect),
            "align_and_resize": stage(align),
            "classify_faces": stage(classify_faces),
            "resize_whole_photo": stage(resize),
            "classify_whole_photos": stage(classify_photos),
        },
        "detect_align_classify": {
            "faces_per_second": len(pixels) / detect_total,
            "seconds": detect_total,
            "share_detector": detect[0] / detect_total,
            "share_model": classify_faces[0] / detect_total,
        },
        "classify_only": {"predictions_per_second": len(photos) / only_total, "seconds": only_total},
    }


def label_job(model_dir: str, uris: list[str], work: Path, name: str, mode: str, args) -> dict:
    """The ``genderrec label`` job over ``uris``, with ``--faces mode``."""
    source = work / f"{name}.parquet"
    pq.write_table(pa.table({"image_uri": uris}), source)
    options = labeling.LabelingOptions(
        model_dir, str(source), str(work / name), args.batch_size, faces=mode, min_face_size=args.min_face_size
    )
    result, wall, cpu = measured(labeling.label, options)
    assert result.errors == 0, result.report()
    return {"predictions": result.labeled, "wall_s": wall, "cpu_s": cpu, "per_second": result.labeled / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--celeba-dir", default="../shared/celeba")
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--canvas", type=int, nargs=2, default=[1280, 853], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--model", help="model directory; default: an untrained --architecture")
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--input-size", type=int, nargs=2, default=[218, 178], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-face-size", type=int, default=20, help="the detector's smallest face (px)")
    parser.add_argument("--no-job", action="store_true", help="skip the Ray Data jobs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    photos = random_photos(Path(args.celeba_dir), args.photos, tuple(args.canvas), args.seed)
    with tempfile.TemporaryDirectory(prefix="genderrec-faces-bench-") as tmp:
        work = Path(tmp)
        model_dir = model_to_benchmark(args, work)
        loaded = bundle.ModelBundle.load(model_dir)
        results = {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
            "model": loaded.card.version,
            "input_size": loaded.card.input_size,
            "photos": len(photos),
            "canvas": args.canvas,
            "batch_size": args.batch_size,
            "min_face_size": args.min_face_size,
            "in_process": in_process(
                photos, loaded, args.batch_size, faces.FaceOptions(min_face_size=args.min_face_size)
            ),
        }
        if not args.no_job:
            import ray

            uris = []
            for index, photo in enumerate(photos):
                path = work / "photos" / f"{index:04d}.jpg"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(photo)
                uris.append(str(path))
            ray.init(include_dashboard=False, log_to_driver=False)
            label_job(model_dir, uris[:4], work, "warm_up", "detect", args)  # starts Ray's workers
            results["job"] = {
                mode: label_job(model_dir, uris, work, mode, mode, args) for mode in ("detect", "aligned")
            }
            ray.shutdown()
    results["load_average_before"], results["load_average_after"] = load_before, os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
