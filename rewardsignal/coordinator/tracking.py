"""Experiment tracking: a run's step and round metrics (loss, tokens, learning
rate, grad norm, eval loss, rejections) written to TensorBoard event files under
the run's checkpoint directory and/or to Weights & Biases.

Both are optional extras on the coordinator (``rewardsignal[tensorboard]``,
``rewardsignal[wandb]``), imported only by a run that asks for them
(``create_run(log_to=[...])`` or ``--log-to``). W&B reads its usual environment
(``WANDB_API_KEY``, ``WANDB_MODE=offline``, ``WANDB_DIR``). Writers run on one
thread of their own, in order, never on the event loop; a writer that fails is
logged and dropped, never failing the step that fed it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from rewardsignal.errors import ValidationError

log = logging.getLogger("signal.coordinator")

BACKENDS = {"tensorboard": ("tensorboard", "rewardsignal[tensorboard]"),
            "wandb": ("wandb", "rewardsignal[wandb]")}


def check_backends(log_to: tuple[str, ...], wandb_project: str | None) -> None:
    """400 now (not at the first step) for an unknown backend or a missing extra."""
    for name in log_to:
        if not isinstance(name, str) or name not in BACKENDS:
            raise ValidationError(f"log_to {name!r} is not one of {sorted(BACKENDS)}")
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise ValidationError(f"log_to {name!r} needs {module} on the coordinator: "
                                  f"pip install '{extra}' there")
    if wandb_project is not None and "wandb" not in log_to:
        raise ValidationError("wandb_project is set but log_to does not include 'wandb'")


class _Writer(Protocol):
    def write(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._w.add_scalar(tag, value, global_step=step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


_WandbMode = Literal["online", "offline", "disabled", "shared"]


class _Wandb:
    def __init__(self, run_id: str, project: str | None, run_dir: Path, config: dict) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        # WANDB_MODE read now, not when wandb was first imported in this process.
        mode = cast(_WandbMode | None, os.environ.get("WANDB_MODE") or None)
        self._run = wandb.init(project=project or "signal", name=run_id, id=run_id,
                               resume="allow", dir=str(run_dir), config=config,
                               reinit="create_new", mode=mode)

    def write(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """The open writers of every run that logs somewhere."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking")
        self._writers: dict[str, list[_Writer]] = {}

    def open(self, run_id: str, log_to: tuple[str, ...], *, run_dir: Path,
             wandb_project: str | None, config: dict) -> None:
        if log_to and run_id not in self._writers:
            self._writers[run_id] = []
            self._pool.submit(self._open, run_id, log_to, run_dir, wandb_project, config)

    def _open(self, run_id: str, log_to: tuple[str, ...], run_dir: Path,
              wandb_project: str | None, config: dict) -> None:
        for name in log_to:
            try:
                writer: _Writer = (_TensorBoard(run_dir / "tensorboard") if name == "tensorboard"
                                   else _Wandb(run_id, wandb_project, run_dir, config))
            except Exception:
                log.exception("run %s: cannot start %s logging; continuing without it",
                              run_id, name)
                continue
            self._writers.setdefault(run_id, []).append(writer)

    def logs(self, run_id: str) -> bool:
        return run_id in self._writers

    def log(self, run_id: str, step: int, values: dict[str, Any]) -> None:
        """Queue one step's values (None values are left out)."""
        if run_id not in self._writers:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        self._pool.submit(self._write, run_id, step, clean)

    def _write(self, run_id: str, step: int, values: dict[str, float]) -> None:
        for writer in list(self._writers.get(run_id, ())):
            try:
                writer.write(step, values)
            except Exception:
                log.exception("run %s: a metrics writer failed; dropping it", run_id)
                self._writers[run_id].remove(writer)

    def flush(self) -> None:
        """Wait for everything queued so far (tests, shutdown)."""
        self._pool.submit(lambda: None).result()

    def close_run(self, run_id: str) -> None:
        if run_id in self._writers:
            self._pool.submit(self._close, run_id).result()

    def _close(self, run_id: str) -> None:
        for writer in self._writers.pop(run_id, []):
            try:
                writer.close()
            except Exception:
                log.exception("run %s: closing a metrics writer failed", run_id)

    def close(self) -> None:
        for run_id in list(self._writers):
            self.close_run(run_id)
        self._pool.shutdown(wait=True)
