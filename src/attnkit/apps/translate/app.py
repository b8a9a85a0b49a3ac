"""The date translator: train it, score its alignment, and translate from the command line.

``attnkit translate train`` trains a :class:`~attnkit.apps.translate.model.TransformerSeq2Seq` on generated
date pairs (:mod:`attnkit.apps.translate.dates`) and writes to ``--out`` (default ``out/translate/``),
every file atomically:

* ``checkpoint.pt`` - weights and config (:mod:`attnkit.checkpoint`);
* ``metrics.json`` - held-out exact match and character accuracy on 2,000 dates never seen in
  training, per-format exact match, and the alignment score per field and decoder layer;
* ``alignment_1.png`` .. ``alignment_4.png`` - cross-attention of four held-out examples in the
  style of Bahdanau et al. Fig. 3 (source characters on x, output characters on y), one row
  per decoder layer, one panel per head plus the head average.

The alignment score of a field is the share of output digits of that field (year, month,
day) whose strongest source position, in the head-averaged cross-attention, lies inside the
field's span in the source.

``attnkit translate "thursday june 25 2009" [--plot FILE]`` prints ``2009-06-25``. Input is
lower-cased first (the model's vocabulary is lower case); bad input exits with code 2 and a
one-line message.
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_json
from .._vocab import CharVocab
from . import dates
from .model import TransformerConfig, TransformerSeq2Seq, count_parameters

__all__ = ["TrainConfig", "SOURCE_VOCAB", "TARGET_VOCAB", "train", "evaluate", "load_translator",
           "translate", "alignment_figure", "plot_alignment", "save_translator",
           "alignment_scores", "add_parser"]

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


def _progress(total: int, enabled: bool):
    """A tqdm bar, or None when disabled or tqdm is missing (training needs no tqdm)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="translate train", unit="step", dynamic_ncols=True)


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
          figures: int = 4) -> dict:
    """Train the translator, evaluate on held-out dates and write every output atomically.

    Args:
        out_dir: destination directory.
        config: training settings.
        model_config: model sizes; default :class:`TransformerConfig` for these vocabularies.
        progress: show a tqdm bar (if tqdm is installed).
        figures: how many held-out alignment figures to write (needs matplotlib if > 0).

    Returns:
        The metrics dict also written to ``metrics.json``.
    """
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
    bar, started = _progress(config.steps, progress), time.perf_counter()
    model.train()
    for step in range(config.steps):
        src, tgt = _batch(dates.sample_pairs(train_dates, config.batch_size, rng))
        logits = model(src, tgt[:, :-1])  # (B, 10, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if bar is not None:
            bar.update()
            if step % 10 == 0 or step == config.steps - 1:
                acc = (logits.argmax(-1) == tgt[:, 1:]).float().mean().item()
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - started

    heldout = dates.sample_pairs(heldout_dates, config.eval_size, random.Random(1))
    metrics = evaluate(model, heldout)
    metrics.update(train_seconds=round(train_seconds, 1), steps=config.steps,
                   seed=config.seed, parameters=count_parameters(model),
                   threads=torch.get_num_threads(), final_loss=round(loss.item(), 4))
    save_translator(model, out_dir, config,
                    metrics={k: metrics[k] for k in ("exact_match", "char_accuracy")})
    write_json(out_dir / "metrics.json", metrics)
    # Four different formats, so the figures show different alignments (one ambiguous-looking
    # all-digit form among them when the sample has one).
    shown, seen = [], set()
    for pair in heldout:
        if len(shown) < figures and pair.format_index not in seen:
            shown.append(pair)
            seen.add(pair.format_index)
    for i, pair in enumerate(shown, 1):
        plot_alignment(model, pair.source, out_dir / f"alignment_{i}.png")
    return metrics


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


def translate(model: TransformerSeq2Seq, text: str) -> str:
    """The ISO date the model reads in ``text`` (lower-cased and stripped first).

    Raises:
        ValueError: empty or over-long input, or characters outside the vocabulary (named).
    """
    cleaned = text.strip().lower()
    if not cleaned:
        raise ValueError("the input is empty; give a date such as \"thursday june 25 2009\"")
    if len(cleaned) > model.config.max_src_len:
        raise ValueError(f"the input has {len(cleaned)} characters; at most "
                         f"{model.config.max_src_len} are allowed")
    tokens, _ = model.greedy_decode(SOURCE_VOCAB.batch([cleaned]))
    return TARGET_VOCAB.decode(tokens[0].tolist())


def _run(args) -> int:
    def fail(message: str) -> int:
        print(f"attnkit translate: error: {message}", file=sys.stderr)
        return 2

    if args.text == "train":
        checkpoint = Path(args.out) / CHECKPOINT_NAME
        if args.if_missing and checkpoint.is_file():
            print(f"{checkpoint} exists; not training (drop --if-missing to retrain)")
            return 0
        try:
            config = TrainConfig(steps=args.steps, seed=args.seed)
        except ValueError as err:
            return fail(str(err))
        if args.threads:
            torch.set_num_threads(args.threads)  # this command's process only
        metrics = train(args.out, config, progress=not args.quiet)
        print(f"held-out exact match {metrics['exact_match']:.2%}, char accuracy "
              f"{metrics['char_accuracy']:.2%} on {metrics['num_examples']} dates; "
              f"{metrics['train_seconds']:.0f} s training; wrote {args.out}")
        return 0
    try:
        model = load_translator(args.out)
    except FileNotFoundError:
        return fail(f"no trained translator in {args.out}; train one with: "
                    f"attnkit translate train --out {args.out}")
    except CheckpointError as err:
        return fail(str(err))
    try:
        print(translate(model, args.text))
        if args.plot:
            plot_alignment(model, args.text.strip(), args.plot)
    except (ValueError, ImportError) as err:
        return fail(str(err))
    return 0


def add_parser(subparsers) -> None:
    """Add ``translate`` (``translate train`` and ``translate "TEXT"``) to the CLI."""
    parser = subparsers.add_parser(
        "translate", help="train the date translator, or translate a date to ISO",
        description='Translate a human-written date to ISO (attnkit translate "june 25, 2009")'
                    ', or train the translator first (attnkit translate train).')
    parser.add_argument("text", help='a date such as "thursday june 25 2009", or "train"')
    parser.add_argument("--out", default="out/translate",
                        help="directory of the checkpoint, metrics and figures")
    parser.add_argument("--plot", metavar="FILE", help="save this input's alignment figure")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--if-missing", action="store_true",
                        help="train only when no checkpoint exists in --out")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for training (default: torch's choice; 1 is "
                             "often faster on a busy shared machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)
