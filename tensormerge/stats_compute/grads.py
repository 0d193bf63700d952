"""Per-example gradients: batched with torch.func (vmap of grad of functional_call), or one
example per backward pass when the model cannot be traced that way or is too large for it.

Why not one backward per example always: it leaves the batch dimension unused, several times
slower on small models and far slower on a GPU. Why the loop: some models run data-dependent
Python on tensor values (mask building, `.item()`), which vmap refuses (the first chunk decides,
and the choice is reported); and vmap holds a whole model of gradients per example, so a model
whose one example's gradients exceed the budget goes straight to the loop. In the loop each
example runs unpadded, exactly as the research code's batch-size-1 loop does.

Why gradients are handed over one parameter at a time (`streamed`): a statistic only needs
each parameter's gradient long enough to square it, so the backward pass gives each one to the
caller as soon as it is complete and frees it. The peak is then the model, the accumulators and
one parameter's gradient, not a second model of `.grad` (at mT5-XL widths, 5 GB per 1.25B
parameters).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from tensormerge.stats_compute.data import Batch
from tensormerge.stats_compute.losses import Inputs, token_nll

MODES = ("auto", "vmap", "loop")


class PerExampleGrads:
    def __init__(self, model: torch.nn.Module, task: str, names: list[str], inputs: Inputs, mode: str = "auto",
                 chunk: int = 8):
        self.model, self.task, self.names, self.inputs = model, task, names, inputs
        self.mode = mode
        self.chunk = max(1, chunk)
        self.fallback_reason: str | None = None
        self.params = dict(model.named_parameters())

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        """{name: [B, *shape]} gradients of each example's token-averaged log-likelihood by vmap,
        or None when this model must use the loop (`each`) instead."""
        if self.mode == "loop":
            return None
        try:
            out = self._vmap(batch)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            if self.mode == "vmap":
                raise
            self.fallback_reason = f"{e.__class__.__name__}: {str(e).splitlines()[0][:160]}"
            self.mode = "loop"
            return None
        self.mode = "vmap"
        return out

    def each(self, batch: Batch, use: Callable[[str, torch.Tensor], None]) -> None:
        """The loop: one backward per example, use(name, gradient) called as each parameter's
        gradient completes."""
        for i in range(len(batch)):
            if hasattr(batch, "one"):  # images: nothing to unpad
                one = batch.one(i)
            else:
                keep = batch.attention_mask[i].bool()
                one = Batch(batch.input_ids[i][keep][None], batch.attention_mask[i][keep][None],
                            _unpad_labels(batch, i, keep, self.task), [batch.index[i]])

            def loss(one=one):
                out = self.model(**self.inputs(one, additive=False))
                return -token_nll(out.logits, one.labels, self.task)[0]
            streamed(self.model, self.names, loss, use)

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

def _unpad_labels(batch: Batch, i: int, keep: torch.Tensor, task: str) -> torch.Tensor:
    if task == "causal":
        return batch.labels[i][keep][None]
    if task == "seq2seq":
        lab = batch.labels[i]
        n = int((lab != -100).nonzero().max()) + 1 if bool((lab != -100).any()) else lab.numel()
        return lab[:n][None]
    return batch.labels[i:i + 1]


def batch_grad(model: torch.nn.Module, task: str, names: list[str], inputs: Inputs, batch: Batch,
               use: Callable[[str, torch.Tensor], None]) -> None:
    """use(name, gradient) of the batch-mean token-averaged log-likelihood, one parameter at a
    time (the RegMean paper code's Fisher squares this mini-batch gradient instead of
    per-example ones)."""
    def loss():
        out = model(**inputs(batch, additive=False))
        return -token_nll(out.logits, batch.labels, task).mean()
    streamed(model, names, loss, use)


@contextmanager
def frozen(model: torch.nn.Module, keep=()):
    """Parameters not in `keep` stop requiring gradients for the duration (restored after), so
    a forward and backward inside compute neither their gradients nor keep the inputs that only
    those gradients need."""
    params = [p for n, p in model.named_parameters() if n not in keep]
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


def streamed(model: torch.nn.Module, names: list[str], loss: Callable[[], torch.Tensor],
             use: Callable[[str, torch.Tensor], None]) -> None:
    """Forward `loss()` and its backward with only `names` requiring gradients, calling
    use(name, gradient) for each as soon as its gradient is complete (a tied weight's uses
    summed) and freeing it; a parameter the loss does not reach gets zeros."""
    params = dict(model.named_parameters())
    seen: set[str] = set()

    def done(name):
        def hook(p):
            g, p.grad = p.grad, None
            seen.add(name)
            use(name, g)
        return hook

    with frozen(model, keep=set(names)):
        handles = []
        try:
            for n in names:
                params[n].grad = None
                handles.append(params[n].register_post_accumulate_grad_hook(done(n)))
            value = loss()
            if value.requires_grad:
                value.backward()
        finally:
            for h in handles:
                h.remove()
    for n in names:
        if n not in seen:
            use(n, torch.zeros_like(params[n]))
