"""attnkit.AttentionMaps: the data interface (per (layer, head) weights, tokens, positions),
aggregation, one sample without padding, zoom, pooling, the text summary, the figures (no
overlapping text at 2k tokens) and PNG export."""

import base64
import html

import pytest
import torch

from attnkit import AttentionMaps


def causal(L=2, H=3, B=2, T=10, seed=0):
    """``L`` layers of ``(B, H, T, T)`` causal softmax weights, as ``outputs.attentions``."""
    g = torch.Generator().manual_seed(seed)
    blocked = torch.ones(T, T, dtype=torch.bool).triu(1)
    return [torch.softmax((torch.randn(B, H, T, T, generator=g) * 2)
                          .masked_fill(blocked, float("-inf")), -1) for _ in range(L)]


def padded_maps():
    """B=2, T=6; sample 1 left-padded by 2 (its padded rows and keys are zero)."""
    weights = causal(L=1, H=2, B=2, T=6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    w = weights[0].clone()
    w[1, :, :2] = 0  # padded rows see nothing
    w[1, :, :, :2] = 0
    w[1] = w[1] / w[1].sum(-1, keepdim=True).clamp(min=1e-30)
    tokens = [[f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)]]
    return AttentionMaps.from_tensor([w], tokens=tokens, attention_mask=mask), w


def test_from_tensor_indexes_layers_and_heads():
    weights = causal()
    maps = AttentionMaps.from_tensor(weights, layers=[3, 7])
    assert maps.layers == (3, 7) and maps.heads == (0, 1, 2)
    assert (maps.batch_size, maps.num_queries, maps.num_keys) == (2, 10, 10)
    torch.testing.assert_close(maps[7, 2], weights[1][:, 2])
    torch.testing.assert_close(maps.stack(), torch.stack(weights).transpose(1, 2))
    torch.testing.assert_close(maps.stack(sample=1), torch.stack(weights)[:, 1])
    assert maps.query_tokens[1] == tuple(str(i) for i in range(10))
    assert repr(maps) == "AttentionMaps(layers=(3, 7), heads=(0, 1, 2), B=2, T=10, S=10)"
    with pytest.raises(KeyError, match=r"\(3, 5\) was not inspected: layers \(3, 7\)"):
        maps[3, 5]


def test_aggregate_over_heads_layers_and_all():
    weights = causal()
    maps = AttentionMaps.from_tensor(weights)
    stacked = torch.stack(weights)  # (L, B, H, T, S)
    torch.testing.assert_close(maps.aggregate("heads"), stacked.mean(2))
    torch.testing.assert_close(maps.aggregate("layers"), stacked.mean(0).transpose(0, 1))
    torch.testing.assert_close(maps.aggregate("all", "max"), stacked.amax((0, 2)))
    with pytest.raises(ValueError, match="over must be one of"):
        maps.aggregate("rows")
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'max', got 'sum'"):
        maps.aggregate("heads", "sum")


def test_sample_drops_padding_and_keeps_positions():
    maps, w = padded_maps()
    one = maps.sample(1)
    assert one.batch_size == 1 and one.num_queries == one.num_keys == 4
    assert one.query_tokens == (("b2", "b3", "b4", "b5"),)
    assert one.query_positions == [2, 3, 4, 5]
    torch.testing.assert_close(one[0, 1][0], w[1, 1, 2:, 2:])
    assert maps.sample(-2).query_tokens == maps.sample(0).query_tokens
    with pytest.raises(ValueError, match=r"sample must be an int in \[0, 2\), got 2"):
        maps.sample(2)


def test_zoom_keeps_positions_and_tokens():
    maps = AttentionMaps.from_tensor(causal(T=10))
    part = maps.zoom(rows=(4, 8), cols=slice(2, None))
    assert part.query_positions == [4, 5, 6, 7] and part.key_positions == list(range(2, 10))
    assert part.key_tokens[0][0] == "2"
    torch.testing.assert_close(part[0, 1], maps[0, 1][:, 4:8, 2:])
    # a zoom of a zoom counts in the original positions
    torch.testing.assert_close(part.zoom(rows=(6, 7))[0, 1], maps[0, 1][:, 6:7, 2:])
    with pytest.raises(ValueError, match=r"rows must be \(start, stop\) positions with "
                                         r"start < stop, got \(5, 5\)"):
        maps.zoom(rows=(5, 5))
    with pytest.raises(ValueError, match=r"cols=\(20, 30\) holds no position of this map "
                                         r"\(it has 0..9\)"):
        maps.zoom(cols=(20, 30))


