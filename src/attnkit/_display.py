"""How attnkit's own objects draw themselves in a notebook: ``_repr_html_`` and ``_repr_png_``.

Jupyter (and VS Code, Colab, nbconvert) asks an object for these when it is the last value of
a cell; everywhere else the object stays text (``str``/``repr`` are the classes' own). The
classes attach the functions here with one line each (``_repr_html_ = _display.summary_html``):

* :class:`attnkit.summary.BlockSummary` - the block map (skipped / full / partial tiles);
* :class:`attnkit.engine.Explanation` - ``explain()``'s answer: the call, the backend chosen
  and why, the others' refusals, the estimates, and the block map;
* :class:`attnkit.flex_api.BlockMask` - its shape, sparsity, mask and block map;
* a mask description (:class:`attnkit.masks.MaskMod`) and a :class:`attnkit.MaskSpec` - the
  description and its pattern on a small grid (16 x 16, or the length its tensors fix).

Pictures are PNGs drawn here from torch tensors (a few lines of zlib, no matplotlib), so
displaying never needs an optional extra and ``import attnkit`` imports nothing more. This
module imports nothing from attnkit at import time (the classes above import it).
"""

from __future__ import annotations

import base64
import html
import struct
import zlib

import torch
from torch import Tensor

__all__ = ["png", "summary_png", "summary_html", "explanation_html", "explanation_png",
           "block_mask_html", "block_mask_png", "mask_html", "mask_png", "spec_html",
           "spec_png", "MAX_PIXELS", "MAX_MASK_CELLS"]

MAX_PIXELS = 480  # the longer side of a picture, before nearest-neighbour scaling stops
MAX_MASK_CELLS = 256 * 256  # mask patterns larger than this are not drawn
_COLOURS = {  # the explorer's palette (assets/views.js)
    "empty": (0xEC, 0xEE, 0xF2), "partial": (0x9C, 0xC0, 0xF0), "full": (0x1F, 0x4E, 0x9C),
    "attend": (0x1F, 0x4E, 0x9C), "masked": (0xEC, 0xEE, 0xF2)}
_STYLE = "font-family: ui-monospace, monospace; font-size: 12px"
_IMG = 'style="image-rendering: pixelated; border: 1px solid #c9ccd4"'


def png(rgb: Tensor) -> bytes:
    """Encode ``rgb`` ``(rows, cols, 3)`` uint8 as PNG bytes (8-bit truecolour, no filter)."""
    rows, cols, _ = rgb.shape
    raw = torch.cat([torch.zeros(rows, 1, dtype=torch.uint8),  # filter byte 0 per row
                     rgb.reshape(rows, cols * 3)], dim=1)  # (rows, 1 + 3 * cols)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + \
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", cols, rows, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
            chunk(b"IDAT", zlib.compress(raw.contiguous().numpy().tobytes(), 6)) +
            chunk(b"IEND", b""))


