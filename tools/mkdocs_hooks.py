"""mkdocs hooks: the site's pages that nobody writes by hand, so none of them can drift.

* ``index.md`` is README.md, its ``docs/...`` links made relative to the site.
* ``api/<module>.md``: one API page per public module of ``src/attnkit`` (private ``_*``
  modules, ``attnkit.apps`` and ``attnkit.cli`` left out), each ``::: attnkit.module``
  rendered by mkdocstrings from the docstrings. A new module gets its page with no edit here,
  and the strict build (``make docs``, ``tests/test_docs_site.py``) checks its docstrings.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "attnkit"
#: Modules that are not library API: the apps (documented by their own pages) and the CLI.
EXCLUDED = ("attnkit.apps", "attnkit.cli", "attnkit.__main__")


def public_modules() -> list[str]:
    """Dotted names of attnkit's public modules and packages, in a stable order."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        name = ".".join(parts)
        if name.startswith(EXCLUDED) and any(name == e or name.startswith(e + ".")
                                             for e in EXCLUDED):
            continue
        names.append(name)
    return names


def api_page(module: str) -> str:
    """The Markdown of one module's API page (mkdocstrings' root heading is its title)."""
    return f"---\ntitle: {module}\n---\n\n::: {module}\n    options:\n      heading_level: 1\n"


def guide_pages(docs_dir: Path) -> list[str]:
    """The hand-written pages under docs/, in reading order: the known ones first, any new
    page after them (alphabetically), so a page added by anyone appears in the navigation."""
    order = ["tutorial.md", "engine.md", "multihead.md", "serving.md", "transformers.md",
             "distributed.md", "translate.md", "gpt.md", "explore.md"]
    pages = sorted(p.name for p in docs_dir.glob("*.md") if p.name != "index.md")
    return [p for p in order if p in pages] + [p for p in pages if p not in order]


def on_config(config):
    """The navigation: home (the README), the guides, then the API reference."""
    config["nav"] = [
        {"Home": "index.md"},
        {"Guides": guide_pages(Path(config["docs_dir"]))},
        {"API reference": [{module: f"api/{module}.md"} for module in public_modules()]},
    ]
    return config


def readme_as_index() -> str:
    """README.md with its links into docs/ pointing at the site's pages instead."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "index.md", content=readme_as_index()))
    for module in public_modules():
        files.append(File.generated(config, f"api/{module}.md", content=api_page(module)))
    return files
