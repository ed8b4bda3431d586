"""Bulk labeling: a Parquet manifest or an image folder/prefix (local or ``s3://``) → a Parquet table of p(male).

The Ray Data pipeline is ``inputs → read + decode (CPU tasks) → predict (actor pool, the model loaded once per
actor) → write Parquet``. A file that cannot be read or decoded becomes a row with an ``error`` and no ``p_male``;
it never stops the job or drops a row (rows out == rows in). Everything a user can get wrong (model directory,
input, output) is checked on the driver by :func:`prepare`, before any cluster work starts.

With ``faces="detect"`` or ``"auto"`` (ordinary photos, see :mod:`genderrec.faces`) the read + decode tasks are
replaced by a pool of :class:`FaceFinder` actors (the detector loaded once per actor) that emit one row per face,
aligned CelebA-style, and the same predict actors classify them. Every image still has at least one row: an image
with no face is a row with ``error = "no face found"`` (``detect``) or the whole image flagged ``whole_image``
(``auto``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from pydantic import ValidationError

from genderrec import bundle, faces, images, storage

OUTPUT_COLUMNS = ("image_uri", "p_male", "label", "model", "error")
FACE_COLUMNS = ("face_index", "face_source", "box", "landmarks", "det_confidence")  # in faces detect/auto modes
TRUTH_COLUMN = "male"
MANIFEST_SUFFIX = ".parquet"
EVALUATION_FILE = "_evaluation.json"  # "_" prefix: Parquet readers (pyarrow, Spark, Ray) skip it
ROWS_PER_FILE = 10_000
# Half a CPU per decode task: reads wait on storage, so twice as many tasks as cores keep the cores busy. It also
# keeps Ray Data from fusing decoding into the inference actors (it fuses maps with equal resources only).
DECODE_CPUS = 0.5
# Photos per face detection call: detection takes ~0.5 s per photo, so small batches let the model actors start on
# the first faces while the rest are still being detected (the model's batches are gathered to --batch-size).
DETECT_BATCH = 4
_PIXELS = "__genderrec_pixels"
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
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    faces: faces.FacesMode = "aligned"  # aligned: CelebA-like crops as they are; detect/auto: ordinary photos
    min_face_size: int = _FACE_DEFAULTS.min_face_size
    min_face_confidence: float = _FACE_DEFAULTS.min_face_confidence
    max_faces: int = _FACE_DEFAULTS.max_faces
    face_actors: int = 1  # face detection actors (CPU), each loads the detector once

    def __post_init__(self):
        if self.batch_size < 1:
            raise LabelingError(f"batch size must be at least 1, got {self.batch_size}")
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
    """A checked job: the model card, and the input rows still to label (all of them unless resuming)."""

    options: LabelingOptions
    card: bundle.ModelCard
    threshold: float
    todo: pa.Table
    rows_in: int

    @property
    def already_labeled(self) -> int:
        return self.rows_in - self.todo.num_rows


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
        lines = [
            f"rows in: {self.rows_in}  already labeled (resume): {self.already_labeled}  "
            f"labeled now: {labeled}  errors: {self.errors}  "
            f"({self.seconds:.1f} s, {self.images_per_second:.1f} images/s)",
            f"output: {self.output_uri}",
        ]
        if self.evaluation is not None:
            lines.append(format_evaluation(self.evaluation))
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks before any cluster work


def prepare(options: LabelingOptions) -> LabelingPlan:
    """Check the model, read the input rows and (with ``resume``) drop those already in the output."""
    card = _check_model(options.model_dir)
    inputs = read_inputs(options.input_uri)
    clashes = [name for name in FACE_COLUMNS if options.detects_faces and name in inputs.column_names]
    if clashes:
        raise LabelingError(
            f"{options.input_uri}: column(s) {clashes} would be overwritten by the faces columns; rename them"
        )
    done = _labeled_uris(options.output_uri, options.resume)
    todo = inputs.filter(pc.invert(pc.is_in(inputs["image_uri"], value_set=done))) if len(done) else inputs
    threshold = options.threshold if options.threshold is not None else card.threshold
    return LabelingPlan(options, card, threshold, todo, inputs.num_rows)


def _check_model(model_dir: str) -> bundle.ModelCard:
    """The model directory's card, checked (and ``model.keras`` beside it) without loading the model."""
    try:
        card = bundle.read_card(model_dir)
    except bundle.BundleError as exc:
        raise LabelingError(str(exc)) from None
    if not storage.exists(storage.join(model_dir, bundle.MODEL_FILE)):
        raise LabelingError(f"{model_dir}: no {bundle.MODEL_FILE} beside {bundle.CARD_FILE}")
    return card


