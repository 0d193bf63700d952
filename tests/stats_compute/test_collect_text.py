"""`stats compute` on instruction, chat and multiple-choice data: chat conversations give the
statistics of the same examples written out as input_ids/labels by this test (loss on the
assistant turns only), prompt/completion and --*-field mappings give those of input/target, a
multiple-choice example's empirical Fisher is its gold answer's and its true Fisher draws a
choice by the model's scores (rank classification); bad records are refused before the model loads."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from tensormerge.errors import InputError  # noqa: E402
from tensormerge.stats_compute.collect import ComputeOptions, compute_stats  # noqa: E402
from tests.helpers import assert_clean_error  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402
from tests.stats_compute.test_collect import _assert_matches, _stored  # noqa: E402
from tests.stats_compute.test_collect_cli import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]
WORDS = SPECIAL + ROLES + [f"w{i}" for i in range(cm.V - len(SPECIAL) - len(ROLES))]
ID = {w: i for i, w in enumerate(WORDS)}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
# the same text, with the assistant's content (not its <|im_end|>) marked for the template's own mask
GENERATION = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }} {% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
              "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")

CHATS = [
    [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"},
     {"role": "assistant", "content": "w6 w7"}],
    [{"role": "user", "content": "w8"}, {"role": "assistant", "content": "w9 w10 w11"},
     {"role": "user", "content": "w12 w13"}, {"role": "assistant", "content": "w14"}],
    [{"role": "user", "content": "w15 w16 w17 w18"}, {"role": "assistant", "content": "w19"}],
    [{"role": "system", "content": "w20"}, {"role": "user", "content": "w21"},
     {"role": "assistant", "content": "w22 w23 w24 w25"}, {"role": "user", "content": "w26"},
     {"role": "assistant", "content": "w27 w28"}],
]


def chat_tokenizer(path, template: str | None = TEMPLATE):
    """A word-level tokenizer with ChatML-like turn markers and a chat template, saved beside a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(path))
    return fast


def written_out(msgs: list[dict]) -> dict:
    """The conversation as input_ids/labels, by hand: <s>, then per turn <|im_start|> ROLE CONTENT <|im_end|>;
    scored: each assistant turn's content and its <|im_end|>."""
    ids, labels = [ID["<s>"]], [-100]
    for m in msgs:
        head = [ID["<|im_start|>"], ID[m["role"]]]
        body = [ID[w] for w in m["content"].split()] + [ID["<|im_end|>"]]
        ids += head + body
        labels += [-100] * len(head) + (body if m["role"] == "assistant" else [-100] * len(body))
    return {"input_ids": ids, "labels": labels}


@pytest.fixture(scope="module")
def llama_chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = cm.save(cm.llama(seed=4), root / "llama")
    chat_tokenizer(root / "llama")
    return root, model


def _run(out, model, data, **kw) -> dict:
    opts = dict(model=model, data=str(data), kind="all", output=str(out), quiet=True, batch_size=3,
                padding_side="left", overwrite=True)
    opts.update(kw)
    compute_stats(ComputeOptions(**opts))
    return cm.read_store(str(out))


def _equal(a: dict, b: dict, kinds=("fisher", "gram_in", "gram_out", "fisher_block")) -> None:
    for kind in kinds:
        assert set(a[kind]) == set(b[kind]) and a[kind], kind
        for k in a[kind]:
            assert torch.equal(a[kind][k], b[kind][k]), f"{kind}/{k}"


# ------------------------------------------------------------------------------ chat
def test_chat_statistics_equal_written_out_input_ids_and_brute_force(llama_chat, tmp_path):
    root, model = llama_chat
    chat = cm.write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    pre_recs = [written_out(m) for m in CHATS]
    pre = cm.write_jsonl(tmp_path / "pre.jsonl", pre_recs)
    a, b = _run(tmp_path / "chat.zarr", model, chat), _run(tmp_path / "pre.zarr", model, pre)
    _equal(a, b)
    # and both are the one-example-at-a-time autograd statistics of the written-out examples
    _assert_matches(a, cm.brute_force(cm.llama(seed=4), pre_recs, "causal", _stored(model)))
    assert a["counts"]["fisher"]["model.layers.0.mlp.up_proj.weight"] == len(CHATS)


