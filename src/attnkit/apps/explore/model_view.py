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

__all__ = ["ModelMissing", "Models", "translate_view", "gpt_view"]


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
    data = bytes((grid.clamp(0, 1) * 255).round().to(torch.uint8).flatten().tolist())
    return {"prompt": prompt, "tokens": [_label(c) for c in prompt],
            "layers": grid.shape[0], "heads": grid.shape[1],
            "weights_u8": base64.b64encode(data).decode("ascii"),
            "context": model.config.max_seq_len,
            "next": _label(vocab.decode([int(logits[0, -1].argmax())]) or "?")}
