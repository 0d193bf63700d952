"""Fused attention projections (`nn.MultiheadAttention`'s `in_proj_weight` [3d, d]) shown to the
Gram hooks as the linear layer they are.

Why: the fused q/k/v projection runs inside `F.multi_head_attention_forward`, so no module call
exposes its input or its output; without this its Grams are missing and RegMean averages the
weight. For self-attention (query, key and value the same tensor) every row of the fused weight
sees the same input, so one input Gram [d, d] and one output-gradient Gram [3d, 3d] describe it.

How: the attention module gets a child `in_proj` (a `nn.Linear` sharing the `in_proj_weight`
and `in_proj_bias` Parameters, so parameter names, Fishers and per-example gradients are
unchanged) and a forward that projects with it, then runs torch's own attention with identity
q/k/v projections (multiplying by an identity matrix is exact). Cross-attention calls (SigLIP's
pooling head: a learned probe queries the tokens) run the original forward: the rows of their
fused weight see different inputs, no single Gram describes them, and they keep none.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

CHILD = "in_proj"


def _forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
             average_attn_weights=True, is_causal=False):
    if not (query is key and key is value) or query.dim() != 3:
        return self._tensormerge_forward(query, key, value, key_padding_mask=key_padding_mask,
                                         need_weights=need_weights, attn_mask=attn_mask,
                                         average_attn_weights=average_attn_weights, is_causal=is_causal)
    x = query.transpose(0, 1) if self.batch_first else query  # torch's attention is sequence-first
    q, k, v = getattr(self, CHILD)(x).chunk(3, dim=-1)
    eye = torch.eye(self.embed_dim, dtype=q.dtype, device=q.device)
    out, weights = F.multi_head_attention_forward(
        q, k, v, self.embed_dim, self.num_heads, None, None, self.bias_k, self.bias_v, self.add_zero_attn,
        self.dropout, self.out_proj.weight, self.out_proj.bias, training=self.training,
        key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        average_attn_weights=average_attn_weights, is_causal=is_causal)
    return (out.transpose(0, 1) if self.batch_first else out), weights


def expose_fused_projections(model: torch.nn.Module) -> dict[str, str]:
    """Give every fused `nn.MultiheadAttention` its `in_proj` child; returns the child's weight
    name -> the parameter's own name (`...attn.in_proj.weight` -> `...attn.in_proj_weight`)."""
    names = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.MultiheadAttention) or mod.in_proj_weight is None:
            continue
        if hasattr(mod, CHILD):
            continue
        d3, d = mod.in_proj_weight.shape
        lin = torch.nn.Linear(d, d3, bias=mod.in_proj_bias is not None, device="meta")
        lin.weight = mod.in_proj_weight
        if mod.in_proj_bias is not None:
            lin.bias = mod.in_proj_bias
        mod.add_module(CHILD, lin)
        mod._tensormerge_forward = mod.forward
        mod.forward = types.MethodType(_forward, mod)
        prefix = f"{name}." if name else ""
        names[f"{prefix}{CHILD}.weight"] = f"{prefix}in_proj_weight"
    return names
