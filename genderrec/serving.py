"""Serve a model directory over HTTP with Ray Serve: a JSON API for programs and a page for people.

One FastAPI app is the ingress of one deployment. Each replica loads the model once, decodes uploads
with the same :func:`genderrec.images.load_image` that training used, and runs the model on dynamic
batches (``@serve.batch``) gathered across concurrent requests; outputs always pass through the card's
calibration. ``POST /v1/predict?faces=detect`` (or ``auto``) takes ordinary photos: each replica also loads the face
detector once, and every face found is aligned CelebA-style (:mod:`genderrec.faces`) and classified, its box and
landmarks returned with it; ``faces=aligned`` (the default) takes the image as a CelebA-like crop, as before. Bad input is answered with a status and a sentence naming the image and the problem, and
never touches the model, so the replica stays healthy. Only the API, its docs and the page are served.

Under overload the service refuses what it cannot serve instead of queueing without bound: Serve's proxy answers 503
with ``Retry-After`` beyond ``max_ongoing_requests`` per replica plus ``max_queued_requests``, and a request not
answered within ``request_timeout_s`` gets 504; a refused body is drained (boundedly) so that its 413 arrives.

``app_builder`` is the application builder that ``serve run configs/serve.yaml``, ``serve deploy`` and
``genderrec serve`` (:func:`settings` and :func:`start`: ``serve run``'s steps on one config) call with its ``args``.
"""

# No `from __future__ import annotations`: FastAPI reads the route methods' annotations (Request) at runtime.
import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from fastapi import HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig, RequestRouterConfig
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from genderrec import bundle, engines, faces, images, storage
from genderrec.config import apply_override
from genderrec.faces import FacesMode

IMPORT_PATH = "genderrec.serving:app_builder"
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
RAW_MEDIA_TYPES = ("application/octet-stream",)  # besides image/*; RFC 9110 lets a missing type mean this
NO_IMAGE = "no image in the request: send multipart files (curl -F image=@face.jpg) or a raw image body"
PAGE = resources.files("genderrec").joinpath("static/index.html").read_text(encoding="utf-8")


