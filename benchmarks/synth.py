"""Generate synthetic Hugging Face style checkpoints for benchmarking merges.

Writes DIR/base and DIR/ft1..ftN, each a sharded safetensors checkpoint
(``model-0000i-of-0000K.safetensors`` + ``model.safetensors.index.json`` +
``config.json``) whose tensor names and shapes match a real model, so a merge
engine sees the same I/O pattern and tensor mix it would in practice.

Nothing is ever held whole in memory: every tensor is produced in fixed-size
fp32 chunks from a per-chunk seeded generator and written straight to disk by
a hand-rolled safetensors writer, so generating a 7 GB model needs ~100 MB.

Fine-tunes are ``base + tau`` where ``tau ~ N(0, 1e-3)`` with about half of
its entries exactly zero, so TIES trimming and DARE dropping have real work to
do, and unchanged entries are bit-identical to the base.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK_ELEMS = 1 << 22  # 16 MiB of fp32 scratch per chunk; part of the seed schedule
BASE_STD = 0.02
TAU_STD = 1e-3
# Norm weights sit near 1.0 where a bf16 step is ~0.008; a 1e-3 delta would
# round away, so their task vectors are larger.
NORM_TAU_STD = 1e-2
# |z| < 0.6745 for half of a standard normal: zeroing those gives 50% density.
HALF_MASS_Z = 0.6745

DTYPES = {
    "bf16": (torch.bfloat16, "BF16", "bfloat16"),
    "fp16": (torch.float16, "F16", "float16"),
    "fp32": (torch.float32, "F32", "float32"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor; ``is_norm`` tensors are centred on 1, not 0."""

    name: str
    shape: tuple[int, ...]
    is_norm: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Preset:
    """Tensor list, HF config and default shard size of one synthetic model."""

    specs: list[TensorSpec]
    config: dict
    shard_size: int


def llama_specs(vocab: int, hidden: int, inter: int, layers: int, heads: int,
                kv_heads: int) -> list[TensorSpec]:
    """Llama tensor list (untied lm_head, RMSNorm weights, GQA k/v)."""
    kv_dim = hidden // heads * kv_heads
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "self_attn.q_proj.weight", (hidden, hidden)),
            TensorSpec(p + "self_attn.k_proj.weight", (kv_dim, hidden)),
            TensorSpec(p + "self_attn.v_proj.weight", (kv_dim, hidden)),
            TensorSpec(p + "self_attn.o_proj.weight", (hidden, hidden)),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, hidden)),
            TensorSpec(p + "mlp.up_proj.weight", (inter, hidden)),
            TensorSpec(p + "mlp.down_proj.weight", (hidden, inter)),
            TensorSpec(p + "input_layernorm.weight", (hidden,), True),
            TensorSpec(p + "post_attention_layernorm.weight", (hidden,), True),
        ]
    specs += [
        TensorSpec("model.norm.weight", (hidden,), True),
        TensorSpec("lm_head.weight", (vocab, hidden)),
    ]
    return specs


