"""Typed, strict configuration: every YAML the user edits is validated here.

Unknown or misspelled keys are errors (a silently ignored ``learning_rat`` would waste a GPU-day).
``${VAR}`` and ``${VAR:-default}`` in YAML values are expanded from the environment, and
``key.sub=value`` overrides (from the command line) are applied before validation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ARCHITECTURES = ("vgg16", "vgg19", "googlenet", "resnet50", "resnet101")
MODES = ("fine_tune", "transfer")
DEFAULT_LEARNING_RATE = 1e-4  # the notebook's
TrainingPrecision = Literal["float32", "mixed_bfloat16", "mixed_float16"]  # Keras dtype policies a run can train in


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_architecture_keys(value, key: str, runs: bool = False):
    """A per-architecture mapping (``{architecture: value}``, key ``default`` for the rest; with ``runs`` also
    ``architecture/mode`` keys) names known ones only."""
    known = set(ARCHITECTURES) | ({f"{arch}/{mode}" for arch in ARCHITECTURES for mode in MODES} if runs else set())
    if isinstance(value, dict):
        unknown = [name for name in value if name != "default" and name not in known]
        if unknown:
            raise ValueError(f"{key} has unknown {'runs' if runs else 'architectures'} {unknown}")
    return value


def for_architecture(value, architecture: str, fallback, mode: str | None = None):
    """``value`` itself, or its most specific entry (``architecture/mode``, ``architecture``, ``default``) when it is
    a per-architecture mapping."""
    if not isinstance(value, dict):
        return value
    for key in (f"{architecture}/{mode}", architecture, "default"):
        if key in value:
            return value[key]
    return fallback


class DataConfig(_Strict):
    """Where the faces come from and how they are split and sized."""

    celeba_dir: str | None = None
    manifest: str | None = None
    split: Literal["seed", "identity", "official"] = "identity"
    subset: int | None = Field(default=None, gt=0)
    fractions: tuple[float, float, float] = (0.64, 0.16, 0.20)
    seed: int = 42
    image_size: tuple[int, int] = (218, 178)
    crop_box: tuple[int, int, int, int] | None = None
    # auto: cache the decoded uint8 pixels in the training worker when they fit cache_budget_fraction of its memory
    # (resources.memory_per_run_gib, else the Ray node's), else stream them; memory: always (fails up front if they
    # cannot fit); none: always stream. The old true/false mean auto/none.
    cache: Literal["auto", "memory", "none"] = "auto"
    cache_budget_fraction: float = Field(default=0.5, gt=0, le=1)
    # CPUs each Ray Data decode task reserves; decoding runs on any node's CPUs, not only the training worker's.
    decode_cpus: float = Field(default=1.0, gt=0)
    skip_missing: bool = False
    # none: train on the images as they are; align: train and validate on each image's face as --faces detect|auto
    # frames it (MTCNN landmarks, detected once per manifest and cached in the run directory: genderrec.train_faces).
    faces: Literal["none", "align"] = "none"

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_bool_is_auto_or_none(cls, value):
        if isinstance(value, bool):
            return "auto" if value else "none"
        return value

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value):
        if abs(sum(value) - 1.0) > 1e-6 or min(value) < 0:
            raise ValueError(f"train/val/test fractions must be >= 0 and sum to 1, got {value}")
        return value

    @field_validator("image_size")
    @classmethod
    def _image_size_large_enough(cls, value):
        if min(value) < 32:
            raise ValueError(f"image_size (height, width) must be at least 32x32, got {value}")
        return value

    @model_validator(mode="after")
    def _has_source(self):
        if not self.celeba_dir and not self.manifest:
            raise ValueError("set data.celeba_dir (CelebA folder) or data.manifest (a prepared Parquet manifest)")
        return self


class AugmentConfig(_Strict):
    """The notebook's augmentation, applied to the training split only, plus what ordinary photos bring and CelebA's
    aligned faces rarely show: ``brightness`` and ``contrast`` (Keras' factors, 0 = off) and ``blur`` (the share of
    images given a Gaussian blur of sigma 0.5-1.5)."""

    rotation_degrees: float = Field(default=20.0, ge=0)
    shift: float = Field(default=0.2, ge=0, lt=1)
    zoom: float = Field(default=0.0, ge=0, lt=1)
    horizontal_flip: bool = True
    brightness: float = Field(default=0.0, ge=0, le=1)
    contrast: float = Field(default=0.0, ge=0, le=1)
    blur: float = Field(default=0.0, ge=0, le=1)

    def off(self) -> AugmentConfig:
        return AugmentConfig(rotation_degrees=0.0, shift=0.0, horizontal_flip=False)


class HeadConfig(_Strict):
    """Classifier head on top of every backbone (shared, never copied per architecture)."""

    pooling: Literal["flatten", "avg"] = "flatten"
    dense_units: int = Field(default=256, ge=0)
    dropout: float = Field(default=0.5, ge=0, lt=1)


class ModelsConfig(_Strict):
    """Which (architecture, mode) runs to train, and where backbone weights come from.

    ``weights`` is ``imagenet``, ``none``, ``attributes`` or a local/``s3://`` weights file, either for all
    architectures or as a mapping ``{architecture: source}`` (key ``default`` for the rest). GoogLeNet has
    no official Keras ImageNet weights, so by default it starts from random weights (and says so). ``attributes``:
    each backbone is first trained on the manifest's other attributes (train split, Male excluded) and both modes
    start from that (the offline stand-in for ImageNet; ``pretrain_epochs`` sets its length).

    ``aux_attributes`` (names, or ``all``): the Male classifier trains with these attributes as extra sigmoid
    outputs, their mean loss weighted by ``aux_loss_weight``; the saved model outputs p(male) only.
    """

    architectures: tuple[str, ...] = ARCHITECTURES
    modes: tuple[Literal["fine_tune", "transfer"], ...] = MODES
    weights: str | dict[str, str] = {"default": "imagenet", "googlenet": "none"}
    head: HeadConfig = HeadConfig()
    # Evaluate and export each model as the average of its p(male) on the image and on its mirror image
    # (test-time flip augmentation inside the exported model: twice the inference cost).
    flip_average: bool = False
    # Attribute pretraining's epochs, one value or ``{architecture: epochs}`` (key ``default``); unset: training.epochs.
    pretrain_epochs: int | dict[str, int] | None = None
    # Attribute pretraining augments like the runs only when set: at 40x32 (configs/local.yaml) augmentation left
    # VGG16's pretraining at the attributes' base rates (a frozen-backbone head: val ROC-AUC 0.54 against 0.96).
    pretrain_augment: bool = False
    aux_attributes: tuple[str, ...] | Literal["all"] = ()
    aux_loss_weight: float = Field(default=0.5, gt=0)

    @field_validator("architectures")
    @classmethod
    def _known_architectures(cls, value):
        unknown = [name for name in value if name not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"unknown architectures {unknown}; choose from {list(ARCHITECTURES)}")
        return value

    @field_validator("weights")
    @classmethod
    def _known_weight_keys(cls, value):
        return _check_architecture_keys(value, "weights")

    @field_validator("pretrain_epochs")
    @classmethod
    def _positive_epochs(cls, value):
        if value is not None and any(epochs < 1 for epochs in (value.values() if isinstance(value, dict) else [value])):
            raise ValueError(f"pretrain_epochs must be >= 1, got {value}")
        return _check_architecture_keys(value, "pretrain_epochs")

    def weights_for(self, architecture: str) -> str:
        return for_architecture(self.weights, architecture, "imagenet")

    def pretrain_epochs_for(self, architecture: str) -> int | None:
        return for_architecture(self.pretrain_epochs, architecture, None)

    def uses_attributes(self) -> bool:
        """Whether a run needs the manifest's attribute columns (attribute pretraining or auxiliary heads)."""
        return bool(self.aux_attributes) or any(self.weights_for(name) == "attributes" for name in self.architectures)


