"""The model views' numbers: the trained translator's cross-attention and the GPT's heads.

Models are loaded on first use and kept (:class:`Models`), reloaded when the checkpoint file
changes. Input is validated the way each app's CLI does it: the translator through
:func:`attnkit.apps.translate.answer.translate` itself (its ``ValueError`` message is shown as
is), the GPT prompt against the model's vocabulary and context.

GPT weights are large at long prompts (``L x H x T x T``: 4 x 4 x 256 x 256 is a million
numbers), so they travel as bytes: each weight times 255, rounded, base64-encoded in
``(L, H, T, T)`` order. The page reads them back as ``byte / 255`` (to about 0.002).

Shape letters: ``L`` layers, ``H`` heads, ``T`` tokens, ``S`` source characters.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from .._i18n import Localized
from .._vocab import CharVocab
from ..gpt.data import encode_prompt
from .tutorial_view import to_json

__all__ = ["ModelMissing", "Models", "translate_view", "gpt_view", "heads_view",
           "MAX_HEAD_CELLS"]

MAX_HEAD_CELLS = 1 << 24  # L x H x T x T weights one head/model view carries (16 MiB as bytes)


class ModelMissing(Localized, Exception):
    """No usable checkpoint: the message says how to make one (shown in the page, in its
    language; see :class:`attnkit.apps._i18n.Localized`)."""


def _label(char: str) -> str:
    return {" ": "\u2423", "\n": "\\n", "\t": "\\t"}.get(char, char)


class Models:
    """Lazily loaded translator and GPT, shared by the server's threads.

    Args:
        translator_dir: directory holding the translator's ``checkpoint.pt``.
        gpt_path: the GPT checkpoint file (``gpt.pt``).
    """

    def __init__(self, translator_dir="out/translate", gpt_path="out/gpt/gpt.pt"):
        self.translator_dir, self.gpt_path = Path(translator_dir), Path(gpt_path)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, object]] = {}

    def _cached(self, key: str, path: Path, load):
        try:
            stamp = path.stat().st_mtime
        except OSError:
            stamp = None
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
            value = load()
            self._cache[key] = (stamp, value)
            return value

    def translator(self):
        """The translator in eval mode.

        Raises:
            ModelMissing: no checkpoint, or one that cannot be used (the reason is named).
        """
        from ..translate.train import CHECKPOINT_NAME, load_translator

        def load():
            try:
                return load_translator(self.translator_dir)
            except FileNotFoundError:
                raise ModelMissing("error.no_translator", folder=self.translator_dir) from None
            except CheckpointError as err:
                raise ModelMissing("error.bad_checkpoint", reason=err) from None
        return self._cached("translator", self.translator_dir / CHECKPOINT_NAME, load)

    def gpt(self):
        """``(model, CharVocab)`` of the GPT checkpoint.

        Raises:
            ModelMissing: no checkpoint, or one that cannot be used (the reason is named).
        """
        from ..gpt.model import load_checkpoint

        def load():
            try:
                model, metadata = load_checkpoint(self.gpt_path)
                return model, CharVocab(metadata["chars"])
            except FileNotFoundError:
                raise ModelMissing("error.no_gpt", path=self.gpt_path,
                                   folder=self.gpt_path.parent) from None
            except (ValueError, RuntimeError, TypeError, KeyError) as err:
                raise ModelMissing("error.bad_gpt", path=self.gpt_path, reason=err) from None
        return self._cached("gpt", self.gpt_path, load)


def translate_view(models: Models, text) -> dict:
    """The translator's answer for ``text`` and its cross-attention per layer and head.

    Returns:
        ``{"text", "source" (characters, spaces shown as a visible mark), "answer",
        "refused", "output" (characters), "weights" (L, H, 10, S)}``. ``answer`` is the checked
        ISO date, or None with ``refused`` saying why when the model's answer is wrong (the
        attention is still shown: where did it look?).

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: what :func:`~attnkit.apps.translate.answer.translate` refuses.
        ModelMissing: no usable translator.
    """
    from ..translate.answer import WrongAnswer, translate
    from ..translate.model import SOURCE_VOCAB, TARGET_VOCAB

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    model = models.translator()
    try:
        answer, refused = translate(model, text), None  # validates, as the CLI does
    except WrongAnswer as err:  # a valid date the model gets wrong: show where it looked
        answer, refused = None, str(err)
    cleaned = " ".join(text.split()).lower()  # what translate() reads
    with torch.no_grad():
        tokens, _, weights = model.greedy_decode(SOURCE_VOCAB.batch([cleaned]),
                                                 need_weights=True)
    return {"text": text, "source": [_label(c) for c in cleaned], "answer": answer,
            "refused": refused,
            "output": list(TARGET_VOCAB.decode(tokens[0].tolist())),
            "weights": to_json(weights[:, 0], 4)}  # (L, H, 10, S)


def gpt_view(models: Models, prompt) -> dict:
    """Every layer's and head's attention weights of the GPT on ``prompt``.

    Returns:
        ``{"prompt", "tokens" (labels), "layers", "heads", "weights_u8" (base64 bytes of
        round(255 * w), (L, H, T, T)), "context", "next" (the most likely next character)}``.

    Raises:
        TypeError: ``prompt`` is not a str.
        ValueError: an empty prompt, unknown characters (named), longer than the context.
        ModelMissing: no usable GPT.
    """
    model, vocab = models.gpt()
    idx = encode_prompt(prompt, model, vocab)
    with torch.no_grad():
        logits, weights = model(idx[None], need_weights=True)  # L tensors (1, H, T, T)
    grid = torch.stack([w[0] for w in weights]).float()  # (L, H, T, T)
    return {"prompt": prompt, "tokens": [_label(c) for c in prompt],
            "layers": grid.shape[0], "heads": grid.shape[1], "weights_u8": _as_bytes(grid),
            "context": model.config.max_seq_len,
            "next": _label(vocab.decode([int(logits[0, -1].argmax())]) or "?")}


def _as_bytes(grid: torch.Tensor) -> str:
    """Weights ``(L, H, T, T)`` in [0, 1] as base64 bytes of ``round(255 * w)``."""
    data = (grid.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return base64.b64encode(data.numpy().tobytes()).decode("ascii")


def _stacked(weights) -> torch.Tensor:
    """``weights`` as one float tensor ``(L, H, T, S)``; a sequence of per-layer tensors
    (``(H, T, S)`` or ``(1, H, T, S)``, as transformers' ``output_attentions``) is stacked."""
    if isinstance(weights, (list, tuple)):
        if not weights or not all(isinstance(w, torch.Tensor) for w in weights):
            raise TypeError("weights must be a tensor or a non-empty sequence of tensors (one "
                            "per layer)")
        weights = torch.stack([w[0] if w.dim() == 4 and w.shape[0] == 1 else w
                               for w in weights])  # (L, H, T, S)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a tensor (H, T, T) or (L, H, T, T), got "
                        f"{type(weights).__name__}")
    if weights.dim() == 5 and weights.shape[1] == 1:
        weights = weights[:, 0]  # (L, 1, H, T, S) -> (L, H, T, S)
    if weights.dim() == 3:
        weights = weights[None]  # (1, H, T, S)
    if weights.dim() != 4:
        raise ValueError(f"weights must be (H, T, T) or (L, H, T, T) for one sample, got shape "
                         f"{tuple(weights.shape)}; pick one sample first, e.g. weights[:, b]")
    return weights.detach().float().cpu()


