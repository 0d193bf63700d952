"""TIES through the engine against a float64 re-implementation of the reference code."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tensormerge.api import MergeSpec, merge
from tensormerge.kernels import reference as K
from tests import helpers as H


def reference_ties(base, fts, k=0.2, lam=1.0, sign="mass", merge_fn="dis-mean", scope="global", k_rule="reference",
                   info=None):
    """The TIES reference, written from METHODS.md §3: fp32 task vectors, kthvalue threshold.
    `info` (a list) receives, per trimming group, (Σ_j s_j before zero resolution, the number of
    entries whose elected sign is 0 while some trimmed value there is negative)."""
    names = [n for n, t in base.items() if t.is_floating_point()]
    tau32 = {n: torch.stack([ft[n].float() - base[n].float() for ft in fts]).reshape(len(fts), -1) for n in names}

    def threshold(rows):  # rows [N, D]
        D = rows.shape[1]
        kept = math.floor(D * k)
        if k_rule == "exact":
            kept = max(1, kept)
            r = D - kept + 1 if kept < D else 0
        else:
            r = D - kept
        if r == 0:
            return torch.zeros(rows.shape[0])
        return rows.abs().kthvalue(r, dim=1).values

    if scope == "global":
        thr = threshold(torch.cat([tau32[n] for n in names], 1))
        thrs = {n: thr for n in names}
    else:
        thrs = {n: threshold(tau32[n]) for n in names}
    trimmed = {n: (tau32[n] * (tau32[n].abs() >= thrs[n][:, None])).double() for n in names}
    groups = [names] if scope == "global" else [[n] for n in names]
    out = {}
    for group in groups:
        flat = torch.cat([trimmed[n] for n in group], 1)
        if sign == "none":
            s = None
        elif sign == "mass":
            s = torch.sign(flat.sum(0))
        else:
            frac = flat**2 / (flat**2).sum(1, keepdim=True)
            if sign == "normfrac":
                s = torch.sign(flat[frac.argmax(0), torch.arange(flat.shape[1])])
            else:
                s = torch.sign((torch.sign(flat) * frac).sum(0))
        if s is not None:
            if info is not None:
                info.append((float(s.sum()), int(((s == 0) & (flat < 0).any(0)).sum())))
            s[s == 0] = torch.sign(s.sum())
        m = disjoint64(flat, s, merge_fn)
        pos = 0
        for n in group:
            size = base[n].numel()
            out[n] = (base[n].double() + lam * m[pos:pos + size].reshape(base[n].shape))
            pos += size
    return out


def disjoint64(flat, s, merge_fn):
    """METHODS.md §3.4 on trimmed rows [N, D] with resolved signs s (None: no election); a zero
    sign selects the negative entries, as the reference's where(s > 0, τ > 0, τ < 0) does."""
    if merge_fn.startswith("dis"):
        sel = flat if s is None else flat * torch.where(s > 0, flat > 0, flat < 0)
        if merge_fn == "dis-mean":
            return sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
        if merge_fn == "dis-sum":
            return sel.sum(0)
        if s is not None:
            return sel.abs().max(0).values * s
        merge_fn = "magnitude"
    m = {"mean": lambda t: t.mean(0), "sum": lambda t: t.sum(0), "median": lambda t: t.median(0).values,
         "magnitude": lambda t: t[t.abs().argmax(0), torch.arange(t.shape[1])]}[merge_fn](flat)
    return m if s is None else m.abs() * s


def merged(base_path, ft_paths, tmp_path, tag, max_memory="64MiB", **params):
    out = tmp_path / f"out-{tag}"
    merge(MergeSpec("ties", ft_paths, str(out), base=base_path, params={k: str(v) for k, v in params.items()},
                    max_memory=max_memory, quiet=True))
    return load_file(str(out / "model.safetensors")), out


TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("params", [
    {},
    {"k": 0.5, "lambda": 0.7},
    {"k": 20},
    {"sign": "normfrac"},
    {"sign": "normmass", "merge": "dis-sum"},
    {"merge": "dis-max"},
    {"sign": "none", "merge": "dis-mean"},
    {"merge": "mean"},
    {"merge": "median", "k": 0.6},
    {"merge": "magnitude"},
    {"scope": "tensor"},
    {"scope": "tensor", "k_rule": "exact", "k": 0.1},
    {"k": 1.0},
])
def test_ties_matches_reference(family, tmp_path, params):
    base_path, ft_paths, base, fts = family
    got, _ = merged(base_path, ft_paths, tmp_path, "x", **params)
    ref_kwargs = {"k": params.get("k", 0.2), "lam": params.get("lambda", 1.0), "sign": params.get("sign", "mass"),
                  "merge_fn": params.get("merge", "dis-mean"), "scope": params.get("scope", "global"),
                  "k_rule": params.get("k_rule", "reference")}
    if ref_kwargs["k"] > 1:
        ref_kwargs["k"] /= 100
    exp = reference_ties(base, fts, **ref_kwargs)
    assert set(got) == set(base)
    for n, t in got.items():
        assert t.dtype == base[n].dtype
        if n in exp:
            torch.testing.assert_close(t.double(), exp[n].to(t.dtype).double(), rtol=0, atol=TOL[t.dtype])
        else:
            assert torch.equal(t, base[n])


def test_worked_example(tmp_path):
    tvs = np.array([[0.5, -0.1, 0.02, -0.4, 0.3], [-0.6, 0.2, 0.01, -0.3, -0.05], [0.1, 0.3, -0.02, 0.0, 0.2]])
    d = tmp_path / "m"
    paths = []
    for i, row in enumerate([np.zeros(5)] + list(tvs)):
        p = d / f"m{i}"
        p.mkdir(parents=True)
        save_file({"w": torch.tensor(row, dtype=torch.float64)}, str(p / "model.safetensors"))
        paths.append(str(p))
    got, _ = merged(paths[0], paths[1:], tmp_path, "w", k=0.4)
    # worked_examples.py: keep |x| >= the (5 - int(5*0.4))-th smallest per row, elect, disjoint mean
    trimmed = []
    for row in tvs:
        thr = np.sort(np.abs(row))[5 - int(5 * 0.4) - 1]
        trimmed.append(row * (np.abs(row) >= thr))
    trimmed = np.array(trimmed)
    s = np.sign(trimmed.sum(0))
    s[s == 0] = np.sign(s.sum())
    sel = np.where(s > 0, trimmed > 0, trimmed < 0)
    exp = (trimmed * sel).sum(0) / np.maximum(((trimmed * sel) != 0).sum(0), 1)
    np.testing.assert_allclose(got["w"].numpy(), exp, rtol=0, atol=1e-12)
    # the numbers worked_examples.py prints
    np.testing.assert_allclose(exp, [0.3, 0.25, 0.0, -0.35, 0.25], atol=1e-12)


@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_global_majority_sign_for_cancelling_entries(tmp_path, majority):
    """An entry whose trimmed task vectors cancel exactly takes the model-wide majority sign,
    even when the majority is decided by another tensor, merged after it: the vote pass knows
    the majority before the merge, so nothing is patched after it."""
    d = tmp_path / "m"
    base = {"a": torch.zeros(4), "z": torch.zeros(6)}
    m1 = {"a": torch.tensor([0.5, 0.0, 0.0, 0.0]), "z": majority * torch.tensor([1.0, 1, 1, 1, 1, 1])}
    m2 = {"a": torch.tensor([-0.5, 0.0, 0.0, 0.0]), "z": majority * torch.tensor([1.0, 1, 1, 1, 1, 1])}
    paths = []
    for i, sd in enumerate([base, m1, m2]):
        p = d / f"m{i}"
        p.mkdir(parents=True)
        save_file(sd, str(p / "model.safetensors"))
        paths.append(str(p))
    got, out = merged(paths[0], paths[1:], tmp_path, "maj", k=1.0, max_memory="1KiB")
    assert got["a"][0].item() == pytest.approx(0.5 * majority)
    assert torch.equal(got["z"], majority * torch.ones(6))
    import json

    prov = json.loads((out / "tensormerge.json").read_text())
    assert prov["patched_entries"] == 0
    import zlib

    assert prov["blocks"]["a"]["crc32"] == f"{zlib.crc32(got['a'].numpy().tobytes()):08x}"


