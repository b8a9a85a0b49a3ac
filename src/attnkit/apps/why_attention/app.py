"""``attnkit why-attention``: the tutorial's long-sequence argument, measured.

An RNN encoder-decoder must squeeze the whole input into its final hidden state; with
attention the decoder looks back at every encoder state. Two GRU encoder-decoders
(:class:`~attnkit.apps.why_attention.model.GRUSeq2Seq`) learn to reverse random digit strings of length 5-40:

* without attention, with a wider GRU so that both have the same parameter count (within
  10%);
* with an attnkit :class:`~attnkit.MultiHeadAttention` cross-attention from each decoder
  state to the encoder states.

Both train in lockstep on the same batches for the same number of steps. The result is a table and one PNG in
the style of Bahdanau et al. Fig. 2 (accuracy against input length) beside the alignment map
of one long example (a clean anti-diagonal when attention has learned to reverse), plus
``results.json``. Decoding runs for exactly as many steps as the input is long, so length is
never what a model gets wrong.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import write_json
from .._cli import (HelpFormatter, UsageError, add_common_options, apply_threads,
                    check_out_dir, check_plotting, positive_int)
from .._progress import Progress
from .._training import ResumableRun
from ..translate.model import count_parameters
from .model import GRUSeq2Seq

__all__ = ["WhyConfig", "make_batch", "matched_models", "run", "comparison_figure", "format_table",
           "add_parser"]

VOCAB_SIZE = 12  # 0 padding, 1 start, 2..11 the digits 0..9
_DIGIT = 2


@dataclasses.dataclass(frozen=True)
class WhyConfig:
    """Settings of the comparison.

    Raises:
        ValueError: non-positive sizes, or ``min_len > max_len``.
    """

    steps: int = 1200
    batch_size: int = 64
    hidden_size: int = 64
    lr: float = 3e-3
    min_len: int = 5
    max_len: int = 40
    eval_per_length: int = 100
    seed: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.name != "seed" and not getattr(self, field.name) > 0:
                raise ValueError(f"{field.name} must be positive, got "
                                 f"{getattr(self, field.name)!r}")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must not exceed max_len ({self.max_len})")


def make_batch(lengths: list[int], generator: torch.Generator):
    """Random digit strings and their reversals.

    Args:
        lengths: one length per example.
        generator: the random source.

    Returns:
        ``(src (B, S), tgt_in (B, S), tgt (B, S))``, right-padded with 0; ``tgt_in`` is the
        reversal shifted right behind the start token 1 (teacher forcing).
    """
    B, S = len(lengths), max(lengths)
    src = torch.randint(_DIGIT, VOCAB_SIZE, (B, S), generator=generator)
    real = torch.arange(S)[None] < torch.tensor(lengths)[:, None]  # (B, S)
    src = src * real
    tgt = torch.zeros_like(src)
    for b, n in enumerate(lengths):
        tgt[b, :n] = src[b, :n].flip(0)
    tgt_in = torch.cat([torch.ones(B, 1, dtype=torch.long), tgt[:, :-1]], dim=1)  # (B, S)
    return src, tgt_in, tgt


def matched_models(hidden_size: int) -> tuple[GRUSeq2Seq, GRUSeq2Seq]:
    """``(without, with_attention)``: the plain model is widened to the closest parameter count.

    Raises:
        RuntimeError: no width within 10% of the attention model's count (never for
            positive widths, kept as a guard).
    """
    with_attention = GRUSeq2Seq(VOCAB_SIZE, hidden_size, attention=True)
    target = count_parameters(with_attention)
    best = min(range(hidden_size, 4 * hidden_size),
               key=lambda h: abs(count_parameters(GRUSeq2Seq(VOCAB_SIZE, h)) - target))
    without = GRUSeq2Seq(VOCAB_SIZE, best)
    if abs(count_parameters(without) - target) > 0.1 * target:
        raise RuntimeError(f"no plain GRU width matches {target} parameters within 10%")
    return without, with_attention


def _train_step(models: dict, optimizers: dict, batch, seconds: dict) -> dict:
    """One step of every model on the same batch; returns each model's loss."""
    src, tgt_in, tgt = batch
    losses = {}
    for name, model in models.items():
        started = time.perf_counter()
        logits = model(src, tgt_in)  # (B, S, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=0)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        # RNN gradients spike on long inputs; clipping keeps both models' runs stable.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizers[name].step()
        seconds[name] += time.perf_counter() - started
        losses[name] = loss.item()
    return losses


