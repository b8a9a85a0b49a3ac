"""The date translator: train it, score its alignment, and translate checked answers.

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

Checked translation is :mod:`attnkit.apps.translate.answer`; the command line is
:mod:`attnkit.apps.translate.cli`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_json
from .._progress import Progress
from .._training import ResumableRun, check_replace
from .._vocab import CharVocab
from . import dates
from .model import TransformerConfig, TransformerSeq2Seq, count_parameters

__all__ = ["TrainConfig", "SOURCE_VOCAB", "TARGET_VOCAB", "train", "evaluate", "load_translator",
           "alignment_figure", "plot_alignment", "save_translator", "alignment_scores", "existing_score"]

SOURCE_VOCAB = CharVocab(string.ascii_lowercase + string.digits + " ,./-", padding=True)
TARGET_VOCAB = CharVocab(string.digits + "-", specials=("<bos>",), padding=True)
MAX_SOURCE_LEN = 40
CHECKPOINT_NAME = "checkpoint.pt"
# Output positions of each field's digits in "YYYY-MM-DD".
FIELD_POSITIONS = {"year": (0, 1, 2, 3), "month": (5, 6), "day": (8, 9)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings (model sizes live in :class:`TransformerConfig`).

    Raises:
        ValueError: non-positive ``steps``, ``batch_size``, ``lr`` or ``eval_size``.
    """

    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    warmup: int = 60
    seed: int = 0
    eval_size: int = 2000

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


def alignment_figure(model: TransformerSeq2Seq, source: str):
    """The cross-attention figure of one input, as a matplotlib Figure: one panel per decoder
    layer and head, plus each layer's head average. In each panel the source characters run
    along x and the 10 output characters down y, in square cells, so a panel is as wide as
    the source is long. Long sources (wide panels) stack the heads down the figure with one
    column per layer; short ones put the heads across with one row per layer: whichever
    figure is closer to a screen's shape.

    Raises:
        ValueError: characters outside the vocabulary, or a source too long.
        ImportError: matplotlib is missing.
    """
    from ...viz import grid_figure

    text = source.lower()
    tokens, _, weights = model.greedy_decode(SOURCE_VOCAB.batch([text]), need_weights=True)
    weights = weights[:, 0]  # (layers, H, 10, S)
    layers, heads, steps, length = weights.shape
    panels = [list(weights[layer]) + [weights[layer].mean(0)] for layer in range(layers)]
    titles = [[f"decoder layer {layer}, " + (f"head {h}" if h < heads else "head average")
               for h in range(heads + 1)] for layer in range(layers)]
    across = (heads + 1) * length / (layers * steps)  # width / height, heads across
    down = layers * length / ((heads + 1) * steps)  # width / height, heads down
    if abs(math.log(down / 1.6)) < abs(math.log(across / 1.6)):
        # rows: heads, columns: layers
        panels, titles = ([list(column) for column in zip(*grid)] for grid in (panels, titles))
    output = TARGET_VOCAB.decode(tokens[0].tolist())
    # One label per output step; a special token (an untrained model's) shows as "·".
    characters = [TARGET_VOCAB.decode([t]) or "\u00b7" for t in tokens[0].tolist()]
    return grid_figure(panels, [c if c != " " else "\u2423" for c in text], characters,
                       title=f"cross-attention: {source!r} -> {output} (bright: the source "
                             f"characters each output character reads)",
                       annotate=False, cmap="gray",
                       panel_titles=titles, x_name="source", y_name="output",
                       max_size=(18.0, 20.0))


def plot_alignment(model: TransformerSeq2Seq, source: str, path) -> Path:
    """Write :func:`alignment_figure` of ``source`` to ``path`` (atomically).

    Raises:
        ValueError: characters outside the vocabulary, or a source too long.
        ImportError: matplotlib is missing.
    """
    from ...viz import save_figure

    return save_figure(alignment_figure(model, source), path)


def train(out_dir="out/translate", config: TrainConfig = TrainConfig(),
          model_config: TransformerConfig | None = None, *, progress: bool = True,
          figures: int = 4, resume: bool = False, force: bool = False,
          checkpoint_every: int = 100) -> dict:
    """Train the translator, evaluate on held-out dates and write every output atomically.

    Every ``checkpoint_every`` steps the whole training state goes to ``out_dir/resume.pt``;
    Ctrl-C keeps the last one and ``resume=True`` continues from it, exactly as if the run had
    not stopped. A finished run replaces an existing ``checkpoint.pt`` only when its held-out
    exact match is at least as good, or with ``force``.

    Args:
        out_dir: destination directory.
        config: training settings.
        model_config: model sizes; default :class:`TransformerConfig` for these vocabularies.
        progress: show progress (a bar on a terminal, periodic lines elsewhere).
        figures: how many held-out alignment figures to write (needs matplotlib if > 0).
        resume: continue the run saved in ``out_dir/resume.pt``.
        force: replace an existing better model.
        checkpoint_every: steps between saves of the training state.

    Returns:
        The metrics dict also written to ``metrics.json``, plus ``saved`` (whether
        ``checkpoint.pt`` was written).

    Raises:
        ImportError: ``figures > 0`` without matplotlib (before training).
        attnkit.apps._cli.UsageError: ``resume`` without a matching saved run.
        attnkit.apps._cli.Interrupted: Ctrl-C (the last saved state is kept).
    """
    if figures > 0:
        from ...viz import require_matplotlib

        require_matplotlib()  # fail before training, not after it
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    train_dates, heldout_dates = dates.split_dates(config.eval_size, seed=0)
    model_config = model_config or TransformerConfig(len(SOURCE_VOCAB), len(TARGET_VOCAB),
                                                     max_src_len=MAX_SOURCE_LEN)
    model = TransformerSeq2Seq(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    # Linear warm-up, then cosine decay to zero: the last steps polish the rare formats.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / config.warmup, 0.5 * (1 + math.cos(math.pi * s / config.steps))))
    run = ResumableRun(out_dir, kind="translator",
                       settings={"train": dataclasses.asdict(config),
                                 "model": dataclasses.asdict(model_config)},
                       objects={"model": model, "optimizer": optimizer, "schedule": schedule},
                       rngs={"batches": rng, "torch": None}, every=checkpoint_every,
                       command=f"attnkit translate train --out {out_dir}")
    start, seconds = 0, 0.0
    if resume:
        start, saved = run.load()
        seconds = saved.get("train_seconds", 0.0)
    bar = Progress(config.steps, "translate train", enabled=progress, initial=start)
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
    metrics["saved"] = check_replace(checkpoint, metrics["exact_match"],
                                     existing_score(out_dir), name="held-out exact match",
                                     higher_is_better=True, force=force)
    if metrics["saved"]:
        save_translator(model, out_dir, config,
                        metrics={k: metrics[k] for k in ("exact_match", "char_accuracy")})
        write_json(out_dir / "metrics.json", metrics)
        # Four different formats, so the figures show different alignments.
        shown, seen = [], set()
        for pair in heldout:
            if len(shown) < figures and pair.format_index not in seen:
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
             "train": None if config is None else dataclasses.asdict(config),
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
