"""Shared fixtures: real CelebA faces from ../shared, one local Ray for the session, a tiny trained model."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
CELEBA_DIR = Path(os.environ.get("GENDERREC_CELEBA_DIR", REPO.parent / "shared" / "celeba")).resolve()
TINY_SIZE = (40, 32)


@pytest.fixture(scope="session")
def celeba_dir() -> Path:
    if not (CELEBA_DIR / "list_attr_celeba.txt").exists():
        pytest.fail(f"CelebA sample not found at {CELEBA_DIR} (set GENDERREC_CELEBA_DIR)")
    return CELEBA_DIR


@pytest.fixture(scope="session")
def celeba_manifest(celeba_dir):
    """The whole CelebA sample as a manifest (identity split)."""
    from genderrec import manifest

    frame, _ = manifest.build_manifest(str(celeba_dir), split="identity", seed=7)
    return frame


@pytest.fixture(scope="session")
def real_faces(celeba_manifest):
    """60 real faces (balanced male/female) with their labels, as a DataFrame of image_uri, male, ..."""
    male = celeba_manifest[celeba_manifest["male"] == 1].head(30)
    female = celeba_manifest[celeba_manifest["male"] == 0].head(30)
    return pd.concat([male, female]).sort_values("image_id").reset_index(drop=True)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, as on CI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, celeba_manifest):
    """A googlenet model trained for a few steps on real faces, exported as a model directory (model.keras + card)."""
    from genderrec import images, models, training
    from genderrec.config import parse_config
    from tests.helpers.bundles import save_bundle

    train = celeba_manifest[celeba_manifest["split"] == "train"].head(96)
    cfg = parse_config(
        {"data": {"manifest": "unused", "image_size": list(TINY_SIZE)}, "training": {"learning_rate": 1e-3}}
    )
    model = models.build_model(
        "googlenet", "fine_tune", TINY_SIZE, "none", cfg.models.head.model_copy(update={"dense_units": 16})
    )
    training.compile_model(model, cfg, steps_per_epoch=6)
    dataset = images.tf_dataset(train["image_uri"], train["male"], TINY_SIZE, 16, training=True)
    model.fit(dataset, epochs=1, verbose=0)
    model_dir = tmp_path_factory.mktemp("model") / "selected"
    save_bundle(model, model_dir, input_size=TINY_SIZE)
    return model_dir
