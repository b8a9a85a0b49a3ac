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
``results.json``. This module is the experiment (``train(config) -> results``); the figure is
:mod:`.figures`, the command :mod:`.cli`. Decoding runs for exactly as many steps as the input is long, so length is
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
from .._progress import Progress
from .._training import ResumableRun, RunOptions
from ..translate.model import count_parameters
from .model import GRUSeq2Seq

__all__ = ["WhyConfig", "make_batch", "matched_models", "train", "format_table"]

VOCAB_SIZE = 12  # 0 padding, 1 start, 2..11 the digits 0..9
_DIGIT = 2


@dataclasses.dataclass(frozen=True)
class WhyConfig:
    """Settings of the comparison; ``run`` says how it is carried out (:class:`RunOptions`;
    its ``checkpoint_every`` defaults to 200 steps here).

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
    run: RunOptions = RunOptions(out=Path("out/why_attention"))

    def settings(self) -> dict:
        """What the run learns from: every field but ``run`` (compared when resuming)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "run"}

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.name not in ("seed", "run") and not getattr(self, field.name) > 0:
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


def train(config: WhyConfig = WhyConfig()) -> dict:
    """Train both models, evaluate per length, write ``results.json`` and (with
    ``config.run.figures``) ``why_attention.png`` to ``config.run.out``.

    Both models train in lockstep on the same batches. Every ``run.checkpoint_every`` steps
    (default 200) the state of both goes to ``out/resume.pt``; Ctrl-C keeps the last one and
    ``run.resume`` continues from it exactly.

    Returns:
        ``{"config", "without_attention", "with_attention", "table"}``; each model entry has
        ``parameters``, ``hidden_size``, ``train_seconds`` and ``by_length``.

    Raises:
        ValueError: ``config.run.out`` is None.
        ImportError: ``run.figures`` without matplotlib (before training).
        attnkit.apps._training.ResumeError: ``run.resume`` without a matching saved run.
        attnkit.apps._cli.Interrupted: Ctrl-C (the last saved state is kept).
    """
    options = config.run
    if options.out is None:
        raise ValueError("config.run.out is None; the comparison needs an output folder")
    if options.figures:
        from ...viz import require_matplotlib

        require_matplotlib()  # fail before training, not after it
    out_dir = options.out
    torch.manual_seed(config.seed)
    without, with_attention = matched_models(config.hidden_size)
    models = {"without_attention": without, "with_attention": with_attention}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=config.lr)
                  for name, m in models.items()}
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    run_state = ResumableRun(
        out_dir, kind="why-attention", settings=config.settings(),
        objects={**models, **{f"{name}_optimizer": o for name, o in optimizers.items()}},
        rngs={"lengths": rng, "digits": generator}, every=options.checkpoint_every or 200,
        command=f"attnkit why-attention --out {out_dir}")
    start, seconds = 0, {name: 0.0 for name in models}
    if options.resume:
        start, saved = run_state.load()
        seconds.update(saved.get("seconds", {}))
    for model in models.values():
        model.train()

    def step_fn(step: int) -> None:
        lengths = [rng.randint(config.min_len, config.max_len) for _ in range(config.batch_size)]
        losses = _train_step(models, optimizers, make_batch(lengths, generator), seconds)
        bar.update(**{f"loss {name.split('_')[0]}": v for name, v in losses.items()})

    with Progress(config.steps, "why-attention", enabled=options.progress,
                  initial=start) as bar:
        run_state.loop(start, config.steps, step_fn, extra=lambda: {"seconds": dict(seconds)})
    results = {"config": config.settings()}
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
    write_json(out_dir / "results.json", results)
    if options.figures:
        from ...viz import save_figure
        from .figures import comparison_figure

        src, _, _ = make_batch([config.max_len], torch.Generator().manual_seed(config.seed))
        tokens, weights = with_attention.greedy_decode(src, config.max_len, need_weights=True)
        digits = lambda ids: "".join(str(i - _DIGIT) for i in ids)  # noqa: E731
        figure = comparison_figure(results, weights[0].mean(0), digits(src[0].tolist()),
                                   digits(tokens[0].tolist()))
        save_figure(figure, out_dir / "why_attention.png")
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
