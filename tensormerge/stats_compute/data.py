"""Examples for `stats compute`: records read, checked and tokenized up front, then padded batches.

Why everything is checked before the first forward pass: a bad line found after an hour of
backward passes wastes the hour and leaves a half-written store; a token list per example is
small next to the model, so the whole (--max-examples) data set is read and validated first,
and every error names the file, the line (or row) and the field.

Label convention (Hugging Face): -100 marks a position without loss. A causal LM's labels are
aligned with its input_ids (the loss at position t predicts token t from tokens < t), so a
prompt/answer pair puts -100 under the prompt and the loss covers only the answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from tensormerge.errors import InputError

IGNORE = -100
TEXT_FIELDS = ("input", "target", "text")
TASKS = ("causal", "seq2seq", "classification")


@dataclass
class Example:
    """One example: input tokens, and the labels the loss is taken on (per token, or one class)."""

    input_ids: list[int]
    labels: list[int] | int
    where: str  # "FILE:LINE", for messages
    # multiple choice: (input_ids, labels) of every choice, the gold one among them (true Fisher samples one)
    choices: list[tuple[list[int], list[int]]] | None = None


@dataclass
class Batch:
    """Padded tensors of consecutive examples; `index` are their positions in the data set."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S] causal, [B, T] seq2seq, [B] classification
    index: list[int] = field(default_factory=list)
    choices: list | None = None  # per example: Example.choices (None: not multiple choice)

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.index,
                     self.choices)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


# ------------------------------------------------------------------------------ records
def _jsonl_records(path: str):
    """Each line's object. Lines are decoded one by one (a text-mode file raised its
    UnicodeDecodeError from the loop itself, naming no line), a UTF-8 byte-order mark before
    the first is allowed, and text a tokenizer cannot encode (an unpaired surrogate written as
    a JSON escape) is refused here, not as an internal error batches later."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line.rstrip("\r\n"))  # a column past the line's end, not "line 2 column 1"
                json.dumps(rec, ensure_ascii=False).encode("utf-8")
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise InputError(f"{path}:{n}: JSON nested too deeply") from None
            except UnicodeEncodeError:
                raise InputError(f"{path}:{n}: a string holds an unpaired surrogate (a \\ud800-\\udfff escape), "
                                 "not text") from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{n}: expected a JSON object per line, got {type(rec).__name__}")
            yield f"{path}:{n}", rec


def load_saved_dataset(path: str, split: str | None):
    """A `datasets` save_to_disk directory's Dataset (of a DatasetDict, --split, else its "train"
    or only split) and its name in errors (`path[split]`); text and image data alike."""
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path}: reading a saved dataset needs the `datasets` package") from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several types for a directory that is not a dataset
        raise InputError(f"{path}: not a dataset saved with save_to_disk ({e.__class__.__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            split = "train" if "train" in ds else names[0] if len(names) == 1 else None
        if split not in ds:
            raise InputError(f"{path}: choose a split with --split (it holds {', '.join(names)})")
        ds, path = ds[split], f"{path}[{split}]"
    return ds, path


def _disk_records(path: str, split: str | None):
    """A `datasets` save_to_disk directory (a Dataset, or a DatasetDict and --split)."""
    ds, path = load_saved_dataset(path, split)
    for i, rec in enumerate(ds):
        yield f"{path} row {i}", dict(rec)


def is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_records(path: str, max_examples: int | None, split: str | None = None) -> list[tuple[str, dict]]:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such data file")
    if not os.path.isdir(path):
        _regular(path)
    it = _disk_records(path, split) if os.path.isdir(path) else _jsonl_records(path)
    out = []
    for where, rec in it:
        if max_examples is not None and len(out) >= max_examples:
            break
        out.append((where, rec))
    if not out:
        raise InputError(f"{path}: holds no examples (empty file)")
    return out


def _regular(path: str) -> None:
    """A FIFO, socket or device would block the read (or never end): refused before it is opened."""
    import stat

    if not stat.S_ISREG(os.stat(path).st_mode):
        raise InputError(f"{path}: is not a regular file (a pipe, socket or device); give the data as a file")


def data_fingerprint(path: str) -> str:
    """Content hash of the data (every file under a dataset directory): what --resume compares."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for p in files:
        _regular(p)
        h.update(os.path.relpath(p, path).encode() if p != path else b"")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ fields
