"""``attnkit gpt``: train a character-level GPT, generate text with it, draw its heads.

* ``attnkit gpt train`` - :func:`train`: seeded training on the Python help text (or
  ``--text FILE``), tqdm progress with train/val loss, an atomic checkpoint and a loss-curve
  PNG in ``--out``, and the validation loss next to a unigram baseline.
* ``attnkit gpt generate --prompt ...`` - streams sampled text, with the KV cache or
  (``--no-cache``) recomputing the context every step.
* ``attnkit gpt attention --prompt ... --out FILE`` - a layer x head grid of attention maps.

User mistakes (unknown prompt characters, a prompt longer than the context, no checkpoint)
print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import viz
from .._vocab import CharVocab
from .data import get_batch, load_text, split_ids, unigram_loss
from .model import GPT, GPTConfig, PRESETS, load_checkpoint, save_checkpoint

__all__ = ["TrainResult", "train", "attention_figure", "add_parser"]

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


def _progress(total: int, enabled: bool):
    """A tqdm bar (imported only here), or None without tqdm or when disabled."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional extra; training then reports at each evaluation
        return None
    return tqdm(total=total, desc="training", unit="step", file=sys.stderr)


def train(text: str, *, preset: str = "small", steps: int = 1500, batch_size: int = 12,
          lr: float = 1e-3, seed: int = 0, eval_every: int = 100, eval_batches: int = 10,
          out: Path | None = DEFAULT_OUT, progress: bool = True, plot: bool = True,
          log=print, **overrides) -> TrainResult:
    """Train a character-level GPT on ``text`` and save it.

    Args:
        text: the corpus; split 90/10 into train/validation with :func:`split_ids`.
        preset: a :data:`attnkit.apps.gpt.model.PRESETS` name; ``overrides`` replace its fields.
        steps: optimizer steps (AdamW, warm-up then cosine decay).
        batch_size: windows of ``max_seq_len`` characters per step.
        lr: peak learning rate.
        seed: seeds the initial weights and the batches: the same arguments give the same
            model (on the same torch build and thread count).
        eval_every: steps between validation estimates (and progress updates).
        eval_batches: batches per validation estimate.
        out: directory for ``gpt.pt`` and ``loss.png``; None writes nothing.
        progress: show a tqdm progress bar on stderr (when tqdm is installed).
        plot: write the loss curve (needs matplotlib).
        log: called with each line of the report.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: bad sizes, or a text too short for one window of training and validation.
        ImportError: ``plot`` without matplotlib.
    """
    if steps < 1 or batch_size < 1 or eval_every < 1 or eval_batches < 1:
        raise ValueError(f"steps, batch_size, eval_every and eval_batches must be >= 1, got "
                         f"{steps}, {batch_size}, {eval_every}, {eval_batches}")
    tokenizer = CharVocab.from_text(text)
    train_ids, val_ids = split_ids(torch.tensor(tokenizer.encode(text), dtype=torch.long))
    config = GPTConfig.preset(preset, tokenizer.vocab_size, **overrides)
    if len(val_ids) < 2:
        raise ValueError(f"the text has {len(text)} characters: too short to hold out "
                         f"validation data")
    torch.manual_seed(seed)
    model = GPT(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    block = min(config.max_seq_len, len(train_ids) - 1)  # short texts train on shorter windows
    baseline = unigram_loss(train_ids, val_ids, tokenizer.vocab_size)
    result = TrainResult(model, tokenizer, unigram_loss=baseline)
    log(f"{len(text):,} characters, vocabulary {tokenizer.vocab_size}, {len(train_ids):,} train "
        f"/ {len(val_ids):,} validation; model {model.num_parameters():,} parameters "
        f"({preset}: {config.num_layers} layers, {config.num_heads} heads, "
        f"{config.embed_dim} dims, context {config.max_seq_len})")
    bar = _progress(steps, progress)
    started = time.perf_counter()
    running = math.nan
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        x, y = get_batch(train_ids, batch_size, block, generator)  # (B, T) each
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Exponential average: a readable train loss without an extra forward pass.
        value = loss.item()
        running = value if math.isnan(running) else 0.9 * running + 0.1 * value
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = _estimate(model, val_ids, eval_batches, batch_size, seed + 1)
            result.history.append((step + 1, running, val))
            if bar is not None:
                bar.set_postfix(train=f"{running:.3f}", val=f"{val:.3f}")
            else:
                log(f"step {step + 1}/{steps}: train {running:.3f}, val {val:.3f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - started
    result.tokens_per_s = steps * batch_size * block / result.seconds
    result.val_loss = _estimate(model, val_ids, 4 * eval_batches, batch_size, seed + 2)
    log(f"trained {steps} steps in {result.seconds:.1f} s ({result.tokens_per_s:,.0f} "
        f"tokens/s, {torch.get_num_threads()} threads)")
    log(f"validation loss {result.val_loss:.3f} nats/char ({result.val_loss / math.log(2):.2f} "
        f"bits); unigram baseline {baseline:.3f} ({baseline / math.log(2):.2f} bits)")
    if out is not None:
        result.files.append(save_checkpoint(
            Path(out) / CHECKPOINT_NAME, model, chars=tokenizer.chars, preset=preset,
            steps=steps, seed=seed, val_loss=result.val_loss, unigram_loss=baseline,
            history=[list(h) for h in result.history]))
        if plot:
            result.files.append(_plot_losses(result, Path(out) / "loss.png"))
        for path in result.files:
            log(f"wrote {path}")
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


class _UsageError(Exception):
    """A mistake in the command line: one line on stderr, exit code 2."""


def _load(args) -> tuple[GPT, CharVocab]:
    path = Path(args.checkpoint)
    try:
        model, metadata = load_checkpoint(path)
    except FileNotFoundError:
        raise _UsageError(f"no checkpoint at {str(path)!r}; train one first with: attnkit gpt "
                          f"train --out {path.parent}") from None
    except (ValueError, RuntimeError, TypeError, KeyError) as err:  # corrupt, foreign, stale
        raise _UsageError(f"cannot load {str(path)!r} as a GPT checkpoint: {err}") from None
    return model, CharVocab(metadata["chars"])


def _encode_prompt(prompt: str, model: GPT, tokenizer: CharVocab) -> torch.Tensor:
    if not prompt:
        raise _UsageError("--prompt is empty; give at least one character")
    missing = tokenizer.unknown(prompt)
    if missing:
        raise _UsageError(f"the prompt has {len(missing)} character(s) the model never saw in "
                          f"training: {', '.join(repr(c) for c in missing)}")
    limit = model.config.max_seq_len
    if len(prompt) > limit:
        raise _UsageError(f"the prompt has {len(prompt)} characters but the model's context "
                          f"is {limit}; shorten it")
    return torch.tensor(tokenizer.encode(prompt), dtype=torch.long)  # (T,)


def _label(char: str) -> str:
    """Tick label for a character: whitespace made visible."""
    return {" ": "␣", "\n": "\\n", "\t": "\\t"}.get(char, char)


def _set_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def _train_command(args) -> int:
    _set_threads(args)
    try:
        text = load_text(args.text)
        overrides = {} if args.context is None else {"max_seq_len": args.context}
        train(text, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
              lr=args.lr, seed=args.seed, eval_every=args.eval_every, out=args.out,
              progress=not args.no_progress, plot=not args.no_plot, **overrides)
    except ValueError as err:
        print(f"attnkit gpt train: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"attnkit gpt train: {err} (or pass --no-plot)", file=sys.stderr)
        return 1
    return 0


def _generate_command(args) -> int:
    _set_threads(args)
    if args.tokens < 0 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        print("attnkit gpt generate: --tokens and --temperature must be >= 0 and --top-k >= 1",
              file=sys.stderr)
        return 2
    try:
        model, tokenizer = _load(args)
        prompt = _encode_prompt(args.prompt, model, tokenizer)
    except _UsageError as err:
        print(f"attnkit gpt generate: {err}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    started = time.perf_counter()
    for token in model.generate_stream(prompt, args.tokens, temperature=args.temperature,
                                       top_k=args.top_k, generator=generator,
                                       use_cache=not args.no_cache):
        sys.stdout.write(tokenizer.decode([token]))
        sys.stdout.flush()  # stream: each character appears as soon as it is sampled
    seconds = time.perf_counter() - started
    print()
    print(f"[{args.tokens} tokens in {seconds:.2f} s, {args.tokens / max(seconds, 1e-9):.0f} "
          f"tokens/s, KV cache {'off' if args.no_cache else 'on'}]", file=sys.stderr)
    return 0


def _attention_command(args) -> int:
    _set_threads(args)
    try:
        model, tokenizer = _load(args)
        prompt = _encode_prompt(args.prompt, model, tokenizer)
    except _UsageError as err:
        print(f"attnkit gpt attention: {err}", file=sys.stderr)
        return 2
    with torch.no_grad():
        _, weights = model(prompt[None], need_weights=True)  # L tensors (1, H, T, T)
    grid = torch.stack([w[0] for w in weights])  # (L, H, T, T)
    try:
        path = viz.save_figure(attention_figure(grid, args.prompt), args.out)
    except ImportError as err:
        print(f"attnkit gpt attention: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


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


def _positive(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _threads_option(parser) -> None:
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="torch threads (default: torch's choice). On a machine busy with "
                             "other work, 1 thread can be several times faster than 2")


def add_parser(subparsers) -> None:
    """Register ``attnkit gpt {train,generate,attention}`` (see :mod:`attnkit.cli`)."""
    parser = subparsers.add_parser(
        "gpt", help="train a character-level GPT, generate text, draw its attention heads",
        description="A small decoder-only GPT built from attnkit.MultiHeadAttention.")
    commands = parser.add_subparsers(title="commands", dest="gpt_command", metavar="COMMAND",
                                     required=True)
    checkpoint = Path(DEFAULT_OUT) / CHECKPOINT_NAME

    tr = commands.add_parser("train", help="train on the Python help text or --text FILE")
    _threads_option(tr)
    tr.add_argument("--text", type=Path, metavar="FILE",
                    help="UTF-8 text to train on (default: the Python help topics, "
                         "pydoc_data.topics, ~465k characters)")
    tr.add_argument("--preset", choices=sorted(PRESETS), default="small")
    tr.add_argument("--steps", type=_positive, default=1500)
    tr.add_argument("--batch-size", type=_positive, default=12)
    tr.add_argument("--context", type=_positive, metavar="T",
                    help="context length (default: the preset's)")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--eval-every", type=_positive, default=100, metavar="STEPS")
    tr.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                    help=f"directory for {CHECKPOINT_NAME} and loss.png (default: {DEFAULT_OUT})")
    tr.add_argument("--no-plot", action="store_true", help="write no loss curve")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train_command)

    for name, help_text, func in (
            ("generate", "stream text continuing --prompt", _generate_command),
            ("attention", "write a layer x head grid of attention maps for --prompt",
             _attention_command)):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--prompt", required=True)
        _threads_option(sub)
        sub.add_argument("--checkpoint", type=Path, default=checkpoint, metavar="FILE",
                         help=f"from attnkit gpt train (default: {checkpoint})")
        sub.set_defaults(func=func)
        if name == "generate":
            sub.add_argument("--tokens", type=int, default=300, metavar="N")
            sub.add_argument("--temperature", type=float, default=0.8,
                             help="0 = greedy (default 0.8)")
            sub.add_argument("--top-k", type=_positive, metavar="K")
            sub.add_argument("--seed", type=int, default=0)
            sub.add_argument("--no-cache", action="store_true",
                             help="recompute the whole context every step (for comparison)")
        else:
            sub.add_argument("--out", type=Path, required=True, metavar="FILE",
                             help="PNG to write")
