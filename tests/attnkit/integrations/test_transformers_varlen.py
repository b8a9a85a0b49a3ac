"""transformers' flash convention on attnkit (tiny random models from configs, no downloads):
continuous batching (``generate_batch``) token for token against ``paged|eager``, ``sdpa``
and one-by-one ``generate``; packed training with ``DataCollatorWithFlattening`` exact in
float64 against the sequences one by one; left-padded generate; the flash kwargs (window,
softcap, sinks); registration errors and the private names relied on."""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="needs the hf extra: pip install \"attnkit[hf]\"")
tv = pytest.importorskip("attnkit.integrations.transformers_varlen")

import attnkit  # noqa: E402
from transformers import (ContinuousBatchingConfig, DataCollatorWithFlattening,  # noqa: E402
                          GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM)

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def name():
    return tv.register()


@pytest.fixture
def calls(monkeypatch):
    """Count the varlen calls the implementation makes (to prove the path is taken)."""
    seen = []
    real = tv.varlen_attention

    def spy(q, k, v, cu_q, cu_k, **kw):
        seen.append(len(cu_q) - 1)
        return real(q, k, v, cu_q, cu_k, **kw)
    monkeypatch.setattr(tv, "varlen_attention", spy)
    return seen


def _model(impl, cls=LlamaForCausalLM, config=None, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = copy.deepcopy(config or LlamaConfig(**COMMON))
    model = cls._from_config(cfg, attn_implementation=impl, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: run every step
    return model


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in (5, 70, 9, 23, 1)]


def _batch(model, prompts, new=6):
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=16, page_size=16, max_batch_tokens=48)
    out = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb, warmup=False,
                               progress_bar=False)
    return [out[r].generated_tokens for r in sorted(out, key=lambda r: int(r.split("_")[-1]))]


@pytest.mark.parametrize("cls,config", [
    (LlamaForCausalLM, LlamaConfig(**COMMON)),
    (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=8)),
], ids=["llama", "mistral-window"])
def test_generate_batch_tokens_identical(name, calls, cls, config):
    prompts = _prompts()
    ours = _batch(_model(name, cls, config), prompts)
    assert calls and max(calls) > 1  # packed varlen batches really reached attnkit
    assert ours == _batch(_model("paged|eager", cls, config), prompts)
    alone = _model("eager", cls, config)
    for p, toks in zip(prompts, ours):
        ref = alone.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)[0, len(p):].tolist()
        assert toks == ref


def test_gpt_oss_sinks_and_window_through_enable(name, calls):
    # gpt-oss lists its own flash kernels and swaps any other flash name for a Hub kernel
    # when built; enable() switches a model built with another implementation.
    from transformers import GptOssConfig, GptOssForCausalLM
    config = GptOssConfig(**{**COMMON, "intermediate_size": 32}, head_dim=8, sliding_window=8,
                          num_local_experts=2, num_experts_per_tok=1)
    model = tv.enable(_model("eager", GptOssForCausalLM, config))
    assert model.config._attn_implementation == name
    prompts = _prompts()[:3]
    ours = _batch(model, prompts)
    assert calls
    alone = _model("eager", GptOssForCausalLM, config)
    for p, toks in zip(prompts, ours):
        assert toks == alone.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                      pad_token_id=0)[0, len(p):].tolist()


def test_continuous_batching_manager_streams_the_same_tokens(name, calls):
    prompts = _prompts()[:3]
    model = _model(name)
    gc = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=16, page_size=16, max_batch_tokens=48)
    manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    manager.start()
    try:
        ids = [manager.add_request(p, max_new_tokens=4) for p in prompts]
        got = {}
        while len(got) < len(ids):
            result = manager.get_result(timeout=60)
            assert result is not None, "no result within 60 s"
            got[result.request_id] = result.generated_tokens
    finally:
        manager.stop(block=True)
    assert calls
    assert [got[i] for i in ids] == [t[:4] for t in _batch(_model("paged|eager"), prompts)]


def _features():
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(1, 64, (n,), generator=g).tolist()}
            for n in (7, 19, 3, 12)]


