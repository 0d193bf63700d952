"""Shared fixtures. TRITON_INTERPRET must be set before any kernel module is imported."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from safetensors.torch import save_file


def write_family(root, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], n: int = 3, seed: int = 0,
                 scale: float = 0.05) -> tuple[str, list[str], dict, list[dict]]:
    """A base and n fine-tunes (base + seeded noise) as model.safetensors directories."""
    g = torch.Generator().manual_seed(seed)
    base = {}
    for name, (shape, dtype) in tensors.items():
        if dtype.is_floating_point:
            base[name] = torch.randn(shape, generator=g).to(dtype)
        else:
            base[name] = torch.arange(int(torch.tensor(shape).prod())).reshape(shape).to(dtype)
    fts = []
    for _ in range(n):
        fts.append({k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point()
                    else v.clone() for k, v in base.items()})
    paths = []
    for i, sd in enumerate([base] + fts):
        d = root / ("base" if i == 0 else f"ft{i}")
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text('{"model_type": "test"}\n')
        paths.append(str(d))
    return paths[0], paths[1:], base, fts


@pytest.fixture(scope="module")
def one_thread():
    """Tensors in transformers tests are tiny: intra-op threads only add overhead (a lot on a
    busy machine). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def family(tmp_path):
    tensors = {
        "emb.weight": ((41, 13), torch.float32),
        "layer.0.w": ((64, 33), torch.bfloat16),
        "layer.0.b": ((33,), torch.float16),
        "layer.1.w": ((7, 5, 3), torch.float32),
        "scalar": ((), torch.float32),
        "position_ids": ((1, 9), torch.int64),
    }
    return write_family(tmp_path / "models", tensors)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache (fill it with helpers.make_hub_cache)."""
    from tests import helpers

    return helpers.offline_hub_cache(tmp_path, monkeypatch)
