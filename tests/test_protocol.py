"""Safetensors bytes written by ``protocol.tensors_to_bytes`` against the
safetensors library: the same bytes, and every tensor read back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load
from safetensors.torch import save as library_save

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
