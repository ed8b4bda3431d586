"""Bulk labeling: a Parquet manifest or an image folder/prefix (local or ``s3://``) → a Parquet table of p(male).

The Ray Data pipeline is ``input shards (read tasks) → read + decode (CPU tasks) → predict (actor pool, the model
loaded once per actor) → shard writer (an actor on a sliver of a CPU)``. The input is cut into fixed shards
(:mod:`genderrec.shards`); each becomes one output file, written whole as soon as all its images are labeled, so a job
killed at any moment keeps every file finished before, and ``--resume`` labels only the shards with no file yet. A
file that cannot be read or decoded becomes a row with an ``error`` and no ``p_male``; it never stops the job or
drops a row (rows out == rows in). Read failures (storage down, network) are retried, then marked ``retryable``:
``--resume --retry-errors`` labels those rows again and rewrites their files whole. Everything a user can get wrong
(model directory, input, output) is checked on the driver by :func:`prepare`, before any cluster work starts; the
driver never holds the input's or the output's rows.

With ``faces="detect"`` or ``"auto"`` (ordinary photos, see :mod:`genderrec.faces`) the read + decode tasks are
replaced by a pool of :class:`FaceFinder` actors (the detector loaded once per actor) that emit one row per face,
aligned CelebA-style, and the same predict actors classify them. Every image still has at least one row: an image
with no face is a row with ``error = "no face found"`` (``detect``) or the whole image flagged ``whole_image``
(``auto``). All rows of an image are in the same output file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from genderrec import bundle, engines, faces, images, shards, storage

OUTPUT_COLUMNS = ("image_uri", "p_male", "label", "model", "error", "retryable")
FACE_COLUMNS = ("face_index", "face_source", "box", "landmarks", "det_confidence")  # in faces detect/auto modes
TRUTH_COLUMN = "male"
MANIFEST_SUFFIX = ".parquet"
EVALUATION_FILE = "_evaluation.json"  # "_" prefix: Parquet readers (pyarrow, Spark, Ray) skip it
ROWS_PER_FILE = 10_000  # input images per output file (faces modes: all the faces of that many images)
FIRST_ROWS_CHECKED = 1_000  # manifest rows whose image_uri prepare checks (later bad ones become error rows)
READ_CPUS = 0.25  # a read task only slices Parquet row groups into blocks
WRITER_CPUS = 0.05  # the shard writer must never wait for a CPU behind the inference actors
READ_THREADS = 8  # image reads in flight per decode task (storage latency, not CPU, bounds them)
READ_ATTEMPTS = 3  # per image, on top of the S3 client's own retries (storage.S3_ATTEMPTS)
READ_BACKOFF_S = 0.5  # then 1 s, ...
EVALUATION_TASKS = 4  # Ray tasks that count the evaluation, each over a share of the output files
EVALUATION_BINS = 2**20  # p_male histogram resolution for ROC-AUC (pairs within one bin of 1e-6 count as ties)
# Half a CPU per decode task: reads wait on storage, so twice as many tasks as cores keep the cores busy. It also
# keeps Ray Data from fusing decoding into the inference actors (it fuses maps with equal resources only).
DECODE_CPUS = 0.5
# Photos per face detection call: detection takes ~0.5 s per photo, so small batches let the model actors start on
# the first faces while the rest are still being detected (the model's batches are gathered to --batch-size).
DETECT_BATCH = 4
# A face detection actor's CPU share: with one inference actor (1 CPU), the read tasks and the writer, one detection
# actor fits on a 2-CPU machine (a whole CPU each would leave none for the read tasks and the writer: no progress).
FACE_CPUS = 1 - READ_CPUS - WRITER_CPUS
_INTERNAL = "__genderrec_"  # columns that only travel through the pipeline, never written
_PIXELS = _INTERNAL + "pixels"
_SHARD, _ROW = _INTERNAL + "shard", _INTERNAL + "row"  # the output file a row goes to; its input row in the shard
_SHARD_IMAGES = _INTERNAL + "shard_images"  # input images of the shard in this run
_IMAGE_ROWS = _INTERNAL + "image_rows"  # on an image's first row: how many rows (faces) it has; else null
_SUMMARY = pa.schema(
    [
        ("shard", pa.string()),
        ("images", pa.int64()),
        ("labeled", pa.int64()),
        ("errors", pa.int64()),
        ("retryable", pa.int64()),
        ("images_with_faces", pa.int64()),
    ]
)
_FACE_DEFAULTS = faces.FaceOptions()


class LabelingError(ValueError):
    """A labeling job cannot start: the message names the model, input or output and what is wrong."""


@dataclass(frozen=True)
class LabelingOptions:
    """What ``genderrec label`` was asked to do."""

    model_dir: str
    input_uri: str
    output_uri: str
    batch_size: int = 64
    actors: int = 1
    gpus_per_actor: float = 0.0
    threshold: float | None = None  # None: the model card's threshold (0.5 unless the card says otherwise)
    resume: bool = False
    retry_errors: bool = False  # with resume: label the retryable error rows again
    rows_per_file: int = ROWS_PER_FILE  # fixed by the first run of an output (its _job.json)
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    faces: faces.FacesMode = "aligned"  # aligned: CelebA-like crops as they are; detect/auto: ordinary photos
    min_face_size: int = _FACE_DEFAULTS.min_face_size
    min_face_confidence: float = _FACE_DEFAULTS.min_face_confidence
    max_faces: int = _FACE_DEFAULTS.max_faces
    face_actors: int = 1  # face detection actors (CPU), each loads the detector once
    engine: engines.EngineName = "auto"  # auto: TensorFlow on GPU actors, OpenVINO on CPU ones when exported
    precision: engines.Precision = "bf16"  # OpenVINO: bf16 (fast where the CPU has it) or f32 (closest to Keras)

    def __post_init__(self):
        if self.batch_size < 1:
            raise LabelingError(f"batch size must be at least 1, got {self.batch_size}")
        if self.rows_per_file < 1:
            raise LabelingError(f"rows per file must be at least 1, got {self.rows_per_file}")
        if self.actors < 1:
            raise LabelingError(f"actors must be at least 1, got {self.actors}")
        if self.gpus_per_actor < 0:
            raise LabelingError(f"GPUs per actor must be >= 0, got {self.gpus_per_actor}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise LabelingError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.faces not in faces.FACES_MODES:
            raise LabelingError(f"faces must be one of {', '.join(faces.FACES_MODES)}, got {self.faces!r}")
        if self.face_actors < 1:
            raise LabelingError(f"face actors must be at least 1, got {self.face_actors}")
        self.face_options  # noqa: B018 (raises LabelingError when the face options are wrong)

    @property
    def face_options(self) -> faces.FaceOptions:
        try:
            return faces.FaceOptions(
                min_face_size=self.min_face_size, min_face_confidence=self.min_face_confidence, max_faces=self.max_faces
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in exc.errors()
            )
            raise LabelingError(f"face options: {problems}") from None

    @property
    def detects_faces(self) -> bool:
        return self.faces != "aligned"


@dataclass(frozen=True)
class LabelingPlan:
    """A checked job: the model card, its fixed shards (``_job.json``) and the read tasks for those still to do."""

    options: LabelingOptions
    card: bundle.ModelCard
    threshold: float
    job: shards.JobSpec
    chunks: tuple[shards.Chunk, ...]  # only the shards to label in this run
    columns: tuple[str, ...]  # the input's columns
    rows_in: int
    already_labeled: int
    retrying: int = 0  # output files whose retryable errors this run labels again

    @property
    def todo(self) -> list[shards.Shard]:
        return [shard for chunk in self.chunks for shard in chunk.shards]


@dataclass(frozen=True)
class LabelingResult:
    """What a run did; ``evaluation`` is set when the input carries ground truth (``male``)."""

    output_uri: str
    rows_in: int
    already_labeled: int
    labeled: int
    errors: int
    seconds: float
    evaluation: dict | None
    images_with_faces: int | None = None  # faces detect/auto: ``labeled`` counts faces, this the images they are in
    retryable: int = 0  # of ``errors``: storage failures that ``--resume --retry-errors`` labels again
    files: int = 0  # output files written by this run

    @property
    def images_per_second(self) -> float:
        images = self.labeled if self.images_with_faces is None else self.images_with_faces
        return (images + self.errors) / self.seconds if self.seconds else math.nan

    def report(self) -> str:
        labeled = (
            self.labeled
            if self.images_with_faces is None
            else f"{self.labeled} faces in {self.images_with_faces} images"
        )
        retry = f" ({self.retryable} retryable: run again with --resume --retry-errors)" if self.retryable else ""
        lines = [
            f"rows in: {self.rows_in}  already labeled (resume): {self.already_labeled}  "
            f"labeled now: {labeled}  errors: {self.errors}{retry}  "
            f"({self.seconds:.1f} s, {self.images_per_second:.1f} images/s)",
            f"output: {self.output_uri} ({self.files} files written)",
        ]
        if self.evaluation is not None:
            lines.append(format_evaluation(self.evaluation))
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks before any cluster work


def prepare(options: LabelingOptions) -> LabelingPlan:
    """Check the model, input and output; fix the shards (listing an image prefix once); find those still to do.

    Only Parquet footers and file names are read: no input row beyond a first few (checked so that a wrong manifest
    fails here), and no output row.
    """
    card = _check_model(options.model_dir, options.engine)
    done = _check_output(options)
    job = shards.read_job(options.output_uri) if options.resume else None
    if job is not None:
        _check_same_job(options, job)
        known = {source.uri: source for source in job.sources}
        columns, _ = _check_sources(job.input_uri, list(known), known)
    else:
        job, columns = _new_job(options)
    clashes = [name for name in FACE_COLUMNS if options.detects_faces and name in columns]
    if clashes:
        raise LabelingError(
            f"{options.input_uri}: column(s) {clashes} would be overwritten by the faces columns; rename them"
        )
    retry = {name for name, part in done.items() if shards.retryable_rows(part)} if options.retry_errors else set()
    chunks, rows_in, already = [], 0, 0
    for chunk in job.chunks():
        todo = []
        for shard in chunk.shards:
            rows_in += shard.rows
            if shard.name in retry:
                todo.append(dataclasses.replace(shard, retry=True))
            elif shard.name in done:
                already += shard.rows
            else:
                todo.append(shard)
        if todo:
            chunks.append(dataclasses.replace(chunk, shards=tuple(todo)))
    threshold = options.threshold if options.threshold is not None else card.threshold
    return LabelingPlan(options, card, threshold, job, tuple(chunks), tuple(columns), rows_in, already, len(retry))


def _check_model(model_dir: str, engine: engines.EngineName) -> bundle.ModelCard:
    """The model directory's card, checked (and ``model.keras`` and the engine's export beside it) without loading."""
    try:
        card = bundle.read_card(model_dir)
        engines.check_available(engine, card.exports, model_dir)
    except (bundle.BundleError, engines.EngineError) as exc:
        raise LabelingError(str(exc)) from None
    if not storage.exists(storage.join(model_dir, bundle.MODEL_FILE)):
        raise LabelingError(f"{model_dir}: no {bundle.MODEL_FILE} beside {bundle.CARD_FILE}")
    return card


def _check_output(options: LabelingOptions) -> dict[str, str]:
    """The output files already written (shard name → URI); an output that holds labels needs ``resume``."""
    output_uri = options.output_uri
    if options.retry_errors and not options.resume:
        raise LabelingError("--retry-errors relabels the error rows of an earlier run: it needs --resume")
    fs, path = storage.filesystem(output_uri)
    if storage.is_s3(output_uri):
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise LabelingError(f"{output_uri}: bucket {bucket!r} does not exist (create it first)")
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise LabelingError(f"{output_uri}: output must be a folder or prefix, not a file")
    parts = storage.list_files(output_uri, (MANIFEST_SUFFIX,), recursive=False)
    has_job = storage.exists(storage.join(output_uri, shards.JOB_FILE))
    if (parts or has_job) and not options.resume:
        raise LabelingError(
            f"{output_uri} already holds {len(parts)} Parquet file(s) of labels: pass --resume to label only the "
            "images not in them yet, or choose another output"
        )
    if parts and not has_job:
        raise LabelingError(
            f"{output_uri}: holds Parquet files but no {shards.JOB_FILE} (written by another tool or an older "
            "genderrec): resume needs the job's shards; label into a new output"
        )
    return shards.written(output_uri)


def _check_same_job(options: LabelingOptions, job: shards.JobSpec) -> None:
    where = storage.join(options.output_uri, shards.JOB_FILE)
    if job.input_uri != options.input_uri:
        raise LabelingError(f"{where}: this output labels {job.input_uri}, not {options.input_uri}; resume with it")
    if job.faces != options.faces:
        raise LabelingError(f"{where}: this output was labeled with --faces {job.faces}, not {options.faces}")


def _new_job(options: LabelingOptions) -> tuple[shards.JobSpec, list[str]]:
    """The shards of a first run: a manifest's files, or the listing of an image folder/prefix (written now)."""
    uri = options.input_uri
    fs, path = storage.filesystem(uri)
    try:
        kind = fs.get_file_info(path).type
    except OSError as exc:
        raise LabelingError(f"{uri}: cannot access the input: {exc}") from None
    if kind == pafs.FileType.NotFound:
        raise LabelingError(f"{uri}: not found (no file, and no folder or S3 prefix holding files)")
    files = [uri] if kind == pafs.FileType.File else None
    if files is None and not _holds_images(uri):
        files = storage.list_files(uri, (MANIFEST_SUFFIX,))
        if not files:
            raise LabelingError(
                f"{uri}: empty input: no image files ({', '.join(images.IMAGE_SUFFIXES)}) and no Parquet manifest "
                "below it"
            )
    if files is None:
        files = [
            source.uri
            for source in shards.write_listing(uri, options.output_uri, images.IMAGE_SUFFIXES, options.rows_per_file)
        ]
    columns, sources = _check_sources(uri, files, {})
    return shards.JobSpec(uri, options.faces, options.rows_per_file, sources), columns


