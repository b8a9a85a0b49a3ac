"""GPT model, character data and checkpoints: shapes, overfitting, cached = uncached decoding."""

import math

import pytest
import torch

from attnkit.apps import checkpoint
from attnkit.apps._vocab import CharVocab
from attnkit.apps.gpt.data import default_corpus, get_batch, load_text, split_ids, unigram_loss
from attnkit.apps.gpt.model import GPT, GPTConfig
from attnkit.apps.gpt.model import PRESETS, load_checkpoint, save_checkpoint

TEXT = "attention is all you need; the cat sat on the mat. "


def tiny(vocab_size=20, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size, **overrides)).eval()


# --- config -------------------------------------------------------------------------------

def test_presets_and_overrides():
    config = GPTConfig.preset("small", 100, dropout=0.1)
    assert (config.num_layers, config.num_heads, config.embed_dim) == (4, 4, 128)
    assert config.dropout == 0.1 and config.vocab_size == 100
    assert set(PRESETS) == {"tiny", "small"}
    with pytest.raises(AttributeError):
        config.embed_dim = 64  # frozen


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(vocab_size=10, positions="alibi"), "positions must be one of"),
    (dict(vocab_size=10, dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(vocab_size=10, embed_dim=30, num_heads=4), "divisible by num_heads"),
    (dict(vocab_size=10, num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(vocab_size=10, window=0), "window"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_unknown_preset_and_wrong_config_type():
    with pytest.raises(ValueError, match=r"unknown GPT preset 'huge'; choose one of"):
        GPTConfig.preset("huge", 10)
    with pytest.raises(TypeError, match="config must be a GPTConfig, got dict"):
        GPT({"vocab_size": 10})


# --- model --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(positions="learned"),
                                       dict(num_kv_heads=1, window=8)])
def test_forward_shapes_and_weights(overrides):
    model = tiny(**overrides)
    idx = torch.randint(0, 20, (3, 10))
    logits, weights = model(idx, need_weights=True)
    assert logits.shape == (3, 10, 20)
    assert len(weights) == 2 and weights[0].shape == (3, 2, 10, 10)
    assert torch.allclose(weights[1].sum(-1), torch.ones(3, 2, 10))
    assert torch.all(weights[0].triu(1) == 0)  # causal: nothing above the diagonal
    assert torch.allclose(model(idx), logits, atol=1e-6)


def test_output_head_is_tied_to_the_embedding():
    model = tiny()
    assert not any("head" in name for name, _ in model.named_parameters())
    hidden = []
    model.ln_f.register_forward_hook(lambda module, args, out: hidden.append(out))
    idx = torch.randint(0, 20, (2, 6))
    logits = model(idx)
    assert torch.allclose(logits, hidden[0] @ model.tok_emb.weight.T, atol=1e-6)


def test_forward_errors():
    model = tiny(positions="learned")
    with pytest.raises(ValueError, match=r"idx must be \(B, T\) integer token ids"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 20\), got \[0, 25\]"):
        model(torch.tensor([[0, 25]]))
    with pytest.raises(ValueError, match="exceed the learned position table"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tiny_model_overfits_a_short_text():
    tokenizer = CharVocab.from_text(TEXT)
    ids = torch.tensor(tokenizer.encode(TEXT * 2))
    x, y = ids[:-1].unfold(0, 32, 8), ids[1:].unfold(0, 32, 8)  # (9, 32) windows, shifted
    model = tiny(tokenizer.vocab_size).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(x, y).item()
    for _ in range(200):
        loss = model.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 2.0 and loss.item() < 0.1


# --- generation ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(positions="learned"),
                                       dict(num_kv_heads=1, window=6)])
def test_cached_generation_equals_uncached_greedy(overrides):
    model = tiny(**overrides)
    prompt = torch.tensor([1, 5, 7, 2, 9])
    # 80 tokens from a 5-token prompt pass the 32-token context twice: both modes restart
    # the context at the same points.
    cached = model.generate(prompt, 80, temperature=0)
    uncached = model.generate(prompt, 80, temperature=0, use_cache=False)
    assert cached.shape == (85,) and torch.equal(cached[:5], prompt)
    assert torch.equal(cached, uncached)


