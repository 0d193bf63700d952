"""A text field far longer than --max-length: `stats compute` tokenizes a piece of it, not the
whole (a tokenizer holds ~100 bytes per token of its whole input: one 12 MB line took 2 GB), and
the tokens kept are the whole text's, at the head (inputs, plain LM text) and at the tail (a
prompt before its answer), with byte-level BPE and with a unigram (SentencePiece-like) model."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tensormerge.stats_compute import data as D  # noqa: E402


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzéü"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(300)]
    return [rng.choice(vocab) for _ in range(n)]


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(_words(40, s)) for s in range(200)]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                                                unk_token="<unk>"))
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


class _Seen:
    """The tokenizer, recording the length of every text it was given."""

    def __init__(self, tk):
        self.tk, self.lengths = tk, []

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tk(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tk, name)


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tk(request):
    return _tokenizer(request.param)


TEXTS = {
    "words": lambda: " ".join(_words(60_000, 7)),  # ~330k characters
    "no spaces": lambda: "".join(_words(40_000, 8)),  # one word for a whitespace pre-tokenizer
    "one letter": lambda: "a" * 300_000,  # long tokens: the piece must grow
}


@pytest.mark.parametrize("text", list(TEXTS))
@pytest.mark.parametrize("keep", [16, 2048])
def test_the_kept_tokens_are_the_whole_texts(tk, text, keep):
    value = TEXTS[text]()
    full = list(tk(value)["input_ids"])
    assert len(full) > keep + D.TOKEN_MARGIN
    t = D.Tokenize(["unused"], "data.jsonl")
    t._tok = seen = _Seen(tk)
    head = t("data.jsonl:1", {"text": value}, "text", keep=keep)
    tail = t("data.jsonl:1", {"text": value}, "text", keep=keep, side="tail")
    assert head[:keep] == full[:keep] and tail[-keep:] == full[-keep:]
    assert head.cut and tail.cut and len(head) > keep and len(tail) > keep
    assert max(seen.lengths) < len(value)  # never the whole text


def test_short_texts_are_tokenized_whole(tk):
    value = " ".join(_words(3000, 9))
    t = D.Tokenize(["unused"], "data.jsonl")
    t._tok = seen = _Seen(tk)
    ids = t("data.jsonl:1", {"text": value}, "text", keep=16)
    assert ids == list(tk(value)["input_ids"]) and not ids.cut and seen.lengths == [len(value)]


def test_an_answer_past_max_length_is_refused_without_tokenizing_it_whole(tk):
    value = " ".join(_words(60_000, 10))
    t = D.Tokenize(["unused"], "data.jsonl")
    t._tok = seen = _Seen(tk)
    from tensormerge.errors import InputError

    with pytest.raises(InputError, match=r"data.jsonl:3: field 'completion' has over \d+ tokens, more than "
                                         r"--max-length 32"):
        D._prompt_answer("data.jsonl:3", {"prompt": "abc", "completion": value}, "causal", t, 32, "prompt",
                         "completion")
    assert max(seen.lengths) < len(value)
