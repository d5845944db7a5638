"""A real worker on the coordinator's worker channel: its leases and the
results that carry one go there, not as HTTP requests; a channel the
coordinator closes, or one it cannot open, costs no step (HTTP requests take
over, and a new channel comes later); ``--no-channel`` opens none."""

from __future__ import annotations

import asyncio

import pytest
from apphelpers import Harness, new_run, real_worker_steps, requests_by_method

from rewardsignal.coordinator.api.channel import CHANNELS
from rewardsignal.worker import channel as worker_channel
from rewardsignal.worker.loop import Worker

LEASE, RESULT, CHANNEL = ("/v1/workers/{worker_id}/lease", "/v1/tasks/{task_id}/result",
                          "/v1/workers/{worker_id}/channel")


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    yield harness
    harness.close()


def test_a_workers_leases_and_results_go_on_its_channel(h: Harness):
    rid = new_run(h)
    worker = real_worker_steps(h, rid, 3)
    assert worker.tasks_done == 3
    assert requests_by_method(h, CHANNEL) == {"GET": 1}  # one channel, closed as the worker left
    assert requests_by_method(h, LEASE) == {"WS": 1}
    # The last result carries no lease (max_tasks): a request of its own.
    assert requests_by_method(h, RESULT) == {"WS": 2, "POST": 1}


def test_a_closed_channel_costs_no_step_and_a_new_one_follows(
        h: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr(worker_channel, "_REOPEN_AFTER_FAILURE_S", 0.0)
    rid = new_run(h)

    async def close_after_second(i: int) -> None:
        if i == 1:  # while the worker waits for its third task on the channel
            for ws in list(h.app[CHANNELS].open.values()):  # as a network fault would
                await ws.close(code=1011, message=b"gone")

    worker = real_worker_steps(h, rid, 5, between=close_after_second)
    assert worker.tasks_done == 5
    err = capsys.readouterr().err
    assert "worker channel failed" in err and "unreachable" not in err
    assert requests_by_method(h, CHANNEL) == {"GET": 2}  # the closed one, and the one after it
    h.request("GET", f"/v1/runs/{rid}", expect=200)


def test_a_channel_that_cannot_be_opened_leaves_the_worker_on_http(
        h: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    register = Worker.register

    async def behind_a_proxy(self: Worker) -> None:  # the upgrade is refused
        await register(self)
        await self.leasing.offer("/v1/no-such-channel")

    monkeypatch.setattr(Worker, "register", behind_a_proxy)
    rid = new_run(h)
    worker = real_worker_steps(h, rid, 3)
    assert worker.tasks_done == 3
    assert "no worker channel" in capsys.readouterr().err
    assert requests_by_method(h, LEASE) == {"POST": 1}
    assert requests_by_method(h, RESULT) == {"POST": 3}


def test_no_channel_is_opened_when_the_worker_is_told_not_to(h: Harness):
    rid = new_run(h)
    worker = real_worker_steps(h, rid, 3, channel=False)
    assert worker.tasks_done == 3
    assert requests_by_method(h, CHANNEL) == {}
    assert requests_by_method(h, LEASE) == {"POST": 1}
    assert requests_by_method(h, RESULT) == {"POST": 3}


def test_pings_keep_an_idle_channel_open_both_ways(h: Harness, monkeypatch: pytest.MonkeyPatch):
    """Each side pings every HEARTBEAT_S and answers the other's pings while
    the worker computes or idles (both read all the time): a quiet channel
    stays open; a peer that stopped answering would be closed in 1.5x."""
    from rewardsignal.coordinator.api import channel as coordinator_channel

    monkeypatch.setattr(coordinator_channel, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(worker_channel, "HEARTBEAT_S", 0.1)
    rid = new_run(h)

    async def idle(i: int) -> None:
        if i == 0:
            await asyncio.sleep(1.0)  # ten pings each way, none unanswered

    worker = real_worker_steps(h, rid, 3, between=idle)
    assert worker.tasks_done == 3
    assert requests_by_method(h, CHANNEL) == {"GET": 1}  # the same channel throughout
    assert requests_by_method(h, LEASE) == {"WS": 1}


def test_a_result_too_big_for_the_channel_goes_as_a_request(
        h: Harness, monkeypatch: pytest.MonkeyPatch):
    from rewardsignal import protocol

    monkeypatch.setattr(protocol, "CHANNEL_MAX_BODY_BYTES", 100)  # every result is too big
    rid = new_run(h)
    worker = real_worker_steps(h, rid, 3)
    assert worker.tasks_done == 3
    assert requests_by_method(h, LEASE) == {"WS": 1}  # the channel still leases
    assert requests_by_method(h, RESULT) == {"POST": 3}
