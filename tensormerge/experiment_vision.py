"""The digits experiment on images: a tiny ViT instead of the tiny Llama, the same four tasks,
statistics through `tensormerge stats compute` on image files, every method, accuracy table.

`python -m tensormerge.experiment_vision [--workdir DIR] [--json FILE] [--quick]` (what
`./scripts/example --vision` runs) needs no download: scikit-learn's `load_digits`, split as in
`tensormerge/experiment.py`, written as 8x8 greyscale PNGs.

1. **Base.** A `transformers` `ViTForImageClassification` built from a config (8x8 images of
   one channel, 2x2 patches: 16 patch tokens and a class token; hidden 64, MLP 128, 2 layers,
   4 heads) with one head over every label the tasks use (digits 0-9, even, odd, low, high)
   and four rotation labels, pretrained from scratch by rotation prediction (is the image turned
   by 0, 90, 180 or 270 degrees: a self-supervised pretext task that needs the digits' shapes but
   never names a digit; 5 epochs of AdamW 1e-3, batch 64). The task labels' head rows stay at
   their initialisation, as the text experiment's label tokens do.
2. **Fine-tunes.** One full fine-tune per task (256 AdamW steps of 16 images, lr 1e-3 decaying
   linearly to 0, cross-entropy over the whole head): `lo`, `hi`, `parity`, `ge5` as in the text
   experiment. Accuracy is the argmax over the task's candidate labels, on the task's test images.
3. **Statistics.** `tensormerge stats compute --kind all` on each fine-tune with its task's
   training images (a JSONL of `{"image": "img/N.png", "label": "odd"}`; 256 images, empirical
   Fisher), preprocessed by the model's own `ViTImageProcessor`; the base's Fisher on 256 rotated
   training images for UBGM.
4. **Merges.** As the text experiment: every method through `tensormerge run`, task arithmetic's
   and DARE's λ and MaTS' CG iterations chosen on the validation images.

Training runs on one thread with fixed seeds, so a rerun on the same machine prints the same table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

# format_table and load_splits are this module's too (the tests use them from here)
from tensormerge.experiment import (METHOD_PARAMS, METHODS, STATS_METHODS, TASKS, Task, begin,  # noqa: F401
                                    command_line, fit, format_table, load_splits, merge, merge_notes, normalised,
                                    reference_rows, result, run_quietly, task_statistics)

ROTATIONS = ("rot0", "rot90", "rot180", "rot270")
LABELS = [str(d) for d in range(10)] + ["even", "odd", "low", "high"] + list(ROTATIONS)
LABEL_ID = {name: i for i, name in enumerate(LABELS)}
LAMBDAS = (0.3, 0.5, 0.7, 1.0)
CG_ITERATIONS = (3, 10, 30, 100)
VALIDATED = {"task_arithmetic": "lambda", "dare": "lambda", "mats": "iterations"}
MEAN, STD = 0.5, 0.5  # the processor's normalisation of the [0, 1] pixels


@dataclass
class Config:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    patch: int = 2
    tasks: tuple[str, ...] = tuple(TASKS)
    methods: tuple[str, ...] = METHODS
    pretrain_epochs: int = 5
    pretrain_lr: float = 1e-3          # 3e-3 collapses this ViT's features (fine-tunes stay at chance)
    pretrain_batch: int = 64
    finetune_steps: int = 256
    finetune_lr: float = 1e-3
    finetune_batch: int = 16
    stats_examples: int = 256
    lambdas: tuple[float, ...] = LAMBDAS
    cg_iterations: tuple[int, ...] = CG_ITERATIONS
    seed: int = 0
    threads: int = 1
    merge_args: tuple[str, ...] = field(default_factory=tuple)


QUICK = {"tasks": ("lo", "hi"), "methods": ("average", "task_arithmetic", "fisher"), "pretrain_epochs": 1,
         "finetune_steps": 120, "stats_examples": 32, "lambdas": (0.5, 1.0)}


# ----------------------------------------------------------------------------- data
def write_images(root: str, pixels: torch.Tensor, prefix: str) -> list[str]:
    """8x8 greyscale PNGs (intensity v of 0..16 as 15 v), paths relative to `root`."""
    from PIL import Image

    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    out = []
    for i, row in enumerate(pixels):
        rel = f"img/{prefix}-{i}.png"
        Image.fromarray((row.reshape(8, 8) * 15).to(torch.uint8).numpy(), "L").save(os.path.join(root, rel))
        out.append(rel)
    return out


def to_pixels(digit_pixels: torch.Tensor) -> torch.Tensor:
    """[n, 1, 8, 8] model inputs, exactly as the saved processor makes them from the PNGs:
    15 v / 255 rescaled, then (x - 0.5) / 0.5."""
    x = (digit_pixels.reshape(-1, 1, 8, 8) * 15).float() * (1 / 255)
    return (x - MEAN) / STD


def rotate(px: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.rot90(p, int(r), dims=(1, 2)) for p, r in zip(px, k)])


def task_labels(task: Task, digits: torch.Tensor) -> torch.Tensor:
    return torch.tensor([LABEL_ID[task.label(int(d))] for d in digits], dtype=torch.long)


def write_jsonl(path: str, images: list[str], labels: list[str]) -> str:
    with open(path, "w") as f:
        for im, lab in zip(images, labels):
            f.write(json.dumps({"image": im, "label": lab}) + "\n")
    return path


# ----------------------------------------------------------------------------- model
def make_model(cfg: Config):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(cfg.seed)
    conf = ViTConfig(image_size=8, patch_size=cfg.patch, num_channels=1, hidden_size=cfg.hidden,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=len(LABELS),
                     id2label=dict(enumerate(LABELS)), label2id=LABEL_ID,
                     architectures=["ViTForImageClassification"])
    return ViTForImageClassification(conf)


def save_model(model, path: str) -> None:
    from transformers import ViTImageProcessor

    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[MEAN], image_std=[STD]).save_pretrained(path)


def load_model(path: str):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(path, dtype=torch.float32).eval()


def train(model, px: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """Cross-entropy of the classifier's logits; experiment.fit's steps and schedule."""
    return fit(model, len(px), lambda idx: torch.nn.functional.cross_entropy(model(pixel_values=px[idx]).logits,
                                                                             labels[idx]),
               steps, lr, batch_size, seed)


@torch.no_grad()
def accuracy(model, task: Task, pixels: torch.Tensor, digits: torch.Tensor) -> float:
    keep = torch.isin(digits, torch.tensor(task.digits))
    cand = torch.tensor([LABEL_ID[lab] for lab in task.labels])
    logits = model(pixel_values=to_pixels(pixels[keep])).logits
    pred = cand[logits[:, cand].argmax(dim=1)]
    return float((pred == task_labels(task, digits[keep])).float().mean())


def evaluate(model, tasks: list[Task], split) -> dict[str, float]:
    return {t.name: accuracy(model, t, *split) for t in tasks}


# ----------------------------------------------------------------------------- the experiment
def run_experiment(cfg: Config, root: str, log=print) -> dict:
    return run_quietly(cfg.threads, lambda t_start: _run(cfg, root, log, t_start))


def _run(cfg: Config, root: str, log, t_start: float) -> dict:
    tasks, splits = begin(cfg, root, log)
    train_px, train_y = splits["train"]
    images = write_images(root, train_px, "train")

    # 1. the base: rotation prediction on every training image, four turns each
    t0 = time.perf_counter()
    model = make_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    x = to_pixels(train_px)
    turns = torch.arange(4).repeat_interleave(len(x))
    rot_px = rotate(x.repeat(4, 1, 1, 1), turns)
    rot_labels = torch.tensor([LABEL_ID[ROTATIONS[int(k)]] for k in turns])
    steps = cfg.pretrain_epochs * ((len(rot_px) + cfg.pretrain_batch - 1) // cfg.pretrain_batch)
    loss = train(model, rot_px, rot_labels, steps, cfg.pretrain_lr, cfg.pretrain_batch, cfg.seed)
    base = os.path.join(root, "base")
    save_model(model, base)
    log(f"base: ViTForImageClassification, {n_params:,} parameters (hidden {cfg.hidden}, {cfg.layers} layers, "
        f"{cfg.heads} heads, {(8 // cfg.patch) ** 2} patches of {cfg.patch}x{cfg.patch}, {len(LABELS)} labels); "
        f"pretrained {cfg.pretrain_epochs} epochs on rotation prediction, loss {loss:.3f}, "
        f"{time.perf_counter() - t0:.1f} s")

    # 2. the fine-tunes, and each task's training images as stats compute data
    fts, data = [], {}
    for i, task in enumerate(tasks):
        t0 = time.perf_counter()
        keep = torch.isin(train_y, torch.tensor(task.digits))
        labels = task_labels(task, train_y[keep])
        model = load_model(base)
        loss = train(model, x[keep], labels, cfg.finetune_steps, cfg.finetune_lr, cfg.finetune_batch,
                     cfg.seed + 1 + i)
        path = os.path.join(root, f"ft-{task.name}")
        save_model(model, path)
        fts.append(path)
        idx = keep.nonzero().squeeze(1).tolist()
        data[task.name] = write_jsonl(os.path.join(root, f"data-{task.name}.jsonl"), [images[j] for j in idx],
                                      [LABELS[int(v)] for v in labels])
        log(f"fine-tune {task.name}: {len(labels)} images, {cfg.finetune_steps} steps of {cfg.finetune_batch} "
            f"({cfg.finetune_steps * cfg.finetune_batch / len(labels):.1f} epochs), loss {loss:.3f}, "
            f"{time.perf_counter() - t0:.1f} s")
    # the base's data: rotated training images (one turn each, seeded), for UBGM's base Fisher
    g = torch.Generator().manual_seed(cfg.seed)
    k = torch.randint(0, 4, (len(train_px),), generator=g)
    rotated = torch.stack([torch.rot90(p.reshape(8, 8), int(r)) for p, r in zip(train_px, k)]).reshape(-1, 64)
    data["base"] = write_jsonl(os.path.join(root, "data-pretrain.jsonl"), write_images(root, rotated, "rot"),
                               [ROTATIONS[int(r)] for r in k])

    test, val = splits["test"], splits["val"]
    notes: list[str] = []
    rows, ft_own, ft_own_val = reference_rows(tasks, base, fts, splits, load_model, evaluate, accuracy)

    # 3. statistics
    methods = list(cfg.methods)
    kinds = {STATS_METHODS[m] for m in methods if m in STATS_METHODS}
    stores: list[str] = []
    base_store = None
    if kinds:
        t0 = time.perf_counter()
        kind = "all" if len(kinds) > 1 else kinds.pop()
        stores, base_store = task_statistics(root, tasks, fts, data, kind, cfg.stats_examples,
                                             base if "ubgm" in methods else None)
        log(f"statistics (`stats compute --kind {kind}` on image files, {cfg.stats_examples} images each"
            f"{', and the base Fisher on rotated images' if base_store else ''}): {time.perf_counter() - t0:.1f} s")

    # 4. merges
    chosen: dict[str, float] = {}

    def do_merge(method: str, params: dict[str, str], out: str) -> float:
        return merge(method, fts, base, out, params, stats=stores if method in STATS_METHODS else None,
                     base_stats=base_store if method == "ubgm" else None, extra=cfg.merge_args)

    for method in methods:
        params = dict(METHOD_PARAMS[method])
        out = os.path.join(root, f"merged-{method}")
        if method == "mats":
            params["init_lambda"] = str(chosen.get("task_arithmetic", 0.3))
        if method in VALIDATED:
            key = VALIDATED[method]
            scores = {}
            for value in (cfg.lambdas if key == "lambda" else cfg.cg_iterations):
                do_merge(method, {**params, key: str(value)}, out)
                acc = {t.name: accuracy(load_model(out), t, *val) for t in tasks}
                scores[value] = normalised(acc, ft_own_val)
            best = max(scores, key=lambda v: (scores[v], -v))
            chosen[method] = best
            params[key] = str(best)
            notes.append(f"{method}: {key} {best} chosen on the validation images from "
                         + ", ".join(f"{v} ({s:.3f})" for v, s in scores.items()))
        seconds = do_merge(method, params, out)
        rows.append({"model": method, "acc": evaluate(load_model(out), tasks, test), "seconds": seconds,
                     "params": params})
        notes += merge_notes(method, out)
        log(f"merged {method} ({', '.join(f'{k}={v}' for k, v in params.items()) or 'defaults'}): {seconds:.2f} s")
    return result(cfg, tasks, rows, ft_own, notes, root, t_start)


def main(argv: list[str] | None = None) -> None:
    command_line(argv, __doc__.splitlines()[0], lambda quick: Config(**QUICK) if quick else Config(), run_experiment,
                 "tensormerge-experiment-vision-", "`tensormerge run` (in process)",
                 "models, images, data and statistics", "")


if __name__ == "__main__":
    sys.exit(main())