def test_chat_loss_is_on_assistant_tokens_only(llama_chat, tmp_path):
    """Conversations ending in a user turn: a causal LM's scored positions never see that turn, so
    changing one of its tokens changes no gradient unless the loss scores it; changing a token of the
    last assistant turn must change them."""
    root, model = llama_chat
    base = [m + [{"role": "user", "content": "w30 w31 w32"}] for m in CHATS]

    def flipped(turn: int, word: str) -> list:
        out = json.loads(json.dumps(base))
        for conv in out:
            conv[turn]["content"] = " ".join([word] + conv[turn]["content"].split()[1:])
        return out

    def run(name, convs):
        data = cm.write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": m} for m in convs])
        return _run(tmp_path / f"{name}.zarr", model, data)

    ref = run("ref", base)
    user = run("user", flipped(-1, "w40"))
    assistant = run("assistant", flipped(-2, "w41"))
    _equal(ref, user, kinds=("fisher", "gram_out", "fisher_block"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ref["gram_in"][name], user["gram_in"][name])  # the flip reached the model
    for kind in ("fisher", "gram_out"):
        assert not torch.allclose(ref[kind][name], assistant[kind][name], rtol=1e-3, atol=0), kind


def test_generation_template_mask_is_honoured(tmp_path):
    """A template with {% generation %} marks the assistant tokens itself: here the content without
    its <|im_end|>, where the turn-by-turn rendering scores <|im_end|> too."""
    from tensormerge.stats_compute.textdata import chat_tokens

    plain, gen = chat_tokenizer(tmp_path / "a"), chat_tokenizer(tmp_path / "b", GENERATION)
    for msgs in CHATS:
        want = written_out(msgs)
        ids, labels = chat_tokens(plain, "x:1", {"messages": msgs}, "messages")
        assert (ids, labels) == (want["input_ids"], want["labels"])
        gids, glabels = chat_tokens(gen, "x:1", {"messages": msgs}, "messages")
        assert gids == ids
        assert glabels == [-100 if t == ID["<|im_end|>"] else x for t, x in zip(ids, labels)]


# common templates, written here: ChatML (Qwen), Llama 3 and Mistral style, and an Alpaca-style one whose turns
# are separated only between messages (a prefix of it is not a prefix of the whole)
REAL_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
               ["Hello!<|im_end|>\n", "4<|im_end|>\n"]),
    "llama3": ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
               "m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
               ["Hello!<|eot_id|>", "4<|eot_id|>"]),
    "mistral": ("{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
                "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
                "{{- bos_token }}{%- for m in loop_messages %}{%- if m['role'] == 'user' %}"
                "{%- if loop.first and sys is defined %}{{- ' [INST] ' + sys + '\\n\\n' + m['content'] + ' [/INST]' }}"
                "{%- else %}{{- ' [INST] ' + m['content'] + ' [/INST]' }}{%- endif %}"
                "{%- else %}{{- ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}",
                [" Hello!</s>", " 4</s>"]),
    "alpaca": ("{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] | trim }}"
               "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] | trim }}{% else %}"
               "{{ m['content'] }}{% endif %}{% if not loop.last %}\n\n{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}### Response:\n{% endif %}",
               ["Hello!", "4"]),
}