def read_inputs(uri: str) -> pa.Table:
    """The rows to label: a Parquet manifest (file, or folder of Parquet files) or every image under a prefix."""
    fs, path = storage.filesystem(uri)
    try:
        kind = fs.get_file_info(path).type
    except OSError as exc:
        raise LabelingError(f"{uri}: cannot access the input: {exc}") from None
    if kind == pafs.FileType.File:
        return _read_manifest(uri, [uri])
    if kind == pafs.FileType.NotFound:
        raise LabelingError(f"{uri}: not found (no file, and no folder or S3 prefix holding files)")
    uris = storage.list_files(uri, images.IMAGE_SUFFIXES)
    if uris:
        return pa.table({"image_uri": pa.array(uris, pa.string())})
    manifests = storage.list_files(uri, (MANIFEST_SUFFIX,))
    if manifests:
        return _read_manifest(uri, manifests)
    raise LabelingError(
        f"{uri}: empty input: no image files ({', '.join(images.IMAGE_SUFFIXES)}) and no Parquet manifest below it"
    )


def _read_manifest(uri: str, files: list[str]) -> pa.Table:
    try:
        table = _read_parts(files)
    except (pa.ArrowInvalid, OSError) as exc:
        raise LabelingError(f"{uri}: not a readable Parquet manifest: {exc}") from None
    if "image_uri" not in table.column_names:
        raise LabelingError(f"{uri}: manifest has no 'image_uri' column (it has {table.column_names})")
    uri_type = table.schema.field("image_uri").type
    if not (pa.types.is_string(uri_type) or pa.types.is_large_string(uri_type)):
        raise LabelingError(f"{uri}: 'image_uri' must hold strings, not {uri_type}")
    if table.num_rows == 0:
        raise LabelingError(f"{uri}: manifest has no rows")
    uris = table["image_uri"]
    if uris.null_count:
        first = pc.index(pc.is_null(uris), True).as_py()
        raise LabelingError(f"{uri}: {uris.null_count} row(s) have no image_uri (first: row {first})")
    relative = pc.invert(pc.or_(pc.starts_with(uris, storage.S3_SCHEME), pc.starts_with(uris, "/")))
    if pc.any(relative).as_py():
        example = uris.filter(relative)[0].as_py()
        raise LabelingError(f"{uri}: image_uri must be absolute paths or s3:// URIs, found {example!r}")
    clashes = [name for name in OUTPUT_COLUMNS[1:] if name in table.column_names]
    if clashes:
        raise LabelingError(f"{uri}: manifest column(s) {clashes} would be overwritten by the labels; rename them")
    ordered = ["image_uri", *(name for name in table.column_names if name != "image_uri")]
    return table.select(ordered).replace_schema_metadata(None)


def _output_parts(output_uri: str) -> list[str]:
    return storage.list_files(output_uri, (MANIFEST_SUFFIX,))


