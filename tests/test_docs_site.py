"""The documentation site (mkdocs.yml): it builds with warnings as errors, every public module
has its API page, and the docstring rewrites of tools/griffe_attnkit.py do what they say."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

_MISSING = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
            if importlib.util.find_spec(m.split(".")[0]) is None
            or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)]
needs_docs_extra = pytest.mark.skipif(
    bool(_MISSING), reason=f"the docs extra is not installed ({', '.join(_MISSING)}): "
                           f"pip install -e '.[docs]' (make test installs it)")


@needs_docs_extra
def test_site_builds_strict_with_an_api_page_per_public_module(tmp_path):
    import mkdocs_hooks

    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                          "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                         timeout=240)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    modules = mkdocs_hooks.public_modules()
    assert {"attnkit", "attnkit.masks", "attnkit.functional", "attnkit.paged"} <= set(modules)
    for module in modules:
        page = site / "api" / module / "index.html"
        assert page.exists(), f"no API page for {module}"
        assert f'id="{module}"' in page.read_text(), f"{module}'s page has no content"
    functional = (site / "api" / "attnkit.functional" / "index.html").read_text()
    assert 'id="attnkit.functional.merge_partial_attention"' in functional
    home = (site / "index.html").read_text()
    assert 'href="engine/#mask-functions-are-read-not-only-evaluated"' in home  # README links point into the site


def test_public_modules_leave_out_private_modules_apps_and_cli():
    import mkdocs_hooks

    modules = mkdocs_hooks.public_modules()
    assert len(modules) == len(set(modules))
    assert not [m for m in modules if any(p.startswith("_") for p in m.split("."))]
    assert not [m for m in modules if m.startswith(("attnkit.apps", "attnkit.cli"))]
    assert "attnkit.backends.decode" in modules and "attnkit.backends._ext" not in modules


def test_readme_links_into_docs_become_site_links():
    import mkdocs_hooks

    index = mkdocs_hooks.readme_as_index()
    assert "](docs/" not in index
    assert "](engine.md#mask-functions-are-read-not-only-evaluated)" in index


@pytest.mark.skipif(importlib.util.find_spec("griffe") is None, reason="needs griffe (docs extra)")
def test_grouped_docstring_entries_are_split_and_roles_become_code():
    import griffe_attnkit

    doc = """Merge two parts.

    Args:
        out_a, out_b: partial outputs ``(..., T, D)``,
            one per key set.
        lse_a, lse_b (Tensor): their log-sum-exp.
        scale: a number, not grouped.
        dropout_p, softmax_scale,
        causal: as in flash-attn.

    Returns:
        a, b: not an argument section, left alone.
    """
    split = griffe_attnkit.split_grouped_entries(doc)
    assert split.splitlines()[3:9] == [
        "        out_a: partial outputs ``(..., T, D)``,",
        "            one per key set.",
        "        out_b: partial outputs ``(..., T, D)``,",
        "            one per key set.",
        "        lse_a (Tensor): their log-sum-exp.",
        "        lse_b (Tensor): their log-sum-exp.",
    ]
    assert split.splitlines()[10:13] == [
        "        dropout_p: as in flash-attn.",
        "        softmax_scale: as in flash-attn.",
        "        causal: as in flash-attn.",
    ]
    assert "        a, b: not an argument section, left alone." in split.splitlines()
    assert griffe_attnkit._ROLE.sub(r"`\1`", "see :func:`attnkit.attention` and "
                                    ":class:`~attnkit.masks.MaskMod`") == (
        "see `attnkit.attention` and `attnkit.masks.MaskMod`")


def test_navigation_lists_every_page(tmp_path):
    import mkdocs_hooks

    for name in ("engine.md", "zzz_new_page.md", "aaa_other.md", "tutorial.md"):
        (tmp_path / name).write_text("# x\n")
    assert mkdocs_hooks.guide_pages(tmp_path) == [
        "tutorial.md", "engine.md", "aaa_other.md", "zzz_new_page.md"]
    nav = mkdocs_hooks.on_config({"docs_dir": str(ROOT / "docs")})["nav"]
    assert nav[0] == {"Home": "index.md"}
    assert set(nav[1]["Guides"]) == {p.name for p in (ROOT / "docs").glob("*.md")}
    assert [next(iter(e)) for e in nav[2]["API reference"]] == mkdocs_hooks.public_modules()
