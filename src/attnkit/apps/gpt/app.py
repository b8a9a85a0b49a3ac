"""The GPT app's library: training, the prompt check and the attention figure.

* :func:`train` - seeded training on the Python help text (or any text), progress with
  train/val loss, a resumable state, an atomic checkpoint and a loss-curve PNG, and the
  validation loss next to a unigram baseline.
* :func:`encode_prompt` - a prompt's token ids, or a ``ValueError`` saying why not.
* :func:`attention_figure` - a readable layer x head grid of attention maps.

The command line (``attnkit gpt train | generate | attention``) is :mod:`.cli`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import viz
from .._progress import Progress
from .._training import ResumableRun, check_replace
from .._vocab import CharVocab
from .data import get_batch, split_ids, unigram_loss
from .model import GPT, GPTConfig, load_checkpoint, save_checkpoint

__all__ = ["TrainResult", "train", "encode_prompt", "attention_figure", "memory_estimate",
           "existing_val_loss", "CHECKPOINT_NAME", "DEFAULT_OUT"]

CHECKPOINT_NAME = "gpt.pt"
DEFAULT_OUT = Path("out/gpt")


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


def train(text: str, *, preset: str = "small", steps: int = 1500, batch_size: int = 12,
          lr: float = 1e-3, seed: int = 0, eval_every: int = 100, eval_batches: int = 10,
          out: Path | None = DEFAULT_OUT, progress: bool = True, plot: bool = True,
          log=print, resume: bool = False, force: bool = False,
          checkpoint_every: int | None = None, **overrides) -> TrainResult:
    """Train a character-level GPT on ``text`` and save it.

    Args:
        text: the corpus; split 90/10 into train/validation with :func:`split_ids`.
        preset: a :data:`attnkit.apps.gpt.model.PRESETS` name; ``overrides`` replace its fields.
        steps: optimizer steps (AdamW, warm-up then cosine decay).
        batch_size: windows of ``max_seq_len`` characters per step.
        lr: peak learning rate.
        seed: seeds the initial weights and the batches: the same arguments give the same
            model (on the same torch build and thread count).
        eval_every: steps between validation estimates (and progress lines).
        eval_batches: batches per validation estimate.
        out: directory for ``gpt.pt``, ``loss.png`` and, while training, ``resume.pt``;
            None writes nothing.
        progress: show progress (a bar on a terminal, a line per evaluation elsewhere).
        plot: write the loss curve (needs matplotlib).
        log: called with each line of the report.
        resume: continue the run saved in ``out/resume.pt`` (exactly: same batches).
        force: replace an existing model with a lower validation loss.
        checkpoint_every: steps between saves of the training state (default
            ``eval_every``; only with ``out``).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: bad sizes, a context longer than the training text or beyond this
            machine's memory, or a text too short for one window of training and validation.
        ImportError: ``plot`` without matplotlib (before training).
        attnkit.apps._cli.UsageError: ``resume`` without a matching saved run.
        attnkit.apps._cli.Interrupted: Ctrl-C (the last saved state is kept).
    """
    if steps < 1 or batch_size < 1 or eval_every < 1 or eval_batches < 1:
        raise ValueError(f"steps, batch_size, eval_every and eval_batches must be >= 1, got "
                         f"{steps}, {batch_size}, {eval_every}, {eval_batches}")
    if plot and out is not None:
        viz.require_matplotlib()  # fail before training, not after it
    tokenizer = CharVocab.from_text(text)
    train_ids, val_ids = split_ids(torch.tensor(tokenizer.encode(text), dtype=torch.long))
    config = GPTConfig.preset(preset, tokenizer.vocab_size, **overrides)
    if len(val_ids) < 2:
        raise ValueError(f"the text has {len(text)} characters: too short to hold out "
                         f"validation data")
    if "max_seq_len" in overrides and config.max_seq_len >= len(train_ids):
        raise ValueError(f"--context {config.max_seq_len} is longer than the training text "
                         f"({len(train_ids):,} characters); use a shorter context or more text")
    need, have = memory_estimate(config, batch_size), _available_memory()
    if have is not None and need > have:
        raise ValueError(f"training with context {config.max_seq_len} and batch {batch_size} "
                         f"needs about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} GiB is "
                         f"available; use a shorter --context or a smaller --batch-size")
    torch.manual_seed(seed)
    model = GPT(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    block = min(config.max_seq_len, len(train_ids) - 1)  # short texts train on shorter windows
    baseline = unigram_loss(train_ids, val_ids, tokenizer.vocab_size)
    result = TrainResult(model, tokenizer, unigram_loss=baseline)
    run = None
    if out is not None:
        settings = {"text_id": _text_id(text), "preset": preset, "steps": steps,
                    "batch_size": batch_size, "lr": lr, "seed": seed, "eval_every": eval_every,
                    "eval_batches": eval_batches, "model": dataclasses.asdict(config)}
        run = ResumableRun(out, kind="gpt", settings=settings,
                           objects={"model": model, "optimizer": optimizer},
                           rngs={"batches": generator, "torch": None},
                           every=checkpoint_every or eval_every,
                           command=f"attnkit gpt train --out {out}")
    log(f"{len(text):,} characters, vocabulary {tokenizer.vocab_size}, {len(train_ids):,} train "
        f"/ {len(val_ids):,} validation; model {model.num_parameters():,} parameters "
        f"({preset}: {config.num_layers} layers, {config.num_heads} heads, "
        f"{config.embed_dim} dims, context {config.max_seq_len})")
    start, state = 0, {"running": math.nan, "seconds": 0.0}
    if resume:
        if run is None:
            raise ValueError("resume needs an output folder (out=None keeps no state)")
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
    with Progress(steps, "gpt train", enabled=progress, initial=start, every=eval_every) as bar:
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
        if note and not force:
            log(f"kept {path}: {note}; pass --force to replace it")
        elif check_replace(path, result.val_loss, old, name="validation loss",
                           higher_is_better=False, force=force):
            result.files.append(save_checkpoint(
                path, model, chars=tokenizer.chars, preset=preset, steps=steps, seed=seed,
                val_loss=result.val_loss, unigram_loss=baseline, text_id=_text_id(text),
                history=[list(h) for h in result.history]))
            if plot:
                result.files.append(_plot_losses(result, Path(out) / "loss.png"))
        for written in result.files:
            log(f"wrote {written}")
        run.finish()
    return result


def _plot_losses(result: TrainResult, path: Path) -> Path:
    fig, axes = viz.new_figure(panel_size=(6.0, 4.0))
    ax = axes[0, 0]
    steps = [h[0] for h in result.history]
    ax.plot(steps, [h[1] for h in result.history], marker=".", label="train (running mean)")
    ax.plot(steps, [h[2] for h in result.history], marker=".", label="validation")
    ax.axhline(result.unigram_loss, color="grey", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(viz.wrap(f"GPT training: validation {result.val_loss:.3f} vs unigram "
                          f"{result.unigram_loss:.3f} nats/char", 6.0, 11), fontsize=11)
    ax.legend()
    return viz.save_figure(fig, path)


def encode_prompt(prompt, model: GPT, vocab: CharVocab) -> torch.Tensor:
    """The token ids ``(T,)`` of a prompt the model can read.

    Raises:
        TypeError: ``prompt`` is not a str.
        ValueError: an empty prompt, characters the model never saw (named), or more
            characters than the model's context.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("the prompt is empty; give at least one character")
    missing = vocab.unknown(prompt)
    if missing:
        raise ValueError(f"the prompt has {len(missing)} character(s) the model never saw in "
                         f"training: {', '.join(repr(c) for c in missing)}")
    limit = model.config.max_seq_len
    if len(prompt) > limit:
        raise ValueError(f"the prompt has {len(prompt)} characters but the model's context "
                         f"is {limit}; shorten it")
    return torch.tensor(vocab.encode(prompt), dtype=torch.long)  # (T,)


