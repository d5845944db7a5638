"""Safetensors bytes written by ``protocol.tensors_to_bytes`` against the
safetensors library: the same bytes, and every tensor read back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load
from safetensors.torch import save as library_save

from rewardsignal.aggregation.tensors import FlatTensors
from rewardsignal.errors import ValidationError
from rewardsignal.protocol import tensors_from_bytes, tensors_to_bytes


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
