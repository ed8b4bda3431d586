"""Bulk labeling with Ray Data: real S3 servers (rclone, moto), real CelebA faces, a real trained model."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genderrec import bundle, cli, faces, images, labeling, manifest, storage
from genderrec.config import read_yaml
from tests.helpers.photos import LAYOUTS, detector, iou, layout, match, no_face_photo

pytest_plugins = ["s3_servers"]  # the rclone_server and moto_server fixtures
REPO = Path(__file__).resolve().parents[1]
MODEL_VERSION = "googlenet_fine_tune@2026-01-01T00:00:00+00:00"  # name@created of the tiny model's card


@functools.cache
def bomb_png() -> bytes:
    """A genuine decompression bomb: 8000 x 8000 black pixels (64 Mpx) in about 60 KB of PNG."""
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, "PNG")
    return buffer.getvalue()


def bad_files(face: bytes) -> dict[str, tuple[bytes, str]]:
    """File name → (content, what its ``error`` must say): every way a bucket's file can fail to be a photo."""
    noise = np.random.default_rng(3).integers(0, 256, len(face), dtype=np.uint8).tobytes()
    return {
        "corrupt.jpg": (face[:700] + noise[700:], "corrupt or truncated"),
        "truncated.jpg": (face[: len(face) // 2], "truncated"),
        "empty.png": (b"", "empty file"),
        "notes.JPEG": (b"meeting notes, not a photo\n", "not an image"),
        "bomb.png": (bomb_png(), "decompression bomb"),
    }


def expected_p_male(model_dir: str, blobs: list[bytes]) -> np.ndarray:
    """p(male) from calling the model directly, as a user would, on the same images."""
    loaded = bundle.ModelBundle.load(model_dir)
    return loaded.predict_proba(np.stack([loaded.load_pixels(blob) for blob in blobs]))


def p_male_of(model_dir: str, pixels: list[np.ndarray]) -> np.ndarray:
    return bundle.ModelBundle.load(model_dir).predict_proba(np.stack(pixels))


def read_labels(output_uri: str) -> pd.DataFrame:
    """The output folder as any Parquet reader sees it (``_evaluation.json`` is skipped by the ``_`` rule)."""
    fs, path = storage.filesystem(output_uri)
    return pq.read_table(path, filesystem=fs).to_pandas().sort_values("image_uri").reset_index(drop=True)


def test_label_s3_prefix_to_s3_on_rclone(rclone_server, monkeypatch, capsys, ray_session, tiny_model_dir, real_faces):
    """The issue's headline: ``genderrec label --input s3://photos/2026/ --output s3://labels/2026/``."""
    rclone_server.activate(monkeypatch)
    for bucket in ("photos", "labels", "models"):
        rclone_server.create_bucket(bucket)

    faces = {}
    for index, local in enumerate(real_faces["image_uri"].head(50)):
        folder, suffix = ("day1", ".jpg") if index < 30 else ("day2/late", ".JPG")
        faces[f"s3://photos/2026/{folder}/{Path(local).stem}{suffix}"] = Path(local).read_bytes()
    bad = {f"s3://photos/2026/bad/{name}": item for name, item in bad_files(next(iter(faces.values()))).items()}
    for uri, data in [*faces.items(), *((uri, data) for uri, (data, _) in bad.items())]:
        storage.write_bytes(uri, data)
    storage.write_text("s3://photos/2026/readme.txt", "not an image suffix: never listed")

    # A model directory on S3 whose card carries a temperature: labeling must apply the calibration.
    card = bundle.read_card(str(tiny_model_dir)).model_copy(update={"temperature": 0.25})
    storage.copy(str(tiny_model_dir / bundle.MODEL_FILE), f"s3://models/gender/{bundle.MODEL_FILE}")
    bundle.write_card("s3://models/gender", card)

    # The endpoint comes from the flag, as for a user's MinIO/Ceph/R2.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    storage.configure_s3()
    argv = ["label", "--model", "s3://models/gender/", "--input", "s3://photos/2026/", "--output", "s3://labels/2026/"]
    assert cli.main([*argv, "--batch-size", "16", "--s3-endpoint", rclone_server.endpoint]) == 0
    summary = capsys.readouterr().out
    assert "rows in: 55" in summary and "labeled now: 50" in summary and "errors: 5" in summary

    labels = read_labels("s3://labels/2026/")
    assert list(labels.columns) == list(labeling.OUTPUT_COLUMNS)
    assert len(labels) == len(faces) + len(bad)  # one row per image file, the .txt is not one
    assert set(labels["image_uri"]) == set(faces) | set(bad)
    assert (labels["model"] == MODEL_VERSION).all()

    failed = labels[labels["error"].notna()].set_index("image_uri")
    assert set(failed.index) == set(bad)
    for uri, (_, reason) in bad.items():
        assert reason in failed.loc[uri, "error"], (uri, failed.loc[uri, "error"])
    assert failed["p_male"].isna().all() and failed["label"].isna().all()

    good = labels[labels["error"].isna()]
    expected = expected_p_male("s3://models/gender", [faces[uri] for uri in good["image_uri"]])
    np.testing.assert_allclose(good["p_male"], expected, atol=1e-5)
    assert (good["label"] == np.where(expected >= 0.5, "male", "female")).all()
    uncalibrated = expected_p_male(str(tiny_model_dir), [faces[uri] for uri in good["image_uri"]])
    assert np.abs(uncalibrated - expected).max() > 1e-3  # the temperature really changed the numbers
    assert not storage.exists("s3://labels/2026/" + labeling.EVALUATION_FILE)  # no ground truth, no evaluation


def hand_evaluation(truth: np.ndarray, p_male: np.ndarray, threshold: float) -> dict:
    """Accuracy, ROC-AUC (share of male/female pairs ranked right, ties half) and confusion counts, by hand."""
    predicted = [int(p >= threshold) for p in p_male]
    counts = [[0, 0], [0, 0]]
    for true, guess in zip(truth, predicted, strict=True):
        counts[int(true)][guess] += 1
    males = [p for p, true in zip(p_male, truth, strict=True) if true == 1]
    females = [p for p, true in zip(p_male, truth, strict=True) if true == 0]
    pairs = [1.0 if m > f else 0.5 if m == f else 0.0 for m in males for f in females]
    return {
        "accuracy": (counts[0][0] + counts[1][1]) / len(truth),
        "roc_auc": sum(pairs) / len(pairs),
        "counts": counts,
    }


def test_manifest_with_carried_columns_and_evaluation_on_moto(
    moto_server, monkeypatch, ray_session, tiny_model_dir, real_faces
):
    """A manifest on S3 (images local), ground truth carried through, evaluation checked against a hand count."""
    moto_server.activate(monkeypatch)
    for bucket in ("manifests", "labels"):
        moto_server.create_bucket(bucket)
    faces = real_faces.iloc[::5][["image_uri", "image_id", "male", "split", "identity"]]
    missing = {"image_uri": "/nonexistent/photos/missing.jpg", "image_id": "missing.jpg", "male": 1, "split": "test"}
    rows = pd.concat([faces, pd.DataFrame([{**missing, "identity": 0}])], ignore_index=True)
    rows["male"] = rows["male"].astype("int8")
    manifest.write_manifest(rows, "s3://manifests/faces.parquet")

    good_p = expected_p_male(str(tiny_model_dir), [Path(uri).read_bytes() for uri in faces["image_uri"]])
    threshold = float(np.median(good_p))  # a threshold off the card's 0.5 gives both classes predicted
    options = labeling.LabelingOptions(
        str(tiny_model_dir), "s3://manifests/faces.parquet", "s3://labels/eval/", batch_size=4, threshold=threshold
    )
    result = labeling.label(options)
    assert (result.rows_in, result.labeled, result.errors) == (len(rows), len(faces), 1)

    labels = read_labels("s3://labels/eval/")
    assert list(labels.columns) == [*labeling.OUTPUT_COLUMNS, "image_id", "male", "split", "identity"]
    carried = labels[["image_uri", "image_id", "male", "split", "identity"]]
    pd.testing.assert_frame_equal(carried, rows.sort_values("image_uri").reset_index(drop=True))
    failed = labels[labels["error"].notna()]
    assert list(failed["image_uri"]) == [missing["image_uri"]] and "cannot read" in failed["error"].iloc[0]

    good = labels[labels["error"].isna()].set_index("image_uri").loc[faces["image_uri"]]
    np.testing.assert_allclose(good["p_male"], good_p, atol=1e-5)
    assert (good["label"] == np.where(good_p >= threshold, "male", "female")).all()

    hand = hand_evaluation(faces["male"].to_numpy(), good_p, threshold)
    written = json.loads(storage.read_text("s3://labels/eval/" + labeling.EVALUATION_FILE))
    for evaluation in (result.evaluation, written):
        assert evaluation["images"] == len(faces) and evaluation["excluded_errors"] == 1
        assert evaluation["accuracy"] == pytest.approx(hand["accuracy"])
        assert evaluation["roc_auc"] == pytest.approx(hand["roc_auc"])
        assert evaluation["confusion_matrix"]["counts"] == hand["counts"]
    assert f"accuracy {hand['accuracy']:.4f}" in result.report()


def killed_once_files_exist(argv: list[str], output: Path, files: int) -> dict[str, tuple[int, int]]:
    """Run ``genderrec label`` in a process group of its own and SIGKILL the group (the driver and the local Ray it
    started) as soon as ``files`` output files exist; the files left then: name → (size, mtime)."""
    command = [sys.executable, "-m", "genderrec", "label", *argv]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while len(list(output.glob("part-*.parquet"))) < files:
            assert process.poll() is None, f"the job ended ({process.returncode}) before {files} files were written"
            assert time.monotonic() < deadline, "no output files within 600 s"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return {part.name: (part.stat().st_size, part.stat().st_mtime_ns) for part in output.glob("part-*.parquet")}


def test_sigkill_mid_job_keeps_finished_files_and_resume_labels_the_rest(
    tmp_path, capsys, ray_session, tiny_model_dir, real_faces
):
    """A folder of 1,201 tiny images, 40 per file: the job is SIGKILLed once 3 files exist; ``--resume`` keeps them
    as they are and labels only the rest, every image exactly once."""
    folder, blobs = tmp_path / "photos", {}
    for index, local in enumerate(real_faces["image_uri"].head(20)):
        buffer = io.BytesIO()
        Image.open(local).resize((32, 40)).save(buffer, "JPEG")
        blobs[index] = buffer.getvalue()
    for copy in range(1200):
        target = folder / ("a" if copy % 2 else "b/c") / f"{copy:04d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blobs[copy % 20])
    (folder / "b" / "empty.jpg").write_bytes(b"")
    output = tmp_path / "labels"
    argv = ["--model", str(tiny_model_dir), "--input", str(folder), "--output", str(output)]
    argv += ["--batch-size", "20", "--rows-per-file", "40"]

    kept = killed_once_files_exist(argv, output, files=3)
    assert 3 <= len(kept) < 31  # 1,201 images in 31 files: the kill came part-way
    before = read_labels(str(output))  # every file left is whole (a cut-short one would not read)
    assert before["image_uri"].is_unique and len(before) < 1201

    options = labeling.LabelingOptions(str(tiny_model_dir), str(folder), str(output), batch_size=20, resume=True)
    result = labeling.label(options)
    assert result.already_labeled == len(before) and result.labeled + result.errors == 1201 - len(before)
    for name, stat in kept.items():  # the killed run's files, untouched
        assert ((output / name).stat().st_size, (output / name).stat().st_mtime_ns) == stat

    labels = read_labels(str(output))
    listed = storage.list_files(str(folder), images.IMAGE_SUFFIXES)
    assert len(labels) == 1201 and labels["image_uri"].is_unique and set(labels["image_uri"]) == set(listed)
    failed = labels[labels["error"].notna()]
    assert list(failed["image_uri"]) == [str(folder / "b" / "empty.jpg")] and not failed["retryable"].any()
    assert failed["error"].iloc[0] == "empty file (0 bytes)"
    expected = expected_p_male(str(tiny_model_dir), list(blobs.values()))
    good = labels[labels["error"].isna()]
    copies = good["image_uri"].map(lambda uri: int(Path(uri).stem) % 20)
    np.testing.assert_allclose(good["p_male"], expected[copies], atol=1e-5)

    # Once more through `genderrec label --config`: the file's resume: false loses to the --resume flag.
    config = tmp_path / "label.yaml"
    config.write_text(f"model: {tiny_model_dir}\ninput: {folder}\noutput: {output}\nbatch_size: 4\nresume: false\n")
    assert cli.main(["label", "--config", str(config), "--resume"]) == 0
    assert "rows in: 1201  already labeled (resume): 1201" in capsys.readouterr().out
    assert len(read_labels(str(output))) == 1201


def test_storage_outage_mid_job_then_retry_errors(
    rclone_process, monkeypatch, tmp_path, ray_session, tiny_model_dir, real_faces
):
    """Images on a real S3 server that is stopped once the job has started and started again once a file is
    written: the failed reads are retryable error rows; ``--resume --retry-errors`` labels exactly those again."""
    server = rclone_process.server
    server.activate(monkeypatch)
    server.create_bucket("photos")
    blobs = {
        f"s3://photos/day/{index:03d}.jpg": Path(local).read_bytes()
        for index, local in enumerate(real_faces["image_uri"].head(24))
    }
    for uri, data in blobs.items():
        storage.write_bytes(uri, data)
    output = tmp_path / "labels"
    options = labeling.LabelingOptions(
        str(tiny_model_dir), "s3://photos/day/", str(output), batch_size=4, rows_per_file=4
    )
    plan = labeling.prepare(options)  # lists the prefix while the server is up
    rclone_process.stop()
    results = []
    job = threading.Thread(target=lambda: results.append(labeling.run(plan)))
    job.start()
    while job.is_alive() and not list(output.glob("part-*.parquet")):
        time.sleep(0.05)
    rclone_process.start()
    job.join()

    (first,) = results
    assert first.errors > 0 and first.retryable == first.errors
    labels = read_labels(str(output))
    assert len(labels) == len(blobs) and set(labels["image_uri"]) == set(blobs)
    failed = labels[labels["error"].notna()]
    assert len(failed) == first.errors and failed["retryable"].all() and failed["p_male"].isna().all()
    assert failed["error"].str.startswith("cannot read").all()
    assert "--resume --retry-errors" in first.report()

    again = labeling.label(dataclasses.replace(options, resume=True, retry_errors=True))
    assert (again.labeled, again.errors) == (len(failed), 0)
    labels = read_labels(str(output))
    assert len(labels) == len(blobs) and labels["image_uri"].is_unique and set(labels["image_uri"]) == set(blobs)
    assert labels["error"].isna().all() and not labels["retryable"].any()
    expected = expected_p_male(str(tiny_model_dir), [blobs[uri] for uri in labels["image_uri"]])
    np.testing.assert_allclose(labels["p_male"], expected, atol=1e-5)
    nothing_left = labeling.label(dataclasses.replace(options, resume=True, retry_errors=True))
    assert nothing_left.files == 0 and nothing_left.already_labeled == len(blobs)


def face_inputs(model_dir: str, data: bytes, options: faces.FaceOptions, mode: str) -> list[faces.FaceCrop]:
    """What the job must classify in a photo, computed directly with the faces module."""
    card = bundle.read_card(model_dir)
    return faces.face_crops(images.decode_image(data), detector(), options, mode, card.input_size, card.crop_box)


def test_faces_detect_and_auto_on_composite_photos(tmp_path, capsys, ray_session, tiny_model_dir, celeba_dir):
    """Ordinary photos: one row per face (detect), the whole image when there is none (auto); no image dropped."""
    folder = tmp_path / "photos"
    folder.mkdir()
    composites = {name: layout(celeba_dir, name) for name in LAYOUTS}
    for name, composite in composites.items():
        (folder / f"{name}.jpg").write_bytes(composite.data)
    (folder / "no-face.jpg").write_bytes(no_face_photo())
    (folder / "cut.jpg").write_bytes(composites["one-face"].data[:2000])
    uri = {path.stem: str(path) for path in folder.iterdir()}
    model_dir, output = str(tiny_model_dir), str(tmp_path / "detect")

    assert (
        cli.main(["label", "--model", model_dir, "--input", str(folder), "--output", output, "--faces", "detect"]) == 0
    )
    assert "labeled now: 6 faces in 3 images  errors: 2" in capsys.readouterr().out
    labels = read_labels(output)
    assert list(labels.columns) == [*labeling.OUTPUT_COLUMNS, *labeling.FACE_COLUMNS]
    assert set(labels["image_uri"]) == set(uri.values())  # every image in has a row out
    errors = labels[labels["error"].notna()].set_index("image_uri")["error"]
    assert errors[uri["no-face"]] == faces.NO_FACE and "truncated" in errors[uri["cut"]]
    assert labels.loc[labels["error"].notna(), ["p_male", "face_index", "box"]].isna().all().all()
    for name, composite in composites.items():
        rows = labels[labels["image_uri"] == uri[name]].sort_values("face_index")
        assert list(rows["face_index"]) == list(range(len(composite.boxes)))
        assert (rows["face_source"] == faces.DETECTED).all() and (rows["det_confidence"] >= 0.9).all()
        boxes = [tuple(box) for box in rows["box"]]
        for known, index in zip(composite.boxes, match(boxes, composite.boxes), strict=True):
            assert iou(boxes[index], known) >= 0.5
        crops = face_inputs(model_dir, composite.data, faces.FaceOptions(), "detect")
        np.testing.assert_allclose(np.stack(rows["landmarks"].map(np.stack)), [crop.face.landmarks for crop in crops])
        np.testing.assert_allclose(rows["p_male"], p_male_of(model_dir, [crop.pixels for crop in crops]), atol=1e-5)

    # auto, at most 2 faces, from a manifest with ground truth: the whole image stands in for the missing face,
    # and the evaluation counts each image once (by its largest face).
    truth = {"one-face": 0, "two-faces": 0, "three-faces-exif": 1, "no-face": 1, "cut": 1}
    pq.write_table(
        pa.table({"image_uri": [uri[name] for name in truth], "male": list(truth.values())}), tmp_path / "in.parquet"
    )
    options = labeling.LabelingOptions(
        model_dir, str(tmp_path / "in.parquet"), str(tmp_path / "auto"), batch_size=2, faces="auto", max_faces=2
    )
    result = labeling.label(options)
    assert (result.labeled, result.images_with_faces, result.errors) == (6, 4, 1)
    assert (result.evaluation["images"], result.evaluation["excluded_errors"]) == (4, 1)
    labels = read_labels(str(tmp_path / "auto"))
    assert labels.groupby("image_uri").size().to_dict() == {
        uri["one-face"]: 1,
        uri["two-faces"]: 2,
        uri["three-faces-exif"]: 2,
        uri["no-face"]: 1,
        uri["cut"]: 1,
    }
    whole = labels[labels["image_uri"] == uri["no-face"]].iloc[0]
    assert whole["face_source"] == faces.WHOLE_IMAGE and whole["face_index"] == 0 and whole["box"] is None
    (crop,) = face_inputs(model_dir, no_face_photo(), faces.FaceOptions(), "auto")
    assert whole["p_male"] == pytest.approx(p_male_of(model_dir, [crop.pixels])[0], abs=1e-5)


def test_faces_detect_sigkill_and_resume_keeps_every_face_of_an_image_together(
    tmp_path, ray_session, tiny_model_dir, celeba_dir
):
    """``--faces detect``, two photos per file, SIGKILLed once 2 files exist: after ``--resume`` each photo has all its
    faces, once, in one file, and the killed run's files are untouched."""
    folder = tmp_path / "photos"
    folder.mkdir()
    composites = {name: layout(celeba_dir, name) for name in LAYOUTS}
    expected = {}
    for copy in range(3):
        for name, composite in composites.items():
            (folder / f"{name}-{copy}.jpg").write_bytes(composite.data)
            expected[str(folder / f"{name}-{copy}.jpg")] = len(composite.boxes)
        (folder / f"no-face-{copy}.jpg").write_bytes(no_face_photo())
        expected[str(folder / f"no-face-{copy}.jpg")] = 0
    output = tmp_path / "labels"
    argv = ["--model", str(tiny_model_dir), "--input", str(folder), "--output", str(output), "--faces", "detect"]

    kept = killed_once_files_exist([*argv, "--rows-per-file", "2", "--batch-size", "4"], output, files=2)
    assert 2 <= len(kept) < len(expected) // 2
    options = labeling.LabelingOptions(str(tiny_model_dir), str(folder), str(output), faces="detect", resume=True)
    labeling.label(options)
    for name, stat in kept.items():
        assert ((output / name).stat().st_size, (output / name).stat().st_mtime_ns) == stat

    fs_parts = {part.name: pq.read_table(part, columns=["image_uri"]) for part in output.glob("part-*.parquet")}
    file_of = {uri: name for name, table in fs_parts.items() for uri in table["image_uri"].to_pylist()}
    labels = read_labels(str(output))
    assert set(labels["image_uri"]) == set(expected)
    for uri, count in expected.items():
        rows = labels[labels["image_uri"] == uri]
        if count:
            assert sorted(rows["face_index"]) == list(range(count)) and rows["error"].isna().all(), uri
        else:
            assert len(rows) == 1 and rows["error"].iloc[0] == faces.NO_FACE
        in_files = {name for name, table in fs_parts.items() if uri in table["image_uri"].to_pylist()}
        assert in_files == {file_of[uri]}  # all of an image's rows in one file


def test_shipped_label_config_names_only_label_flags():
    """configs/label.yaml is what users copy: every key must be a flag of ``genderrec label``."""
    shipped = Path(__file__).resolve().parents[1] / "configs" / "label.yaml"
    settings = cli._flags_over_config_file(cli.build_parser().parse_args(["label", "--config", str(shipped)]))
    options = {field.name for field in dataclasses.fields(labeling.LabelingOptions)}
    assert {"model", "input", "output", "batch_size", "faces", "face_actors"} <= settings.keys()
    assert set(read_yaml(shipped)) - {"model", "input", "output", "address", "s3_endpoint", "s3_region"} <= options


def test_label_config_file_is_strict(tmp_path, capsys):
    """Unknown keys and missing required settings fail before any work, naming the file or the flag."""
    config = tmp_path / "label.yaml"
    config.write_text("model: m\ninput: i\noutput: o\nbatch_sise: 4\n")
    assert cli.main(["label", "--config", str(config)]) == 2
    assert f"{config}: unknown keys ['batch_sise']" in capsys.readouterr().err
    config.write_text("model: m\ninput: i\n")
    assert cli.main(["label", "--config", str(config)]) == 2
    assert "label needs --output" in capsys.readouterr().err


# --------------------------------------------------------------------------- fail fast, before any cluster work


@pytest.fixture
def inputs(tmp_path, real_faces, tiny_model_dir):
    """Small local inputs of every kind the checks must tell apart."""
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"path": [real_faces["image_uri"].iloc[0]]}), tmp_path / "no_uri.parquet")
    pq.write_table(pa.table({"image_uri": ["photos/a.jpg"]}), tmp_path / "relative.parquet")
    pq.write_table(
        pa.table({"image_uri": [real_faces["image_uri"].iloc[0]], "label": ["m"]}), tmp_path / "clash.parquet"
    )
    pq.write_table(pa.table({"image_uri": pa.array([], pa.string())}), tmp_path / "no_rows.parquet")
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.table({"image_uri": ["x"]}), tmp_path / "labels" / "part.parquet")
    (tmp_path / "model_without_weights").mkdir()
    shutil.copy(tiny_model_dir / bundle.CARD_FILE, tmp_path / "model_without_weights" / bundle.CARD_FILE)
    return tmp_path


