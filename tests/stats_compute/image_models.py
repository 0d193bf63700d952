"""Tiny vision models (ViT, CLIPForImageClassification, CLIPModel with a word-level tokenizer),
image data sets in the three layouts, and the brute-force statistics `stats compute` is checked
against: one image at a time, plain autograd, Grams from activations captured by hooks, CLIP's
zero-shot logits written out here. Nothing here uses tensormerge's collection code."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 8
CLASSES = ["cat", "big dog", "red small bird"]  # prompts of different token lengths: padded rows
WORDS = ["<pad>", "<s>", "<unk>", "</s>", "a", "photo", "of", "cat", "big", "dog", "red", "small", "bird"]
EOS = 3


def _jitter(model, seed: int):
    """Every parameter distinct and non-zero (zero-initialised biases would hide a wrong name)."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def vit(seed: int = 0, num_labels: int = 3):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=num_labels,
                    architectures=["ViTForImageClassification"])
    return _jitter(ViTForImageClassification(cfg), seed)


def _clip_config():
    from transformers import CLIPConfig

    text = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=EOS)
    vision = dict(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=12, logit_scale_init_value=1.5)


def clip(seed: int = 0):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    cfg = _clip_config()
    cfg.architectures = ["CLIPModel"]
    return _jitter(CLIPModel(cfg), seed)


def clip_classifier(seed: int = 0, num_labels: int = 3):
    from transformers import CLIPForImageClassification

    torch.manual_seed(seed)
    cfg = _clip_config()
    cfg.num_labels = num_labels
    cfg.architectures = ["CLIPForImageClassification"]
    return _jitter(CLIPForImageClassification(cfg), seed)


class _MhaConfig:  # built lazily: transformers is imported only when a test runs
    cls = None


