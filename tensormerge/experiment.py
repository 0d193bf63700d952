"""A real merging experiment: a tiny Llama pretrained on handwritten digits, four task fine-tunes,
merged with every method through the CLI, scored on held-out images.

`python -m tensormerge.experiment [--workdir DIR] [--json FILE] [--quick]` (what `./scripts/example`
runs) needs no download: scikit-learn's `load_digits` (1797 8x8 images, 17 intensity levels) is
split deterministically into train / validation / test images, and every image becomes a
sequence of 64 pixel tokens.

1. **Base.** A `transformers` `LlamaForCausalLM` built from a config (hidden 64, MLP 192,
   2 layers, 4 heads, untied lm_head, RoPE θ = 100 so that every rotary frequency turns within
   the 68 positions, eager attention; 112k parameters) is pretrained from scratch by next-token
   prediction on the pixel sequences of the training images (`[bos] p1 .. p64`; 10 epochs, AdamW
   3e-3, batch 32) and saved with `save_pretrained` (float32 safetensors).
2. **Fine-tunes.** One full fine-tune of the base per task (256 AdamW steps of 16 sequences,
   lr 1e-3 decaying linearly to 0), on `[bos] [task] p1 .. p64 [sep] label` with the loss on the
   label token only: `lo` (classify 0-4, images of 0-4 only), `hi`
   (classify 5-9, images of 5-9 only), `parity` (even / odd, any digit) and `ge5` (is the digit
   at least 5, any digit). Accuracy is the argmax over the task's candidate label tokens at the
   `[sep]` position, on test images of the task's digits.
3. **Statistics.** `tensormerge stats compute` on each fine-tune with its task's training
   sequences (pre-tokenized JSONL, labels -100 except the label token; `--kind all`, 256
   examples, empirical Fisher): a diagonal Fisher and K-FAC factors (input and output-gradient
   Grams), and the base's Fisher on 256 pretraining sequences for UBGM's `--base-stats`.
4. **Merges.** `tensormerge run` for every method, with the parameters in `METHOD_PARAMS`,
   except the one knob of task arithmetic, DARE (λ from `LAMBDAS`) and MaTS (CG iterations
   from `CG_ITERATIONS`; it starts from task arithmetic with the chosen λ), which is chosen on
   the validation images (never the test images) by a `tensormerge sweep`: every candidate
   merged from one read of the inputs into `WORKDIR/sweep-<method>/<candidate>`, each scored by
   `validation_score` below (`--eval-python tensormerge.experiment:validation_score`), the best
   mean accuracy normalised to the fine-tunes chosen (`--select val:max`) and the others removed
   (`--keep best`); `WORKDIR/sweep-<method>/sweep.json` keeps every candidate's scores. The
   candidates are given in increasing order and the sweep's ties go to the first, so a tie goes
   to the smaller value. The test-set table scores the chosen output only.

It prints accuracy per task, their mean, the mean normalised to each task's fine-tune and the
merge's wall seconds (a swept method: of its sweep's one read that merged every candidate), for
the base, each fine-tune and each method. Training runs on one thread
with fixed seeds, so a rerun on the same machine prints the same accuracies.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

# Vocabulary: 17 pixel intensities, 3 specials, one token per task, the label tokens.
N_PIXEL = 17
PAD, BOS, SEP = N_PIXEL, N_PIXEL + 1, N_PIXEL + 2


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    digits: tuple[int, ...]      # which images the task sees
    labels: tuple[str, ...]      # candidate label tokens
    target: str                  # how a digit maps to its label: "digit" | "parity" | "ge5"

    def label(self, digit: int) -> str:
        if self.target == "digit":
            return str(digit)
        if self.target == "parity":
            return "odd" if digit % 2 else "even"
        return "high" if digit >= 5 else "low"


TASKS = {t.name: t for t in (
    Task("lo", "classify digits 0-4 (images of 0-4)", (0, 1, 2, 3, 4), tuple("01234"), "digit"),
    Task("hi", "classify digits 5-9 (images of 5-9)", (5, 6, 7, 8, 9), tuple("56789"), "digit"),
    Task("parity", "even or odd (any digit)", tuple(range(10)), ("even", "odd"), "parity"),
    Task("ge5", "is the digit >= 5 (any digit)", tuple(range(10)), ("low", "high"), "ge5"),
)}
TASK_TOKEN = {name: SEP + 1 + i for i, name in enumerate(TASKS)}
LABEL_NAMES = [str(d) for d in range(10)] + ["even", "odd", "low", "high"]
LABEL_TOKEN = {name: SEP + 1 + len(TASKS) + i for i, name in enumerate(LABEL_NAMES)}
VOCAB = SEP + 1 + len(TASKS) + len(LABEL_NAMES)

METHODS = ("average", "task_arithmetic", "ties", "dare", "fisher", "regmean", "mats", "ubgm")
STATS_METHODS = {"fisher": "fisher", "regmean": "kfac", "mats": "kfac", "ubgm": "fisher"}
# Fixed parameters (the methods' defaults unless noted); λ of task arithmetic and DARE is chosen
# on the validation split from LAMBDAS by a `tensormerge sweep`.
METHOD_PARAMS = {
    "average": {},
    "task_arithmetic": {},                                 # lambda: validation
    "ties": {"k": "0.2", "lambda": "1.0"},                 # the TIES paper's recommended values
    "dare": {"p": "0.5", "seed": "0"},                     # lambda: validation
    "fisher": {},                                          # empirical diagonal Fisher, floor 1e-8
    "regmean": {"alpha": "0.9"},                           # off-diagonals x 0.9: mild shrinkage (1 = exact LS)
    "mats": {"objective": "kfac", "init": "task_arithmetic"},  # init_lambda: task arithmetic's
    "ubgm": {},                                            # alpha 1, base Fisher from pretraining data
}
LAMBDAS = (0.3, 0.5, 0.7, 1.0)
# MaTS' CG iterations, chosen on the validation split too: on ill-conditioned K-FAC factors (one
# label token per sequence gives output Grams of low rank) CG run long wanders along the
# poorly determined directions, and the MaTS paper treats the iteration count as a knob.
CG_ITERATIONS = (3, 10, 30, 100)
VALIDATED = {"task_arithmetic": "lambda", "dare": "lambda", "mats": "iterations"}  # the one knob per method
# What `validation_score` needs (tasks, split seed, threads, the fine-tunes' validation accuracies):
# the experiment writes it to WORKDIR/validation.json and names WORKDIR in this variable.
WORKDIR_ENV = "TENSORMERGE_EXPERIMENT"
VALIDATION_JSON = "validation.json"
SELECT = "val:max"


@dataclass
class Config:
    hidden: int = 64
    intermediate: int = 192
    layers: int = 2
    heads: int = 4
    rope_theta: float = 100.0        # every rotary frequency turns over 64 positions (10000: half barely move)
    tasks: tuple[str, ...] = tuple(TASKS)
    methods: tuple[str, ...] = METHODS
    pretrain_epochs: int = 10
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    finetune_steps: int = 256       # per task: ~7.5 epochs of lo / hi, ~3.8 of parity / ge5
    finetune_lr: float = 1e-3
    finetune_batch: int = 16
    stats_examples: int = 256       # per model, for `stats compute --max-examples`
    lambdas: tuple[float, ...] = LAMBDAS
    cg_iterations: tuple[int, ...] = CG_ITERATIONS
    seed: int = 0
    threads: int = 1                # training and evaluation threads (1: reproducible)
    merge_args: tuple[str, ...] = field(default_factory=tuple)   # extra `tensormerge run` arguments


# `--quick` (the test's mode): the same model, 2 tasks, 3 methods (one with statistics), short training.
QUICK = {"tasks": ("lo", "hi"), "methods": ("average", "task_arithmetic", "fisher"), "pretrain_epochs": 1,
         "finetune_steps": 200, "stats_examples": 64, "lambdas": (0.5, 1.0)}


# ----------------------------------------------------------------------------- data


def load_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """load_digits as (pixel tokens [n, 64], digits [n]) for train (60%), validation (10%) and
    test (30%), split by a seeded permutation stratified by digit."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.long)        # intensities 0..16 are the pixel tokens
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for digit in range(10):
        idx = (y == digit).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test, n_val = round(0.3 * len(idx)), round(0.1 * len(idx))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    out = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks).sort().values
        out[name] = (x[idx], y[idx])
    return out


def task_sequences(task: Task, pixels: torch.Tensor, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[bos] [task] p1..p64 [sep] label` for the task's images, and the label tokens."""
    keep = torch.isin(digits, torch.tensor(task.digits))
    px, ds = pixels[keep], digits[keep]
    labels = torch.tensor([LABEL_TOKEN[task.label(int(d))] for d in ds], dtype=torch.long)
    n = len(ds)
    ids = torch.cat([torch.full((n, 1), BOS), torch.full((n, 1), TASK_TOKEN[task.name]), px,
                     torch.full((n, 1), SEP), labels[:, None]], dim=1)
    return ids, labels


def pretrain_sequences(pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((len(pixels), 1), BOS), pixels], dim=1)


def write_jsonl(path: str, ids: torch.Tensor, label_only: bool) -> str:
    """Pre-tokenized examples for `stats compute`: labels are the input ids (HF shifts them), or
    -100 everywhere but the final label token."""
    with open(path, "w") as f:
        for row in ids.tolist():
            labels = [-100] * (len(row) - 1) + row[-1:] if label_only else row
            f.write(json.dumps({"input_ids": row, "labels": labels}) + "\n")
    return path


# ----------------------------------------------------------------------------- model


def make_model(cfg: Config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.heads, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=SEP,
                       attn_implementation="eager")   # faster than sdpa at this size on a CPU
    return LlamaForCausalLM(conf)


def load_model(path: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def train(model, ids: torch.Tensor, label_only: bool, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """Next-token loss on the sequences (with label_only, on the last token alone); see fit."""
    def loss(idx: torch.Tensor) -> torch.Tensor:
        batch = ids[idx]
        labels = batch.clone()
        if label_only:
            labels[:, :-1] = -100
        return model(input_ids=batch, labels=labels).loss

    return fit(model, len(ids), loss, steps, lr, batch_size, seed)


def fit(model, n: int, loss, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """`steps` AdamW steps with a linear decay to 0, over epochs of the n examples shuffled by a
    seeded generator (the last batch of an epoch may be short), loss(indices) the batch's loss;
    returns the mean loss of the last 32 steps. (Here and experiment_vision.)"""
    model.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    losses: list[float] = []
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=g), 0
        value = loss(perm[pos:pos + batch_size])
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        losses.append(float(value.detach()))
    model.eval()
    return sum(losses[-32:]) / len(losses[-32:])


def epochs_to_steps(epochs: int, n: int, batch_size: int) -> int:
    return epochs * ((n + batch_size - 1) // batch_size)


@torch.no_grad()
def accuracy(model, task: Task, pixels: torch.Tensor, digits: torch.Tensor) -> float:
    """Argmax over the task's label tokens of the logits at `[sep]`."""
    ids, labels = task_sequences(task, pixels, digits)
    cand = torch.tensor([LABEL_TOKEN[lab] for lab in task.labels])
    logits = model(input_ids=ids[:, :-1], logits_to_keep=1).logits[:, -1, :]
    pred = cand[logits[:, cand].argmax(dim=1)]
    return float((pred == labels).float().mean())


def evaluate(model, tasks: list[Task], split: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    return {t.name: accuracy(model, t, *split) for t in tasks}


def normalised(acc: dict[str, float], ft_acc: dict[str, float]) -> float:
    return sum(acc[t] / ft_acc[t] for t in acc) / len(acc)


# ----------------------------------------------------------------------------- the sweeps' evaluation


@functools.lru_cache(maxsize=2)
def _validation_split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return load_splits(seed)["val"]


def write_validation_context(root: str, tasks: list[Task], cfg: Config, ft_val: dict[str, float]) -> str:
    """WORKDIR/validation.json: what `validation_score` needs and cannot know from an output
    path (the tasks, the split's seed, the evaluation threads, each fine-tune's accuracy on its
    own task's validation images, the normaliser)."""
    path = os.path.join(root, VALIDATION_JSON)
    with open(path, "w") as f:
        json.dump({"tasks": [t.name for t in tasks], "seed": cfg.seed, "threads": cfg.threads,
                   "fine_tuned": ft_val}, f, indent=2)
    return path


def validation_score(output: str) -> dict[str, float]:
    """`tensormerge sweep --eval-python tensormerge.experiment:validation_score`: the merged
    model at `output` scored on the VALIDATION images of every task of the experiment whose
    workdir $TENSORMERGE_EXPERIMENT names (its validation.json). Returns {"val": mean accuracy
    normalised to the fine-tunes (what `--select val:max` chooses by), <task>: accuracy, ...}.
    Evaluates on the experiment's thread count, as the experiment itself does, so the scores are
    the same in its process and in a shell."""
    root = os.environ.get(WORKDIR_ENV)
    if not root:
        raise RuntimeError(f"set {WORKDIR_ENV} to the experiment's workdir (it holds {VALIDATION_JSON})")
    with open(os.path.join(root, VALIDATION_JSON)) as f:
        ctx = json.load(f)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tasks = [TASKS[t] for t in ctx["tasks"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(int(ctx["threads"]))
    try:
        model = load_model(output)
        acc = {t.name: accuracy(model, t, *_validation_split(int(ctx["seed"]))) for t in tasks}
    finally:
        torch.set_num_threads(threads)
    return {"val": normalised(acc, ctx["fine_tuned"]), **acc}


# ----------------------------------------------------------------------------- the CLI


def tensormerge_cli(args: list[str]) -> float:
    """`tensormerge ARGS` in this process (no interpreter start-up per call); returns its wall
    seconds and raises with the command line when it fails (an error, or a non-zero exit: a
    sweep with a failed candidate or nothing chosen)."""
    from tensormerge.cli import cli

    t0 = time.perf_counter()
    try:
        cli.main(args=args, prog_name="tensormerge", standalone_mode=False)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"`tensormerge {' '.join(args)}` failed (exit status {e.code})") from e
    except Exception as e:
        raise RuntimeError(f"`tensormerge {' '.join(args)}` failed: {e}") from e
    return time.perf_counter() - t0


def stats_compute_available() -> bool:
    from tensormerge.stats.cli import stats

    return "compute" in stats.commands


def compute_statistics(model: str, data: str, kind: str, output: str, max_examples: int) -> float:
    """The statistics step: `tensormerge stats compute` for one model on its JSONL data."""
    return tensormerge_cli(["stats", "compute", "--model", model, "--data", data, "--kind", kind,
                            "--output", output, "--max-examples", str(max_examples), "--batch-size", "32", "--overwrite", "--quiet",
                            "--fisher-type", "empirical"])


def merge_args(command: str, method: str, inputs: list[str], base: str, output: str, params: dict[str, str],
               stats: list[str] | None = None, base_stats: str | None = None,
               extra: tuple[str, ...] = ()) -> list[str]:
    args = [command, "--method", method, "--inputs", ",".join(inputs), "--base", base, "--output", output,
            "--overwrite", "--quiet", *extra]
    for k, v in params.items():
        args += ["-p", f"{k}={v}"]
    if stats:
        args += ["--stats", ",".join(stats)]
    if base_stats:
        args += ["--base-stats", base_stats]
    return args


def merge(method: str, inputs: list[str], base: str, output: str, params: dict[str, str],
          stats: list[str] | None = None, base_stats: str | None = None, extra: tuple[str, ...] = ()) -> float:
    return tensormerge_cli(merge_args("run", method, inputs, base, output, params, stats, base_stats, extra))


def sweep_values(values) -> str:
    """A knob's candidates as `-p` alternatives, in increasing order: the sweep's ties go to the
    first candidate, so a tie goes to the smaller value (fewer CG iterations, a smaller λ)."""
    return ",".join(str(v) for v in sorted(set(values)))


@contextlib.contextmanager
def _environ(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def choose(root: str, method: str, key: str, values, params: dict[str, str], merge_kw: dict) -> dict:
    """`tensormerge sweep` of one knob over `values`, scored on the validation images by
    `validation_score` and chosen by `--select val:max --keep best`, into WORKDIR/sweep-<method>.
    Returns the chosen value (as given), its output, the candidates' (value, val) in sweep order,
    the command line, and seconds: the command's (scoring and plot included), the evaluations',
    and the merge's (every candidate from one read, as sweep.json records it)."""
    from tensormerge import evaluate as ev

    sweep_dir = os.path.join(root, f"sweep-{method}")
    if os.path.lexists(sweep_dir):   # an earlier run's sweep: the inputs are retrained, start afresh
        if not os.path.isfile(os.path.join(sweep_dir, ev.SWEEP_JSON)):
            raise RuntimeError(f"{sweep_dir}: exists and holds no {ev.SWEEP_JSON}; move it away")
        shutil.rmtree(sweep_dir)
    args = merge_args("sweep", output=sweep_dir, params={**params, key: sweep_values(values)}, **merge_kw)
    args += ["--eval-python", "tensormerge.experiment:validation_score", "--select", SELECT, "--keep", "best"]
    with _environ(WORKDIR_ENV, root):
        seconds = tensormerge_cli(args)
    state = ev.load_state(sweep_dir)
    rows = state["candidates"]
    ordered = sorted(set(values))
    if len(rows) != len(ordered) or any(r["params"].get(key) != v for r, v in zip(rows, ordered)):
        raise RuntimeError(f"{sweep_dir}/{ev.SWEEP_JSON}: its candidates are not {key} = {ordered}")
    best = [i for i, r in enumerate(rows) if r["selected"]]
    if len(best) != 1:
        raise RuntimeError(f"{sweep_dir}/{ev.SWEEP_JSON}: no candidate was chosen")
    eval_s = sum(r["eval_seconds"] or 0.0 for r in rows)
    # a candidate's merge_seconds runs from the start of the read it shares with the others
    merge_s = max(r["merge_seconds"] for r in rows)
    return {"value": ordered[best[0]], "output": rows[best[0]]["output"], "dir": sweep_dir,
            "scores": [(v, r["metrics"]["val"]) for v, r in zip(ordered, rows)],
            "command": "tensormerge " + " ".join(args), "seconds": seconds, "eval_seconds": eval_s,
            "merge_seconds": merge_s}


def merge_notes(method: str, out: str) -> list[str]:
    """From the output's tensormerge.json: tensors averaged for want of statistics, and MaTS's CG."""
    from tensormerge.methods.base import get_method
    from tensormerge.methods.mats import cg_summary

    with open(os.path.join(out, "tensormerge.json")) as f:
        meta = json.load(f)
    notes = []
    if meta.get("fallback_blocks"):
        notes.append(f"{method}: {get_method(method).fallback_label} for want of statistics: "
                     f"{', '.join(sorted(meta['fallback_blocks']))}")
    if meta.get("base_stats_missing"):
        notes.append(f"{method}: base statistics taken as zero: {', '.join(sorted(meta['base_stats_missing']))}")
    blocks = meta.get("blocks", {})
    cg = cg_summary(blocks.values() if isinstance(blocks, dict) else blocks, meta.get("params", {}).get("tol", 1e-5))
    if cg:
        notes.append(cg)
    return notes


# ----------------------------------------------------------------------------- the experiment


def run_experiment(cfg: Config, root: str, log=print) -> dict:
    """Everything above; returns {"rows": [...], "config": ..., "notes": [...], "seconds": ...}."""
    return run_quietly(cfg.threads, lambda t_start: _run(cfg, root, log, t_start))


def run_quietly(threads: int, run):
    """run(t_start) with transformers' bars and warnings off (a bar per save and load otherwise)
    and torch at `threads` intra-op threads, as it was afterwards. (Here and experiment_vision.)"""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    t_start = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run(t_start)
    finally:
        torch.set_num_threads(before)


def reference_rows(tasks: list[Task], base: str, fts: list[str], splits: dict, load, evaluate, accuracy):
    """The table's base and fine-tune rows on the test split; each fine-tune's accuracy on its own
    task on test and on validation (what `normalised` divides by). `load`, `evaluate`, `accuracy`:
    the experiment's own (a language model here, a ViT in experiment_vision)."""
    test, val = splits["test"], splits["val"]
    ft_test = [evaluate(load(p), tasks, test) for p in fts]
    rows = [{"model": "base", "acc": evaluate(load(base), tasks, test), "seconds": None}]
    rows += [{"model": f"ft-{t.name}", "acc": acc, "seconds": None} for t, acc in zip(tasks, ft_test)]
    ft_own = {t.name: ft_test[i][t.name] for i, t in enumerate(tasks)}
    ft_own_val = {t.name: accuracy(load(p), t, *val) for t, p in zip(tasks, fts)}
    return rows, ft_own, ft_own_val


def task_statistics(root: str, tasks: list[Task], fts: list[str], data: dict[str, str], kind: str,
                    examples: int, base: str | None) -> tuple[list[str], str | None]:
    """`stats compute --kind KIND` on each fine-tune with its task's data; with `base` (UBGM's
    --base-stats) the base's Fisher on data["base"] too. The stores, and the base's or None."""
    stores = []
    for t, p in zip(tasks, fts):
        out = os.path.join(root, f"stats-{t.name}.zarr")
        compute_statistics(p, data[t.name], kind, out, examples)
        stores.append(out)
    base_store = None
    if base is not None:
        base_store = os.path.join(root, "stats-base.zarr")
        compute_statistics(base, data["base"], "fisher", base_store, examples)
    return stores, base_store


def begin(cfg, root: str, log) -> tuple[list[Task], dict]:
    """The work directory made, the tasks and the splits (logged)."""
    os.makedirs(root, exist_ok=True)
    tasks = [TASKS[t] for t in cfg.tasks]
    splits = load_splits(cfg.seed)
    log(f"load_digits: {len(splits['train'][1])} train / {len(splits['val'][1])} validation / "
        f"{len(splits['test'][1])} test images; tasks: {', '.join(f'{t.name} = {t.description}' for t in tasks)}")
    return tasks, splits


def result(cfg, tasks: list[Task], rows: list[dict], ft_own: dict[str, float], notes: list[str], root: str,
           t_start: float) -> dict:
    """What run_experiment returns: the rows with their mean and normalised accuracy."""
    for r in rows:
        r["mean"] = sum(r["acc"].values()) / len(tasks)
        r["normalised"] = normalised(r["acc"], ft_own)
    return {"config": dataclasses.asdict(cfg), "tasks": {t.name: t.description for t in tasks}, "rows": rows,
            "notes": notes, "workdir": root, "seconds": time.perf_counter() - t_start}


def _run(cfg: Config, root: str, log, t_start: float) -> dict:
    tasks, splits = begin(cfg, root, log)
    train_px, train_y = splits["train"]

    # 1. the base
    t0 = time.perf_counter()
    model = make_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    pre_ids = pretrain_sequences(train_px)
    loss = train(model, pre_ids, False, epochs_to_steps(cfg.pretrain_epochs, len(pre_ids), cfg.pretrain_batch),
                 cfg.pretrain_lr, cfg.pretrain_batch, cfg.seed)
    base = os.path.join(root, "base")
    model.save_pretrained(base)
    log(f"base: LlamaForCausalLM, {n_params:,} parameters (hidden {cfg.hidden}, {cfg.layers} layers, "
        f"{cfg.heads} heads, vocab {VOCAB}); pretrained {cfg.pretrain_epochs} epochs on pixel sequences, "
        f"loss {loss:.3f}, {time.perf_counter() - t0:.1f} s")

    # 2. the fine-tunes
    fts, data = [], {}
    for i, task in enumerate(tasks):
        t0 = time.perf_counter()
        ids, _ = task_sequences(task, train_px, train_y)
        model = load_model(base)
        loss = train(model, ids, True, cfg.finetune_steps, cfg.finetune_lr, cfg.finetune_batch, cfg.seed + 1 + i)
        path = os.path.join(root, f"ft-{task.name}")
        model.save_pretrained(path)
        fts.append(path)
        data[task.name] = write_jsonl(os.path.join(root, f"data-{task.name}.jsonl"), ids, label_only=True)
        log(f"fine-tune {task.name}: {len(ids)} sequences, {cfg.finetune_steps} steps of {cfg.finetune_batch} "
            f"({cfg.finetune_steps * cfg.finetune_batch / len(ids):.1f} epochs), loss {loss:.3f}, "
            f"{time.perf_counter() - t0:.1f} s")
    data["base"] = write_jsonl(os.path.join(root, "data-pretrain.jsonl"), pre_ids, label_only=False)

    test = splits["test"]
    notes: list[str] = []
    rows, ft_own, ft_own_val = reference_rows(tasks, base, fts, splits, load_model, evaluate, accuracy)
    write_validation_context(root, tasks, cfg, ft_own_val)

    # 3. statistics
    methods = list(cfg.methods)
    kinds = {STATS_METHODS[m] for m in methods if m in STATS_METHODS}
    stores: dict[str, list[str]] = {}
    base_store = None
    if kinds and not stats_compute_available():
        skipped = [m for m in methods if m in STATS_METHODS]
        methods = [m for m in methods if m not in STATS_METHODS]
        notes.append(f"`tensormerge stats compute` is not available in this build: skipped {', '.join(skipped)}")
        log("note: " + notes[-1])
    elif kinds:
        t0 = time.perf_counter()
        kind = "all" if len(kinds) > 1 else kinds.pop()   # kfac brings Grams; all adds the Fisher
        stores["all"], base_store = task_statistics(root, tasks, fts, data, kind, cfg.stats_examples,
                                                    base if "ubgm" in methods else None)
        log(f"statistics (`stats compute --kind {kind}`, {cfg.stats_examples} examples each"
            f"{', and the base Fisher on pretraining sequences' if base_store else ''}): "
            f"{time.perf_counter() - t0:.1f} s")

    # 4. merges: `run`, or for a method with a knob a `sweep` scored on the validation images
    chosen: dict[str, float] = {}
    for method in methods:
        params = dict(METHOD_PARAMS[method])
        st = stores.get("all") if method in STATS_METHODS else None
        merge_kw = {"method": method, "inputs": fts, "base": base, "stats": st,
                    "base_stats": base_store if method == "ubgm" else None, "extra": cfg.merge_args}
        if method == "mats":
            params["init_lambda"] = str(chosen.get("task_arithmetic", 0.3))
        sweep = None
        if method in VALIDATED:
            key = VALIDATED[method]
            sweep = choose(root, method, key, cfg.lambdas if key == "lambda" else cfg.cg_iterations, params, merge_kw)
            chosen[method] = sweep["value"]
            params[key] = str(sweep["value"])
            out, seconds = sweep["output"], sweep["merge_seconds"]
            notes.append(f"{method}: {key} {sweep['value']} chosen on the validation images from "
                         + ", ".join(f"{v} ({s:.3f})" for v, s in sweep["scores"]))
        else:
            out = os.path.join(root, f"merged-{method}")
            seconds = merge(output=out, params=params, **merge_kw)
        row = {"model": method, "acc": evaluate(load_model(out), tasks, test), "seconds": seconds,
               "params": params, "output": out}
        if sweep is not None:
            row["sweep"] = {k: sweep[k] for k in ("dir", "command", "seconds", "eval_seconds", "merge_seconds")}
        rows.append(row)
        notes += merge_notes(method, out)
        log(f"merged {method} ({', '.join(f'{k}={v}' for k, v in params.items()) or 'defaults'}): {seconds:.2f} s"
            + (f" for {len(sweep['scores'])} candidates from one read (`tensormerge sweep`: {sweep['seconds']:.2f} s "
               f"with the validation scoring)" if sweep else ""))
    return result(cfg, tasks, rows, ft_own, notes, root, t_start)


def format_table(result: dict) -> str:
    tasks = list(result["tasks"])
    head = f"{'model':<16}" + "".join(f"{t:>8}" for t in tasks) + f"{'mean':>8}{'norm.':>8}{'merge s':>9}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        sec = f"{r['seconds']:>9.2f}" if r["seconds"] is not None else f"{'':>9}"
        lines.append(f"{r['model']:<16}" + "".join(f"{100 * r['acc'][t]:>8.1f}" for t in tasks)
                     + f"{100 * r['mean']:>8.1f}{100 * r['normalised']:>8.1f}{sec}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    command_line(argv, __doc__.splitlines()[0], lambda quick: Config(**QUICK) if quick else Config(), run_experiment,
                 "tensormerge-experiment-", "`tensormerge run` (in process), or of a sweep's one read merging all "
                 "its candidates", "models, data and statistics", ", ~30 s")


def command_line(argv, description: str, config, run, prefix: str, merge_s: str, workdir: str, quick_s: str) -> None:
    """The command line of this experiment and of experiment_vision: run, print the table, notes
    and where the models are, and write --json."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--workdir", help=f"where to write {workdir} (default: a temporary directory)")
    ap.add_argument("--json", help="also write the results (rows, parameters, notes) to this file")
    ap.add_argument("--quick", action="store_true", help=f"2 tasks, 3 methods, shorter training (the test's mode{quick_s})")
    args = ap.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix=prefix)
    out = run(config(args.quick), root)
    print()
    print("test accuracy (%) per task; mean; norm. = mean of merged / fine-tuned accuracy on each task;")
    print(f"merge s = wall seconds of {merge_s}")
    print(format_table(out))
    for n in out["notes"]:
        print(n)
    print(f"total {out['seconds']:.0f} s; models in {root}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
