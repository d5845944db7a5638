"""Wire encoding shared by coordinator, worker and SDK.

Control messages are JSON (msgpack accepted); tensors are safetensors bytes,
raw for weight downloads, and for submissions after their msgpack map (``RESULT``)
or, from workers before it, inside it. Nothing that crosses the network is ever
unpickled.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import zlib
from dataclasses import MISSING, dataclass, fields
from typing import Any

import msgpack
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rewardsignal.aggregation.tensors import FlatTensors, flat_buffer
from rewardsignal.errors import ValidationError

JSON = "application/json"
MSGPACK = "application/msgpack"
SAFETENSORS = "application/vnd.safetensors"
# A lease answered as a stream (``docs/protocol.md``: the lease): frames, each a
# 4-byte big-endian length and a msgpack map.
FRAMES = "application/vnd.signal.frames"
# A task's result with its tensors after its msgpack map, not inside it
# (``docs/protocol.md``: results): a 4-byte big-endian length, the map, zero
# bytes to a multiple of 8, the safetensors bytes. The coordinator reads the
# tensors where they landed in the body: no copy out of a msgpack bin, none out
# of the body. Coordinators name it at registration (``result_types``).
RESULT = "application/vnd.signal.result"
# The largest body of a message on the worker channel (``docs/protocol.md``):
# the coordinator holds a message whole before reading it, so larger results
# go as requests, after an upload slot.
CHANNEL_MAX_BODY_BYTES = 2 << 20

# Upper bound of a safetensors header we accept; real adapters need a few KiB.
_MAX_HEADER_BYTES = 16 << 20


# The safetensors dtype names of what Signal sends and stores.
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
              torch.float64: "F64"}


def tensors_to_bytes(tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes of ``tensors``: the header, then each tensor's bytes
    copied once into the result, largest elements first then by name (so every
    tensor is aligned), which for one dtype is the byte order the safetensors
    library writes. About 4x faster than ``safetensors.torch.save`` for an
    adapter's hundred small tensors (its per-tensor conversions dominate); the
    library serves other dtypes. A flat set in that order (a gradient, a
    version's weights) is its header, made once per layout, and its buffer."""
    flat = flat_buffer(tensors)
    if flat is not None and flat.dtype in _ST_DTYPES and isinstance(tensors, FlatTensors):
        head = _flat_head(tensors.layout, _ST_DTYPES[flat.dtype], flat.element_size(),
                          tuple(metadata.items()) if metadata else ())
        if head is not None:
            return b"".join([head, flat.detach().contiguous().cpu().view(torch.uint8)
                             .numpy().data])
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if any(t.dtype not in _ST_DTYPES for t in cpu.values()):
        return st_save(cpu, metadata)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    order = sorted(cpu, key=lambda k: (-cpu[k].element_size(), k))
    offset = 0
    for k in order:
        t = cpu[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    parts = [cpu[k].reshape(-1).view(torch.uint8).numpy().data for k in order]
    # One copy, into the bytes returned (a buffer then ``bytes()`` copied twice,
    # page-faulting fresh memory each time: 80 ms for an optimizer state of 28 MB).
    return b"".join([_head_bytes(header), *parts])


def _head_bytes(header: dict) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces to a multiple of 8."""
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


@functools.lru_cache(maxsize=64)
def _flat_head(layout: tuple[tuple[str, tuple[int, ...]], ...], dtype: str, itemsize: int,
               metadata: tuple[tuple[str, str], ...]) -> bytes | None:
    """``tensors_to_bytes``'s header for a flat set of one dtype: the same bytes
    the per-tensor path makes. None when the buffer is not in the file's order
    (by name), which the per-tensor path then serves."""
    names = [name for name, _ in layout]
    if names != sorted(names):
        return None
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    return _head_bytes(header)


def tensors_from_bytes(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes, checking the header against the buffer first so a
    lying header is a clean ``ValidationError`` rather than a crash. A writable
    buffer (a ``bytearray``, or a view of one) is handed over: tensors of one
    float dtype may be views of it (no copy), so the caller must not write to it
    afterwards."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < 8:
        raise ValidationError("tensor payload is not safetensors (too short)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise ValidationError("tensor payload header length is out of bounds")
    head = bytes(data[8: 8 + header_len])
    flat = _flat(data, 8 + header_len, head)
    if flat is not None:
        return flat
    try:
        header = json.loads(head)
    except ValueError:  # not JSON, not UTF-8, or a number too long to read
        raise ValidationError("tensor payload header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValidationError("tensor payload header must be an object")
    body = len(data) - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= body):
            raise ValidationError(f"tensor payload: offsets of {name!r} lie outside the body")
    try:
        return st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValidationError(f"tensor payload is not valid safetensors: {exc}") from None


_FLAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# More dimensions than a weight has are left to the library: the product of
# many large ones is slow to compute (quadratic in their digits).
_MAX_FLAT_DIMS = 8
# Headers up to this size have their reading kept (``_flat_layout``): a
# worker's gradients of one run all carry the same header.
_KEPT_HEADER_BYTES = 64 << 10


def _flat(data: bytes | bytearray | memoryview, start: int, head: bytes
          ) -> FlatTensors | None:
    """The common case, tensors of one float dtype tiling the body in offset
    order (what Signal and the safetensors library write): every tensor a view
    of one buffer, the body itself when ``data`` is writable and the body
    aligned in memory, else a copy of the body. None for anything else, valid or
    not (the checks below and the library judge it)."""
    if sys.byteorder != "little":
        return None
    found = (_kept_flat_layout if len(head) <= _KEPT_HEADER_BYTES else _flat_layout)(head)
    body = len(data) - start
    # (a dimension beyond the body: only with a zero beside it)
    if found is None or found[2] != body or found[3] > body:
        return None
    dtype, layout = found[0], found[1]
    if not body:
        return FlatTensors(torch.zeros(0, dtype=dtype), layout)
    view = memoryview(data)
    flat = None
    if not view.readonly and view.contiguous and view.itemsize == 1:
        flat = torch.frombuffer(view, dtype=torch.uint8, offset=start)
    if flat is None or flat.data_ptr() % dtype.itemsize:
        flat = torch.frombuffer(bytearray(view[start:]), dtype=torch.uint8)
    return FlatTensors(flat.view(dtype), layout)


def _flat_layout(head: bytes) -> tuple[torch.dtype, tuple, int, int] | None:
    """What ``_flat`` needs of a header that lays out one float dtype's tensors
    end to end from offset 0: (dtype, layout, bytes they cover, largest
    dimension); None for any other header, valid or not."""
    try:
        header = json.loads(head)
    except ValueError:  # not JSON, not UTF-8, or a number too long to read
        return None
    if not isinstance(header, dict):
        return None
    entries = []
    dtypes = set()
    largest = 0
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                return None
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _FLAT_DTYPES:
            return None
        dtypes.add(info["dtype"])
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if (len(dtypes) > 1 or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not isinstance(shape, list)
                or len(shape) > _MAX_FLAT_DIMS or not all(type(d) is int and d >= 0 for d in shape)):
            return None
        largest = max(largest, *shape, 0)
        entries.append((offsets[0], offsets[1], name, tuple(shape)))
    dtype = _FLAT_DTYPES[dtypes.pop()] if dtypes else torch.float32
    entries.sort(key=lambda e: e[0])
    pos = 0
    for a, b, _, shape in entries:
        if a != pos or b - a != dtype.itemsize * math.prod(shape):
            return None
        pos = b
    return dtype, tuple((name, shape) for _, _, name, shape in entries), pos, largest


_kept_flat_layout = functools.lru_cache(maxsize=64)(_flat_layout)


# Check computations a worker may declare at registration (``checks``), beyond
# the plain ones: ``logit_temperature``: a forward task's payload may carry
# ``logit_temperature`` T, and its logprobs are then ``log_softmax(logits / T)``
# (what a sample at temperature T claims for its tokens).
CHECK_FEATURES = ("logit_temperature",)

# Task kinds a worker runs only when it declares them at registration
# (``tasks``): an older worker is never leased one. ``export_merged``: merge a
# version into the base and upload the files (``docs/protocol.md``).
OPTIONAL_TASKS = ("export_merged",)


# Weight deltas between two versions' adapter files (``docs/protocol.md``: the
# lease). Exact: the new file is ``old XOR delta``, bit for bit, so a worker that
# applies one holds the same fp32 bits as a full download (and checks the sha256).
# The XOR is split into byte planes (byte i of every 4-byte word together); the
# codec says how many low planes go as they are, the rest being deflated. Only
# the top plane (the sign and high exponent bits) barely changes from one step
# to the next: measured on signal-small, r=64, it deflates 6.3x in 21 ms, where
# the plane below it deflates by 13% in 87 ms.
XOR_DELTA = "xor-planes3-zlib"
# Made by coordinators before it (two planes deflated); workers still apply it.
XOR_DELTA_V1 = "xor-planes-zlib"
_RAW_PLANES = {XOR_DELTA: 3, XOR_DELTA_V1: 2}
# What a worker applies, named in its lease (``?deltas=``): a coordinator sends
# deltas only to a worker that names the codec it makes.
DELTA_CODECS = tuple(_RAW_PLANES)
_WORD = 4  # fp32 words, little-endian


def xor_delta(old: bytes, new: bytes, codec: str = XOR_DELTA) -> bytes | None:
    """``new`` as the change from ``old``, by ``codec``. None when the two
    differ in length (the tensors' names or shapes changed): send the full
    weights."""
    if len(old) != len(new):
        return None
    raw = _RAW_PLANES[codec]
    x = np.bitwise_xor(np.frombuffer(old, np.uint8), np.frombuffer(new, np.uint8))
    pad = -len(x) % _WORD
    if pad:
        x = np.concatenate([x, np.zeros(pad, np.uint8)])
    planes = x.reshape(-1, _WORD).T
    return planes[:raw].tobytes() + zlib.compress(planes[raw:].tobytes(), 1)


def apply_xor_delta(old: bytes | bytearray, delta: bytes | bytearray | memoryview,
                    codec: str = XOR_DELTA) -> bytearray:
    """The inverse of ``xor_delta``: the new bytes from ``old`` and the delta."""
    raw = _RAW_PLANES.get(codec)
    if raw is None:
        raise ValidationError(f"unknown weight delta codec {codec!r}")
    words = (len(old) + _WORD - 1) // _WORD
    raw_len = words * raw
    if len(delta) < raw_len:
        raise ValidationError("weight delta does not fit the weights it applies to")
    d = zlib.decompressobj()
    try:
        high = d.decompress(memoryview(delta)[raw_len:], words * (_WORD - raw))
    except zlib.error as exc:
        raise ValidationError(f"weight delta is not valid deflate data: {exc}") from None
    if len(high) != words * (_WORD - raw) or d.unconsumed_tail:
        raise ValidationError("weight delta does not fit the weights it applies to")
    # Each plane copied into its byte of every word, then the XOR in place: a
    # transpose of the (planes, words) array is four times slower (88 against
    # 21 ms for 45 MB), and the result is written once, into what is returned.
    out = bytearray(words * _WORD)
    x = np.frombuffer(out, np.uint8)
    by_word = x.reshape(words, _WORD)
    low, top = np.frombuffer(delta, np.uint8, raw_len), np.frombuffer(high, np.uint8)
    for k in range(_WORD):
        plane = low[k * words:(k + 1) * words] if k < raw else top[(k - raw) * words:
                                                                   (k - raw + 1) * words]
        by_word[:, k] = plane
    np.bitwise_xor(x[: len(old)], np.frombuffer(old, np.uint8), out=x[: len(old)])
    del x, by_word  # the views go before the padding is cut off
    del out[len(old):]
    return out


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame(obj: Any) -> bytes:
    """One frame of a ``FRAMES`` stream."""
    body = pack(obj)
    return len(body).to_bytes(4, "big") + body


def pack_result(msg: dict) -> bytes:
    """A result as ``RESULT``: ``msg["tensors"]`` (safetensors bytes) after the
    rest of the map."""
    head = pack({k: v for k, v in msg.items() if k != "tensors"})
    pad = -(4 + len(head)) % 8
    return b"".join([len(head).to_bytes(4, "big"), head, bytes(pad), msg["tensors"]])


def unpack_result(body: bytearray, *, max_bytes: int) -> dict:
    """The map of a ``RESULT`` body, its ``tensors`` a view of the body's tail
    (no copy: the body is handed over)."""
    size = int.from_bytes(body[:4], "big") if len(body) >= 4 else -1
    start = 4 + size + (-(4 + size) % 8)
    if size < 0 or start > len(body):
        raise ValidationError("result body ends before its map does")
    view = memoryview(body)
    msg = unpack(view[4: 4 + size], max_bytes=max_bytes)
    if not isinstance(msg, dict):
        raise ValidationError("a result's map must be a msgpack map")
    if "tensors" in msg:
        raise ValidationError("a result's tensors go after its map, not inside it")
    msg["tensors"] = view[start:]
    return msg


def unpack(data: bytes | bytearray | memoryview, *, max_bytes: int) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes,
                               max_str_len=max_bytes, max_array_len=1 << 24,
                               max_map_len=1 << 20)
    except Exception as exc:  # msgpack raises many unrelated types for garbage
        raise ValidationError(f"body is not valid msgpack: {type(exc).__name__}") from None


@dataclass(frozen=True)
class TaskMessage:
    """A leased task, coordinator -> worker (``docs/protocol.md``: the lease
    endpoint). ``payload`` is the kind's own JSON body."""

    task_id: str
    lease_id: str
    kind: str                 # forward_backward | forward | sample | train
    run_id: str
    base_model: str
    fingerprint: str
    version: int
    lora: dict
    weights_url: str
    weights_sha256: str
    lease_timeout_s: float
    payload: dict
    # The run's base precision (``rewardsignal.precision``); absent from messages
    # of coordinators that predate it, which meant the worker's own choice.
    base_dtype: str = "auto"
    quantization: str | None = None

    def to_json(self) -> dict:
        # Shallow on purpose: ``dataclasses.asdict`` would deep-copy the payload.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: object) -> TaskMessage:
        if not isinstance(d, dict):
            raise ValidationError("task message must be an object")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise ValidationError(f"task message lacks {missing}")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
