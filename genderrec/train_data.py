"""Training input as Ray Data: a training worker's memory does not grow with the number of images.

The driver turns the manifest's train and val rows into Ray Data datasets whose read, decode and resize (the shared
decoder, :func:`genderrec.images.load_image`) run as Ray Data tasks on any CPU of the cluster, and decides before
any run starts whether the decoded pixels may be cached (``data.cache``): as ``uint8`` (4x smaller than float32), in
the worker, only when they fit a share of its memory. The worker reads its shards with
``ray.train.get_dataset_shard`` and feeds Keras a few batches at a time: streamed (a new order every epoch, from a
per-epoch seeded shuffle of the URIs before decoding) or, when cached, from its pixels in a new permutation.
When a run learns attributes too (pretraining, auxiliary heads), the batches carry the manifest's attribute columns
as a ``uint8`` matrix next to ``male``, and each run takes the :class:`Targets` it learns from them.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from genderrec import images, storage, train_faces
from genderrec.config import Config

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
ROWS_PER_BLOCK = 128  # decoded images per Ray Data block: about 15 MB of pixels at 218x178
# URIs per decode task, and per block of the URI table shuffled before decoding: a shuffle's cost grows with the
# square of its block count (every block is split into one piece per output block), so the full CelebA's 162,770
# training URIs make 159 blocks (25,000 pieces), not 1,272 of ROWS_PER_BLOCK (1.6 M pieces, minutes before the first
# batch). Each task's output is cut into blocks of ROWS_PER_BLOCK images (the dataset's ``target_max_block_size``).
URIS_PER_TASK = 1024
PREFETCH_BATCHES = 2  # batches tf.data holds ready ahead of the model
# Decoded blocks one run's ingest may hold in Ray's object store ahead of its worker (Ray Data's default is a share
# of the whole store, so a fast decode of a large dataset would fill it and the worker's mapped pages with it).
INGEST_OBJECT_STORE_BYTES = 64 * 2**20
# Batches a streaming worker holds at once, as float32, counted generously: Ray Data's prefetched batch, the one
# being copied into TensorFlow, tf.data's prefetch, the augmentation map's inputs and outputs, and the model's.
STREAM_BATCHES = 8


class CacheError(ValueError):
    """``data.cache: memory`` cannot fit the worker's memory budget; the message gives the numbers."""


@dataclass(frozen=True)
class CachePlan:
    """The numbers behind the cache decision, as the job prints them before any run starts."""

    images: int
    image_size: tuple[int, int]
    batch_size: int
    mode: str
    memory: int | None
    memory_source: str
    budget_fraction: float

    @property
    def cache_bytes(self) -> int:
        height, width = self.image_size
        return self.images * height * width * 3

    @property
    def stream_bytes(self) -> int:
        height, width = self.image_size
        return STREAM_BATCHES * self.batch_size * height * width * 3 * 4

    @property
    def budget(self) -> int | None:
        return None if self.memory is None else int(self.memory * self.budget_fraction)

    @property
    def fits(self) -> bool:
        return self.budget is not None and self.cache_bytes <= self.budget

    @property
    def cache(self) -> bool:
        return self.mode == "memory" or (self.mode == "auto" and self.fits)

    def describe(self) -> str:
        height, width = self.image_size
        budget = (
            f"budget {gib(self.budget)} = {self.budget_fraction:g} x {gib(self.memory)} per run ({self.memory_source})"
            if self.memory is not None
            else f"budget unknown ({self.memory_source})"
        )
        decision = (
            f"cache the uint8 pixels in the worker ({gib(self.cache_bytes)})"
            if self.cache
            else f"stream (the worker holds about {gib(self.stream_bytes)} of batches at a time; its ingest at most "
            f"{gib(INGEST_OBJECT_STORE_BYTES)} of object store)"
        )
        return (
            f"training input: {self.images:,} images (train + val) of {height}x{width}; uint8 cache "
            f"{gib(self.cache_bytes)}; {budget}; data.cache={self.mode} -> {decision}"
        )


def gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def plan_cache(cfg: Config, images: int, memory: int | None, memory_source: str) -> CachePlan:
    """Decide cache or stream from the numbers; ``data.cache: memory`` that cannot fit fails here, not mid-run."""
    plan = CachePlan(
        images=images,
        image_size=tuple(cfg.data.image_size),
        batch_size=cfg.training.batch_size,
        mode=cfg.data.cache,
        memory=memory,
        memory_source=memory_source,
        budget_fraction=cfg.data.cache_budget_fraction,
    )
    if plan.mode == "memory" and not plan.fits:
        raise CacheError(
            f"data.cache=memory cannot fit: {plan.describe()}. Use data.cache=auto (streams when the pixels do not "
            "fit), a smaller data.image_size or data.subset, or more resources.memory_per_run_gib"
        )
    return plan


