import keras
import numpy as np
import pytest

from genderrec import models
from genderrec.config import HeadConfig

SIZE = (40, 32)
RNG = np.random.default_rng(0)


def head_parameters(features: int, head: HeadConfig = HeadConfig()) -> int:
    return features * head.dense_units + head.dense_units + head.dense_units + 1


@pytest.mark.parametrize(
    "name, reference",
    [
        ("vgg16", keras.applications.vgg16.preprocess_input),
        ("vgg19", keras.applications.vgg19.preprocess_input),
        ("resnet50", keras.applications.resnet50.preprocess_input),
        ("resnet101", keras.applications.resnet.preprocess_input),
    ],
)
def test_each_architecture_uses_its_own_preprocess_input(name, reference):
    batch = RNG.uniform(0, 255, (2, *SIZE, 3)).astype("float32")
    layer = models.ArchitecturePreprocessing(name)
    out = np.asarray(layer(batch))
    np.testing.assert_allclose(out, reference(batch.copy()), rtol=1e-6)
    # caffe-style: BGR order and ImageNet means subtracted, never the notebook's blanket 1/255
    assert not np.allclose(out, batch / 255.0)
    np.testing.assert_allclose(out[..., 0], batch[..., 2] - 103.939, rtol=1e-5, atol=1e-3)


def test_googlenet_preprocessing_scales_to_plus_minus_one():
    batch = np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")
    np.testing.assert_allclose(np.asarray(models.ArchitecturePreprocessing("googlenet")(batch)), [[[[-1, 0, 1]]]])


def test_preprocessing_is_inside_the_model():
    model = models.build_model("resnet50", "fine_tune", SIZE)
    assert isinstance(model.layers[1], models.ArchitecturePreprocessing)
    assert model.layers[1].architecture_name == "resnet50"


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_every_architecture_builds_with_the_right_frozen_and_trainable_weights(name):
    fine_tune = models.build_model(name, "fine_tune", SIZE)
    transfer = models.build_model(name, "transfer", SIZE)
    assert fine_tune.output.shape == (None, 1) and transfer.output.shape == (None, 1)
    backbone_of = {
        model: next(layer for layer in model.layers if isinstance(layer, keras.Model))
        for model in (fine_tune, transfer)
    }
    features = int(np.prod(backbone_of[transfer].output.shape[1:]))
    counts = models.parameter_counts(transfer)
    assert counts["params_trainable"] == head_parameters(features)  # only the head trains
    assert not backbone_of[transfer].trainable
    batchnorm_stats = sum(
        int(np.prod(weight.shape))
        for layer in backbone_of[fine_tune].layers
        if isinstance(layer, keras.layers.BatchNormalization)
        for weight in (layer.moving_mean, layer.moving_variance)
    )
    counts = models.parameter_counts(fine_tune)
    assert counts["params_trainable"] == counts["params_total"] - batchnorm_stats
    assert counts["params_total"] == models.parameter_counts(transfer)["params_total"]


def test_transfer_keeps_batchnorm_in_inference_mode():
    model = models.build_model("resnet50", "transfer", (32, 32))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    batchnorm = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    before = np.asarray(batchnorm.moving_mean).copy()
    model.fit(RNG.uniform(0, 255, (8, 32, 32, 3)), np.ones(8), epochs=1, verbose=0)
    np.testing.assert_array_equal(np.asarray(batchnorm.moving_mean), before)


def test_googlenet_is_inception_v1():
    backbone = models.googlenet(input_shape=(224, 224, 3))
    assert backbone.output.shape == (None, 7, 7, 1024)
    inception_blocks = {layer.name.split("_")[0] for layer in backbone.layers if layer.name.startswith("inception")}
    assert len(inception_blocks) == 9
    assert 5.5e6 < backbone.count_params() < 6.5e6  # ~6M parameters without the classifier, as in the paper


def test_googlenet_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="googlenet has no official Keras ImageNet weights"):
        models.build_backbone("googlenet", (32, 32, 3), "imagenet")