def test_pool_means_queries_and_sums_keys():
    weights = causal(L=1, H=1, B=1, T=7)
    maps = AttentionMaps.from_tensor(weights, tokens=[list("abcdefg")])
    pooled = maps.pool(3)
    w = weights[0][0, 0]  # (7, 7)
    expected = torch.stack([torch.stack([w[i:i + 3, j:j + 3].sum(1).mean(0)
                                         for j in (0, 3, 6)]) for i in (0, 3, 6)])
    torch.testing.assert_close(pooled[0, 0][0], expected)
    torch.testing.assert_close(pooled[0, 0].sum(-1), torch.ones(1, 3))  # rows still sum to 1
    assert pooled.block == 3 and pooled.query_positions == [0, 3, 6]
    assert pooled.query_tokens == (("abc…", "def…", "g…"),)
    assert maps.pool(1) is maps
    with pytest.raises(ValueError, match="block must be a positive int"):
        maps.pool(0)


def test_pool_averages_over_real_queries_only():
    maps, w = padded_maps()
    pooled = maps.pool(3)  # sample 1's first block holds 2 padded rows and 1 real one
    expected = w[1, 0, 2, :3].sum()  # the mean over that block's single real row
    torch.testing.assert_close(pooled[0, 0][1, 0, 0], expected)
    assert pooled.query_real[1].tolist() == [True, True]


def test_summary_of_an_identity_head():
    T = 5
    eye = torch.eye(T).view(1, 1, T, T)  # each token attends to itself
    first = torch.zeros(1, 1, T, T)
    first[..., 0] = 1.0  # every token attends to the first one
    maps = AttentionMaps.from_tensor([torch.cat([eye, first], 1)], tokens=[list("vwxyz")],
                                     title="toy")
    text = maps.summary()
    assert text.splitlines()[0] == "toy: 1 layer(s) x 2 head(s), sample 0 of 1: 5 queries x 5 keys"
    rows = [line for line in text.splitlines() if line.startswith("|     0 |")]
    assert rows[0].split("|")[3:6] == ["   0.000 ", "          0.00 ", "          0.200 "]
    # distance 0+1+2+3+4 over 5 rows; all on the first token, which gets the most weight
    assert rows[1].split("|")[3:7] == ["   0.000 ", "          2.00 ", "          1.000 ",
                                       " 0:'v'             "]
    assert str(maps) == text


def test_constructor_errors():
    w = torch.rand(1, 4, 4)
    with pytest.raises(TypeError, match=r"weights must be a dict \{\(layer, head\)"):
        AttentionMaps([w])
    with pytest.raises(ValueError, match="weights is empty"):
        AttentionMaps({})
    with pytest.raises(ValueError, match=r"missing \[\(1, 0\)\]"):
        AttentionMaps({(0, 0): w, (0, 1): w, (1, 1): w})
    with pytest.raises(ValueError, match=r"every weight tensor must be \(B, T, S\) of one "
                                         r"shape"):
        AttentionMaps({(0, 0): w, (0, 1): torch.rand(1, 4, 5)})
    with pytest.raises(ValueError, match="query_tokens must be 1 lists of 4 tokens"):
        AttentionMaps({(0, 0): w}, query_tokens=[["a"]])
    with pytest.raises(ValueError, match=r"query_real must be \(1, 4\)"):
        AttentionMaps({(0, 0): w}, query_real=torch.ones(4))
    with pytest.raises(ValueError, match="weights must be a"):
        AttentionMaps.from_tensor(torch.rand(4, 4))
    with pytest.raises(ValueError, match="layers must name each of the 1 tensors"):
        AttentionMaps.from_tensor(torch.rand(1, 1, 4, 4), layers=[0, 1])


def test_to_dict_is_json_ready():
    import json

    maps, _ = padded_maps()
    data = json.loads(json.dumps(maps.to_dict(sample=1)))
    assert data["layers"] == [0] and data["heads"] == [0, 1]
    assert data["query_tokens"] == ["b2", "b3", "b4", "b5"]
    assert data["query_positions"] == [2, 3, 4, 5] and data["block"] == 1
    assert len(data["weights"]) == 1 and len(data["weights"][0]) == 2
    assert len(data["weights"][0][1]) == 4 and len(data["weights"][0][1][0]) == 4


# --- figures ------------------------------------------------------------------------------

