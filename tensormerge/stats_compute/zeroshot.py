"""CLIP as a zero-shot classifier: the logits of an image are the scaled cosine similarities of
its embedding with the text embeddings of one prompt per class ("a photo of a {}."), as the CLIP
merging literature evaluates (and fine-tunes) its vision encoders.

Why a module of CLIPModel's own parts under their own attribute names: the parameter names stay
those of the checkpoint (`vision_model.encoder.layers.0...`), so statistics are keyed as `run`
reads them, and torch.func can run it like any model.

Why the prompts run once per image when the text tower is measured: each image's loss then has
its own copy of the text activations, so the output-gradient Gram of a text layer and its Fisher
hold per-image gradients (a shared text pass would hold their sum). With the vision tower alone
(the default) the text embeddings are constants, computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensormerge.errors import InputError, short

TOWERS = ("vision", "both")
DEFAULT_PROMPT = "a photo of a {}."


@dataclass
class Output:
    logits: torch.Tensor


class ZeroShotCLIP(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, text: bool):
        super().__init__()
        self.config = clip.config
        self.text_model, self.vision_model = clip.text_model, clip.vision_model
        self.visual_projection, self.text_projection = clip.visual_projection, clip.text_projection
        self.logit_scale = clip.logit_scale
        self.text = text
        if text:
            self.register_buffer("prompt_ids", prompt_ids, persistent=False)
            self.register_buffer("prompt_mask", prompt_mask, persistent=False)
        else:
            self.prompt_mask = None
            with torch.no_grad():
                self.register_buffer("text_embeds", self._text(prompt_ids, prompt_mask), persistent=False)

    def _text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = self.text_projection(self.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        return t / t.norm(dim=-1, keepdim=True)

    def forward(self, pixel_values: torch.Tensor) -> Output:
        img = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        img = img / img.norm(dim=-1, keepdim=True)
        scale = self.logit_scale.exp()
        if not self.text:
            return Output(scale * img @ self.text_embeds.T)
        b, c = img.shape[0], self.prompt_ids.shape[0]
        txt = self._text(self.prompt_ids.repeat(b, 1), self.prompt_mask.repeat(b, 1)).view(b, c, -1)
        return Output(scale * torch.einsum("bd,bcd->bc", img, txt))


def _tokenizer(loaded):
    from transformers import AutoTokenizer

    last = None
    for d in loaded.tokenizer_dirs:
        try:
            return AutoTokenizer.from_pretrained(d)
        except Exception as e:  # no tokenizer files: transformers raises various types
            last = e
    raise InputError(f"{loaded.spec}: a zero-shot CLIPModel needs its tokenizer for the class prompts "
                     f"[{last.__class__.__name__ if last else ''}]")


def check_flags(opts, loaded) -> None:
    """--classes, --prompt and --clip-towers mean something only to a zero-shot CLIPModel; given
    for another model they were ignored without a word (the user believed them used)."""
    if getattr(loaded, "zero_shot", False):
        return
    given = [flag for flag, value, default in (("--classes", opts.classes, None),
                                               ("--prompt", opts.prompt, "a photo of a {}."),
                                               ("--clip-towers", opts.clip_towers, "vision")) if value != default]
    if given:
        what = "a classifier with its own labels" if loaded.modality == "image" else "not an image model"
        raise InputError(f"{given[0]}: is for a zero-shot CLIPModel; {opts.model} is {what}")


def make_zero_shot(loaded, classes: list[str], prompt: str, towers: str) -> None:
    """Replace loaded.model by the zero-shot classifier; freeze (and keep no statistics of) the
    text tower and the logit scale unless `towers` is 'both'."""
    if towers not in TOWERS:
        raise InputError(f"--clip-towers {towers!r}: expected one of {', '.join(TOWERS)}")
    if "{}" not in prompt:
        raise InputError(f"--prompt {prompt!r}: needs '{{}}' where the class name goes")
    tok = _tokenizer(loaded)
    enc = tok([prompt.replace("{}", c) for c in classes], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    limit = getattr(getattr(loaded.model.config, "text_config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and ids.shape[1] > limit:  # else an internal ValueError at the first batch
        longest = classes[int(mask.sum(-1).argmax())]
        raise InputError(f"--prompt {short(prompt)}: with class {short(longest)} it is {int(mask.sum(-1).max())} "
                         f"tokens, more than the text tower's {limit} positions")
    eos = loaded.model.text_model.eos_token_id
    if eos != 2 and not bool((ids == eos).any(-1).all()):  # CLIP pools the first EOS (legacy configs: argmax id)
        raise InputError(f"{loaded.spec}: the tokenized class prompts do not all end with eos_token_id {eos}")
    device = next(loaded.model.parameters()).device
    text = towers == "both"
    for name, p in loaded.model.named_parameters():
        if not name.startswith("vision_model.") and not name.startswith("visual_projection."):
            p.requires_grad_(text and p.requires_grad)
    loaded.stored = {n: k for n, k in loaded.stored.items() if dict(loaded.model.named_parameters())[n].requires_grad}
    loaded.model = ZeroShotCLIP(loaded.model, ids.to(device), mask.to(device), text).eval()
