"""The docs site's generated reference pages (an MkDocs hook; mkdocs.yml ``hooks:``).

``configuration_reference(conf_dir)`` renders every config under ``conf/`` (primary configs,
config groups, nested groups) with its keys, defaults and the YAML comments above them, which
are the configs' documentation; ``server_api_reference()`` renders the REST API from the
FastAPI app's OpenAPI schema. Both run at build time, so the pages cannot go stale; their
markdown is never committed.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
# the configs an entrypoint composes (conf/<name>.yaml), in the order the pages are read
PRIMARY = ("train", "eval", "predict", "export", "generate", "serve")
CONFIG_PAGE = "reference/configuration.md"
API_PAGE = "reference/server-api.md"

_KEY = re.compile(
    r"^(?P<indent>\s*)(?P<dash>-\s+)?(?P<key>[^\s'\"#{\[\-][^:#]*?):(?:\s+(?P<value>.*))?$"
)
_ITEM = re.compile(r"^(?P<indent>\s*)-\s+(?P<value>.*)$")


# ---------------------------------------------------------------- reading the YAML comments


@dataclass
class ConfigFile:
    """One YAML file of conf/: its values, its @package, its header and the comments above
    (or after) each key, by key path (list items by index)."""

    path: Path
    values: dict[str, Any]
    package: str | None = None
    header: list[str] = field(default_factory=list)
    comments: dict[tuple[Any, ...], list[str]] = field(default_factory=dict)


def _inline_comment(value: str) -> tuple[str, str | None]:
    """``value  # note`` → (value, note), outside quotes."""
    quote = None
    for i, char in enumerate(value):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or value[i - 1] in " \t"):
            return value[:i].rstrip(), value[i + 1 :].strip()
    return value, None


def read_config(path: Path) -> ConfigFile:
    """The file's values (yaml.safe_load) and its comments, attached by a line scanner: the
    comment lines right above a key (or list item) and the one after it on its line are that
    key's; those above the first key are the file's header."""
    text = path.read_text(encoding="utf-8")
    values = yaml.safe_load(text) or {}
    config = ConfigFile(path, values if isinstance(values, dict) else {"": values})
    pending: list[str] = []
    stack: list[tuple[int, tuple[Any, ...]]] = []  # (indent, path) of the open mappings
    items: dict[tuple[Any, ...], int] = {}  # list items seen per parent path
    seen_key = False

    def parent(indent: int) -> tuple[Any, ...]:
        while stack and stack[-1][0] >= indent:
            stack.pop()
        return stack[-1][1] if stack else ()

    def attach(key_path: tuple[Any, ...], note: str | None) -> None:
        lines = [*pending, *([note] if note else [])]
        if lines:
            config.comments.setdefault(key_path, []).extend(lines)
        pending.clear()

    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped:
            if pending and not seen_key:  # a blank line ends the header's paragraph
                pending.append("")
            continue
        if stripped.startswith("#"):
            note = stripped[1:]
            note = note[1:] if note.startswith(" ") else note
            if not seen_key and note.startswith("@package"):
                config.package = note.split(None, 1)[1].strip()
            else:
                pending.append(note)
            continue
        if not seen_key:
            config.header = [*pending]
            while config.header and not config.header[-1]:
                config.header.pop()
            pending.clear()
            seen_key = True
        match = _KEY.match(raw)
        item = _ITEM.match(raw)
        if item and not (match and match["dash"]):  # a scalar list item
            indent = len(item["indent"])
            owner = parent(indent + 1)
            index = items.get(owner, 0)
            items[owner] = index + 1
            attach((*owner, index), _inline_comment(item["value"])[1])
            continue
        if not match:  # a continuation line (a flow list, a long string)
            continue
        indent = len(match["indent"])
        value, note = _inline_comment(match["value"] or "")
        if match["dash"]:  # "- key: value": a mapping inside a list item
            owner = parent(indent + 1)
            index = items.get(owner, 0)
            items[owner] = index + 1
            attach((*owner, index), note)
            key_path = (*owner, index, match["key"].strip())
            indent += len(match["dash"])
        else:
            key_path = (*parent(indent), match["key"].strip())
            attach(key_path, note)
        if not value:
            stack.append((indent, key_path))
    if pending:
        config.comments.setdefault(("",), []).extend(line for line in pending if line)
    return config


# ---------------------------------------------------------------- markdown helpers


