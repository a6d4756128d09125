"""Reading documents out of parquet and jsonl(.gz) files, in fixed row-range chunks.

A chunk — (file, first row, end row) — is the unit of work of every stage. Chunk boundaries
depend only on the file (parquet row groups, jsonl line counts) and `data.chunk_docs`, never on
the number of workers, which is what makes the output identical however the work is scheduled.

Row-level problems (empty text, bytes that are not UTF-8) are reported per row as a status and
counted by the caller; file-level problems (unreadable file, no text column, malformed JSON) raise
:class:`DataError` naming the file and row.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.errors import DataError
from dataprep.sources import SourceFile


class RowStatus(IntEnum):
    OK = 0
    EMPTY = 1  # empty or whitespace-only text (or null)
    INVALID_UTF8 = 2


REASONS = {RowStatus.EMPTY: "empty", RowStatus.INVALID_UTF8: "invalid_utf8"}
# What reading a damaged file raises: zlib.error is a corrupt deflate stream, which is no OSError.
UNREADABLE = (OSError, EOFError, zlib.error)
_SURROGATES = re.compile(r"[\ud800-\udfff]")  # not encodable as UTF-8


@dataclass(frozen=True)
class Chunk:
    index: int  # position in the global chunk order
    source: int  # index into the run's source list
    row_start: int
    row_end: int
    byte_offset: int = 0  # jsonl: offset of the first row's line in the (decompressed) stream



@dataclass(frozen=True)
class Row:
    row: int
    doc_id: str
    text: str | None  # None when status is not OK
    status: RowStatus


def _is_parquet(path: str) -> bool:
    return path.endswith(".parquet")


def _open_text(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def plan_file(source_index: int, src: SourceFile, chunk_docs: int, text_column: str) -> tuple[int, list[tuple[int, int, int]]]:
    """Count a file's rows and cut it into (row_start, row_end, byte_offset) chunks."""
    if _is_parquet(src.path):
        try:
            pf = pq.ParquetFile(src.path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{src.name}: unreadable parquet file: {e}") from e
        names = pf.schema_arrow.names
        if text_column not in names:
            raise DataError(f"{src.name}: no '{text_column}' column (columns: {', '.join(names)}); set data.text_column")
        # Chunks follow row-group boundaries so that no row group is decoded twice.
        chunks, start, rows = [], 0, 0
        for g in range(pf.metadata.num_row_groups):
            rows += pf.metadata.row_group(g).num_rows
            if rows - start >= chunk_docs:
                chunks.append((start, rows, 0))
                start = rows
        if rows > start:
            chunks.append((start, rows, 0))
        return rows, chunks
    chunks, offset, rows, start, start_offset = [], 0, 0, 0, 0
    try:
        with _open_text(src.path) as f:
            for line in f:
                rows += 1
                offset += len(line)
                if rows - start >= chunk_docs:
                    chunks.append((start, rows, start_offset))
                    start, start_offset = rows, offset
    except UNREADABLE as e:
        raise DataError(f"{src.name}: unreadable file after row {rows}: {type(e).__name__}: {e}") from e
    if rows > start:
        chunks.append((start, rows, start_offset))
    return rows, chunks


def _decode(raw: bytes | None) -> tuple[str | None, RowStatus]:
    if raw is None:
        return None, RowStatus.EMPTY
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, RowStatus.INVALID_UTF8
    return (text, RowStatus.OK) if text.strip() else (None, RowStatus.EMPTY)


def _doc_id(value: object, src: SourceFile, row: int) -> str:
    """A row's id as text that can be written: its own id, else ``file:row``.

    JSON escapes can smuggle lone surrogates into an id (``"bad\\ud800id"``); they become U+FFFD,
    as undecodable bytes do, so that removed.jsonl (UTF-8) can still name the document.
    """
    if value is None:
        return f"{src.name}:{row}"
    return _SURROGATES.sub("\ufffd", str(value))


def read_chunk(src: SourceFile, chunk: Chunk, text_column: str, id_column: str) -> Iterator[Row]:
    """The rows of one chunk, in file order, each with its validation status."""
    reader = _read_parquet if _is_parquet(src.path) else _read_jsonl
    yield from reader(src, chunk, text_column, id_column)


def _read_parquet(src: SourceFile, chunk: Chunk, text_column: str, id_column: str, batch_rows: int = 1024) -> Iterator[Row]:
    """Rows of the chunk's row groups, decoded ``batch_rows`` at a time: a reader holds one batch of
    Python strings (and Arrow's buffers of one row group), not the whole chunk."""
    try:
        pf = pq.ParquetFile(src.path)
        groups, first, rows = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if rows < chunk.row_end and rows + n > chunk.row_start:
                groups.append(g)
                first = rows if first is None else first
            rows += n
        names = pf.schema_arrow.names
        text_type = pf.schema_arrow.field(text_column).type if text_column in names else None
        columns = [text_column] + ([id_column] if id_column in names else [])
        batches = pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{src.name}: cannot read rows {chunk.row_start}-{chunk.row_end}: {e}") from e
    if text_type is None:
        raise DataError(f"{src.name}: no '{text_column}' column (columns: {', '.join(names)}); set data.text_column")
    as_bytes = _bytes_type(text_type)
    if as_bytes is None:
        raise DataError(f"{src.name}: column '{text_column}' has type {text_type}, expected string")
    row = first or 0
    while row < chunk.row_end:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{src.name}: cannot read rows {chunk.row_start}-{chunk.row_end}: {e}") from e
        if batch is None:
            raise DataError(f"{src.name}: ended at row {row}, expected {chunk.row_end} rows (changed while reading?)")
        texts = _raw_values(batch.column(text_column), as_bytes)
        ids = _parquet_ids(batch, id_column)
        for raw, doc_id in zip(texts, ids):
            if chunk.row_start <= row < chunk.row_end:
                text, status = _decode(raw)
                yield Row(row, _doc_id(doc_id, src, row), text, status)
            row += 1


def _bytes_type(value_type: pa.DataType) -> pa.DataType | None:
    """The binary type a text column of ``value_type`` is read as; None if its values are not text.

    Text is read as raw bytes so that invalid UTF-8 becomes a per-row status instead of an Arrow
    error. Every Arrow spelling of text is text: ``string``, ``large_string``, ``string_view``
    (and their binary twins), and a dictionary of any of them, which is what pandas writes for a
    ``category`` column; its values are read, never its integer codes, so a file's encoding does
    not change a single byte of the shards."""
    if pa.types.is_dictionary(value_type):
        return _bytes_type(value_type.value_type)
    if pa.types.is_large_string(value_type) or pa.types.is_large_binary(value_type):
        return pa.large_binary()
    if any(is_type(value_type) for is_type in (pa.types.is_string, pa.types.is_binary, pa.types.is_string_view,
                                               pa.types.is_binary_view)):
        return pa.binary()
    return None


def _raw_values(column: pa.Array, as_bytes: pa.DataType) -> list[bytes | None]:
    """The column's values as bytes (None for a null). A dictionary's values are cast, then taken by
    its indices: Arrow has no cast or take of every dictionary type (``string_view`` values)."""
    if pa.types.is_dictionary(column.type):
        return column.dictionary.cast(as_bytes).take(column.indices).to_pylist()
    return column.cast(as_bytes).to_pylist()


def _is_text(value_type: pa.DataType) -> bool:
    """Whether values of this type are strings (not bytes), dictionary-encoded or not."""
    if pa.types.is_dictionary(value_type):
        return _is_text(value_type.value_type)
    return pa.types.is_string(value_type) or pa.types.is_large_string(value_type) or pa.types.is_string_view(value_type)


def _parquet_ids(batch: pa.RecordBatch, id_column: str) -> list:
    """A batch's ids (None where there are none). A string column is read as bytes and decoded with
    U+FFFD for what is not UTF-8, as for jsonl lines: Arrow does not validate a file's strings, and
    turning a bad one into Python raised UnicodeDecodeError."""
    if id_column not in batch.schema.names:
        return [None] * batch.num_rows
    ids = batch.column(id_column)
    if _is_text(ids.type):
        raw = _raw_values(ids, _bytes_type(ids.type))
        return [None if b is None else b.decode("utf-8", errors="replace") for b in raw]
    return ids.to_pylist()


def _lines(src: SourceFile, chunk: Chunk) -> Iterator[tuple[int, bytes]]:
    """The chunk's raw lines with their rows. A file that cannot be read on (a corrupt gzip stream)
    is a DataError naming the row: the data needs fixing, a rerun would meet it again."""
    row = chunk.row_start
    try:
        with _open_text(src.path) as f:
            f.seek(chunk.byte_offset)
            for row in range(chunk.row_start, chunk.row_end):
                line = f.readline()
                if not line:
                    raise DataError(f"{src.name}: file ended at row {row}, expected {chunk.row_end} rows (changed while reading?)")
                yield row, line
    except UNREADABLE as e:
        raise DataError(f"{src.name}: unreadable file at row {row}: {type(e).__name__}: {e}") from e


def _read_jsonl(src: SourceFile, chunk: Chunk, text_column: str, id_column: str) -> Iterator[Row]:
    for row, line in _lines(src, chunk):
        if not line.strip():
            yield Row(row, f"{src.name}:{row}", None, RowStatus.EMPTY)
            continue
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            # Still name the document by its id when the rest of the line parses.
            try:
                doc_id = json.loads(line.decode("utf-8", errors="replace")).get(id_column)
            except (json.JSONDecodeError, AttributeError, RecursionError):
                doc_id = None
            yield Row(row, _doc_id(doc_id, src, row), None, RowStatus.INVALID_UTF8)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{src.name}: row {row} (line {row + 1}) is not valid JSON: {e.msg}") from e
        except RecursionError:  # a line of thousands of nested brackets: the same bad data, not a crash (exit 1, "retry")
            raise DataError(f"{src.name}: row {row} (line {row + 1}) is not a usable JSON object: nested too deeply") from None
        if not isinstance(obj, dict) or text_column not in obj:
            raise DataError(f"{src.name}: row {row} (line {row + 1}) has no '{text_column}' field")
        value = obj[text_column]
        doc_id = _doc_id(obj.get(id_column), src, row)
        if value is None:
            yield Row(row, doc_id, None, RowStatus.EMPTY)
            continue
        if not isinstance(value, str):
            raise DataError(f"{src.name}: row {row} (line {row + 1}): '{text_column}' is {type(value).__name__}, not a string")
        try:  # JSON escapes can smuggle in lone surrogates, which are not encodable text
            value.encode("utf-8")
        except UnicodeEncodeError:
            yield Row(row, doc_id, None, RowStatus.INVALID_UTF8)
            continue
        yield Row(row, doc_id, value if value.strip() else None, RowStatus.OK if value.strip() else RowStatus.EMPTY)
