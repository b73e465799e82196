"""Build hook for the optional C kernel; all project metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "weightdiff._kernels",
            sources=["weightdiff/_kernels.c"],
            # Reassociating float sums lets the element loops vectorise; no flag here assumes finite values
            # (NaN and Inf are counted, so -ffinite-math-only would be wrong).
            extra_compile_args=[
                "-O3",
                "-fno-math-errno",
                "-fassociative-math",
                "-fno-signed-zeros",
                "-fno-trapping-math",
            ],
            # Optional: without a C compiler the package still installs and uses its torch code path.
            optional=True,
        )
    ]
)