class EarlyStoppingConfig(_Strict):
    monitor: str = "val_accuracy"
    patience: int = Field(default=5, ge=1)


class TrainingConfig(_Strict):
    """One run's recipe (the notebook's by default). ``learning_rate`` is one value or a mapping
    ``{architecture or architecture/mode: rate}`` (key ``default`` for the rest): VGG, without batch normalisation,
    needs a smaller rate from random weights than the others, while a head on a frozen backbone takes a larger one."""

    epochs: int = Field(default=25, ge=1)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float | dict[str, float] = DEFAULT_LEARNING_RATE
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    class_weight: Literal["balanced", "none"] = "balanced"
    early_stopping: EarlyStoppingConfig | None = EarlyStoppingConfig()
    steps_per_epoch: int | None = Field(default=None, ge=1)
    inference_timing_images: int = Field(default=1000, ge=1)
    # Keras dtype policy of the training worker. mixed_*: float32 weights, bfloat16/float16 compute, the p_male
    # output layer in float32; mixed_float16 (GPUs) adds loss scaling. The saved model is float32 either way.
    precision: TrainingPrecision = "float32"
    # Weight initialisation, shuffling and augmentation; unset: data.seed. A second run of one recipe on the same
    # split takes another training seed (data.seed also draws the split).
    seed: int | None = None

    @field_validator("learning_rate")
    @classmethod
    def _positive_rates(cls, value):
        rates = value.values() if isinstance(value, dict) else [value]
        if any(rate <= 0 for rate in rates):
            raise ValueError(f"learning rates must be > 0, got {value}")
        return _check_architecture_keys(value, "learning_rate", runs=True)

    def learning_rate_for(self, architecture: str, mode: str | None = None) -> float:
        return for_architecture(self.learning_rate, architecture, DEFAULT_LEARNING_RATE, mode)


