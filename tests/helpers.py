"""Shared test helpers: a small family of checkpoints (a base and N fine-tunes) written in every
input form tensormerge reads, readers for its output, float64 reference formulas, and a fast
way to run the command line as a separate process.

Import from a test module with::

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/ (or parents[0])
    import helpers as H
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# ------------------------------------------------------------------------------------ the family
# Shapes small enough to be instant, odd enough to catch off-by-one row/offset bugs, and one
# tensor in each float dtype plus an integer buffer that the merge must copy, not merge.
FAMILY_SPEC: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "embed.weight": ((37, 19), torch.float32),
    "layer.0.attn.weight": ((64, 33), torch.float32),
    "layer.0.attn.bias": ((5,), torch.float32),
    "layer.0.mlp.weight": ((64, 33), torch.bfloat16),
    "layer.0.mlp.bias": ((33,), torch.bfloat16),
    "layer.1.norm.weight": ((19,), torch.float16),
    "layer.1.proj.weight": ((24, 7), torch.float16),
    "position_ids": ((1, 12), torch.int64),
}

SIDE_FILES = {
    "config.json": json.dumps({"model_type": "toy", "hidden_size": 19, "num_layers": 2}, indent=2) + "\n",
    "generation_config.json": json.dumps({"max_new_tokens": 7, "do_sample": False}) + "\n",
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}}}),
    "tokenizer_config.json": json.dumps({"model_max_length": 12, "pad_token": "<pad>"}),
    "special_tokens_map.json": json.dumps({"pad_token": "<pad>"}),
}


def make_base(seed: int = 0, spec: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in (spec or FAMILY_SPEC).items():
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        else:
            out[name] = torch.arange(math.prod(shape), dtype=dtype).reshape(shape)
    return out


def make_finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """base + a small random delta on every floating-point tensor; integer buffers unchanged."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, t in base.items():
        if t.dtype.is_floating_point:
            delta = torch.randn(t.shape, generator=g, dtype=torch.float32) * scale
            out[name] = (t.float() + delta).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


CHUNKED_SPEC = {  # several row chunks and shards at a few hundred KiB of --max-memory
    "emb.weight": ((300, 64), torch.bfloat16),
    "l0.w": ((128, 64), torch.float32),
    "l0.b": ((64,), torch.float32),
    "l1.w": ((64, 128), torch.bfloat16),
    "pos": ((1, 12), torch.int64),
}


def save_cancelling_family(root: Path) -> tuple[str, list[str]]:
    """CHUNKED_SPEC's base and three fine-tunes whose task vectors cancel exactly (+v, -v, 0) in
    ten entries of the first merged block: TIES elects no sign there before any vote is in, so
    they take the model-wide majority, patched in after the merge. Returns (base, inputs)."""
    base, fts = make_family(3, spec=CHUNKED_SPEC)
    base["l0.b"][:10] = 0
    for ft, v in zip(fts, (3.0, -3.0, 0.0)):
        ft["l0.b"][:10] = v
    return save(root / "base", base), [save(root / f"ft{i}", sd) for i, sd in enumerate(fts)]


def make_family(n: int = 3, seed: int = 0, spec: dict | None = None):
    """(base, [finetune_1..n]) as dicts of contiguous CPU tensors."""
    base = make_base(seed, spec)
    return base, [make_finetune(base, seed * 100 + i + 1) for i in range(n)]


# ------------------------------------------------------------------------------------ writers
def write_side_files(d: Path, files: dict[str, str] | None = None) -> None:
    for fname, text in (files or SIDE_FILES).items():
        (Path(d) / fname).write_text(text)


def _contig(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in sd.items()}


def save_safetensors_dir(d: Path, sd: dict[str, torch.Tensor], side_files: bool = True) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    save_file(_contig(sd), str(d / "model.safetensors"), metadata={"format": "pt"})
    if side_files:
        write_side_files(d)
    return d


def _split_names(names: list[str], n_shards: int) -> list[list[str]]:
    per = max(1, math.ceil(len(names) / n_shards))
    return [names[i:i + per] for i in range(0, len(names), per)]


