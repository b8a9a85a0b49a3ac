"""torch.compile(attnkit.flex_attention): one graph, no break, no warning, with fullgraph=True,
and the outputs and gradients of the eager call (float64).

Dynamo's ``explain`` captures the graphs without compiling them, and the ``aot_eager``
compiler traces the forward and backward graphs inductor would get without generating code,
so these tests take seconds."""

import logging
import warnings

import pytest
import torch

import attnkit
from attnkit import flex_api as F
from attnkit import masks as M

TF = pytest.importorskip("torch.nn.attention.flex_attention",
                         reason="this torch has no FlexAttention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def qkv(B=2, H=2, T=40, D=8, Hkv=None, Bkv=None, grad=False):
    g = torch.Generator().manual_seed(0)
    Hkv, Bkv = Hkv or H, Bkv or B
    shapes = ((B, H, T, D), (Bkv, Hkv, T, D), (Bkv, Hkv, T, D))
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)
            for s in shapes]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def rel(score, b, h, q_idx, kv_idx):
    return score - 0.05 * (q_idx - kv_idx).abs()


DOC = torch.arange(40) // 13


def calls():
    """(name, kwargs of flex_attention) for the spellings a user compiles."""
    return {
        "torch_block_mask": dict(block_mask=TF.create_block_mask(causal, None, None, 40, 40,
                                                                 device="cpu", BLOCK_SIZE=16),
                                 score_mod=rel),
        "attnkit_description": dict(block_mask=attnkit.create_block_mask(
            M.documents(DOC[None]) & M.causal(), None, None, 40, 40, BLOCK_SIZE=16),
            return_aux=F.AuxRequest(lse=True)),
        "attnkit_lambda_gqa": dict(block_mask=attnkit.create_block_mask(
            lambda b, h, q, kv: (DOC[q] == DOC[kv]) | (kv == 0), None, None, 40, 40,
            BLOCK_SIZE=16), enable_gqa=True),
        "no_mask": dict(score_mod=rel, scale=0.3),
    }


class _Records(logging.Handler):
    """Collects the log records of warning level and above."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.mark.parametrize("name", list(calls()))
def test_one_graph_no_break_no_warning(name):
    """Before, dynamo broke the graph on explain() and a description string and logged 28
    lines of warnings on every call."""
    kwargs = calls()[name]
    q, k, v = qkv(Hkv=1 if kwargs.get("enable_gqa") else None)
    # dynamo logs its graph-break warnings on torch._dynamo, which does not propagate
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("torch", "torch._dynamo", "torch._inductor")]
    for lg in loggers:
        lg.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning fails the test
            ex = torch._dynamo.explain(attnkit.flex_attention)(q, k, v, **kwargs)
    finally:
        for lg in loggers:
            lg.removeHandler(records)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    assert records.messages == []


def test_fullgraph_outputs_and_gradients_equal_eager():
    """With a K/V batch of 1 and a block mask of the query batch, lse asked for: forward,
    lse and every gradient through the compiled graph equal the eager call's."""
    q, k, v = qkv(B=3, Bkv=1, grad=True)
    bm = attnkit.create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < 20), 3, None,
                                   40, 40, BLOCK_SIZE=16)
    aux = F.AuxRequest(lse=True)
    compiled = torch.compile(attnkit.flex_attention, fullgraph=True, backend="aot_eager")
    out, got = compiled(q, k, v, score_mod=rel, block_mask=bm, return_aux=aux)
    ref, want = attnkit.flex_attention(q, k, v, score_mod=rel, block_mask=bm, return_aux=aux)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got.lse, want.lse)
    g = torch.randn_like(out)
    loss, loss_ref = (out * g).sum() + got.lse.sum(), (ref * g).sum() + want.lse.sum()
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(loss_ref, (q, k, v))):
        torch.testing.assert_close(a, b)
