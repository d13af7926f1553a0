"""MkDocs hook: the generated half of the documentation site.

- **API reference**: one page per Python module of the packages below, found by walking
  their folders at build time (a module added later appears without editing the docs),
  rendered by mkdocstrings from its docstrings. The nav entry `reference/api/index.md` in
  mkdocs.yml is replaced by the tree of those pages.
- **Configuration reference**: a `<!-- config-reference: MODULE -->` line in a page becomes
  tables of every pydantic settings model of that module: each top-level model (one no other
  model of the module holds) and, below it, every section it holds, field by field (name,
  type and bounds, default, description), read from the models themselves.
- **Benchmark results**: `benchmarks/README.md` (when present) and `benchmarks/results/` are
  brought into the site beside `benchmarks.md`, whose `<!-- benchmark-results -->` line
  becomes a list of them, and whose nav entry becomes a section holding them.
- **Links into the repository**: a page may link to any repository file by its relative path
  from its own place in the repository (`../configs/sample.yaml` from `docs/`), so that links
  work on GitHub too. Links to files that are in the site are pointed at them; links to other
  existing files become their text; a link to a file that does not exist is a warning, which
  `mkdocs build --strict` turns into a failure.
"""

from __future__ import annotations

import ast
import html
import importlib
import inspect
import json
import logging
import posixpath
import re
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from mkdocs.structure.files import File, Files
from pydantic import BaseModel
from pydantic.fields import FieldInfo

log = logging.getLogger("mkdocs.hooks.reference")

# Packages whose modules get an API page; folders inside them that hold no API.
PACKAGES = ("transferdesk", "tuning", "deployments")
SKIP_DIRS = {"__pycache__", "migrations", "sample_data", "templates", "policies"}
SKIP_MODULES = {"__main__"}
API_DIR = "reference/api"
API_INDEX = f"{API_DIR}/index.md"
# Files of the repository brought into the site, repository path → site path.
BENCHMARKS_PAGE = "benchmarks.md"
BENCHMARKS_README = ("benchmarks/README.md", "benchmarks/overview.md")
BENCHMARK_RESULTS = "benchmarks/results"

_root: Path = Path()
_modules: list[str] = []
_mirrored: dict[str, str] = {}  # repository path → site path
_anchors: dict[str, set[str]] = {}  # site path of a page → the ids in its HTML


# ---------------------------------------------------------------- hook events


def on_config(config: Any) -> Any:
    global _root, _modules, _mirrored
    _root = Path(config.config_file_path).resolve().parent
    _modules = _find_modules()
    _mirrored = _find_mirrored()
    config.nav = [_expand_nav(item) for item in config.nav or []]
    return config


