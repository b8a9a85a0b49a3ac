"""The why-attention figure: accuracy against input length for both models, beside the
attention model's alignment of one long example (Bahdanau et al. Fig. 2 style)."""

from __future__ import annotations

__all__ = ["comparison_figure"]


def comparison_figure(results: dict, weights, source: str, output: str):
    """Accuracy against input length for both models, beside the alignment of one example.

    Args:
        results: as :func:`~.train.train` returns (``config``, and per model ``parameters`` and
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