def _ids(where: str, rec: dict, name: str, vocab: int | None) -> list[int]:
    v = rec[name]
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise InputError(f"{where}: field '{name}' must be a list of integers")
    bad = next((x for x in v if x != IGNORE and (x < 0 or (vocab is not None and x >= vocab))), None)
    if bad is not None and not (name == "labels" and bad == IGNORE):
        raise InputError(f"{where}: field '{name}' holds token id {bad}, outside the vocabulary [0, {vocab})")
    if name == "input_ids" and IGNORE in v:
        raise InputError(f"{where}: field 'input_ids' holds -100 (only labels may)")
    return v


def _require(where: str, rec: dict, names: tuple[str, ...], what: str) -> None:
    for n in names:
        if n not in rec or rec[n] is None:
            raise InputError(f"{where}: missing field '{n}' ({what})")


class Tokenize:
    """Text -> token ids with the model's tokenizer, loaded only when a record holds text."""

    def __init__(self, model_dirs: list[str], data: str):
        self.model_dirs, self.data, self._tok = model_dirs, data, None

    def tokenizer(self, field_name: str):
        if self._tok is None:
            from transformers import AutoTokenizer

            last = None
            for d in self.model_dirs:
                try:
                    self._tok = AutoTokenizer.from_pretrained(d)
                    break
                except Exception as e:  # no tokenizer files: transformers raises various types
                    last = e
            if self._tok is None:
                raise InputError(f"{self.model_dirs[0]}: no tokenizer, and {self.data} has text field "
                                 f"'{field_name}' (add tokenizer files or give input_ids/labels)"
                                 + (f" [{last.__class__.__name__}]" if last else "")) from None
        return self._tok

    def __call__(self, where: str, rec: dict, name: str, special: bool = True, keep: int | None = None,
                 side: str = "head") -> Ids:
        """The field's token ids. With `keep`, only the `keep` tokens at that side are needed:
        a text far longer than they can span is cut first (tokenizers hold ~100 bytes per token
        of the whole text, so one 12 MB line took 2 GB) to a piece that still gives more than
        `keep` + TOKEN_MARGIN tokens, whose `keep` tokens at that side are the whole text's (a
        tokenizer's choices reach only a few tokens past a cut). The caller takes its `keep`."""
        v = rec[name]
        if not isinstance(v, str):
            raise InputError(f"{where}: field '{name}' must be a string, not {type(v).__name__}")
        tk = self.tokenizer(name)
        chars = None if keep is None else max(CHARS_PER_TOKEN * (keep + TOKEN_MARGIN), MIN_CUT_CHARS)
        while chars is not None and len(v) > chars:
            ids = Ids(tk(v[:chars] if side == "head" else v[-chars:], add_special_tokens=special)["input_ids"])
            if len(ids) > keep + TOKEN_MARGIN:
                ids.cut = True
                return ids
            chars *= 4  # long tokens (runs of one character): a longer piece
        return Ids(tk(v, add_special_tokens=special)["input_ids"])


class Ids(list):
    """Token ids; `cut`: of a piece of the text (Tokenize with `keep`), so more than `keep` but
    not the whole text's count."""

    cut = False

    def shown(self) -> str:
        """The count for a message: "N", or "over N" for a piece."""
        return f"over {len(self)}" if self.cut else str(len(self))


MIN_LENGTH = 2  # --max-length: a causal LM scores the tokens after the first
CHARS_PER_TOKEN = 16  # a piece of 16 characters per token wanted; longer when the text's tokens are longer
TOKEN_MARGIN = 64  # tokens beyond `keep` that a cut piece must still give
MIN_CUT_CHARS = 1 << 16  # texts shorter than this are tokenized whole


def _strip_mask(where: str, rec: dict, ids: list[int]) -> list[int]:
    """Pre-tokenized rows may come padded: positions whose attention_mask is 0 are dropped."""
    mask = rec.get("attention_mask")
    if mask is None:
        return ids
    if not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
        raise InputError(f"{where}: field 'attention_mask' must be a list of 0/1 as long as 'input_ids'")
    return [t for t, m in zip(ids, mask) if m]


