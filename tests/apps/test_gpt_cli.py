"""`attnkit gpt train/generate/attention` through cli.main: outputs, messages, exit codes."""

import contextlib
import io
import math

import pytest
import torch

from attnkit import cli
from attnkit.apps._training import RunOptions
from attnkit.apps.gpt.data import default_corpus
from attnkit.apps.gpt.train import TrainConfig, train
from attnkit.apps.gpt.model import load_checkpoint

TEXT = "attention is all you need; the cat sat on the mat. " * 40
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_RUN = {"out", "progress", "figures", "resume", "force", "checkpoint_every", "log"}


def _train(text, **kwargs):
    """``train(TrainConfig(text, ...))``, the run options among ``kwargs`` going to ``run``."""
    run = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUN}
    return train(TrainConfig(text, **kwargs, run=RunOptions(**run)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run through the CLI, shared by the tests below."""
    root = tmp_path_factory.mktemp("gpt")
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["gpt", "train", "--text", str(text), "--preset", "tiny", "--steps",
                         "60", "--eval-every", "20", "--lr", "3e-3", "--out",
                         str(root / "run")])
    return code, out.getvalue(), err.getvalue(), root / "run"


def test_train_writes_checkpoint_and_curve(trained):
    code, out, err, run = trained
    assert code == 0
    assert sorted(p.name for p in run.iterdir()) == ["gpt.pt", "loss.png"]  # no temp files
    assert (run / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert "validation loss" in out and "unigram baseline" in out
    assert f"wrote {run / 'gpt.pt'}" in out
    assert "gpt train: step 60/60 (100%), train " in err and ", val " in err  # not a tty
    model, metadata = load_checkpoint(run / "gpt.pt")
    assert model.config.num_layers == 2 and metadata["steps"] == 60
    assert [h[0] for h in metadata["history"]] == [20, 40, 60]
    assert metadata["val_loss"] < metadata["unigram_loss"]


def test_training_is_seeded():
    first = _train(TEXT, preset="tiny", steps=5, progress=False)
    again = _train(TEXT, preset="tiny", steps=5, progress=False)
    assert first.history == again.history
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_training_reports_lines_at_each_evaluation_when_not_a_terminal(capsys):
    lines = []
    _train(TEXT, preset="tiny", steps=4, eval_every=2, progress=True, log=lines.append)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(",")[0] for line in err.splitlines()] == [
        "gpt train: step 2/4 (50%)", "gpt train: step 4/4 (100%)"]
    assert " val " in err.splitlines()[-1]
    assert lines[-1].startswith("validation loss")


def test_generate_streams_prompt_and_tokens(trained, capsys):
    checkpoint = str(trained[3] / "gpt.pt")
    args = ["gpt", "generate", "--checkpoint", checkpoint, "--prompt", "the cat",
            "--tokens", "40", "--temperature", "0"]
    assert cli.main(args) == 0
    cached = capsys.readouterr()
    assert cached.out.startswith("the cat") and len(cached.out) == len("the cat") + 40 + 1
    assert "40 tokens in" in cached.err and "KV cache on" in cached.err
    assert cli.main(args + ["--no-cache"]) == 0
    uncached = capsys.readouterr()
    assert uncached.out == cached.out and "KV cache off" in uncached.err
    assert cli.main(["gpt", "generate", "--checkpoint", checkpoint, "--prompt", "t",
                     "--tokens", "20", "--top-k", "3", "--seed", "1"]) == 0


@pytest.mark.parametrize("prompt, message", [
    ("the €at ü", "the prompt has 2 character(s) the model never saw in training: '€', 'ü'"),
    ("the cat " * 5, "the prompt has 40 characters but the model's context is 32; shorten it"),
    ("", "--prompt is empty; give at least one character"),
])
@pytest.mark.parametrize("command", ["generate", "attention"])
def test_prompt_errors(trained, capsys, tmp_path, command, prompt, message):
    args = ["gpt", command, "--checkpoint", str(trained[3] / "gpt.pt"), "--prompt", prompt]
    args += ["--out", str(tmp_path / "a.png")] if command == "attention" else []
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"attnkit gpt {command}: error: {message}\n"  # one line
    assert captured.out == ""


def test_missing_checkpoint_says_how_to_train(capsys, tmp_path):
    missing = tmp_path / "nowhere" / "gpt.pt"
    assert cli.main(["gpt", "generate", "--checkpoint", str(missing), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnkit gpt generate: error: no checkpoint at '{missing}'")
    assert f"attnkit gpt train --out {missing.parent}" in err and err.count("\n") == 1


def test_foreign_checkpoint_is_refused(capsys, tmp_path):
    bad = tmp_path / "gpt.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli.main(["gpt", "attention", "--checkpoint", str(bad), "--prompt", "a", "--out",
                     str(tmp_path / "a.png")]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_train_errors(capsys, tmp_path):
    assert cli.main(["gpt", "train", "--text", str(tmp_path / "none.txt"), "--out",
                     str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["gpt", "train", "--steps", "0"]) == 2
    assert "--steps: must be an integer >= 1, got '0'" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("abcabc", encoding="utf-8")
    assert cli.main(["gpt", "train", "--text", str(short), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_attention_grid_is_written(trained, capsys, tmp_path):
    out = tmp_path / "figs" / "heads.png"
    assert cli.main(["gpt", "attention", "--checkpoint", str(trained[3] / "gpt.pt"),
                     "--prompt", "the cat sat", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["heads.png"]


@pytest.mark.slow
def test_small_model_beats_the_unigram_baseline_on_the_help_text():
    """The demo in reduced form: 100 steps of the small preset, batch 8, default corpus."""
    result = _train(default_corpus(), preset="small", steps=100, batch_size=8, eval_every=50,
                   progress=False)
    assert result.unigram_loss == pytest.approx(3.25, abs=0.05)
    assert result.val_loss < result.unigram_loss - 0.4
    assert math.isfinite(result.tokens_per_s)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "a", "--temperature", "nan"],
     "--temperature: must be a finite number, got 'nan'"),
    (["generate", "--prompt", "a", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["generate", "--prompt", "a", "--tokens", "-3"], "--tokens: must be an integer >= 0"),
    (["generate", "--prompt", "a", "--top-k", "0"], "--top-k: must be an integer >= 1"),
    (["train", "--lr", "inf"], "--lr: must be a finite number"),
    (["train", "--context", "100000000", "--text", "TEXT"], "is longer than the training text"),
    (["train", "--context", "60000", "--batch-size", "100000", "--preset", "small"],
     "GiB, but"),
    (["train", "--resume"], "nothing to resume"),
])
def test_options_are_checked_before_any_work(tmp_path, capsys, argv, message):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    argv = [str(text) if a == "TEXT" else a for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    assert cli.main(["gpt", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_interrupted_training_resumes_exactly_and_keeps_the_old_model(tmp_path, monkeypatch):
    from attnkit.apps._cli import Interrupted
    from attnkit.apps.gpt import train as app

    quiet = dict(preset="tiny", steps=6, eval_every=2)
    straight = _train(TEXT, out=tmp_path / "a", **quiet)
    _train(TEXT, out=tmp_path / "b", seed=7, **quiet)  # an older model in the folder
    before = (tmp_path / "b" / "gpt.pt").read_bytes()
    calls, lr_at = [0], app._lr_at

    def lr_or_interrupt(*args):  # called once at the start of every training step
        calls[0] += 1
        if calls[0] == 6:  # during step 5, after the save at step 4
            raise KeyboardInterrupt
        return lr_at(*args)

    with monkeypatch.context() as patch:
        patch.setattr(app, "_lr_at", lr_or_interrupt)
        with pytest.raises(Interrupted, match="kept the checkpoint of step 4"):
            _train(TEXT, out=tmp_path / "b", **quiet)
    assert (tmp_path / "b" / "gpt.pt").read_bytes() == before
    resumed = _train(TEXT, out=tmp_path / "b", resume=True, force=True, **quiet)
    assert resumed.history == straight.history
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    assert not (tmp_path / "b" / "resume.pt").exists()


def test_a_worse_model_or_another_text_needs_force(tmp_path):
    lines = []
    quiet = dict(preset="tiny", eval_every=2, log=lines.append, out=tmp_path)
    _train(TEXT, steps=40, **quiet)
    before = (tmp_path / "gpt.pt").read_bytes()
    _train(TEXT, steps=2, **quiet)
    assert (tmp_path / "gpt.pt").read_bytes() == before
    _train("a different text, " * 100, steps=2, **quiet)
    assert (tmp_path / "gpt.pt").read_bytes() == before
    assert "trained on another text" in lines[-1]
    _train(TEXT, steps=2, force=True, **quiet)
    assert (tmp_path / "gpt.pt").read_bytes() != before