@pytest.mark.parametrize("name", list(REAL_TEMPLATES))
def test_assistant_turns_of_common_templates(name):
    """Byte-level tokens (one per byte, so they decode back exactly): the scored tokens are each
    assistant turn's content and whatever closes the turn, nothing of the other turns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tensormerge.stats_compute.textdata import chat_tokens

    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template, want = REAL_TEMPLATES[name]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, labels = chat_tokens(fast, "x:1", {"messages": msgs}, "messages")
    assert fast.decode(ids) == fast.apply_chat_template(msgs, tokenize=False)
    spans, run = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t
            run.append(t)
        elif run:
            spans, run = spans + [fast.decode(run)], []
    spans += [fast.decode(run)] if run else []
    assert spans == want


def test_messages_field_mapping(llama_chat, tmp_path):
    root, model = llama_chat
    a = _run(tmp_path / "a.zarr", model, cm.write_jsonl(tmp_path / "a.jsonl", [{"messages": m} for m in CHATS]))
    b = _run(tmp_path / "b.zarr", model, cm.write_jsonl(tmp_path / "b.jsonl", [{"conv": m, "messages": 3}
                                                                              for m in CHATS]),
             messages_field="conv")
    _equal(a, b)


def test_multi_turn_true_fisher_draws_each_assistant_turn_in_place(llama_chat):
    """The sampled sequence keeps the gold tokens before and between the assistant turns, draws each
    turn's tokens (at most the gold turn's length), and scores only the drawn tokens."""
    from tensormerge.stats_compute.data import Example, collate
    from tensormerge.stats_compute.losses import Inputs
    from tensormerge.stats_compute.sampling import sample_labels

    model = cm.llama(seed=4).eval()
    model.config.eos_token_id = None  # draw every turn to its full length
    rec = written_out(CHATS[3])
    ids, labels = rec["input_ids"], rec["labels"]
    batch = collate([Example(ids, labels, "")], [0], "causal", 0, "left")
    out = sample_labels(model, "causal", batch, Inputs(model, "causal", torch.float32), 5, 64, 0, "left")
    got_ids, got_labels = out.input_ids[0].tolist(), out.labels[0].tolist()
    assert len(got_ids) == len(ids)
    gold = [i for i, x in enumerate(labels) if x == -100]
    assert [got_ids[i] for i in gold] == [ids[i] for i in gold]
    assert all(got_labels[i] == -100 for i in gold)
    scored = [i for i, x in enumerate(labels) if x != -100]
    assert [got_labels[i] for i in scored] == [got_ids[i] for i in scored]
    assert [got_ids[i] for i in scored] != [ids[i] for i in scored]  # drawn, not copied (64-word vocabulary)


# ------------------------------------------------------------------------------ instruction data, field names
def test_prompt_completion_and_mapped_fields_equal_input_target(llama_chat, tmp_path):
    root, model = llama_chat
    pairs = [("w1 w2 w3", "w4 w5"), ("w6", "w7 w8 w9"), ("w10 w11", "w12")]
    recs = {"it": [{"input": p, "target": c} for p, c in pairs],
            "pc": [{"prompt": p, "completion": c} for p, c in pairs],
            "qa": [{"question": p, "answer": c, "input": "w50"} for p, c in pairs]}
    flags = {"it": {}, "pc": {}, "qa": {"input_field": "question", "target_field": "answer"}}
    got = {k: _run(tmp_path / f"{k}.zarr", model, cm.write_jsonl(tmp_path / f"{k}.jsonl", r), **flags[k])
           for k, r in recs.items()}
    # written out by hand: <s> prompt, then the answer and </s> scored
    pre = [{"input_ids": [1] + [ID[w] for w in p.split()] + [ID[w] for w in c.split()] + [2],
            "labels": [-100] * (1 + len(p.split())) + [ID[w] for w in c.split()] + [2]} for p, c in pairs]
    got["pre"] = _run(tmp_path / "pre.zarr", model, cm.write_jsonl(tmp_path / "pre.jsonl", pre))
    for k in ("pc", "qa", "pre"):
        _equal(got["it"], got[k])


def test_text_and_label_fields_for_a_classifier(tmp_path):
    model = cm.save(cm.llama_classifier(seed=2), tmp_path / "cls")
    chat_tokenizer(tmp_path / "cls")
    rows = [("w1 w2", 0), ("w3", 2), ("w4 w5 w6", 1)]
    a = _run(tmp_path / "a.zarr", model, cm.write_jsonl(tmp_path / "a.jsonl", [{"text": t, "label": y}
                                                                              for t, y in rows]))
    b = _run(tmp_path / "b.zarr", model, cm.write_jsonl(tmp_path / "b.jsonl", [{"sentence": t, "y": y, "label": 9}
                                                                              for t, y in rows]),
             text_field="sentence", label_field="y")
    _equal(a, b)


# ------------------------------------------------------------------------------ multiple choice
MC = [{"input": "w1 w2 w3", "choices": ["w4", "w5 w6", "w7 w8 w9"], "label": 1},
      {"input": "w10", "choices": ["w11 w12", "w13"], "label": "w13"},
      {"input": "w14 w15", "choices": ["w16", "w17", "w18 w19"], "label": 0},
      {"input": "w20 w21 w22", "choices": ["w23 w24", "w25"], "label": 0}]


def _mc_written_out(rec: dict, k: int, task: str) -> dict:
    prompt = [ID[w] for w in rec["input"].split()]
    answer = [ID[w] for w in rec["choices"][k].split()]
    if task == "seq2seq":
        return {"input_ids": [1] + prompt, "labels": [1] + answer}
    return {"input_ids": [1] + prompt + answer + [2], "labels": [-100] * (1 + len(prompt)) + answer + [2]}


def _gold(rec: dict) -> int:
    return rec["choices"].index(rec["label"]) if isinstance(rec["label"], str) else rec["label"]


def _scores(model, rec: dict, task: str, mean: bool = False) -> torch.Tensor:
    """Each choice's log-likelihood, float64, one unpadded example at a time."""
    out = []
    for k in range(len(rec["choices"])):
        ex = _mc_written_out(rec, k, task)
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"])
        with torch.no_grad():
            if task == "seq2seq":
                logits = model(input_ids=ids, decoder_input_ids=model._shift_right(labels[None])).logits[0]
            else:
                logits, labels = model(input_ids=ids).logits[0, :-1], labels[1:]
        lp = torch.log_softmax(logits.double(), -1)
        keep = labels != -100
        s = lp[keep].gather(-1, labels[keep][:, None]).sum()
        out.append(s / keep.sum() if mean else s)
    return torch.stack(out)


