"""attnkit's fused C++ attention kernel (backends/_attn_kernel*.cpp), as chunked runs it:
every size edge, mask form (intervals, bits on partial tiles, both), score function, dtype
and thread count against the float64 math spec, forward and gradients; the builder
(backends/_ext.py): targets, names, the first-use build a pip user gets, and the kernel
built for other CPUs (AVX2, SSE2; AVX-512 compiled) run on this one.

The shared chunked tests (test_engine, test_scores, masks/test_mask_kinds, test_edges) run
on both implementations through the ``chunked_impl`` fixture; this file is the kernel's own.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit import scores as Sc
from attnkit.backends import _ext, _kernel, chunked
from attnkit.masks import MaskSpec
from tolerance import assert_within_2x

pytestmark = pytest.mark.skipif(_kernel.module() is None,
                                reason=f"kernel not available: {_kernel.status().describe()}")


def make(B=2, H=4, Hkv=2, T=9, S=13, D=6, Dv=None, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, Dv or D, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def run(q, k, v, spec, **kw):
    assert chunked.implementation(q, k, v, spec)[0] == "kernel"
    return attnkit.attention(q, k, v, spec=spec, backend="chunked", return_lse=True, **kw)


def check(q, k, v, spec, extra=(), **tol):
    """Kernel == math: output, lse and the gradients of both (float64 unless ``tol``)."""
    out, lse = run(q, k, v, spec)
    ref, ref_lse = attnkit.attention(q, k, v, spec=spec, backend="math", return_lse=True)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **tol)
    g = torch.randn_like(ref)
    gl = torch.randn_like(ref_lse)
    empty = torch.isinf(ref_lse)  # no gradient through an lse of -inf

    def loss(o, l):
        return (o * g).sum() + torch.where(empty, 0.0, l * gl.to(l.dtype)).sum()

    inputs = (q, k, v, *extra)
    ours = torch.autograd.grad(loss(out, lse), inputs)
    theirs = torch.autograd.grad(loss(ref, ref_lse), inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)


SHAPES = {  # B, H, Hkv, T, S, D, Dv
    "one": (1, 1, 1, 1, 1, 1, 1),
    "t97_odd_d": (2, 4, 2, 97, 97, 5, 5),
    "decode_like": (1, 3, 1, 1, 200, 16, 8),
    "ragged_dv": (2, 2, 2, 130, 70, 33, 40),
    "gqa4": (1, 8, 2, 64, 64, 64, 64),
}


def _masks(B, T, S):
    g = torch.Generator().manual_seed(T + S)
    left = torch.ones(B, S, dtype=torch.bool)
    left[-1, : S // 3] = False  # the last sample is left-padded
    cut = [0, T // 3, T // 3, T] if T == S else None
    return {
        "none": {},
        "causal": {"causal": True},
        "bottom_right": {"causal": True, "causal_align": "bottom_right"},
        "window": {"window": (5, 2)},
        "documents": {"mask_mod": M.documents(cu_seqlens=cut)} if cut else {"causal": True},
        "left_padding": {"key_padding_mask": left, "causal": True,
                         "causal_align": "bottom_right"},
        "prefix": {"mask_mod": M.prefix_lm(torch.tensor([2, 7][:B]))},
        "callable": {"mask_mod": lambda b, h, q, k: (q * 3 + k + h) % 4 != 0},
        "causal_and_callable": {"causal": True, "mask_mod": lambda b, h, q, k: k % 5 != 1},
        "dense": {"mask": torch.rand(B, 1, T, S, generator=g) > 0.3},
    }


@pytest.mark.parametrize("mask", list(_masks(1, 4, 4)))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_math_in_float64(shape, mask):
    B, H, Hkv, T, S, D, Dv = SHAPES[shape]
    q, k, v = make(B, H, Hkv, T, S, D, Dv)
    check(q, k, v, MaskSpec.from_args(**_masks(B, T, S)[mask]))


@pytest.mark.parametrize("shape", ["t97_odd_d", "ragged_dv", "gqa4"])
def test_float32_is_float32_exact(shape):
    B, H, Hkv, T, S, D, Dv = SHAPES[shape]
    q, k, v = make(B, H, Hkv, T, S, D, Dv, dtype=torch.float32)
    check(q, k, v, MaskSpec.from_args(causal=True), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [{"causal": True}, {"window": 40, "softcap": 5.0},
                                {"mask_mod": M.documents(cu_seqlens=[0, 30, 150])}],
                         ids=["causal", "window_softcap", "documents"])
def test_half_precision_within_twice_the_math_error(dtype, kw):
    exact = make(1, 4, 2, 150, 150, 32, grad=True, seed=5)
    low = [t.detach().to(dtype).requires_grad_() for t in exact]
    spec = MaskSpec.from_args(**kw)
    ref = attnkit.attention(*exact, spec=spec, backend="math")
    plain = attnkit.attention(*low, spec=spec, backend="math")
    fast, _ = run(*low, spec)
    assert fast.dtype == dtype
    assert_within_2x(fast, plain, ref, name="output")
    g = torch.randn_like(ref)
    for name, a, b, c in zip("qkv", torch.autograd.grad((fast * g.to(dtype)).sum(), low),
                             torch.autograd.grad((plain * g.to(dtype)).sum(), low),
                             torch.autograd.grad((ref * g).sum(), exact)):
        assert a.dtype == dtype
        assert_within_2x(a, b, c, name=f"d{name}")


def test_gradcheck_every_score_function_at_once():
    q, k, v = make(1, 2, 1, 5, 7, 3)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)

    def fn(q, k, v, bias, sinks):
        spec = MaskSpec.from_args(causal=True, causal_align="bottom_right", softcap=2.0,
                                  alibi_slopes=slopes, bias=bias, sinks=sinks)
        return run(q, k, v, spec, scale=0.8)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias, sinks))


@pytest.mark.parametrize("bias_shape", [(13, 13), (2, 1, 1, 13), (1, 4, 13, 1), (2, 4, 13, 13)])
@pytest.mark.parametrize("order", ["softcap_first", "bias_first"])
def test_score_functions_and_the_bias_gradient(bias_shape, order):
    """Bias broadcast over any dims gets dS summed over them; a softcap after the bias
    chains its derivative into the bias's gradient."""
    q, k, v = make(2, 4, 2, 13, 13, 6)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(bias_shape, generator=g, dtype=torch.float64, requires_grad=True)
    cap, alibi = Sc.Softcap(1.5), Sc.Alibi(Sc.alibi_slopes(4).double(), align="bottom_right")
    parts = (cap, alibi, Sc.Bias(bias)) if order == "softcap_first" else (Sc.Bias(bias), cap)
    spec = MaskSpec.from_args(window=(6, 1), score_mod=Sc.chain(*parts),
                              sinks=torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64))
    check(q, k, v, spec, extra=(bias,))


