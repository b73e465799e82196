"""The shipped examples keep working: the miniature training script (quick mode), the committed checkpoints, and
the SmolLM2 fine-tuning script with its model and tokenizer pieces (on a tiny SmolLM2-shaped checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightdiff import compare
from weightdiff.consistency import consistency

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "examples" / "miniature" / "checkpoints"


def test_training_script_quick_mode_writes_comparable_checkpoints(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "miniature" / "train.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["accuracy"]) >= {"base", "sft", "rl_seed0"}
    report = compare(str(tmp_path / "base"), str(tmp_path / "sft"), spectral=False)
    names = {r["name"] for r in report.rows}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert all(r["dtype_base"] == "BF16" for r in report.rows)


@pytest.mark.skipif(not (CKPT / "base").exists(), reason="committed miniature checkpoints are missing")
def test_committed_checkpoints_match_the_documented_figures():
    # The figures quoted in examples/miniature/README.md, recomputed from the committed files.
    rl = compare(str(CKPT / "base"), str(CKPT / "rl_seed0"))
    sft = compare(str(CKPT / "base"), str(CKPT / "sft"), spectral=False)
    sparsity = {name: r.summary()["overall"]["sparsity_bf16"] for name, r in (("rl", rl), ("sft", sft))}
    assert round(sparsity["rl"], 3) == 0.321 and round(sparsity["sft"], 3) == 0.100
    cons = consistency(str(CKPT / "base"), [str(CKPT / f"rl_seed{i}") for i in range(3)])
    weighted = [r for r in cons.rows if r["jaccard_ratio"] is not None]
    assert (
        1.2
        < sum(r["jaccard_ratio"] * r["numel"] for r in weighted) / sum(r["numel"] for r in weighted)
        < 1.35
    )


# --------------------------------------------------------------------------------------------------
# examples/smollm2: fine-tuning a SmolLM2-shaped checkpoint (GQA, tied embeddings, byte-level BPE)
# --------------------------------------------------------------------------------------------------
SMOL = ROOT / "examples" / "smollm2"


def _smollm2_modules():
    """examples/smollm2/{bpe,convert,finetune}.py and examples/miniature/train.py, imported from their files."""
    for d in (SMOL, ROOT / "examples" / "miniature"):
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
    import bpe
    import convert
    import finetune
    import train

    return bpe, convert, finetune, train


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _FakeGGUFReader:
    """The tokenizer fields of a GGUF file, as convert.tokenizer_data reads them."""

    def __init__(self, fields: dict):
        self.fields = fields

    def get_field(self, key):
        return _Field(self.fields[key]) if key in self.fields else None


def _tiny_tokenizer_data(convert, bpe) -> dict:
    """A byte-level vocabulary: 3 control tokens, the 256 byte symbols, and merges that must (or must not) apply."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "Ġt h", "= -", "1 2"]  # "1 2" must never apply: digits are pre-tokenized one by one
    tokens = specials + list(bpe.byte_unicode().values()) + ["Ġt", "Ġth", "=-", "12"]
    reader = _FakeGGUFReader(
        {
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.padding_token_id": 2,
        }
    )
    return convert.tokenizer_data(reader)


