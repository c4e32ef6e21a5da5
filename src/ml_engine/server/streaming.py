"""Server-sent events from a blocking iterator: the model's token loop runs in a thread of its
own and hands its chunks to the event loop through a queue."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator

_END = object()


async def relay_in_thread(
    chunks: Iterator[bytes],
    *,
    on_error: Callable[[Exception], bytes],
    on_close: Callable[[], None],
    name: str,
) -> AsyncIterator[bytes]:
    """Yield ``chunks`` as the thread produces them. An exception ends the stream with
    ``on_error``'s chunk; ``on_close`` runs in the thread once it stops, for whatever reason.
    When the client goes away the thread is told to stop at its next chunk, so the model's
    lock is released for the next request."""
    loop = asyncio.get_running_loop()
    # chunks waiting for the event loop; it is woken once per batch, not once per chunk, and
    # sends what has piled up in one write (a small model makes tokens faster than a wake-up
    # and a socket write each cost)
    pending: list[object] = []
    lock = threading.Lock()
    ready = asyncio.Event()
    stop = threading.Event()

    def put(item: object) -> None:
        with lock:
            pending.append(item)
            first = len(pending) == 1
        if first:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the event loop is gone (server shutting down)
                stop.set()

    def produce() -> None:
        try:
            for chunk in chunks:
                put(chunk)
                if stop.is_set():
                    return
        except Exception as exc:
            put(on_error(exc))
        finally:
            on_close()
            put(_END)

    threading.Thread(target=produce, name=name, daemon=True).start()
    try:
        while True:
            await ready.wait()
            with lock:
                items, pending[:] = pending[:], []
                ready.clear()
            ended = _END in items
            data = b"".join(item for item in items if item is not _END)  # type: ignore[misc]
            if data:
                yield data
            if ended:
                return
    finally:
        stop.set()
