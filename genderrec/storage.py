"""One place that turns a URI (local path or ``s3://bucket/key``) into bytes, listings and files.

Everything goes through ``pyarrow.fs`` so that local folders and S3-compatible stores behave the same.
Credentials come from the standard AWS chain (environment, profile, instance role); an endpoint
override for MinIO/Ceph/R2 comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (which
:func:`configure_s3` sets, so that Ray workers started afterwards inherit it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_SCHEME = "s3://"
# The AWS SDK's standard mode: up to this many attempts per request, exponential backoff with jitter between them,
# on throttling, 5xx and connection errors. Set explicitly: pyarrow's default depends on its version.
S3_ATTEMPTS = 5
TEMPORARY_PREFIX = "."  # local files being written: hidden from Parquet readers (pyarrow, pandas, Spark, Ray)


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


def configure_s3(endpoint: str | None = None, region: str | None = None) -> None:
    """Set the S3 endpoint/region for this process and the Ray workers it starts."""
    if endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    if region:
        os.environ["AWS_DEFAULT_REGION"] = region
    _s3_filesystem.cache_clear()


def s3_env_vars() -> dict[str, str]:
    """The S3 settings of this process, to hand to Ray workers through ``runtime_env``."""
    names = (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REQUEST_CHECKSUM_CALCULATION",
    )
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    options = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)}
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options.update(endpoint_override=host or endpoint, scheme=scheme or "https", allow_bucket_creation=True)
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and the path inside it for a local path or an ``s3://`` URI."""
    uri = str(uri)
    if is_s3(uri):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not _endpoint() and not region:
            region = "us-east-1"
        return _s3_filesystem(_endpoint(), region), uri[len(S3_SCHEME) :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers run in another working directory); ``s3://`` URIs stay as they are."""
    return uri if is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI, keeping the ``s3://`` scheme."""
    base = str(base).rstrip("/")
    return "/".join([base, *(part.strip("/") for part in parts)])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if not is_s3(uri):
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def _with_scheme(uri: str, path: str) -> str:
    return S3_SCHEME + path if is_s3(uri) else path


def list_files(uri: str, suffixes: tuple[str, ...] = (), recursive: bool = True) -> list[str]:
    """All files below a folder or prefix (sorted), filtered by case-insensitive suffix."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    wanted = tuple(suffix.lower() for suffix in suffixes)
    return sorted(
        _with_scheme(uri, info.path)
        for info in infos
        if info.type == pafs.FileType.File and (not wanted or info.path.lower().endswith(wanted))
    )


def walk_files(uri: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    """Like :func:`list_files` (recursive), one folder (S3: one delimited prefix) at a time, so that a prefix of
    millions of objects is never held whole; sorted within each folder, folders depth first."""
    fs, path = filesystem(uri)
    wanted = tuple(suffix.lower() for suffix in suffixes)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    files = sorted(info.path for info in infos if info.type == pafs.FileType.File)
    yield from (_with_scheme(uri, name) for name in files if name.lower().endswith(wanted))
    folders = sorted(info.path for info in infos if info.type == pafs.FileType.Directory)
    del infos, files
    for folder in folders:
        yield from walk_files(_with_scheme(uri, folder), suffixes)


def write_parquet(table: pa.Table, uri: str, row_group_size: int | None = None) -> None:
    """Write a Parquet file that is whole or absent, never cut short: S3 puts (multipart included) appear only once
    complete; a local file is written under a hidden temporary name in the same folder, then renamed over ``uri``."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        pq.write_table(table, path, filesystem=fs, row_group_size=row_group_size)
        return
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    temporary = f"{folder}/{TEMPORARY_PREFIX}{name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, temporary, filesystem=fs, row_group_size=row_group_size)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def remove_temporaries(uri: str) -> None:
    """Delete what :func:`write_parquet` left in a local folder when its process was killed mid-write."""
    if is_s3(uri) or not os.path.isdir(uri):
        return
    for name in os.listdir(uri):
        if name.startswith(TEMPORARY_PREFIX) and name.endswith(".tmp"):
            os.remove(os.path.join(uri, name))


def copy(source: str, destination: str) -> None:
    """Copy a file or a whole folder between local paths and ``s3://`` URIs (streamed by pyarrow)."""
    source_fs, source_path = filesystem(source)
    destination_fs, destination_path = filesystem(destination)
    if not is_s3(destination):
        parent = destination_path if is_dir(source) else destination_path.rsplit("/", 1)[0]
        destination_fs.create_dir(parent, recursive=True)
    pafs.copy_files(source_path, destination_path, source_filesystem=source_fs, destination_filesystem=destination_fs)


@contextlib.contextmanager
def local_path(uri: str, suffix: str = "") -> Iterator[str]:
    """A local file path for ``uri``: the path itself when local, else a temporary download."""
    if not is_s3(uri):
        if not Path(uri).exists():
            raise FileNotFoundError(f"not found: {uri}")
        yield str(uri)
        return
    if not exists(uri):
        raise FileNotFoundError(f"not found: {uri}")
    with tempfile.TemporaryDirectory(prefix="genderrec-") as tmp:
        target = Path(tmp) / (Path(uri).name or "download")
        if suffix and not target.name.endswith(suffix):
            target = target.with_name(target.name + suffix)
        target.write_bytes(read_bytes(uri))
        yield str(target)
