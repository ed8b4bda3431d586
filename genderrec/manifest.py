"""CelebA (official layout, local or ``s3://``) → a Parquet manifest with labels, identities and splits.

A manifest row is one image: ``image_uri``, ``image_id``, ``male`` (0/1), ``split`` (train/val/test),
``identity`` and CelebA's 39 other attributes as 0/1 (kept for per-group evaluation). Split modes:

- ``seed``: the notebook's recipe, a stratified random subset split 64/16/20 (identities leak across splits);
- ``identity``: no person in two splits, stratified by ``male`` (the default);
- ``official``: CelebA's ``list_eval_partition.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from genderrec import storage

ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IDENTITY_FILE = "identity_CelebA.txt"
IMAGE_FOLDER = "img_align_celeba"
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("image_uri", "male", "split")
NON_ATTRIBUTE_COLUMNS = ("image_uri", "image_id", "male", "split", "identity", "official_split")
_PARTITION_NAMES = {"0": "train", "1": "val", "2": "test"}


class ManifestError(ValueError):
    """CelebA files or a manifest are malformed; the message names the file (and line)."""


@dataclass
class CelebA:
    """Parsed CelebA annotations: one row per image that has a label, plus what was skipped and why."""

    frame: pd.DataFrame
    attribute_names: list[str]
    skipped: list[dict] = field(default_factory=list)


def _lines(uri: str) -> list[str]:
    try:
        return storage.read_text(uri).splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{uri}: file not found (expected CelebA's official layout)") from None


def parse_attributes(uri: str) -> tuple[pd.DataFrame, list[str]]:
    """Parse ``list_attr_celeba.txt``: a count line, 40 names, then ``file.jpg`` and 40 values of 1/-1."""
    lines = _lines(uri)
    if len(lines) < 2:
        raise ManifestError(f"{uri}: expected a count line and a header line, found {len(lines)} lines")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise ManifestError(f"{uri}:1: expected the image count, found {lines[0][:40]!r}") from None
    names = lines[1].split()
    if "Male" not in names:
        raise ManifestError(f"{uri}:2: header has no 'Male' attribute")
    rows, ids, seen = [], [], {}
    for number, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != len(names) + 1:
            raise ManifestError(
                f"{uri}:{number}: expected {len(names) + 1} fields (file name + {len(names)} attributes), "
                f"found {len(tokens)}"
            )
        image_id, values = tokens[0], tokens[1:]
        if any(value not in ("1", "-1") for value in values):
            raise ManifestError(f"{uri}:{number}: attribute values must be 1 or -1 ({image_id})")
        if image_id in seen:
            raise ManifestError(f"{uri}:{number}: duplicate image id {image_id} (first on line {seen[image_id]})")
        seen[image_id] = number
        ids.append(image_id)
        rows.append([value == "1" for value in values])
    if declared != len(ids):
        raise ManifestError(f"{uri}:1: declares {declared} images but lists {len(ids)}")
    frame = pd.DataFrame(np.asarray(rows, dtype=np.int8).reshape(len(ids), len(names)), columns=names)
    frame.insert(0, "image_id", ids)
    frame["line"] = [seen[image_id] for image_id in ids]
    return frame, names


def parse_pairs(uri: str, value_name: str) -> pd.Series:
    """Parse ``file.jpg VALUE`` lines (partition and identity files) into a Series indexed by file name."""
    values, seen = {}, {}
    for number, line in enumerate(_lines(uri), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 2:
            raise ManifestError(f"{uri}:{number}: expected 'file.jpg {value_name}', found {line[:60]!r}")
        if tokens[0] in seen:
            raise ManifestError(f"{uri}:{number}: duplicate image id {tokens[0]} (first on line {seen[tokens[0]]})")
        seen[tokens[0]] = number
        values[tokens[0]] = tokens[1]
    return pd.Series(values, name=value_name)


def read_celeba(celeba_dir: str, skip_missing: bool = False) -> CelebA:
    """Read and cross-check CelebA's annotation files against its image folder (image URIs come out absolute)."""
    celeba_dir = storage.absolute(celeba_dir)
    attributes_uri = storage.join(celeba_dir, ATTRIBUTE_FILE)
    frame, names = parse_attributes(attributes_uri)
    partition = parse_pairs(storage.join(celeba_dir, PARTITION_FILE), "partition")
    identity = parse_pairs(storage.join(celeba_dir, IDENTITY_FILE), "identity")
    image_dir = storage.join(celeba_dir, IMAGE_FOLDER)
    on_disk = {uri.rsplit("/", 1)[-1] for uri in storage.list_files(image_dir)}
    if not on_disk:
        raise ManifestError(f"{image_dir}: no images found")

    problems = []
    for image_id, line in zip(frame["image_id"], frame["line"], strict=True):
        where = f"{attributes_uri}:{line}"
        if image_id not in on_disk:
            problems.append({"image_id": image_id, "where": where, "reason": f"image file missing in {image_dir}"})
        elif image_id not in partition.index:
            problems.append({"image_id": image_id, "where": where, "reason": f"not in {PARTITION_FILE}"})
        elif image_id not in identity.index:
            problems.append({"image_id": image_id, "where": where, "reason": f"not in {IDENTITY_FILE}"})
    for image_id in sorted(on_disk - set(frame["image_id"])):
        where = storage.join(image_dir, image_id)
        problems.append({"image_id": image_id, "where": where, "reason": f"image has no row in {ATTRIBUTE_FILE}"})
    if problems and not skip_missing:
        first = problems[0]
        raise ManifestError(
            f"{first['where']}: {first['image_id']}: {first['reason']} ({len(problems)} problem(s) in all; "
            "pass --skip-missing to skip and record them)"
        )
    frame = frame[~frame["image_id"].isin({problem["image_id"] for problem in problems})].copy()
    bad_partition = ~frame["image_id"].map(partition).isin(_PARTITION_NAMES)
    if bad_partition.any():
        raise ManifestError(
            f"{PARTITION_FILE}: partition must be 0, 1 or 2 (e.g. {frame['image_id'][bad_partition].iloc[0]})"
        )
    frame["official_split"] = frame["image_id"].map(partition).map(_PARTITION_NAMES)
    try:
        frame["identity"] = frame["image_id"].map(identity).astype(np.int64)
    except ValueError:
        raise ManifestError(f"{IDENTITY_FILE}: identities must be integers") from None
    frame["image_uri"] = [storage.join(image_dir, image_id) for image_id in frame["image_id"]]
    return CelebA(frame.drop(columns="line").reset_index(drop=True), names, problems)


