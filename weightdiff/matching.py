"""Pairing for real-world checkpoint pairs: renamed tensors, tied embeddings and resized vocabularies.

``pairing.make_plan`` pairs tensors stored under the same name with the same shape. Real pairs of checkpoints
break that in three common ways, which ``build_plan`` repairs before and after calling it:

- Renames. A tuned-side name not found verbatim in the base is first rewritten by the user's ``--rename``
  rules (``REGEX=REPLACEMENT``, ``re.sub`` syntax, applied in order), then matched through wrapper-prefix
  normalisation (``model.``, ``language_model.model.``, ``model.language_model.``, ``base_model.model.``,
  ``language_model.`` stripped from the front): ``model.layers.0.x`` pairs with ``layers.0.x`` when exactly
  one name on each side normalises to the same string. Report rows keep the base name.
- Tied embeddings. A model that ties its output head to its input embedding stores one matrix for both. When
  one side stores ``lm_head.weight`` and the other ties it, the stored head is compared with the tying side's
  embedding; when both sides tie, the head is compared once (as the embedding), never counted twice. Tie
  status comes from config.json's ``tie_word_embeddings``; where it is absent, a side that stores no head but
  has an embedding is taken as tied (recorded as "tied (inferred)"), and one that stores a head as unknown.
- Resized vocabularies. An embedding or output head whose row count differs (added special tokens) while its
  column count matches is compared on the leading rows both sides have, through row slices of the stored
  tensors (``sources.rows``). Other shape mismatches stay listed and skipped.

The plan records all of it (``renamed``, ``tied``, ``resized``, ``consumed_scales``, ``notes``). Pure: functions
of names, header records and config dicts; nothing is read, nothing printed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from weightdiff.errors import InputError
from weightdiff.naming import natural_key
from weightdiff.pairing import Pair, Plan, make_plan, selected
from weightdiff.sources.format import FLOAT_DTYPES, TensorInfo
from weightdiff.sources.rows import row_slice

#: Wrapper prefixes that model classes and PEFT put in front of the same tensor, stripped for matching.
WRAPPER_PREFIXES = (
    "base_model.model.",
    "language_model.model.",
    "model.language_model.",
    "language_model.",
    "model.",
)
#: Output-head names (after wrapper prefixes): Llama/Qwen/Mistral, GPT-NeoX, original Llama/GGUF-style.
HEAD_NAMES = frozenset({"lm_head.weight", "embed_out.weight", "output.weight"})
_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
_FP8 = frozenset({"F8_E4M3", "F8_E5M2"})


def canonical(name: str) -> str:
    """``name`` with every leading wrapper prefix removed (``base_model.model.model.x`` -> ``x``)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix) :]
                changed = True
                break
    return name


def is_head_name(name: str) -> bool:
    """Whether ``name`` is a language model's output head (``lm_head.weight`` and its spellings)."""
    return canonical(name) in HEAD_NAMES


def is_embedding_name(name: str) -> bool:
    """Whether ``name`` is a token embedding (``embed_tokens``, ``wte``, ``word_embeddings``, ...)."""
    return _EMBED_RE.search(name) is not None


def is_resizable_name(name: str) -> bool:
    """Whether a row-count change of ``name`` is a vocabulary resize (embeddings and output heads only)."""
    return is_head_name(name) or is_embedding_name(name)


@dataclass(frozen=True)
class RenameRule:
    """One ``--rename REGEX=REPLACEMENT`` rule, applied to tuned-side names with ``re.sub``."""

    pattern: re.Pattern[str]
    replacement: str
    text: str

    def apply(self, name: str) -> str:
        try:
            return self.pattern.sub(self.replacement, name)
        except (re.error, IndexError) as exc:
            raise InputError(f"--rename {self.text!r}: bad replacement ({exc})") from None


