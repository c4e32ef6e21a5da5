"""quantize.py: per-tensor types to a size budget (llm/quant_budget.py): the greedy on made-up
sensitivities, the size arithmetic against real files, and one real search on the packaged
model compared with llama.cpp's uniform types."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ml_engine.errors import UserError
from ml_engine.llm.models import PACKAGED_DIR
from ml_engine.llm.quant_budget import (
    UNIFORM_TYPES,
    Budget,
    Costs,
    Layout,
    TensorInfo,
    allowed_types,
    budget_costs,
    check_feasible,
    check_ladder,
    greedy_mix,
    group_weights,
    mix_overrides,
    parse_budget,
    read_layout,
    tensor_bytes,
)
from ml_engine.llm.quantize import bits_per_weight, quantize_gguf, tensor_types_of
from tests.conftest import PROJECT_ROOT, run_entrypoint
from tests.test_cli_errors import assert_one_line_error

PACKAGED = PACKAGED_DIR / "shakespeare-char-f16.gguf"
CORPUS = PROJECT_ROOT / "src" / "ml_engine" / "training" / "lm" / "corpora" / "tinyshakespeare.txt"
KINDS = [
    "token_embd",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "output",
]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The validation split the packaged model was measured on: the corpus's last 10%."""
    text = CORPUS.read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("text") / "shakespeare.val.txt"
    path.write_text(text[len(text) - round(len(text) * 0.1) :], encoding="utf-8")
    return path


# ---------------------------------------------------------------- the greedy


def synthetic(limit: int) -> tuple[Costs, dict[str, dict[str, float]]]:
    """Three groups of lo/mid/hi types; c's mid is worse than its lo (measurement noise)."""
    sizes = {"lo": 100, "mid": 150, "hi": 200}
    costs = Costs({g: dict(sizes) for g in ("a", "b", "c")}, fixed=10, limit=limit)
    kld = {
        "a": {"lo": 1.0, "mid": 0.4, "hi": 0.35},
        "b": {"lo": 0.5, "mid": 0.3, "hi": 0.1},
        "c": {"lo": 0.2, "mid": 0.25, "hi": 0.0},
    }
    return costs, kld


@pytest.mark.parametrize(
    ("limit", "choice", "cost", "predicted"),
    [
        (310, {"a": "lo", "b": "lo", "c": "lo"}, 310, 1.7),  # the smallest mix, exactly
        (360, {"a": "mid", "b": "lo", "c": "lo"}, 360, 1.1),  # a: 0.6 per 50 bytes
        # then b→mid (0.2 per 50; b→hi, 0.4 per 100, does not fit)
        (410, {"a": "mid", "b": "mid", "c": "lo"}, 410, 0.9),
        (459, {"a": "mid", "b": "mid", "c": "lo"}, 410, 0.9),  # no step of 50 fits 49
        # b mid→hi (0.2 per 50) before c lo→hi (0.2 per 100) and a mid→hi (0.05 per 50)
        (460, {"a": "mid", "b": "hi", "c": "lo"}, 460, 0.7),
        (560, {"a": "mid", "b": "hi", "c": "hi"}, 560, 0.5),
    ],
)
def test_greedy_takes_the_largest_kld_decrease_per_byte_that_fits(
    limit: int, choice: dict[str, str], cost: int, predicted: float
) -> None:
    costs, kld = synthetic(limit)
    mix = greedy_mix(costs, kld)
    assert mix.choice == choice
    assert mix.cost == cost <= limit
    assert mix.predicted_kld == pytest.approx(predicted)
    assert not mix.all_highest
    # the predicted KLD is the sum of the groups' sensitivities at their types
    assert mix.predicted_kld == pytest.approx(sum(kld[g][t] for g, t in mix.choice.items()))
    assert all(step["to"] != "mid" for step in mix.steps if step["group"] == "c")


def test_greedy_takes_every_highest_type_when_the_budget_holds_them() -> None:
    costs, kld = synthetic(10_000)
    mix = greedy_mix(costs, kld)
    assert mix.all_highest and mix.choice == {"a": "hi", "b": "hi", "c": "hi"}
    assert mix.cost == 610


def test_greedy_refuses_a_budget_below_the_smallest_mix() -> None:
    costs, kld = synthetic(309)
    with pytest.raises(ValueError):
        greedy_mix(costs, kld)


# ---------------------------------------------------------------- budgets, ladders, groups


def test_budgets_are_bits_per_weight_or_file_sizes() -> None:
    assert parse_budget(4.5) == Budget("bpw", 4.5, "4.5 bpw")
    assert parse_budget("4.5bpw") == Budget("bpw", 4.5, "4.5 bpw")
    assert parse_budget("3.5MB") == Budget("bytes", 3.5e6, "3.5 MB", "MB")
    assert parse_budget("3 MiB") == Budget("bytes", 3 * 2**20, "3 MiB", "MiB")
    assert parse_budget("900kb").value == 900_000
    for bad in ("abc", 0, -1, "4.5 bits", True):
        with pytest.raises(UserError, match="budget="):
            parse_budget(bad)