class ServeArgs(faces.FaceOptions):
    """The builder's ``args`` (from ``configs/serve.yaml`` or ``genderrec serve``); unknown keys are errors.

    The face options (``min_face_size``, ``min_face_confidence``, ``max_faces``) are :class:`faces.FaceOptions`'s,
    named as ``genderrec label``'s flags.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="model directory (local or s3://) holding model.keras and card.json")
    faces: FacesMode = Field(default="aligned", description="faces mode of requests without ?faces=")
    max_batch_size: int = Field(default=16, ge=1, description="most images per model call; 1 turns batching off")
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, description="longest wait for a batch to fill")
    max_ongoing_requests: int = Field(default=32, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(
        default=32, ge=1, description="requests waiting for a replica (per proxy); more get 503 at once"
    )
    retry_after_s: float = Field(default=1.0, ge=0, description="the Retry-After of 503s (whole seconds, rounded up)")
    router_initial_backoff_s: float = Field(
        default=0.01, gt=0, description="every replica full: a queued request is tried again after this, doubling"
    )
    router_max_backoff_s: float = Field(
        default=0.1, gt=0, description="... up to this; the longest a freed slot waits for a queued request"
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, description="a request not answered within it (body upload included) gets 504"
    )
    num_replicas: int | None = Field(default=None, ge=1, description="a fixed replica count (else autoscaling)")
    autoscaling_config: AutoscalingConfig | None = None
    num_cpus: float = Field(default=1.0, ge=0)
    engine: engines.EngineName = Field(
        default="auto", description="auto: TensorFlow on GPU replicas, OpenVINO on CPU ones when the model has it"
    )
    precision: engines.Precision = Field(default="bf16", description="OpenVINO: bf16 (fast) or f32 (closest to Keras)")
    num_gpus: float | Literal["auto"] = Field(default="auto", description="'auto': 1 when the cluster has GPUs")
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1, description="larger requests get 413")
    max_pixels: int = Field(default=images.DEFAULT_MAX_PIXELS, ge=1, description="larger images get 422 (bombs)")
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    s3_endpoint: str | None = None
    s3_region: str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas (fixed) or autoscaling_config, not both")
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError("max_batch_size must not exceed max_ongoing_requests (batches could never fill)")
        if self.router_max_backoff_s < self.router_initial_backoff_s:
            raise ValueError("router_max_backoff_s must not be below router_initial_backoff_s")
        if self.request_timeout_s <= self.batch_wait_timeout_s:
            raise ValueError("request_timeout_s must exceed batch_wait_timeout_s (every request would time out)")
        return self


class Prediction(BaseModel):
    label: str = Field(description="class name: p_male >= the card's threshold gives 'male'")
    p_male: float = Field(description="calibrated probability that the face is male")
    model: str = Field(description="name of the model (from its card)")
    latency_ms: float = Field(description="time on the server, from receiving the request to this answer")
    batch_size: int = Field(description="how many images the model ran on together with this one")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="one per image, in request order")


class FacePrediction(BaseModel):
    face_index: int = Field(description="0 is the largest face of the image")
    face_source: Literal["detected", "whole_image"] = Field(description="whole_image: auto mode found no face")
    box: list[float] | None = Field(description="[left, top, right, bottom], pixels of the upright (EXIF) image")
    landmarks: list[list[float]] | None = Field(
        description="[x, y] of the left eye, right eye, nose, mouth left, mouth right ('left': the image's left)"
    )
    det_confidence: float | None = Field(description="the detector's confidence")
    label: str = Field(description="class name: p_male >= the card's threshold gives 'male'")
    p_male: float = Field(description="calibrated probability that the face is male")
    batch_size: int = Field(description="how many faces or images the model ran on together with this one")


class ImageFaces(BaseModel):
    image: str = Field(description="which upload: 'request body' or \"file 'x.jpg' (field 'image')\"")
    width: int = Field(description="width of the upright image, the frame of the boxes")
    height: int
    faces: list[FacePrediction] = Field(description="largest first; empty when no face was found")
    error: str | None = Field(description="'no face found' (faces=detect), else null")


class FacesResponse(BaseModel):
    faces: FacesMode = Field(description="the request's faces mode: detect or auto")
    model: str = Field(description="name of the model (from its card)")
    latency_ms: float = Field(description="time on the server, from receiving the request to this answer")
    images: list[ImageFaces] = Field(description="one per image, in request order")


def retry_after(seconds: float) -> dict[str, str]:
    """The ``Retry-After`` header: whole seconds, rounded up (as Serve writes it on its own 503s)."""
    return {"Retry-After": str(math.ceil(seconds))}


class Upload(NamedTuple):
    name: str  # how errors name it: "request body" or "file 'x.jpg' (field 'image')"
    data: bytes


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _is_image_type(media_type: str) -> bool:
    return media_type.startswith("image/") or media_type in RAW_MEDIA_TYPES


async def _drain(request: Request, max_bytes: int) -> None:
    """Read and drop the rest of a refused body, up to ``max_bytes``, before the answer is sent.

    A server that answers and closes while the client is still sending makes the client's TCP stack reset the
    connection, and many clients (Python's urllib among them) then report the reset instead of the answer; nginx
    lingers and drains a bounded amount for the same reason.
    """
    drained = 0
    while drained <= max_bytes:
        message = await request.receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        drained += len(message.get("body", b""))


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused (413) as soon as it grows over ``max_bytes``; up to as much again is drained."""
    received, more = 0, True
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        received += len(chunk)
        if received > max_bytes:
            if more:
                await _drain(request, max_bytes)
            raise HTTPException(413, f"request body is over the limit of {max_bytes} bytes")
        yield chunk


async def read_uploads(request: Request, max_bytes: int) -> list[Upload]:
    """The images of a predict request, in order: each multipart file, or the whole body as one image."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        await _drain(request, max_bytes)
        raise HTTPException(413, f"request body is {declared} bytes, over the limit of {max_bytes} bytes")
    media_type = _media_type(request.headers.get("content-type", RAW_MEDIA_TYPES[0]))
    body = _limited(request, max_bytes)
    if media_type == "multipart/form-data":
        return await _multipart_uploads(request.headers, body)
    if not _is_image_type(media_type):
        raise HTTPException(
            415,
            f"content type {media_type!r} is not supported: send multipart/form-data files or a raw image "
            "body (image/jpeg, image/png, image/webp or application/octet-stream)",
        )
    data = b"".join([chunk async for chunk in body])
    if not data:
        raise HTTPException(400, NO_IMAGE)
    return [Upload("request body", data)]


async def _multipart_uploads(headers: Headers, body: AsyncIterator[bytes]) -> list[Upload]:
    try:
        form = await MultiPartParser(headers, body).parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    uploads, text_fields = [], []
    for field, value in form.multi_items():
        if not isinstance(value, UploadFile):
            text_fields.append(field)
            continue
        data = await value.read()
        await value.close()
        if not data and not value.filename:  # what a browser sends for an empty file input
            continue
        name = f"file {value.filename!r} (field {field!r})"
        media_type = _media_type(value.content_type or RAW_MEDIA_TYPES[0])
        if not _is_image_type(media_type):
            raise HTTPException(415, f"{name} has content type {media_type!r}, not an image")
        uploads.append(Upload(name, data))
    if not uploads:
        hint = f"; the form has only text fields {text_fields} (a file needs '@' in curl -F)" if text_fields else ""
        raise HTTPException(400, NO_IMAGE + hint)
    return uploads


# FastAPIOffline: FastAPI whose /docs serves Swagger UI from the installed package, not a CDN (offline clusters).
app = FastAPIOffline(
    title="genderrec",
    summary="Predict the CelebA 'Male' attribute of face photos with the selected model.",
    redoc_url=None,
    static_url="/docs-assets",
)

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
                    },
                    "required": ["image"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary", "minLength": 1}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1}},
        },
    }
}


@serve.deployment
@serve.ingress(app)
class GenderClassifier:
    """One replica: the model, loaded once, behind the API and the page."""

    def __init__(self, args: ServeArgs):
        storage.configure_s3(args.s3_endpoint, args.s3_region)
        self.args = args
        self.bundle = bundle.ModelBundle.load(args.model, engine=args.engine, precision=args.precision)
        self.card = self.bundle.card
        self.failure: str | None = None
        self.face_options = faces.FaceOptions.model_validate(
            args.model_dump(include=set(faces.FaceOptions.model_fields))
        )
        self.detector = faces.load_detector(self.face_options)
        self.detector.detect(np.zeros((64, 64, 3), np.uint8))  # trace the detector's networks before any request
        self._detector_lock = threading.Lock()  # one detection at a time: requests' threads share the detector
        self._predict_batch.set_max_batch_size(args.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        # Trace the predict function for batch sizes 1 and 2: Keras then generalises it to any batch size,
        # so no request pays for tracing.
        for size in (1, 2):
            self.bundle.raw_proba(np.zeros((size, *self.card.input_size, 3), dtype=np.float32))

    def check_health(self):
        """Serve's periodic health check: a replica whose model fails on valid input is replaced."""
        if self.failure:
            raise RuntimeError(self.failure)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        return PAGE

    @app.get("/healthz", summary="200 once this replica has loaded its model and can predict")
    def healthz(self) -> dict:
        if self.failure:
            raise HTTPException(503, self.failure)
        return {"status": "ready", "model": self.card.name}

    @app.get("/v1/model", summary="The model card: architecture, mode, input size, metrics, calibration")
    def model_card(self) -> dict:
        return self.card.model_dump(mode="json")

    @app.post(
        "/v1/predict",
        response_model=PredictResponse | FacesResponse,
        summary="Classify one or more images (multipart files, or one raw image body), or the faces in them",
        openapi_extra=_PREDICT_BODY,
        responses={
            400: {"description": "no image in the request, or a malformed multipart body"},
            413: {"description": "request body over the size limit"},
            415: {"description": "not an image content type"},
            422: {"description": "corrupt image, or too many pixels (decompression bomb)"},
            503: {"description": "the service is saturated (its queue is full): retry after Retry-After seconds"},
            504: {"description": "not answered within request_timeout_s: retry after Retry-After seconds"},
        },
    )
    async def predict(
        self,
        request: Request,
        faces_mode: FacesMode | None = Query(
            None,
            alias="faces",
            description="aligned: each image is a CelebA-like face crop; detect: classify every face found in "
            "ordinary photos; auto: detect, else the whole image (default: the server's 'faces' setting)",
        ),
    ) -> PredictResponse | FacesResponse:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.args.request_timeout_s):
                return await self._predict(request, faces_mode or self.args.faces, started)
        except TimeoutError:
            raise HTTPException(
                504,
                f"not answered within {self.args.request_timeout_s:g} s: the service is saturated or the upload too "
                "slow; retry after the Retry-After seconds, with backoff",
                headers=retry_after(self.args.retry_after_s),
            ) from None

    async def _predict(self, request: Request, mode: str, started: float) -> PredictResponse | FacesResponse:
        uploads = await read_uploads(request, self.args.max_body_bytes)
        if mode != "aligned":
            return await self._predict_faces(uploads, mode, started)
        pixels = await asyncio.to_thread(self._decode_all, uploads)
        results = await asyncio.gather(*(self._predict_batch(item) for item in pixels))
        latency_ms = (time.perf_counter() - started) * 1000
        return PredictResponse(
            predictions=[
                Prediction(
                    label=self.bundle.label(p_male),
                    p_male=p_male,
                    model=self.card.name,
                    latency_ms=latency_ms,
                    batch_size=batch_size,
                )
                for p_male, batch_size in results
            ]
        )

    async def _predict_faces(self, uploads: list[Upload], mode: str, started: float) -> FacesResponse:
        photos = await asyncio.to_thread(self._find_faces, uploads, mode)
        crops = [crop for _, crops in photos for crop in crops]
        results = iter(await asyncio.gather(*(self._predict_batch(crop.pixels) for crop in crops)))
        answers = []
        for upload, ((height, width), crops) in zip(uploads, photos, strict=True):
            predictions = []
            for crop in crops:
                p_male, batch_size = next(results)
                face = crop.face
                predictions.append(
                    FacePrediction(
                        face_index=crop.face_index,
                        face_source=crop.source,
                        box=list(face.box) if face else None,
                        landmarks=face.landmarks.tolist() if face else None,
                        det_confidence=face.confidence if face else None,
                        label=self.bundle.label(p_male),
                        p_male=p_male,
                        batch_size=batch_size,
                    )
                )
            error = None if crops else faces.NO_FACE
            answers.append(ImageFaces(image=upload.name, width=width, height=height, faces=predictions, error=error))
        latency_ms = (time.perf_counter() - started) * 1000
        return FacesResponse(faces=mode, model=self.card.name, latency_ms=latency_ms, images=answers)

    def _decode(self, upload: Upload, decode=images.decode_image) -> np.ndarray:
        try:
            return decode(upload.data, self.args.max_pixels)
        except images.ImageDecodeError as exc:
            raise HTTPException(422, f"{upload.name}: {exc}") from None

    def _decode_all(self, uploads: list[Upload]) -> list[np.ndarray]:
        """Each upload as the model's input, decoded as in training (the bundle's input size and crop box)."""
        return [self._decode(upload, self.bundle.load_pixels) for upload in uploads]

    def _find_faces(self, uploads: list[Upload], mode: str) -> list[tuple[tuple[int, int], list[faces.FaceCrop]]]:
        """Each upload's (height, width) and model inputs: its faces, aligned (or, in auto mode, the whole image)."""
        rgbs = [self._decode(upload) for upload in uploads]  # every upload is checked before any detection
        found = []
        for rgb in rgbs:
            with self._detector_lock:
                crops = faces.face_crops(
                    rgb, self.detector, self.face_options, mode, self.card.input_size, self.card.crop_box
                )
            found.append((rgb.shape[:2], crops))
        return found

    @serve.batch
    async def _predict_batch(self, batch: list[np.ndarray]) -> list[tuple[float, int]]:
        """One model call for images gathered across requests; returns (calibrated p_male, batch size) each."""
        try:
            p_male = await asyncio.to_thread(self.bundle.predict_proba, np.stack(batch))
        except Exception as exc:
            self.failure = f"model failed on a batch of {len(batch)} valid images: {exc!r}"
            raise
        return [(float(value), len(batch)) for value in p_male]