def _holds_images(uri: str) -> bool:
    """Whether a folder/prefix holds image files (it is then an image prefix, else a folder of manifests)."""
    return next(iter(storage.walk_files(uri, images.IMAGE_SUFFIXES)), None) is not None


def _check_sources(
    uri: str, files: list[str], known: dict[str, shards.Source]
) -> tuple[list[str], tuple[shards.Source, ...]]:
    """The input's columns and files, checked from their footers (and first rows); on resume, that none changed."""
    columns, sources = None, []
    for file in files:
        try:
            source, schema = shards.source(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise LabelingError(f"{uri}: not a readable Parquet manifest: {file}: {exc}") from None
        if known and known.get(file) != source:
            raise LabelingError(f"{uri}: {file} changed since the first run of this output; label into a new output")
        if "image_uri" not in schema.names:
            raise LabelingError(f"{uri}: manifest has no 'image_uri' column (it has {schema.names})")
        uri_type = schema.field("image_uri").type
        if not (pa.types.is_string(uri_type) or pa.types.is_large_string(uri_type)):
            raise LabelingError(f"{uri}: 'image_uri' must hold strings, not {uri_type}")
        columns = columns or ["image_uri", *(name for name in schema.names if name != "image_uri")]
        sources.append(source)
    clashes = [name for name in OUTPUT_COLUMNS[1:] if name in columns]
    if clashes:
        raise LabelingError(f"{uri}: manifest column(s) {clashes} would be overwritten by the labels; rename them")
    first = next((source for source in sources if source.rows), None)
    if first is None:
        raise LabelingError(f"{uri}: manifest has no rows")
    _check_first_rows(uri, first.uri)
    return columns, tuple(sources)


def _check_first_rows(uri: str, file: str) -> None:
    """Fail fast on a manifest whose first rows lack absolute ``image_uri`` (later ones become error rows)."""
    fs, path = storage.filesystem(file)
    with fs.open_input_file(path) as handle:
        uris = next(pq.ParquetFile(handle).iter_batches(batch_size=FIRST_ROWS_CHECKED, columns=["image_uri"]))[0]
    if uris.null_count:
        row = pc.index(pc.is_null(uris), True).as_py()
        raise LabelingError(f"{uri}: {uris.null_count} row(s) have no image_uri (first: row {row})")
    relative = pc.invert(pc.or_(pc.starts_with(uris, storage.S3_SCHEME), pc.starts_with(uris, "/")))
    if pc.any(relative).as_py():
        example = uris.filter(relative)[0].as_py()
        raise LabelingError(f"{uri}: image_uri must be absolute paths or s3:// URIs, found {example!r}")


# --------------------------------------------------------------------------- the Ray Data pipeline


def _read_chunk(chunk: shards.Chunk, columns: tuple[str, ...], batch_rows: int, output_uri: str):
    """Ray Data read task: the input rows of a chunk's shards to label, tagged with their shard, in small blocks."""
    fs, path = storage.filesystem(chunk.source)

    def read() -> pa.Table:
        with fs.open_input_file(path) as handle:
            return pq.ParquetFile(handle).read_row_groups(list(chunk.row_groups), columns=list(columns))

    table = _retried(read).replace_schema_metadata(None)
    for shard in chunk.shards:
        rows = table.slice(shard.start, shard.rows)
        rows = rows.append_column(_ROW, pa.array(np.arange(shard.rows), pa.int64()))
        if shard.retry:
            redo = shards.retryable_uris(storage.join(output_uri, shard.file_name))
            rows = rows.filter(pc.is_in(rows["image_uri"], value_set=redo.cast(rows["image_uri"].type)))
        count = rows.num_rows
        rows = rows.append_column(_SHARD, pa.array([shard.name] * count, pa.string()))
        rows = rows.append_column(_SHARD_IMAGES, pa.array([count] * count, pa.int64()))
        rows = rows.append_column(_IMAGE_ROWS, pa.array([1] * count, pa.int64()))
        for offset in range(0, count, batch_rows):
            yield rows.slice(offset, batch_rows)


class _ShardSource(Datasource):
    """The plan's chunks as Ray Data read tasks: the input is read by the cluster as the job goes, never whole."""

    def __init__(self, plan: LabelingPlan):
        super().__init__()
        self.chunks, self.columns = plan.chunks, plan.columns
        self.batch_rows, self.output_uri = plan.options.batch_size, plan.options.output_uri

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(_read_chunk, chunk, self.columns, self.batch_rows, self.output_uri),
                BlockMetadata(
                    num_rows=sum(shard.rows for shard in chunk.shards),
                    size_bytes=None,
                    exec_stats=None,
                    input_files=(chunk.source,),
                ),
            )
            for chunk in self.chunks
        ]


