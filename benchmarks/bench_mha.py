"""Causal self-attention modules side by side: attnkit against PyTorch-native peers.

Every implementation maps ``(B, T, E) -> (B, T, E)`` with causal attention and no dropout:

* ``attnkit``               - ``attnkit.MultiHeadAttention(E, H, causal=True)``
* ``attnkit GQA``           - the same with ``num_kv_heads = H / 3`` (4 at H = 12); shown for
                              reference, not counted as a peer (it is a smaller model)
* ``nn.MultiheadAttention`` - ``batch_first=True``, ``need_weights=False``, a causal mask plus
                              the ``is_causal`` hint (torch's fastest documented use)
* ``SDPA module``           - a bare fused-qkv ``Linear`` + ``F.scaled_dot_product_attention
                              (is_causal=True)`` + output ``Linear``: the floor
* ``tutorial MHA`` / ``tutorial wrapper`` - :mod:`attnkit.tutorial`'s explicit
                              ``MultiHeadAttention`` and ``MultiHeadAttentionWrapper``

Modes: ``forward`` (training mode, autograd recording), ``fwd+bwd`` (forward, backward of a
fixed output gradient, grads reset each call) and ``inference`` (``eval()`` +
``torch.inference_mode``). GFLOP/s counts the useful work of every implementation alike:
projections ``8·B·T·E²`` plus attention ``4·B·T²·E`` halved for causal; backward counts
twice the forward.

Usage::

    python benchmarks/bench_mha.py                 # E=768, H=12, B=8, T=1024 and 256
    python benchmarks/bench_mha.py --quick         # seconds-long smoke test
    python benchmarks/bench_mha.py --dtypes float32 --seq-lens 256 --reps 5 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from attnkit.multihead import MultiHeadAttention  # noqa: E402

try:
    from attnkit import tutorial
except ImportError:  # the tutorial rungs are optional peers
    tutorial = None

MODES = ("forward", "fwd+bwd", "inference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SDPAModule(nn.Module):
    """The floor: one fused q/k/v projection, PyTorch's fused attention, one output projection."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.out = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(self, x):
        B, T, E = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, E // self.num_heads)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.out(out.transpose(1, 2).reshape(B, T, E))  # (B, T, E)


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention`` called the fastest documented way for causal self-attention."""

    def __init__(self, embed_dim: int, num_heads: int, max_len: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(embed_dim, num_heads, bias=False, batch_first=True)
        # torch's bool masks mark BLOCKED positions (the opposite of attnkit's polarity).
        blocked = torch.ones(max_len, max_len, dtype=torch.bool).triu(1)
        self.register_buffer("blocked", blocked, persistent=False)

    def forward(self, x):
        T = x.shape[1]
        out, _ = self.mha(x, x, x, attn_mask=self.blocked[:T, :T], is_causal=True,
                          need_weights=False)
        return out


def build(impl: str, E: int, H: int, T: int) -> nn.Module:
    if impl == "attnkit":
        return MultiHeadAttention(E, H, causal=True)
    if impl == "attnkit GQA":
        return MultiHeadAttention(E, H, num_kv_heads=H // 3, causal=True)
    if impl == "nn.MultiheadAttention":
        return TorchMHA(E, H, T)
    if impl == "SDPA module":
        return SDPAModule(E, H)
    if impl == "tutorial MHA":
        return tutorial.MultiHeadAttention(E, E, T, 0.0, H)
    if impl == "tutorial wrapper":  # H heads of width E / H, concatenated back to E
        return tutorial.MultiHeadAttentionWrapper(E, E // H, T, 0.0, H)
    raise ValueError(f"unknown implementation {impl!r}")


def flops(B: int, T: int, E: int, mode: str, kv_fraction: float = 1.0) -> float:
    """Useful FLOPs: q/out projections 4BTE², k/v 4BTE²·kv_fraction, causal attention 2BT²E."""
    forward = 4 * B * T * E * E + 4 * B * T * E * E * kv_fraction + 2 * B * T * T * E
    return 3 * forward if mode == "fwd+bwd" else forward


def make_step(impl, mode, B, T, E, H, dtype):
    """A ``setup`` for :class:`_common.Case`: builds the module and inputs lazily."""

    def setup():
        torch.manual_seed(0)
        module = build(impl, E, H, T).to(dtype)
        x = torch.randn(B, T, E, dtype=dtype)
        if mode == "inference":
            module.eval()

            def step():
                with torch.inference_mode():
                    return module(x)
        elif mode == "forward":
            step = lambda: module(x)  # noqa: E731
        else:
            x.requires_grad_(True)
            grad = torch.randn(B, T, E, dtype=dtype)

            def step():
                module.zero_grad(set_to_none=True)
                x.grad = None
                module(x).backward(grad)
        return step

    return setup


def cases(args) -> list[_common.Case]:
    B, E, H = (1, 48, 6) if args.quick else (8, 768, 12)
    seq_lens = args.seq_lens or ([32] if args.quick else [1024, 256])
    impls = ["attnkit", "attnkit GQA", "nn.MultiheadAttention", "SDPA module"]
    if tutorial is not None:
        impls += ["tutorial MHA", "tutorial wrapper"]
    impls = [i for i in impls if not args.impls or i in args.impls]
    out = []
    for dtype_name in args.dtypes:
        for T in seq_lens:
            for mode in args.modes:
                group = f"{dtype_name} T={T} {mode}"
                for impl in impls:
                    kv_fraction = 1 / 3 if impl == "attnkit GQA" else 1.0
                    out.append(_common.Case(
                        group, impl, make_step(impl, mode, B, T, E, H, DTYPES[dtype_name]),
                        flops=flops(B, T, E, mode, kv_fraction),
                        info={"dtype": dtype_name, "B": B, "T": T, "E": E, "H": H, "mode": mode},
                        peer=impl != "attnkit GQA"))
    return out


COLUMNS = [("dtype", "dtype", ""), ("T", "T", ""), ("mode", "mode", ""), ("impl", "impl", ""),
           ("median ms", "median_ms", ".1f"), ("x fastest", "ratio", ".2f"),
           ("min ms", "min_ms", ".1f"), ("x (min)", "ratio_min", ".2f"),
           ("x (paired)", "ratio_paired", ".2f"),
           ("GFLOP/s", "gflops", ".1f"), ("peak MiB", "peak_mib", ".0f")]


def summary(rows: list[dict]) -> list[str]:
    """The issue's targets, read off the rows (median and minimum times)."""
    lines = []
    by = {(r["group"], r["impl"]): r for r in rows}
    for group in dict.fromkeys(r["group"] for r in rows):
        ours = by.get((group, "attnkit"))
        if not ours:
            continue
        kinds = (("median", "ratio"), ("min", "ratio_min"), ("paired", "ratio_paired"))
        line = f"{group}: attnkit / fastest peer = " + ", ".join(
            f"{ours[key]:.2f} {kind} ({'within' if ours[key] <= 1.05 else 'NOT within'} 5%)"
            for kind, key in kinds)
        for other, label in (("tutorial MHA", "tutorial MHA / attnkit"),
                             ("attnkit GQA", "GQA / MHA")):
            if (group, other) in by:
                row = by[(group, other)]
                line += (f"; {label} = {row['median_ms'] / ours['median_ms']:.2f} (median), "
                         f"{row['min_ms'] / ours['min_ms']:.2f} (min)")
        lines.append(line)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--seq-lens", nargs="+", type=int, help="default 1024 256 (quick: 64)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--impls", nargs="+", help="subset of implementation names")
    args = parser.parse_args(argv)
    rows = _common.run_cases(cases(args), args, warmup=1, reps=1 if args.quick else 5)
    if rows is None:  # the peak-memory worker already printed its results
        return
    env = _common.environment()
    print(_common.header_text(env))
    print(_common.format_table(rows, COLUMNS))
    print("\n".join(summary(rows)))
    if args.json:
        _common.write_json(args.json, env, vars(args), rows)


if __name__ == "__main__":
    main()