def test_tied_tensors_counted_once(tmp_path):
    """A .bin checkpoint with one storage under two names: trimmed and merged once."""
    g = torch.Generator().manual_seed(0)
    d = tmp_path / "m"
    base_w, other = torch.zeros(50), torch.zeros(30)
    paths = []
    for i in range(3):
        w = base_w + (torch.randn(50, generator=g) if i else 0)
        o = other + (torch.randn(30, generator=g) if i else 0)
        sd = {"shared.weight": w, "encoder.embed_tokens.weight": w, "o": o}
        p = d / f"m{i}"
        p.mkdir(parents=True)
        torch.save(sd, str(p / "pytorch_model.bin"))
        paths.append(str(p))
    got, _ = merged(paths[0], paths[1:], tmp_path, "tied", k=0.3)
    loaded = [torch.load(str(d / f"m{i}" / "pytorch_model.bin"), weights_only=True) for i in range(3)]
    exp = reference_ties({"shared.weight": loaded[0]["shared.weight"], "o": loaded[0]["o"]},
                         [{"shared.weight": s["shared.weight"], "o": s["o"]} for s in loaded[1:]], k=0.3)
    torch.testing.assert_close(got["shared.weight"].double(), exp["shared.weight"], rtol=0, atol=2e-6)
    torch.testing.assert_close(got["encoder.embed_tokens.weight"], got["shared.weight"], rtol=0, atol=0)
    torch.testing.assert_close(got["o"].double(), exp["o"], rtol=0, atol=2e-6)


def test_sampled_window_skips_the_low_pass_and_a_miss_falls_back(family, tmp_path, monkeypatch):
    """Pass A counts the low bits of a window of bins found from a row sample; when the exact
    threshold bin is inside, pass B is skipped. A window that misses must still be exact."""
    import hashlib

    from tensormerge.methods import ties as T

    base_path, ft_paths, _, _ = family

    def run(tag):
        out = tmp_path / tag
        rep = merge(MergeSpec("ties", ft_paths, str(out), base=base_path, quiet=True, max_memory="3KiB"))
        return rep, hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    rep, hit = run("hit")
    passes = {p["name"]: p for p in rep["passes"]}
    assert passes["ties_low"].get("skipped") and passes["ties_sample"]["bytes_read"] < passes["ties_high"]["bytes_read"]
    assert passes["ties_high_miss"].get("skipped")  # pass A placed every threshold without a full histogram

    for far in (T.NONFINITE_BIN - T.WINDOW_BINS, 0):  # above every magnitude, then below every one
        def far_window(self, acc, key, far=far):
            acc["hist"].pop(key)
            acc["numel"].pop(key)
            acc["result"][key] = [far] * 3  # never the threshold's bin

        monkeypatch.setattr(T._SamplePass, "_compact", far_window)
        rep, miss = run(f"miss{far}")
        passes = {p["name"]: p for p in rep["passes"]}
        assert not passes["ties_high_miss"].get("skipped") and not passes["ties_low"].get("skipped")
        assert miss == hit


