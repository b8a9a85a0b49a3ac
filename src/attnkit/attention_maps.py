"""Attention weights of chosen layers and heads, and what a reader does with them.

:func:`attnkit.inspect` returns an :class:`AttentionMaps`; :meth:`AttentionMaps.from_tensor`
wraps weights from anywhere else (transformers' ``outputs.attentions``, attnkit's
``return_weights=True``). The object is plain data plus methods:

* data: ``maps[layer, head]`` is ``(B, T, S)``; :attr:`~AttentionMaps.layers`,
  :attr:`~AttentionMaps.heads`, the tokens, which positions are real (not padding) and the
  original position of every row and column; :meth:`~AttentionMaps.to_dict` is the same as
  JSON-ready lists (what a notebook widget reads);
* reading: :meth:`~AttentionMaps.aggregate` (mean or max over heads, layers or both),
  :meth:`~AttentionMaps.sample` (one sequence, its padding dropped),
  :meth:`~AttentionMaps.zoom` (a window of rows and columns, positions kept) and
  :meth:`~AttentionMaps.pool` (blocks of tokens: the mean over a block's queries of the
  weight on a block's keys, so rows still sum to at most 1), each returning a new
  :class:`AttentionMaps`;
* drawing (:mod:`attnkit.attention_views`, matplotlib imported lazily through
  :mod:`attnkit.viz`): ``heatmap``, ``head_view`` (one layer's heads), ``model_view``
  (layers x heads), ``save`` (atomic; PNG by default), ``to_png``; a long sequence is
  pooled to at most ``max_cells`` cells a side (:meth:`~AttentionMaps.readable`), and the
  title says so. In a notebook the object draws itself (``_repr_png_``, ``_repr_html_``);
  in text it prints ``summary()``.

Shape letters: ``B`` batch, ``T`` queries, ``S`` keys, ``L`` layers, ``H`` heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .attention_views import MapViews

__all__ = ["AttentionMaps"]

def _tokens(tokens, B: int, n: int, what: str) -> tuple:
    if tokens is None:
        return tuple(tuple(str(i) for i in range(n)) for _ in range(B))
    tokens = [list(t) for t in tokens]
    if len(tokens) != B or any(len(t) != n for t in tokens):
        raise ValueError(f"{what} must be {B} lists of {n} tokens, got lengths "
                         f"{[len(t) for t in tokens]}")
    return tuple(tuple(str(s) for s in t) for t in tokens)


def _real(real, B: int, n: int, what: str) -> Tensor:
    if real is None:
        return torch.ones(B, n, dtype=torch.bool)
    real = torch.as_tensor(real).to("cpu", torch.bool)
    if tuple(real.shape) != (B, n):
        raise ValueError(f"{what} must be ({B}, {n}), got {tuple(real.shape)}")
    return real


class AttentionMaps(MapViews):
    """Attention weights ``(B, T, S)`` per ``(layer, head)``, with tokens and positions.

    Args:
        weights: ``{(layer, head): (B, T, S) tensor}`` for every pair of some layers and
            some heads (a full grid), all of one shape.
        query_tokens: ``B`` lists of ``T`` strings (default: positions).
        key_tokens: ``B`` lists of ``S`` strings (default: ``query_tokens`` when ``S == T``).
        query_real, key_real: ``(B, T)`` / ``(B, S)`` bool, False for padding (default all).
        query_positions, key_positions: the original position of each row / column
            (default ``0, 1, ...``; a zoomed or pooled map keeps its source's).
        layer_names: ``{layer: module name}``; layer_info: ``{layer: mask and scores}``.
        block: tokens per cell (1; more for a pooled map).
        title: what the weights are of (figure titles, the summary).
        window: set by :meth:`zoom`: ``((first, last) query, (first, last) key)`` positions,
            said in figure titles.

    Raises:
        TypeError: ``weights`` not a dict of tensors keyed by ``(int, int)``.
        ValueError: an empty or partial grid, tensors of different shapes or not 3-D, tokens
            or masks of the wrong size.
    """

    def __init__(self, weights: dict, *, query_tokens=None, key_tokens=None, query_real=None,
                 key_real=None, query_positions=None, key_positions=None, layer_names=None,
                 layer_info=None, block: int = 1, title: str = "attention", window=None):
        if not isinstance(weights, dict) or not all(
                isinstance(k, tuple) and len(k) == 2 and all(isinstance(i, int) for i in k)
                and isinstance(w, Tensor) for k, w in weights.items()):
            raise TypeError("weights must be a dict {(layer, head): (B, T, S) tensor}")
        if not weights:
            raise ValueError("weights is empty: pass at least one (layer, head)")
        self.layers = tuple(sorted({k[0] for k in weights}))
        self.heads = tuple(sorted({k[1] for k in weights}))
        missing = [(l, h) for l in self.layers for h in self.heads if (l, h) not in weights]
        if missing:
            raise ValueError(f"weights must hold every (layer, head) of layers {self.layers} "
                             f"and heads {self.heads}; missing {missing}")
        shapes = {tuple(w.shape) for w in weights.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"every weight tensor must be (B, T, S) of one shape, got "
                             f"{sorted(shapes)}")
        self._weights = {k: weights[k].detach() for k in sorted(weights)}
        B, T, S = next(iter(shapes))
        self.batch_size, self.num_queries, self.num_keys = B, T, S
        self.query_tokens = _tokens(query_tokens, B, T, "query_tokens")
        self.key_tokens = _tokens(key_tokens if key_tokens is not None or S != T
                                  else query_tokens, B, S, "key_tokens")
        self.query_real = _real(query_real, B, T, "query_real")
        self.key_real = _real(key_real, B, S, "key_real")
        self.query_positions = list(range(T)) if query_positions is None else \
            [int(p) for p in query_positions]
        self.key_positions = list(range(S)) if key_positions is None else \
            [int(p) for p in key_positions]
        if len(self.query_positions) != T or len(self.key_positions) != S:
            raise ValueError(f"query_positions / key_positions must have {T} / {S} entries, "
                             f"got {len(self.query_positions)} / {len(self.key_positions)}")
        self.layer_names = dict(layer_names or {})
        self.layer_info = dict(layer_info or {})
        self.block = int(block)
        self.title = title
        self.window = window  # ((first, last) query, (first, last) key position) of a zoom

    @classmethod
    def from_tensor(cls, weights, *, layers=None, tokens=None, attention_mask=None,
                    title: str = "attention") -> "AttentionMaps":
        """Wrap ``(B, H, T, S)`` weights of one layer, or a sequence of them (one per
        layer, as transformers' ``outputs.attentions``).

        Args:
            layers: the layer number of each entry (default ``0, 1, ...``).
            tokens: ``B`` lists of ``T`` strings (queries and keys, ``S == T``).
            attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding.

        Raises:
            ValueError: tensors that are not 4-D, or ``layers`` of another length.
        """
        stack = [weights] if isinstance(weights, Tensor) else list(weights)
        if not stack or any(not isinstance(w, Tensor) or w.dim() != 4 for w in stack):
            raise ValueError("weights must be a (B, H, T, S) tensor or a sequence of them")
        layers = list(range(len(stack))) if layers is None else list(layers)
        if len(layers) != len(stack):
            raise ValueError(f"layers must name each of the {len(stack)} tensors, got "
                             f"{len(layers)}")
        grid = {(int(l), h): w[:, h] for l, w in zip(layers, stack) for h in range(w.shape[1])}
        real = None if attention_mask is None else torch.as_tensor(attention_mask).bool()
        return cls(grid, query_tokens=tokens, query_real=real,
                   key_real=real if stack[0].shape[-1] == stack[0].shape[-2] else None,
                   title=title)

    # --- data -----------------------------------------------------------------------------

    def __getitem__(self, key) -> Tensor:
        """``maps[layer, head]``: ``(B, T, S)``.

        Raises:
            KeyError: a pair that was not inspected (the message lists what was).
        """
        if key not in self._weights:
            raise KeyError(f"{key!r} was not inspected: layers {self.layers}, heads "
                           f"{self.heads}")
        return self._weights[key]

    def stack(self, sample: int | None = None) -> Tensor:
        """All weights as one tensor: ``(L, H, B, T, S)``, or ``(L, H, T, S)`` of one
        sample."""
        out = torch.stack([torch.stack([self._weights[l, h] for h in self.heads])
                           for l in self.layers])  # (L, H, B, T, S)
        return out if sample is None else out[:, :, self._sample_index(sample)]

    def aggregate(self, over: str = "heads", reduce: str = "mean") -> Tensor:
        """Reduce the weights over the chosen heads, layers or both.

        Args:
            over: ``"heads"`` -> ``(L, B, T, S)``, ``"layers"`` -> ``(H, B, T, S)``,
                ``"all"`` -> ``(B, T, S)``.
            reduce: ``"mean"`` or ``"max"``.

        Raises:
            ValueError: another ``over`` or ``reduce``.
        """
        dims = {"heads": (1,), "layers": (0,), "all": (0, 1)}
        if over not in dims:
            raise ValueError(f"over must be one of {list(dims)}, got {over!r}")
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        stacked = self.stack()  # (L, H, B, T, S)
        return stacked.mean(dims[over]) if reduce == "mean" else stacked.amax(dims[over])

    def _sample_index(self, sample: int) -> int:
        if isinstance(sample, bool) or not isinstance(sample, int) \
                or not -self.batch_size <= sample < self.batch_size:
            raise ValueError(f"sample must be an int in [0, {self.batch_size}), got "
                             f"{sample!r}")
        return sample % self.batch_size

    def _replace(self, weights, rows, cols, batch=None, **changes) -> "AttentionMaps":
        """A map of the same model: ``weights`` on rows ``rows`` and columns ``cols`` of
        this one, for the samples ``batch`` (default all)."""
        batch = list(range(self.batch_size)) if batch is None else batch
        args = dict(query_tokens=[[self.query_tokens[b][i] for i in rows] for b in batch],
                    key_tokens=[[self.key_tokens[b][j] for j in cols] for b in batch],
                    query_real=self.query_real[batch][:, rows],
                    key_real=self.key_real[batch][:, cols],
                    query_positions=[self.query_positions[i] for i in rows],
                    key_positions=[self.key_positions[j] for j in cols],
                    layer_names=self.layer_names, layer_info=self.layer_info,
                    block=self.block, title=self.title, window=self.window)
        args.update(changes)
        return AttentionMaps(weights, **args)

    def sample(self, sample: int = 0) -> "AttentionMaps":
        """One sequence of the batch (``B = 1``), its padded rows and columns dropped.

        Raises:
            ValueError: ``sample`` out of range, or a sample with no real token.
        """
        b = self._sample_index(sample)
        rows = self.query_real[b].nonzero()[:, 0].tolist()
        cols = self.key_real[b].nonzero()[:, 0].tolist()
        if not rows or not cols:
            raise ValueError(f"sample {b} has no real tokens (its attention_mask is all 0)")
        weights = {k: w[b:b + 1, rows][:, :, cols] for k, w in self._weights.items()}
        return self._replace(weights, rows, cols, batch=[b])

    def zoom(self, rows=None, cols=None) -> "AttentionMaps":
        """The window of queries at positions ``rows = (start, stop)`` and keys at
        ``cols = (start, stop)`` (stop excluded; None = all), positions kept.

        Raises:
            ValueError: a range that is not ``(start, stop)`` with ``start < stop``, or one
                that holds no row / column.
        """
        def pick(span, positions, what):
            if span is None:
                return list(range(len(positions)))
            if isinstance(span, slice):
                span = (span.start if span.start is not None else positions[0],
                        span.stop if span.stop is not None else positions[-1] + 1)
            if not (isinstance(span, (tuple, list)) and len(span) == 2
                    and all(isinstance(x, int) for x in span) and span[0] < span[1]):
                raise ValueError(f"{what} must be (start, stop) positions with start < stop, "
                                 f"got {span!r}")
            out = [i for i, p in enumerate(positions) if span[0] <= p < span[1]]
            if not out:
                raise ValueError(f"{what}={tuple(span)} holds no position of this map (it "
                                 f"has {positions[0]}..{positions[-1]})")
            return out

        r = pick(rows, self.query_positions, "rows")
        c = pick(cols, self.key_positions, "cols")
        weights = {k: w[:, r][:, :, c] for k, w in self._weights.items()}
        q, k = self.query_positions, self.key_positions
        return self._replace(weights, r, c, window=((q[r[0]], q[r[-1]]), (k[c[0]], k[c[-1]])))

    def pool(self, block: int) -> "AttentionMaps":
        """Blocks of ``block`` tokens: cell ``(I, J)`` is the mean, over the real queries of
        block ``I``, of their total weight on the keys of block ``J`` (rows keep summing to
        at most 1). Tokens become the block's text, positions the block's first.

        Raises:
            ValueError: ``block`` not a positive int.
        """
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int (tokens per cell), got {block!r}")
        if block == 1:
            return self
        B, T, S = self.batch_size, self.num_queries, self.num_keys
        nT, nS = -(-T // block), -(-S // block)
        real = torch.nn.functional.pad(self.query_real.float(), (0, nT * block - T))
        count = real.view(B, nT, block).sum(-1)  # (B, nT) real queries per block
        weights = {}
        for key, w in self._weights.items():
            w = torch.nn.functional.pad(w, (0, nS * block - S, 0, nT * block - T))
            w = w.view(B, nT, block, nS, block).sum((2, 4))  # (B, nT, nS)
            weights[key] = w / count.clamp(min=1).unsqueeze(-1).to(w.dtype)
        rows, cols = list(range(0, T, block)), list(range(0, S, block))

        def text(tokens, starts):  # the block's text, cut to 12 characters
            return [["".join(t[i:i + block])[:12] + "…" for i in starts] for t in tokens]

        def any_real(mask, n, blocks):
            padded = torch.nn.functional.pad(mask, (0, blocks * block - n))
            return padded.view(B, blocks, block).any(-1)

        return self._replace(weights, rows, cols,
                             query_tokens=text(self.query_tokens, rows),
                             key_tokens=text(self.key_tokens, cols),
                             query_real=any_real(self.query_real, T, nT),
                             key_real=any_real(self.key_real, S, nS),
                             block=self.block * block)

    def readable(self, sample: int = 0, max_cells: int = 256) -> "AttentionMaps":
        """One sample without padding (:meth:`sample`), pooled (:meth:`pool`) to at most
        ``max_cells`` cells a side: what the figures draw."""
        maps = self.sample(sample)
        n = max(maps.num_queries, maps.num_keys)
        return maps.pool(math.ceil(n / max_cells)) if n > max_cells else maps

    def to_dict(self, sample: int = 0, max_cells: int = 256) -> dict:
        """One sample as JSON-ready data (pooled to at most ``max_cells`` a side): layers,
        heads, tokens, positions, block and ``weights[i][j]`` (rows of floats) for layer
        ``layers[i]``, head ``heads[j]``."""
        maps = self.readable(sample, max_cells)
        return {"title": self.title, "layers": list(self.layers), "heads": list(self.heads),
                "layer_names": {str(l): n for l, n in self.layer_names.items()},
                "query_tokens": list(maps.query_tokens[0]),
                "key_tokens": list(maps.key_tokens[0]),
                "query_positions": maps.query_positions, "key_positions": maps.key_positions,
                "block": maps.block,
                "weights": [[maps[l, h][0].float().tolist() for h in self.heads]
                            for l in self.layers]}

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (f"AttentionMaps(layers={self.layers}, heads={self.heads}, "
                f"B={self.batch_size}, T={self.num_queries}, S={self.num_keys}"
                + (f", block={self.block}" if self.block > 1 else "") + ")")
