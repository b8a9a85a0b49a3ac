"""One CLI style across the apps: shared option names, defaults in help, no markup, exit 2."""

import pytest

from attnkit import cli

TRAINING = [["translate"], ["why-attention"], ["gpt", "train"]]
ALL = TRAINING + [["walkthrough"], ["gpt", "generate"], ["gpt", "attention"]]


def _help(capsys, argv):
    assert cli.main([*argv, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", ALL, ids=" ".join)
def test_help_has_no_markup_and_shows_defaults(capsys, argv):
    text = _help(capsys, argv)
    for markup in ("``", ":class:", ":mod:", ":func:", "(default: None)", "(default: False)"):
        assert markup not in text, (argv, markup)
    assert "--threads N" in text


@pytest.mark.parametrize("argv", TRAINING, ids=" ".join)
def test_training_commands_share_option_names(capsys, argv):
    text = _help(capsys, argv)
    for option in ("--threads", "--seed", "--out", "--quiet", "--no-plots", "--resume",
                   "--checkpoint-every"):
        assert option in text, (argv, option)
    assert "(default: 0)" in text  # --seed's default is shown


@pytest.mark.parametrize("argv", ALL, ids=" ".join)
def test_bad_threads_is_a_usage_error(capsys, argv):
    extra = ["--prompt", "a"] if argv[-1] in ("generate", "attention") else []
    assert cli.main([*argv, *extra, "--threads", "0"]) == 2
    assert "--threads: must be an integer >= 1, got '0'" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly():
    """`attnkit walkthrough | head -1`: no traceback, the shell's SIGPIPE code."""
    import subprocess
    import sys

    run = subprocess.run(f"{sys.executable} -m attnkit walkthrough --no-plots | head -1",
                         shell=True, capture_output=True, text=True, timeout=120,
                         executable="/bin/bash")
    assert run.stdout.startswith("Sentence:")
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
