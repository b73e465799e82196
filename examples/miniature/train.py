"""Miniature base -> {SFT, RLVR} fine-tuning run that produces real checkpoints for weightdiff.

What it does
------------
1. Generates, from a fixed seed, a character-level corpus of integer arithmetic lines such as
   ``"12+7=19"``, ``"35-18=17"``, ``"23*4=92"`` and two-operation chains such as ``"12+7-30=-11"``.
2. Pretrains from scratch a small Llama-style decoder (RMSNorm, RoPE, SwiGLU MLP, untied head) with
   float32 weights and AdamW on that corpus, so its weight matrices acquire a real, trained spectrum.
3. Fine-tunes the *same* base two ways on the fine-tuning task (two-operation chains, the harder part
   of the pretraining mix):
   - RLVR: GRPO-style policy gradient with a verifiable 0/1 reward, group-normalised advantages, a k3
     KL penalty to the frozen base, Adam with an RL-sized learning rate; three seeds.
   - SFT: cross-entropy on reference solutions of the same task, Adam with an SFT-sized learning rate.
4. Saves base, sft, rl_seed0..2 as bf16 safetensors with Hugging Face Llama tensor names and a
   ``config.json``, plus ``results.json`` (accuracies, hyperparameters, curves, wall times).

``examples/smollm2/finetune.py`` imports the problem generator, the model, the GRPO and SFT loops and the
checkpoint writer from here. What it needs beyond this script (grouped-query attention, tied embeddings,
another tokenizer and prompt layout via a format object, the output head on selected positions only, RL
micro-batches, a device) is off by default, and this script's checkpoints are byte-identical with or without it.

What it does not do
-------------------
- It does not measure anything about the weights; that is weightdiff's job on the saved checkpoints.
- Hyperparameters are standard choices scaled to this model (see README); they were not tuned to make
  any weight-level statistic (e.g. bf16 update sparsity) come out one way or the other.
- Training happens in float32 master weights; bf16 appears only when a checkpoint is written, and every
  fine-tune starts from the bf16-rounded base, exactly as one would start from a released bf16 model.
- It needs no network and no library beyond torch and safetensors.

Usage::

    python examples/miniature/train.py                 # full run: ~8 min on 2 idle cores, longer if busy
    python examples/miniature/train.py --quick --out /tmp/mini   # smoke test, well under a minute
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The cores this runs on are often shared with other processes. There, OpenMP worker threads that
# spin-wait (libgomp's default) made a training step 5-20x slower than threads that sleep while idle.
# The policy is read when torch loads its OpenMP runtime, so it must be set before the import; it
# changes timing only, never results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

# --------------------------------------------------------------------------------------------------
# Tokenizer: one token per character. Index 0 (space) is padding; "\n" both starts a line (like BOS)
# and ends it (EOS), so a training example is "\n12+7=19\n".
# --------------------------------------------------------------------------------------------------
VOCAB = " \n0123456789+-*="
PAD_ID = VOCAB.index(" ")
EOS_ID = VOCAB.index("\n")
_CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    return [_CHAR_TO_ID[c] for c in text]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


class CharFormat:
    """How problems and answers become token ids: a prompt is "\\n" + problem, an answer is digits + "\\n".

    The data, decoding and training functions below take a format object with this interface, so that the same
    loops can fine-tune a model with another tokenizer and prompt layout (see examples/smollm2/finetune.py).
    ``eos_id`` ends an answer; ``pad_id`` fills padding and the positions after a finished answer.
    """

    pad_id = PAD_ID
    eos_id = EOS_ID

    def prompt_ids(self, problem: str) -> list[int]:
        return encode("\n" + problem)

    def answer_ids(self, answer: int) -> list[int]:
        return encode(f"{answer}\n")

    def decode(self, ids: list[int]) -> str:
        return decode(ids)


CHAR_FORMAT = CharFormat()


# --------------------------------------------------------------------------------------------------
# Configuration. FULL is the committed run; QUICK only checks that every code path works.
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    vocab_size: int = len(VOCAB)
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # Grouped-query attention when fewer than the attention heads; None means as many (this script's model).
    num_key_value_heads: int | None = None
    tie_word_embeddings: bool = False  # True: the output head is the input embedding (no lm_head weight)
    # 8/3 * hidden, the Llama SwiGLU rule (keeps the MLP's parameter count equal to a 4x GELU MLP).
    intermediate_size: int = 512
    max_position_embeddings: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02  # HF Llama default

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads


@dataclass
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 128
    # Peak LR. A 2M-parameter model wants a larger LR than an LLM's ~3e-4; in a sweep (1800 steps)
    # 1e-3 reached far higher accuracy than 2e-3 or 3e-3, which is why it is 1e-3.
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to 10% of peak
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only, as in GPT/Llama pretraining
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # Mixture of problem types in the pretraining corpus (the fine-tuning task is "chain").
    mix: dict[str, float] = field(default_factory=lambda: {"add": 0.3, "sub": 0.3, "mul": 0.2, "chain": 0.2})


@dataclass
class RLConfig:
    steps: int = 150
    prompts_per_step: int = 16
    group_size: int = 8  # G answers sampled per prompt -> 128 rollouts per step
    # Constant LR = pretraining peak / 100. LLM RLVR uses 1e-6..3e-6 against pretraining peaks of
    # ~3e-4 (1/300..1/100); we take the upper end because this run has 150 steps, not thousands.
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_beta: float = 0.04  # DeepSeekMath GRPO value
    temperature: float = 1.0
    max_new_tokens: int = 6  # longest answer is "-198" + "\n" = 5 tokens; a 6th means "no stop"
    adv_eps: float = 1e-4
    # Rollouts per backward pass; None = all at once. Smaller micro-batches accumulate the same gradient (up
    # to float rounding) in less activation memory.
    micro_batch: int | None = None


@dataclass
class SFTConfig:
    steps: int = 150
    batch_size: int = 64
    # Pretraining peak / 10 and 10x the RL LR, mirroring LLM practice (SFT ~1e-5..2e-5, RL ~1e-6).
    lr: float = 1e-4
    warmup_steps: int = 10
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    name: str = "full"
    rl_seeds: tuple[int, ...] = (0, 1, 2)
    eval_size: int = 500  # held-out problems per task, greedy decoding


def quick_config() -> RunConfig:
    """A tiny configuration that exercises every code path in well under a minute."""
    return RunConfig(
        name="quick",
        model=ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=176),
        pretrain=PretrainConfig(steps=400, batch_size=64, warmup_steps=20, lr=3e-3),
        rl=RLConfig(steps=6, prompts_per_step=16, group_size=8),
        sft=SFTConfig(steps=4, batch_size=32, warmup_steps=1),
        eval_size=64,
    )


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any tuple of labels (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------------------------------
# Data: problems are (prompt, answer) with prompt "a?b=" and the answer computed by Python, which is
# also what the RL verifier checks against.
# --------------------------------------------------------------------------------------------------
def sample_problem(kind: str, rng: random.Random) -> tuple[str, int]:
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}=", a + b
    if kind == "sub":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}-{b}=", a - b
    if kind == "mul":
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        return f"{a}*{b}=", a * b
    if kind == "chain":
        # Two operations evaluated left to right (no precedence issue: only + and -).
        a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 99)
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        ab = a + b if op1 == "+" else a - b
        return f"{a}{op1}{b}{op2}{c}=", ab + c if op2 == "+" else ab - c
    raise ValueError(kind)


FINETUNE_KIND = "chain"


def held_out_set(kinds: list[str], size: int, seed: int) -> list[tuple[str, int]]:
    """A fixed set of distinct problems, `size` per kind, never used for training."""
    rng = random.Random(seed)
    problems: list[tuple[str, int]] = []
    for kind in kinds:
        seen: set[str] = set()
        while len(seen) < size:
            prompt, answer = sample_problem(kind, rng)
            if prompt not in seen:
                seen.add(prompt)
                problems.append((prompt, answer))
    return problems


class ProblemStream:
    """Seeded stream of training problems that skips every held-out prompt."""

    def __init__(self, mix: dict[str, float], exclude: set[str], seed: int):
        self.kinds, self.weights = list(mix), list(mix.values())
        self.exclude = exclude
        self.rng = random.Random(seed)

    def next(self) -> tuple[str, int]:
        while True:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            prompt, answer = sample_problem(kind, self.rng)
            if prompt not in self.exclude:
                return prompt, answer

    def batch(self, n: int) -> list[tuple[str, int]]:
        return [self.next() for _ in range(n)]


def right_pad(rows: list[list[int]], pad_id: int = PAD_ID) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def left_pad(rows: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and a bool mask of real tokens; used for batched generation.

    The mask comes from the row lengths, not from comparing with `pad_id`: a tokenizer's pad token may also
    occur inside a prompt (SmolLM2 pads with <|im_end|>, which its chat template uses).
    """
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], dtype=torch.bool)
    return ids, mask


