"""Per-example gradients: batched with torch.func (vmap of grad of functional_call), or one
example per backward pass when the model cannot be traced that way.

Why not one backward per example always: it leaves the batch dimension unused, several times
slower on small models and far slower on a GPU. Why the fallback: some models run
data-dependent Python on tensor values (mask building, `.item()`), which vmap refuses; the first
chunk decides, and the choice is reported. In the fallback each example runs unpadded, exactly
as the research code's batch-size-1 loop does.
"""

from __future__ import annotations

import torch

from tensormerge.stats.data import Batch
from tensormerge.stats.losses import Inputs, token_nll

MODES = ("auto", "vmap", "loop")


class PerExampleGrads:
    def __init__(self, model: torch.nn.Module, task: str, names: list[str], inputs: Inputs, mode: str = "auto",
                 chunk: int = 8):
        self.model, self.task, self.names, self.inputs = model, task, names, inputs
        self.mode = mode
        self.chunk = max(1, chunk)
        self.fallback_reason: str | None = None
        self.params = dict(model.named_parameters())

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{name: [B, *shape]} gradients of each example's token-averaged log-likelihood."""
        if self.mode in ("auto", "vmap"):
            try:
                out = self._vmap(batch)
                self.mode = "vmap"
                return out
            except (RuntimeError, NotImplementedError, TypeError) as e:
                if self.mode == "vmap":
                    raise
                self.fallback_reason = f"{e.__class__.__name__}: {str(e).splitlines()[0][:160]}"
                self.mode = "loop"
        return self._loop(batch)

    def _vmap(self, batch: Batch) -> dict[str, torch.Tensor]:
        from torch.func import functional_call, grad, vmap

        model, task = self.model, self.task
        trainable = {n: self.params[n].detach() for n in self.names}
        frozen = {n: p.detach() for n, p in self.params.items() if n not in trainable}
        frozen.update(dict(model.named_buffers()))
        kw = self.inputs(batch, additive=True)

        def loglik(params, one, labels):
            out = functional_call(model, {**params, **frozen}, (), {k: v[None] for k, v in one.items()})
            return -token_nll(out.logits, labels[None], task)[0]

        per = vmap(grad(loglik), in_dims=(None, 0, 0))
        parts = []
        for s in range(0, len(batch), self.chunk):
            sub = {k: v[s:s + self.chunk] for k, v in kw.items()}
            parts.append(per(trainable, sub, batch.labels[s:s + self.chunk]))
        return {n: torch.cat([p[n] for p in parts]) for n in self.names}

    def _loop(self, batch: Batch) -> dict[str, torch.Tensor]:
        params = [self.params[n] for n in self.names]
        out = {n: [] for n in self.names}
        for i in range(len(batch)):
            if hasattr(batch, "one"):  # images: nothing to unpad
                one = batch.one(i)
            else:
                keep = batch.attention_mask[i].bool()
                one = Batch(batch.input_ids[i][keep][None], batch.attention_mask[i][keep][None],
                            _unpad_labels(batch, i, keep, self.task), [batch.index[i]])
            out_i = self.model(**self.inputs(one, additive=False))
            loss = -token_nll(out_i.logits, one.labels, self.task)[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for n, g, p in zip(self.names, grads, params):
                out[n].append(torch.zeros_like(p) if g is None else g)
        return {n: torch.stack(v) for n, v in out.items()}


def _unpad_labels(batch: Batch, i: int, keep: torch.Tensor, task: str) -> torch.Tensor:
    if task == "causal":
        return batch.labels[i][keep][None]
    if task == "seq2seq":
        lab = batch.labels[i]
        n = int((lab != -100).nonzero().max()) + 1 if bool((lab != -100).any()) else lab.numel()
        return lab[:n][None]
    return batch.labels[i:i + 1]


def batch_grad(model: torch.nn.Module, task: str, names: list[str], inputs: Inputs, batch: Batch) -> dict:
    """Gradient of the batch-mean token-averaged log-likelihood (the RegMean paper code's Fisher
    squares this mini-batch gradient instead of per-example ones)."""
    params = dict(model.named_parameters())
    out = model(**inputs(batch, additive=False))
    loss = -token_nll(out.logits, batch.labels, task).mean()
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}
