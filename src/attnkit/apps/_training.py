"""What every training command shares: a resumable run, Ctrl-C, and "keep the better model".

* :class:`ResumableRun` - saves models, optimizers, schedulers and random number generators
  to ``resume.pt`` every ``every`` steps (atomically), loads them back for ``--resume``, and
  runs the step loop: Ctrl-C raises :class:`~attnkit.apps._cli.Interrupted` saying which
  checkpoint was kept, and a resumed run continues bit for bit where the last checkpoint was
  taken (same batches, same dropout), so resuming equals never stopping.
* :func:`check_replace` - a finished run replaces an existing model only when it is at least
  as good, or with ``--force``.
* :class:`RunOptions` - how a run is carried out (output folder, progress, figures, resume,
  force, where report lines go), apart from what it learns; every app's
  ``train(config) -> result`` reads them from ``config.run``. Nothing here prints: report
  lines go to ``RunOptions.log`` (the command line passes ``print``).
* :class:`ResumeError` - ``resume`` without a matching saved run; the command lines turn it
  into their one-line usage error.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ._cli import Interrupted

__all__ = ["RESUME_NAME", "ResumableRun", "ResumeError", "RunOptions", "check_replace"]

RESUME_NAME = "resume.pt"


class ResumeError(RuntimeError):
    """``resume`` asked for, but there is no saved run, it is corrupt, or it used other
    settings (the message says which and what to do)."""


def _silent(line: str) -> None:
    """The default report: nothing."""


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How one training run is carried out, apart from what it learns.

    These never enter the settings a resumed run is compared with.

    Attributes:
        out: the output folder (checkpoints, figures, ``resume.pt``); None writes nothing.
        progress: show a progress bar (a terminal) or progress lines (elsewhere) on stderr.
        figures: write the app's figures (needs matplotlib; checked before training).
        resume: continue the run saved in ``out/resume.pt``, exactly.
        force: replace an existing model even if it scores better.
        checkpoint_every: steps between saves of the training state (None: the app's
            default).
        log: called with each line of the run's report (default: nothing is reported).

    Raises:
        TypeError: ``log`` is not callable.
        ValueError: ``checkpoint_every`` is not None or a positive int, or ``resume``
            without ``out``.
    """

    out: Path | None = None
    progress: bool = False
    figures: bool = False
    resume: bool = False
    force: bool = False
    checkpoint_every: int | None = None
    log: Callable[[str], None] = _silent

    def __post_init__(self):
        if not callable(self.log):
            raise TypeError(f"log must be callable, got {type(self.log).__name__}")
        every = self.checkpoint_every
        if every is not None and (not isinstance(every, int) or isinstance(every, bool)
                                  or every < 1):
            raise ValueError(f"checkpoint_every must be None or an int >= 1, got {every!r}")
        if self.resume and self.out is None:
            raise ValueError("resume needs an output folder (out=None keeps no state)")
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))


def _rng_state(rng):
    if isinstance(rng, random.Random):
        return rng.getstate()
    if isinstance(rng, torch.Generator):
        return rng.get_state()
    return torch.get_rng_state()  # None: torch's global generator (dropout, init)


def _set_rng_state(rng, state) -> None:
    if isinstance(rng, random.Random):
        # torch.load returns lists where getstate() had tuples; setstate needs tuples.
        rng.setstate((state[0], tuple(state[1]), state[2]))
    elif isinstance(rng, torch.Generator):
        rng.set_state(state)
    else:
        torch.set_rng_state(state)


