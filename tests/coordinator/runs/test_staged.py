"""An ``optim_step`` computes AdamW on the last ``forward_backward``'s gradient
while that gradient is being written (``Accumulator.stage``), and commits the
version only once it is durable. What it commits is what a step after the write
would have committed, bit for bit; if a gradient it computed on never lands, it
computes again on what did (or fails, when nothing did), and nothing of the lost
one counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from apphelpers import FakeWorker, Harness, answer, new_run, submit_shard

from rewardsignal.coordinator.ops import optim_step as optim_module


async def _forward_backward(h: Harness, worker_id: str, run_id: str, value: float) -> str:
    """A forward_backward whose gradient (every element ``value``) is accepted;
    its request id (the request itself may still be finishing)."""
    status, req = await answer(await h.client.post(f"/v1/runs/{run_id}/forward_backward",
                                                   json={"batch": [{"text": "one two"}]}))
    assert status == 202, req
    assert await submit_shard(h, worker_id, run_id, value) == 200
    return req["request_id"]


async def _optim_step(h: Harness, run_id: str) -> str:
    status, req = await answer(await h.client.post(f"/v1/runs/{run_id}/optim_step", json={}))
    assert status == 202, req
    return req["request_id"]


async def _result(h: Harness, request_id: str) -> dict:
    _, body = await answer(await h.client.get(f"/v1/requests/{request_id}?timeout_s=10"))
    return body


@contextmanager
def _one_worker(data_dir) -> Iterator[tuple[Harness, str, str]]:
    """A coordinator with a signal-tiny run and one fake worker: (harness, run
    id, worker id); closed on the way out."""
    h = Harness(data_dir)
    try:
        yield h, new_run(h), FakeWorker(h).worker_id
    finally:
        h.close()


def _gate_saves(h: Harness, fail: frozenset[int] = frozenset()
                ) -> tuple[asyncio.Event, list[str]]:
    """Gradient writes from now on wait for the returned event; the ``fail``-th
    of them (0 = the first) then fail, as on a full disk. The list records the
    request of each write begun."""
    pending = h.coordinator.services.pending
    original = pending.save
    gate = asyncio.Event()
    begun: list[str] = []

    async def save(**kw):
        n = len(begun)
        begun.append(kw["request_id"])
        await gate.wait()
        if n in fail:
            raise OSError(28, "No space left on device")
        await original(**kw)

    pending.save = save  # type: ignore[method-assign]
    return gate, begun


async def _until(cond, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def _count_adamw(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = optim_module.adamw_step

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(optim_module, "adamw_step", counted)
    return calls


def _reference(tmp_path, values: list[float]) -> dict[str, torch.Tensor]:
    """The adapter after one step on the gradients of ``values``, nothing gated."""
    with _one_worker(tmp_path / "reference") as (h, rid, worker_id):
        async def go() -> None:
            for v in values:
                assert (await _result(h, await _forward_backward(h, worker_id, rid, v))
                        )["status"] == "done"
            assert (await _result(h, await _optim_step(h, rid)))["status"] == "done"

        h.call(go())
        return {k: v.clone() for k, v in h.coordinator.runs[rid].adapter.items()}


def test_adamw_runs_while_the_gradient_is_written_and_the_version_waits_for_it(
        tmp_path, monkeypatch):
    reference = _reference(tmp_path, [0.01])
    adamw = _count_adamw(monkeypatch)
    with _one_worker(tmp_path / "data") as (h, rid, worker_id):
        run = h.coordinator.runs[rid]

        async def go() -> None:
            gate, begun = _gate_saves(h)
            fb = await _forward_backward(h, worker_id, rid, 0.01)
            step = await _optim_step(h, rid)
            await _until(lambda: bool(adamw))  # AdamW ran on the staged gradient
            assert begun == [fb]  # ... whose write is held
            await asyncio.sleep(0.2)
            assert run.version == 0  # not committed: the gradient is not durable yet
            assert run.accum.empty and len(run.accum.staged) == 1
            gate.set()
            assert (await _result(h, step))["result"]["version"] == 1
            assert (await _result(h, fb))["status"] == "done"

        h.call(go())
        assert len(adamw) == 1  # what it computed ahead stood
        assert all(torch.equal(run.adapter[k], v) for k, v in reference.items())
        assert not run.accum.staged


def test_a_staged_gradient_that_cannot_be_stored_fails_its_request_and_the_step(
        tmp_path, monkeypatch):
    adamw = _count_adamw(monkeypatch)
    with _one_worker(tmp_path / "data") as (h, rid, worker_id):
        run = h.coordinator.runs[rid]
        before = {k: v.clone() for k, v in run.adapter.items()}

        async def go() -> None:
            gate, begun = _gate_saves(h, fail=frozenset({0}))
            fb = await _forward_backward(h, worker_id, rid, 0.01)
            step = await _optim_step(h, rid)
            await _until(lambda: bool(adamw))
            assert begun == [fb]
            gate.set()
            failed = await _result(h, fb)
            assert failed["status"] == "failed"
            out = await _result(h, step)
            assert out["status"] == "failed" and "nothing to apply" in out["error"]["message"]

        h.call(go())
        assert run.version == 0 and run.accum.empty and not run.accum.staged
        assert all(torch.equal(run.adapter[k], v) for k, v in before.items())


def test_a_step_computes_again_without_a_gradient_that_never_landed(tmp_path, monkeypatch):
    reference = _reference(tmp_path, [0.01])
    adamw = _count_adamw(monkeypatch)
    with _one_worker(tmp_path / "data") as (h, rid, worker_id):
        run = h.coordinator.runs[rid]

        async def go() -> None:
            first = await _forward_backward(h, worker_id, rid, 0.01)
            assert (await _result(h, first))["status"] == "done"
            gate, begun = _gate_saves(h, fail=frozenset({0}))  # the second one's write fails
            second = await _forward_backward(h, worker_id, rid, 0.5)
            step = await _optim_step(h, rid)
            await _until(lambda: bool(adamw))
            assert begun == [second]
            gate.set()
            assert (await _result(h, second))["status"] == "failed"
            assert (await _result(h, step))["result"]["version"] == 1

        h.call(go())
        assert len(adamw) == 2  # computed ahead with both, again with the first alone
        assert all(torch.equal(run.adapter[k], v) for k, v in reference.items())


def test_a_worker_quarantined_while_the_gradient_is_written_has_its_shards_recomputed(
        tmp_path, monkeypatch):
    """The step computed ahead with the quarantined worker's gradient: it takes it
    out, has its shards computed by another worker, and computes again; the step
    is the one an honest fleet would have made, bit for bit."""
    reference = _reference(tmp_path, [0.01, 0.02])
    adamw = _count_adamw(monkeypatch)
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        rid = new_run(h)
        good, bad = FakeWorker(h, "good").worker_id, FakeWorker(h, "bad").worker_id
        run = h.coordinator.runs[rid]

        async def recompute() -> None:  # the honest worker takes what is owed
            for _ in range(50):
                if await submit_shard(h, good, rid, 0.02) == 200:
                    return

        async def go() -> None:
            assert (await _result(h, await _forward_backward(h, good, rid, 0.01))
                    )["status"] == "done"
            gate, _ = _gate_saves(h)
            fb = await _forward_backward(h, bad, rid, 0.02)
            step = await _optim_step(h, rid)
            await _until(lambda: bool(adamw))
            await h.coordinator.services.trust.quarantine(bad, "disagreed")
            gate.set()
            await asyncio.wait_for(recompute(), 20)
            assert (await _result(h, fb))["status"] == "done"
            assert (await _result(h, step))["result"]["version"] == 1

        h.call(go())
        assert len(adamw) >= 2 and not run.accum.owed
        assert all(torch.equal(run.adapter[k], v) for k, v in reference.items())
    finally:
        h.close()


def test_a_step_does_not_commit_behind_a_request_whose_outcome_was_not_stored(
        tmp_path, monkeypatch):
    """A request before it (here a forward) could not record that it finished:
    a restart would run it again, so the step must not go past it now."""
    from rewardsignal.coordinator.ops import runner

    monkeypatch.setattr(runner, "_FINISH_RETRY_S", (0.0,))
    with _one_worker(tmp_path / "data") as (h, rid, worker_id):
        run = h.coordinator.runs[rid]
        db = h.coordinator.services.db
        finish = db.finish_request

        async def go() -> None:
            assert (await _result(h, await _forward_backward(h, worker_id, rid, 0.01))
                    )["status"] == "done"
            status, req = await answer(await h.client.post(
                f"/v1/runs/{rid}/forward", json={"batch": [{"text": "one two"}]}))
            assert status == 202, req

            async def failing(request_id, *args, **kwargs):
                if request_id == req["request_id"]:
                    raise OSError(5, "Input/output error")
                await finish(request_id, *args, **kwargs)

            db.finish_request = failing  # type: ignore[method-assign]
            step = await _optim_step(h, rid)  # queued while the forward computes
            assert await submit_shard(h, worker_id, rid) == 200  # the forward's result
            out = await _result(h, step)
            assert out["status"] == "failed"
            assert "did not finish storing its outcome" in out["error"]["message"]

        h.call(go())
        assert run.version == 0


def test_a_gradient_whose_record_cannot_be_written_fails_with_the_step_behind_it(tmp_path):
    """A forward_backward's result is stored with its gradient's row, in one
    transaction: when that write fails, neither is there, the request fails,
    and the step behind it applies nothing."""
    with _one_worker(tmp_path / "data") as (h, rid, worker_id):
        run = h.coordinator.runs[rid]
        db = h.coordinator.services.db

        def failing(row, done=None, **kwargs):
            raise OSError(28, "No space left on device")

        db.add_pending_grad_from_thread = failing  # type: ignore[method-assign]

        async def go() -> str:
            fb = await _forward_backward(h, worker_id, rid, 0.01)
            step = await _optim_step(h, rid)
            assert (await _result(h, fb))["status"] == "failed"
            out = await _result(h, step)
            assert out["status"] == "failed"
            assert "forward_backward before it failed" in out["error"]["message"]
            return fb

        fb = h.call(go())
        assert run.version == 0 and run.accum.empty
        assert h.call(db.pending_grads(rid)) == []
        row = h.call(db.finished_request(fb))
        assert row is not None and row["status"] == "failed"


def test_a_forward_backward_stores_its_result_with_its_gradient_row(tmp_path):
    """One database trip makes a forward_backward's gradient and its result
    durable (``Database.add_pending_grad_from_thread``): the runner stores
    nothing more for it, and a restart finds both or neither."""
    with _one_worker(tmp_path / "data") as (h, rid, worker_id):
        db = h.coordinator.services.db
        finished: list[str] = []
        finish = db.finish_request

        async def counting(request_id, *args, **kwargs):
            finished.append(request_id)
            await finish(request_id, *args, **kwargs)

        db.finish_request = counting  # type: ignore[method-assign]

        async def go() -> tuple[str, dict]:
            fb = await _forward_backward(h, worker_id, rid, 0.01)
            return fb, await _result(h, fb)

        fb, out = h.call(go())
        assert out["status"] == "done" and fb not in finished
        row = h.call(db.finished_request(fb))
        assert row is not None and row["status"] == "done"
        assert row["result"] == out["result"]
        assert [p["request_id"] for p in h.call(db.pending_grads(rid))] == [fb]


def test_a_timeout_while_the_gradient_is_written_waits_for_it_and_the_request_is_done(
        tmp_path):
    """A forward_backward that times out (or is cancelled) once its gradient's
    write has begun ends as that write does: the thread writing it cannot be
    stopped, and a gradient stored as done must count, or a restart (or the
    client's retry) would apply it twice."""
    with _one_worker(tmp_path / "data") as (h, rid, worker_id):
        run = h.coordinator.runs[rid]
        db = h.coordinator.services.db
        write = db.add_pending_grad_from_thread

        def slow(row, done=None, **kwargs):
            time.sleep(0.8)  # a slow disk: the request's 0.3 s run out meanwhile
            return write(row, done, **kwargs)

        db.add_pending_grad_from_thread = slow  # type: ignore[method-assign]

        async def go() -> tuple[str, dict]:
            status, req = await answer(await h.client.post(
                f"/v1/runs/{rid}/forward_backward",
                json={"batch": [{"text": "one two"}], "timeout_s": 0.3}))
            assert status == 202, req
            assert await submit_shard(h, worker_id, rid, 0.01) == 200
            return req["request_id"], await _result(h, req["request_id"])

        fb, out = h.call(go())
        assert out["status"] == "done", out
        assert not run.accum.empty  # counted, as stored
        row = h.call(db.finished_request(fb))
        assert row is not None and row["status"] == "done"
        assert [p["request_id"] for p in h.call(db.pending_grads(rid))] == [fb]