def save_sharded_safetensors(d: Path, sd: dict[str, torch.Tensor], n_shards: int = 3, side_files: bool = True) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    groups = _split_names(list(sd), n_shards)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(_contig({k: sd[k] for k in group}), str(d / fname), metadata={"format": "pt"})
        for k in group:
            weight_map[k] = fname
            total += sd[k].numel() * sd[k].element_size()
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if side_files:
        write_side_files(d)
    return d


def save_safetensors_file(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contig(sd), str(path), metadata={"format": "pt"})
    return path


def save_bin_dir(d: Path, sd: dict[str, torch.Tensor], side_files: bool = True) -> Path:
    """`pytorch_model.bin`; tensors are saved as given, so tied entries keep sharing storage."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(sd, d / "pytorch_model.bin")
    if side_files:
        write_side_files(d)
    return d


def save_sharded_bin(d: Path, sd: dict[str, torch.Tensor], n_shards: int = 2, side_files: bool = True) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    groups = _split_names(list(sd), n_shards)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        torch.save({k: sd[k] for k in group}, d / fname)  # no copies: tied entries stay tied
        for k in group:
            weight_map[k] = fname
            total += sd[k].numel() * sd[k].element_size()
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if side_files:
        write_side_files(d)
    return d


def save_adapter_dir(d: Path, sd: dict[str, torch.Tensor]) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    save_file(_contig(sd), str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"],
        "base_model_name_or_path": "org/base", "task_type": "SEQ_2_SEQ_LM"}))
    return d


def make_adapter(seed: int = 0, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(2):
        for m, (o, i) in (("q", (19, 19)), ("v", (19, 19))):
            pre = f"base_model.model.encoder.block.{layer}.layer.0.SelfAttention.{m}"
            out[f"{pre}.lora_A.weight"] = torch.randn(r, i, generator=g)
            out[f"{pre}.lora_B.weight"] = torch.randn(o, r, generator=g)
    return out


FORMATS = ("safetensors_dir", "sharded_safetensors", "safetensors_file", "bin_dir", "sharded_bin")


def save(path: Path, sd: dict[str, torch.Tensor], fmt: str = "safetensors_dir") -> str:
    """Write `sd` at `path` in input form `fmt`; returns what to pass as an input spec."""
    path = Path(path)
    if fmt == "safetensors_dir":
        return str(save_safetensors_dir(path, sd))
    if fmt == "sharded_safetensors":
        return str(save_sharded_safetensors(path, sd))
    if fmt == "safetensors_file":
        return str(save_safetensors_file(path.with_suffix(".safetensors"), sd))
    if fmt == "bin_dir":
        return str(save_bin_dir(path, sd))
    if fmt == "sharded_bin":
        return str(save_sharded_bin(path, sd))
    raise ValueError(fmt)


def write_family(root: Path, n: int = 3, fmt: str = "safetensors_dir", seed: int = 0, spec: dict | None = None):
    """Base + n fine-tunes under root/{base,ft1..ftn}; returns (base_spec, [ft_specs], base_sd, [ft_sds])."""
    base, fts = make_family(n, seed, spec)
    base_spec = save(Path(root) / "base", base, fmt)
    ft_specs = [save(Path(root) / f"ft{i + 1}", sd, fmt) for i, sd in enumerate(fts)]
    return base_spec, ft_specs, base, fts


# ------------------------------------------------------------------------------------ hub cache
def make_hub_cache(cache: Path, repo_id: str, sd: dict[str, torch.Tensor], commit: str | None = None,
                   refs: tuple[str, ...] = ("main",), n_shards: int = 1) -> str:
    """huggingface_hub's cache layout, as the hub client writes it:
    models--org--name/{blobs/<sha256>, refs/<ref>, snapshots/<commit>/<file> -> ../../blobs/<sha256>},
    every snapshot file (weights, shards, index, side files) a relative symlink to its blob.
    `n_shards` > 1 writes a sharded model with its index. Returns the commit hash."""
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    blobs = repo / "blobs"
    for p in (snap, blobs, repo / "refs"):
        p.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        if n_shards > 1:
            save_sharded_safetensors(Path(td), sd, n_shards)
        else:
            save_safetensors_dir(Path(td), sd)
        for fname in sorted(os.listdir(td)):
            data = Path(td, fname).read_bytes()
            blob = hashlib.sha256(data).hexdigest()
            (blobs / blob).write_bytes(data)
            os.symlink(os.path.join("..", "..", "blobs", blob), snap / fname)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


def offline_hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty hub cache at tmp_path/hub-cache that this process (and the CLI subprocesses it
    spawns) reads offline; the cwd moves to tmp_path so "org/name" is not an existing relative
    path. huggingface_hub reads both settings at import time and snapshot_download consults its
    module constants, so those are patched too. The `hub_cache` fixture in conftest.py."""
    import huggingface_hub.constants as hc

    cache = Path(tmp_path) / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


