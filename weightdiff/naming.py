"""Pure functions on tensor names: natural sort order, layer index, expert index and module name.

Nothing here reads files; everything is a function of a string, so it is trivially testable and shared by
pairing, the engine, the report and the summaries.
"""

from __future__ import annotations

import re

# Containers that hold a model's repeated blocks, in the spellings of the common model families
# (Llama/Qwen `model.layers.N`, GPT-2 `transformer.h.N`, BERT `encoder.layer.N`, others `blocks.N`).
_LAYER_RE = re.compile(
    r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers|encoder_layers)\.(\d+)(?=\.|$)"
)
_EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)(?=\.|$)")
_PARAM_SUFFIXES = ("weight", "bias", "weight_scale_inv", "scale", "g", "b")
_ROOT_PREFIXES = (
    "base_model.model.",
    "language_model.model.",
    "model.model.",
    "model.",
    "transformer.",
    "_model.",
)
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded integers numerically (layers.9 before layers.10)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(name) if part != ""
    )


def layer_of(name: str) -> int | None:
    """The block (layer) index of a tensor in a known block container, or None (embeddings, heads, other)."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def expert_of(name: str) -> int | None:
    """The expert index of a mixture-of-experts tensor (``...mlp.experts.E...``), else None."""
    match = _EXPERT_RE.search(name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    """The module a tensor belongs to with the layer prefix, expert index and parameter suffix removed.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``;
    ``model.layers.3.mlp.experts.7.up_proj.weight`` -> ``mlp.experts.up_proj``; ``lm_head.weight`` -> ``lm_head``.
    """
    rest = name
    match = _LAYER_RE.search(rest)
    if match is not None:
        rest = rest[match.end() :]
    else:
        for prefix in _ROOT_PREFIXES:
            if rest.startswith(prefix):
                rest = rest[len(prefix) :]
                break
    rest = _EXPERT_RE.sub(".experts", rest).lstrip(".")
    parts = rest.split(".")
    if len(parts) > 1 and parts[-1] in _PARAM_SUFFIXES:
        parts = parts[:-1]
    return ".".join(parts) or name
