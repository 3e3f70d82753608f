"""What a run directory holds besides its checkpoints: the run's config file and its metrics file.

``config.json`` records the training config, the task (model) config and ``steps_per_epoch``; resuming a run with
different ones is refused (:class:`RunConfigMismatchError`), except for bookkeeping fields that do not change the
optimisation trajectory. ``metrics.jsonl`` gets one JSON line every ``log_every`` steps and one per epoch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from ccstae_jax.atomic import write_json, write_text
from ccstae_jax.train.config import TrainConfig
from ccstae_jax.train.parallel import is_main_process

__all__ = ["RunConfigMismatchError", "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_DIR"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class RunConfigMismatchError(ValueError):
    """The run directory was created with a different task (model) config or training config."""


# Fields that may differ between the run that wrote a checkpoint and the run that resumes from it: they change
# bookkeeping, not the optimisation trajectory. `epochs` may also change unless a cosine schedule depends on it.
_RESUME_MUTABLE = {"checkpoint_every_steps", "checkpoint_every_epochs", "keep_checkpoints", "keep_best",
                   "async_checkpointing", "on_nonfinite", "log_every"}


def _json_normalise(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True))


def _diff(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in saved:
                out.append(f"{name}: not in the saved config, now {current[k]!r}")
            elif k not in current:
                out.append(f"{name}: saved {saved[k]!r}, missing now")
            else:
                out.extend(_diff(saved[k], current[k], name))
        return out
    return [] if saved == current else [f"{prefix}: saved {saved!r}, now {current!r}"]


def _check_run_config(run_dir: Path, config: TrainConfig, task_config: Mapping[str, Any] | None,
                      steps_per_epoch: int, has_checkpoint: bool) -> None:
    """Refuse to resume a run directory written for another model/optimisation; write config.json for new runs."""
    path = run_dir / CONFIG_FILE
    current = {"train_config": _json_normalise(config.to_dict()),
               "task_config": _json_normalise(dict(task_config)) if task_config is not None else None,
               "steps_per_epoch": int(steps_per_epoch)}
    if has_checkpoint:
        if not path.exists():
            raise RunConfigMismatchError(
                f"{run_dir} holds checkpoints but no {CONFIG_FILE}: it was not written by ccstae_jax.train.loop.fit "
                "(or the file was deleted); use a new run directory")
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunConfigMismatchError(f"cannot read {path}: {e}") from e
        problems = _diff(saved.get("task_config"), current["task_config"], "task_config")
        if saved.get("steps_per_epoch") != current["steps_per_epoch"]:
            problems.append(f"steps_per_epoch: saved {saved.get('steps_per_epoch')!r}, now {steps_per_epoch!r}")
        saved_train = dict(saved.get("train_config") or {})
        mutable = set(_RESUME_MUTABLE)
        if config.schedule in ("constant", "bold_driver"):
            mutable.add("epochs")
        for line in _diff(saved_train, current["train_config"], "train_config"):
            field = line.split(":", 1)[0].split(".", 1)[1].split(".")[0]
            if field not in mutable:
                problems.append(line)
        if problems:
            raise RunConfigMismatchError(
                f"cannot resume the run in {run_dir}: it was started with a different configuration:\n  "
                + "\n  ".join(problems)
                + "\nUse the original settings to resume, or a new run directory to start afresh.")
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, current)


class _MetricsLog:
    """The run's ``metrics.jsonl``: one JSON object per line, appended.

    ``{"kind": "step", "step", "epoch", "loss", <each loss term>, "grad_norm", "learning_rate", "steps" (how many
    steps the line averages), "nonfinite_count", "patterns_per_s", "wall_time" (unix s)}`` every ``log_every``
    steps, and ``{"kind": "epoch", ...}`` (see :class:`FitResult`) at each epoch end. On resume, lines for steps
    after the restored checkpoint are dropped, so the file always describes one consistent trajectory.
    """

    def __init__(self, path: Path, *, keep_until_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        self.epochs: list[dict[str, Any]] = []
        if not enabled:
            return
        lines: list[str] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if int(rec.get("step", 0)) <= keep_until_step:
                    lines.append(line)
                    if rec.get("kind") == "epoch":
                        self.epochs.append(rec)
        write_text(path, "".join(line + "\n" for line in lines))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record; NaN/Inf become null (strict JSON)."""
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if record.get("kind") == "epoch":
            self.epochs.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