def worker_memory(cfg: Config) -> tuple[int | None, str]:
    """A training worker's memory: ``resources.memory_per_run_gib``, else the smallest Ray node that can host a run."""
    if cfg.resources.memory_per_run_gib:
        return int(cfg.resources.memory_per_run_gib * 2**30), "resources.memory_per_run_gib"
    import ray

    hosts = [
        node["Resources"].get("memory", 0)
        for node in ray.nodes()
        if node["Alive"]
        and node["Resources"].get("CPU", 0) >= cfg.resources.cpus_per_run
        and (not cfg.resources.use_gpu or node["Resources"].get("GPU", 0) >= 1)
    ]
    if not hosts:
        return None, "no Ray node can host a run yet: set resources.memory_per_run_gib"
    return int(min(hosts)), "Ray memory of the smallest node that can host a run"


@dataclass(frozen=True)
class RunInputs:
    """What every run of a job trains on: the URIs and labels per split, their Ray Datasets, the cache decision,
    and the attribute columns the datasets carry (in the order of their ``attributes`` matrix)."""

    rows: dict[str, pd.DataFrame]
    datasets: dict
    cache: bool
    attributes: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        return {split: len(self.rows[split]) for split in SPLITS}


def data_config():
    """Ray Train's ``dataset_config``: every run's ingest holds at most ``INGEST_OBJECT_STORE_BYTES`` of blocks, and
    reaches the worker in the dataset's order. Ray Data would otherwise hand over blocks as their decode tasks finish,
    so the first epoch's batches (and the order of the cache, which later epochs permute) would depend on timing, not
    on the run's seed: two runs of one config on 2026-12-03 differed from their first epoch."""
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources

    limits = ExecutionResources.for_limits(object_store_memory=INGEST_OBJECT_STORE_BYTES)
    return ray.train.DataConfig(execution_options=ExecutionOptions(resource_limits=limits, preserve_order=True))


def estimate(cfg: Config, images: int) -> CachePlan:
    """The cache decision for ``images`` train+val images, printed (and logged) as the job shows it."""
    memory, source = worker_memory(cfg) if cfg.data.cache != "none" else (None, "not needed with data.cache=none")
    plan = plan_cache(cfg, images, memory, source)
    print(plan.describe(), flush=True)
    log.info("%s", plan.describe())
    return plan


@dataclass(frozen=True)
class Targets:
    """What a run learns from a batch: ``male`` and/or ``columns`` of its attribute matrix, as float32 labels of
    shape (n,) for ``male`` alone, else (n, width) with ``male`` first."""

    male: bool = True
    columns: tuple[int, ...] = ()

    @property
    def width(self) -> int | None:
        return None if not self.columns else int(self.male) + len(self.columns)

    def of(self, batch: dict) -> np.ndarray:
        if not self.columns:
            return np.asarray(batch["male"], dtype=np.float32)
        parts = [np.asarray(batch["male"], dtype=np.float32)[:, None]] if self.male else []
        parts.append(batch["attributes"][:, list(self.columns)].astype(np.float32))
        return np.concatenate(parts, axis=1)


def input_columns(frame: pd.DataFrame, attributes=()) -> list[str]:
    """The manifest columns the decode tasks read: URI, label, the cached face landmarks when there, attributes."""
    faces = [train_faces.LANDMARKS] if train_faces.LANDMARKS in frame else []
    return ["image_uri", "male", *faces, *attributes]


def prepare(cfg: Config, frame: pd.DataFrame, attributes: tuple[str, ...] = ()) -> RunInputs:
    """Check the cache against the worker's memory, print the estimate and build the datasets; call before any run.

    The datasets are built here, in the job's driver, while no training worker holds the CPUs that creating them
    takes (``from_pandas`` runs a task per block); their transforms run later, per run, as Ray Data tasks.
    """
    columns = input_columns(frame, attributes)
    rows = {split: frame.loc[frame["split"] == split, columns].reset_index(drop=True) for split in SPLITS}
    plan = estimate(cfg, sum(len(part) for part in rows.values()))
    common = {"crop_box": cfg.data.crop_box, "decode_cpus": cfg.data.decode_cpus, "attributes": tuple(attributes)}
    datasets = {
        split: dataset(
            rows[split], cfg.data.image_size, shuffle_seed=cfg.training_seed if split == "train" else None, **common
        )
        for split in SPLITS
        if len(rows[split])
    }
    return RunInputs(rows=rows, datasets=datasets, cache=plan.cache, attributes=tuple(attributes))


