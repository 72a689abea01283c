"""Fast protobuf encoding of large numeric arrays.

Filling a repeated field element by element costs about a microsecond per
value in Python; a batch of a million completions would spend seconds there.
Instead the packed wire form of each array (tag, length, payload) is built
with numpy and either merged into a message (`fill`: one parse, in C) or
appended to the message's own serialized bytes (`encode`: no parse at all,
for messages that are only sent). Reading goes the other way through
`np.array(field)`, which copies from the runtime's contiguous storage.
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
    """A repeated numeric field as a numpy array."""
    return np.array(field, dtype=dtype) if len(field) else np.empty(0, dtype=dtype)
