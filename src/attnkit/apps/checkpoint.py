"""Atomic checkpoint and JSON writes, and loads that fail with a clear message.

A training run that is interrupted (Ctrl-C, out of memory, a full disk) must never leave a
half-written checkpoint where the next run or ``attnkit translate`` would read it. Every write
here goes to a temporary file in the target's directory and is moved into place with
``os.replace``, which is atomic within one file system: readers see the old file or the new
one, never a mixture.

:func:`atomic_write` lives in the core (:mod:`attnkit._atomic`, which :mod:`attnkit.viz` uses
too) and is re-exported here. A checkpoint is one ``torch.save`` file holding a dict::

    {"format": "attnkit-checkpoint", "version": 1, "kind": "...",
     "config": {...plain JSON-able settings...}, "state_dict": {...}, **extra}

``kind`` names what wrote it (``"translator"``, ``"gpt"``...) so a loader can refuse another
model's file with a useful message instead of a key error deep inside ``load_state_dict``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._atomic import atomic_write

__all__ = ["CheckpointError", "atomic_write", "save_checkpoint", "load_checkpoint",
           "write_json"]

_FORMAT, _VERSION = "attnkit-checkpoint", 1


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (corrupt, truncated, or another kind)."""


def write_json(path, data) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically.

    Raises:
        TypeError: ``data`` is not JSON-serialisable (nothing is written).
    """
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"  # fails before any file exists
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def save_checkpoint(path, state_dict: dict, config: dict, *, kind: str, **extra) -> Path:
    """Save a model's ``state_dict`` with its ``config`` atomically.

    Args:
        path: destination file (conventionally ``*.pt``).
        state_dict: the model's ``state_dict()``.
        config: plain JSON-able settings needed to rebuild the model.
        kind: what wrote it, checked again by :func:`load_checkpoint`.
        extra: more entries to store (metrics, the training step...).

    Returns:
        The path written.

    Raises:
        TypeError: ``config`` is not a dict.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    payload = {"format": _FORMAT, "version": _VERSION, "kind": kind, "config": config,
               "state_dict": state_dict, **extra}
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path, *, kind: str | None = None, map_location="cpu") -> dict:
    """Load a file written by :func:`save_checkpoint`.

    Only tensors and plain containers are unpickled (``weights_only=True``), so a checkpoint
    from elsewhere cannot run code.

    Args:
        path: the checkpoint file.
        kind: if given, the ``kind`` the file must have.
        map_location: as :func:`torch.load`.

    Returns:
        The stored dict (``config``, ``state_dict`` and any extras).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is unreadable, not an attnkit checkpoint, a newer version,
            or of another ``kind``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for damaged files; all mean "corrupt"
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({type(err).__name__}); delete it and train again") from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not an attnkit checkpoint")
    if payload.get("version", 0) > _VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}; this "
                              f"attnkit reads up to version {_VERSION}")
    if kind is not None and payload.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {payload.get('kind')!r} checkpoint, "
                              f"expected {kind!r}")
    return payload
