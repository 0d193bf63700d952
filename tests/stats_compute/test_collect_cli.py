"""`tensormerge stats compute` through the command line: bad data refused in one line with no
store left, an interrupted run resumed to the same result, text data tokenized like the
pre-tokenized equivalent, and stores that feed `tensormerge run` for regmean, fisher and mats."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers import CliResult, assert_clean_error, run_cli  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(cm.V - 4)]


def tokenizer(path):
    """A word-level tokenizer over WORDS, saved beside a model (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(path))
    return fast


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = cm.save(cm.llama(), root / "llama")
    with_tok = cm.save(cm.llama(), root / "llama-tok")
    tokenizer(with_tok)
    return root, model, with_tok


def cli(args: list) -> CliResult:
    """`tensormerge ARGS` through the real entry point (`main`: one-line errors, exit status), in
    this process: transformers is imported once per test session instead of once per command."""
    import contextlib
    import io
    import sys

    from tensormerge.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["tensormerge", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return CliResult(code, out.getvalue(), err.getvalue(), [str(a) for a in args])


def _compute(args, env=None):
    if env:  # a run that must really die (SIGKILL) needs its own process
        return run_cli(["stats", "compute", *map(str, args)], env=env)
    return cli(["stats", "compute", *args])


BAD = {
    "missing-field": ('{"input": "w1 w2", "target": "w3"}\n{"input": "w4"}\n', ["data.jsonl:2", "'target'"]),
    "invalid-json": ('{"input_ids": [3, 4, 5]}\n{"input_ids": [3, 4]}\n{"input_ids": [3,\n',
                     ["data.jsonl:3", "invalid JSON"]),
    "empty": ("", ["data.jsonl", "empty"]),
    "unterminated": ('{"input_ids": [3, 4, 5]}\n{"input_ids": [3, 4\n', ["data.jsonl:2", "at column 20"]),
    "labels-too-long": ('{"input_ids": [3, 4, 5, 6, 7, 8], "labels": [3, 4, 5, 6, 7, 8]}\n',
                        ["data.jsonl:1", "'labels'", "--max-length 4"]),
    "text-without-tokenizer": ('{"text": "w1 w2 w3"}\n', ["llama", "no tokenizer", "'text'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_one_line_error_and_no_store(llama_dir, tmp_path, case):
    _, bare, with_tok = llama_dir
    model = bare if case == "text-without-tokenizer" else with_tok
    text, needles = BAD[case]
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    out = tmp_path / "S.zarr"
    res = _compute(["--model", model, "--data", data, "--kind", "all", "--output", out, "--max-length", 4])
    assert_clean_error(res, *needles, out_dir=out)


def test_max_length_below_two_names_the_real_minimum(llama_dir, tmp_path):
    _, _, with_tok = llama_dir
    data = cm.write_jsonl(tmp_path / "d.jsonl", cm.causal_records(2, seed=1))
    res = _compute(["--model", with_tok, "--data", data, "--kind", "fisher", "--output", tmp_path / "S.zarr",
                    "--max-length", 1])
    assert_clean_error(res, "--max-length 1", "at least 2", out_dir=tmp_path / "S.zarr")


def test_data_that_is_a_pipe_is_refused_not_read_forever(llama_dir, tmp_path):
    _, _, with_tok = llama_dir
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "S.zarr"
    res = run_cli(["stats", "compute", "--model", with_tok, "--data", str(fifo), "--kind", "fisher", "--output",
                   str(out)], timeout=120)
    assert_clean_error(res, str(fifo), "not a regular file", out_dir=out)
    assert not os.path.exists(str(out) + ".partial.lock") and not os.path.exists(str(out) + ".partial")


def test_interrupted_run_resumes_to_the_same_store(llama_dir, tmp_path):
    _, model, _ = llama_dir
    data = cm.write_jsonl(tmp_path / "d.jsonl", cm.causal_records(9, seed=5))
    common = ["--model", model, "--data", data, "--kind", "all", "--batch-size", 2, "--checkpoint-every", 1]
    full = tmp_path / "full.zarr"
    assert _compute([*common, "--output", full, "--quiet"]).returncode == 0

    out = tmp_path / "S.zarr"
    killed = _compute([*common, "--output", out, "--quiet"], env={"TENSORMERGE_FAULT_KILL_AFTER_CHECKPOINT": "2"})
    assert killed.returncode in (-9, 137), killed
    assert not out.exists() and (tmp_path / "S.zarr.partial" / ".resume" / "state.pt").is_file()

    # a different run is refused, and leaves the checkpoint alone
    other = _compute(["--model", model, "--data", data, "--kind", "all", "--batch-size", 3, "--output", out, "--resume"])
    assert_clean_error(other, "different run")
    res = _compute([*common, "--output", out, "--resume"])
    assert res.returncode == 0, res
    assert "resuming at example 4 of 9" in res.stdout
    a, b = cm.read_store(str(full)), cm.read_store(str(out))
    for kind in ("fisher", "gram_in", "gram_out", "fisher_block"):
        assert set(a[kind]) == set(b[kind])
        for k in a[kind]:
            assert torch.equal(a[kind][k], b[kind][k]), f"{kind}/{k}"
    assert not (tmp_path / "S.zarr.partial").exists()


def test_text_fields_and_saved_dataset_match_pre_tokenized(tmp_path):
    model = cm.save(cm.llama(), tmp_path / "llama")
    tok = tokenizer(tmp_path / "llama")
    recs = [{"input": "w1 w5 w9", "target": "w3 w4"}, {"input": "w7", "target": "w8 w2 w11 w12"},
            {"text": "w20 w21 w22 w23"}]
    text = cm.write_jsonl(tmp_path / "text.jsonl", recs)
    pre = []
    for r in recs:
        if "text" in r:
            ids = tok(r["text"])["input_ids"]
            pre.append({"input_ids": ids, "labels": ids})
        else:
            p, a = tok(r["input"])["input_ids"], tok(r["target"], add_special_tokens=False)["input_ids"] + [2]
            pre.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    pre_path = cm.write_jsonl(tmp_path / "pre.jsonl", pre)
    import datasets

    datasets.Dataset.from_list(pre).save_to_disk(str(tmp_path / "ds"))
    stores = {}
    for name, data in (("text", text), ("pre", pre_path), ("disk", tmp_path / "ds")):
        out = tmp_path / f"{name}.zarr"
        res = _compute(["--model", model, "--data", data, "--kind", "all", "--output", out, "--batch-size", 2,
                        "--padding-side", "right", "--quiet"])
        assert res.returncode == 0, res
        stores[name] = cm.read_store(str(out))
    for name in ("pre", "disk"):
        for kind in ("fisher", "gram_in"):
            for k, v in stores["text"][kind].items():
                assert torch.equal(v, stores[name][kind][k]), (name, kind, k)


def test_help_lists_every_option_with_help():
    res = cli(["stats", "compute", "--help"])
    assert res.returncode == 0
    for opt in ("--model", "--data", "--kind", "--output", "--fisher-type", "--fisher-mode", "--max-examples",
                "--batch-size", "--max-length", "--device", "--dtype", "--max-memory", "--resume", "--overwrite",
                "--quiet", "--seed", "--accumulate", "--gram-normalize", "--split", "--base-model"):
        assert opt in res.stdout, opt


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    base = cm.llama(tie=False, seed=0)
    g = torch.Generator().manual_seed(1)
    dirs, stores = [], []
    for i in range(3):
        ft = cm.llama(tie=False, seed=0)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        d = cm.save(ft, root / f"ft{i}")
        data = cm.write_jsonl(root / f"d{i}.jsonl", cm.causal_records(6, seed=10 + i))
        out = root / f"s{i}.zarr"
        res = _compute(["--model", d, "--data", data, "--kind", "all", "--output", out, "--batch-size", 3, "--quiet"])
        assert res.returncode == 0, res
        dirs.append(d)
        stores.append(str(out))
    del base
    return root, dirs, stores


@pytest.mark.parametrize("method,params", [("regmean", []), ("fisher", []),
                                           ("mats", ["-p", "objective=kfac", "-p", "init=average"])])
def test_computed_stores_feed_tensormerge_run(finetunes, method, params):
    root, dirs, stores = finetunes
    out = root / f"merged-{method}"
    res = cli(["run", "--method", method, "--inputs", ",".join(dirs), "--stats", ",".join(stores),
                   "--output", out, "--quiet", *params])
    assert res.returncode == 0, res
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(str(out))
    first = LlamaForCausalLM.from_pretrained(dirs[0])
    w = merged.model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(w).all() and not torch.equal(w, first.model.layers[0].self_attn.q_proj.weight)
    manifest = json.loads((out / "tensormerge.json").read_text())
    # every block the method has statistics for used them: only the embedding (no Gram) and, for
    # K-FAC, the output layer (no gram_out) fell back to the average
    expected = {"regmean": {"model.embed_tokens.weight"}, "fisher": set(),
                "mats": {"model.embed_tokens.weight", "lm_head.weight"}}[method]
    assert set(manifest["fallback_blocks"]) == expected, manifest["fallback_blocks"]


def test_store_of_one_finetune_is_refused_for_another(finetunes):
    root, dirs, stores = finetunes
    res = cli(["run", "--method", "fisher", "--inputs", ",".join(dirs), "--stats", ",".join(stores[::-1]),
                   "--output", root / "wrong"])
    assert_clean_error(res, "computed for")
