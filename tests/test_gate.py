"""The CI gate: rule parsing, evaluation against hand-computed values, policy files, `check` and `compare`
exit codes, and golden JSON and Markdown outputs.

Most CLI runs are in-process (typer's CliRunner, with WeightdiffError mapped to its exit code as ``cli.main``
does); a few subprocess runs check the real entry point's exit codes and one-line errors. Set
WEIGHTDIFF_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import llama_like, perturb, write_checkpoint
from weightdiff import gate, schema
from weightdiff.cli import app
from weightdiff.errors import InputError, RuleError, WeightdiffError
from weightdiff.gate import load_policy, parse_rule
from weightdiff.verdict import to_markdown

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"

# --- A hand-made report whose aggregates are computed by hand below ------------------------------------------

PLAN = {
    "compared": 4,
    "excluded_by_filters": 0,
    "only_base": ["lm_head.weight"],
    "only_tuned": [],
    "shape_mismatch": [{"name": "model.extra.weight", "base": [10, 4], "tuned": [12, 4]}],
    "dtype_mismatch": [],
    "not_float": [],
}
CLEAN_PLAN = {**PLAN, "only_base": [], "shape_mismatch": []}


def _row(name: str, numel: int, exact: int, bf16: int, atol: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "module": name.rsplit(".", 2)[-2] if "." in name else name,
        "shape": [numel],
        "dtype_base": "BF16",
        "dtype_tuned": "BF16",
        "numel": numel,
        "changed_exact": exact,
        "changed_bf16": bf16,
        "changed_atol": atol,
        "sparsity_exact": 1 - exact / numel if numel else None,
        "sparsity_bf16": 1 - bf16 / numel if numel else None,
        "sparsity_atol": 1 - atol / numel if numel else None,
        "hidden_by_bf16": exact - bf16,
        "ulp_hist": [0] * 9,
        # base_fro is 1, so delta_fro = rel_delta keeps the summary's figures consistent with the rows.
        "delta_fro": extra.pop("delta_fro", extra.get("rel_delta") or 0.0),
        "base_fro": 1.0,
        "nonfinite_base": 0,
        "nonfinite_tuned": 0,
        **extra,
    }


def hand_rows() -> list[dict[str, Any]]:
    """Four tensors. Hand-computed figures used below:

    sparsity_bf16 overall = 1 - (0 + 120 + 30 + 0) / 1000 = 0.85; per tensor 1.0, 0.4, 0.9, 1.0
    sparsity_exact overall = 1 - 210 / 1000 = 0.79
    rel_delta numel-weighted = (0*100 + 0.02*200 + 0.01*300 + 0*400) / 1000 = 0.007
    angle_u_max_deg: 0, 1.5, 6, null -> weighted (0*100 + 1.5*200 + 6*300) / 600 = 3.5, mean 2.5, count 3
    """
    return [
        _row("model.embed_tokens.weight", 100, 0, 0, 0, rel_delta=0.0, angle_u_max_deg=0.0),
        _row("model.layers.0.mlp.up_proj.weight", 200, 150, 120, 100, rel_delta=0.02, angle_u_max_deg=1.5),
        _row("model.layers.0.self_attn.q_proj.weight", 300, 60, 30, 90, rel_delta=0.01, angle_u_max_deg=6.0),
        _row("model.layers.0.input_layernorm.weight", 400, 0, 0, 0, rel_delta=0.0),
    ]


def metadata(plan: dict[str, Any] | None = PLAN, version: str = schema.SCHEMA_VERSION) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "schema_version": version,
        "weightdiff_version": "0.1.0",
        "base": {"kind": "local", "given": "base/"},
        "tuned": {"kind": "local", "given": "tuned/"},
        "options": {"atol": 1e-5},
    }
    if plan is not None:
        meta["plan"] = plan
    return meta


def write_report(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Path:
    arrow_schema = schema.arrow_schema(metadata=metadata() if meta is None else meta)
    pq.write_table(schema.rows_to_table(rows, arrow_schema), str(path))
    return path


@pytest.fixture
def report(tmp_path: Path) -> Path:
    return write_report(tmp_path / "report.parquet", hand_rows())


def value(text: str, rows: list[dict[str, Any]] | None = None) -> float | int:
    return gate.evaluate_rule(parse_rule(text), hand_rows() if rows is None else rows).value


def invoke(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; a WeightdiffError becomes its exit code and message, as in ``cli.main``."""
    res = CliRunner().invoke(app, list(args))
    if isinstance(res.exception, WeightdiffError):
        return res.exception.exit_code, res.stdout, str(res.exception)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
    env.pop("WEIGHTDIFF_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "weightdiff", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


# --- Parser --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "aggregate", "column", "op", "threshold", "glob"),
    [
        ("sparsity_bf16 < 0.5", None, "sparsity_bf16", "<", 0.5, None),
        ("max(angle_u_max_deg) > 5", "max", "angle_u_max_deg", ">", 5.0, None),
        ('any(changed_exact > 0) on "*embed_tokens*"', "any", "changed_exact", ">", 0.0, "*embed_tokens*"),
        ("any(rel_delta) > 0.1 on *.mlp.*", "any", "rel_delta", ">", 0.1, "*.mlp.*"),
        ("all(rel_delta<=1e-3)", "all", "rel_delta", "<=", 1e-3, None),
        ("  mean ( rel_delta ) != -2.5E+3 on '*q_proj*'  ", "mean", "rel_delta", "!=", -2500.0, "*q_proj*"),
        ("count(rank_k)>=3", "count", "rank_k", ">=", 3.0, None),
        ("sparsity_exact == 1", None, "sparsity_exact", "==", 1.0, None),
        ("median(sv_drift_topk) > .25", "median", "sv_drift_topk", ">", 0.25, None),
        (
            "sum(changed_exact) >= 10 on model.layers.1*",
            "sum",
            "changed_exact",
            ">=",
            10.0,
            "model.layers.1*",
        ),
    ],
)
def test_parse_valid(text, aggregate, column, op, threshold, glob):
    rule = parse_rule(text)
    assert (rule.aggregate, rule.column, rule.op, rule.threshold, rule.glob) == (
        aggregate,
        column,
        op,
        threshold,
        glob,
    )
    assert rule.text == text.strip() and rule.severity == "fail"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "rule '', position 1: empty rule"),
        ("sparsity_bf16 < ", "rule 'sparsity_bf16 < ', position 17: expected a number, found end of rule"),
        ("sparsity_bf16 = 0.5", "rule 'sparsity_bf16 = 0.5', position 15: '=' is not an operator (use '==')"),
        ("sparsity_bf16 0.5", "rule 'sparsity_bf16 0.5', position 15: expected an operator"),
        ("sparsity_bf16 < 5x", "rule 'sparsity_bf16 < 5x', position 17: expected a number, found '5'"),
        ("3 < sparsity_bf16", "rule '3 < sparsity_bf16', position 1: expected a column or an aggregate"),
        (
            "max(angle_u_max_deg > 5)",
            "rule 'max(angle_u_max_deg > 5)', position 21: only any() and all() take a comparison",
        ),
        ("any(rel_delta > 0.1", "rule 'any(rel_delta > 0.1', position 20: expected ')', found end of rule"),
        ("mean(rel_delta x) > 1", "rule 'mean(rel_delta x) > 1', position 16: expected ')', found 'x'"),
        (
            "any(rel_delta > 0.1) > 3",
            "rule 'any(rel_delta > 0.1) > 3', position 22: any() already holds the comparison",
        ),
        (
            "sparsity_bf16 < 0.5 in '*'",
            "rule \"sparsity_bf16 < 0.5 in '*'\", position 21: expected 'on GLOB' or the end of the rule, "
            "found 'in'",
        ),
        (
            "sparsity_bf16 < 0.5 on '*mlp*",
            'rule "sparsity_bf16 < 0.5 on \'*mlp*", position 24: unterminated quoted glob',
        ),
        ("sparsity_bf16 < 0.5 on ''", "rule \"sparsity_bf16 < 0.5 on ''\", position 24: empty glob"),
        ("sparsity_bf16 < 0.5 on", "rule 'sparsity_bf16 < 0.5 on', position 23: expected a glob after 'on'"),
        (
            "sparsity_bf16 < 0.5 on *mlp* extra",
            "rule 'sparsity_bf16 < 0.5 on *mlp* extra', position 30: unexpected 'e' after the end of the rule",
        ),
        (
            "sparsity_bf17 < 0.5",
            "rule 'sparsity_bf17 < 0.5', position 1: unknown column 'sparsity_bf17' "
            "(did you mean sparsity_bf16?); valid columns: numel, changed_exact,",
        ),
        ("max(name) > 1", "rule 'max(name) > 1', position 5: unknown column 'name'"),
        ("count > 3", "rule 'count > 3', position 1: unknown column 'count'"),
    ],
)
def test_parse_errors_name_rule_and_position(text, message):
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_unknown_column_lists_every_valid_column():
    with pytest.raises(RuleError) as info:
        parse_rule("foo > 1")
    listed = str(info.value).split("valid columns: ")[1].split(", ")
    assert listed == list(gate.rule_columns())
    assert "sparsity_bf16" in listed and "angle_u_max_deg" in listed
    assert not {"name", "layer", "module", "shape", "ulp_hist", "svd_solver"} & set(listed)


