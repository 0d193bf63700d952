"""Per-tensor reductions folded into the merge (methods/per_tensor.py): a tensor merged in one
chunk computes slerp's angles, gta's rescale norms and model_stock's cosines itself, and the pass
reads only the tensors cut into several chunks; the results are the pass's, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from tensormerge.methods import get_method
from tensormerge.methods.base import BlockData
from tensormerge.methods.gta import _L1Pass
from tensormerge.methods.model_stock import _AnglePass as StockPass
from tensormerge.methods.slerp import _AnglePass as SlerpPass
from tests import helpers as H


def _family(shape, n, seed=0):
    """Rows of very different sizes (1e4 and 1e-4 task vectors), so a different grouping of the
    float64 sums would show in their bits."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    scale = torch.tensor([10.0 ** (4 if r % 2 else -4) for r in range(shape[0])]).reshape(-1, *[1] * (len(shape) - 1))
    return base, [base + 1e-3 * torch.randn(shape, generator=g) * scale for _ in range(n)]


CASES = [
    ("slerp", {"t": "0.3"}, 1, SlerpPass),
    ("dare_ties", {"density": "0.4,0.7,0.9", "weights": "1,1,1"}, 3, _L1Pass),
    ("model_stock", {}, 3, StockPass),
]


@pytest.mark.parametrize("method,raw,n,cls", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shape", [(37, 300), (70,), ()])
def test_fold_equals_the_pass_under_any_row_cuts(method, raw, n, cls, shape):
    m = get_method(method)
    params = m.Params.from_strings(method, raw, n)
    gpass = m.passes(params)[0]
    assert isinstance(gpass, cls) and gpass.folds
    base, xs = _family(shape if shape else (1,), n)
    if not shape:
        base, xs = base.reshape(()), [x.reshape(()) for x in xs]
    name = "layers.0.w"
    rows = shape[0] if shape else 1
    whole = BlockData(name, xs, base, shape)
    folded = m.prepare(whole, params)
    assert folded is not None
    for cuts in ([0, rows], [0, 1, rows // 2, rows], list(range(rows + 1))):
        if not shape and len(cuts) > 2:
            continue
        acc = gpass.start({})
        for r0, r1 in reversed(list(zip(cuts[:-1], cuts[1:]))):
            part = whole if not shape else BlockData(name, [x[r0:r1] for x in xs], base[r0:r1], shape, r0)
            acc = gpass.reduce(acc, gpass.map(part, {}), name)
        acc = gpass.end_block(acc, name, base.numel())
        assert acc["result"][name] == folded
        if shape and len(cuts) > 2:  # a chunk that is not the whole tensor folds nothing
            assert m.prepare(BlockData(name, [x[1:] for x in xs], base[1:], shape, 1), params) is None
    merged_fold = m.merge(BlockData(name, xs, base, shape, prepared=folded), params, {})
    merged_pass = m.merge(whole, params, {gpass.name: {name: folded}})
    assert torch.equal(merged_fold, merged_pass)


@pytest.mark.parametrize("method,opts,n", [
    ("slerp", ["t=0.3"], 1),
    ("dare_ties", ["density=0.4,0.7,0.9", "weights=0.5,0.3,0.2"], 3),
    ("model_stock", [], 3),
])
def test_pass_reads_only_the_tensors_cut_into_chunks(tmp_path, method, opts, n):
    """One chunk per tensor: the pass reads nothing. A budget that cuts some tensors: the pass
    reads exactly those (the others fold in the same run). Both give the bytes of a run that
    cuts every tensor it can (the existing chunking tests' budget)."""
    spec = dict(H.CHUNKED_SPEC, **{"v.f16": ((40,), torch.float16), "m.f16": ((24, 7), torch.float16)})
    base_path, ft_paths, base, fts = H.write_family(tmp_path / "m", n=n, spec=spec)
    digests, reads = [], []
    for tag, mem in (("one", "64MiB"), ("mixed", "24KiB")):
        out, report = tmp_path / tag, tmp_path / f"{tag}.json"
        args = ["run", "-q", "-m", method, "-i", ",".join(ft_paths), "-b", base_path, "-o", out,
                "--max-memory", mem, "--report", report]
        for o in opts:
            args += ["-p", o]
        res = H.run_cli(args, cwd=tmp_path)
        assert res.returncode == 0, str(res)
        digests.append(H.shard_digests(out))
        rep = json.loads(report.read_text())
        (p,) = rep["passes"]
        reads.append(p["bytes_read"])
        if tag == "mixed":  # exactly the bytes of the blocks cut into several chunks
            res = H.run_cli(["plan", "-m", method, "-i", ",".join(ft_paths), "-b", base_path, "--max-memory", mem,
                             *sum((["-p", o] for o in opts), [])], cwd=tmp_path)
            chunks = {line.split()[0]: int(line.split()[-2]) for line in res.stdout.splitlines()
                      if line.split() and line.split()[0] in spec}
            split = [k for k, c in chunks.items() if c > 1]
            whole = [k for k, c in chunks.items() if c == 1 and base[k].dtype.is_floating_point]
            assert split and whole, chunks
            readers = [base] + fts
            want = sum(sd[k].numel() * sd[k].element_size() for k in split for sd in readers)
            assert p["bytes_read"] == want
    assert reads[0] == 0
    assert digests[0] == digests[1]
