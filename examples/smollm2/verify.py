"""Check a checkpoint written by ``convert.py`` against the GGUF it came from, offline.

What it checks:
1. shapes: every tensor has the shape that config.json implies (and nothing is missing or extra);
2. round trip: every tensor equals the GGUF tensor it came from, dequantized and cast to the checkpoint's dtype,
   bit for bit; q_proj / k_proj after re-applying llama.cpp's row permutation;
3. RoPE convention: a minimal Llama forward pass in torch (fp32) with the HF weights and HF's ``rotate_half``
   RoPE gives the same logits as the raw GGUF q/k weights with llama.cpp's adjacent-pair RoPE (the convention
   llama.cpp runs the GGUF with). Equality up to float rounding shows the un-permutation is the one llama.cpp
   assumes, per head, with the right head counts for q (9) and k (3);
4. sensitivity control: the same forward pass with the q/k rows left in GGUF order (no un-permutation) but HF's
   RoPE must give a clearly worse next-token loss on the same text;
5. sanity: mean next-token loss on a short English text and a greedy reply to a chat prompt (printed; judge it).

What it does not check: agreement with the original Hugging Face bf16 weights or with transformers' output
(neither is available offline here); the tokenizer is the minimal byte-level BPE of ``bpe.py``, built from the GGUF
vocabulary and merges (digits split one by one, GPT-2 pre-tokenizer pattern), close to but not guaranteed identical
to the HF one.

Usage: python examples/smollm2/verify.py CKPT_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bpe import BPE
from convert import find_gguf, hf_name, permute_rows
from safetensors import safe_open

TEXT = (
    "The Industrial Revolution began in Great Britain in the late eighteenth century. New machines powered by "
    "steam changed the way goods were made, and many people moved from the countryside to work in factories "
    "in the growing cities."
)
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"

# ---------------------------------------------------------------------------------------------- model


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama RoPE: dimension i rotates with i + d/2 (``rotate_half``)."""
    d = x.shape[-1] // 2
    rot = torch.cat((-x[..., d:], x[..., :d]), dim=-1)
    return x * torch.cat((cos, cos), -1) + rot * torch.cat((sin, sin), -1)


def rope_adjacent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.cpp's normal RoPE (LLAMA_ROPE_TYPE_NORM): dimensions 2i and 2i+1 rotate together."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def forward(w: dict[str, torch.Tensor], cfg: dict[str, Any], ids: list[int], rope: Any) -> torch.Tensor:
    """Logits [T, vocab] of a Llama decoder (no cache), fp32."""
    T = len(ids)
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().float()[None], ang.sin().float()[None]  # [1, T, hd/2], broadcast over heads

    def norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(T, nh * hd)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        g = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + g @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x, w["model.norm.weight"]) @ head.T


def mean_nll(logits: torch.Tensor, ids: list[int]) -> float:
    return float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])))


# ---------------------------------------------------------------------------------------------- checks


def main(argv: list[str]) -> int:
    import gguf
    from convert import expected_shapes, unpermute_rows

    torch.set_grad_enabled(False)
    ckpt = Path(argv[0])
    cfg = json.loads((ckpt / "config.json").read_text())
    report: dict[str, Any] = {"checkpoint": str(ckpt)}
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        hf = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    dtype = next(iter(hf.values())).dtype

    # 1. shapes against config.json
    want = expected_shapes(cfg, cfg["tie_word_embeddings"])
    assert set(want) == set(hf), sorted(set(want) ^ set(hf))[:5]
    assert all(tuple(hf[n].shape) == want[n] for n in want)
    report["shapes_ok"] = len(want)

    # 2. bit-exact round trip against the GGUF (dequantized, cast to the checkpoint's dtype)
    reader = gguf.GGUFReader(str(find_gguf()))
    raw: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        raw[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    mismatched = []
    for n, t in hf.items():
        kind = next((k for k in heads if f".{k}." in n), None)
        mine = t if kind is None else torch.from_numpy(permute_rows(t.float().numpy(), heads[kind])).to(dtype)
        if not torch.equal(mine, raw[n]):
            mismatched.append(n)
    assert not mismatched, mismatched[:5]
    # and the two helpers are inverses (a random matrix, both head counts)
    r = np.random.default_rng(0).standard_normal((cfg["num_attention_heads"] * cfg["head_dim"], 7))
    for nh in set(heads.values()):
        rr = r[: nh * cfg["head_dim"]]
        assert np.array_equal(unpermute_rows(permute_rows(rr, nh), nh), rr)
    report["roundtrip_bit_exact"] = len(hf)

    # 3-5. forward passes, fp32
    bpe = BPE.from_gguf(reader)
    ids = bpe.encode(TEXT)
    w_hf = {n: t.float() for n, t in hf.items()}
    w_gguf = {n: t.float() for n, t in raw.items()}  # q/k in llama.cpp row order
    t0 = time.perf_counter()
    l_hf = forward(w_hf, cfg, ids, rope_half)
    report["forward_s"] = round(time.perf_counter() - t0, 2)
    l_cpp = forward(w_gguf, cfg, ids, rope_adjacent)
    l_wrong = forward(w_gguf, cfg, ids, rope_half)
    report["tokens"] = len(ids)
    report["rope_convention_max_abs_logit_diff"] = float((l_hf - l_cpp).abs().max())
    report["logit_scale_max_abs"] = float(l_hf.abs().max())
    report["nll_hf"] = round(mean_nll(l_hf, ids), 4)
    report["nll_llamacpp_convention"] = round(mean_nll(l_cpp, ids), 4)
    report["nll_without_unpermute"] = round(mean_nll(l_wrong, ids), 4)
    report["top1_acc_hf"] = round(float((l_hf[:-1].argmax(-1) == torch.tensor(ids[1:])).float().mean()), 3)
    assert report["rope_convention_max_abs_logit_diff"] < 1e-3 * report["logit_scale_max_abs"]
    assert report["nll_without_unpermute"] > report["nll_hf"] + 0.5

    chat = bpe.encode(CHAT)
    gen: list[int] = []
    for _ in range(24):
        nxt = int(forward(w_hf, cfg, chat + gen, rope_half)[-1].argmax())
        if nxt == cfg["eos_token_id"] or bpe.tokens[nxt] == "<|im_end|>":
            break
        gen.append(nxt)
    report["chat_prompt"] = "What is the capital of France?"
    report["greedy_reply"] = bpe.decode(gen)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
