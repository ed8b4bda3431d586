"""The model zoo: one registry maps an architecture name to its backbone builder and its own preprocessing.

Every model is ``RGB 0..255 → ArchitecturePreprocessing → backbone → shared head → p(male)``. The
preprocessing is a layer inside the model, so labeling and serving cannot feed it differently from
training (the notebook gave every model ``rescale=1/255``, which sank ResNet transfer learning).
The head and the freeze policy are written once, here, for all five architectures.

A training model may carry more outputs than it serves: attribute sigmoid outputs next to p(male) (auxiliary
heads, one ``targets`` tensor: column 0 is p(male)) or in its place (attribute pretraining, whose backbone is what
is kept). :func:`served` cuts a training model down to p(male), the only output a saved model has.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import layers

from genderrec import storage
from genderrec.config import HeadConfig


@dataclass(frozen=True)
class Architecture:
    """A backbone builder (``include_top=False``) with its preprocessing and whether Keras ships ImageNet weights;
    ``random_init``: what it changes in Keras' initialisation when it starts from random weights."""

    name: str
    backbone: Callable[..., keras.Model]
    preprocess: Callable
    preprocessing_name: str
    has_imagenet_weights: bool = True
    random_init: Callable[[keras.Model], None] | None = None


def _googlenet_preprocess(x):
    """GoogLeNet here expects inputs scaled to [-1, 1] (Keras' "tf" mode); weights files must match."""
    return keras.applications.imagenet_utils.preprocess_input(x, mode="tf")


def _conv(x, filters, kernel, strides=1, name=None):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _inception(x, c1, c3r, c3, c5r, c5, pool_proj, name):
    branch1 = _conv(x, c1, 1, name=f"{name}_1x1")
    branch3 = _conv(_conv(x, c3r, 1, name=f"{name}_3x3r"), c3, 3, name=f"{name}_3x3")
    branch5 = _conv(_conv(x, c5r, 1, name=f"{name}_5x5r"), c5, 5, name=f"{name}_5x5")
    pooled = layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    branch_pool = _conv(pooled, pool_proj, 1, name=f"{name}_poolproj")
    return layers.Concatenate(name=f"{name}_concat")([branch1, branch3, branch5, branch_pool])


# (name, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) per Szegedy et al. 2014, table 1; None = max-pool /2.
_GOOGLENET_BLOCKS = (
    ("3a", 64, 96, 128, 16, 32, 32),
    ("3b", 128, 128, 192, 32, 96, 64),
    None,
    ("4a", 192, 96, 208, 16, 48, 64),
    ("4b", 160, 112, 224, 24, 64, 64),
    ("4c", 128, 128, 256, 24, 64, 64),
    ("4d", 112, 144, 288, 32, 64, 64),
    ("4e", 256, 160, 320, 32, 128, 128),
    None,
    ("5a", 256, 160, 320, 32, 128, 128),
    ("5b", 384, 192, 384, 48, 128, 128),
)


def googlenet(include_top=False, weights=None, input_shape=None, name="googlenet"):
    """Inception v1 (Szegedy et al. 2014) without auxiliary classifiers or top.

    Like torchvision's GoogLeNet, each convolution is followed by BatchNorm (trainable from scratch);
    Keras ships no ImageNet weights for it, so ``weights`` must be ``None`` (load a file afterwards).
    """
    if include_top or weights is not None:
        raise ValueError("googlenet is built without top and without weights; load a weights file afterwards")
    inputs = keras.Input(input_shape)
    x = _conv(inputs, 64, 7, strides=2, name="stem1")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool1")(x)
    x = _conv(x, 64, 1, name="stem2")
    x = _conv(x, 192, 3, name="stem3")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool2")(x)
    for index, block in enumerate(_GOOGLENET_BLOCKS):
        if block is None:
            x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{index}")(x)
        else:
            x = _inception(x, *block[1:], name=f"inception{block[0]}")
    return keras.Model(inputs, x, name=name)


# He-normal kernels keep unit-variance inputs at unit variance through ReLU layers; VGG's caffe preprocessing leaves
# pixels at a standard deviation of about 64, so the first layer's kernels are scaled down by as much. Measured on
# attribute pretraining at 40x32 (6 epochs at 3e-4, then a head on the frozen backbone, val ROC-AUC for Male):
# VGG19 0.962 (Glorot: stayed at the attributes' base rates), VGG16 0.963 (Glorot 0.963; He without the scaling:
# diverged in its first epoch and never recovered).
FIRST_LAYER_INPUT_STD = 64.0


def _he_init(backbone: keras.Model) -> None:
    convolutions = [layer for layer in backbone.layers if isinstance(layer, layers.Conv2D)]
    for index, layer in enumerate(convolutions):
        kernel = keras.initializers.HeNormal()(layer.kernel.shape)
        layer.kernel.assign(kernel / FIRST_LAYER_INPUT_STD if index == 0 else kernel)


