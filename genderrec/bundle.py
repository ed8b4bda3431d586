"""A model directory as one object: the Keras model and its typed card (the input contract that travels with it).

Like timm's ``PretrainedCfg``, the card says how to feed the model (input size, crop box, preprocessing and flip
averaging, both inside the model), what its outputs mean (class names, threshold) and how to calibrate them
(temperature). Everything after training — evaluation, labeling, serving, train_all, benchmarks — loads a
:class:`ModelBundle` and asks it; nothing else reads ``card.json``.

A model directory (local or ``s3://``)::

    model.keras     the Keras model: RGB 0..255 in, p(male) out
    card.json       the ModelCard below (``card_version`` 1)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genderrec import engines, images, metrics, storage
from genderrec.config import TrainingPrecision

MODEL_FILE = "model.keras"
CARD_FILE = "card.json"
CLASS_NAMES = ("female", "male")
CARD_VERSION = 1


class BundleError(ValueError):
    """A model directory is missing, incomplete or has a card this version cannot read; the message says which."""


class Calibration(BaseModel):
    """How the card's temperature was fitted (``genderrec calibrate``)."""

    model_config = ConfigDict(extra="forbid")

    method: str = "temperature scaling: p = sigmoid(logit(p_model) / temperature)"
    fitted_on: str
    val_log_loss_before: float
    val_log_loss_after: float
    fitted: str