def dataset(
    rows: pd.DataFrame, image_size, crop_box=None, *, decode_cpus: float = 1.0, shuffle_seed=None, attributes=()
):
    """URIs → ``{pixels: uint8 (n, h, w, 3), male: float32}`` batches, decoded by Ray Data tasks; with
    ``attributes`` (column names of ``rows``) also ``attributes: uint8 (n, k)``.

    With ``shuffle_seed`` the URIs (not the pixels: cheap) are shuffled before decoding, in a new order every
    execution, i.e. every epoch, reproducibly from the seed.
    """
    import ray.data
    from ray.data import RandomSeedConfig

    table = rows[input_columns(rows, attributes)].reset_index(drop=True)
    ds = ray.data.from_pandas(
        [table.iloc[start : start + URIS_PER_TASK] for start in range(0, len(table), URIS_PER_TASK)]
    )
    height, width = image_size
    # pixels + label + attributes (uint8), with room
    ds.context.target_max_block_size = ROWS_PER_BLOCK * (height * width * 3 + len(attributes) + 64)
    if shuffle_seed is not None:
        # its tasks reserve what decode tasks do (Ray's default, a whole CPU, may never be free next to the workers)
        seed = RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)
        ds = ds.random_shuffle(seed=seed, num_cpus=decode_cpus)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": tuple(image_size), "crop_box": crop_box, "attributes": tuple(attributes)},
        batch_size=ROWS_PER_BLOCK,
        batch_format="numpy",
        num_cpus=decode_cpus,
    )


def decode_batch(batch: dict, image_size, crop_box=None, attributes=()) -> dict:
    """Ray Data task: read and decode with the shared decoder (each face aligned from its cached landmarks when the
    batch has them: ``data.faces: align``); a bad file's error names it."""
    height, width = image_size
    uris, landmarks = batch["image_uri"], batch.get(train_faces.LANDMARKS)
    pixels = np.empty((len(uris), height, width, 3), dtype=np.uint8)
    for index, uri in enumerate(uris):
        try:
            data = storage.read_bytes(uri)
            pixels[index] = (
                images.load_image(data, image_size, crop_box)
                if landmarks is None
                else train_faces.training_pixels(data, landmarks[index], image_size, crop_box)
            )
        except Exception as exc:
            raise ValueError(f"{uri}: {exc}") from exc
    decoded = {"pixels": pixels, "male": np.asarray(batch["male"], dtype=np.float32)}
    if attributes:
        decoded["attributes"] = np.stack([np.asarray(batch[name], dtype=np.uint8) for name in attributes], axis=1)
    return decoded


class SplitBatches:
    """One split's ``(uint8 pixels, labels)`` batches per epoch, from its dataset shard (labels: ``targets``); with
    ``cache``, the first complete pass fills a preallocated uint8 array, and later epochs read it in a new
    permutation."""

    def __init__(
        self,
        shard,
        rows: int,
        image_size,
        batch_size: int,
        *,
        cache: bool,
        shuffle: bool,
        seed: int,
        targets: Targets = Targets(),
    ):
        height, width = image_size
        self.shard, self.rows, self.batch_size, self.shuffle, self.seed = shard, rows, batch_size, shuffle, seed
        self.targets = targets
        label_shape = (rows,) if targets.width is None else (rows, targets.width)
        self.pixels = np.empty((rows, height, width, 3), dtype=np.uint8) if cache else None
        self.labels = np.empty(label_shape, dtype=np.float32) if cache else None
        self.filled = False

    def epoch(self, epoch: int):
        if self.filled:
            order = np.random.default_rng((self.seed, epoch)).permutation(self.rows) if self.shuffle else None
            for start in range(0, self.rows, self.batch_size):
                index = (
                    slice(start, start + self.batch_size) if order is None else order[start : start + self.batch_size]
                )
                yield self.pixels[index], self.labels[index]
            return
        seen = 0
        for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", prefetch_batches=1):
            pixels, labels = batch["pixels"], self.targets.of(batch)
            if seen + len(labels) > self.rows:
                raise RuntimeError(f"dataset shard has more than the {self.rows} rows it was planned with")
            if self.pixels is not None:
                self.pixels[seen : seen + len(labels)] = pixels
                self.labels[seen : seen + len(labels)] = labels
            seen += len(labels)
            yield pixels, labels
        if seen != self.rows:
            raise RuntimeError(f"dataset shard gave {seen} rows, planned with {self.rows}")
        self.filled = self.pixels is not None


