"""The character-level language model: tokenizer, text datamodule, llama network, and real short
trainings through train.py (the session's one trained model, conftest.py), eval.py, a sweep and a
resume (experiment=shakespeare_char, shrunk)."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from ml_engine.errors import UserError
from ml_engine.run.files import read_job_record
from ml_engine.training import registry
from ml_engine.training.checkpoints import load_module
from ml_engine.training.lm.llama import Llama, RMSNorm, apply_rope, rope_tables
from ml_engine.training.lm.module import CausalLMModule
from ml_engine.training.lm.text_data import (
    IGNORE_INDEX,
    RandomWindowSampler,
    TextDataModule,
    WindowDataset,
    bundled_corpus_path,
    consecutive_windows,
)
from ml_engine.training.lm.tokenizer import (
    BYTE_OFFSET,
    FIRST_CHAR_ID,
    SPACE_PIECE,
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    CharTokenizer,
)
from ml_engine.training.train import train
from ml_engine.training.vision.module import load_classifier
from tests.conftest import run_dir_of, run_entrypoint
from tests.test_tensorboard_curves import tensorboard_server
from tests.training.lm.conftest import LM_BLOCK, LM_MAX_CHARS, LM_STEPS_PER_EPOCH

CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# experiment=shakespeare_char shrunk to seconds: 48k characters, a one-layer net, 2 × 20 steps
# (20 steps an epoch: the fewest whose one-cycle warm-up lasts a whole step)
TINY = (
    "experiment=shakespeare_char",
    "datamodule.max_chars=48000",
    "datamodule.block_size=32",
    "datamodule.train_batches=20",
    "model.net.n_layer=1",
    "model.sample_tokens=40",
    "trainer.max_epochs=2",
    "trainer.precision=32-true",
)
CLI_TINY = (
    *TINY,
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
)


def test_bundled_corpus_is_tinyshakespeare() -> None:
    data = bundled_corpus_path().read_bytes()
    assert len(data) == 1_115_394
    assert hashlib.sha256(data).hexdigest() == CORPUS_SHA256


# tokenizer


def test_vocabulary_is_laid_out_for_llama_cpps_spm_tokenizer() -> None:
    tokenizer = CharTokenizer.from_text("ba\nc a")
    pieces, scores, types = tokenizer.vocabulary()
    assert pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert pieces[3] == "<0x00>" and pieces[3 + 0x41] == "<0x41>" and pieces[258] == "<0xFF>"
    assert pieces[FIRST_CHAR_ID:] == ["\n", SPACE_PIECE, "a", "b", "c"]  # sorted, space as ▁
    assert (
        types
        == [TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]
        + [TOKEN_TYPE_BYTE] * 256
        + [TOKEN_TYPE_NORMAL] * 5
    )
    assert scores == [0.0] * len(pieces) == [0.0] * tokenizer.vocab_size
    assert all(isinstance(x, str) for x in pieces) and (types[0], types[1]) == (2, 3)


def test_round_trip_with_spaces_and_unknown_characters() -> None:
    tokenizer = CharTokenizer.from_text("hello world\n")
    text = "hello  wörld 🙂\n"
    ids = tokenizer.encode_ids(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text).tolist() == ids
    space = FIRST_CHAR_ID + tokenizer.chars.index(" ")
    assert ids[5:7] == [space, space]
    # unknown characters fall back to the byte tokens of their UTF-8 encoding
    o_umlaut = [BYTE_OFFSET + b for b in "ö".encode()]
    smiley = [BYTE_OFFSET + b for b in "🙂".encode()]
    assert ids[8:10] == o_umlaut and ids[13] == space and ids[14:18] == smiley
    assert all(i < FIRST_CHAR_ID for i in o_umlaut + smiley)


def test_tokenizer_survives_the_checkpoint_and_the_fast_path_equals_the_loop() -> None:
    text = bundled_corpus_path().read_text(encoding="utf-8")[:20000]
    tokenizer = CharTokenizer.from_text(text)
    assert CharTokenizer.from_config(tokenizer.to_config()) == tokenizer
    assert tokenizer.encode(text).tolist() == tokenizer.encode_ids(text)
    # a literal ▁ is the space's piece: it stays byte fallback instead of a second "▁" token
    odd = CharTokenizer.from_text("a\u2581b")
    assert odd.chars == ("a", "b") and odd.decode(odd.encode("a\u2581b")) == "a\u2581b"


# datamodule


def _write(tmp_path: Path, text: str, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_training_batches_are_random_windows_of_the_training_split(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(1000))
    datamodule = TextDataModule(
        path=str(_write(tmp_path, text)), block_size=16, batch_size=8, val_fraction=0.2
    )
    datamodule.setup()
    train_tokens, val_tokens = datamodule.splits
    assert (len(train_tokens), len(val_tokens)) == (800, 200)  # contiguous 80/20
    assert datamodule.tokenizer.decode(train_tokens) == text[:800]
    loader = datamodule.train_dataloader()
    assert len(loader) == 800 // (8 * 16)
    batches = list(loader)
    train_text = text[:800]
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (8, 16) and inputs.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets: inputs shifted by one
        for row_in, row_target in zip(inputs, targets, strict=True):
            window = datamodule.tokenizer.decode(torch.cat([row_in, row_target[-1:]]))
            assert window in train_text  # never reaches into the validation text
    sampler = RandomWindowSampler(num_starts=10, batch_size=500, num_batches=2, seed=3)
    starts = torch.cat(list(sampler))
    assert starts.min() >= 0 and starts.max() == 9  # the last window ends on the split's end
    sampler.set_epoch(1)
    assert not torch.equal(starts, torch.cat(list(sampler)))
    inputs, targets = WindowDataset(torch.arange(20), 4)[torch.tensor([0, 15])]
    assert inputs.tolist() == [[0, 1, 2, 3], [15, 16, 17, 18]]
    assert targets.tolist() == [[1, 2, 3, 4], [16, 17, 18, 19]]


def test_validation_covers_the_whole_validation_split_once(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + (i * 5) % 23) for i in range(1003))
    datamodule = TextDataModule(
        path=str(_write(tmp_path, text)), block_size=16, eval_batch_size=5, val_fraction=0.1
    )
    datamodule.setup()
    val_tokens = datamodule.splits[1]
    assert len(val_tokens) == 100
    batches = list(datamodule.val_dataloader())
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert inputs.shape == (math.ceil(99 / 16), 16)  # 99 predictions, the last window padded
    real = targets != IGNORE_INDEX
    assert torch.equal(targets[real], val_tokens[1:].long())  # each prediction exactly once
    assert torch.equal(inputs[real], val_tokens[:-1].long())
    assert not real[-1, -1] and real[:-1].all()
    again = torch.cat([b[1] for b in datamodule.val_dataloader()])
    assert torch.equal(targets, again)  # deterministic


def test_text_file_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    def message(**kwargs) -> str:
        datamodule = TextDataModule(**kwargs)
        with pytest.raises(UserError) as error:
            datamodule.setup()
        text = str(error.value)
        assert "\n" not in text
        return text

    missing = tmp_path / "nope.txt"
    assert message(path=str(missing)) == (
        f"datamodule.path: no file {missing}; give a UTF-8 text file, or datamodule.path=null "
        "for the bundled tinyshakespeare.txt"
    )
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert message(path=str(latin1)).startswith(
        f"datamodule.path: {latin1} is not UTF-8 text (byte 3 is 0xe9); give a UTF-8 text file"
    )
    short = _write(tmp_path, "x" * 40, "short.txt")
    assert f"{short} has 40 characters, too few for block_size=64" in message(path=str(short))


# network


def _net(**kwargs) -> Llama:
    torch.manual_seed(0)
    return Llama(vocab_size=300, block_size=32, n_embd=64, n_ff=128, **kwargs)


def test_network_shapes_names_and_no_biases() -> None:
    net = _net(n_layer=2, n_head=4, n_head_kv=2)
    logits = net(torch.randint(0, 300, (3, 20)))
    assert logits.shape == (3, 20, 300)
    names = set(dict(net.named_parameters()))
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
        expected |= {f"layers.{i}.attention.w{x}.weight" for x in "qkvo"}
        expected |= {f"layers.{i}.feed_forward.w{x}.weight" for x in "123"}
    assert names == expected == set(net.state_dict())  # no biases, no rope buffers
    assert net.layers[0].attention.wk.weight.shape == (32, 64)  # 2 kv heads of 16
    assert net.output.weight.data_ptr() != net.tok_embeddings.weight.data_ptr()  # untied
    assert "llama" in registry.network_names(registry.CAUSAL_LM)
    assert "llama" not in registry.network_names(registry.CLASSIFIER)


@pytest.mark.parametrize("n_head_kv", [4, 1])
def test_a_future_token_never_changes_earlier_logits(n_head_kv: int) -> None:
    net = _net(n_layer=2, n_head=4, n_head_kv=n_head_kv).eval()
    ids = torch.randint(0, 300, (2, 24))
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 300
    before, after = net(ids), net(changed)
    torch.testing.assert_close(before[:, :15], after[:, :15])
    assert not torch.allclose(before[:, 15:], after[:, 15:])


def test_rmsnorm_and_rotate_half_rope() -> None:
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(8.0))
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    expected = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (expected * norm.weight).bfloat16().float())
    # dimension i turns with dimension i + D/2 by position × theta^(-2i/D)
    cos, sin = rope_tables(5, 4, 10000.0)
    vector = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(1, 1, 5, 4)
    rotated = apply_rope(vector, cos, sin)[0, 0]
    positions = torch.arange(5.0)
    torch.testing.assert_close(rotated[:, 0], positions.cos())
    torch.testing.assert_close(rotated[:, 2], positions.sin())
    assert rotated[:, [1, 3]].abs().max() == 0


def test_greedy_generation_is_deterministic_and_keeps_the_context() -> None:
    net = _net(n_layer=1).eval()
    prompt = torch.tensor([[5, 6, 7]])
    first = net.generate(prompt, 40, temperature=0.0)
    assert first.shape == (1, 43) and torch.equal(first[:, :3], prompt)
    assert torch.equal(first, net.generate(prompt, 40, temperature=0.0))
    assert torch.equal(first[0, 3], net(prompt)[0, -1].argmax())


# real trainings


def unigram_cross_entropy(train_ids: torch.Tensor, val_ids: torch.Tensor) -> float:
    """Nats per token of the validation split under the training split's (smoothed) unigram."""
    counts = Counter(train_ids.tolist())
    total = sum(counts.values()) + len(set(val_ids.tolist()))
    return -sum(math.log((counts[i] + 1) / total) for i in val_ids.tolist()) / len(val_ids)


