"""training.precision: a mixed-precision run trains through Ray Train and is deployed as a float32 model."""

import io
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from genderrec import comparison, engines, models, train_data, training
from genderrec.bundle import ModelBundle
from genderrec.config import load_config

REPO = Path(__file__).resolve().parents[1]


def layer_policies(model) -> set[str]:
    """Every layer's dtype policy name, nested backbones included."""
    names = set()
    for layer in model.layers:
        names.add(layer.dtype_policy.name)
        if isinstance(layer, keras.Model):
            names |= layer_policies(layer)
    return names


def loss_scaled(path: Path) -> bool:
    """Whether a ``.keras`` checkpoint's optimizer state is a LossScaleOptimizer's (an inner optimizer in it)."""
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        return "inner_optimizer" in weights["optimizer"]


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_a_mixed_precision_run_trains_and_is_saved_as_float32(ray_session, tmp_path, celeba_manifest, precision):
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        ["data.manifest=unused", "training.steps_per_epoch=2", f"training.precision={precision}"],
    )
    frame = celeba_manifest.groupby("split").head(32)
    summary = training.run_one(cfg, "googlenet", "fine_tune", train_data.prepare(cfg, frame), str(tmp_path / "trainer"))
    checkpoint_file = Path(summary["checkpoint_uri"], training.MODEL_FILE)
    # The worker trained in the policy (only the p_male output in float32), with loss scaling for float16.
    assert loss_scaled(checkpoint_file) == (precision == "mixed_float16")
    trained = models.load_model(str(checkpoint_file))
    assert (
        layer_policies(trained) == {precision, "float32"} and trained.get_layer("p_male").dtype_policy.name == "float32"
    )

    test, val = frame[frame["split"] == "test"], frame[frame["split"] == "val"]
    evaluate = ray_session.remote(comparison.evaluate_run).options(num_cpus=cfg.resources.cpus_per_run)  # as train_all
    row = ray_session.get(evaluate.remote(summary, test, val, cfg.model_dump(mode="json"), str(tmp_path)))
    deployed = ModelBundle.load(row["model_uri"])
    assert deployed.card.training_precision == precision
    assert layer_policies(deployed.model) == {"float32"}
    for saved, learned in zip(deployed.model.get_weights(), trained.get_weights(), strict=True):
        np.testing.assert_array_equal(saved, learned)  # the trained weights, exactly
    pixels = deployed.check_inputs(test["image_uri"], count=8)
    before_saving = models.as_float32(trained).predict(pixels, verbose=0)
    np.testing.assert_allclose(deployed.model.predict(pixels, verbose=0), before_saving, atol=1e-6)
    # The mixed model computed in 16 bits; the float32 one with the same weights is close to it.
    np.testing.assert_allclose(trained.predict(pixels, verbose=0), before_saving, atol=0.05)
    if precision == "mixed_bfloat16":  # what `genderrec export --format openvino` checks: |Δp| <= 1e-4
        record = deployed.export(row["model_uri"], "openvino", pixels).card.exports["openvino"]
        assert record["max_abs_dp"] <= engines.EXPORT_TOLERANCE