def test_bad_severity_is_an_error():
    with pytest.raises(RuleError, match="severity must be 'fail' or 'warn', got 'error'"):
        parse_rule("numel > 1", severity="error")


# --- Evaluation against hand-computed values ----------------------------------------------------------------


def test_bare_sparsity_is_one_minus_summed_counts_exactly():
    assert value("sparsity_bf16 < 0.5") == 1 - 150 / 1000 == 0.85
    assert value("sparsity_exact < 0.5") == 1 - 210 / 1000
    assert value("sparsity_atol < 0.5") == 1 - 190 / 1000
    assert value("sparsity_bf16 < 0.5 on *layers.0.*") == 1 - 150 / 900
    # An empty tensor (null sparsity, numel 0) changes neither sum.
    rows = [*hand_rows(), _row("model.empty.weight", 0, 0, 0, 0)]
    assert value("sparsity_bf16 < 0.5", rows) == 0.85


def test_bare_column_is_numel_weighted_mean_ignoring_nulls():
    assert value("rel_delta > 1") == pytest.approx(0.007, rel=1e-15)
    # The layernorm's null angle is left out of the numerator and of the weights: / 600, not / 1000.
    assert value("angle_u_max_deg > 1") == pytest.approx(3.5, rel=1e-15)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mean(sparsity_bf16) < 0", (1.0 + 0.4 + 0.9 + 1.0) / 4),
        ("median(sparsity_bf16) < 0", 0.95),
        ("min(sparsity_bf16) < 0", 0.4),
        ("max(angle_u_max_deg) > 5", 6.0),
        ("mean(angle_u_max_deg) > 5", 2.5),
        ("median(angle_u_max_deg) > 5", 1.5),
        ("count(angle_u_max_deg) > 5", 3),
        ("count(rel_delta) > 5", 4),
        ("sum(changed_exact) > 5", 210),
        ("sum(changed_bf16) > 5 on *mlp*", 120),
        ("any(rel_delta > 0.015)", 1),
        ("any(rel_delta) > 0.015", 1),
        ("all(sparsity_bf16 < 0.95)", 2),
        ("any(changed_exact > 0) on '*embed_tokens*'", 0),
    ],
)
def test_aggregates(text, expected):
    got = value(text)
    assert got == pytest.approx(expected, rel=1e-15)
    assert type(got) is type(expected)  # counts and integer sums stay exact integers