@pytest.mark.slow
def test_short_training_beats_the_unigram_and_reloads_from_the_checkpoint_alone(
    lm_metrics,
) -> None:
    metrics = lm_metrics
    assert metrics["epochs_run"] == 2 and metrics["data_source"] == "tinyshakespeare.txt"
    assert "test/loss" not in metrics  # no test split: val/loss is the held-out figure
    model = load_module(metrics["best_ckpt"])
    assert isinstance(model, CausalLMModule)
    assert model.hparams.block_size == LM_BLOCK

    datamodule = TextDataModule(max_chars=LM_MAX_CHARS, block_size=LM_BLOCK)
    datamodule.setup()
    datamodule.use_tokenizer(model.tokenizer)
    train_ids, val_ids = datamodule.splits
    uniform = math.log(model.tokenizer.vocab_size)
    unigram = unigram_cross_entropy(train_ids, val_ids)
    assert metrics["val/loss_best"] < unigram - 0.3 < uniform  # ~2.5 vs ~3.3 vs 5.8 nats

    # the same val loss from the reloaded model, in a plain loop over the same windows
    inputs, targets = consecutive_windows(val_ids, LM_BLOCK)
    with torch.no_grad():
        logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(metrics["val/loss_best"], abs=1e-4)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    with pytest.raises(UserError, match="is a CausalLMModule checkpoint"):
        load_classifier(metrics["best_ckpt"])


