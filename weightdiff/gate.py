"""The CI gate: the rule grammar, its parser, policy files, and the evaluation of rules on report rows.

A rule states a FAILURE condition over the per-tensor report (``--fail-if 'sparsity_bf16 < 0.5'``)::

    RULE  := [AGG "("] COLUMN [")"] OP NUMBER ["on" GLOB]
    AGG   := mean | min | max | median | sum | count | any | all
    OP    := < | <= | > | >= | == | !=

A bare COLUMN is the overall, parameter-weighted value over the selected tensors (sparsities exactly
``1 - sum(changed_*) / sum(numel)``, the same figure ``summary.overall`` prints); AGG(COLUMN) aggregates the
per-tensor values; ``any(COLUMN OP NUMBER)`` / ``all(...)`` test every tensor. ``on GLOB`` restricts the rule to
tensors whose name matches (fnmatch, case-sensitive, like ``--include``). docs/ci-gate.md is the user guide.

This module parses, evaluates and loads saved reports; it returns a ``Verdict`` and never prints, renders or
decides exit codes (``weightdiff.verdict`` renders, ``weightdiff.cli`` exits). Problems with rules or policy
files raise ``RuleError``, problems with a report file ``InputError`` (both exit 2): a gate that cannot be
evaluated must never read as a pass.
"""

from __future__ import annotations

import difflib
import math
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pyarrow as pa

from weightdiff import schema
from weightdiff.errors import InputError, RuleError

AGGREGATES = ("mean", "min", "max", "median", "sum", "count", "any", "all")
#: Aggregates whose comparison is per tensor: the OP may sit inside the parentheses.
TENSORWISE = ("any", "all")
OPS = ("<=", ">=", "==", "!=", "<", ">")  # two-character operators first, so "<=" is not read as "<"
SEVERITIES = ("fail", "warn")
#: How many offending tensors a verdict lists per rule.
MAX_OFFENDERS = 5

# Sparsity columns are ratios of exact counts: their overall value is recomputed from the counts (never an
# average of ratios), so that a gate on ``sparsity_bf16`` agrees bit for bit with the summary's headline.
SPARSITY_COUNTS = {
    "sparsity_exact": "changed_exact",
    "sparsity_bf16": "changed_bf16",
    "sparsity_atol": "changed_atol",
}

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def rule_columns(extra: Iterable[pa.Field] = ()) -> tuple[str, ...]:
    """Columns a rule may name: the numeric metric columns of the schema (identity columns such as ``layer``
    are labels, not measurements), plus numeric ``extra`` fields of a report written by a newer minor version."""
    names = [c.name for c in schema.ELEMENTWISE_COLUMNS + schema.SPECTRAL_COLUMNS if _is_numeric(c.type)]
    identity = {c.name for c in schema.IDENTITY_COLUMNS}
    names += [f.name for f in extra if _is_numeric(f.type) and f.name not in names and f.name not in identity]
    return tuple(names)


@dataclass(frozen=True)
class Rule:
    """One parsed rule. ``aggregate`` is None for a bare column (the overall, parameter-weighted value)."""

    text: str
    column: str
    op: str
    threshold: float
    aggregate: str | None = None
    glob: str | None = None
    name: str | None = None
    severity: str = "fail"
    description: str | None = None

    def holds(self, value: float) -> bool:
        """Whether ``value OP threshold`` is true, i.e. the failure condition is met."""
        return _compare(value, self.op, self.threshold)


def _compare(a: float, op: str, b: float) -> bool:
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    if op == ">=":
        return a >= b
    if op == "==":
        return a == b
    return a != b