def _labeled_uris(output_uri: str, resume: bool) -> pa.Array:
    """The image URIs already in the output (for ``resume``); an output that holds labels needs ``resume``."""
    fs, path = storage.filesystem(output_uri)
    if storage.is_s3(output_uri):
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise LabelingError(f"{output_uri}: bucket {bucket!r} does not exist (create it first)")
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise LabelingError(f"{output_uri}: output must be a folder or prefix, not a file")
    parts = _output_parts(output_uri)
    if not parts:
        return pa.array([], pa.string())
    if not resume:
        raise LabelingError(
            f"{output_uri} already holds {len(parts)} Parquet file(s) of labels: pass --resume to label only the "
            "images not in them yet, or choose another output"
        )
    try:
        done = _read_parts(parts, ["image_uri"])
    except (pa.ArrowInvalid, OSError) as exc:
        raise LabelingError(
            f"{output_uri}: cannot read the labels written so far ({exc}); a file cut short by a crash can be "
            "deleted, then run with --resume again"
        ) from None
    return pc.unique(done["image_uri"])


def _read_parts(parts: list[str], columns: list[str] | None = None) -> pa.Table:
    """Read Parquet files (local or on one S3 endpoint) as one table."""
    fs, _ = storage.filesystem(parts[0])
    dataset = pads.dataset([storage.filesystem(part)[1] for part in parts], filesystem=fs, format="parquet")
    return dataset.to_table(columns=columns)


# --------------------------------------------------------------------------- the Ray Data pipeline