def on_files(files: Files, config: Any) -> Files:
    for module in _modules:
        files.append(File.generated(config, _api_page(module), content=_api_content(module)))
    files.append(File.generated(config, API_INDEX, content=_api_index()))
    for repo_path, site_path in _mirrored.items():
        files.append(File.generated(config, site_path, abs_src_path=str(_root / repo_path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    src = page.file.src_uri
    markdown = re.sub(
        r"^<!-- config-reference: ([\w.]+) -->$",
        lambda m: _config_reference(m.group(1)),
        markdown,
        flags=re.M,
    )
    if not page.file.generated_by:
        _check_flags(markdown, src)
    markdown = markdown.replace("<!-- benchmark-results -->", _results_list(src))
    markdown = markdown.replace("<!-- cli-reference -->", _cli_reference())
    return _rewrite_links(markdown, src)


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    _anchors[page.file.src_uri] = set(re.findall(r'\sid="([^"]+)"', html))
    return html


def on_post_build(config: Any) -> None:
    """README.md is not part of the site but links into it: its links (and their anchors in the
    documentation) and its flags are checked too."""
    text = (_root / "README.md").read_text(encoding="utf-8")
    _check_flags(text, "README.md")
    for m in _LINK.finditer(_strip_code(text)):
        path, _, anchor = m.group(3).partition("#")
        if not path or re.match(r"^[a-z][a-z0-9+.-]*:", path):
            continue
        if not (_root / path).exists():
            log.warning(f"README.md: link to {m.group(3)}: no such file in the repository")
        elif anchor and anchor not in _anchors.get(_site_path(path) or "", set()):
            log.warning(f"README.md: link to {m.group(3)}: no such anchor in the documentation page")


# ---------------------------------------------------------------- API reference


def _find_modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((_root / package).rglob("*.py")):
            rel = path.relative_to(_root)
            if SKIP_DIRS.intersection(rel.parts) or path.stem in SKIP_MODULES:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.append(".".join(parts))
    return sorted(found)


def _is_package(module: str) -> bool:
    return (_root / module.replace(".", "/") / "__init__.py").is_file()


def _api_page(module: str) -> str:
    path = module.replace(".", "/")
    return f"{API_DIR}/{path}/index.md" if _is_package(module) else f"{API_DIR}/{path}.md"


def _api_content(module: str) -> str:
    return f"# `{module}`\n\n::: {module}\n"


def _summary(module: str) -> str:
    path = _root / module.replace(".", "/")
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _api_index() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the code at every build: one page per module of "
        + ", ".join(f"`{p}`" for p in PACKAGES)
        + ", with its docstrings. Where each module sits in the design: "
        "[Architecture](../../architecture.md).",
        "",
        "| module | what it holds |",
        "| --- | --- |",
    ]
    for module in _modules:
        link = posixpath.relpath(_api_page(module), API_DIR)
        lines.append(f"| [`{module}`]({link}) | {_cell(_summary(module))} |")
    return "\n".join(lines) + "\n"


def _api_nav() -> list[Any]:
    tree: dict[str, Any] = {}
    for module in _modules:
        node = tree
        for part in module.split("."):
            node = node.setdefault(part, {})

    def build(node: dict[str, Any], prefix: str) -> list[Any]:
        items: list[Any] = []
        if prefix and _is_package(prefix):
            items.append({"Overview": _api_page(prefix)})
        for name, child in node.items():
            dotted = f"{prefix}.{name}" if prefix else name
            if child or _is_package(dotted):
                items.append({name: build(child, dotted)})
            else:
                items.append({name: _api_page(dotted)})
        return items

    return [{"Overview": API_INDEX}, *build(tree, "")]


# ---------------------------------------------------------------- benchmarks


def _find_mirrored() -> dict[str, str]:
    mirrored = {}
    readme, site = BENCHMARKS_README
    if (_root / readme).is_file():
        mirrored[readme] = site
    results = _root / BENCHMARK_RESULTS
    for path in sorted(results.rglob("*")) if results.is_dir() else []:
        if path.is_file():
            rel = path.relative_to(_root).as_posix()
            mirrored[rel] = rel
    return mirrored


def _readme_page() -> str | None:
    """The site path of benchmarks/README.md, when the checkout has one."""
    return _mirrored.get(BENCHMARKS_README[0])


def _result_pages() -> list[tuple[str, str]]:
    """(name, site path) of each Markdown file of the benchmark results."""
    return [
        (Path(site).stem, site)
        for repo, site in _mirrored.items()
        if site.endswith(".md") and repo != BENCHMARKS_README[0]
    ]


def _results_list(page_src: str) -> str:
    def rel(site_path: str) -> str:
        return posixpath.relpath(site_path, posixpath.dirname(page_src) or ".")

    lines = []
    if readme := _readme_page():
        lines += [
            f"[What each benchmark measures, and its latest figures]({rel(readme)}) "
            f"(`{BENCHMARKS_README[0]}`, written by the benchmark harness).",
            "",
        ]
    lines += [f"- [`{name}`]({rel(site)})" for name, site in _result_pages()]
    return "\n".join(lines) or "*No benchmark results in this checkout.*"


def _expand_nav(item: Any) -> Any:
    if isinstance(item, dict):
        return {key: _expand_nav(value) for key, value in item.items()}
    if isinstance(item, list):
        return [_expand_nav(value) for value in item]
    if item == API_INDEX:
        return _api_nav()
    if item == BENCHMARKS_PAGE:
        readme = [{"Benchmark scripts": page} for page in [_readme_page()] if page]
        results = [{"Results": [{name: page} for name, page in _result_pages()]}]
        return [{"Overview": BENCHMARKS_PAGE}, *readme, *results]
    return item


# ---------------------------------------------------------------- links into the repository

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", flags=re.S)
_LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^()\s]+)(\s+\"[^\"]*\")?\)")


def _site_path(repo_path: str) -> str | None:
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/") :]
    return _mirrored.get(repo_path)