def parse_renames(specs: Iterable[str]) -> tuple[RenameRule, ...]:
    """Parse ``REGEX=REPLACEMENT`` rules; raises ``InputError`` (one line) for a malformed one.

    The split is at the last ``=``: tensor names never contain one, while a regex may (``(?=...)``).
    """
    rules = []
    for spec in specs:
        regex, sep, replacement = spec.rpartition("=")
        if not sep or not regex:
            raise InputError(f"--rename {spec!r}: expected REGEX=REPLACEMENT, e.g. '^transformer\\.=model.'")
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise InputError(f"--rename {spec!r}: invalid regular expression ({exc})") from None
        rule = RenameRule(pattern, replacement, spec)
        rule.apply("")  # surfaces bad group references in the replacement now, not mid-run
        rules.append(rule)
    return tuple(rules)


def tie_flag(config: Mapping[str, Any] | None) -> bool | None:
    """config.json's ``tie_word_embeddings`` (top level, else a multimodal ``text_config``); None when absent."""
    for cfg in (config, (config or {}).get("text_config")):
        if isinstance(cfg, Mapping) and isinstance(cfg.get("tie_word_embeddings"), bool):
            return bool(cfg["tie_word_embeddings"])
    return None


@dataclass(frozen=True)
class ResizedPair(Pair):
    """A pair compared on its shared leading rows; ``base`` and ``tuned`` are the row slices."""

    base_full: TensorInfo
    tuned_full: TensorInfo


def match_names(
    base_names: Iterable[str], tuned_names: Iterable[str], rules: Sequence[RenameRule] = ()
) -> tuple[dict[str, str], list[dict[str, str]], list[str]]:
    """Map each tuned name to the name it is compared under (a base name when one matches).

    Returns the map, the renames that found a base tensor (``{"base", "tuned", "by"}``, by = rule or prefix)
    and notes (ambiguities, rules that matched nothing). Raises ``InputError`` when rules map two tuned
    tensors to one name.
    """
    base_set = set(base_names)
    key_of: dict[str, str] = {}
    owner: dict[str, str] = {}
    how: dict[str, str] = {}
    notes: list[str] = []
    for name in sorted(tuned_names):
        key = name
        for rule in rules:
            key = rule.apply(key)
        if key in owner:
            raise InputError(f"--rename maps both {owner[key]!r} and {name!r} to {key!r}")
        owner[key] = name
        key_of[name] = key
        if key != name:
            how[name] = "rule"
    unmatched_base: dict[str, list[str]] = {}
    for b in base_set - set(owner):
        unmatched_base.setdefault(canonical(b), []).append(b)
    unmatched_tuned: dict[str, list[str]] = {}
    for t, key in key_of.items():
        if key not in base_set:
            unmatched_tuned.setdefault(canonical(key), []).append(t)
    ambiguous = []
    for canon, ts in unmatched_tuned.items():
        bs = unmatched_base.get(canon)
        if not bs:
            continue
        if len(bs) == 1 and len(ts) == 1:
            key_of[ts[0]] = bs[0]
            how.setdefault(ts[0], "prefix")
        else:
            ambiguous.append(canon)
    if ambiguous:
        notes.append(
            f"{len(ambiguous)} names match several tensors after removing wrapper prefixes and were not paired: "
            + _few(sorted(ambiguous))
        )
    stray = sorted(t for t, h in how.items() if h == "rule" and key_of[t] not in base_set)
    if stray:
        notes.append(f"{len(stray)} tuned names renamed by --rename match no base tensor: " + _few(stray))
    renamed = [
        {"base": key_of[t], "tuned": t, "by": how[t]}
        for t in sorted(key_of, key=lambda n: (natural_key(key_of[n]), key_of[n]))
        if key_of[t] != t and key_of[t] in base_set
    ]
    return key_of, renamed, notes


