"""Tiny transformers models and data sets for the `stats compute` tests, and the brute-force
statistics they are checked against: one example at a time, unpadded, plain autograd, Grams
from activations captured by hooks. Nothing here uses tensormerge's collection code."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

V = 64


def llama(tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=tie, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(cfg)


def t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=V, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg)


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=64, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def llama_classifier(seed: int = 0, num_labels: int = 3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, pad_token_id=0, num_labels=num_labels)
    return LlamaForSequenceClassification(cfg)


def class_records(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    return [{"input_ids": [r.randint(3, V - 1) for _ in range(r.randint(2, 8))], "label": r.randint(0, 2)}
            for _ in range(n)]


def save(model, path: Path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def causal_records(n: int, seed: int = 0, prompt: bool = True) -> list[dict]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        k = r.randint(3, 9)
        ids = [r.randint(3, V - 1) for _ in range(k)]
        p = r.randint(1, k - 2) if prompt else 0
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def seq2seq_records(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    return [{"input_ids": [r.randint(3, V - 1) for _ in range(r.randint(2, 8))],
             "labels": [r.randint(3, V - 1) for _ in range(r.randint(1, 6))]} for _ in range(n)]


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _loss(model, rec: dict, task: str) -> torch.Tensor:
    ids = torch.tensor([rec["input_ids"]])
    if task == "classification":
        return F.cross_entropy(model(input_ids=ids).logits, torch.tensor([rec["label"]]))
    labels = torch.tensor([rec["labels"]])
    if task == "seq2seq":
        logits = model(input_ids=ids, decoder_input_ids=model._shift_right(labels)).logits
        return F.cross_entropy(logits[0], labels[0], ignore_index=-100)
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)


def brute_force(model, records: list[dict], task: str, stored: set[str], vectors: bool = True) -> dict:
    """{kind: {name: tensor}} in float64, and the counts, from one example at a time."""
    model.eval()
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in stored:
            tied[id(p)] = name
    keyed = {n: tied[id(p)] for n, p in params.items() if id(p) in tied}
    fisher = {k: 0 for k in keyed.values()}
    blocks = {}
    gin, gout, rows = {}, {}, {}
    from transformers.pytorch_utils import Conv1D

    for rec in records:
        handles = []
        for mname, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, Conv1D)) and f"{mname}.weight" in stored:
                key = f"{mname}.weight"

                def fwd(m, args, out, key=key):
                    x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                    gin[key] = gin.get(key, 0) + x.T @ x
                    rows[key] = rows.get(key, 0) + x.shape[0]
                    out.register_hook(lambda g, key=key: gout.__setitem__(
                        key, gout.get(key, 0) + g.double().reshape(-1, g.shape[-1]).T @ g.double().reshape(-1, g.shape[-1])))
                handles.append(mod.register_forward_hook(fwd))
        loss = _loss(model, rec, task)
        names = list(keyed)
        grads = torch.autograd.grad(-loss, [params[n] for n in names], allow_unused=True)
        for h in handles:
            h.remove()
        for n, g in zip(names, grads):
            g = torch.zeros_like(params[n]) if g is None else g
            g = g.double()
            fisher[keyed[n]] = fisher[keyed[n]] + g ** 2
            if vectors and g.dim() == 1:
                blocks[keyed[n]] = blocks.get(keyed[n], 0) + torch.outer(g, g)
    n = len(records)
    return {"fisher": {k: v / n for k, v in fisher.items()},
            "fisher_block": {k: v / n for k, v in blocks.items()},
            "gram_in": {k: v / rows[k] for k, v in gin.items()},
            "gram_out": {k: v / rows[k] for k, v in gout.items()},
            "rows": rows}


def read_store(path: str) -> dict:
    from tensormerge.stats.store import StatsStore

    s = StatsStore(path)
    out = {kind: {name: s.read(kind, name).double() for name in arrays} for kind, arrays in s.arrays.items()}
    out["counts"] = {kind: {name: info.attrs.get("count") for name, info in arrays.items()}
                     for kind, arrays in s.arrays.items()}
    out["attrs"] = s.attrs
    return out
