"""Derive ``genderrec.faces.CELEBA_TEMPLATE``: where CelebA's aligned images put the five face landmarks.

    nice -n 19 .venv/bin/python scripts/derive_celeba_template.py --celeba-dir ../shared/celeba

Runs the project's MTCNN detector (:func:`genderrec.faces.load_detector`, default options) on every image of
``img_align_celeba`` (or the first ``--images``), keeps the most confident face of each image when it is confident
enough (``--min-confidence``) and lies near the image's centre (CelebA's subject; a second face at the border is a
bystander), and prints the mean landmarks as the Python constant to paste into ``genderrec/faces.py``, with the
spread of each landmark and how many faces were used. CelebA's official landmark file is not used: the template
must be in the detector's own notion of "eye" and "mouth corner", as the detections aligned onto it are.

It then checks which landmarks the alignment should fit (``genderrec.faces.ALIGNMENT_LANDMARKS``): aligning an
image that CelebA already aligned should move it as little as possible, so for each choice it prints how far the
fitted transform moves the corners of the 178x218 frame, on average and at the 90th percentile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from genderrec import faces, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--celeba-dir", required=True, help="folder holding img_align_celeba/")
    parser.add_argument("--images", type=int, help="use only the first N images (default: all)")
    parser.add_argument("--min-confidence", type=float, default=0.95)
    args = parser.parse_args(argv)

    paths = sorted((Path(args.celeba_dir) / "img_align_celeba").glob("*.jpg"))[: args.images]
    if not paths:
        parser.error(f"no img_align_celeba/*.jpg under {args.celeba_dir}")
    detector = faces.load_detector(faces.FaceOptions())
    height, width = faces.ALIGNED_SIZE
    centre = np.array([width / 2, height / 2])
    found, skipped = [], 0
    for number, path in enumerate(paths, 1):
        rgb = images.decode_image(path.read_bytes())
        if rgb.shape[:2] != faces.ALIGNED_SIZE:
            raise SystemExit(f"{path}: {rgb.shape[1]}x{rgb.shape[0]}, not an aligned CelebA image (178x218)")
        candidates = [face for face in detector.detect(rgb) if face.confidence >= args.min_confidence]
        central = [face for face in candidates if np.linalg.norm(face.landmarks.mean(axis=0) - centre) < width / 4]
        if central:
            found.append(max(central, key=lambda face: face.confidence).landmarks)
        else:
            skipped += 1
        if number % 500 == 0:
            print(f"{number}/{len(paths)} images, {len(found)} faces", file=sys.stderr, flush=True)

    landmarks = np.stack(found)
    mean, spread = landmarks.mean(axis=0), landmarks.std(axis=0)
    print(f"# {len(found)} faces from {len(paths)} images of {args.celeba_dir}/img_align_celeba ({skipped} skipped:")
    print(f"# no face with confidence >= {args.min_confidence} near the centre); mean landmarks, (x, y) pixels:")
    print("CELEBA_TEMPLATE = np.array(\n    [")
    for name, (x, y), (sx, sy) in zip(faces.LANDMARK_NAMES, mean, spread, strict=True):
        print(f"        [{x:.2f}, {y:.2f}],  # {name} (std {sx:.2f}, {sy:.2f})")
    print("    ]\n)")
    print("# how far aligning each image moves the frame's corners (px, mean / 90th percentile), by landmarks fitted:")
    corners = np.array([[0, 0], [width, 0], [0, height], [width, height]], np.float64)
    for subset in ([0, 1], [0, 1, 3, 4], [0, 1, 2, 3, 4]):
        moved = []
        for points in landmarks:
            matrix = faces.similarity_transform(points[subset], mean[subset])
            moved.append(np.abs(corners @ matrix[:, :2].T + matrix[:, 2] - corners).max())
        names = ", ".join(faces.LANDMARK_NAMES[index] for index in subset)
        print(f"#   {names}: {np.mean(moved):.1f} / {np.percentile(moved, 90):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
