"""Placement by size through the real HTTP surface: a run whose estimated need
exceeds a worker's offered memory is never leased to it, creating a run that no
registered worker can host answers 201 with a warning, a gpu_config hint raises
the minimum, and the status says which worker can serve which run."""

from __future__ import annotations

from apphelpers import FakeWorker

MiB = 2**20
# signal-tiny on a CPU worker (fp32, eager attention): ~8 MiB at max_length 64,
# ~0.6 GiB at the default 2048 (the T x T attention scores dominate).
SMALL, BIG = 16 * MiB, 2048 * MiB


def _create(h, **fields):
    _, run = h.request("POST", "/v1/runs", expect=201,
                       json={"base_model": "signal-tiny", "lora_r": 2, **fields})
    return run


def _fb(h, run_id, n=1):
    _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                       json={"batch": [{"text": f"example {i}"} for i in range(n)]}, expect=202)
    return req["request_id"]


def test_a_run_too_big_for_a_worker_is_never_leased_to_it(harness):
    h = harness
    small = FakeWorker(h, "small", memory_bytes=SMALL)
    run = _create(h)  # max_length 2048: too big for 16 MiB
    assert len(run["warnings"]) == 1
    assert "no registered worker can host" in run["warnings"][0]
    assert "small: needs about 0.6" in run["warnings"][0]
    _fb(h, run["run_id"], n=4)
    assert small.lease(timeout_s=0.5) is None

    big = FakeWorker(h, "big", memory_bytes=BIG)
    assert big.lease()["run_id"] == run["run_id"]
    assert small.lease(timeout_s=0.3) is None

    fits = _create(h, max_length=64)
    assert fits["warnings"] == []
    _fb(h, fits["run_id"])
    assert small.lease()["run_id"] == fits["run_id"]

    _, st = h.request("GET", "/v1/status", expect=200)
    workers = {w["name"]: w for w in st["workers"]}
    assert workers["small"]["can_serve"] == [fits["run_id"]]
    assert "needs about" in workers["small"]["cannot_serve"][run["run_id"]]
    assert sorted(workers["big"]["can_serve"]) == sorted([run["run_id"], fits["run_id"]])
    assert {r["run_id"]: r["eligible_workers"] for r in st["runs"]} == {
        run["run_id"]: 1, fits["run_id"]: 2}


def test_no_worker_at_all_is_a_warning_not_an_error(harness):
    run = _create(harness)
    assert run["warnings"] and "none is registered" in run["warnings"][0]
    assert harness.request("GET", f"/v1/runs/{run['run_id']}", expect=200)[1]["version"] == 0


def test_gpu_config_is_a_minimum_memory_hint(harness):
    h = harness
    FakeWorker(h, "big", memory_bytes=BIG)
    run = _create(h, max_length=64, gpu_config="A100-80GB:2")
    assert run["gpu_config"] == "A100-80GB:2"
    assert "below the run's gpu_config hint" in run["warnings"][0]
    unknown = _create(h, max_length=64, gpu_config="Quantum9000")
    assert "unknown GPU" in unknown["warnings"][0] and len(unknown["warnings"]) == 1

    _fb(h, run["run_id"])
    h80 = FakeWorker(h, "h100", device="cuda:0", memory_bytes=80 * 1024 * MiB)
    assert h80.lease()["run_id"] == run["run_id"]


def test_workers_that_declare_no_memory_are_not_bound(harness):
    h = harness
    legacy = FakeWorker(h, "legacy")
    run = _create(h)
    assert run["warnings"] == []
    _fb(h, run["run_id"])
    assert legacy.lease()["run_id"] == run["run_id"]


def test_task_size_follows_what_the_workers_memory_holds_of_the_run(harness):
    """A worker's shards of a run hold no more tokens than the memory estimate
    says fit beside that run's base and LoRA in what it offers; a bigger worker
    gets the batch in fewer, longer shards."""
    from rewardsignal.memory import shape_of, train_memory_bytes
    from rewardsignal.models import model_info

    h = harness
    targets = model_info("signal-tiny").default_target_modules
    text = " ".join(f"word{i}" for i in range(40))
    for memory, name in ((SMALL, "small16"), (BIG, "big2g")):
        worker = FakeWorker(h, name, memory_bytes=memory)
        run = _create(h, max_length=64)
        _, req = h.request("POST", f"/v1/runs/{run['run_id']}/forward_backward", expect=202,
                           json={"batch": [{"text": f"{text} {i}"} for i in range(24)]})
        sizes = []
        for _ in range(24):
            task = worker.lease(timeout_s=0.5)
            if task is None:
                break
            sizes.append(sum(len(d["model_input"]) for d in task["payload"]["datums"]))
        assert sum(sizes) > 64 * 8  # the whole batch was leased
        for tokens in sizes:
            assert train_memory_bytes(shape_of("signal-tiny"), dtype="fp32", quantization=None,
                                      lora_r=2, targets=targets, tokens=tokens,
                                      eager_seq_len=64) <= memory
        if name == "small16":
            assert len(sizes) > 1
            small_shards = len(sizes)
        else:
            assert len(sizes) < small_shards
        h.request("DELETE", f"/v1/runs/{run['run_id']}", expect=200)
        h.request("DELETE", f"/v1/workers/{worker.worker_id}", expect=None)