def mha_vit(seed: int = 0, num_labels: int = 3):
    """A ViT whose attention is torch's nn.MultiheadAttention (fused in_proj_weight [3d, d], as
    open_clip's and torchvision's ViTs), registered with the Auto classes of this process."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import ImageClassifierOutput

    if _MhaConfig.cls is None:
        class MhaViTConfig(PretrainedConfig):
            model_type = "tm-test-mha-vit"

            def __init__(self, hidden_size=16, num_heads=2, num_labels=3, **kw):
                self.hidden_size, self.num_heads = hidden_size, num_heads
                super().__init__(num_labels=num_labels, **kw)

        class MhaViTForImageClassification(PreTrainedModel):
            config_class = MhaViTConfig
            base_model_prefix = "mha"

            def __init__(self, config):
                super().__init__(config)
                d = config.hidden_size
                self.patch = nn.Conv2d(3, d, 4, 4)
                self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
                self.pos = nn.Parameter(torch.zeros(1, 1 + (SIZE // 4) ** 2, d))
                self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
                self.attn = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
                self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
                self.classifier = nn.Linear(d, config.num_labels)
                self.post_init()

            def _init_weights(self, module):
                pass

            def forward(self, pixel_values, **kw):
                x = self.patch(pixel_values).flatten(2).transpose(1, 2)
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
                h = self.norm1(x)
                x = x + self.attn(h, h, h, need_weights=False)[0]
                x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))
                return ImageClassifierOutput(logits=self.classifier(x[:, 0]))

        AutoConfig.register("tm-test-mha-vit", MhaViTConfig)
        AutoModelForImageClassification.register(MhaViTConfig, MhaViTForImageClassification)
        _MhaConfig.cls = (MhaViTConfig, MhaViTForImageClassification)
    cfg_cls, model_cls = _MhaConfig.cls
    torch.manual_seed(seed)
    cfg = cfg_cls(num_labels=num_labels, architectures=["MhaViTForImageClassification"])
    model = model_cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(0.1 * torch.randn(p.shape))
    return _jitter(model, seed)


def _manual_mha(mod, x, capture):
    """nn.MultiheadAttention's self-attention written out (batch-first x): the fused projection's
    output is a tensor of its own here, so `capture(x, qkv)` can hook it."""
    b, n, d = x.shape
    h = mod.num_heads
    qkv = F.linear(x, mod.in_proj_weight, mod.in_proj_bias)
    capture(x, qkv)
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in qkv.chunk(3, -1))
    att = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, -1) @ v
    return F.linear(att.transpose(1, 2).reshape(b, n, d), mod.out_proj.weight, mod.out_proj.bias)


def processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.4, 0.5, 0.6],
                             image_std=[0.3, 0.2, 0.25])


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def save(model, path: Path, tok: bool = False) -> str:
    model.save_pretrained(str(path))
    processor().save_pretrained(str(path))
    if tok:
        tokenizer().save_pretrained(str(path))
    return str(path)


def write_image(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] | None = None) -> None:
    """Random pixels of varied sizes (the processor resizes), in the given PIL mode."""
    from PIL import Image

    r = np.random.default_rng(seed)
    w, h = size or (int(r.integers(6, 13)), int(r.integers(6, 13)))
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    Image.fromarray(r.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def jsonl_images(root: Path, n: int, seed: int = 0, labels=None) -> tuple[str, list[dict]]:
    """`data.jsonl` with relative image paths (some grey images among RGB ones)."""
    r = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        name = f"img/{i}.png"
        write_image(root / name, seed * 1000 + i, "L" if i % 3 == 2 else "RGB")
        lab = r.randrange(3)
        recs.append({"image": name, "label": labels[lab] if labels else lab})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    return str(path), recs


def pixels(path: str) -> torch.Tensor:
    """[1, 3, H, W] as the model's processor makes them (greyscale replicated to RGB)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    return torch.as_tensor(processor()(images=[im], return_tensors="pt")["pixel_values"]).float()


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def zero_shot_logits(model, px: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's zero-shot logits, written out: scaled cosines of the image embedding and the class
    prompts' text embeddings; and the prompts' attention mask."""
    enc = tokenizer()(prompts, padding=True, return_tensors="pt")
    img = _norm(model.get_image_features(pixel_values=px).pooler_output)
    txt = _norm(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output)
    return model.logit_scale.exp() * img @ txt.T, enc["attention_mask"].bool()


def checkpoint_names(model, path: str) -> dict[str, str]:
    """Module parameter name -> the checkpoint's name for it, found by equal values in the saved
    file (transformers 5 renames ViT's modules on load; random weights are unique)."""
    from safetensors.torch import load_file

    sd = load_file(f"{path}/model.safetensors")
    out = {}
    for n, p in model.named_parameters():
        hits = [k for k, v in sd.items() if v.shape == p.shape and torch.equal(v, p.detach())]
        assert len(hits) == 1, (n, hits)
        out[n] = hits[0]
    return out


def brute_force(model, items: list[tuple[str, int]], path: str, zero_shot: str | None = None,
                prompts: list[str] | None = None) -> dict:
    """{kind: {checkpoint name: float64 tensor}} and the Gram row counts, one image at a time.

    `zero_shot`: None (the model's own head), "vision" or "both" (which CLIP towers are measured)."""
    model.eval()
    stored = checkpoint_names(model, path)
    measured = {n for n in stored
                if zero_shot in (None, "both") or n.startswith("vision_model.") or n.startswith("visual_projection.")}
    params = dict(model.named_parameters())
    names = [n for n in params if n in measured]
    fisher = {n: 0 for n in names}
    blocks, gin, gout, rows = {}, {}, {}, {}
    for path, label in items:
        px = pixels(path)
        masks = {}
        handles = []
        for mname, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or f"{mname}.weight" not in measured:
                continue
            key = stored[f"{mname}.weight"]

            def select(t, mname=mname):
                t = t.detach().double()
                if mname.startswith("text_model.") and t.dim() == 3:
                    return t[masks["text"]]
                return t.reshape(-1, t.shape[-1])

            def fwd(m, args, out, key=key, select=select):
                x = select(args[0])
                gin[key] = gin.get(key, 0) + x.T @ x
                rows[key] = rows.get(key, 0) + x.shape[0]

                def bwd(g, key=key):
                    g = select(g)
                    gout[key] = gout.get(key, 0) + g.T @ g
                out.register_hook(bwd)
            handles.append(mod.register_forward_hook(fwd))
        for mname, mod in model.named_modules():
            if isinstance(mod, torch.nn.MultiheadAttention) and f"{mname}.in_proj_weight" in measured:
                key = stored[f"{mname}.in_proj_weight"]

                def capture(x, qkv, key=key):
                    x = x.detach().double().reshape(-1, x.shape[-1])
                    gin[key] = gin.get(key, 0) + x.T @ x
                    rows[key] = rows.get(key, 0) + x.shape[0]

                    def bwd(g, key=key):
                        g = g.double().reshape(-1, g.shape[-1])
                        gout[key] = gout.get(key, 0) + g.T @ g
                    qkv.register_hook(bwd)

                def manual(q, k, v, need_weights=False, mod=mod, capture=capture):
                    assert q is k and k is v and mod.batch_first
                    out = _manual_mha(mod, q, capture)
                    ref = type(mod).forward(mod, q, k, v, need_weights=False)[0]
                    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # the written-out attention is torch's
                    return out, None
                mod.forward = manual
                handles.append(types.SimpleNamespace(remove=lambda mod=mod: mod.__dict__.pop("forward")))
        if zero_shot:
            enc_mask = tokenizer()(prompts, padding=True, return_tensors="pt")["attention_mask"].bool()
            masks["text"] = enc_mask
            logits, _ = zero_shot_logits(model, px, prompts)
        else:
            logits = model(pixel_values=px).logits
        loss = F.cross_entropy(logits, torch.tensor([label]))
        grads = torch.autograd.grad(-loss, [params[n] for n in names], allow_unused=True)
        for h in handles:
            h.remove()
        for n, g in zip(names, grads):
            g = (torch.zeros_like(params[n]) if g is None else g).double()
            fisher[n] = fisher[n] + g ** 2
            if g.dim() >= 1 and max(g.shape) == g.numel():  # a vector, possibly [1, 1, d] (ViT's cls_token)
                v = g.reshape(-1)
                blocks[stored[n]] = blocks.get(stored[n], 0) + torch.outer(v, v)
    n = len(items)
    return {"fisher": {stored[k]: v / n for k, v in fisher.items()},
            "fisher_block": {k: v / n for k, v in blocks.items()},
            "gram_in": {k: v / rows[k] for k, v in gin.items()},
            "gram_out": {k: v / rows[k] for k, v in gout.items()},
            "rows": rows}
