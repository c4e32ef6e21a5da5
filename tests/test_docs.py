"""The docs: generated reference pages complete, links resolving, marked command blocks running.

A runnable block is a fenced ```bash block right under the line
``<!-- docs-test: run [override ...] -->`` in README.md or docs/**/*.md. Its commands (blank
lines and ``#`` comments skipped, ``\\`` continuing a line) run with bash in the repository
root, a page's blocks in order in one shell, and must exit 0. Every ``python <script>.py``
command gets the marker's overrides appended, then ``paths.log_dir`` and ``paths.models_dir``
in the page's temporary folder; a ``key=outputs/...`` argument of its own (a file a page writes
or reads under the user's ``outputs/``, e.g. ``output=outputs/x.gguf``) is that folder's
``outputs/`` too, so pages running at once never share a file. Data (``paths.data_dir``) stays
the repository's ``data/``, so the MNIST download is shared with every other run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from ml_engine.run.locations import PROJECT_ROOT

CONF_DIR = PROJECT_ROOT / "conf"
README = PROJECT_ROOT / "README.md"
DOCS_DIR = PROJECT_ROOT / "docs"
README_MAX_LINES = 300

MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*run(?:\s+(?P<overrides>.*?))?\s*-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*docs-test\b")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
PAGE_TIMEOUT_S = 600


def _reference() -> ModuleType:
    """docs/hooks/reference.py, the MkDocs hook that generates the reference pages."""
    name = "ml_engine_docs_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DOCS_DIR / "hooks" / "reference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def doc_pages() -> list[Path]:
    """README.md, then every markdown page of docs/ (generated ones are never on disk)."""
    return [README, *sorted(DOCS_DIR.rglob("*.md"))]


def _name(page: Path) -> str:
    return (
        page.relative_to(PROJECT_ROOT).as_posix()
        if page.is_relative_to(PROJECT_ROOT)
        else str(page)
    )


# ---------------------------------------------------------------- the marked blocks


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    overrides: list[str]
    commands: list[str]


def _commands(lines: list[str]) -> list[str]:
    """A bash block's commands: blank and comment lines skipped, ``\\`` lines continued."""
    commands: list[str] = []
    pending: list[str] = []
    for line in lines:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        if not line.rstrip().endswith("\\"):
            commands.append("\n".join(pending))
            pending = []
    if pending:
        commands.append("\n".join(pending))
    return commands