MODELS = {"causal": lambda: cm.llama(seed=6), "seq2seq": lambda: cm.t5(seed=6)}


@pytest.mark.parametrize("task", list(MODELS))
def test_multiple_choice_empirical_fisher_is_the_gold_answers(tmp_path, task):
    model = cm.save(MODELS[task](), tmp_path / "m")
    chat_tokenizer(tmp_path / "m")
    mc = _run(tmp_path / "mc.zarr", model, cm.write_jsonl(tmp_path / "mc.jsonl", MC))
    pre_recs = [_mc_written_out(r, _gold(r), task) for r in MC]
    pre = _run(tmp_path / "pre.zarr", model, cm.write_jsonl(tmp_path / "pre.jsonl", pre_recs))
    _equal(mc, pre)


@pytest.mark.parametrize("score", ["sum", "mean"])
def test_choice_draws_follow_the_models_choice_scores(tmp_path, score):
    """Rank classification: the sampler's scores are the choices' log-likelihoods, and over many
    seeds each choice is drawn with probability softmax(scores)."""
    from tensormerge.stats_compute.data import Tokenize, collate, make_example
    from tensormerge.stats_compute.losses import Inputs
    from tensormerge.stats_compute.sampling import choice_scores, sample_labels

    model = cm.llama(seed=6).eval()
    cm.save(model, tmp_path / "m")
    chat_tokenizer(tmp_path / "m")
    rec = MC[0]
    ex = make_example("x:1", rec, "causal", Tokenize([str(tmp_path / "m")], "x"), 64, cm.V, None, None)
    inputs = Inputs(model, "causal", torch.float32)
    want = _scores(model, rec, "causal", mean=score == "mean")
    with torch.no_grad():
        got = choice_scores(model, "causal", inputs, ex.choices, 0, "left", score)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    p = torch.softmax(want, -1)
    n = 400
    counts = torch.zeros(len(rec["choices"]))
    answers = [tuple(lab) for _, lab in ex.choices]
    for seed in range(n):
        b = sample_labels(model, "causal", collate([ex], [0], "causal", 0, "left"), inputs, seed, 64, 0, "left",
                          score)
        counts[answers.index(tuple(b.labels[0][b.attention_mask[0].bool()].tolist()))] += 1
    sigma = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() <= 4 * sigma + 1e-3).all(), (counts / n, p)


