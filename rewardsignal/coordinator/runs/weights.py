"""Each run's newest adapter files, kept in memory as the bytes a weight download
serves, and the exact delta from each version to the next (``protocol.xor_delta``).

They serve two things: a version whose checkpoint is still being written in the
background is served from here (its file is not on disk yet), and a worker that
holds version v gets v+1 as a delta inside its lease instead of downloading the
whole adapter. A worker further behind falls back to the full, cacheable URL.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from rewardsignal.protocol import xor_delta

# Versions kept per run: the current one, the one before (the delta's base for
# workers that kept up) and one spare for a version still being written.
KEEP_VERSIONS = 3
# Runs whose files are kept (the most recently committed ones), and the bytes
# all of them may take; the run committed last is kept whatever its size.
KEEP_RUNS = 64
KEEP_BYTES = 1 << 30


class RecentWeights:
    def __init__(self, keep_versions: int = KEEP_VERSIONS, keep_runs: int = KEEP_RUNS,
                 keep_bytes: int = KEEP_BYTES) -> None:
        self.keep_versions = keep_versions
        self.keep_runs = keep_runs
        self.keep_bytes = keep_bytes
        self.bytes = 0
        self._files: OrderedDict[str, OrderedDict[int, bytes]] = OrderedDict()
        # (run_id, to_version) -> the delta from to_version - 1, being computed
        # in a thread (off the step's path) or done
        self._deltas: dict[tuple[str, int], asyncio.Future[bytes | None]] = {}
        self._changed: asyncio.Future[None] | None = None

    def changed(self) -> asyncio.Future[None]:
        """Done at the next ``announce`` (a version committed, the run at it):
        what streamed leases wait on to push it. Shared by every waiter; never
        cancel it."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def put(self, run_id: str, version: int, data: bytes, *, delta: bool = True,
            made: bytes | None = None) -> None:
        """Keep ``data`` (the adapter file of ``version``) and its delta from the
        version before (when held): ``made`` by the caller, or computed in a
        thread from now on. The oldest beyond the limits are dropped. Call on
        the event loop."""
        files = self._files.setdefault(run_id, OrderedDict())
        self._files.move_to_end(run_id)
        prev = files.get(version - 1)
        self.bytes += len(data) - len(files.get(version, b""))
        files[version] = data
        if delta and prev is not None:
            if made is not None:
                done = asyncio.get_running_loop().create_future()
                done.set_result(made)
                self._deltas[(run_id, version)] = done
            else:
                self._deltas[(run_id, version)] = asyncio.create_task(
                    asyncio.to_thread(xor_delta, prev, data))
        while len(files) > self.keep_versions:
            old, gone_data = files.popitem(last=False)
            self.bytes -= len(gone_data)
            self._deltas.pop((run_id, old), None)
        while len(self._files) > 1 and (len(self._files) > self.keep_runs
                                        or self.bytes > self.keep_bytes):
            gone, versions = self._files.popitem(last=False)
            for v, gone_data in versions.items():
                self.bytes -= len(gone_data)
                self._deltas.pop((gone, v), None)

    def announce(self) -> None:
        """A version was committed and its run is at it: wake the waiters."""
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def forget(self, run_id: str) -> None:
        """Drop a deleted run's files and deltas."""
        for v, data in self._files.pop(run_id, {}).items():
            self.bytes -= len(data)
            self._deltas.pop((run_id, v), None)

    def file(self, run_id: str, version: int) -> bytes | None:
        files = self._files.get(run_id)
        return files.get(version) if files is not None else None

    async def delta(self, run_id: str, from_version: int, to_version: int) -> bytes | None:
        """The exact delta taking ``from_version`` to ``to_version``, when the
        worker is one version behind and it is still held; else None."""
        task = self._deltas.get((run_id, to_version)) if to_version == from_version + 1 else None
        return await task if task is not None else None
