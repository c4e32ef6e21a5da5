"""Model files the server meets in its folders (issue 23): only regular files that live in the
runs folder are served, one odd entry never breaks a model list, a file that is no readable GGUF
is refused saying what is wrong with it, and a chat template Jinja cannot parse refuses chats
with a 4xx while plain completions on that model keep working (through llama.cpp workers)."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ml_engine.llm.gguf_writer import (
    LlamaShape,
    byte_fallback_vocabulary,
    random_llama_tensors,
    write_llama_gguf,
    write_random_llama,
)
from ml_engine.run.files import write_json_atomic
from ml_engine.server import create_app
from tests.server.conftest import live_server, serve_config

SHAPE = LlamaShape(n_vocab=320, n_embd=64, n_ff=128, n_layer=1, n_head=2, n_head_kv=2, n_ctx=256)
# ChatML markers that llama.cpp's template detection recognises, in a template Jinja cannot
# parse (the last tag is never closed)
BROKEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor"
)
BROKEN = "Broken-Template"  # its general.name, made an API name
# entries of the runs folder the server must not serve, and the reason it logs for each
REFUSED = {
    "linked": "outside",
    "hardlinked": "hard links",
    "dirlinked": "outside",
    "fifo": "a FIFO, not a regular file",
    "folder": "a directory, not a regular file",
    "dangling": "a symbolic link to nothing",
}
# regular files that are no readable GGUF, and what the refusal of a request says
UNREADABLE = {
    "empty": "the file is empty",
    "not-gguf": "not a GGUF file (it starts with b'not '",
    "truncated": "truncated GGUF: its metadata runs past the end of its 2000 bytes",
    "version-9999": "GGUF version 9999; llama.cpp reads versions 2 and 3",
    "counts-2-62": f"counts {2**62} metadata entries",
}


def _unreadable_files(runs: Path, good: Path) -> None:
    data = good.read_bytes()
    # the header: magic (4 bytes), version (4), tensor count (8), metadata entry count (8)
    version, counts = bytearray(data), bytearray(data)
    version[4:8], counts[16:24] = struct.pack("<I", 9999), struct.pack("<Q", 2**62)
    contents = {
        "empty": b"",
        "not-gguf": b"not a gguf" * 20,
        # cut inside the vocabulary: the header's counts fit, its entries run off the end
        "truncated": data[:2000],
        "version-9999": bytes(version),
        "counts-2-62": bytes(counts),
    }
    for name, content in contents.items():
        (runs / name).mkdir()
        (runs / name / f"{name}.gguf").write_bytes(content)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs folder with one servable export, an alias of it that stays inside, links out of
    the folder, odd entries named *.gguf and files that are no readable GGUF."""
    root = tmp_path_factory.mktemp("files")
    elsewhere = write_random_llama(root / "elsewhere" / "secret.gguf", SHAPE, name="secret")
    write_random_llama(root / "elsewhere" / "run" / "dirlinked.gguf", SHAPE, name="x")
    runs = root / "runs"
    own = write_random_llama(runs / "a" / "own.gguf", SHAPE, name="x")
    for run in ("alias", "linked", "hardlinked", "fifo", "folder", "dangling"):
        (runs / run).mkdir()
    (runs / "alias" / "alias.gguf").symlink_to(own)
    (runs / "linked" / "linked.gguf").symlink_to(elsewhere)
    os.link(elsewhere, runs / "hardlinked" / "hardlinked.gguf")
    (runs / "dirlinked").symlink_to(root / "elsewhere" / "run", target_is_directory=True)
    os.mkfifo(runs / "fifo" / "fifo.gguf")
    (runs / "folder" / "folder.gguf").mkdir()
    (runs / "dangling" / "dangling.gguf").symlink_to(runs / "dangling" / "gone.gguf")
    _unreadable_files(runs, own)
    return runs


