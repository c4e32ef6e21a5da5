"""Per-tensor quantization types to a size budget: ``python quantize.py model_path=<f16.gguf>
budget=4.5`` (bits per weight) or ``budget=3.5MB`` (file size).

The method, in three steps:

1. **Sensitivity.** The model's weight matrices are grouped by kind across layers (``attn_v``
   = every ``blk.N.attn_v.weight``; ``granularity=tensor``: each matrix alone). For each group
   g and each type t of the ladder, llama.cpp's quantizer makes a file with g at t and every
   other weight at its source type, and its mean KL divergence from the float source on the
   held-out text is measured (llama-perplexity's statistics): KLD_g(t). A type whose block
   does not divide a group's rows is left out for that group (llama.cpp would fall back to
   another type silently).
2. **Greedy.** Every group starts at its lowest type. Repeatedly, among the upgrades of one
   group to a higher ladder type that still fit the budget and lower its KLD, the one with the
   largest KLD decrease per byte added is applied, until none fits. The mix's predicted KLD is
   Σ_g KLD_g(t_g): the groups' errors are assumed to add up.
3. **Measured.** The mix is made (one ``--tensor-type`` pattern per group; ``general.file_type``
   is the uniform type closest in bits per weight) and measured like the uniform llama.cpp
   types q2_k, q3_k_m, q4_0, q4_k_m, q5_k_m and q6_k, on the same text, into one table.

Sizes: a bpw budget is on tensor data as llama.cpp prints it (all tensors' bytes × 8 / all
their elements, norms included); a size budget (``3.5MB``, ``3MiB``) is on the whole file:
header (measured on the first file the search makes) plus every tensor padded to the file's
alignment. Every file of the search is made with the importance matrix ``quantize.imatrix``
names (``auto``: ``<stem>.imatrix.gguf`` beside the model, else none).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.run.rules import Rule, int_at_least, one_of, optional

log = logging.getLogger(__name__)

DEFAULT_LADDER = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")
# the uniform llama.cpp types every mix is compared with
UNIFORM_TYPES = ("q2_k", "q3_k_m", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
GRANULARITIES = ("kind", "tensor")
# the ggml type of each uniform quantization's bulk (what its bpw is near)
_UNIFORM_BULK = {
    "q8_0": "q8_0",
    "q6_k": "q6_k",
    "q5_k_m": "q5_k",
    "q5_k_s": "q5_k",
    "q4_k_m": "q4_k",
    "q4_k_s": "q4_k",
    "q4_0": "q4_0",
    "q3_k_m": "q3_k",
    "q2_k": "q2_k",
}
# the quantization each sensitivity file is made as: every weight is overridden, so only its
# block (32) matters, which divides every row the K-quants' 256 does
_SENSITIVITY_FTYPE = "q8_0"
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_BUDGET = re.compile(r"^\s*(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>bpw|[kmg]i?b|b)?\s*$", re.I)


# ---------------------------------------------------------------- types and sizes


def type_block(name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type name (``q4_k`` → (256, 144))."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]


def type_bits(name: str) -> float:
    """Bits per weight of a ggml type (``q4_k`` → 4.5)."""
    block, size = type_block(name)
    return size * 8 / block


def tensor_bytes(n_elements: int, type_name: str) -> int:
    """Bytes of ``n_elements`` stored as ``type_name`` (whole blocks: rows divide by it)."""
    block, size = type_block(type_name)
    return -(-n_elements // block) * size


def padded(n_bytes: int, alignment: int) -> int:
    return -(-n_bytes // alignment) * alignment


def check_ladder(names: Sequence[str]) -> tuple[str, ...]:
    """The ladder's types in ascending bits per weight, each once; a name that is no tensor
    type is one line."""
    from ml_engine.llm.quantize import TENSOR_TYPES

    if isinstance(names, str) or not names:
        raise UserError("ladder: give a list of tensor types, e.g. [q2_k, q4_k, q6_k]")
    checked = []
    for name in names:
        key = str(name).strip().lower()
        if key not in TENSOR_TYPES:
            raise UserError(
                f"ladder: unknown tensor type '{name}'; accepted: {', '.join(TENSOR_TYPES)}"
            )
        try:
            type_block(key)
        except (KeyError, ValueError):
            raise UserError(
                f"ladder: the installed gguf package does not know {key}'s block size; leave it out"
            ) from None
        if key not in checked:
            checked.append(key)
    return tuple(sorted(checked, key=lambda name: (type_bits(name), checked.index(name))))


# ---------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Budget:
    """``bpw`` (bits per weight of tensor data) or ``bytes`` (the whole file); ``text`` as the
    user gave it, ``unit`` the size unit (``MB``) for messages."""

    kind: str
    value: float
    text: str
    unit: str = "bpw"

    def describe(self, amount: float) -> str:
        """``amount`` (bpw, or bytes for a size budget) in the budget's unit."""
        if self.kind == "bpw":
            return f"{amount:.2f} bpw"
        return f"{amount / _SIZE_UNITS[self.unit.lower()]:.2f} {self.unit}"

    def accepted_from(self, amount: float) -> str:
        """The least budget in the user's unit that ``amount`` fits (rounded up)."""
        scale = 1 if self.kind == "bpw" else _SIZE_UNITS[self.unit.lower()]
        least = math.ceil(amount / scale * 100 - 1e-9) / 100
        return f"{least:.2f} {self.unit}"