class _Scanner:
    """A cursor over the rule text that produces one-line errors naming the rule and a 1-based position."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> RuleError:
        at = self.pos if pos is None else pos
        return RuleError(f"rule {self.text!r}, position {at + 1}: {message}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos : self.pos + 1]

    def found(self) -> str:
        """What stands at the cursor, for error messages."""
        return repr(self.text[self.pos]) if self.pos < len(self.text) else "end of rule"

    def ident(self, what: str) -> tuple[str, int]:
        self.skip_space()
        m = _IDENT.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}, found {self.found()}")
        self.pos = m.end()
        return m.group(), m.start()

    def punct(self, char: str) -> None:
        if self.peek() != char:
            raise self.error(f"expected {char!r}, found {self.found()}")
        self.pos += 1

    def op(self) -> str:
        self.skip_space()
        for op in OPS:
            if self.text.startswith(op, self.pos):
                self.pos += len(op)
                return op
        if self.text.startswith("=", self.pos):
            raise self.error("'=' is not an operator (use '==')")
        raise self.error(f"expected an operator (one of {' '.join(OPS)}), found {self.found()}")

    def number(self) -> float:
        self.skip_space()
        m = _NUMBER.match(self.text, self.pos)
        if not m or _IDENT.match(self.text, m.end()):
            raise self.error(f"expected a number, found {self.found()}")
        self.pos = m.end()
        return float(m.group())

    def glob(self) -> str:
        self.skip_space()
        start = self.pos
        if self.pos >= len(self.text):
            raise self.error("expected a glob after 'on'")
        quote = self.text[self.pos]
        if quote in "'\"":
            end = self.text.find(quote, self.pos + 1)
            if end < 0:
                raise self.error("unterminated quoted glob", start)
            value = self.text[self.pos + 1 : end]
            self.pos = end + 1
        else:
            end = self.pos
            while end < len(self.text) and not self.text[end].isspace():
                end += 1
            value = self.text[self.pos : end]
            self.pos = end
        if not value:
            raise self.error("empty glob", start)
        return value


def parse_rule(
    text: str,
    *,
    columns: Sequence[str] | None = None,
    name: str | None = None,
    severity: str = "fail",
    description: str | None = None,
) -> Rule:
    """Parse one rule (grammar in the module docstring); raise ``RuleError`` naming the rule and position."""
    valid = tuple(columns) if columns is not None else rule_columns()
    s = _Scanner(text)
    if s.at_end():
        raise s.error("empty rule")
    word, word_pos = s.ident("a column or an aggregate")
    aggregate: str | None = None
    inner_op: tuple[str, float] | None = None
    if word in AGGREGATES and s.peek() == "(":
        aggregate = word
        s.punct("(")
        column, column_pos = s.ident("a column")
        if s.peek() != ")":
            # any(col > 0.1): the per-tensor comparison may sit inside the parentheses.
            op_pos = s.pos
            if aggregate not in TENSORWISE and s.peek() in tuple("<>=!"):
                raise s.error(
                    f"only any() and all() take a comparison inside the parentheses; write "
                    f"{aggregate}({column}) OP NUMBER",
                    op_pos,
                )
            if aggregate in TENSORWISE:
                op = s.op()
                inner_op = (op, s.number())
        s.punct(")")
    else:
        column, column_pos = word, word_pos
    _check_column(s, column, column_pos, valid)
    if inner_op is None:
        op = s.op()
        threshold = s.number()
    else:
        op, threshold = inner_op
        if not s.at_end() and s.peek() in tuple("<>=!"):
            raise s.error(f"{aggregate}() already holds the comparison; nothing may compare its result")
    glob: str | None = None
    if not s.at_end():
        keyword, keyword_pos = s.ident("'on GLOB' or the end of the rule")
        if keyword != "on":
            raise s.error(f"expected 'on GLOB' or the end of the rule, found {keyword!r}", keyword_pos)
        glob = s.glob()
    if not s.at_end():
        raise s.error(f"unexpected {s.found()} after the end of the rule")
    if severity not in SEVERITIES:
        raise RuleError(f"rule {text!r}: severity must be 'fail' or 'warn', got {severity!r}")
    return Rule(
        text=text.strip(),
        column=column,
        op=op,
        threshold=threshold,
        aggregate=aggregate,
        glob=glob,
        name=name,
        severity=severity,
        description=description,
    )


def _check_column(s: _Scanner, column: str, pos: int, valid: Sequence[str]) -> None:
    if column in valid:
        return
    close = difflib.get_close_matches(column, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise RuleError(
        f"rule {s.text!r}, position {pos + 1}: unknown column {column!r}{hint}; "
        f"valid columns: {', '.join(valid)}"
    )


# Policy files -----------------------------------------------------------------------------------------------


@dataclass
class Policy:
    """The rules of a policy file, and whether it asks for --strict."""

    rules: list[Rule] = field(default_factory=list)
    strict: bool = False


_RULE_KEYS = {"name", "rule", "severity", "description"}


def load_policy(path: str | Path, *, columns: Sequence[str] | None = None) -> Policy:
    """Read a policy TOML file: ``[[rule]]`` tables with ``rule`` (required), ``name``, ``severity`` ("fail"
    or "warn", default "fail") and ``description``; an optional top-level ``strict = true``. Unknown keys are
    errors, so that a misspelt ``severty = "warn"`` cannot silently turn a warning into a failure."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 has no tomllib
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise RuleError(f"{path}: --policy needs Python 3.11+ or the tomli package") from None
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: no such policy file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: policy is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise RuleError(f"{p}: not a TOML policy file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{p}: not a valid TOML policy file ({exc})") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read policy file ({exc.strerror or exc})") from None
    unknown = sorted(set(data) - {"rule", "strict"})
    if unknown:
        raise RuleError(f"{p}: unknown top-level key {unknown[0]!r} (expected [[rule]] tables and strict)")
    strict = data.get("strict", False)
    if not isinstance(strict, bool):
        raise RuleError(f"{p}: strict must be true or false, got {strict!r}")
    tables = data.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RuleError(f"{p}: 'rule' must be an array of tables ([[rule]])")
    rules = []
    for i, t in enumerate(tables, 1):
        where = f"{p}: [[rule]] #{i}" + (f" ({t['name']})" if isinstance(t.get("name"), str) else "")
        bad = sorted(set(t) - _RULE_KEYS)
        if bad:
            raise RuleError(f"{where}: unknown key {bad[0]!r} (expected name, rule, severity, description)")
        if not isinstance(t.get("rule"), str):
            raise RuleError(f"{where}: missing 'rule = \"...\"'")
        for key in ("name", "severity", "description"):
            if key in t and not isinstance(t[key], str):
                raise RuleError(f"{where}: {key} must be a string")
        try:
            rules.append(
                parse_rule(
                    t["rule"],
                    columns=columns,
                    name=t.get("name"),
                    severity=t.get("severity", "fail"),
                    description=t.get("description"),
                )
            )
        except RuleError as exc:
            raise RuleError(f"{where}: {exc}") from None
    return Policy(rules=rules, strict=strict)


