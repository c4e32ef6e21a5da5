"""The server's side of a model worker (``llm_worker``): spawn it, load, generate, cancel.

A worker that dies (llama.cpp aborting on a corrupt file, the kernel's OOM killer) raises
``WorkerCrashed`` naming the file, the signal and llama.cpp's last log line; the server answers
that request with a 502 and drops the worker, the next request starts a fresh one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm.isolation import describe_exit, worker_env

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# lines that say why llama.cpp gave up, in order of preference over the last line of the log
_REASONS = (re.compile(r"GGML_ASSERT\(.*"), re.compile(r"terminate called.*"))
_REASONS += (re.compile(r"what\(\):.*"), re.compile(r".*error.*", re.IGNORECASE))


class WorkerCrashed(Exception):
    """The worker process died: an upstream failure (502), not the client's mistake."""


class WorkerTimedOut(WorkerCrashed):
    """The worker stopped answering within the server's ``llm.worker_timeout_s`` and was
    killed: a gateway timeout (504)."""


class WorkerFailed(Exception):
    """The worker answered with an unexpected error (a bug, not the client's mistake)."""


def crash_reason(log_path: Path) -> str:
    """llama.cpp's last words: a GGML_ASSERT or C++ exception line when there is one, else
    the log's last line; a source path is cut to its file name."""
    try:
        with log_path.open("rb") as log:
            log.seek(max(0, log_path.stat().st_size - 65536))
            lines = [ln.strip() for ln in log.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    for pattern in _REASONS:
        for line in reversed(lines):
            if pattern.search(line):
                return re.sub(r"\S*/(?=[^/\s]+:\d+:)", "", line)[:300]
    return lines[-1][:300] if lines else ""


class LlmProcess:
    """One worker process holding one loaded model; callers serialize requests to it."""

    name = "llama_cpp"

    def __init__(
        self,
        llm: dict[str, Any],
        models_dir: Path,
        log_path: Path,
        label: str,
        timeout_s: float | None = None,
        stream_interval_ms: float = 0.0,
    ) -> None:
        self.label, self.log_path, self.timeout_s = label, log_path, timeout_s
        self.stream_interval_ms = stream_interval_ms
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = worker_env()
        env["GGML_NO_BACKTRACE"] = "1"  # ggml would attach gdb to print a backtrace on abort
        with log_path.open("ab") as log:
            # written before the worker starts: a full disk is then a refusal naming the folder
            # (the caller's 507), not a worker that dies with nowhere to say why
            try:
                log.write(f"model worker for {label}\n".encode())
                log.flush()
            except OSError:
                log_path.unlink(missing_ok=True)
                raise
            self._child = subprocess.Popen(
                [sys.executable, "-m", "ml_engine.server.llm_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                bufsize=0,  # lines are read with a deadline (select), never from a buffer
            )
        self.pid = self._child.pid
        self._unread = bytearray()
        self._write_lock = threading.Lock()
        # llama.cpp's own log lines go to the log (verbose), never to the protocol
        llm = {**llm, "backend": {**llm["backend"], "verbose": True}}
        try:
            # unbounded: a load may first write or quantize the file (minutes for a 7B model)
            self.send({"op": "load", "llm": llm, "models_dir": str(models_dir)})
            reply = self.receive(bounded=False)
        except BaseException:
            self.close()
            raise
        self.n_ctx: int = reply["n_ctx"]
        self.facts: dict[str, Any] = reply["describe"]
        self.load_s = float(self.facts.get("load_s") or 0.0)

    # ---- the pipes

    def send(self, message: dict[str, Any]) -> None:
        with self._write_lock:  # a cancel may come from another thread than the request
            try:
                self._child.stdin.write(json.dumps(message).encode() + b"\n")
                self._child.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # dead: the next read says how it died

    def receive(self, bounded: bool = True) -> dict[str, Any]:
        """The worker's next message; when ``bounded``, silence past the server's
        ``llm.worker_timeout_s`` kills it as hung."""
        message = json.loads(self._read_line(self.timeout_s if bounded else None))
        if "error" in message:
            error = message["error"]
            if message.get("no_space"):
                from ml_engine.server.errors import StorageFull

                raise StorageFull(message["no_space"], "the model worker's files")
            raise UserError(error) if message.get("user") else WorkerFailed(error)
        return message

    def _read_line(self, timeout_s: float | None) -> bytes:
        """The worker's next line; EOF is a crash, silence past ``timeout_s`` a hang."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        fd = self._child.stdout.fileno()
        while (end := self._unread.find(b"\n")) < 0:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                raise self._hung(timeout_s)
            chunk = os.read(fd, 65536)
            if not chunk:
                raise self._crashed()
            self._unread += chunk
        line = bytes(self._unread[: end + 1])
        del self._unread[: end + 1]
        return line

    def _hung(self, timeout_s: float | None) -> WorkerTimedOut:
        self._child.kill()
        self._child.wait()
        return WorkerTimedOut(
            f"the model worker for {self.label} did not answer within {timeout_s:g} s "
            "(llm.worker_timeout_s) and was killed"
        )

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.receive()

    def _crashed(self) -> WorkerCrashed:
        try:
            code = self._child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._child.kill()
            code = self._child.wait()
        how = describe_exit(code)
        reason = crash_reason(self.log_path)
        detail = f": {reason}" if reason else ""
        return WorkerCrashed(f"the model worker for {self.label} {how}{detail}")

    def alive(self) -> bool:
        return self._child.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the worker (its model's pages included), 0 when unknown."""
        try:
            return int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            return 0

    # ---- generation

    def stream(self, prompt: str | None = None, **options: Any) -> ProcessStream:
        """Pieces of text as the worker produces them; ``close()`` cancels the generation.

        ``options``: the sampling fields, and ``mode`` ("engine": the model's chat_template
        setting; "raw"; "chat" with ``messages``) and ``n_ctx`` (the context the request
        asked for: a larger loaded one serves it as if it were that size)."""
        return ProcessStream(self, prompt, options, stream=True)

    def complete(self, prompt: str, cancel: Any = None, **options: Any) -> dict[str, Any]:
        """The whole completion; ``cancel`` (a ``Cancellation``) stops it between two tokens
        from another thread (its client went away)."""
        generation = ProcessStream(self, prompt, options, stream=False)
        if cancel is not None:
            cancel.on_cancel(generation.cancel)
        done = generation.finish()
        return {
            "text": done["text"],
            "prompt_tokens": done["prompt_tokens"],
            "completion_tokens": done["completion_tokens"],
            "finish_reason": done["finish_reason"],
            "timings": {**done["timings"], "load_s": self.load_s},
        }

    def describe(self) -> dict[str, Any]:
        return dict(self.facts)

    # ---- embeddings and tokens (llm_worker_ops)

    def embed(self, inputs: list[str | list[int]], n_ctx: int | None = None) -> dict[str, Any]:
        """Unit-length mean-pooled vectors of ``inputs`` (texts or token-id lists)."""
        return self.call({"op": "embed", "input": inputs, "n_ctx": n_ctx})

    def tokenize(
        self, content: str, add_special: bool, parse_special: bool, with_pieces: bool
    ) -> dict[str, Any]:
        return self.call(
            {
                "op": "tokenize",
                "content": content,
                "add_special": add_special,
                "parse_special": parse_special,
                "with_pieces": with_pieces,
            }
        )

    def detokenize(self, tokens: list[int]) -> dict[str, Any]:
        return self.call({"op": "detokenize", "tokens": tokens})

    def kill(self) -> None:
        """End the worker now, whatever it is doing: a request reading from it sees a crash."""
        with contextlib.suppress(OSError):
            self._child.kill()

    def close(self) -> None:
        """Ask the worker to exit; kill it when it does not."""
        if self._child.poll() is None:
            self.send({"op": "exit"})
            try:
                self._child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        for pipe in (self._child.stdin, self._child.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        if self._child.returncode == 0:  # a crashed worker's log stays, for its reason
            self.log_path.unlink(missing_ok=True)


_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "repeat_penalty", "seed")


class ProcessStream:
    """One generation in a worker. Creating it sends the request and reads the worker's
    ``start`` (so a prompt the model cannot take fails before any answer is sent);
    ``start`` then holds the prompt's token count and the chat template used, ``stats`` the
    counts once finished."""

    def __init__(
        self, process: LlmProcess, prompt: str | None, options: dict[str, Any], stream: bool
    ) -> None:
        self._process, self._finished = process, False
        # a cancel from another thread is written only while this generation runs: one sent
        # after its end could stop the next request's generation on the same worker
        self._state_lock = threading.Lock()
        self._pieces: deque[str] = deque()  # of a message holding several
        self.stats: dict[str, Any] | None = None
        # per generated token, when ``top_logprobs`` was asked for: as the pieces arrive
        self.logprobs: list[dict[str, Any]] = []
        request = {
            "op": "generate",
            "mode": options.get("mode", "engine"),
            "prompt": prompt,
            "messages": options.get("messages"),
            "n_ctx": options.get("n_ctx"),
            "sampling": {name: options[name] for name in _SAMPLING if name in options},
            "stream": stream,
            "stream_interval_ms": process.stream_interval_ms,
            "top_logprobs": options.get("top_logprobs"),
            # structured output and tools (llm/structured.py, llm/chat_tools.py)
            "grammar": options.get("grammar"),
            "tools": options.get("tools"),
            "tool_chat": options.get("tool_chat", False),
        }
        try:
            self.start = process.call(request)
        except BaseException:
            self._finished = True
            raise

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._pieces:
            return self._pieces.popleft()
        if self._finished:
            raise StopIteration
        try:
            message = self._process.receive()
        except BaseException:
            with self._state_lock:
                self._finished = True
            raise
        self.logprobs.extend(message.get("lp") or message.get("logprobs") or ())
        if "t" in message:
            return message["t"]
        if "ts" in message:
            self._pieces.extend(message["ts"][1:])
            return message["ts"][0]
        with self._state_lock:
            self._finished, self.stats = True, message
        raise StopIteration

    def finish(self) -> dict[str, Any]:
        """Read to the end; the ``done`` message."""
        for _ in self:
            pass
        assert self.stats is not None
        return self.stats

    def cancel(self) -> None:
        """Ask the worker to stop between two tokens (any thread); the reader then gets the
        ``done`` message with ``finish_reason: cancelled``."""
        with self._state_lock:
            if not self._finished:
                self._process.send({"op": "cancel"})

    def close(self) -> None:
        """Stop the generation between two tokens and wait for the worker to be free again."""
        if self._finished:
            return
        self.cancel()
        # the request is over either way; a crash is seen by the server when the model is
        # given back (the worker is dropped)
        with contextlib.suppress(UserError, WorkerFailed, WorkerCrashed):
            self.finish()
