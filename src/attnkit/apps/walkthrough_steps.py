"""The tutorial's steps, written once: the code ``attnkit walkthrough`` runs and the code cells
of the notebook ``attnkit walkthrough --notebook`` writes.

Each :class:`Step` is the Python a learner would type for one section of the tutorial, run in
one namespace from :data:`PRELUDE` on, so later steps use earlier steps' variables (``inputs``,
``sa_v2``, ``batch``). The code shows its results through ``show`` (a
:class:`attnkit.apps.walkthrough.Show`: printed lines with the published values checked, and
heatmaps) and words them through ``tr("walkthrough.<key>", **fields)``, the catalogues of
:mod:`attnkit.apps._i18n`. The command line runs the code as written with ``tr`` bound to the
chosen language; the notebook writer replaces each ``tr(...)`` call by its text in the
notebook's language (an f-string where a field is a variable), so a learner reads plain Python.
A field of a ``tr`` call is a literal or an expression without quotes, so it fits an f-string.

:data:`EXERCISES` are the chapter's three exercises, in the notebook only: a task, and a
solution cell whose code the learner reveals.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SENTENCE", "TOKENS", "EMBEDDINGS", "PUBLISHED", "TOLERANCE", "Step", "Exercise",
           "PRELUDE", "STEPS", "EXERCISES"]

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
TOLERANCE = 5e-5  # half a unit in the 4th decimal


@dataclass(frozen=True)
class Step:
    """One section of the tutorial.

    Attributes:
        code: the Python run for it (command line and notebook alike).
        section: catalogue key of its title (None: no title, the opening step).
        note: catalogue key of the notebook's explanation above the code.
        title_fields: the title's ``{name}`` fields.
    """

    code: str
    section: str | None
    note: str
    title_fields: tuple = ()


@dataclass(frozen=True)
class Exercise:
    """One of the chapter's exercises: the task (catalogue keys) and a solution."""

    title: str
    task: str
    solution: str


# The notebook's first code cell; the command line runs it too, then binds show and tr.
PRELUDE = """\
import torch
from torch import nn

from attnkit import tutorial
from attnkit.apps.walkthrough import Show
"""


def _inputs_code() -> str:
    """The opening step, written from :data:`SENTENCE` and :data:`EMBEDDINGS`."""
    rows, last = [], len(TOKENS) - 1
    for i, (token, row) in enumerate(zip(TOKENS, EMBEDDINGS)):
        values = ", ".join(f"{v:.2f}" for v in row)
        opening, closing = "[[" if i == 0 else " [", "]]" if i == last else "],"
        rows.append(f"    {opening}{values}{closing}  # {token:<8} x({i + 1})")
    return (f'SENTENCE = "{SENTENCE}"\n'
            "TOKENS = SENTENCE.split()\n"
            "inputs = torch.tensor(  # one 3-d embedding per token\n"
            + "\n".join(rows) + "\n"
            ")  # (T, d_in) = (6, 3)\n"
            'show.line(tr("walkthrough.sentence", sentence=SENTENCE))\n'
            'show.table("inputs", inputs, TOKENS)\n')


