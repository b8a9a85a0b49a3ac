"""The GPT app's training: ``train(config) -> TrainResult``.

Seeded training on the Python help text (or any text), progress with train/val loss, a
resumable state, an atomic checkpoint and a loss-curve PNG, and the validation loss next to a
unigram baseline. Nothing here prints: report lines go to ``config.run.log``. The prompt check
is :func:`~.data.encode_prompt`, the figures :mod:`.figures`, the command line
(``attnkit gpt train | generate | attention``) :mod:`.cli`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._progress import Progress
from .._training import ResumableRun, RunOptions, check_replace
from .._vocab import CharVocab
from .data import get_batch, split_ids, unigram_loss
from .model import GPT, GPTConfig, load_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "TrainResult", "train", "memory_estimate", "existing_val_loss",
           "CHECKPOINT_NAME", "DEFAULT_OUT"]

CHECKPOINT_NAME = "gpt.pt"
DEFAULT_OUT = Path("out/gpt")


@dataclass(frozen=True)
class TrainConfig:
    """What a GPT run learns from; ``run`` says how it is carried out (:class:`RunOptions`:
    ``out`` for ``gpt.pt``, ``loss.png`` and ``resume.pt``, None writes nothing;
    ``checkpoint_every`` defaults to ``eval_every``; ``figures`` writes the loss curve).

    Attributes:
        text: the corpus; split 90/10 into train/validation with :func:`split_ids`.
        preset: a :data:`attnkit.apps.gpt.model.PRESETS` name; ``overrides`` replace its
            fields (e.g. ``{"max_seq_len": 128}``).
        steps: optimizer steps (AdamW, warm-up then cosine decay).
        batch_size: windows of ``max_seq_len`` characters per step.
        lr: peak learning rate.
        seed: seeds the initial weights and the batches: the same config gives the same
            model (on the same torch build and thread count).
        eval_every: steps between validation estimates (and progress lines).
        eval_batches: batches per validation estimate.

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: ``steps``, ``batch_size``, ``eval_every`` or ``eval_batches`` below 1.
    """

    text: str
    preset: str = "small"
    steps: int = 1500
    batch_size: int = 12
    lr: float = 1e-3
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 10
    overrides: dict = field(default_factory=dict)
    run: RunOptions = RunOptions()

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"text must be a str, got {type(self.text).__name__}")
        values = (self.steps, self.batch_size, self.eval_every, self.eval_batches)
        if min(values) < 1:
            raise ValueError(f"steps, batch_size, eval_every and eval_batches must be >= 1, "
                             f"got {', '.join(map(str, values))}")


@dataclass
class TrainResult:
    """What :func:`train` produced (losses in nats per character)."""

    model: GPT
    tokenizer: CharVocab
    history: list[tuple[int, float, float]] = field(default_factory=list)  # step, train, val
    val_loss: float = math.nan
    unigram_loss: float = math.nan
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    files: list[Path] = field(default_factory=list)


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to lr / 10."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _estimate(model: GPT, data, batches: int, batch_size: int, seed: int) -> float:
    """Mean loss over ``batches`` windows drawn with a fixed seed (same windows every call)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    block = min(model.config.max_seq_len, len(data) - 1)
    losses = [float(model.loss(*get_batch(data, batch_size, block, generator)))
              for _ in range(batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def _text_id(text: str) -> str:
    """A short fingerprint of the corpus: validation losses compare only on the same text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def memory_estimate(config: GPTConfig, batch_size: int) -> int:
    """Bytes a training step needs, roughly: parameters with AdamW state, and activations.

    Activations follow the usual count for a Transformer layer trained without storing
    ``T x T`` attention weights (attnkit's backends keep attention O(T) in memory): about 34
    stored values per token per embedding feature per layer, plus the logits and their
    gradient. Used to refuse, before training, a context far beyond what this machine holds.
    """
    B, T, E, L, V = batch_size, config.max_seq_len, config.embed_dim, config.num_layers, \
        config.vocab_size
    params = 12 * L * E * E + V * E + T * E
    return 4 * (4 * params + 34 * B * T * E * L + 3 * B * T * V)


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def existing_val_loss(path, text: str) -> tuple[float | None, str]:
    """``(validation loss, note)`` of the model at ``path`` if it was trained on ``text``.

    A model of another text cannot be compared: its loss is returned as ``-inf`` (so only
    ``--force`` replaces it) with a note saying why; no loadable model gives ``None``.
    """
    try:
        _, metadata = load_checkpoint(path)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError):
        return None, ""
    if metadata.get("text_id") != _text_id(text):
        return -math.inf, "it was trained on another text, so the losses do not compare"
    return metadata.get("val_loss"), ""


def train(config: TrainConfig) -> TrainResult:
    """Train a character-level GPT on ``config.text`` and (with ``config.run.out``) save it.

    A finished run replaces an existing ``gpt.pt`` only when its validation loss is at least as
    low (and it was trained on the same text), or with ``run.force``; otherwise the reason is
    reported through ``run.log``, like every other line of the report.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: a context longer than the training text or beyond this machine's memory,
            a text too short for one window of training and validation, or an unknown preset.
        ImportError: ``run.figures`` without matplotlib (before training).
        attnkit.apps._training.ResumeError: ``run.resume`` without a matching saved run.
        attnkit.apps._cli.Interrupted: Ctrl-C (the last saved state is kept).
    """
    options, log, text, preset = config.run, config.run.log, config.text, config.preset
    steps, batch_size, lr, seed = config.steps, config.batch_size, config.lr, config.seed
    eval_every, eval_batches, overrides = config.eval_every, config.eval_batches, \
        config.overrides
    out = options.out
    if options.figures and out is not None:
        from ...viz import require_matplotlib

        require_matplotlib()  # fail before training, not after it
    tokenizer = CharVocab.from_text(text)
    train_ids, val_ids = split_ids(torch.tensor(tokenizer.encode(text), dtype=torch.long))
    model_config = GPTConfig.preset(preset, tokenizer.vocab_size, **overrides)
    if len(val_ids) < 2:
        raise ValueError(f"the text has {len(text)} characters: too short to hold out "
                         f"validation data")
    if "max_seq_len" in overrides and model_config.max_seq_len >= len(train_ids):
        raise ValueError(f"--context {model_config.max_seq_len} is longer than the training "
                         f"text ({len(train_ids):,} characters); use a shorter context or more "
                         f"text")
    need, have = memory_estimate(model_config, batch_size), _available_memory()
    if have is not None and need > have:
        raise ValueError(f"training with context {model_config.max_seq_len} and batch "
                         f"{batch_size} needs about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} GiB is "
                         f"available; use a shorter --context or a smaller --batch-size")
    torch.manual_seed(seed)
    model = GPT(model_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    # Short texts train on shorter windows.
    block = min(model_config.max_seq_len, len(train_ids) - 1)
    baseline = unigram_loss(train_ids, val_ids, tokenizer.vocab_size)
    result = TrainResult(model, tokenizer, unigram_loss=baseline)
    run = None
    if out is not None:
        settings = {"text_id": _text_id(text), "preset": preset, "steps": steps,
                    "batch_size": batch_size, "lr": lr, "seed": seed, "eval_every": eval_every,
                    "eval_batches": eval_batches, "model": dataclasses.asdict(model_config)}
        run = ResumableRun(out, kind="gpt", settings=settings,
                           objects={"model": model, "optimizer": optimizer},
                           rngs={"batches": generator, "torch": None},
                           every=options.checkpoint_every or eval_every,
                           command=f"attnkit gpt train --out {out}")
    log(f"{len(text):,} characters, vocabulary {tokenizer.vocab_size}, {len(train_ids):,} train "
        f"/ {len(val_ids):,} validation; model {model.num_parameters():,} parameters "
        f"({preset}: {model_config.num_layers} layers, {model_config.num_heads} heads, "
        f"{model_config.embed_dim} dims, context {model_config.max_seq_len})")
    start, state = 0, {"running": math.nan, "seconds": 0.0}
    if options.resume:
        start, saved = run.load()
        result.history = [tuple(h) for h in saved["history"]]
        state.update(running=saved["running"], seconds=saved["seconds"])
        log(f"resumed at step {start}/{steps} from {run.path}")

    def step_fn(step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        x, y = get_batch(train_ids, batch_size, block, generator)  # (B, T) each
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Exponential average: a readable train loss without an extra forward pass.
        value, running = loss.item(), state["running"]
        state["running"] = value if math.isnan(running) else 0.9 * running + 0.1 * value
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = _estimate(model, val_ids, eval_batches, batch_size, seed + 1)
            result.history.append((step + 1, state["running"], val))
            bar.update(train=state["running"], val=val)
        else:
            bar.update(train=state["running"])

    started = time.perf_counter()
    elapsed = lambda: state["seconds"] + time.perf_counter() - started  # noqa: E731
    with Progress(steps, "gpt train", enabled=options.progress, initial=start, every=eval_every) as bar:
        if run is None:
            for step in range(start, steps):
                step_fn(step)
        else:
            run.loop(start, steps, step_fn, extra=lambda: {
                "history": [list(h) for h in result.history], "running": state["running"],
                "seconds": elapsed()})
    result.seconds = elapsed()
    result.tokens_per_s = (steps - start) * batch_size * block / max(
        time.perf_counter() - started, 1e-9)
    result.val_loss = _estimate(model, val_ids, 4 * eval_batches, batch_size, seed + 2)
    log(f"trained {steps} steps in {result.seconds:.1f} s ({result.tokens_per_s:,.0f} "
        f"tokens/s, {torch.get_num_threads()} threads)")
    log(f"validation loss {result.val_loss:.3f} nats/char ({result.val_loss / math.log(2):.2f} "
        f"bits); unigram baseline {baseline:.3f} ({baseline / math.log(2):.2f} bits)")
    if out is not None:
        path = Path(out) / CHECKPOINT_NAME
        old, note = existing_val_loss(path, text)
        kept = f"kept {path}: {note}; pass --force to replace it" if note and \
            not options.force else check_replace(path, result.val_loss, old,
                                                 name="validation loss",
                                                 higher_is_better=False, force=options.force)
        if kept:
            log(kept)
        else:
            result.files.append(save_checkpoint(
                path, model, chars=tokenizer.chars, preset=preset, steps=steps, seed=seed,
                val_loss=result.val_loss, unigram_loss=baseline, text_id=_text_id(text),
                history=[list(h) for h in result.history]))
            if options.figures:
                from .figures import plot_losses

                result.files.append(plot_losses(result, Path(out) / "loss.png"))
        for written in result.files:
            log(f"wrote {written}")
        run.finish()
    return result
