"""Faces in ordinary photos: detect them, align each onto CelebA's template, and crop it as the models expect.

The models were trained on CelebA's aligned crops (178x218, eyes and mouth at nearly fixed places), so a face in an
ordinary photo must be framed the same way before it is classified. :func:`face_crops` does it, for labeling, serving
and evaluation alike: a :class:`FaceDetector` finds each face's box and five landmarks, :func:`select_faces` keeps
those the :class:`FaceOptions` allow, :func:`align` maps the landmarks onto :data:`CELEBA_TEMPLATE` with a
similarity transform (rotation, uniform scale, shift) into a 178x218 CelebA-like image, and that image then goes
through the card's usual ``crop_box`` and resize (:func:`genderrec.images.resize`), so every model works unchanged.

The detector is behind a small protocol so that a faster one can replace :class:`MTCNNDetector` later; callers load
it once per actor or replica (:func:`load_detector`), never per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from genderrec import images

FacesMode = Literal["aligned", "detect", "auto"]
FACES_MODES: tuple[str, ...] = FacesMode.__args__
DETECTED, WHOLE_IMAGE = "detected", "whole_image"  # a crop's ``face_source``
NO_FACE = "no face found"

# The aligned-image frame of CelebA's img_align_celeba: (height, width).
ALIGNED_SIZE = (218, 178)
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # "left": the image's left
# Where CelebA's aligned images put the five landmarks, as (x, y) pixels of the 178x218 frame: the mean landmarks of
# this module's MTCNN over ../shared/celeba/img_align_celeba (8,473 images of CelebA's training partition; 8,119
# faces used, the most confident face near the centre of each image with confidence >= 0.95). Derived, and
# re-derivable, with scripts/derive_celeba_template.py; its output also gives each landmark's spread over CelebA
# (std in px, x / y: eyes 1.9 / 1.4 and 1.7 / 1.4, nose 6.2 / 4.0, mouth corners 3.1 / 2.2 and 3.2 / 2.0).
CELEBA_TEMPLATE = np.array(
    [
        [69.35, 111.34],  # left_eye
        [107.74, 111.29],  # right_eye
        [88.17, 135.16],  # nose
        [71.08, 152.45],  # mouth_left
        [105.74, 152.32],  # mouth_right
    ]
)
# The landmarks the alignment fits: eyes and mouth corners. The nose tip moves against them when the head turns
# (its spread above), and fitting it too pulls a turned face's crop away from CelebA's framing. Measured by the same
# script on CelebA's own (already aligned) images, the fitted transform moves the frame's corners 6.2 px on average
# (11.2 px at the 90th percentile) with these four points, 7.0 (12.7) with all five, 10.1 (17.8) with the eyes only.
ALIGNMENT_LANDMARKS = [0, 1, 3, 4]


class FaceOptions(BaseModel):
    """Which detections count as faces; shared by ``genderrec label``, serving and evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_face_size: int = Field(default=20, ge=1, description="shorter side of a face's box, in pixels, at least")
    min_face_confidence: float = Field(default=0.9, ge=0, le=1, description="detector confidence at least")
    max_faces: int = Field(default=10, ge=1, description="most faces per image (the largest are kept)")


@dataclass(frozen=True)
class Face:
    """One detected face, in pixels of the upright (EXIF-rotated) image."""

    box: tuple[float, float, float, float]  # left, top, right, bottom
    landmarks: np.ndarray  # (5, 2) x, y in LANDMARK_NAMES order
    confidence: float

    @property
    def size(self) -> float:
        """The shorter side of the box: what ``min_face_size`` is compared with."""
        left, top, right, bottom = self.box
        return min(right - left, bottom - top)

    @property
    def area(self) -> float:
        left, top, right, bottom = self.box
        return (right - left) * (bottom - top)


