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

from rlstream.core.messages import MESSAGE_TYPES, SCHEMA_VERSION, Message, RolloutRecord

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
    # The field values themselves (a frozen model's __dict__ holds exactly its fields, in order):
    # model_dump would copy every value only for msgpack to read it once (~10 us a sample).
    data = dict(msg.__dict__)
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
    if cls is RolloutRecord and _canonical_sample(data):
        return _construct_sample(data)
    try:
        return cls.model_validate(data, strict=True)  # the wire has real types: "1.0" is no reward
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or kind
        raise DecodeError(f"invalid {kind}: {where}: {first['msg']}") from None


# --------------------------------------------------------------------------- the samples' fast path
# A RolloutRecord as encode() writes it: every value of exactly its field's type. Such a map
# skips pydantic's validation (~15 us a sample: the custom __init__ makes it validate twice)
# for a type check per field, then the model's own invariant checks (the same method the
# validator runs); any other map goes through model_validate, whose verdict and error message
# stand (docs/design.md §15.55 Samples decode by a structural check, then the invariants).
# A field whose annotation is not a plain class (a new Optional[...], say) matches no value's
# type: its samples take the validated path, never a looser one.
_SAMPLE_TYPES: dict[str, type] = {name: f.annotation for name, f in RolloutRecord.model_fields.items()}
_SAMPLE_TYPES.update({field: array for field in RolloutRecord.PACKED}, metrics=dict, kind=str)  # kind: checked above
_SAMPLE_REQUIRED = frozenset(n for n, f in RolloutRecord.model_fields.items() if f.is_required())


# A sample exactly as this build's encode() writes it: every field, in declaration order (a frozen
# model's __dict__ order), each of its type. Two tuple comparisons at C speed decide it (~0.6 us
# against ~2.5 for the field-by-field check below, 256 samples a step); any other map, including
# a valid one in another order, takes that check, so the verdict is the same either way.
_SAMPLE_FIELDS = tuple(RolloutRecord.model_fields)
_SAMPLE_FIELD_TYPES = tuple(_SAMPLE_TYPES[name] for name in _SAMPLE_FIELDS)


def _exact_sample(data: dict) -> bool:
    """Whether ``data`` holds every field in declaration order, each value of exactly its field's
    type, metrics a str -> float map (``_canonical_sample``'s conditions, in their common case)."""
    if tuple(data) != _SAMPLE_FIELDS or tuple(map(type, data.values())) != _SAMPLE_FIELD_TYPES:
        return False
    metrics = data["metrics"]
    if metrics and not all(type(k) is str and type(v) is float for k, v in metrics.items()):
        return False
    return data["group_size"] >= 0  # the packed fields: decode's _unpack made each an array of its typecode


def _canonical_sample(data: dict) -> bool:
    """Whether ``data`` has only known fields, every required one, and each value of exactly its
    field's type (``type(v) is int``: no bool, no numpy scalar; metrics a str -> float map)."""
    if _exact_sample(data):
        return True
    types = _SAMPLE_TYPES
    if not _SAMPLE_REQUIRED.issubset(data):
        return False
    for name, value in data.items():
        if types.get(name) is not type(value):
            return False
    metrics = data.get("metrics")
    if metrics and not all(type(k) is str and type(v) is float for k, v in metrics.items()):
        return False
    return data.get("group_size", 0) >= 0 and all(a.typecode == c for a, c in
                                                  ((data[f], c) for f, c in RolloutRecord.PACKED.items() if f in data))


# Every field in declaration order (required ones hold a placeholder that ``data`` overwrites).
_SAMPLE_TEMPLATE = {name: None if f.is_required() else f.get_default(call_default_factory=True)
                    for name, f in RolloutRecord.model_fields.items()}
assert all(not isinstance(v, (dict, list, set)) or not v for v in _SAMPLE_TEMPLATE.values())