def _picture(index: Tensor, palette: list) -> tuple[bytes, int]:
    """PNG of a 2-D tensor of palette indices, each cell scaled to a square of pixels (at most
    :data:`MAX_PIXELS` on the longer side); returns ``(png, cells pooled per pixel)``."""
    rows, cols = index.shape
    pool = -(-max(rows, cols) // MAX_PIXELS)  # > 1: several cells share a pixel
    if pool > 1:  # keep the largest index of each group (full over partial over empty)
        padded = torch.zeros(-(-rows // pool) * pool, -(-cols // pool) * pool, dtype=index.dtype)
        padded[:rows, :cols] = index
        index = padded.view(padded.shape[0] // pool, pool, -1, pool).amax(dim=(1, 3))
    scale = max(1, min(24, MAX_PIXELS // max(index.shape)))
    colours = torch.tensor(palette, dtype=torch.uint8)  # (n, 3)
    rgb = colours[index.long()]  # (rows, cols, 3)
    rgb = rgb.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # (rows*s, cols*s, 3)
    return png(rgb), pool


def _img(data: bytes, alt: str) -> str:
    return (f'<img {_IMG} alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">')


def _legend(counts: dict) -> str:
    spans = "".join(
        f'<span style="display:inline-block;width:11px;height:11px;margin:0 4px 0 10px;'
        f'vertical-align:-1px;background:rgb{_COLOURS[name]}"></span>{name} ({counts[name]})'
        for name in ("empty", "partial", "full"))
    return f'<div style="{_STYLE}">{spans}</div>'


# -- BlockSummary ------------------------------------------------------------------------------

def summary_png(summary) -> bytes:
    """The block map of a :class:`~attnkit.summary.BlockSummary`: one square per tile."""
    palette = [_COLOURS["empty"], _COLOURS["partial"], _COLOURS["full"]]  # EMPTY, PARTIAL, FULL
    return _picture(summary.kind, palette)[0]


def _summary_block(summary) -> str:
    counts = summary.counts()
    pool = -(-max(summary.kind.shape) // MAX_PIXELS)  # as _picture pools
    note = f" (each pixel: {pool} x {pool} tiles, the fullest shown)" if pool > 1 else ""
    caption = (f"query tiles of {summary.block_q} (rows) x key blocks of {summary.block_k} "
               f"(columns): {summary.visited_fraction():.1%} of the pairs visited{note}")
    return (f"{_img(summary_png(summary), 'block map')}{_legend(counts)}"
            f'<div style="{_STYLE};color:#5a6478">{html.escape(caption)}</div>')


def summary_html(summary) -> str:
    """A :class:`~attnkit.summary.BlockSummary` as HTML: its sizes, counts and block map."""
    head = f"BlockSummary(T={summary.T}, S={summary.S}, tiles {summary.block_q}x{summary.block_k})"
    return f'<div><div style="{_STYLE}"><b>{html.escape(head)}</b></div>' \
           f"{_summary_block(summary)}</div>"


# -- explain() ---------------------------------------------------------------------------------

def explanation_html(explanation) -> str:
    """``explain()``'s :class:`~attnkit.engine.Explanation` as HTML."""
    rows = []
    if explanation.description:
        rows.append(("call", html.escape(explanation.description)))
    rows.append(("auto &rarr;", f"<b>{html.escape(explanation.chosen)}</b>: "
                                f"{html.escape(explanation.reason)}"))
    for name, why in explanation.rejected.items():
        rows.append((f"not {html.escape(name)}", html.escape(why)))
    if explanation.estimates:
        costs = ", ".join(f"{html.escape(n)} {1e3 * s:.3g} ms" for n, s in
                          sorted(explanation.estimates.items(), key=lambda item: item[1]))
        rows.append(("estimates", costs))
    table = "".join(f'<tr><td style="text-align:right;vertical-align:top;padding-right:8px;'
                    f'color:#5a6478;white-space:nowrap">{k}</td><td style="text-align:left">'
                    f"{v}</td></tr>" for k, v in rows)
    blocks = "" if explanation.summary is None else _summary_block(explanation.summary)
    return (f'<div><div style="{_STYLE}"><b>attnkit.explain()</b></div>'
            f'<table style="{_STYLE};border-collapse:collapse">{table}</table>{blocks}</div>')


def explanation_png(explanation) -> bytes | None:
    """The block map of ``explain()``'s answer, or None without a mask (nothing to draw)."""
    return None if explanation.summary is None else summary_png(explanation.summary)


# -- BlockMask ---------------------------------------------------------------------------------

def block_mask_html(block_mask) -> str:
    """A :class:`~attnkit.flex_api.BlockMask`: shape, sparsity, mask and block map."""
    head = f"attnkit.BlockMask(shape={tuple(block_mask.shape)}, " \
           f"sparsity={block_mask.sparsity():.1f}%)"
    describe = getattr(block_mask.mask_mod, "describe", None)
    mask = f"<div>mask: {html.escape(describe())}</div>" if describe else ""
    return (f'<div><div style="{_STYLE}"><b>{html.escape(head)}</b>{mask}</div>'
            f"{_summary_block(block_mask.summary)}</div>")


def block_mask_png(block_mask) -> bytes:
    """The block map of a :class:`~attnkit.flex_api.BlockMask`."""
    return summary_png(block_mask.summary)


# -- mask descriptions -------------------------------------------------------------------------

def _sizes(mod) -> list[int]:
    """Lengths to draw ``mod`` at: 16, then the lengths its tensors fix (key padding's ``S``,
    the total of ``cu_seqlens``)."""
    sizes = [16]
    for t in mod.tensors():
        if t.dim() >= 1 and t.shape[-1] > 0:
            sizes.append(int(t.shape[-1]))
        if t.dim() == 1 and not t.is_floating_point() and t.numel() and t.dtype != torch.bool:
            sizes.append(int(t[-1]))
    return list(dict.fromkeys(n for n in sizes if 0 < n * n <= MAX_MASK_CELLS))


def _pattern(mod) -> tuple[Tensor | None, str]:
    """``(grid (T, S) bool or None, what it shows)`` for a mask description."""
    from .spec import MaskSpec

    for n in _sizes(mod):
        try:
            spec = MaskSpec(mask_mod=mod)
            spec.validate(1, 1, n, n)
            dense = spec.dense(n, n)
        except (ValueError, TypeError, RuntimeError, IndexError):
            continue  # this length does not fit the description's tensors: try the next
        grid = torch.ones(n, n, dtype=torch.bool) if dense is None else \
            torch.broadcast_to(dense, (*dense.shape[:-2], n, n)).reshape(-1, n, n)[0]
        return grid, f"T = S = {n}, batch 0, head 0; query rows, key columns"
    return None, "no picture: no length up to 256 fits this description's tensors"


def mask_png(mod) -> bytes | None:
    """A mask description's pattern (dark: may attend), or None when none can be drawn."""
    grid, _ = _pattern(mod)
    return None if grid is None else \
        _picture(grid.to(torch.uint8), [_COLOURS["masked"], _COLOURS["attend"]])[0]


def _mask_block(mod) -> str:
    grid, what = _pattern(mod)
    if grid is None:
        return f'<div style="{_STYLE};color:#5a6478">{html.escape(what)}</div>'
    visible = int(grid.sum())
    caption = f"{what}: dark = may attend ({visible} of {grid.numel()} pairs)"
    return f"{_img(mask_png(mod), 'mask pattern')}" \
           f'<div style="{_STYLE};color:#5a6478">{html.escape(caption)}</div>'


def mask_html(mod) -> str:
    """A mask description: its ``describe()`` text and its pattern on a small grid."""
    return (f'<div><div style="{_STYLE}"><b>{html.escape(type(mod).__name__)}</b>: '
            f"{html.escape(mod.describe())}</div>{_mask_block(mod)}</div>")


def spec_html(spec) -> str:
    """A :class:`~attnkit.MaskSpec`: its mask, scores and sinks, and the mask's pattern."""
    parts = ["mask: " + (spec.mask_mod.describe() if spec.mask_mod is not None else
                         "none (every key visible)")]
    if spec.score_mod is not None:
        parts.append("scores: " + spec.score_mod.describe())
    if spec.sinks is not None:
        parts.append(f"sinks: {tuple(spec.sinks.shape)[0]} heads")
    body = "".join(f"<div>{html.escape(p)}</div>" for p in parts)
    picture = _mask_block(spec.mask_mod) if spec.mask_mod is not None else ""
    return f'<div><div style="{_STYLE}"><b>MaskSpec</b>{body}</div>{picture}</div>'


def spec_png(spec) -> bytes | None:
    """The pattern of a :class:`~attnkit.MaskSpec`'s mask (None without one)."""
    return None if spec.mask_mod is None else mask_png(spec.mask_mod)
