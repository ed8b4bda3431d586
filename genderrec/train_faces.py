"""Train as you serve: the training faces framed by the same detect + align path as ``--faces detect|auto``.

A model trained on CelebA's own alignment learns its exact framing, then meets MTCNN's alignment of ordinary photos
in labeling and serving. With ``data.faces: align`` every train and val image is passed through the detector once
per manifest, as Ray Data actors (the detector loaded once per actor); the main face's five landmarks (the largest
face :func:`genderrec.faces.select_faces` keeps, as ``auto`` scores it) are cached by image id in the run directory
(``train_faces.parquet``) and reused by the next run, which detects only images not in it. Decoding then aligns each
face from its landmarks (:func:`genderrec.faces.model_input`, the very function ``face_crops`` uses), every epoch,
in the decode tasks: only landmarks are stored, 80 bytes an image, so full CelebA costs a few MB. An image where no
face is found is trained whole, as ``--faces auto`` would score it, and is counted in what the job prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from genderrec import faces, images, storage

log = logging.getLogger(__name__)

CACHE_FILE = "train_faces.parquet"
LANDMARKS = "landmarks"  # manifest column added for training: 10 floats (x, y of each landmark), NaN: no face
KEY = ["image_id", "image_uri"]
DETECT_BATCH = 8  # images per detector call: small, so the actors share the images evenly


@dataclass(frozen=True)
class FaceCacheStats:
    """What :func:`attach` did: images detected now, reused from the cache, and those with no face (trained whole)."""

    images: int
    detected_now: int
    reused: int
    no_face: int
    cache_uri: str

    def describe(self) -> str:
        return (
            f"training faces (data.faces=align): {self.images:,} train+val images; {self.detected_now:,} detected now, "
            f"{self.reused:,} from {self.cache_uri}; {self.no_face:,} with no face found, trained whole "
            "(as --faces auto scores such a photo)"
        )


class LandmarkFinder:
    """Ray Data actor: loads the detector once, then gives each image its main face's landmarks (NaN: none)."""

    def __init__(self, options: faces.FaceOptions):
        self.options = options
        self.detector = faces.load_detector(options)

    def __call__(self, batch: dict) -> dict:
        uris = batch["image_uri"]
        landmarks = np.full((len(uris), 10), np.nan)
        confidence = np.full(len(uris), np.nan)
        for index, uri in enumerate(uris):
            try:
                rgb = images.decode_image(storage.read_bytes(uri))
            except Exception as exc:
                raise ValueError(f"{uri}: {exc}") from exc
            found = faces.select_faces(self.detector.detect(rgb), self.options)
            if found:
                landmarks[index], confidence[index] = found[0].landmarks.ravel(), found[0].confidence
        return {"image_id": batch["image_id"], "image_uri": uris, LANDMARKS: landmarks, "confidence": confidence}


def detect(rows: pd.DataFrame, options: faces.FaceOptions, actors: int | None = None) -> pd.DataFrame:
    """``image_id, image_uri, landmarks, confidence`` of ``rows``, detected by up to ``actors`` Ray Data actors
    (default: one per CPU of the cluster; training has not started yet)."""
    import ray
    import ray.data

    actors = actors or int(ray.cluster_resources().get("CPU", 1))

    ds = ray.data.from_pandas(rows[KEY].reset_index(drop=True)).repartition(target_num_rows_per_block=DETECT_BATCH * 4)
    found = ds.map_batches(
        LandmarkFinder,
        fn_constructor_kwargs={"options": options},
        batch_size=DETECT_BATCH,
        batch_format="numpy",
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
    )
    return found.to_pandas()


def read_cache(uri: str) -> pd.DataFrame:
    if not storage.exists(uri):
        return pd.DataFrame(columns=[*KEY, LANDMARKS, "confidence"])
    fs, path = storage.filesystem(uri)
    frame = pq.read_table(path, filesystem=fs).to_pandas()
    frame[LANDMARKS] = list(np.stack(frame[LANDMARKS].to_numpy()).astype(np.float64)) if len(frame) else []
    return frame


def write_cache(frame: pd.DataFrame, uri: str) -> None:
    landmarks = pa.FixedSizeListArray.from_arrays(np.stack(frame[LANDMARKS].to_numpy()).ravel(), 10)
    table = pa.table(
        {
            "image_id": frame["image_id"].astype(str),
            "image_uri": frame["image_uri"].astype(str),
            LANDMARKS: landmarks,
            "confidence": frame["confidence"].astype(np.float64),
        }
    )
    storage.write_parquet(table, uri)


def attach(
    frame: pd.DataFrame, run_dir: str, options: faces.FaceOptions | None = None, actors: int | None = None
) -> tuple[pd.DataFrame, FaceCacheStats]:
    """``frame``'s train and val rows with a ``landmarks`` column, from the run directory's cache, detecting (and
    caching) only the images it lacks; the test split is left out (it is evaluated as its own faces mode says)."""
    options = options or faces.FaceOptions()
    rows = frame[frame["split"].isin(["train", "val"])]
    if "image_id" not in rows:  # a manifest of other images: the URI is the id
        rows = rows.assign(image_id=rows["image_uri"])
    cache_uri = storage.join(run_dir, CACHE_FILE)
    cached = read_cache(cache_uri)
    known = pd.MultiIndex.from_frame(cached[KEY].astype(str))
    is_known = pd.MultiIndex.from_frame(rows[KEY].astype(str)).isin(known)
    missing = rows[~is_known].drop_duplicates(KEY)
    if len(missing):
        cached = pd.concat([cached, detect(missing, options, actors)], ignore_index=True)
        write_cache(cached, cache_uri)
    merged = rows.merge(cached[[*KEY, LANDMARKS]], on=KEY, how="left", validate="many_to_one")
    no_face = int(np.isnan(np.stack(merged[LANDMARKS].to_numpy())[:, 0]).sum())
    stats = FaceCacheStats(len(rows), len(missing), int(is_known.sum()), no_face, cache_uri)
    print(stats.describe(), flush=True)
    log.info("%s", stats.describe())
    return merged, stats


def training_pixels(data: bytes, landmarks: np.ndarray, size, crop_box=None) -> np.ndarray:
    """A training image's model input: its face aligned from cached ``landmarks``, or whole where they are NaN."""
    rgb = images.decode_image(data)
    return faces.model_input(rgb, None if np.isnan(landmarks).any() else landmarks.reshape(5, 2), size, crop_box)
