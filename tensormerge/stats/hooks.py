"""Input Grams (X^T X) and output-gradient Grams (G^T G) of linear layers, from hooks.

Why hooks on modules rather than on parameters: a Gram is a property of what flows through a
layer, and the rows that count are the non-pad tokens of the side that feeds it (METHODS.md §5):
encoder tokens for encoder layers and cross-attention k/v, decoder tokens otherwise. The mask is
chosen per layer by name, once; each layer counts the rows it actually added, so its `count` is
exactly what it was divided by.

Why row blocks: X^T X of a very wide layer (d = 16k: 1 GiB in float32) must not need a second
temporary of the same size; rows of the Gram are added a block at a time under --max-memory.
"""

from __future__ import annotations

import re

import torch

CROSS_KV = re.compile(r"(EncDecAttention\.(k|v)|encoder_attn\.(k_proj|v_proj)|crossattention\.self\.(key|value))$")


def linear_kind(module: torch.nn.Module) -> str | None:
    """'linear' ([out, in] weight), 'conv1d' (GPT-2's [in, out] weight) or None."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    return "conv1d" if isinstance(module, Conv1D) else None


class GramHooks:
    def __init__(self, loaded, want_in: bool, want_out: bool, acc_dtype: torch.dtype, block_bytes: int,
                 skip_out: set[str] = frozenset(), block_rows: int | None = None):
        self.acc_dtype, self.block_bytes, self.block_rows = acc_dtype, block_bytes, block_rows
        self.layers: dict[str, tuple[torch.nn.Module, str, str]] = {}  # key -> (module, side, kind)
        self.unstored: list[str] = []
        model = loaded.model
        enc = getattr(model, "get_encoder", None)
        enc_ids = {id(m) for m in enc().modules()} if enc is not None and loaded.task == "seq2seq" else set()
        for name, mod in model.named_modules():
            kind = linear_kind(mod)
            if kind is None or not isinstance(getattr(mod, "weight", None), torch.nn.Parameter):
                continue
            if not mod.weight.requires_grad and loaded.adapter is None:  # a frozen tower (zero-shot CLIP)
                continue
            key = loaded.own_key(f"{name}.weight")
            if key is None:
                if mod.weight.requires_grad or loaded.adapter is None:
                    self.unstored.append(f"{name}.weight")
                continue
            side = "enc" if id(mod) in enc_ids or (enc_ids and CROSS_KV.search(name)) else "dec"
            self.layers[key] = (mod, side, kind)
        self.want_in, self.want_out = want_in, want_out
        self.skip_out = set(skip_out)
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.handles = []

    def attach(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        for key, (mod, side, _) in self.layers.items():
            self.handles.append(mod.register_forward_hook(self._hook(key, side)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _rows(self, t: torch.Tensor, side: str, key: str) -> torch.Tensor:
        if t.dim() == 2:  # a pooled input (classifier head): one row per example
            return t
        mask = self.masks[side]
        if mask is None:  # images: every patch and class token is a row
            return t.reshape(-1, t.shape[-1])
        if t.shape[:2] != mask.shape:
            raise RuntimeError(f"{key}: input of shape {list(t.shape)} does not match the {side} token mask "
                               f"{list(mask.shape)}")
        return t[mask]

    def _add(self, kind: str, key: str, rows: torch.Tensor) -> None:
        rows = rows.detach().to(self.acc_dtype)
        d = rows.shape[-1]
        acc = self.sums.get((kind, key))
        if acc is None:
            acc = self.sums[(kind, key)] = torch.zeros(d, d, dtype=self.acc_dtype, device=rows.device)
            self.counts[(kind, key)] = 0
        step = self.block_rows or max(1, self.block_bytes // max(1, d * rows.element_size()))
        if step >= d:
            acc.addmm_(rows.T, rows)
        else:
            for r0 in range(0, d, step):
                acc[r0:r0 + step].addmm_(rows[:, r0:r0 + step].T, rows)
        self.counts[(kind, key)] += rows.shape[0]

    def _hook(self, key: str, side: str):
        def hook(mod, args, out):
            if self.want_in:
                x = args[0]
                self._add("gram_in", key, self._rows(x.reshape(*x.shape[:-1], x.shape[-1]), side, key))
            if self.want_out and key not in self.skip_out and out.requires_grad:
                out.register_hook(lambda g: self._add("gram_out", key, self._rows(g, side, key)))
        return hook
