"""Instruction, chat and multiple-choice records for `stats compute`, and the field-name mapping.

Why chat turns are found by rendering prefixes: a chat template is arbitrary Jinja, so the only
reliable way to know which tokens a turn produced is to render the conversation up to the turn
(with the generation prompt) and up to its end, and check that both token lists are prefixes of
the whole conversation's tokens; the tokens between them are the assistant's. Templates that
mark assistant text with `{% generation %}` are asked for their own mask instead. Templates
whose renderings are not token prefixes of each other (separators written only between turns,
a generation prompt unlike the turn's header) fall back to character spans: the turn's content
found after the text shared with the generation prompt, up to where the whole conversation stops
matching the rendering that ends with the turn. A turn that cannot be found is refused, not
guessed at.

Why multiple-choice examples carry every choice: the empirical Fisher scores the gold choice,
but the true Fisher draws a choice from the model's own scores over the choices (rank
classification, as the MaTS code does), so the alternatives must reach the sampler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tensormerge.errors import InputError, short

IGNORE = -100  # the same label-without-loss value as data.IGNORE
# the roles of transformers' chat templates (OpenAI's, Llama 3's ipython, the older function)
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")
FIELD_FLAGS = {"input": "--input-field", "target": "--target-field", "text": "--text-field", "label": "--label-field",
               "messages": "--messages-field", "prompt": "--prompt-field", "completion": "--completion-field",
               "choices": "--choices-field"}


@dataclass
class Fields:
    """Record field names; `given` are those the user named with a --*-field flag."""

    input: str = "input"
    target: str = "target"
    text: str = "text"
    label: str = "label"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    choices: str = "choices"
    given: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_flags(cls, **names: str | None) -> Fields:
        given = {k: v for k, v in names.items() if v is not None}
        for k, v in given.items():
            if k not in FIELD_FLAGS:
                raise InputError(f"unknown field role {k!r}")
            if not isinstance(v, str) or not v:
                raise InputError(f"{FIELD_FLAGS[k]} {v!r}: must be a field name")
        return cls(**given, given=tuple(given))


def check_fields(records: list[tuple[str, dict]], fields: Fields) -> None:
    """Before the model loads: every record holds each field named by a flag, and some known format."""
    for where, rec in records:
        for role in fields.given:
            name = getattr(fields, role)
            if name not in rec or rec[name] is None:
                raise InputError(f"{where}: missing field '{name}' (given with {FIELD_FLAGS[role]})")
        if "input_ids" in rec or "image" in rec:  # tokens need no text field; image records are checked by their reader
            continue
        known = (fields.messages, fields.choices, fields.prompt, fields.input, fields.text)
        if not any(rec.get(n) is not None for n in known):
            null = next((n for n in known if n in rec), None)
            if null is not None:
                raise InputError(f"{where}: field '{null}' is null")
            have = ", ".join(repr(k) for k in list(rec)[:6]) or "none"
            raise InputError(f"{where}: missing field '{fields.input}' (no known format: expected input_ids, "
                             f"'{fields.messages}', '{fields.prompt}'+'{fields.completion}', "
                             f"'{fields.input}'+'{fields.target}', '{fields.text}' or '{fields.choices}'; "
                             f"the record has {have}; name yours with --input-field, --messages-field, ...)")


# ------------------------------------------------------------------------------ chat
def _messages(where: str, rec: dict, name: str) -> list[dict]:
    msgs = rec[name]
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: field '{name}' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InputError(f"{where}: field '{name}' item {i} must be an object with a string 'role' and a "
                             f"'content'")
        # a misspelt role ("asistant", "User") is a turn never scored; a template writes a None,
        # number or list content as its Python text ("None", "[{'type': ...}]"): both silently
        # change the statistics, so both are refused
        if m["role"] not in ROLES:
            raise InputError(f"{where}: field '{name}' item {i} role {short(m['role'])} is not one of "
                             f"{', '.join(ROLES)} (only 'assistant' turns are scored)")
        content = m["content"]
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise InputError(f"{where}: field '{name}' item {i} content is {type(content).__name__} "
                             f"{short(content)}, expected text (the template would write it as Python text)")
    if not any(m["role"] == "assistant" for m in msgs):
        raise InputError(f"{where}: field '{name}' has no assistant turn (nothing to score)")
    return msgs


def _render(tok, where: str, name: str, msgs: list[dict], **kw):
    try:
        return tok.apply_chat_template(msgs, **kw)
    except Exception as e:  # jinja2 TemplateError, raise_exception() in templates, ...
        msg = " ".join(str(e).split())[:200]
        raise InputError(f"{where}: the chat template fails on field '{name}' ({e.__class__.__name__}: {msg})") \
            from None


def _encode(tok, text: str) -> list[int]:
    # a template writes its own special tokens (BOS, turn markers): none are added
    return list(tok(text, add_special_tokens=False)["input_ids"])


def chat_tokens(tok, where: str, rec: dict, name: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation: labels are the tokens of the assistant turns, -100 elsewhere."""
    msgs = _messages(where, rec, name)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if _GENERATION.search(template or "") and getattr(tok, "is_fast", False):
        out = _render(tok, where, name, msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        labels = [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])]
        if any(x != IGNORE for x in labels):
            return ids, labels
    full = _render(tok, where, name, msgs, tokenize=False)
    ids = _encode(tok, full)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _encode(tok, _render(tok, where, name, msgs[:i], tokenize=False, add_generation_prompt=True)) \
            if i else []
        upto = _encode(tok, _render(tok, where, name, msgs[:i + 1], tokenize=False))
        if ids[:len(before)] != before or ids[:len(upto)] != upto or len(upto) <= len(before):
            return _chat_by_characters(tok, where, name, msgs, full)
        labels[len(before):len(upto)] = ids[len(before):len(upto)]
    return ids, labels


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_by_characters(tok, where: str, name: str, msgs: list[dict], full: str) -> tuple[list[int], list[int]]:
    """For templates whose prefixes are not token prefixes (separators only between turns, a
    generation prompt that differs from the turn's header): each assistant turn starts where its
    content appears after the text it shares with the generation prompt, and ends where the
    conversation stops matching the rendering that ends with that turn; the tokens overlapping
    that character span are scored."""
    if not getattr(tok, "is_fast", False):
        raise InputError(f"{where}: field '{name}': the chat template does not render the conversation turn by turn "
                         f"and the tokenizer has no character offsets, so the assistant tokens cannot be found; "
                         f"give input_ids/labels instead")
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        content = m["content"] if isinstance(m["content"], str) else ""
        lo = max(cursor, _common(_render(tok, where, name, msgs[:i], tokenize=False, add_generation_prompt=True), full)
                 if i else 0)
        start = full.find(content.strip(), lo) if content.strip() else lo
        if start < 0:
            raise InputError(f"{where}: field '{name}' turn {i}: the assistant's content does not appear in the "
                             f"rendered conversation, so its tokens cannot be found; give input_ids/labels instead")
        end = max(_common(_render(tok, where, name, msgs[:i + 1], tokenize=False), full), start + len(content.strip()))
        for t, (a, b) in enumerate(offsets):
            if a < end and b > start:
                labels[t] = ids[t]
        cursor = end
    if all(x == IGNORE for x in labels):
        raise InputError(f"{where}: field '{name}': the chat template renders no assistant token")
    return ids, labels


# ------------------------------------------------------------------------------ multiple choice
def choice_index(where: str, rec: dict, fields: Fields, choices: list) -> int:
    lab = rec.get(fields.label)
    if lab is None:
        raise InputError(f"{where}: missing field '{fields.label}' (the index of the right choice)")
    if isinstance(lab, str) and lab in choices:
        return choices.index(lab)
    if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(choices):
        raise InputError(f"{where}: field '{fields.label}' is {lab!r}, expected a choice index in "
                         f"[0, {len(choices)}) or one of the choices")
    return lab


def choice_texts(where: str, rec: dict, fields: Fields) -> list[str]:
    choices = rec[fields.choices]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise InputError(f"{where}: field '{fields.choices}' must be a list of at least two non-empty strings")
    if fields.input not in rec or rec[fields.input] is None:
        raise InputError(f"{where}: missing field '{fields.input}' (the question of a multiple-choice example)")
    return choices
