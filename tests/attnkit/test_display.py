"""Inline display in a notebook (attnkit._display): explain()'s answer, a BlockSummary, a
BlockMask, mask descriptions and MaskSpec draw themselves (HTML and PNG), and stay text
everywhere else; `import attnkit` imports neither matplotlib nor anywidget."""

import base64
import re
import struct
import subprocess
import sys
import zlib

import pytest
import torch

import attnkit
from attnkit import _display, masks
from attnkit.summary import EMPTY, FULL, PARTIAL, BlockSummary

PALETTE = {EMPTY: (0xEC, 0xEE, 0xF2), PARTIAL: (0x9C, 0xC0, 0xF0), FULL: (0x1F, 0x4E, 0x9C)}


def decode(data: bytes) -> torch.Tensor:
    """A PNG as written by _display.png (8-bit RGB, filter 0) -> (rows, cols, 3) uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    cols, rows, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    raw = torch.frombuffer(bytearray(zlib.decompress(chunks[b"IDAT"])), dtype=torch.uint8)
    raw = raw.view(rows, 1 + 3 * cols)
    assert raw[:, 0].eq(0).all()  # filter type 0 on every row
    return raw[:, 1:].reshape(rows, cols, 3)


def test_png_round_trips_pixels_exactly():
    torch.manual_seed(0)
    rgb = torch.randint(0, 256, (7, 13, 3), dtype=torch.uint8)
    torch.testing.assert_close(decode(_display.png(rgb)), rgb)
    pil = pytest.importorskip("PIL.Image")
    import io
    image = pil.open(io.BytesIO(_display.png(rgb)))
    assert image.size == (13, 7)
    pixels = torch.tensor([image.getpixel((x, y)) for y in range(7) for x in range(13)],
                          dtype=torch.uint8)  # (7 * 13, 3)
    torch.testing.assert_close(pixels.view(7, 13, 3), rgb)


def _tile_colours(picture: torch.Tensor, rows: int, cols: int) -> list[list[tuple]]:
    scale = picture.shape[0] // rows
    assert picture.shape[:2] == (rows * scale, cols * scale)
    return [[tuple(picture[i * scale + scale // 2, j * scale + scale // 2].tolist())
             for j in range(cols)] for i in range(rows)]


def test_block_summary_picture_has_one_square_per_tile():
    summary = BlockSummary.build(masks.causal() & masks.sliding_window(5, 0).resolve(37, 37),
                                 37, 37, 8, 4)
    picture = decode(summary._repr_png_())
    kind = summary.kind.tolist()
    assert _tile_colours(picture, *summary.kind.shape) == \
        [[PALETTE[k] for k in row] for row in kind]
    page = summary._repr_html_()
    assert "BlockSummary(T=37, S=37, tiles 8x4)" in page and "data:image/png;base64," in page
    counts = summary.counts()
    for name in ("empty", "partial", "full"):
        assert f"{name} ({counts[name]})" in page
    assert str(summary).startswith("BlockSummary(T=37, S=37, tiles 8x4:")  # text unchanged


def test_huge_block_map_is_pooled_to_the_fullest_tile():
    kind = torch.zeros(1000, 1000, dtype=torch.int8)
    kind[0, 1] = FULL  # one full tile among empty ones: its pixel must show it
    summary = BlockSummary(1000 * 16, 1000 * 16, 16, 16, kind)
    picture = decode(summary._repr_png_())
    assert max(picture.shape[:2]) <= _display.MAX_PIXELS
    assert tuple(picture[0, 0].tolist()) == PALETTE[FULL]
    assert tuple(picture[-1, -1].tolist()) == PALETTE[EMPTY]
    assert "each pixel: 3 x 3 tiles, the fullest shown" in summary._repr_html_()


def test_explanation_shows_choice_refusals_estimates_and_blocks():
    q = torch.randn(1, 2, 64, 8)
    why = attnkit.explain(q, q, q, mask_mod=masks.causal(), dropout_p=0.1)
    page = why._repr_html_()
    assert f"<b>{why.chosen}</b>: {why.reason}" in page
    for name in why.rejected:
        assert f"not {name}" in page
    assert "estimates" in page and " ms" in page and "data:image/png;base64," in page
    assert decode(why._repr_png_()).shape[2] == 3
    plain = attnkit.explain(q, q, q)
    assert plain.summary is None and plain._repr_png_() is None
    assert "data:image" not in plain._repr_html_()
    assert str(why).splitlines()[-len(why.rejected) - 1].startswith(f"auto -> {why.chosen}")


def test_block_mask_draws_its_block_map():
    block_mask = attnkit.create_block_mask(masks.causal(), None, None, 256, 256,
                                           BLOCK_SIZE=64)
    page = block_mask._repr_html_()
    assert "attnkit.BlockMask(shape=(1, 1, 256, 256), sparsity=37.5%)" in page
    assert "mask: causal" in page
    picture = decode(block_mask._repr_png_())
    assert _tile_colours(picture, 4, 4) == [[PALETTE[k] for k in row]
                                            for row in block_mask.summary.kind.tolist()]


@pytest.mark.parametrize("mod, size", [
    (masks.causal(), 16),
    (masks.key_padding(torch.arange(10)[None] < 7), 10),  # S fixed by the tensor
    (masks.documents(cu_seqlens=[0, 3, 8, 20]), 20),  # total of cu_seqlens
])
def test_mask_description_draws_its_pattern(mod, size):
    picture = decode(mod._repr_png_())
    grid = attnkit.MaskSpec(mask_mod=mod).dense(size, size)
    grid = torch.broadcast_to(grid, (*grid.shape[:-2], size, size)).reshape(-1, size, size)[0]
    dark, light = (0x1F, 0x4E, 0x9C), (0xEC, 0xEE, 0xF2)
    assert _tile_colours(picture, size, size) == [[dark if v else light for v in row]
                                                  for row in grid.tolist()]
    page = mod._repr_html_()
    assert f"T = S = {size}" in page and f"({int(grid.sum())} of {size * size} pairs)" in page


def test_mask_that_fits_no_length_says_so_and_names_are_escaped():
    too_long = masks.key_padding(torch.ones(1, 300, dtype=torch.bool))  # 300 x 300 > limit
    assert too_long._repr_png_() is None
    assert "no picture: no length up to 256 fits" in too_long._repr_html_()
    page = masks.MaskFn(lambda b, h, q, k: q >= k)._repr_html_()
    assert "&lt;lambda&gt;" in page and "<lambda>" not in page


def test_mask_spec_lists_mask_scores_and_sinks():
    spec = attnkit.MaskSpec(mask_mod=masks.causal(), score_mod=attnkit.scores.Softcap(30.0),
                            sinks=torch.zeros(4))
    page = spec._repr_html_()
    assert "mask: causal" in page and "scores: " in page and "sinks: 4 heads" in page
    assert decode(spec._repr_png_()).shape == decode(masks.causal()._repr_png_()).shape
    assert attnkit.MaskSpec()._repr_png_() is None
    assert "none (every key visible)" in attnkit.MaskSpec()._repr_html_()


def test_ipython_finds_html_and_png():
    formatters = pytest.importorskip("IPython.core.formatters")
    formatter = formatters.DisplayFormatter()
    data, _ = formatter.format(masks.causal())
    assert {"text/plain", "text/html", "image/png"} <= set(data)
    assert base64.b64decode(data["image/png"]) if isinstance(data["image/png"], str) else \
        data["image/png"].startswith(b"\x89PNG")
    assert data["text/plain"] == repr(masks.causal())


def test_import_attnkit_needs_neither_matplotlib_nor_anywidget():
    code = ("import sys, attnkit; attnkit.explain; "
            "print(sorted(m for m in ('matplotlib', 'anywidget', 'IPython', 'attnkit.apps') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert not re.search(r"^\s*(import|from) (matplotlib|anywidget|IPython)",
                         open(_display.__file__).read(), flags=re.M)
