"""Streams of Arrow tables sorted by a string key: spill unsorted rows to sorted runs on local
disk, merge sorted streams, align two sorted streams by key range, write exact row groups.

What lets the planner and the compaction hold a few batches of a 10M-key listing and key index
instead of whole tables: every stream here is an iterator of small `pa.Table`s, each sorted,
each starting at or after the previous one's last key.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

READ_ROWS = 8192  # rows a stream reads from a file at a time (a merge holds one such batch a stream)
# scratch runs are written once and read once: lz4 and no dictionaries write ~3x faster than the defaults
RUN_OPTIONS = {"compression": "lz4", "use_dictionary": False}


def _n_upto(table: pa.Table, key: str, cut) -> int:
    """Rows of a table sorted by `key` whose key is <= cut (they are its first rows)."""
    return int(pc.sum(pc.less_equal(table.column(key), cut)).as_py() or 0)


def _chunks(streams: list[Iterator[pa.Table]], keys: list[str]) -> Iterator[list[pa.Table | None]]:
    """One chunk per stream at a time, all chunks covering the same key range and the ranges
    increasing: a key present in several streams is in the same step of each. None: nothing of
    that stream in this step."""
    heads: list[pa.Table | None] = [None] * len(streams)
    done = [False] * len(streams)

    def fill(i: int) -> None:
        while heads[i] is None and not done[i]:
            t = next(streams[i], None)
            if t is None:
                done[i] = True
            elif t.num_rows:
                heads[i] = t

    for i in range(len(streams)):
        fill(i)
    while any(h is not None for h in heads):
        # everything <= the smallest last key of the heads is final in every stream
        cut = min(h.column(k)[-1].as_py() for h, k in zip(heads, keys) if h is not None)
        out: list[pa.Table | None] = []
        for i, (h, k) in enumerate(zip(heads, keys)):
            if h is None:
                out.append(None)
                continue
            n = h.num_rows if h.column(k)[-1].as_py() <= cut else _n_upto(h, k, cut)
            out.append(h.slice(0, n) if n else None)
            heads[i] = h.slice(n) if n < h.num_rows else None
            fill(i)
        yield out


def merge(streams: Iterable[Iterator[pa.Table]], key: str) -> Iterator[pa.Table]:
    """One sorted stream of the rows of several sorted streams (ties kept, stream order)."""
    streams = [iter(s) for s in streams]
    if len(streams) == 1:
        yield from (t for t in streams[0] if t.num_rows)
        return
    for parts in _chunks(streams, [key] * len(streams)):
        got = [p for p in parts if p is not None]
        yield got[0] if len(got) == 1 else pa.concat_tables(got).sort_by(key)


def aligned(left: Iterator[pa.Table], right: Iterator[pa.Table], left_key: str, right_key: str,
            left_schema: pa.Schema, right_schema: pa.Schema) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(left chunk, right chunk) pairs of two sorted streams over the same key range, so that a
    key found in both is in the same pair (an empty table where one side has none)."""
    for a, b in _chunks([iter(left), iter(right)], [left_key, right_key]):
        yield (a if a is not None else left_schema.empty_table(), b if b is not None else right_schema.empty_table())


def write_run(table: pa.Table, path: str, key: str, group_rows: int | None = None) -> None:
    """A scratch run: `table` sorted by `key`, written to a local Parquet file in row groups of
    `group_rows` (READ_ROWS by default), for `parquet_stream` to read back."""
    pq.write_table(table.sort_by(key), path, row_group_size=group_rows or READ_ROWS, **RUN_OPTIONS)