# ------------------------------------------------------------------------------------ output
def load_dir(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model directory (single file or sharded), via safe_open."""
    d = Path(d)
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for fname in files:
        with safe_open(str(d / fname), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(d: Path, skip: tuple[str, ...] = ("tensormerge.json",)) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(Path(d).iterdir()) if p.is_file() and p.name not in skip}


# ------------------------------------------------------------------------------------ formulas
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2),
       torch.float64: (1e-12, 1e-12)}


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def expected_average(sds: list[dict], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    w = weights or [1.0 / len(sds)] * len(sds)
    return {k: sum(wi * f64(sd[k]) for wi, sd in zip(w, sds)) for k in sds[0] if sds[0][k].dtype.is_floating_point}


def expected_task_arithmetic(base: dict, sds: list[dict], lam: float = 0.3) -> dict[str, torch.Tensor]:
    return {k: f64(base[k]) + lam * sum(f64(sd[k]) - f64(base[k]) for sd in sds)
            for k in base if base[k].dtype.is_floating_point}


def assert_close(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype | None = None, name: str = "") -> None:
    """`actual` (stored in `dtype`) equals the float64 `expected64` up to that dtype's rounding."""
    dtype = dtype or actual.dtype
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype} != {dtype}"
    assert tuple(actual.shape) == tuple(expected64.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(f64(actual), expected64, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------ CLI runs
@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    args: list[str]

    def __str__(self) -> str:
        return f"$ tensormerge {' '.join(self.args)}\n[rc={self.returncode}]\n--stdout--\n{self.stdout}\n--stderr--\n{self.stderr}"


def run_cli_subprocess(args: list[str], cwd: Path | str | None = None, env: dict | None = None,
                       timeout: float = 120) -> CliResult:
    """`python -m tensormerge ARGS` as a plain subprocess (pays torch's import every time)."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "tensormerge", *map(str, args)], cwd=cwd, env=full_env,
                       capture_output=True, text=True, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr, [str(a) for a in args])


# A separate process that imports tensormerge (and so torch) once, then forks a child per
# command that runs `python -m tensormerge ARGS` exactly (runpy, real exit status, its own
# stdout/stderr files): the same process boundary as a subprocess, without paying ~3 s of
# torch import per command. Set TENSORMERGE_TEST_FORK=0 to use plain subprocesses instead.
_SERVER = r"""
import json, os, runpy, sys, time, traceback
import tensormerge.cli, tensormerge.api  # noqa: F401,E401  (the expensive import, done once before any fork;
# the cli imports torch only when a command needs it, the api imports it and every method)
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            fd_in = os.open(os.devnull, os.O_RDONLY)
            fd_out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fd_err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd_in, 0); os.dup2(fd_out, 1); os.dup2(fd_err, 2)
            try:
                exec(req["setup"], {})  # what the child needs first: an rlimit, a patched syscall
            except BaseException as e:
                print(f"setup failed: {e}", file=sys.stderr); code = 99
                raise SystemExit
            sys.argv = ["tensormerge"] + req["args"]
            try:
                runpy.run_module("tensormerge", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr); code = 1
            except BaseException:
                traceback.print_exc(); code = 1
        except SystemExit:
            pass
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9); os.waitpid(pid, 0); rc = -9
            break
        time.sleep(0.005)
    sys.stdout.write(json.dumps({"rc": rc}) + "\n"); sys.stdout.flush()
