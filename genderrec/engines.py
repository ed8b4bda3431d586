"""Inference engines and export formats: how a bundle's Keras model is written for other runtimes and run on CPUs.

Labeling actors and serving replicas run the model through an :class:`Engine`: TensorFlow (the Keras model itself)
or OpenVINO (the model exported with ``model.export(..., format="openvino")``, which on CPUs with AVX512_BF16 or AMX
runs in bf16 and is about twice as fast). Exports live beside ``model.keras`` and are listed in the card's
``exports``; :func:`export` checks each one against the Keras model on sample inputs before it is recorded, so a
broken file is never announced. ``auto`` picks TensorFlow where Ray gave the actor a GPU, OpenVINO otherwise when
the export exists.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from genderrec import storage

log = logging.getLogger(__name__)

EngineName = Literal["auto", "tensorflow", "openvino"]
Precision = Literal["bf16", "f32"]
ExportFormat = Literal["openvino", "saved_model", "onnx"]
# What each format writes in the model directory (``model.export`` names the OpenVINO weights ``model.bin``).
EXPORT_FILES: dict[str, tuple[str, ...]] = {
    "openvino": ("model.xml", "model.bin"),
    "saved_model": ("saved_model",),
    "onnx": ("model.onnx",),
}
# The largest |Δp| an export may differ from the Keras model by on the check images (OpenVINO is checked at f32:
# the file must be right; bf16 is a run-time trade of the last digits for speed, reported beside it).
EXPORT_TOLERANCE = 1e-4


class EngineError(ValueError):
    """An engine or export cannot be used as asked; the message names the model directory and what to do."""


class Engine(Protocol):
    """Raw p(male) for a batch of model inputs (``(n, height, width, 3)`` float32, RGB 0..255)."""

    name: str

    def predict(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass
class TensorflowEngine:
    """The Keras model itself (TensorFlow backend): the reference, and the engine for GPUs."""

    model: object
    batch_size: int = 64
    name: str = "tensorflow"

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, dtype=np.float32)
        if len(pixels) <= self.batch_size:
            outputs = self.model.predict_on_batch(pixels)
        else:
            outputs = self.model.predict(pixels, batch_size=self.batch_size, verbose=0)
        return np.asarray(outputs, dtype=np.float64).reshape(len(pixels))


class OpenvinoEngine:
    """The OpenVINO export on the CPU, limited to ``threads`` (the CPUs Ray gave this actor or replica)."""

    name = "openvino"

    def __init__(self, model_dir: str, threads: int | None = None, precision: Precision = "bf16", batch_size: int = 64):
        import openvino as ov

        xml, weights = (storage.join(model_dir, name) for name in EXPORT_FILES["openvino"])
        if not storage.exists(xml):
            raise EngineError(missing_export_message(model_dir, "openvino"))
        core = ov.Core()
        model = core.read_model(storage.read_text(xml), ov.Tensor(np.frombuffer(storage.read_bytes(weights), np.uint8)))
        # No pinning: an actor shares its node's cores with other processes, and pinned threads wait on busy cores.
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.batch_size = batch_size

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        outputs = [
            np.asarray(self.request.infer([pixels[start : start + self.batch_size]])[0], dtype=np.float64)
            for start in range(0, len(pixels), self.batch_size)
        ]
        return np.concatenate(outputs).reshape(len(pixels)) if outputs else np.zeros(0)


def missing_export_message(model_dir: str, fmt: str) -> str:
    return (
        f"{model_dir}: no {fmt} export ({', '.join(EXPORT_FILES[fmt])}); "
        f"write it with: genderrec export --model {model_dir} --format {fmt}"
    )


def resolve(requested: EngineName, exports: dict[str, str], has_gpu: bool) -> str:
    """The engine to use: ``auto`` is TensorFlow on a GPU, OpenVINO on CPUs when exported, else TensorFlow."""
    if requested != "auto":
        return requested
    if has_gpu or "openvino" not in exports:
        return "tensorflow"
    return "openvino"


def check_available(requested: EngineName, exports: dict[str, str], model_dir: str) -> None:
    """Fail before any cluster work when the chosen engine's export is missing."""
    if requested == "openvino" and "openvino" not in exports:
        raise EngineError(missing_export_message(model_dir, "openvino"))


