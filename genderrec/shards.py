"""A labeling job's units of work: input shards, and the one output file each becomes.

The job's input is a list of Parquet files: the manifest's, or, for an image folder/prefix, its listing, written once
under ``<output>/_inputs/`` (so a rerun sees the same images in the same order, however the prefix changed since).
Each file's row groups are cut into shards of about ``rows_per_file`` rows. A shard becomes exactly one output file,
``part-<input file>-<first row>.parquet``, written whole (see :func:`genderrec.storage.write_parquet`) once every
image in it is labeled. ``_job.json``, written before the first shard, fixes the input files and the shard size, so a
rerun with ``--resume`` knows from the output's file names alone what is done: no labeled URI is read back. The
``_`` and ``.`` prefixes keep the job file, the listing and temporary files out of every Parquet reader's view.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genderrec import storage

JOB_FILE = "_job.json"
LISTING_FOLDER = "_inputs"
LISTING_FILES_ROWS = 10  # shards per listing file
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
FOOTER_KEY = b"genderrec.retryable"  # Parquet footer metadata: how many rows of the file are retryable errors


@dataclass(frozen=True)
class Source:
    """One input Parquet file and the number of rows in each of its row groups."""

    uri: str
    row_groups: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


@dataclass(frozen=True)
class Shard:
    """Rows ``start:stop`` of a :class:`Chunk`; ``retry``: relabel only its retryable error rows."""

    name: str
    start: int
    stop: int
    retry: bool = False

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def file_name(self) -> str:
        return self.name + PART_SUFFIX


@dataclass(frozen=True)
class Chunk:
    """What one read task reads: consecutive row groups of one input file, and the shards they are cut into."""

    source: str
    row_groups: tuple[int, ...]
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class JobSpec:
    """What ``_job.json`` fixes for every run over one output."""

    input_uri: str
    faces: str
    rows_per_file: int
    sources: tuple[Source, ...]

    def chunks(self) -> Iterator[Chunk]:
        """Every shard of the job: row groups are gathered until they hold ``rows_per_file`` rows, then cut."""
        size = self.rows_per_file
        for index, source in enumerate(self.sources):
            groups, rows, first_row = [], 0, 0
            for group, count in enumerate(source.row_groups):
                groups.append(group)
                rows += count
                if rows >= size or group == len(source.row_groups) - 1:
                    shards = tuple(
                        Shard(f"{PART_PREFIX}{index:05d}-{first_row + start:012d}", start, min(start + size, rows))
                        for start in range(0, rows, size)
                    )
                    if shards:
                        yield Chunk(source.uri, tuple(groups), shards)
                    first_row, groups, rows = first_row + rows, [], 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        raw = json.loads(text)
        sources = tuple(Source(item["uri"], tuple(item["row_groups"])) for item in raw.pop("sources"))
        return cls(sources=sources, **raw)


def read_job(output_uri: str) -> JobSpec | None:
    uri = storage.join(output_uri, JOB_FILE)
    return JobSpec.from_json(storage.read_text(uri)) if storage.exists(uri) else None


def write_job(output_uri: str, job: JobSpec) -> None:
    storage.write_text(storage.join(output_uri, JOB_FILE), job.to_json())


def source(uri: str) -> tuple[Source, pa.Schema]:
    """A Parquet file's row groups and schema, from its footer alone."""
    fs, path = storage.filesystem(uri)
    metadata = pq.read_metadata(path, filesystem=fs)
    groups = tuple(metadata.row_group(index).num_rows for index in range(metadata.num_row_groups))
    return Source(uri, groups), metadata.schema.to_arrow_schema()


def write_listing(input_uri: str, output_uri: str, suffixes: tuple[str, ...], rows_per_file: int) -> list[Source]:
    """List an image folder/prefix once, folder by folder, into ``_inputs/`` Parquet files of ``image_uri``."""
    sources, batch = [], []

    def flush():
        uri = storage.join(output_uri, LISTING_FOLDER, f"{PART_PREFIX}{len(sources):05d}{PART_SUFFIX}")
        storage.write_parquet(pa.table({"image_uri": pa.array(batch, pa.string())}), uri, rows_per_file)
        sources.append(source(uri)[0])

    for uri in storage.walk_files(input_uri, suffixes):
        batch.append(uri)
        if len(batch) == rows_per_file * LISTING_FILES_ROWS:
            flush()
            batch = []
    if batch:
        flush()
    return sources


def written(output_uri: str) -> dict[str, str]:
    """The output files already there: shard name → URI."""
    parts = {part.rsplit("/", 1)[-1]: part for part in storage.list_files(output_uri, (PART_SUFFIX,), recursive=False)}
    return {name[: -len(PART_SUFFIX)]: part for name, part in parts.items() if name.startswith(PART_PREFIX)}


def retryable_rows(part_uri: str) -> int:
    """How many rows of an output file are retryable errors, from its footer (no row is read)."""
    fs, path = storage.filesystem(part_uri)
    return int(pq.read_metadata(path, filesystem=fs).metadata.get(FOOTER_KEY, b"0"))


def retryable_uris(part_uri: str) -> pa.Array:
    """The image URIs of an output file's retryable error rows (read in the task that relabels them)."""
    fs, path = storage.filesystem(part_uri)
    table = pq.read_table(path, filesystem=fs, columns=["image_uri", "retryable"])
    return pc.unique(table.filter(pc.fill_null(table["retryable"], False))["image_uri"])


def with_footer(table: pa.Table) -> pa.Table:
    """``table`` with its count of retryable error rows in the schema metadata (stored in the Parquet footer)."""
    retryable = pc.sum(pc.fill_null(table["retryable"], False).cast(pa.int64())).as_py() or 0
    return table.replace_schema_metadata({FOOTER_KEY: str(retryable).encode()})