@pytest.fixture(scope="module")
def broken_template_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(
        tmp_path_factory.mktemp("given") / "broken-template.gguf",
        SHAPE,
        byte_fallback_vocabulary(SHAPE.n_vocab),
        random_llama_tensors(SHAPE, seed=3),
        name="Broken Template",
        chat_template=BROKEN_TEMPLATE,
    )


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, runs: Path, broken_template_gguf: Path
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("hardening")
    values = {"paths.models_dir": str(tmp / "models"), "llm.files": [str(broken_template_gguf)]}
    with live_server(create_app(serve_config(tmp, runs, **values))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    # a first request to a model starts its worker: seconds on a busy machine
    with httpx.Client(base_url=server, timeout=120) as http:
        yield http


# ---- what is listed


@pytest.mark.slow
def test_listing_serves_only_regular_files_inside_and_logs_why_not(
    make_client, runs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ml_engine.server.llm_service"):
        api = make_client(runs_dir=runs)
        listed = api.get("/llm/models")
        usable = api.get("/v1/models")
    assert listed.status_code == 200, listed.text
    assert usable.status_code == 200, usable.text
    entries = {m["name"]: m for m in listed.json()["models"]}
    # a link that stays inside the folder is resolved and served as the file it leads to
    assert entries["own"]["exported"] and entries["alias"]["exported"]
    assert {"own", "alias"} <= {m["id"] for m in usable.json()["data"]}
    assert not set(REFUSED) & set(entries)
    for name, reason in REFUSED.items():
        said = [r.getMessage() for r in caplog.records if f"/{name}.gguf: " in r.getMessage()]
        assert len(said) == 1 and reason in said[0], (name, said)


@pytest.mark.slow
def test_unreadable_files_are_listed_unusable_with_what_is_wrong(http: httpx.Client) -> None:
    entries = {m["name"]: m for m in http.get("/llm/models").json()["models"]}
    for name, problem in UNREADABLE.items():
        assert entries[name]["usable"] is False and problem in entries[name]["error"], name
    served = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert "own" in served and not set(UNREADABLE) & served


# ---- what a request for an entry gets


@pytest.mark.slow
def test_only_a_request_for_a_refused_entry_fails(
    http: httpx.Client, client: openai.OpenAI
) -> None:
    for name in REFUSED:
        answer = http.post("/llm/generate", json={"model": name, "prompt": "Hi"})
        assert answer.status_code == 422 and f"'{name}'" in answer.json()["error"], answer.text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt="Hi", max_tokens=2)
    completion = client.completions.create(model="own", prompt="Once", max_tokens=4)
    assert completion.usage.completion_tokens == 4


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_a_file_that_is_no_readable_gguf_says_what_is_wrong(
    http: httpx.Client, client: openai.OpenAI, name: str
) -> None:
    answer = http.post("/llm/generate", json={"model": name, "prompt": "Hi"})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert UNREADABLE[name] in error and f"{name}.gguf" in error and "\n" not in error
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=name, prompt="Hi", max_tokens=2)
    assert UNREADABLE[name] in refused.value.message


# ---- a chat template Jinja cannot parse


@pytest.mark.slow
def test_a_bad_chat_template_refuses_chats_and_keeps_completions(
    http: httpx.Client, client: openai.OpenAI
) -> None:
    body = {"model": BROKEN, "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    for stream in (False, True):
        answer = http.post("/llm/generate", json={**body, "stream": stream})
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert "chat template" in error and "does not parse" in error and "line " in error
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=BROKEN, messages=[{"role": "user", "content": "Hi"}], stream=stream
            )
        assert "does not parse" in refused.value.message
    # the model itself loads and runs: a prompt formatted by the client is completed
    whole = client.completions.create(model=BROKEN, prompt="Once", max_tokens=6, temperature=0)
    assert whole.usage.completion_tokens == 6
    streamed = client.completions.create(
        model=BROKEN, prompt="Once", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


# ---- training runs (/ml/models): the same rule for run directories and checkpoints


def _fake_run(run_dir: Path, val_acc: float, checkpoint: Path) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("model:\n  net:\n    name: cnn_mnist\n")
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"a checkpoint")
    metrics = {"val/acc_best": val_acc, "best_ckpt": str(checkpoint)}
    write_json_atomic(run_dir / "job.json", {"status": "ok", "metrics": metrics})


def test_runs_linked_in_or_pointing_out_are_not_runs(make_client, tmp_path: Path) -> None:
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    own = runs / "2025-01-01_00-00-00_own"
    _fake_run(own, 0.5, own / "checkpoints" / "best.ckpt")
    # better runs, whose checkpoints would be unpickled from outside the folder
    _fake_run(elsewhere / "run", 0.99, elsewhere / "run" / "best.ckpt")
    (runs / "2025-01-02_00-00-00_linked").symlink_to(elsewhere / "run")
    outward = runs / "2025-01-03_00-00-00_outward"
    _fake_run(outward, 0.98, elsewhere / "loose.ckpt")
    hard = runs / "2025-01-04_00-00-00_hard"
    hard.mkdir(parents=True)
    os.link(elsewhere / "loose.ckpt", hard / "best.ckpt")
    _fake_run(hard, 0.97, hard / "best.ckpt")

    models = make_client(runs_dir=runs).get("/ml/models").json()["models"]
    cnn = next(m for m in models if m["name"] == "cnn_mnist")
    assert cnn["runs"] == 1 and cnn["best"]["run"] == own.name


@pytest.mark.slow
def test_a_copied_runs_folder_serves_its_own_checkpoints(make_client, tmp_path: Path) -> None:
    """A record keeps the absolute path its run was written at: a runs folder copied (or moved)
    elsewhere is listed with the copy's checkpoint, never the original's."""
    import shutil

    original = tmp_path / "original" / "runs"
    _fake_run(
        original / "2025-01-01_00-00-00_run",
        0.9,
        original / "2025-01-01_00-00-00_run" / "checkpoints" / "best.ckpt",
    )
    copy = tmp_path / "copy" / "runs"
    shutil.copytree(original, copy)
    client = make_client(runs_dir=copy)
    models = client.get("/ml/models").json()["models"]
    cnn = next(m for m in models if m["name"] == "cnn_mnist")
    assert cnn["runs"] == 1
    run = client.app.state.server.runs.get("2025-01-01_00-00-00_run")
    assert Path(run.checkpoint) == copy / "2025-01-01_00-00-00_run" / "checkpoints" / "best.ckpt"
