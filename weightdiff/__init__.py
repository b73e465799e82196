"""weightdiff: how a fine-tuned model differs from its base, weight by weight.

The public Python API is ``compare`` (and ``spectrum``), returning a ``Report`` whose ``table`` is the same
Arrow table the CLI writes as Parquet. See docs/ for the metrics and the report schema.
"""

from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("weightdiff")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"

from weightdiff.api import Report, compare

__all__ = ["Report", "__version__", "compare"]
