"""Exports (OpenVINO, SavedModel, ONNX) checked against the Keras model; engine choice by Ray resources."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genderrec import bundle, cli, engines, labeling, serving
from tests.helpers.bundles import calibrated_copy
from tests.helpers.net import free_port

TEMPERATURE = 0.5  # the exported model's card is calibrated: every engine must apply it


@pytest.fixture(scope="module")
def exported_dir(tiny_model_dir, tmp_path_factory):
    """A calibrated copy of the tiny model directory with every export written through ``genderrec export``."""
    model_dir = calibrated_copy(tiny_model_dir, tmp_path_factory.mktemp("exported") / "model", TEMPERATURE)
    formats = [arg for fmt in engines.EXPORT_FILES for arg in ("--format", fmt)]
    assert cli.main(["export", "--model", str(model_dir), *formats]) == 0
    return model_dir


def test_every_export_is_written_checked_and_recorded(exported_dir, real_faces):
    card = json.loads((exported_dir / bundle.CARD_FILE).read_text())
    assert set(card["exports"]) == set(engines.EXPORT_FILES)
    for fmt, files in engines.EXPORT_FILES.items():
        assert all((exported_dir / name).exists() for name in files), fmt
        assert card["exports"][fmt]["max_abs_dp"] <= engines.EXPORT_TOLERANCE


@pytest.mark.parametrize("precision, tolerance", [("f32", 1e-4), ("bf16", 0.02)])
def test_openvino_engine_agrees_with_keras_on_real_faces(exported_dir, real_faces, precision, tolerance):
    keras_bundle = bundle.ModelBundle.load(str(exported_dir))
    pixels = keras_bundle.check_inputs(real_faces["image_uri"], count=24)
    openvino_bundle = bundle.ModelBundle.load(str(exported_dir), engine="openvino", precision=precision)
    assert openvino_bundle.model is None and openvino_bundle.engine.name == "openvino"
    reference, fast = keras_bundle.predict_proba(pixels), openvino_bundle.predict_proba(pixels)
    assert np.max(np.abs(fast - reference)) <= tolerance
    assert np.mean(openvino_bundle.label(fast) == keras_bundle.label(reference)) >= 0.95


def test_onnx_and_saved_model_run_in_their_own_runtimes(exported_dir, real_faces):
    import onnxruntime
    import tensorflow as tf

    keras_bundle = bundle.ModelBundle.load(str(exported_dir))
    pixels = keras_bundle.check_inputs(real_faces["image_uri"], count=8)
    reference = keras_bundle.raw_proba(pixels)
    session = onnxruntime.InferenceSession(str(exported_dir / "model.onnx"))
    onnx_p = session.run(None, {session.get_inputs()[0].name: pixels})[0].reshape(-1)
    saved = tf.saved_model.load(str(exported_dir / "saved_model"))
    saved_p = np.asarray(saved.serve(pixels)).reshape(-1)
    np.testing.assert_allclose(onnx_p, reference, atol=1e-4)
    np.testing.assert_allclose(saved_p, reference, atol=1e-5)


def test_missing_openvino_export_names_the_model_directory(tiny_model_dir):
    with pytest.raises(engines.EngineError, match=f"{tiny_model_dir}: no openvino export.*genderrec export"):
        bundle.ModelBundle.load(str(tiny_model_dir), engine="openvino")


def test_auto_follows_the_gpu_ray_assigns(exported_dir):
    """A Ray with one (declared) GPU: an actor holding it resolves auto to TensorFlow, a CPU actor to OpenVINO."""
    script = textwrap.dedent(
        f"""
        import ray
        from genderrec.bundle import ModelBundle

        @ray.remote
        class Loader:
            def engine(self):
                return ModelBundle.load({str(exported_dir)!r}, engine="auto").engine.name

        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
        gpu = ray.get(Loader.options(num_gpus=1, num_cpus=0.5).remote().engine.remote())
        cpu = ray.get(Loader.options(num_cpus=0.5).remote().engine.remote())
        print("ENGINES", gpu, cpu)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ENGINES tensorflow openvino" in result.stdout, result.stderr[-3000:]


def test_each_engine_uses_only_the_cpus_ray_gives_its_actor(exported_dir, ray_session):
    """A 1-CPU actor: TensorFlow's and OpenVINO's thread pools hold one thread each (not one per core)."""
    import ray

    @ray.remote(num_cpus=1)
    class Loader:
        def threads(self, engine: str) -> int:
            import tensorflow as tf

            loaded = bundle.ModelBundle.load(str(exported_dir), engine=engine)
            if engine == "openvino":
                return int(loaded.engine.compiled.get_property("INFERENCE_NUM_THREADS"))
            return tf.config.threading.get_intra_op_parallelism_threads()

    loaders = [Loader.remote(), Loader.remote()]
    threads = ray.get([loaders[0].threads.remote("tensorflow"), loaders[1].threads.remote("openvino")])
    assert threads == [1, 1]