def test_a_sampled_threshold_among_the_zeros_puts_the_window_above_the_gap():
    """A sample whose threshold falls in bin 0 (the unchanged weights) places the window on the
    first bins above the gap, where the exact threshold is when the sample's share of zeros was
    high; if it is among the zeros, pass A's zero count places it (test below)."""
    from tensormerge.methods.ties import _sampled_bin

    h = torch.zeros(65536, dtype=torch.int64)
    h[0], h[14880], h[14890] = 600, 300, 100
    assert _sampled_bin(h, 500) == 14880  # in bin 0 by the sample: moved above the gap
    assert _sampled_bin(h, 700) == 14880 and _sampled_bin(h, 950) == 14890  # above it: as located
    h[1:] = 0
    assert _sampled_bin(h, 500) == 0  # nothing above: stays


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_threshold_among_the_exact_zeros_needs_no_recount(tmp_path, monkeypatch, kernels):
    """Fine-tunes that left 60% of the weights unchanged (τ = 0, as bf16 checkpoints do), at
    k = 0.5: each threshold is 0, and the sampled window, placed above the gap between 0 and the
    smallest nonzero |τ| (where a sample near the edge puts it), cannot hold it. Pass A's count
    of exact zeros places it anyway: no recount, no low-bit pass, and the bytes of the formula
    (`reference_ties`, float64) and of a merge whose window held bin 0."""
    import hashlib

    from tensormerge.methods import ties as T

    g = torch.Generator().manual_seed(21)
    base = {"w": torch.randn(64, 50, generator=g), "b": torch.randn(300, generator=g)}
    fts = []
    for _ in range(3):
        sd = {}
        for name, t in base.items():
            moved = torch.rand(t.shape, generator=g) < 0.4
            sd[name] = torch.where(moved, t + 0.1 * torch.randn(t.shape, generator=g), t)
        fts.append(sd)
    paths = []
    for i, sd in enumerate([base] + fts):
        (tmp_path / f"m{i}").mkdir()
        save_file(sd, str(tmp_path / f"m{i}" / "model.safetensors"))
        paths.append(str(tmp_path / f"m{i}"))

    def run(tag, window):
        def placed(self, acc, key):
            acc["hist"].pop(key)
            acc["numel"].pop(key)
            acc["result"][key] = [window] * 3

        with monkeypatch.context() as m:
            m.setattr(T._SamplePass, "_compact", placed)
            out = tmp_path / tag
            rep = merge(MergeSpec("ties", paths[1:], str(out), base=paths[0], params={"k": 0.5}, quiet=True,
                                  max_memory="12KiB", kernels=kernels))
        passes = {p["name"]: p for p in rep["passes"]}
        return passes, hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(), out

    above = int(T.S.abs_bits_(torch.tensor([0.001])).item()) >> 16  # a bin between 0 and the nonzero |τ|
    passes, got, out = run("above", above)
    assert passes["ties_high_miss"].get("skipped") and passes["ties_low"].get("skipped")
    _, hit, _ = run("at0", 0)
    assert got == hit
    exp = reference_ties(base, fts, k=0.5)
    merged_ = load_file(str(out / "model.safetensors"))
    for name in base:
        torch.testing.assert_close(merged_[name].double(), exp[name], rtol=0, atol=2e-6)


@pytest.mark.parametrize("merge,sign", [("mean", "none"), ("sum", "mass"), ("dis-mean", "normmass")])
def test_many_models_sum_does_not_depend_on_the_chunk(merge, sign):
    """Sums over N >= 5 models run in model order: torch's sum(0) would change with the chunk."""
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(4099)
    xs = [torch.randn(4099, generator=g) * torch.exp(torch.randn(4099, generator=g) * 5) for _ in range(7)]
    sq = [float(x.double().square().sum()) for x in xs]
    whole = K.ties_merge(xs, base, [0.0] * 7, sign, sq, merge, 1.0, 1.0)[0]
    parts = torch.cat([K.ties_merge([x[a:b] for x in xs], base[a:b], [0.0] * 7, sign, sq, merge, 1.0, 1.0)[0]
                       for a, b in ((0, 1), (1, 37), (37, 4099))])
    assert torch.equal(whole, parts)


# ------------------------------------------------------------------ a model-wide majority of 0
# Per entry, the task vectors of three models where they survive the trim (None: a small value
# that the trim removes). Votes: +1 −1 −1 +1 and three exact cancellations (elected sign 0 with
# negative entries) -> the majority is exactly 0; every model has 4 large entries per group.
ZERO_MAJORITY = [(2.0, -1.0, -1.0), (-1.0, None, 1.0), (None, 1.0, -1.0), (1.0, None, None), (None, -1.0, None),
                 (None, None, -1.0), (1.0, 1.0, None)]
ZERO_MAJORITY_SPEC = {"a.weight": ((5, 11), torch.float32, 3), "b.weight": ((7, 5), torch.bfloat16, 2),
                      "c.bias": ((15,), torch.float16, 1)}  # 20c - 5 entries: k=0.2 keeps 4c per model