def _panels(fig):
    return [ax for ax in fig.axes if hasattr(ax, "_attnkit_ticks")]


def test_views_draw_one_panel_per_head_and_layer():
    pytest.importorskip("matplotlib")
    maps = AttentionMaps.from_tensor(causal(L=2, H=3, T=8))
    assert len(_panels(maps.model_view())) == 6
    assert len(_panels(maps.head_view(1))) == 3
    assert len(_panels(maps.heatmap())) == 1
    assert len(_panels(maps.figure("heatmap", layer=0, head=2))) == 1
    assert "head 2" in maps.head_view(1).axes[2].get_title()
    assert _panels(maps.heatmap(vmax=0.5))[0].images[0].get_clim() == (0.0, 0.5)
    with pytest.raises(ValueError, match="view must be one of"):
        maps.figure("bars")
    with pytest.raises(KeyError, match="layer 4 was not inspected"):
        maps.head_view(4)


def test_a_2k_sequence_is_pooled_readably():
    pytest.importorskip("matplotlib")
    from figure_overlap import overlapping_texts

    T = 2048
    maps = AttentionMaps.from_tensor(causal(L=1, H=2, B=1, T=T),
                                     tokens=[[f"t{i}" for i in range(T)]])
    fig = maps.head_view(0)  # 2048 tokens: blocks of 16, 128 cells a side
    panel = _panels(fig)[0]
    assert panel.images[0].get_array().shape == (128, 128)
    assert "blocks of 16 tokens" in fig.get_suptitle()
    assert overlapping_texts(fig) == []
    # a zoomed window shows its own tokens at their positions
    fig = maps.zoom(rows=(1000, 1040), cols=(960, 1040)).heatmap(0, 1)
    panel = _panels(fig)[0]
    assert panel.images[0].get_array().shape == (40, 80)
    assert "queries 1000..1039, keys 960..1039" in fig.get_suptitle()
    labels = [t.get_text() for t in panel.get_yticklabels() if t.get_text()]
    assert labels[0] in ("t1000", "1000:t1000") and overlapping_texts(fig) == []


def test_save_png_atomically_and_notebook_reprs(tmp_path):
    pytest.importorskip("matplotlib")
    maps, _ = padded_maps()
    path = maps.save(tmp_path / "out" / "heads.png", view="head", sample=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["heads.png"]  # no temporary left
    page = maps._repr_html_()  # the summary and _repr_png_'s model view
    assert page.startswith(f"<pre>{html.escape(maps.summary())}</pre>")  # tokens escaped
    prefix = '<img alt="attention weights" src="data:image/png;base64,'
    png = base64.b64decode(page[page.index(prefix) + len(prefix):].split('"')[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_viz_positions_label_thinned_ticks():
    pytest.importorskip("matplotlib")
    from attnkit import viz

    fig = viz.heatmap_figure(torch.rand(200, 200), [f"k{i}" for i in range(200)],
                             [f"q{i}" for i in range(200)],
                             x_index=range(500, 700), y_index=range(100, 300))
    viz.fit_tick_labels(fig)
    ys = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert ys[0] == "100:q0" and ys[-1] == "299:q199"  # thinned: position:token
    with pytest.raises(ValueError, match=r"x_index must have one position per column \(3\)"):
        viz.heatmap_figure(torch.rand(2, 3), x_index=[0, 1])


def test_widget_shows_the_readable_sample_in_the_head_and_model_views():
    """AttentionMaps.widget() hands one sample, padding dropped, to attnkit.widgets.heads."""
    from attnkit import widgets
    from attnkit.apps.explore.model_view import heads_view

    maps, w = padded_maps()
    view = maps.widget(sample=1, static=True)
    assert isinstance(view, widgets.StaticView)
    # the same payload heads_view builds from sample 1's real tokens (2 padded dropped)
    want = heads_view(w[1:2, :, 2:, 2:], [f"b{i}" for i in range(2, 6)],
                      layer_labels=["0"], head_labels=["0", "1"])
    got = view.data["gpt"]
    assert got["tokens"] == want["tokens"] == ["b2", "b3", "b4", "b5"]
    assert got["weights_u8"] == want["weights_u8"] and got["layer_labels"] == ["0"]


def test_widget_refuses_cross_attention_maps():
    maps = AttentionMaps({(0, 0): torch.full((1, 3, 5), 0.2)})
    with pytest.raises(ValueError, match="self-attention over one token sequence"):
        maps.widget(static=True)