# --------------------------------------------------------------------------------------------------
# Model: a Llama decoder in miniature. Module names are chosen so that state_dict() keys are exactly
# the Hugging Face LlamaForCausalLM names, and RoPE uses HF's rotate_half convention, so the saved
# checkpoints load as a LlamaForCausalLM with the written config.json.
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache):
        bsz, seq, _ = x.shape
        q, k, v = (
            p(x).view(bsz, seq, heads, self.head_dim).transpose(1, 2)
            for p, heads in ((self.q_proj, self.n_heads), (self.k_proj, self.n_kv), (self.v_proj, self.n_kv))
        )
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
        new_cache = (k, v)  # the cache keeps one copy per KV head
        if self.n_kv != self.n_heads:  # grouped-query attention: KV head j serves query heads j*g .. j*g+g-1
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        if attn_mask is None:  # plain causal self-attention over an unpadded prefix (pretraining)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1)), new_cache


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache):
        h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        # Untied: a separate output matrix. Tied (SmolLM2): the head reuses model.embed_tokens.weight, so the
        # state dict, and every checkpoint written from it, has no lm_head.weight.
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # not a weight: kept out of checkpoints
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.initializer_range)

    #: Where `logits_from` applies: False computes the head at every position and returns a slice (the
    #: computation the miniature's committed checkpoints come from); True applies the head to the kept
    #: positions only, which saves most of the head's time and memory when the vocabulary is large.
    head_on_kept_positions_only = False

    def forward(self, ids, positions=None, key_mask=None, cache=None, logits_from=None):
        """Logits for `ids` [B, T], or for positions `logits_from`: onwards when given.

        `positions` [B, T] are RoPE positions (default 0..T-1). `key_mask` [B, T_past + T] marks real
        (non-padding) tokens among all keys; when given, attention is causal *and* skips left padding.
        `cache` holds per-layer (k, v) of earlier tokens for incremental decoding.
        Returns (logits, new_cache).
        """
        bsz, seq = ids.shape
        dev = ids.device
        past = 0 if cache is None else cache[0][0].shape[2]
        if positions is None:
            positions = torch.arange(past, past + seq, device=dev).expand(bsz, seq)
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, head_dim]
        cos, sin = emb.cos(), emb.sin()
        attn_mask = None
        if key_mask is not None or cache is not None:
            if key_mask is None:
                key_mask = torch.ones(bsz, past + seq, dtype=torch.bool, device=dev)
            q_idx = torch.arange(past, past + seq, device=dev)[:, None]
            k_idx = torch.arange(past + seq, device=dev)[None, :]
            # Causal and non-padding; a query may always see itself so that rows belonging to padding
            # positions are never fully masked (which would produce NaNs that leak through V).
            attn_mask = ((k_idx <= q_idx) & key_mask[:, None, :]) | (k_idx == q_idx)
            attn_mask = attn_mask[:, None]  # broadcast over heads
        x = self.model.embed_tokens(ids)
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            x, layer_cache = layer(x, cos, sin, attn_mask, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        if logits_from is not None and self.head_on_kept_positions_only:
            x = x[:, logits_from:]
        x = self.model.norm(x)
        logits = F.linear(x, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
        if logits_from is not None and not self.head_on_kept_positions_only:
            logits = logits[:, logits_from:]
        return logits, new_cache


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Decoding and evaluation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    fmt=CHAR_FORMAT,
):
    """Batched decoding with a KV cache. Returns (prompt_ids, prompt_mask, completion_ids), on the model's device.

    Prompts are `fmt.prompt_ids(problem)`; tokens after a sequence's first `fmt.eos_id` are `fmt.pad_id`.
    """
    dev = next(model.parameters()).device
    ids, mask = left_pad([fmt.prompt_ids(p) for p in prompts], fmt.pad_id)
    ids, mask = ids.to(dev), mask.to(dev)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits, cache = model(ids, positions, mask, logits_from=-1)
    key_mask, pos = mask, positions[:, -1]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    out = []
    for step in range(max_new_tokens):
        last = logits[:, -1].float()
        if greedy:
            tok = last.argmax(-1)
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tok = torch.where(finished, torch.full_like(tok, fmt.pad_id), tok)
        out.append(tok)
        finished |= tok == fmt.eos_id
        if finished.all() or step == max_new_tokens - 1:
            break
        pos = pos + 1
        key_mask = torch.cat((key_mask, torch.ones(len(prompts), 1, dtype=torch.bool, device=dev)), dim=1)
        logits, cache = model(tok[:, None], pos[:, None], key_mask, cache)
    return ids, mask, torch.stack(out, dim=1)


_INT_RE = re.compile(r"-?\d+")


def completion_text(row: torch.Tensor, fmt=CHAR_FORMAT) -> str | None:
    """The answer string before the first EOS ("\\n"), or None if the model never stopped."""
    ids = row.tolist()
    return fmt.decode(ids[: ids.index(fmt.eos_id)]) if fmt.eos_id in ids else None


def reward(row: torch.Tensor, answer: int, fmt=CHAR_FORMAT) -> float:
    """Verifiable reward: 1 if the completion parses as an integer equal to the true result."""
    text = completion_text(row, fmt)
    return float(text is not None and _INT_RE.fullmatch(text) is not None and int(text) == answer)


@torch.no_grad()
def accuracy(
    model, problems: list[tuple[str, int]], max_new_tokens: int = 6, chunk: int = 500, fmt=CHAR_FORMAT
) -> float:
    correct = 0.0
    for i in range(0, len(problems), chunk):
        part = problems[i : i + chunk]
        _, _, comp = generate(model, [p for p, _ in part], max_new_tokens, greedy=True, fmt=fmt)
        correct += sum(reward(row, ans, fmt) for row, (_, ans) in zip(comp.cpu(), part, strict=True))
    return correct / len(problems)


def evaluate(
    model,
    eval_sets: dict[str, list[tuple[str, int]]],
    fmt=CHAR_FORMAT,
    max_new_tokens: int = 6,
    chunk: int = 500,
) -> dict[str, float]:
    model.eval()
    return {
        name: round(accuracy(model, probs, max_new_tokens, chunk, fmt), 4)
        for name, probs in eval_sets.items()
    }


# --------------------------------------------------------------------------------------------------
# Training phases
# --------------------------------------------------------------------------------------------------
def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear weights, embeddings) only, never on norm gains."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def lm_batch(
    problems: list[tuple[str, int]], answer_only: bool, fmt=CHAR_FORMAT
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for next-token prediction on prompt + answer, e.g. "\\n{prompt}{answer}\\n" lines.

    Padding targets are -100 (ignored); with answer_only (SFT) the prompt tokens are ignored too. Prompt and
    answer are tokenized separately, as generation sees them (a BPE could merge across the boundary otherwise).
    """
    prompts = [fmt.prompt_ids(p) for p, _ in problems]
    rows = [ids + fmt.answer_ids(a) for ids, (_, a) in zip(prompts, problems, strict=True)]
    seq = right_pad(rows, fmt.pad_id)
    targets = seq[:, 1:].clone()
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        targets[i, len(row) - 1 :] = -100  # padding
        if answer_only:
            targets[i, : len(prompt) - 1] = -100  # positions predicting prompt tokens (incl. "=")
    return seq[:, :-1], targets


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    logits, _ = model(inputs.to(dev))
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.to(dev).reshape(-1), ignore_index=-100
    )


def pretrain(model, cfg: PretrainConfig, stream: ProblemStream, log) -> dict:
    opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    curve, running = [], 0.0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = lm_loss(model, *lm_batch(stream.batch(cfg.batch_size), answer_only=False))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running += loss.item()
        every = max(1, cfg.steps // 20)
        if (step + 1) % every == 0:
            curve.append({"step": step + 1, "loss": round(running / every, 4)})
            log(f"  pretrain step {step + 1}/{cfg.steps} loss {running / every:.4f}")
            running = 0.0
    return {"loss_curve": curve}


def sft(model, cfg: SFTConfig, stream: ProblemStream, log, fmt=CHAR_FORMAT) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:  # linear warmup then linear decay to 0 (HF Trainer default)
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return cfg.lr * (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps)

    model.train()
    curve = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = lm_loss(model, *lm_batch(stream.batch(cfg.batch_size), answer_only=True, fmt=fmt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        curve.append(round(loss.item(), 4))
        if (step + 1) % max(1, cfg.steps // 6) == 0:
            log(f"  sft step {step + 1}/{cfg.steps} loss {loss.item():.4f}")
    return {"loss_curve": curve}


def sequence_logprobs(model, prompt_ids, prompt_mask, completion, eos_id: int = EOS_ID):
    """Per-token log-probs of `completion` [B, n] given left-padded prompts, and its valid-token mask.

    A completion token is valid up to and including its first EOS ("\\n"); later tokens are PAD.
    """
    full = torch.cat((prompt_ids, completion), dim=1)
    key_mask = torch.cat((prompt_mask, torch.ones_like(completion, dtype=torch.bool)), dim=1)
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    # Only the logits that predict completion tokens.
    logits, _ = model(full[:, :-1], positions[:, :-1], key_mask[:, :-1], logits_from=prompt_ids.shape[1] - 1)
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completion[..., None]).squeeze(-1)
    is_eos = (completion == eos_id).long()
    valid = (is_eos.cumsum(1) - is_eos) == 0  # nothing after the first EOS
    return logp, valid.float()


def grpo_terms(model, ref_model, cfg: RLConfig, prompt_ids, prompt_mask, comp, adv, eos_id: int):
    """Per-sequence GRPO loss (policy gradient + k3 KL, averaged over the sequence's valid tokens) and KL."""
    logp, valid = sequence_logprobs(model, prompt_ids, prompt_mask, comp, eos_id)
    with torch.no_grad():
        ref_logp, _ = sequence_logprobs(ref_model, prompt_ids, prompt_mask, comp, eos_id)
    log_ratio = ref_logp - logp
    k3 = torch.exp(log_ratio) - log_ratio - 1
    per_token = -adv[:, None] * logp + cfg.kl_beta * k3
    return (per_token * valid).sum(1) / valid.sum(1), ((k3 * valid).sum(1) / valid.sum(1)).detach()


def grpo(
    model, ref_model, cfg: RLConfig, stream: ProblemStream, generator: torch.Generator, log, fmt=CHAR_FORMAT
) -> dict:
    """GRPO with one gradient step per rollout batch (fully on-policy).

    Because the policy that sampled is the one being updated, the importance ratio is exactly 1 and
    PPO clipping never activates; the loss reduces to REINFORCE with group-normalised advantages plus
    the k3 KL estimator to the frozen base: k3 = exp(ref - logp) - (ref - logp) - 1 per token.
    Per-token terms are averaged within each sequence, then over sequences (the original GRPO form).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    G = cfg.group_size
    curve = []
    for step in range(cfg.steps):
        problems = stream.batch(cfg.prompts_per_step)
        prompts = [p for p, _ in problems for _ in range(G)]
        answers = [a for _, a in problems for _ in range(G)]
        model.eval()
        prompt_ids, prompt_mask, comp = generate(
            model, prompts, cfg.max_new_tokens, cfg.temperature, generator, fmt=fmt
        )
        rewards = torch.tensor([reward(row, a, fmt) for row, a in zip(comp.cpu(), answers, strict=True)])
        grouped = rewards.view(-1, G)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + cfg.adv_eps)).view(
            -1
        )
        adv = adv.to(comp.device)

        model.train()
        # One pass over the whole batch is kept as its own branch: it is the computation the committed
        # checkpoints come from, and accumulating micro-batches rounds differently.
        if cfg.micro_batch is None:
            per_seq, kl_seq = grpo_terms(
                model, ref_model, cfg, prompt_ids, prompt_mask, comp, adv, fmt.eos_id
            )
            loss = per_seq.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        else:
            opt.zero_grad(set_to_none=True)
            kl_parts = []
            for i in range(0, len(prompts), cfg.micro_batch):
                part = slice(i, i + cfg.micro_batch)
                per_seq, kl_part = grpo_terms(
                    model,
                    ref_model,
                    cfg,
                    prompt_ids[part],
                    prompt_mask[part],
                    comp[part],
                    adv[part],
                    fmt.eos_id,
                )
                (per_seq.sum() / len(prompts)).backward()  # the mean over all sequences, accumulated
                kl_parts.append(kl_part)
            kl_seq = torch.cat(kl_parts)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        kl = kl_seq.mean().item()
        solved = (grouped.std(1) > 0).float().mean().item()  # groups that carry a learning signal
        curve.append(
            {
                "step": step + 1,
                "reward": round(rewards.mean().item(), 4),
                "kl": round(kl, 6),
                "informative_groups": round(solved, 3),
            }
        )
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            log(
                f"  rl step {step + 1}/{cfg.steps} reward {rewards.mean():.3f} kl {kl:.5f} "
                f"informative groups {solved:.2f}"
            )
    return {"reward_curve": curve}


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "initializer_range": cfg.initializer_range,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "bfloat16",
        "char_vocab": VOCAB,  # token i is the character char_vocab[i]
    }


def bf16_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model, out_dir: Path, name: str, config: dict | None = None) -> dict:
    """Write `model` as bf16 safetensors plus `config` (default: the miniature's HF config) as config.json."""
    path = out_dir / name
    path.mkdir(parents=True, exist_ok=True)
    save_file(bf16_state(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model.cfg) if config is None else config
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"path": f"{name}/model.safetensors", "bytes": (path / "model.safetensors").stat().st_size}


def round_to_bf16_(model: nn.Module) -> None:
    """Replace the float32 weights by their bf16 values (still stored as float32)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


# --------------------------------------------------------------------------------------------------
@contextmanager
def timed(results: dict, name: str) -> Iterator[None]:
    """Record a phase's wall time and this process's CPU time.

    CPU time well below 2x wall time means the process was waiting for cores taken by other work,
    which is how to read wall times from a shared machine.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    results["wall_time_s"][name] = round(time.perf_counter() - wall, 1)
    results["cpu_time_s"][name] = round(time.process_time() - cpu, 1)


def run(cfg: RunConfig, out: Path, seed: int, log=print) -> dict:
    """Pretrain, fine-tune (RL x seeds, SFT), save every checkpoint and results.json under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    # Held-out evaluation sets: the fine-tuning task, and the single-operation pretraining problems
    # (to see how much each fine-tune forgets). Their prompts never appear in any training stream.
    eval_sets = {
        "chain": held_out_set([FINETUNE_KIND], cfg.eval_size, derive_seed(seed, "eval", "chain")),
        "single_op": held_out_set(
            ["add", "sub", "mul"], max(1, cfg.eval_size // 3), derive_seed(seed, "eval", "single")
        ),
    }
    exclude = {p for probs in eval_sets.values() for p, _ in probs}

    torch.manual_seed(derive_seed(seed, "init"))
    model = LlamaForCausalLM(cfg.model)
    n_params = param_count(model)
    log(f"model: {n_params:,} parameters ({n_params * 2 / 1e6:.2f} MB as bf16)")

    results: dict = {
        "command": " ".join(["python", *sys.argv]),
        "seed": seed,
        "configuration": cfg.name,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "parameter_count": n_params,
        "config": asdict(cfg),
        "finetune_task": FINETUNE_KIND,
        "eval_sizes": {k: len(v) for k, v in eval_sets.items()},
        "wall_time_s": {},
        "cpu_time_s": {},
        "load_average_1min": {"start": round(os.getloadavg()[0], 2)},
        "accuracy": {},
        "checkpoints": {},
    }

    # ---- Pretraining -------------------------------------------------------------------------------
    log(f"pretraining {cfg.pretrain.steps} steps x {cfg.pretrain.batch_size} lines")
    stream = ProblemStream(cfg.pretrain.mix, exclude, derive_seed(seed, "pretrain-data"))
    with timed(results, "pretrain"):
        results["pretrain"] = pretrain(model, cfg.pretrain, stream, log)

    # Fine-tunes start from the released bf16 base, so round now and evaluate exactly what is saved.
    round_to_bf16_(model)
    results["checkpoints"]["base"] = save_checkpoint(model, out, "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with timed(results, "eval_base"):
        results["accuracy"]["base"] = evaluate(model, eval_sets)
    log(f"base accuracy {results['accuracy']['base']}")

    ref_model = LlamaForCausalLM(cfg.model)
    ref_model.load_state_dict(base_state)
    ref_model.eval().requires_grad_(False)
    finetune_mix = {FINETUNE_KIND: 1.0}

    def finish(name: str) -> None:
        results["checkpoints"][name] = save_checkpoint(model, out, name)
        round_to_bf16_(model)  # evaluate the saved (bf16) weights, not the float32 master copy
        results["accuracy"][name] = evaluate(model, eval_sets)
        log(f"{name} accuracy {results['accuracy'][name]}")

    # ---- RLVR ---------------------------------------------------------------------------------------
    results["rl"] = {}
    for rl_seed in cfg.rl_seeds:
        name = f"rl_seed{rl_seed}"
        model.load_state_dict(base_state)
        log(f"{name}: GRPO {cfg.rl.steps} steps x {cfg.rl.prompts_per_step} prompts x {cfg.rl.group_size}")
        stream = ProblemStream(finetune_mix, exclude, derive_seed(seed, name, "prompts"))
        gen = torch.Generator().manual_seed(derive_seed(seed, name, "sampling"))
        with timed(results, name):
            results["rl"][name] = grpo(model, ref_model, cfg.rl, stream, gen, log)
        finish(name)

    # ---- SFT ----------------------------------------------------------------------------------------
    model.load_state_dict(base_state)
    log(f"sft: {cfg.sft.steps} steps x {cfg.sft.batch_size} examples")
    stream = ProblemStream(finetune_mix, exclude, derive_seed(seed, "sft", "data"))
    with timed(results, "sft"):
        results["sft"] = sft(model, cfg.sft, stream, log)
    finish("sft")

    return write_results(results, out, wall_start, cpu_start, log)


def write_results(results: dict, out: Path, wall_start: float, cpu_start: float, log) -> dict:
    """Add the run's totals (wall and CPU time, end load, checkpoint bytes) and write ``out/results.json``."""
    results["wall_time_s"]["total"] = round(time.perf_counter() - wall_start, 1)
    results["cpu_time_s"]["total"] = round(time.process_time() - cpu_start, 1)
    results["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    results["checkpoint_bytes_total"] = sum(c["bytes"] for c in results["checkpoints"].values())
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"done in {results['wall_time_s']['total']} s; wrote {out / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "checkpoints",
        help="output directory (default: checkpoints/ next to this script)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny configuration for smoke tests (< 60 s)")
    parser.add_argument("--seed", type=int, default=0, help="seed from which every other seed is derived")
    args = parser.parse_args(argv)

    # Two threads and deterministic kernels: the run is reproducible bit for bit given the seed
    # (on the same machine and torch build).
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    results_cfg = quick_config() if args.quick else RunConfig()
    run(results_cfg, args.out, args.seed, log)


if __name__ == "__main__":
    main()