def _tiny_config(vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def _write_tiny_smollm2(path: Path) -> dict:
    """A random SmolLM2-shaped checkpoint directory as convert.py writes it: bf16, tied, GQA, tokenizer JSON."""
    bpe, convert, finetune, train = _smollm2_modules()
    tok = _tiny_tokenizer_data(convert, bpe)
    cfg = _tiny_config(len(tok["tokens"]))
    torch.manual_seed(0)
    model = train.LlamaForCausalLM(finetune.model_config(cfg))
    with torch.no_grad():  # norm gains away from 1.0, so that they too are real weights
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    path.mkdir(parents=True)
    # Header metadata as convert.py writes it, which a re-save would not reproduce.
    meta = {"format": "pt", "source": "tiny random SmolLM2-shaped model", "note": "test fixture"}
    save_file(train.bf16_state(model), str(path / "model.safetensors"), metadata=meta)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (path / convert.TOKENIZER_FILE).write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return cfg


def test_bpe_from_the_converted_json_splits_digits_one_by_one(tmp_path):
    bpe, convert, finetune, _ = _smollm2_modules()
    path = tmp_path / convert.TOKENIZER_FILE
    path.write_text(json.dumps(_tiny_tokenizer_data(convert, bpe), ensure_ascii=False), encoding="utf-8")
    tok = bpe.BPE.from_json(path)
    ids = tok.encode("12+7-30=-11")
    assert [tok.tokens[i] for i in ids] == ["1", "2", "+", "7", "-", "3", "0", "=-", "1", "1"]
    assert [tok.tokens[i] for i in tok.encode(" the 12")] == ["Ġth", "e", "Ġ", "1", "2"]
    text = "<|im_start|>user\n12+7=<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(2) == 1 and tok.decode(ids) == text  # control tokens matched whole
    # Few-shot prompts: examples tokenized as problem + answer, as the model writes answers (never "=-").
    fmt = finetune.FewShotFormat(tok, finetune.SHOTS, pad_id=2)
    prompt = fmt.prompt_ids("12+7-30=")
    assert tok.decode(prompt) == fmt.prefix + "12+7-30=" and tok.ids["=-"] not in prompt
    assert fmt.eos_id == tok.ids["Ċ"] and fmt.answer_ids(-11) == [tok.ids[c] for c in "-11"] + [fmt.eos_id]
    # Without the optional regex package the pre-tokenizer falls back to an re pattern; on ASCII they agree.
    for s in ["The cat's 3 mats_2 __x  a-b\n\n 12+7-30=-11 ", "don't  I'll\t\tz"]:
        assert bpe.PAT_STDLIB.findall(s) == bpe.PAT.findall(s)


def _tiny_gqa_config(train, vocab_size: int):
    """A two-layer SmolLM2-shaped ModelConfig: 4 query heads sharing 2 key/value heads, tied embeddings."""
    return train.ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


def test_gqa_attention_matches_a_repeat_interleave_reference():
    _, _, _, train = _smollm2_modules()
    torch.manual_seed(0)
    cfg = _tiny_gqa_config(train, vocab_size=40)
    model = train.LlamaForCausalLM(cfg).eval()
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (2 * 8, 32) and "lm_head.weight" not in model.state_dict()

    # Reference: KV head j serves query heads 2j and 2j+1 (HF's repeat_kv); explicit causal softmax.
    x = torch.randn(3, 5, 32)
    freqs = torch.arange(5)[:, None].float() * model.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q = attn.q_proj(x).view(3, 5, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(3, 5, 2, 8).transpose(1, 2)
    v = attn.v_proj(x).view(3, 5, 2, 8).transpose(1, 2)
    q, k = (t * cos + train.rotate_half(t) * sin for t in (q, k))
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    want = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 32))
    with torch.no_grad():
        got, (k_cache, _) = attn(x, cos[None, None], sin[None, None], None, None)
    assert k_cache.shape == (3, 2, 5, 8)  # the cache holds one copy per KV head
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)

    # Tied head, and left-padded, cached decoding gives the logits of a plain forward pass.
    ids = torch.randint(3, 40, (1, 6))
    with torch.no_grad():
        full, _ = model(ids)
        torch.testing.assert_close(
            full, model.model.norm(_hidden(model, ids)) @ model.model.embed_tokens.weight.T
        )
        padded = torch.cat((torch.full((1, 2), 2), ids[:, :4]), dim=1)
        mask = torch.tensor([[False, False, True, True, True, True]])
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        _, cache = model(padded, pos, mask)
        step, _ = model(
            ids[:, 4:5], pos[:, -1:] + 1, torch.cat((mask, torch.ones(1, 1, dtype=torch.bool)), 1), cache
        )
    torch.testing.assert_close(step[:, -1], full[:, 4], rtol=1e-4, atol=1e-5)


def _hidden(model, ids):
    """The last decoder layer's output, for the tied-head check."""
    x = model.model.embed_tokens(ids)
    freqs = torch.arange(ids.shape[1])[None, :, None].float() * model.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    for layer in model.model.layers:
        x, _ = layer(x, emb.cos(), emb.sin(), None, None)
    return x


class _CoinFormat:
    """A stand-in answer format whose verifier accepts about half of all samples: answer "1" iff the first
    sampled token is even. It gives GRPO groups with mixed rewards on a random model."""

    pad_id, eos_id = 0, 1

    def prompt_ids(self, problem):
        return [2 + ord(c) % 30 for c in problem]

    def answer_ids(self, answer):
        return [2, self.eos_id]

    def decode(self, ids):
        return "1" if ids and ids[0] % 2 == 0 else "2"


