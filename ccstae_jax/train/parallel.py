"""Device mesh, batch sharding and multi-host start-up for data-parallel training.

Training is plain data parallelism: a 1-D mesh with one axis, ``'data'``, over every device of every process.
The batch axis (axis 0) is split over ``'data'``; parameters, optimiser state and scalars are replicated. ``jax.jit``
with these shardings inserts the gradient all-reduce itself, so the same step function runs on a laptop CPU, one
GPU, an 8-GPU node or a multi-node job.

Multi-host (several processes, each driving its local devices):

1. Every process calls :func:`initialize_distributed` before any other JAX call (`ccstae train` does when
   ``CCSTAE_DISTRIBUTED=1``). ``jax.distributed.initialize()`` detects SLURM, Open MPI, Cloud TPU and Kubernetes
   on its own; elsewhere pass ``coordinator_address``, ``num_processes`` and ``process_id``.
2. Each process reads only its share of the scan (``Scan.batches(..., process_index=jax.process_index(),
   process_count=jax.process_count())``): ``global batch / process_count`` patterns per step.
3. :func:`shard_batch` turns the per-process numpy batch into one global ``jax.Array`` with
   ``jax.make_array_from_process_local_data``; the same jitted step then runs on every process.
4. Orbax checkpoints are written by every process into the same (shared) run directory; logs and the metrics file
   come from process 0 only.

Launching on SLURM (one process per GPU; the run directory must be on a shared file system)::

    #SBATCH --nodes=2
    #SBATCH --ntasks-per-node=4          # one task per GPU
    #SBATCH --gpus-per-task=1
    export CCSTAE_DISTRIBUTED=1
    srun ccstae train data.h5 --out /shared/runs/exp1

or one process per node driving all of its GPUs (``--ntasks-per-node=1 --gpus-per-node=4``). JAX reads the
coordinator address, process count and process id from the SLURM environment. A single node with several GPUs
needs no distributed initialisation at all: one process sees every local GPU.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ccstae_jax.errors import CcstaeError

__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "replicated_sharding",
    "data_sharding",
    "pad_batch_to",
    "shard_batch",
    "initialize_distributed",
    "is_main_process",
]

DATA_AXIS = "data"
"""Name of the single mesh axis the batch is split over."""

_ENV_DISTRIBUTED = "CCSTAE_DISTRIBUTED"
_TRUE = ("1", "true", "yes", "on")

B = TypeVar("B", bound=NamedTuple)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices of all processes).

    The axis type is ``AxisType.Auto`` (shardings are hints to the compiler, no ``jax.set_mesh`` needed);
    ``jax.make_mesh`` would default to ``Explicit``.

    Args:
      devices: the devices to use, in mesh order. Default ``jax.devices()``.

    Returns:
      ``Mesh`` of shape ``(len(devices),)`` with axis name ``'data'``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: got an empty device list")
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits axis 0 (the batch axis) over the ``'data'`` mesh axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def pad_batch_to(batch: B, multiple: int, *, min_size: int = 0) -> B:
    """Pad a batch along axis 0 so its length is a multiple of ``multiple`` (and at least ``min_size``).

    Padding rows are zeros; ``weights`` of padding rows are 0 (the loss ignores them) and ``index`` is -1.

    Args:
      batch: a NamedTuple with fields ``images`` (B, H, W), ``weights`` (B,) and ``index`` (B,), numpy arrays
        (e.g. ``ccstae_jax.data.readers.Batch``).
      multiple: the padded length is a multiple of this (e.g. the number of local devices).
      min_size: the padded length is at least this (e.g. the fixed per-process batch size, so that the last, short
        batch of an epoch has the same shape as the others and nothing recompiles).

    Returns:
      A batch of the same type; ``batch`` itself when no padding is needed.
    """
    if multiple < 1:
        raise ValueError(f"pad_batch_to: multiple must be >= 1, got {multiple}")
    n = int(np.shape(batch.images)[0])
    for name in ("weights", "index"):
        if np.shape(getattr(batch, name))[0] != n:
            raise ValueError(
                f"pad_batch_to: batch.{name} has length {np.shape(getattr(batch, name))[0]}, "
                f"expected {n} (= batch.images.shape[0])")
    target = max(n, int(min_size))
    target = -(-target // multiple) * multiple
    if target == n:
        return batch
    extra = target - n

    def pad(a: Any, fill: float) -> np.ndarray:
        a = np.asarray(a)
        widths = [(0, extra)] + [(0, 0)] * (a.ndim - 1)
        return np.pad(a, widths, constant_values=fill)

    return batch._replace(images=pad(batch.images, 0), weights=pad(batch.weights, 0), index=pad(batch.index, -1))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch on the mesh, split along axis 0 over ``'data'``.

    Single process: ``jax.device_put``. Several processes: each process passes its *own* slice (all processes the
    same length) and the result is one global array of length ``local length x process_count`` built with
    ``jax.make_array_from_process_local_data``.

    Args:
      batch: a numpy array or a pytree (e.g. a tuple ``(images, weights)``) of numpy arrays with equal axis-0
        length, which must be divisible by the number of local devices (see :func:`pad_batch_to`).
      mesh: the data-parallel mesh from :func:`make_mesh`.

    Returns:
      The same pytree of global ``jax.Array`` with ``NamedSharding(mesh, P('data'))``.
    """
    sharding = data_sharding(mesh)
    n_local = len(mesh.local_devices)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n_local:
            raise ValueError(
                f"shard_batch: array of shape {x.shape} cannot be split over {n_local} local devices; pad the "
                f"batch to a multiple of {n_local} first (pad_batch_to)")
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, batch)


def initialize_distributed(enabled: bool | None = None, *, cpu_collectives: str | None = None,
                           **kwargs: Any) -> bool:
    """Start JAX's multi-process runtime when asked to (call once per process, before any other JAX use).

    Args:
      enabled: True to initialise, False not to; None (default) initialises when the environment variable
        ``CCSTAE_DISTRIBUTED`` is ``1``/``true``/``yes``/``on``.
      cpu_collectives: for multi-process runs on CPU only (tests, CI): the CPU collectives implementation,
        e.g. ``'gloo'``.
      **kwargs: passed to ``jax.distributed.initialize`` (``coordinator_address``, ``num_processes``,
        ``process_id``, ``local_device_ids``, ...). Without them JAX detects SLURM, Open MPI, Cloud TPU, k8s.

    Returns:
      True when the distributed runtime is active after the call (also if it already was), else False.
    """
    if enabled is None:
        enabled = os.environ.get(_ENV_DISTRIBUTED, "").strip().lower() in _TRUE
    if not enabled:
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        return True
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # the messages from cluster auto-detection are terse; say what was attempted
        raise CcstaeError(
            f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {e}. "
            "Outside SLURM/Open MPI/Cloud TPU/k8s pass coordinator_address, num_processes and process_id, or "
            f"unset {_ENV_DISTRIBUTED} for a single-process run.") from e
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, metrics and progress bars)."""
    return jax.process_index() == 0