def zero_majority_family(root):
    """A base and three fine-tunes whose trimmed task vectors have a model-wide (and, tensor by
    tensor, per-tensor) majority sign of exactly 0 at the default k = 0.2: every value below is
    dyadic, so the task vectors are exact in every dtype. Returns (base path, input paths,
    base, fine-tunes)."""
    g = torch.Generator().manual_seed(11)
    base, fts = {}, [{}, {}, {}]
    for name, (shape, dtype, c) in ZERO_MAJORITY_SPEC.items():
        d = math.prod(shape)
        b = torch.randint(-16, 17, (d,), generator=g).float() / 8
        small = (torch.rand(3, d, generator=g) * 0.2 + 0.01) * (torch.randint(0, 2, (3, d), generator=g) * 2 - 1)
        taus = small.clone()
        where = torch.randperm(d, generator=g)[:7 * c]
        for j, pos in enumerate(where.tolist()):
            for i, v in enumerate(ZERO_MAJORITY[j % 7]):
                if v is not None:
                    taus[i, pos] = v
        base[name] = b.reshape(shape).to(dtype)
        for i in range(3):
            fts[i][name] = (b + taus[i]).reshape(shape).to(dtype)
    paths = [H.save(root / n, sd) for n, sd in zip(("base", "ft0", "ft1", "ft2"), [base] + fts)]
    return paths[0], paths[1:], base, fts


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("merge_fn", K.TIES_MERGES)
def test_zero_majority_sign_keeps_the_negative_entries(tmp_path, merge_fn, scope):
    """With a majority sign of exactly 0 the undecided entries keep sign 0 and the reference's
    where(s > 0, τ > 0, τ < 0) selects their negative entries: dis-mean writes their mean and
    dis-sum their sum (the others multiply by s = 0). Through the CLI, one chunk and many
    (many chunks, the first ones merged before any vote of the merge pass is in), numba and torch
    kernels, against the float64 reference."""
    base_path, ft_paths, base, fts = zero_majority_family(tmp_path / "m")
    info = []
    exp = reference_ties(base, fts, merge_fn=merge_fn, scope=scope, info=info)
    assert all(votes == 0 and cancelling > 0 for votes, cancelling in info), info  # the case under test
    outs = []
    runs = [("many", ["--max-memory", "2KiB"])]  # many chunks
    if merge_fn in ("dis-mean", "dis-sum"):  # where a zero sign selects something
        runs.append(("one", ["--max-memory", "64MiB"]))
    if merge_fn == "dis-mean":  # the numba kernel's case (auto) against the torch reference
        runs.append(("torch", ["--max-memory", "2KiB", "--kernels", "torch"]))
    for tag, extra in runs:
        out = tmp_path / tag
        res = H.run_cli(["run", "-q", "-m", "ties", "-i", ",".join(ft_paths), "-b", base_path, "-o", out,
                         "-p", f"merge={merge_fn}", "-p", f"scope={scope}", *extra], cwd=tmp_path)
        assert res.returncode == 0, str(res)
        got = H.load_dir(out)
        for n, t in got.items():
            torch.testing.assert_close(t.double(), exp[n].to(t.dtype).double(), rtol=0, atol=TOL[t.dtype], msg=n)
        outs.append(H.shard_digests(out))
        # the vote pass knew the majority (0) before the merge: nothing rewritten after it
        assert json.loads((out / "tensormerge.json").read_text())["patched_entries"] == 0
    assert all(o == outs[0] for o in outs)
    if merge_fn == "dis-mean":  # (2, -1, -1) -> -1 and (-1, ·, 1) -> -1 below the base, by hand
        t = got["a.weight"].reshape(-1).double() - base["a.weight"].reshape(-1).double()
        assert int((t == -1).sum()) >= 3 * 3