def parse_budget(value: Any) -> Budget:
    """``4.5``/``"4.5bpw"`` → bits per weight; ``"3.5MB"``, ``"3MiB"``, ``"900kB"`` → a file
    size; anything else is one line."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value > 0 and math.isfinite(value):
            return Budget("bpw", float(value), f"{value:g} bpw")
    elif isinstance(value, str):
        match = _BUDGET.match(value)
        if match and float(match["value"]) > 0:
            unit = match["unit"] or "bpw"
            number = float(match["value"])
            if unit.lower() == "bpw":
                return Budget("bpw", number, f"{number:g} bpw")
            unit = unit[0].upper() + unit[1:-1].lower() + "B" if len(unit) > 1 else "B"
            if unit.lower() == "kb":
                unit = "kB"
            return Budget("bytes", number * _SIZE_UNITS[unit.lower()], f"{number:g} {unit}", unit)
    raise UserError(
        f"budget={value!r} is not valid; expected bits per weight (4.5 or 4.5bpw) or a file "
        "size (3.5MB, 3MiB, 900kB)"
    )


def _budget_value(value: Any) -> bool:
    try:
        parse_budget(value)
    except UserError:
        return False
    return True


# ---------------------------------------------------------------- the model's tensors


@dataclass(frozen=True)
class TensorInfo:
    name: str
    n_elements: int
    row: int  # ne[0]: the length of the rows a type's blocks must divide
    type: str  # as stored in the source (f16, f32 …)
    n_bytes: int


@dataclass(frozen=True)
class Layout:
    """A source model's tensors, which of them are weight matrices, its header and alignment."""

    tensors: tuple[TensorInfo, ...]
    weights: tuple[str, ...]
    header_bytes: int
    alignment: int

    @property
    def total_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name)


