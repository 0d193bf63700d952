"""The built-in example: a small family of checkpoints, merged with every method, checked.

`python -m tensormerge.example [--workdir DIR]` writes a bf16 Llama-shaped base and three
fine-tunes (sharded, with an index), merges them through the CLI with every registered method
under a memory budget small enough to force row chunks, and prints per method: seconds, MB/s,
peak RSS and the largest difference to a float64 merge computed here in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

from tensormerge.kernels.reference import dare_keep
from tensormerge.methods import REGISTRY

HIDDEN, FF, VOCAB, LAYERS = 256, 688, 4096, 4
MAX_MEMORY = "8MiB"


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            out[p + f"self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        out[p + "mlp.gate_proj.weight"] = (FF, HIDDEN)
        out[p + "mlp.up_proj.weight"] = (FF, HIDDEN)
        out[p + "mlp.down_proj.weight"] = (HIDDEN, FF)
        out[p + "input_layernorm.weight"] = (HIDDEN,)
        out[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def write_family(root: str, n: int = 3) -> tuple[str, list[str]]:
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes().items()}
    models = {"base": base}
    for i in range(n):
        models[f"ft{i + 1}"] = {k: (v.float() + torch.randn(v.shape, generator=g) * 2e-3
                                    * (torch.rand(v.shape, generator=g) < 0.5)).bfloat16() for k, v in base.items()}
    for name, sd in models.items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        keys = list(sd)
        half = len(keys) // 2
        files = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        for fname, ks in files.items():
            save_file({k: sd[k] for k in ks}, os.path.join(d, fname))
        index = {"metadata": {"total_size": sum(t.numel() * 2 for t in sd.values())},
                 "weight_map": {k: f for f, ks in files.items() for k in ks}}
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS}, f)
    return os.path.join(root, "base"), [os.path.join(root, f"ft{i + 1}") for i in range(n)]


def float64_reference(method: str, base: dict, fts: list[dict]) -> dict[str, torch.Tensor]:
    """Each method's formula on whole tensors in float64 (TIES: global top-k by a full sort)."""
    b = {k: v.double() for k, v in base.items()}
    taus = [{k: ft[k].double() - b[k] for k in b} for ft in fts]
    if method == "average":
        return {k: sum(ft[k].double() for ft in fts) / len(fts) for k in b}
    if method == "task_arithmetic":
        return {k: b[k] + 0.3 * sum(t[k] for t in taus) for k in b}
    if method == "dare":
        return {k: b[k] + sum(dare_keep(0, i, k, 0, b[k].numel(), 0.5).reshape(b[k].shape) * t[k] / 0.5
                              for i, t in enumerate(taus)) for k in b}
    if method == "ties":
        flat = torch.stack([torch.cat([t[k].reshape(-1) for k in b]) for t in taus])
        D = flat.shape[1]
        thr = flat.float().abs().sort(dim=1).values[:, D - math.floor(D * 0.2) - 1]
        trimmed = flat * (flat.float().abs() >= thr[:, None])
        sign = torch.sign(trimmed.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        sel = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
        merged = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
        out, pos = {}, 0
        for k in b:
            out[k] = b[k] + merged[pos:pos + b[k].numel()].reshape(b[k].shape)
            pos += b[k].numel()
        return out
    raise KeyError(method)


def load(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="where to write the models (default: a temporary directory)")
    args = ap.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="tensormerge-example-")
    t0 = time.perf_counter()
    base, fts = write_family(root)
    size = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
    print(f"wrote base + {len(fts)} fine-tunes ({size / 1e6:.1f} MB each, bf16, 2 shards) to {root} "
          f"in {time.perf_counter() - t0:.1f} s; merging with --max-memory {MAX_MEMORY}\n")
    base_sd, ft_sds = load(base), [load(p) for p in fts]
    rows = []
    for method in sorted(REGISTRY):
        out = os.path.join(root, f"out-{method}")
        report = os.path.join(root, f"report-{method}.json")
        cmd = [sys.executable, "-m", "tensormerge", "run", "--method", method, "--inputs", ",".join(fts),
               "--base", base, "--output", out, "--max-memory", MAX_MEMORY, "--report", report, "--quiet",
               "--overwrite"]
        subprocess.run(cmd, check=True)
        with open(report) as f:
            rep = json.load(f)
        ref = float64_reference(method, base_sd, ft_sds)
        got = load(out)
        diff = max((got[k].double() - ref[k].to(got[k].dtype).double()).abs().max().item() for k in ref)
        mbps = rep["bytes_read"] / rep["seconds"] / 1e6
        rows.append((method, rep["seconds"], mbps, rep["peak_rss_bytes"] / 2**20, rep["peak_budgeted_bytes"] / 2**20, diff))
    print(f"{'method':<16} {'seconds':>8} {'MB/s':>8} {'peak RSS MiB':>13} {'tensor MiB':>11} {'max |diff| vs f64':>18}")
    for r in rows:
        print(f"{r[0]:<16} {r[1]:>8.2f} {r[2]:>8.1f} {r[3]:>13.0f} {r[4]:>11.1f} {r[5]:>18.2e}")
    print("\n(max |diff| compares the bf16 output with the float64 merge rounded to bf16: 0 or one bf16 ulp)")


if __name__ == "__main__":
    main()