@pytest.mark.parametrize("merge_fn", K.TIES_MERGES)
@pytest.mark.parametrize("guess", [0.0, 1.0, -1.0])
def test_zero_sign_kernels_agree_with_the_formula(merge_fn, guess):
    """One chunk whose undecided entries resolve to `guess` (0 before any vote): the torch
    reference, the numba kernel and the interpreted Triton kernel give the same bits, and the
    float64 formula's value."""
    g = torch.Generator().manual_seed(5)
    n = 301
    base = (torch.randint(-16, 17, (n,), generator=g) / 8).float()
    taus = torch.randint(-4, 5, (3, n), generator=g) / 4
    taus[1, :60] = -taus[0, :60]  # exact cancellations, with and without a third vote
    taus[2, :30] = 0
    taus[:, 60:63] = torch.tensor([[2.0, -1.0, 1.0], [-1.0, 1.0, 0.0], [-1.0, 0.0, -1.0]])  # columns: entries
    xs = [(base + t).float() for t in taus]
    thresholds = [0.5, 0.0, 0.25]
    want = None
    kernels = [K]
    try:
        from tensormerge.kernels import cpu
        kernels.append(cpu)
    except ImportError:
        pass
    try:
        import tensormerge.kernels.triton as T
        kernels.append(T)
    except ImportError:
        pass
    for mod in kernels:
        got = mod.ties_merge(xs, base, thresholds, "mass", None, merge_fn, 0.5, guess)
        if want is None:
            want = got
            trimmed = taus.double() * (taus.abs() >= torch.tensor(thresholds, dtype=torch.float64)[:, None])
            s = torch.sign(trimmed.sum(0))
            s[s == 0] = guess
            exp = base.double() + 0.5 * disjoint64(trimmed, s, merge_fn)
            torch.testing.assert_close(got[0].double(), exp, rtol=0, atol=1e-6)
            assert bool(got[2][60:63].all())
        assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32)), mod.__name__
        assert got[1] == want[1] and torch.equal(got[2].cpu(), want[2]), mod.__name__


# ------------------------------------------------------------------ the vote pass against the patches
def majority_family(root, majority: float):
    """Base and three fine-tunes (float32, dyadic values: exact task vectors) whose first tensor
    has ten +1 votes before 50 exact cancellations (+v, −v, 0), and a later tensor whose 48
    votes of `majority` decide the model-wide sign: merged in small chunks, the running vote
    guesses +1 for the cancellations, wrong when `majority` is −1. Returns (base, inputs)."""
    g = torch.Generator().manual_seed(13)
    base = {"a.weight": (torch.randint(-8, 9, (60,), generator=g) / 4).reshape(12, 5),
            "z.weight": (torch.randint(-8, 9, (48,), generator=g) / 4).reshape(12, 4)}
    taus_a = torch.zeros(3, 60)
    taus_a[:, :10] = 0.5  # ten +1 votes first
    taus_a[0, 10:] = torch.where(torch.arange(50) % 2 == 0, 0.75, -0.25)
    taus_a[1, 10:] = -taus_a[0, 10:]  # exact cancellations, the third model silent
    taus_z = torch.full((3, 48), majority * 0.5)
    fts = [{"a.weight": base["a.weight"] + taus_a[i].reshape(12, 5),
            "z.weight": base["z.weight"] + taus_z[i].reshape(12, 4)} for i in range(3)]
    paths = [H.save(root / n, sd) for n, sd in zip(("base", "ft0", "ft1", "ft2"), [base] + fts)]
    return paths[0], paths[1:]


def _without_vote_pass(monkeypatch):
    """The merge as it was before the vote pass: running-vote guesses, patched afterwards."""
    from tensormerge.methods import ties as T

    real = T.Ties.passes
    monkeypatch.setattr(T.Ties, "passes", lambda self, params: [p for p in real(self, params)
                                                                if not isinstance(p, T._VotePass)])


