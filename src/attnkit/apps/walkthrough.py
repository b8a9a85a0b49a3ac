"""``attnkit walkthrough``: every step of the tutorial, printed with its numbers.

On the tutorial's sentence "Your journey starts with one step" (3-d embeddings) it prints
each step in the tutorial's order, under the tutorial's section titles and variable names,
checks the values the tutorial publishes, and (unless ``--no-plots``) writes PNG heatmaps:
the 6x6 attention weights, the causal weights, the causal weights after dropout, and one
panel per head of the multi-head weights. ``make demo`` runs it. :func:`run` is the same
walkthrough as a function.

``--lang zh`` prints it in Chinese, with the section titles and terms of the tutorial attnkit
grew from (default: the terminal's language); every printed text is in the catalogues of
:mod:`attnkit.apps._i18n`. Numbers, variable names and figure titles stay as in the code.
"""

from __future__ import annotations

import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import tutorial, viz
from ._cli import HelpFormatter, add_common_options, check_out_dir, check_plotting
from ._i18n import LANGUAGES, terminal_language, translator

__all__ = ["SENTENCE", "TOKENS", "EMBEDDINGS", "PUBLISHED", "WalkthroughResult", "run",
           "add_parser"]

SENTENCE = "Your journey starts with one step"
TOKENS = SENTENCE.split()
EMBEDDINGS = ((0.43, 0.15, 0.89),  # Your
              (0.55, 0.87, 0.66),  # journey
              (0.57, 0.85, 0.64),  # starts
              (0.22, 0.58, 0.33),  # with
              (0.77, 0.25, 0.10),  # one
              (0.05, 0.80, 0.55))  # step

# Values printed in the tutorial (4 decimals), checked as the walkthrough reaches them.
PUBLISHED = {
    "attn_weights_2": (0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581),
    "context_vec_2": (0.4419, 0.6515, 0.5683),
    "sa_v1 row 0": (0.2996, 0.8053),
    "sa_v2 row 0": (-0.0739, 0.0713),
    "ca row 0": (-0.4519, 0.2216),
    "mha wrapper row 0": (-0.4519, 0.2216, 0.4772, 0.1063),
    "mha row 0": (0.3190, 0.4858),
}
_TOLERANCE = 5e-5  # half a unit in the 4th decimal


@dataclass
class WalkthroughResult:
    """What a run produced: the figures written and any published value that differed."""

    files: list[Path] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if value != float("-inf") else "-inf"


def _vector(t: Tensor) -> str:
    return "[" + ", ".join(_fmt(v) for v in t.tolist()) + "]"


def _pad(text: str, width: int) -> str:
    """``text`` padded to ``width`` terminal columns (a CJK character takes two)."""
    columns = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - columns)


class _Report:
    """Prints labelled steps and checks published values as they go by."""

    def __init__(self, stream, result: WalkthroughResult, language: str):
        self.stream, self.result, self.tr = stream, result, translator(language)

    def section(self, key: str, **values) -> None:
        print(f"\n== {self.tr('walkthrough.section.' + key, **values)} ==", file=self.stream)

    def line(self, text: str = "") -> None:
        print(text, file=self.stream)

    def vector(self, label: str, t: Tensor, published: str | None = None) -> None:
        t = t.detach()
        note = ""
        if published is not None:
            expected = torch.tensor(PUBLISHED[published], dtype=t.dtype)
            ok = torch.allclose(t, expected, atol=_TOLERANCE, rtol=0)
            note = "   " + (self.tr("walkthrough.matches") if ok else
                             self.tr("walkthrough.differs", values=_vector(expected)))
            if not ok:
                self.result.mismatches.append(published)
        self.line(f"{_pad(label, 38)} {_vector(t)}{note}")

    def table(self, label: str, t: Tensor, columns=None) -> None:
        """A matrix with one row per token; ``columns`` labels the columns when given."""
        t = t.detach()
        self.line(self.tr("walkthrough.shape", label=label, shape=tuple(t.shape)))
        if columns is not None:
            self.line(" " * 9 + "".join(f"{c:>9}" for c in columns))
        for token, row in zip(TOKENS, t.tolist()):
            self.line(f"  {token:<7}" + "".join(f"{_fmt(v):>9}" for v in row))