def _retried(read):
    """``read()``, retried with exponential backoff on storage errors (not on a missing file)."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(READ_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def _decode(uri: str | None, max_pixels: int) -> tuple[np.ndarray | None, str | None, bool]:
    """``(uint8 RGB, None, False)`` or ``(None, why, retryable)``: a bad file is a row's error, never the job's.

    Retryable: the bytes could not be fetched (storage down, network, missing object), so a later run may succeed;
    bytes that are not a usable image are not retryable.
    """
    if uri is None:
        return None, "no image_uri", False
    if not uri.startswith((storage.S3_SCHEME, "/")):
        return None, f"image_uri must be an absolute path or s3:// URI, got {uri!r}", False
    try:
        data = _retried(functools.partial(storage.read_bytes, uri))
    except Exception as exc:  # missing object, access denied, network: the row records it
        return None, f"cannot read: {exc}", True
    try:
        return images.decode_image(data, max_pixels), None, False
    except images.ImageDecodeError as exc:
        return None, str(exc), False
    except Exception as exc:  # Pillow raises odd types on hostile files; one file must not stop the job
        return None, f"cannot decode: {type(exc).__name__}: {exc}", False


def _decode_all(uris: list[str | None], max_pixels: int) -> list[tuple[np.ndarray | None, str | None, bool]]:
    """Decode a batch with a few threads: reads wait on storage (S3 latency), and Pillow releases the GIL."""
    with ThreadPoolExecutor(max(1, min(READ_THREADS, len(uris)))) as pool:
        return list(pool.map(functools.partial(_decode, max_pixels=max_pixels), uris))


def read_and_decode(batch: pa.Table, size: tuple[int, int], crop_box, max_pixels: int) -> pa.Table:
    """Ray Data CPU task: add the model input (zeros for bad files), ``error`` and ``retryable`` to a batch of rows."""
    from ray.data.extensions import ArrowTensorArray

    pixels = np.zeros((batch.num_rows, *size, 3), dtype=np.float32)
    errors, retryable = [], []
    for row, (rgb, error, again) in enumerate(_decode_all(batch["image_uri"].to_pylist(), max_pixels)):
        if rgb is not None:
            pixels[row] = images.resize(rgb, size, crop_box)
        errors.append(error)
        retryable.append(error is not None and again)
    batch = batch.append_column("error", pa.array(errors, pa.string()))
    batch = batch.append_column("retryable", pa.array(retryable, pa.bool_()))
    return batch.append_column(_PIXELS, ArrowTensorArray.from_numpy(pixels))


class FaceFinder:
    """Ray Data actor (CPU): loads the face detector once, then turns each image row into one row per face found.

    Each output row carries the input row's columns, the face's columns (:data:`FACE_COLUMNS`) and the aligned face
    as the model's input. An image that cannot be read, or (``detect``) has no face, is one row with an ``error``.
    """

    def __init__(self, mode: str, options: faces.FaceOptions, size: tuple[int, int], crop_box, max_pixels: int):
        self.detector = faces.load_detector(options)
        self.mode, self.options, self.size, self.crop_box, self.max_pixels = mode, options, size, crop_box, max_pixels

    def _crops(self, decoded: tuple[np.ndarray | None, str | None, bool]) -> tuple[list[faces.FaceCrop], str | None]:
        rgb, error, _ = decoded
        if rgb is None:
            return [], error
        try:
            crops = faces.face_crops(rgb, self.detector, self.options, self.mode, self.size, self.crop_box)
        except Exception as exc:  # one hostile image must not stop the job
            return [], f"face detection failed: {type(exc).__name__}: {exc}"
        return crops, None if crops else faces.NO_FACE

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        rows, crops, errors, retryable, image_rows = [], [], [], [], []
        for row, decoded in enumerate(_decode_all(batch["image_uri"].to_pylist(), self.max_pixels)):
            found, error = self._crops(decoded)
            for index, crop in enumerate(found or [None]):
                rows.append(row)
                crops.append(crop)
                errors.append(error)
                retryable.append(error is not None and decoded[2])
                image_rows.append(None if index else len(found or [None]))  # on an image's first row only
        detected = [crop.face if crop else None for crop in crops]
        pixels = np.zeros((len(crops), *self.size, 3), dtype=np.float32)
        for index, crop in enumerate(crops):
            if crop is not None:
                pixels[index] = crop.pixels
        carried = batch.take(rows)
        columns = {
            "image_uri": carried["image_uri"],
            "face_index": pa.array([crop.face_index if crop else None for crop in crops], pa.int32()),
            "face_source": pa.array([crop.source if crop else None for crop in crops], pa.string()),
            "box": pa.array([list(face.box) if face else None for face in detected], pa.list_(pa.float64(), 4)),
            "landmarks": pa.array(
                [face.landmarks.tolist() if face else None for face in detected],
                pa.list_(pa.list_(pa.float64(), 2), len(faces.LANDMARK_NAMES)),
            ),
            "det_confidence": pa.array([face.confidence if face else None for face in detected], pa.float64()),
            **{name: carried[name] for name in carried.column_names if name not in ("image_uri", _IMAGE_ROWS)},
            _IMAGE_ROWS: pa.array(image_rows, pa.int64()),
            "error": pa.array(errors, pa.string()),
            "retryable": pa.array(retryable, pa.bool_()),
            _PIXELS: ArrowTensorArray.from_numpy(pixels),
        }
        return pa.table(columns)


class Predictor:
    """Ray Data actor: loads the model once, then turns batches of decoded rows into output rows."""

    def __init__(self, model_dir: str, threshold: float, engine: engines.EngineName, precision: engines.Precision):
        _allow_gpu_memory_growth()
        loaded = bundle.ModelBundle.load(model_dir, engine=engine, precision=precision)
        # --threshold overrides the card's: the bundle names the classes at the threshold the job was given.
        self.bundle = dataclasses.replace(loaded, card=loaded.card.model_copy(update={"threshold": threshold}))

    def __call__(self, batch: pa.Table) -> pa.Table:
        decoded = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        p_male = np.zeros(batch.num_rows, dtype=np.float64)
        if decoded.any():
            pixels = batch[_PIXELS].combine_chunks().to_numpy()[decoded]
            p_male[decoded] = self.bundle.predict_proba(pixels)
        outputs = {
            "image_uri": batch["image_uri"],
            "p_male": pa.array(p_male, pa.float64(), mask=~decoded),
            "label": pa.array(self.bundle.label(p_male), pa.string(), mask=~decoded),
            "model": pa.array([self.bundle.card.version] * batch.num_rows, pa.string()),
            "error": batch["error"],
            "retryable": batch["retryable"],
        }
        carried = [name for name in batch.column_names if name not in (*OUTPUT_COLUMNS, _PIXELS)]
        return pa.table({**outputs, **{name: batch[name] for name in carried}})


def _allow_gpu_memory_growth() -> None:
    """Let several actors share a GPU (``--gpus-per-actor 0.5``): TensorFlow otherwise takes all its memory."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


