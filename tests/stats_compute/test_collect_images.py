"""`stats compute` on vision models against brute force: tiny ViT and CLIPForImageClassification
(their own heads) and CLIPModel as a zero-shot classifier (vision tower, or both towers), every
kind, vmap and the one-image-per-backward loop, the three data layouts; bad images refused
before any work with file, line and field, and no store left."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from tensormerge.errors import InputError  # noqa: E402
from tensormerge.stats_compute.collect import ComputeOptions, compute_stats  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402
from tests.stats_compute import image_models as im  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
N = 5
KINDS = ("fisher", "gram_in", "gram_out", "fisher_block")


def _compute(model: str, data: str, out, **kw) -> dict:
    opts = dict(model=model, data=data, kind="all", output=str(out), quiet=True, overwrite=True, batch_size=2)
    opts.update(kw)
    summary = compute_stats(ComputeOptions(**opts))
    got = cm.read_store(str(out))
    got["summary"] = summary
    return got


def _assert_matches(got: dict, ref: dict, rtol: float = 1e-4, kinds=KINDS) -> None:
    """Relative error below rtol against each array's largest entry, every kind, same keys.
    (An attention key bias has an exactly zero gradient, softmax being shift-invariant: its
    Fisher is round-off, compared against 1e-9 of the kind's largest entry instead.)"""
    for kind in kinds:
        want = ref[kind]
        keys = set(got.get(kind, {}))
        assert keys == set(want), f"{kind}: {sorted(keys ^ set(want))}"
        top = max(w.abs().max().item() for w in want.values())
        assert top > 0, f"{kind}: reference is zero (the test would not test anything)"
        for k, w in want.items():
            err = (got[kind][k] - w).abs().max().item()
            scale = max(w.abs().max().item(), 1e-9 * top)
            assert err <= rtol * scale, f"{kind}/{k}: relative error {err / scale:.2e}"
    for kind in set(kinds) & {"gram_in", "gram_out"}:
        for k, c in got["counts"][kind].items():
            assert c == ref["rows"][k], (kind, k, c, ref["rows"][k])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    data, recs = im.jsonl_images(root, N, seed=1)
    return root, data, [(str(root / r["image"]), r["label"]) for r in recs]


@pytest.mark.parametrize("arch", ["vit", "clip_classifier", "mha_vit"])
@pytest.mark.parametrize("grad_mode", ["auto", "loop"])
def test_image_classifier_every_kind_equals_brute_force(images, arch, grad_mode, tmp_path):
    root, data, items = images
    make = getattr(im, arch)
    path = im.save(make(), tmp_path / arch)
    ref = im.brute_force(make(), items, path)
    got = _compute(path, data, tmp_path / "s.zarr", grad_mode=grad_mode)
    _assert_matches(got, ref)
    assert set(got["counts"]["fisher"].values()) == {N}
    # the head's input Gram: one pooled vector per image; an encoder layer's: every token
    head = "classifier.weight"
    assert got["counts"]["gram_in"][head] == N
    q = next(k for k in got["counts"]["gram_in"] if k.endswith(("query.weight", "q_proj.weight", "in_proj_weight")))
    assert got["counts"]["gram_in"][q] == N * (1 + (im.SIZE // 4) ** 2)
    if grad_mode == "auto":
        assert got["summary"]["grad_mode"] == "vmap"
    if arch == "mha_vit":  # the fused q/k/v projection: [d, d] input Gram, [3d, 3d] output-gradient Gram
        assert got["gram_in"]["attn.in_proj_weight"].shape == (16, 16)
        assert got["gram_out"]["attn.in_proj_weight"].shape == (48, 48)


@pytest.mark.parametrize("towers", ["vision", "both"])
def test_zero_shot_clip_every_kind_equals_brute_force(images, towers, tmp_path):
    root, _, items = images
    recs = [{"image": p, "label": im.CLASSES[lab]} for p, lab in items]  # class names as labels
    data = cm.write_jsonl(root / f"named-{towers}.jsonl", recs)
    path = im.save(im.clip(), tmp_path / "clip", tok=True)
    prompts = [f"a photo of a {c}" for c in sorted(im.CLASSES)]
    items_sorted = [(p, sorted(im.CLASSES).index(im.CLASSES[lab])) for p, lab in items]
    ref = im.brute_force(im.clip(), items_sorted, path, zero_shot=towers, prompts=prompts)
    got = _compute(path, data, tmp_path / "s.zarr", prompt="a photo of a {}", clip_towers=towers)
    _assert_matches(got, ref)
    text_keys = [k for k in got["fisher"] if k.startswith("text_model.")]
    assert bool(text_keys) == (towers == "both")
    if towers == "both":  # prompts are padded: text Grams count only their real tokens, once per image
        n_tokens = int(im.tokenizer()(prompts, padding=True, return_tensors="pt")["attention_mask"].sum())
        k = next(k for k in got["counts"]["gram_in"] if k.startswith("text_model.") and "q_proj" in k)
        assert got["counts"]["gram_in"][k] == N * n_tokens


def test_true_fisher_samples_classes(images, tmp_path):
    """True Fisher: a class drawn from the model's softmax per image; the same draw made here."""
    root, data, items = images
    path = im.save(im.vit(), tmp_path / "vit")
    model = im.vit()
    from tensormerge.stats_compute.sampling import _draw, _gen

    drawn = []
    with torch.no_grad():
        for j, (p, _) in enumerate(items):
            drawn.append((p, _draw(model(pixel_values=im.pixels(p)).logits[0], _gen(0, j))))
    ref = im.brute_force(model, drawn, path)
    got = _compute(path, data, tmp_path / "s.zarr", kind="fisher", fisher_type="true")
    _assert_matches(got, ref, kinds=("fisher",))
    assert got["attrs"]["fisher_type"] == "true"


def test_folder_and_saved_dataset_equal_jsonl(images, tmp_path):
    """The same images as an image-folder tree and as a datasets save_to_disk directory with an
    Image column give the same statistics as the JSONL file."""
    import shutil

    datasets = pytest.importorskip("datasets")
    root, data, items = images
    order = sorted(range(N), key=lambda i: (items[i][1], f"{i:03d}.png"))
    folder = tmp_path / "tree"
    for i in order:
        (folder / str(items[i][1])).mkdir(parents=True, exist_ok=True)
        shutil.copy(items[i][0], folder / str(items[i][1]) / f"{i:03d}.png")
    ordered = cm.write_jsonl(tmp_path / "ordered.jsonl",
                             [{"image": items[i][0], "label": items[i][1]} for i in order])
    path = im.save(im.vit(), tmp_path / "vit")
    want = _compute(path, ordered, tmp_path / "a.zarr")
    ds = datasets.Dataset.from_dict({"img": [items[i][0] for i in order], "label": [items[i][1] for i in order]},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["0", "1", "2"])}))
    ds.save_to_disk(str(tmp_path / "ds"))
    for src, kw in ((str(folder), {}), (str(tmp_path / "ds"), {"image_field": "img"})):
        got = _compute(path, src, tmp_path / "b.zarr", **kw)
        for kind in KINDS:
            for k, w in want[kind].items():
                torch.testing.assert_close(got[kind][k], w, rtol=0, atol=1e-6 * w.abs().max().item())


