"""Several prompts at once through one paged KV cache: each continuation equals generating it
alone (greedy and sampled, learned positions and RoPE with GQA, past the context restart)."""

import pytest
import torch

from attnkit.apps.gpt.many import generate_many
from attnkit.apps.gpt.model import GPT, GPTConfig


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", 20, **overrides)).eval()


@pytest.mark.parametrize("overrides,temperature", [
    ({}, 0.0),
    ({"positions": "rope", "num_kv_heads": 1, "window": 5}, 1.0),
], ids=["learned-greedy", "rope-gqa-window-sampled"])
def test_each_continuation_equals_generating_alone(overrides, temperature):
    model = tiny(**overrides)
    limit = model.config.max_seq_len
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 20, (n,), generator=g) for n in (3, 11, 1, limit)]
    new = limit  # long enough that every sequence restarts its context at least once
    got = generate_many(model, prompts, new, temperature=temperature, top_k=5,
                        generators=[torch.Generator().manual_seed(7) for _ in prompts],
                        page_size=4)
    for p, tokens in zip(prompts, got):
        alone = list(model.generate_stream(p, new, temperature=temperature, top_k=5,
                                           generator=torch.Generator().manual_seed(7)))
        assert tokens == alone


def test_errors():
    model = tiny()
    with pytest.raises(ValueError, match="need at least one prompt and one generator per "
                                         "prompt, got 1 prompts and 2 generators"):
        generate_many(model, [torch.tensor([1])], 2, generators=[None, None])
    with pytest.raises(ValueError, match="prompt 0 must have 1 to max_seq_len"):
        generate_many(model, [torch.tensor([], dtype=torch.long)], 2)
    with pytest.raises(ValueError, match="need max_new_tokens >= 0"):
        generate_many(model, [torch.tensor([1])], -1)


def test_cli_repeated_prompt_prints_each_continuation_as_alone(tmp_path, capsys):
    from attnkit import cli
    from attnkit.apps.gpt.model import save_checkpoint
    chars = "abcdefghijklmnopqrs "
    path = save_checkpoint(tmp_path / "gpt.pt", tiny(), chars=chars)
    base = ["gpt", "generate", "--checkpoint", str(path), "--tokens", "12", "--seed", "3"]
    alone = []
    for prompt in ("abc", "sea shell"):
        assert cli.main(base + ["--prompt", prompt]) == 0
        alone.append(capsys.readouterr().out.rstrip("\n"))
    assert cli.main(base + ["--prompt", "abc", "--prompt", "sea shell"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == alone
    assert "2 prompts x 12 tokens" in out.err and "paged KV cache" in out.err
    assert cli.main(base + ["--prompt", "a", "--prompt", "b", "--no-cache"]) == 2
    assert "--no-cache works with one --prompt" in capsys.readouterr().err