def _code(value: str) -> str:
    ticks = "``" if "`" in value else "`"
    pad = " " if ticks == "``" else ""
    return f"{ticks}{pad}{value}{pad}{ticks}"


_MD_SPECIAL = re.compile(r"([\\*_\[\]|])")


def _text(value: str) -> str:
    """Prose for markdown: code spans kept, markdown's specials escaped, no raw HTML."""
    parts = re.split(r"(`[^`]*`)", value)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(part.replace("|", "\\|"))
        else:
            part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            out.append(_MD_SPECIAL.sub(r"\\\1", part))
    return "".join(out)


_COMMAND = re.compile(r"\bpython (?:-m \S+|\S+\.py)")
_TOKEN = re.compile(r"(?:[^\s\"'<]+|\"[^\"]*\"|'[^']*'|<[^>]*>)+")
_TERM = re.compile(r"^[\w./-]+: ")  # "term: what it means" lines of a list
_ARGUMENT = re.compile(r"^[\[\-]|=|\]$|^\.\.\.$")


def _commands(line: str) -> str:
    """A comment line with its ``python x.py args`` commands as code, the rest as prose."""
    out, start = [], 0
    for match in _COMMAND.finditer(line):
        if match.start() < start or "`" in line:
            continue
        end = match.end()
        for token in _TOKEN.finditer(line, end):
            if line[end : token.start()].strip() or not _ARGUMENT.search(token.group()):
                break
            end = token.end()
        out += [_text(line[start : match.start()]), _code(line[match.start() : end])]
        start = end
    return "".join([*out, _text(line[start:])])


def _prose(lines: Iterable[str], *, cell: bool = False) -> str:
    """Comment lines as one paragraph (cell: a table cell); a line indented after ``#`` or
    that is a command stands on its own line, as code."""
    brk = "<br>" if cell else "\n\n"
    pieces: list[str] = []
    for line in lines:
        text = line.strip()
        if not text:
            pieces.append(brk)
        elif _TERM.match(text) and pieces and pieces[-1] != brk:
            pieces += [brk, _commands(text)]
        elif line.startswith("  ") or _COMMAND.match(text):
            pieces += [brk, _commands(text) if _COMMAND.match(text) else _code(text), brk]
        else:
            pieces.append(_commands(text))
    joined = re.sub(r" ?(<br>|\n\n) ?", r"\1", " ".join(pieces))
    joined = re.sub(r"(<br>)+", "<br>", joined) if cell else re.sub(r"\n{3,}", "\n\n", joined)
    return joined.strip().removeprefix("<br>").removesuffix("<br>").strip()


def _flow(value: Any) -> str:
    """A value as it would be written in YAML on one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return (
            json.dumps(value, ensure_ascii=False)
            if value == "" or value.strip() != value
            else value
        )
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return str(value)


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _anchor(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-") for part in parts)


# ---------------------------------------------------------------- the configuration reference


def config_groups(conf_dir: Path) -> dict[str, list[str]]:
    """Every config group under ``conf_dir`` (``llm/model``, ``hydra/launcher``: nested ones by
    their path) and its options (file stems), sorted."""
    groups: dict[str, list[str]] = {}
    for path in sorted(conf_dir.rglob("*.yaml")):
        if path.parent == conf_dir:
            continue
        group = path.parent.relative_to(conf_dir).as_posix()
        groups.setdefault(group, []).append(path.stem)
    return dict(sorted(groups.items()))


def _defaults_entry(entry: Any) -> tuple[str, str]:
    """A defaults-list entry as (group, option)."""
    if isinstance(entry, dict):
        ((group, option),) = entry.items()
        return str(group), _flow(option)
    return "", str(entry)


def _key_rows(config: ConfigFile, prefix: str) -> Iterator[tuple[str, str, str]]:
    """(dotted key as overridden on the command line, default, description) per key."""

    def walk(node: dict[str, Any], path: tuple[Any, ...]) -> Iterator[tuple[str, str, str]]:
        for key, value in node.items():
            key_path = (*path, key)
            if key_path == ("defaults",):
                continue
            name = ".".join(str(part) for part in key_path)
            dotted = f"{prefix}.{name}" if prefix else name
            notes = list(config.comments.get(key_path, []))
            if isinstance(value, list):  # comments above list items belong to the key too
                for index in range(len(value)):
                    notes += config.comments.get((*key_path, index), [])
            if isinstance(value, dict) and value:
                if notes:
                    yield _code(dotted), "", _prose(notes, cell=True)
                yield from walk(value, key_path)
            else:
                yield _code(dotted), _code(_flow(value)), _prose(notes, cell=True)

    yield from walk(config.values, ())


def _package(config: ConfigFile, group: str | None) -> str:
    """Where the file's keys land in the composed config (``""``: at its root)."""
    package = config.package or (group.replace("/", ".") if group else "_global_")
    if package.startswith("_global_"):
        package = package.removeprefix("_global_").lstrip(".")
    elif package == "_group_":
        package = group.replace("/", ".") if group else ""
    return package