def test_cached_logits_equal_the_full_forward():
    model = tiny()
    idx = torch.randint(0, 20, (2, 12))
    caches = model.init_caches(2)
    with torch.no_grad():
        full = model(idx)  # (2, 12, 20)
        steps = [model(idx[:, :5], caches=caches)] + [model(idx[:, t:t + 1], caches=caches)
                                                     for t in range(5, 12)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert caches[0].pos == 12


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny()
    prompt = torch.tensor([3, 4])

    def sample(seed, **kwargs):
        return model.generate(prompt, 30, generator=torch.Generator().manual_seed(seed),
                              **kwargs)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1, temperature=2.0), sample(2, temperature=2.0))
    assert torch.equal(sample(1, top_k=1), model.generate(prompt, 30, temperature=0))
    streamed = list(model.generate_stream(prompt, 30, temperature=0))
    assert streamed == model.generate(prompt, 30, temperature=0)[2:].tolist()


def test_generate_errors_and_mode_restored():
    model = tiny().train()
    with pytest.raises(ValueError, match=r"1 to max_seq_len=32 tokens, got 33"):
        model.generate(torch.zeros(33, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="got 0"):
        model.generate(torch.zeros(0, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="top_k >= 1"):
        model.generate(torch.zeros(1, dtype=torch.long), 1, top_k=0)
    model.generate(torch.zeros(1, dtype=torch.long), 2)
    assert model.training


# --- checkpoints --------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = tiny(positions="learned", num_kv_heads=1)
    path = save_checkpoint(tmp_path / "run" / "gpt.pt", model, chars=list("abc"), val_loss=1.5)
    assert [p.name for p in path.parent.iterdir()] == ["gpt.pt"]  # no temporary file left
    loaded, metadata = load_checkpoint(path)
    assert loaded.config == model.config and not loaded.training
    assert metadata == {"chars": ["a", "b", "c"], "val_loss": 1.5}
    idx = torch.randint(0, 20, (2, 9))
    assert torch.equal(loaded(idx), model(idx))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    other = checkpoint.save_checkpoint(tmp_path / "t.pt", {}, {}, kind="translator")
    with pytest.raises(checkpoint.CheckpointError, match="expected 'gpt'"):
        load_checkpoint(other)


# --- text data ----------------------------------------------------------------------------

def test_default_corpus_and_text_files(tmp_path):
    corpus = default_corpus()
    assert 400_000 < len(corpus) < 600_000 and corpus == default_corpus()
    path = tmp_path / "t.txt"
    path.write_text("héllo wörld", encoding="utf-8")
    assert load_text(path) == "héllo wörld"
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="is not UTF-8"):
        load_text(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_text(tmp_path / "nope.txt")


def test_split_is_deterministic_and_interleaved():
    ids = torch.arange(100_000)
    train, val = split_ids(ids)
    assert len(train) + len(val) == 100_000 and 0.09 < len(val) / 100_000 < 0.11
    assert torch.equal(split_ids(ids)[1], val)
    assert val.min() < 10_000 and val.max() > 90_000  # spread over the text, not a tail
    assert not set(train.tolist()) & set(val.tolist())
    small_train, small_val = split_ids(torch.arange(60))
    assert len(small_val) > 0 and len(small_train) > len(small_val)


def test_get_batch_targets_are_shifted():
    data = torch.arange(50)
    x, y = get_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="need at least 9"):
        get_batch(torch.arange(8), 1, 8)


def test_unigram_loss():
    uniform = torch.arange(10).repeat(100)
    assert unigram_loss(uniform, uniform, 10) == pytest.approx(math.log(10))
    skewed = torch.tensor([0] * 90 + [1] * 10)
    assert unigram_loss(skewed, skewed, 2) < math.log(2)
    with pytest.raises(ValueError, match="val is empty"):
        unigram_loss(skewed, skewed[:0], 2)