@dataclass
class _Pending:
    """A shard's labeled rows gathered so far; complete when every image of it has all its rows."""

    images: int  # expected
    parts: list[pa.Table] = dataclasses.field(default_factory=list)
    images_seen: int = 0
    rows_seen: int = 0
    rows_expected: int = 0

    def add(self, part: pa.Table) -> None:
        self.parts.append(part)
        self.images_seen += len(part[_IMAGE_ROWS]) - part[_IMAGE_ROWS].null_count
        self.rows_expected += pc.sum(part[_IMAGE_ROWS]).as_py() or 0
        self.rows_seen += part.num_rows

    @property
    def complete(self) -> bool:
        return self.images_seen == self.images and self.rows_seen == self.rows_expected


class ShardWriter:
    """Ray Data actor (a sliver of a CPU, so it never waits behind inference): gathers each shard's rows and writes
    the shard's output file, whole, as soon as the last of them arrives. Returns one summary row per file written.

    In a ``--retry-errors`` run the new rows replace the retried ones in the shard's existing file (rewritten whole),
    so every input is still in the output once.
    """

    def __init__(self, output_uri: str, retry: bool):
        self.output_uri, self.retry = output_uri, retry
        self.pending: dict[str, _Pending] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        written = []
        for name in pc.unique(batch[_SHARD]).to_pylist():
            part = batch.filter(pc.equal(batch[_SHARD], name))
            state = self.pending.setdefault(name, _Pending(part[_SHARD_IMAGES][0].as_py()))
            state.add(part)
            if state.images_seen > state.images:
                raise RuntimeError(f"shard {name}: {state.images_seen} images for {state.images} inputs")
            if state.complete:
                written.append(self._write(name, self.pending.pop(name)))
        return pa.Table.from_pylist(written, schema=_SUMMARY)

    def _write(self, name: str, state: _Pending) -> dict:
        table = pa.concat_tables(state.parts)
        order = [(_ROW, "ascending"), *([("face_index", "ascending")] if "face_index" in table.column_names else [])]
        table = table.take(pc.sort_indices(table, sort_keys=order))
        labeled = table.filter(pc.is_valid(table["p_male"]))
        summary = {
            "shard": name,
            "images": state.images,
            "labeled": labeled.num_rows,
            "errors": table.num_rows - table["error"].null_count,
            "retryable": pc.sum(pc.fill_null(table["retryable"], False).cast(pa.int64())).as_py() or 0,
            "images_with_faces": pc.count_distinct(labeled[_ROW]).as_py(),
        }
        table = table.drop_columns([name for name in table.column_names if name.startswith(_INTERNAL)])
        uri = storage.join(self.output_uri, name + shards.PART_SUFFIX)
        if self.retry and storage.exists(uri):
            fs, path = storage.filesystem(uri)
            old = pq.read_table(path, filesystem=fs).replace_schema_metadata(None)
            kept = old.filter(pc.invert(pc.is_in(old["image_uri"], value_set=pc.unique(table["image_uri"]))))
            table = pa.concat_tables([kept, table.cast(kept.schema)])
        storage.write_parquet(shards.with_footer(table), uri)
        return summary