# Goyal et al. 2017 ("zero-init residual", as torchvision's ``zero_init_residual``): each residual block starts as
# its shortcut, so a deep ResNet from random weights first trains like a shallow one.
def _zero_init_residuals(backbone: keras.Model) -> None:
    for layer in backbone.layers:
        if re.fullmatch(r"conv\d_block\d+_3_bn", layer.name):
            layer.gamma.assign(keras.ops.zeros_like(layer.gamma))


REGISTRY: dict[str, Architecture] = {
    # VGG has no batch normalisation: under Glorot-uniform kernels each ReLU layer halves the signal's variance
    # (He et al. 2015); a VGG19 attribute pretraining at 40x32 stayed at the attributes' base rates (_he_init).
    # ResNet from random weights starts with its residual branches off (_zero_init_residuals).
    "vgg16": Architecture(
        "vgg16",
        keras.applications.VGG16,
        keras.applications.vgg16.preprocess_input,
        "vgg16.preprocess_input",
        random_init=_he_init,
    ),
    "vgg19": Architecture(
        "vgg19",
        keras.applications.VGG19,
        keras.applications.vgg19.preprocess_input,
        "vgg19.preprocess_input",
        random_init=_he_init,
    ),
    "googlenet": Architecture(
        "googlenet", googlenet, _googlenet_preprocess, "scale to [-1, 1]", has_imagenet_weights=False
    ),
    "resnet50": Architecture(
        "resnet50",
        keras.applications.ResNet50,
        keras.applications.resnet50.preprocess_input,
        "resnet.preprocess_input",
        random_init=_zero_init_residuals,
    ),
    "resnet101": Architecture(
        "resnet101",
        keras.applications.ResNet101,
        keras.applications.resnet.preprocess_input,
        "resnet.preprocess_input",
        random_init=_zero_init_residuals,
    ),
}


def architecture(name: str) -> Architecture:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(REGISTRY)}") from None


@keras.saving.register_keras_serializable(package="genderrec")
class ArchitecturePreprocessing(layers.Layer):
    """Applies an architecture's own ``preprocess_input`` to RGB 0..255 inputs; saved with the model."""

    def __init__(self, architecture_name: str, **kwargs):
        super().__init__(**kwargs)
        self.architecture_name = architecture_name
        self._preprocess = architecture(architecture_name).preprocess

    def call(self, inputs):
        return self._preprocess(inputs)

    def get_config(self):
        return {**super().get_config(), "architecture_name": self.architecture_name}


