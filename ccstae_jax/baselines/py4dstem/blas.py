"""Thread control of numpy's OpenBLAS for py4DSTEM's disk detection.

Threading trap: with numpy >= 2 wheels and several OpenBLAS threads, py4DSTEM's ``'multicorr'`` disk detection runs
~20x slower (many tiny complex matrix products). Set ``OPENBLAS_NUM_THREADS=1`` (and ``MPLBACKEND=Agg``,
``TQDM_DISABLE=1``) *before* Python starts, e.g. ``env OPENBLAS_NUM_THREADS=1 ccstae baseline ...``. Inside a running
process the pool can still be resized through OpenBLAS's own API: (a) :func:`limit_blas` limits it to
``Py4DSTEMConfig.blas_threads`` during detection with ``threadpoolctl`` if installed, else by calling the loaded
OpenBLAS's ``*openblas_set_num_threads*`` through ctypes (Linux; measured 826 -> 42 ms per pattern on 2 cores),
else warns; and (b) `ccstae_jax.baselines.py4dstem.runner.run_baseline_subprocess` runs
``python -m ccstae_jax.baselines.py4dstem`` with ``BASELINE_ENV`` set — the way the CLI and the benchmark call it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable

_OPENBLAS_SYMBOLS = [
    (f"{pre}openblas_get_num_threads{suf}", f"{pre}openblas_set_num_threads{suf}")
    for pre in ("scipy_", "")
    for suf in ("64_", "_64_", "")
]


def openblas_controls() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) thread-count functions of every OpenBLAS loaded in this process (Linux; else empty)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    controls = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _OPENBLAS_SYMBOLS:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype = ctypes.c_int
                set_.argtypes = [ctypes.c_int]
                controls.append((get, set_))
                break
    return controls


@contextlib.contextmanager
def limit_blas(n: int | None):
    """Limit numpy's BLAS threads to ``n`` inside the block (threadpoolctl, else OpenBLAS's own API via ctypes)."""
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=int(n), user_api="blas"):
            yield
        return
    controls = openblas_controls()
    if not controls and os.environ.get("OPENBLAS_NUM_THREADS") != "1" and (os.cpu_count() or 1) > 1:
        warnings.warn(
            "py4DSTEM disk detection can be ~20x slower with multithreaded OpenBLAS (numpy >= 2) and the BLAS "
            "thread count could not be limited here. Set OPENBLAS_NUM_THREADS=1 before Python starts, install "
            "threadpoolctl, or use ccstae_jax.baselines.py4dstem.run_baseline_subprocess",
            RuntimeWarning,
            stacklevel=3,
        )
    before = [get() for get, _ in controls]
    for _, set_ in controls:
        set_(int(n))
    try:
        yield
    finally:
        for (_, set_), k in zip(controls, before):
            set_(k)
