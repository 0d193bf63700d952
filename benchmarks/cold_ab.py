"""One method, cold, commit against commit: runs alternated in the same minutes, each after an
eviction of the inputs, with engine seconds and peak RSS and anonymous memory.

A cold run's time here moves 2-3x with the disk from one minute to the next, so a change to how
the engine reads is judged A/B: the commits take turns, repeat after repeat, and the pairs are
compared, not one run against another session's. Each commit runs from a git worktree of its
own (made in a temporary folder, removed after), with this interpreter. Peak memory is sampled
from /proc every 50 ms and read from the run's report (`peak_anon_bytes`); the anonymous peak is
the one that shows a read's buffers.

    python benchmarks/cold_ab.py --data DIR --method dare --max-memory 1GiB \\
        --commits b8c6588,HEAD [--repeats 3] [--io auto|direct|buffered] [--json F]

DIR holds base/ and ft1.. as `synth.py` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cold  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _peak(pid: int, peaks: dict, done: threading.Event) -> None:
    fields = {"VmRSS:": "rss", "RssAnon:": "anon"}
    while not done.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key = fields.get(line.split(":")[0] + ":")
                if key:
                    peaks[key] = max(peaks.get(key, 0), int(line.split()[1]) * 1024)
        except OSError:  # the child has exited: its status is gone
            return
        done.wait(0.05)


def one_run(tree: Path, data: Path, inputs: list[Path], method: str, max_memory: str, io: str,
            out: Path) -> dict:
    files = [p for d in [data / "base", *inputs] for p in sorted(d.glob("*.safetensors"))]
    cold.cold_start(files)
    report = out.with_suffix(".report.json")
    cmd = [sys.executable, "-m", "tensormerge", "run", "-m", method, "-i", ",".join(map(str, inputs)),
           "-b", str(data / "base"), "-o", str(out), "--max-memory", max_memory, "-q", "--overwrite",
           "--report", str(report)]
    env = dict(os.environ, PYTHONPATH=str(tree), TENSORMERGE_IO=io)
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, cwd=tree)
    peaks: dict = {}
    done = threading.Event()
    watcher = threading.Thread(target=_peak, args=(child.pid, peaks, done))
    watcher.start()
    rc = child.wait()
    done.set()
    watcher.join()
    row = {"returncode": rc, "wall_s": time.perf_counter() - t0, "sampled_peak_rss_bytes": peaks.get("rss"),
           "sampled_peak_anon_bytes": peaks.get("anon")}
    if report.exists():
        rep = json.loads(report.read_text())
        row.update({k: rep.get(k) for k in ("seconds", "peak_rss_bytes", "peak_anon_bytes", "bytes_read")})
    shutil.rmtree(out, ignore_errors=True)
    report.unlink(missing_ok=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--max-memory", default="4GiB")
    ap.add_argument("--commits", required=True, help="comma-separated commits (or refs) to compare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--io", default="auto", choices=["auto", "direct", "buffered"], help="TENSORMERGE_IO")
    ap.add_argument("--out-dir", type=Path, default=None, help="where outputs go (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    inputs = sorted(p for p in args.data.glob("ft*") if p.is_dir())
    if not (args.data / "base").is_dir() or not inputs:
        ap.error(f"{args.data}: expected base/ and ft1.. as synth.py writes them")
    commits = [c for c in args.commits.split(",") if c]
    result = {"data": str(args.data), "method": args.method, "max_memory": args.max_memory, "io": args.io,
              "repeats": args.repeats, "loadavg_before": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="cold-ab-") as tmp:
        trees = []
        for i, commit in enumerate(commits):
            tree = Path(tmp) / f"tree{i}"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit],
                           check=True, capture_output=True)
            sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], check=True, capture_output=True,
                                 text=True).stdout.strip()
            trees.append((commit, sha, tree))
        out_dir = args.out_dir or Path(tmp)
        try:
            for r in range(args.repeats):
                for commit, sha, tree in trees:
                    row = one_run(tree, args.data, inputs, args.method, args.max_memory, args.io,
                                  out_dir / f"cold-ab-{sha[:12]}")
                    row.update(commit=commit, sha=sha, repeat=r)
                    result["runs"].append(row)
                    anon = row.get("peak_anon_bytes") or row.get("sampled_peak_anon_bytes") or 0
                    print(f"repeat {r + 1}/{args.repeats} {commit} ({sha[:7]}): exit {row['returncode']}, "
                          f"engine {row.get('seconds') or 0:.1f} s, wall {row['wall_s']:.1f} s, "
                          f"peak anonymous {anon / 1e9:.2f} GB", flush=True)
        finally:
            for _, _, tree in trees:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    result["loadavg_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