def parse_blocks(text: str, page: Path) -> tuple[list[Block], list[str]]:
    """The page's marked blocks, and what is wrong with its markers (a malformed one, one not
    right above a ```bash fence). Markers inside code blocks are examples, not markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    errors: list[str] = []
    fence: str | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        opening = FENCE.match(line)
        if fence is not None:
            if opening and opening["fence"].startswith(fence) and not opening["info"]:
                fence = None
            index += 1
            continue
        if opening:
            fence = opening["fence"]
            index += 1
            continue
        if ANY_MARKER.search(line):
            where = f"{_name(page)}:{index + 1}"
            marker = MARKER.match(line)
            nxt = FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
            if not marker:
                errors.append(f"{where}: malformed marker {line.strip()!r}")
            elif not nxt or nxt["info"] != "bash" or nxt["fence"][0] != "`":
                errors.append(f"{where}: the marker is not right above a ```bash block")
            else:
                body: list[str] = []
                indent = len(nxt["indent"])
                end = index + 2
                while end < len(lines):
                    closing = FENCE.match(lines[end])
                    if closing and closing["fence"].startswith(nxt["fence"]):
                        break
                    body.append(lines[end][indent:])
                    end += 1
                overrides = shlex.split(marker["overrides"] or "")
                commands = _commands(body)
                if commands:
                    blocks.append(Block(page, index + 2, overrides, commands))
                else:
                    errors.append(f"{where}: the marked block runs nothing")
                index = end + 1
                continue
        index += 1
    return blocks, errors


def marked_blocks() -> dict[str, list[Block]]:
    found: dict[str, list[Block]] = {}
    for page in doc_pages():
        blocks, _ = parse_blocks(page.read_text(encoding="utf-8"), page)
        if blocks:
            found[_name(page)] = blocks
    return found


SHIM = """#!/usr/bin/env bash
# the docs test's python: a script (python <x>.py ...) gets the block's overrides appended, and
# its key=outputs/... arguments point into the page's own outputs folder
if [[ $# -gt 0 && "$1" == *.py ]]; then
  mapfile -t extra < {overrides}
  outputs={outputs}
  args=()
  for arg in "$@"; do
    if [[ "$arg" == *=outputs/* ]]; then
      arg="${{arg%%=outputs/*}}=$outputs/${{arg#*=outputs/}}"
    fi
    args+=("$arg")
  done
  exec {python} "${{args[@]}}" "${{extra[@]}}"
fi
exec {python} "$@"
"""


def page_script(blocks: list[Block], tmp: Path, python: str) -> Path:
    """A bash script in ``tmp`` running the page's blocks, the first failing command stopping
    it. ``python`` and ``python3`` are shims first on its PATH (so ``timeout 60 python x.py``
    is caught too): ``python <x>.py`` gets the block's overrides, then the temporary output
    folders, appended; its ``key=outputs/...`` arguments name the temporary ``outputs/``."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    overrides_file = tmp / "overrides"
    for name in ("python", "python3"):
        shim = bin_dir / name
        shim.write_text(
            SHIM.format(
                overrides=shlex.quote(str(overrides_file)),
                outputs=shlex.quote(str(tmp / "outputs")),
                python=shlex.quote(python),
            )
        )
        shim.chmod(0o755)
    outputs = [f"paths.log_dir={tmp / 'outputs'}", f"paths.models_dir={tmp / 'models'}"]
    lines = ["set -o pipefail", f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"']
    for block in blocks:
        where = f"{_name(block.page)}:{block.line}"
        overrides = " ".join(shlex.quote(o) for o in [*block.overrides, *outputs])
        lines += [
            f"cd {shlex.quote(str(PROJECT_ROOT))}",
            f"printf '%s\\n' {overrides} > {shlex.quote(str(overrides_file))}",
        ]
        for command in block.commands:
            shown = shlex.quote(f"docs-test ({where}): $ {command}")
            lines += [
                f"printf '%s\\n' {shown}",
                command,
                "__rc=$?",
                f'if [ "$__rc" -ne 0 ]; then printf \'%s\\n\' {shown}" exited $__rc"; '
                'exit "$__rc"; fi',
            ]
    script = tmp / "page.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


def _steps(blocks: list[Block]) -> list[tuple[tuple[str, ...], list[object]]]:
    """Each block's overrides and commands as bash splits them (comments dropped; a command
    shlex cannot split stays its text)."""

    def words(command: str) -> object:
        try:
            return tuple(shlex.split(command, comments=True))
        except ValueError:
            return command

    return [(tuple(block.overrides), [words(c) for c in block.commands]) for block in blocks]


def covering_page(page: str, pages: dict[str, list[Block]]) -> str | None:
    """Another page whose run begins with this page's whole run: the same blocks with the same
    overrides and the same commands in order, only its last block possibly going on. Every run
    starts in a fresh folder, so that page's run runs this page's commands exactly as this
    page's own would (of two such pages, the longer covers, then the first by name)."""
    mine = _steps(pages[page])
    *whole, (last_overrides, last_commands) = mine
    size = sum(len(commands) for _, commands in mine)
    for other in sorted(pages):
        theirs = _steps(pages[other])
        if other == page or len(theirs) < len(mine) or theirs[: len(whole)] != whole:
            continue
        overrides, commands = theirs[len(whole)]
        if overrides != last_overrides or commands[: len(last_commands)] != last_commands:
            continue
        other_size = sum(len(c) for _, c in theirs)
        if other_size > size or other < page:
            return other
    return None


_BLOCKS = marked_blocks()


@pytest.mark.slow
@pytest.mark.parametrize("page", list(_BLOCKS))
def test_the_marked_blocks_of_a_page_run(
    page: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    covering = covering_page(page, _BLOCKS)
    if covering is not None and any(
        item.name == f"{request.node.originalname}[{covering}]" for item in request.session.items
    ):
        pytest.skip(f"{covering}'s run in this session begins with exactly these commands")
    script = page_script(_BLOCKS[page], tmp_path, sys.executable)
    env = {
        **os.environ,
        "PROJECT_ROOT": str(PROJECT_ROOT),
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        ["bash", str(script)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=PAGE_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-6000:]


def test_a_page_whose_commands_another_page_runs_first_is_covered_by_it() -> None:
    train = ["trainer.max_epochs=1"]
    pages = {
        "README.md": [
            Block(README, 1, train, ["python train.py   # the default", "python train.py x=1"]),
            Block(README, 9, [], ["python export.py ckpt_path=last"]),
        ],
        "docs/a.md": [Block(README, 1, train, ["python train.py"])],
        "docs/b.md": [Block(README, 1, [], ["python train.py"])],  # other overrides
        "docs/c.md": [Block(README, 1, train, ["python train.py x=1"])],  # not from the start
        "docs/d.md": [
            Block(README, 1, train, ["python train.py"]),
            Block(README, 5, [], ["python export.py ckpt_path=last"]),  # README's goes between
        ],
        "docs/e.md": [Block(README, 1, train, ["python  train.py"])],  # same words as a.md
    }
    covering = {page: covering_page(page, pages) for page in pages}
    assert covering == {
        "README.md": None,
        "docs/a.md": "README.md",
        "docs/b.md": None,
        "docs/c.md": None,
        "docs/d.md": None,
        "docs/e.md": "README.md",
    }
    # two pages of the same commands: one runs, the other is covered by it
    same = {"x.md": pages["docs/a.md"], "y.md": pages["docs/e.md"]}
    assert (covering_page("x.md", same), covering_page("y.md", same)) == (None, "x.md")


def test_markers_sit_right_above_bash_blocks() -> None:
    errors = []
    for page in doc_pages():
        errors += parse_blocks(page.read_text(encoding="utf-8"), page)[1]
    assert not errors, "\n".join(errors)


def test_blocks_are_read_as_the_convention_says(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    text = "\n".join(
        [
            "<!-- docs-test: run trainer.max_epochs=1 'tags=[a, b]' -->",
            "```bash",
            "# a comment",
            "python train.py \\",
            "  model=mlp_mnist",
            "",
            "ls",
            "```",
            "```markdown",
            "<!-- docs-test: run -->",
            "```",
            "<!-- docs-test: run -->",
            "```python",
            "print()",
            "```",
            "<!-- docs-test: runs -->",
            "<!-- docs-test: run -->",
            "```bash",
            "# only a comment",
            "```",
        ]
    )
    blocks, errors = parse_blocks(text, page)
    assert [(b.line, b.overrides, b.commands) for b in blocks] == [
        (
            2,
            ["trainer.max_epochs=1", "tags=[a, b]"],
            ["python train.py \\\n  model=mlp_mnist", "ls"],
        )
    ]
    assert len(errors) == 3, errors
    assert "```bash" in errors[0] and "malformed" in errors[1] and "nothing" in errors[2]


def test_the_page_script_appends_overrides_to_python_scripts_only(tmp_path: Path) -> None:
    fake = tmp_path / "fake-python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s|" "$@" >> "$LOG"; echo >> "$LOG"\n')
    fake.chmod(0o755)
    commands = [
        "python x.py -m c=3 | cat",
        "python -V",
        "timeout 60 python3 y.py out=outputs/a=outputs/b.gguf d=my/outputs/c",
        "cd /; pwd",
    ]
    blocks = [Block(README, 1, ["a=1", "b=two words"], commands), Block(README, 9, [], ["pwd"])]
    script = page_script(blocks, tmp_path, str(fake))
    log = tmp_path / "log"
    result = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "LOG": str(log)},
        check=True,
        capture_output=True,
        text=True,
    )
    out = f"paths.log_dir={tmp_path / 'outputs'}|paths.models_dir={tmp_path / 'models'}|"
    assert log.read_text().splitlines() == [
        f"x.py|-m|c=3|a=1|b=two words|{out}",
        "-V|",
        # outputs/ opening a value is the page's own; nothing else changes
        f"y.py|out={tmp_path / 'outputs'}/a=outputs/b.gguf|d=my/outputs/c|a=1|b=two words|{out}",
    ]
    # each block starts in the repository root
    assert [line for line in result.stdout.splitlines() if line.startswith("/")] == [
        "/",
        str(PROJECT_ROOT),
    ]
    failing = page_script([Block(README, 3, [], ["true", "false", "true"])], tmp_path, str(fake))
    result = subprocess.run(["bash", str(failing)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "docs-test (README.md:3): $ false exited 1"


def test_every_entrypoint_takes_the_output_overrides(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from ml_engine.__main__ import ENTRYPOINTS

    scripts = sorted(PROJECT_ROOT.glob("*.py"))
    tasks = [re.search(r"launch_task\(\"(\w+)\"\)", path.read_text()) for path in scripts]
    names = [task.group(1) for task in tasks if task]
    assert {"train", "eval", "predict", "export", "generate", "serve"} <= set(names)
    overrides = [f"paths.log_dir={tmp_path}/outputs", f"paths.models_dir={tmp_path}/models"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in names:
            cfg = compose(ENTRYPOINTS[name].config_name, overrides=overrides)
            assert cfg.paths.log_dir == f"{tmp_path}/outputs", name
            assert cfg.paths.models_dir == f"{tmp_path}/models", name
            # data stays the repository's: the runs share its MNIST download
            assert OmegaConf.to_container(cfg.paths)["data_dir"] == "${paths.root_dir}/data/"
    GlobalHydra.instance().clear()


# ---------------------------------------------------------------- the generated reference


def _leaf_keys(node: object, path: tuple[str, ...] = ()) -> list[str]:
    if isinstance(node, dict) and node:
        return [k for key, value in node.items() for k in _leaf_keys(value, (*path, str(key)))]
    return [".".join(path)] if path and path != ("defaults",) else []


def _sections(page: str) -> dict[str, str]:
    """The page's text under each heading, by the heading's code span."""
    parts = re.split(r"^#{2,4} `([^`]+)`.*$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_configuration_reference_has_every_group_option_and_key() -> None:
    page = _reference().configuration_reference(CONF_DIR)
    sections = _sections(page)
    missing = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        rel = path.relative_to(CONF_DIR).with_suffix("").as_posix()
        title = f"{rel}.yaml" if path.parent == CONF_DIR else rel
        if path.parent != CONF_DIR and path.parent.relative_to(CONF_DIR).as_posix() not in sections:
            missing.append(f"group {path.parent.relative_to(CONF_DIR).as_posix()}")
        section = sections.get(title)
        if section is None:
            missing.append(f"config {title}")
            continue
        for key in _leaf_keys(yaml.safe_load(path.read_text()) or {}):
            if not re.search(rf"\| `([\w.]+\.)?{re.escape(key)}` \|", section):
                missing.append(f"{title}: {key}")
    assert not missing, missing


def _plain(text: str) -> str:
    """Markdown back to the words: escapes, code spans, line breaks and entities undone."""
    text = re.sub(r"\\(.)", r"\1", text.replace("<br>", " ").replace("`", ""))
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return " ".join(text.split())


def test_the_configuration_reference_keeps_every_comment() -> None:
    page = _plain(_reference().configuration_reference(CONF_DIR))
    lost = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        for line in path.read_text().splitlines():
            comment = line.strip()
            if comment.startswith("#") and not comment.startswith("# @package"):
                words = " ".join(comment.lstrip("#").replace("`", "").split())
                if words and words not in page:
                    lost.append(f"{path.relative_to(CONF_DIR)}: {words}")
    assert not lost, lost


def test_the_api_reference_lists_every_route(tmp_path: Path) -> None:
    from fastapi.routing import APIRoute

    reference = _reference()
    app = reference.build_app(tmp_path)
    page = reference.server_api_reference(app.openapi())

    def api_routes(routes: list) -> list[APIRoute]:
        # FastAPI >= 0.16x keeps an included router as one entry (original_router: its routes);
        # earlier versions copy its routes into the app's
        found = []
        for route in routes:
            if isinstance(route, APIRoute):
                found.append(route)
            elif hasattr(route, "original_router"):
                found += api_routes(route.original_router.routes)
        return found

    routes = [
        (method, route.path)
        for route in api_routes(app.routes)
        if route.include_in_schema
        for method in sorted(route.methods)
    ]
    assert len(routes) > 10
    missing = [f"{m} {p}" for m, p in routes if f"### {m} `{p}`" not in page]
    assert not missing, missing
    for name in app.openapi()["components"]["schemas"]:
        assert f"### {name} {{#" in page, name


# ---------------------------------------------------------------- links and length

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"(?:href|src)=\"([^\"]+)\"")
GENERATED = {"reference/configuration.md", "reference/server-api.md"}


def _prose_only(text: str) -> str:
    """The page without its code blocks and code spans."""
    out, fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening["fence"]
        elif fence is not None and opening and opening["fence"].startswith(fence):
            fence = None
        elif fence is None:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _anchors(page: Path) -> set[str]:
    """The ids a page's headings get, as MkDocs (Python-Markdown's toc) and GitHub make them,
    and the explicit ones ({#id}, id="...")."""
    from markdown.extensions.toc import slugify

    text = _prose_only(page.read_text(encoding="utf-8"))
    ids = set(re.findall(r"\{[^}]*#([\w-]+)[^}]*\}", text)) | set(
        re.findall(r"id=\"([^\"]+)\"", text)
    )
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        heading = re.sub(r"\{[^}]*\}$", "", heading).strip()
        words = re.sub(r"[`*_]|<[^>]+>|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        ids.add(slugify(words, "-"))
        ids.add(re.sub(r"[^\w\- ]", "", words.lower()).replace(" ", "-"))
    return ids


def test_relative_links_point_at_existing_files() -> None:
    def anchors(page: Path, target: str) -> bool:
        return target.split("#", 1)[1] in _anchors(page)

    broken = []
    for page in doc_pages():
        text = _prose_only(page.read_text(encoding="utf-8"))
        targets = LINK.findall(text) + REF_LINK.findall(text) + HTML_LINK.findall(text)
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # a URL, or an anchor of the same page
            path = target.split("#", 1)[0].split("?", 1)[0]
            resolved = (page.parent / path).resolve()
            generated = (
                resolved.is_relative_to(DOCS_DIR)
                and resolved.relative_to(DOCS_DIR).as_posix() in GENERATED
            )
            if generated and page != README:
                continue  # made by the site build (docs/hooks/reference.py)
            if generated:
                broken.append(f"{_name(page)}: {target} (made by the site build, not on GitHub)")
            elif not resolved.exists():
                broken.append(f"{_name(page)}: {target}")
            elif "#" in target and resolved.suffix == ".md" and not anchors(resolved, target):
                broken.append(f"{_name(page)}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_stays_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"