def test_rows_that_see_nothing_are_zeros_with_finite_gradients():
    q, k, v = make(2, 2, 1, 70, 70, 8)
    keep = torch.ones(2, 70, dtype=torch.bool)
    keep[1] = False  # sample 1 sees no key at all
    with torch.no_grad():
        k[1, 0, :5] = float("nan")  # hidden NaN keys must not reach the empty rows
    out, lse = run(q, k, v, MaskSpec.from_args(key_padding_mask=keep))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    for grad in (dq, dk[0], dv):
        assert torch.isfinite(grad).all()
    assert torch.equal(dq[1], torch.zeros_like(dq[1]))


def test_nan_reaches_exactly_the_rows_that_see_it():
    q, k, v = make(1, 2, 2, 130, 130, 8, grad=False)
    q[0, 0, 5, 1] = float("nan")  # one query row
    k[0, 1, 100, 0] = float("nan")  # one key, visible causally from row 100 on
    out, lse = run(q, k, v, MaskSpec.from_args(causal=True))
    nan = torch.isnan(out).any(-1)
    expect = torch.zeros_like(nan)
    expect[0, 0, 5] = True
    expect[0, 1, 100:] = True
    assert torch.equal(nan, expect) and torch.equal(torch.isnan(lse), expect)


def test_threads_do_not_change_a_bit():
    """Work items are independent (no atomics, no shared accumulators): 1 and 2 threads and
    repeated runs give identical bits."""
    q, k, v = make(2, 4, 2, 200, 200, 16, dtype=torch.float32)
    spec = MaskSpec.from_args(causal=True, softcap=3.0)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            out, lse = run(q, k, v, spec)
            results.append((out, lse, *torch.autograd.grad(out.sum(), (q, k, v))))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_strided_views_need_no_copy_and_match():
    x = torch.randn(2, 50, 4, 3, 8, dtype=torch.float64)  # (B, T, H, q/k/v, D)
    q, k, v = (x[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views
    out, lse = run(q, k, v, MaskSpec.from_args(causal=True))
    ref, ref_lse = run(*(t.contiguous() for t in (q, k, v)), MaskSpec.from_args(causal=True))
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_block_backward_adds_up_to_the_whole_gradient():
    """Ring attention's step: gradients of two key blocks from the global lse and delta add
    up to the gradient over all keys."""
    q, k, v = make(1, 4, 2, 70, 90, 8)
    spec = MaskSpec.from_args(causal=True, causal_align="bottom_right")
    out, lse = run(q, k, v, spec)
    g = torch.randn_like(out)
    want = torch.autograd.grad((out * g).sum(), (q, k, v))
    delta = (g * out).sum(-1).detach()
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v))
    for k0, k1 in ((0, 40), (40, 90)):
        block = M.MaskSpec(mask_mod=M.at_positions(M.causal(offset=20), 0, k0))
        chunked.chunked_block_backward(g, q.detach(), k[:, :, k0:k1].detach(),
                                       v[:, :, k0:k1].detach(), lse.detach(), delta, block,
                                       scale=1 / math.sqrt(8),
                                       grads=(dq, dk[:, :, k0:k1], dv[:, :, k0:k1]))
    for a, b in zip((dq, dk, dv), want):
        torch.testing.assert_close(a, b)


