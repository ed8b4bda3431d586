"""CelebA parsing (malformed files on a synthetic layout) and split guarantees (on the real CelebA sample)."""

import numpy as np
import pytest
from PIL import Image

from genderrec import manifest
from genderrec.cli import main as cli_main
from genderrec.manifest import ManifestError

NAMES = ["Attractive", "Male", "Young"]


def make_layout(root, rows, images=None, partition=None, identity=None, declared=None):
    """A CelebA-shaped folder: rows are (file name, [attribute values])."""
    (root / "img_align_celeba").mkdir(parents=True)
    for name in images if images is not None else [row[0] for row in rows]:
        Image.new("RGB", (8, 10), (120, 80, 60)).save(root / "img_align_celeba" / name)
    lines = [str(declared if declared is not None else len(rows)), " ".join(NAMES)]
    lines += [f"{name} " + " ".join(f"{value:2d}" for value in values) for name, values in rows]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    names = [row[0] for row in rows]
    partition = partition if partition is not None else {name: "0" for name in names}
    identity = identity if identity is not None else {name: str(index) for index, name in enumerate(names)}
    (root / "list_eval_partition.txt").write_text("".join(f"{k} {v}\n" for k, v in partition.items()))
    (root / "identity_CelebA.txt").write_text("".join(f"{k} {v}\n" for k, v in identity.items()))
    return root


ROWS = [("000001.jpg", [1, -1, 1]), ("000002.jpg", [-1, 1, 1]), ("000003.jpg", [1, 1, -1])]


def test_parses_a_valid_layout(tmp_path):
    celeba = manifest.read_celeba(str(make_layout(tmp_path, ROWS)))
    frame = celeba.frame
    assert list(frame["image_id"]) == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert list(frame["Male"]) == [0, 1, 1]
    assert list(frame["Attractive"]) == [1, 0, 1]
    assert frame["image_uri"].iloc[0].endswith("img_align_celeba/000001.jpg")
    assert celeba.skipped == []


def test_relative_celeba_dir_gives_absolute_image_uris(tmp_path, monkeypatch):
    """Ray workers run in another working directory: a relative ``../shared/celeba`` must not leak into URIs."""
    make_layout(tmp_path / "data" / "celeba", ROWS)
    monkeypatch.chdir(tmp_path / "data")
    frame = manifest.read_celeba("../data/celeba").frame
    assert frame["image_uri"].iloc[0] == str(tmp_path / "data" / "celeba" / "img_align_celeba" / "000001.jpg")


@pytest.mark.parametrize(
    "rows, declared, message",
    [
        ([("000001.jpg", [1, -1])], None, r"list_attr_celeba.txt:3: expected 4 fields .* found 3"),
        ([("000001.jpg", [1, 0, 1])], None, r"list_attr_celeba.txt:3: attribute values must be 1 or -1"),
        ([("000001.jpg", [1, 1, 1]), ("000001.jpg", [1, 1, 1])], None, r":4: duplicate image id 000001.jpg .*line 3"),
        (ROWS, 5, r"list_attr_celeba.txt:1: declares 5 images but lists 3"),
    ],
)
def test_malformed_attribute_file(tmp_path, rows, declared, message):
    images = sorted({row[0] for row in rows})
    root = make_layout(tmp_path, rows, images=images, declared=declared)
    with pytest.raises(ManifestError, match=message):
        manifest.read_celeba(str(root))


def test_missing_image_fails_with_file_and_line_or_is_recorded(tmp_path):
    root = make_layout(tmp_path, ROWS, images=["000001.jpg", "000003.jpg"])
    with pytest.raises(ManifestError, match=r"list_attr_celeba.txt:4: 000002.jpg: image file missing"):
        manifest.read_celeba(str(root))
    celeba = manifest.read_celeba(str(root), skip_missing=True)
    assert list(celeba.frame["image_id"]) == ["000001.jpg", "000003.jpg"]
    assert [(item["image_id"], item["where"].rsplit("/", 1)[-1]) for item in celeba.skipped] == [
        ("000002.jpg", "list_attr_celeba.txt:4")
    ]


def test_image_without_attributes_disagrees_with_folder(tmp_path):
    root = make_layout(tmp_path, ROWS, images=["000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg"])
    with pytest.raises(ManifestError, match=r"000004.jpg: image has no row in list_attr_celeba.txt"):
        manifest.read_celeba(str(root))
    assert manifest.read_celeba(str(root), skip_missing=True).skipped[0]["image_id"] == "000004.jpg"


