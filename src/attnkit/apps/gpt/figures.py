"""The GPT app's figures: the loss curve of a run and the layer x head grid of attention maps
of one prompt (:mod:`attnkit.viz`, imported when drawn)."""

from __future__ import annotations

from pathlib import Path

import torch

from ... import viz

__all__ = ["attention_figure", "plot_losses"]


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


def plot_losses(result, path) -> Path:
    """Write the train/validation loss curve of ``result`` (a :class:`~.train.TrainResult`)
    beside the unigram baseline to ``path`` (atomically).

    Raises:
        ImportError: matplotlib is missing.
    """
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