@pytest.mark.parametrize("task", list(MODELS))
def test_true_fisher_on_multiple_choice_is_the_fisher_of_the_drawn_choices(tmp_path, task):
    """Each example's drawn choice, from its own generator seeded by (seed, index) over softmax of the
    choice scores computed here, and the store equals brute force on those choices."""
    make = MODELS[task]
    model = cm.save(make(), tmp_path / "m")
    chat_tokenizer(tmp_path / "m")
    seed = 11
    got = _run(tmp_path / "t.zarr", model, cm.write_jsonl(tmp_path / "mc.jsonl", MC), kind="fisher",
               fisher_type="true", seed=seed, batch_size=2)
    ref_model = make().eval()
    drawn = []
    for j, rec in enumerate(MC):
        g = torch.Generator().manual_seed((seed * 1_000_003 + j) % (2**63))
        k = int(torch.multinomial(torch.softmax(_scores(ref_model, rec, task).float(), -1), 1, generator=g))
        drawn.append(_mc_written_out(rec, k, task))
    assert got["attrs"]["fisher_type"] == "true"
    _assert_matches(got, cm.brute_force(make(), drawn, task, _stored(model)), kinds=("fisher",))


# ------------------------------------------------------------------------------ bad input
def test_tokenizer_without_chat_template_is_one_line(tmp_path):
    model = cm.save(cm.llama(), tmp_path / "plain")
    chat_tokenizer(tmp_path / "plain", template=None)
    data = cm.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}])
    out = tmp_path / "S.zarr"
    res = cli(["stats", "compute", "--model", model, "--data", data, "--kind", "fisher", "--output", out])
    assert_clean_error(res, str(tmp_path / "plain"), "chat template", "'messages'", out_dir=out)


