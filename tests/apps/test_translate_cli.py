"""``attnkit translate``: checked answers, batch input, and training that never loses work."""

import dataclasses
import io

import pytest
import torch

from attnkit import cli
from attnkit.apps._cli import Interrupted
from attnkit.apps._training import ResumeError, RunOptions
from attnkit.apps.translate import cli as translate_cli, dates
from attnkit.apps.translate.answer import translate, translate_many
from attnkit.apps.translate.train import (SOURCE_VOCAB, TARGET_VOCAB, TrainConfig, save_translator,
                                        train)
from attnkit.apps.translate.model import TransformerConfig, TransformerSeq2Seq
from attnkit.apps.checkpoint import load_checkpoint

TINY = TransformerConfig(len(SOURCE_VOCAB), len(TARGET_VOCAB), embed_dim=32, num_heads=2,
                         num_encoder_layers=1, num_decoder_layers=1, ff_dim=64)
QUICK = TrainConfig(steps=6, batch_size=16, eval_size=20, warmup=2, model=TINY)


def _config(out, config=QUICK, **run):
    """``config`` writing to ``out``, with the run options ``run`` (default: quiet, no figures)."""
    return dataclasses.replace(config, model=TINY, run=RunOptions(out=out, **run))


def _tiny_train(config):
    """The CLI's ``train`` with the tiny model (the CLI builds the full-size one)."""
    return train(dataclasses.replace(config, model=TINY))


def _model(seed=0):
    torch.manual_seed(seed)
    return TransformerSeq2Seq(TINY).eval()


class _Answers(TransformerSeq2Seq):
    """A model whose greedy decoding returns fixed answers: tests the checks, not training."""

    def __init__(self, answers):
        super().__init__(TINY)
        self.answers = answers

    def greedy_decode(self, src, length=None, **_):
        rows = [TARGET_VOCAB.encode(self.answers[i]) for i in range(src.shape[0])]
        return torch.tensor(rows), None


@pytest.fixture
def untrained_dir(tmp_path):
    save_translator(_model(), tmp_path)
    return tmp_path


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- every answer is checked ----------------------------------------------------------------

def test_a_right_answer_is_returned():
    assert translate(_Answers(["2009-06-25"]), "Thursday June 25 2009") == "2009-06-25"


@pytest.mark.parametrize("answer, message", [
    ("2005-06-20", "the model answered '2005-06-20', which is wrong: 'june 25, 2009' is "
                   "2009-06-25"),
    ("2009-13-45", "which is not a real date"),
    ("2009-06", "which is not a real date"),
])
def test_a_wrong_answer_is_refused(answer, message):
    with pytest.raises(ValueError, match=message):
        translate(_Answers([answer]), "June 25, 2009")


@pytest.mark.parametrize("text, message", [
    ("2009-06-25x", "not a date in a supported format"),
    ("2001-3-1", "is an unsupported format: the translator was trained on '2001-03-01'"),
    ("1th of march, 2001", "trained on '1st of march, 2001' but never on this spelling"),
    ("February 30, 2020", "not a real date"),
    ("13/13/2013", "not a date in a supported format"),
    ("hello world", "not a date in a supported format"),
    ("July 4, 1776", "outside the range"),
    ("06/05/2009", "ambiguous"),
    ("friday june 25 2009", "wrong weekday"),
    ("25 jun 2009 \u2603", "not in the vocabulary: '\u2603'"),
    ("june 25; 2009 @", "';', '@'"),
    ("   ", "empty"),
    ("1" * 41, "41 characters; at most 40"),
])
def test_cli_impossible_or_unsupported_input_exits_2(untrained_dir, capsys, text, message):
    code, out, err = _run(capsys, "translate", text, "--out", str(untrained_dir))
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("attnkit translate: error: ")


def test_cli_refuses_a_wrong_model_answer(untrained_dir, capsys):
    code, out, err = _run(capsys, "translate", "2009-06-25", "--out", str(untrained_dir))
    assert code == 2 and out == "" and "the model answered" in err


# --- batch input ----------------------------------------------------------------------------

def test_split_inputs_takes_each_argument_as_one_date():
    split = translate_cli.split_inputs
    assert split(["june", "25", "2009"]) == ["june", "25", "2009"]
    assert split(["june 25 2009", "2009-06-26"]) == ["june 25 2009", "2009-06-26"]
    assert split(["hello world"]) == ["hello world"]
    assert split([], io.StringIO("25/06/2009\n\n 6/25/09 \n")) == ["25/06/2009", "6/25/09"]
    assert split(["-"], io.StringIO("2009-06-25\n")) == ["2009-06-25"]


