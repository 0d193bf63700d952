"""The built-in example: a small family of checkpoints, merged with every method, checked.

`python -m tensormerge.example [--workdir DIR]` writes a bf16 Llama-shaped base and three
fine-tunes (sharded, with an index) and, for each model, synthetic statistics saved the way the
research code saves them (`torch.save` dicts: Fishers by parameter name, Grams by module name)
and converted with `tensormerge stats import`. It merges the family through the CLI with every
registered method under a memory budget small enough to force row chunks, and prints per method:
seconds, MB/s, peak RSS and the largest difference, in units in the last place of the output
dtype, to a float64 merge computed here in memory.
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
from tensormerge.methods.mats import cg_summary

HIDDEN, FF, VOCAB, LAYERS = 256, 688, 4096, 4
MAX_MEMORY = "8MiB"
# MaTS solves each linear weight whole (K-FAC for a 256x688 weight of three models holds ~29 MiB)
# and RegMean holds each weight's Grams, their factorisation and the shares (~22 MiB for the
# 688-wide input, ~35 MiB with a 256-row tile).
MEMORY = {"mats": "48MiB", "regmean": "40MiB"}


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


def _gram(d: int, g: torch.Generator) -> torch.Tensor:
    """XᵀX/n of correlated activations: SPD, with a spread of scales like real inputs."""
    n = 4 * d
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5)
    return (x.T @ x / n).float()


def write_statistics(root: str, paths: list[str], sds: list[dict]) -> list[str]:
    """Per model: a Fisher dict and input/output Gram dicts as the research code saves them (Grams
    keyed by module name), imported into one store per model as `tensormerge stats import
    FILE --kind K --model M --output S.zarr --append` does."""
    from tensormerge.stats.importers import import_stats

    stores = []
    for i, (path, sd) in enumerate(zip(paths, sds)):
        g = torch.Generator().manual_seed(100 + i)
        linear = [k for k, v in sd.items() if v.dim() == 2 and "embed" not in k]
        files = {
            "fisher": {k: (torch.randn(v.shape, generator=g) * 1e-3) ** 2 for k, v in sd.items()},
            "gram_in": {k.removesuffix(".weight"): _gram(sd[k].shape[1], g) for k in linear},
            "gram_out": {k.removesuffix(".weight"): _gram(sd[k].shape[0], g) for k in linear if "lm_head" not in k},
        }
        store = os.path.join(root, f"stats-{os.path.basename(path)}.zarr")
        for kind, data in files.items():
            src = os.path.join(root, f"{kind}-{os.path.basename(path)}.pt")
            torch.save(data, src)
            import_stats(src, kind, store, model=path, overwrite=True, append=kind != "fisher")
        stores.append(store)
    return stores


def read_stats(store: str) -> dict[str, dict[str, torch.Tensor]]:
    from tensormerge.stats.store import StatsStore

    s = StatsStore(store)
    return {kind: {n: s.read(kind, n).double() for n in arrays} for kind, arrays in s.arrays.items()}


def _cg64(apply, b: torch.Tensor, x: torch.Tensor, tol: float = 1e-12, iters: int = 2000) -> torch.Tensor:
    r = b - apply(x)
    p, rr = r.clone(), float((r * r).sum())
    for _ in range(iters):
        if rr ** 0.5 <= tol * float(b.norm()):
            break
        ap = apply(p)
        a = rr / float((p * ap).sum())
        x, r = x + a * p, r - a * ap
        new = float((r * r).sum())
        p, rr = r + (new / rr) * p, new
    return x


def float64_reference(method: str, base: dict, fts: list[dict], stats: list[dict], base_stats: dict) -> dict:
    """Each method's formula on whole tensors in float64 (TIES: global top-k by a full sort;
    MaTS: the exact solution of its linear system, which its CG approaches to `tol`)."""
    b = {k: v.double() for k, v in base.items()}
    taus = [{k: ft[k].double() - b[k] for k in b} for ft in fts]
    thetas = [{k: ft[k].double() for k in b} for ft in fts]
    if method == "fisher":
        fs = [{k: s["fisher"][k].clamp(min=1e-8) for k in b} for s in stats]
        return {k: sum(f[k] * t[k] for f, t in zip(fs, thetas)) / sum(f[k] for f in fs) for k in b}
    if method == "ubgm":
        h0 = base_stats["fisher"]
        out = {}
        for k in b:
            hs = [s["fisher"][k] for s in stats]
            hbar = sum(hs) + h0[k] + 1e-12
            out[k] = b[k] + sum((h + h0[k] + 1e-12) / hbar * t[k] for h, t in zip(hs, taus))
        return out
    if method in ("regmean", "mats"):
        out = {k: sum(t[k] for t in thetas) / len(thetas) for k in b}
        for k in b:
            mod = k.removesuffix(".weight")
            if method == "regmean" and mod in stats[0]["gram_in"]:
                gs = [s["gram_in"][mod] for s in stats]
                out[k] = torch.linalg.solve(sum(gs), sum(g @ t[k].T for g, t in zip(gs, thetas))).T
            if method == "mats" and mod in stats[0]["gram_out"]:
                a = torch.stack([s["gram_in"][mod] for s in stats])
                bo = torch.stack([s["gram_out"][mod] for s in stats])
                ws = torch.stack([t[k] for t in thetas])
                out[k] = _cg64(lambda w: (bo @ w @ a).sum(0), (bo @ ws @ a).sum(0), out[k])
        return out
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


def ulps(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |got - ref rounded to got's dtype|, in units in the last place of the tensor's
    largest value: per-value ulps would explode where a merge cancels to near zero, and the
    float32 arithmetic's error scales with the inputs, not with the result."""
    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[got.dtype]
    r = ref.to(got.dtype).double()
    top = float(r.abs().max())
    if top == 0.0:
        return float((got.double() - r).abs().max() > 0)
    ulp = 2.0 ** (torch.floor(torch.log2(torch.tensor(top))).item() - mantissa)
    return float((got.double() - r).abs().max() / ulp)


