"""Model directories for tests and benchmarks: a Keras model saved with a typed card, as train_all saves one."""

from __future__ import annotations

from genderrec.bundle import ModelBundle, ModelCard

CREATED = "2026-01-01T00:00:00+00:00"  # the test cards' creation time (labels carry name@created)


def make_card(**fields) -> ModelCard:
    """A card for a random-init GoogLeNet at 40x32 unless ``fields`` say otherwise."""
    from genderrec import models

    architecture = fields.get("architecture", "googlenet")
    defaults = {
        "name": f"{architecture}_{fields.get('mode', 'fine_tune')}",
        "architecture": architecture,
        "mode": "fine_tune",
        "input_size": (40, 32),
        "created": CREATED,
    }
    if "preprocessing" not in fields:
        defaults["preprocessing"] = models.architecture(architecture).preprocessing_name + " (inside the model)"
    return ModelCard(**{**defaults, **fields})


def calibrated_copy(model_dir, destination, temperature: float):
    """A copy of a model directory whose card carries ``temperature`` (labeling, serving and engines must apply it)."""
    import shutil

    from genderrec import bundle

    shutil.copytree(model_dir, destination)
    card = bundle.read_card(str(destination))
    bundle.write_card(str(destination), card.model_copy(update={"temperature": temperature}))
    return destination


def save_bundle(model, model_dir, **fields) -> ModelBundle:
    """Save ``model`` as a model directory with :func:`make_card` ``(**fields)``; returns the bundle."""
    bundle = ModelBundle(model, make_card(**fields))
    bundle.save(str(model_dir))
    return bundle