def test_batch_prints_one_line_per_date_and_fails_the_bad_ones(untrained_dir, capsys,
                                                               monkeypatch):
    answers = _Answers(["2009-06-25", "1999-01-02"])
    monkeypatch.setattr(translate_cli, "load_translator", lambda out: answers)
    code, out, err = _run(capsys, "translate", "june 25 2009", "1999-01-02", "--out",
                          str(untrained_dir))
    assert code == 0 and out.splitlines() == ["june 25 2009\t2009-06-25",
                                              "1999-01-02\t1999-01-02"]
    monkeypatch.setattr("sys.stdin", io.StringIO("june 25 2009\nfebruary 30 2020\n"))
    code, out, err = _run(capsys, "translate", "--out", str(untrained_dir))
    assert code == 2 and out.splitlines() == ["june 25 2009\t2009-06-25"]
    assert err.strip() == ("attnkit translate: error: input 2: 'february 30 2020' is not a "
                           "real date (the day is out of range for its month)")


def test_ten_arguments_two_refused_give_eight_answers_and_two_input_lines(
        untrained_dir, capsys, monkeypatch):
    texts = ["1st of March, 2001", "March 1st, 2001", "2001-3-1", "06/25/09", "25 jun 2009",
             "February 30, 2020", "2009-06-25", "25.06.2009", "thursday june 25 2009",
             "25/06/2009"]
    truth = {i: dates.parse_date(t).isoformat() for i, t in enumerate(texts)
             if i not in (2, 5)}
    monkeypatch.setattr(translate_cli, "load_translator",
                        lambda out: _Answers(list(truth.values())))
    code, out, err = _run(capsys, "translate", *texts, "--out", str(untrained_dir))
    assert code == 2
    assert out.splitlines() == [f"{texts[i]}\t{iso}" for i, iso in truth.items()]
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(
        "attnkit translate: error: input 3: '2001-3-1' is an unsupported format: the "
        "translator was trained on '2001-03-01'")
    assert "train longer" not in err and "2009-06-25" in lines[0]  # the list of formats
    assert lines[1] == ("attnkit translate: error: input 6: 'february 30, 2020' is not a real "
                        "date (the day is out of range for its month)")


def test_unquoted_words_are_separate_inputs_with_a_hint(untrained_dir, capsys):
    code, out, err = _run(capsys, "translate", "june", "25", "2009", "--out",
                          str(untrained_dir))
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert [line.split(":")[2] for line in lines[:3]] == [" input 1", " input 2", " input 3"]
    assert lines[3] == ('attnkit translate: hint: each argument is one date; quote a date '
                        'with spaces: attnkit translate "june 25 2009"')


def test_translate_many_decodes_valid_inputs_in_one_batch():
    calls = []
    model = _Answers(["2009-06-25", "2001-02-03"])
    original = model.greedy_decode
    model.greedy_decode = lambda src, **kw: calls.append(src.shape) or original(src)
    results = translate_many(model, ["june 25 2009", "bad", "3 feb 2001"])
    assert results[0] == "2009-06-25" and results[2] == "2001-02-03"
    assert isinstance(results[1], ValueError) and len(calls) == 1 and calls[0][0] == 2


# --- usage errors are checked before any work -----------------------------------------------

def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["translate", "train", "--out", str(a_file)], "is a file, not a folder"),
        (["translate", "train", "--steps", "0"], "must be an integer >= 1"),
        (["translate", "train", "--resume", "--out", str(tmp_path / "new")],
         "nothing to resume"),
        (["translate", "train", "june", "--out", str(tmp_path)], "takes no dates"),
        (["translate", "25 jun 2009", "--resume", "--out", str(tmp_path)],
         "--resume applies to 'translate train' only"),
        (["translate", "25 jun 2009", "--out", str(tmp_path)], "no trained translator"),
        (["translate", "june 25 2009", "2009-06-26", "--plot", "x.png"], "--plot draws one"),
    ]
    for argv, message in cases:
        code, out, err = _run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 or "usage:" in err
    from attnkit import viz

    def no_matplotlib():
        raise ImportError("attnkit's figures need matplotlib")

    monkeypatch.setattr(viz, "require_matplotlib", no_matplotlib)
    code, _, err = _run(capsys, "translate", "train", "--out", str(tmp_path))
    assert code == 2 and "(or pass --no-plots)" in err


def test_corrupt_checkpoint_is_a_usage_error_and_if_missing_verifies_it(tmp_path, capsys,
                                                                        monkeypatch):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = _run(capsys, "translate", "25 jun 2009", "--out", str(tmp_path))
    assert code == 2 and "corrupt" in err
    monkeypatch.setattr(translate_cli, "train", _tiny_train)
    code, out, _ = _run(capsys, "translate", "train", "--if-missing", "--steps", "3",
                        "--no-plots", "--quiet", "--out", str(tmp_path))
    assert code == 0 and "does not load" in out
    load_checkpoint(tmp_path / "checkpoint.pt", kind="translator")  # replaced, loads
    code, out, _ = _run(capsys, "translate", "train", "--if-missing", "--out", str(tmp_path))
    assert code == 0 and "exists and loads; not training" in out