def keras_input(
    batches: SplitBatches, image_size, *, first_epoch: int = 0, endless: bool = True, augment=None, class_weight=None
):
    """A tf.data pipeline over :class:`SplitBatches`: float32 0..255, augmented (training), a few batches ahead; with
    ``class_weight`` ({0: w0, 1: w1}) each image carries its class's weight by ``male`` (Keras' own ``class_weight``
    would take the argmax of a label matrix).

    Training input is ``endless``, one data epoch after another from ``first_epoch``: ``fit`` keeps one iterator and
    takes exactly one pass per epoch from ``steps_per_epoch`` (:func:`steps`), so every pass runs to its end (and
    fills the cache). Validation input is one pass, to be read without ``validation_steps``, and without tf.data's
    autotuning: ``evaluate`` makes a new iterator every epoch, and destroying the last one waited for its autotune
    thread's sleep (up to a minute) with the CPUs idle: a third of the epochs of two 2026-12-03 runs took 195 s
    instead of 140 (gdb: ``~LogicalThreadWrapper`` under ``EpochIterator.reset``, ``Model::OptimizeLoop`` asleep).
    """
    import tensorflow as tf

    height, width = image_size

    def generate():
        restore_mmap_threshold()  # TensorFlow lowered it when it built this generator's kernel, just before
        for epoch in itertools.count(first_epoch) if endless else [first_epoch]:
            yield from batches.epoch(epoch)

    label_width = batches.targets.width
    signature = (
        tf.TensorSpec((None, height, width, 3), tf.uint8),
        tf.TensorSpec((None,) if label_width is None else (None, label_width), tf.float32),
    )
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    if class_weight is not None:
        weights = tf.constant([class_weight[0], class_weight[1]], tf.float32)
        male = (lambda y: y) if label_width is None else (lambda y: y[:, 0])
        ds = ds.map(lambda x, y: (x, y, tf.gather(weights, tf.cast(male(y), tf.int32))))
    ds = ds.prefetch(PREFETCH_BATCHES)
    if not endless:
        options = tf.data.Options()
        options.autotune.enabled = False  # nothing to tune (a cast, a fixed prefetch)
        ds = ds.with_options(options)
    return ds


# glibc's mallopt parameter, and the largest threshold it takes (half of its 64 MiB per-thread heaps)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20


def restore_mmap_threshold() -> None:
    """Undo what ``tf.data.Dataset.from_generator`` does to malloc under Python 3.11: when its kernel is built,
    TensorFlow's ``ApplyPython311MemoryPatch`` calls ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, so every tensor over
    128 KiB (the 9 MiB copies of ResNet50's 3x3x512x512 kernels that each backward pass makes) became a fresh mmap,
    faulted in page by page and unmapped after each step: 45,000-85,000 minor faults a second in a pretraining
    worker (docs/train_throughput.md). Tensors below this threshold come from malloc's heaps again, kept by
    ``training.WORKER_ENV``'s top pad. :func:`keras_input`'s generator calls it as it starts."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # not glibc: nothing was changed
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def steps(rows: int, batch_size: int) -> int:
    """Batches in one pass over ``rows`` (the last one partial)."""
    return math.ceil(rows / batch_size)


def worker_inputs(
    shards: dict,
    counts: dict[str, int],
    cfg: Config,
    *,
    cache: bool,
    first_epoch: int,
    augment,
    targets: Targets = Targets(),
    class_weight=None,
):
    """(train, val) Keras inputs of a training worker from its dataset shards (val ``None`` without val rows)."""
    common = {"image_size": cfg.data.image_size, "batch_size": cfg.training.batch_size, "cache": cache}
    common["targets"] = targets
    train = SplitBatches(shards["train"], counts["train"], shuffle=True, seed=cfg.training_seed, **common)
    train_input = keras_input(
        train, cfg.data.image_size, first_epoch=first_epoch, augment=augment, class_weight=class_weight
    )
    if not counts.get("val"):
        return train_input, None
    val = SplitBatches(shards["val"], counts["val"], shuffle=False, seed=cfg.training_seed, **common)
    return train_input, keras_input(val, cfg.data.image_size, endless=False)
