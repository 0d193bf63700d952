"""What a cold read costs in CPU, by how it is read: buffered (through the page cache) against
O_DIRECT (past it), sequential or as a merge interleaves its models, each after an eviction.

The cold targets of issue 17 hold a merge against one sequential buffered read of its inputs.
On a 2-core machine with a fast disk that floor is itself most of a core: the kernel allocates,
fills and copies every page-cache page (system time). A merge needs that core for the same
reads plus its own compute, so it cannot reach the floor when the floor keeps one core busy.
This measures how much of a core each way of reading costs, in the same minutes:

- ``buffered``: the cold read floor itself (16 MiB reads into one buffer, file after file);
- ``direct xT``: O_DIRECT reads of 16 MiB on T threads, file after file (queue depth T);
- ``direct interleaved``: chunk k of every model in turn, each 24 MiB chunk split into parts
  read at once on a pool and waited for, as a merge's reader would without a deeper queue.

    python benchmarks/read_paths.py --data /work/bench-data/llama-1.1b [--repeats 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cold  # noqa: E402

MiB = 1 << 20


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _measure(name: str, paths: list[Path], read) -> dict:
    cold.cold_start(paths)
    resident = cold.resident_fraction(paths)
    u0, s0 = _cpu()
    t0 = time.perf_counter()
    nbytes = read(paths)
    seconds = time.perf_counter() - t0
    u1, s1 = _cpu()
    return {"way": name, "bytes": nbytes, "s": seconds, "GBps": nbytes / 1e9 / seconds,
            "user_s": u1 - u0, "sys_s": s1 - s0, "resident_before": resident}


def _direct_interleaved(chunk: int, part: int):
    def read(paths: list[Path]) -> int:
        buf = memoryview(mmap.mmap(-1, chunk))
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
        sizes = [p.stat().st_size for p in paths]
        total = 0
        try:
            with ThreadPoolExecutor(chunk // part) as ex:
                for off in range(0, max(sizes), chunk):
                    for fd, size in zip(fds, sizes):
                        if off < size:
                            futs = [ex.submit(os.preadv, fd, [buf[s:s + part]], off + s) for s in range(0, chunk, part)]
                            total += sum(f.result() for f in futs)
        finally:
            for fd in fds:
                os.close(fd)
        return total
    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a run_bench.py preset's directory")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    models = sorted(d for d in args.data.iterdir() if d.is_dir() and any(d.glob("*.safetensors")))
    paths = [p for d in models for p in sorted(d.glob("*.safetensors"))]
    ways = [("buffered (the cold read floor)", cold.read_all),
            ("direct x1", cold.direct_reader(16 * MiB, 1)), ("direct x4", cold.direct_reader(16 * MiB, 4)),
            ("direct x2, 64 MiB", cold.direct_reader(64 * MiB, 2)),
            ("direct interleaved, 24 MiB in 8 MiB parts", _direct_interleaved(24 * MiB, 8 * MiB))]
    rows = []
    for r in range(args.repeats):
        for name, read in ways:  # alternated, so a drift of the disk touches every way alike
            row = _measure(name, paths, read)
            row["repeat"] = r + 1
            rows.append(row)
            print(f"repeat {r + 1}: {name:<42} {row['s']:6.2f} s {row['GBps']:5.2f} GB/s  "
                  f"user {row['user_s']:5.2f} s  sys {row['sys_s']:5.2f} s", flush=True)
    print(f"\n{sum(p.stat().st_size for p in paths) / 1e9:.1f} GB in {len(paths)} files, {os.cpu_count()} cores, "
          f"load before {os.getloadavg()[0]:.2f}\n")
    print("| way | s (range) | GB/s (best) | system CPU s (range) | cores busy in the kernel |")
    print("|---|---|---|---|---|")
    for name, _ in ways:
        mine = [x for x in rows if x["way"] == name]
        s = [x["s"] for x in mine]
        sy = [x["sys_s"] for x in mine]
        busy = [x["sys_s"] / x["s"] for x in mine]
        print(f"| {name} | {min(s):.2f}-{max(s):.2f} | {max(x['GBps'] for x in mine):.2f} | "
              f"{min(sy):.2f}-{max(sy):.2f} | {min(busy):.2f}-{max(busy):.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"paths": [str(p) for p in paths], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