def test_results_and_offenders_in_failing_direction():
    rows = [
        _row(f"t{i}", 10, i, i, i, rel_delta=r) for i, r in enumerate([0.3, 0.1, 0.7, 0.5, 0.2, 0.6, 0.4])
    ]
    res = gate.evaluate_rule(parse_rule("max(rel_delta) > 0.5"), rows)
    assert (res.value, res.result, res.tensors) == (0.7, "fail", 7)
    assert res.offenders == [("t2", 0.7), ("t5", 0.6), ("t3", 0.5), ("t6", 0.4), ("t0", 0.3)]
    res = gate.evaluate_rule(parse_rule("min(rel_delta) < 0.15"), rows)
    assert res.offenders[:3] == [("t1", 0.1), ("t4", 0.2), ("t0", 0.3)]
    # any(): only the tensors that meet the condition are offenders.
    res = gate.evaluate_rule(parse_rule("any(rel_delta >= 0.6)"), rows)
    assert (res.value, res.result, res.offenders) == (2, "fail", [("t2", 0.7), ("t5", 0.6)])
    res = gate.evaluate_rule(parse_rule("all(rel_delta > 0.05)"), rows)
    assert (res.value, res.result, len(res.offenders)) == (7, "fail", 5)
    res = gate.evaluate_rule(parse_rule("all(rel_delta > 0.15)"), rows)
    assert (res.value, res.result, res.offenders) == (6, "pass", [])
    res = gate.evaluate_rule(parse_rule("any(rel_delta != 0.32)"), rows)
    assert res.offenders[:3] == [("t2", 0.7), ("t5", 0.6), ("t1", 0.1)]  # farthest from the threshold first
    # A passing rule lists no offenders.
    res = gate.evaluate_rule(parse_rule("max(rel_delta) > 0.9"), rows)
    assert (res.result, res.offenders) == ("pass", [])


