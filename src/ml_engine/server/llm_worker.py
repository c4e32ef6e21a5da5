"""A model worker: one llama.cpp model loaded in its own interpreter, for the server.

``python -m ml_engine.server.llm_worker``, started by ``llm_process.LlmProcess``. llama.cpp
aborts the process on some corrupt files (a ``GGML_ASSERT`` on ``llama.block_count=0``, say);
here that ends only this worker, and the server answers the request that caused it.

Protocol: JSON lines. Requests come on stdin: ``load``, ``generate``, ``cancel`` (between two
tokens of a generation; ignored when idle), ``embed``, ``tokenize``, ``detokenize``
(``llm_worker_ops``). Replies go to the protocol channel, the process's
original stdout; fd 1 and 2 are then pointed at the worker's log, so that llama.cpp's own
prints can never corrupt the protocol and its last words are in the log when it dies.

A generation answers ``{"start": ...}`` (prompt tokens, chat template used), then
``{"t": piece}`` per text piece when streamed (with ``"lp"``, the tokens' log-probabilities,
when ``top_logprobs`` is asked for), then ``{"done": ...}`` with the counts; any
step may answer ``{"error": message, "user": bool}`` instead.
"""

from __future__ import annotations

import codecs
import errno
import json
import math
import os
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.run.helpers import error_summary, finite_or_none
from ml_engine.server.llm_worker_ops import OPS


class Requests:
    """JSON lines from fd 0, read unbuffered so that a waiting ``cancel`` is seen by select."""

    def __init__(self, fd: int = 0) -> None:
        self.fd, self._buffer = fd, b""

    def _line(self) -> dict[str, Any] | None:
        line, newline, rest = self._buffer.partition(b"\n")
        if not newline:
            return None
        self._buffer = rest
        return json.loads(line)

    def next(self, block: bool = True) -> dict[str, Any] | None:
        """The next request; None when none is waiting (``block=False``) or stdin closed."""
        while (request := self._line()) is None:
            if not block and not select.select([self.fd], [], [], 0)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None if not block else {"op": "exit"}
            self._buffer += chunk
        return request


