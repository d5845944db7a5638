"""A TCP proxy on 127.0.0.1 that delays every byte by a fixed time each way,
to stand in for a worker far from its coordinator (no bandwidth limit, no loss).

Runs its own event loop in a daemon thread; ``DelayProxy(target_port, 0.05)``
listens on ``proxy.port`` and forwards to 127.0.0.1:target_port.
"""

from __future__ import annotations

import asyncio
import threading
import time

_CHUNK_BYTES = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    """Forward what ``reader`` gets to ``writer``, each chunk ``delay_s`` after it
    arrived, in order (a queue, so a big body is not serialised behind sleeps)."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait_s = due - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(_CHUNK_BYTES)
            queue.put_nowait((time.monotonic() + delay_s, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
        writer.close()


class DelayProxy:
    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True,
                                       name="delay-proxy")
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("the delay proxy did not start")

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_w, self.delay_s),
                             _pump(up_r, writer, self.delay_s), return_exceptions=True)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