def test_release_that_did_nothing():
    rows = [_row("a", 10, 0, 0, 0), _row("b", 5, 0, 0, 0)]
    res = gate.evaluate_rule(parse_rule("sparsity_exact == 1"), rows)
    assert (res.value, res.result, res.offenders) == (1.0, "fail", [("a", 1.0), ("b", 1.0)])
    assert gate.evaluate_rule(parse_rule("sparsity_exact == 1"), hand_rows()).result == "pass"


def test_empty_selection_and_all_null_are_errors():
    with pytest.raises(RuleError, match=r"no tensor matches '\*experts\*' \(4 tensors in the report\)"):
        value("max(rel_delta) > 0 on *experts*")
    with pytest.raises(RuleError, match="angle_u_max_deg is null for all 1 selected tensors matching"):
        value("max(angle_u_max_deg) > 5 on *layernorm*")
    with pytest.raises(RuleError, match="sparsity_bf16 is null for all 1 selected tensors"):
        value("sparsity_bf16 < 0.5", [_row("e", 0, 0, 0, 0)])
    # delta_fro is 0.0 (not null) for an empty tensor, but a weighted mean with zero total weight is undefined.
    with pytest.raises(RuleError, match="the selected tensors hold no elements"):
        value("delta_fro > 1", [_row("e", 0, 0, 0, 0)])


def test_warn_severity_never_fails_the_gate():
    warn = parse_rule("sparsity_bf16 < 0.9", severity="warn", name="dense")
    ok = parse_rule("max(rel_delta) > 0.5")
    verdict = gate.evaluate([warn, ok], hand_rows(), CLEAN_PLAN)
    assert [r.result for r in verdict.rules] == ["warn", "pass"]
    assert (verdict.result, verdict.failed, verdict.warnings) == ("pass", False, 1)
    verdict = gate.evaluate([warn, parse_rule("max(rel_delta) > 0.01")], hand_rows(), CLEAN_PLAN)
    assert verdict.result == "fail"