def test_resolve_without_export_falls_back_to_tensorflow():
    assert engines.resolve("auto", {}, has_gpu=False) == "tensorflow"
    assert engines.resolve("auto", {"openvino": {}}, has_gpu=False) == "openvino"
    assert engines.resolve("openvino", {"openvino": {}}, has_gpu=True) == "openvino"  # asked for explicitly


def test_label_with_openvino_matches_tensorflow_rows_errors_and_calibration(
    exported_dir, real_faces, tmp_path, ray_session
):
    """The same job through each engine: the same rows and errors, p_male within f32 round-off, calibrated."""
    manifest_uri = tmp_path / "inputs.parquet"
    inputs = real_faces.head(20)[["image_uri", "male"]].copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    inputs = pd.concat([inputs, pd.DataFrame({"image_uri": [str(broken)], "male": [1]})], ignore_index=True)
    inputs.to_parquet(manifest_uri)
    outputs = {}
    for engine in ("tensorflow", "openvino"):
        out = tmp_path / engine
        argv = ["label", "--model", str(exported_dir), "--input", str(manifest_uri), "--output", str(out)]
        assert cli.main([*argv, "--engine", engine, "--precision", "f32", "--batch-size", "8"]) == 0
        outputs[engine] = pd.read_parquet(out).sort_values("image_uri").reset_index(drop=True)
    tf_rows, ov_rows = outputs["tensorflow"], outputs["openvino"]
    assert len(ov_rows) == len(inputs) and list(ov_rows["image_uri"]) == list(tf_rows["image_uri"])
    assert (
        ov_rows["error"].notna().sum() == 1
        and "broken.jpg" in ov_rows.loc[ov_rows["error"].notna(), "image_uri"].item()
    )
    np.testing.assert_allclose(ov_rows["p_male"], tf_rows["p_male"], atol=1e-4)
    assert (ov_rows["label"].fillna("") == tf_rows["label"].fillna("")).all()
    keras_bundle = bundle.ModelBundle.load(str(exported_dir))
    good = ov_rows[ov_rows["error"].isna()]
    expected = keras_bundle.predict_proba(
        np.stack([keras_bundle.load_pixels(Path(u).read_bytes()) for u in good["image_uri"]])
    )
    np.testing.assert_allclose(good["p_male"], expected, atol=1e-4)  # the card's temperature applied


def test_label_with_openvino_but_no_export_fails_before_ray(tiny_model_dir, real_faces, tmp_path):
    manifest_uri = tmp_path / "inputs.parquet"
    real_faces.head(3)[["image_uri"]].to_parquet(manifest_uri)
    options = labeling.LabelingOptions(str(tiny_model_dir), str(manifest_uri), str(tmp_path / "out"), engine="openvino")
    with pytest.raises(labeling.LabelingError, match=f"{tiny_model_dir}: no openvino export"):
        labeling.prepare(options)
    with pytest.raises(engines.EngineError, match=f"{tiny_model_dir}: no openvino export"):
        serving.settings(None, [], model=str(tiny_model_dir), engine="openvino")


def test_serve_with_openvino_answers_like_tensorflow(exported_dir, real_faces, ray_session):
    """A Serve replica on OpenVINO (f32) over real HTTP: calibrated p_male as the Keras model gives, errors as ever."""
    import httpx
    from ray import serve

    settings = serving.settings(None, [], model=str(exported_dir), engine="openvino", precision="f32", port=free_port())
    datas = [Path(uri).read_bytes() for uri in real_faces["image_uri"].head(6)]
    keras_bundle = bundle.ModelBundle.load(str(exported_dir))
    expected = keras_bundle.predict_proba(np.stack([keras_bundle.load_pixels(data) for data in datas]))
    try:
        url = serving.start(settings)
        with httpx.Client(base_url=url, timeout=120) as client:
            files = [("image", (f"{index}.jpg", data, "image/jpeg")) for index, data in enumerate(datas)]
            answer = client.post("/v1/predict", files=files)
            broken = client.post("/v1/predict", content=b"not a jpeg", headers={"content-type": "image/jpeg"})
            card = client.get("/v1/model").json()
    finally:
        serve.shutdown()
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose([item["p_male"] for item in answer.json()["predictions"]], expected, atol=1e-4)
    assert broken.status_code == 422
    assert "openvino" in card["exports"] and card["temperature"] == TEMPERATURE