def limit_tensorflow_threads(cpus: float) -> None:
    """Keep TensorFlow within the CPUs Ray gave this process (by default it uses every core of the node).

    TensorFlow fixes its thread pools when it starts: a process whose TensorFlow already runs with other settings
    (a reused Ray worker) keeps them, with a warning.
    """
    import tensorflow as tf

    threads = max(1, int(round(cpus)))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError as exc:
        log.warning("TensorFlow already started in this process; its threads stay as they are (%s)", exc)


def ray_cpus_and_gpu() -> tuple[int | None, bool]:
    """(CPUs, whether a GPU) that Ray assigned to the current actor or replica; (None, False) outside Ray and in
    a driver (e.g. a test holding a local Ray), which Ray assigns nothing to."""
    import ray

    context = ray.get_runtime_context() if ray.is_initialized() else None
    if context is None or context.worker.mode != ray.WORKER_MODE:  # not in Ray, or a driver (nothing assigned)
        return None, False
    resources = context.get_assigned_resources()
    cpus = resources.get("CPU")
    return (max(1, round(cpus)) if cpus else None), bool(ray.get_gpu_ids())


def export(model, model_dir: str, fmt: ExportFormat, sample: np.ndarray) -> dict:
    """Write ``model`` in ``fmt`` beside ``model.keras`` and check it on ``sample``; returns the check's numbers.

    The export is written to a temporary folder, run, compared with the Keras model, and only then copied into the
    model directory; a format that cannot express the model raises :class:`EngineError` and writes nothing.
    """
    reference = TensorflowEngine(model).predict(sample)
    with tempfile.TemporaryDirectory(prefix="genderrec-export-") as tmp:
        target = Path(tmp, EXPORT_FILES[fmt][0])
        try:
            model.export(str(target), format="tf_saved_model" if fmt == "saved_model" else fmt, verbose=False)
            exported = _run_local_export(fmt, tmp, sample, "f32")
        except Exception as exc:  # any converter failure: say which format and architecture, keep nothing
            raise EngineError(f"{model_dir}: {fmt} export of {model.name} failed: {exc}") from exc
        largest = float(np.max(np.abs(exported - reference)))
        if largest > EXPORT_TOLERANCE:
            raise EngineError(
                f"{model_dir}: {fmt} export differs from the Keras model by {largest:.2g} in p(male) on "
                f"{len(sample)} check images (tolerance {EXPORT_TOLERANCE}); not written"
            )
        record = {"files": list(EXPORT_FILES[fmt]), "check_images": len(sample), "max_abs_dp": largest}
        if fmt == "openvino":
            record["max_abs_dp_bf16"] = float(np.max(np.abs(_run_local_export(fmt, tmp, sample, "bf16") - reference)))
        for name in EXPORT_FILES[fmt]:
            storage.copy(str(Path(tmp, name)), storage.join(model_dir, name))
    log.info("%s: %s export written and checked: %s", model_dir, fmt, record)
    return record


def _run_local_export(fmt: str, folder: str, sample: np.ndarray, precision: Precision) -> np.ndarray:
    """Run a freshly written export with its own runtime (OpenVINO, TensorFlow SavedModel, onnxruntime)."""
    if fmt == "openvino":
        return OpenvinoEngine(folder, threads=os.cpu_count(), precision=precision).predict(sample)
    if fmt == "saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(Path(folder, "saved_model")))  # keep it referenced while it runs
        return np.asarray(loaded.serve(sample)).reshape(len(sample))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(Path(folder, "model.onnx")), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: sample.astype(np.float32)})
    return np.asarray(outputs[0], dtype=np.float64).reshape(len(sample))
