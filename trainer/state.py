"""What a training run is and where it stands, as one object: :class:`TrainState`.

A checkpoint holds the weights and AdamW moments (``model.pt``, ``optimizer.pt``) and this
state twice over: ``trainer_state.pt`` (:meth:`TrainState.state_dict`, read back on resume by
:meth:`TrainState.load_state_dict`) and ``meta.json`` (:meth:`TrainState.meta`, the
human-readable projection that evals, ``pretrain status`` and the HF export read). Both used to
be assembled by hand in the trainer from overlapping fields; here each field has one home and the
two files are views of it. The files' keys are unchanged (checkpoints of earlier versions load).

The fields are of two kinds:

* progress, restored on resume: ``step``, ``tokens_seen``, ``skipped_in_row`` (the non-finite
  streak, so a resumed run stops exactly where the uninterrupted one would), ``run_id`` (the
  tracking run, ``mlflow_run_id`` on disk), and every rank's loader position and RNG state;
* identity, always this run's: world size, model shape, data fingerprint and directory, the
  resolved config. A resume checks those against the checkpoint's (``trainer.train``) and then
  writes the current ones, so a ``--allow-changes`` resume records the values it runs with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from trainer.data import LoaderState
from trainer.optim import lr_at

STATE_FORMAT = 1


@dataclass
class TrainState:
    """Everything about a run that is not a tensor of the model or the optimizer."""

    # identity (this run's; never taken from a checkpoint)
    world_size: int = 1
    model: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields (dataclasses.asdict)
    model_shape: dict[str, Any] = field(default_factory=dict)  # GPTConfig.shape(): what must match on resume
    data_fingerprint: str = ""
    data_dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the whole resolved run config
    # progress (restored on resume)
    step: int = 0
    tokens_seen: int = 0
    skipped_in_row: int = 0  # consecutive non-finite steps
    run_id: str | None = None  # the tracking (MLflow) run
    loader_states: list[dict[str, int]] = field(default_factory=list)  # one per rank, gathered at checkpoint time
    rng_states: list[dict[str, Any]] = field(default_factory=list)  # one per rank (trainer.rng)

    def reset(self) -> None:
        """Back to step 0 of a new run (identity kept)."""
        self.step, self.tokens_seen, self.skipped_in_row, self.run_id = 0, 0, 0, None
        self.loader_states, self.rng_states = [], []

    def schedule(self) -> dict[str, Any] | None:
        """The next step and its learning rate (a pure function of the step, ``trainer.optim.lr_at``);
        recorded for inspection only. None without a train section in ``config``."""
        tc = self.config.get("train") or {}
        try:
            lr = lr_at(self.step, tc["lr"], tc["min_lr"], tc["warmup_steps"], tc["max_steps"])
        except KeyError:
            return None
        return {"next_step": self.step, "next_lr": lr}

    def state_dict(self) -> dict[str, Any]:
        """``trainer_state.pt``: tensors and plain values only (``torch.load(weights_only=True)``)."""
        return {
            "format_version": STATE_FORMAT,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.world_size,
            "schedule": self.schedule(),
            "loader_states": self.loader_states,
            "rng_states": self.rng_states,
            "mlflow_run_id": self.run_id,
            "data_fingerprint": self.data_fingerprint,
            "model_shape": self.model_shape,
            "config": self.config,
            "skipped_in_row": self.skipped_in_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the progress fields from a ``trainer_state.pt`` (any version: an older one
        without ``skipped_in_row`` or a run id gets 0 / None). Identity fields stay this run's."""
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_in_row = int(state.get("skipped_in_row", 0))
        self.run_id = state.get("mlflow_run_id")
        self.loader_states = list(state["loader_states"])
        self.rng_states = list(state["rng_states"])

    def meta(self) -> dict[str, Any]:
        """``meta.json``: the JSON projection of the state (no RNG tensors), plus the write time."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.world_size,
            "model": self.model,
            "model_shape": self.model_shape,
            "data_fingerprint": self.data_fingerprint,
            "data_dir": self.data_dir,
            "mlflow_run_id": self.run_id,
            "loader_states": self.loader_states,
            "config": self.config,
            "time": time.time(),
        }

    def position_for(self, rank: int, world_size: int) -> tuple[LoaderState, dict[str, Any] | None]:
        """This rank's loader position and RNG state from the loaded per-rank lists.

        The loader position is global (identical on every rank, ``trainer.data``), so any rank's
        will do when the world size changed; RNG streams are per rank, so then there is none
        (None: the caller reseeds)."""
        same_world = len(self.rng_states) == world_size
        loader = LoaderState.from_dict(self.loader_states[rank if same_world else 0])
        return loader, (self.rng_states[rank] if same_world else None)
