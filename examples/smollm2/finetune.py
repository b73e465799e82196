"""Fine-tune SmolLM2-135M-Instruct two ways (RLVR and SFT) on the miniature example's arithmetic task.

What it does
------------
Starts from the checkpoint that ``convert.py`` writes (``model.safetensors``, ``config.json``,
``tokenizer_gguf.json``) and runs the recipe of ``examples/miniature/train.py`` without its pretraining:

- the base: the converted bf16 weights, upcast to float32 master weights; the file itself is copied unchanged
  to ``OUT/base`` (a float32 input is rounded to bf16 first, so every fine-tune starts from bf16 values);
- RLVR: GRPO-style policy gradient on sampled answers, a verifiable 0/1 reward, group-normalised advantages
  and a k3 KL penalty to the frozen base, with Adam at an LLM RL learning rate; several seeds (``rl_seed0..``);
- SFT: cross-entropy on reference solutions of the same task (``sft``), Adam at an LLM SFT learning rate;
- every checkpoint as bf16 safetensors with Hugging Face Llama names, tied embeddings (no ``lm_head.weight``)
  and a ``config.json``, plus ``results.json`` (accuracies, hyperparameters, curves, wall times, device).

The task is the miniature's ``chain`` (``"12+7-30="``, two operations on operands in [0, 99]); the held-out
evaluation also covers single-operation problems, to see what each fine-tune forgets. Prompts are plain
completions after four fixed solved examples (``"5+3-2=6\\n...12+7-30="``) and an answer ends at a newline;
README.md says why. The problem generator, the model, the GRPO and SFT loops and the checkpoint writer are
imported from ``examples/miniature/train.py``.

What it does not do
-------------------
- It does not measure anything about the weights; run ``weightdiff compare`` on the outputs.
- Hyperparameters are standard choices for a model of this size (see README.md); they were not tuned to make
  any weight-level statistic come out one way or the other.
- The converted weights are a dequantized Q4_1 copy of SmolLM2 (see README.md), not the original release.
- It needs no network. It runs on CPU (slowly: the full recipe is meant for ``--device cuda``).

Usage::

    python examples/smollm2/finetune.py /tmp/smollm2-bf16 --out /tmp/smollm2-ft --device cuda   # full recipe
    python examples/smollm2/finetune.py /tmp/smollm2-bf16 --out /tmp/smollm2-quick --quick      # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# The shared pieces live next to this file (bpe.py) and in the miniature example (train.py); put both on the
# path so that this module also imports when it is not run as a script.
HERE = Path(__file__).resolve().parent
for _dir in (HERE, HERE.parent / "miniature"):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))
# As in train.py: OpenMP threads that sleep while idle, not spin, on shared cores. Read when torch loads its
# OpenMP runtime, so set before the import; it changes timing only.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bpe import BPE  # noqa: E402
from convert import sha256  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from train import (  # noqa: E402
    FINETUNE_KIND,
    LlamaForCausalLM,
    ModelConfig,
    ProblemStream,
    RLConfig,
    SFTConfig,
    derive_seed,
    evaluate,
    grpo,
    held_out_set,
    param_count,
    round_to_bf16_,
    save_checkpoint,
    sft,
    timed,
    write_results,
)

TOKENIZER_FILE = "tokenizer_gguf.json"


class SmolLM2(LlamaForCausalLM):
    """The miniature's Llama decoder, applying the output head only where logits are read.

    With 49,152 tokens the (tied) head is a fifth of a forward pass's work, and its logits at every prompt
    position would dominate the memory of a GRPO step. Grouped-query attention and tied embeddings come from
    the ModelConfig.
    """

    head_on_kept_positions_only = True


#: The solved examples in front of every prompt (and excluded from every training and evaluation set): both
#: operators in both positions, a negative result. They set the answer format "digits, then a newline".
SHOTS: tuple[tuple[str, int], ...] = (("5+3-2=", 6), ("40-15+7=", 32), ("12-30+9=", -9), ("71+8-46=", 33))


class FewShotFormat:
    """Prompt = the solved examples, one per line, then the problem; answer = its digits, then "\\n" (EOS).

    The interface of the miniature's ``CharFormat``: token ids for prompts and answers, the stop and padding
    ids, and decoding. Problems and answers are tokenized separately, in the examples too, because that is how
    the model writes an answer: after the "=" token. Tokenized as one text, "=-9" would become "=-", "9".
    """

    def __init__(self, bpe: BPE, shots: tuple[tuple[str, int], ...], pad_id: int) -> None:
        self.bpe = bpe
        newline = bpe.encode("\n")
        if len(newline) != 1:
            raise SystemExit(f"the tokenizer does not have a single newline token: {newline}")
        self.eos_id, self.pad_id = newline[0], pad_id
        self.prefix = "".join(f"{p}{a}\n" for p, a in shots)
        self.prefix_ids = [t for p, a in shots for t in (*bpe.encode(p), *self.answer_ids(a))]

    def prompt_ids(self, problem: str) -> list[int]:
        return self.prefix_ids + self.bpe.encode(problem)

    def answer_ids(self, answer: int) -> list[int]:
        return [*self.bpe.encode(str(answer)), self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return self.bpe.decode(ids)


# --------------------------------------------------------------------------------------------------
# Configuration. FULL is the recipe for a GPU; QUICK only checks that every code path works.
# --------------------------------------------------------------------------------------------------
def default_rl() -> RLConfig:
    # LLM RLVR values: constant LR 1e-6 (the low end of the usual 1e-6..3e-6 for GRPO on LLMs), G = 8 answers
    # per prompt, KL beta 0.04 (DeepSeekMath), Adam without weight decay, clipping at 1.0. The miniature's
    # 150 steps x 16 prompts, so that the two examples differ in the model and the learning rates only.
    # Backward passes over 32 rollouts at a time: a step over all 128 at once peaked at 19 GB of memory on
    # CPU, in micro-batches of 32 at 8 GB; the accumulated gradient is the same up to float rounding.
    return RLConfig(
        steps=150, prompts_per_step=16, group_size=8, lr=1e-6, kl_beta=0.04, max_new_tokens=6, micro_batch=32
    )


def default_sft() -> SFTConfig:
    # LLM SFT values: peak LR 1e-5 (10x the RL LR, as in the miniature), 10 warm-up steps then linear decay to
    # 0, Adam without weight decay, clipping at 1.0; the miniature's 150 steps x 64 examples.
    return SFTConfig(steps=150, batch_size=64, lr=1e-5, warmup_steps=10)


@dataclass
class FinetuneConfig:
    rl: RLConfig = field(default_factory=default_rl)
    sft: SFTConfig = field(default_factory=default_sft)
    name: str = "full"
    rl_seeds: tuple[int, ...] = (0, 1, 2)
    eval_size: int = 500  # held-out chain problems; a third as many of each single operation
    eval_chunk: int = 100  # prompts per generation batch during evaluation (bounds the logits' memory)
    shots: tuple[tuple[str, int], ...] = SHOTS


def quick_config() -> FinetuneConfig:
    """A tiny configuration that exercises every code path (under 2 minutes on one CPU core with SmolLM2-135M)."""
    return FinetuneConfig(
        name="quick",
        rl=replace(default_rl(), steps=2, prompts_per_step=4, group_size=4),
        sft=replace(default_sft(), steps=2, batch_size=8, warmup_steps=1),
        rl_seeds=(0, 1),
        eval_size=6,
    )


# --------------------------------------------------------------------------------------------------
# Loading the converted checkpoint
# --------------------------------------------------------------------------------------------------
def model_config(hf: dict) -> ModelConfig:
    """The miniature's ModelConfig for an HF Llama config.json (SmolLM2: GQA, tied embeddings)."""
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf["rms_norm_eps"]),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise SystemExit(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads ({cfg.head_dim})")
    if cfg.num_attention_heads % cfg.kv_heads:
        raise SystemExit("num_attention_heads must be a multiple of num_key_value_heads")
    if hf.get("rope_scaling") or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise SystemExit("rope_scaling and attention / MLP biases are not supported")
    return cfg


def file_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {str(f.get_slice(n).get_dtype()) for n in f.keys()}  # noqa: SIM118 - safe_open is not a mapping


def save_base(model, base_dir: Path, out: Path, hf: dict) -> dict:
    """OUT/base: the input file byte for byte when it is bf16, else the bf16 rounding of the model."""
    src = base_dir / "model.safetensors"
    path = out / "base"
    if file_dtypes(src) == {"BF16"}:
        path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        return {"path": "base/model.safetensors", "bytes": (path / "model.safetensors").stat().st_size}
    return save_checkpoint(model, out, "base", hf)


# --------------------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig, base_dir: Path, out: Path, seed: int, device: torch.device, log=print) -> dict:
    """Load the base, fine-tune (RL x seeds, SFT), save every checkpoint and results.json under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    hf = json.loads((base_dir / "config.json").read_text())
    tok = json.loads((base_dir / TOKENIZER_FILE).read_text(encoding="utf-8"))
    fmt = FewShotFormat(
        BPE(tok["tokens"], tok["merges"], tok["special_tokens"]), cfg.shots, tok["pad_token_id"]
    )
    mcfg = model_config(hf)
    out_hf = {**hf, "torch_dtype": "bfloat16"}

    # Same held-out sets as the miniature (chain, and single operations to see forgetting); the few-shot
    # problems are excluded from them and from every training stream.
    eval_sets = {
        "chain": held_out_set([FINETUNE_KIND], cfg.eval_size, derive_seed(seed, "eval", "chain")),
        "single_op": held_out_set(
            ["add", "sub", "mul"], max(1, cfg.eval_size // 3), derive_seed(seed, "eval", "single")
        ),
    }
    exclude = {p for probs in eval_sets.values() for p, _ in probs} | {p for p, _ in cfg.shots}

    model = SmolLM2(mcfg)
    state = load_file(str(base_dir / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    del state
    round_to_bf16_(model)  # a no-op for bf16 input; float32 input starts from its bf16 values too
    model.to(device)
    n_params = param_count(model)
    log(f"model: {n_params:,} parameters from {base_dir} on {device}")

    results: dict = {
        "command": " ".join(["python", *sys.argv]),
        "seed": seed,
        "configuration": cfg.name,
        "base_checkpoint": {
            "dir": str(base_dir),
            "sha256": sha256(base_dir / "model.safetensors"),
            "dtypes": sorted(file_dtypes(base_dir / "model.safetensors")),
        },
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "parameter_count": n_params,
        "config": asdict(cfg),
        "model_config": asdict(mcfg),
        "finetune_task": FINETUNE_KIND,
        "prompt_prefix": fmt.prefix,
        "eval_sizes": {k: len(v) for k, v in eval_sets.items()},
        "wall_time_s": {},
        "cpu_time_s": {},
        "seconds_per_step": {},
        "load_average_1min": {"start": round(os.getloadavg()[0], 2)},
        "accuracy": {},
        "checkpoints": {},
    }

    def score() -> dict[str, float]:
        return evaluate(model, eval_sets, fmt, cfg.rl.max_new_tokens, cfg.eval_chunk)

    results["checkpoints"]["base"] = save_base(model, base_dir, out, out_hf)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with timed(results, "eval_base"):
        results["accuracy"]["base"] = score()
    log(f"base accuracy {results['accuracy']['base']}")

    ref_model = SmolLM2(mcfg)
    ref_model.load_state_dict(base_state)
    ref_model.to(device).eval().requires_grad_(False)
    finetune_mix = {FINETUNE_KIND: 1.0}

    def finish(name: str) -> None:
        results["checkpoints"][name] = save_checkpoint(model, out, name, out_hf)
        round_to_bf16_(model)  # evaluate the saved (bf16) weights, not the float32 master copy
        with timed(results, f"eval_{name}"):
            results["accuracy"][name] = score()
        log(f"{name} accuracy {results['accuracy'][name]}")

    # ---- RLVR ---------------------------------------------------------------------------------------
    results["rl"] = {}
    for rl_seed in cfg.rl_seeds:
        name = f"rl_seed{rl_seed}"
        model.load_state_dict(base_state)
        log(f"{name}: GRPO {cfg.rl.steps} steps x {cfg.rl.prompts_per_step} prompts x {cfg.rl.group_size}")
        stream = ProblemStream(finetune_mix, exclude, derive_seed(seed, name, "prompts"))
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, name, "sampling"))
        with timed(results, name):
            results["rl"][name] = grpo(model, ref_model, cfg.rl, stream, gen, log, fmt)
        results["seconds_per_step"][name] = round(results["wall_time_s"][name] / max(1, cfg.rl.steps), 2)
        finish(name)

    # ---- SFT ----------------------------------------------------------------------------------------
    if cfg.sft.steps > 0:
        model.load_state_dict(base_state)
        log(f"sft: {cfg.sft.steps} steps x {cfg.sft.batch_size} examples")
        stream = ProblemStream(finetune_mix, exclude, derive_seed(seed, "sft", "data"))
        with timed(results, "sft"):
            results["sft"] = sft(model, cfg.sft, stream, log, fmt)
        results["seconds_per_step"]["sft"] = round(results["wall_time_s"]["sft"] / cfg.sft.steps, 2)
        finish("sft")

    return write_results(results, out, wall_start, cpu_start, log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="directory written by convert.py (bf16 recommended)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (about 1.3 GB in full)")
    parser.add_argument("--quick", action="store_true", help="tiny configuration for smoke tests")
    parser.add_argument("--seed", type=int, default=0, help="seed from which every other seed is derived")
    parser.add_argument("--rl-steps", type=int, help="GRPO steps per seed (default 150)")
    parser.add_argument("--sft-steps", type=int, help="SFT steps (default 150; 0 skips SFT)")
    parser.add_argument("--rl-seeds", type=int, help="number of RL seeds, rl_seed0.. (default 3; 0 skips RL)")
    parser.add_argument(
        "--group-size",
        type=int,
        help="answers sampled per prompt, G (default 8; more gives a sparse reward more signal)",
    )
    parser.add_argument("--eval-size", type=int, help="held-out chain problems (default 500)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    args = parser.parse_args(argv)

    cfg = quick_config() if args.quick else FinetuneConfig()
    if args.rl_steps is not None:
        cfg.rl = replace(cfg.rl, steps=args.rl_steps)
    if args.sft_steps is not None:
        cfg.sft = replace(cfg.sft, steps=args.sft_steps)
    if args.group_size is not None:
        if args.group_size < 2:
            parser.error("--group-size must be at least 2 (advantages are normalised within a group)")
        cfg.rl = replace(cfg.rl, group_size=args.group_size)
    if args.rl_seeds is not None:
        cfg.rl_seeds = tuple(range(args.rl_seeds))
    if args.eval_size is not None:
        cfg.eval_size = args.eval_size

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace for reproducible matmuls; read when its first handle is created.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Deterministic kernels: on CPU a run is reproducible bit for bit given the seed (same machine and torch
    # build). On CUDA some backward kernels have no deterministic variant; warn there instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    run(cfg, args.base, args.out, args.seed, device, log)


if __name__ == "__main__":
    main()