class ResourcesConfig(_Strict):
    """Ray resources for each run; one Ray Train worker per run (Keras 3 has no multi-worker strategy)."""

    use_gpu: bool = False
    cpus_per_run: float = Field(default=1.0, gt=0)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=2, ge=0)
    # Memory a run's worker may use (GiB), for the data.cache decision; unset: the smallest Ray node that can host it.
    memory_per_run_gib: float | None = Field(default=None, gt=0)
    address: str | None = None


class SelectionConfig(_Strict):
    """How train_all picks the model that labeling and serving load: on the validation split unless told otherwise
    (a test metric is allowed, and the selection reason then says the test metrics are optimistic)."""

    metric: Literal["val_accuracy", "val_auc", "best_val_accuracy", "test_accuracy", "test_auc"] = "val_accuracy"
    tolerance: float = Field(default=0.005, ge=0)
    pin: str | None = None

    @field_validator("pin")
    @classmethod
    def _pin_names_a_run(cls, value):
        if value is not None:
            arch, _, mode = value.partition("/")
            if arch not in ARCHITECTURES or mode not in MODES:
                raise ValueError(f"pin must look like 'resnet50/fine_tune', got {value!r}")
        return value


class RunConfig(_Strict):
    """Where results go: ``<storage_path>/<name>/`` (a local folder or ``s3://bucket/prefix``)."""

    storage_path: str = "runs"
    name: str = "celeba"


class StorageConfig(_Strict):
    """S3 endpoint override for MinIO/Ceph/R2; credentials always come from the standard AWS chain."""

    s3_endpoint: str | None = None
    s3_region: str | None = None


class Config(_Strict):
    data: DataConfig
    augment: AugmentConfig = AugmentConfig()
    models: ModelsConfig = ModelsConfig()
    training: TrainingConfig = TrainingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    selection: SelectionConfig = SelectionConfig()
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()

    @property
    def training_seed(self) -> int:
        """The seed of a run's randomness (``training.seed``, else ``data.seed``)."""
        return self.data.seed if self.training.seed is None else self.training.seed

    @model_validator(mode="after")
    def _pin_is_trained(self):
        pin = self.selection.pin
        if pin:
            arch, _, mode = pin.partition("/")
            if arch not in self.models.architectures or mode not in self.models.modes:
                raise ValueError(f"selection.pin {pin!r} is not among the configured runs")
        if "googlenet" in self.models.architectures and self.models.weights_for("googlenet") == "imagenet":
            raise ValueError(
                "googlenet has no official Keras ImageNet weights: set models.weights.googlenet to a "
                "weights file (local or s3://) or to 'none'"
            )
        return self


_ENV_PATTERN = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_env(value):
    if isinstance(value, str):

        def replace(match):
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise ConfigError(f"environment variable {name} is not set (used as ${{{name}}})")
            return default

        return _ENV_PATTERN.sub(replace, value)
    if isinstance(value, dict):
        return {key: _expand_env(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_env(item) for item in value]
    return value


def apply_override(raw: dict, override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a raw config mapping, in place."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(text)


def read_yaml(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A YAML mapping with ``key.sub=value`` overrides applied and ``${VAR:-default}`` expanded."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides:
        apply_override(raw, override)
    return _expand_env(raw)


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, expand, override and validate a YAML config; errors name the file and the key."""
    return parse_config(read_yaml(path, overrides), source=str(path))


def parse_config(raw: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '<top>'}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
