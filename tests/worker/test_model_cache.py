"""The worker keeps base models in an LRU bounded by memory, and LoRA stays fp32
over a bf16 base."""

import shutil

import pytest
import torch

from rewardsignal.data import examples_to_datums, sample_examples
from rewardsignal.lora import init_adapter
from rewardsignal.worker.engine import Engine
from rewardsignal.worker.model_cache import ModelCache, module_bytes


def test_least_recently_used_model_is_evicted_first():
    evicted = []
    cache = ModelCache(10, on_evict=evicted.append)
    cache.put("a", object(), 4)
    cache.put("b", object(), 4)
    assert cache.get("a") is not None  # a is now the most recently used

    assert cache.make_room(4) == ["b"]
    cache.put("c", object(), 4)

    assert evicted == ["b"]
    assert cache.model_ids() == ["a", "c"] and cache.resident_bytes == 8
    assert cache.make_room(2) == []  # 8 + 2 fits in 10


def test_a_model_larger_than_the_budget_unloads_everything_else():
    cache = ModelCache(10)
    cache.put("a", object(), 3)
    cache.put("b", object(), 3)
    assert cache.make_room(25) == ["a", "b"]
    assert len(cache) == 0


def test_free_device_memory_also_bounds_the_cache():
    free = {"bytes": 1}
    cache = ModelCache(100, free_bytes=lambda: free["bytes"],
                       on_evict=lambda _: free.update(bytes=free["bytes"] + 5))
    cache.put("a", object(), 5)
    cache.put("b", object(), 5)
    # The budget would allow it, the device does not: evict until 8 bytes are free.
    assert cache.make_room(8) == ["a", "b"]


def test_engine_unloads_the_least_recently_used_base(tmp_path, tiny_path, tiny_spec):
    ids = []
    for name in ("m1", "m2", "m3"):
        shutil.copytree(tiny_path, tmp_path / name)
        ids.append(str(tmp_path / name))
    adapter = init_adapter("signal-tiny", tiny_spec)
    probe = Engine("cpu", cache_bytes=1 << 40)
    one_model = module_bytes(probe.activate(ids[0], tiny_spec, "r", 0, adapter)[0])
    engine = Engine("cpu", cache_bytes=int(2.5 * one_model))

    engine.activate(ids[0], tiny_spec, "r0", 0, adapter)
    engine.activate(ids[1], tiny_spec, "r1", 0, adapter)
    engine.activate(ids[0], tiny_spec, "r0", 0, adapter)  # touch m1: m2 is now the oldest
    engine.activate(ids[2], tiny_spec, "r2", 0, adapter)

    assert engine.models.model_ids() == [ids[0], ids[2]]
    assert engine.models.resident_bytes <= engine.models.budget_bytes
    assert all(k[0] != ids[1] for k in engine._loaded)  # its adapter versions forgotten too
    model, _ = engine.activate(ids[1], tiny_spec, "r1", 0, adapter)  # reloads on demand
    assert engine.models.model_ids() == [ids[2], ids[1]]
    assert module_bytes(model) == one_model


def test_lora_weights_and_grads_stay_fp32_over_a_bf16_base(tokenizer, tiny_spec):
    engine = Engine("cpu", dtype=torch.bfloat16)
    adapter = init_adapter("signal-tiny", tiny_spec)
    model, key = engine.activate("signal-tiny", tiny_spec, "r", 0, adapter)

    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert base and all(p.dtype == torch.bfloat16 for p in base)
    datums = examples_to_datums(sample_examples()[:4], tokenizer)
    res = engine.forward_backward(model, key, datums, "cross_entropy", {})
    assert all(g.dtype == torch.float32 for g in res.grads.values())
    assert all(torch.isfinite(g).all() for g in res.grads.values())
    assert any(float(g.abs().max()) > 0 for g in res.grads.values())
    assert res.loss_sum / res.weight_sum == pytest.approx(
        engine_fp32_mean_loss(tiny_spec, adapter, datums), rel=0.05)


def engine_fp32_mean_loss(spec, adapter, datums) -> float:
    engine = Engine("cpu")
    model, key = engine.activate("signal-tiny", spec, "r", 0, adapter)
    res = engine.forward_backward(model, key, datums, "cross_entropy", {}, backward=False)
    return res.loss_sum / res.weight_sum


def test_the_cache_stays_within_the_memory_the_worker_offers():
    from rewardsignal.worker.loop import WorkerConfig, cache_budget
    from rewardsignal.worker.model_cache import default_budget_bytes

    cpu = torch.device("cpu")
    base = dict(coordinator="http://127.0.0.1:1", device="cpu")
    offered = WorkerConfig(**base, memory_gb=4.0)
    assert cache_budget(offered, cpu, []) == default_budget_bytes(cpu, 4 * 2**30) == 2 * 2**30
    assert cache_budget(WorkerConfig(**base, memory_gb=4.0, model_cache_gb=1.0), cpu, []) == 2**30
    assert cache_budget(WorkerConfig(**base), cpu, []) is None  # the engine's default: a share
    assert default_budget_bytes(cpu) > default_budget_bytes(cpu, 2**30)  # of all RAM
