"""Build hook for the optional C kernel; all project metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "weightdiff._kernels",
            sources=["weightdiff/_kernels.c"],
            extra_compile_args=["-O3"],
            # Optional: without a C compiler the package still installs and uses its torch code path.
            optional=True,
        )
    ]
)