# Evaluation -------------------------------------------------------------------------------------------------

Row = Mapping[str, Any]


@dataclass
class RuleResult:
    """A rule's outcome. ``value`` is the measured figure compared with the threshold; for any()/all() it is
    the number of selected tensors that meet the per-tensor condition. ``tensors`` counts the selected tensors
    that have a value for the column."""

    rule: Rule
    value: float | int
    tensors: int
    result: str  # "pass", "warn" or "fail"
    offenders: list[tuple[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.text,
            "name": self.rule.name,
            "severity": self.rule.severity,
            "description": self.rule.description,
            "value": _json_number(self.value),
            "tensors": self.tensors,
            "result": self.result,
            "offenders": [{"name": n, "value": _json_number(v)} for n, v in self.offenders],
        }


@dataclass
class StrictResult:
    """--strict: tensors on one side only and shape mismatches fail the gate (listed either way)."""

    enabled: bool
    only_base: list[str] = field(default_factory=list)
    only_tuned: list[str] = field(default_factory=list)
    shape_mismatch: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return len(self.only_base) + len(self.only_tuned) + len(self.shape_mismatch)

    @property
    def result(self) -> str:
        if not self.enabled:
            return "off"
        return "fail" if self.mismatches else "pass"

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "result": self.result,
            "only_base": self.only_base,
            "only_tuned": self.only_tuned,
            "shape_mismatch": self.shape_mismatch,
        }


@dataclass
class Verdict:
    """Every rule's result and the strict check; ``result`` is "fail" when any fail-severity rule or the
    strict check failed (warnings never fail the gate)."""

    rules: list[RuleResult]
    strict: StrictResult
    schema_version: str | None = schema.SCHEMA_VERSION

    @property
    def failed(self) -> bool:
        return any(r.result == "fail" for r in self.rules) or self.strict.result == "fail"

    @property
    def result(self) -> str:
        return "fail" if self.failed else "pass"

    @property
    def warnings(self) -> int:
        return sum(1 for r in self.rules if r.result == "warn")

    def as_dict(self) -> dict[str, Any]:
        """The JSON verdict written by ``--json``."""
        return {
            "schema_version": self.schema_version,
            "verdict": self.result,
            "rules": [r.as_dict() for r in self.rules],
            "strict": self.strict.as_dict(),
        }