class ModelCard(BaseModel):
    """What labeling and serving need to use a model, and what a reader needs to trust it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    card_version: Literal[1] = CARD_VERSION
    name: str
    architecture: str
    mode: Literal["fine_tune", "transfer"]
    input_size: tuple[int, int]
    crop_box: tuple[int, int, int, int] | None = None
    preprocessing: str = Field(description="the architecture's preprocess_input, a layer inside the model")
    flip_average: bool = False
    class_names: tuple[str, str] = CLASS_NAMES
    threshold: float = Field(default=0.5, gt=0, lt=1)
    temperature: float | None = Field(default=None, gt=0)
    calibration: Calibration | None = None
    weights: str = "none (random init)"
    # The Keras dtype policy the weights were trained in; model.keras itself is float32 whatever it was.
    training_precision: TrainingPrecision = "float32"
    metrics: dict[str, float | int] = {}
    split: str | None = None
    created: str | None = None
    selection: str | None = None
    run: str | None = None
    # Checked exports beside model.keras, by format: files, check images and largest |Δp| (genderrec export).
    exports: dict[str, dict[str, Any]] = {}

    @property
    def version(self) -> str:
        """The model's name and creation time, e.g. ``resnet50_fine_tune@2026-01-01T00:00:00+00:00``."""
        return f"{self.name}@{self.created}" if self.created else self.name

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Cards written before ``card_version`` existed (genderrec 0.1 main) carry a free-text ``input`` key."""
    if "card_version" not in raw:
        raw = {key: value for key, value in raw.items() if key != "input"}
        raw.setdefault("preprocessing", "unknown (card written before card_version 1)")
    return raw


def read_card(model_dir: str) -> ModelCard:
    """The typed card of a model directory; errors name the file and what is wrong with it."""
    uri = storage.join(model_dir, CARD_FILE)
    if not storage.exists(uri):
        raise BundleError(f"{model_dir}: no {CARD_FILE} (expected a model directory written by genderrec train-all)")
    try:
        return ModelCard.model_validate(_migrate(json.loads(storage.read_text(uri))))
    except json.JSONDecodeError as exc:
        problem = f"not JSON ({exc})"
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors())
    raise BundleError(
        f"{uri}: not a model card this genderrec can read ({problem}); re-export the model with this version "
        "(genderrec train-all, or ModelBundle(model, card).save(dir))"
    )


def write_card(model_dir: str, card: ModelCard) -> None:
    storage.write_text(storage.join(model_dir, CARD_FILE), card.to_json())


@dataclass
class ModelBundle:
    """A model with its card; ``predict_proba`` gives calibrated p(male), ``label`` the class name.

    ``model`` is the Keras model (``None`` when loaded for an exported engine only); ``engine`` runs it
    (TensorFlow on the Keras model unless :meth:`load` chose another).
    """

    model: Any  # keras.Model: RGB 0..255 in, raw p(male) out
    card: ModelCard
    engine: engines.Engine | None = None

    def __post_init__(self):
        if self.engine is None:
            self.engine = engines.TensorflowEngine(self.model)

    @classmethod
    def load(
        cls, model_dir: str, engine: engines.EngineName = "tensorflow", precision: engines.Precision = "bf16"
    ) -> ModelBundle:
        """Load a model directory (local or ``s3://``) for ``engine``; the card is checked before the model is read.

        Inside a Ray actor or replica, ``auto`` and the engine's threads follow the resources Ray assigned to it.
        """
        from genderrec import models

        card = read_card(model_dir)
        engines.check_available(engine, card.exports, model_dir)
        cpus, has_gpu = engines.ray_cpus_and_gpu()
        if engines.resolve(engine, card.exports, has_gpu) == "openvino":
            return cls(None, card, engines.OpenvinoEngine(model_dir, threads=cpus, precision=precision))
        model_uri = storage.join(model_dir, MODEL_FILE)
        if not storage.exists(model_uri):
            raise BundleError(f"{model_dir}: no {MODEL_FILE}")
        if cpus:
            engines.limit_tensorflow_threads(cpus)
        return cls(models.load_model(model_uri), card)

    def export(self, model_dir: str, fmt: engines.ExportFormat, sample: np.ndarray) -> ModelBundle:
        """Write and check ``fmt`` beside the model in ``model_dir`` and record it in the card there."""
        record = engines.export(self.model, model_dir, fmt, np.asarray(sample, dtype=np.float32))
        self.card = self.card.model_copy(update={"exports": {**self.card.exports, fmt: record}})
        write_card(model_dir, self.card)
        return self

    def save(self, model_dir: str) -> None:
        """Write ``model.keras`` (no optimizer state) and ``card.json``."""
        from genderrec import models

        models.save_model(self.model, storage.join(model_dir, MODEL_FILE))
        write_card(model_dir, self.card)

    def check_inputs(self, uris=(), count: int = 16, seed: int = 0) -> np.ndarray:
        """Inputs to check an export on: the given images decoded for this model, else seeded noise of its size."""
        uris = list(uris)[:count]
        if uris:
            return np.stack([self.load_pixels(storage.read_bytes(uri)) for uri in uris])
        return np.random.default_rng(seed).uniform(0, 255, (count, *self.card.input_size, 3)).astype(np.float32)

    def load_pixels(self, data: bytes, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Image bytes → this model's input, decoded exactly as in training (input size and crop box)."""
        return images.load_image(data, self.card.input_size, self.card.crop_box, max_pixels=max_pixels)

    def raw_proba(self, pixels: np.ndarray) -> np.ndarray:
        """The model's own p(male) for a batch of inputs, before calibration."""
        if len(pixels) == 0:
            return np.zeros(0)
        return self.engine.predict(pixels)

    def calibrate(self, raw_p_male) -> np.ndarray:
        """The card's temperature applied to raw p(male) (identity without one)."""
        return metrics.apply_temperature(raw_p_male, self.card.temperature)

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated p(male) for a batch of model inputs (``(n, height, width, 3)``, RGB 0..255)."""
        return self.calibrate(self.raw_proba(pixels))

    def label(self, p_male) -> np.ndarray | str:
        """Class names at the card's threshold: ``male`` where p_male >= threshold."""
        female, male = self.card.class_names
        chosen = np.where(np.asarray(p_male) >= self.card.threshold, male, female)
        return str(chosen) if chosen.ndim == 0 else chosen