def _construct_sample(data: dict) -> RolloutRecord:
    """``model_construct`` without its per-field Python loop (~4 us), then the invariants."""
    try:
        return _built_sample(data)._check_invariants()
    except ValueError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValueError) -> DecodeError:
    """The message model_validate gives for the same failure of the invariants."""
    return DecodeError(f"invalid rollout_sample: rollout_sample: Value error, {exc}")


def _built_sample(data: dict) -> RolloutRecord:
    """The model on ``data``'s values, unchecked: the same four slots ``model_construct`` sets."""
    if len(data) == len(_SAMPLE_FIELDS) and tuple(data) == _SAMPLE_FIELDS:
        values = data  # every field, in order: the decoded map is the model's __dict__
    else:
        values = {**_SAMPLE_TEMPLATE, **data}
        if "metrics" not in data:
            values["metrics"] = {}  # a fresh default, as default_factory gives
    msg = RolloutRecord.__new__(RolloutRecord)
    object.__setattr__(msg, "__dict__", values)
    object.__setattr__(msg, "__pydantic_fields_set__", set(data))
    object.__setattr__(msg, "__pydantic_extra__", None)
    object.__setattr__(msg, "__pydantic_private__", None)
    return msg


# --------------------------------------------------------------------------- a batch of samples
def decode_samples(raws: list) -> list[RolloutRecord | DecodeError]:
    """``decode(raw, expect=RolloutRecord)`` of each of ``raws``, in order: the sample, or the
    ``DecodeError`` it raises (the same verdict and message). What a worker writes (``_exact_map``)
    is built without a call per field, and the invariants of all such samples are checked at once
    (``RolloutRecord.invariants_hold``: the byte checks run once on the batch's arrays joined);
    every other entry takes ``decode``, and so does the check of each sample when the batch's fails
    (docs/design.md §15.85 Samples decode by the batch)."""
    out: list = []
    built: list[RolloutRecord] = []
    for raw in raws:
        data = _exact_map(raw)
        if data is None:
            try:
                out.append(decode(raw, expect=RolloutRecord))
            except DecodeError as exc:
                out.append(exc)
        else:
            msg = _built_sample(data)
            out.append(msg)
            built.append(msg)
    if built and not RolloutRecord.invariants_hold(built):
        fresh = {id(msg) for msg in built}
        for i, msg in enumerate(out):
            if id(msg) in fresh:
                try:
                    msg._check_invariants()
                except ValueError as exc:
                    out[i] = _invalid(exc)
    return out


_PACKED_SAMPLE = tuple((field, typecode, _ITEMSIZE[typecode]) for field, typecode in RolloutRecord.PACKED.items())
# The fields' types on the wire: packed bytes where the model holds arrays.
_SAMPLE_WIRE_TYPES = tuple(bytes if name in RolloutRecord.PACKED else _SAMPLE_TYPES[name] for name in _SAMPLE_FIELDS)


def _exact_map(raw: Any) -> dict | None:
    """The decoded map of a sample exactly as ``encode`` writes it (``_exact_sample``'s conditions:
    every field in order, each of its type), its packed fields unpacked; None for anything else,
    which ``decode`` then reads (and rejects, or validates) on its own."""
    if type(raw) is not bytes:
        return None
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception:  # decode says why
        return None
    if type(data) is not dict or tuple(data) != _SAMPLE_FIELDS \
            or tuple(map(type, data.values())) != _SAMPLE_WIRE_TYPES \
            or data["kind"] != "rollout_sample" or data["schema_version"] != SCHEMA_VERSION or data["group_size"] < 0:
        return None
    metrics = data["metrics"]
    if metrics and not all(type(k) is str and type(v) is float for k, v in metrics.items()):
        return None
    for field, typecode, size in _PACKED_SAMPLE:
        blob = data[field]
        if len(blob) % size:
            return None
        data[field] = arr = array(typecode, blob)  # bytes: frombytes
        if _BIG_ENDIAN:
            arr.byteswap()
    return data