def _json_number(v: float | int | None) -> float | int | None:
    # JSON has no NaN or infinity; a non-finite figure is written as null (the rule text keeps the threshold).
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _value(row: Row, column: str) -> float | int | None:
    v = row.get(column)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _describe_selection(rule: Rule) -> str:
    return f"tensors matching {rule.glob!r}" if rule.glob else "tensors"


def evaluate_rule(rule: Rule, rows: Sequence[Row]) -> RuleResult:
    """Evaluate one rule on report rows; ``RuleError`` when it selects no tensor or only null values."""
    selected = [r for r in rows if rule.glob is None or fnmatchcase(str(r.get("name")), rule.glob)]
    if not selected:
        where = f"no tensor matches {rule.glob!r}" if rule.glob else "the report has no tensors"
        raise RuleError(f"rule {rule.text!r}: {where} ({len(rows)} tensors in the report)")
    pairs = [(str(r.get("name")), _value(r, rule.column)) for r in selected]
    values = [(n, v) for n, v in pairs if v is not None]
    if not values:
        hint = (
            " (spectral columns are null after --no-spectral and for 1-D tensors)" if _spectral(rule) else ""
        )
        raise RuleError(
            f"rule {rule.text!r}: {rule.column} is null for all {len(selected)} selected "
            f"{_describe_selection(rule)}{hint}"
        )
    agg = rule.aggregate
    value: float | int
    if agg in TENSORWISE:
        meeting = [(n, v) for n, v in values if rule.holds(v)]
        value = len(meeting)
        triggered = value > 0 if agg == "any" else value == len(values)
        candidates = meeting
    else:
        value = _aggregate(rule, selected, values)
        triggered = rule.holds(value)
        candidates = values
    result = rule.severity if triggered else "pass"
    offenders = _worst(candidates, rule.op, rule.threshold) if triggered else []
    return RuleResult(rule=rule, value=value, tensors=len(values), result=result, offenders=offenders)


def _spectral(rule: Rule) -> bool:
    return rule.column in {c.name for c in schema.SPECTRAL_COLUMNS}


def _aggregate(rule: Rule, selected: Sequence[Row], values: list[tuple[str, float | int]]) -> float | int:
    nums = [v for _, v in values]
    agg = rule.aggregate
    if agg is None:
        return _overall(rule, selected)
    if agg == "count":
        return len(nums)
    if agg == "min":
        return min(nums)
    if agg == "max":
        return max(nums)
    if agg == "median":
        return statistics.median(nums)
    if agg == "sum":
        # Integer columns (counts) stay exact integers; floats are summed without cancellation loss.
        return sum(nums) if all(isinstance(v, int) for v in nums) else math.fsum(nums)
    return math.fsum(nums) / len(nums)  # mean


def _overall(rule: Rule, selected: Sequence[Row]) -> float:
    """The parameter-weighted value of a bare column over the selection (weights = numel, nulls ignored)."""
    count_column = SPARSITY_COUNTS.get(rule.column)
    if count_column is not None:
        # 1 - sum(changed) / sum(numel) from exact integers, over tensors whose sparsity is defined.
        kept = [r for r in selected if _value(r, rule.column) is not None]
        numel = sum(int(r["numel"]) for r in kept)
        changed = sum(int(r[count_column]) for r in kept)
        if numel == 0:
            raise RuleError(f"rule {rule.text!r}: the selected {_describe_selection(rule)} hold no elements")
        return 1 - changed / numel
    weighted = [(_value(r, rule.column), int(r["numel"])) for r in selected]
    kept_pairs = [(v, w) for v, w in weighted if v is not None]
    total = sum(w for _, w in kept_pairs)
    if total == 0:
        raise RuleError(f"rule {rule.text!r}: the selected {_describe_selection(rule)} hold no elements")
    return math.fsum(float(v) * w for v, w in kept_pairs) / total


