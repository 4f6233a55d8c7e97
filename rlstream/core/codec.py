"""The only module that imports msgpack: message <-> bytes.

Envelope: a msgpack map of the message's fields. Fields listed in the message's
``PACKED`` travel as little-endian packed arrays (``array`` typecodes i/f/B = int32,
float32, uint8) instead of msgpack lists: decoding lists is several times slower
(docs/design.md §15.8 Packed arrays in msgpack). Decoding validates every invariant; any failure raises
``DecodeError`` with a one-line reason fit for the dead-letter stream.
"""
from __future__ import annotations

import sys
from array import array
from typing import Any

import msgpack
from pydantic import ValidationError

from rlstream.core.messages import MESSAGE_TYPES, SCHEMA_VERSION, Message

_BIG_ENDIAN = sys.byteorder == "big"
_ITEMSIZE = {"i": 4, "f": 4, "B": 1}
assert all(array(code).itemsize == size for code, size in _ITEMSIZE.items())


class DecodeError(ValueError):
    """Bytes that are not a valid rlstream message; ``str(err)`` is the reason."""


def _pack(arr: array) -> bytes:
    if _BIG_ENDIAN:
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


def _unpack(blob: Any, typecode: str, field: str) -> array:
    if not isinstance(blob, bytes):
        raise DecodeError(f"field {field!r} must be packed bytes, got {type(blob).__name__}")
    if len(blob) % _ITEMSIZE[typecode]:
        raise DecodeError(f"field {field!r} has {len(blob)} bytes, not a whole number of items")
    arr = array(typecode)
    arr.frombytes(blob)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr


def encode(msg: Message) -> bytes:
    data = msg.model_dump()
    for field in msg.PACKED:
        data[field] = _pack(data[field])
    return msgpack.packb(data, use_bin_type=True)


def decode(raw: bytes, expect: type[Message] | None = None) -> Message:
    """Decode and validate; raise ``DecodeError`` on anything malformed."""
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeError(f"envelope must be a map, got {type(data).__name__}")
    kind = data.get("kind")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(f"unknown message kind {kind!r}")
    if expect is not None and cls is not expect:
        raise DecodeError(f"expected {expect.model_fields['kind'].default}, got {kind}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DecodeError(f"schema_version {version!r} not supported (this build reads {SCHEMA_VERSION})")
    for field, typecode in cls.PACKED.items():
        if field in data:
            data[field] = _unpack(data[field], typecode, field)
    try:
        return cls.model_validate(data, strict=True)  # the wire has real types: "1.0" is no reward
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or kind
        raise DecodeError(f"invalid {kind}: {where}: {first['msg']}") from None
