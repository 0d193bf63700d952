"""Model inputs for a padded batch and the per-example token-averaged negative log-likelihood.

Why per example and token-averaged: the research code (METHODS.md §4.2, §8.1) takes one
gradient per sequence of its length-normalised log-likelihood, so a long answer does not weigh
more than a short one. Summing these per-example losses over a batch gives every example the
gradient it would have alone, which is what makes statistics independent of the batch size.

Why attention masks can be 4-D here: `transformers` builds its masks with data-dependent
control flow that torch.func.vmap cannot trace; an additive [B, 1, Q, K] mask passes through
unchanged, so the same model runs batched, per example under vmap, or one example at a time.
"""

from __future__ import annotations

import inspect

import torch

from tensormerge.stats_compute.data import IGNORE, Batch


def is_decoder_only(model: torch.nn.Module, task: str) -> bool:
    cfg = model.config
    if task == "causal":
        return True
    if task == "seq2seq" or getattr(cfg, "is_encoder_decoder", False):
        return False
    from transformers.models.auto import modeling_auto as ma

    t = getattr(cfg, "model_type", "")
    return t in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and t not in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _accepts(model: torch.nn.Module, name: str) -> bool:
    base = getattr(model, "get_base_model", lambda: model)()
    return name in inspect.signature(base.forward).parameters


class Inputs:
    """Builds the keyword arguments of the model's forward for a batch."""

    def __init__(self, model: torch.nn.Module, task: str, dtype: torch.dtype):
        self.task = task
        self.decoder_only = is_decoder_only(model, task)
        self.positions = self.decoder_only and _accepts(model, "position_ids")
        self.dtype = dtype
        base = getattr(model, "get_base_model", lambda: model)()
        self.shift = getattr(base, "prepare_decoder_input_ids_from_labels", None)

    def __call__(self, batch: Batch, additive: bool) -> dict[str, torch.Tensor]:
        ids, mask = batch.input_ids, batch.attention_mask
        kw = {"input_ids": ids}
        if self.positions:
            # left padding must not move the tokens: positions count real tokens only
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if not additive:
            kw["attention_mask"] = mask
        elif self.decoder_only:
            n = ids.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
            allowed = (causal & mask.bool()[:, None, :]) | torch.eye(n, dtype=torch.bool, device=ids.device)
            kw["attention_mask"] = self._additive(allowed[:, None])
        else:
            kw["attention_mask"] = self._additive(mask.bool()[:, None, None, :])
        if self.task == "seq2seq":
            kw["decoder_input_ids"] = self.shift(labels=batch.labels)
        return kw

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """[B] mean NLL over each example's scored positions (-100 = not scored), in float32."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    if task == "classification":
        return -lp.gather(-1, labels[:, None])[:, 0]
    if task == "causal":
        lp, labels = lp[:, :-1], labels[:, 1:]
    valid = labels != IGNORE
    tok = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    tok = torch.where(valid, tok, torch.zeros((), dtype=tok.dtype, device=tok.device))
    return -tok.sum(-1) / valid.sum(-1).clamp(min=1)


def scored_tokens(batch: Batch, task: str) -> int:
    if task == "classification":
        return len(batch)
    labels = batch.labels[:, 1:] if task == "causal" else batch.labels
    return int((labels != IGNORE).sum())