@pytest.mark.slow
def test_sample_text_reaches_tensorboard(lm_run, lm_metrics) -> None:
    with tensorboard_server(lm_run) as server:
        server.wait_until_loaded("tensorboard", "val/loss")
        tags = server.get("/data/plugin/text/tags")["tensorboard"]
        assert "val/sample/text_summary" in tags  # add_text's tag for "val/sample"
        samples = server.get(
            "/data/plugin/text/text", run="tensorboard", tag="val/sample/text_summary"
        )
        val_loss = server.scalars("tensorboard", "val/loss")
    steps = [LM_STEPS_PER_EPOCH, 2 * LM_STEPS_PER_EPOCH]
    assert [s["step"] for s in samples] == steps and len(val_loss) == 2  # each validation
    assert "ROMEO:" in samples[-1]["text"]
    assert val_loss[-1][1] == pytest.approx(lm_metrics["val/loss"])


@pytest.mark.slow
def test_eval_reproduces_the_val_loss(lm_metrics, tmp_path: Path) -> None:
    metrics = lm_metrics
    result = run_entrypoint(
        "eval.py",
        f"ckpt_path={metrics['best_ckpt']}",
        "extras.print_config=false",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was trained with datamodule=text: evaluating on it" in result.stdout + result.stderr
    evaluated = read_job_record(run_dir_of(result))["metrics"]
    assert evaluated["val/loss"] == pytest.approx(metrics["val/loss_best"], abs=1e-4)
    assert evaluated["val/ppl"] == pytest.approx(math.exp(evaluated["val/loss"]), rel=1e-4)
    assert evaluated["data_source"] == "tinyshakespeare.txt"


def test_test_split_and_wrong_datamodule_are_one_line(make_cfg) -> None:
    with pytest.raises(UserError, match="test=true needs a test split"):
        train(make_cfg("train", [*TINY, "test=true"]))
    with pytest.raises(UserError, match="needs a text datamodule, not MNISTDataModule"):
        train(make_cfg("train", ["model=llama_char", "test=false", "trainer.max_epochs=1"]))


@pytest.mark.slow
def test_not_utf8_from_the_command_line_is_one_line(tmp_path: Path) -> None:
    latin1 = tmp_path / "notes.txt"
    latin1.write_bytes(b"na\xefve")
    result = run_entrypoint(
        "train.py", *CLI_TINY, f"datamodule.path={latin1}", f"paths.log_dir={tmp_path}"
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: datamodule.path: {latin1} is not UTF-8 text (byte 2 is 0xef); give a UTF-8 "
        "text file, or datamodule.path=null for the bundled tinyshakespeare.txt"
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sweep_ranks_by_lowest_val_loss_and_resume_replans(tmp_path: Path) -> None:
    sweep = run_entrypoint(
        "train.py",
        "-m",
        *CLI_TINY,
        "logger=none",
        "trainer.max_epochs=1",
        "model.optimizer.lr=0.0001,0.003",
        f"paths.log_dir={tmp_path}",
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    summary = Path(sweep.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    jobs = json.loads(summary.with_suffix(".json").read_text())
    assert jobs["metric"] == "val/loss_best"
    losses = [job["metrics"]["val/loss_best"] for job in jobs["jobs"]]
    assert losses == sorted(losses) and "lr=0.003" in " ".join(jobs["jobs"][0]["overrides"])
    assert "Sorted by `val/loss_best` (min)" in summary.read_text()

    last = summary.parent / "1" / "checkpoints" / "last.ckpt"
    resumed = run_entrypoint(
        "train.py",
        *CLI_TINY,
        "logger=none",
        "model.optimizer.lr=0.003",
        f"ckpt_path={last}",
        f"paths.log_dir={tmp_path}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "resuming at step 20: OneCycleLR re-planned for 40 total steps (was 20)" in output
    final = read_job_record(run_dir_of(resumed))["metrics"]
    assert final["epochs_run"] == 2 and final["val/loss_best"] < losses[0]


def test_config_rules_name_the_new_keys(make_cfg) -> None:
    from ml_engine.run.rules import check_config
    from ml_engine.training.rules import TRAIN_RULES

    for override, expected in (
        ("datamodule.block_size=0", "an integer ≥ 1"),
        ("datamodule.val_fraction=1.0", "a number in (0, 1)"),
        ("model.net.n_head_kv=0", "an integer ≥ 1"),
    ):
        cfg = make_cfg("train", [*TINY, override])
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            check_config(cfg, TRAIN_RULES)
    cfg = make_cfg("train", list(TINY))
    with open_dict(cfg):
        cfg.model.net.n_head_kv = 3
    with pytest.raises(UserError, match=r"must be a multiple of model\.net\.n_head_kv=3"):
        train(cfg)


@pytest.mark.slow
def test_optuna_search_minimizes_the_validation_loss_and_prunes(tmp_path: Path) -> None:
    import optuna
    import yaml

    from ml_engine.run.optuna_study import open_storage

    result = run_entrypoint(
        "train.py",
        "-m",
        *CLI_TINY,
        "hparams_search=shakespeare_optuna",
        "logger=none",
        "trainer.max_epochs=3",
        "datamodule.train_batches=10",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.n_startup_trials=4",
        # seeded to try the good rate twice first, then the bad one twice: the median pruner
        # compares from the third trial on
        "hydra.sweeper.sampler.seed=22",
        "hydra.sweeper.pruner=median",
        # a learning rate too small to move the loss: trials with it fall behind the median
        "hydra.sweeper.params={model.optimizer.lr: 'choice(0.000001, 0.003)'}",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = Path(result.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    best = yaml.safe_load((summary.parent / "optimization_results.yaml").read_text())
    jobs = json.loads(summary.with_suffix(".json").read_text())["jobs"]
    study = optuna.load_study(
        study_name="shakespeare_char", storage=open_storage(str(summary.parent / "optuna.journal"))
    )
    states = {t.number: t.state.name for t in study.trials}
    assert "PRUNED" in states.values() and "COMPLETE" in states.values(), states
    for job in jobs:
        assert job["status"] == ("pruned" if states[job["trial"]] == "PRUNED" else "ok")
    completed = [j["metrics"]["val/loss_best"] for j in jobs if j["status"] == "ok"]
    assert best["best_value"] == pytest.approx(min(completed))
    pruned = [j for j in jobs if j["status"] == "pruned"]
    assert all(j["metrics"]["epochs_run"] < 3 for j in pruned)
