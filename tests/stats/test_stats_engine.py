"""Statistics through the engine: the store's row reads, same bytes whatever the chunking or
thread count, and every kind of bad statistics refused with one line before anything is written."""

import json

import pytest
import torch

from tensormerge.api import MergeSpec, merge, plan
from tensormerge.engine.sources import open_checkpoint
from tensormerge.stats.store import StatsStore, row_chunks

from tests.conftest import write_family
from tests.helpers import assert_clean_error, digests_per_thread_count, run_cli, shard_digests, write_store

TENSORS = {
    "big.w": ((2000, 8), torch.float32),
    "mid.w": ((600, 20), torch.bfloat16),
    "mid.b": ((20,), torch.float16),
    "vec": ((12,), torch.float32),
    "s": ((), torch.float32),
    "ids": ((1, 5), torch.int64),
}


def _spd(d, seed):
    n = min(3 * d, 48)  # wide Grams: a low-rank sample plus a ridge keeps them cheap and SPD
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x.T @ x / n + 0.1 * torch.eye(d)


def make_stats(root, sds, with_base=False):
    """One store per model: Fishers for every float tensor, Grams for the matrices, Fisher blocks
    for the vectors."""
    paths = []
    for i, sd in enumerate(sds):
        g = torch.Generator().manual_seed(100 + i)
        stats = {"fisher": {}, "gram_in": {}, "gram_out": {}, "fisher_block": {}}
        for name, t in sd.items():
            if not t.is_floating_point():
                continue
            stats["fisher"][name] = torch.rand(t.shape, generator=g) ** 2
            if t.dim() == 2:
                stats["gram_in"][name] = _spd(t.shape[1], 200 + i)
                stats["gram_out"][name] = _spd(t.shape[0], 300 + i)
            if t.dim() == 1:
                stats["fisher_block"][name] = _spd(t.shape[0], 400 + i)
        paths.append(write_store(root / f"s{i}.zarr", stats))
    return paths