def build_dataset(plan: LabelingPlan):
    """The lazy Ray Data pipeline for the plan's shards (nothing runs until it is consumed): summary rows out."""
    import ray

    options, card = plan.options, plan.card
    env_vars = storage.s3_env_vars()
    runtime_env = {"env_vars": env_vars} if env_vars else None
    # One read task at a time, and blocks kept in input order through every stage: shards then reach the writer one
    # after the other and are written as the job goes (interleaved, every shard would complete near the end), and
    # the writer holds about one shard's rows, not a part of every shard's.
    dataset = ray.data.read_datasource(_ShardSource(plan), num_cpus=READ_CPUS, concurrency=1, runtime_env=runtime_env)
    dataset.context.execution_options.preserve_order = True
    model_input = {"size": card.input_size, "crop_box": card.crop_box, "max_pixels": options.max_pixels}
    if options.detects_faces:
        dataset = dataset.map_batches(
            FaceFinder,
            batch_format="pyarrow",
            batch_size=DETECT_BATCH,
            compute=ray.data.ActorPoolStrategy(size=options.face_actors),
            fn_constructor_kwargs={"mode": options.faces, "options": options.face_options, **model_input},
            num_cpus=FACE_CPUS,
            runtime_env=runtime_env,
        )
    else:
        dataset = dataset.map_batches(
            read_and_decode,
            batch_format="pyarrow",
            batch_size=options.batch_size,
            fn_kwargs=model_input,
            num_cpus=DECODE_CPUS,
            runtime_env=runtime_env,
        )
    dataset = dataset.map_batches(
        Predictor,
        batch_format="pyarrow",
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        fn_constructor_kwargs={
            "model_dir": options.model_dir,
            "threshold": plan.threshold,
            "engine": options.engine,
            "precision": options.precision,
        },
        num_cpus=1,
        num_gpus=options.gpus_per_actor or None,
        runtime_env=runtime_env,
    )
    return dataset.map_batches(
        ShardWriter,
        batch_format="pyarrow",
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"output_uri": options.output_uri, "retry": options.retry_errors},
        num_cpus=WRITER_CPUS,
        runtime_env=runtime_env,
    )