def test_strict_fails_on_one_sided_and_shape_mismatches():
    verdict = gate.evaluate([], hand_rows(), PLAN, strict=True)
    assert verdict.result == "fail" and verdict.strict.mismatches == 2
    assert verdict.strict.as_dict() == {
        "enabled": True,
        "result": "fail",
        "only_base": ["lm_head.weight"],
        "only_tuned": [],
        "shape_mismatch": [{"name": "model.extra.weight", "base": [10, 4], "tuned": [12, 4]}],
    }
    assert gate.evaluate([], hand_rows(), CLEAN_PLAN, strict=True).result == "pass"
    off = gate.evaluate([], hand_rows(), PLAN, strict=False)
    assert off.result == "pass" and off.strict.result == "off" and off.strict.mismatches == 2
    with pytest.raises(InputError, match="--strict needs the comparison plan"):
        gate.evaluate([], hand_rows(), None, strict=True)


def test_non_finite_values_are_null_in_json():
    rows = [_row("a", 10, 1, 1, 1, rel_delta=math.inf)]
    res = gate.evaluate_rule(parse_rule("max(rel_delta) > 1"), rows)
    assert res.result == "fail" and res.as_dict()["value"] is None
    json.dumps(res.as_dict(), allow_nan=False)


# --- Policy files --------------------------------------------------------------------------------------------


def test_policy_file(tmp_path):
    p = tmp_path / "policy.toml"
    p.write_text(
        'strict = true\n\n[[rule]]\nname = "rl-sparsity"\nrule = "sparsity_bf16 < 0.5"\nseverity = "fail"\n'
        'description = "An RL release must keep bf16 sparsity above 50%"\n\n'
        '[[rule]]\nrule = \'any(rel_delta > 0.1) on "*.mlp.*"\'\nseverity = "warn"\n'
    )
    policy = load_policy(p)
    assert policy.strict is True
    a, b = policy.rules
    assert (a.name, a.severity, a.column, a.description) == (
        "rl-sparsity",
        "fail",
        "sparsity_bf16",
        "An RL release must keep bf16 sparsity above 50%",
    )
    assert (b.name, b.severity, b.aggregate, b.glob) == (None, "warn", "any", "*.mlp.*")
    rules, strict = gate.collect_rules(["numel > 1"], str(p))
    assert [r.text for r in rules][-1] == "numel > 1" and len(rules) == 3 and strict


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[[rule]]\nrule = "numel > 1"\nseverty = "warn"\n', "[[rule]] #1: unknown key 'severty'"),
        ('[[rule]]\nname = "x"\nseverity = "fail"\n', "[[rule]] #1 (x): missing 'rule = \"...\"'"),
        ('[[rule]]\nrule = "numel > 1"\nseverity = "error"\n', "severity must be 'fail' or 'warn'"),
        (
            '[[rule]]\nrule = "numel > 1"\n[[rule]]\nname = "b"\nrule = "numel >"\n',
            "[[rule]] #2 (b): rule 'numel >', position 8: expected a number",
        ),
        ("[[rule]\n", "not a valid TOML policy file"),
        ("rules = []\n", "unknown top-level key 'rules'"),
        ('strict = "yes"\n', "strict must be true or false"),
        ("", "the policy has no [[rule]] tables"),
    ],
)
def test_policy_errors_name_the_file(tmp_path, content, message):
    p = tmp_path / "policy.toml"
    p.write_text(content)
    with pytest.raises(RuleError) as info:
        gate.collect_rules([], str(p))
    assert str(info.value).startswith(f"{p}: ") and message in str(info.value), str(info.value)


def test_missing_policy_file(tmp_path):
    with pytest.raises(InputError, match="no such policy file"):
        load_policy(tmp_path / "nope.toml")


def test_shipped_policy_and_doc_recipes_parse():
    policy = load_policy(REPO / "examples" / "ci" / "policy.toml")
    assert policy.strict and {r.severity for r in policy.rules} == {"fail", "warn"}
    docs = (REPO / "docs" / "ci-gate.md").read_text()
    for recipe in (
        "sparsity_bf16 < 0.5",
        "max(angle_u_max_deg) > 5",
        'any(changed_exact > 0) on "*embed_tokens*"',
        "sparsity_exact == 1",
    ):
        assert f"--fail-if '{recipe}'" in docs
        parse_rule(recipe)