BAD = {
    # field given by a flag, absent from line 2: refused before the model is even looked at
    "mapped-field": ('{"conv": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}\n'
                     '{"messages": []}\n', ["--messages-field", "conv"],
                     ["data.jsonl:2", "'conv'", "--messages-field"]),
    "mapped-input": ('{"q": "w1", "target": "w2"}\n{"question": "w1", "target": "w2"}\n', ["--input-field", "q"],
                     ["data.jsonl:2", "'q'"]),
    "no-known-field": ('{"question": "w1", "answer": "w2"}\n', [], ["data.jsonl:1", "'input'", "'question'"]),
    "null-text": ('{"text": "w1"}\n{"text": null}\n', [], ["data.jsonl:2", "field 'text' is null"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_record_without_its_field_is_refused_before_the_model_loads(tmp_path, case):
    text, flags, needles = BAD[case]
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    out = tmp_path / "S.zarr"
    broken = tmp_path / "model"  # no config, no weights: loading it would be an error of its own
    broken.mkdir()
    res = cli(["stats", "compute", "--model", broken, "--data", data, "--kind", "all", "--output", out, *flags])
    assert_clean_error(res, *needles, out_dir=out)


CHAT_BAD = {
    "no-assistant": ({"messages": [{"role": "user", "content": "w1"}]}, ["data.jsonl:2", "'messages'", "assistant"]),
    "not-a-list": ({"messages": "w1 w2"}, ["data.jsonl:2", "'messages'"]),
    "no-role": ({"messages": [{"content": "w1"}, {"role": "assistant", "content": "w2"}]},
                ["data.jsonl:2", "'messages'", "item 0"]),
    "bad-choices": ({"input": "w1", "choices": ["w2"], "label": 0}, ["data.jsonl:2", "'choices'"]),
    "bad-choice-label": ({"input": "w1", "choices": ["w2", "w3"], "label": 2}, ["data.jsonl:2", "'label'"]),
    "choices-no-input": ({"choices": ["w2", "w3"], "label": 0}, ["data.jsonl:2", "'input'"]),
    "prompt-no-completion": ({"prompt": "w1"}, ["data.jsonl:2", "'completion'"]),
}


@pytest.mark.parametrize("case", list(CHAT_BAD))
def test_bad_chat_and_choice_records_are_one_line_errors(llama_chat, tmp_path, case):
    _, model = llama_chat
    rec, needles = CHAT_BAD[case]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + json.dumps(rec) + "\n")
    out = tmp_path / "S.zarr"
    res = cli(["stats", "compute", "--model", model, "--data", data, "--kind", "all", "--output", out])
    assert_clean_error(res, *needles, out_dir=out)


def test_true_fisher_refuses_multiple_choice_mixed_with_other_records(llama_chat, tmp_path):
    _, model = llama_chat
    data = cm.write_jsonl(tmp_path / "d.jsonl", [MC[0], {"messages": CHATS[0]}])
    with pytest.raises(InputError, match="d.jsonl:2: not multiple choice"):
        _run(tmp_path / "S.zarr", model, data, kind="fisher", fisher_type="true")
    assert not (tmp_path / "S.zarr").exists()


def test_chat_data_for_a_seq2seq_model_is_refused(tmp_path):
    model = cm.save(cm.t5(), tmp_path / "t5")
    chat_tokenizer(tmp_path / "t5")
    data = cm.write_jsonl(tmp_path / "d.jsonl", [{"messages": CHATS[0]}])
    with pytest.raises(InputError, match="d.jsonl:1: field 'messages' .*needs a causal LM"):
        _run(tmp_path / "S.zarr", model, data)


TURN_BAD = {
    "misspelt-role": ({"role": "asistant", "content": "w2"}, "item 1 role 'asistant' is not one of"),
    "capitalised-role": ({"role": "User", "content": "w2"}, "item 1 role 'User'"),
    "null-content": ({"role": "user", "content": None}, "item 1 content is NoneType None"),
    "number-content": ({"role": "user", "content": 5}, "item 1 content is int 5"),
    "parts-content": ({"role": "user", "content": [{"type": "text", "text": "w2"}]}, "item 1 content is list"),
}


@pytest.mark.parametrize("case", list(TURN_BAD))
def test_chat_turn_with_a_wrong_role_or_non_text_content_is_refused(llama_chat, tmp_path, case):
    """Each of these ran to a store without a word: a misspelt role is a turn never scored, and
    the template wrote None, 5 or a list of parts as the Python text 'None', '5', "[{'type'..."."""
    _, model = llama_chat
    turn, needle = TURN_BAD[case]
    msgs = [{"role": "user", "content": "w1"}, turn, {"role": "assistant", "content": "w3"}]
    data = cm.write_jsonl(tmp_path / "d.jsonl", [{"messages": CHATS[0]}, {"messages": msgs}])
    out = tmp_path / "S.zarr"
    with pytest.raises(InputError) as e:
        _run(out, model, data)
    assert str(e.value).startswith(f"{data}:2: field 'messages' ") and needle in str(e.value), str(e.value)
    assert not out.exists()


def test_tool_call_turn_without_content_is_allowed(llama_chat, tmp_path):
    """An assistant turn that only calls a tool has content None beside its tool_calls (OpenAI's
    form): not refused with the Nones above."""
    _, model = llama_chat
    msgs = [{"role": "user", "content": "w1"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
            {"role": "tool", "content": "w2"}, {"role": "assistant", "content": "w3"}]
    data = cm.write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    _run(tmp_path / "S.zarr", model, data, kind="fisher")