def _gpus_per_replica(num_gpus: float | Literal["auto"]) -> float:
    if num_gpus != "auto":
        return num_gpus
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _model_dir(args: ServeArgs) -> str:
    """The model directory as replicas must see it (local paths made absolute), checked to hold a model card."""
    storage.configure_s3(args.s3_endpoint, args.s3_region)
    model_dir = args.model if storage.is_s3(args.model) else str(Path(args.model).expanduser().absolute())
    card = bundle.read_card(model_dir)  # a wrong path or unreadable card fails here, with its name, not in each replica
    engines.check_available(args.engine, card.exports, model_dir)
    return model_dir


def app_builder(args: ServeArgs) -> serve.Application:
    """Ray Serve application builder: ``args`` (a mapping or :class:`ServeArgs`) → the bound deployment."""
    args = ServeArgs.model_validate(args)
    model_dir = _model_dir(args)
    scaling = (
        {"autoscaling_config": args.autoscaling_config}
        if args.autoscaling_config is not None
        else {"num_replicas": args.num_replicas or 1}
    )
    actor_options = {"num_cpus": args.num_cpus, "num_gpus": _gpus_per_replica(args.num_gpus)}
    if 0 < actor_options["num_gpus"] < 1:  # replicas share a GPU: TensorFlow must not reserve all of its memory
        actor_options["runtime_env"] = {"env_vars": {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}}
    deployment = GenderClassifier.options(
        max_ongoing_requests=args.max_ongoing_requests,
        # Beyond the bounded queue Serve's proxy answers 503 at once, without touching a replica.
        max_queued_requests=args.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
        # With every replica full, Serve's router looks again after a backoff and nothing wakes it when a batch
        # finishes. Ray's default (25 ms doubling to 0.5 s) leaves freed slots empty; 5 ms to 20 ms answered 5x the
        # requests at 1x but left 2 % of the clients waiting a minute at 10x; ServeArgs' 10 ms to 0.1 s cut the p99
        # at every load and left none waiting (docs/serving_benchmark.md, runs 6-9).
        request_router_config=RequestRouterConfig(
            initial_backoff_s=args.router_initial_backoff_s, max_backoff_s=args.router_max_backoff_s
        ),
        health_check_period_s=args.health_check_period_s,
        health_check_timeout_s=args.health_check_timeout_s,
        ray_actor_options=actor_options,
        **scaling,
    )
    return deployment.bind(args.model_copy(update={"model": model_dir}))