def _evaluate(model, config: WhyConfig) -> dict:
    """Char accuracy and exact match per input length on fresh strings."""
    generator = torch.Generator().manual_seed(10_000 + config.seed)
    model.eval()
    table = {}
    for n in range(config.min_len, config.max_len + 1):
        src, _, tgt = make_batch([n] * config.eval_per_length, generator)
        out = model.greedy_decode(src, n)  # (B, n)
        correct = out == tgt
        table[n] = {"char_accuracy": correct.float().mean().item(),
                    "exact_match": correct.all(1).float().mean().item()}
    return table


def comparison_figure(results: dict, weights, source: str, output: str):
    """Accuracy against input length for both models, beside the alignment of one example.

    Args:
        results: as :func:`run` returns (``config``, and per model ``parameters`` and
            ``by_length``).
        weights: the attention model's head-averaged cross-attention ``(n, n)`` for one input
            of ``n`` digits (rows: output positions, columns: source positions).
        source, output: the input digits and the model's output.

    Returns:
        A matplotlib Figure.

    Raises:
        ImportError: matplotlib is missing.
    """
    from ...viz import COLORBAR_LABEL, draw_heatmap, new_figure, wrap

    fig, axes = new_figure(1, 2, panel_size=(6.5, 6.0))
    ax = axes[0, 0]
    for name, style in (("without_attention", "o--"), ("with_attention", "s-")):
        lengths = sorted(int(n) for n in results[name]["by_length"])
        ax.plot(lengths, [results[name]["by_length"][n]["char_accuracy"] for n in lengths],
                style, markersize=3, label=f"{name.replace('_', ' ')} "
                                           f"({results[name]['parameters']:,} params)")
    ax.set_xlabel("input length (digits)")
    ax.set_ylabel("held-out character accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(wrap(f"reversing digit strings, {results['config']['steps']} training steps "
                      f"per model, same batches", 6.0, 11), fontsize=11)
    n = len(source)
    image = draw_heatmap(
        axes[0, 1], weights, list(source), list(output),
        wrap(f"With attention: where each output digit looks. Reversing means output "
             f"position i reads source position n-1-i (here n = {n}), so a learned alignment "
             f"is the anti-diagonal, top right to bottom left.", 5.5, 10),
        annotate=False, cmap="gray", x_name="source digit", y_name="output digit")
    fig.colorbar(image, ax=axes[0, 1], shrink=0.8, label=f"{COLORBAR_LABEL} (mean of heads)")
    return fig


def _figure(results: dict, weights, source: str, output: str, path) -> Path:
    from ...viz import save_figure

    return save_figure(comparison_figure(results, weights, source, output), path)


def run(out_dir="out/why_attention", config: WhyConfig = WhyConfig(), *,
        progress: bool = True, plots: bool = True, resume: bool = False,
        checkpoint_every: int = 200) -> dict:
    """Train both models, evaluate per length, write ``why_attention.png`` and ``results.json``.

    Both models train in lockstep on the same batches. Every ``checkpoint_every`` steps the
    state of both goes to ``out_dir/resume.pt``; Ctrl-C keeps the last one and
    ``resume=True`` continues from it exactly.

    Returns:
        ``{"config", "without_attention", "with_attention", "table"}``; each model entry has
        ``parameters``, ``hidden_size``, ``train_seconds`` and ``by_length``.

    Raises:
        ImportError: ``plots`` without matplotlib (before training).
        attnkit.apps._cli.UsageError: ``resume`` without a matching saved run.
        attnkit.apps._cli.Interrupted: Ctrl-C (the last saved state is kept).
    """
    if plots:
        from ...viz import require_matplotlib

        require_matplotlib()  # fail before training, not after it
    torch.manual_seed(config.seed)
    without, with_attention = matched_models(config.hidden_size)
    models = {"without_attention": without, "with_attention": with_attention}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=config.lr)
                  for name, m in models.items()}
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    run_state = ResumableRun(
        out_dir, kind="why-attention", settings=dataclasses.asdict(config),
        objects={**models, **{f"{name}_optimizer": o for name, o in optimizers.items()}},
        rngs={"lengths": rng, "digits": generator}, every=checkpoint_every,
        command=f"attnkit why-attention --out {out_dir}")
    start, seconds = 0, {name: 0.0 for name in models}
    if resume:
        start, saved = run_state.load()
        seconds.update(saved.get("seconds", {}))
    for model in models.values():
        model.train()

    def step_fn(step: int) -> None:
        lengths = [rng.randint(config.min_len, config.max_len) for _ in range(config.batch_size)]
        losses = _train_step(models, optimizers, make_batch(lengths, generator), seconds)
        bar.update(**{f"loss {name.split('_')[0]}": v for name, v in losses.items()})

    with Progress(config.steps, "why-attention", enabled=progress, initial=start) as bar:
        run_state.loop(start, config.steps, step_fn, extra=lambda: {"seconds": dict(seconds)})
    results = {"config": dataclasses.asdict(config)}
    for name, model in models.items():
        results[name] = {"parameters": count_parameters(model),
                         "hidden_size": model.decoder.hidden_size,
                         "train_seconds": round(seconds[name], 1),
                         "by_length": _evaluate(model, config)}
    rows = []
    for n in range(config.min_len, config.max_len + 1, 5):
        rows.append([n] + [results[m]["by_length"][n][k]
                           for m in ("without_attention", "with_attention")
                           for k in ("char_accuracy", "exact_match")])
    results["table"] = rows
    out_dir = Path(out_dir)
    write_json(out_dir / "results.json", results)
    if plots:
        src, _, _ = make_batch([config.max_len], torch.Generator().manual_seed(config.seed))
        tokens, weights = with_attention.greedy_decode(src, config.max_len, need_weights=True)
        digits = lambda ids: "".join(str(i - _DIGIT) for i in ids)  # noqa: E731
        _figure(results, weights[0].mean(0), digits(src[0].tolist()),
                digits(tokens[0].tolist()), out_dir / "why_attention.png")
    run_state.finish()
    return results