class _FixedStream:
    def batch(self, n):
        return [("12+7-30=", 1)] * n


def test_grpo_micro_batches_accumulate_the_full_batch_gradient():
    _, _, finetune, train = _smollm2_modules()
    cfg = _tiny_gqa_config(train, vocab_size=32)
    torch.manual_seed(0)
    base = finetune.SmolLM2(cfg)
    ref = finetune.SmolLM2(cfg).eval().requires_grad_(False)
    ref.load_state_dict(base.state_dict())
    grads, weights = {}, {}
    for micro in (None, 8):
        model = finetune.SmolLM2(cfg)
        model.load_state_dict(base.state_dict())
        # No clipping, so that the gradient left in .grad after the single step is the raw accumulated one
        # (Adam's first step hardly depends on the gradient's scale, so the weights alone would not show it).
        rl = train.RLConfig(
            steps=1, prompts_per_step=4, group_size=8, lr=1e-3, grad_clip=1e9, micro_batch=micro
        )
        gen = torch.Generator().manual_seed(1)
        curve = train.grpo(model, ref, rl, _FixedStream(), gen, lambda _: None, _CoinFormat())["reward_curve"]
        assert 0 < curve[0]["reward"] < 1 and curve[0]["informative_groups"] > 0
        grads[micro] = {n: p.grad.clone() for n, p in model.named_parameters()}
        weights[micro] = model.state_dict()
    for name, w in base.state_dict().items():
        # Every tensor moved, norm gains and the tied embedding included.
        assert not torch.equal(weights[None][name], w), name
        torch.testing.assert_close(grads[8][name], grads[None][name], rtol=1e-4, atol=1e-7)


def test_smollm2_finetune_quick_mode_on_a_tiny_checkpoint(tmp_path):
    src = tmp_path / "tiny"
    cfg = _write_tiny_smollm2(src)
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            str(SMOL / "finetune.py"),
            str(src),
            "--out",
            str(out),
            "--quick",
            "--group-size",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]

    def tensors(name: str) -> dict[str, torch.Tensor]:
        with safe_open(str(out / name / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping

    runs = ["base", "rl_seed0", "rl_seed1", "sft"]
    weights = {name: tensors(name) for name in runs}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.1.self_attn.k_proj.weight" in names and "lm_head.weight" not in names
    for name in runs:
        assert set(weights[name]) == names, name  # HF names, tied: no lm_head.weight
        assert all(t.dtype == torch.bfloat16 for t in weights[name].values()), name
        assert json.loads((out / name / "config.json").read_text()) == cfg  # tied, 2 KV heads, bf16
    assert (out / "base" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert any(not torch.equal(weights["sft"][n], weights["base"][n]) for n in names)

    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == set(runs)
    assert results["device"] == "cpu" and results["configuration"] == "quick"
    assert (
        results["model_config"]["num_key_value_heads"] == 2 and results["model_config"]["tie_word_embeddings"]
    )
    assert results["config"]["rl"]["lr"] == 1e-6 and results["config"]["sft"]["lr"] == 1e-5
    assert results["config"]["rl"]["group_size"] == 3
    assert set(results["seconds_per_step"]) == {"rl_seed0", "rl_seed1", "sft"}
    assert results["prompt_prefix"].startswith("5+3-2=6\n") and results["eval_sizes"]["chain"] == 6
    assert len(results["rl"]["rl_seed0"]["reward_curve"]) == 2 and len(results["sft"]["loss_curve"]) == 2
    # A random model is never rewarded: zero advantages, and the KL term has zero gradient where the policy
    # equals the reference, so GRPO must leave every weight bit-identical (a check that both start equal).
    for seed in ("rl_seed0", "rl_seed1"):
        rewarded = any(c["reward"] > 0 for c in results["rl"][seed]["reward_curve"])
        moved = any(not torch.equal(weights[seed][n], weights["base"][n]) for n in names)
        assert moved == rewarded, seed

    report = tmp_path / "rl.parquet"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "weightdiff",
            "compare",
            str(out / "base"),
            str(out / "rl_seed0"),
            "-o",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = pq.read_table(report).to_pylist()
    assert {r["name"] for r in rows} == names
    cons = consistency(str(out / "base"), [str(out / "rl_seed0"), str(out / "rl_seed1")])
    assert {r["name"] for r in cons.rows} == names