def _few(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _embedding(listing: Mapping[str, TensorInfo]) -> str | None:
    """The token embedding of a checkpoint: the one 2-D embedding-named tensor, else the shallowest one."""
    found = sorted(
        (n.count("."), n) for n, i in listing.items() if is_embedding_name(n) and len(i.shape) == 2
    )
    if len(found) == 1 or (len(found) > 1 and found[0][0] < found[1][0]):
        return found[0][1]
    return None


def _tie_status(flag: bool | None, stores_head: bool, embedding: str | None) -> str:
    if flag is not None:
        return "tied" if flag else "untied"
    return "tied (inferred)" if not stores_head and embedding is not None else "unknown"


def _tied(status: str) -> bool:
    return status.startswith("tied")


def _same_columns(a: TensorInfo, b: TensorInfo) -> bool:
    return len(a.shape) == 2 == len(b.shape) and a.shape[1] == b.shape[1]


def apply_ties(
    base: dict[str, TensorInfo],
    tuned: dict[str, TensorInfo],
    base_flag: bool | None,
    tuned_flag: bool | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Resolve tied output heads in place on the two name -> record maps (tuned keyed by base names).

    Returns the plan's ``tied`` records and notes. See the module docstring for the rules.
    """
    notes: list[str] = []
    heads = sorted({n for n in (*base, *tuned) if is_head_name(n)})
    if len(heads) != 1:
        if len(heads) > 1:
            notes.append(f"several output-head tensors ({', '.join(heads)}); tied embeddings not resolved")
        elif base_flag is not None and tuned_flag is not None and base_flag != tuned_flag:
            notes.append(
                f"tie status changed: tie_word_embeddings is {base_flag} in base and {tuned_flag} in tuned"
            )
        return [], notes
    head = heads[0]
    hb, ht = head in base, head in tuned
    eb, et = _embedding(base), _embedding(tuned)
    sb, st = _tie_status(base_flag, hb, eb), _tie_status(tuned_flag, ht, et)
    if not (_tied(sb) or _tied(st)):
        return [], notes
    if _tied(sb) and _tied(st) and eb is not None and et is not None:
        # One matrix plays both roles on both sides: the embedding row compares it; a stored alias is skipped.
        base.pop(head, None)
        tuned.pop(head, None)
        compared = f"once, as {eb}"
    elif hb and ht:
        compared = f"{head} on both sides"
    elif hb and _tied(st) and et is not None and _same_columns(base[head], tuned[et]):
        tuned[head] = tuned[et]
        compared = f"base {head} with tuned {et}"
    elif ht and _tied(sb) and eb is not None and _same_columns(base[eb], tuned[head]):
        base[head] = base[eb]
        compared = f"base {eb} with tuned {head}"
    else:
        compared = "not compared"
        notes.append(f"{head}: stored on one side only and the other side's tie could not be resolved")
    record = {
        "name": head,
        "embedding": eb or et,
        "base": sb + ("" if hb else ", no head stored"),
        "tuned": st + ("" if ht else ", no head stored"),
        "compared": compared,
    }
    if "unknown" not in (sb, st) and _tied(sb) != _tied(st):
        changed = "base ties it, tuned does not" if _tied(sb) else "tuned ties it, base does not"
        notes.append(f"tie status of {head} changed: {changed} ({compared})")
    return [record], notes


def apply_resizes(plan: Plan, base: Mapping[str, TensorInfo], tuned: Mapping[str, TensorInfo]) -> None:
    """Move vocabulary resizes from ``plan.shape_mismatch`` to row-sliced pairs (in place)."""
    kept = []
    for name, bshape, tshape in plan.shape_mismatch:
        b, t = base[name], tuned[name]
        if not (is_resizable_name(name) and _same_columns(b, t)):
            kept.append((name, bshape, tshape))
            continue
        if b.dtype not in FLOAT_DTYPES or t.dtype not in FLOAT_DTYPES:
            plan.not_float.append(name)
            continue
        rows = min(bshape[0], tshape[0])
        plan.pairs.append(ResizedPair(name, row_slice(b, 0, rows), row_slice(t, 0, rows), b, t))
        if b.dtype != t.dtype:
            plan.dtype_mismatch.append((name, b.dtype, t.dtype))
        plan.resized.append(
            {
                "name": name,
                "base": list(bshape),
                "tuned": list(tshape),
                "rows_compared": rows,
                "rows_added": tshape[0] - bshape[0],
            }
        )
    plan.shape_mismatch = kept
    plan.pairs.sort(key=lambda p: (natural_key(p.name), p.name))
    plan.dtype_mismatch.sort(key=lambda m: (natural_key(m[0]), m[0]))
    plan.not_float.sort(key=lambda n: (natural_key(n), n))


def build_plan(
    base: Mapping[str, TensorInfo],
    tuned: Mapping[str, TensorInfo],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rules: Sequence[RenameRule] = (),
    base_tied: bool | None = None,
    tuned_tied: bool | None = None,
    base_scaled: Iterable[str] = (),
    tuned_scaled: Iterable[str] = (),
    consumed_scales: Iterable[str] = (),
) -> Plan:
    """The comparison plan of two header listings, with renames, ties and resizes resolved.

    ``base_tied`` / ``tuned_tied`` are the configs' tie flags (``tie_word_embeddings``; None when unknown),
    ``base_scaled`` / ``tuned_scaled`` the stored names of FP8 weights dequantised with block scales and
    ``consumed_scales`` the scale tensors folded into them. Filters apply to the names rows are reported under.
    """
    key_of, renamed, notes = match_names(base, tuned, rules)
    tuned_by_key = {key_of[name]: info for name, info in tuned.items()}
    base_map = dict(base)
    tied, tie_notes = apply_ties(base_map, tuned_by_key, base_tied, tuned_tied)
    plan = make_plan(base_map, tuned_by_key, include, exclude)
    apply_resizes(plan, base_map, tuned_by_key)
    original = {key: name for name, key in key_of.items()}
    plan.only_tuned = sorted((original.get(k, k) for k in plan.only_tuned), key=lambda n: (natural_key(n), n))
    plan.renamed = [r for r in renamed if selected(r["base"], include, exclude)]
    plan.tied = tied
    plan.consumed_scales = sorted(set(consumed_scales), key=lambda n: (natural_key(n), n))
    bs, ts = set(base_scaled), set(tuned_scaled)
    sides = [(p, p.base, p.base.name in bs) for p in plan.pairs]
    sides += [(p, p.tuned, p.tuned.name in ts) for p in plan.pairs]
    dequantized = sum(1 for _p, info, is_scaled in sides if is_scaled and info.dtype in _FP8)
    raw = sorted({p.name for p, info, is_scaled in sides if info.dtype in _FP8 and not is_scaled})
    if dequantized:
        notes.append(
            f"{dequantized} FP8 tensors dequantized to float32 with their block scales before comparison; "
            "changed_stored counts changed fp8 codes"
        )
    if raw:
        notes.append(
            f"{len(raw)} FP8 tensors have no scale tensor and are compared as raw fp8 values: " + _few(raw)
        )
    plan.notes = notes + tie_notes
    return plan


def plan_lines(plan: Plan, limit: int = 5) -> list[str]:
    """Human-readable lines for the plan's renames, ties, resizes, consumed scales and notes (plain text)."""
    lines = []
    for by, how in (("prefix", "after removing wrapper prefixes"), ("rule", "by --rename rules")):
        shown = [f"{r['tuned']} -> {r['base']}" for r in plan.renamed if r["by"] == by]
        if shown:
            lines.append(f"{len(shown)} tuned tensors paired {how}, e.g. " + _few(shown, 2))
    for t in plan.tied:
        lines.append(
            f"tied embeddings: {t['name']} (base: {t['base']}; tuned: {t['tuned']}); compared {t['compared']}"
        )
    if plan.resized:
        shown = [
            f"{r['name']} {r['base']} vs {r['tuned']} ({r['rows_compared']} rows compared, "
            f"{r['rows_added']:+d} rows)"
            for r in plan.resized
        ]
        lines.append(f"{len(shown)} resized vocabularies, compared on shared rows: " + _few(shown, limit))
    if plan.consumed_scales:
        lines.append(
            f"{len(plan.consumed_scales)} FP8 scale tensors folded into their weights: "
            + _few(plan.consumed_scales, limit)
        )
    lines.extend(plan.notes)
    return lines
