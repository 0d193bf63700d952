"""The model `stats compute` runs: a `transformers` model (or a PEFT adapter on its base) and the
map from its parameters to the names the checkpoint stores.

Why the stored names matter: statistics are keyed by the names `tensormerge run` reads from the
checkpoint file. Tied parameters (T5 `shared` / `encoder.embed_tokens`, a tied Llama `lm_head`)
appear under one stored name only, and PEFT drops the adapter name (`lora_A.default.weight` is
stored as `lora_A.weight`); a key under any other name would be refused by `run --stats`, or
worse, match a different tensor.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from tensormerge.errors import InputError

TASK_CLASSES = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
                "classification": "AutoModelForSequenceClassification",
                "image": "AutoModelForImageClassification", "clip": "CLIPModel"}
IMAGE_TASKS = ("image", "clip")  # images in, one class out: the loss is a classifier's


@dataclass
class Loaded:
    model: torch.nn.Module
    task: str
    stored: dict[str, str]  # parameter name in the module -> name stored in the checkpoint file
    spec: str  # what was given as --model
    identity: str
    tokenizer_dirs: list[str]
    config: object
    adapter: str | None = None  # PEFT adapter name, dropped from stored names
    on_disk: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)  # trainable parameters with no stored name
    modality: str = "text"  # "image": pixel batches (stats/images.py); task is then "classification"
    zero_shot: bool = False  # a CLIPModel whose head is the text embeddings of class prompts
    renamed: dict[str, str] = field(default_factory=dict)  # module name -> checkpoint name, where they differ

    def own_key(self, name: str) -> str | None:
        """The stored name of parameter `name` itself, not of a tensor it is tied to: a tied-away
        lm_head has none, so no Gram is keyed to the embedding it shares storage with."""
        key = _stored_name(self.renamed.get(name, name), self.adapter)
        return key if key in self.on_disk else None


def task_of(config, path: str) -> str:
    """Which head the config's `architectures` names: it decides the loss and the Auto class."""
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a.endswith("ForImageClassification"):
            return "image"
        if a == "CLIPModel":
            return "clip"
        if a.endswith("ForSequenceClassification"):
            return "classification"
        if a.endswith("ForCausalLM") or a.endswith("LMHeadModel") and not getattr(config, "is_encoder_decoder", False):
            return "causal"
        if a.endswith("ForConditionalGeneration") or a.endswith("ForSeq2SeqLM"):
            return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    raise InputError(f"{path}: config.json names architectures {archs or 'none'}; stats compute needs a causal LM, "
                     f"a seq2seq LM, a sequence- or image-classification model or a CLIPModel")


def _model_class(config, task: str):
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    return cls if cls is not None else getattr(transformers, TASK_CLASSES[task])


def _quiet_transformers() -> None:
    """Our progress bar and one-line errors are the interface; transformers' own loading bars
    and advice would interleave with them on stderr."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _load(path: str, dtype: torch.dtype | None):
    from transformers import AutoConfig

    _quiet_transformers()

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # missing or unreadable config.json
        raise InputError(f"{path}: cannot read config.json ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
    from tensormerge.stats_compute.planning import check_module_counts

    check_module_counts(config, path)
    task = task_of(config, path)
    cls = _model_class(config, task)
    kw = {"attn_implementation": "eager"}  # padded query rows stay finite; vmap has no sdpa batching rule on CPU
    try:
        model = cls.from_pretrained(path, dtype=dtype or "auto", **kw)
    except Exception as e:  # unreadable weights, unknown architecture
        raise InputError(f"{path}: cannot load with {cls.__name__} ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    return model, config, task


def _stored_name(name: str, adapter: str | None) -> str:
    """PEFT saves `...lora_A.default.weight` as `...lora_A.weight` and `...ia3_l.default` as `...ia3_l`."""
    if not adapter:
        return name
    return re.sub(rf"\.{re.escape(adapter)}(?=\.|$)", "", name)


def _checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Module parameter name -> the name the checkpoint stores it under, where they differ.

    Why: transformers 5 renames some architectures' modules on load (ViT's stored
    `encoder.layer.0.attention.attention.query` is the module `layers.0.attention.q_proj`) and
    back on save. The reverse conversion is applied to the parameters themselves; a renamed
    parameter comes back as the same tensor object under its stored name. A parameter that a
    converter fuses or splits comes back as a new tensor and gets no name (no statistics)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: module and checkpoint names agree
        return {}
    params = dict(model.named_parameters(remove_duplicate=False))
    by_id: dict[int, list[str]] = {}
    for name, p in params.items():
        by_id.setdefault(id(p), []).append(name)
    try:
        reverted = revert_weight_conversion(model, dict(params))
    except Exception:  # a conversion that needs real tensors: keep the module names
        return {}
    out = {}
    for stored, t in reverted.items():
        if stored in params:
            continue
        # the module name that disappeared (a tied twin keeps its own name)
        gone = [n for n in by_id.get(id(t), []) if n not in reverted]
        if len(gone) == 1:
            out[gone[0]] = stored
    return out


def load_model(spec: str, *, dtype: torch.dtype | None, device: str, base_model: str | None = None) -> Loaded:
    from tensormerge.engine.sources import open_checkpoint

    if not os.path.isdir(spec):
        raise InputError(f"{spec}: stats compute needs a local model directory")
    ck = open_checkpoint(spec)
    try:
        identity = ck.identity()
        on_disk = {n for n in ck.tensors if n not in ck.aliases}
    finally:
        ck.close()
    adapter_cfg = os.path.join(spec, "adapter_config.json")
    adapter = None
    if os.path.isfile(adapter_cfg):
        try:
            with open(adapter_cfg) as f:
                acfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{adapter_cfg}: unreadable ({e})") from None
        base = base_model or acfg.get("base_model_name_or_path")
        if not base or not os.path.isdir(base):
            raise InputError(f"{spec}: adapter's base model {base!r} is not a local directory (pass --base-model)")
        model, config, task = _load(base, dtype)
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, spec, is_trainable=True)
        except Exception as e:
            raise InputError(f"{spec}: cannot load the PEFT adapter ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
        adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        tok_dirs = [spec, base]
    else:
        model, config, task = _load(spec, dtype)
        tok_dirs = [spec]
    model.to(device).eval()
    # statistics of what the checkpoint stores: every float parameter of a full model, only the
    # adapter's parameters of a PEFT model (the frozen base is not part of the merge)
    for name, p in model.named_parameters():
        p.requires_grad_(p.is_floating_point() and (adapter is None or _stored_name(name, adapter) in on_disk))
    renamed = _checkpoint_names(model) if adapter is None else {}
    from tensormerge.stats_compute.fused import expose_fused_projections

    fused = expose_fused_projections(model)  # nn.MultiheadAttention: in_proj_weight's Grams
    if adapter is None:
        renamed.update({child: renamed.get(own, own) for child, own in fused.items()})
    keys: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = _stored_name(renamed.get(name, name), adapter)
        if key in on_disk:
            keys.setdefault(id(p), key)
    stored, skipped = {}, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in keys:
            stored[name] = keys[id(p)]
        else:
            skipped.append(name)
    image = task in IMAGE_TASKS
    return Loaded(model, "classification" if image else task, stored, spec, identity, tok_dirs, config, adapter,
                  on_disk, skipped, "image" if image else "text", task == "clip", renamed)