def read_config(path: str) -> ServeDeploySchema:
    """Read a Serve config file, validated by Serve's own schema and, strictly, our builder's ``args``."""
    import yaml

    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid Serve config: {exc}") from None
    application(config, path)
    return config


def _ours(config: ServeDeploySchema, source: str) -> ServeApplicationSchema:
    ours = [app for app in config.applications if app.import_path == IMPORT_PATH]
    if not ours:
        raise ValueError(f"{source}: no application with import_path {IMPORT_PATH}")
    return ours[0]


def application(config: ServeDeploySchema, source: str = "<config>") -> ServeApplicationSchema:
    """The config's application that runs this module (its ``args`` checked against :class:`ServeArgs`)."""
    app = _ours(config, source)
    try:
        ServeArgs.model_validate(app.args)
    except ValueError as exc:
        raise ValueError(f"{source}: application {app.name!r} args: {exc}") from None
    return app


# What `genderrec serve` runs without --config: configs/serve.yaml's shape, loopback only.
DEFAULT_CONFIG = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "logging_config": {"enable_access_log": False, "log_level": "ERROR"},
    "applications": [{"name": "genderrec", "route_prefix": "/", "import_path": IMPORT_PATH, "args": {}}],
}


class ServeSettings(NamedTuple):
    """What ``genderrec serve`` runs: a Serve config as ``serve run`` reads it, with our one app, and its args."""

    config: ServeDeploySchema
    args: ServeArgs

    @property
    def app(self) -> ServeApplicationSchema:
        return self.config.applications[0]

    @property
    def url(self) -> str:
        http = self.config.http_options
        return f"http://{http.host}:{http.port}{self.app.route_prefix or '/'}"