class FaceDetector(Protocol):
    """Anything that finds faces with five landmarks in an RGB image."""

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces in a ``(height, width, 3)`` uint8 RGB image, unfiltered (see :func:`select_faces`)."""
        ...


class MTCNNDetector:
    """MTCNN (PyPI ``mtcnn``: TensorFlow, weights shipped in the package, no download) on the CPU.

    ``min_face_size`` sets the smallest face searched for: a larger one makes large photos much faster. mtcnn 1.0.0
    builds its image pyramid right only for a ``min_face_size`` of at most its default, 20 px: above it, the last
    scales shrink the photo under its 12-px window and the whole photo comes back with no face. So a larger
    minimum is applied by shrinking the photo until such a face is 20 px, then scaling the detections back.
    """

    MIN_IMAGE_SIDE = 12  # MTCNN's smallest window; its pyramid is empty (and fails) below it
    PYRAMID_MIN_FACE = 20  # the largest min_face_size mtcnn 1.0.0 handles itself

    def __init__(self, min_face_size: int = PYRAMID_MIN_FACE):
        from mtcnn import MTCNN

        self.min_face_size = min_face_size
        self._mtcnn = MTCNN(stages="face_and_landmarks_detection", device="CPU:0")

    def detect(self, rgb: np.ndarray) -> list[Face]:
        shrink = min(1.0, self.PYRAMID_MIN_FACE / self.min_face_size)
        if shrink < 1:
            height, width = rgb.shape[:2]
            size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        if min(rgb.shape[:2]) < self.MIN_IMAGE_SIDE:
            return []
        rows = self._mtcnn.detect_faces(
            rgb, min_face_size=min(self.min_face_size, self.PYRAMID_MIN_FACE), box_format="xyxy", output_type="numpy"
        )  # rows: image index, x1, y1, x2, y2, confidence, the five landmarks' x, then their y
        rows = np.asarray(rows, dtype=np.float64)

        def unshrink(coordinates: np.ndarray) -> np.ndarray:  # pixel centres: (x + 0.5) / shrink - 0.5
            return (coordinates + 0.5) / shrink - 0.5 if shrink < 1 else coordinates

        return [
            Face(
                box=tuple(float(v) for v in unshrink(row[1:5])),
                landmarks=unshrink(row[6:16].reshape(2, 5).T.copy()),
                confidence=float(row[5]),
            )
            for row in rows
        ]


def load_detector(options: FaceOptions) -> FaceDetector:
    """The detector, loaded once per actor or replica: the one place to swap in a faster one."""
    return MTCNNDetector(min_face_size=options.min_face_size)


def select_faces(faces: list[Face], options: FaceOptions) -> list[Face]:
    """The faces ``options`` allow, largest first (face 0 is the photo's main subject when it has one)."""
    kept = [
        face for face in faces if face.confidence >= options.min_face_confidence and face.size >= options.min_face_size
    ]
    return sorted(kept, key=lambda face: face.area, reverse=True)[: options.max_faces]


# --------------------------------------------------------------------------- alignment


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the rotation + uniform scale + shift that best maps ``source`` points onto ``target``.

    Least squares (Umeyama, 1991), never a reflection: a face is not mirrored to fit the template.
    """
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centered, target_centered = source - source_mean, target - target_mean
    covariance = target_centered.T @ source_centered / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / source_centered.var(axis=0).sum()
    shift = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, shift[:, None]])


def align(rgb: np.ndarray, landmarks: np.ndarray, template: np.ndarray = CELEBA_TEMPLATE) -> np.ndarray:
    """A CelebA-like ``ALIGNED_SIZE`` uint8 crop of the face whose five landmarks are given (fitted on
    :data:`ALIGNMENT_LANDMARKS`).

    Only the part of the photo that the crop covers is resampled; where the crop reaches past the photo's edge, the
    photo is mirrored (a black band would be a feature CelebA's images do not have).
    """
    height, width = ALIGNED_SIZE
    landmarks = np.asarray(landmarks, np.float64)[ALIGNMENT_LANDMARKS]
    template = np.asarray(template, np.float64)[ALIGNMENT_LANDMARKS]
    to_crop = similarity_transform(landmarks, template)
    to_photo = np.linalg.inv(np.vstack([to_crop, [0.0, 0.0, 1.0]]))[:2]
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], np.float64) @ to_photo.T
    left, top = np.floor(corners.min(axis=0)).astype(int) - 1
    right, bottom = np.ceil(corners.max(axis=0)).astype(int) + 1
    photo_height, photo_width = rgb.shape[:2]
    region = rgb[max(top, 0) : max(min(bottom, photo_height), 0), max(left, 0) : max(min(right, photo_width), 0)]
    if region.size == 0:  # landmarks far outside the photo: nothing of it is in the crop
        return np.zeros((height, width, 3), np.uint8)
    padding = ((max(-top, 0), max(bottom - photo_height, 0)), (max(-left, 0), max(right - photo_width, 0)), (0, 0))
    image = Image.fromarray(np.pad(region, padding, mode="symmetric"))
    landmarks = landmarks - (left, top)
    shrink = int(1 / np.linalg.norm(to_crop[:, 0]))  # the transform's scale is the norm of a column
    if shrink >= 2:  # a big face: box-filter it down first, as the affine resampling alone would alias
        image, landmarks = image.reduce(shrink), landmarks / shrink
    to_region = np.linalg.inv(np.vstack([similarity_transform(landmarks, template), [0.0, 0.0, 1.0]]))[:2]
    aligned = image.transform(  # PIL maps each output pixel back to the input: the inverse transform
        (width, height), Image.Transform.AFFINE, data=tuple(to_region.ravel()), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(aligned)


# --------------------------------------------------------------------------- faces → model inputs


@dataclass(frozen=True)
class FaceCrop:
    """One model input cut from a photo: a detected face (``face`` set) or the whole image (auto's fallback)."""

    face_index: int
    face: Face | None
    pixels: np.ndarray  # float32 (height, width, 3), the model's input

    @property
    def source(self) -> str:
        return WHOLE_IMAGE if self.face is None else DETECTED


def face_crops(
    rgb: np.ndarray,
    detector: FaceDetector,
    options: FaceOptions,
    mode: FacesMode,
    size: tuple[int, int],
    crop_box: tuple[int, int, int, int] | None = None,
) -> list[FaceCrop]:
    """The model inputs of a photo: each face ``options`` allow, aligned; none in ``detect`` mode when there is no
    face (the caller reports :data:`NO_FACE`), the whole image (as in ``aligned`` mode) in ``auto`` mode."""
    if mode not in ("detect", "auto"):
        raise ValueError(f"face_crops needs faces mode 'detect' or 'auto', got {mode!r}")
    found = select_faces(detector.detect(rgb), options)
    crops = [
        FaceCrop(index, face, model_input(rgb, face.landmarks, size, crop_box)) for index, face in enumerate(found)
    ]
    if not crops and mode == "auto":
        crops = [FaceCrop(0, None, model_input(rgb, None, size, crop_box))]
    return crops


def model_input(rgb: np.ndarray, landmarks: np.ndarray | None, size: tuple[int, int], crop_box=None) -> np.ndarray:
    """The model's input from a photo: the face with these landmarks aligned, or (``None``) the whole image; the
    one framing of serving, labeling and ``data.faces: align`` training (:mod:`genderrec.train_faces`)."""
    return images.resize(rgb if landmarks is None else align(rgb, landmarks), size, crop_box)
