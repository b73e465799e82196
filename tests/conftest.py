"""Shared fixtures: real safetensors checkpoints written to temporary directories."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# Pin terminal width and colour so that CLI output is stable.
os.environ.setdefault("COLUMNS", "160")
os.environ["NO_COLOR"] = "1"
os.environ.pop("WEIGHTDIFF_DEBUG", None)


def write_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def llama_like(layers: int = 3, hidden: int = 32, inter: int = 48, seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(50, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g) * 0.1
        out[p + "self_attn.k_proj.weight"] = torch.randn(hidden // 2, hidden, generator=g) * 0.1
        out[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g) * 0.1
        out[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g) * 0.1
        out[p + "input_layernorm.weight"] = torch.ones(hidden) + 0.01 * torch.randn(hidden, generator=g)
    out["model.norm.weight"] = torch.ones(hidden)
    out["lm_head.weight"] = torch.randn(50, hidden, generator=g) * 0.1
    return {k: v.to(dtype) for k, v in out.items()}


def perturb(tensors: dict[str, torch.Tensor], frac: float = 0.3, scale: float = 1e-2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in tensors.items():
        w = v.float()
        mask = torch.rand(w.shape, generator=g) < frac
        out[k] = (w + mask * torch.randn(w.shape, generator=g) * scale * w.abs().clamp(min=1e-3)).to(v.dtype)
    return out


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A small Llama-shaped bf16 pair, single-file checkpoints in directories."""
    base = llama_like()
    tuned = perturb(base)
    write_checkpoint(tmp_path / "base" / "model.safetensors", base)
    write_checkpoint(tmp_path / "tuned" / "model.safetensors", tuned)
    return tmp_path / "base", tmp_path / "tuned"


SILERO_MEMBER = "silero_vad/data/silero_vad_16k.safetensors"


@pytest.fixture(scope="session")
def silero(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("WEIGHTDIFF_TEST_CACHE", tmp_path_factory.mktemp("wheels")))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / "silero_vad_16k.safetensors"
    if not target.exists():
        wheels = list(cache.glob("silero_vad-*.whl"))
        if not wheels:
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-q",
                    "-d",
                    str(cache),
                    "silero-vad",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            wheels = list(cache.glob("silero_vad-*.whl"))
            if res.returncode != 0 or not wheels:
                pytest.skip(f"cannot fetch the silero-vad wheel with pip: {res.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            target.write_bytes(zf.read(SILERO_MEMBER))
    return target