def _label(char: str) -> str:
    """Tick label for a character: whitespace made visible."""
    return {" ": "␣", "\n": "\\n", "\t": "\\t"}.get(char, char)


def attention_figure(grid: torch.Tensor, prompt: str):
    """The layer x head grid of attention maps of ``prompt``, as a matplotlib Figure.

    Args:
        grid: attention weights ``(L, H, T, T)`` of one prompt of ``T`` characters.
        prompt: the characters (tick labels, whitespace made visible).

    Long prompts stay readable: square cells that shrink once the figure reaches its size
    cap, and every k-th character labelled with its position (:mod:`attnkit.viz`).

    Raises:
        ImportError: matplotlib is missing.
    """
    labels = [_label(c) for c in prompt]
    # The first queries see one or two keys, so their weights are 1.0 and 0.5 and would
    # darken every other cell on a shared scale; scale to the later rows (earlier ones clip,
    # and the colour bar's arrow says so).
    vmax = float(grid[:, :, 2:].max()) if grid.shape[2] > 2 else 1.0
    return viz.head_grid_figure(
        grid, labels, labels, annotate=False, vmax=vmax,
        title=f"GPT attention for a prompt of {len(prompt)} characters, {grid.shape[0]} layers x "
              f"{grid.shape[1]} heads (rows: queries, columns: keys; causal, so only keys at "
              f"or before the query)")
