"""``rewardsignal.tracing``: marks written per process when SIGNAL_TRACE names a
folder, read back merged in time order; nothing written when it does not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from rewardsignal import tracing
from rewardsignal.sdk.transport import _traced

_CHILD = textwrap.dedent("""
    import threading
    from rewardsignal import tracing

    tracing.mark("child: first")
    t = threading.Thread(target=tracing.mark, args=("child: in a thread",))
    t.start(); t.join()
    sum(range(200_000))  # some CPU for the thread's clock
    tracing.mark("child: last, with spaces")
""")


def test_marks_of_several_processes_read_back_in_time_order(tmp_path):
    env = {**os.environ, tracing.ENV: str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True)
    files = sorted(tmp_path.glob("*.trace"))
    assert len(files) == 2
    pids = sorted(int(f.stem) for f in files)
    # A file cut short by a kill: its partial last line is skipped.
    with open(files[0], "a") as f:
        f.write("12345 67")
    marks = tracing.read(tmp_path)
    assert [m.name for m in marks] == ["child: first", "child: in a thread",
                                       "child: last, with spaces"] * 2
    assert [m.t_ns for m in marks] == sorted(m.t_ns for m in marks)
    assert sorted({m.pid for m in marks}) == pids
    first, in_thread, last = marks[:3]
    assert in_thread.thread != first.thread == last.thread
    assert last.cpu_ns > first.cpu_ns  # the thread's own clock moved


def test_a_mark_never_raises(tmp_path):
    """A folder not there yet is made; one that cannot be written turns tracing
    off in that process, with one line on stderr, and the process goes on."""
    missing = tmp_path / "not" / "yet"
    subprocess.run([sys.executable, "-c", _CHILD], check=True,
                   env={**os.environ, tracing.ENV: str(missing)})
    assert len(tracing.read(missing)) == 3
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD + "tracing.flush()\nprint('went on', tracing.enabled())"],
        env={**os.environ, tracing.ENV: str(blocker / "under")}, capture_output=True,
        text=True, check=True)
    assert done.stdout.strip() == "went on False"
    assert done.stderr.count("tracing to") == 1 and "stopped" in done.stderr
    # Not even with no stderr to say so on.
    mute = "import sys\nsys.stderr.close()\n" + _CHILD + "print('went on')"
    done = subprocess.run([sys.executable, "-c", mute], capture_output=True, text=True,
                          env={**os.environ, tracing.ENV: str(blocker / "under")}, check=True)
    assert done.stdout.strip() == "went on"


def test_an_sdk_call_is_named_by_its_route_not_its_ids():
    assert _traced("POST", "/v1/runs/run-3f2a/requests") == "POST /v1/runs/{id}/requests"
    assert _traced("GET", "/v1/requests/req-9?timeout_s=5") == "GET /v1/requests/{id}"
    assert _traced("GET", "/healthz") == "GET /healthz"
