"""Safetensors bytes written by ``protocol.tensors_to_bytes`` against the
safetensors library: the same bytes, and every tensor read back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load
from safetensors.torch import save as library_save

from rewardsignal import protocol
from rewardsignal.aggregation.tensors import FlatTensors
from rewardsignal.errors import ValidationError
from rewardsignal.protocol import (
    XOR_DELTA,
    XOR_DELTA_V1,
    apply_xor_delta,
    pack,
    pack_result,
    tensors_from_bytes,
    tensors_to_bytes,
    unpack_result,
    xor_delta,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.lora_A": torch.randn(8, 16, generator=g),
        "w.lora_B": torch.randn(16, 8, generator=g).t(),  # not contiguous
        "q": torch.randint(-127, 127, (3, 5), generator=g).to(torch.int8),
        "q::scale": torch.rand(3, 1, generator=g),
        "h": torch.randn(7, generator=g).half(),
        "b": torch.randn(2, 2, generator=g).bfloat16(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_same_bytes_as_the_library_and_exact_round_trip(metadata):
    t = _tensors()
    data = tensors_to_bytes(t, metadata)
    assert data == library_save({k: v.contiguous() for k, v in t.items()}, metadata)
    for read in (load(data), tensors_from_bytes(data)):
        assert read.keys() == t.keys()
        for k, v in t.items():
            assert read[k].dtype == v.dtype and torch.equal(read[k], v)


def test_other_dtypes_go_through_the_library():
    t = {"flag": torch.tensor([True, False]), "x": torch.ones(2)}
    assert torch.equal(load(tensors_to_bytes(t))["flag"], t["flag"])
    assert tensors_to_bytes({}) == library_save({})


def _fp32() -> dict[str, torch.Tensor]:
    t = _tensors()
    return {k: v.float() for k, v in t.items() if k not in ("q", "h", "b")}


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_fp32_sets_are_read_as_views_of_one_buffer(metadata):
    t = _fp32()
    data = library_save({k: v.contiguous() for k, v in t.items()}, metadata)
    read = tensors_from_bytes(data)
    assert isinstance(read, FlatTensors) and read.flat is not None
    assert read.flat.numel() == sum(v.numel() for v in t.values())
    for k, v in t.items():
        assert torch.equal(read[k], v)
        assert read[k].untyped_storage().data_ptr() == read.flat.untyped_storage().data_ptr()
    # Written back from the buffer in one copy: the same bytes.
    assert tensors_to_bytes(read, metadata) == data
    read.flat.mul_(2)  # the views follow their buffer
    assert torch.equal(read["w.lora_A"], 2 * t["w.lora_A"])
    assert tensors_to_bytes(read) == library_save({k: 2 * v.contiguous() for k, v in t.items()})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sets_are_read_as_one_buffer_too(dtype):
    t = {k: v.to(dtype) for k, v in _fp32().items()}
    data = tensors_to_bytes(t)
    read = tensors_from_bytes(bytearray(data))
    assert isinstance(read, FlatTensors) and read.flat.dtype == dtype
    assert all(read[k].dtype == dtype and torch.equal(read[k], v) for k, v in t.items())
    assert tensors_to_bytes(read) == data
    shifted = bytearray(1) + bytearray(data)  # the body one byte off alignment: copied
    odd = tensors_from_bytes(memoryview(shifted)[1:])
    assert odd.flat.data_ptr() % 2 == 0
    assert all(torch.equal(odd[k], v) for k, v in t.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_a_flat_set_is_written_from_its_buffer_as_the_library_writes_it(dtype, metadata):
    t = {k: v.to(dtype) for k, v in _fp32().items()}
    names = sorted(t)
    layout = tuple((n, tuple(t[n].shape)) for n in names)
    flat = torch.cat([t[n].reshape(-1) for n in names])
    expected = library_save({k: v.contiguous() for k, v in t.items()}, metadata)
    assert tensors_to_bytes(FlatTensors(flat, layout), metadata) == expected
    hits = protocol._flat_head.cache_info().hits
    assert tensors_to_bytes(FlatTensors(flat * 2, layout), metadata) == library_save(
        {k: 2 * v.contiguous() for k, v in t.items()}, metadata)
    assert protocol._flat_head.cache_info().hits == hits + 1  # its header made once
    # A buffer not in the file's (name) order: its tensors are reordered as they go.
    backwards = tuple(reversed(layout))
    flat_b = torch.cat([t[n].reshape(-1) for n, _ in backwards])
    assert tensors_to_bytes(FlatTensors(flat_b, backwards), metadata) == expected


def test_a_header_read_before_is_not_trusted_with_another_body():
    t = _fp32()
    data = tensors_to_bytes(t)
    for _ in range(2):  # the second read of this header is the kept one
        hits = protocol._kept_flat_layout.cache_info().hits
        read = tensors_from_bytes(data)
        assert all(torch.equal(read[k], v) for k, v in t.items())
    assert protocol._kept_flat_layout.cache_info().hits == hits + 1
    other = {k: v + 1 for k, v in t.items()}
    again = tensors_from_bytes(tensors_to_bytes(other))  # same header, its own values
    assert all(torch.equal(again[k], v) for k, v in other.items())
    head = 8 + int.from_bytes(data[:8], "little")
    for body in (data[head:-4], data[head:] + bytes(4)):  # the kept layout, a body that
        with pytest.raises(ValidationError):              # does not match it
            tensors_from_bytes(data[:head] + body)


def test_a_bytearray_is_handed_over_and_bytes_are_copied():
    t = _fp32()
    data = tensors_to_bytes(t)
    mine = bytearray(data)
    viewed = tensors_from_bytes(mine)
    mine[-4:] = bytes(4)  # the views are the bytearray's memory: no copy was made
    last = next(reversed(viewed.layout))[0]
    assert viewed[last].reshape(-1)[-1].item() == 0.0
    copied = tensors_from_bytes(data)  # bytes cannot be written: its own buffer
    assert all(torch.equal(copied[k], v) for k, v in t.items())
    copied.flat.zero_()
    assert tensors_to_bytes(tensors_from_bytes(data)) == data


@pytest.mark.parametrize("extra", ["", "x" * 5])  # the map's length moves the padding
def test_a_result_with_its_tensors_after_the_map_is_read_in_place(extra):
    t = _fp32()
    msg = {"lease_id": "L" + extra, "version": 3, "tensors": tensors_to_bytes(t)}
    body = bytearray(pack_result(msg))
    got = unpack_result(body, max_bytes=1 << 20)
    assert {k: v for k, v in got.items() if k != "tensors"} == {"lease_id": "L" + extra,
                                                                "version": 3}
    read = tensors_from_bytes(got["tensors"])
    assert all(torch.equal(read[k], v) for k, v in t.items())
    body[-4:] = bytes(4)  # the tensors are the body's own memory: nothing was copied
    last = next(reversed(read.layout))[0]
    assert read[last].reshape(-1)[-1].item() == 0.0


def test_a_result_body_that_does_not_add_up_is_refused():
    good = pack_result({"lease_id": "L", "tensors": tensors_to_bytes(_fp32())})
    for bad in (b"", b"\x00\x00", bytearray(good[:6]), b"\xff\xff\xff\xff" + good[4:],
                len(pack([1])).to_bytes(4, "big") + pack([1]) + bytes(3),  # not a map
                len(pack({"tensors": b"x"})).to_bytes(4, "big") + pack({"tensors": b"x"})):
        with pytest.raises(ValidationError):
            unpack_result(bytearray(bad), max_bytes=1 << 20)


def _raw(header: dict, body: bytes) -> bytes:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + body


@pytest.mark.parametrize("dtype, size", [("F32", 4), ("F16", 2), ("BF16", 2)])
def test_lying_headers_of_one_float_dtype_are_refused_cleanly(dtype, size):
    body = bytes(5 * size)
    good = {"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2 * size]},
            "b": {"dtype": dtype, "shape": [3], "data_offsets": [2 * size, 5 * size]}}
    assert isinstance(tensors_from_bytes(_raw(good, body)), FlatTensors)
    lies = [
        {**good, "b": {**good["b"], "data_offsets": [size, 4 * size]}},  # overlaps a
        {**good, "z": {"dtype": dtype, "shape": [0, 10**30], "data_offsets": [0, 0]}},
        {**good, "a": {**good["a"], "data_offsets": [False, 2 * size]}},
        {**good, "__metadata__": "not an object"},
        {**good, "b": {**good["b"], "dtype": "F64" if dtype == "F32" else "F32"}},  # size
    ]
    for lie in lies:
        with pytest.raises(ValidationError):
            tensors_from_bytes(_raw(lie, body))
    other = "BF16" if dtype == "F16" else "F16"  # two dtypes: valid, and not one buffer
    if size == 2:
        mixed = tensors_from_bytes(_raw({**good, "b": {**good["b"], "dtype": other}}, body))
        assert not isinstance(mixed, FlatTensors) and mixed["b"].shape == (3,)


def test_payloads_that_are_not_a_tiled_fp32_body_are_left_to_the_library():
    mixed = tensors_from_bytes(tensors_to_bytes(_tensors()))
    assert not isinstance(mixed, FlatTensors)
    data = library_save({"a": torch.ones(2), "b": torch.ones(3)})
    head = int.from_bytes(data[:8], "little")
    # b's offsets overlap a's: no longer a tiling; the checks reject it cleanly.
    lying = data.replace(b'"data_offsets":[8,20]', b'"data_offsets":[4,16]')
    assert lying != data and int.from_bytes(lying[:8], "little") == head
    with pytest.raises(ValidationError):
        tensors_from_bytes(lying)


@pytest.mark.parametrize("codec", [XOR_DELTA, XOR_DELTA_V1])
@pytest.mark.parametrize("size", [0, 3, 4096, 4097])
def test_a_weight_delta_rebuilds_the_new_file_bit_for_bit(codec, size):
    g = torch.Generator().manual_seed(size)
    old_t = torch.randn(size // 4 + 1, generator=g)
    new_t = old_t - 1e-3 * torch.randn(old_t.shape, generator=g)  # one AdamW-sized step
    old = old_t.numpy().tobytes()[:size]
    new = new_t.numpy().tobytes()[:size]
    delta = xor_delta(old, new, codec)
    assert delta is not None and apply_xor_delta(old, delta, codec) == new
    if size >= 4096:  # the top byte plane barely changes: it deflates
        assert len(delta) < 0.9 * size
    assert xor_delta(old, new + b"x", codec) is None  # a different length: full weights


def test_a_weight_delta_that_does_not_fit_is_refused():
    old, new = bytes(4096), bytes(range(256)) * 16
    delta = xor_delta(old, new)
    assert delta is not None
    with pytest.raises(ValidationError, match="does not fit"):
        apply_xor_delta(old, delta[:-8])
    with pytest.raises(ValidationError, match="does not fit|not valid deflate"):
        apply_xor_delta(old, delta, XOR_DELTA_V1)  # read by the other codec
    with pytest.raises(ValidationError, match="unknown weight delta codec"):
        apply_xor_delta(old, delta, "lz4")
