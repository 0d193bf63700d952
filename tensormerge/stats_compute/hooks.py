"""Input Grams (X^T X) and output-gradient Grams (G^T G) of linear layers, from hooks.

Why hooks on modules rather than on parameters: a Gram is a property of what flows through a
layer, and the rows that count are the non-pad tokens of the side that feeds it (METHODS.md §5):
encoder tokens for encoder layers and cross-attention k/v, decoder tokens otherwise. The mask is
chosen per layer by name, once; each layer counts the rows it actually added, so its `count` is
exactly what it was divided by.

Why row blocks: X^T X of a very wide layer (d = 16k: 1 GiB in float32) must not need a second
temporary of the same size; rows of the Gram are added a block at a time under --max-memory.

Why one input Gram per distinct input: q, k and v read the same tensor, so do T5's wi_0 and
wi_1 and Llama's gate/up projections, and every decoder layer's cross-attention k and v read
the same encoder output; their input Grams are equal, bit for bit. Which layers share is seen,
not guessed from names: a probe forward records, per layer, the sequence of inputs it was
called with (a tensor is the same input as an earlier one when it is that object, or a view of
the same storage with the same offset, shape and strides, still alive and not modified in
place since: its version counter is unchanged), and layers with the same sequence, the same
token mask and the same weight layout share the first one's Gram. The sharing is then checked
after every forward, so a model whose sharing changes between batches is an error, never a
silently wrong Gram.
"""

from __future__ import annotations

import re
import weakref

import torch

from tensormerge.errors import InputError

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
                 skip_out: set[str] = frozenset(), block_rows: int | None = None, share_in: bool = True):
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
        self.share_in = share_in and want_in
        self.alias: dict[str, str] = {}  # gram_in key -> the key whose Gram it shares (see probe)
        self._calls: dict[str, list[tuple]] = {}  # this forward: key -> (input token, side, kind) per call
        self._seen: dict = {}  # this forward: id or storage geometry -> (weakref, version, token)
        self._tokens = 0
        self._probing = False

    def probe(self, forward) -> dict[str, str]:
        """Run `forward` once (a small batch) recording only which layers read the same inputs."""
        self._probing = True
        try:
            self.attach({})
            try:
                forward()
            finally:
                self.detach()
        finally:
            self._probing = False
        first: dict[tuple, str] = {}
        self.alias = {}
        for key, calls in self._calls.items():  # in order of first call: the first reader keeps the Gram
            sig = tuple(calls)
            if sig in first:
                self.alias[key] = first[sig]
            else:
                first[sig] = key
        return self.alias

    def check_sharing(self) -> None:
        """After a forward: every alias read exactly its target's inputs again."""
        for key, target in self.alias.items():
            if self._calls.get(key) != self._calls.get(target):
                raise InputError(f"{key} read the same input as {target} in the first forward pass but not in a "
                                 f"later one: their input Grams differ (use --gram-per-weight)")

    def _token(self, x: torch.Tensor) -> int:
        """The same number for the same input within one forward (see the module docstring)."""
        try:
            version = x._version
        except RuntimeError:  # inference tensors keep no version counter
            version = None
        hit = self._seen.get(id(x))
        if hit is not None and hit[0]() is x and hit[1] == version:
            return hit[2]
        geometry = None
        if x.device.type != "meta":
            try:
                ptr = x.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                ptr = 0
            if ptr:
                geometry = (ptr, x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device))
                hit = self._seen.get(geometry)
                if hit is not None and hit[0]() is not None and hit[1] == version:
                    self._seen[id(x)] = (weakref.ref(x), version, hit[2])
                    return hit[2]
        token = self._tokens = self._tokens + 1
        entry = (weakref.ref(x), version, token)
        self._seen[id(x)] = entry
        if geometry is not None:
            self._seen[geometry] = entry
        return token

    def attach(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self.leaves: list[torch.Tensor] = []  # outputs made to require a gradient (see _hook)
        self._calls, self._seen, self._tokens = {}, {}, 0
        for key, (mod, side, _) in self.layers.items():
            self.handles.append(mod.register_forward_hook(self._hook(key, side)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.leaves = []

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
        layout = self.layers[key][2]

        def hook(mod, args, out):
            if self.share_in:
                self._calls.setdefault(key, []).append((self._token(args[0]), side, layout))
                if self._probing:
                    return
            if self.want_in and key not in self.alias:
                x = args[0]
                self._add("gram_in", key, self._rows(x.reshape(*x.shape[:-1], x.shape[-1]), side, key))
            if self.want_out and key not in self.skip_out and torch.is_grad_enabled():
                if not out.requires_grad:  # frozen weights, an input that needs no gradient: start the graph
                    out.requires_grad_()
                    self.leaves.append(out)
                out.register_hook(lambda g: self._add("gram_out", key, self._rows(g, side, key)))
        return hook