@pytest.mark.parametrize(
    ("model", "source", "output", "message"),
    [
        ("missing_model", "FACE", "out", "no card.json"),
        ("model_without_weights", "FACE", "out", "no model.keras"),
        ("MODEL", "garbage.parquet", "out", "not a readable Parquet manifest"),
        ("MODEL", "no_uri.parquet", "out", "manifest has no 'image_uri' column"),
        ("MODEL", "relative.parquet", "out", "must be absolute paths or s3:// URIs"),
        ("MODEL", "clash.parquet", "out", "['label'] would be overwritten"),
        ("MODEL", "no_rows.parquet", "out", "manifest has no rows"),
        ("MODEL", "empty_folder", "out", "empty input"),
        ("MODEL", "nowhere", "out", "not found"),
        ("MODEL", "FACE", "labels", "pass --resume"),
    ],
)
def test_prepare_fails_fast_with_a_clear_message(inputs, tiny_model_dir, real_faces, model, source, output, message):
    face_folder = str(Path(real_faces["image_uri"].iloc[0]).parent)
    model_dir = str(tiny_model_dir) if model == "MODEL" else str(inputs / model)
    source = face_folder if source == "FACE" else str(inputs / source)
    with pytest.raises((labeling.LabelingError, FileNotFoundError), match=message.replace("[", r"\[")) as error:
        labeling.prepare(labeling.LabelingOptions(model_dir, source, str(inputs / output)))
    assert any(name in str(error.value) for name in (model_dir, source, str(inputs / output)))