def _stratified_subset(frame: pd.DataFrame, subset: int | None, seed: int) -> pd.DataFrame:
    if subset is None or subset >= len(frame):
        return frame
    chosen, _ = train_test_split(frame, train_size=subset, stratify=frame["male"], random_state=seed)
    return chosen


def assign_splits(
    frame: pd.DataFrame,
    mode: str,
    fractions: tuple[float, float, float] = (0.64, 0.16, 0.20),
    subset: int | None = None,
    seed: int = 42,
) -> pd.DataFrame:
    """Return ``frame`` (optionally a stratified subset) with a ``split`` column, reproducibly for ``seed``."""
    frame = _stratified_subset(frame.reset_index(drop=True), subset, seed).copy()
    train_fraction, val_fraction, test_fraction = fractions
    if mode == "official":
        frame["split"] = frame["official_split"]
    elif mode == "seed":
        rest, test = train_test_split(frame.index, test_size=test_fraction, stratify=frame["male"], random_state=seed)
        train, val = train_test_split(
            rest,
            test_size=val_fraction / (train_fraction + val_fraction),
            stratify=frame.loc[rest, "male"],
            random_state=seed,
        )
        frame.loc[train, "split"], frame.loc[val, "split"], frame.loc[test, "split"] = "train", "val", "test"
    elif mode == "identity":
        frame["split"] = _identity_splits(frame, train_fraction, val_fraction, test_fraction, seed)
    else:
        raise ValueError(f"unknown split mode {mode!r}; choose seed, identity or official")
    return frame.sort_values("image_id").reset_index(drop=True)