# ------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return im.save(im.vit(), tmp_path_factory.mktemp("vit") / "vit")


def _bad(tmp_path, vit_dir, lines: list[str], setup=None):
    (tmp_path / "img").mkdir(exist_ok=True)
    im.write_image(tmp_path / "img" / "ok.png", 0)
    if setup:
        setup(tmp_path)
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "s.zarr"
    with pytest.raises(InputError) as e:
        compute_stats(ComputeOptions(model=vit_dir, data=str(data), kind="all", output=str(out), quiet=True))
    assert not out.exists() and not (tmp_path / "s.zarr.partial").exists()
    msg = str(e.value)
    assert "\n" not in msg
    return msg, str(data)


OK = json.dumps({"image": "img/ok.png", "label": 1})


def test_missing_image_file(tmp_path, vit_dir):
    msg, data = _bad(tmp_path, vit_dir, [OK, json.dumps({"image": "img/nope.png", "label": 0})])
    assert f"{data}:2" in msg and "field 'image'" in msg and "nope.png" in msg and "no such image file" in msg


def test_unreadable_image(tmp_path, vit_dir):
    def setup(d):
        (d / "img" / "junk.png").write_bytes(b"not a png at all")
        full = (d / "img" / "ok.png").read_bytes()
        (d / "img" / "cut.png").write_bytes(full[: len(full) // 2])  # truncated: only a full decode sees it

    for name in ("junk.png", "cut.png"):
        msg, data = _bad(tmp_path, vit_dir, [OK, OK, json.dumps({"image": f"img/{name}", "label": 0})], setup)
        assert f"{data}:3" in msg and "field 'image'" in msg and name in msg and "not a readable image" in msg


@pytest.mark.parametrize("cut", [20, 14, 8, 2])
def test_png_cut_short_after_its_pixels_is_refused(tmp_path, vit_dir, cut):
    """A PNG that lost only its last bytes (the IDAT checksum, the IEND chunk): Pillow's load()
    decodes every pixel and says nothing, so the file used to be read as whole."""
    def setup(d):
        im.write_image(d / "img" / "big.png", 5, size=(32, 24))
        full = (d / "img" / "big.png").read_bytes()
        (d / "img" / "cut.png").write_bytes(full[:-cut])

    msg, data = _bad(tmp_path, vit_dir, [OK, json.dumps({"image": "img/cut.png", "label": 0})], setup)
    assert f"{data}:2" in msg and "field 'image'" in msg and "cut.png" in msg and "truncated" in msg


def test_cli_png_cut_short_is_one_line_and_leaves_no_store(tmp_path, vit_dir):
    from tests.helpers import assert_clean_error
    from tests.stats_compute.test_collect_cli import cli

    (tmp_path / "img").mkdir()
    im.write_image(tmp_path / "img" / "ok.png", 0, size=(32, 24))
    full = (tmp_path / "img" / "ok.png").read_bytes()
    for name, cut in (("mid.png", len(full) // 2), ("end.png", len(full) - 10)):
        (tmp_path / "img" / name).write_bytes(full[:cut])
        data = cm.write_jsonl(tmp_path / f"{name}.jsonl", [{"image": "img/ok.png", "label": 0},
                                                           {"image": f"img/{name}", "label": 1}])
        out = tmp_path / "s.zarr"
        res = cli(["stats", "compute", "--model", vit_dir, "--data", data, "--kind", "all", "-o", str(out)])
        assert_clean_error(res, f"{data}:2", "field 'image'", name, "truncated", out_dir=out)
        assert not (tmp_path / "s.zarr.partial").exists()


def test_wrong_mode_image(tmp_path, vit_dir):
    msg, data = _bad(tmp_path, vit_dir, [json.dumps({"image": "img/rgba.png", "label": 0})],
                     lambda d: im.write_image(d / "img" / "rgba.png", 3, "RGBA"))
    assert f"{data}:1" in msg and "field 'image'" in msg and "mode RGBA" in msg


@pytest.mark.parametrize("rec, field", [({"label": 0}, "image"), ({"image": "img/ok.png"}, "label"),
                                        ({"image": "img/ok.png", "label": 7}, "label"),
                                        ({"image": 3, "label": 0}, "image")])
def test_record_without_mapped_field(tmp_path, vit_dir, rec, field):
    msg, data = _bad(tmp_path, vit_dir, [OK, json.dumps(rec)])
    assert f"{data}:2" in msg and f"field '{field}'" in msg


def test_image_field_mapping(tmp_path, vit_dir):
    msg, data = _bad(tmp_path, vit_dir, [json.dumps({"picture": "img/ok.png", "label": 0})])
    assert "missing field 'image'" in msg
    out = tmp_path / "m.zarr"
    data = cm.write_jsonl(tmp_path / "m.jsonl", [{"picture": "img/ok.png", "label": 0}])
    compute_stats(ComputeOptions(model=vit_dir, data=data, kind="gram", output=str(out), quiet=True,
                                 image_field="picture"))
    assert out.exists()


def test_bad_dataset_row_named(tmp_path, vit_dir):
    datasets = pytest.importorskip("datasets")
    im.write_image(tmp_path / "ok.png", 0)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "ok.png"), str(tmp_path / "bad.png")],
                                     "label": [0, 1]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "s.zarr"
    with pytest.raises(InputError, match=r"ds row 1 field 'image': .*not a readable image"):
        compute_stats(ComputeOptions(model=vit_dir, data=str(tmp_path / "ds"), kind="all", output=str(out),
                                     quiet=True))
    assert not out.exists()


@pytest.mark.parametrize("batch_first", [True, False])
def test_fused_projection_keeps_torch_attention(batch_first):
    """The exposed in_proj child changes nothing the attention computes: self-attention goes
    through it (its input is the Gram's rows), cross-attention (a probe querying tokens) does not."""
    import copy

    from tensormerge.stats_compute.fused import expose_fused_projections

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    ref = copy.deepcopy(mha)
    assert expose_fused_projections(mha) == {"in_proj.weight": "in_proj_weight"}
    assert [n for n, _ in mha.named_parameters()] == [n for n, _ in ref.named_parameters()]
    calls = []
    mha.in_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    x = torch.randn(3, 5, 8)
    mask = torch.zeros((3, 5) if batch_first else (5, 3), dtype=torch.bool)  # [batch, keys]
    mask[0, -2:] = True
    got = mha(x, x, x, key_padding_mask=mask)
    want = ref(x, x, x, key_padding_mask=mask)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    assert calls == [(5, 3, 8) if batch_first else (3, 5, 8)]
    probe = torch.randn(3, 1, 8) if batch_first else torch.randn(1, 5, 8)
    torch.testing.assert_close(mha(probe, x, x)[0], ref(probe, x, x)[0])
    assert len(calls) == 1


def test_cli_bad_image_is_one_line_and_leaves_no_store(tmp_path, vit_dir):
    from tests.helpers import assert_clean_error
    from tests.stats_compute.test_collect_cli import cli

    (tmp_path / "img").mkdir()
    im.write_image(tmp_path / "img" / "ok.png", 0)
    data = cm.write_jsonl(tmp_path / "d.jsonl", [{"image": "img/ok.png", "label": 0},
                                                 {"image": "img/gone.png", "label": 1}])
    out = tmp_path / "s.zarr"
    res = cli(["stats", "compute", "--model", vit_dir, "--data", data, "--kind", "all", "-o", str(out)])
    assert_clean_error(res, f"{data}:2", "field 'image'", "gone.png", out_dir=out)
    assert not (tmp_path / "s.zarr.partial").exists()


def test_cli_zero_shot_classes_from_flag(images, tmp_path):
    """Integer labels index --classes; the vision tower alone by default."""
    from tests.stats_compute.test_collect_cli import cli

    root, data, items = images
    path = im.save(im.clip(), tmp_path / "clip", tok=True)
    out = tmp_path / "s.zarr"
    res = cli(["stats", "compute", "--model", path, "--data", data, "--kind", "fisher", "-o", str(out),
               "--classes", ",".join(im.CLASSES), "--prompt", "a photo of a {}", "-q"])
    assert res.returncode == 0, res
    got = cm.read_store(str(out))
    assert got["fisher"] and all(k.startswith(("vision_model.", "visual_projection.")) for k in got["fisher"])
    ref = im.brute_force(im.clip(), items, path, zero_shot="vision",
                         prompts=[f"a photo of a {c}" for c in im.CLASSES])
    _assert_matches(got, ref, kinds=("fisher",))


def test_resume_after_interruption_gives_the_same_store(images, tmp_path, monkeypatch):
    """Interrupted after a checkpoint, `--resume` continues from the saved image index and gives
    the same arrays as an uninterrupted run; changing an image's bytes refuses the checkpoint."""
    import shutil

    from tensormerge.errors import TensorMergeError
    from tensormerge.stats_compute import collect

    root, data, items = images
    mine = tmp_path / "d"
    shutil.copytree(root, mine)
    data = str(mine / "data.jsonl")
    path = im.save(im.vit(), tmp_path / "vit")
    want = _compute(path, data, tmp_path / "a.zarr", batch_size=1)
    out = tmp_path / "b.zarr"
    real_step, calls = collect.Collector.step, []

    def failing(self, batch):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(self, batch)

    monkeypatch.setattr(collect.Collector, "step", failing)
    with pytest.raises(KeyboardInterrupt):
        _compute(path, data, out, batch_size=1, checkpoint_every=2, overwrite=False)
    monkeypatch.setattr(collect.Collector, "step", real_step)
    assert not out.exists() and (tmp_path / "b.zarr.partial").exists()
    im.write_image(mine / "img" / "0.png", 99)  # other bytes, same name: a different run
    with pytest.raises(TensorMergeError, match="checkpoint of a different run"):
        _compute(path, data, out, batch_size=1, resume=True, overwrite=False)
    shutil.copy(root / "img" / "0.png", mine / "img" / "0.png")
    got = _compute(path, data, out, batch_size=1, resume=True, overwrite=False)
    for kind in KINDS:
        for k, w in want[kind].items():
            torch.testing.assert_close(got[kind][k], w, rtol=0, atol=0)


def test_decompression_bomb_is_refused(tmp_path, vit_dir, monkeypatch):
    """A small file that decodes to more pixels than Pillow's limit: refused, named, no store."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)  # 6x6 and up count as bombs (2x the limit)
    msg, data = _bad(tmp_path, vit_dir, [json.dumps({"image": "img/big.png", "label": 0})],
                     lambda d: im.write_image(d / "img" / "big.png", 1, size=(40, 40)))
    assert f"{data}:1" in msg and "field 'image'" in msg and "big.png" in msg and "pixels" in msg


def test_flat_image_far_larger_than_its_file_is_refused(tmp_path, vit_dir, monkeypatch):
    """Under Pillow's pixel limit, a 291 KB PNG of 10000x10000 flat pixels cost 2.2 GB and 30 s;
    an image decoding to more than BOMB_BYTES and BOMB_RATIO times its file is refused (the
    limit lowered here to keep the test small: a 400x400 flat PNG is ~1 KB for 480 KB of pixels),
    while a noisy image of the same size (a photograph's ratio) passes."""
    from PIL import Image

    from tensormerge.stats_compute import images

    monkeypatch.setattr(images, "BOMB_BYTES", 100_000)

    def setup(d):
        Image.new("RGB", (400, 400)).save(d / "img" / "flat.png")

    msg, data = _bad(tmp_path, vit_dir, [OK, json.dumps({"image": "img/flat.png", "label": 0})], setup)
    assert f"{data}:2" in msg and "field 'image'" in msg and "flat.png" in msg and "400x400" in msg
    im.write_image(tmp_path / "img" / "noisy.png", 5, size=(400, 400))
    assert images._check_image("x", str(tmp_path / "img" / "noisy.png")) == (400, 400)


def test_classes_file_not_utf8_is_one_line(tmp_path):
    from tensormerge.stats_compute.images import _parse_classes

    path = tmp_path / "classes.txt"
    path.write_bytes(b"cat\n\xff\xfedog\n")
    with pytest.raises(InputError, match=r"--classes .*classes\.txt.*not UTF-8"):
        _parse_classes(str(path))


def test_zero_shot_prompt_longer_than_the_text_tower_is_one_line(images, tmp_path):
    """A prompt whose tokens exceed CLIP's text positions (77 in released models, 16 here) was
    an internal ValueError at the first batch; refused naming --prompt and the longest class."""
    root, data, _ = images
    path = im.save(im.clip(), tmp_path / "clip", tok=True)
    out = tmp_path / "s.zarr"
    with pytest.raises(InputError) as e:
        compute_stats(ComputeOptions(model=path, data=data, kind="fisher", output=str(out), quiet=True,
                                     classes=",".join(im.CLASSES), prompt="a photo of " * 4 + "{}"))
    msg = str(e.value)
    assert msg.startswith("--prompt ") and "'red small bird'" in msg and "16 positions" in msg and "\n" not in msg
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("classes", "cat,dog"), ("prompt", "a {}"), ("clip_towers", "both")])
def test_zero_shot_flags_for_another_model_are_refused(images, vit_dir, tmp_path, flag, value):
    """--classes on a text model, --prompt or --clip-towers on either, were ignored without a word
    (the store written as if they were not given); refused naming the flag, no store."""
    from tests.stats_compute.test_collect_text import chat_tokenizer

    root, data, _ = images
    llama = cm.save(cm.llama(seed=1), tmp_path / "llama")
    chat_tokenizer(tmp_path / "llama")
    text = cm.write_jsonl(tmp_path / "t.jsonl", [{"text": "w3 w4 w5"}])
    for model, d, what in ((llama, text, "not an image model"), (vit_dir, data, "classifier")):
        out = tmp_path / "s.zarr"
        with pytest.raises(InputError) as e:
            compute_stats(ComputeOptions(model=model, data=d, kind="fisher", output=str(out), quiet=True,
                                         **{flag: value}))
        msg = str(e.value)
        assert msg.startswith(f"--{flag.replace('_', '-')}: ") and what in msg and "\n" not in msg, msg
        assert not out.exists()


def test_image_folder_reads_sub_folders_of_a_class(tmp_path):
    """A class folder holding sub-folders (`cat/indoor/*.png`) gave only its top-level images,
    the rest dropped without a word; every image below the class folder is the class's, in
    sorted order, as torchvision's ImageFolder reads it (hidden folders and other files skipped)."""
    from tensormerge.stats_compute.images import read_images

    for rel in ("cat/b.png", "cat/indoor/a.png", "cat/indoor/deeper/c.png", "dog/x.png", "cat/.cache/h.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        im.write_image(tmp_path / rel, 0)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    records, classes = read_images(str(tmp_path), "image", "label", None, None)
    assert classes == ["cat", "dog"]
    got = [(r[1][len(str(tmp_path)) + 1:], r[2]) for r in records]
    assert got == [("cat/b.png", "cat"), ("cat/indoor/a.png", "cat"), ("cat/indoor/deeper/c.png", "cat"),
                   ("dog/x.png", "dog")]