@pytest.mark.parametrize("which,params", [
    ("negative", {"k": 1.0}),
    ("negative", {"k": 1.0, "scope": "tensor"}),
    ("negative", {"k": 1.0, "merge": "dis-max", "kernels": "torch"}),
    ("negative", {"k": 1.0, "sign": "normmass", "merge": "dis-sum"}),
    ("zero", {}),
    ("zero", {"scope": "tensor", "merge": "magnitude"}),
    ("zero", {"sign": "normmass"}),
    ("cancelling", {}),
    ("cancelling", {"merge": "median", "kernels": "torch"}),
])
def test_vote_pass_writes_the_bytes_the_patches_wrote(tmp_path, monkeypatch, which, params):
    """With the vote pass the undecided entries are merged with the exact majority: the same bytes
    as the merge that guessed and patched them (which did patch some: the case under test), and
    nothing patched."""
    if which == "negative":
        base_path, ft_paths = majority_family(tmp_path / "m", -1.0)
    elif which == "zero":
        base_path, ft_paths = zero_majority_family(tmp_path / "m")[:2]
    else:
        base_path, ft_paths = H.save_cancelling_family(tmp_path / "m")
    params = dict(params)
    kernels = params.pop("kernels", "auto")

    def run(tag):
        out = tmp_path / tag
        rep = merge(MergeSpec("ties", ft_paths, str(out), base=base_path, params={k: str(v) for k, v in params.items()},
                              max_memory="200KiB" if which == "cancelling" else "2KiB", kernels=kernels,
                              quiet=True))
        return rep, H.shard_digests(out)

    from tensormerge.methods import ties as T

    with monkeypatch.context() as m:
        m.setattr(T, "LOG_BYTES", -1)  # the vote pass itself, not pass A's count
        rep, got = run("votes")
    assert rep["patched_entries"] == 0
    assert [p for p in rep["passes"] if p["name"] == "ties_votes" and not p.get("skipped")]
    rep, counted = run("pass-a")  # pass A's votes where every threshold fell in its window
    assert rep["patched_entries"] == 0 and counted == got
    with monkeypatch.context() as m:
        _without_vote_pass(m)
        old, want = run("patched")
    assert old["patched_entries"] > 0 and got == want


# ------------------------------------------------------------------ the votes counted by pass A
def _pass_names(rep, skipped: bool) -> set[str]:
    return {p["name"] for p in rep["passes"] if bool(p.get("skipped")) == skipped}


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("twins", [False, True])
def test_pass_a_counts_the_votes_and_the_vote_pass_is_skipped(tmp_path, monkeypatch, kernels, twins):
    """Where every threshold falls inside its sampled window, pass A's votes replace the vote
    pass (one read fewer): the same bytes as the vote pass's merge, and as the float64 formula.
    `twins`: two fine-tunes with equal task vectors, so the votes of every entry inside one
    window come from pass A's log of entries with several τ_i inside (float32 and float64 rows
    both: one buffer for both read the one as the other, a wrong majority or a crash)."""
    from tensormerge.methods import ties as T

    g = torch.Generator().manual_seed(5)
    base = {"a.weight": torch.randn(96, 40, generator=g).to(torch.bfloat16),
            "b.weight": torch.randn(50, 33, generator=g), "c.bias": torch.randn(70, generator=g).half(),
            "d.weight": torch.randn(40, 30, generator=g).double()}  # float64: its log elects in float64
    fts = [{k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)
                * (torch.rand(v.shape, generator=g) < 0.7)).to(v.dtype) for k, v in base.items()} for _ in range(3)]
    if twins:
        fts[1] = {k: v.clone() for k, v in fts[0].items()}
    paths = [H.save(tmp_path / n, sd) for n, sd in zip(("base", "f1", "f2", "f3"), [base] + fts)]
    monkeypatch.setattr(T._SamplePass, "sample", 1.0)  # a sample this small could miss: make it the model
    votes = []  # each run's model-wide votes, however counted
    finish = T._VotePass.finish
    monkeypatch.setattr(T._VotePass, "finish", lambda self, acc, state: (votes.append(dict(acc)),
                                                                         finish(self, acc, state)))

    def run(tag):
        out = tmp_path / tag
        rep = merge(MergeSpec("ties", paths[1:], str(out), base=paths[0], max_memory="24KiB", kernels=kernels,
                              quiet=True))
        return rep, H.shard_digests(out), load_file(str(out / "model.safetensors"))

    rep, got, tensors = run("window-votes")
    assert {"ties_votes", "ties_low", "ties_high_miss"} <= _pass_names(rep, True)
    assert rep["patched_entries"] == 0
    with monkeypatch.context() as m:
        m.setattr(T, "LOG_BYTES", -1)  # no votes from pass A: the vote pass runs
        rep2, want, _ = run("vote-pass")
    assert "ties_votes" in _pass_names(rep2, False) and got == want
    assert len(votes) == 2 and votes[0] == votes[1] and votes[0]
    exp = reference_ties(base, fts)
    for n, t in tensors.items():
        tol = TOL.get(t.dtype, 2e-6)  # float64: the formula above forms fp32 task vectors
        torch.testing.assert_close(t.double(), exp[n].to(t.dtype).double(), rtol=0, atol=tol)