def _decode(uri: str, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """``(uint8 RGB, None)`` or ``(None, why)``: a bad file is a row's error, never the job's."""
    try:
        data = storage.read_bytes(uri)
    except Exception as exc:  # missing object, access denied, network: the row records it
        return None, f"cannot read: {exc}"
    try:
        return images.decode_image(data, max_pixels), None
    except images.ImageDecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # Pillow raises odd types on hostile files; one file must not stop the job
        return None, f"cannot decode: {type(exc).__name__}: {exc}"


def _load(uri: str, size: tuple[int, int], crop_box, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """``(model input, None)`` or ``(None, why)``."""
    rgb, error = _decode(uri, max_pixels)
    return (None, error) if rgb is None else (images.resize(rgb, size, crop_box), None)


def read_and_decode(batch: pa.Table, size: tuple[int, int], crop_box, max_pixels: int) -> pa.Table:
    """Ray Data CPU task: add the model input (zeros for bad files) and an ``error`` column to a batch of rows."""
    from ray.data.extensions import ArrowTensorArray

    pixels = np.zeros((batch.num_rows, *size, 3), dtype=np.float32)
    errors = []
    for row, uri in enumerate(batch["image_uri"].to_pylist()):
        image, error = _load(uri, size, crop_box, max_pixels)
        if image is not None:
            pixels[row] = image
        errors.append(error)
    batch = batch.append_column("error", pa.array(errors, pa.string()))
    return batch.append_column(_PIXELS, ArrowTensorArray.from_numpy(pixels))


class FaceFinder:
    """Ray Data actor (CPU): loads the face detector once, then turns each image row into one row per face found.

    Each output row carries the input row's columns, the face's columns (:data:`FACE_COLUMNS`) and the aligned face
    as the model's input. An image that cannot be read, or (``detect``) has no face, is one row with an ``error``.
    """

    def __init__(self, mode: str, options: faces.FaceOptions, size: tuple[int, int], crop_box, max_pixels: int):
        self.detector = faces.load_detector(options)
        self.mode, self.options, self.size, self.crop_box, self.max_pixels = mode, options, size, crop_box, max_pixels

    def _crops(self, uri: str) -> tuple[list[faces.FaceCrop], str | None]:
        rgb, error = _decode(uri, self.max_pixels)
        if rgb is None:
            return [], error
        try:
            crops = faces.face_crops(rgb, self.detector, self.options, self.mode, self.size, self.crop_box)
        except Exception as exc:  # one hostile image must not stop the job
            return [], f"face detection failed: {type(exc).__name__}: {exc}"
        return crops, None if crops else faces.NO_FACE

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        rows, crops, errors = [], [], []
        for row, uri in enumerate(batch["image_uri"].to_pylist()):
            found, error = self._crops(uri)
            for crop in found or [None]:
                rows.append(row)
                crops.append(crop)
                errors.append(error)
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
            **{name: carried[name] for name in carried.column_names if name != "image_uri"},
            "error": pa.array(errors, pa.string()),
            _PIXELS: ArrowTensorArray.from_numpy(pixels),
        }
        return pa.table(columns)


class Predictor:
    """Ray Data actor: loads the model once, then turns batches of decoded rows into output rows."""

    def __init__(self, model_dir: str, threshold: float):
        _allow_gpu_memory_growth()
        loaded = bundle.ModelBundle.load(model_dir)
        # --threshold overrides the card's: the bundle names the classes at the threshold the job was given.
        self.bundle = bundle.ModelBundle(loaded.model, loaded.card.model_copy(update={"threshold": threshold}))

    def __call__(self, batch: pa.Table) -> pa.Table:
        decoded = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        p_male = np.zeros(batch.num_rows, dtype=np.float64)
        if decoded.any():
            pixels = batch[_PIXELS].combine_chunks().to_numpy()[decoded]
            p_male[decoded] = self.bundle.predict_proba(pixels, batch_size=len(pixels))
        outputs = {
            "image_uri": batch["image_uri"],
            "p_male": pa.array(p_male, pa.float64(), mask=~decoded),
            "label": pa.array(self.bundle.label(p_male), pa.string(), mask=~decoded),
            "model": pa.array([self.bundle.card.version] * batch.num_rows, pa.string()),
            "error": batch["error"],
        }
        carried = [name for name in batch.column_names if name not in (*OUTPUT_COLUMNS, _PIXELS)]
        return pa.table({**outputs, **{name: batch[name] for name in carried}})


def _allow_gpu_memory_growth() -> None:
    """Let several actors share a GPU (``--gpus-per-actor 0.5``): TensorFlow otherwise takes all its memory."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def build_dataset(plan: LabelingPlan):
    """The lazy Ray Data pipeline for ``plan.todo`` (nothing runs until it is written)."""
    import ray

    options, card = plan.options, plan.card
    env_vars = storage.s3_env_vars()
    runtime_env = {"env_vars": env_vars} if env_vars else None
    blocks = max(1, math.ceil(plan.todo.num_rows / options.batch_size))
    dataset = ray.data.from_arrow(plan.todo, override_num_blocks=blocks)
    model_input = {
        "size": card.input_size,
        "crop_box": card.crop_box,
        "max_pixels": options.max_pixels,
    }
    if options.detects_faces:
        dataset = dataset.map_batches(
            FaceFinder,
            batch_format="pyarrow",
            batch_size=DETECT_BATCH,
            compute=ray.data.ActorPoolStrategy(size=options.face_actors),
            fn_constructor_kwargs={"mode": options.faces, "options": options.face_options, **model_input},
            num_cpus=1,
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
    return dataset.map_batches(
        Predictor,
        batch_format="pyarrow",
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        fn_constructor_kwargs={"model_dir": options.model_dir, "threshold": plan.threshold},
        num_cpus=1,
        num_gpus=options.gpus_per_actor or None,
        runtime_env=runtime_env,
    )


def run(plan: LabelingPlan) -> LabelingResult:
    """Label ``plan.todo`` into the output (on the Ray that is initialised), check the row count, evaluate."""
    output_uri = plan.options.output_uri
    before = set(_output_parts(output_uri))
    started = time.perf_counter()
    if plan.todo.num_rows:
        env_vars = storage.s3_env_vars()
        fs, path = storage.filesystem(output_uri)
        build_dataset(plan).write_parquet(
            path,
            filesystem=fs,
            try_create_dir=not storage.is_s3(output_uri),  # S3 has no folders; marker objects confuse some servers
            min_rows_per_file=ROWS_PER_FILE,
            ray_remote_args={"runtime_env": {"env_vars": env_vars}} if env_vars else None,
        )
    seconds = time.perf_counter() - started
    new_parts = sorted(set(_output_parts(output_uri)) - before)
    columns = ["image_uri", "p_male", "error"]
    written = (
        _read_parts(new_parts, columns)
        if new_parts
        else pa.table({name: pa.array([], pa.string()) for name in columns})
    )
    _check_every_input_has_rows(plan, written)
    evaluation = (
        evaluate(output_uri, plan.threshold, plan.options.detects_faces)
        if TRUTH_COLUMN in plan.todo.column_names
        else None
    )
    labeled = written.filter(pc.is_valid(written["p_male"]))
    return LabelingResult(
        output_uri=output_uri,
        rows_in=plan.rows_in,
        already_labeled=plan.already_labeled,
        labeled=labeled.num_rows,
        errors=written.num_rows - written["error"].null_count,
        seconds=seconds,
        evaluation=evaluation,
        images_with_faces=pc.count_distinct(labeled["image_uri"]).as_py() if plan.options.detects_faces else None,
    )


def _check_every_input_has_rows(plan: LabelingPlan, written: pa.Table) -> None:
    """Rows out == rows in; with faces, every input image has at least one row (a face, or its error)."""
    where = plan.options.output_uri
    if not plan.options.detects_faces:
        if written.num_rows != plan.todo.num_rows:
            raise RuntimeError(f"{where}: wrote {written.num_rows} rows for {plan.todo.num_rows} inputs")
        return
    missing = pc.count_distinct(plan.todo["image_uri"]).as_py() - pc.count_distinct(written["image_uri"]).as_py()
    if missing:
        raise RuntimeError(f"{where}: {missing} of {plan.todo.num_rows} input images have no row in the output")


def label(options: LabelingOptions) -> LabelingResult:
    """Check, then label (Ray must already be initialised, e.g. by :func:`genderrec.cli.init_ray`)."""
    return run(prepare(options))


# --------------------------------------------------------------------------- evaluation mode


def evaluate(output_uri: str, threshold: float, per_face: bool = False) -> dict:
    """Accuracy, ROC-AUC and confusion matrix of every labeled row with ground truth; written beside the labels.

    ``per_face`` (faces detect/auto output): the truth is the image's, so each image counts once, by its largest
    face (``face_index`` 0, or the whole image of ``auto``'s fallback).
    """
    from sklearn.metrics import confusion_matrix

    from genderrec.evaluation import binary_metrics

    columns = [TRUTH_COLUMN, "p_male", "face_index"] if per_face else [TRUTH_COLUMN, "p_male"]
    frame = _read_parts(_output_parts(output_uri), columns).to_pandas()
    if per_face:
        frame = frame[frame.pop("face_index").fillna(0) == 0]
    usable = frame.dropna()
    result = {
        "images": len(usable),
        "excluded_errors": int(frame["p_male"].isna().sum()),
        "excluded_without_truth": int((frame["p_male"].notna() & frame[TRUTH_COLUMN].isna()).sum()),
        "threshold": threshold,
        "accuracy": None,
        "roc_auc": None,
        "confusion_matrix": None,
    }
    if len(usable):
        truth = usable[TRUTH_COLUMN].astype(int).to_numpy()
        p_male = usable["p_male"].to_numpy()
        metrics = binary_metrics(truth, p_male, threshold)
        matrix = confusion_matrix(truth, (p_male >= threshold).astype(int), labels=[0, 1])
        result.update(
            accuracy=metrics["accuracy"],
            roc_auc=None if math.isnan(metrics["auc"]) else metrics["auc"],
            confusion_matrix={
                "rows": "true female, true male",
                "columns": "predicted female, predicted male",
                "counts": matrix.tolist(),
            },
        )
    storage.write_text(storage.join(output_uri, EVALUATION_FILE), json.dumps(result, indent=2))
    return result


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