@pytest.fixture(scope="module")
def stats_family(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stats-family")
    base, fts, base_sd, ft_sds = write_family(tmp_path / "models", TENSORS)
    stores = make_stats(tmp_path, ft_sds)
    base_store = make_stats(tmp_path / "b", [base_sd])[0]
    return base, fts, stores, base_store


CASES = {
    "fisher": {},
    "fisher-normalize": {"normalize": "true", "floor_mode": "add"},
    "regmean": {"alpha": "0.7"},
    "ubgm": {"alpha": "0.8"},
}
MEMORY = {"regmean": "400KiB"}  # its 256-row tiles need more than a few rows of the others


@pytest.mark.parametrize("label", list(CASES))
def test_row_chunks_give_identical_bytes(stats_family, tmp_path, label):
    base, fts, stores, base_store = stats_family
    method = label.split("-")[0]
    runs = {}
    small = MEMORY.get(method, "40KiB")
    for mem in ("64MiB", small):
        out = tmp_path / f"{label}-{mem}"
        rep = merge(MergeSpec(method, fts, str(out), base=base, stats=stores,
                              base_stats=base_store if method == "ubgm" else None, params=CASES[label],
                              max_memory=mem, quiet=True))
        runs[mem] = shard_digests(out)
        if mem == small:
            chunked = {b["name"] for b in rep["blocks"] if b["chunks"] > 1}
            assert {"big.w", "mid.w"} <= chunked, chunked  # really split by rows
        assert rep["fallback_blocks"] == {}
    assert runs["64MiB"] == runs[small]


@pytest.mark.parametrize("method", ["regmean", "mats"])
def test_thread_count_does_not_change_bytes(stats_family, tmp_path, method):
    base, fts, stores, _ = stats_family
    one, two = digests_per_thread_count(
        lambda out: merge(MergeSpec(method, fts, str(out), base=base, stats=stores, quiet=True)), tmp_path)
    assert one == two


def test_plan_and_report_list_statistics_and_fallbacks(stats_family, tmp_path):
    base, fts, stores, _ = stats_family
    text = plan(MergeSpec("regmean", fts, None, base=base, stats=stores))
    assert "statistics 3 store(s)" in text and "2 blocks merged with gram_in" in text
    # a store that lacks one Gram: that block is averaged, counted in the plan, listed in the report
    partial = write_store(tmp_path / "partial.zarr", {"gram_in": {"big.w": _spd(8, 1)}})
    spec = MergeSpec("regmean", fts, str(tmp_path / "out"), base=base, stats=[stores[0], partial, stores[2]],
                     quiet=True)
    assert "1 averaged for lack of statistics" in plan(spec)
    rep = merge(spec)
    assert rep["fallback_blocks"] == {"mid.w": f"no gram_in in {partial}"}
    prov = json.load(open(tmp_path / "out" / "tensormerge.json"))
    assert prov["fallback_blocks"] == rep["fallback_blocks"]
    assert [s["path"] for s in prov["statistics"]["stores"]] == [stores[0], partial, stores[2]]


def test_stores_of_the_wrong_kind_warn_even_when_quiet_and_the_card_counts_the_fallbacks(stats_family, tmp_path):
    """Fisher merging given stores that hold Grams only: every block is averaged. That is almost
    surely a mistake (a store of another --kind), so it is a warning (printed under -q too), and
    the card says how many tensors were merged with statistics, not only which stores it read."""
    base, fts, stores, _ = stats_family
    grams = [write_store(tmp_path / f"g{i}.zarr", {"gram_in": {"big.w": _spd(8, i)}}) for i in range(3)]
    out = tmp_path / "out"
    res = run_cli(["run", "--method", "fisher", "--inputs", ",".join(fts), "--stats", ",".join(grams),
                   "--output", str(out), "-q"])
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning: --stats: no tensor")]
    assert len(warned) == 1 and "'fisher'" in warned[0] and "averaged" in warned[0], res.stderr
    card = (out / "README.md").read_text()
    n = len(json.load(open(out / "tensormerge.json"))["fallback_blocks"])
    assert n > 0 and f"0 of the {n} merged tensors were merged with their statistics" in card
    # stores that serve: no warning, and the card counts them
    good = tmp_path / "good"
    res = run_cli(["run", "--method", "fisher", "--inputs", ",".join(fts), "--stats", ",".join(stores),
                   "--output", str(good), "-q"])
    assert res.returncode == 0 and "warning: --stats: no tensor" not in res.stderr, res.stderr
    # these stores record no model (written without one, as `stats import` without --model): said
    unidentified = [line for line in res.stderr.splitlines() if "records no model" in line]
    assert [line.split()[2] for line in unidentified] == [s + ":" for s in stores], res.stderr
    assert f"{n} of the {n} merged tensors were merged with their statistics; 0 had none" in \
        (good / "README.md").read_text()


def test_a_store_that_records_its_model_is_not_warned_about(stats_family, tmp_path):
    from tensormerge.stats.bind import bind_stats

    _, fts, _, _ = stats_family
    cks = [open_checkpoint(f) for f in fts]
    made = [write_store(tmp_path / f"m{i}.zarr", {"fisher": {"mid.b": torch.ones(cks[i].tensors["mid.b"].shape)}},
                        model={"spec": f, "identity": ck.identity()}) for i, (f, ck) in enumerate(zip(fts, cks))]
    bare = write_store(tmp_path / "bare.zarr", {"fisher": {"mid.b": torch.ones(cks[2].tensors["mid.b"].shape)}})
    assert bind_stats(made, None, cks, None, "fisher").unidentified() == []
    assert bind_stats(made[:2] + [bare], None, cks, None, "fisher").unidentified() == [bare]


def test_store_reads_rows_and_urls(tmp_path):
    f = torch.rand(5000, 300)
    path = write_store(tmp_path / "s.zarr", {"fisher": {"w": f, "s": torch.tensor(2.0)}}, count=7)
    s = StatsStore(path)
    assert s.arrays["fisher"]["w"].shape == (5000, 300) and s.arrays["fisher"]["w"].attrs["count"] == 7
    assert torch.equal(s.read("fisher", "w", 1234, 2345), f[1234:2345])
    assert torch.equal(s.read("fisher", "s"), torch.tensor(2.0))
    assert row_chunks((5000, 300)) == (873, 300)  # ~1 MiB of whole rows
    url = StatsStore("file://" + path)
    assert torch.equal(url.read("fisher", "w", 0, 3), f[:3])


# ----------------------------------------------------------------------------- bad statistics
def _cli(base, fts, stores, out, method="fisher", extra=()):
    return run_cli(["run", "--quiet", "--method", method, "--inputs", ",".join(fts), "--base", base,
                    "--stats", ",".join(stores), "--output", str(out), *extra])


def _broken(tmp_path, stores, i, stats, model=None):
    s = list(stores)
    s[i] = write_store(tmp_path / f"bad{i}.zarr", stats, model=model)
    return s


def test_bad_statistics_are_refused_with_one_line(stats_family, tmp_path):
    base, fts, stores, _ = stats_family
    out = tmp_path / "out"
    res = _cli(base, fts, _broken(tmp_path, stores, 1, {"fisher": {"big.w": torch.rand(2000, 9)}}), out)
    assert_clean_error(res, "bad1.zarr", "fisher/big.w", "[2000, 9]", "[2000, 8]", out_dir=out)
    nan = torch.rand(2000, 8)
    nan[150, 3] = float("nan")
    res = _cli(base, fts, _broken(tmp_path, stores, 0, {"fisher": {"big.w": nan}}), out)
    assert_clean_error(res, "bad0.zarr", "fisher/big.w", "NaN", out_dir=out)
    res = _cli(base, fts, _broken(tmp_path, stores, 2, {"fisher": {"big.w": -torch.rand(2000, 8)}}), out)
    assert_clean_error(res, "bad2.zarr", "fisher/big.w", "negative", out_dir=out)
    skew = _spd(8, 0)
    skew[0, 1] += 1.0
    res = _cli(base, fts, _broken(tmp_path, stores, 1, {"gram_in": {"big.w": skew}}), out, "regmean")
    assert_clean_error(res, "bad1.zarr", "gram_in/big.w", "not symmetric", out_dir=out)
    res = _cli(base, fts, _broken(tmp_path, stores, 1, {"gram_in": {"vec": _spd(12, 0)}}), out, "regmean")
    assert_clean_error(res, "bad1.zarr", "gram_in/vec", "does not apply", out_dir=out)


def test_store_for_another_model_is_refused(stats_family, tmp_path):
    base, fts, stores, _ = stats_family
    out = tmp_path / "out"
    # another architecture: keys this model does not have
    res = _cli(base, fts, _broken(tmp_path, stores, 0, {"fisher": {"encoder.block.0.q.weight": torch.rand(4, 4)}}), out)
    assert_clean_error(res, "bad0.zarr", "fisher/encoder.block.0.q.weight", "names no tensor", out_dir=out)
    # same architecture, other weights: the identity recorded in the store does not match
    other = open_checkpoint(fts[1]).identity()
    res = _cli(base, fts, _broken(tmp_path, stores, 0, {"fisher": {"big.w": torch.rand(2000, 8)}},
                                  model={"spec": fts[1], "identity": other}), out)
    assert_clean_error(res, "bad0.zarr", fts[1], fts[0], "statistics were computed for", out_dir=out)
    mine = open_checkpoint(fts[0]).identity()
    ok = _broken(tmp_path, stores, 0, {"fisher": {"big.w": torch.rand(2000, 8)}}, model={"spec": fts[0], "identity": mine})
    assert _cli(base, fts, ok, out).returncode == 0


def test_missing_or_unusable_stores_are_refused(stats_family, tmp_path):
    base, fts, stores, _ = stats_family
    out = tmp_path / "out"
    assert_clean_error(_cli(base, fts, stores[:2], out), "--stats", "2 store(s) for 3 input(s)", out_dir=out)
    assert_clean_error(_cli(base, fts, [stores[0], str(tmp_path / "nope.zarr"), stores[2]], out),
                       "nope.zarr", "not found", out_dir=out)
    (tmp_path / "plain").mkdir()
    assert_clean_error(_cli(base, fts, [stores[0], str(tmp_path / "plain"), stores[2]], out), "plain", out_dir=out)
    res = run_cli(["run", "--method", "fisher", "--inputs", ",".join(fts), "--output", str(out)])
    assert_clean_error(res, "fisher", "needs --stats", out_dir=out)
    assert_clean_error(_cli(base, fts, stores, out, "ties"), "--stats", "ties", "uses no statistics", out_dir=out)
    res = _cli(base, fts, stores, out, "fisher", ("--base-stats", stores[0]))
    assert_clean_error(res, "--base-stats", "fisher", out_dir=out)