def _identity_splits(frame, train_fraction, val_fraction, test_fraction, seed) -> np.ndarray:
    """Whole identities go to one split; folds are stratified by ``male`` (fractions rounded to 1/k)."""
    split = np.full(len(frame), "train", dtype=object)
    rest = np.arange(len(frame))
    for name, fraction, remaining in (
        ("test", test_fraction, 1.0),
        ("val", val_fraction, train_fraction + val_fraction),
    ):
        if fraction <= 0:
            continue
        folds = StratifiedGroupKFold(n_splits=max(2, round(remaining / fraction)), shuffle=True, random_state=seed)
        _, held_out = next(folds.split(rest, frame["male"].to_numpy()[rest], frame["identity"].to_numpy()[rest]))
        split[rest[held_out]] = name
        rest = np.delete(rest, held_out)
    return split


def build_manifest(
    celeba_dir: str,
    split: str = "identity",
    subset: int | None = None,
    fractions: tuple[float, float, float] = (0.64, 0.16, 0.20),
    seed: int = 42,
    skip_missing: bool = False,
) -> tuple[pd.DataFrame, list[dict]]:
    """Read CelebA and assign splits; returns the manifest and the skipped items."""
    celeba = read_celeba(celeba_dir, skip_missing=skip_missing)
    frame = celeba.frame.rename(columns={"Male": "male"})
    frame = assign_splits(frame, split, fractions=fractions, subset=subset, seed=seed)
    attributes = [name for name in celeba.attribute_names if name != "Male"]
    columns = ["image_uri", "image_id", "male", "split", "identity", "official_split", *attributes]
    return frame[columns], celeba.skipped


def write_manifest(frame: pd.DataFrame, uri: str, metadata: dict[str, str] | None = None) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    fs, path = storage.filesystem(uri)
    if not storage.is_s3(uri):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def read_manifest(uri: str) -> pd.DataFrame:
    """Read a manifest (file or folder of Parquet files) and check it has what training needs."""
    fs, path = storage.filesystem(uri)
    try:
        frame = pq.read_table(path, filesystem=fs).to_pandas()
    except FileNotFoundError:
        raise ManifestError(f"{uri}: manifest not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{uri}: not a readable Parquet manifest: {exc}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise ManifestError(f"{uri}: manifest lacks column(s) {missing}")
    unknown = set(frame["split"].unique()) - set(SPLITS)
    if unknown:
        raise ManifestError(f"{uri}: unknown split value(s) {sorted(unknown)}")
    return frame


def attribute_columns(frame: pd.DataFrame, uri: str, wanted: tuple[str, ...] | str = "all") -> list[str]:
    """The manifest's attribute columns (0/1, besides ``male``), in manifest order: all, or the ``wanted`` names.

    Attribute pretraining and auxiliary heads train on them; a manifest without them fails here, before training.
    """
    found = [
        column
        for column in frame.columns
        if column not in NON_ATTRIBUTE_COLUMNS
        and pd.api.types.is_integer_dtype(frame[column])
        and frame[column].isin((0, 1)).all()
    ]
    if not found:
        raise ManifestError(
            f"{uri}: manifest has no attribute columns (0/1 columns such as CelebA's Smiling or Eyeglasses besides "
            "male); attribute pretraining (models.weights: attributes) and models.aux_attributes need them: "
            "build the manifest from CelebA's list_attr_celeba.txt"
        )
    if wanted == "all":
        return found
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ManifestError(f"{uri}: manifest has no attribute column(s) {missing}; it has {found}")
    return [name for name in found if name in wanted]
