"""``attnkit why-attention``: matched models, the reversal task, and a reduced run."""

import json

import pytest
import torch

from attnkit import cli
from attnkit.apps.translate.model import count_parameters
from attnkit.apps.why_attention.app import WhyConfig, make_batch, matched_models, run


def test_models_have_equal_parameters_within_ten_percent():
    without, with_attention = matched_models(64)
    a, b = count_parameters(without), count_parameters(with_attention)
    assert abs(a - b) <= 0.1 * b
    assert without.cross_attn is None and with_attention.cross_attn is not None


def test_batch_is_padded_reversal():
    src, tgt_in, tgt = make_batch([3, 5], torch.Generator().manual_seed(0))
    assert src.shape == tgt.shape == tgt_in.shape == (2, 5)
    assert torch.equal(tgt[0, :3], src[0, :3].flip(0)) and (src[0, 3:] == 0).all()
    assert torch.equal(tgt[1], src[1].flip(0))
    assert tgt_in[0, 0] == 1 and torch.equal(tgt_in[:, 1:], tgt[:, :-1])


def test_greedy_decode_shapes_and_errors():
    without, with_attention = matched_models(16)
    src, _, _ = make_batch([7, 4], torch.Generator().manual_seed(1))
    tokens, weights = with_attention.greedy_decode(src, 7, need_weights=True)
    assert tokens.shape == (2, 7) and weights.shape == (2, 1, 7, 7)
    assert weights[1, :, :, 4:].abs().max() == 0  # padding gets no attention
    with pytest.raises(ValueError, match="attention=True"):
        without.greedy_decode(src, 7, need_weights=True)
    with pytest.raises(ValueError, match="min_len"):
        WhyConfig(min_len=10, max_len=5)


def test_greedy_decode_projects_the_source_once_and_matches_teacher_forcing(monkeypatch):
    """Step-by-step decoding with the cached ContextKV picks what teacher forcing on its own
    output picks, and projects the encoder states to keys/values once, not once per step."""
    _, model = matched_models(16)
    src, _, _ = make_batch([7, 4], torch.Generator().manual_seed(1))
    calls, project_kv = [], model.cross_attn._project_kv
    monkeypatch.setattr(model.cross_attn, "_project_kv",
                        lambda context: calls.append(1) or project_kv(context))
    tokens = model.greedy_decode(src, 7)
    assert len(calls) == 1
    tgt_in = torch.cat([torch.full((2, 1), model.BOS), tokens[:, :-1]], dim=1)  # (B, L)
    with torch.no_grad():
        assert torch.equal(model(src, tgt_in).argmax(-1), tokens)


def test_cli_rejects_bad_budget(capsys):
    assert cli.main(["why-attention", "--steps", "0"]) == 2
    assert "steps must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_reduced_run_writes_png_json_and_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_translate.one_thread
    try:
        code = cli.main(["why-attention", "--steps", "15", "--hidden-size", "16",
                         "--max-len", "8", "--eval-per-length", "8", "--quiet",
                         "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    assert "no attention" in out and "with_attention:" in out
    assert (tmp_path / "why_attention.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["with_attention"]["by_length"]) == {str(n) for n in range(5, 9)}