def test_workflow_runs_compare_with_policy_and_step_summary():
    yaml = pytest.importorskip("yaml")
    text = (REPO / "examples" / "ci" / "weightdiff-gate.yml").read_text()
    steps = yaml.safe_load(text)["jobs"]["gate"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/checkout@") for u in uses)
    assert any(u.startswith("actions/setup-python@") for u in uses)
    assert any(u.startswith("actions/upload-artifact@") for u in uses)
    script = " ".join(s.get("run", "") for s in steps)
    assert "pip install ." in script
    for part in (
        "--policy examples/ci/policy.toml",
        '--markdown "$GITHUB_STEP_SUMMARY"',
        "-o report.parquet",
    ):
        assert part in script


# --- weightdiff check on saved reports -----------------------------------------------------------------------


def test_check_exit_codes(report):
    assert invoke("check", str(report), "--fail-if", "sparsity_bf16 < 0.5")[0] == 0
    code, out, _ = invoke("check", str(report), "--fail-if", "sparsity_bf16 < 0.9")
    assert code == 1 and "FAIL" in out and "model.layers.0.mlp.up_proj.weight (0.4)" in out
    assert invoke("check", str(report), "--fail-if", "sparsity_bf16 < 0.9", "--exit-zero")[0] == 0
    code, _, message = invoke("check", str(report), "--fail-if", "sparsity_bf16 <")
    assert code == 2 and message.startswith("rule 'sparsity_bf16 <', position 16")
    code, _, message = invoke("check", str(report), "--fail-if", "max(rel_delta) > 0 on *expert*")
    assert code == 2 and "no tensor matches" in message
    # An unevaluable rule is an error even with --exit-zero.
    assert invoke("check", str(report), "--fail-if", "bogus > 1", "--exit-zero")[0] == 2
    code, _, message = invoke("check", str(report))
    assert code == 2 and message.startswith("nothing to check")


def test_check_strict_uses_plan_from_metadata(tmp_path, report):
    code, out, _ = invoke("check", str(report), "--strict")
    assert (
        code == 1
        and "1 only in base: lm_head.weight" in out
        and "model.extra.weight [10, 4] vs [12, 4]" in out
    )
    clean = write_report(tmp_path / "clean.parquet", hand_rows(), metadata(CLEAN_PLAN))
    assert invoke("check", str(clean), "--strict")[0] == 0
    noplan = write_report(tmp_path / "noplan.parquet", hand_rows(), metadata(None))
    code, _, message = invoke("check", str(noplan), "--strict")
    assert code == 2 and message.startswith(f"{noplan}: --strict needs the comparison plan")
    assert invoke("check", str(noplan), "--fail-if", "numel < 0")[0] == 0


def test_check_policy_warn_and_fail(tmp_path, report):
    warn = tmp_path / "warn.toml"
    warn.write_text('[[rule]]\nname = "dense"\nrule = "sparsity_bf16 < 0.9"\nseverity = "warn"\n')
    code, out, _ = invoke("check", str(report), "--policy", str(warn))
    assert code == 0 and "WARN" in out and "PASS: none of 1 rules failed, 1 warning" in out
    fail = tmp_path / "fail.toml"
    fail.write_text(warn.read_text().replace('"warn"', '"fail"'))
    assert invoke("check", str(report), "--policy", str(fail))[0] == 1
    # The --fail-if rules add to the policy's.
    code, out, _ = invoke("check", str(report), "--policy", str(warn), "--fail-if", "max(rel_delta) > 0.015")
    assert code == 1 and "1 of 2 rules failed, 1 warning" in out


def test_check_refuses_bad_reports(tmp_path):
    missing = tmp_path / "missing.parquet"
    code, _, message = invoke("check", str(missing), "--fail-if", "numel > 1")
    assert (code, message) == (2, f"{missing}: no such report file")
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet at all")
    code, _, message = invoke("check", str(text), "--fail-if", "numel > 1")
    assert code == 2 and message.startswith(f"{text}: not a Parquet report (")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"name": ["a"], "numel": [1]}), str(plain))
    code, _, message = invoke("check", str(plain), "--fail-if", "numel > 1")
    assert (
        code == 2
        and message == f"{plain}: not a weightdiff report (the Parquet file has no weightdiff metadata)"
    )
    future = write_report(tmp_path / "future.parquet", hand_rows(), metadata(version="2.0"))
    code, _, message = invoke("check", str(future), "--fail-if", "numel > 1")
    assert code == 2 and message.startswith(f"{future}: report schema version 2.0 is not supported")
    minor = write_report(tmp_path / "minor.parquet", hand_rows(), metadata(version="1.7"))
    assert invoke("check", str(minor), "--fail-if", "numel < 0")[0] == 0