STEPS = (
    Step(_inputs_code(), None, "walkthrough.note.inputs"),
    Step('''\
query = inputs[1]  # "journey", the tutorial's x(2)
attn_scores_2 = inputs @ query  # (T,): each token's dot product with the query
show.vector(tr("walkthrough.attn_scores_2", token="journey"), attn_scores_2)
attn_weights_2_tmp = attn_scores_2 / attn_scores_2.sum()
show.vector(tr("walkthrough.attn_weights_2_tmp"), attn_weights_2_tmp)
attn_weights_2 = torch.softmax(attn_scores_2, dim=0)
show.vector(tr("walkthrough.attn_weights_2"), attn_weights_2, published="attn_weights_2")
show.number(tr("walkthrough.sum"), attn_weights_2.sum())
context_vec_2 = attn_weights_2 @ inputs  # (d_in,): the weighted sum of the inputs
show.vector("context_vec_2 = z(2)", context_vec_2, published="context_vec_2")
''', "walkthrough.section.3.3.1", "walkthrough.note.3.3.1"),
    Step('''\
attn_scores = inputs @ inputs.T  # (T, T)
show.table("attn_scores = inputs @ inputs.T", attn_scores, TOKENS, TOKENS)
attn_weights = torch.softmax(attn_scores, dim=-1)  # each row sums to 1
show.table("attn_weights = softmax(attn_scores, dim=-1)", attn_weights, TOKENS, TOKENS)
show.vector(tr("walkthrough.row_sums"), attn_weights.sum(dim=-1))
all_context_vecs = attn_weights @ inputs  # (T, d_in)
show.table("all_context_vecs = attn_weights @ inputs", all_context_vecs, TOKENS)
show.heatmap("attention_weights.png", attn_weights, TOKENS, TOKENS,
             "Self-attention weights (no trainable weights)")
''', "walkthrough.section.3.3.2", "walkthrough.note.3.3.2"),
    Step('''\
torch.manual_seed(123)
sa_v1 = tutorial.SelfAttentionV1(3, 2)  # the three torch.rand(3, 2) draws of the text
W_query, W_key, W_value = sa_v1.W_query.detach(), sa_v1.W_key.detach(), sa_v1.W_value.detach()
for name, weight in (("W_query", W_query), ("W_key", W_key), ("W_value", W_value)):
    show.rows(name, weight)
x_2 = inputs[1]  # the second token, "journey"
query_2 = x_2 @ W_query  # (d_out,)
keys = inputs @ W_key  # (T, d_out)
values = inputs @ W_value  # (T, d_out)
show.vector("query_2", query_2)
show.vector("key_2", keys[1])
show.vector("value_2", values[1])
show.number("attn_score_22 = query_2 . key_2", query_2 @ keys[1])
attn_scores_2 = query_2 @ keys.T  # (T,)
show.vector("attn_scores_2", attn_scores_2)
d_k = keys.shape[-1]
attn_weights_2 = torch.softmax(attn_scores_2 / d_k ** 0.5, dim=-1)
show.vector(tr("walkthrough.scaled", d_k=d_k), attn_weights_2)
context_vec_2 = attn_weights_2 @ values  # (d_out,)
show.vector("context_vec_2", context_vec_2)
''', "walkthrough.section.3.4.1", "walkthrough.note.3.4.1", (("seed", 123), ("d_out", 2))),
    Step('''\
v1_out = sa_v1(inputs)  # (T, d_out)
show.table("SelfAttentionV1(3, 2), seed 123", v1_out, TOKENS)
show.vector("sa_v1 row 0", v1_out[0], published="sa_v1 row 0")
torch.manual_seed(789)
sa_v2 = tutorial.SelfAttentionV2(3, 2)  # nn.Linear layers instead of raw Parameters
v2_out = sa_v2(inputs)  # (T, d_out)
show.table("SelfAttentionV2(3, 2), seed 789", v2_out, TOKENS)
show.vector("sa_v2 row 0", v2_out[0], published="sa_v2 row 0")
gap = (tutorial.v1_from_v2(sa_v2)(inputs) - v2_out).abs().max().item()
show.line(tr("walkthrough.v1_from_v2", gap=gap))
''', "walkthrough.section.3.4.2", "walkthrough.note.3.4.2"),
    Step('''\
queries, keys = sa_v2.W_query(inputs).detach(), sa_v2.W_key(inputs).detach()  # (T, d_out)
attn_scores = queries @ keys.T  # (T, T)
d_k = keys.shape[-1]
attn_weights = torch.softmax(attn_scores / d_k ** 0.5, dim=-1)
show.table("attn_weights", attn_weights, TOKENS, TOKENS)
context_length = attn_scores.shape[0]
mask_simple = torch.tril(torch.ones(context_length, context_length))  # 1 = may attend
show.table(tr("walkthrough.mask_simple"), mask_simple, TOKENS, TOKENS)
# Method 1: zero the weights above the diagonal after softmax, then renormalise each row.
masked_simple = attn_weights * mask_simple
row_sums = masked_simple.sum(dim=-1, keepdim=True)
masked_simple_norm = masked_simple / row_sums
show.table(tr("walkthrough.method1"), masked_simple_norm, TOKENS, TOKENS)
# Method 2: -inf above the diagonal before softmax (e^-inf = 0): one pass, no renormalising.
mask = torch.triu(torch.ones(context_length, context_length), diagonal=1)  # 1 = blocked
masked = attn_scores.masked_fill(mask.bool(), -torch.inf)
show.table(tr("walkthrough.masked"), masked, TOKENS, TOKENS)
attn_weights = torch.softmax(masked / d_k ** 0.5, dim=-1)
show.table(tr("walkthrough.method2"), attn_weights, TOKENS, TOKENS)
same = torch.allclose(attn_weights, masked_simple_norm)
gap = (attn_weights - masked_simple_norm).abs().max().item()
show.line(tr("walkthrough.agree", ok=same, gap=gap))
show.heatmap("causal_weights.png", attn_weights, TOKENS, TOKENS, "Causal attention weights")
''', "walkthrough.section.3.5.1", "walkthrough.note.3.5.1"),
    Step('''\
dropout = nn.Dropout(0.5)  # a fresh module is in training mode, so it drops
torch.manual_seed(123)
show.table(tr("walkthrough.dropout_ones"), dropout(torch.ones(6, 6)), TOKENS, TOKENS)
torch.manual_seed(123)
dropped = dropout(attn_weights)
show.table("dropout(attn_weights)", dropped, TOKENS, TOKENS)
show.heatmap("causal_weights_dropout.png", dropped, TOKENS, TOKENS,
             "Causal weights after dropout (p = 0.5)",
             colorbar_label="attention weight after dropout (survivors x 2)")
''', "walkthrough.section.3.5.2", "walkthrough.note.3.5.2", (("p", 0.5), ("seed", 123))),
    Step('''\
batch = torch.stack((inputs, inputs))  # (B, T, d_in) = (2, 6, 3)
show.line(tr("walkthrough.batch", shape=tuple(batch.shape)))
torch.manual_seed(123)
ca = tutorial.CausalAttention(3, 2, 6, 0.0)  # d_in, d_out, context_length, dropout
context_vecs = ca(batch)  # (B, T, d_out)
show.table("CausalAttention(3, 2, 6, 0.0), seed 123", context_vecs[0], TOKENS)
show.vector("ca row 0", context_vecs[0, 0], published="ca row 0")
''', "walkthrough.section.3.5.3", "walkthrough.note.3.5.3"),
    Step('''\
torch.manual_seed(123)
mha = tutorial.MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)
context_vecs = mha(batch)  # (B, T, num_heads * d_out)
show.line(tr("walkthrough.wrapper_shape", shape=tuple(context_vecs.shape)))
show.table("MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2), seed 123", context_vecs[0],
           TOKENS)
show.vector("mha wrapper row 0", context_vecs[0, 0], published="mha wrapper row 0")
''', "walkthrough.section.3.6.1", "walkthrough.note.3.6.1"),
    Step('''\
head_weights, titles = [], []
for d_out in (2, 4):
    torch.manual_seed(123)
    mha = tutorial.MultiHeadAttention(3, d_out, 6, 0.0, num_heads=2)
    context_vecs, weights = mha(batch, return_weights=True)  # (B, T, d_out), (B, H, T, T)
    show.table(f"MultiHeadAttention(3, {d_out}, 6, 0.0, num_heads=2), seed 123, "
               f"head_dim {mha.head_dim}", context_vecs[0], TOKENS)
    if d_out == 2:
        show.vector("mha row 0", context_vecs[0, 0], published="mha row 0")
    head_weights.append(weights[0].detach())  # (H, T, T)
    titles.append(f"d_out={d_out}")
show.head_grid("multihead_weights.png", torch.stack(head_weights), TOKENS, TOKENS,
               title="MultiHeadAttention weights, seed 123", row_titles=titles)
''', "walkthrough.section.3.6.2", "walkthrough.note.3.6.2"),
)