def read_layout(path: Path) -> Layout:
    """The tensors of a GGUF from its header (the gguf package); weights are the 2-D+ tensors
    llama.cpp's quantizer takes (what ``imatrix.model_columns`` lists)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = tuple(
        TensorInfo(
            t.name,
            int(t.n_elements),
            int(t.shape[0]),
            t.tensor_type.name.lower(),
            int(t.n_bytes),
        )
        for t in reader.tensors
    )
    weights = tuple(t.name for t in reader.tensors if len(t.shape) >= 2)
    return Layout(tensors, weights, int(reader.data_offset), int(reader.alignment))


def kind_of(name: str) -> str:
    """``blk.3.attn_v.weight`` → ``attn_v``; ``token_embd.weight`` → ``token_embd``."""
    return re.sub(r"\.weight$", "", re.sub(r"^blk\.\d+\.", "", name))


@dataclass(frozen=True)
class Group:
    """Weight matrices that take one type together, and the anchored pattern selecting them
    (as llama-quantize's ``--tensor-type``)."""

    name: str
    pattern: str
    tensors: tuple[str, ...]


def group_weights(layout: Layout, granularity: str = "kind") -> list[Group]:
    """The weights by kind across layers, in file order of first appearance; with
    ``granularity=tensor`` each weight alone."""
    if granularity not in GRANULARITIES:
        raise UserError(
            f"granularity={granularity!r} is not valid; expected one of {', '.join(GRANULARITIES)}"
        )
    if granularity == "tensor":
        return [Group(n.removesuffix(".weight"), f"^{re.escape(n)}$", (n,)) for n in layout.weights]
    by_kind: dict[str, list[str]] = {}
    for name in layout.weights:
        by_kind.setdefault(kind_of(name), []).append(name)
    groups = []
    for kind, names in by_kind.items():
        if any(name.startswith("blk.") for name in names):
            suffix = names[0].split(".", 2)[2]
            pattern = rf"^blk\.\d+\.{re.escape(suffix)}$"
        else:
            pattern = f"^{re.escape(names[0])}$"
        groups.append(Group(kind, pattern, tuple(names)))
    return groups


def allowed_types(group: Group, layout: Layout, ladder: Sequence[str]) -> tuple[str, ...]:
    """The ladder's types every row of the group divides into whole blocks."""
    rows = [layout.tensor(name).row for name in group.tensors]
    return tuple(t for t in ladder if all(row % type_block(t)[0] == 0 for row in rows))


@dataclass(frozen=True)
class Costs:
    """What the budget counts: ``groups[g][t]`` the bytes of group g at type t, ``fixed`` the
    bytes that do not depend on the choice (norms, weights no ladder type fits, and for a size
    budget the header), ``limit`` the bytes the budget allows."""

    groups: dict[str, dict[str, int]]
    fixed: int
    limit: int


def budget_costs(
    budget: Budget,
    layout: Layout,
    groups: Sequence[Group],
    options: Mapping[str, Sequence[str]],
    header_bytes: int | None = None,
) -> Costs:
    """A bpw budget: tensor bytes (limit = bpw × all elements / 8); a size budget: file bytes
    (each tensor padded to the alignment, plus the header: ``header_bytes`` where known, else
    the source's, which the quantized file's is never below)."""
    file_sized = budget.kind == "bytes"

    def cost(n_bytes: int) -> int:
        return padded(n_bytes, layout.alignment) if file_sized else n_bytes

    grouped = {name for group in groups if options[group.name] for name in group.tensors}
    fixed = sum(cost(t.n_bytes) for t in layout.tensors if t.name not in grouped)
    if file_sized:
        fixed += layout.header_bytes if header_bytes is None else header_bytes
        limit = int(budget.value)
    else:
        limit = math.floor(budget.value * layout.total_elements / 8)
    costs = {
        group.name: {
            t: sum(cost(tensor_bytes(layout.tensor(n).n_elements, t)) for n in group.tensors)
            for t in options[group.name]
        }
        for group in groups
        if options[group.name]
    }
    return Costs(costs, fixed, limit)


def amount(budget: Budget, layout: Layout, cost_bytes: int) -> float:
    """Bytes as the budget counts them → the budget's measure (bpw, or bytes)."""
    if budget.kind == "bpw":
        return cost_bytes * 8 / layout.total_elements
    return float(cost_bytes)


def smallest(costs: Costs) -> tuple[int, dict[str, str]]:
    """The bytes and choice of every group at its lowest type."""
    choice = {g: next(iter(types)) for g, types in costs.groups.items()}
    return costs.fixed + sum(costs.groups[g][t] for g, t in choice.items()), choice


def check_feasible(budget: Budget, layout: Layout, costs: Costs, ladder: Sequence[str]) -> None:
    """One line when even the smallest mix exceeds the budget."""
    least, _ = smallest(costs)
    if least <= costs.limit:
        return
    lowest = ladder[0] if ladder else "?"
    raise UserError(
        f"budget {budget.text} cannot be met: the smallest mix (every tensor at {lowest}) is "
        f"{budget.describe(amount(budget, layout, least))}; accepted: ≥ "
        f"{budget.accepted_from(amount(budget, layout, least))}"
    )


# ---------------------------------------------------------------- the greedy search


@dataclass
class Mix:
    """The chosen type per group, its bytes as the budget counts them, its predicted KLD (the
    sum of the groups' sensitivities at their types) and the upgrades in the order applied."""

    choice: dict[str, str]
    cost: int
    predicted_kld: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    all_highest: bool = False


def greedy_mix(costs: Costs, kld: Mapping[str, Mapping[str, float]]) -> Mix:
    """Start with every group at its lowest type; apply, while one fits, the upgrade (a group
    to any higher type of its own, lowering its KLD) with the largest KLD decrease per byte.
    A budget holding every group at its highest type takes that mix. Raises ValueError when
    even the smallest mix exceeds ``costs.limit`` (``check_feasible`` says it in one line)."""
    total, choice = smallest(costs)
    if total > costs.limit:
        raise ValueError(f"the smallest mix takes {total} bytes, over the limit {costs.limit}")

    def predicted(chosen: Mapping[str, str]) -> float:
        return sum(kld[g][t] for g, t in chosen.items())

    highest = {g: list(types)[-1] for g, types in costs.groups.items()}
    highest_cost = costs.fixed + sum(costs.groups[g][t] for g, t in highest.items())
    if highest_cost <= costs.limit:
        return Mix(highest, highest_cost, predicted(highest), all_highest=True)
    steps = []
    while True:
        best = None
        for g, types in costs.groups.items():
            order = list(types)
            now = choice[g]
            for up in order[order.index(now) + 1 :]:
                extra = types[up] - types[now]
                gain = kld[g][now] - kld[g][up]
                if gain <= 0 or total + extra > costs.limit:
                    continue
                ratio = gain / extra if extra > 0 else math.inf
                key = (ratio, -extra)
                if best is None or key > best[0]:
                    best = (key, g, up, extra, gain)
        if best is None:
            break
        _, g, up, extra, gain = best
        steps.append(
            {
                "group": g,
                "from": choice[g],
                "to": up,
                "bytes": extra,
                "kld_decrease": gain,
                "kld_per_mb": gain / extra * 1e6 if extra > 0 else None,
            }
        )
        choice[g] = up
        total += extra
    return Mix(choice, total, predicted(choice), steps)


# ---------------------------------------------------------------- making and measuring files


def keep_others(layout: Layout, group: Group) -> dict[str, str]:
    """Patterns keeping every weight outside ``group`` at its source type: one catch-all when
    they share one, else one anchored pattern each."""
    others = [layout.tensor(n) for n in layout.weights if n not in group.tensors]
    kinds = {t.type for t in others}
    if len(kinds) == 1:
        return {r"\.weight$": kinds.pop()} if others else {}
    return {f"^{re.escape(t.name)}$": t.type for t in others}


def check_types(path: Path, wanted: Mapping[str, str]) -> None:
    """One line if llama.cpp stored a tensor at another type than asked (a fallback)."""
    from ml_engine.llm.quantize import tensor_types_of

    stored = tensor_types_of(path)
    for name, want in wanted.items():
        if stored.get(name) != want:
            raise UserError(
                f"llama.cpp stored {name} of {path.name} as {stored.get(name)}, not {want} as "
                "asked (a fallback type for its shape): leave that type out of the ladder"
            )


@dataclass
class Measurer:
    """Makes files from ``source`` with the search's quantizer settings and measures each
    against it on the held-out text (``imatrix_gate.gate_files``)."""

    source: Path
    text_path: Path
    n_ctx: int
    n_chunks: int | None
    n_threads: int | None
    work_dir: Path
    quantize_kwargs: dict[str, Any] = field(default_factory=dict)
    header_bytes: int | None = None

    def make(self, name: str, quantization: str, tensor_types: Mapping[str, str] | None) -> Path:
        from ml_engine.llm.quantize import quantize_gguf

        path = quantize_gguf(
            self.source,
            self.work_dir / f"{name}.gguf",
            quantization,
            self.n_threads,
            tensor_types=dict(tensor_types) if tensor_types else None,
            **self.quantize_kwargs,
        )
        if self.header_bytes is None:
            self.header_bytes = read_layout(path).header_bytes
        return path

    def measure(self, label: str, path: Path) -> dict[str, Any]:
        from ml_engine.llm.imatrix_gate import gate_files
        from ml_engine.llm.quantize import bits_per_weight

        _, figures = gate_files(
            {label: path},
            self.source,
            self.text_path,
            n_ctx=self.n_ctx,
            n_chunks=self.n_chunks,
            n_threads=self.n_threads,
            work_dir=self.work_dir,
        )
        row = {key: value for key, value in figures[label].items() if key != "file"}
        row.update(file_bytes=path.stat().st_size, bpw=bits_per_weight(path))
        return row


def measure_sensitivities(
    measurer: Measurer,
    layout: Layout,
    groups: Sequence[Group],
    options: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{group: {type: figures}}``: each group alone at each of its types, every other weight
    at its source type, measured against the source."""
    total = sum(len(options[g.name]) for g in groups)
    done = 0
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for group in groups:
        for type_name in options[group.name]:
            done += 1
            overrides = {group.pattern: type_name, **keep_others(layout, group)}
            path = measurer.make("sensitivity", _SENSITIVITY_FTYPE, overrides)
            check_types(path, {name: type_name for name in group.tensors})
            figures = measurer.measure(f"{group.name}@{type_name}", path)
            path.unlink()
            results.setdefault(group.name, {})[type_name] = figures
            print(
                f"sensitivity {done}/{total}: {group.name} at {type_name}: mean KLD "
                f"{figures['kl_mean']:.6f} ± {figures['kl_mean_unc'] or 0:.6f}",
                flush=True,
            )
    return results


def closest_uniform(bpw: float) -> str:
    """The uniform quantization whose bulk type's bits per weight is nearest ``bpw``."""
    return min(_UNIFORM_BULK, key=lambda q: abs(type_bits(_UNIFORM_BULK[q]) - bpw))


def mix_overrides(groups: Sequence[Group], layout: Layout, choice: Mapping[str, str]):
    """The mix's ``{pattern: type}``: each group at its chosen type, weights no ladder type
    fits at their source type; and ``{tensor: type}`` as the file must hold them."""
    patterns: dict[str, str] = {}
    wanted: dict[str, str] = {}
    for group in groups:
        if group.name in choice:
            type_name = choice[group.name]
            patterns[group.pattern] = type_name
            wanted.update({n: type_name for n in group.tensors})
        else:
            for name in group.tensors:
                source_type = layout.tensor(name).type
                patterns[f"^{re.escape(name)}$"] = source_type
                wanted[name] = source_type
    return patterns, wanted


# ---------------------------------------------------------------- the report


def _num(value: Any, digits: int = 6) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_rows(mix_row: Mapping[str, Any], uniform: Mapping[str, Mapping[str, Any]]):
    """Every measured file by size, the mix among them, with the uniform types just below and
    just above the mix marked."""
    rows = [{"label": q, **row} for q, row in uniform.items()]
    rows.append({"label": "mix", **mix_row})
    rows.sort(key=lambda r: (r["file_bytes"], r["label"] != "mix"))
    at = next(i for i, r in enumerate(rows) if r["label"] == "mix")
    below = next((rows[i] for i in range(at - 1, -1, -1)), None)
    above = rows[at + 1] if at + 1 < len(rows) else None
    for row in rows:
        row["note"] = (
            "the mix"
            if row["label"] == "mix"
            else "just below the mix"
            if row is below
            else "just above the mix"
            if row is above
            else ""
        )
    return rows, below, above


def comparison_lines(mix_row, below, above) -> list[str]:
    lines = []
    for neighbour in (below, above):
        if neighbour is None:
            continue
        ratio = mix_row["kl_mean"] / neighbour["kl_mean"] if neighbour["kl_mean"] else math.nan
        lines.append(
            f"mix {mix_row['bpw']:.2f} bpw ({mix_row['file_bytes'] / 1e6:.3f} MB): mean KLD "
            f"{mix_row['kl_mean']:.6f}; {neighbour['label']} {neighbour['bpw']:.2f} bpw "
            f"({neighbour['file_bytes'] / 1e6:.3f} MB): mean KLD {neighbour['kl_mean']:.6f} "
            f"({ratio:.2f}×)"
        )
    return lines


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| type | file MB | bpw | mean KLD | same top | predicted KLD | |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        label = "**mix**" if row["label"] == "mix" else row["label"]
        top = row.get("top1_agreement")
        top_unc = row.get("top1_agreement_unc")
        lines.append(
            f"| {label} | {row['file_bytes'] / 1e6:.3f} | {row['bpw']:.2f} | "
            f"{_num(row['kl_mean'])} ± {_num(row.get('kl_mean_unc'))} | "
            f"{_num(None if top is None else top * 100, 2)} ± "
            f"{_num(None if top_unc is None else top_unc * 100, 2)} % | "
            f"{_num(row.get('predicted_kld'))} | {row['note']} |"
        )
    return lines


METHOD = (
    "Method: the weight matrices are grouped ({granularity}); for each group and ladder type a "
    "file with that group alone at that type (every other weight at its source type) is "
    "measured against the float model (mean KLD on the held-out text). Every group starts at "
    "its lowest type; the upgrade (one group to a higher type) with the largest KLD decrease "
    "per byte that still fits the budget is applied until none fits. The predicted KLD is the "
    "sum of the groups' KLDs at their chosen types (assumes the groups' errors add up); the "
    "measured KLD is the mix file's own."
)


def write_report(run_dir: Path, record: Mapping[str, Any], rows, comparisons) -> Path:
    from ml_engine.run.files import write_text_atomic

    settings = record["settings"]
    lines = [
        f"# Quantization to a budget of {record['budget']['text']}",
        "",
        f"Model `{settings['model']}`; held-out text `{settings['text_path']}` "
        f"({settings['n_ctx']}-token chunks, {settings['n_chunks'] or 'all'} chunks); "
        f"ladder {', '.join(settings['ladder'])}; granularity {settings['granularity']}; "
        f"importance matrix: {record['imatrix']['file'] or 'none'} ({record['imatrix']['found']}).",
        "",
        *markdown_table(rows),
        "",
        *[f"- {line}" for line in comparisons],
        "",
        f"Mix: `{record['mix']['file']}`, general.file_type {record['mix']['file_type']}"
        + (
            "; the budget holds every group at its highest type: that mix is taken."
            if record["mix"]["all_highest"]
            else "."
        ),
        "",
        "| group | tensors | type | sensitivity KLD at it |",
        "|---|---:|---|---:|",
    ]
    for group in record["groups"]:
        chosen = record["mix"]["choice"].get(group["name"])
        kld = record["sensitivity"].get(group["name"], {}).get(chosen, {}).get("kl_mean")
        lines.append(
            f"| {group['name']} | {len(group['tensors'])} | {chosen or group['source_type']} | "
            f"{_num(kld)} |"
        )
    ladder = settings["ladder"]
    lines += [
        "",
        "Sensitivity (mean KLD of the group alone at each type):",
        "",
        "| group | " + " | ".join(ladder) + " |",
        "|---|" + "---:|" * len(ladder),
    ]
    for group, by_type in record["sensitivity"].items():
        cells = [_num(by_type[t]["kl_mean"]) if t in by_type else "n/a" for t in ladder]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += ["", METHOD.format(granularity=settings["granularity"]), ""]
    return write_text_atomic(run_dir / "budget.md", "\n".join(lines))


# ---------------------------------------------------------------- the entrypoint


def _gguf_file(value: Any) -> bool:
    return isinstance(value, str) and value.endswith(".gguf") and Path(value).expanduser().is_file()


def _text_file(value: Any) -> bool:
    return isinstance(value, str) and Path(value).expanduser().is_file()


def _gguf_path(value: Any) -> bool:
    return isinstance(value, str) and value.endswith(".gguf") and len(value) > len(".gguf")


def _ladder(value: Any) -> bool:
    try:
        check_ladder(list(value) if not isinstance(value, str) else value)
    except (UserError, TypeError):
        return False
    return True


def _rules() -> tuple[Rule, ...]:
    from ml_engine.llm.quantize import TENSOR_TYPES
    from ml_engine.llm.variants import quantize_rules

    return (
        Rule("model_path", _gguf_file, "an existing .gguf file (f32, f16 or bf16)"),
        Rule(
            "budget",
            _budget_value,
            "bits per weight (4.5 or 4.5bpw) or a file size (3.5MB, 3MiB, 900kB)",
        ),
        Rule("ladder", _ladder, "a list of tensor types among " + ", ".join(TENSOR_TYPES)),
        one_of("granularity", GRANULARITIES),
        optional(Rule("text_path", _text_file, "an existing UTF-8 text file")),
        optional(int_at_least("n_ctx", 8)),
        optional(int_at_least("n_chunks", 1)),
        optional(Rule("output", _gguf_path, "a file path ending in .gguf")),
        optional(int_at_least("n_threads", 1)),
        *quantize_rules(),
    )


QUANTIZE_BUDGET_RULES: tuple[Rule, ...] = _rules()


def _matrix(quantize_node: Mapping[str, Any], source: Path) -> tuple[dict[str, Any], dict]:
    """The quantizer's imatrix arguments and the record of which matrix (or why none)."""
    from ml_engine.llm.imatrix_gate import AUTO, NONE, check_setting, load_matrix, matrix_beside

    setting = check_setting(quantize_node.get("imatrix", NONE))
    if setting == NONE:
        return {}, {"setting": setting, "file": None, "found": "quantize.imatrix=none"}
    if setting == AUTO:
        path = matrix_beside(source)
        if not path.is_file():
            found = f"no {path.name} beside the model"
            return {}, {"setting": setting, "file": None, "found": found}
        found = "beside the model"
    else:
        path, found = Path(setting), "quantize.imatrix"
    matrix, digest = load_matrix(path, source)
    record = {"setting": setting, "file": str(path), "found": found, "sha256": digest}
    return {"imatrix": matrix, "imatrix_label": str(path)}, record


def _source(model: Path) -> tuple[Path, int | None]:
    from ml_engine.llm.models import read_gguf_facts
    from ml_engine.llm.quantize import SOURCE_PRECISIONS

    try:
        facts = read_gguf_facts(model)
    except (OSError, ValueError) as exc:
        raise UserError(f"model_path={model}: not a readable GGUF ({exc})") from None
    if facts.quantization not in SOURCE_PRECISIONS:
        raise UserError(
            f"model_path={model} is {facts.quantization}; the search quantizes a float file: "
            f"accepted: {', '.join(SOURCE_PRECISIONS)}"
        )
    return model, facts.context_length


def quantize_budget(cfg) -> dict[str, Any]:
    """The task of ``quantize.py``: the search, the mix file, ``budget.md`` and ``budget.json``
    in the run dir; prints the table and ``gguf: <path>`` last. ``cfg`` was checked against
    QUANTIZE_BUDGET_RULES by the job wrapper."""
    from ml_engine.llm.gguf_writer import held_out_text_path
    from ml_engine.llm.quantize import bits_per_weight, tensor_types_of
    from ml_engine.run.files import write_json_atomic

    started = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    model, context = _source(Path(str(cfg.model_path)).expanduser())
    budget = parse_budget(cfg.budget)
    ladder = check_ladder(list(cfg.ladder))
    granularity = str(cfg.granularity)
    quantize_node = cfg.get("quantize") or {}
    if quantize_node.get("tensor_types"):
        raise UserError(
            "quantize.tensor_types is set; quantize.py chooses every tensor's type itself: "
            "leave it out (quantize/tensor_types=none)"
        )
    if cfg.get("text_path"):
        text_path = Path(str(cfg.text_path)).expanduser()
    else:
        text_path = held_out_text_path(model)
        if not text_path.is_file():
            raise UserError(
                f"no held-out text beside {model.name} ({text_path.name}); give one: "
                "text_path=<file of text the model did not train on>"
            )
    n_ctx = int(cfg.n_ctx) if cfg.get("n_ctx") else min(int(context or 128), 128)
    n_chunks = int(cfg.n_chunks) if cfg.get("n_chunks") else None
    n_threads = int(cfg.n_threads) if cfg.get("n_threads") else None

    layout = read_layout(model)
    groups = group_weights(layout, granularity)
    options = {g.name: allowed_types(g, layout, ladder) for g in groups}
    check_feasible(budget, layout, budget_costs(budget, layout, groups, options), ladder)
    quantize_kwargs, matrix_record = _matrix(quantize_node, model)

    logging.getLogger("gguf").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix=".budget-", dir=run_dir))
    try:
        measurer = Measurer(
            model, text_path, n_ctx, n_chunks, n_threads, work, quantize_kwargs=quantize_kwargs
        )
        sensitivity = measure_sensitivities(measurer, layout, groups, options)
        costs = budget_costs(budget, layout, groups, options, measurer.header_bytes)
        check_feasible(budget, layout, costs, ladder)
        kld = {g: {t: row["kl_mean"] for t, row in by.items()} for g, by in sensitivity.items()}
        mix = greedy_mix(costs, kld)

        predicted_bpw = sum(
            tensor_bytes(layout.tensor(n).n_elements, mix.choice[g.name])
            if g.name in mix.choice
            else layout.tensor(n).n_bytes
            for g in groups
            for n in g.tensors
        ) + sum(t.n_bytes for t in layout.tensors if t.name not in layout.weights)
        predicted_bpw = predicted_bpw * 8 / layout.total_elements
        file_type = closest_uniform(predicted_bpw)
        patterns, wanted = mix_overrides(groups, layout, mix.choice)
        mix_path = measurer.make("mix", file_type, patterns)
        check_types(mix_path, wanted)
        mix_row = measurer.measure("mix", mix_path)
        mix_row["predicted_kld"] = mix.predicted_kld

        uniform = {}
        for quantization in UNIFORM_TYPES:
            path = measurer.make(quantization, quantization, None)
            uniform[quantization] = measurer.measure(quantization, path)
            path.unlink()
            print(
                f"uniform {quantization}: {uniform[quantization]['bpw']:.2f} bpw, mean KLD "
                f"{uniform[quantization]['kl_mean']:.6f}",
                flush=True,
            )
        mix_bpw = bits_per_weight(mix_path)
        output = (
            Path(str(cfg.output)).expanduser()
            if cfg.get("output")
            else run_dir / f"{model.stem}-mix-{mix_bpw:.2f}bpw.gguf"
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(mix_path), output)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mix_row["file"] = str(output)
    spent = mix_row["bpw"] if budget.kind == "bpw" else float(mix_row["file_bytes"])
    within = spent <= budget.value + 1e-9
    if not within:  # the arithmetic is exact for llama.cpp's layout: a new layout would do this
        log.warning("the mix takes %s, over the budget of %s", budget.describe(spent), budget.text)
    rows, below, above = table_rows(mix_row, uniform)
    comparisons = comparison_lines(mix_row, below, above)
    stored = tensor_types_of(output)
    record: dict[str, Any] = {
        "settings": {
            "model": str(model),
            "text_path": str(text_path),
            "n_ctx": n_ctx,
            "n_chunks": n_chunks,
            "ladder": list(ladder),
            "granularity": granularity,
            "n_threads": n_threads,
        },
        "budget": {
            **asdict(budget),
            "limit_bytes": costs.limit,
            "spent": spent,
            "within": within,
            "counted_as": "tensor bytes" if budget.kind == "bpw" else "file bytes",
        },
        "imatrix": matrix_record,
        "groups": [
            {
                "name": g.name,
                "pattern": g.pattern,
                "tensors": list(g.tensors),
                "types": list(options[g.name]),
                "source_type": layout.tensor(g.tensors[0]).type,
            }
            for g in groups
        ],
        "sensitivity": sensitivity,
        "mix": {
            "file": str(output),
            "file_type": file_type,
            "choice": mix.choice,
            "all_highest": mix.all_highest,
            "steps": mix.steps,
            "cost_bytes": mix.cost,
            "predicted_kld": mix.predicted_kld,
            "predicted_bpw": predicted_bpw,
            "measured": mix_row,
            "tensor_types": stored,
        },
        "uniform": uniform,
        "table": [{k: v for k, v in row.items()} for row in rows],
        "comparison": comparisons,
        "method": METHOD.format(granularity=granularity),
    }
    record["wall_s"] = round(time.perf_counter() - started, 3)
    write_json_atomic(run_dir / "budget.json", record)
    report = write_report(run_dir, record, rows, comparisons)
    print("\n".join(markdown_table(rows)), flush=True)
    for line in comparisons:
        print(line, flush=True)
    print(f"report: {report}", flush=True)
    print(f"gguf: {output}", flush=True)
    return {
        "gguf": str(output),
        "budget": budget.text,
        "bpw": round(mix_row["bpw"], 4),
        "file_mb": round(mix_row["file_bytes"] / 1e6, 3),
        "kl_mean": mix_row["kl_mean"],
        "kl_mean_unc": mix_row["kl_mean_unc"],
        "predicted_kld": mix.predicted_kld,
        "file_type": file_type,
        "imatrix": matrix_record.get("file"),
        "choice": mix.choice,
        "wall_s": record["wall_s"],
    }


def load_record(run_dir: Path) -> dict[str, Any]:
    """``budget.json`` of a run."""
    return json.loads((Path(run_dir) / "budget.json").read_text(encoding="utf-8"))
