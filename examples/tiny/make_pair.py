"""Writes examples/tiny/{base,tuned}: a small Llama-shaped bf16 pair with a sparse fp32-style update.

Deterministic (fixed seed); the committed files are its output. The real fine-tuning runs live in
examples/miniature/.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    g = torch.Generator().manual_seed(0)
    here = Path(__file__).parent
    hidden, inter, layers = 64, 128, 4
    base: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(256, hidden, generator=g) * 0.02
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (hidden, hidden)),
            ("self_attn.v_proj", (hidden, hidden)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (inter, hidden)),
            ("mlp.up_proj", (inter, hidden)),
            ("mlp.down_proj", (hidden, inter)),
        ):
            base[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.05
        base[p + "input_layernorm.weight"] = torch.ones(hidden)
    base["model.norm.weight"] = torch.ones(hidden)
    base["lm_head.weight"] = torch.randn(256, hidden, generator=g) * 0.02
    tuned = {}
    for k, w in base.items():
        # An update of about 0.2% of each weight's magnitude: near half a bf16 ULP, so some survive rounding.
        tuned[k] = w + torch.randn(w.shape, generator=g) * 2e-3 * w.abs()
    for name, tensors in (("base", base), ("tuned", tuned)):
        (here / name).mkdir(exist_ok=True)
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
            str(here / name / "model.safetensors"),
        )


if __name__ == "__main__":
    main()
