"""``attnkit why-attention``: matched models, the reversal task, and a reduced run."""

import dataclasses
import json

import pytest
import torch

from attnkit import cli
from attnkit.apps._training import RunOptions
from attnkit.apps.translate.model import count_parameters
from attnkit.apps.why_attention.train import WhyConfig, make_batch, matched_models, train


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
    assert "must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_reduced_run_writes_png_json_and_table(tmp_path, capsys):
    code = cli.main(["why-attention", "--steps", "15", "--hidden-size", "16",
                     "--max-len", "8", "--eval-per-length", "8", "--quiet",
                     "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "no attention" in out and "with_attention:" in out
    assert (tmp_path / "why_attention.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["with_attention"]["by_length"]) == {str(n) for n in range(5, 9)}


SMALL = WhyConfig(steps=6, hidden_size=8, max_len=7, eval_per_length=4, batch_size=8)


def _small(out, **run):
    return dataclasses.replace(SMALL, run=RunOptions(out=out, checkpoint_every=2, **run))


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    from attnkit.apps._cli import Interrupted
    from attnkit.apps.why_attention import train as app

    straight = train(_small(tmp_path / "a"))
    calls, step = [0], app._train_step

    def step_or_interrupt(*args):
        calls[0] += 1
        if calls[0] == 4:  # step 3, after the save at step 2
            raise KeyboardInterrupt
        return step(*args)

    with monkeypatch.context() as patch:
        patch.setattr(app, "_train_step", step_or_interrupt)
        with pytest.raises(Interrupted, match="kept the checkpoint of step 2"):
            train(_small(tmp_path / "b"))
    resumed = train(_small(tmp_path / "b", resume=True))
    for name in ("without_attention", "with_attention"):
        assert resumed[name]["by_length"] == straight[name]["by_length"]
    assert not (tmp_path / "b" / "resume.pt").exists()


def test_cli_errors_are_checked_before_training(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["why-attention", "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["why-attention", "--resume", "--out", str(tmp_path / "new")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    from attnkit import viz

    def no_matplotlib():
        raise ImportError("attnkit's figures need matplotlib")

    monkeypatch.setattr(viz, "require_matplotlib", no_matplotlib)
    assert cli.main(["why-attention", "--out", str(tmp_path)]) == 2
    assert "(or pass --no-plots)" in capsys.readouterr().err


def test_a_real_ctrl_c_keeps_the_last_checkpoint(tmp_path):
    """SIGINT to a running command (what Ctrl-C sends): one line, exit 130, a loadable
    resume.pt, and nothing else half-written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from attnkit.apps.checkpoint import load_checkpoint

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnkit", "why-attention", "--steps", "100000",
         "--hidden-size", "8", "--max-len", "6", "--eval-per-length", "2", "--no-plots",
         "--checkpoint-every", "5", "--threads", "1", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "resume.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # let a few more steps run past the first save
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("attnkit why-attention: interrupted at step ") and \
        "kept the checkpoint of step" in lines[-1] and lines[-1].endswith("--resume"), err
    assert "Traceback" not in err
    state = load_checkpoint(tmp_path / "resume.pt", kind="why-attention-resume")
    assert state["step"] % 5 == 0 and state["step"] >= 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]  # no temp files
