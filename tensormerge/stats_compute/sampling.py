"""Labels sampled from the model for the true Fisher (`--fisher-type true`).

As the research code does (METHODS.md §4.2): a class drawn from the classifier's softmax, or a
whole output sequence drawn token by token (seq2seq: from the decoder start; causal LM: after the
prompt), used as the target. Outputs stop at EOS or at the gold answer's length, which bounds the
cost and keeps the token count of the example comparable to the empirical Fisher's. A causal
example with several scored spans (the assistant turns of a chat) has each span drawn in turn,
after the gold tokens between spans and the spans drawn before it, so every drawn token is a
sample given exactly the context the gradient sees; the sequence ends with the last drawn span.
Multiple-choice examples draw one choice with probability proportional to exp(its score), the
score being the summed (or, `--choice-score mean`, averaged) log-likelihood of the choice's
tokens: rank classification, as MaTS's `sample_label` does.

Each example draws from its own generator seeded by (--seed, example index), so the sample of
an example does not depend on the batch it lands in or on a --resume.
"""

from __future__ import annotations

import torch

from tensormerge.stats_compute.data import IGNORE, Batch


def _gen(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


def _draw(logits: torch.Tensor, g: torch.Generator) -> int:
    p = torch.softmax(logits.float().cpu(), dim=-1)
    return int(torch.multinomial(p, 1, generator=g))


def choice_scores(model: torch.nn.Module, task: str, inputs, options: list, pad_id: int, side: str,
                  score: str) -> torch.Tensor:
    """[C] log-likelihood of each choice's scored tokens (summed, or averaged with score="mean")."""
    from tensormerge.stats_compute.data import Example, collate
    from tensormerge.stats_compute.losses import token_nll

    b = collate([Example(i, lab, "") for i, lab in options], list(range(len(options))), task, pad_id, side)
    b = b.to(next(model.parameters()).device)
    nll = token_nll(model(**inputs(b, additive=False)).logits, b.labels, task)
    if score == "mean":
        return -nll
    labels = b.labels[:, 1:] if task == "causal" else b.labels
    return -nll * (labels != IGNORE).sum(-1)


def _spans(scored: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of consecutive scored positions, as (start, end)."""
    out: list[tuple[int, int]] = []
    for p in scored.tolist():
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


@torch.no_grad()
def sample_labels(model: torch.nn.Module, task: str, batch: Batch, inputs, seed: int, max_length: int,
                  pad_id: int, side: str, choice_score: str = "sum") -> Batch:
    choices = getattr(batch, "choices", None)  # an image batch has none
    if choices is not None and any(c is not None for c in choices):
        return _sample_choices(model, task, batch, inputs, seed, pad_id, side, choice_score)
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
            seq, lab, end = ids[:0], [], 0
            for s, e in _spans(scored) or [(1, 1)]:
                first = max(1, s, end)
                seq = torch.cat([seq, ids[end:first]])
                lab += [IGNORE] * (first - end)
                for _ in range(min(e - s, max_length - len(seq))):
                    logits = model(input_ids=seq[None]).logits[0, -1]
                    lab.append(_draw(logits, g))
                    seq = torch.cat([seq, seq.new_tensor([lab[-1]])])
                    if lab[-1] in eos:
                        break
                end = e
            rows.append((seq, lab))
    from tensormerge.stats_compute.data import Example, collate

    if task == "seq2seq":
        exs = [Example(ids.tolist(), dec, "") for ids, dec in rows]
    else:
        exs = [Example(s.tolist(), lab, "") for s, lab in rows]
    return collate(exs, batch.index, task, pad_id, side).to(batch.input_ids.device)


def _sample_choices(model, task: str, batch: Batch, inputs, seed: int, pad_id: int, side: str, score: str) -> Batch:
    from tensormerge.stats_compute.data import Example, collate

    exs = []  # every example has choices: compute_stats refuses data that mixes them for the true Fisher
    for options, j in zip(batch.choices, batch.index):
        k = _draw(choice_scores(model, task, inputs, options, pad_id, side, score), _gen(seed, j))
        exs.append(Example(*options[k], ""))
    return collate(exs, batch.index, task, pad_id, side).to(batch.input_ids.device)
