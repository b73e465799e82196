"""Synthetic LLM-shaped checkpoint pairs for the benchmarks.

Writes BASE and TUNED directories holding ``model.safetensors`` with Llama/Qwen tensor names and shapes, sized
to a target number of bytes per checkpoint. The tuned side changes about half of the stored bf16 values by a
few ULPs, as an RL fine-tune does, so every code path (bit comparison, ULP histogram, norms) does real work.
Usable as a script or imported (``write_pair``); nothing here is used by the package itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # name -> (hidden, intermediate, q_heads, kv_heads, head_dim, vocab)
    "small": (2048, 5632, 16, 4, 128, 32000),
    "qwen3-8b": (4096, 12288, 32, 8, 128, 151936),
}


def layer_shapes(
    hidden: int, inter: int, q_heads: int, kv_heads: int, head_dim: int
) -> dict[str, tuple[int, ...]]:
    return {
        "self_attn.q_proj.weight": (q_heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, q_heads * head_dim),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }


def _trained_like(shape: tuple[int, ...], g: torch.Generator, device: str) -> torch.Tensor:
    """A matrix with a trained weight's kind of spectrum: a power-law low-rank part (sigma_i ~ i^-1/2 over half
    the smaller side) over a noise bulk, scaled to an element std of 0.02. Pure noise, the default, has a flat
    spectrum on which no iterative SVD converges fast, which trained weights do not have."""
    m, n = shape
    r = min(m, n) // 2
    U = torch.linalg.qr(torch.randn(m, r, generator=g, device=device)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, device=device)).Q
    s = 3.0 * torch.arange(1, r + 1, dtype=torch.float32, device=device) ** -0.5
    W = (U * s) @ V.T + 0.2 * torch.randn(m, n, generator=g, device=device) / max(m, n) ** 0.5
    return W * (0.02 / W.std())


def _pair_tensor(
    shape: tuple[int, ...], g: torch.Generator, device: str, spectrum: str = "noise"
) -> tuple[torch.Tensor, torch.Tensor]:
    if spectrum == "trained" and len(shape) == 2:
        base = _trained_like(shape, g, device).to(torch.bfloat16)
    else:
        base = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16)
    mask = torch.rand(shape, generator=g, device=device) < 0.5
    # A relative nudge of 0.5-1.5%: one to two bf16 ULPs, the size of update that survives bf16 storage.
    factor = 1 + mask * (torch.rand(shape, generator=g, device=device) + 0.5) * 0.01
    tuned = (base.float() * factor).to(torch.bfloat16)
    return base.cpu(), tuned.cpu()


def write_pair(
    out: Path,
    size_gb: float | None = None,
    preset: str = "small",
    layers: int | None = None,
    device: str = "cpu",
    spectrum: str = "noise",
) -> tuple[Path, Path]:
    """Write ``out/base`` and ``out/tuned``; the number of layers comes from ``layers`` or ``size_gb``."""
    hidden, inter, qh, kvh, hd, vocab = SHAPES[preset]
    per_layer = layer_shapes(hidden, inter, qh, kvh, hd)
    layer_bytes = 2 * sum(torch.Size(s).numel() for s in per_layer.values())
    embed_bytes = 2 * 2 * vocab * hidden
    if layers is None:
        assert size_gb is not None
        layers = max(1, round((size_gb * 1e9 - embed_bytes) / layer_bytes))
    g = torch.Generator(device=device).manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    tuned: dict[str, torch.Tensor] = {}
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        names += [(f"model.layers.{i}.{n}", s) for n, s in per_layer.items()]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    for name, shape in names:
        base[name], tuned[name] = _pair_tensor(shape, g, device, spectrum)
    for label, tensors in (("base", base), ("tuned", tuned)):
        (out / label).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / label / "model.safetensors"))
    return out / "base", out / "tuned"


def ensure_pair(out: Path, *synth_args: str) -> tuple[Path, Path]:
    """``out/base`` and ``out/tuned``, written first (``synth.py OUT *synth_args``) when missing.

    Always in a child process: a benchmark that held the generated tensors would hand its resident size down to
    every contender it forks, and ru_maxrss would then report the parent's size for all of them.
    """
    if not (out / "base" / "model.safetensors").exists():
        subprocess.run([sys.executable, str(Path(__file__)), str(out), *synth_args], check=True)
    return out / "base", out / "tuned"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size-gb", type=float, default=2.0, help="bytes per checkpoint, in GB")
    ap.add_argument("--preset", choices=sorted(SHAPES), default="small")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="where to generate the random values (cuda is faster)")
    ap.add_argument(
        "--spectrum",
        choices=("noise", "trained"),
        default="noise",
        help="matrices of Gaussian noise, or with a trained weight's power-law spectrum over a noise bulk",
    )
    args = ap.parse_args()
    t = time.perf_counter()
    base, tuned = write_pair(args.out, args.size_gb, args.preset, args.layers, args.device, args.spectrum)
    size = (base / "model.safetensors").stat().st_size / 1e9
    print(f"wrote {base} and {tuned} ({size:.2f} GB each) in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
