"""One layout for every app: model.py, train.py with one ``train(config) -> result`` that
prints nothing, cli.py with argparse and the usage error, figures.py where it draws."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

import attnkit
from attnkit.apps import _training
from attnkit.apps._cli import UsageError
from attnkit.apps._training import ResumableRun, ResumeError, RunOptions

APPS = Path(_training.__file__).parent
TRAINED = ("gpt", "translate", "why_attention")


@pytest.mark.parametrize("app", TRAINED)
def test_each_trained_app_has_model_train_cli_and_figures(app):
    names = {p.name for p in (APPS / app).glob("*.py")}
    assert {"model.py", "train.py", "cli.py", "figures.py"} <= names
    assert "app.py" not in names
    train = importlib.import_module(f"attnkit.apps.{app}.train").train
    assert list(inspect.signature(train).parameters) == ["config"]
    assert hasattr(importlib.import_module(f"attnkit.apps.{app}.cli"), "add_parser")


@pytest.mark.parametrize("path", sorted(p.relative_to(APPS).as_posix() for p in APPS.rglob("*.py")
                                        if p.name != "cli.py" and p.name != "_cli.py"))
def test_library_modules_neither_raise_usage_error_nor_print_from_training(path):
    text = (APPS / path).read_text(encoding="utf-8")
    assert not re.search(r"raise UsageError|import .*UsageError", text) or \
        path in ("walkthrough.py", "explore/cli.py"), path  # commands in one module
    if path.endswith(("train.py", "_training.py")):
        assert not re.search(r"^\s*print\(", text, flags=re.M), path


def test_checkpoint_and_the_figure_oracle_left_the_core():
    with pytest.raises(ImportError):
        importlib.import_module("attnkit.checkpoint")
    assert importlib.import_module("attnkit.apps.checkpoint").atomic_write
    assert not hasattr(attnkit.viz, "overlapping_texts")


def test_run_options_check_their_arguments():
    with pytest.raises(TypeError, match="log must be callable, got int"):
        RunOptions(log=3)
    with pytest.raises(ValueError, match="checkpoint_every must be None or an int >= 1, got 0"):
        RunOptions(checkpoint_every=0)
    with pytest.raises(ValueError, match=r"resume needs an output folder \(out=None"):
        RunOptions(resume=True)
    assert RunOptions(out="x").out == Path("x")


def test_resume_without_a_saved_run_is_a_resume_error_not_a_usage_error(tmp_path):
    run = ResumableRun(tmp_path, kind="k", settings={}, objects={}, rngs={}, every=1,
                       command="attnkit k")
    with pytest.raises(ResumeError, match="nothing to resume: no resume.pt") as caught:
        run.load()
    assert not isinstance(caught.value, UsageError)


def test_gpt_train_config_checks_its_arguments():
    from attnkit.apps.gpt.train import TrainConfig

    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        TrainConfig(b"abc")
    with pytest.raises(ValueError, match="must be >= 1, got 0, 12, 100, 10"):
        TrainConfig("abc", steps=0)


def test_translate_and_why_configs_keep_run_options_out_of_their_settings():
    from attnkit.apps.translate.train import TrainConfig
    from attnkit.apps.why_attention.train import WhyConfig

    assert "run" not in TrainConfig().settings() and "model" not in TrainConfig().settings()
    assert "run" not in WhyConfig().settings()
    with pytest.raises(ValueError, match="config.run.out is None; the translator's training"):
        importlib.import_module("attnkit.apps.translate.train").train(
            TrainConfig(run=RunOptions()))
    with pytest.raises(ValueError, match="config.run.out is None; the comparison needs"):
        importlib.import_module("attnkit.apps.why_attention.train").train(
            WhyConfig(run=RunOptions()))
    with pytest.raises(ValueError, match="steps must be positive, got 0"):
        WhyConfig(steps=0)