def _fit_causal(where: str, ids: list[int], labels: list[int], max_length: int,
                name: str = "labels") -> tuple[list[int], list[int]]:
    """Keep the end of a too-long sequence: the scored tokens and as much context as fits."""
    scored = [i for i, x in enumerate(labels) if x != IGNORE]
    if scored and scored[-1] - scored[0] + 1 > max_length:
        raise InputError(f"{where}: field '{name}' has scored tokens spanning {scored[-1] - scored[0] + 1} tokens, "
                         f"more than --max-length {max_length}")
    if len(ids) > max_length:
        cut = min(len(ids) - max_length, scored[0] if scored else len(ids))
        ids, labels = ids[cut:cut + max_length], labels[cut:cut + max_length]
    return ids, labels


def _prompt_answer(where: str, rec: dict, task: str, tok: Tokenize, max_length: int, prompt_name: str,
                   answer_name: str, answer: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a prompt and its answer (the record's `answer_name`, or the text `answer`)."""
    answers = {answer_name: answer} if answer is not None else rec
    if task == "seq2seq":
        ids = tok(where, rec, prompt_name, keep=max_length)
        labels = tok(where, answers, answer_name, keep=max_length)
        if len(labels) > max_length:
            raise InputError(f"{where}: field '{answer_name}' has {labels.shown()} tokens, more than --max-length "
                             f"{max_length}")
        return ids[:max_length], list(labels)
    prompt = tok(where, rec, prompt_name, keep=max_length, side="tail")  # its end, as much as fits
    ans = tok(where, answers, answer_name, special=False, keep=max_length)
    eos = getattr(tok.tokenizer(answer_name), "eos_token_id", None)
    if eos is not None and not ans.cut and (not ans or ans[-1] != eos):
        ans = Ids(ans + [eos])
    if len(ans) > max_length:
        raise InputError(f"{where}: field '{answer_name}' has {ans.shown()} tokens, more than --max-length "
                         f"{max_length}")
    prompt = prompt[max(0, len(prompt) + len(ans) - max_length):]
    return prompt + ans, [IGNORE] * len(prompt) + ans


def make_example(where: str, rec: dict, task: str, tok: Tokenize, max_length: int, vocab: int | None,
                 label2id: dict | None, num_labels: int | None, fields=None) -> Example:
    """One record -> Example; prompts and inputs are truncated to fit, labels never are."""
    from tensormerge.stats_compute import textdata

    f = fields or textdata.Fields()
    if "input_ids" not in rec and task != "causal" and rec.get(f.messages) is not None:
        raise InputError(f"{where}: field '{f.messages}' (chat data) needs a causal LM; the model is a "
                         f"{'seq2seq LM' if task == 'seq2seq' else 'sequence classifier'}")
    if task == "classification":
        if "input_ids" in rec:
            ids = _strip_mask(where, rec, _ids(where, rec, "input_ids", vocab))
        else:
            if rec.get(f.choices) is not None:
                raise InputError(f"{where}: field '{f.choices}' (multiple choice) needs a causal or seq2seq LM; the "
                                 f"model is a sequence classifier")
            name = f.text if f.text in rec else f.input
            _require(where, rec, (name,), f"the text to classify: '{f.text}' or '{f.input}', or 'input_ids'")
            ids = tok(where, rec, name, keep=max_length)
        key = f.label if f.label in rec or "label" in f.given else "labels" if "labels" in rec else f.label
        _require(where, rec, (key,), f"the class: '{f.label}'")
        lab = rec[key]
        if isinstance(lab, str) and label2id and lab in label2id:
            lab = label2id[lab]
        if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < (num_labels or 1 << 62):
            raise InputError(f"{where}: field '{key}' is {lab!r}, expected a class index in [0, {num_labels})")
        return Example(ids[:max_length], lab, where)

    if "input_ids" not in rec and rec.get(f.choices) is not None:
        texts = textdata.choice_texts(where, rec, f)
        gold = textdata.choice_index(where, rec, f, texts)
        options = [_prompt_answer(where, rec, task, tok, max_length, f.input, f.choices, answer=c) for c in texts]
        ids, labels = options[gold]
        return Example(ids, labels, where, choices=options)
    if "input_ids" not in rec and rec.get(f.prompt) is not None:
        _require(where, rec, (f.completion,), f"a prompt/completion example needs '{f.prompt}' and '{f.completion}'")
        return Example(*_prompt_answer(where, rec, task, tok, max_length, f.prompt, f.completion), where)

    if task == "seq2seq":
        if "input_ids" in rec:
            _require(where, rec, ("labels",), "the target tokens")
            ids = _strip_mask(where, rec, _ids(where, rec, "input_ids", vocab))
            labels = _ids(where, rec, "labels", vocab)
        else:
            _require(where, rec, (f.input, f.target), f"a seq2seq example needs '{f.input}' and '{f.target}'")
            ids, labels = tok(where, rec, f.input, keep=max_length), tok(where, rec, f.target, keep=max_length)
        if len(labels) > max_length:
            count = labels.shown() if isinstance(labels, Ids) else len(labels)
            raise InputError(f"{where}: field 'labels' has {count} tokens, more than --max-length {max_length}")
        labels = list(labels)
        if not any(x != IGNORE for x in labels):
            raise InputError(f"{where}: field 'labels' has no token to score (all -100 or empty)")
        return Example(ids[:max_length], labels, where)

    # causal LM
    if "input_ids" in rec:
        ids = _ids(where, rec, "input_ids", vocab)
        labels = _ids(where, rec, "labels", vocab) if rec.get("labels") is not None else list(ids)
        if len(labels) != len(ids):
            raise InputError(f"{where}: field 'labels' has {len(labels)} entries, 'input_ids' {len(ids)}; a causal LM's "
                             f"labels are aligned with its input_ids")
        mask = rec.get("attention_mask")
        if mask is not None:
            _strip_mask(where, rec, ids)
            labels = [lab for lab, m in zip(labels, mask) if m]
            ids = [t for t, m in zip(ids, mask) if m]
        ids, labels = _fit_causal(where, ids, labels, max_length)
    elif rec.get(f.messages) is not None:
        tk = tok.tokenizer(f.messages)
        if getattr(tk, "chat_template", None) is None:
            raise InputError(f"{tok.model_dirs[0]}: its tokenizer has no chat template, and {tok.data} has chat "
                             f"field '{f.messages}' (add a chat_template, or give input_ids/labels)")
        ids, labels = _fit_causal(where, *textdata.chat_tokens(tk, where, rec, f.messages), max_length, f.messages)
    elif f.text in rec and f.target not in rec:
        ids = tok(where, rec, f.text, keep=max_length)[:max_length]
        labels = list(ids)
    else:
        _require(where, rec, (f.input, f.target), f"a prompt/answer example needs '{f.input}' and '{f.target}'; "
                 f"plain LM data needs '{f.text}'")
        ids, labels = _prompt_answer(where, rec, task, tok, max_length, f.input, f.target)
    if not any(x != IGNORE for x in labels[1:]):
        raise InputError(f"{where}: no token to score (a causal LM scores labels after the first position)")
    return Example(ids, labels, where)


def load_examples(path: str, task: str, tok: Tokenize, *, max_length: int, max_examples: int | None,
                  vocab: int | None, label2id: dict | None = None, num_labels: int | None = None,
                  split: str | None = None, fields=None, records: list | None = None) -> list[Example]:
    """`records`: those read_records returned, when the caller checked them before loading the model."""
    if max_length < MIN_LENGTH:
        raise InputError(f"--max-length {max_length}: must be at least {MIN_LENGTH}")
    if records is None:
        records = read_records(path, max_examples, split)
    return [make_example(where, rec, task, tok, max_length, vocab, label2id, num_labels, fields)
            for where, rec in records]


# ------------------------------------------------------------------------------ batches
def _pad(seqs: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if side == "left" else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate(examples: list[Example], index: list[int], task: str, pad_id: int, side: str) -> Batch:
    """Pad to the longest example. Encoder inputs and decoder-only inputs follow `side`; seq2seq
    labels are always right-padded (the decoder reads them shifted, from its start token)."""
    ids = _pad([e.input_ids for e in examples], pad_id, side)
    mask = _pad([[1] * len(e.input_ids) for e in examples], 0, side)
    if task == "classification":
        labels = torch.tensor([e.labels for e in examples], dtype=torch.long)
    elif task == "seq2seq":
        labels = _pad([e.labels for e in examples], IGNORE, "right")
    else:
        labels = _pad([e.labels for e in examples], IGNORE, side)
    choices = [e.choices for e in examples] if any(e.choices is not None for e in examples) else None
    return Batch(ids, mask, labels, index, choices)


def batches(examples: list[Example], batch_size: int, task: str, pad_id: int, side: str, start: int = 0):
    for b0 in range(start, len(examples), batch_size):
        chunk = examples[b0:b0 + batch_size]
        yield collate(chunk, list(range(b0, b0 + len(chunk))), task, pad_id, side)
