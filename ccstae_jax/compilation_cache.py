"""A compilation cache on disk, so a command that compiles what an earlier one did reads it instead.

A ``ccstae train`` compiles its training step (about 10 s on a laptop CPU); training the same scan again reads that
program from this cache. The step holds the scan's measured geometry, so another scan compiles its own. The commands
of `ccstae_jax.cli` turn the cache on; a library user calls `enable` once, before the first computation.

Where the cache lives, in this order:

* ``JAX_COMPILATION_CACHE_DIR`` set: JAX's own setting, left as it is;
* ``CCSTAE_COMPILATION_CACHE`` set: that folder, or no cache for ``off`` (also ``0``, ``false``, ``no``, or empty);
* else ``$XDG_CACHE_HOME/ccstae-jax/xla``, ``~/.cache/ccstae-jax/xla`` without ``XDG_CACHE_HOME``.

Only programs that take JAX at least a second to compile are written (JAX's default threshold). Programs holding
a host callback (the CPU fit's pixel lists) are never cached, by JAX's rule. Deleting the folder is always safe.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "CCSTAE_COMPILATION_CACHE"
_OFF = ("", "0", "off", "false", "no", "none")


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/ccstae-jax/xla``, or ``~/.cache/ccstae-jax/xla``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "ccstae-jax" / "xla"


def chosen_directory() -> Path | None:
    """The folder `enable` uses (module docstring), or None: no cache of ours (switched off, or JAX's own
    ``JAX_COMPILATION_CACHE_DIR`` is in charge)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    value = os.environ.get(ENV_CACHE)
    if value is None:
        return default_directory()
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at ``directory`` (None: `chosen_directory`) and returns it; None
    when no cache of ours is set. A folder that cannot be created (a read-only home) leaves the cache off: caching
    only saves time, so it never stops a command."""
    import jax

    path = chosen_directory() if directory is None else Path(directory).expanduser()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