def run(plan: LabelingPlan) -> LabelingResult:
    """Label the plan's shards into the output (on the Ray that is initialised), check each was written, evaluate."""
    output_uri = plan.options.output_uri
    if shards.read_job(output_uri) is None:
        shards.write_job(output_uri, plan.job)  # before any shard: a rerun must cut the input the same way
    storage.remove_temporaries(output_uri)
    started = time.perf_counter()
    summaries = pa.Table.from_pylist([], schema=_SUMMARY)
    if plan.chunks:
        summaries = pa.concat_tables(
            [summaries, *build_dataset(plan).iter_batches(batch_size=None, batch_format="pyarrow")]
        )
    seconds = time.perf_counter() - started
    _check_every_shard_written(plan, summaries)
    evaluation = (
        evaluate(output_uri, plan.threshold, plan.options.detects_faces) if TRUTH_COLUMN in plan.columns else None
    )
    totals = {name: pc.sum(summaries[name]).as_py() or 0 for name in _SUMMARY.names[1:]}
    return LabelingResult(
        output_uri=output_uri,
        rows_in=plan.rows_in,
        already_labeled=plan.already_labeled,
        labeled=totals["labeled"],
        errors=totals["errors"],
        seconds=seconds,
        evaluation=evaluation,
        images_with_faces=totals["images_with_faces"] if plan.options.detects_faces else None,
        retryable=totals["retryable"],
        files=summaries.num_rows,
    )


