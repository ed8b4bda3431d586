"""Framing: the benchmark's re-framed photos (seeded, every face findable) and training on the faces as serving
frames them (detect + align once per manifest, cached by image id, reused)."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genderrec import faces, images, train_data, train_faces
from tests.conftest import TINY_SIZE
from tests.helpers.framing import framed_photo
from tests.helpers.photos import detector, no_face_photo


@pytest.fixture(scope="module")
def test_faces(celeba_manifest):
    return celeba_manifest[celeba_manifest["split"] == "test"].sort_values("image_id").head(4)


def test_framed_photos_are_seeded_and_the_detector_finds_every_face(test_faces):
    for image_id, uri in zip(test_faces["image_id"], test_faces["image_uri"], strict=True):
        aligned = images.decode_image(Path(uri).read_bytes())
        photo = framed_photo(aligned, 11, image_id)
        assert framed_photo(aligned, 11, image_id).data == photo.data  # same seed: the same bytes
        assert framed_photo(aligned, 12, image_id).data != photo.data
        assert 0.5 <= photo.scale <= 2 and abs(photo.degrees) <= 20 and 40 <= photo.quality <= 95
        rgb = images.decode_image(photo.data)
        assert rgb.shape[0] > aligned.shape[0] * photo.scale  # a larger photo around the face
        crops = faces.face_crops(rgb, detector(), faces.FaceOptions(), "auto", TINY_SIZE)
        assert crops[0].source == faces.DETECTED, f"{image_id}: no face found in its framed photo"
        # the face found (auto's main face) is this face: its landmarks where the template's went
        error = np.linalg.norm(crops[0].face.landmarks - photo.landmarks, axis=1).mean()
        assert error < 10 * photo.scale, f"{image_id}: landmarks {error:.1f} px from the expected places"


def test_training_faces_are_detected_once_then_read_from_the_cache(ray_session, tmp_path, celeba_manifest):
    blank = tmp_path / "no_face.jpg"
    blank.write_bytes(no_face_photo())
    faces_rows = celeba_manifest[celeba_manifest["split"].isin(["train", "val"])].head(4)
    extra = pd.DataFrame({"image_id": ["no_face.jpg"], "image_uri": [str(blank)], "male": [0], "split": ["train"]})
    test_row = celeba_manifest[celeba_manifest["split"] == "test"].head(1)
    run_dir = str(tmp_path / "run")

    first, stats = train_faces.attach(pd.concat([faces_rows, test_row]), run_dir, actors=1)
    assert (stats.detected_now, stats.reused, stats.no_face) == (4, 0, 0)
    assert len(first) == 4  # train and val only
    cache = tmp_path / "run" / train_faces.CACHE_FILE
    written = os.stat(cache).st_mtime_ns

    frame = pd.concat([faces_rows, extra])
    second, stats = train_faces.attach(frame, run_dir, actors=1)  # only the new image is detected
    assert (stats.images, stats.detected_now, stats.reused, stats.no_face) == (5, 1, 4, 1)
    assert os.stat(cache).st_mtime_ns != written
    written = os.stat(cache).st_mtime_ns

    third, stats = train_faces.attach(frame, run_dir, actors=1)
    assert (stats.detected_now, stats.reused, stats.no_face) == (0, 5, 1)
    assert os.stat(cache).st_mtime_ns == written  # read, not recomputed or rewritten
    assert np.array_equal(np.stack(third[train_faces.LANDMARKS]), np.stack(second[train_faces.LANDMARKS]), True)

    # The Ray Data decode trains on exactly what --faces auto feeds the model for the same photo.
    stream = train_data.dataset(third, TINY_SIZE, decode_cpus=0.05).iterator()
    batches = train_data.SplitBatches(stream, 5, TINY_SIZE, 5, cache=False, shuffle=False, seed=0)
    ((pixels, _),) = list(batches.epoch(0))
    for index, uri in enumerate(third["image_uri"]):
        rgb = images.decode_image(Path(uri).read_bytes())
        served = faces.face_crops(rgb, detector(), faces.FaceOptions(), "auto", TINY_SIZE)[0]
        landmarks = third[train_faces.LANDMARKS].iloc[index]
        if served.face is None:
            assert np.isnan(landmarks).all()  # no face: trained whole, as auto scores it
        else:
            np.testing.assert_allclose(landmarks.reshape(5, 2), served.face.landmarks, atol=0.05)
        expected = faces.model_input(rgb, None if served.face is None else landmarks.reshape(5, 2), TINY_SIZE)
        assert np.array_equal(pixels[index], expected.astype(np.uint8)), uri