def test_check_accepts_columns_added_by_a_newer_minor_version(tmp_path):
    rows = [{**r, "new_metric": float(i)} for i, r in enumerate(hand_rows())]
    base = schema.arrow_schema(metadata=metadata())
    extended = base.append(pa.field("new_metric", pa.float64(), nullable=True))
    path = tmp_path / "newer.parquet"
    pq.write_table(schema.rows_to_table(rows, extended), str(path))
    code, out, _ = invoke("check", str(path), "--fail-if", "max(new_metric) > 2")
    assert code == 1 and "model.layers.0.input_layernorm.weight (3)" in out


def test_check_json_to_stdout_puts_panel_on_stderr(report):
    code, out, err = invoke("check", str(report), "--fail-if", "sparsity_bf16 < 0.9", "--json", "-")
    assert code == 1
    doc = json.loads(out)
    assert doc["verdict"] == "fail" and doc["rules"][0]["value"] == 0.85
    assert "gate FAIL" in err


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("WEIGHTDIFF_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs; WEIGHTDIFF_UPDATE_GOLDEN=1 rewrites it"


def test_golden_json_and_markdown(tmp_path, report):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[rule]]\nname = "rl-sparsity"\nrule = "sparsity_bf16 < 0.9"\n'
        'description = "An RL release must keep bf16 sparsity above 90%"\n\n'
        '[[rule]]\nname = "rotation"\nrule = "max(angle_u_max_deg) > 5"\nseverity = "warn"\n\n'
        "[[rule]]\nrule = 'any(changed_exact > 0) on \"*embed_tokens*\"'\n"
    )
    js, md = tmp_path / "verdict.json", tmp_path / "summary.md"
    code, _, _ = invoke(
        "check",
        str(report),
        "--policy",
        str(policy),
        "--fail-if",
        "mean(rel_delta) >= 0.0075",
        "--strict",
        "--json",
        str(js),
        "--markdown",
        str(md),
    )
    assert code == 1
    # Nothing in either output depends on where the files live, but normalise the tmp dir to be sure.
    _golden("gate_verdict.json", js.read_text().replace(str(tmp_path), "<tmp>"))
    _golden("gate_summary.md", md.read_text().replace(str(tmp_path), "<tmp>"))


def test_markdown_without_rules_and_pipes_escaped():
    rows = [_row("a|b.weight", 10, 1, 1, 1, rel_delta=0.1, delta_fro=0.1)]
    text = to_markdown(None, rows, metadata())
    assert text.startswith("## weightdiff: no gate rules\n") and "`a\\|b.weight`" in text


