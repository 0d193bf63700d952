"""The README's experiment (`./scripts/example`) in its reduced `--quick` mode: a tiny Llama
pretrained on load_digits, two task fine-tunes, statistics from `tensormerge stats compute`, merges
through the CLI. Checks properties, never particular accuracies."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from tensormerge import experiment as E  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    return E.run_experiment(E.Config(**E.QUICK), str(root), log=lambda *a: None)


def test_splits_are_disjoint_stratified_and_deterministic():
    a, b = E.load_splits(0), E.load_splits(0)
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    assert sum(len(a[k][1]) for k in a) == 1797
    assert len(a["test"][1]) > len(a["val"][1]) > 0 and len(a["train"][1]) > len(a["test"][1])
    for k in a:
        assert set(a[k][1].tolist()) == set(range(10))
        assert int(a[k][0].max()) <= 16


def test_sequence_format_and_jsonl(tmp_path):
    px, y = E.load_splits(0)["train"]
    task = E.TASKS["parity"]
    ids, labels = E.task_sequences(task, px, y)
    assert ids.shape == (len(y), 68) and torch.equal(ids[:, -1], labels)
    assert (ids[:, 0] == E.BOS).all() and (ids[:, 1] == E.TASK_TOKEN["parity"]).all() and (ids[:, -2] == E.SEP).all()
    assert int(ids.max()) < E.VOCAB
    lo_ids, _ = E.task_sequences(E.TASKS["lo"], px, y)
    assert len(lo_ids) == int((y < 5).sum())
    path = E.write_jsonl(str(tmp_path / "d.jsonl"), ids[:3], label_only=True)
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert rows[0]["input_ids"] == ids[0].tolist()
    assert rows[0]["labels"][:-1] == [-100] * 67 and rows[0]["labels"][-1] == int(labels[0])


def test_table_has_base_fine_tunes_and_every_method(result):
    models = [r["model"] for r in result["rows"]]
    cfg = E.Config(**E.QUICK)
    assert models == ["base"] + [f"ft-{t}" for t in cfg.tasks] + list(cfg.methods)
    assert not result["notes"] or all("not available" not in n for n in result["notes"])
    for r in result["rows"]:
        assert set(r["acc"]) == set(cfg.tasks) and all(0.0 <= v <= 1.0 for v in r["acc"].values())
        assert r["mean"] == pytest.approx(sum(r["acc"].values()) / len(cfg.tasks))
        assert (r["seconds"] is None) == (r["model"] in ("base", *(f"ft-{t}" for t in cfg.tasks)))
    table = E.format_table(result)
    for m in models:
        assert m in table


def test_fine_tunes_beat_the_base_on_their_own_task(result):
    rows = {r["model"]: r for r in result["rows"]}
    for t in result["tasks"]:
        assert rows[f"ft-{t}"]["acc"][t] > rows["base"]["acc"][t], (t, rows[f"ft-{t}"]["acc"], rows["base"]["acc"])


def test_normalised_accuracy_is_relative_to_the_fine_tunes(result):
    rows = {r["model"]: r for r in result["rows"]}
    own = {t: rows[f"ft-{t}"]["acc"][t] for t in result["tasks"]}
    for r in result["rows"]:
        assert r["normalised"] == pytest.approx(sum(r["acc"][t] / own[t] for t in own) / len(own))


def test_merged_outputs_load_and_reproduce_the_table(result):
    from transformers import LlamaForCausalLM

    root = result["workdir"]
    split = E.load_splits(0)["test"]
    tasks = [E.TASKS[t] for t in result["tasks"]]
    for r in result["rows"][1 + len(tasks):]:
        out = r["output"]   # a swept method's is the candidate its sweep chose
        if r["model"] in E.VALIDATED:
            assert os.path.dirname(out) == os.path.join(root, f"sweep-{r['model']}")
        else:
            assert out == os.path.join(root, f"merged-{r['model']}")
        _, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        with open(os.path.join(out, "tensormerge.json")) as f:
            meta = json.load(f)
        assert meta["method"] == r["model"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # as the experiment evaluates
        try:
            assert E.evaluate(E.load_model(out), tasks, split) == pytest.approx(r["acc"])
        finally:
            torch.set_num_threads(threads)
    # the statistics method read stores written by `stats compute`
    stats_methods = [m for m in E.Config(**E.QUICK).methods if m in E.STATS_METHODS]
    assert stats_methods
    for t in result["tasks"]:
        assert os.path.isdir(os.path.join(root, f"stats-{t}.zarr"))


def test_task_arithmetic_lambda_is_chosen_on_validation(result):
    r = next(r for r in result["rows"] if r["model"] == "task_arithmetic")
    assert float(r["params"]["lambda"]) in E.Config(**E.QUICK).lambdas
    assert any(n.startswith("task_arithmetic: lambda") and "validation" in n for n in result["notes"])


def test_sweeps_choice_is_the_argmax_of_its_validation_scores(result):
    """Each swept knob: sweep.json holds every candidate of the configured values, each scored on
    the validation images (recomputed here for the chosen output, the normaliser from the
    fine-tunes here too), and the experiment took the argmax by hand, ties to the smaller value:
    the rule the hand-written loop had."""
    from tensormerge.evaluate import load_state

    cfg = E.Config(**E.QUICK)
    root = result["workdir"]
    tasks = [E.TASKS[t] for t in result["tasks"]]
    val = E.load_splits(0)["val"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the experiment evaluates
    try:
        ft_val = {t.name: E.accuracy(E.load_model(os.path.join(root, f"ft-{t.name}")), t, *val) for t in tasks}
        swept = [r for r in result["rows"] if r["model"] in E.VALIDATED]
        assert [r["model"] for r in swept] == [m for m in cfg.methods if m in E.VALIDATED] and swept
        for r in swept:
            key = E.VALIDATED[r["model"]]
            values = cfg.lambdas if key == "lambda" else cfg.cg_iterations
            state = load_state(os.path.join(root, f"sweep-{r['model']}"))
            cands = state["candidates"]
            assert sorted(c["params"][key] for c in cands) == sorted(values)
            for c in cands:
                m = c["metrics"]
                assert set(m) == {"val", *result["tasks"]}
                assert m["val"] == pytest.approx(sum(m[t] / ft_val[t] for t in ft_val) / len(ft_val), abs=1e-12)
            best = max(cands, key=lambda c: (c["metrics"]["val"], -c["params"][key]))
            assert float(r["params"][key]) == best["params"][key]
            assert r["output"] == best["output"] and state["selection"]["best"] == best["name"]
            assert [c["name"] for c in cands if c["selected"]] == [best["name"]]
            assert {t.name: E.accuracy(E.load_model(r["output"]), t, *val) for t in tasks} == \
                {t: best["metrics"][t] for t in result["tasks"]}
            # --keep best: only the chosen candidate's output is left
            assert [c["name"] for c in cands if os.path.isdir(c["output"])] == [best["name"]]
            command = r["sweep"]["command"]
            assert command.startswith("tensormerge sweep ") and "--select val:max --keep best" in command
    finally:
        torch.set_num_threads(threads)


def test_sweep_order_gives_ties_to_the_smaller_value():
    """The sweep's ties go to the first candidate; the experiment lists the values increasing, so
    its choice is the old loop's max(scores, key=(score, -value)) on any scores, ties included."""
    from tensormerge import evaluate as ev

    assert E.sweep_values((1.0, 0.3, 0.7, 0.5)) == "0.3,0.5,0.7,1.0"
    assert E.sweep_values((100, 3, 30, 10)) == "3,10,30,100"
    values = (1.0, 0.3, 0.7, 0.5)
    for scores in ((0.5, 0.5, 0.5, 0.5), (0.4, 0.5, 0.5, 0.1), (0.9, 0.2, 0.9, 0.3), (0.1, 0.2, 0.3, 0.4)):
        by_value = dict(zip(values, scores))
        cands = [ev.Candidate(f"lambda={v}", "task_arithmetic", {"lambda": v}, {"lambda": v}, f"/x/{v}",
                              status="merged", metrics={"val": by_value[v]})
                 for v in map(float, E.sweep_values(values).split(","))]
        chosen = ev.select(cands, E.SELECT)
        assert chosen.params["lambda"] == max(by_value, key=lambda v: (by_value[v], -v)), scores


def test_validation_score_needs_the_workdir(monkeypatch, tmp_path):
    monkeypatch.delenv(E.WORKDIR_ENV, raising=False)
    with pytest.raises(RuntimeError, match=E.WORKDIR_ENV):
        E.validation_score(str(tmp_path))


def test_main_prints_the_table_and_writes_json(tmp_path, monkeypatch, capsys):
    cfg = E.Config(**{**E.QUICK, "methods": ("average",), "tasks": ("lo",), "pretrain_epochs": 1,
                      "finetune_steps": 2})
    monkeypatch.setattr(E, "QUICK", dataclass_dict(cfg))
    out = tmp_path / "r.json"
    E.main(["--quick", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    text = capsys.readouterr().out
    assert "average" in text and "ft-lo" in text and "norm." in text
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["rows"]] == ["base", "ft-lo", "average"]


def dataclass_dict(cfg) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