def _rewrite_links(markdown: str, page_src: str) -> str:
    repo_page = next((r for r, s in _mirrored.items() if s == page_src), f"docs/{page_src}")

    def link(m: re.Match[str]) -> str:
        bang, label, target, title = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return m.group(0)
        path, _, anchor = target.partition("#")
        repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(repo_page), path))
        site = _site_path(repo_target)
        if site is not None:
            rel = posixpath.relpath(site, posixpath.dirname(page_src) or ".")
            return f"{bang}[{label}]({rel}{'#' + anchor if anchor else ''}{title})"
        if not repo_target.startswith("../") and (_root / repo_target).exists() and not bang:
            return label  # a repository file outside the site: its name, as written
        log.warning(f"{repo_page}: link to {target}: {repo_target} is not in the repository")
        return m.group(0)

    def text(chunk: str) -> str:
        # Code spans are set aside (a link's label may hold one; a span holds no link).
        spans: list[str] = []

        def hide(m: re.Match[str]) -> str:
            spans.append(m.group(0))
            return f"\x00{len(spans) - 1}\x00"

        hidden = _LINK.sub(link, _CODE_SPAN.sub(hide, chunk))
        return re.sub("\x00(\\d+)\x00", lambda m: spans[int(m.group(1))], hidden)

    out, last = [], 0
    for fence in _FENCE.finditer(markdown):
        out.append(text(markdown[last : fence.start()]))
        out.append(fence.group(0))
        last = fence.end()
    out.append(text(markdown[last:]))
    return "".join(out)


# ---------------------------------------------------------------- command line and flags


def _cli_reference() -> str:
    """Every `transferdesk` command's --help, from the parser the command line builds."""
    import argparse
    import os

    from transferdesk.cli.main import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # the same wrapping on every machine
    out: list[str] = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if name != "transferdesk" and not subcommands:
            body = parser.format_help().replace(f"{_root}/", "").splitlines()
            out.extend([f"### `{name}`", "", f'??? note "`{name} --help`"', "", "    ```text"])
            out.extend([f"    {line}".rstrip() for line in body])
            out.extend(["    ```", ""])
        for action in subcommands:
            for sub_name, sub in action.choices.items():
                walk(sub, f"{name} {sub_name}")

    try:
        walk(build_parser(), "transferdesk")
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(out)


_FLAG = re.compile(r"(?<![\w-])--([a-z_]+(?:\.[a-z_]+)+)")


def _setting_exists(dotted: str) -> bool:
    """Whether `section.field` names a setting of one of the documented settings models."""
    for module in _config_modules():
        for root in _roots_of(module):
            model: Any = root
            for part in dotted.split("."):
                if not (inspect.isclass(model) and issubclass(model, BaseModel)):
                    break
                info = model.model_fields.get(part)
                if info is None:
                    break
                held = _nested(info.annotation)
                model = held[0] if held else None
            else:
                return True
    return False


def _check_flags(markdown: str, where: str) -> None:
    """`--section.field` flags named in code must be settings that exist (a stale one fails)."""
    code = [m.group(0) for m in _FENCE.finditer(markdown)]
    code += [m.group(0) for m in _CODE_SPAN.finditer(_FENCE.sub("", markdown))]
    for flag in sorted(set(_FLAG.findall("\n".join(code)))):
        if flag != "section.field" and not _setting_exists(flag):
            log.warning(f"{where}: --{flag} is not a setting of any configuration model")


def _strip_code(markdown: str) -> str:
    return _CODE_SPAN.sub("", _FENCE.sub("", markdown))


# ---------------------------------------------------------------- configuration reference


def _models_of(module: types.ModuleType) -> list[type[BaseModel]]:
    return [
        obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseModel)
        and obj.__module__ == module.__name__
        and not name.startswith("_")
        and obj.model_fields
    ]


def _nested(annotation: Any) -> list[type[BaseModel]]:
    """The settings models a field's type holds (in unions, lists, dicts)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested(arg)]


def _config_reference(module_name: str) -> str:
    module = importlib.import_module(module_name)
    roots = _roots_of(module)
    if not roots:
        log.warning(f"config reference: {module_name} defines no settings model")
    # Top-level models of every config module are linked to, never expanded twice.
    anchors = {m: _anchor(m.__name__) for mod in _config_modules() for m in _roots_of(mod)}
    roots.sort(key=_size, reverse=True)  # the main model of the module first
    return "\n".join(_render_model(root, root.__name__, "", anchors, level=3) for root in roots)


def _size(model: type[BaseModel]) -> int:
    """Settings a model holds, its sections' included."""
    fields = model.model_fields.values()
    return sum(1 + sum(_size(m) for m in _nested(f.annotation) if m is not model) for f in fields)