class Worker:
    def __init__(self, out_fd: int, requests: Requests) -> None:
        self.out_fd, self.requests = out_fd, requests
        self.backend: Any = None
        self._record: Any = None  # the generation running, whose logprobs ride with pieces
        self._logprobs_sent = 0

    def send(self, message: dict[str, Any]) -> None:
        # one unbuffered write per message: a piece reaches the server as soon as it exists
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.out_fd, data) :]

    def load(self, request: dict[str, Any]) -> None:
        from ml_engine.llm.backends import open_backend
        from ml_engine.llm.backends.llama_cpp import capture_llama_logs

        capture_llama_logs(echo=True)  # llama.cpp's lines into the log, for a crash report
        self.backend = open_backend(request["llm"], Path(request["models_dir"]))
        facts = self.backend.describe()
        self.send({"ok": True, "n_ctx": self.backend.n_ctx, "describe": facts})

    def _prompt_ids(self, request: dict[str, Any], limit: int) -> tuple[list[int], str]:
        backend, mode = self.backend, request["mode"]
        template = backend.chat_template_status
        if mode == "chat" and request.get("tool_chat"):  # tools, calls or their results
            from ml_engine.llm.chat_tools import tool_chat_prompt

            text, template = tool_chat_prompt(backend, request["messages"], request.get("tools"))
            ids = backend.tokenize(text, special=True)
        elif mode == "chat":
            messages = [(m["role"], m["content"]) for m in request["messages"]]
            text, template = backend.apply_chat_template(messages)
            ids = backend.tokenize(text, special=True)
        elif mode == "raw":  # an OpenAI completion: the prompt exactly as given
            ids, template = backend.tokenize(request["prompt"]), "off"
        else:  # /llm/generate: the model's chat_template setting decides
            ids = backend.prompt_tokens(request["prompt"])
        if len(ids) >= limit:
            raise UserError(
                f"the prompt has {len(ids)} tokens but the context holds {limit} "
                f"(n_ctx={limit}); raise n_ctx or shorten the prompt"
            )
        return ids, template

    def generate(self, request: dict[str, Any]) -> None:
        from ml_engine.llm.backends.base import Generation, Sampling

        backend = self.backend
        # a context loaded larger than the request asked for serves it as if it were its size
        limit = min(backend.n_ctx, int(request.get("n_ctx") or backend.n_ctx))
        ids, template = self._prompt_ids(request, limit)
        sampling = Sampling(**request["sampling"])
        sampling = replace(sampling, max_tokens=min(sampling.max_tokens, limit - len(ids)))
        self.send({"start": True, "prompt_tokens": len(ids), "chat_template": template})
        record = Generation(load_s=backend.load_s, top_logprobs=request.get("top_logprobs"))
        self._record, self._logprobs_sent = record, 0
        tokens = backend.generate_ids(ids, sampling, record, grammar=request.get("grammar"))
        interval_s = float(request.get("stream_interval_ms") or 0.0) / 1000
        produced, cancelled = self._relay(tokens, bool(request.get("stream")), interval_s)
        done = {
            "done": True,
            "prompt_tokens": len(ids),
            "completion_tokens": len(produced),
            "finish_reason": "cancelled" if cancelled else record.finish_reason,
            "timings": {k: finite_or_none(v) for k, v in record.timings().items()},
        }
        if not request.get("stream"):
            done["text"] = backend.detokenize(produced)
        if record.top_logprobs is not None:  # those no piece message carried
            done["logprobs"] = record.logprobs[self._logprobs_sent :]
        self.send(done)

    def _relay(
        self, tokens: Iterator[int], stream: bool, interval_s: float = 0.0
    ) -> tuple[list[int], bool]:
        """Pass the tokens on as text pieces, the first at once, then the pieces made since
        the last message at most every ``interval_s`` (one message, ``{"ts": [...]}``, per
        interval instead of one per token: on a small machine each message wakes the server and
        the client on the cores llama.cpp decodes on). Stops at a ``cancel`` waiting between
        two tokens."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced: list[int] = []
        pieces: list[str] = []
        clock, sent_at = time.monotonic, -math.inf
        try:
            for token in tokens:
                produced.append(token)
                if stream and (text := decoder.decode(self.backend.piece(token))):
                    pieces.append(text)
                    if clock() - sent_at >= interval_s:
                        self._send_pieces(pieces)
                        sent_at = clock()
                waiting = self.requests.next(block=False)
                if waiting is not None and waiting.get("op") == "cancel":
                    self._send_pieces(pieces)
                    return produced, True
        finally:
            tokens.close()  # type: ignore[attr-defined]
        if stream and (tail := decoder.decode(b"", final=True)):
            pieces.append(tail)
        self._send_pieces(pieces)
        return produced, False

    def _send_pieces(self, pieces: list[str]) -> None:
        if pieces:
            message: dict[str, Any] = {"t": pieces[0]}
            if len(pieces) > 1:
                message = {"ts": list(pieces)}
            record = self._record
            if record is not None and record.top_logprobs is not None:
                # the log-probabilities of the tokens made since the last message ride with it
                message["lp"] = record.logprobs[self._logprobs_sent :]
                self._logprobs_sent = len(record.logprobs)
            self.send(message)
            pieces.clear()

    def serve(self) -> None:
        while True:
            request = self.requests.next()
            op = (request or {}).get("op", "exit")
            if op == "exit":
                return
            if op == "cancel":  # arrived after the generation it meant had ended
                continue
            try:
                if op == "load":
                    self.load(request)
                elif op == "generate":
                    self.generate(request)
                elif op in OPS:  # embeddings and tokens (llm_worker_ops.py)
                    self.send(OPS[op](self.backend, request))
                else:
                    self.send({"error": f"unknown op {op!r}", "user": False})
            except UserError as exc:
                self.send({"error": str(exc), "user": True})
            except Exception as exc:
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    # a model written on first use (the embedded one) into a full disk
                    where = Path(exc.filename).parent if exc.filename else "the models folder"
                    self.send({"error": str(exc), "user": False, "no_space": str(where)})
                    continue
                import traceback

                traceback.print_exc()
                self.send({"error": error_summary(exc), "user": False})


def main() -> None:
    # the protocol keeps the original stdout; everything printed from here on goes to the log
    protocol = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    Worker(protocol, Requests()).serve()


if __name__ == "__main__":
    main()