def test_vgg_from_random_weights_keeps_the_signal_through_its_relu_layers():
    """He-normal kernels (std sqrt(2 / fan_in)): Keras' Glorot default would shrink the activations layer by layer."""
    backbone = models.build_backbone("vgg19", (32, 32, 3), "none")
    convolutions = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    for index, layer in enumerate(convolutions):
        kernel = np.asarray(layer.kernel)
        he_std = np.sqrt(2 / np.prod(kernel.shape[:3])) / (models.FIRST_LAYER_INPUT_STD if index == 0 else 1)
        assert 0.7 < kernel.std() / he_std < 1.1, layer.name  # truncated normal: ~0.88
    # pixels as VGG's preprocessing leaves them (std about 64) come out near unit scale (Glorot: 0.016, He alone: 21)
    x = np.random.default_rng(0).normal(scale=64, size=(4, 32, 32, 3)).astype("float32")
    assert 0.1 < np.asarray(backbone(x)).std() < 5


@pytest.mark.parametrize(("name", "blocks"), [("resnet50", 3 + 4 + 6 + 3), ("resnet101", 3 + 4 + 23 + 3)])
def test_resnet_from_random_weights_starts_each_residual_block_as_its_shortcut(name, blocks):
    """Zero-init residual (Goyal et al. 2017): every block's residual branch adds exactly zero at first."""
    backbone = models.build_backbone(name, (32, 32, 3), "none")
    branch_ends = [layer for layer in backbone.layers if layer.name.endswith("_3_bn")]
    assert len(branch_ends) == blocks
    residuals = keras.Model(backbone.input, [layer.output for layer in branch_ends])
    x = np.random.default_rng(0).normal(scale=64, size=(2, 32, 32, 3)).astype("float32")
    assert all(not np.asarray(residual).any() for residual in residuals(x))
    assert np.asarray(backbone(x)).std() > 0


@pytest.mark.parametrize("name", ["vgg16", "googlenet"])
def test_backbone_weights_from_a_file(tmp_path, name):
    source = models.build_backbone(name, (32, 32, 3), "none")
    path = tmp_path / f"{name}.weights.h5"
    source.save_weights(path)
    loaded = models.build_backbone(name, (32, 32, 3), str(path))
    fresh = models.build_backbone(name, (32, 32, 3), "none")
    for expected, actual in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(expected, actual)
    assert not all(np.array_equal(a, b) for a, b in zip(source.get_weights(), fresh.get_weights(), strict=True))
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        models.build_backbone(name, (32, 32, 3), str(tmp_path / "missing.weights.h5"))


def test_head_is_configurable():
    model = models.build_model("vgg16", "transfer", SIZE, head=HeadConfig(pooling="avg", dense_units=0, dropout=0))
    assert models.parameter_counts(model)["params_trainable"] == 512 + 1


def test_saved_model_round_trip_keeps_predictions(tmp_path):
    model = models.build_model("googlenet", "fine_tune", SIZE)
    batch = RNG.uniform(0, 255, (3, *SIZE, 3)).astype("float32")
    models.save_model(model, str(tmp_path / "m" / "model.keras"))
    loaded = models.load_model(str(tmp_path / "m" / "model.keras"))
    np.testing.assert_allclose(loaded.predict(batch, verbose=0), model.predict(batch, verbose=0), atol=1e-6)


def test_flip_average_is_the_mean_over_the_image_and_its_mirror_and_survives_saving(tmp_path):
    # A linear model over raw pixels: unlike a random-init zoo model (p ~ 0.5 whatever the input), its mirror
    # image's prediction differs clearly, so the test can tell averaging from passing the image through.
    inputs = keras.Input((*SIZE, 3))
    logit = keras.layers.Dense(1, kernel_initializer=keras.initializers.RandomNormal(stddev=1e-4, seed=0))(
        keras.layers.Flatten()(inputs)
    )
    model = keras.Model(inputs, keras.layers.Activation("sigmoid")(logit))
    batch = RNG.uniform(0, 255, (3, *SIZE, 3)).astype("float32")
    averaged = models.with_flip_average(model)
    expected = (model.predict(batch, verbose=0) + model.predict(batch[:, :, ::-1], verbose=0)) / 2
    assert not np.allclose(model.predict(batch, verbose=0), expected, atol=1e-2)  # the mirror really differs
    np.testing.assert_allclose(averaged.predict(batch, verbose=0), expected, atol=1e-5)
    models.save_model(averaged, str(tmp_path / "m" / "model.keras"))
    loaded = models.load_model(str(tmp_path / "m" / "model.keras"))
    np.testing.assert_allclose(loaded.predict(batch, verbose=0), expected, atol=1e-5)
