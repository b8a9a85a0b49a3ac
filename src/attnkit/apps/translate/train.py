"""The date translator's training: ``train(config) -> metrics``, evaluation, saving, loading.

:func:`train` trains a :class:`~attnkit.apps.translate.model.TransformerSeq2Seq` on generated
date pairs (:mod:`attnkit.apps.translate.dates`) and writes to ``out_dir`` (default
``out/translate/``), every file atomically:

* ``checkpoint.pt`` - weights and config (:mod:`attnkit.apps.checkpoint`);
* ``resume.pt`` - the whole training state, every ``checkpoint_every`` steps while training
  (removed when the run finishes);
* ``metrics.json`` - held-out exact match and character accuracy on 2,000 dates never seen in
  training, per-format exact match, and the alignment score per field and decoder layer;
* ``alignment_1.png`` .. ``alignment_4.png`` - cross-attention of four held-out examples in the
  style of Bahdanau et al. Fig. 3 (source characters on x, output characters on y), one row
  per decoder layer, one panel per head plus the head average.

The alignment score of a field is the share of output digits of that field (year, month,
day) whose strongest source position, in the head-averaged cross-attention, lies inside the
field's span in the source.

Nothing here prints: report lines go to ``config.run.log``. Checked translation is
:mod:`.answer`, the figures :mod:`.figures`, the command line :mod:`.cli`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_json
from .._progress import Progress
from .._training import ResumableRun, RunOptions, check_replace
from . import dates
from .figures import plot_alignment
from .model import (MAX_SOURCE_LEN, SOURCE_VOCAB, TARGET_VOCAB, TransformerConfig,
                    TransformerSeq2Seq, count_parameters)

__all__ = ["TrainConfig", "NUM_FIGURES", "CHECKPOINT_NAME", "SOURCE_VOCAB", "TARGET_VOCAB",
           "train", "evaluate", "load_translator", "save_translator", "alignment_scores",
           "existing_score"]

CHECKPOINT_NAME = "checkpoint.pt"
# Output positions of each field's digits in "YYYY-MM-DD".
FIELD_POSITIONS = {"year": (0, 1, 2, 3), "month": (5, 6), "day": (8, 9)}


NUM_FIGURES = 4  # held-out alignment figures a run writes (four different formats)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings; ``model`` holds the sizes (default: :class:`TransformerConfig` for
    these vocabularies) and ``run`` how the run is carried out (:class:`RunOptions`; its
    ``checkpoint_every`` defaults to 100 steps here).

    Raises:
        ValueError: non-positive ``steps``, ``batch_size``, ``lr`` or ``eval_size``.
    """

    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    warmup: int = 60
    seed: int = 0
    eval_size: int = 2000
    model: TransformerConfig | None = None
    run: RunOptions = RunOptions(out=Path("out/translate"))

    def settings(self) -> dict:
        """What the run learns from: every field but ``model`` and ``run`` (saved with the
        checkpoint and compared when resuming)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("model", "run")}

    def __post_init__(self):
        for name in ("steps", "batch_size", "lr", "eval_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def _batch(pairs: list[dates.DatePair]) -> tuple[torch.Tensor, torch.Tensor]:
    src = SOURCE_VOCAB.batch([p.source.lower() for p in pairs])  # (B, S)
    tgt = TARGET_VOCAB.batch([p.target for p in pairs])  # (B, 10)
    bos = torch.full((len(pairs), 1), TARGET_VOCAB.special("<bos>"), dtype=torch.long)
    return src, torch.cat([bos, tgt], dim=1)  # (B, 11): input is [:, :-1], labels [:, 1:]


def alignment_scores(weights: torch.Tensor, pairs: list[dates.DatePair]) -> dict:
    """Per field, the share of output digits whose strongest source position is in the field.

    Args:
        weights: head-averaged cross-attention ``(B, 10, S)`` of one decoder layer.
        pairs: the ``B`` examples, with field spans.

    Returns:
        ``{"year": share, "month": share, "day": share}``.
    """
    strongest = weights.argmax(-1)  # (B, 10): source position per output character
    scores = {}
    for field, positions in FIELD_POSITIONS.items():
        hits = [p.spans[field][0] <= int(strongest[b, i]) < p.spans[field][1]
                for b, p in enumerate(pairs) for i in positions]
        scores[field] = sum(hits) / len(hits)
    return scores


def evaluate(model: TransformerSeq2Seq, pairs: list[dates.DatePair], batch_size: int = 500):
    """Greedy-decode ``pairs`` (with the KV cache) and score them.

    Returns:
        A dict: ``exact_match``, ``char_accuracy``, ``exact_match_by_format``,
        ``alignment`` (per decoder layer, per field), ``errors`` (up to 10 examples).
    """
    model.eval()
    exact, chars, errors, by_format = 0, 0, [], {}
    layers = model.config.num_decoder_layers
    hits = [{f: [] for f in FIELD_POSITIONS} for _ in range(layers)]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        src, tgt = _batch(chunk)
        tokens, _, weights = model.greedy_decode(src, need_weights=True)  # weights (L, B, H, T, S)
        chars += int((tokens == tgt[:, 1:]).sum())
        for layer in range(layers):
            for field, share in alignment_scores(weights[layer].mean(1), chunk).items():
                hits[layer][field].append(share * len(chunk))
        for pair, row in zip(chunk, tokens.tolist()):
            ok = TARGET_VOCAB.decode(row) == pair.target
            exact += ok
            fmt = dates.FORMATS[pair.format_index].template
            by_format.setdefault(fmt, []).append(ok)
            if not ok and len(errors) < 10:
                errors.append({"source": pair.source, "target": pair.target,
                               "output": TARGET_VOCAB.decode(row)})
    n = len(pairs)
    return {"exact_match": exact / n, "char_accuracy": chars / (n * 10),
            "exact_match_by_format": {k: sum(v) / len(v) for k, v in by_format.items()},
            "alignment": {f"decoder_layer_{i}": {f: sum(v) / n for f, v in h.items()}
                          for i, h in enumerate(hits)},
            "errors": errors, "num_examples": n}


def train(config: TrainConfig = TrainConfig()) -> dict:
    """Train the translator, evaluate on held-out dates and write every output atomically.

    Every ``config.run.checkpoint_every`` steps (default 100) the whole training state goes to
    ``out/resume.pt``; Ctrl-C keeps the last one and ``run.resume`` continues from it,
    exactly as if the run had not stopped. A finished run replaces an existing
    ``checkpoint.pt`` only when its held-out exact match is at least as good, or with
    ``run.force``; otherwise the reason is reported through ``run.log``. ``run.figures``
    writes :data:`NUM_FIGURES` held-out alignment figures.

    Args:
        config: what to learn, the model's sizes and how to run (:class:`TrainConfig`).

    Returns:
        The metrics dict also written to ``metrics.json``, plus ``saved`` (whether
        ``checkpoint.pt`` was written).

    Raises:
        ValueError: ``config.run.out`` is None (the translator is always saved).
        ImportError: ``run.figures`` without matplotlib (before training).
        attnkit.apps._training.ResumeError: ``run.resume`` without a matching saved run.
        attnkit.apps._cli.Interrupted: Ctrl-C (the last saved state is kept).
    """
    options = config.run
    if options.out is None:
        raise ValueError("config.run.out is None; the translator's training needs an output "
                         "folder")
    if options.figures:
        from ...viz import require_matplotlib

        require_matplotlib()  # fail before training, not after it
    out_dir = options.out
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    train_dates, heldout_dates = dates.split_dates(config.eval_size, seed=0)
    model_config = config.model or TransformerConfig(len(SOURCE_VOCAB), len(TARGET_VOCAB),
                                                     max_src_len=MAX_SOURCE_LEN)
    model = TransformerSeq2Seq(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    # Linear warm-up, then cosine decay to zero: the last steps polish the rare formats.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / config.warmup, 0.5 * (1 + math.cos(math.pi * s / config.steps))))
    run = ResumableRun(out_dir, kind="translator",
                       settings={"train": config.settings(),
                                 "model": dataclasses.asdict(model_config)},
                       objects={"model": model, "optimizer": optimizer, "schedule": schedule},
                       rngs={"batches": rng, "torch": None},
                       every=options.checkpoint_every or 100,
                       command=f"attnkit translate train --out {out_dir}")
    start, seconds = 0, 0.0
    if options.resume:
        start, saved = run.load()
        seconds = saved.get("train_seconds", 0.0)
    bar = Progress(config.steps, "translate train", enabled=options.progress, initial=start)
    model.train()
    last_loss = [math.nan]

    def step_fn(step: int) -> None:
        src, tgt = _batch(dates.sample_pairs(train_dates, config.batch_size, rng))
        logits = model(src, tgt[:, :-1])  # (B, 10, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        last_loss[0] = loss.item()
        bar.update(loss=last_loss[0])

    started = time.perf_counter()
    elapsed = lambda: seconds + time.perf_counter() - started  # noqa: E731
    with bar:
        run.loop(start, config.steps, step_fn, extra=lambda: {"train_seconds": elapsed()})
    train_seconds = elapsed()

    heldout = dates.sample_pairs(heldout_dates, config.eval_size, random.Random(1))
    metrics = evaluate(model, heldout)
    metrics.update(train_seconds=round(train_seconds, 1), steps=config.steps,
                   seed=config.seed, parameters=count_parameters(model),
                   threads=torch.get_num_threads(), final_loss=round(last_loss[0], 4))
    checkpoint = out_dir / CHECKPOINT_NAME
    kept = check_replace(checkpoint, metrics["exact_match"], existing_score(out_dir),
                         name="held-out exact match", higher_is_better=True,
                         force=options.force)
    metrics["saved"] = kept is None
    if kept:
        options.log(kept)
    if metrics["saved"]:
        save_translator(model, out_dir, config,
                        metrics={k: metrics[k] for k in ("exact_match", "char_accuracy")})
        write_json(out_dir / "metrics.json", metrics)
        # Four different formats, so the figures show different alignments.
        shown, seen = [], set()
        for pair in heldout:
            if len(shown) < NUM_FIGURES * options.figures and pair.format_index not in seen:
                shown.append(pair)
                seen.add(pair.format_index)
        for i, pair in enumerate(shown, 1):
            plot_alignment(model, pair.source, out_dir / f"alignment_{i}.png")
    run.finish()
    return metrics


def existing_score(out_dir) -> float | None:
    """Held-out exact match of the model saved in ``out_dir``; None if none loads."""
    try:
        payload = load_checkpoint(Path(out_dir) / CHECKPOINT_NAME, kind="translator")
    except (FileNotFoundError, CheckpointError):
        return None
    return payload.get("metrics", {}).get("exact_match")


def save_translator(model: TransformerSeq2Seq, out_dir, config: TrainConfig | None = None,
                    **extra) -> Path:
    """Save ``model`` with its sizes, vocabularies and training settings to ``out_dir``.

    Returns:
        The checkpoint path (``out_dir/checkpoint.pt``), written atomically.
    """
    setup = {"model": dataclasses.asdict(model.config),
             "train": None if config is None else config.settings(),
             "source_chars": SOURCE_VOCAB.chars, "target_chars": TARGET_VOCAB.chars}
    return save_checkpoint(Path(out_dir) / CHECKPOINT_NAME, model.state_dict(), setup,
                           kind="translator", **extra)


def load_translator(out_dir="out/translate") -> TransformerSeq2Seq:
    """The model saved by :func:`train` in ``out_dir``.

    Raises:
        FileNotFoundError: no checkpoint yet.
        CheckpointError: a corrupt checkpoint or one of another kind or vocabulary.
    """
    payload = load_checkpoint(Path(out_dir) / CHECKPOINT_NAME, kind="translator")
    config = payload["config"]
    if config.get("source_chars") != SOURCE_VOCAB.chars or \
            config.get("target_chars") != TARGET_VOCAB.chars:
        raise CheckpointError(f"checkpoint in {out_dir} uses another vocabulary; train again")
    try:
        model = TransformerSeq2Seq(TransformerConfig(**config["model"]))
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint in {out_dir} does not fit the translator model "
                              f"({type(err).__name__}); train again") from err
    return model.eval()