def test_what_the_kernel_cannot_apply_runs_in_the_block_loop():
    q, k, v = make(1, 2, 2, 9, 9, 4)
    spec = MaskSpec.from_args(score_mod=lambda s, b, h, qi, ki: s * 2)
    impl, why = chunked.implementation(q, k, v, spec)
    assert impl == "torch" and "block loop" in why
    slopes = torch.rand(2, dtype=torch.float64, requires_grad=True)
    impl, why = chunked.implementation(q, k, v, MaskSpec.from_args(alibi_slopes=slopes))
    assert impl == "torch" and "ALiBi slopes that need a gradient" in why
    with chunked.use_implementation("torch"):
        assert chunked.implementation(q, k, v, MaskSpec())[0] == "torch"
    with pytest.raises(ValueError, match="implementation must be 'kernel' or 'torch'"):
        chunked.use_implementation("cuda").__enter__()


def test_explain_says_which_implementation_runs():
    q, k, v = make(1, 4, 4, 4096, 4096, 16, grad=False)
    text = str(attnkit.explain(q, k, v, window=256))
    assert "auto -> chunked" in text and "C++ kernel" in text


def test_the_kernel_checks_what_it_is_given():
    ext = _kernel.module()
    q = torch.randn(1, 1, 4, 4)
    none3 = [None] * 3
    with pytest.raises(RuntimeError, match="attnkit kernel: intervals must be int32"):
        ext.forward(q, q, q, 1.0, [torch.zeros(1, 1, 4, 3, dtype=torch.int32), None, None,
                                   None], none3, [], 0.0, False, None, True)
    with pytest.raises(RuntimeError, match="attnkit kernel: q, k, v shapes do not fit"):
        ext.forward(q, q[:, :, :, :2], q, 1.0, [None] * 4, none3, [], 0.0, False, None, True)
    with pytest.raises(RuntimeError, match="attnkit kernel: a score op without its tensor"):
        ext.forward(q, q, q, 1.0, [None] * 4, none3, [3], 0.0, False, None, True)


# --- the builder -----------------------------------------------------------------------------