def format_table(results: dict) -> str:
    """The comparison as a text table (char accuracy / exact match per length)."""
    head = (f"{'length':>6} | {'no attention: char':>18} {'exact':>6} | "
            f"{'attention: char':>15} {'exact':>6}")
    lines = [head, "-" * len(head)]
    for n, c0, e0, c1, e1 in results["table"]:
        lines.append(f"{n:>6} | {c0:>18.1%} {e0:>6.1%} | {c1:>15.1%} {e1:>6.1%}")
    for name in ("without_attention", "with_attention"):
        r = results[name]
        lines.append(f"{name}: {r['parameters']:,} parameters (hidden {r['hidden_size']}), "
                     f"{r['train_seconds']:.0f} s training")
    return "\n".join(lines)


def _run(args) -> int:
    try:
        config = WhyConfig(steps=args.steps, seed=args.seed, hidden_size=args.hidden_size,
                           max_len=args.max_len, eval_per_length=args.eval_per_length)
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = check_out_dir(args.out)
    check_plotting(not args.no_plots)
    apply_threads(args)
    results = run(out, config, progress=not args.quiet, plots=not args.no_plots,
                  resume=args.resume, checkpoint_every=args.checkpoint_every)
    print(format_table(results))
    written = "why_attention.png and results.json" if not args.no_plots else "results.json"
    print(f"wrote {written} in {out}")
    return 0


def add_parser(subparsers) -> None:
    """Add ``why-attention`` to the CLI."""
    parser = subparsers.add_parser(
        "why-attention", help="GRU encoder-decoder with vs without attention on long inputs",
        formatter_class=HelpFormatter,
        description="Two GRU encoder-decoders of equal size learn to reverse digit strings of\n"
                    "5 to --max-len digits, one with attention and one without; the table and\n"
                    "figure show accuracy against input length, and the attention model's\n"
                    "alignment (reversal reads the source back to front: an anti-diagonal).")
    add_common_options(parser, out="out/why_attention", plots=True)
    parser.add_argument("--steps", type=positive_int, default=WhyConfig.steps,
                        help="training steps (both models train on the same batches)")
    parser.add_argument("--hidden-size", type=positive_int, default=WhyConfig.hidden_size,
                        help="GRU width of the attention model")
    parser.add_argument("--max-len", type=positive_int, default=WhyConfig.max_len,
                        help="longest input (inputs are 5 to this many digits)")
    parser.add_argument("--eval-per-length", type=positive_int,
                        default=WhyConfig.eval_per_length,
                        help="held-out strings per input length")
    parser.add_argument("--checkpoint-every", type=positive_int, default=200, metavar="STEPS",
                        help="steps between saves of the training state")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run saved in --out")
    parser.set_defaults(func=_run)
