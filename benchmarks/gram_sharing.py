"""What one input Gram per distinct input saves, at mT5-XL and Llama-7B shapes (issue 17, item 1).

The sharing is not counted by hand: each model is built from its configuration on the meta
device (no weights, no memory) and `stats compute`'s own detection (GramHooks.probe) runs one
forward over it, so the table shows what `stats compute` would store for the real models.
Sizes are float32 (the accumulators and the store); on disk Blosc saves little on dense Grams,
so the disk column is the uncompressed size. Compute is the Gram accumulation (2 d^2 flops per
token per Gram, as addmm does it), per token of each side (as many encoder as decoder tokens).

    python benchmarks/gram_sharing.py            # prints the markdown table of benchmarks/README.md
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tensormerge.stats_compute.hooks import GramHooks, linear_kind  # noqa: E402


def mt5_xl():
    from transformers import MT5Config, MT5ForConditionalGeneration

    cfg = MT5Config(vocab_size=250112, d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                    num_decoder_layers=24, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = MT5ForConditionalGeneration(cfg)
    ids = torch.ones(1, 8, dtype=torch.long, device="meta")
    return "mT5-XL", "seq2seq", model, lambda: model(input_ids=ids, decoder_input_ids=ids[:, :4])


def llama_7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    ids = torch.ones(1, 8, dtype=torch.long, device="meta")
    return "Llama-7B", "causal", model, lambda: model(input_ids=ids)


def measure(make) -> dict:
    name, task, model, forward = make()
    model.eval()
    loaded = SimpleNamespace(model=model, task=task, adapter=None, own_key=lambda n: n)
    hooks = GramHooks(loaded, True, True, torch.float32, block_bytes=1 << 30)
    with torch.no_grad():
        alias = hooks.probe(forward)
    d_in = {}
    gram_out = 0
    for key, (mod, _, kind) in hooks.layers.items():
        out_f, in_f = mod.weight.shape if kind == "linear" else mod.weight.shape[::-1]
        d_in[key] = in_f
        if mod is not model.get_output_embeddings():  # K-FAC skips the vocabulary-sized output layer
            gram_out += out_f * out_f
    every = sum(d * d for d in d_in.values())
    shared = sum(d * d for k, d in d_in.items() if k not in alias)
    return {"model": name, "weights": len(d_in), "grams": len(d_in) - len(alias), "aliases": len(alias),
            "in_every": every, "in_shared": shared, "out": gram_out}


def gb(n_floats: int) -> str:
    return f"{4 * n_floats / 1e9:.2f}"


def main() -> None:
    rows = [measure(m) for m in (mt5_xl, llama_7b)]
    print("| model | linear weights | input Grams stored | aliases | input Grams, GB (memory = disk) "
          "| saved | Gram flops per token, G | K-FAC store (with gram_out), GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        saved = 1 - r["in_shared"] / r["in_every"]
        print(f"| {r['model']} | {r['weights']} | {r['grams']} | {r['aliases']} | "
              f"{gb(r['in_every'])} -> {gb(r['in_shared'])} | {100 * saved:.1f}% | "
              f"{2 * r['in_every'] / 1e9:.2f} -> {2 * r['in_shared'] / 1e9:.2f} | "
              f"{gb(r['in_every'] + r['out'])} -> {gb(r['in_shared'] + r['out'])} "
              f"({100 * (r['in_every'] - r['in_shared']) / (r['in_every'] + r['out']):.1f}% less) |")


if __name__ == "__main__":
    main()
