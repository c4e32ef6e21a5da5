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
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
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
        while (chunk := await queue.get()) is not _END:
            yield chunk  # type: ignore[misc]
    finally:
        stop.set()
