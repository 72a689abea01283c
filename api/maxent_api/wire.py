"""Fast protobuf encoding of large numeric arrays.

Filling a repeated field element by element costs about a microsecond per
value in Python; a batch of a million completions would spend seconds there.
Instead the packed wire form of each array (tag, length, payload) is built
with numpy and either merged into a message (`fill`: one parse, in C) or
appended to the message's own serialized bytes (`encode`: no parse at all,
for messages that are only sent). Reading goes the other way: `decode` cuts
the packed arrays out of the received bytes and reads them with numpy,
leaving only the small rest of the message to the protobuf runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varints(values: np.ndarray) -> np.ndarray:
    """Varint bytes (as uint8) of int64/uint64/bool values, negatives as
    two's complement.

    Fills an [N, L] table of 7-bit groups, L being the longest varint in the
    batch (two for typical token counts, not the worst case of ten), one
    column at a time, then drops the unused tail of each row."""
    v = np.ascontiguousarray(values).astype(np.int64, copy=False).view(np.uint64)
    if v.size == 0:
        return np.empty(0, dtype=np.uint8)
    width = max(1, (int(v.max()).bit_length() + 6) // 7)
    if width == 1:
        return v.astype(np.uint8)
    lengths = np.ones(v.size, dtype=np.int8)
    for column in range(1, width):
        lengths += v >= np.uint64(1 << (7 * column))
    table = np.empty((v.size, width), dtype=np.uint8)
    used = np.empty((v.size, width), dtype=bool)
    for column in range(width):
        more = lengths > column + 1
        table[:, column] = ((v >> np.uint64(7 * column)) & np.uint64(0x7F)).astype(np.uint8) | (more.view(np.uint8) << 7)
        used[:, column] = lengths > column
    if used.all():
        return table.reshape(-1)
    return np.compress(used.ravel(), table.ravel())


def _packed(field_number: int, payload: np.ndarray) -> list[Any]:
    """Header and payload of a packed field; the payload stays a numpy array
    so that the one final join is its only copy."""
    if not payload.nbytes:
        return []
    return [_varint((field_number << 3) | _LENGTH_DELIMITED) + _varint(payload.nbytes), payload]


def _array_parts(message: Any, arrays: dict[str, Any]) -> list[Any]:
    fields = message.DESCRIPTOR.fields_by_name
    parts: list[Any] = []
    for name, values in arrays.items():
        if values is None:
            continue
        field = fields[name]
        if field.type == field.TYPE_DOUBLE:
            parts += _packed(field.number, np.ascontiguousarray(values, dtype="<f8"))
        else:
            parts += _packed(field.number, varints(np.asarray(values)))
    return parts


def fill(message: Any, **arrays: Any) -> Any:
    """Set repeated numeric fields of `message` from arrays, in one parse.

    double fields take float arrays; int64 and bool fields take integer or
    boolean arrays. Fields given as None are left alone."""
    message.MergeFromString(b"".join(_array_parts(message, arrays)))
    return message


def encode(message: Any, **arrays: Any) -> bytes:
    """`message` serialized with the given arrays (as in `fill`) added.

    A parser takes fields in any order and appends repeated ones, so the
    packed arrays are written after the message's own bytes: the message is
    never parsed or copied to hold them."""
    return b"".join([message.SerializeToString(), *_array_parts(message, arrays)])


def array(field: Any, dtype: Any = np.float64) -> np.ndarray:
    """A repeated numeric field (or an array `decode` already read) as a numpy array."""
    if isinstance(field, np.ndarray):
        return field.astype(dtype, copy=False)
    return np.array(field, dtype=dtype) if len(field) else np.empty(0, dtype=dtype)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def read_varints(payload: bytes | memoryview) -> np.ndarray:
    """Packed varints (int64 two's complement, or bools) as an int64 array.

    Reads one byte column at a time (the k-th byte of every varint that has
    one), as many columns as the longest varint has bytes."""
    b = np.frombuffer(payload, dtype=np.uint8)
    if b.size == 0 or b.max() < 0x80:  # every value fits one byte
        return b.astype(np.int64)
    ends = np.flatnonzero(b < 0x80)
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    lengths = ends - starts + 1
    values = (b[starts] & 0x7F).astype(np.uint64)
    for column in range(1, int(lengths.max())):
        longer = np.flatnonzero(lengths > column)
        values[longer] |= (b[starts[longer] + column] & 0x7F).astype(np.uint64) << np.uint64(7 * column)
    return values.view(np.int64)


_NUMERIC: dict[Any, dict[int, tuple[str, Any]]] = {}  # message descriptor -> {field number: (name, dtype)}


def _packed_fields(descriptor: Any) -> dict[int, tuple[str, Any]]:
    fields = _NUMERIC.get(descriptor)
    if fields is None:
        kinds = {"TYPE_DOUBLE": np.float64, "TYPE_INT64": np.int64, "TYPE_BOOL": np.bool_}
        fields = {}
        for f in descriptor.fields:
            kind = next((dtype for name, dtype in kinds.items() if f.type == getattr(f, name)), None)
            if kind is not None and f.is_repeated:
                fields[f.number] = (f.name, kind)
        _NUMERIC[descriptor] = fields
    return fields


class Decoded:
    """A parsed message whose packed numeric arrays were read by numpy:
    attribute access gives the array for those fields and the message's own
    value for every other one."""

    __slots__ = ("message", "arrays")

    def __init__(self, message: Any, arrays: dict[str, np.ndarray]) -> None:
        self.message = message
        self.arrays = arrays

    def __getattr__(self, name: str) -> Any:
        arrays = object.__getattribute__(self, "arrays")
        if name in arrays:
            return arrays[name]
        return getattr(object.__getattribute__(self, "message"), name)


def decode(message_class: Any, data: bytes) -> Decoded:
    """Parse `data` as `message_class`, reading packed repeated double, int64
    and bool fields straight from the bytes. Falls back to the runtime for
    anything unusual (an unpacked repeated field, a malformed buffer)."""
    fields = _packed_fields(message_class.DESCRIPTOR)
    view = memoryview(data)
    rest: list[memoryview] = []
    chunks: dict[int, list[memoryview]] = {}
    pos = 0
    try:
        while pos < len(view):
            start = pos
            key, pos = _read_varint(view, pos)
            number, wire = key >> 3, key & 7
            if wire == _LENGTH_DELIMITED:
                length, pos = _read_varint(view, pos)
                pos += length
                if number in fields:
                    chunks.setdefault(number, []).append(view[pos - length:pos])
                    continue
            elif wire == 0:
                _, pos = _read_varint(view, pos)
            elif wire in (1, 5) and number not in fields:
                pos += 8 if wire == 1 else 4
            else:
                raise ValueError("not a form this reader takes")
            rest.append(view[start:pos])
        if pos != len(view):
            raise ValueError("truncated")
    except (IndexError, ValueError):
        message = message_class.FromString(data)
        return Decoded(message, {})
    message = message_class.FromString(b"".join(rest))
    arrays = {}
    for number, parts in chunks.items():  # absent fields read as the message's empty ones
        name, dtype = fields[number]
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        if dtype is np.float64:  # one copy: the arrays are the caller's to change
            arrays[name] = np.frombuffer(payload, dtype="<f8").astype(np.float64, copy=True)
        else:
            arrays[name] = read_varints(payload).astype(dtype, copy=False)
    return Decoded(message, arrays)