def _config_section(config: ConfigFile, group: str | None, title: str, level: str) -> list[str]:
    name = config.path.stem
    anchor = _anchor("option", group, name) if group else _anchor("config", name)
    lines = [f"{level} {title} {{#{anchor}}}", ""]
    source = f"conf/{group}/{name}.yaml" if group else f"conf/{name}.yaml"
    package = _package(config, group)
    where = f"keys under {_code(package)}" if package else "keys at the config's root"
    lines += [f"{_code(source)} · {where}", ""]
    if config.header:
        lines += [_prose(config.header), ""]
    defaults = config.values.get("defaults")
    if isinstance(defaults, list) and defaults:
        rows = []
        for index, entry in enumerate(defaults):
            entry_group, option = _defaults_entry(entry)
            notes = config.comments.get(("defaults", index), [])
            bare = entry_group.split()[-1].lstrip("/") if entry_group else ""
            link = (
                f"[{_code(entry_group)}](#{_anchor('group', bare)})"
                if bare in _GROUPS
                else (_code(entry_group) if entry_group else "")
            )
            rows.append((link, _code(option), _prose(notes, cell=True)))
        lines += ["Defaults list:", "", *_table(("group", "option", "notes"), rows)]
    rows = list(_key_rows(config, package))
    if rows:
        lines += _table(("key", "default", "description"), rows)
    footer = config.comments.get(("",))
    if footer:
        lines += [_prose(footer), ""]
    return lines


_GROUPS: set[str] = set()  # the groups of the page being rendered, for the defaults' links


def configuration_reference(conf_dir: Path = CONF_DIR) -> str:
    """The configuration reference page: the primary configs, then every group and option."""
    conf_dir = Path(conf_dir)
    groups = config_groups(conf_dir)
    _GROUPS.clear()
    _GROUPS.update(groups)
    primary = [name for name in PRIMARY if (conf_dir / f"{name}.yaml").is_file()]
    primary += sorted(p.stem for p in conf_dir.glob("*.yaml") if p.stem not in primary)
    configs = {name: read_config(conf_dir / f"{name}.yaml") for name in primary}
    chosen: dict[str, list[str]] = {}  # group → "option in train.yaml" notes
    for name, config in configs.items():
        for entry in config.values.get("defaults") or []:
            group, option = _defaults_entry(entry)
            if group and not group.startswith("override "):
                bare = group.split()[-1]
                chosen.setdefault(bare, []).append(f"{_code(option)} in {_code(name + '.yaml')}")

    lines = [
        "# Configuration reference",
        "",
        "Generated from `conf/` when the site is built, so it lists what the configs hold now.",
        "Every key can be overridden on the command line (`python train.py key=value`), every",
        "group chosen (`python train.py group=option`, nested groups as `llm/model=tiny`); the",
        "descriptions are the comments in the YAML files. `python <script>.py --cfg job` prints",
        "the composed config of a command line.",
        "",
        "## Primary configs",
        "",
        "Each entrypoint composes one: `python train.py` reads `conf/train.yaml`, and so on.",
        "",
    ]
    lines += _table(
        ("config", "usage"),
        (
            (
                f"[{_code(name + '.yaml')}](#{_anchor('config', name)})",
                _prose(configs[name].header[:1], cell=True),
            )
            for name in primary
        ),
    )
    for name in primary:
        lines += _config_section(configs[name], None, _code(f"{name}.yaml"), "###")

    # options that defaults lists choose but conf/ has no file for: Hydra's or its plugins'
    # (hydra/sweeper: optuna, hydra/launcher: submitit_slurm)
    foreign: dict[str, set[str]] = {}
    for path in sorted(conf_dir.rglob("*.yaml")):
        own = path.parent.relative_to(conf_dir).as_posix()
        for entry in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("defaults", []):
            group, option = _defaults_entry(entry)
            group = group.split()[-1].lstrip("/") if group else own
            if group in groups and option not in (*groups[group], "null", "_self_"):
                foreign.setdefault(group, set()).add(option)

    def listed(group: str, link: bool) -> str:
        names = [
            f"[{_code(option)}](#{_anchor('option', group, option)})" if link else _code(option)
            for option in groups[group]
        ]
        names += [f"{_code(option)} (Hydra's)" for option in sorted(foreign.get(group, ()))]
        return ", ".join(names)

    lines += [
        "## Config groups",
        "",
        "A group is a folder of `conf/`; its options are the files in it (and, marked Hydra's,",
        "the ones Hydra or an installed Hydra plugin provides that a config here selects).",
        "",
    ]
    lines += _table(
        ("group", "options", "default"),
        (
            (
                f"[{_code(group)}](#{_anchor('group', group)})",
                listed(group, link=True),
                "; ".join(chosen.get(group, [])) or "none: chosen on the command line",
            )
            for group, options in groups.items()
        ),
    )
    for group, options in groups.items():
        lines += [f"### {_code(group)} {{#{_anchor('group', group)}}}", ""]
        usage = f"`python <script>.py {group}=<option>`"
        lines += [f"Options: {listed(group, link=False)}. Chosen with {usage}.", ""]
        if chosen.get(group):
            lines += [f"Default: {'; '.join(chosen[group])}.", ""]
        for option in options:
            config = read_config(conf_dir / group / f"{option}.yaml")
            lines += _config_section(config, group, _code(f"{group}/{option}"), "####")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- the server API reference


