"""The image experiment (`./scripts/example --vision`) in its reduced `--quick` mode: a tiny ViT
pretrained by rotation prediction on load_digits PNGs, two task fine-tunes, statistics from
`tensormerge stats compute` on the image files, merges through the CLI. Checks properties, never
particular accuracies."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from tensormerge import experiment_vision as V  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment-vision")
    return V.run_experiment(V.Config(**V.QUICK), str(root), log=lambda *a: None)


def test_training_pixels_are_what_the_saved_processor_makes(tmp_path):
    """The experiment trains and evaluates on to_pixels(); stats compute reads the PNGs through
    the saved processor: both must be the same input."""
    from PIL import Image
    from transformers import AutoImageProcessor

    px, _ = V.load_splits(0)["train"]
    rel = V.write_images(str(tmp_path), px[:5], "t")
    V.save_model(V.make_model(V.Config()), str(tmp_path / "m"))
    proc = AutoImageProcessor.from_pretrained(str(tmp_path / "m"))
    ims = [Image.open(tmp_path / r) for r in rel]
    got = torch.as_tensor(proc(images=ims, return_tensors="pt")["pixel_values"]).float()
    torch.testing.assert_close(got, V.to_pixels(px[:5]), rtol=0, atol=1e-6)


def test_table_rows_and_statistics_stores(result):
    cfg = V.Config(**V.QUICK)
    models = [r["model"] for r in result["rows"]]
    assert models == ["base"] + [f"ft-{t}" for t in cfg.tasks] + list(cfg.methods)
    for r in result["rows"]:
        assert set(r["acc"]) == set(cfg.tasks) and all(0.0 <= v <= 1.0 for v in r["acc"].values())
        assert r["mean"] == pytest.approx(sum(r["acc"].values()) / len(cfg.tasks))
    root = result["workdir"]
    from tensormerge.stats.store import StatsStore

    for t in cfg.tasks:
        s = StatsStore(os.path.join(root, f"stats-{t}.zarr"))
        assert s.attrs["n_examples"] == cfg.stats_examples
        assert "classifier.weight" in s.arrays["fisher"]
        with open(os.path.join(root, f"data-{t}.jsonl")) as f:
            rec = json.loads(f.readline())
        assert os.path.isfile(os.path.join(root, rec["image"])) and rec["label"] in V.LABELS
    table = V.format_table(result)
    assert all(m in table for m in models)


def test_fine_tunes_learn_their_task(result):
    """Each fine-tune beats chance on its own task (20% for lo / hi) by a wide margin, so the
    table measures merging, not an untrained model."""
    rows = {r["model"]: r for r in result["rows"]}
    for t in V.Config(**V.QUICK).tasks:
        assert rows[f"ft-{t}"]["acc"][t] > 0.4, rows[f"ft-{t}"]
