"""Choose the codec of the statistics store (SPEC §3) by measurement.

Three arrays that look like real statistics are generated here (seeded):

  fisher_embed  diagonal Fisher of a vocabulary embedding, 32768x2048 float32 (a 250112x2048
                embedding, smaller): means of squared heavy-tailed per-example gradients
                (mean of squares of student-t draws x 1e-6, per-row lognormal scale) and ~85%
                of the rows exactly zero (tokens the data never contains); seen tokens are
                more likely at low ids, as in a frequency-ordered sentencepiece vocabulary;
  fisher_dense  diagonal Fisher of a dense 2048x2048 layer (no zero rows, row and column scales);
  gram_in       input Gram X^T X / n of correlated activations, n=4096 tokens, 2048 features
                (low-rank shared factors + per-feature scales + a few outlier features).

Each array is written to a local Zarr v3 array exactly as StatsWriter writes it (row chunks of
`row_chunks()`, about 1 MiB, fill value 0, zarr's default of not writing all-zero chunks), for
each codec candidate, and the script measures the compression ratio (logical bytes / bytes of
chunk files on disk), write MB/s, full-read MB/s (page cache: read twice, the second is timed)
and the MB/s of reading a 24 MiB row range from the middle (what the engine reads; arrays
smaller than 48 MiB read their middle half). Every number is the median of --repeats runs.

    .venv/bin/python benchmarks/stats_codec.py [--quick] [--out results/stats-codec.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from run_bench import cpu_model, git_commit

from tensormerge.stats.store import row_chunks

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"
CURRENT = "blosc-zstd3-shuffle"  # what tensormerge.stats.store._codec() uses


def candidates() -> dict[str, list | None]:
    from zarr.codecs import BloscCodec, ZstdCodec

    out: dict[str, list | None] = {}
    for level in (1, 3, 5):
        for shuffle in ("shuffle", "bitshuffle"):
            out[f"blosc-zstd{level}-{shuffle}"] = [BloscCodec(cname="zstd", clevel=level, shuffle=shuffle)]
    out["blosc-lz4-shuffle"] = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    out["zstd3"] = [ZstdCodec(level=3)]
    out["none"] = None
    return out


def raw_codec(name: str):
    """The numcodecs codec behind a candidate (what zarr's codec calls per chunk); None = copy."""
    import numcodecs

    if name.startswith("blosc-"):
        _, c, shuffle = name.split("-")
        cname, level = (c[:4], int(c[4:])) if c.startswith("zstd") else ("lz4", 5)
        return numcodecs.Blosc(cname=cname, clevel=level, shuffle=numcodecs.Blosc.BITSHUFFLE
                               if shuffle == "bitshuffle" else numcodecs.Blosc.SHUFFLE)
    if name == "zstd3":
        return numcodecs.Zstd(level=3)
    return None


# ----------------------------------------------------------------------------- data
def fisher_embed(rows: int, cols: int, rng: np.random.Generator, zero_frac: float = 0.85) -> np.ndarray:
    # P(seen | id) decays with the id (frequency-ordered vocab); scaled so ~15% of rows are seen.
    profile = (1.0 + np.arange(rows) / 256.0) ** -0.5
    lo, hi = 0.0, 1.0 / profile.min()
    for _ in range(60):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(1.0, c * profile).mean() < 1 - zero_frac else (lo, c)
    seen = rng.random(rows) < np.minimum(1.0, c * profile)
    out = np.zeros((rows, cols), dtype=np.float32)
    idx = np.flatnonzero(seen)
    # frequent tokens see more (and larger) gradients: a per-row scale on top of the t-squares
    row_scale = np.exp(rng.normal(0.0, 1.0, idx.size)) * (1.0 + idx / 256.0) ** -0.5
    for s in range(0, idx.size, 512):
        sl = slice(s, s + 512)
        out[idx[sl]] = _t_squares(rng, (idx[sl].size, cols)) * row_scale[sl, None].astype(np.float32)
    return out


def fisher_dense(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    rs = np.exp(rng.normal(0.0, 0.7, rows)).astype(np.float32)
    cs = np.exp(rng.normal(0.0, 0.7, cols)).astype(np.float32)
    return _t_squares(rng, (rows, cols)) * rs[:, None] * cs[None, :]


def _t_squares(rng: np.random.Generator, shape: tuple[int, int], draws: int = 4, df: float = 3.0) -> np.ndarray:
    acc = np.zeros(shape, dtype=np.float64)
    for _ in range(draws):
        acc += rng.standard_t(df, size=shape) ** 2
    return (acc * (1e-6 / draws)).astype(np.float32)


def gram_in(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    import torch

    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    k = max(8, d // 16)
    shared = torch.randn(n, k, generator=g) @ (torch.randn(k, d, generator=g) / k**0.5)
    x = shared + 0.5 * torch.randn(n, d, generator=g)
    x *= torch.exp(0.5 * torch.randn(d, generator=g))
    outliers = torch.randperm(d, generator=g)[: max(1, d // 512)]
    x[:, outliers] *= 20.0
    return (x.T @ x / n).numpy().astype(np.float32)


def make_arrays(quick: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if quick:
        return {"fisher_embed": fisher_embed(2048, 256, rng), "fisher_dense": fisher_dense(256, 256, rng),
                "gram_in": gram_in(256, 512, rng)}
    return {"fisher_embed": fisher_embed(32768, 2048, rng), "fisher_dense": fisher_dense(2048, 2048, rng),
            "gram_in": gram_in(2048, 4096, rng)}


# ----------------------------------------------------------------------------- measurement
def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")


def measure_once(data: np.ndarray, codec, path: Path, range_bytes: int) -> dict:
    import zarr

    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    arr = zarr.create_array(str(path), shape=data.shape, dtype="float32", chunks=row_chunks(data.shape),
                            compressors=codec, fill_value=0.0, zarr_format=3)
    arr[...] = data
    write_s = time.perf_counter() - t0
    stored = dir_bytes(path)
    arr = zarr.open_array(str(path), mode="r")
    arr[...]
    t0 = time.perf_counter()
    back = arr[...]
    read_s = time.perf_counter() - t0
    if not np.array_equal(back, data):
        raise AssertionError(f"{path}: round trip differs")
    row_bytes = data.nbytes // data.shape[0]
    k = max(1, min(range_bytes, data.nbytes // 2) // row_bytes)
    r0 = (data.shape[0] - k) // 2
    arr[r0:r0 + k]
    t0 = time.perf_counter()
    arr[r0:r0 + k]
    range_s = time.perf_counter() - t0
    return {"stored_bytes": stored, "write_s": write_s, "read_s": read_s, "range_s": range_s,
            "range_rows": k, "range_bytes": k * row_bytes}


def codec_only(data: np.ndarray, name: str, repeats: int) -> dict:
    """In-memory encode/decode MB/s of the chunks zarr would store, one thread (zarr calls blosc
    from worker threads, where numcodecs' Blosc does not start its own threads)."""
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False
    codec = raw_codec(name)
    rows = row_chunks(data.shape)[0]
    chunks = [np.ascontiguousarray(data[r:r + rows]) for r in range(0, data.shape[0], rows)]
    chunks = [c for c in chunks if c.any()]  # zarr does not store all-zero chunks
    nbytes = sum(c.nbytes for c in chunks)
    enc_t, dec_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoded = [codec.encode(c) if codec else c.tobytes() for c in chunks]
        enc_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for e in encoded:
            codec.decode(e) if codec else bytearray(e)
        dec_t.append(time.perf_counter() - t0)
    return {"encode_MBps": nbytes / 1e6 / statistics.median(enc_t), "decode_MBps": nbytes / 1e6 / statistics.median(dec_t),
            "chunk_bytes": nbytes, "encoded_bytes": sum(len(e) for e in encoded)}


def run(arrays: dict[str, np.ndarray], cands: dict, repeats: int, workdir: Path) -> list[dict]:
    rows = []
    for aname, data in arrays.items():
        for cname, codec in cands.items():
            runs = [measure_once(data, codec, workdir / f"{aname}-{cname}.zarr", 24 * MiB) for _ in range(repeats)]
            shutil.rmtree(workdir / f"{aname}-{cname}.zarr", ignore_errors=True)
            med = {k: statistics.median(r[k] for r in runs) for k in ("write_s", "read_s", "range_s")}
            mb = data.nbytes / 1e6
            rb = runs[0]["range_bytes"] / 1e6
            row = {"array": aname, "codec": cname, "shape": list(data.shape), "bytes": data.nbytes,
                   "stored_bytes": runs[0]["stored_bytes"], "ratio": data.nbytes / max(runs[0]["stored_bytes"], 1),
                   "write_MBps": mb / med["write_s"], "read_MBps": mb / med["read_s"],
                   "range_bytes": runs[0]["range_bytes"], "range_MBps": rb / med["range_s"],
                   "runs": runs}
            row["codec_only"] = codec_only(data, cname, repeats)
            rows.append(row)
            print(f"  {aname:13s} {cname:24s} ratio {row['ratio']:5.2f}  write {row['write_MBps']:7.0f}  "
                  f"read {row['read_MBps']:7.0f}  range {row['range_MBps']:7.0f} MB/s"
                  f"  codec enc {row['codec_only']['encode_MBps']:5.0f} dec {row['codec_only']['decode_MBps']:5.0f}", file=sys.stderr, flush=True)
    return rows


def summarise(rows: list[dict], arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per codec over all arrays: total ratio and byte-weighted MB/s (total bytes / total time)."""
    out: dict[str, dict] = {}
    for cname in dict.fromkeys(r["codec"] for r in rows):
        rs = [r for r in rows if r["codec"] == cname]
        total = sum(r["bytes"] for r in rs)
        out[cname] = {
            "ratio": total / sum(r["stored_bytes"] for r in rs),
            "write_MBps": total / 1e6 / sum(r["bytes"] / 1e6 / r["write_MBps"] for r in rs),
            "read_MBps": total / 1e6 / sum(r["bytes"] / 1e6 / r["read_MBps"] for r in rs),
            "range_MBps": sum(r["range_bytes"] for r in rs) / 1e6
            / sum(r["range_bytes"] / 1e6 / r["range_MBps"] for r in rs),
            "codec_encode_MBps": sum(r["codec_only"]["chunk_bytes"] for r in rs) / 1e6
            / sum(r["codec_only"]["chunk_bytes"] / 1e6 / r["codec_only"]["encode_MBps"] for r in rs),
            "codec_decode_MBps": sum(r["codec_only"]["chunk_bytes"] for r in rs) / 1e6
            / sum(r["codec_only"]["chunk_bytes"] / 1e6 / r["codec_only"]["decode_MBps"] for r in rs),
        }
    return out


def markdown(rows: list[dict], summary: dict[str, dict]) -> str:
    lines = ["| array | codec | ratio | write MB/s | read MB/s | 24 MiB range MB/s | codec enc MB/s | codec dec MB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (current)" if r["codec"] == CURRENT else ""
        lines.append(f"| {r['array']} | {r['codec']}{mark} | {r['ratio']:.2f} | {r['write_MBps']:.0f} | "
                     f"{r['read_MBps']:.0f} | {r['range_MBps']:.0f} | {r['codec_only']['encode_MBps']:.0f} | "
                     f"{r['codec_only']['decode_MBps']:.0f} |")
    lines += ["", ("| codec, all three arrays | ratio | write MB/s | read MB/s | range MB/s | codec enc MB/s | "
                   "codec dec MB/s |"), "|---|---|---|---|---|---|---|"]
    for c, s in summary.items():
        mark = " (current)" if c == CURRENT else ""
        lines.append(f"| {c}{mark} | {s['ratio']:.2f} | {s['write_MBps']:.0f} | {s['read_MBps']:.0f} | "
                     f"{s['range_MBps']:.0f} | {s['codec_encode_MBps']:.0f} | {s['codec_decode_MBps']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small arrays, one repeat (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 3, 1 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "stats-codec.json", help="JSON output path")
    ap.add_argument("--workdir", type=Path, default=None, help="where the zarr arrays are written (default: a temp dir)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)

    import zarr

    t0 = time.perf_counter()
    arrays = make_arrays(args.quick, args.seed)
    gen_s = time.perf_counter() - t0
    info = {}
    for name, a in arrays.items():
        chunks = row_chunks(a.shape)
        nchunks = -(-a.shape[0] // chunks[0])
        empty = sum(not a[i * chunks[0]:(i + 1) * chunks[0]].any() for i in range(nchunks))
        info[name] = {"shape": list(a.shape), "bytes": a.nbytes, "chunks": list(chunks), "n_chunks": nchunks,
                      "all_zero_chunks": int(empty), "zero_rows_frac": float((~a.any(axis=1)).mean()),
                      "min_nonzero": float(a[a > 0].min()), "max": float(a.max())}
    print(f"generated {len(arrays)} arrays in {gen_s:.1f} s: " +
          ", ".join(f"{k} {v['shape']} zero rows {v['zero_rows_frac']:.0%}" for k, v in info.items()),
          file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="stats-codec-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        rows = run(arrays, candidates(), repeats, workdir)
        bench_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(rows, arrays)
    md = markdown(rows, summary)
    result = {
        "machine": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu_model": cpu_model(),
                    "cpu_cores": os.cpu_count(), "python": platform.python_version(), "zarr": zarr.__version__,
                    "numcodecs": __import__("numcodecs").__version__, "git_commit": git_commit()},
        "quick": args.quick, "repeats": repeats, "seed": args.seed, "current": CURRENT,
        "write_empty_chunks": zarr.config.get("array.write_empty_chunks"),
        "arrays": info, "candidates": list(candidates()), "results": rows, "summary": summary,
        "seconds": {"generate": gen_s, "bench": bench_s}, "markdown": md,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