def test_the_ladder_is_sorted_by_bits_and_unknown_types_are_one_line() -> None:
    assert check_ladder(["q6_k", "Q2_K", "q4_k", "q6_k"]) == ("q2_k", "q4_k", "q6_k")
    with pytest.raises(UserError, match=r"^ladder: unknown tensor type 'q9_k'; accepted: f32"):
        check_ladder(["q2_k", "q9_k"])


def test_weights_are_grouped_by_kind_or_alone() -> None:
    layout = read_layout(PACKAGED)
    groups = group_weights(layout, "kind")
    assert [g.name for g in groups] == KINDS
    attn_v = groups[KINDS.index("attn_v")]
    assert attn_v.tensors == ("blk.0.attn_v.weight", "blk.1.attn_v.weight")
    assert all(re.search(attn_v.pattern, name) for name in attn_v.tensors)
    assert not re.search(attn_v.pattern, "blk.0.attn_v_norm.weight")
    alone = group_weights(layout, "tensor")
    assert len(alone) == len(layout.weights) == 16
    assert alone[1].name == "blk.0.attn_q" and alone[1].tensors == ("blk.0.attn_q.weight",)


def test_a_type_whose_block_does_not_divide_the_rows_is_left_out() -> None:
    layout = Layout(
        (TensorInfo("blk.0.ffn_down.weight", 96 * 8, 96, "f16", 96 * 8 * 2),),
        ("blk.0.ffn_down.weight",),
        header_bytes=1000,
        alignment=32,
    )
    (group,) = group_weights(layout)
    assert allowed_types(group, layout, ("q2_k", "q4_0", "q4_k", "q8_0")) == ("q4_0", "q8_0")


def test_an_unmeetable_budget_is_one_line() -> None:
    layout = read_layout(PACKAGED)
    groups = group_weights(layout)
    ladder = ("q2_k", "q4_k", "q6_k")
    options = {g.name: allowed_types(g, layout, ladder) for g in groups}
    for text, pattern in (
        (
            1.5,
            r"budget 1.5 bpw cannot be met: the smallest mix \(every tensor at q2_k\) is "
            r"(\d+\.\d\d) bpw; accepted: ≥ (\d+\.\d\d) bpw",
        ),
        (
            "0.5MB",
            r"budget 0.5 MB cannot be met: the smallest mix \(every tensor at q2_k\) is "
            r"(\d+\.\d\d) MB; accepted: ≥ (\d+\.\d\d) MB",
        ),
    ):
        budget = parse_budget(text)
        with pytest.raises(UserError) as caught:
            check_feasible(budget, layout, budget_costs(budget, layout, groups, options), ladder)
        message = str(caught.value)
        assert re.fullmatch(pattern, message), message
        # the accepted budget is met
        accepted = parse_budget(message.rsplit("≥ ", 1)[1].replace(" ", ""))
        check_feasible(accepted, layout, budget_costs(accepted, layout, groups, options), ladder)


def test_the_size_arithmetic_is_that_of_a_real_file(tmp_path: Path) -> None:
    layout = read_layout(PACKAGED)
    groups = group_weights(layout)
    ladder = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")
    options = {g.name: allowed_types(g, layout, ladder) for g in groups}
    choice = {g.name: ladder[i % len(ladder)] for i, g in enumerate(groups)}
    patterns, wanted = mix_overrides(groups, layout, choice)
    path = quantize_gguf(PACKAGED, tmp_path / "mix.gguf", "q4_k_m", tensor_types=patterns)
    stored = tensor_types_of(path)
    assert {name: stored[name] for name in wanted} == wanted

    # bpw as llama.cpp prints it: every tensor's bytes (norms included) over every element
    costs = budget_costs(parse_budget(4.0), layout, groups, options)
    tensor_total = costs.fixed + sum(costs.groups[g][t] for g, t in choice.items())
    assert tensor_total * 8 / layout.total_elements == pytest.approx(bits_per_weight(path))
    assert tensor_total == sum(
        tensor_bytes(t.n_elements, stored[t.name]) if t.name in wanted else t.n_bytes
        for t in layout.tensors
    )
    # a size: the header plus every tensor padded to the alignment is the file's size
    header = read_layout(path).header_bytes
    costs = budget_costs(parse_budget("1MB"), layout, groups, options, header)
    assert costs.fixed + sum(costs.groups[g][t] for g, t in choice.items()) == path.stat().st_size
    # without the quantized file's header, the source's (never larger) is used
    assert read_layout(PACKAGED).header_bytes <= header