def settings(config_path: str | None = None, overrides=(), *, host=None, port=None, **arg_values) -> ServeSettings:
    """Settings from a Serve config file (or :data:`DEFAULT_CONFIG`), then ``key.sub=value`` overrides of its args,
    then ``arg_values`` and ``host``/``port`` (None: keep); checked, model card included, before Ray starts."""
    config = read_config(config_path) if config_path else ServeDeploySchema.model_validate(DEFAULT_CONFIG)
    app = _ours(config, config_path or "<defaults>")
    app_args = dict(app.args)
    for override in overrides:
        apply_override(app_args, override)
    app_args.update({key: value for key, value in arg_values.items() if value is not None})
    args = ServeArgs.model_validate(app_args)
    args = args.model_copy(update={"model": _model_dir(args)})
    http = {key: value for key, value in {"host": host, "port": port}.items() if value is not None}
    config = config.model_copy(
        update={
            "http_options": config.http_options.model_copy(update=http),
            "applications": [app.model_copy(update={"args": args.model_dump(mode="json", exclude_unset=True)})],
        }
    )
    return ServeSettings(config, args)


def start(settings: ServeSettings) -> str:
    """Do what ``serve run`` does with a config file (ray/serve/scripts.py) on the connected Ray: start Serve with the
    config's proxy location and HTTP options, then deploy the app that :func:`app_builder` builds from its args.
    Returns the app's URL once it is running."""
    config, app = settings.config, settings.app
    serve.start(
        proxy_location=config.proxy_location,
        http_options=config.http_options.model_dump(),
        logging_config=config.logging_config,
    )
    serve.run(
        app_builder(settings.args), name=app.name, route_prefix=app.route_prefix, logging_config=app.logging_config
    )
    return settings.url