def parquet_stream(path_or_file, schema: pa.Schema | None = None, rows: int | None = None,
                   columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A Parquet file as a stream of tables of `rows` rows (READ_ROWS by default; cast to
    `schema` when given), holding one row group at a time. (Read by row group: on pyarrow 25,
    `ParquetFile.iter_batches` kept every batch's memory until the file was closed, ~1 GB over
    a 10M-row index; apache/arrow#39808 is the same class of bug in `Dataset.to_batches`. One
    thread: a row group here is a few thousand rows, and Arrow's decode threads each left their
    own malloc arena behind, +12 MB of driver RSS the first time a 20k-key index was read.)"""
    pf = pq.ParquetFile(path_or_file)
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=columns, use_threads=False)
        if schema is not None:
            t = t.cast(schema)
        yield from slices(t, rows)


class Spill:
    """Rows added in any order come back sorted by `key`: every `run_rows` rows are sorted and
    written to a local Parquet run (a temp folder removed by `close`); once `fan_in` runs of one
    size are there they are merged into one run of the next size (so a merge never holds more
    than `fan_in` batches), and `sorted()` merges what is left. Memory: a few copies of one run's
    rows while adding (buffer, sorted copy, Parquet encoder), `merge_rows` rows a run while
    merging; each row is written about log_fan_in(rows / run_rows) + 1 times."""

    def __init__(self, schema: pa.Schema, key: str, run_rows: int = 1 << 15, merge_rows: int = 4096,
                 fan_in: int = 32, folder: str | None = None) -> None:
        self.schema, self.key, self.run_rows, self.merge_rows = schema, key, max(1, int(run_rows)), merge_rows
        self.fan_in = max(2, int(fan_in))
        self.dir = tempfile.mkdtemp(prefix="fcodec-spill-", dir=folder)
        self.levels: list[list[str]] = []  # runs by size: level i holds runs of ~run_rows * fan_in**i rows
        self.written = 0
        self.buf: list[pa.Table] = []
        self.buffered = 0
        self.num_rows = 0

    @property
    def runs(self) -> list[str]:
        return [p for level in reversed(self.levels) for p in level]

    def add(self, table: pa.Table | pa.RecordBatch) -> None:
        t = table if isinstance(table, pa.Table) else pa.Table.from_batches([table])
        if not t.num_rows:
            return
        # a run holds at most run_rows (unless one table is larger): pages one row short of a
        # divisor of run_rows (a listing page with an ignored file) would otherwise make every run
        # a page longer and leave up to a run more rows buffered
        if self.buffered and self.buffered + t.num_rows > self.run_rows:
            self._flush()
        self.buf.append(t)
        self.buffered += t.num_rows
        self.num_rows += t.num_rows
        if self.buffered >= self.run_rows:
            self._flush()

    def _path(self) -> str:
        self.written += 1
        return os.path.join(self.dir, f"run-{self.written:06d}.parquet")

    def _flush(self) -> None:
        if not self.buffered:
            return
        path = self._path()
        write_run(pa.concat_tables(self.buf), path, self.key, self.merge_rows)
        self.buf, self.buffered = [], 0
        self._add_run(0, path)

    def _add_run(self, level: int, path: str) -> None:
        while len(self.levels) <= level:
            self.levels.append([])
        self.levels[level].append(path)
        if len(self.levels[level]) < self.fan_in:
            return
        runs, self.levels[level] = self.levels[level], []
        out = self._path()
        w = RowGroupWriter(out, self.schema, self.merge_rows, **RUN_OPTIONS)
        for t in merge([parquet_stream(p, self.schema, self.merge_rows) for p in runs], self.key):
            w.write(t)
        w.close()
        for p in runs:
            os.unlink(p)
        self._add_run(level + 1, out)

    def sorted(self) -> Iterator[pa.Table]:
        """All rows added, sorted by key, as a stream (rows still buffered are sorted in memory)."""
        streams: list[Iterator[pa.Table]] = [parquet_stream(p, self.schema, self.merge_rows) for p in self.runs]
        if self.buffered:
            whole = pa.concat_tables(self.buf).sort_by(self.key)
            streams.append(slices(whole))
        return merge(streams, self.key) if streams else iter(())

    def close(self) -> None:
        self.buf, self.buffered = [], 0
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slices(table: pa.Table, rows: int | None = None) -> Iterator[pa.Table]:
    """A table as a stream of slices of `rows` rows (READ_ROWS by default)."""
    rows = rows or READ_ROWS
    for i in range(0, table.num_rows, rows):
        yield table.slice(i, rows)


class RowGroupWriter:
    """Writes tables to a Parquet file in row groups of exactly `group_rows` rows (the last one
    shorter), whatever sizes the tables come in: row group g holds rows [g * group_rows, ...)."""

    def __init__(self, where, schema: pa.Schema, group_rows: int, **parquet_options) -> None:
        self.schema, self.group_rows = schema, max(1, int(group_rows))
        self.writer = pq.ParquetWriter(where, schema, **parquet_options)
        self.buf: list[pa.Table] = []
        self.buffered = 0
        self.num_rows = 0

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.buf.append(table)
        self.buffered += table.num_rows
        self.num_rows += table.num_rows
        if self.buffered >= self.group_rows:
            t = pa.concat_tables(self.buf)
            whole = (t.num_rows // self.group_rows) * self.group_rows
            self.writer.write_table(t.slice(0, whole), row_group_size=self.group_rows)
            rest = t.slice(whole)
            self.buf, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.buffered:
            self.writer.write_table(pa.concat_tables(self.buf), row_group_size=self.group_rows)
        self.buf, self.buffered = [], 0
        self.writer.close()
