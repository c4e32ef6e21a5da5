"""Admission for generation requests: a few run at once, a bounded number wait, the rest are
told when to come back (429 + ``Retry-After``), as ``/ml/train`` does with jobs.

A waiting request waits on the event loop (a future), never in a thread: threads are what the
cheap routes (``/health``, ``/metrics``, the model list) and the running generations need, and
a flood of requests each blocking a thread on a model's lock once starved the one request that
held it of the thread its next step needed, hanging the whole server. A request whose client
leaves while it waits gives its place up; one whose client leaves while it runs is cancelled
between two tokens (``Cancellation``). On shutdown waiters are refused and running
generations cancelled, so the server stops within seconds whatever is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request

from ml_engine.server.errors import ApiError

SHUTTING_DOWN = "the server is shutting down; retry against its next start"


class Cancellation:
    """A thread-safe "stop this generation" shared by the request and the code running it:
    callbacks registered after the cancel run at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.cancelled = False
        self.reason = ""

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled:
                self._callbacks.append(callback)
                return
        callback()

    def check(self) -> None:
        """Raise what a request cancelled before its generation started is answered with."""
        if self.cancelled:
            if self.reason == SHUTTING_DOWN:
                raise ApiError(503, SHUTTING_DOWN, code="shutting_down")
            raise ClientGone()

    def cancel(self, reason: str = "the client went away") -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled, self.reason = True, reason
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class ClientGone(ApiError):
    """The client left before its generation started: nothing is generated, and the answer
    (nginx's 499, "client closed request") reaches nobody; it is counted in /metrics."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the request", code="client_closed_request")


class Slot:
    """A running generation's place; ``release`` (idempotent, any thread) hands it on."""

    def __init__(self, queue: GenerationQueue) -> None:
        self._queue, self._released = queue, False
        self._lock = threading.Lock()
        self.cancellation = Cancellation()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._queue._release(self)


class GenerationQueue:
    def __init__(self, max_running: int, max_waiting: int, retry_after_s: int) -> None:
        self.max_running, self.max_waiting = max(1, max_running), max(0, max_waiting)
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._running: set[Slot] = set()
        self._waiting: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[Slot]]] = deque()
        self._closed = False

    def counts(self) -> tuple[int, int]:
        """Generations running, requests waiting."""
        with self._lock:
            return len(self._running), len(self._waiting)

    def check_room(self) -> None:
        """The 429 (or 503) ``enter`` would give, raised before any other work on a request:
        under a flood, refusals are what the server spends its time on."""
        with self._lock:
            if self._closed:
                raise ApiError(503, SHUTTING_DOWN, code="shutting_down")
            full = len(self._running) >= self.max_running
            if full and len(self._waiting) >= self.max_waiting:
                raise self._full()

    async def enter(self, request: Request | None = None) -> Slot:
        """A slot, at once or after waiting in line; 429 when the line is full, 503 while
        shutting down, ``ClientGone`` when ``request``'s client leaves while waiting."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise ApiError(503, SHUTTING_DOWN, code="shutting_down")
            if len(self._running) < self.max_running:
                slot = Slot(self)
                self._running.add(slot)
                return slot
            if len(self._waiting) >= self.max_waiting:
                raise self._full()
            waiter: asyncio.Future[Slot] = loop.create_future()
            self._waiting.append((loop, waiter))
        try:
            if request is not None and await _client_left_first(request, waiter):
                waiter.cancel()
                raise ClientGone()
            return await waiter
        except BaseException:
            self._withdraw(loop, waiter)
            raise

    def _full(self) -> ApiError:
        return ApiError(
            429,
            f"{self.max_running} generation(s) running and {self.max_waiting} waiting, the most "
            f"this server queues (llm.max_running, llm.max_queued); retry in "
            f"{self.retry_after_s} s",
            headers={"Retry-After": str(self.retry_after_s)},
            code="queue_full",
        )

    def _withdraw(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Slot]) -> None:
        """A waiter that stops waiting: out of the line, or, when a slot was already handed to
        it, that slot handed on."""
        with self._lock, contextlib.suppress(ValueError):
            self._waiting.remove((loop, waiter))
            return
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            waiter.result().release()

    def _release(self, slot: Slot) -> None:
        with self._lock:
            self._running.discard(slot)
            while self._waiting and not self._closed:
                loop, waiter = self._waiting.popleft()
                successor = Slot(self)
                self._running.add(successor)
                try:
                    loop.call_soon_threadsafe(self._grant, waiter, successor)
                    return
                except RuntimeError:  # that request's event loop is gone
                    self._running.discard(successor)

    @staticmethod
    def _grant(waiter: asyncio.Future[Slot], slot: Slot) -> None:
        if waiter.done():  # its client left in the meantime: the next in line gets the slot
            slot.release()
        else:
            waiter.set_result(slot)

    def close(self) -> None:
        """Shutting down: refuse what waits and what comes, cancel what runs."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            running = list(self._running)
        for loop, waiter in waiting:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_refuse, waiter)
        for slot in running:
            slot.cancellation.cancel(SHUTTING_DOWN)


def _refuse(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(ApiError(503, SHUTTING_DOWN, code="shutting_down"))


@contextlib.asynccontextmanager
async def client_watch(request: Request) -> AsyncIterator[asyncio.Event]:
    """An event set when the client disconnects, for as long as the block runs.

    The request's body has been read by then, so the next ASGI message is the disconnect."""
    gone = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return

    task = asyncio.ensure_future(watch())
    try:
        yield gone
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def run_until_gone(
    request: Request, work: Callable[[], Any], cancellation: Cancellation
) -> Any:
    """``work()`` in a thread; when the client leaves first, ``cancellation`` is cancelled
    (the generation stops between two tokens) and the thread's result still awaited, so the
    model is given back before the request ends."""
    from starlette.concurrency import run_in_threadpool

    job = asyncio.ensure_future(run_in_threadpool(work))
    if await _client_left_first(request, job):
        cancellation.cancel()
    return await asyncio.shield(job)


async def _client_left_first(request: Request, pending: asyncio.Future[Any]) -> bool:
    """Wait for ``pending`` or the client's leaving, whichever comes first; whether the client
    left before ``pending`` was done."""
    async with client_watch(request) as gone:
        left = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({pending, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
    return not pending.done()
