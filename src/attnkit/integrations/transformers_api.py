"""Every transformers name attnkit's transformers integration relies on, in one table.

transformers has no public API for reading a mask closure or removing a registered attention
function, so the integration depends on some of its private names and on the names of the
variables its mask factories close over. They are all listed in :data:`NAMES`, and
:func:`problems` says, naming each one, which of them this transformers no longer has
(``tests/attnkit/integrations/test_transformers_api.py`` fails with that list). A required name that is missing
makes the import fail with the same list; a renamed closure variable only makes the mask
reader fall back to transformers' dense mask for that piece (counted, with the reason).

Importing this module imports transformers and checks it is 5.x.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised by a test with transformers hidden
    raise ImportError("attnkit.integrations.transformers needs transformers 5.x: "
                      "pip install \"attnkit[hf]\" (or pip install \"transformers>=5,<6\")"
                      ) from exc

if not transformers.__version__.startswith("5."):
    raise ImportError(f"attnkit.integrations.transformers supports transformers 5.x, found "
                      f"{transformers.__version__}: pip install \"transformers>=5,<6\"")

__all__ = ["Name", "NAMES", "get", "problems", "closure_cells"]

_MU = "transformers.masking_utils"


@dataclass(frozen=True)
class Name:
    """One name of transformers the integration uses.

    Attributes:
        path: dotted path from the top-level package (``module.attribute.attribute``).
        use: what attnkit does with it.
        cells: for a mask factory, the names of the variables its inner function closes
            over that the reader reads (``fn.__closure__``).
        private: not part of transformers' documented API.
        required: the integration cannot work without it (the import fails); an optional
            one only disables a feature.
    """

    path: str
    use: str
    cells: tuple = ()
    private: bool = False
    required: bool = True


NAMES: tuple[Name, ...] = (
    Name("transformers.AttentionInterface", "register() adds the attention function"),
    Name("transformers.AttentionInterface._global_mapping",
         "register() refuses transformers' own names; unregister() removes attnkit's",
         private=True),
    Name(f"{_MU}.AttentionMaskInterface", "register() adds the mask function"),
    Name(f"{_MU}.AttentionMaskInterface._global_mapping", "unregister() removes it",
         private=True),
    Name(f"{_MU}.sdpa_mask", "the dense mask of a closure the reader does not know, and of "
         "a cache offset held in a tensor while compiling"),
    Name(f"{_MU}.causal_mask_function", "read as causal (identity)"),
    Name(f"{_MU}.bidirectional_mask_function", "read as no mask (identity)"),
    Name(f"{_MU}.and_masks", "read as &", cells=("mask_functions",)),
    Name(f"{_MU}.or_masks", "read as |", cells=("mask_functions",)),
    Name(f"{_MU}.sliding_window_overlay", "read as a causal window",
         cells=("sliding_window",)),
    Name(f"{_MU}.sliding_window_bidirectional_overlay", "read as a two-sided window",
         cells=("sliding_window",)),
    Name(f"{_MU}.chunked_overlay", "read as (per-sample) chunks",
         cells=("chunk_size", "left_padding")),
    Name(f"{_MU}.padding_mask_function", "read as key padding", cells=("padding_mask",)),
    Name(f"{_MU}.packed_sequence_mask_function", "read as documents",
         cells=("packed_sequence_mask",)),
    Name(f"{_MU}.remap_positions_for_packed_sequence",
         "read through (positions step by 1 inside a document)", cells=("mask_function",)),
    Name("transformers.utils.output_capturing._active_collector",
         "whether the model records attention weights (output_attentions)", private=True,
         required=False),
    # transformers_varlen (continuous batching, packed training): transformers' one-slot
    # flash loader, primed so a custom "*flash*" name is treated as loaded
    *(Name(f"transformers.modeling_flash_attention_utils.{slot}",
           "transformers_varlen primes the flash loader with it", private=True,
           required=False)
      for slot in ("_loaded_implementation", "_lazy_imports", "_flash_fn", "_flash_varlen_fn",
                   "_flash_with_kvcache_fn", "_pad_fn", "_unpad_fn",
                   "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")),
    Name("transformers.masking_utils.flash_attention_mask",
         "transformers_varlen registers it as its mask function", required=False),
    # transformers_inspect (attnkit.inspect)
    Name("transformers.PreTrainedConfig._attn_implementation",
         "inspect() checks the model runs on a name register() added", private=True,
         required=False),
    Name("transformers.PreTrainedModel.base_model",
         "inspect() runs the base model (no LM head)", required=False),
)


_MISSING = object()


def _resolve(path: str):
    """The object at ``path`` (which may be ``None``: a slot transformers fills later), or
    :data:`_MISSING`."""
    parts = path.split(".")
    obj, i = _MISSING, len(parts)
    while i > 0:  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            i -= 1
    for attr in parts[i:]:
        if obj is _MISSING:
            break
        obj = getattr(obj, attr, _MISSING)
    return obj


def get(path: str):
    """The object at a path listed in :data:`NAMES`.

    Raises:
        LookupError: a path not in the table, or one this transformers lacks (named).
    """
    if path not in _BY_PATH:
        raise LookupError(f"{path} is not in attnkit's table of transformers names "
                          f"(attnkit.integrations.transformers_api.NAMES)")
    obj = _resolve(path)
    if obj is _MISSING:
        raise LookupError(f"transformers {transformers.__version__} has no {path} "
                          f"({_BY_PATH[path].use})")
    return obj


def closure_cells(factory) -> tuple:
    """The closure variable names of the inner function a mask factory returns, read from
    its code (without calling it)."""
    inner = [c for c in factory.__code__.co_consts if hasattr(c, "co_freevars")]
    return tuple(v for c in inner for v in c.co_freevars)


def problems() -> list[str]:
    """One line per name of :data:`NAMES` this transformers lacks or has changed (a missing
    attribute, a mask factory no longer closing over a variable the reader reads); empty
    when everything is there."""
    out = []
    for name in NAMES:
        obj = _resolve(name.path)
        if obj is _MISSING:
            kind = "required" if name.required else "optional"
            out.append(f"missing {name.path} ({kind}: {name.use})")
            continue
        if name.cells:
            have = closure_cells(obj)
            for cell in name.cells:
                if cell not in have:
                    out.append(f"{name.path} no longer closes over {cell!r} (it closes over "
                               f"{have}; {name.use})")
    return out


_BY_PATH = {name.path: name for name in NAMES}

_missing = [n.path for n in NAMES if n.required and _resolve(n.path) is _MISSING]
if _missing:
    raise ImportError(f"attnkit.integrations.transformers relies on names transformers "
                      f"{transformers.__version__} does not have: {', '.join(_missing)}; "
                      f"pip install a transformers 5.x attnkit supports, or report it")