# --- compare --fail-if end to end ----------------------------------------------------------------------------


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    base = llama_like(layers=1, hidden=8, inter=12)
    write_checkpoint(tmp_path / "base.safetensors", base)
    write_checkpoint(tmp_path / "tuned.safetensors", perturb(base))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def test_compare_gate_in_process(tmp_path, checkpoints):
    base, tuned = checkpoints
    out, js, md = tmp_path / "r.parquet", tmp_path / "s.json", tmp_path / "s.md"
    common = ["compare", str(base), str(tuned), "--no-spectral", "-q"]
    code, stdout, _ = invoke(
        *common, "-o", str(out), "--json", str(js), "--markdown", str(md), "--fail-if", "sparsity_bf16 < 0.01"
    )
    assert code == 0 and "gate PASS: all 1 rules passed" in stdout
    doc = json.loads(js.read_text())
    assert doc["verdict"]["verdict"] == "pass" and "overall" in doc and "schema_version" not in doc["verdict"]
    # The gate's overall sparsity is the summary's headline figure, bit for bit.
    assert doc["verdict"]["rules"][0]["value"] == doc["overall"]["sparsity_bf16"]
    assert md.read_text().startswith("## ✅ weightdiff gate PASS: all 1 rules passed")
    # check on the saved report reaches the same verdict as compare did.
    code, stdout, _ = invoke("check", str(out), "--fail-if", "sparsity_bf16 < 0.01", "--json", "-")
    assert code == 0 and json.loads(stdout)["rules"] == doc["verdict"]["rules"]

    code, _, _ = invoke(*common, "-o", str(out), "--fail-if", "sparsity_bf16 > 0.5")
    assert code == 1 and out.exists()  # the report is kept for investigation
    assert invoke(*common, "--fail-if", "sparsity_bf16 > 0.5", "--exit-zero")[0] == 0
    # The release that did nothing: a checkpoint compared with itself.
    code, stdout, _ = invoke(
        "compare", str(base), str(base), "--no-spectral", "-q", "--fail-if", "sparsity_exact == 1"
    )
    assert code == 1 and "sparsity_exact == 1" in stdout
    # Without rules the JSON summary is unchanged (no verdict key) and the exit code stays 0.
    code, _, _ = invoke(*common, "--json", str(js))
    assert code == 0 and "verdict" not in json.loads(js.read_text())


def test_compare_strict_and_bad_rules(tmp_path, checkpoints):
    base, _ = checkpoints
    tensors = llama_like(layers=1, hidden=8, inter=12)
    tensors["extra.weight"] = torch.zeros(3)
    write_checkpoint(tmp_path / "more.safetensors", tensors)
    args = ["compare", str(base), str(tmp_path / "more.safetensors"), "--no-spectral", "-q"]
    assert invoke(*args)[0] == 0
    code, stdout, _ = invoke(*args, "--strict")
    assert code == 1 and "1 only in tuned: extra.weight" in stdout
    # A bad rule fails before any weight is read: no report is written.
    out = tmp_path / "never.parquet"
    code, _, message = invoke(*args, "-o", str(out), "--fail-if", "sparsity_bf16 <> 1")
    assert code == 2 and "position 16" in message and not out.exists()


def test_compare_exit_codes_subprocess(tmp_path, checkpoints):
    base, tuned = checkpoints
    out = tmp_path / "r.parquet"
    res = run(
        "compare", str(base), str(tuned), "-o", str(out), "--no-spectral", "--fail-if", "sparsity_bf16 > 0.5"
    )
    assert res.returncode == 1, res.stderr
    assert "gate FAIL: 1 of 1 rules failed" in res.stdout and out.exists()
    res = run("check", str(out), "--fail-if", "sparsity_bf16 > 0.5", "--exit-zero", "--json", "-")
    assert res.returncode == 0 and json.loads(res.stdout)["verdict"] == "fail"
    res = run("check", str(out), "--fail-if", "sparsity_bf16 > 0.99")
    assert res.returncode == 0, res.stderr
    write_checkpoint(tmp_path / "other.safetensors", {"unrelated": torch.zeros(2)})
    res = run("compare", str(base), str(tmp_path / "other.safetensors"), "--fail-if", "sparsity_bf16 > 0.5")
    assert res.returncode == 3 and "nothing to compare" in res.stderr


def test_check_errors_are_one_line_subprocess(tmp_path):
    missing = tmp_path / "missing.parquet"
    res = run("check", str(missing), "--fail-if", "sparsity_bf16 < 0.5")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {missing}: no such report file"]
