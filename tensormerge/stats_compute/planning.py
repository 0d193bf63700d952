"""`tensormerge stats plan`: what a `stats compute` run will need, before it runs.

Why: the statistics of a large model outgrow its weights (a K-FAC output Gram per linear
layer; per-example gradients are a whole model per example in the batch), and a user renting a
GPU should know that from a table, not from an out-of-memory error an hour in.

Two ways to get the shapes, one accounting:
- `--model DIR --data FILE`: the model as `stats compute` loads it (same options, same linear
  layers, same stored names) plus a few real batches of the user's data, timed and
  extrapolated by padded tokens (examples, for images) to the whole run. Nothing is written.
- `--arch NAME` / `--config config.json`: the model is built on the meta device (parameter
  shapes, no storage), so a 7B model costs a few hundred MB of Python objects, not 27 GB. The
  time then comes from FLOPs against a rate the user states (`--gpu-tflops`).

The accounting mirrors collect.py: accumulators are one sum per statistic in the --accumulate
dtype (fisher: one per parameter; gram_in: d_in² per linear weight; gram_out: d_out², none for
the vocabulary-sized output layer; fisher_block: n² per vector parameter). Per-example gradients
(fisher, blockwise) are held for the whole batch in the model's dtype, and once more while the
vmap chunks are concatenated, unless they are streamed (the loop, and squared-batch: one
parameter's gradient at a time; stats/grads.py). K-FAC's backward computes no parameter
gradients. Activations are not counted. The store is
float32 of the same shapes; Blosc saves little on dense statistics, so the disk figure is the
uncompressed size plus about 2.5 KB of metadata per array (an upper bound: within 5% of
the tests' stores, where the codec saved 8% of the data).

Input Grams of layers that read the same tensor (q/k/v, gate/up, T5 wi_0/wi_1, every decoder
layer's cross-attention k/v) are equal; a store that shares them holds one. Which layers share
is seen by a probe forward (the tensor object each layer was called with), and both numbers are
reported; `stored` says which one this version of `stats compute` writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from tensormerge.errors import BudgetError, InputError, ParameterError

# name -> (config builder, what it is); built on the meta device only
ARCHS: dict[str, str] = {
    "t5-base": "T5 v1.0 base: d_model 768, d_ff 3072, 12+12 layers, 12 heads x 64, vocab 32128, tied",
    "mt5-xl": "mT5-XL: d_model 2048, d_ff 5120 (gated-gelu wi_0/wi_1), 24+24 layers, 32 heads x 64, vocab 250112",
    "llama-1b": "Llama-3.2-1B: 2048 / 8192, 16 layers, 32 heads (8 kv), vocab 128256, tied embeddings",
    "llama-7b": "Llama-7B: 4096 / 11008, 32 layers, 32 heads, vocab 32000",
    "vit-b-16": "ViT-B/16 classifier: 768 / 3072, 12 layers, 12 heads, 224 px, 1000 classes",
    "clip-vit-b-32": "CLIP ViT-B/32 vision tower with a linear head: 768 / 3072, 12 layers, 224 px, 1000 classes",
}


def _arch_config(name: str):
    """(config, task) of a named architecture."""
    import transformers as tf

    if name == "t5-base":
        cfg = tf.T5Config(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12,
                          num_decoder_layers=12, tie_word_embeddings=True, architectures=["T5ForConditionalGeneration"])
    elif name == "mt5-xl":
        cfg = tf.MT5Config(vocab_size=250112, d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                           num_decoder_layers=24, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                           architectures=["MT5ForConditionalGeneration"])
        cfg.tie_word_embeddings = False  # transformers 5's MT5Config forces True; the checkpoint stores lm_head
    elif name == "llama-1b":
        cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                             architectures=["LlamaForCausalLM"])
    elif name == "llama-7b":
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                             architectures=["LlamaForCausalLM"])
    elif name == "vit-b-16":
        cfg = tf.ViTConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16, num_labels=1000, architectures=["ViTForImageClassification"])
    elif name == "clip-vit-b-32":
        vis = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=32)
        cfg = tf.CLIPConfig(vision_config=vis, num_labels=1000, architectures=["CLIPForImageClassification"])
    else:
        raise ParameterError(f"--arch {name!r}: unknown; known: {', '.join(ARCHS)} (or --config config.json)")
    return cfg


# ------------------------------------------------------------------ the accounting
# a store's metadata per array: its zarr.json and its copy in the consolidated root (name, attributes,
# one crc32 per chunk); measured about 2.2 KB on the tests' stores, so this is a bound for short names
META_BYTES = 2560
@dataclass
class Shapes:
    """What the accounting needs of a model, however it was obtained."""

    name: str
    task: str  # causal, seq2seq, classification
    modality: str  # text, image
    params: int  # every parameter (the weights in memory)
    param_bytes: int  # their itemsize as the model runs
    fisher: dict[str, int]  # stored name -> numel (every stored trainable parameter)
    vectors: dict[str, int]  # stored name -> numel (vector parameters: Fisher blocks)
    layers: dict[str, tuple[int, int, bool]]  # stored weight name -> (d_in, d_out, has gram_out)
    alias: dict[str, str] = field(default_factory=dict)  # gram_in key -> the key whose input it reads
    tokens_per_example: int | None = None  # images: patches + class token
    grad_params: int = 0  # parameters that require a gradient
    matmul_params: int = 0  # entries of every linear weight, tied ones too: 2 FLOPs per token each, forward


def _sharing_now() -> bool:
    """Whether this version's `stats compute` stores one input Gram per distinct input."""
    from tensormerge.stats_compute.hooks import GramHooks

    return hasattr(GramHooks, "probe")


