"""One BLAS thread for the fast engine (see the package docstring: why)."""

from __future__ import annotations

import ctypes
import os

_OPENBLAS_SETTERS = (
    "openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
)


def limit_blas_threads(threads: int = 1) -> bool:
    """Best effort: make the OpenBLAS that NumPy loaded use `threads` threads.

    Process-wide. Does nothing (returns False) when `OPENBLAS_NUM_THREADS` is
    set (the operator's choice wins), off Linux, or when NumPy's BLAS is not an
    OpenBLAS found among the process's mapped libraries.
    """
    if os.environ.get("OPENBLAS_NUM_THREADS"):
        return False
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted(
                {
                    line.split()[-1]
                    for line in maps
                    if "openblas" in line.lower() and line.split()[-1].startswith("/")
                }
            )
    except OSError:
        return False
    done = False
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _OPENBLAS_SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                setter(int(threads))
                done = True
                break
    return done