"""


class _ForkServer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tmp = tempfile.mkdtemp(prefix="tm-cli-")
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, cwd=self.tmp)
        assert self.proc.stdout.readline().strip() == "ready", "CLI fork server failed to start"
        self.n = 0

    def run(self, args: list[str], cwd: str, env: dict, timeout: float, setup: str = "") -> CliResult:
        with self.lock:
            self.n += 1
            out, err = os.path.join(self.tmp, f"{self.n}.out"), os.path.join(self.tmp, f"{self.n}.err")
            req = {"args": [str(a) for a in args], "cwd": cwd, "env": env, "stdout": out, "stderr": err,
                   "timeout": timeout, "setup": setup}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            assert line, "CLI fork server died"
            rc = json.loads(line)["rc"]
            res = CliResult(rc, Path(out).read_text(), Path(err).read_text(), req["args"])
            os.unlink(out)
            os.unlink(err)
            return res

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


_server: _ForkServer | None = None


def run_cli(args: list, cwd: Path | str | None = None, env: dict | None = None, timeout: float = 120,
            setup: str = "") -> CliResult:
    """Run `tensormerge ARGS` in a separate process; returns exit status, stdout and stderr.
    `setup` is Python run in that process first (a file-size rlimit, dropped capabilities, a
    system call that reports a full disk); the process keeps CPython's startup signal
    dispositions (SIGXFSZ ignored), exactly as `python -m tensormerge` has them."""
    global _server
    cwd = str(cwd or os.getcwd())
    if os.environ.get("TENSORMERGE_TEST_FORK", "1") == "0" or not hasattr(os, "fork"):
        if setup:
            raise NotImplementedError("setup needs the fork server (TENSORMERGE_TEST_FORK=1)")
        return run_cli_subprocess(args, cwd, env, timeout)
    if _server is None or _server.proc.poll() is not None:
        _server = _ForkServer()
        atexit.register(_server.close)
    return _server.run(args, cwd, {k: str(v) for k, v in (env or {}).items()}, timeout, setup)


def assert_clean_error(res: CliResult, *needles: str, out_dir: Path | None = None) -> str:
    """A refused command: non-zero status, stderr exactly one `error: ...` line naming every
    needle, no traceback, and (when given) neither OUT nor OUT.partial on disk. Returns the line."""
    assert res.returncode != 0, f"expected failure\n{res}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, f"traceback printed\n{res}"
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not exactly one line\n{res}"
    line = lines[0]
    assert line.startswith("error: "), f"stderr does not start with 'error: '\n{res}"
    assert "\x1b" not in line, f"terminal escape codes in the error line\n{res}"
    assert "internal error" not in line, f"unexpected exception surfaced as internal error\n{res}"
    for needle in needles:
        assert needle in line, f"error line does not name {needle!r}: {line}"
    if out_dir is not None:
        out_dir = Path(out_dir)
        assert not out_dir.exists(), f"{out_dir} left behind\n{res}"
        assert not Path(str(out_dir) + ".partial").exists(), f"{out_dir}.partial left behind\n{res}"
    return line


def write_store(path, stats: dict, model: dict | None = None, count=None) -> str:
    """A statistics store from {kind: {name: tensor}} (float32 on disk, as the SPEC says)."""
    from tensormerge.stats.store import StatsWriter

    w = StatsWriter(str(path), model=model, overwrite=True)
    for kind, arrays in stats.items():
        for name, value in arrays.items():
            w.add(kind, name, value, count=count)
    return w.close()


def shard_digests(out) -> dict[str, str]:
    """sha256 of each output shard: what 'the same bytes' means in determinism tests."""
    return {f: sha256_file(Path(out) / f) for f in sorted(os.listdir(out)) if f.endswith(".safetensors")}


def digests_per_thread_count(run_merge, tmp_path, counts=(1, 2)) -> list[dict[str, str]]:
    """Shard digests of `run_merge(out)` with torch set to each thread count in turn."""
    import torch

    threads = torch.get_num_threads()
    digests = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            out = tmp_path / f"threads{n}"
            run_merge(out)
            digests.append(shard_digests(out))
    finally:
        torch.set_num_threads(threads)
    return digests
