"""The transformers names the integration relies on (one table,
``attnkit.integrations.transformers_api.NAMES``), what happens when transformers renames one,
and how a user gets the ``"attnkit"`` implementation (importing the integration registers it).
"""

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="needs the hf extra: pip install \"attnkit[hf]\"")
hf = pytest.importorskip("attnkit.integrations.transformers")
api = pytest.importorskip("attnkit.integrations.transformers_api")

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_every_name_attnkit_relies_on_is_in_this_transformers():
    found = api.problems()
    assert not found, (f"transformers {transformers.__version__} renamed names "
                       f"attnkit.integrations.transformers relies on:\n" + "\n".join(found))


def test_the_table_lists_private_names_and_closure_variables():
    paths = {n.path for n in api.NAMES}
    assert "transformers.AttentionInterface._global_mapping" in paths
    assert {n.path for n in api.NAMES if n.private} >= {
        "transformers.utils.output_capturing._active_collector"}
    cells = {n.path.rsplit(".", 1)[1]: n.cells for n in api.NAMES if n.cells}
    assert cells["chunked_overlay"] == ("chunk_size", "left_padding")
    with pytest.raises(LookupError, match="not in attnkit's table"):
        api.get("transformers.masking_utils.eager_mask")


def test_a_missing_name_is_named(monkeypatch):
    monkeypatch.delattr(mu, "chunked_overlay")
    found = api.problems()
    assert found == ["missing transformers.masking_utils.chunked_overlay (required: read as "
                     "(per-sample) chunks)"], found
    with pytest.raises(LookupError, match="has no transformers.masking_utils.chunked_overlay"):
        api.get("transformers.masking_utils.chunked_overlay")


def _renamed_overlay(sliding_window):  # as if transformers renamed the closure variable
    window = sliding_window

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx > q_idx - window

    inner_mask.__module__ = mu.__name__
    inner_mask.__qualname__ = "sliding_window_overlay.<locals>.inner_mask"
    return inner_mask


def test_a_renamed_closure_variable_is_named_and_falls_back_densely(monkeypatch):
    monkeypatch.setattr(mu, "sliding_window_overlay", _renamed_overlay)
    found = api.problems()
    assert len(found) == 1 and "sliding_window_overlay no longer closes over " \
        "'sliding_window'" in found[0], found
    fn = mu.and_masks(_renamed_overlay(3), mu.causal_mask_function)
    mask = hf.mask_interface(batch_size=1, q_length=6, kv_length=6, mask_function=fn)
    assert mask.dense and "no longer closes over ['sliding_window']" in mask.reason
    want = mu.sdpa_mask(batch_size=1, q_length=6, kv_length=6, mask_function=fn,
                        allow_is_causal_skip=False)
    assert torch.equal(mask.to_dense(), want)


def test_a_missing_required_name_fails_the_import_naming_it(monkeypatch):
    import attnkit.integrations as package

    for name in [m for m in sys.modules if m.startswith("attnkit.integrations.transformers")]:
        monkeypatch.delitem(sys.modules, name)
        monkeypatch.delattr(package, name.rsplit(".", 1)[1], raising=False)
    monkeypatch.delattr(mu, "sdpa_mask")
    with pytest.raises(ImportError, match=r"does not have: transformers\.masking_utils\."
                                          r"sdpa_mask"):
        import attnkit.integrations.transformers  # noqa: F401


def test_importing_the_integration_registers_attnkit():
    assert "attnkit" in transformers.AttentionInterface._global_mapping
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="attnkit")
    assert model.config._attn_implementation == "attnkit"
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 100)


def test_register_again_replaces_and_unregister_removes():
    assert hf.register("attnkit", backend="math") == "attnkit"  # ours: may be replaced
    assert transformers.AttentionInterface._global_mapping["attnkit"].attnkit_backend == "math"
    hf.unregister("attnkit")
    assert "attnkit_flash" not in transformers.AttentionInterface._global_mapping  # its twin
    try:
        with pytest.raises(ValueError, match='attn_implementation="attnkit"` is not supported'):
            AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="attnkit")
    finally:
        hf.register()
    assert transformers.AttentionInterface._global_mapping["attnkit"].attnkit_backend == "auto"


def test_the_varlen_adapter_names_are_in_the_one_table():
    varlen = pytest.importorskip("attnkit.integrations.transformers_varlen")
    paths = {n.path for n in api.NAMES}
    assert {f"transformers.{p}" for p in varlen.PRIVATE_NAMES} <= paths