def run(out_dir=None, *, plots: bool = True, stream=None,
        language: str = "en") -> WalkthroughResult:
    """Print the tutorial step by step and write its heatmaps.

    Args:
        out_dir: directory for the PNGs (created if missing); required when ``plots``.
        plots: write the heatmaps.
        stream: where to print; defaults to ``sys.stdout``.
        language: ``"en"`` or ``"zh"`` (:data:`attnkit.apps._i18n.LANGUAGES`).

    Returns:
        The figures written and the names of published values that did not reproduce.

    Raises:
        ImportError: ``plots`` is set and matplotlib is missing (checked before printing).
        ValueError: ``plots`` is set and ``out_dir`` is None, or ``language`` has no
            catalogue.
        TypeError: ``language`` is not a str.
    """
    tr = translator(language)  # checks the language before anything is printed
    if plots:
        viz.require_matplotlib()
        if out_dir is None:
            raise ValueError("out_dir is required when plots=True (or pass plots=False)")
        out_dir = Path(out_dir)
    result = WalkthroughResult()
    say = _Report(stream or sys.stdout, result, language)

    def figure(draw, name: str, *args, **kwargs) -> None:
        if plots:
            result.files.append(draw(*args, path=out_dir / name, **kwargs))

    inputs = torch.tensor(EMBEDDINGS)  # (T, d_in) = (6, 3)
    say.line(tr("walkthrough.sentence", sentence=SENTENCE))
    say.table("inputs", inputs)
    _simple_attention(say, figure, inputs)
    sa_v2 = _trainable_weights(say, inputs)
    _causal(say, figure, inputs, sa_v2)
    _multi_head(say, figure, inputs)
    if result.files:
        say.section("figures")
        for path in result.files:
            say.line(tr("walkthrough.wrote", path=path))
    return result


def _simple_attention(say: _Report, figure, inputs: Tensor) -> None:
    tr = say.tr
    say.section("3.3.1")
    query = inputs[1]  # (d_in,): "journey", the tutorial's x(2)
    attn_scores_2 = inputs @ query  # (T,)
    say.vector(tr("walkthrough.attn_scores_2", token="journey"), attn_scores_2)
    attn_weights_2_tmp = attn_scores_2 / attn_scores_2.sum()
    say.vector(tr("walkthrough.attn_weights_2_tmp"), attn_weights_2_tmp)
    attn_weights_2 = torch.softmax(attn_scores_2, dim=0)
    say.vector(tr("walkthrough.attn_weights_2"), attn_weights_2, "attn_weights_2")
    say.line(f"{_pad(tr('walkthrough.sum'), 38)} {_fmt(attn_weights_2.sum().item())}")
    say.vector("context_vec_2 = z(2)", attn_weights_2 @ inputs, "context_vec_2")

    say.section("3.3.2")
    say.table("attn_scores = inputs @ inputs.T", inputs @ inputs.T, TOKENS)
    all_context_vecs, attn_weights = tutorial.simple_self_attention(inputs)
    say.table("attn_weights = softmax(attn_scores, dim=-1)", attn_weights, TOKENS)
    say.vector(tr("walkthrough.row_sums"), attn_weights.sum(dim=-1))
    say.table("all_context_vecs = attn_weights @ inputs", all_context_vecs)
    figure(viz.heatmap, "attention_weights.png", attn_weights, TOKENS, TOKENS,
           "Self-attention weights (no trainable weights)")


def _trainable_weights(say: _Report, inputs: Tensor) -> nn.Module:
    tr = say.tr
    say.section("3.4.1", seed=123, d_out=2)
    torch.manual_seed(123)
    sa_v1 = tutorial.SelfAttentionV1(3, 2)  # the three torch.rand(3, 2) draws of the text
    W_query, W_key, W_value = sa_v1.W_query.detach(), sa_v1.W_key.detach(), sa_v1.W_value.detach()
    for name, weight in (("W_query", W_query), ("W_key", W_key), ("W_value", W_value)):
        say.line(f"{name:<8} " + "  ".join(_vector(row) for row in weight))
    x_2 = inputs[1]
    query_2, keys, values = x_2 @ W_query, inputs @ W_key, inputs @ W_value  # (2,), (6, 2) x2
    say.vector("query_2", query_2)
    say.vector("key_2", keys[1])
    say.vector("value_2", values[1])
    say.line(f"{'attn_score_22 = query_2 . key_2':<38} {_fmt((query_2 @ keys[1]).item())}")
    attn_scores_2 = query_2 @ keys.T  # (T,)
    say.vector("attn_scores_2", attn_scores_2)
    d_k = keys.shape[-1]
    attn_weights_2 = torch.softmax(attn_scores_2 / d_k ** 0.5, dim=-1)
    say.vector(tr("walkthrough.scaled", d_k=d_k), attn_weights_2)
    say.vector("context_vec_2", attn_weights_2 @ values)

    say.section("3.4.2")
    v1_out = sa_v1(inputs)
    say.table("SelfAttentionV1(3, 2), seed 123", v1_out)
    say.vector("sa_v1 row 0", v1_out[0], "sa_v1 row 0")
    torch.manual_seed(789)
    sa_v2 = tutorial.SelfAttentionV2(3, 2)
    v2_out = sa_v2(inputs)
    say.table("SelfAttentionV2(3, 2), seed 789", v2_out)
    say.vector("sa_v2 row 0", v2_out[0], "sa_v2 row 0")
    gap = (tutorial.v1_from_v2(sa_v2)(inputs) - v2_out).abs().max().item()
    say.line(tr("walkthrough.v1_from_v2", gap=f"{gap:.1e}"))
    return sa_v2


