"""A thin wrapper over Orbax's (V0) ``CheckpointManager`` for training states.

One checkpoint = one step directory ``<directory>/<step>/`` holding

* ``state``: the train state (a pytree of arrays, written with ``StandardSave``), and
* ``meta``: a small JSON dict (epoch, position in the epoch, ...), and, for epoch-end saves, the epoch's mean loss
  as the checkpoint *metric* that ranks the "best" checkpoint.

Saves are atomic: Orbax writes into a temporary directory and renames it when complete, so a process killed during
a save leaves the previous checkpoints untouched and an unfinished temporary directory that is ignored (and cleaned
up when the directory is next opened). Saves are asynchronous by default: ``save`` returns once the arrays are
copied off the devices, the files are written in the background; ``wait``/``close`` block until done.

Kept: the last ``keep_last`` checkpoints plus the one with the lowest metric (``keep_best``).

Restoring onto a different device count (saved on 4 devices, restored on 1, or the other way round) works because
the restore target carries shardings for the *current* mesh (see :func:`abstract_like`).

The Orbax V0 API is used because it is the stable one in orbax-checkpoint 0.12.x; this module is the only place
that imports Orbax, so moving to the V1 API later touches nothing else.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from ccstae_jax.errors import CcstaeError

__all__ = ["CheckpointError", "Checkpointer", "abstract_like"]

_METRIC = "epoch_loss"


class CheckpointError(CcstaeError):
    """A checkpoint could not be read (corrupt, incomplete or from a different model)."""


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | Any) -> Any:
    """Restore target: ``jax.ShapeDtypeStruct`` leaves with the shapes/dtypes of ``tree`` and ``sharding``.

    Args:
      tree: a pytree of arrays or of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
      sharding: one sharding for every leaf (e.g. replicated on the current mesh), or a pytree of shardings
        matching ``tree``.

    Returns:
      A pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set: restored arrays land in that layout, whatever
      the device count at save time.
    """
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding)


class Checkpointer:
    """Saves and restores train states in one directory, keeping the last K and the best.

    Args:
      directory: where the step directories go (created if missing).
      keep_last: how many of the most recent checkpoints to keep (>= 1).
      keep_best: also keep the checkpoint with the lowest ``metric`` (only saves given a metric compete).
      async_save: write files in a background thread (``save`` returns after the device-to-host copy).

    Example::

        ckpt = Checkpointer(run_dir / "checkpoints", keep_last=3)
        ckpt.save(100, state, meta={"epoch": 2})
        state, meta = ckpt.restore(abstract_like(state, replicated))
        ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3, keep_best: bool = True,
                 async_save: bool = True):
        if keep_last < 1:
            raise ValueError(f"Checkpointer: keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory).absolute()
        policies: list[Any] = [ocm.LatestN(n=keep_last)]
        if keep_best:
            policies.append(ocm.BestN(get_metric_fn=_metric_of, reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            best_fn=_metric_of if keep_best else None,
            best_mode="min",
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        try:
            self._mngr = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        except Exception as e:
            raise CheckpointError(f"cannot open the checkpoint directory {self.directory}: {e}") from e
        self._keep_best = keep_best

    # -- queries ------------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """Step of the newest finished checkpoint, or None if there is none."""
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """Step of the checkpoint with the lowest metric (None if no saved checkpoint has a metric)."""
        if not self._keep_best or not self.all_steps():
            return None
        step = self._mngr.best_step()
        metric = None if step is None else self.metric(step)
        return step if (metric is not None and math.isfinite(metric)) else None

    def metric(self, step: int) -> float | None:
        """The metric (epoch mean loss) saved with ``step``, or None."""
        m = self._mngr.metrics(step) if self._keep_best else None
        if m is None:
            return None
        value = float(_metric_of(m))
        return value if math.isfinite(value) else None

    # -- save / restore -----------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, meta: Mapping[str, Any] | None = None,
             metric: float | None = None) -> None:
        """Save ``state`` as checkpoint ``step`` (asynchronously unless ``async_save=False``).

        Args:
          step: the checkpoint's step number; must be larger than every step saved before.
          state: a pytree of ``jax.Array`` (any sharding).
          meta: JSON-serialisable dict stored beside the state.
          metric: lower is better; ranks the checkpoint for ``keep_best`` (e.g. the epoch's mean loss). None
            (a mid-epoch save) is stored as +inf: never the best, kept only while among the last ``keep_last``.
        """
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise CheckpointError(
                f"cannot save step {step} in {self.directory}: a checkpoint for step {latest} already exists")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {})))
        if self._keep_best:
            value = float("inf") if metric is None or not math.isfinite(metric) else float(metric)
            metrics = {_METRIC: value}
        else:
            metrics = None
        self._mngr.save(step, args=args, metrics=metrics, force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore a state into the layout of ``abstract_state``.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings (see :func:`abstract_like`); its tree
            structure, shapes and dtypes must match the saved state.
          step: which checkpoint; default the latest.

        Returns:
          ``(state, meta)``.

        Raises:
          CheckpointError: no checkpoint, or the checkpoint cannot be read or does not match ``abstract_state``
            (a corrupt file or a run directory of a different model).
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no finished checkpoint in {self.directory}")
        path = self.directory / str(step)
        self._check_structure(step, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            restored = self._mngr.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(
                f"cannot restore the checkpoint {path}: {type(e).__name__}: {e}\n"
                "It is corrupt or was written for a different model/optimizer. Delete that step directory to fall "
                "back to the previous checkpoint, or use a new run directory.") from e
        return restored["state"], dict(restored["meta"] or {})

    def _check_structure(self, step: int, abstract_state: Any) -> None:
        """Compare the saved tree (paths, shapes, dtypes) with the target before reading any array."""
        path = self.directory / str(step)
        try:
            saved_tree = self._mngr.item_metadata(step)["state"].tree
            saved = _leaf_specs(saved_tree)
        except Exception as e:
            raise CheckpointError(
                f"cannot read the metadata of the checkpoint {path}: {type(e).__name__}: {e}\n"
                "It is corrupt or incomplete. Delete that step directory to fall back to the previous checkpoint, "
                "or use a new run directory.") from e
        wanted = _leaf_specs(abstract_state)
        problems = [f"{k}: in the checkpoint, not in the current state" for k in sorted(set(saved) - set(wanted))]
        problems += [f"{k}: in the current state, not in the checkpoint" for k in sorted(set(wanted) - set(saved))]
        for k in sorted(set(saved) & set(wanted)):
            (s_shape, s_dtype), (w_shape, w_dtype) = saved[k], wanted[k]
            if s_shape is not None and (tuple(s_shape) != tuple(w_shape) or
                                        (s_dtype is not None and np.dtype(s_dtype) != np.dtype(w_dtype))):
                problems.append(f"{k}: saved {tuple(s_shape)} {s_dtype}, expected {tuple(w_shape)} {w_dtype}")
        if problems:
            shown = "\n  ".join(problems[:12]) + ("\n  ..." if len(problems) > 12 else "")
            raise CheckpointError(
                f"the checkpoint {path} does not match the state being restored (it was written for a different "
                f"model/optimizer configuration):\n  {shown}")

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _leaf_specs(tree: Any) -> dict[str, tuple[Any, Any]]:
    """``{'params.enc': (shape, dtype), ...}`` for arrays, ShapeDtypeStructs and Orbax ArrayMetadata leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(p): (getattr(v, "shape", None), getattr(v, "dtype", None)) for p, v in leaves}


def _metric_of(metrics: Mapping[str, Any]) -> float:
    return float(metrics[_METRIC])