def _config_modules() -> list[types.ModuleType]:
    return [importlib.import_module(m) for m in _modules if m.rsplit(".", 1)[-1] == "config"]


def _roots_of(module: types.ModuleType) -> list[type[BaseModel]]:
    """The module's settings models that no other model of the module holds."""
    models = _models_of(module)
    held = {m for model in models for f in model.model_fields.values() for m in _nested(f.annotation)}
    return [m for m in models if m not in held]


def _anchor(dotted: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", dotted.lower()).strip("-")


def _render_model(
    model: type[BaseModel], root: str, path: str, anchors: dict[type[BaseModel], str], level: int
) -> str:
    anchor = _anchor(f"{root}-{path}" if path else root)
    anchors.setdefault(model, anchor)
    heading = f"`{path}`" if path else f"`{root}`"
    lines = [f"{'#' * level} {heading} {{ #{anchor} }}", ""]
    if path:
        lines += [f"In [`{root}`](#{_anchor(root)}); the model `{model.__name__}`.", ""]
    if model.__doc__:
        lines += [_prose(" ".join(inspect.cleandoc(model.__doc__).split())), ""]
    lines += ["| setting | type | default | description |", "| --- | --- | --- | --- |"]
    below = []
    for name, info in model.model_fields.items():
        origin = typing.get_origin(info.annotation)
        for sub in _nested(info.annotation):
            if sub not in anchors:
                sub_path = f"{path}.{name}" if path else name
                sub_path += ".<name>" if origin is dict else "[]" if origin is list else ""
                anchors[sub] = _anchor(f"{root}-{sub_path}")
                below.append((sub, sub_path))
        lines.append(
            f"| `{name}` | {_type(info.annotation, anchors)}{_bounds(info)} | {_default(info)} "
            f"| {_prose(info.description or _first_sentence(info.annotation))} |"
        )
    out = "\n".join([*lines, ""])
    for sub, sub_path in below:
        out += "\n" + _render_model(sub, root, sub_path, anchors, min(level + 1, 5))
    return out


def _first_sentence(annotation: Any) -> str:
    """A section's description when its field has none: its model's first sentence."""
    for model in _nested(annotation):
        doc = " ".join(inspect.cleandoc(model.__doc__ or "").split())
        return doc.split(". ")[0].rstrip(".") + "." if doc else ""
    return ""


def _type(annotation: Any, anchors: dict[type[BaseModel], str]) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "`null`"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{anchors.get(annotation, _anchor(annotation.__name__))})"
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin is typing.Annotated:
        return _type(args[0], anchors)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a, anchors) for a in args)
    if origin in (list, tuple, dict, set):
        inner = ", ".join(_type(a, anchors) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if inspect.isclass(annotation):
        return f"`{annotation.__name__}`"
    return f"`{_cell(str(annotation).replace('typing.', ''))}`"


_BOUNDS = {
    annotated_types.Gt: ("> ", "gt"),
    annotated_types.Ge: ("≥ ", "ge"),
    annotated_types.Lt: ("< ", "lt"),
    annotated_types.Le: ("≤ ", "le"),
    annotated_types.MinLen: ("length ≥ ", "min_length"),
    annotated_types.MaxLen: ("length ≤ ", "max_length"),
}


def _bounds(info: FieldInfo) -> str:
    parts = []
    for item in info.metadata:
        for kind, (sign, attr) in _BOUNDS.items():
            if isinstance(item, kind):
                parts.append(f"{sign}{getattr(item, attr)}")
        if pattern := getattr(item, "pattern", None):
            parts.append(f"matches `{pattern}`")
    return f", {', '.join(parts)}" if parts else ""


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    try:
        value = info.get_default(call_default_factory=True, validated_data={})
    except TypeError:
        value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    try:
        from pydantic_core import to_jsonable_python

        return f"`{_cell(json.dumps(to_jsonable_python(value), ensure_ascii=False))}`"
    except (TypeError, ValueError):
        return f"`{_cell(repr(value))}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _prose(text: str) -> str:
    """Description text for a table cell: HTML-escaped outside code spans, pipes escaped."""
    out, last = [], 0
    for span in _CODE_SPAN.finditer(text):
        out.append(html.escape(text[last : span.start()], quote=False))
        out.append(span.group(0))
        last = span.end()
    out.append(html.escape(text[last:], quote=False))
    return _cell("".join(out))
