"""The live dashboard in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil

import pytest
from apphelpers import FakeWorker, Harness, fake_step

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("SIGNAL_REQUIRE_BROWSER"):
    raise RuntimeError("SIGNAL_REQUIRE_BROWSER is set but chromium is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed "
                                "(.ci/run installs Debian's chromium)")


def _browse(h: Harness, path: str, tmp_path, *extra: str) -> str:
    """Load ``path`` in headless chromium while the app serves, return the DOM."""
    url = str(h.client.make_url(path))

    async def go() -> str:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
            "--virtual-time-budget=8000", *extra, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
        return out.decode()

    return h.call(go())


def test_dashboard_shows_the_run_and_its_loss_curve(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           expect=201)
        worker = FakeWorker(h, "browser-test-gpu")
        for i in range(3):
            fake_step(h, worker, run["run_id"], loss_sum=3.0 - i)
        dom = _browse(h, "/", tmp_path, "--dump-dom")
        assert f'id="run-{run["run_id"]}"' in dom, dom[:2000]
        m = re.search(r'data-points="(\d+)"', dom)
        assert m and int(m.group(1)) == 3, dom[:3000]
        assert len(re.findall(r'class="pt pt-train"', dom)) == 3
        assert "browser-test-gpu" in dom and "version 3" in dom
        # Its verification record: alone, it could not be checked, so still on probation.
        assert 'class="rep rep-probation"' in dom and "probation (0 agreed)" in dom
        assert 'id="error"></span>' in dom  # no error shown
    finally:
        h.close()


def test_dashboard_asks_for_a_key_when_required(tmp_path):
    h = Harness(tmp_path / "data", api_keys=("sk-1",), worker_tokens=("wt",))
    try:
        dom = _browse(h, "/", tmp_path, "--dump-dom")
        assert "missing API key" in dom
    finally:
        h.close()


def test_a_one_step_run_has_honest_axes_and_shows_its_state(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           expect=201)
        worker = FakeWorker(h, "browser-test-gpu")
        fake_step(h, worker, run["run_id"], loss_sum=3.0, weight_sum=2.0)
        dom = _browse(h, "/", tmp_path, "--dump-dom")
        labels = re.findall(r'<text[^>]*class="axis"[^>]*>([^<]*)</text>', dom)
        # One point: its loss once (not as both ends of the axis) and its own version.
        assert labels == ["1.500", "v1"], labels
        assert '<span class="state">idle</span>' in dom
        _, req = h.request("POST", f"/v1/runs/{run['run_id']}/forward_backward",
                           json={"batch": [{"text": "hello"}]}, expect=202)
        task = worker.lease()
        lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
        code, _ = worker.submit(task, codec="fp32", tensors=_grads(h, run["run_id"]),
                                result={"loss_sum": 1.0, "weight_sum": 2.0, "logprobs": lp})
        assert code == 200
        h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)
        dom = _browse(h, "/", tmp_path, "--dump-dom")
        assert "accumulating (1 forward_backward)" in dom
        assert "Federated jobs" in dom
    finally:
        h.close()


def _grads(h: Harness, run_id: str) -> bytes:
    import torch

    from rewardsignal.protocol import tensors_to_bytes

    return tensors_to_bytes({k: torch.full(s, 0.01)
                             for k, s in h.coordinator.runs[run_id].shapes.items()})