def test_window_votes_sum_alike_in_any_grouping_and_give_up_past_the_log(monkeypatch):
    """Pass A's partial votes summed chunk by chunk (the local executor), or first per block (dask
    folds a block's partials with `+`), give the same total, the vote pass's; a log past
    LOG_BYTES gives none."""
    from tensormerge.kernels import select as S
    from tensormerge.methods import ties as T

    g = torch.Generator().manual_seed(3)
    base = torch.randn(30000, generator=g).to(torch.bfloat16)
    fts = [(base.float() + 0.05 * torch.randn(30000, generator=g)).to(torch.bfloat16) for _ in range(3)]
    fts[2][:15000] = fts[1][:15000]
    tau = torch.stack([f.float() - base.float() for f in fts])
    windows = [(int(S.abs_bits(t).sort().values[18000]) >> 16) - 1 for t in tau]
    cuts = [0, 7, 4096, 12000, 12001, 29000, 30000]
    parts = [T._WindowVotes.of_chunk(3, K.ties_window_votes([f[a:b] for f in fts], base[a:b], windows,
                                                            T.WINDOW_BINS, b - a)[4])
             for a, b in zip(cuts, cuts[1:])]
    thresholds = [float(S.abs_bits(t).sort().values[18000].view(torch.float32)) for t in tau]
    offsets = [int(torch.tensor([v]).view(torch.int32)) - (w << 16) for v, w in zip(thresholds, windows)]
    want = K.ties_votes(fts, base, thresholds, "mass", None)

    for fold_at in (0, 1):  # the listed changes kept as lists to the end, or added to the table at once
        monkeypatch.setattr(T._Table, "fold_at", fold_at)
        local = parts[0].copy()
        for p in parts[1:]:
            local += p
        folded = (parts[0] + parts[1] + parts[2]).copy()
        folded += parts[3] + parts[4] + parts[5]
        assert local.total(offsets, thresholds) == folded.total(offsets, thresholds) == want
    assert sum(p.log_bytes() for p in parts) > 0 and sum(p.delta.listed.size for p in parts) > 0

    monkeypatch.setattr(T, "LOG_BYTES", sum(p.log_bytes() for p in parts) - 1)
    local = parts[0].copy()
    for p in parts[1:]:
        local += p
    assert not local.known


def test_window_counts_listed_or_dense_sum_to_the_same_table(monkeypatch):
    """Pass A's window counts arrive dense (the reference, Triton) or listed (the fused kernel);
    summed in any grouping, kept listed or added to the table as they grow, the table is the
    same, and `_compact` places the same thresholds."""
    from tensormerge.methods import ties as T

    g = torch.Generator().manual_seed(4)
    span = T.WINDOW_BINS * 65536
    places = [torch.randint(0, 2 * span, (n,), generator=g) for n in (0, 5, 300, 7)]
    want = torch.bincount(torch.cat(places), minlength=2 * span).reshape(2, span)
    for fold_at in (0, 1, 100):
        monkeypatch.setattr(T._Table, "fold_at", fold_at)
        t = T._Table(2, span)
        t += T._Listed(places[0]) + T._Listed(places[1])
        t += torch.bincount(places[2], minlength=2 * span).reshape(2, span)
        t += T._Listed(places[3])
        assert torch.equal(t.table(), want)
