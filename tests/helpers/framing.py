"""Framing benchmark photos: one CelebA aligned face re-framed as an ordinary photo, reproducibly from a seed.

A model trained on CelebA's aligned crops may lean on their exact framing; these photos take it away. Each is the
aligned image (178x218: the face and its own background) scaled 0.5-2x, rotated up to ±20°, pasted at a random
place on a larger generated background (smooth noise, a gradient or stripes: textures with no face in them, unlike
other CelebA images) and saved as JPEG at quality 40-95. ``--faces auto`` must find the face again and re-align it.
The same (seed, key) always gives the same bytes; each photo also says where CelebA's template landmarks ended up,
so a test can check that the detector found this face and not something else.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from genderrec import faces

SCALES = (0.5, 2.0)
MAX_DEGREES = 20.0
QUALITIES = (40, 95)
CANVAS_MARGIN = (1.3, 2.0)  # the background's side over the rotated face's, at least and at most
BACKGROUNDS = ("noise", "gradient", "stripes")


@dataclass(frozen=True)
class FramedPhoto:
    """A re-framed face: its JPEG bytes, how it was made, and the template landmarks' places in it (x, y)."""

    data: bytes
    scale: float
    degrees: float
    quality: int
    background: str
    landmarks: np.ndarray  # (5, 2), faces.CELEBA_TEMPLATE carried through the scale, rotation and paste


def background(rng: np.random.Generator, kind: str, size: tuple[int, int]) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 texture of ``kind`` (one of :data:`BACKGROUNDS`)."""
    width, height = size
    if kind == "noise":  # coarse colour blobs plus fine grain
        coarse = Image.fromarray(rng.integers(0, 256, (int(rng.integers(3, 9)),) * 2 + (3,), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float64)
        pixels = smooth + rng.normal(0, 12, (height, width, 3))
    else:
        angle = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        along = (xs * np.cos(angle) + ys * np.sin(angle)) / max(width, height)
        if kind == "stripes":
            along = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 12) * along)
        else:
            along = (along - along.min()) / max(along.max() - along.min(), 1e-9)
        low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        pixels = low + (high - low) * along[..., None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def framed_photo(aligned: np.ndarray, seed: int, key: str) -> FramedPhoto:
    """``aligned`` (a CelebA aligned image, RGB) re-framed; ``key`` (e.g. the image id) varies it per face."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    scale = float(rng.uniform(*SCALES))
    degrees = float(rng.uniform(-MAX_DEGREES, MAX_DEGREES))
    quality = int(rng.integers(QUALITIES[0], QUALITIES[1] + 1))
    kind = str(rng.choice(BACKGROUNDS))
    height, width = aligned.shape[:2]
    size = (round(width * scale), round(height * scale))
    face = Image.fromarray(aligned).convert("RGBA").resize(size, Image.Resampling.LANCZOS)
    turned = face.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)  # counter-clockwise
    canvas = tuple(int(side * rng.uniform(*CANVAS_MARGIN)) for side in turned.size)
    left = int(rng.integers(0, canvas[0] - turned.width + 1))
    top = int(rng.integers(0, canvas[1] - turned.height + 1))
    photo = Image.fromarray(background(rng, kind, canvas))
    photo.paste(turned, (left, top), turned)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=quality)
    # Where the template's landmarks went: scaled, turned about the face's centre (y points down, so a
    # counter-clockwise turn on screen is (x, y) -> (x cos + y sin, -x sin + y cos)), then pasted.
    radians = np.deg2rad(degrees)
    turn = np.array([[np.cos(radians), np.sin(radians)], [-np.sin(radians), np.cos(radians)]])
    centred = faces.CELEBA_TEMPLATE * (size[0] / width, size[1] / height) - np.divide(size, 2)
    landmarks = centred @ turn.T + np.divide(turned.size, 2) + (left, top)
    return FramedPhoto(buffer.getvalue(), scale, degrees, quality, kind, landmarks)
