"""Face detection and CelebA alignment on photos composed of real CelebA faces at known places
(``tests.helpers.photos``), and ``genderrec evaluate --faces detect`` on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from genderrec import cli, evaluation, faces, images, manifest
from genderrec.bundle import ModelBundle
from tests.helpers.bundles import save_bundle
from tests.helpers.photos import CANVAS, LAYOUTS, compose, detector, iou, layout, main_face, match, no_face_photo


@pytest.fixture(scope="module")
def pixel_model_dir(celeba_manifest, tmp_path_factory) -> Path:
    """Logistic regression on 10x8 pixels, trained on 800 real faces (about 82% accurate on held-out ones).

    The conftest's tiny GoogLeNet answers about 0.5 for every face after its few steps; this model's answers spread
    over 0..1 and depend on exactly where the face is in the frame, so it shows whether an aligned face looks like
    a CelebA image to a model.
    """
    import keras

    size = (40, 32)
    train = celeba_manifest[celeba_manifest["split"] == "train"].head(800)
    pixels = np.stack([images.load_image(Path(uri).read_bytes(), size) for uri in train["image_uri"]])
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((*size, 3)),
            keras.layers.Rescaling(1 / 127.5, offset=-1),
            keras.layers.AveragePooling2D(4),
            keras.layers.Flatten(),
            keras.layers.Dense(1, activation="sigmoid", kernel_regularizer=keras.regularizers.l2(1e-3)),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    model.fit(pixels, train["male"].to_numpy("float32"), epochs=30, batch_size=64, verbose=0)
    model_dir = tmp_path_factory.mktemp("pixel_model")
    save_bundle(
        model, model_dir, name="pixel_logistic", architecture="pixel_logistic", input_size=size, preprocessing="a layer"
    )
    return model_dir


@pytest.fixture(scope="module")
def pixel_model(pixel_model_dir) -> ModelBundle:
    return ModelBundle.load(str(pixel_model_dir))


def p_male(model: ModelBundle, pixels: list[np.ndarray]) -> np.ndarray:
    return model.predict_proba(np.stack(pixels))


def as_is(model: ModelBundle, path: Path) -> np.ndarray:
    """The model's input for a CelebA image as is (``--faces aligned``)."""
    return model.load_pixels(path.read_bytes())