def _check_every_shard_written(plan: LabelingPlan, summaries: pa.Table) -> None:
    """Every shard to do was written once, with every one of its input images (a face or an error row each)."""
    where = plan.options.output_uri
    written = dict(zip(summaries["shard"].to_pylist(), summaries["images"].to_pylist(), strict=True))
    missing = [shard.name for shard in plan.todo if shard.name not in written]
    if missing or len(written) != summaries.num_rows:
        raise RuntimeError(f"{where}: {len(missing)} shard(s) not written (first: {missing[:3]}); run with --resume")
    short = [shard.name for shard in plan.todo if not shard.retry and written[shard.name] != shard.rows]
    if short:
        raise RuntimeError(f"{where}: shard(s) {short[:3]} do not hold every input image")


def label(options: LabelingOptions) -> LabelingResult:
    """Check, then label (Ray must already be initialised, e.g. by :func:`genderrec.cli.init_ray`)."""
    return run(prepare(options))


# --------------------------------------------------------------------------- evaluation mode


def evaluate(output_uri: str, threshold: float, per_face: bool = False) -> dict:
    """Accuracy, ROC-AUC and confusion matrix of every labeled row with ground truth; written beside the labels.

    Counted by Ray tasks that read only the columns needed, file by file: the driver gets counts and two p_male
    histograms (one per true class, :data:`EVALUATION_BINS` bins), never rows. Accuracy and the confusion matrix are
    exact; ROC-AUC is exact but for pairs of a man and a woman whose p_male fall in the same 1e-6-wide bin, which count
    as ties (half), as equal scores do. ``per_face`` (faces detect/auto output): the truth is the image's, so each
    image counts once, by its largest face (``face_index`` 0, or the whole image of ``auto``'s fallback).
    """
    import ray

    files = sorted(shards.written(output_uri).values())
    tasks = min(len(files), EVALUATION_TASKS)
    count = ray.remote(num_cpus=READ_CPUS)(_evaluation_counts)
    env_vars = storage.s3_env_vars()
    if env_vars:
        count = count.options(runtime_env={"env_vars": env_vars})
    parts = ray.get([count.remote(files[index::tasks], threshold, per_face) for index in range(tasks)])
    totals = {key: sum(part[key] for part in parts) for key in ("histogram", "confusion", "errors", "without_truth")}
    confusion, histogram = totals["confusion"], totals["histogram"]
    images = int(confusion.sum())
    result = {
        "images": images,
        "excluded_errors": int(totals["errors"]),
        "excluded_without_truth": int(totals["without_truth"]),
        "threshold": threshold,
        "accuracy": None,
        "roc_auc": None,
        "confusion_matrix": None,
    }
    if images:
        females, males = histogram
        pairs = int(females.sum()) * int(males.sum())
        below = np.cumsum(females) - females  # women with a lower p_male than each bin
        result.update(
            accuracy=float(np.trace(confusion)) / images,
            roc_auc=float((males * (below + 0.5 * females)).sum()) / pairs if pairs else None,
            confusion_matrix={
                "rows": "true female, true male",
                "columns": "predicted female, predicted male",
                "counts": confusion.tolist(),
            },
        )
    storage.write_text(storage.join(output_uri, EVALUATION_FILE), json.dumps(result, indent=2))
    return result


