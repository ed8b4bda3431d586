"""Exports (OpenVINO, SavedModel, ONNX) checked against the Keras model; engine choice by Ray resources."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from genderrec import bundle, engines


@pytest.fixture(scope="module")
def exported_dir(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model directory with every export written through ``genderrec export``."""
    from genderrec import cli

    model_dir = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
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


def test_resolve_without_export_falls_back_to_tensorflow():
    assert engines.resolve("auto", {}, has_gpu=False) == "tensorflow"
    assert engines.resolve("auto", {"openvino": {}}, has_gpu=False) == "openvino"
    assert engines.resolve("openvino", {"openvino": {}}, has_gpu=True) == "openvino"  # asked for explicitly