def _flatten(settings: dict, prefix: str = "") -> dict:
    """``{"train": {"seed": 0}}`` -> ``{"seed": 0}``: option names as the user knows them."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix))
        else:
            flat[prefix + key] = value
    return flat


class ResumableRun:
    """A training run that can be stopped and continued.

    Args:
        out_dir: the run's folder; the state goes to ``out_dir/resume.pt``.
        kind: what is trained (``"translator"``...), checked when resuming.
        settings: plain JSON-able settings; a resume refuses a file with other settings.
        objects: name -> anything with ``state_dict``/``load_state_dict`` (models,
            optimizers, schedulers).
        rngs: name -> ``random.Random``, ``torch.Generator``, or ``None`` for torch's
            global generator.
        every: steps between saves.
        command: the command that continues the run, for the Ctrl-C message.
    """

    def __init__(self, out_dir, *, kind: str, settings: dict, objects: dict, rngs: dict,
                 every: int, command: str):
        self.path = Path(out_dir) / RESUME_NAME
        self.kind, self.settings, self.objects, self.rngs = kind, settings, objects, rngs
        self.every, self.command = every, command
        self.saved_step: int | None = None

    def save(self, step: int, **extra) -> Path:
        """Write the state after ``step`` steps to ``resume.pt`` (atomically)."""
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        rngs = {name: _rng_state(rng) for name, rng in self.rngs.items()}
        save_checkpoint(self.path, state, self.settings, kind=f"{self.kind}-resume",
                        step=step, rngs=rngs, extra=extra)
        self.saved_step = step
        return self.path

    def load(self) -> tuple[int, dict]:
        """Restore the saved state; returns ``(step, extra)``.

        Raises:
            ResumeError: no state to resume, a corrupt file, or one from other settings.
        """
        try:
            payload = load_checkpoint(self.path, kind=f"{self.kind}-resume")
        except FileNotFoundError:
            raise ResumeError(f"nothing to resume: no {RESUME_NAME} in {str(self.path.parent)!r}"
                             f" (it is written every {self.every} steps and removed when a "
                             f"run finishes); drop --resume") from None
        except CheckpointError as err:
            raise ResumeError(f"cannot resume: {err}") from None
        if payload["config"] != self.settings:
            ours = _flatten(self.settings)
            theirs = ", ".join(f"{k}={v}" for k, v in _flatten(payload["config"]).items()
                               if ours.get(k) != v)
            raise ResumeError(f"cannot resume: the run in {str(self.path.parent)!r} was started "
                             f"with {theirs}; pass the same options, or drop --resume")
        for name, obj in self.objects.items():
            obj.load_state_dict(payload["state_dict"][name])
        for name, rng in self.rngs.items():
            _set_rng_state(rng, payload["rngs"][name])
        self.saved_step = payload["step"]
        return payload["step"], payload.get("extra", {})

    def loop(self, start: int, total: int, step_fn: Callable[[int], None], *,
             extra: Callable[[], dict] = dict) -> None:
        """Call ``step_fn(step)`` for ``start <= step < total``, saving every ``every`` steps.

        Args:
            extra: returns more state to save with each checkpoint (e.g. the loss history).

        Raises:
            Interrupted: Ctrl-C; the message names the kept checkpoint.
        """
        step = start
        try:
            for step in range(start, total):
                step_fn(step)
                if (step + 1) % self.every == 0 and step + 1 < total:
                    self.save(step + 1, **extra())
        except KeyboardInterrupt:
            if self.saved_step is None:
                kept = (f"before the first checkpoint (every {self.every} steps); nothing "
                        f"was written")
            else:
                kept = (f"kept the checkpoint of step {self.saved_step} in {self.path}; "
                        f"continue with: {self.command} --resume")
            raise Interrupted(f"interrupted at step {step}/{total}; {kept}") from None

    def finish(self) -> None:
        """Remove ``resume.pt``: the finished run's outputs supersede it."""
        self.path.unlink(missing_ok=True)


def check_replace(path, new: float, old: float | None, *, name: str, higher_is_better: bool,
                  force: bool) -> str | None:
    """Why the finished run's model must not replace the one at ``path`` (None: it may).

    Args:
        new: the new model's score; ``old``: the existing one's (None: nothing to keep).
        name: what the score is, for the message.
        force: replace whatever the scores.

    Returns:
        None to write the new model, or the one-line reason the old one is kept.
    """
    if old is None or force:
        return None
    better = new >= old if higher_is_better else new <= old
    return None if better else (f"kept {path} ({name} {old:.4g}): this run's model scores "
                                f"{new:.4g}; pass --force to replace it")
