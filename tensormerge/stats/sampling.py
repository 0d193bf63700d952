"""Labels sampled from the model for the true Fisher (`--fisher-type true`).

As the research code does (METHODS.md §4.2): a class drawn from the classifier's softmax, or a
whole output sequence drawn token by token (seq2seq: from the decoder start; causal LM: after the
prompt), used as the target. Outputs stop at EOS or at the gold answer's length, which bounds the
cost and keeps the token count of the example comparable to the empirical Fisher's.

Each example draws from its own generator seeded by (--seed, example index), so the sample of
an example does not depend on the batch it lands in or on a --resume.
"""

from __future__ import annotations

import torch

from tensormerge.stats.data import IGNORE, Batch


def _gen(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


def _draw(logits: torch.Tensor, g: torch.Generator) -> int:
    p = torch.softmax(logits.float().cpu(), dim=-1)
    return int(torch.multinomial(p, 1, generator=g))


@torch.no_grad()
def sample_labels(model: torch.nn.Module, task: str, batch: Batch, inputs, seed: int, max_length: int,
                  pad_id: int, side: str) -> Batch:
    if task == "classification":
        logits = model(**inputs(batch, additive=False)).logits
        labels = torch.tensor([_draw(logits[i], _gen(seed, j)) for i, j in enumerate(batch.index)],
                              dtype=torch.long, device=batch.labels.device)
        if hasattr(batch, "with_labels"):  # an image batch
            return batch.with_labels(labels)
        return Batch(batch.input_ids, batch.attention_mask, labels, batch.index)
    cfg = model.config
    eos = getattr(cfg, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    rows = []
    for i, j in enumerate(batch.index):
        g = _gen(seed, j)
        keep = batch.attention_mask[i].bool()
        ids = batch.input_ids[i][keep]
        gold = batch.labels[i][keep] if task == "causal" else batch.labels[i]
        scored = (gold != IGNORE).nonzero().flatten()
        n = int(scored.numel())
        if task == "seq2seq":
            start = cfg.decoder_start_token_id
            dec: list[int] = []
            for _ in range(n):
                d = torch.tensor([[start] + dec], device=ids.device)
                logits = model(input_ids=ids[None], decoder_input_ids=d).logits[0, -1]
                dec.append(_draw(logits, g))
                if dec[-1] in eos:
                    break
            rows.append((ids, dec))
        else:
            first = max(1, int(scored[0])) if n else 1
            prompt = ids[:first]
            out, seq = [], prompt.clone()
            for _ in range(min(n, max_length - first)):
                logits = model(input_ids=seq[None]).logits[0, -1]
                out.append(_draw(logits, g))
                seq = torch.cat([seq, seq.new_tensor([out[-1]])])
                if out[-1] in eos:
                    break
            rows.append((prompt, out))
    from tensormerge.stats.data import Example, collate

    if task == "seq2seq":
        exs = [Example(ids.tolist(), dec, "") for ids, dec in rows]
    else:
        exs = [Example(p.tolist() + o, [IGNORE] * len(p) + o, "") for p, o in rows]
    return collate(exs, batch.index, task, pad_id, side).to(batch.input_ids.device)