def test_the_importance_matrix_is_the_one_beside_the_model_or_the_given_one(
    tmp_path: Path, held_out: Path
) -> None:
    import gguf

    from ml_engine.llm.imatrix import write_imatrix
    from ml_engine.llm.imatrix_llama import collect_importance_llama
    from ml_engine.llm.quant_budget import Measurer, _matrix

    model = tmp_path / "model.gguf"
    model.write_bytes(PACKAGED.read_bytes())
    kwargs, record = _matrix({"imatrix": "auto"}, model)
    assert kwargs == {} and record["file"] is None
    assert record["found"] == "no model.imatrix.gguf beside the model"
    assert _matrix({"imatrix": "none"}, model)[0] == {}

    text = held_out.read_text(encoding="utf-8")[:20_000]
    matrix = collect_importance_llama(model, text, n_ctx=64, n_chunks=2, n_threads=1)
    beside = write_imatrix(tmp_path / "model.imatrix.gguf", matrix)
    kwargs, record = _matrix({"imatrix": "auto"}, model)
    assert kwargs["imatrix_label"] == record["file"] == str(beside)
    assert record["found"] == "beside the model" and len(record["sha256"]) == 64
    given = tmp_path / "other.gguf"
    given.write_bytes(beside.read_bytes())
    kwargs, record = _matrix({"imatrix": str(given)}, model)
    assert record["file"] == str(given) and kwargs["imatrix"] is not None

    # every file of the search is made with it
    measurer = Measurer(model, held_out, 64, 2, 1, tmp_path, quantize_kwargs=kwargs)
    made = measurer.make("any", "q4_k_m", {r"^blk\.\d+\.attn_v\.weight$": "q2_k"})
    fields = gguf.GGUFReader(str(made)).fields
    assert bytes(fields["quantize.imatrix.file"].parts[-1]).decode() == str(given)
    assert measurer.header_bytes == read_layout(made).header_bytes


# ---------------------------------------------------------------- the entrypoint


@pytest.mark.slow
def test_a_search_on_the_packaged_model_beats_the_uniform_type_below_it(
    held_out: Path, tmp_path: Path
) -> None:
    from ml_engine.llm.backends.llama_cpp import LlamaCppBackend

    # between q3_k_m (4.04 bpw on this model) and q4_k_m (4.90 bpw)
    result = run_entrypoint(
        "quantize.py",
        f"model_path={PACKAGED}",
        "budget=4.5",
        f"text_path={held_out}",
        "n_chunks=8",
        "ladder=[q3_k,q4_k,q6_k]",
        "n_threads=2",
        f"paths.log_dir={tmp_path}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("gguf: "), result.stdout[-2000:]
    mix_file = Path(last.removeprefix("gguf: "))
    run_dir = mix_file.parent
    assert mix_file.name == f"shakespeare-char-f16-mix-{bits_per_weight(mix_file):.2f}bpw.gguf"
    assert bits_per_weight(mix_file) <= 4.5
    with LlamaCppBackend(mix_file, n_ctx=64, n_threads=1) as backend:
        assert backend  # llama.cpp loads it

    report = (run_dir / "budget.md").read_text(encoding="utf-8")
    for quantization in UNIFORM_TYPES:
        assert re.search(rf"^\| {quantization} \| ", report, flags=re.M), quantization
    assert "| **mix** |" in report and "just below the mix" in report
    record = json.loads((run_dir / "budget.json").read_text(encoding="utf-8"))
    assert set(record["sensitivity"]) == set(KINDS)
    assert all(set(by) == {"q3_k", "q4_k", "q6_k"} for by in record["sensitivity"].values())
    assert record["mix"]["tensor_types"]["blk.1.attn_v.weight"] == record["mix"]["choice"]["attn_v"]
    # quantize.imatrix=auto: the packaged model's matrix lies beside it
    assert record["budget"]["within"] and record["imatrix"]["file"] == str(
        PACKAGED.with_name("shakespeare-char-f16.imatrix.gguf")
    )
    mix = record["mix"]["measured"]
    assert mix["bpw"] == pytest.approx(bits_per_weight(mix_file))
    smaller = [row for row in record["uniform"].values() if row["file_bytes"] <= mix["file_bytes"]]
    largest = max(smaller, key=lambda row: row["file_bytes"])
    assert mix["kl_mean"] <= largest["kl_mean"], (mix, largest)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("ladder=[q2_k,q9_k]", ("ladder=['q2_k', 'q9_k'] is not valid", "q8_0, q6_k")),
        (
            "budget=1.5",
            ("budget 1.5 bpw cannot be met", "every tensor at q2_k", "accepted: ≥ "),
        ),
        ("budget=lots", ("budget='lots' is not valid", "3.5MB")),
    ],
)
def test_bad_input_is_one_line(
    override: str, fragments: tuple[str, ...], held_out: Path, tmp_path: Path
) -> None:
    result = run_entrypoint(
        "quantize.py",
        f"model_path={PACKAGED}",
        f"text_path={held_out}",
        f"paths.log_dir={tmp_path}",
        override,
        timeout=120,
    )
    assert_one_line_error(result, *fragments)
    assert not list(tmp_path.rglob("*.gguf"))