def _worst(candidates: list[tuple[str, Any]], op: str, threshold: float) -> list[tuple[str, Any]]:
    """The top offenders in the failing direction: highest values first for > and >=, lowest for < and <=,
    farthest from the threshold for !=, and for == the tensors that sit exactly on it (report order breaks
    ties, so the list is deterministic)."""
    if op in (">", ">="):
        ranked = sorted(candidates, key=lambda nv: -nv[1])
    elif op in ("<", "<="):
        ranked = sorted(candidates, key=lambda nv: nv[1])
    elif op == "!=":
        ranked = sorted(candidates, key=lambda nv: -abs(nv[1] - threshold))
    else:
        ranked = sorted(candidates, key=lambda nv: abs(nv[1] - threshold))
    return ranked[:MAX_OFFENDERS]


def strict_check(plan: Mapping[str, Any] | None, enabled: bool, source: str = "the report") -> StrictResult:
    """The strict check from a plan dict (``Plan.as_dict()``, or the report's ``plan`` metadata)."""
    if plan is None:
        if enabled:
            raise InputError(
                f"{source}: --strict needs the comparison plan, and the report's metadata has none"
            )
        return StrictResult(enabled=False)
    return StrictResult(
        enabled=enabled,
        only_base=list(plan.get("only_base") or []),
        only_tuned=list(plan.get("only_tuned") or []),
        shape_mismatch=[dict(m) for m in plan.get("shape_mismatch") or []],
    )


def evaluate(
    rules: Sequence[Rule],
    rows: Sequence[Row],
    plan: Mapping[str, Any] | None = None,
    *,
    strict: bool = False,
    schema_version: str | None = schema.SCHEMA_VERSION,
    source: str = "the report",
) -> Verdict:
    """Evaluate every rule on the report rows, plus the strict check on the plan (``source`` names the
    report in errors)."""
    return Verdict(
        rules=[evaluate_rule(rule, rows) for rule in rules],
        strict=strict_check(plan, strict, source),
        schema_version=schema_version,
    )


# Saved reports ----------------------------------------------------------------------------------------------


@dataclass
class SavedReport:
    """A report read back from Parquet for ``weightdiff check``: rows, metadata and the Arrow schema."""

    path: Path
    rows: list[dict[str, Any]]
    metadata: dict[str, Any]
    arrow_schema: pa.Schema

    @property
    def plan(self) -> dict[str, Any] | None:
        plan = self.metadata.get("plan")
        return plan if isinstance(plan, dict) else None

    def columns(self) -> tuple[str, ...]:
        """Columns rules may name on this report: the schema's, plus numeric columns a newer minor version
        added."""
        return rule_columns(self.arrow_schema)


def load_report(path: str | Path) -> SavedReport:
    """Read a compare report; ``InputError`` for a missing or non-Parquet file, a file without weightdiff
    metadata, or one whose schema major version differs from this weightdiff's."""
    from weightdiff.reports import read_schema

    p, arrow_schema, metadata = read_schema(path)
    missing = [c for c in ("name", "numel") if c not in arrow_schema.names]
    if missing:
        raise InputError(f"{p}: not a weightdiff report (no {missing[0]!r} column)")
    from weightdiff.reports import read_table

    table = read_table(p)
    return SavedReport(path=p, rows=table.to_pylist(), metadata=metadata, arrow_schema=arrow_schema)


def collect_rules(
    fail_if: Sequence[str],
    policy: str | None,
    *,
    columns: Sequence[str] | None = None,
) -> tuple[list[Rule], bool]:
    """The rules of ``--policy`` (in file order) then those of ``--fail-if``, and whether the policy asks for
    strict mode. Parsing happens before any weight is read, so a typo fails in a second, not after an hour."""
    rules: list[Rule] = []
    strict = False
    if policy is not None:
        loaded = load_policy(policy, columns=columns)
        if not loaded.rules and not loaded.strict:
            raise RuleError(f"{policy}: the policy has no [[rule]] tables (and no strict = true)")
        rules += loaded.rules
        strict = loaded.strict
    rules += [parse_rule(text, columns=columns) for text in fail_if]
    return rules, strict