def _token_loss(logits, labels):
    """Summed next-token cross-entropy at the model's precision (transformers' own loss
    upcasts to float32 only)."""
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_training_exact_in_float64(name, calls, flash_kwargs):
    feats = _features()
    packed_model = _model(name, dtype=torch.float64).train()  # train mode: a cache is made
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(feats)
    out = packed_model(**{k: v for k, v in batch.items() if k != "labels"})
    loss = _token_loss(out.logits, batch["labels"])
    grads = torch.autograd.grad(loss, list(packed_model.parameters()))
    assert calls and calls[0] == len(feats)

    ref_model = _model("sdpa", dtype=torch.float64).train()
    ref_loss = 0
    for f in feats:
        ids = torch.tensor([f["input_ids"]])
        ref_loss = ref_loss + _token_loss(ref_model(input_ids=ids).logits, ids)
    ref_grads = torch.autograd.grad(ref_loss, list(ref_model.parameters()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_left_padded_generate_matches_one_by_one(name):
    model = _model(name)
    prompts = _prompts()[:3]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                         do_sample=False, pad_token_id=0)[:, width:]
    ref = _model("eager")
    for row, p in zip(out.tolist(), prompts):
        assert row == ref.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)[0, len(p):].tolist()


class _Layer:
    is_causal = True


@pytest.mark.parametrize("mode", ["dense", "cu_seq_lens", "mask"])
def test_flash_kwargs_window_softcap_sinks(mode):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 12, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    kw = dict(sliding_window=4, softcap=3.0, s_aux=sinks, scaling=0.3)
    ref = attnkit.attention(q, k, v, causal=True, window=4, softcap=3.0, sinks=sinks,
                            scale=0.3, backend="math").transpose(1, 2)
    extra = {}
    if mode == "cu_seq_lens":
        extra = dict(cu_seq_lens_q=torch.tensor([0, 12]), cu_seq_lens_k=torch.tensor([0, 12]))
    mask = torch.ones(1, 12, dtype=torch.bool) if mode == "mask" else None
    out, weights = tv.flash_attention_forward(_Layer(), q, k, v, mask, **kw, **extra)
    assert weights is None
    torch.testing.assert_close(out, ref)


def test_registration_errors_and_private_names():
    with pytest.raises(ValueError, match="name must contain 'flash' for continuous batching"):
        tv.register("attnkit_varlen")
    with pytest.raises(ValueError, match="'flash_attention_2' is one of transformers' own"):
        tv.register("flash_attention_2")
    with pytest.raises(ValueError, match="'my_flash' is not registered"):
        tv.enable(object(), "my_flash")
    import transformers.modeling_flash_attention_utils as mfu  # noqa: F401
    for dotted in tv.PRIVATE_NAMES:
        module, attr = dotted.rsplit(".", 1)
        assert hasattr(getattr(transformers, module), attr), dotted


def test_a_model_is_created_with_the_flash_name_after_another_flash_load(name, monkeypatch):
    """transformers' loader has one slot: another flash implementation loaded since
    register() must not send the next model's creation to the Hub for a kernel."""
    import transformers.modeling_flash_attention_utils as mfu
    monkeypatch.setattr(mfu, "_loaded_implementation", "kernels-community/flash-attn2")
    model = _model(name)
    assert model.config._attn_implementation == name
    assert mfu._loaded_implementation == name


def test_main_register_also_registers_the_flash_name():
    from attnkit.integrations import transformers as hf
    hf.register("attnkit_t", backend="chunked")
    try:
        assert tv._BACKENDS["attnkit_t_flash"] == "chunked"
        assert "attnkit_t_flash" in transformers.AttentionInterface._global_mapping
    finally:
        hf.unregister("attnkit_t")


@pytest.mark.bench
def test_bench_serving_quick_reports_identical_tokens(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_serving.py"
    out = tmp_path / "serving.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["group"] for r in rows} == {"generate_batch", "mask build", "packed train step"}
    cb = [r for r in rows if r["group"] == "generate_batch"]
    assert [r["impl"] for r in cb] == ["sdpa", "paged|eager", "attnkit_flash"]
    assert all(r["same_tokens"] is True and r["tokens_per_s"] > 0 for r in cb)
