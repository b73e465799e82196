"""The report schema: every column of the compare report, its Arrow type and its meaning, in one place.

Column names and meanings are a contract (docs/report-schema.md is generated from this table and a test keeps
them equal): the CI gate, the docs and users' pandas code depend on them. Columns may be added; existing ones
are never renamed or redefined. This module defines data, builds Arrow schemas and metadata, and does no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

#: Bumped when a column changes meaning or type (never for added columns). `weightdiff check` refuses reports
#: whose major version differs from this one.
SCHEMA_VERSION = "1.0"


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str
    nullable: bool = False


_I64 = pa.int64()
_F64 = pa.float64()
_STR = pa.string()

IDENTITY_COLUMNS = (
    Column("name", _STR, "tensor name as stored in the base checkpoint"),
    Column(
        "layer",
        _I64,
        "block index parsed from the name (model.layers.N, transformer.h.N, ...); null outside blocks",
        True,
    ),
    Column("expert", _I64, "mixture-of-experts expert index (mlp.experts.E); null for other tensors", True),
    Column(
        "module", _STR, "name without layer prefix, expert index and parameter suffix, e.g. self_attn.q_proj"
    ),
    Column("shape", pa.list_(_I64), "tensor shape"),
    Column("dtype_base", _STR, "stored dtype in the base checkpoint (safetensors name, e.g. BF16)"),
    Column("dtype_tuned", _STR, "stored dtype in the tuned checkpoint"),
)

ELEMENTWISE_COLUMNS = (
    Column("numel", _I64, "number of elements N"),
    Column(
        "changed_exact",
        _I64,
        "elements whose stored values differ as numbers (+0 == -0; NaN counts as changed)",
    ),
    Column(
        "changed_bf16",
        _I64,
        "elements that differ after rounding both values to bfloat16 (round-to-nearest-even)",
    ),
    Column("changed_atol", _I64, "elements with NOT(|dW| <= atol), dW in float64"),
    Column("sparsity_exact", _F64, "1 - changed_exact / numel (null for empty tensors)", True),
    Column(
        "sparsity_bf16",
        _F64,
        "1 - changed_bf16 / numel: bf16-aware update sparsity (null for empty tensors)",
        True,
    ),
    Column("sparsity_atol", _F64, "1 - changed_atol / numel (null for empty tensors)", True),
    Column(
        "hidden_by_bf16", _I64, "changed_exact - changed_bf16: real updates that bf16 storage rounds away"
    ),
    Column(
        "ulp_hist",
        pa.list_(_I64),
        "9 counts of bf16 ULP distance over bf16-changed elements finite on both sides, "
        "buckets 1, 2, 3-4, 5-8, 9-16, 17-32, 33-64, 65-128, >=129",
    ),
    Column("delta_fro", _F64, "Frobenius norm of dW over entries finite in both checkpoints (float64)"),
    Column("base_fro", _F64, "Frobenius norm of W0 over its finite entries (float64)"),
    Column("rel_delta", _F64, "delta_fro / base_fro (null when base_fro is 0)", True),
    Column("delta_max", _F64, "max |dW| over entries finite in both (null when there are none)", True),
    Column(
        "cosine", _F64, "<W0, W+> / (|W0| |W+|) over entries finite in both (null when a norm is 0)", True
    ),
    Column("nonfinite_base", _I64, "NaN or Inf entries in the base tensor"),
    Column("nonfinite_tuned", _I64, "NaN or Inf entries in the tuned tensor"),
)

SPECTRAL_COLUMNS = (
    Column(
        "rank_k",
        _I64,
        "k = min(--rank, m, n) actually used (null for tensors that are not 2-D matrices)",
        True,
    ),
    Column(
        "angle_u_max_deg",
        _F64,
        "largest principal angle between the top-k left singular subspaces, degrees",
        True,
    ),
    Column(
        "angle_u_mean_deg",
        _F64,
        "mean principal angle between the top-k left singular subspaces, degrees",
        True,
    ),
    Column(
        "angle_v_max_deg",
        _F64,
        "largest principal angle between the top-k right singular subspaces, degrees",
        True,
    ),
    Column(
        "angle_v_mean_deg",
        _F64,
        "mean principal angle between the top-k right singular subspaces, degrees",
        True,
    ),
    Column(
        "sv_drift",
        _F64,
        "|S+ - S0| / |S0| over the full spectrum (null when only the top k was computed)",
        True,
    ),
    Column("sv_drift_topk", _F64, "|S+ - S0| / |S0| over the top k singular values", True),
    Column("sigma1_rel_change", _F64, "(S+[0] - S0[0]) / S0[0]", True),
    Column("topk_energy_rel_change", _F64, "(sum S+[:k] - sum S0[:k]) / sum S0[:k] (Ky Fan k-norm)", True),
    Column(
        "principal_overlap",
        _F64,
        "|U & P| / |U|: share of bf16-changed elements inside the principal mask P (null when nothing changed)",
        True,
    ),
    Column("principal_mask_density", _F64, "|P| / N: the random baseline for principal_overlap", True),
    Column(
        "lowmag_overlap", _F64, "|U & L| / |U| for the low-magnitude mask L (null when nothing changed)", True
    ),
    Column("lowmag_mask_density", _F64, "|L| / N: the random baseline for lowmag_overlap", True),
    Column(
        "principal_energy",
        _F64,
        "|U0k^T dW V0k|_F^2 / |dW|_F^2: update energy inside the base's top-k block (null when dW = 0)",
        True,
    ),
    Column(
        "principal_energy_baseline", _F64, "k*k / (m*n): principal_energy expected for a random update", True
    ),
    Column("delta_stable_rank", _F64, "|dW|_F^2 / |dW|_2^2 (null when dW = 0)", True),
    Column(
        "svd_solver",
        _STR,
        "solver that produced the spectral columns: exact, gram or fast (null when none ran)",
        True,
    ),
)

# Real-world checkpoint pairs (docs/real-world-checkpoints.md): resized vocabularies and FP8 storage.
REALWORLD_COLUMNS = (
    Column(
        "rows_compared",
        _I64,
        "resized vocabulary (embedding or output head): the leading rows both sides have, which every other "
        "column describes; null for tensors that were not resized",
        True,
    ),
    Column(
        "rows_added",
        _I64,
        "rows the tuned tensor has beyond the base's (negative: fewer); null for tensors that were not resized",
        True,
    ),
    Column(
        "added_rows_fro",
        _F64,
        "Frobenius norm (float64, finite entries) of the rows only one side has; null unless resized",
        True,
    ),
    Column(
        "changed_stored",
        _I64,
        "elements whose stored bit patterns differ, for FP8 tensors stored in one dtype on both sides (the fp8 "
        "codes before block scaling); null for other tensors",
        True,
    ),
)

COMPARE_COLUMNS: tuple[Column, ...] = (
    IDENTITY_COLUMNS + ELEMENTWISE_COLUMNS + SPECTRAL_COLUMNS + REALWORLD_COLUMNS
)
COLUMN_NAMES = tuple(c.name for c in COMPARE_COLUMNS)

_F64_LIST = pa.list_(_F64)

#: `weightdiff spectrum` report: one row per 2-D tensor of one checkpoint (tuned_* and drift columns are null
#: unless a second checkpoint was given).
SPECTRUM_COLUMNS: tuple[Column, ...] = (
    Column("name", _STR, "tensor name"),
    Column("layer", _I64, "block index parsed from the name; null outside blocks", True),
    Column("expert", _I64, "mixture-of-experts expert index; null for other tensors", True),
    Column("module", _STR, "name without layer prefix, expert index and parameter suffix"),
    Column("shape", pa.list_(_I64), "tensor shape"),
    Column("dtype", _STR, "stored dtype"),
    Column(
        "rank_k", _I64, "number of singular values in singular_values (min(--rank, m, n), all with --full)"
    ),
    Column("spectral_norm", _F64, "largest singular value sigma_1"),
    Column("frobenius_norm", _F64, "Frobenius norm (float64)"),
    Column("stable_rank", _F64, "frobenius_norm^2 / spectral_norm^2 (null for a zero matrix)", True),
    Column(
        "effective_rank", _F64, "exp(entropy of sigma_i / sum sigma), Roy & Vetterli, full spectrum", True
    ),
    Column("topk_energy_share", _F64, "sum of the top-k sigma^2 over frobenius_norm^2", True),
    Column("singular_values", _F64_LIST, "singular values, descending (top k, or all with --full)"),
    Column("tuned_spectral_norm", _F64, "sigma_1 of the tuned tensor (two checkpoints only)", True),
    Column("tuned_stable_rank", _F64, "stable rank of the tuned tensor (two checkpoints only)", True),
    Column("tuned_effective_rank", _F64, "effective rank of the tuned tensor (two checkpoints only)", True),
    Column(
        "tuned_singular_values", _F64_LIST, "singular values of the tuned tensor (two checkpoints only)", True
    ),
    Column(
        "sv_rel_drift",
        _F64_LIST,
        "per index (S+[i] - S0[i]) / S0[i] over the listed values (two checkpoints only)",
        True,
    ),
    Column("sv_drift", _F64, "|S+ - S0| / |S0| over the full spectrum (two checkpoints only)", True),
)

# `weightdiff consistency` (metrics.md section 3): one row per tensor present with one shape in the base and in
# every run. M_r is run r's bf16 update mask; "pairs" are the unordered pairs r < s of runs.
_CONSISTENCY_IDENTITY = tuple(
    c for c in IDENTITY_COLUMNS if c.name in ("name", "layer", "expert", "module", "shape")
)
CONSISTENCY_COLUMNS: tuple[Column, ...] = (
    *_CONSISTENCY_IDENTITY,
    Column("numel", _I64, "number of elements N"),
    Column("runs", _I64, "R: number of fine-tuned runs compared with the base"),
    Column(
        "changed",
        pa.list_(_I64),
        "per run, in command-line order: elements that differ from the base after rounding both to bfloat16",
    ),
    Column("density", pa.list_(_F64), "per run: changed / numel (items null for empty tensors)"),
    Column(
        "jaccard_mean",
        _F64,
        "mean over pairs r < s of |M_r and M_s| / |M_r or M_s|; pairs with an empty union are left out "
        "(null when every pair's union is empty)",
        True,
    ),
    Column(
        "jaccard_random",
        _F64,
        "mean over the same pairs of p q / (p + q - p q), p and q the two densities: "
        "the expected Jaccard of independent masks",
        True,
    ),
    Column("jaccard_ratio", _F64, "jaccard_mean / jaccard_random (null when the baseline is 0)", True),
    Column(
        "overlap_mean",
        _F64,
        "mean over ordered pairs r != s with non-empty M_r of |M_r and M_s| / |M_r| (one-sided overlap)",
        True,
    ),
    Column("overlap_random", _F64, "mean over the same ordered pairs of M_s's density", True),
    Column("consensus_mean", _F64, "mean of C = (1/R) sum_r M_r (null for empty tensors)", True),
    Column("unanimous", _I64, "elements changed by every run"),
    Column("unanimous_fraction", _F64, "unanimous / numel (null for empty tensors)", True),
)
CONSISTENCY_COLUMN_NAMES = tuple(c.name for c in CONSISTENCY_COLUMNS)

# `weightdiff consistency --stripes`: row and column means of each tensor's consensus map C, long format.
STRIPES_COLUMNS: tuple[Column, ...] = (
    Column("name", _STR, "tensor name"),
    Column("axis", _STR, "row (mean over a row of C; for 1-D tensors C itself) or col (mean over a column)"),
    Column("index", _I64, "row or column index"),
    Column("fraction", _F64, "mean of C over that row or column: the share of (run, element) pairs changed"),
)


def arrow_schema(
    columns: tuple[Column, ...] = COMPARE_COLUMNS, metadata: dict[str, Any] | None = None
) -> pa.Schema:
    """Arrow schema of ``columns``, with ``metadata`` stored as JSON strings under ``weightdiff.*`` keys."""
    fields = [pa.field(c.name, c.type, nullable=c.nullable) for c in columns]
    raw = encode_metadata(metadata or {})
    raw[b"pandas"] = pandas_metadata(columns)
    return pa.schema(fields, metadata=raw)


def pandas_metadata(columns: tuple[Column, ...]) -> bytes:
    """The ``pandas`` schema metadata that makes ``pandas.read_parquet`` restore nullable integer columns as
    ``Int64`` (instead of float64 with NaN); other columns keep pyarrow's default conversion."""
    entries = []
    for c in columns:
        numpy_type = "object"
        if pa.types.is_integer(c.type):
            numpy_type = "Int64" if c.nullable else "int64"
        elif pa.types.is_floating(c.type):
            numpy_type = "float64"
        pandas_type = {"Int64": "int64", "int64": "int64", "float64": "float64"}.get(numpy_type, "object")
        if pa.types.is_string(c.type):
            pandas_type = "unicode"
        elif pa.types.is_list(c.type):
            pandas_type = "list[int64]"
        entries.append(
            {
                "name": c.name,
                "field_name": c.name,
                "pandas_type": pandas_type,
                "numpy_type": numpy_type,
                "metadata": None,
            }
        )
    doc = {
        "index_columns": [],
        "column_indexes": [],
        "columns": entries,
        "creator": {"library": "weightdiff"},
    }
    return json.dumps(doc).encode()


def encode_metadata(metadata: dict[str, Any]) -> dict[bytes, bytes]:
    """Key-value metadata for a Parquet file: each value JSON-encoded under a ``weightdiff.`` key."""
    return {f"weightdiff.{k}".encode(): json.dumps(v, default=str).encode() for k, v in metadata.items()}


def decode_metadata(raw: dict[bytes, bytes] | None) -> dict[str, Any]:
    """Inverse of ``encode_metadata`` (other keys, e.g. pandas', are ignored)."""
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        key = k.decode(errors="replace")
        if key.startswith("weightdiff."):
            try:
                out[key[len("weightdiff.") :]] = json.loads(v)
            except json.JSONDecodeError:
                out[key[len("weightdiff.") :]] = v.decode(errors="replace")
    return out


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) to an Arrow table of exactly ``schema``; missing keys become nulls."""
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in schema.names} for row in rows], schema=schema
    )