def llama_config(vocab: int, hidden: int, inter: int, layers: int, heads: int,
                 kv_heads: int) -> dict:
    """A config.json complete enough for tools that read Llama configs."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


def t5_attention(prefix: str, d_model: int, inner: int) -> list[TensorSpec]:
    """q/k/v/o projections of one T5 attention sub-layer."""
    return [
        TensorSpec(f"{prefix}.q.weight", (inner, d_model)),
        TensorSpec(f"{prefix}.k.weight", (inner, d_model)),
        TensorSpec(f"{prefix}.v.weight", (inner, d_model)),
        TensorSpec(f"{prefix}.o.weight", (d_model, inner)),
    ]


def t5_stack(stack: str, layers: int, d_model: int, d_ff: int, heads: int,
             d_kv: int, buckets: int) -> list[TensorSpec]:
    """Encoder or decoder stack of a gated-gelu (m)T5 model."""
    inner = heads * d_kv
    specs = []
    for i in range(layers):
        b = f"{stack}.block.{i}.layer"
        specs += t5_attention(f"{b}.0.SelfAttention", d_model, inner)
        if i == 0:
            specs.append(TensorSpec(
                f"{b}.0.SelfAttention.relative_attention_bias.weight", (buckets, heads)))
        specs.append(TensorSpec(f"{b}.0.layer_norm.weight", (d_model,), True))
        ff = 1
        if stack == "decoder":
            specs += t5_attention(f"{b}.1.EncDecAttention", d_model, inner)
            specs.append(TensorSpec(f"{b}.1.layer_norm.weight", (d_model,), True))
            ff = 2
        specs += [
            TensorSpec(f"{b}.{ff}.DenseReluDense.wi_0.weight", (d_ff, d_model)),
            TensorSpec(f"{b}.{ff}.DenseReluDense.wi_1.weight", (d_ff, d_model)),
            TensorSpec(f"{b}.{ff}.DenseReluDense.wo.weight", (d_model, d_ff)),
            TensorSpec(f"{b}.{ff}.layer_norm.weight", (d_model,), True),
        ]
    specs.append(TensorSpec(f"{stack}.final_layer_norm.weight", (d_model,), True))
    return specs


def mt5_preset(layers: int = 24, d_model: int = 2048, d_ff: int = 5120, heads: int = 32, d_kv: int = 64,
               vocab: int = 250112) -> Preset:
    """mT5-XL shapes: 3.7B parameters, two 250k x 2048 embedding matrices (``layers`` encoder
    and as many decoder layers; fewer than 24 keep every width and the vocabulary; the widths
    are arguments only for the smoke tests' miniatures)."""
    buckets = 32
    specs = [TensorSpec("shared.weight", (vocab, d_model))]
    for stack in ("encoder", "decoder"):
        specs += t5_stack(stack, layers, d_model, d_ff, heads, d_kv, buckets)
    specs.append(TensorSpec("lm_head.weight", (vocab, d_model)))
    config = {
        "architectures": ["MT5ForConditionalGeneration"],
        "model_type": "mt5",
        "vocab_size": vocab,
        "d_model": d_model,
        "d_ff": d_ff,
        "d_kv": d_kv,
        "num_heads": heads,
        "num_layers": layers,
        "num_decoder_layers": layers,
        "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": False,
    }
    return Preset(specs, config, 2 * 10**9)


def get_preset(name: str, layers: int | None = None) -> Preset:
    """Look up a preset by CLI name; ``layers`` sizes it (per stack for mt5-xl), the widths stay."""
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be at least 1, not {layers}")
    if name == "llama-1.1b":  # TinyLlama-1.1B
        dims = dict(vocab=32000, hidden=2048, inter=5632, layers=layers or 22, heads=32, kv_heads=4)
        return Preset(llama_specs(**dims), llama_config(**dims), 2 * 10**9)
    if name == "tiny":  # ~5M params; small shards so sharding is exercised
        dims = dict(vocab=4096, hidden=256, inter=704, layers=layers or 4, heads=8, kv_heads=2)
        return Preset(llama_specs(**dims), llama_config(**dims), 4 * 10**6)
    if name == "mt5-xl":
        return mt5_preset(layers or 24)
    raise ValueError(f"unknown preset {name!r}")


PRESETS = ("llama-1.1b", "mt5-xl", "tiny")


def parse_size(text: str) -> int:
    """Parse '2GB' (decimal, as HF shard sizes are) or '1GiB' (binary) to bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    number, prefix, binary = m.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(prefix.upper() or " "))


def plan_shards(specs: list[TensorSpec], itemsize: int, shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors into shards in order, as HF ``save_pretrained`` does.

    The plan is made before any data is generated because every shard file
    name embeds the total shard count.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def safetensors_header(specs: list[TensorSpec], st_dtype: str, itemsize: int) -> bytes:
    """Length-prefixed safetensors header, space-padded to an 8-byte multiple."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        end = offset + spec.numel * itemsize
        header[spec.name] = {"dtype": st_dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def chunk_seed(tensor_index: int, chunk_index: int, stream: int) -> int:
    """Seed of one chunk; stream 0 is the base, stream i the i-th task vector."""
    return ((tensor_index * 100_003 + chunk_index) * 1_009 + stream) & ((1 << 63) - 1)


def tensor_chunks(spec: TensorSpec, tensor_index: int, variant: int,
                  dtype: torch.dtype, gen: torch.Generator, scratch: torch.Tensor,
                  tau: torch.Tensor):
    """Yield the tensor's values in target dtype, chunk by chunk.

    variant 0 is the base model; variant i > 0 is fine-tune i. The base chunk
    is rounded to the target dtype before the task vector is added so that
    entries where tau is zero are bit-identical to the base checkpoint.
    """
    tau_std = NORM_TAU_STD if spec.is_norm else TAU_STD
    for ci, start in enumerate(range(0, spec.numel, CHUNK_ELEMS)):
        n = min(CHUNK_ELEMS, spec.numel - start)
        base = scratch[:n]
        gen.manual_seed(chunk_seed(tensor_index, ci, 0))
        base.normal_(1.0 if spec.is_norm else 0.0, BASE_STD, generator=gen)
        out = base.to(dtype)
        if variant:
            t = tau[:n]
            gen.manual_seed(chunk_seed(tensor_index, ci, variant))
            t.normal_(0.0, tau_std, generator=gen)
            t.masked_fill_(t.abs() < HALF_MASS_Z * tau_std, 0.0)
            out = t.add_(out).to(dtype)
        yield out


def write_model(preset: Preset, out_dir: Path, variant: int, dtype_key: str,
                shard_size: int) -> int:
    """Write one full checkpoint to out_dir; returns the tensor data bytes."""
    dtype, st_dtype, cfg_dtype = DTYPES[dtype_key]
    itemsize = torch.empty((), dtype=dtype).element_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(preset.specs, itemsize, shard_size)
    index_of = {spec.name: i for i, spec in enumerate(preset.specs)}
    gen = torch.Generator()
    scratch = torch.empty(CHUNK_ELEMS)
    tau = torch.empty(CHUNK_ELEMS)
    weight_map, total = {}, 0
    for si, shard in enumerate(shards, 1):
        fname = f"model-{si:05d}-of-{len(shards):05d}.safetensors"
        with open(out_dir / fname, "wb") as f:
            f.write(safetensors_header(shard, st_dtype, itemsize))
            for spec in shard:
                for chunk in tensor_chunks(spec, index_of[spec.name], variant, dtype,
                                           gen, scratch, tau):
                    f.write(chunk.view(torch.uint8).numpy())
                total += spec.numel * itemsize
                weight_map[spec.name] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = dict(preset.config, torch_dtype=cfg_dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return total


def model_dirs(root: Path, n_finetunes: int) -> tuple[Path, list[Path]]:
    """Paths of the base and fine-tune checkpoints under a data directory."""
    return root / "base", [root / f"ft{i}" for i in range(1, n_finetunes + 1)]


def generate(preset_name: str | Preset, out: Path, n_finetunes: int = 3, dtype_key: str = "bf16",
             shard_size: int | None = None, log=print, layers: int | None = None) -> dict:
    """Write base + fine-tunes (a preset by name, or a Preset); returns per-model timings."""
    preset = preset_name if isinstance(preset_name, Preset) else get_preset(preset_name, layers)
    shard_size = shard_size or preset.shard_size
    base, fts = model_dirs(out, n_finetunes)
    timings = {}
    for variant, path in enumerate([base, *fts]):
        t0 = time.perf_counter()
        nbytes = write_model(preset, path, variant, dtype_key, shard_size)
        dt = time.perf_counter() - t0
        timings[path.name] = dt
        log(f"wrote {path} ({nbytes / 1e9:.2f} GB) in {dt:.1f}s "
            f"({nbytes / 1e9 / dt:.2f} GB/s)")
    return timings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=PRESETS, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-finetunes", type=int, default=3)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--shard-size", type=parse_size, default=None,
                    help="max bytes per shard, e.g. 2GB or 500MiB (preset default if omitted)")
    ap.add_argument("--layers", type=int, default=None,
                    help="layers (per stack for mt5-xl) instead of the preset's; widths and vocabulary stay")
    args = ap.parse_args(argv)
    generate(args.preset, args.out, args.n_finetunes, args.dtype, args.shard_size, layers=args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
