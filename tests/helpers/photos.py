"""Photos for tests and benchmarks: composites of real CelebA faces at known places, a photo with no face, a
PNG that claims to be huge.

A composite pastes 1-3 aligned CelebA images (178x218, the face plus its background) at known positions and scales
onto a larger canvas. The known box of each face is the detector's box on the original image, moved and scaled as
the paste did (the pasted rectangle itself is mostly background, not face).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from genderrec import faces

CANVAS = (720, 480)  # width, height


@functools.cache
def detector() -> faces.FaceDetector:
    """One detector for every test of the session (as one per actor in a job)."""
    return faces.load_detector(faces.FaceOptions())


@dataclass(frozen=True)
class Composite:
    """A photo made of CelebA faces: its JPEG bytes, each face's known box (upright pixels) and source image."""

    data: bytes
    boxes: list[tuple[float, float, float, float]]
    sources: list[Path]


def main_face(rgb: np.ndarray) -> faces.Face:
    return faces.select_faces(detector().detect(rgb), faces.FaceOptions())[0]


def compose(
    sources: list[Path], placements: list[tuple[int, int, float]], *, exif_rotated: bool = False, canvas=CANVAS
) -> Composite:
    """Paste each source at ``(left, top, scale)`` on a smooth gradient; with ``exif_rotated`` the JPEG is stored
    turned 90° counter-clockwise with EXIF orientation 6, so only a decoder that applies EXIF sees it upright."""
    width, height = canvas
    ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.6, 1, height)[:, None, None]
    photo = Image.fromarray((60 + 150 * ramp * np.array([0.9, 0.8, 0.6])).astype(np.uint8))
    boxes = []
    for source, (left, top, scale) in zip(sources, placements, strict=True):
        face = Image.open(source).convert("RGB")
        box = main_face(np.asarray(face)).box
        face = face.resize((round(face.width * scale), round(face.height * scale)), Image.Resampling.LANCZOS)
        photo.paste(face, (left, top))
        boxes.append(tuple(float(v) for v in np.add(np.multiply(box, scale), [left, top, left, top])))
    buffer = io.BytesIO()
    if exif_rotated:
        exif = Image.Exif()
        exif[0x0112] = 6  # display needs a 90° clockwise turn
        photo.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    else:
        photo.save(buffer, "JPEG", quality=95)
    return Composite(buffer.getvalue(), boxes, list(sources))


def iou(a, b) -> float:
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[2], b[2]), min(a[3], b[3])
    inter = max(right - left, 0) * max(bottom - top, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def match(found_boxes, known_boxes) -> list[int]:
    """For each known box, the index of the found box overlapping it most."""
    return [int(np.argmax([iou(found, known) for found in found_boxes])) for known in known_boxes]


# Composites used here and by the labeling and serving tests: (CelebA file names, placements, EXIF-rotated).
LAYOUTS = {
    "one-face": (["000002.jpg"], [(270, 120, 1.0)], False),
    "two-faces": (["000005.jpg", "000013.jpg"], [(40, 60, 1.5), (480, 200, 0.8)], False),
    "three-faces-exif": (
        ["000015.jpg", "000037.jpg", "000054.jpg"],
        [(20, 40, 1.0), (250, 200, 0.7), (480, 30, 1.2)],
        True,
    ),
}


def layout(celeba_dir: Path, name: str) -> Composite:
    files, placements, exif_rotated = LAYOUTS[name]
    return compose([celeba_dir / "img_align_celeba" / file for file in files], placements, exif_rotated=exif_rotated)


def no_face_photo() -> bytes:
    """A landscape-like photo with no face: sky, ground and a few shapes."""
    photo = Image.new("RGB", CANVAS, (120, 170, 230))
    photo.paste((90, 140, 60), (0, 300, CANVAS[0], CANVAS[1]))
    photo.paste((200, 60, 40), (100, 200, 220, 320))
    photo.paste((240, 230, 120), (550, 40, 620, 110))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def png_with_declared_size(width, height):
    """A tiny PNG whose header claims width x height (a decompression bomb's signature)."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )
