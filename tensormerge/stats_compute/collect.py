"""`tensormerge stats compute`: one pass over a data set accumulating a model's merge statistics
(diagonal Fisher, input Grams, K-FAC output-gradient Grams, Fisher blocks of vectors) into a
statistics store (SPEC §3).

Conventions (METHODS.md §4.2, §5, §8.1), the research code's defaults:
- Fisher: mean over examples of the squared per-example gradient of the token-averaged
  log-likelihood (empirical: gold labels; true: labels sampled from the model), count = examples.
  `--fisher-mode squared-batch` squares mini-batch gradients instead (RegMean paper code),
  count = batches.
- Grams: sum over non-pad tokens of the side feeding the layer of x x^T (input) or g g^T
  (gradient of the summed per-example losses at the layer output), divided by that token count
  (`--gram-normalize examples` divides by examples instead, as some ports do).
- Fisher blocks: mean over examples of g g^T for every vector parameter (IA3 vectors, biases,
  norms).
- Layers that read the same input (q/k/v, gate/up, every cross-attention k/v) accumulate one
  input Gram, stored once with an alias per other weight (stats/hooks.py; `--gram-per-weight`
  stores a copy per weight instead).

Memory: K-FAC's backward computes no parameter gradients (the weights are frozen for it; the
first hooked layers' outputs start the graph), Fisher gradients are streamed into their sums one
parameter at a time (stats/grads.py), and the whole run is checked against the memory the
device has before the data pass (`_check_memory`, `stats plan`'s accounting).

Accumulators are float32 by default, as in the research code and the store; float64 is offered
for very long runs (its rounding error stops depending on the number of batches).
The accumulators are checkpointed every --checkpoint-every batches into S.zarr.partial/.resume
with a fingerprint of model, data and options, so `--resume` continues exactly that run.
`--workers N` / `--scheduler ADDR` run fixed shards of the examples on dask (stats/cluster.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from tensormerge import __version__
from tensormerge.constants import PARTIAL_SUFFIX
from tensormerge.engine import outdir
from tensormerge.errors import BudgetError, InputError, OutputError, ParameterError
from tensormerge.stats_compute.data import (MIN_LENGTH, Tokenize, batches, data_fingerprint, load_examples,
                                           read_records)
from tensormerge.stats_compute.grads import PerExampleGrads, batch_grad, frozen
from tensormerge.stats_compute.hooks import GramHooks
from tensormerge.stats_compute.losses import Inputs, scored_tokens, token_nll

KINDS = ("fisher", "gram", "kfac", "blockwise", "all")
STORE_KINDS = {"fisher": ("fisher",), "gram": ("gram_in",), "kfac": ("gram_in", "gram_out"),
               "blockwise": ("fisher_block",), "all": ("fisher", "gram_in", "gram_out", "fisher_block")}
RESUME_DIR = ".resume"
STATE_FILE = "state.pt"
ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_MEMORY = 1 << 20
NO_MEMORY_CHECK_ENV = "TENSORMERGE_STATS_NO_MEMORY_CHECK"
FAULT_ENV = "TENSORMERGE_FAULT_KILL_AFTER_CHECKPOINT"  # tests: SIGKILL self after the Nth checkpoint


@dataclass
class ComputeOptions:
    model: str
    data: str
    kind: str
    output: str
    fisher_type: str = "empirical"
    fisher_mode: str = "per-example"
    grad_mode: str = "auto"
    gram_normalize: str = "tokens"
    batch_size: int = 8
    max_examples: int | None = None
    max_length: int = 512
    device: str = "cpu"
    dtype: str = "float32"
    accumulate: str = "float32"
    max_memory: int = 4 * 1024**3
    padding_side: str | None = None
    split: str | None = None
    base_model: str | None = None
    seed: int = 0
    gram_block_rows: int | None = None
    gram_per_weight: bool = False
    workers: int | None = None  # --workers / --scheduler: shards on a dask cluster (stats/cluster.py)
    scheduler: str | None = None
    shard_examples: int = 256
    shard: list | None = None  # set on a dask worker: [index, first example, end]
    checkpoint_every: int = 50
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    # record field names (--input-field ...; None: the default name) and multiple-choice scoring
    input_field: str | None = None
    target_field: str | None = None
    text_field: str | None = None
    label_field: str | None = None
    messages_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    choices_field: str | None = None
    choice_score: str = "sum"
    image_field: str = "image"  # images (stats/images.py): the JSONL / dataset field holding the image
    classes: str | None = None  # zero-shot CLIP: class names (comma list or a file, one per line)
    prompt: str = "a photo of a {}."  # zero-shot CLIP: the prompt of each class
    clip_towers: str = "vision"  # zero-shot CLIP: statistics of the vision tower, or of both towers

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ParameterError(f"--kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        for opt, v, least in (("--batch-size", self.batch_size, 1), ("--max-length", self.max_length, MIN_LENGTH),
                              ("--checkpoint-every", self.checkpoint_every, 1),
                              ("--shard-examples", self.shard_examples, 1)):
            if v < least:
                raise ParameterError(f"{opt} {v}: must be at least {least}")
        if self.max_memory < MIN_MEMORY:
            raise ParameterError(f"--max-memory {self.max_memory} bytes: must be at least 1MiB (the Gram row blocks "
                                 f"and gradient chunks are sized from it)")
        if self.max_examples is not None and self.max_examples < 1:
            raise ParameterError(f"--max-examples {self.max_examples}: must be at least 1")
        if self.workers is not None and self.scheduler:
            raise ParameterError("--workers and --scheduler: give one (a local cluster, or an existing one)")
        if self.workers is not None and self.workers < 1:
            raise ParameterError(f"--workers {self.workers}: must be at least 1")
        if (self.workers is not None or self.scheduler) and "://" in self.output:
            raise ParameterError(f"--output {self.output}: a cluster run needs a local output (the workers write "
                                 f"their shards beside it)")
        if self.fisher_type == "true" and self.fisher_mode == "squared-batch":
            raise ParameterError("--fisher-type true needs --fisher-mode per-example")
        if self.choice_score not in ("sum", "mean"):
            raise ParameterError(f"--choice-score {self.choice_score!r}: expected sum or mean")
        from tensormerge.kernels.dispatch import check_device

        check_device(self.device)

    def fingerprint(self, identity: str, data_hash: str) -> str:
        """What must not change between a run and its --resume (not: device, quiet, output)."""
        keep = {k: v for k, v in asdict(self).items()
                if k not in ("output", "device", "resume", "overwrite", "quiet", "checkpoint_every", "grad_mode",
                             "max_memory", "model", "data", "base_model", "gram_block_rows", "workers", "scheduler",
                             "shard")}
        blob = json.dumps({"model": identity, "data": data_hash, **keep}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class Accumulators:
    """Running sums and their counts, keyed (store kind, stored name); saved whole for --resume."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.counts: dict[tuple[str, str], int] = {}

    def add(self, kind: str, key: str, value: torch.Tensor, count: int) -> None:
        acc = self.sums.get((kind, key))
        if acc is None:
            self.sums[(kind, key)] = value.to(self.dtype).clone()
            self.counts[(kind, key)] = count
        else:
            acc.add_(value.to(self.dtype))
            self.counts[(kind, key)] += count

    def state(self) -> dict:
        return {"sums": {f"{k}/{n}": v.cpu() for (k, n), v in self.sums.items()},
                "counts": {f"{k}/{n}": c for (k, n), c in self.counts.items()}}

    def load(self, state: dict, device) -> None:
        for kn, v in state["sums"].items():
            k, n = kn.split("/", 1)
            self.sums[(k, n)] = v.to(device)
            self.counts[(k, n)] = state["counts"][kn]


def _parse_dtype(name: str) -> torch.dtype | None:
    if name not in DTYPES:
        raise ParameterError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _vector(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 1 and max(shape) == torch.Size(shape).numel()


class Collector:
    def __init__(self, opts: ComputeOptions, loaded, examples, say):
        self.o, self.loaded, self.examples, self.say = opts, loaded, examples, say
        model = loaded.model
        kinds = set(STORE_KINDS[opts.kind])
        self.acc = Accumulators(ACCUMULATE[opts.accumulate])
        params = dict(model.named_parameters())
        self.fisher_names = [n for n in loaded.stored if "fisher" in kinds]
        self.block_names = [n for n in loaded.stored if "fisher_block" in kinds and _vector(tuple(params[n].shape))]
        if opts.kind == "blockwise" and not self.block_names:
            raise InputError(f"{opts.model}: no vector parameters (IA3 vectors, biases, norms) for --kind blockwise")
        self.grad_names = sorted(set(self.fisher_names) | set(self.block_names), key=list(params).index)
        self._fisher_set, self._block_set = set(self.fisher_names), set(self.block_names)
        self.want_in, self.want_out = "gram_in" in kinds, "gram_out" in kinds
        dtype = next(iter(params.values())).dtype
        if loaded.modality == "image":
            from tensormerge.stats_compute.images import ImageInputs

            self.inputs = ImageInputs(model)
        else:
            self.inputs = Inputs(model, loaded.task, dtype if dtype.is_floating_point else torch.float32)
        budget = opts.max_memory
        per_example = sum(4 * params[n].numel() for n in self.grad_names) or 1
        mode = opts.grad_mode
        self.loop_reason = None
        if mode == "auto" and opts.fisher_mode == "per-example" and self.grad_names and per_example > budget // 4:
            # vmap holds a model of gradients per example; the loop one parameter's at a time
            mode = "loop"
            self.loop_reason = (f"one example's gradients ({per_example / 2**20:.1f} MiB) exceed a quarter of "
                                f"--max-memory ({budget / 2**20:.1f} MiB)")
        self.grads = PerExampleGrads(model, loaded.task, self.grad_names, self.inputs, mode,
                                     chunk=max(1, (budget // 4) // per_example))
        self.hooks = None
        if self.want_in or self.want_out:
            out_emb = getattr(model, "get_output_embeddings", lambda: None)()
            skip_out = set()
            if self.want_out and out_emb is not None:
                for name, mod in model.named_modules():
                    if mod is out_emb and loaded.own_key(f"{name}.weight"):
                        skip_out.add(loaded.own_key(f"{name}.weight"))
            self.hooks = GramHooks(loaded, self.want_in, self.want_out, self.acc.dtype, block_bytes=budget // 8,
                                   skip_out=skip_out, block_rows=opts.gram_block_rows,
                                   share_in=not opts.gram_per_weight)
            self.skip_out = sorted(skip_out)
            if loaded.modality == "image":
                from tensormerge.stats_compute.images import gram_side

                self.hooks.layers = {k: (m, gram_side(k), c) for k, (m, _, c) in self.hooks.layers.items()}
            self.budget = budget  # checked by prepare(), once the shared inputs are known
        if not self.grad_names and not (self.hooks and self.hooks.layers):
            raise InputError(f"{opts.model}: nothing to compute for --kind {opts.kind} (no stored parameter it applies "
                             f"to: Grams need linear layers, blockwise needs vector parameters)")
        self.n_examples = 0
        self.n_batches = 0
        self.n_tokens = 0

    def _check_gram_budget(self, budget: int) -> None:
        e = self.acc.dtype.itemsize
        need = 0
        for key, (mod, _, kind) in self.hooks.layers.items():
            w = mod.weight.shape
            d_in, d_out = (w[1], w[0]) if kind == "linear" else (w[0], w[1])
            need += e * (d_in * d_in * (self.want_in and key not in self.hooks.alias)
                         + d_out * d_out * (self.want_out and key not in self.hooks.skip_out))
        if need > budget:
            raise BudgetError(f"{self.o.model}: the Gram accumulators need {need / 2**20:.1f} MiB, more than "
                              f"--max-memory {budget / 2**20:.1f} MiB")

    def prepare(self, first_batch=None) -> None:
        """Before any accumulation: which layers read the same input (a forward of the first
        example, or `first_batch`: an image batch), then the Gram accumulators against
        --max-memory, a shared Gram counted once."""
        if self.hooks is None:
            return
        if self.hooks.share_in and self.examples:
            batch = first_batch if first_batch is not None else next(
                batches(self.examples[:1], 1, self.loaded.task, self.pad_id, self.side))
            batch = batch.to(self.o.device)
            with torch.no_grad():
                self.hooks.probe(lambda: self.loaded.model(**self.inputs(batch, additive=False)))
        self._check_gram_budget(self.budget)

    def aliases(self) -> list[tuple[str, str, str]]:
        """(kind, key, the key whose array it shares) for the store."""
        if self.hooks is None or not self.want_in:
            return []
        return [("gram_in", key, target) for key, target in self.hooks.alias.items()]

    # -------------------------------------------------------------- one batch
    def step(self, batch) -> None:
        o, task = self.o, self.loaded.task
        if o.fisher_type == "true" and (self.grad_names or self.want_out):
            from tensormerge.stats_compute.sampling import sample_labels

            batch = sample_labels(self.loaded.model, task, batch, self.inputs, o.seed, o.max_length, self.pad_id,
                                  self.side, o.choice_score)
        if self.grad_names:
            if o.fisher_mode == "squared-batch":
                batch_grad(self.loaded.model, task, self.grad_names, self.inputs, batch,
                           lambda n, g: self._add_grad(n, g, 1))
            else:
                g = self.grads(batch)
                if g is None:  # the loop: one example at a time, each gradient as it completes
                    self.grads.each(batch, lambda n, g: self._add_grad(n, g, 1))
                else:
                    for n in self.fisher_names:
                        self.acc.add("fisher", self.loaded.stored[n], (g[n].to(self.acc.dtype) ** 2).sum(0),
                                     len(batch))
                    for n in self.block_names:
                        v = g[n].reshape(len(batch), -1).to(self.acc.dtype)
                        self.acc.add("fisher_block", self.loaded.stored[n], v.T @ v, len(batch))
                    del g
        if self.hooks is not None and self.hooks.layers:
            self._grams(batch)
        self.n_examples += len(batch)
        self.n_batches += 1
        self.n_tokens += scored_tokens(batch, task)

    def _add_grad(self, name: str, g: torch.Tensor, count: int) -> None:
        """One gradient (of one example, or of a mini-batch) into the Fisher and Fisher block sums."""
        if name in self._fisher_set:
            self.acc.add("fisher", self.loaded.stored[name], g.detach().to(self.acc.dtype) ** 2, count)
        if name in self._block_set:
            v = g.detach().reshape(-1).to(self.acc.dtype)
            self.acc.add("fisher_block", self.loaded.stored[name], torch.outer(v, v), count)

    def _grams(self, batch) -> None:
        task, model = self.loaded.task, self.loaded.model
        if hasattr(self.inputs, "gram_masks"):
            self.hooks.attach(self.inputs.gram_masks(batch))
        else:
            mask = batch.attention_mask.bool()
            dec = (batch.labels != -100) if task == "seq2seq" else mask
            self.hooks.attach({"enc": mask, "dec": dec})
        try:
            if self.want_out:
                # No parameter gradients: the weights are frozen and the first hooked layers'
                # outputs start the graph (GramHooks.leaves), so the backward computes only the
                # gradients at layer outputs that the output Grams need.
                with frozen(model):
                    out = model(**self.inputs(batch, additive=False))
                    # the sum of per-example token-averaged losses: each example's gradient is its own
                    loss = token_nll(out.logits, batch.labels, task).sum()
                    if loss.requires_grad and self.hooks.leaves:
                        torch.autograd.grad(loss, self.hooks.leaves, allow_unused=True)
            else:
                with torch.no_grad():
                    model(**self.inputs(batch, additive=False))
            self.hooks.check_sharing()
        finally:
            self.hooks.detach()

    # -------------------------------------------------------------- results
    def state(self) -> dict:
        hooks = {"sums": {}, "counts": {}}
        if self.hooks is not None:
            hooks = {"sums": {f"{k}/{n}": v.cpu() for (k, n), v in self.hooks.sums.items()},
                     "counts": {f"{k}/{n}": c for (k, n), c in self.hooks.counts.items()},
                     "aliases": dict(self.hooks.alias)}
        return {"acc": self.acc.state(), "hooks": hooks, "n_examples": self.n_examples, "n_batches": self.n_batches,
                "n_tokens": self.n_tokens, "grad_mode": self.grads.mode}

    def load(self, state: dict) -> None:
        device = self.o.device
        self.acc.load(state["acc"], device)
        if self.hooks is not None:
            if state["hooks"].get("aliases", {}) != self.hooks.alias:
                raise OutputError(f"{_resume_path(self.o.output)}: checkpoint of a run whose layers shared input "
                                  f"Grams differently; remove {self.o.output}{PARTIAL_SUFFIX} to start over")
            for kn, v in state["hooks"]["sums"].items():
                k, n = kn.split("/", 1)
                self.hooks.sums[(k, n)] = v.to(device)
                self.hooks.counts[(k, n)] = state["hooks"]["counts"][kn]
        self.n_examples, self.n_batches, self.n_tokens = state["n_examples"], state["n_batches"], state["n_tokens"]
        if state.get("grad_mode") in ("vmap", "loop"):
            self.grads.mode = state["grad_mode"]

    def results(self):
        """(kind, key, mean, count, attrs) for every statistic."""
        o = self.o
        per = "batches" if o.fisher_mode == "squared-batch" else "examples"
        for (kind, key), s in self.acc.sums.items():
            n = self.acc.counts[(kind, key)]
            yield kind, key, s / n, n, {"normalizer": per, "fisher_mode": o.fisher_mode}
        if self.hooks is not None:
            for (kind, key), s in self.hooks.sums.items():
                n = self.hooks.counts[(kind, key)] if o.gram_normalize == "tokens" else self.n_examples
                attrs = {"normalizer": o.gram_normalize}
                if self.hooks.layers[key][2] == "conv1d":
                    attrs["weight_layout"] = "in_out"
                yield kind, key, s / max(n, 1), n, attrs


# ------------------------------------------------------------------ checkpoints
def _resume_path(output: str) -> str:
    return os.path.join(output + PARTIAL_SUFFIX, RESUME_DIR, STATE_FILE)


def _save_checkpoint(output: str, fingerprint: str, state: dict) -> None:
    save_state(_resume_path(output), fingerprint, state)


def _load_checkpoint(output: str, fingerprint: str) -> dict | None:
    return load_state(_resume_path(output), fingerprint, output, "checkpoint")


def save_state(path: str, fingerprint: str, state: dict) -> None:
    """A checkpoint (or a cluster shard's sums) with the run's fingerprint, replaced whole and
    durably; each writer has its own temporary, as a rerun of a lost task may race the first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save({"fingerprint": fingerprint, **state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk mid-write: the last whole checkpoint stays, alone
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_state(path: str, fingerprint: str, output: str, what: str) -> dict | None:
    """What save_state wrote for this run, None where nothing was; a torn or foreign file, or
    one of another run, is refused naming it."""
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file
        raise OutputError(f"{path}: unreadable {what} ({e.__class__.__name__}); remove it to compute it again") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise OutputError(f"{path}: {what} of a different run (model, data or options differ); remove "
                          f"{output}{PARTIAL_SUFFIX} or run without --resume")
    return state


# ------------------------------------------------------------------ entry point
def compute_stats(opts: ComputeOptions) -> dict:
    """Compute and write the store; a failure leaves no store at `output` (and, unless a
    checkpoint was saved for --resume, nothing at output.partial either). The output is checked
    (engine/outdir) and locked before the model is loaded."""
    opts.check()
    if "://" in opts.output:
        return _compute_stats(opts)
    opts.output = os.path.normpath(opts.output)  # "S.zarr/" must not put S.zarr/.partial inside it
    outdir.check_output(opts.output, overwrite=opts.overwrite, kind="stats", protected=[
        ("the model", opts.model), ("the base model", opts.base_model), ("the data", opts.data)])
    with outdir.OutputLock(opts.output, "stats compute", quiet=True) as lock:
        return _compute_stats(opts, lock.stale)


def _compute_stats(opts: ComputeOptions, stale_lock: str | None = None) -> dict:
    from tensormerge.stats_compute.model import load_model
    from tensormerge.stats.store import StatsWriter

    say = (lambda m: None) if opts.quiet else (lambda m: print(m, flush=True))
    if os.path.exists(opts.output) and not opts.overwrite:
        raise OutputError(f"{opts.output}: exists (pass --overwrite to replace it)")
    if not os.path.exists(opts.data):
        raise InputError(f"{opts.data}: no such data file")
    dtype = _parse_dtype(opts.dtype)
    from tensormerge.stats_compute.textdata import Fields, check_fields

    fields = Fields.from_flags(**{k: getattr(opts, f"{k}_field") for k in (
        "input", "target", "text", "label", "messages", "prompt", "completion", "choices")})
    from tensormerge.stats_compute.data import is_saved_dataset

    # an image model's data, or an image folder (one sub-folder per class): the image reader checks it
    image_input = _image_model(opts.model) or (os.path.isdir(opts.data) and not is_saved_dataset(opts.data))
    records = None if image_input else read_records(opts.data, opts.max_examples, opts.split)
    images = records is None or any(isinstance(r, dict) and opts.image_field in r for _, r in records)
    if not images:  # a record without its field is refused before the model loads (images: by their reader)
        check_fields(records, fields)
    torch.manual_seed(opts.seed)
    loaded = load_model(opts.model, dtype=dtype, device=opts.device, base_model=opts.base_model)
    from tensormerge.stats_compute.zeroshot import check_flags

    check_flags(opts, loaded)
    image_data = _image_data(opts, loaded) if loaded.modality == "image" else None
    cfg = loaded.config
    tok, examples = _examples(opts, loaded, fields, records, image_data)
    mixed = [e.where for e in examples if getattr(e, "choices", None) is None]
    if opts.fisher_type == "true" and 0 < len(mixed) < len(examples):
        raise InputError(f"{mixed[0]}: not multiple choice, but other records are; the true Fisher samples "
                         f"multiple-choice and generated answers differently (split the data)")
    side = opts.padding_side or (getattr(tok._tok, "padding_side", None) if tok._tok is not None else None) or "right"
    pad_id = getattr(cfg, "pad_token_id", None)
    if pad_id is None and tok._tok is not None:
        pad_id = tok._tok.pad_token_id
    if loaded.task == "classification" and image_data is None and pad_id is None and opts.batch_size > 1 and side:
        # the head pools the last non-pad token, found by the pad id
        raise InputError(f"{opts.model}: config.json has no pad_token_id; a classifier needs one for batches "
                         f"(or use --batch-size 1)")
    pad_id = 0 if pad_id is None else int(pad_id)

    collector = Collector(opts, loaded, examples, say)
    collector.pad_id, collector.side = pad_id, side
    collector.prepare(next(image_data.batches(1)) if image_data is not None and examples else None)
    _check_memory(opts, loaded, collector)
    warn: list[str] = [stale_lock] if stale_lock else []
    if collector.hooks is not None and collector.hooks.unstored:
        _warn(f"no Gram for {len(collector.hooks.unstored)} linear layer(s) whose weight is not stored under its "
              f"own name (tied): {', '.join(collector.hooks.unstored[:4])}", warn)
    if collector.want_out and collector.skip_out:
        _warn(f"no gram_out for the output layer {', '.join(collector.skip_out)} (vocabulary-sized; K-FAC "
              f"averages it, as the research code does)", warn)

    fingerprint = opts.fingerprint(loaded.identity, image_data.fingerprint() if image_data is not None
                                   else data_fingerprint(opts.data))
    if opts.shard is not None:  # a dask worker's part of a --workers/--scheduler run
        if image_data is not None:
            raise InputError("stats compute --workers/--scheduler: image data runs in one process for now")
        return _run_shard(opts, collector, examples, fingerprint)
    start = 0
    dist = None
    if opts.workers is not None or opts.scheduler:  # every shard on the cluster; the loop below has nothing left
        from tensormerge.stats_compute import cluster

        dist = cluster.compute(opts, fingerprint, len(examples), say)
        collector.load(dist[0])
        start = collector.n_examples
    elif opts.resume:
        state = _load_checkpoint(opts.output, fingerprint)
        if state is not None:
            collector.load(state)
            start = collector.n_examples
            say(f"resuming at example {start} of {len(examples)}")
    partial = opts.output + PARTIAL_SUFFIX
    if start == 0 and os.path.exists(partial):
        shutil.rmtree(partial)

    fault = int(os.environ.get(FAULT_ENV, "0") or 0)
    saved = 0
    from tqdm import tqdm

    bar = tqdm(total=len(examples), initial=start, unit="ex", disable=opts.quiet, desc="stats", leave=False)
    t0 = time.perf_counter()
    done_here = 0
    try:
        for batch in (image_data.batches(opts.batch_size, start=start) if image_data is not None else
                      batches(examples, opts.batch_size, loaded.task, pad_id, side, start=start)):
            collector.step(batch.to(opts.device))
            done_here += len(batch)
            bar.update(len(batch))
            if collector.n_batches % opts.checkpoint_every == 0 and collector.n_examples < len(examples):
                _save_checkpoint(opts.output, fingerprint, collector.state())
                saved += 1
                if fault and saved >= fault:
                    os.kill(os.getpid(), 9)
    except BaseException:
        bar.close()
        if not os.path.isfile(_resume_path(opts.output)):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    bar.close()
    seconds = time.perf_counter() - t0
    if dist is not None:
        seconds, done_here = dist[1], dist[2]
    if collector.grads.fallback_reason:
        _warn(f"per-example gradients one example at a time (vmap failed: {collector.grads.fallback_reason})", warn)
    elif collector.loop_reason:
        _warn(f"per-example gradients one example at a time ({collector.loop_reason})", warn)

    uses_fisher = bool(collector.grad_names)
    writer = StatsWriter(opts.output, model={"spec": opts.model, "identity": loaded.identity},
                         n_examples=collector.n_examples,
                         fisher_type=opts.fisher_type if uses_fisher or collector.want_out else None,
                         created_by=f"tensormerge {__version__} stats compute --kind {opts.kind}",
                         overwrite=opts.overwrite)
    arrays = 0
    try:
        for kind, key, value, count, attrs in collector.results():
            if not torch.isfinite(value).all():
                raise InputError(f"{opts.model}: {kind}/{key} is not finite (NaN/Inf in the model's outputs?)")
            writer.add(kind, key, value, count=count, **attrs)
            arrays += 1
        for kind, key, target in collector.aliases():
            writer.alias(kind, key, target)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"output": opts.output, "arrays": arrays, "aliases": len(collector.aliases()),
            "examples": collector.n_examples, "tokens": collector.n_tokens,
            "seconds": seconds, "examples_per_s": done_here / seconds if seconds > 0 else float("inf"),
            "grad_mode": collector.grads.mode if collector.grad_names else None, "warnings": warn or []}


def _check_memory(opts: ComputeOptions, loaded, collector: Collector) -> None:
    """Refuse, before the data pass, a run whose statistics would not fit beside the loaded model
    (`stats plan`'s accounting, activations not counted), rather than being killed an hour in.
    TENSORMERGE_STATS_NO_MEMORY_CHECK=1 skips it (an estimate can be wrong)."""
    from tensormerge.engine.memory import available_bytes
    from tensormerge.stats_compute import planning

    if os.environ.get(NO_MEMORY_CHECK_ENV) == "1":
        return
    free = available_bytes(opts.device)
    if free is None:
        return
    try:
        s = planning.shapes_of(loaded, opts.model)
        if collector.hooks is not None:
            s.alias = dict(collector.hooks.alias)
        a = planning.account(s, opts.kind, opts.batch_size, opts.accumulate, opts.fisher_mode, opts.gram_per_weight,
                             opts.max_memory, collector.grads.mode)
    except Exception:  # noqa: BLE001 - an estimate that cannot be made (an unusual model) stops nothing
        return
    need = a["memory_total_bytes"] - a["weights_bytes"]
    if need <= free:
        return
    gib = 2**30
    parts = [f"{k} accumulators {v / gib:.1f}" for k, v in a["accumulators"].items() if k != "total" and v]
    if a["per_example_gradients"]["peak_bytes"]:
        parts.append(f"gradients {a['per_example_gradients']['peak_bytes'] / gib:.1f}")
    advice = []
    if len(STORE_KINDS[opts.kind]) > 1 and opts.kind != "kfac":
        advice.append("compute fewer kinds per run (e.g. --kind kfac, then --kind fisher)")
    if opts.accumulate == "float64":
        advice.append("--accumulate float32")
    if a["per_example_gradients"]["mode"] == "vmap":
        advice.append("--grad-mode loop")
    advice.append("use a machine with more memory")
    raise BudgetError(f"{opts.model}: stats compute --kind {opts.kind} needs about {need / gib:.1f} GiB beside the "
                      f"loaded model ({', '.join(parts)} GiB; activations not counted), and {opts.device} has "
                      f"{free / gib:.1f} GiB available: {', or '.join(advice)} ({NO_MEMORY_CHECK_ENV}=1 "
                      f"skips this check)")


def _image_model(model_dir: str) -> bool:
    """Whether config.json names an image model (its records are checked by the image reader);
    read before the model loads. Anything unreadable: not known to be one."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(isinstance(a, str) and (a.endswith("ForImageClassification") or a == "CLIPModel") for a in archs)


def _examples(opts: ComputeOptions, loaded, fields, records, image_data) -> tuple[Tokenize, list]:
    """The tokenizer and the examples a run feeds the model (and `stats plan` times)."""
    tok = Tokenize(loaded.tokenizer_dirs, opts.data)
    if image_data is not None:
        return tok, image_data.examples
    cfg = loaded.config
    return tok, load_examples(
        opts.data, loaded.task, tok, max_length=opts.max_length, max_examples=opts.max_examples,
        vocab=getattr(cfg, "vocab_size", None), label2id=getattr(cfg, "label2id", None),
        num_labels=getattr(cfg, "num_labels", None) if loaded.task == "classification" else None, split=opts.split,
        fields=fields, records=records)


def _image_data(opts: ComputeOptions, loaded):
    """Images decoded and checked before any work; a zero-shot CLIP gets its class prompts."""
    from tensormerge.stats_compute.images import ImageData

    data = ImageData(opts, loaded)
    if loaded.zero_shot:
        from tensormerge.stats_compute.zeroshot import make_zero_shot

        make_zero_shot(loaded, data.classes, opts.prompt, opts.clip_towers)
    return data


def _run_shard(opts: ComputeOptions, collector: Collector, examples, fingerprint: str) -> dict:
    """Examples [lo, hi) of a cluster run, batched from lo, their sums saved for the client."""
    from tensormerge.engine import faults
    from tensormerge.stats_compute.cluster import save_shard
    from tensormerge.stats_compute.data import collate

    index, lo, hi = opts.shard
    for b0 in range(lo, hi, opts.batch_size):
        chunk = examples[b0:min(b0 + opts.batch_size, hi)]
        batch = collate(chunk, list(range(b0, b0 + len(chunk))), collector.loaded.task, collector.pad_id,
                        collector.side)
        collector.step(batch.to(opts.device))
        faults.hit("stats-shard")
    save_shard(opts.output, index, fingerprint, collector.state())
    return {"shard": index, "examples": collector.n_examples}


def _warn(msg: str, sink: list | None) -> None:
    if sink is not None:
        sink.append(msg)
    else:
        warnings.warn(msg, stacklevel=2)
