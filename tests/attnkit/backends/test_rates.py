"""This machine's measured rates for the cost rules (backends/_rates.py): measured once, cached
as JSON keyed by the CPU, used by decode's (and sdpa's) cost rule, never measured inside
torch.compile or with ATTNKIT_RATES=default."""

import json

import pytest
import torch

from attnkit.backends import _rates
from attnkit.backends import decode as dec
from attnkit.masks import MaskSpec
from attnkit.spec import Call

NAMES = {"read", "mm_fp32", "mm_bf16", "decode_torch_read_fp32", "decode_torch_read_half",
         "decode_torch_flops", "sdpa_read_fp32", "sdpa_read_half"}


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No rates loaded yet, the cache file in a temporary build directory."""
    monkeypatch.setenv("ATTNKIT_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(_rates, "_state", {})
    monkeypatch.delenv("ATTNKIT_RATES", raising=False)
    return tmp_path


def test_measured_once_then_read_from_the_cache(fresh, capsys, monkeypatch):
    measured = _rates.rate("read", 1.0)
    assert measured > 1e8 and measured != 1.0  # bytes/s: any machine reads 100 MB/s
    assert "measuring this machine's rates" in capsys.readouterr().err
    record = json.loads(_rates.path().read_text())
    assert _rates.path().parent == fresh and record["rates"]["read"] == measured
    assert NAMES <= set(record["rates"])
    if dec.kernel_built():
        assert {"decode_cpp_read_fp32", "decode_cpp_read_half",
                "decode_cpp_flops"} <= set(record["rates"])
    assert all(v > 0 for v in record["rates"].values())
    assert _rates.rate("unmeasured", 7.0) == 7.0

    def refuse(**kwargs):
        raise AssertionError("measured twice")

    monkeypatch.setattr(_rates, "calibrate", refuse)
    monkeypatch.setattr(_rates, "_state", {})  # a new process: the file is read
    assert _rates.rate("read", 1.0) == measured
    assert _rates.rates() == record["rates"]


def test_a_damaged_cache_is_measured_again(fresh, capsys):
    _rates.path().write_text("{not json")
    assert _rates.rate("mm_fp32", 1.0) > 1e6
    assert "measuring" in capsys.readouterr().err
    assert json.loads(_rates.path().read_text())["rates"]["mm_fp32"] > 1e6


def test_defaults_when_asked_and_under_compile(fresh):
    import os

    os.environ["ATTNKIT_RATES"] = "default"
    try:
        assert _rates.rate("read", 3.0) == 3.0 and _rates.rates() == {}
    finally:
        del os.environ["ATTNKIT_RATES"]

    def scaled(x):
        return x * _rates.rate("read", 2.0)

    out = torch.compile(scaled, backend="eager", fullgraph=True)(torch.ones(2))
    torch.testing.assert_close(out, torch.full((2,), 2.0))  # the default: nothing measured
    assert not list(fresh.iterdir())


def test_decode_cost_follows_the_measured_read_rate(monkeypatch):
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 32768, 128, dtype=torch.bfloat16)
    call = Call.of(q, k, MaskSpec.from_args(causal=True, causal_align="bottom_right"), False)
    impl = dec.implementation(call.device, call.dtype)
    name = f"decode_{impl}_read_half"
    costs = []
    for bytes_per_s in (1e9, 2e9):
        monkeypatch.setattr(_rates, "_state", {"rates": {name: bytes_per_s}})
        costs.append(dec.decode_cost(call))
    kv = 2 * 8 * 32768 * 128 * 2
    rows = 0.0 if impl == "cpp" else 32 * 32768 * dec.ROW_ELEMENT_S  # the two-pass path's
    assert costs[0] == pytest.approx(kv / 1e9 + rows + dec.CALL_S, rel=1e-2)
    assert costs[1] == pytest.approx(kv / 2e9 + rows + dec.CALL_S, rel=1e-2)