def _evaluation_counts(files: list[str], threshold: float, per_face: bool) -> dict:
    """Ray task: the evaluation's counts over some output files (see :func:`evaluate`)."""
    histogram = np.zeros((2, EVALUATION_BINS), np.int64)
    confusion = np.zeros((2, 2), np.int64)
    errors = without_truth = 0
    columns = [TRUTH_COLUMN, "p_male", *(["face_index"] if per_face else [])]
    for file in files:
        fs, path = storage.filesystem(file)
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(columns=columns):
                table = pa.Table.from_batches([batch])
                if per_face:
                    table = table.filter(pc.fill_null(pc.equal(table["face_index"], 0), True))
                labeled = pc.is_valid(table["p_male"])
                errors += table.num_rows - pc.sum(labeled.cast(pa.int64())).as_py()
                without_truth += pc.sum(pc.and_(labeled, pc.is_null(table[TRUTH_COLUMN])).cast(pa.int64())).as_py()
                usable = table.filter(pc.and_(labeled, pc.is_valid(table[TRUTH_COLUMN])))
                truth = usable[TRUTH_COLUMN].to_numpy(zero_copy_only=False).astype(np.int64)
                p_male = usable["p_male"].to_numpy(zero_copy_only=False)
                bins = np.minimum((p_male * EVALUATION_BINS).astype(np.int64), EVALUATION_BINS - 1)
                for truth_class in (0, 1):
                    histogram[truth_class] += np.bincount(bins[truth == truth_class], minlength=EVALUATION_BINS)
                confusion += np.bincount(truth * 2 + (p_male >= threshold), minlength=4).reshape(2, 2)
    return {"histogram": histogram, "confusion": confusion, "errors": errors, "without_truth": without_truth}


def format_evaluation(result: dict) -> str:
    if not result["images"]:
        return "evaluation: no labeled image has ground truth"
    auc = "n/a (one class only)" if result["roc_auc"] is None else f"{result['roc_auc']:.4f}"
    (tn, fp), (fn, tp) = result["confusion_matrix"]["counts"]
    return "\n".join(
        [
            f"evaluation on {result['images']} images (threshold {result['threshold']}): "
            f"accuracy {result['accuracy']:.4f}, ROC-AUC {auc}",
            "confusion matrix     predicted female  predicted male",
            f"  true female        {tn:>16}  {fp:>14}",
            f"  true male          {fn:>16}  {tp:>14}",
        ]
    )