# --------------------------------------------------------------------------- alignment


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = np.radians(17), 1.7, np.array([-30.0, 45.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = points @ (scale * rotation).T + shift
    np.testing.assert_allclose(faces.similarity_transform(points, moved), np.hstack([scale * rotation, shift[:, None]]))
    mirrored = points * [-1, 1]  # the best reflection-free fit is not the mirror image
    assert np.linalg.det(faces.similarity_transform(points, mirrored)[:, :2]) > 0


def test_template_is_where_celeba_puts_the_landmarks(celeba_dir):
    paths = sorted((celeba_dir / "img_align_celeba").glob("*.jpg"))[-12:]
    landmarks = np.stack([main_face(images.decode_image(path.read_bytes())).landmarks for path in paths])
    assert np.abs(landmarks.mean(axis=0) - faces.CELEBA_TEMPLATE).max() < 3
    assert np.median(np.linalg.norm(landmarks - faces.CELEBA_TEMPLATE, axis=2)) < 5


def test_celeba_image_through_detect_and_align_predicts_as_is(celeba_manifest, pixel_model):
    card = pixel_model.card
    size = card.input_size
    held_out = celeba_manifest[celeba_manifest["split"] == "test"].head(20)
    paths = [Path(uri) for uri in held_out["image_uri"]]
    aligned, originals = [], []
    for path in paths:
        rgb = images.decode_image(path.read_bytes())
        crops = faces.face_crops(rgb, detector(), faces.FaceOptions(), "detect", size, card.crop_box)
        assert [crop.source for crop in crops[:1]] == [faces.DETECTED], path
        aligned.append(crops[0].pixels)
        originals.append(as_is(pixel_model, path))
    difference = np.abs(np.stack(aligned) - np.stack(originals)).mean(axis=(1, 2, 3))
    other_face = np.abs(np.stack(aligned) - np.roll(np.stack(originals), 1, axis=0)).mean(axis=(1, 2, 3))
    print(f"mean |pixel difference| aligned vs as is: {difference.round(1)}; vs another face: {other_face.round(1)}")
    assert (difference < other_face / 2).all()
    before, after = p_male(pixel_model, originals), p_male(pixel_model, aligned)
    change = np.abs(after - before)
    between_faces = np.abs(before[:, None] - before[None, :]).mean()
    print(f"|p_male change| after detect+align: {change.round(3)}; between faces: {between_faces:.3f}")
    truth = held_out["male"].to_numpy()
    print(f"accuracy as is {((before >= 0.5) == truth).mean():.2f}, aligned {((after >= 0.5) == truth).mean():.2f}")
    assert change.mean() < 0.05 and change.mean() < between_faces / 4


def test_align_mirrors_past_the_edge_and_shrinks_big_faces(celeba_dir):
    path = celeba_dir / "img_align_celeba" / "000002.jpg"
    original = images.decode_image(path.read_bytes())
    landmarks = main_face(original).landmarks
    expected = faces.align(original, landmarks).astype(float)
    # Cut the photo just left of the left eye: the crop's left part comes from the mirrored photo, not black.
    cut = int(landmarks[0, 0]) - 8
    edge = faces.align(original[:, cut:], landmarks - [cut, 0])
    assert edge.shape == expected.shape == (*faces.ALIGNED_SIZE, 3)
    assert edge[:, :20].mean() > 30 and np.abs(edge[:, 70:] - expected[:, 70:]).mean() < 1
    # A face five times CelebA's size comes back at CelebA's scale, as the original would.
    big = np.asarray(Image.fromarray(original).resize((178 * 5, 218 * 5), Image.Resampling.BICUBIC))
    shrunk = faces.align(big, landmarks * 5 + 2)  # pixel centres: (x + 0.5) * 5 - 0.5
    print(
        f"mean |pixel difference|: edge {np.abs(edge - expected).mean():.1f}, big {np.abs(shrunk - expected).mean():.1f}"
    )
    assert np.abs(shrunk - expected).mean() < 5


# --------------------------------------------------------------------------- composites


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_face_of_a_composite_is_found_and_classified_as_its_crop(name, celeba_dir, pixel_model):
    composite = layout(celeba_dir, name)
    rgb = images.decode_image(composite.data)
    assert rgb.shape == (CANVAS[1], CANVAS[0], 3)  # upright, EXIF applied
    crops = faces.face_crops(rgb, detector(), faces.FaceOptions(), "detect", pixel_model.card.input_size, None)
    assert len(crops) == len(composite.boxes)
    assert [crop.face_index for crop in crops] == list(range(len(crops)))
    areas = [crop.face.area for crop in crops]
    assert areas == sorted(areas, reverse=True)  # face 0 is the largest
    found = match([crop.face.box for crop in crops], composite.boxes)
    assert sorted(found) == list(range(len(crops)))
    for known, index in zip(composite.boxes, found, strict=True):
        assert iou(crops[index].face.box, known) >= 0.5, (known, crops[index].face.box)
    predicted = p_male(pixel_model, [crops[index].pixels for index in found])
    original = p_male(pixel_model, [as_is(pixel_model, source) for source in composite.sources])
    print(f"{name}: p_male in the composite {predicted.round(3)}, on the original crops {original.round(3)}")
    np.testing.assert_allclose(predicted, original, atol=0.1)


def test_photo_without_a_face(pixel_model):
    rgb = images.decode_image(no_face_photo())
    size = pixel_model.card.input_size
    assert faces.face_crops(rgb, detector(), faces.FaceOptions(), "detect", size) == []
    (whole,) = faces.face_crops(rgb, detector(), faces.FaceOptions(), "auto", size)
    assert whole.source == faces.WHOLE_IMAGE and whole.face is None and whole.face_index == 0
    np.testing.assert_array_equal(whole.pixels, images.resize(rgb, size))  # as --faces aligned would see it


def test_options_min_size_confidence_and_max_faces(celeba_dir):
    small = compose(
        [celeba_dir / "img_align_celeba" / name for name in ("000002.jpg", "000005.jpg")],
        [(100, 100, 0.35), (400, 250, 0.4)],
    )
    detected = detector().detect(images.decode_image(small.data))
    sizes = sorted(face.size for face in faces.select_faces(detected, faces.FaceOptions(min_face_size=20)))
    assert len(sizes) == 2 and sizes[-1] < 40  # both found when small faces are allowed ...
    at_least_40 = faces.FaceOptions(min_face_size=40)
    assert (
        faces.face_crops(
            images.decode_image(small.data), faces.load_detector(at_least_40), at_least_40, "detect", (40, 32)
        )
        == []
    )  # ... none when they are not

    three_faces = images.decode_image(layout(celeba_dir, "three-faces-exif").data)
    three = detector().detect(three_faces)
    # A detector for faces of 40 px and more still finds these (mtcnn 1.0.0 alone finds no face at all then).
    larger = faces.load_detector(at_least_40).detect(three_faces)
    assert sorted(match([face.box for face in larger], [face.box for face in three])) == [0, 1, 2]
    assert min(max(iou(big.box, face.box) for big in larger) for face in three) > 0.8
    largest = faces.select_faces(three, faces.FaceOptions(max_faces=2))
    assert [face.area for face in largest] == sorted((face.area for face in three), reverse=True)[:2]
    assert faces.select_faces(three, faces.FaceOptions(min_face_confidence=1.0)) == []
    with pytest.raises(ValueError, match="max_faces"):
        faces.FaceOptions(max_faces=0)
    with pytest.raises(ValueError, match="'aligned'"):
        faces.face_crops(np.zeros((20, 20, 3), np.uint8), detector(), faces.FaceOptions(), "aligned", (40, 32))


def test_images_too_small_for_the_detector_have_no_face():
    assert detector().detect(np.zeros((8, 300, 3), np.uint8)) == []


def test_evaluate_scores_each_photo_by_its_largest_face(tmp_path, celeba_dir, celeba_manifest, pixel_model_dir):
    """``genderrec evaluate --faces detect``: composite photos and CelebA images, one truth per photo."""
    photos = {name: layout(celeba_dir, name).data for name in ("one-face", "two-faces")}
    photos["no-face"] = no_face_photo()
    rows = []
    for name, data in photos.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        rows.append({"image_uri": str(tmp_path / f"{name}.jpg"), "male": 0, "split": "test"})
    held_out = celeba_manifest[celeba_manifest["split"] == "test"].head(8)[["image_uri", "male", "split"]]
    frame = pd.concat([pd.DataFrame(rows), held_out], ignore_index=True)
    manifest.write_manifest(frame, str(tmp_path / "photos.parquet"))

    model = ModelBundle.load(str(pixel_model_dir))
    scored = {mode: evaluation.predict(model, frame, faces=mode) for mode in ("detect", "auto")}
    size = model.card.input_size
    for name, data in photos.items():
        row = frame.index[frame["image_uri"] == str(tmp_path / f"{name}.jpg")][0]
        (first, *_) = faces.face_crops(images.decode_image(data), detector(), faces.FaceOptions(), "auto", size)
        assert scored["auto"].loc[row, "p_male"] == pytest.approx(p_male(model, [first.pixels])[0], abs=1e-6)
        if name == "no-face":  # detect: no score, and why; auto: the whole photo
            assert np.isnan(scored["detect"].loc[row, "p_male"]) and faces.NO_FACE in scored["detect"].loc[row, "error"]
            assert first.source == faces.WHOLE_IMAGE
        else:  # the largest face
            assert scored["detect"].loc[row, "p_male"] == scored["auto"].loc[row, "p_male"]

    out = tmp_path / "report"
    argv = ["evaluate", "--model", str(pixel_model_dir), "--manifest", str(tmp_path / "photos.parquet")]
    assert cli.main([*argv, "--out", str(out), "--faces", "detect", "--bootstrap", "200", "--no-face-images"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["faces"] == "detect"
    assert (metrics["data"]["images"], metrics["data"]["excluded_unreadable"]) == (len(frame) - 1, 1)