# --- interrupted runs keep their work -------------------------------------------------------

def _interrupt_at(monkeypatch, call):
    """Make the ``call``-th training batch raise KeyboardInterrupt (Ctrl-C)."""
    calls = [0]
    sample = dates.sample_pairs

    def sample_or_interrupt(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return sample(*args, **kwargs)

    monkeypatch.setattr(dates, "sample_pairs", sample_or_interrupt)


def test_interrupt_keeps_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path,
                                                                           monkeypatch):
    straight = tmp_path / "straight"
    train(_config(straight, checkpoint_every=2))
    reference = load_checkpoint(straight / "checkpoint.pt")["state_dict"]
    assert not (straight / "resume.pt").exists()  # a finished run removes its resume state

    stopped = tmp_path / "stopped"
    save_translator(_model(seed=5), stopped, metrics={"exact_match": 0.0})
    before = (stopped / "checkpoint.pt").read_bytes()
    with monkeypatch.context() as patch:
        _interrupt_at(patch, call=6)  # during step 5 of 6, after the save at step 4
        with pytest.raises(Interrupted, match=r"interrupted at step 5/6; kept the checkpoint "
                                              r"of step 4 in .*resume.pt; continue with: "
                                              r"attnkit translate train --out .* --resume"):
            train(_config(stopped, checkpoint_every=2))
    assert (stopped / "checkpoint.pt").read_bytes() == before  # the old model is intact
    assert load_checkpoint(stopped / "resume.pt")["step"] == 4
    metrics = train(_config(stopped, checkpoint_every=2, resume=True))
    assert metrics["saved"]
    resumed = load_checkpoint(stopped / "checkpoint.pt")["state_dict"]
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _interrupt_at(patch, call=4)
        with pytest.raises(Interrupted):
            train(_config(tmp_path, checkpoint_every=2))
    other = TrainConfig(steps=6, batch_size=16, eval_size=20, warmup=2, seed=1)
    with pytest.raises(ResumeError, match="was started with .*seed=0"):
        train(_config(tmp_path, other, resume=True))
    with pytest.raises(ResumeError, match="nothing to resume: no resume.pt"):
        train(_config(tmp_path / "empty", resume=True))


def test_cli_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(translate_cli, "train", _tiny_train)
    _interrupt_at(monkeypatch, call=1)
    code, out, err = _run(capsys, "translate", "train", "--steps", "4", "--no-plots",
                          "--checkpoint-every", "2", "--out", str(tmp_path))
    assert code == 130
    assert err.strip().splitlines()[-1] == ("attnkit translate: interrupted at step 0/4; before "
                                            "the first checkpoint (every 2 steps); nothing "
                                            "was written")


def test_a_worse_run_does_not_replace_a_better_model_without_force(tmp_path, capsys):
    save_translator(_model(seed=5), tmp_path, metrics={"exact_match": 0.99})
    before = (tmp_path / "checkpoint.pt").read_bytes()
    lines = []
    metrics = train(_config(tmp_path, log=lines.append))
    assert not metrics["saved"] and (tmp_path / "checkpoint.pt").read_bytes() == before
    assert len(lines) == 1 and "pass --force to replace it" in lines[0]
    assert capsys.readouterr().out == ""  # the library prints nothing itself
    metrics = train(_config(tmp_path, force=True))
    assert metrics["saved"] and (tmp_path / "checkpoint.pt").read_bytes() != before


def test_progress_prints_lines_not_carriage_returns_when_not_a_terminal(tmp_path, capsys):
    train(_config(tmp_path, progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "translate train: step 6/6 (100%), loss" in err
    assert err.count("translate train: step") == 6  # every max(1, 6 // 10) = 1 step


def test_one_step_training_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """One step: outputs are written even when the model answers nonsense (the figures label
    whatever it emits). A tiny model and 50 held-out dates keep it quick."""
    @dataclasses.dataclass(frozen=True)
    class QuickConfig(TrainConfig):
        eval_size: int = 50

    monkeypatch.setattr(translate_cli, "TrainConfig", QuickConfig)
    monkeypatch.setattr(translate_cli, "train", _tiny_train)
    code, out, _ = _run(capsys, "translate", "train", "--steps", "1", "--quiet", "--out",
                        str(tmp_path))
    assert code == 0 and f"wrote {tmp_path}" in out
    names = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint.pt", "metrics.json", "alignment_1.png"} <= names
    assert "resume.pt" not in names