EXERCISES = (
    Exercise("walkthrough.exercise.1.title", "walkthrough.exercise.1.task", '''\
sa_v1 = tutorial.SelfAttentionV1(3, 2)
with torch.no_grad():  # nn.Linear keeps its weight as (d_out, d_in): transpose it
    sa_v1.W_query.copy_(sa_v2.W_query.weight.T)
    sa_v1.W_key.copy_(sa_v2.W_key.weight.T)
    sa_v1.W_value.copy_(sa_v2.W_value.weight.T)
show.vector(tr("walkthrough.exercise.1.row"), sa_v1(inputs)[0], published="sa_v2 row 0")
torch.testing.assert_close(sa_v1(inputs), sa_v2(inputs))
torch.testing.assert_close(tutorial.v1_from_v2(sa_v2)(inputs), sa_v2(inputs))  # the same
'''),
    Exercise("walkthrough.exercise.2.title", "walkthrough.exercise.2.task", '''\
torch.manual_seed(123)
mha = tutorial.MultiHeadAttentionWrapper(3, 1, 6, 0.0, num_heads=2)  # d_out = 1 per head
context_vecs = mha(batch)  # (B, T, num_heads * d_out) = (2, 6, 2)
show.line(tr("walkthrough.exercise.2.shape", shape=tuple(context_vecs.shape)))
show.table("MultiHeadAttentionWrapper(3, 1, 6, 0.0, num_heads=2), seed 123", context_vecs[0],
           TOKENS)
'''),
    Exercise("walkthrough.exercise.3.title", "walkthrough.exercise.3.task", '''\
gpt2_mha = tutorial.MultiHeadAttention(768, 768, 1024, 0.0, num_heads=12)
num_params = sum(p.numel() for p in gpt2_mha.parameters())
# W_query, W_key, W_value: 3 x 768 x 768 (no bias); out_proj: 768 x 768 + 768 (bias).
show.line(tr("walkthrough.exercise.3.params", params=num_params, head_dim=gpt2_mha.head_dim))
'''),
)