def account(s: Shapes, kind: str, batch_size: int, accumulate: str, fisher_mode: str = "per-example",
            gram_per_weight: bool = False, max_memory: int | None = None, grad_mode: str = "auto") -> dict:
    """Memory (bytes) and store size (bytes) of a `stats compute --kind KIND` run over `s`."""
    from tensormerge.stats_compute.collect import STORE_KINDS

    kinds = set(STORE_KINDS[kind])
    acc = 8 if accumulate == "float64" else 4
    fisher = sum(s.fisher.values()) if "fisher" in kinds else 0
    blocks = sum(n * n for n in s.vectors.values()) if "fisher_block" in kinds else 0
    in_every = sum(d_in * d_in for d_in, _, _ in s.layers.values()) if "gram_in" in kinds else 0
    in_shared = sum(d_in * d_in for k, (d_in, _, _) in s.layers.items() if k not in s.alias) if "gram_in" in kinds else 0
    out = sum(d_out * d_out for _, d_out, has in s.layers.values() if has) if "gram_out" in kinds else 0
    shared = _sharing_now() and not gram_per_weight
    in_stored = in_shared if shared else in_every
    grad_names = (set(s.fisher) if "fisher" in kinds else set()) | (set(s.vectors) if "fisher_block" in kinds else set())
    per_example = sum(s.fisher.get(n, s.vectors.get(n, 0)) for n in grad_names)
    largest = max((s.fisher.get(n, s.vectors.get(n, 0)) for n in grad_names), default=0)
    # as Collector: vmap unless told otherwise or one example's gradients exceed a quarter of the budget
    loop = fisher_mode == "per-example" and (grad_mode == "loop" or (
        grad_mode == "auto" and max_memory is not None and 4 * per_example > max_memory // 4))
    if fisher_mode == "squared-batch" or loop:  # streamed: one parameter's gradient at a time
        mode, held, peak = "streamed", largest * s.param_bytes, largest * s.param_bytes
    else:  # [B, *shape] per parameter, and the vmap chunks beside them while they are concatenated
        mode, held = "vmap", batch_size * per_example * s.param_bytes
        peak = 2 * held
    accum = {"fisher": fisher * acc, "gram_in": in_stored * acc, "gram_out": out * acc, "fisher_block": blocks * acc}
    store = {"fisher": fisher * 4, "gram_in": in_stored * 4, "gram_out": out * 4, "fisher_block": blocks * 4}
    arrays = ((len(s.fisher) if "fisher" in kinds else 0) + (len(s.vectors) if "fisher_block" in kinds else 0)
              + ((len(s.layers) - (len(s.alias) if shared else 0)) if "gram_in" in kinds else 0)
              + (sum(1 for *_, has in s.layers.values() if has) if "gram_out" in kinds else 0))
    weights = s.params * s.param_bytes
    return {
        "model": s.name, "task": s.task, "kind": kind, "batch_size": batch_size, "accumulate": accumulate,
        "parameters": s.params, "linear_weights": len(s.layers) if kinds & {"gram_in", "gram_out"} else 0,
        "weights_bytes": weights,
        "per_example_gradients": {"parameters": per_example, "bytes_per_example": per_example * s.param_bytes,
                                  "mode": mode if per_example else None,
                                  "batch_bytes": held if per_example else 0, "peak_bytes": peak if per_example else 0},
        "accumulators": {**accum, "total": sum(accum.values())},
        "gram_in_bytes": {"per_weight": in_every * acc, "shared": in_shared * acc,
                          "shared_weights": len(s.alias) if "gram_in" in kinds else 0},
        "gram_sharing": "shared" if shared else "per weight",
        "store": {**store, "metadata": arrays * META_BYTES, "total": sum(store.values()) + arrays * META_BYTES,
                  "arrays": arrays},
        "memory_total_bytes": weights + (peak if per_example else 0) + sum(accum.values()),
    }


# ------------------------------------------------------------------ shapes of a model
def _probe_sharing(model: torch.nn.Module, layers: dict[str, torch.nn.Module], sides: dict[str, str],
                   forward) -> dict[str, str]:
    """Which linear layers read the same tensor object, call for call, in one forward."""
    keep, calls, handles = [], {k: [] for k in layers}, []

    def hook(key):
        def f(mod, args, out):
            keep.append(args[0])  # alive until the end: an id is then never reused
            calls[key].append(id(args[0]))
        return f

    for key, mod in layers.items():
        handles.append(mod.register_forward_hook(hook(key)))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    first, alias = {}, {}
    for key in layers:
        sig = (tuple(calls[key]), sides.get(key))
        if not calls[key]:
            continue
        if sig in first:
            alias[key] = first[sig]
        else:
            first[sig] = key
    return alias


def shapes_of(loaded, name: str, skip_out: set[str] | None = None, probe=None) -> Shapes:
    """The accounting's view of a model loaded (or built on meta) as `stats compute` sees it."""
    from tensormerge.stats_compute.collect import _vector
    from tensormerge.stats_compute.hooks import GramHooks, linear_kind

    model = loaded.model
    params = dict(model.named_parameters())
    hooks = GramHooks(loaded, True, True, torch.float32, block_bytes=1)
    if loaded.modality == "image":
        from tensormerge.stats_compute.images import gram_side

        hooks.layers = {k: (m, gram_side(k), c) for k, (m, _, c) in hooks.layers.items()}
    if skip_out is None:
        out_emb = getattr(model, "get_output_embeddings", lambda: None)()
        skip_out = {loaded.own_key(f"{n}.weight") for n, m in model.named_modules() if m is out_emb} - {None}
    layers = {}
    for key, (mod, _, kind) in hooks.layers.items():
        w = mod.weight.shape
        d_in, d_out = (w[1], w[0]) if kind == "linear" else (w[0], w[1])
        layers[key] = (int(d_in), int(d_out), key not in skip_out)
    fisher = {loaded.stored[n]: params[n].numel() for n in loaded.stored}
    vectors = {loaded.stored[n]: params[n].numel() for n in loaded.stored if _vector(tuple(params[n].shape))}
    first = next(iter(params.values()))
    alias = _probe_sharing(model, {k: m for k, (m, _, _) in hooks.layers.items()},
                           {k: (side, kind) for k, (_, side, kind) in hooks.layers.items()}, probe) if probe else {}
    tokens = None
    cfg = getattr(model, "config", None)
    if loaded.modality == "image" and cfg is not None:
        vis = getattr(cfg, "vision_config", cfg)
        size, patch = getattr(vis, "image_size", None), getattr(vis, "patch_size", None)
        if isinstance(size, int) and isinstance(patch, int) and patch > 0:  # a custom model may say neither
            tokens = (size // patch) ** 2 + 1
    matmul = sum(m.weight.numel() for _, m in model.named_modules() if linear_kind(m) is not None)
    return Shapes(name, loaded.task, loaded.modality, sum(p.numel() for p in params.values()), first.element_size(),
                  fisher, vectors, layers, alias, tokens, sum(p.numel() for p in params.values() if p.requires_grad),
                  matmul)


# More layers or experts than any released model has (Llama 3.1 405B: 126 layers, DeepSeek-V3:
# 256 experts): a config stating millions builds millions of meta modules, minutes and gigabytes
# of Python objects from a 1 KB file.
MAX_MODULES = 1024


def check_module_counts(cfg, path: str) -> None:
    """Refuse a config whose layer or expert count no model has, before any module is built."""
    def walk(d: dict, prefix: str):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            elif (isinstance(v, int) and not isinstance(v, bool) and v > MAX_MODULES
                  and ("layer" in k.lower() or "expert" in k.lower())):
                yield f"{prefix}{k}", v

    bad = next(walk(cfg.to_dict(), ""), None)
    if bad is not None:
        raise InputError(f"{path}: {bad[0]} is {bad[1]}, more than {MAX_MODULES} (no model has that many; "
                         "a typo?)")


def _meta_model(config, path: str):
    """The model `stats compute` would load for `config`, with meta tensors: shapes, no storage."""
    from types import SimpleNamespace

    from tensormerge.stats_compute.model import IMAGE_TASKS, _model_class, _quiet_transformers, task_of

    _quiet_transformers()
    task = task_of(config, path)
    cls = _model_class(config, task)
    config._attn_implementation = "eager"
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:
        raise InputError(f"{path}: cannot build {cls.__name__} from the config ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    stored = {n: n for n, p in model.named_parameters()}  # a tied twin is dropped, as save_pretrained does
    image = task in IMAGE_TASKS
    loaded = SimpleNamespace(model=model, task="classification" if image else task, stored=stored, adapter=None,
                             modality="image" if image else "text", own_key=lambda n: n if n in stored else None)
    if image:
        vis = getattr(config, "vision_config", config)
        px = torch.zeros(1, getattr(vis, "num_channels", 3), vis.image_size, vis.image_size, device="meta")
        forward = (lambda: model(pixel_values=px))  # noqa: E731
    else:
        ids = torch.ones(1, 8, dtype=torch.long, device="meta")
        forward = (lambda: model(input_ids=ids, decoder_input_ids=ids[:, :4])) if task == "seq2seq" else (
            lambda: model(input_ids=ids))
    return loaded, forward


def arch_shapes(arch: str | None, config: str | None, dtype: str) -> Shapes:
    if config is not None:
        from transformers import AutoConfig

        if not os.path.exists(config):
            raise InputError(f"{config}: no such config file or model directory")
        try:
            cfg = AutoConfig.from_pretrained(config)
        except Exception as e:
            raise InputError(f"{config}: cannot read the config ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
        name = config
        check_module_counts(cfg, config)
    else:
        cfg, name = _arch_config(arch), arch
    if dtype in ("bfloat16", "float16", "float32"):
        torch_dtype = getattr(torch, dtype)
    else:  # auto: as the config says it is stored
        torch_dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
        torch_dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    loaded, forward = _meta_model(cfg, name)
    if arch == "mt5-xl":  # untied lm_head, but the stacks' embeddings are `shared` (transformers 5 unties all three)
        m = loaded.model
        m.encoder.embed_tokens.weight = m.decoder.embed_tokens.weight = m.shared.weight
        loaded.stored.clear()
        loaded.stored.update({n: n for n, _ in m.named_parameters()})
    loaded.model.to(torch_dtype)
    return shapes_of(loaded, name, probe=forward)


# ------------------------------------------------------------------ time
def flops_per_token(s: Shapes, kind: str, fisher_type: str) -> tuple[float, str]:
    """FLOPs per token of one `stats compute` pass, and how they were counted.

    P is the entries of every linear weight (embedding lookups cost no FLOPs; attention's
    score products, 4 x length x d per token and layer, are left out: small at the lengths
    statistics are computed at). A weight costs 2P per token forward; the backward 2P for the
    input gradient and 2P for the weight gradient (K-FAC's backward computes no weight gradients).
    The gradients and the Grams are separate passes, each with its own forward. Per-example weight gradients (vmap) are the same
    products kept apart instead of summed, so the FLOPs are those of one batched backward; what
    per-example gradients add is memory traffic (B copies of the model written and squared),
    which this count does not see. Grams add 2 d² per token per accumulated Gram (addmm)."""
    from tensormerge.stats_compute.collect import STORE_KINDS

    kinds = set(STORE_KINDS[kind])
    p = s.matmul_params
    f = 0.0
    how = []
    if kinds & {"fisher", "fisher_block"}:
        f += 6 * p if "fisher" in kinds else 4 * p  # blockwise: no weight gradients of matrices
        how.append("6P forward+backward (per-example gradients: same FLOPs, B model copies of memory traffic)")
    if kinds & {"gram_in", "gram_out"}:  # the Grams' own forward, after the gradients' pass
        f += 2 * p
        how.append("2P forward")
    if "gram_in" in kinds:
        f += 2 * sum(d * d for k, (d, _, _) in s.layers.items() if k not in s.alias)
        how.append("2 d_in² per distinct input Gram")
    if "gram_out" in kinds:  # the weights are frozen: input gradients only
        f += 2 * p + 2 * sum(d * d for _, d, has in s.layers.values() if has)
        how.append("2P backward (no weight gradients) + 2 d_out² per output Gram")
    if fisher_type == "true" and (kinds & {"fisher", "fisher_block", "gram_out"}):
        how.append("true Fisher's label sampling not counted (a forward per generated token on text)")
    return f, "; ".join(how)


# ------------------------------------------------------------------ entry points
def plan_arch(arch: str | None, config: str | None, kind: str, batch_size: int, max_length: int, accumulate: str,
              dtype: str = "float32", fisher_mode: str = "per-example", fisher_type: str = "empirical",
              max_examples: int | None = None, gpu_tflops: float | None = None, gram_per_weight: bool = False,
              max_memory: int | None = None, grad_mode: str = "auto") -> dict:
    s = arch_shapes(arch, config, dtype)
    out = account(s, kind, batch_size, accumulate, fisher_mode, gram_per_weight, max_memory, grad_mode)
    grams = out["accumulators"]["gram_in"] + out["accumulators"]["gram_out"]
    if max_memory is not None and grams > max_memory:  # as Collector's budget check
        out["refused"] = (f"the Gram accumulators need {grams / 2**20:.1f} MiB, more than --max-memory "
                          f"{max_memory / 2**20:.1f} MiB")
    tokens = s.tokens_per_example or (2 * max_length if s.task == "seq2seq" else max_length)
    per_tok, how = flops_per_token(s, kind, fisher_type)
    # seq2seq: encoder parameters see the input, decoder parameters the target: both max_length
    per_ex = per_tok * tokens / (2 if s.task == "seq2seq" else 1)
    timing = {"source": "flops", "tokens_per_example": tokens, "flops_per_example": per_ex, "how": how,
              "gpu_tflops": gpu_tflops, "examples": max_examples}
    if gpu_tflops:
        timing["seconds_per_example"] = per_ex / (gpu_tflops * 1e12)
        if max_examples:
            timing["seconds"] = timing["seconds_per_example"] * max_examples
    out["time"] = timing
    out["description"] = ARCHS.get(arch or "", "")
    return out


def plan_model(opts, measure_batches: int = 3) -> dict:
    """Load the model and data as `stats compute` does, account, then time a few real batches."""
    from tensormerge.stats_compute import collect
    from tensormerge.stats_compute.data import batches, read_records
    from tensormerge.stats_compute.model import load_model
    from tensormerge.stats_compute.textdata import Fields, check_fields

    opts.check()
    if not os.path.exists(opts.data):
        raise InputError(f"{opts.data}: no such data file")
    dtype = collect._parse_dtype(opts.dtype)
    fields = Fields.from_flags(**{k: getattr(opts, f"{k}_field") for k in (
        "input", "target", "text", "label", "messages", "prompt", "completion", "choices")})
    # as collect._compute_stats, up to the first batch (nothing written)
    records = read_records(opts.data, opts.max_examples, opts.split)
    check_fields(records, fields)
    torch.manual_seed(opts.seed)
    loaded = load_model(opts.model, dtype=dtype, device=opts.device, base_model=opts.base_model)
    image_data = collect._image_data(opts, loaded) if loaded.modality == "image" else None
    cfg = loaded.config
    tok, examples = collect._examples(opts, loaded, fields, records, image_data)
    side = opts.padding_side or (getattr(tok._tok, "padding_side", None) if tok._tok is not None else None) or "right"
    pad_id = getattr(cfg, "pad_token_id", None)
    if pad_id is None and tok._tok is not None:
        pad_id = tok._tok.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    make = ((lambda start=0: image_data.batches(opts.batch_size, start=start)) if image_data is not None else
            (lambda start=0: batches(examples, opts.batch_size, loaded.task, pad_id, side, start=start)))
    first = next(iter(make()), None)
    probe = None
    if first is not None:
        inputs = _inputs(loaded)
        b = first.to(opts.device)
        probe = (lambda: loaded.model(**inputs(b, additive=False)))  # noqa: E731
    skip = None if opts.kind in ("kfac", "all") else set()
    s = shapes_of(loaded, opts.model, skip_out=skip, probe=probe)
    out = account(s, opts.kind, opts.batch_size, opts.accumulate, opts.fisher_mode,
                  getattr(opts, "gram_per_weight", False), opts.max_memory, opts.grad_mode)
    out["examples"] = len(examples)
    try:
        collector = collect.Collector(opts, loaded, examples, lambda m: None)
        collector.pad_id, collector.side = pad_id, side
        if hasattr(collector, "prepare"):  # the shared-input probe and budget check, where this version has them
            collector.prepare(*([next(image_data.batches(1))] if image_data is not None and examples else []))
        collect._check_memory(opts, loaded, collector)  # a run that cannot fit is not timed either
    except BudgetError as e:  # what stats compute would say; the numbers above say how much to give
        out["refused"] = str(e)
        out["time"] = None
        return out
    out["time"] = _measure(collector, make, examples, loaded.task, opts, measure_batches)
    return out


def _inputs(loaded):
    """The forward's keyword arguments for a batch, as the Collector builds them."""
    from tensormerge.stats_compute.losses import Inputs

    if loaded.modality == "image":
        from tensormerge.stats_compute.images import ImageInputs

        return ImageInputs(loaded.model)
    dtype = next(iter(loaded.model.parameters())).dtype
    return Inputs(loaded.model, loaded.task, dtype if dtype.is_floating_point else torch.float32)


def _cost(chunk, task: str) -> int:
    """Padded tokens of a batch (examples, for images): what a batch's time grows with."""
    if not chunk or not hasattr(chunk[0], "input_ids"):
        return len(chunk)
    def n(e):
        return len(e.input_ids) + (len(e.labels) if task == "seq2seq" and isinstance(e.labels, list) else 0)
    return len(chunk) * max(n(e) for e in chunk)


def _measure(collector, make, examples, task: str, opts, n: int) -> dict:
    """Time batches 2..n+1 (the first pays for tracing and allocation), extrapolate by cost."""
    total = sum(_cost(examples[b:b + opts.batch_size], task) for b in range(0, len(examples), opts.batch_size))
    timed, cost, seconds, done = 0, 0, 0.0, 0
    sync = torch.cuda.synchronize if str(opts.device).startswith("cuda") else (lambda: None)
    for i, batch in enumerate(make()):
        if i > n:
            break
        chunk = examples[done:done + len(batch)]
        sync()
        t0 = time.perf_counter()
        collector.step(batch.to(opts.device))
        sync()
        dt = time.perf_counter() - t0
        done += len(batch)
        if i == 0 and len(examples) > len(batch):  # warm-up, when there is more to time
            continue
        timed += len(batch)
        cost += _cost(chunk, task)
        seconds += dt
    per = seconds / cost if cost else 0.0
    measured = sum(v.nbytes for v in collector.acc.sums.values())
    if collector.hooks is not None:
        measured += sum(v.nbytes for v in collector.hooks.sums.values())
    return {"source": "measured", "batches_timed": max(0, min(n, -(-timed // opts.batch_size))),
            "examples_timed": timed, "seconds_timed": seconds, "examples": len(examples),
            "seconds": per * total, "seconds_per_example": per * total / len(examples) if examples else 0.0,
            "grad_mode": collector.grads.mode if collector.grad_names else None,
            "accumulator_bytes_measured": measured}


# ------------------------------------------------------------------ the table
def _b(n: float) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def _t(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s"


def render(p: dict) -> str:
    pe = p["per_example_gradients"]
    acc, st, g = p["accumulators"], p["store"], p["gram_in_bytes"]
    rows = [("model", f"{p['model']} ({p['task']}, {p['parameters']:,} parameters)"),
            ("kind", f"{p['kind']}, batch {p['batch_size']}, accumulate {p['accumulate']}"),
            ("weights", _b(p["weights_bytes"]))]
    if pe["parameters"] and pe["mode"] == "streamed":
        rows.append(("gradients", f"{_b(pe['peak_bytes'])} peak (one parameter's at a time, as it completes)"))
    elif pe["parameters"]:
        rows.append(("per-example gradients", f"{_b(pe['batch_bytes'])} held ({_b(pe['bytes_per_example'])} per "
                                              f"example), {_b(pe['peak_bytes'])} peak"))
    for k in ("fisher", "gram_in", "gram_out", "fisher_block"):
        if acc[k]:
            rows.append((f"accumulator {k}", _b(acc[k])))
    if g["per_weight"]:
        rows.append(("  gram_in per weight / shared", f"{_b(g['per_weight'])} / {_b(g['shared'])} "
                                                      f"({g['shared_weights']} weights share; stats compute "
                                                      f"stores them {p['gram_sharing']})"))
    rows.append(("accumulators total", _b(acc["total"])))
    rows.append(("memory total (no activations)", _b(p["memory_total_bytes"])))
    rows.append(("store on disk (float32)", f"{_b(st['total'])} in {st['arrays']} arrays"))
    if p.get("refused"):
        rows.append(("stats compute would refuse", p["refused"]))
    t = p.get("time") or {}
    if t.get("source") == "measured":
        rows.append(("time (measured)", f"{_t(t['seconds'])} for {t['examples']} examples "
                                        f"({t['examples_timed']} examples timed in {t['seconds_timed']:.2f} s)"))
    elif t.get("source") == "flops":
        rows.append(("FLOPs per example", f"{t['flops_per_example']:.3g} ({t['tokens_per_example']} tokens)"))
        if "seconds" in t:
            rows.append(("time (at --gpu-tflops)", f"{_t(t['seconds'])} for {t['examples']} examples"))
        elif "seconds_per_example" in t:
            rows.append(("time (at --gpu-tflops)", f"{_t(t['seconds_per_example'])} per example"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def check_sizes(batch_size: int, max_length: int, gpu_tflops: float | None, measure_batches: int) -> None:
    from tensormerge.stats_compute.data import MIN_LENGTH

    for opt, v, least in (("--batch-size", batch_size, 1), ("--max-length", max_length, MIN_LENGTH),
                          ("--measure-batches", measure_batches, 1)):
        if v < least:
            raise ParameterError(f"{opt} {v}: must be at least {least}")
    if gpu_tflops is not None and not (gpu_tflops > 0 and math.isfinite(gpu_tflops)):
        raise ParameterError(f"--gpu-tflops {gpu_tflops}: must be a positive number (the rate your GPU sustains)")
