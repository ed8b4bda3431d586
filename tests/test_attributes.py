"""CelebA's other attributes on a real local Ray: pretraining backbones on them through the real Tune grid (the
offline stand-in for ImageNet) and auxiliary attribute heads next to p(male), on ~200 real faces at 40x32."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genderrec import comparison, manifest, models, storage, training
from genderrec.bundle import ModelBundle
from genderrec.config import load_config
from tests.conftest import TINY_SIZE

REPO = Path(__file__).resolve().parents[1]
AUX = ["Eyeglasses", "Smiling", "Wearing_Lipstick"]


def attribute_config(manifest_uri, run_dir, *overrides):
    """configs/tiny.yaml at 40x32 on a given manifest, GoogLeNet only (both modes), from attribute pretraining."""
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.manifest={manifest_uri}",
            f"data.image_size=[{TINY_SIZE[0]}, {TINY_SIZE[1]}]",
            f"run.storage_path={run_dir.parent}",
            f"run.name={run_dir.name}",
            "models.architectures=[googlenet]",
            "models.weights=attributes",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def faces(tmp_path_factory, celeba_manifest):
    """200 real faces (128 train, 32 val, 40 test) with their 39 attribute columns, as a manifest file."""
    counts = {"train": 128, "val": 32, "test": 40}
    frame = pd.concat([celeba_manifest[celeba_manifest["split"] == split].head(n) for split, n in counts.items()])
    uri = str(tmp_path_factory.mktemp("faces") / "manifest.parquet")
    manifest.write_manifest(frame.reset_index(drop=True), uri)
    return uri


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory, faces):
    """One train_all: attribute pretraining, then fine_tune and transfer with auxiliary heads, evaluated."""
    run_dir = tmp_path_factory.mktemp("attributes") / "run"
    cfg = attribute_config(faces, run_dir, f"models.aux_attributes={AUX}")
    comparison.train_all(cfg)
    return cfg, run_dir


def backbone_weights(model, architecture="googlenet") -> list[np.ndarray]:
    return model.get_layer(architecture).get_weights()


def checkpoint_model(run_dir, mode):
    summary = json.loads((run_dir / "trainer" / f"googlenet_{mode}" / training.SUMMARY_FILE).read_text())
    return models.load_model(storage.join(summary["checkpoint_uri"], training.MODEL_FILE))


def test_pretraining_writes_the_weights_file_through_the_tune_grid(job):
    _, run_dir = job
    (weights_file,) = (run_dir / training.PRETRAIN_DIR).glob("*.weights.h5")
    assert weights_file.name.startswith("googlenet_40x32_")
    assert (run_dir / "tune_pretrain").is_dir()  # a Tune experiment of its own, before the runs' "tune"
    summary = json.loads(next((run_dir / training.PRETRAIN_DIR).glob(f"*/{training.SUMMARY_FILE}")).read_text())
    assert summary["epochs_run"] == 1 and summary["weights_uri"] == "none"
    pretrained = models.load_model(storage.join(summary["checkpoint_uri"], training.MODEL_FILE))
    assert pretrained.output.shape[-1] == 39  # the other 39 attributes, Male excluded
    loaded = models.build_backbone("googlenet", (*TINY_SIZE, 3), str(weights_file))
    assert all(np.array_equal(a, b) for a, b in zip(backbone_weights(pretrained), loaded.get_weights(), strict=True))


def test_transfer_keeps_the_pretrained_backbone_and_fine_tune_trains_it(job):
    _, run_dir = job
    (weights_file,) = (run_dir / training.PRETRAIN_DIR).glob("*.weights.h5")
    pretrained = models.build_backbone("googlenet", (*TINY_SIZE, 3), str(weights_file)).get_weights()
    transfer = backbone_weights(checkpoint_model(run_dir, "transfer"))
    assert all(np.array_equal(a, b) for a, b in zip(pretrained, transfer, strict=True))
    fine_tune = backbone_weights(checkpoint_model(run_dir, "fine_tune"))
    assert not all(np.array_equal(a, b) for a, b in zip(pretrained, fine_tune, strict=True))

    board = pd.read_parquet(run_dir / "leaderboard.parquet")
    assert len(board) == 2 and board["weights"].str.startswith("attributes: pretrained").all()
    assert board["weights"].str.endswith(weights_file.name).all()
    for mode in ("fine_tune", "transfer"):
        card = ModelBundle.load(str(run_dir / "models" / f"googlenet_{mode}")).card
        assert card.weights.startswith("attributes: pretrained") and card.weights.endswith(weights_file.name)


def test_aux_heads_are_absent_from_the_saved_model_and_p_male_is_the_trained_male_output(job, faces):
    _, run_dir = job
    frame = manifest.read_manifest(faces)
    pixels = np.stack([training.images.load_image(Path(uri).read_bytes(), TINY_SIZE) for uri in frame["image_uri"][:8]])
    for mode in ("fine_tune", "transfer"):
        trained = checkpoint_model(run_dir, mode)
        assert trained.output.shape[-1] == 1 + len(AUX)  # p(male), then the auxiliary attributes
        bundle = ModelBundle.load(str(run_dir / "models" / f"googlenet_{mode}"))
        names = {layer.name for layer in bundle.model.layers}
        assert bundle.model.output.shape[-1] == 1 and "attributes" not in names and "targets" not in names
        expected = trained.predict(pixels, verbose=0)[:, 0]
        np.testing.assert_allclose(bundle.raw_proba(pixels).ravel(), expected, atol=1e-6)
    selected = ModelBundle.load(str(run_dir / "selected"), engine="openvino")  # the CPU export of the served model
    assert selected.raw_proba(pixels).shape[0] == 8


def test_a_rerun_reuses_the_pretrained_weights(job, faces, capsys):
    cfg, run_dir = job
    (weights_file,) = (run_dir / training.PRETRAIN_DIR).glob("*.weights.h5")
    before = {path: path.stat().st_mtime_ns for path in (run_dir / training.PRETRAIN_DIR).rglob("*")}
    capsys.readouterr()
    summaries = training.run_grid(cfg, manifest.read_manifest(faces), str(run_dir))
    assert f"attribute pretraining of googlenet: reusing {weights_file}" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in (run_dir / training.PRETRAIN_DIR).rglob("*")} == before
    assert {summary["weights_uri"] for summary in summaries} == {str(weights_file)}


def test_a_manifest_without_attribute_columns_fails_before_any_training(tmp_path, faces):
    bare = str(tmp_path / "bare.parquet")
    manifest.write_manifest(manifest.read_manifest(faces)[["image_uri", "male", "split"]], bare)
    for name, overrides in {
        "pretraining": [],
        "aux": ["models.weights=none", "models.aux_attributes=[Smiling]"],
    }.items():
        run_dir = tmp_path / name
        with pytest.raises(manifest.ManifestError, match=f"{bare}: manifest has no attribute columns"):
            comparison.train_all(attribute_config(bare, run_dir, *overrides))
        assert not (run_dir / "trainer").exists() and not (run_dir / training.PRETRAIN_DIR).exists()
