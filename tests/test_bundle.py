"""ModelBundle: one typed card read and written in one place; old cards still load; calibration applied once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genderrec import bundle

# A card as genderrec 0.1 (main before the bundle) wrote it: no card_version, a free-text "input" key.
LEGACY_CARD = {
    "name": "googlenet_fine_tune",
    "architecture": "googlenet",
    "mode": "fine_tune",
    "input_size": [40, 32],
    "crop_box": [0, 20, 178, 198],
    "input": "RGB, 0..255, resized to input_size (after crop_box, if any)",
    "preprocessing": "tf (inside the model)",
    "class_names": ["female", "male"],
    "threshold": 0.6,
    "weights": "none (random init)",
    "flip_average": False,
    "metrics": {"test_accuracy": 0.9},
    "split": "identity",
    "created": "2026-01-01T00:00:00+00:00",
    "temperature": 2.0,
}


def tiny_model(size=(40, 32)):
    import keras

    inputs = keras.Input((*size, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def test_legacy_card_loads_typed(tmp_path):
    (tmp_path / bundle.CARD_FILE).write_text(json.dumps(LEGACY_CARD))
    card = bundle.read_card(str(tmp_path))
    assert card.input_size == (40, 32) and card.crop_box == (0, 20, 178, 198)
    assert card.version == "googlenet_fine_tune@2026-01-01T00:00:00+00:00"
    assert card.card_version == bundle.CARD_VERSION


def test_unreadable_card_says_how_to_reexport(tmp_path):
    (tmp_path / bundle.CARD_FILE).write_text(json.dumps({**LEGACY_CARD, "input_size": "big"}))
    with pytest.raises(bundle.BundleError, match=r"card\.json.*input_size.*re-export"):
        bundle.read_card(str(tmp_path))
    with pytest.raises(bundle.BundleError, match="no card.json"):
        bundle.read_card(str(tmp_path / "missing"))


def test_round_trip_calibrates_and_labels(tmp_path):
    card = bundle.ModelCard.model_validate({k: v for k, v in LEGACY_CARD.items() if k != "input"})
    bundle.ModelBundle(tiny_model(), card).save(str(tmp_path))
    assert json.loads((tmp_path / bundle.CARD_FILE).read_text())["card_version"] == bundle.CARD_VERSION
    loaded = bundle.ModelBundle.load(str(tmp_path))
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 40, 32, 3)).astype(np.float32)
    raw = loaded.raw_proba(pixels)
    expected = 1 / (1 + np.exp(-np.log(raw / (1 - raw)) / 2.0))
    np.testing.assert_allclose(loaded.predict_proba(pixels), expected, rtol=1e-6)
    assert list(loaded.label([0.59, 0.6])) == ["female", "male"]  # the card's threshold, not 0.5