def test_empty_s3_prefix_and_missing_bucket_fail_fast(moto_server, monkeypatch, tiny_model_dir):
    moto_server.activate(monkeypatch)
    moto_server.create_bucket("photos-empty")
    with pytest.raises(labeling.LabelingError, match=r"s3://photos-empty/2026/: not found"):
        labeling.prepare(
            labeling.LabelingOptions(str(tiny_model_dir), "s3://photos-empty/2026/", "s3://photos-empty/x")
        )
    storage.write_text("s3://photos-empty/2026/a.jpg", "x")
    with pytest.raises(labeling.LabelingError, match="bucket 'no-such-bucket' does not exist"):
        labeling.prepare(
            labeling.LabelingOptions(str(tiny_model_dir), "s3://photos-empty/2026/", "s3://no-such-bucket/x")
        )


def test_options_are_checked():
    with pytest.raises(labeling.LabelingError, match="batch size"):
        labeling.LabelingOptions("m", "i", "o", batch_size=0)
    with pytest.raises(labeling.LabelingError, match="threshold"):
        labeling.LabelingOptions("m", "i", "o", threshold=1.5)


def test_face_options_are_checked(tmp_path, tiny_model_dir, real_faces):
    with pytest.raises(labeling.LabelingError, match="faces must be one of aligned, detect, auto, got 'all'"):
        labeling.LabelingOptions("m", "i", "o", faces="all")
    with pytest.raises(
        labeling.LabelingError,
        match=r"face options: min_face_confidence: Input should be less than or equal to 1 \(got 1.5\)",
    ):
        labeling.LabelingOptions("m", "i", "o", faces="detect", min_face_confidence=1.5)
    with pytest.raises(labeling.LabelingError, match="face actors"):
        labeling.LabelingOptions("m", "i", "o", faces="auto", face_actors=0)
    manifest_with_box = tmp_path / "boxes.parquet"
    pq.write_table(pa.table({"image_uri": [real_faces["image_uri"].iloc[0]], "box": ["x"]}), manifest_with_box)
    options = labeling.LabelingOptions(str(tiny_model_dir), str(manifest_with_box), str(tmp_path / "out"))
    labeling.prepare(options)  # aligned mode writes no box column: nothing to overwrite
    with pytest.raises(labeling.LabelingError, match=r"\['box'\] would be overwritten by the faces columns"):
        labeling.prepare(dataclasses.replace(options, faces="detect"))


def test_job_entry_point_fails_fast_without_starting_ray(tmp_path):
    """``ray job submit ... python jobs/label.py`` with a wrong model: exit 2 and a clear message, no Ray started."""
    command = [sys.executable, "jobs/label.py", "--model", str(tmp_path / "nope"), "--input", str(tmp_path)]
    finished = subprocess.run([*command, "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 2
    assert f"genderrec label: error: {tmp_path / 'nope'}: no card.json" in finished.stderr
    assert "Ray" not in finished.stderr