def load(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


ARGS = {  # method -> extra CLI arguments beyond inputs/base/output
    "fisher": ["--stats", "{stats}"],
    "regmean": ["--stats", "{stats}"],
    "mats": ["--stats", "{stats}"],
    "ubgm": ["--stats", "{stats}", "--base-stats", "{base_stats}"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="where to write the models (default: a temporary directory)")
    args = ap.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="tensormerge-example-")
    t0 = time.perf_counter()
    base, fts = write_family(root)
    size = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
    print(f"wrote base + {len(fts)} fine-tunes ({size / 1e6:.1f} MB each, bf16, 2 shards) to {root} "
          f"in {time.perf_counter() - t0:.1f} s; merging with --max-memory {MAX_MEMORY} "
          f"({', '.join(f'{m}: {v}' for m, v in MEMORY.items())})\n")
    base_sd, ft_sds = load(base), [load(p) for p in fts]
    t0 = time.perf_counter()
    stores = write_statistics(root, fts + [base], ft_sds + [base_sd])
    stats = [read_stats(s) for s in stores]
    print(f"wrote and imported statistics (Fishers, input and output Grams) for every model in "
          f"{time.perf_counter() - t0:.1f} s\n")
    rows = []
    for method in sorted(REGISTRY):
        out = os.path.join(root, f"out-{method}")
        report = os.path.join(root, f"report-{method}.json")
        extra = [a.format(stats=",".join(stores[:-1]), base_stats=stores[-1]) for a in ARGS.get(method, [])]
        cmd = [sys.executable, "-m", "tensormerge", "run", "--method", method, "--inputs", ",".join(fts),
               "--base", base, "--output", out, "--max-memory", MEMORY.get(method, MAX_MEMORY), "--report", report,
               "--quiet", "--overwrite", *extra]
        subprocess.run(cmd, check=True)
        with open(report) as f:
            rep = json.load(f)
        ref = float64_reference(method, base_sd, ft_sds, stats[:-1], stats[-1])
        got = load(out)
        diff = max(ulps(got[k], ref[k]) for k in ref)
        mbps = rep["bytes_read"] / rep["seconds"] / 1e6
        rows.append((method, rep["seconds"], mbps, rep["peak_rss_bytes"] / 2**20, rep["peak_budgeted_bytes"] / 2**20, diff))
    print(f"{'method':<16} {'seconds':>8} {'MB/s':>8} {'peak RSS MiB':>13} {'tensor MiB':>11} {'ulps vs f64':>12}")
    for r in rows:
        print(f"{r[0]:<16} {r[1]:>8.2f} {r[2]:>8.1f} {r[3]:>13.0f} {r[4]:>11.1f} {r[5]:>12.2f}")
    print("\n(largest difference between the bf16 output and the float64 merge rounded to bf16, in bf16 ulps of"
          "\n each tensor's largest value: up to 1 is rounding; regmean multiplies in float32 and mats stops at a"
          "\n relative residual of 1e-5, so theirs can be a little larger)")
    mats = json.load(open(os.path.join(root, "report-mats.json")))
    print(cg_summary(mats["blocks"], mats["params"]["tol"]))


if __name__ == "__main__":
    main()