def _names(labels, count: int, what: str) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(x) for x in labels]
    if len(labels) != count:
        raise ValueError(f"{what}_labels must have one label per {what} ({count}), got "
                         f"{len(labels)}")
    return labels


def heads_view(weights, tokens, *, layer_labels=None, head_labels=None, causal=None) -> dict:
    """The GPT view's data for any self-attention weights: head and model views of them.

    Args:
        weights: ``(H, T, T)`` or ``(L, H, T, T)`` attention weights of one sample (rows are
            queries, each a distribution over the ``T`` keys), or a sequence of per-layer
            ``(H, T, T)``/``(1, H, T, T)`` tensors.
        tokens: ``T`` token strings.
        layer_labels, head_labels: names of the layers and heads shown (default ``0, 1, ...``),
            e.g. the model's own layer numbers when only some layers were kept.
        causal: draw only keys up to each query; default: whether every weight above the
            diagonal is 0.

    Returns:
        ``{"tokens", "layers", "heads", "weights_u8", "layer_labels", "head_labels",
        "causal"}`` (see :func:`gpt_view`); no ``prompt``, so the page hides the prompt form.

    Raises:
        TypeError: ``weights`` is not a tensor (or tensors), ``tokens`` not strings.
        ValueError: not square, a token count that differs from ``T``, weights outside
            [0, 1] or not finite, more than :data:`MAX_HEAD_CELLS` weights, or label counts
            that do not match.
    """
    grid = _stacked(weights)  # (L, H, T, S)
    L, H, T, S = grid.shape
    if T == 0:
        raise ValueError("weights must cover at least one token, got T = 0")
    if T != S:
        raise ValueError(f"weights must be square self-attention (L, H, T, T), got T = {T} "
                         f"queries and S = {S} keys")
    if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
        raise TypeError("tokens must be a sequence of str, one per position")
    if len(tokens) != T:
        raise ValueError(f"tokens must have one entry per position (T = {T}), got {len(tokens)}")
    if L * H * T * T > MAX_HEAD_CELLS:
        raise ValueError(f"{L} layers x {H} heads x {T} x {T} tokens = {L * H * T * T:,} "
                         f"weights are too many to draw (at most {MAX_HEAD_CELLS:,}); keep "
                         f"fewer layers or heads (weights[l], weights[:, h]) or fewer tokens")
    if not bool(torch.isfinite(grid).all()) or float(grid.min()) < 0 or \
            float(grid.max()) > 1 + 1e-3:
        raise ValueError(f"weights must be attention probabilities in [0, 1], got values in "
                         f"[{float(grid.min()):.4g}, {float(grid.max()):.4g}]")
    if causal is None:
        causal = not bool(grid.triu(diagonal=1).any())
    names = [_label(t) if len(t) == 1 else t.replace("\n", "\\n") for t in tokens]
    return {"tokens": names, "layers": L, "heads": H, "weights_u8": _as_bytes(grid),
            "layer_labels": _names(layer_labels, L, "layer") or [str(i) for i in range(L)],
            "head_labels": _names(head_labels, H, "head") or [str(i) for i in range(H)],
            "causal": bool(causal)}