@keras.saving.register_keras_serializable(package="genderrec")
class HorizontalFlip(layers.Layer):
    """Mirrors images left to right, always (``RandomFlip`` only does so at random, in training)."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-2)


def with_flip_average(model: keras.Model) -> keras.Model:
    """Test-time augmentation inside the model: p(male) averaged over the image and its mirror image.

    Faces are left-right symmetric for this task, so the two views' errors partly cancel (at twice the inference
    cost); labeling, serving and evaluation get it with the model, nothing else changes.
    """
    inputs = keras.Input(model.input_shape[1:], name="image")
    mirrored = HorizontalFlip(name="mirror")(inputs)
    outputs = layers.Average(name="p_male_flip_average")([model(inputs), model(mirrored)])
    return keras.Model(inputs, outputs, name=f"{model.name}_flip_average")


def describe_weights(source: str, file: str | None = None) -> str:
    """How a weights source reads in the leaderboard and model card (``file``: where ``attributes`` saved them)."""
    if source == "attributes":
        return f"attributes: pretrained on the manifest's other attributes (train split), file: {file}"
    return {"imagenet": "imagenet", "none": "none (random init)"}.get(source, f"file: {source}")


def build_backbone(name: str, input_shape: tuple[int, int, int], weights: str = "none") -> keras.Model:
    """Build a backbone with ``weights`` = ``imagenet`` (Keras download or ``$KERAS_HOME`` cache), ``none``, or a file."""
    arch = architecture(name)
    if weights == "imagenet":
        if not arch.has_imagenet_weights:
            raise ValueError(f"{name} has no official Keras ImageNet weights: give a weights file (local or s3://)")
        return arch.backbone(include_top=False, weights="imagenet", input_shape=input_shape)
    backbone = arch.backbone(include_top=False, weights=None, input_shape=input_shape)
    if weights in ("none", None):
        if arch.random_init:
            arch.random_init(backbone)
    else:
        suffix = ".weights.h5" if weights.endswith(".weights.h5") else ".h5"
        with storage.local_path(weights, suffix=suffix) as path:
            backbone.load_weights(path)
    return backbone


def build_model(
    name: str,
    mode: str,
    image_size: tuple[int, int],
    weights: str = "none",
    head: HeadConfig = HeadConfig(),
    *,
    male: bool = True,
    attributes: int = 0,
) -> keras.Model:
    """Preprocessing + backbone + the shared head; ``transfer`` freezes the backbone (BatchNorm in inference mode).

    The head ends in p(male) and/or ``attributes`` sigmoid outputs; with both, the model's one output is their
    concatenation (``targets``: p(male) first), which :func:`served` cuts back to p(male).
    """
    if mode not in ("fine_tune", "transfer"):
        raise ValueError(f"unknown mode {mode!r}; choose fine_tune or transfer")
    inputs = keras.Input((*image_size, 3), name="image")
    x = ArchitecturePreprocessing(name, name="preprocess")(inputs)
    backbone = build_backbone(name, (*image_size, 3), weights)
    if mode == "transfer":
        backbone.trainable = False
        x = backbone(x, training=False)
    else:
        x = backbone(x)
    x = layers.Flatten(name="flatten")(x) if head.pooling == "flatten" else layers.GlobalAveragePooling2D(name="gap")(x)
    if head.dense_units:
        x = layers.Dense(head.dense_units, activation="relu", name="head_dense")(x)
    if head.dropout:
        x = layers.Dropout(head.dropout, name="head_dropout")(x)
    heads = [layers.Dense(1, activation="sigmoid", dtype="float32", name="p_male")(x)] if male else []
    if attributes:
        heads.append(layers.Dense(attributes, activation="sigmoid", dtype="float32", name="attributes")(x))
    if not heads:
        raise ValueError("a model needs p(male) or attribute outputs")
    outputs = heads[0] if len(heads) == 1 else layers.Concatenate(name="targets", dtype="float32")(heads)
    return keras.Model(inputs, outputs, name=f"{name}_{mode}")


def served(model: keras.Model) -> keras.Model:
    """The model as saved and served: RGB in, p(male) out (auxiliary attribute outputs dropped)."""
    if "targets" not in {layer.name for layer in model.layers}:
        return model
    return keras.Model(model.inputs, model.get_layer("p_male").output, name=model.name)


@keras.saving.register_keras_serializable(package="genderrec")
class AuxiliaryLoss(keras.losses.Loss):
    """Binary cross-entropy of p(male) (column 0) plus ``aux_weight`` x the mean over the attribute columns."""

    def __init__(self, aux_weight: float, label_smoothing: float = 0.0, name="auxiliary_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.aux_weight, self.label_smoothing = aux_weight, label_smoothing

    def call(self, y_true, y_pred):
        per_column = keras.losses.binary_crossentropy(
            y_true[..., None], y_pred[..., None], label_smoothing=self.label_smoothing
        )
        return per_column[:, 0] + self.aux_weight * keras.ops.mean(per_column[:, 1:], axis=-1)

    def get_config(self):
        return {**super().get_config(), "aux_weight": self.aux_weight, "label_smoothing": self.label_smoothing}


class _MaleColumn:
    """A metric on column 0 (p(male)) of a ``targets`` output, so ``accuracy``/``auc`` mean what they mean alone."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true[:, :1], y_pred[:, :1], sample_weight)


@keras.saving.register_keras_serializable(package="genderrec")
class MaleAccuracy(_MaleColumn, keras.metrics.BinaryAccuracy):
    pass


@keras.saving.register_keras_serializable(package="genderrec")
class MaleAUC(_MaleColumn, keras.metrics.AUC):
    pass


def parameter_counts(model: keras.Model) -> dict[str, int]:
    trainable = sum(int(keras.ops.size(weight)) for weight in model.trainable_weights)
    total = model.count_params()
    return {"params_total": int(total), "params_trainable": trainable}


def as_float32(model: keras.Model) -> keras.Model:
    """The same model with every layer in float32 and the trained weights, for a run trained in a mixed policy.

    Mixed-policy variables are float32 already, so the weights are copied exactly; only the compute dtype changes.
    Labeling, serving, the ONNX/OpenVINO exports and calibration then see the float32 model they always did.
    """

    def float32_layer(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")  # the outer Functional models take the global policy
    try:
        clone = keras.models.clone_model(model, clone_function=float32_layer, recursive=True)
    finally:
        keras.config.set_dtype_policy(previous)
    clone.set_weights(model.get_weights())
    return clone


def save_model(model: keras.Model, uri: str) -> None:
    """Save a model as ``.keras`` to a local path or ``s3://`` URI."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="genderrec-") as tmp:
        local = f"{tmp}/model.keras"
        model.save(local)
        storage.copy(local, uri)


def save_backbone_weights(model: keras.Model, architecture_name: str, uri: str) -> None:
    """Save the backbone of a trained model as a ``.weights.h5`` file (local or ``s3://``) that
    :func:`build_backbone` loads (``attributes`` pretraining's product)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="genderrec-") as tmp:
        local = f"{tmp}/backbone.weights.h5"
        model.get_layer(architecture_name).save_weights(local)
        storage.copy(local, uri)


def load_model(uri: str) -> keras.Model:
    """Load a ``.keras`` model from a local path or ``s3://`` URI (custom layers are registered above)."""
    with storage.local_path(uri, suffix=".keras") as path:
        return keras.saving.load_model(path, compile=False)