def build_app(workdir: Path) -> Any:
    """The app as ``python serve.py`` builds it (``create_app`` on the composed serve config),
    its files under ``workdir``; no server is started, no model loaded."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from ml_engine.run.locations import CONFIG_DIR
    from ml_engine.server.app import create_app

    overrides = [
        f"paths.log_dir={workdir}/outputs",
        f"paths.models_dir={workdir}/models",
        f"paths.data_dir={workdir}/data",
        "api_key=null",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("serve", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    try:
        return create_app(cfg)
    finally:
        GlobalHydra.instance().clear()


def openapi_schema() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ml-engine-docs-") as workdir:
        return build_app(Path(workdir)).openapi()


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """A JSON schema's type in words, component schemas linked."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[{name}](#{_anchor('schema', name)})"
    if "anyOf" in schema or "oneOf" in schema:
        kinds = [_type(s) for s in schema.get("anyOf", schema.get("oneOf", []))]
        return " or ".join(dict.fromkeys(kinds))
    if "allOf" in schema:
        return " and ".join(_type(s) for s in schema["allOf"])
    if "const" in schema:
        return _code(json.dumps(schema["const"]))
    if "enum" in schema:
        return "one of " + ", ".join(_code(json.dumps(v)) for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "string" and schema.get("format") == "binary":
        return "file"
    if kind == "object" and "additionalProperties" in schema and not schema.get("properties"):
        extra = schema["additionalProperties"]
        return f"object of {_type(extra)}" if isinstance(extra, dict) else "object"
    return _code(kind) if isinstance(kind, str) else " or ".join(_code(k) for k in kind)


_CONSTRAINTS = {
    "minimum": "≥ {}",
    "exclusiveMinimum": "> {}",
    "maximum": "≤ {}",
    "exclusiveMaximum": "< {}",
    "minLength": "at least {} characters",
    "maxLength": "at most {} characters",
    "minItems": "at least {} items",
    "maxItems": "at most {} items",
    "pattern": "matches `{}`",
}


def _constraints(schema: dict[str, Any]) -> list[str]:
    found = [fmt.format(schema[k]) for k, fmt in _CONSTRAINTS.items() if k in schema]
    for sub in schema.get("anyOf", []):
        found += _constraints(sub)
    return found


def _describe(schema: dict[str, Any]) -> str:
    text = _text(schema.get("description", "").strip()).replace("\n", " ")
    limits = [_text(limit) for limit in _constraints(schema)]
    if limits:
        text = f"{text} ({'; '.join(limits)})" if text else "; ".join(limits)
    return text


def _fields(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    rows = [
        (
            _code(name),
            _type(prop),
            "yes" if name in required else "no",
            _code(json.dumps(prop["default"])) if "default" in prop else "",
            _describe(prop),
        )
        for name, prop in schema.get("properties", {}).items()
    ]
    if not rows:
        return []
    return _table(("field", "type", "required", "default", "description"), rows)


def _body_schema(schema: dict[str, Any], components: dict[str, Any]) -> tuple[str, dict]:
    """(name, schema) of a request or response body, a $ref resolved."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return name, components.get(name, {})
    return schema.get("title", ""), schema


def server_api_reference(schema: dict[str, Any] | None = None) -> str:
    """The REST API page: per tag, each route's method and path, summary, description,
    parameters, request body fields and responses; then the schemas they use."""
    schema = schema if schema is not None else openapi_schema()
    components = schema.get("components", {}).get("schemas", {})
    info = schema.get("info", {})
    lines = [
        "# Server API reference",
        "",
        f"Generated from the OpenAPI schema of the app `python serve.py` runs "
        f"({_text(info.get('title', ''))} {info.get('version', '')}), so it lists the routes the "
        "server has now. A running server also serves the schema at `/openapi.json` and an "
        "interactive page at `/docs`.",
        "",
    ]
    if info.get("description"):
        lines += [_text(info["description"]), ""]
    if schema.get("components", {}).get("securitySchemes"):
        lines += [
            "Routes marked *bearer* need `Authorization: Bearer <api_key>` when the server is "
            "started with `api_key` set (see [`serve.yaml`](configuration.md#config-serve)).",
            "",
        ]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            tag = (op.get("tags") or ["other"])[0]
            by_tag.setdefault(tag, []).append((method.upper(), path, op))
    lines += _table(
        ("method", "path", "summary"),
        (
            (
                method,
                f"[{_code(path)}](#{_anchor('route', method, path)})",
                _text(op.get("summary", "")),
            )
            for ops in by_tag.values()
            for method, path, op in ops
        ),
    )
    for tag, ops in by_tag.items():
        lines += [f"## {_text(tag)}", ""]
        for method, path, op in ops:
            lines += [f"### {method} {_code(path)} {{#{_anchor('route', method, path)}}}", ""]
            if op.get("summary"):
                lines += [
                    f"**{_text(op['summary'])}**" + (" · *bearer*" if op.get("security") else ""),
                    "",
                ]
            if op.get("description"):
                lines += [op["description"].strip(), ""]
            params = op.get("parameters", [])
            if params:
                lines += ["Parameters:", ""]
                lines += _table(
                    ("name", "in", "type", "required", "default", "description"),
                    (
                        (
                            _code(p["name"]),
                            p.get("in", ""),
                            _type(p.get("schema", {})),
                            "yes" if p.get("required") else "no",
                            _code(json.dumps(p["schema"]["default"]))
                            if "default" in p.get("schema", {})
                            else "",
                            _describe({**p.get("schema", {}), **p}),
                        )
                        for p in params
                    ),
                )
            body = op.get("requestBody")
            if body:
                for media, content in body.get("content", {}).items():
                    name, body_schema = _body_schema(content.get("schema", {}), components)
                    named = f" ([{name}](#{_anchor('schema', name)}))" if name in components else ""
                    lines += [f"Request body, {_code(media)}{named}:", ""]
                    lines += _fields(body_schema) or [_type(content.get("schema", {})), ""]
            lines += ["Responses:", ""]
            rows = []
            for status, response in op.get("responses", {}).items():
                types = [
                    f"{_code(media)} {_type(c['schema'])}" if c.get("schema") else _code(media)
                    for media, c in response.get("content", {}).items()
                ]
                rows.append(
                    (_code(status), _text(response.get("description", "")), "; ".join(types))
                )
            lines += _table(("status", "description", "body"), rows)
    if components:
        lines += ["## Schemas", ""]
        for name, component in components.items():
            lines += [f"### {name} {{#{_anchor('schema', name)}}}", ""]
            if component.get("description"):
                lines += [_text(component["description"].strip()).replace("\n", " "), ""]
            lines += _fields(component) or [_type(component), ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- the MkDocs hook


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages to the build (MkDocs >= 1.6: ``File.generated``)."""
    from mkdocs.structure.files import File

    for page, render in ((CONFIG_PAGE, configuration_reference), (API_PAGE, server_api_reference)):
        existing = files.get_file_from_path(page)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, page, content=render()))
    return files


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    """``mkdocs serve`` rebuilds when a config or the server's code changes."""
    server.watch(str(CONF_DIR))
    server.watch(str(ROOT / "src" / "ml_engine" / "server"))
    return server