def _causal(say: _Report, figure, inputs: Tensor, sa_v2: nn.Module) -> None:
    tr = say.tr
    say.section("3.5.1")
    queries, keys = sa_v2.W_query(inputs).detach(), sa_v2.W_key(inputs).detach()  # (T, 2)
    attn_scores = queries @ keys.T  # (T, T)
    d_k = keys.shape[-1]
    attn_weights = torch.softmax(attn_scores / d_k ** 0.5, dim=-1)
    say.table("attn_weights", attn_weights, TOKENS)
    context_length = attn_scores.shape[0]
    mask_simple = torch.tril(torch.ones(context_length, context_length))
    say.table(tr("walkthrough.mask_simple"), mask_simple, TOKENS)
    masked_simple_norm = tutorial.mask_after_softmax(attn_weights)
    say.table(tr("walkthrough.method1"), masked_simple_norm, TOKENS)
    blocked = torch.triu(torch.ones(context_length, context_length), diagonal=1).bool()
    say.table(tr("walkthrough.masked"), attn_scores.masked_fill(blocked, -torch.inf), TOKENS)
    causal = tutorial.mask_before_softmax(attn_scores, d_k)
    say.table(tr("walkthrough.method2"), causal, TOKENS)
    gap = (causal - masked_simple_norm).abs().max().item()
    say.line(tr("walkthrough.agree", ok=torch.allclose(causal, masked_simple_norm),
                gap=f"{gap:.1e}"))
    figure(viz.heatmap, "causal_weights.png", causal, TOKENS, TOKENS, "Causal attention weights")

    say.section("3.5.2", p=0.5, seed=123)
    dropout = nn.Dropout(0.5)  # a fresh module is in training mode, so it drops
    torch.manual_seed(123)
    say.table(tr("walkthrough.dropout_ones"), dropout(torch.ones(6, 6)), TOKENS)
    torch.manual_seed(123)
    dropped = dropout(causal)
    say.table("dropout(attn_weights)", dropped, TOKENS)
    figure(viz.heatmap, "causal_weights_dropout.png", dropped, TOKENS, TOKENS,
           "Causal weights after dropout (p = 0.5)",
           colorbar_label="attention weight after dropout (survivors x 2)")


def _multi_head(say: _Report, figure, inputs: Tensor) -> None:
    batch = torch.stack((inputs, inputs))  # (B, T, d_in) = (2, 6, 3)
    tr = say.tr
    say.section("3.5.3")
    say.line(tr("walkthrough.batch", shape=tuple(batch.shape)))
    torch.manual_seed(123)
    context_vecs = tutorial.CausalAttention(3, 2, 6, 0.0)(batch)
    say.table("CausalAttention(3, 2, 6, 0.0), seed 123", context_vecs[0])
    say.vector("ca row 0", context_vecs[0, 0], "ca row 0")

    say.section("3.6.1")
    torch.manual_seed(123)
    context_vecs = tutorial.MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)(batch)
    say.line(tr("walkthrough.wrapper_shape", shape=tuple(context_vecs.shape)))
    say.table("MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2), seed 123", context_vecs[0])
    say.vector("mha wrapper row 0", context_vecs[0, 0], "mha wrapper row 0")

    say.section("3.6.2")
    head_weights, titles = [], []
    for d_out in (2, 4):
        torch.manual_seed(123)
        mha = tutorial.MultiHeadAttention(3, d_out, 6, 0.0, num_heads=2)
        context_vecs, weights = mha(batch, return_weights=True)  # (B, T, d_out), (B, H, T, T)
        say.table(f"MultiHeadAttention(3, {d_out}, 6, 0.0, num_heads=2), seed 123, head_dim "
                  f"{mha.head_dim}", context_vecs[0])
        if d_out == 2:
            say.vector("mha row 0", context_vecs[0, 0], "mha row 0")
        head_weights.append(weights[0].detach())  # (H, T, T)
        titles.append(f"d_out={d_out}")
    figure(viz.head_grid, "multihead_weights.png", torch.stack(head_weights), TOKENS, TOKENS,
           title="MultiHeadAttention weights, seed 123", row_titles=titles)


def _command(args) -> int:
    if not args.no_plots:
        check_out_dir(args.out)
        check_plotting(True)
    language = args.lang or terminal_language()
    result = run(args.out, plots=not args.no_plots, language=language)
    if result.mismatches:
        message = translator(language)("walkthrough.mismatch", names=result.mismatches)
        print(f"attnkit walkthrough: {message}", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> None:
    """Register ``attnkit walkthrough`` (see :mod:`attnkit.cli`)."""
    parser = subparsers.add_parser(
        "walkthrough", help="print every step of the attention tutorial with its numbers",
        formatter_class=HelpFormatter,
        description='Print every step of the attention tutorial on "Your journey starts with\n'
                    'one step", under the tutorial\'s section titles and variable names, check\n'
                    'the values it publishes, and write PNG heatmaps of the attention weights.')
    add_common_options(parser, out="out/walkthrough", seed=False, quiet=False, plots=True)
    parser.add_argument("--lang", choices=LANGUAGES,
                        help="language of the printed steps: en, or zh (Chinese, with the "
                             "seed tutorial's section titles and terms); default: the "
                             "terminal's language (LC_ALL, LC_MESSAGES, LANG, LANGUAGE)")
    parser.set_defaults(func=_command)
