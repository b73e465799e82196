"""LoRA adapters (the PEFT layout) seen as the full fine-tuned checkpoint they define.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. For a targeted linear
module ``M`` it stores ``base_model.model.M.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r); the
fine-tuned weight is ``W = W0 + s * B @ A`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), ``r`` and ``lora_alpha`` overridable per module by ``rank_pattern`` / ``alpha_pattern``
(first key ``k`` in file order for which the module name matches ``(.*\\.)?(k)$``, as PEFT does). Embedding
modules store ``lora_embedding_A`` (r x vocab) and ``lora_embedding_B`` (dim x r), giving ``W0 + s (B @ A)^T``.
Full tensors (``modules_to_save``, or embeddings saved because the vocabulary was resized) replace the base
tensor outright; ``M.base_layer.weight`` replaces the ``W0`` that a LoRA delta is added to.

``AdapterSource`` wraps the already opened base source: ``tensors()`` lists the base's tensors (untouched ones
read as the base's bytes and so compare as identical) and ``read()`` returns the merged weight. Rounding: the
delta is computed and added in float32 and the sum rounded once to the base dtype, i.e. the weight a merged
checkpoint would store. (PEFT's ``merge_and_unload`` rounds the delta to the base dtype before adding it, so a
checkpoint written by it can differ from this by one unit in the last place on a few elements.)

Refused with one-line errors: adapter tensors that match no base tensor, non-LoRA PEFT types, DoRA, LoRA
biases, trainable-token deltas, LoRA on convolutions and LoRA on FP8-quantised base weights. The adapter is
never written back and the base source is not closed by this one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightdiff.errors import CheckpointFormatError, InputError, UnsupportedCheckpointError
from weightdiff.sources.base import Source
from weightdiff.sources.format import FLOAT_DTYPES, TensorInfo
from weightdiff.sources.local import LocalSource
from weightdiff.sources.quant import FP8_DTYPES, read_stored

if TYPE_CHECKING:
    import torch
from weightdiff.sources.rows import resolve

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Suffixes of the LoRA factors in a saved adapter (the adapter name, e.g. ".default", is stripped by PEFT).
_FACTORS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
_BASE_LAYER = ".base_layer.weight"
# Keys of PEFT features whose effect on the weight this module does not reproduce.
_UNSUPPORTED = (
    (re.compile(r"\.lora_magnitude_vector(?:\.weight)?$"), "a DoRA magnitude vector (use_dora)"),
    (re.compile(r"\.lora_[AB]\.bias$"), "a LoRA bias (lora_bias)"),
    (re.compile(r"\.trainable_tokens_delta$"), "a trainable-tokens delta (trainable_token_indices)"),
)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a local directory holding a PEFT ``adapter_config.json``."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the value of the first key ``k`` with ``module`` matching ``(.*\\.)?(k)$``."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as exc:
            raise InputError(f"adapter_config.json: pattern {key!r} is not a valid regex ({exc})") from None
    return default


@dataclass(frozen=True)
class LoraModule:
    """One targeted module: its factors and how the delta is scaled and laid out."""

    module: str
    a: TensorInfo
    b: TensorInfo
    r: int
    alpha: float
    scaling: float
    #: lora_embedding_A/B: the delta is (B @ A) transposed (rows are vocabulary entries).
    embedding: bool
    #: Conv1D-style base weights stored (in, out): the delta is transposed to match.
    fan_in_fan_out: bool


class AdapterSource(Source):
    """The checkpoint a LoRA adapter directory makes of ``base`` (see the module docstring)."""

    def __init__(self, base: Source, path: str | Path, given: str | None = None) -> None:
        self.base = base
        self.path = Path(path)
        self.given = given if given is not None else str(path)
        self.adapter_config = _read_config(self.path)
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            if (self.path / "adapter_model.bin").is_file():
                raise UnsupportedCheckpointError(
                    f"{self.path}: holds adapter_model.bin, a pickle file; weightdiff never unpickles, save the "
                    "adapter with safe_serialization=True (adapter_model.safetensors)"
                )
            raise InputError(f"{self.path}: has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
        self.adapter = LocalSource(weights)
        try:
            self._build()
        except BaseException:
            self.adapter.close()
            raise

    def _build(self) -> None:
        cfg = self.adapter_config
        file = str(self.path / ADAPTER_WEIGHTS)
        base = self.base.tensors()
        self._tensors: dict[str, TensorInfo] = dict(base)
        #: base tensor name -> full replacement stored in the adapter (modules_to_save, resized embeddings).
        self._replaced: dict[str, TensorInfo] = {}
        factors: dict[str, dict[str, TensorInfo]] = {}
        kinds: dict[str, bool] = {}
        for key, info in sorted(self.adapter.tensors().items()):
            for pattern, what in _UNSUPPORTED:
                if pattern.search(key):
                    raise UnsupportedCheckpointError(
                        f"{file}: tensor {key!r} is {what}, which weightdiff cannot merge; only plain LoRA "
                        "adapters are supported"
                    )
            if not key.startswith(PEFT_PREFIX):
                raise CheckpointFormatError(
                    f"{file}: tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT adapter tensor"
                )
            rest = key[len(PEFT_PREFIX) :]
            for suffix, (which, embedding) in _FACTORS.items():
                if rest.endswith(suffix):
                    module = rest[: -len(suffix)]
                    factors.setdefault(module, {})[which] = info
                    kinds[module] = embedding
                    break
            else:
                target = rest[: -len(_BASE_LAYER)] + ".weight" if rest.endswith(_BASE_LAYER) else rest
                name = self._base_name(target, base, key, file, full=True)
                self._replaced[name] = info
                self._tensors[name] = dataclasses.replace(info, name=name)
        self.modules: dict[str, LoraModule] = {}
        for module, pair in sorted(factors.items()):
            if set(pair) != {"A", "B"}:
                missing = "lora_B" if "A" in pair else "lora_A"
                raise CheckpointFormatError(f"{file}: module {module!r} has no {missing} factor")
            name = self._base_name(module + ".weight", self._tensors, PEFT_PREFIX + module, file, full=False)
            self.modules[name] = self._module(
                module, pair["A"], pair["B"], kinds[module], self._tensors[name], cfg
            )

    def _base_name(
        self, target: str, listing: Mapping[str, TensorInfo], key: str, file: str, full: bool
    ) -> str:
        """The base tensor an adapter key refers to: verbatim, else through wrapper-prefix normalisation."""
        if target in listing:
            return target
        from weightdiff.matching import canonical, is_head_name

        want = canonical(target)
        hits = [n for n in listing if canonical(n) == want]
        if len(hits) == 1:
            return hits[0]
        # A tied base stores no lm_head; an adapter that trains the head (modules_to_save) stores it whole.
        # It is listed as a new tensor and the tie handling pairs it with the base's embedding.
        if full and not hits and is_head_name(target):
            return target
        what = "several base tensors" if hits else "no tensor of the base checkpoint"
        raise InputError(
            f"{file}: adapter tensor {key!r} targets {target!r}, which matches {what} in {self.base.given}; "
            "is this adapter for another model?"
        )

    def _module(
        self,
        module: str,
        a: TensorInfo,
        b: TensorInfo,
        embedding: bool,
        target: TensorInfo,
        cfg: Mapping[str, Any],
    ) -> LoraModule:
        file = str(self.path / ADAPTER_WEIGHTS)
        if len(a.shape) != 2 or len(b.shape) != 2 or len(target.shape) != 2:
            raise UnsupportedCheckpointError(
                f"{file}: module {module!r} has LoRA factors of shapes {list(a.shape)} and {list(b.shape)} on a "
                f"base weight of shape {list(target.shape)}; only LoRA on 2-D (linear/embedding) weights is supported"
            )
        if target.dtype in FP8_DTYPES:
            raise UnsupportedCheckpointError(
                f"{file}: module {module!r} targets the FP8-quantised base weight {target.name!r}; merging LoRA into "
                "FP8 weights is not supported"
            )
        if target.dtype not in FLOAT_DTYPES or a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
            raise UnsupportedCheckpointError(
                f"{file}: module {module!r}: LoRA factors ({a.dtype}, {b.dtype}) or base weight ({target.dtype}) "
                "are not floating point"
            )
        r = int(pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False)) and not embedding
        # Factor shapes: A is (r, in) [embedding: (r, vocab)], B is (out, r) [embedding: (dim, r)].
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointFormatError(
                f"{file}: module {module!r} has factors of rank {a.shape[0]}/{b.shape[1]} but "
                f"{ADAPTER_CONFIG} gives r={r} for it (r, rank_pattern)"
            )
        delta_shape = (b.shape[0], a.shape[1])
        if embedding or fan_in_fan_out:
            delta_shape = delta_shape[::-1]
        if tuple(target.shape) != delta_shape:
            raise CheckpointFormatError(
                f"{file}: module {module!r}: B @ A gives a {list(delta_shape)} update for {target.name!r} of shape "
                f"{list(target.shape)}"
            )
        use_rslora = bool(cfg.get("use_rslora", False))
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        return LoraModule(module, a, b, r, alpha, scaling, embedding, fan_in_fan_out)

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def delta(self, module: LoraModule) -> torch.Tensor:
        """The float32 update ``s * B @ A`` (transposed for embeddings and fan_in_fan_out) of one module."""
        import torch

        a = self.adapter.read(module.a).to(torch.float32)
        b = self.adapter.read(module.b).to(torch.float32)
        d = (b @ a).mul_(module.scaling)
        return d.T if module.embedding or module.fan_in_fan_out else d

    def read(self, info: TensorInfo) -> torch.Tensor:
        module = self.modules.get(info.name)
        replaced = info.name in self._replaced
        if module is None and not replaced:
            return self.base.read(info)
        if module is None:
            # A row slice of a replacement names the same adapter file and bytes: read it directly.
            return self.adapter.read(info)
        full, rows = resolve(self._tensors, info)
        w0 = self.adapter.read(full) if replaced else self.base.read(full)
        import torch

        merged = (w0.to(torch.float32) + self.delta(module)).to(w0.dtype)
        return merged if rows is None else merged[rows[0] : rows[1]].clone()

    def read_buffer(self, info: TensorInfo) -> memoryview | None:
        # Tensors the adapter leaves alone are the base's bytes; merged ones are computed, so have none.
        if info.name in self.modules or info.name in self._replaced:
            return None
        return self.base.read_buffer(info)

    def read_stored(self, info: TensorInfo) -> torch.Tensor:
        """What the merged checkpoint would store for ``info``: the base's stored values where untouched."""
        if info.name in self.modules or info.name in self._replaced:
            return self.read(info)
        return read_stored(self.base, info)

    def release(self, info: TensorInfo) -> None:
        if info.name in self._replaced:
            self.adapter.release(info)
        else:
            self.base.release(info)

    def describe(self) -> dict[str, Any]:
        cfg = self.adapter_config
        return {
            "kind": "lora-adapter",
            "given": self.given,
            "resolved": str(self.path.resolve()),
            "base": self.base.describe(),
            "r": cfg.get("r", 8),
            "lora_alpha": cfg.get("lora_alpha", 8),
            "use_rslora": bool(cfg.get("use_rslora", False)),
            "rank_pattern": cfg.get("rank_pattern") or {},
            "alpha_pattern": cfg.get("alpha_pattern") or {},
            "target_modules": cfg.get("target_modules"),
            "modules_merged": len(self.modules),
            "tensors_replaced": sorted(self._replaced),
            "merge": "W0 + scaling * B @ A in float32, rounded once to the base dtype",
        }

    def config(self) -> dict[str, Any] | None:
        cfg = self.base.config()
        base = self.base.tensors()
        if any(name not in base for name in self._replaced):
            # The adapter stores a head the (tied) base does not: the merged model has its own head, so it no
            # longer ties it, whatever the base's config says.
            cfg = {**(cfg or {}), "tie_word_embeddings": False}
        return cfg

    def close(self) -> None:
        # The base source belongs to whoever opened it.
        self.adapter.close()


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{cfg_path}: cannot read adapter config ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: adapter config is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedCheckpointError(
            f"{cfg_path}: peft_type {peft_type} is not supported; only LoRA adapters can be merged"
        )
    if cfg.get("use_dora"):
        raise UnsupportedCheckpointError(f"{cfg_path}: DoRA adapters (use_dora) are not supported")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
        ):
            raise InputError(f"{cfg_path}: {key} must be a positive number, got {value!r}")
    return cfg
