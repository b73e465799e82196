"""Reading weightdiff reports with pandas: per-module and per-layer views, and joining two reports.

Run after producing two reports, e.g.:
    weightdiff compare examples/miniature/checkpoints/base examples/miniature/checkpoints/rl_seed0 -o rl.parquet
    weightdiff compare examples/miniature/checkpoints/base examples/miniature/checkpoints/sft -o sft.parquet
    python examples/pandas_analysis.py rl.parquet sft.parquet
Prints tables only; it writes nothing.
"""

from __future__ import annotations

import json
import sys

import pandas as pd
import pyarrow.parquet as pq


def load(path: str) -> tuple[pd.DataFrame, dict]:
    """The report as a DataFrame, and its metadata (JSON values under ``weightdiff.*`` keys)."""
    meta = {
        k.decode()[len("weightdiff.") :]: json.loads(v)
        for k, v in (pq.read_schema(path).metadata or {}).items()
        if k.startswith(b"weightdiff.")
    }
    return pd.read_parquet(path), meta


def overall_sparsity(df: pd.DataFrame) -> float:
    # Parameter-weighted, from the exact counts: never average per-tensor ratios.
    return 1 - df.changed_bf16.sum() / df.numel.sum()


def main(a_path: str, b_path: str) -> None:
    a, meta_a = load(a_path)
    b, meta_b = load(b_path)
    print(f"{meta_a['base']['given']} -> {meta_a['tuned']['given']}: bf16 sparsity {overall_sparsity(a):.2%}")
    print(
        f"{meta_b['base']['given']} -> {meta_b['tuned']['given']}: bf16 sparsity {overall_sparsity(b):.2%}\n"
    )

    # Per module: weighted sparsity and the median rotation of the top-k subspaces.
    per_module = a.groupby("module").agg(
        params=("numel", "sum"),
        changed=("changed_bf16", "sum"),
        angle_u_max_deg=("angle_u_max_deg", "median"),
        principal_overlap=("principal_overlap", "median"),
        principal_mask_density=("principal_mask_density", "median"),
    )
    per_module["sparsity_bf16"] = 1 - per_module.changed / per_module.params
    per_module["overlap_vs_random"] = per_module.principal_overlap / per_module.principal_mask_density
    print(per_module.drop(columns=["changed"]).to_string(float_format="{:.4g}".format), "\n")

    # Per layer x module: the "stripes" grid as a pivot table (layer is a nullable integer column).
    grid = a.dropna(subset=["layer"]).pivot_table(index="layer", columns="module", values="sparsity_bf16")
    print(grid.to_string(float_format="{:.3f}".format), "\n")

    # Joining two reports of the same base: which tensors does each fine-tune move more?
    joined = a.merge(b, on="name", suffixes=("_a", "_b"))
    joined["angle_ratio_b_over_a"] = joined.angle_u_max_deg_b / joined.angle_u_max_deg_a
    cols = ["name", "sparsity_bf16_a", "sparsity_bf16_b", "angle_u_max_deg_a", "angle_u_max_deg_b"]
    print(joined.sort_values("angle_ratio_b_over_a", ascending=False)[cols].head(10).to_string(index=False))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
