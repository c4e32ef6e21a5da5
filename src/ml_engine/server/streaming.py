"""Server-sent events from a blocking iterator: the model's token loop runs in a thread of its
own and hands its chunks to the event loop through a queue."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator

_END = object()


class _Pipe:
    """What the producing thread and the event loop share. The thread holds this, never the
    relay, so that a relay dropped unread (its response never sent) is collected and stops the
    thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # chunks waiting for the event loop; it is woken once per batch, not once per chunk,
        # and sends what has piled up in one write (a small model makes tokens faster than a
        # wake-up and a socket write each cost)
        self.pending: list[object] = []
        self.lock = threading.Lock()
        self.ready = asyncio.Event()
        self.stop = threading.Event()

    def put(self, item: object) -> None:
        with self.lock:
            self.pending.append(item)
            first = len(self.pending) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:  # the event loop is gone (server shutting down)
                self.stop.set()


def _produce(
    pipe: _Pipe,
    chunks: Iterator[bytes],
    on_error: Callable[[Exception], bytes],
    on_close: Callable[[], None],
) -> None:
    try:
        for chunk in chunks:
            pipe.put(chunk)
            if pipe.stop.is_set():
                return
    except Exception as exc:
        pipe.put(on_error(exc))
    finally:
        on_close()
        pipe.put(_END)


class ThreadRelay:
    """An async iterator over ``chunks``, produced by a thread started at once.

    An exception ends the stream with ``on_error``'s chunk; ``on_close`` runs in the thread once
    it stops, for whatever reason. When the client goes away (the iteration is closed, or the
    relay is dropped without ever being read) the thread stops at its next chunk and
    ``on_abandon`` runs at once, so that a generation waiting on its model stops between two
    tokens and the model's lock is released for the next request."""

    def __init__(
        self,
        chunks: Iterator[bytes],
        *,
        on_error: Callable[[Exception], bytes],
        on_close: Callable[[], None],
        name: str,
        on_abandon: Callable[[], None] | None = None,
    ) -> None:
        self._pipe = _Pipe(asyncio.get_running_loop())
        self._on_abandon = on_abandon
        self._ended = False
        args = (self._pipe, chunks, on_error, on_close)
        threading.Thread(target=_produce, args=args, name=name, daemon=True).start()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        pipe = self._pipe
        try:
            while True:
                await pipe.ready.wait()
                with pipe.lock:
                    items, pipe.pending[:] = pipe.pending[:], []
                    pipe.ready.clear()
                ended = _END in items
                data = b"".join(item for item in items if item is not _END)  # type: ignore[misc]
                if data:
                    yield data
                if ended:
                    self._ended = True
                    return
        finally:
            self._abandon()

    def _abandon(self) -> None:
        if self._ended or self._pipe.stop.is_set():
            return
        self._pipe.stop.set()
        if self._on_abandon is not None:
            with contextlib.suppress(Exception):
                self._on_abandon()

    def __del__(self) -> None:
        self._abandon()


def relay_in_thread(
    chunks: Iterator[bytes],
    *,
    on_error: Callable[[Exception], bytes],
    on_close: Callable[[], None],
    name: str,
    on_abandon: Callable[[], None] | None = None,
) -> ThreadRelay:
    """``chunks`` relayed from a thread of their own (see ``ThreadRelay``)."""
    return ThreadRelay(
        chunks, on_error=on_error, on_close=on_close, name=name, on_abandon=on_abandon
    )
