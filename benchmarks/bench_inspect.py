"""Attention weights of a transformers model: ``attnkit.inspect`` against eager's
``output_attentions``, peak memory and time.

Model (random weights from a config, no download): a tiny Llama with Llama-3's attention
geometry, hidden 256, 8 query heads of dimension 128 on 2 key/value heads, 2 layers,
intermediate 512, vocabulary 128, float32, batch 1, causal. One forward of the base model
(no LM head, ``use_cache=False``) over T tokens (T = 4096; ``--quick``: 128), rows:

* ``attnkit forward``: the model on ``attn_implementation="attnkit"`` alone, no weights (the
  fast path ``inspect`` rides on);
* ``inspect 2 heads``: ``attnkit.inspect(model, ids, layers=[1], heads=[0, 5])`` (heads on
  both key/value heads): the same forward, layer 1's q/k of those heads kept, then their
  weights computed block of rows by block of rows;
* ``inspect all heads``: ``inspect`` of every head of every layer (the same weights eager
  returns, without eager's intermediates);
* ``eager output_attentions``: ``attn_implementation="eager"``, ``output_attentions=True``
  (what bertviz and most tutorials run): every layer's ``(B, H, T, T)`` weights.

``peak MiB`` is the resident high-water mark of one call above what the process held before
it (a fresh subprocess per script run, see ``_common``), the returned weights included;
``weights MiB`` is what the returned weights alone take. ``max |Δ|`` compares the weights
``inspect`` returns with eager's for the same heads (float32; eager's float32 softmax).

    python benchmarks/bench_inspect.py --threads 1 --reps 1 --json out/inspect.json
    python benchmarks/bench_inspect.py --quick
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

HIDDEN, HEADS, KV_HEADS, D, LAYERS, VOCAB = 256, 8, 2, 128, 2, 128
CHOSEN_LAYERS, CHOSEN_HEADS = [1], [0, 5]
COLUMNS = [("T", "T", ""), ("implementation", "impl", ""), ("heads kept", "heads_kept", ""),
           ("median ms", "median_ms", ".1f"), ("peak MiB", "peak_mib", ".0f"),
           ("weights MiB", "weights_mib", ".1f"), ("max |Δ| vs eager", "max_diff", ".1e"),
           ("torch", "torch", ""), ("device", "device", "")]
_MODELS: dict = {}


def model(impl: str):
    """The benchmark's model with ``attn_implementation=impl`` (same weights for all)."""
    if impl not in _MODELS:
        import attnkit.integrations.transformers  # noqa: F401  registers "attnkit"
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             num_key_value_heads=KV_HEADS, head_dim=D,
                             max_position_embeddings=8192)
        torch.manual_seed(0)
        _MODELS[impl] = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=impl).eval()
    return _MODELS[impl]


def ids_of(T: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))


def cases(T: int, env: dict) -> list[_common.Case]:
    import attnkit

    def forward():
        m, ids = model("attnkit"), ids_of(T)

        def run():
            with torch.no_grad():
                return m.base_model(ids, use_cache=False)
        return run

    def inspect(layers, heads):
        def setup():
            m, ids = model("attnkit"), ids_of(T)
            return lambda: attnkit.inspect(m, ids, layers=layers, heads=heads,
                                           use_cache=False)
        return setup

    def eager():
        m, ids = model("eager"), ids_of(T)

        def run():
            with torch.no_grad():
                return m.base_model(ids, use_cache=False, output_attentions=True).attentions
        return run

    weights = T * T * 4 / 2**20  # one head's float32 (T, T) weights, MiB
    info = dict(T=T, torch=env["torch"], device=env["device"])
    return [
        _common.Case(str(T), "attnkit forward", forward, peer=False,
                     info={**info, "heads_kept": 0, "weights_mib": 0.0}),
        _common.Case(str(T), "inspect 2 heads", inspect(CHOSEN_LAYERS, CHOSEN_HEADS),
                     info={**info, "heads_kept": len(CHOSEN_LAYERS) * len(CHOSEN_HEADS),
                           "weights_mib": len(CHOSEN_LAYERS) * len(CHOSEN_HEADS) * weights}),
        _common.Case(str(T), "inspect all heads", inspect(None, None),
                     info={**info, "heads_kept": LAYERS * HEADS,
                           "weights_mib": LAYERS * HEADS * weights}),
        _common.Case(str(T), "eager output_attentions", eager,
                     info={**info, "heads_kept": LAYERS * HEADS,
                           "weights_mib": LAYERS * HEADS * weights}),
    ]


def check(rows: list[dict], T: int) -> None:
    """``max |Δ|`` of inspect's weights against eager's, for inspect's rows."""
    import attnkit

    ids = ids_of(T)
    with torch.no_grad():
        expected = model("eager").base_model(ids, use_cache=False,
                                             output_attentions=True).attentions
    for row in rows:
        if not row["impl"].startswith("inspect"):
            continue
        layers, heads = (CHOSEN_LAYERS, CHOSEN_HEADS) if row["impl"] == "inspect 2 heads" \
            else (None, None)
        maps = attnkit.inspect(model("attnkit"), ids, layers=layers, heads=heads,
                               use_cache=False)
        row["max_diff"] = max((maps[l, h] - expected[l][:, h]).abs().max().item()
                              for l in maps.layers for h in maps.heads)
        del maps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--length", type=int, help="T (default 4096; --quick 128)")
    args = parser.parse_args(argv)
    T = args.length or (128 if args.quick else 4096)
    env = _common.environment()
    rows = _common.run_cases(cases(T, env), args, warmup=0, reps=1 if args.quick else 3)
    if rows is None:  # the peak-memory subprocess
        return
    check(rows, T)
    env["threads"] = torch.get_num_threads()
    print(_common.header_text(env))
    print(f"Tiny Llama: hidden {HIDDEN}, {HEADS} query heads x {D} on {KV_HEADS} key/value "
          f"heads, {LAYERS} layers, float32, batch 1, T = {T}; inspect 2 heads = layer "
          f"{CHOSEN_LAYERS}, heads {CHOSEN_HEADS}")
    print(_common.format_table(rows, COLUMNS))
    if args.json:
        _common.write_json(args.json, env, vars(args), rows)


if __name__ == "__main__":
    main()