def test_missing_identity_and_bad_partition(tmp_path):
    root = make_layout(tmp_path / "a", ROWS, identity={"000001.jpg": "1", "000002.jpg": "2"})
    with pytest.raises(ManifestError, match=r"000003.jpg: not in identity_CelebA.txt"):
        manifest.read_celeba(str(root))
    root = make_layout(tmp_path / "b", ROWS, partition={"000001.jpg": "0", "000002.jpg": "7", "000003.jpg": "1"})
    with pytest.raises(ManifestError, match="partition must be 0, 1 or 2"):
        manifest.read_celeba(str(root))


def test_missing_annotation_file_is_named(tmp_path):
    root = make_layout(tmp_path, ROWS)
    (root / "identity_CelebA.txt").unlink()
    with pytest.raises(ManifestError, match=r"identity_CelebA.txt: file not found"):
        manifest.read_celeba(str(root))


def split_sets(frame):
    return {split: set(frame.loc[frame["split"] == split, "image_id"]) for split in manifest.SPLITS}


@pytest.mark.parametrize("mode", ["seed", "identity"])
def test_split_guarantees_on_real_celeba(celeba_manifest, mode):
    frame = manifest.assign_splits(celeba_manifest.drop(columns="split"), mode, subset=5000, seed=3)
    assert len(frame) == 5000
    assert frame["image_id"].is_unique
    sets = split_sets(frame)
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    fractions = frame["split"].value_counts(normalize=True)
    assert fractions["train"] == pytest.approx(0.64, abs=0.02)
    assert fractions["val"] == pytest.approx(0.16, abs=0.02)
    assert fractions["test"] == pytest.approx(0.20, abs=0.02)
    male_rate = frame["male"].mean()
    for split in manifest.SPLITS:
        assert frame.loc[frame["split"] == split, "male"].mean() == pytest.approx(male_rate, abs=0.02), split
    again = manifest.assign_splits(celeba_manifest.drop(columns="split"), mode, subset=5000, seed=3)
    assert again[["image_id", "split"]].equals(frame[["image_id", "split"]])
    other = manifest.assign_splits(celeba_manifest.drop(columns="split"), mode, subset=5000, seed=4)
    assert not other[["image_id", "split"]].equals(frame[["image_id", "split"]])


def test_identity_split_keeps_every_person_in_one_split(celeba_manifest):
    frame = manifest.assign_splits(celeba_manifest.drop(columns="split"), "identity", seed=11)
    splits_per_person = frame.groupby("identity")["split"].nunique()
    assert splits_per_person.max() == 1
    people_with_several_images = (frame.groupby("identity").size() > 1).sum()
    assert people_with_several_images > 500  # the guarantee is not vacuous on this sample


def test_seed_split_leaks_identities_which_is_why_identity_is_default(celeba_manifest):
    frame = manifest.assign_splits(celeba_manifest.drop(columns="split"), "seed", seed=11)
    assert frame.groupby("identity")["split"].nunique().max() > 1


def test_official_split_follows_partition_file(celeba_manifest):
    frame = manifest.assign_splits(celeba_manifest.drop(columns="split"), "official")
    assert (frame["split"] == frame["official_split"]).all()


def test_prepare_celeba_command_writes_a_manifest(tmp_path, celeba_dir):
    out = tmp_path / "celeba.parquet"
    code = cli_main(["prepare-celeba", "--celeba-dir", str(celeba_dir), "--out", str(out), "--subset", "300"])
    assert code == 0
    frame = manifest.read_manifest(str(out))
    assert len(frame) == 300
    assert {"image_uri", "image_id", "male", "split", "identity", "Young", "Eyeglasses"} <= set(frame.columns)
    assert "Male" not in frame.columns and len(frame.columns) == 45  # 6 + 39 other attributes
    assert set(np.unique(frame["male"])) == {0, 1}


def test_read_manifest_rejects_what_training_cannot_use(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        manifest.read_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match="junk.parquet: not a readable Parquet manifest"):
        manifest.read_manifest(str(tmp_path / "junk.parquet"))
    import pandas as pd

    pd.DataFrame({"image_uri": ["a.jpg"], "male": [1]}).to_parquet(tmp_path / "nosplit.parquet")
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['split'\]"):
        manifest.read_manifest(str(tmp_path / "nosplit.parquet"))