def test_targets_follow_the_cpu_and_the_environment(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert _ext.choose_target()[0].name == "default"
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    best = _ext.choose_target()[0]
    assert best.name == _kernel.module().isa()
    monkeypatch.setenv("ATTNKIT_KERNEL_TARGET", "sse9")
    target, why = _ext.choose_target()
    assert target is None and "ATTNKIT_KERNEL_TARGET='sse9' is not a target" in why
    names = {_ext.library_name(_ext.ATTN, t) for t in _ext.TARGETS.values()}
    assert len(names) == len(_ext.TARGETS)  # one library per target, never -march=native
    assert all("-march" not in " ".join(t.flags) for t in _ext.TARGETS.values())


def test_disabled_kernel_falls_back_and_says_so():
    code = ("import torch, attnkit; from attnkit.backends import chunked; "
            "q = torch.randn(1, 1, 8, 4); "
            "print(chunked.implementation(q, q, q, attnkit.MaskSpec())); "
            "print(attnkit.attention(q, q, q, causal=True, backend='chunked').shape)")
    env = {**os.environ, "ATTNKIT_KERNEL_IMPL": "torch"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "('torch', 'pure-PyTorch implementation (ATTNKIT_KERNEL_IMPL=torch)')" in proc.stdout


@pytest.mark.slow
def test_first_use_builds_once_into_the_user_cache(target_builds):
    """What ``pip install attnkit`` users get: no development build, an empty cache; the
    first call compiles (one line on stderr), later processes load it silently."""
    env, first = target_builds("default")
    assert first.returncode == 0, first.stderr[-2000:]
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "attnkit: compiling the attn kernel for this CPU (default)"), first.stderr
    state, target, path = first.stdout.split("STATUS ")[1].split()
    assert (state, target) == ("built", "default")
    assert Path(path).is_file() and Path(path).is_relative_to(env["ATTNKIT_CACHE_DIR"])
    again = subprocess.run([sys.executable, "-c", "from attnkit.backends import _kernel; "
                            "_kernel.module(); print(_kernel.status().state)"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.stdout.strip() == "loaded" and again.stderr == ""


FAST = "matches_math or float32 or half or gradcheck or score or nothing or nan or block"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["avx2", "default"])
def test_the_kernel_built_for_other_cpus_is_right_too(target, target_builds):
    """The kernel as an AVX2-only or an SSE2-only (x86-64 baseline) CPU builds it, run on
    this one (ATEN_CPU_CAPABILITY=default for SSE2), on this file's correctness tests."""
    if target == _kernel.module().isa():
        pytest.skip(f"{target} is this CPU's own build: the main run tests it")
    if _ext.TARGETS[target].needs - _ext._cpu_flags():
        pytest.skip(f"this CPU cannot run the {target} build")
    env, first = target_builds(target)
    assert first.returncode == 0, first.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", FAST, "-x"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1]


@pytest.mark.slow
def test_avx512_builds_compile(tmp_path):
    """AVX-512 and avx512_bf16 builds cannot run on every CPU; they must compile on all
    (the attention kernel for both, the decode kernel for AVX-512 with torch's defines)."""
    procs = []
    for kernel, name in ((_ext.DECODE, "avx512"), (_ext.ATTN, "avx512"),
                         (_ext.ATTN, "avx512bf16")):
        work = tmp_path / f"{kernel.name}-{name}"
        work.mkdir()
        compiles, _ = _ext._compile_commands(kernel, _ext.TARGETS[name], "check", work)
        if kernel is _ext.ATTN:
            compiles = compiles[1:]  # the kernel sources (the first is the bindings)
        assert ("-DCPU_CAPABILITY=AVX512" in compiles[0]) == kernel.vec
        # -O0: the target's intrinsics and always_inline code are still compiled and checked
        # for these flags, in half the time (nothing here runs)
        procs += [(f"{kernel.name} {name}", subprocess.Popen(
            [("-O0" if c == "-O3" else c) for c in cmd], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)) for cmd in compiles]
    for what, proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{what}: {out[-2000:]}"


@pytest.mark.slow
def test_the_wheel_ships_the_kernel_sources(tmp_path):
    """pip users build the kernel from the sources inside the package (package data)."""
    import shutil
    import zipfile

    root = Path(__file__).resolve().parents[3]
    proj = tmp_path / "proj"
    shutil.copytree(root / "src", proj / "src",
                    ignore=shutil.ignore_patterns("_build", "__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, proj / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "--no-index", "-q", "-w",
                           str(tmp_path / "dist"), str(proj)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("attnkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for kernel in _ext.KERNELS:
        for f in kernel.sources + kernel.headers:
            assert f"attnkit/backends/{f}" in names, f
