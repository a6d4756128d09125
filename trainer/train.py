"""The training worker: one process per rank, started by torchrun (``python -m trainer.train CONFIG [overrides]``).

One optimizer step = ``grad_accum`` micro-steps of (B, T) tokens per rank, where
``grad_accum = batch_tokens / (B * T * world_size)``. Gradients are all-reduced only on the last
micro-step (``no_sync`` before it) and each micro-loss is divided by ``grad_accum`` so the
accumulated gradient is the mean over the whole batch, as with one big batch. The step itself is
``trainer.step.TrainStep`` (which ``bench/train_step.py`` times); this module runs it with the
data, the run dir, the lock, tracking and checkpoints around it. Everything a checkpoint records
besides weights and optimizer is ``trainer.state.TrainState``.

After step ``s`` (1-based) the worker, in this order: writes the metrics line of ``s`` (with the
val loss / sample when due), checkpoints when due, then checks (collectively) for a stop signal.

A step whose loss or gradient norm is not finite on *any* rank is skipped on *every* rank: the
ranks all-reduce a flag with the loss (the same single collective as before), and nobody calls
``optimizer.step()``, so weights and AdamW moments stay those of the last good step while the
step counter, schedule and data position move on (the metrics line says ``"skipped": true``).
After ``train.max_skipped_steps`` such steps in a row the run commits a checkpoint (its weights
are the last good ones) and stops with exit 2: lower the learning rate or fix the data, then
resume with ``--allow-changes``. The streak length is checkpointed, so resume stays exact.

One writer per run dir: global rank 0 holds ``RunLock(run_dir, "train")`` (``trainer.runlock``)
from before it touches the run dir until the process ends; a second training on the same run dir
is refused with exit 2 naming the holder. Resuming with changed hyper-parameters is refused too
(naming the keys; see ``trainer.config`` for which keys count) unless ``--allow-changes``.
Because checkpoints capture everything that influences the future (weights, AdamW moments,
step, every rank's loader position and RNG state), a resumed run reproduces the uninterrupted
one bit for bit on the same hardware and world size.
"""

from __future__ import annotations

if __name__ == "__main__":  # a worker: a stop signal during the imports below (torch: 1-3 s) must not kill it
    from common.startup import pause_collector
    from common.stop_signals import hold_stop_signals

    hold_stop_signals()  # StopFlag.install replays it (see common.stop_signals)
    pause_collector()  # for the imports and set-up; Trainer.fit resumes it (common.startup)

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from common.durable import atomic_write_json
from common.process_exit import exit_now
from common.rundir import RunDir
from common.startup import resume_collector
from common.strict import ConfigError, flatten, read_yaml_mapping
from dataprep.shards import ShardError, TokenDataset
from trainer import EXIT_FAILURE, EXIT_FILE_ENV, EXIT_OK, EXIT_REFUSED, EXIT_REQUEUE, precision, rank_exit_file
from trainer.checkpoint import (
    MODEL_FILE,
    OPTIM_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointWriter,
    DiskFullError,
    is_disk_full,
    list_committed,
    read_meta,
    remove_partials,
    set_aside,
    to_cpu,
    verify,
)
from trainer.config import TrainConfig, TrainJob, changed_hyperparameters
from trainer.data import LoaderState, TrainLoader, ValBatches
from trainer.determinism import make_deterministic, reproducible_cpu_math
from trainer.dist import (
    DistEnv,
    all_gather_object,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
    uses_cuda,
)
from trainer.failure_log import keep_traceback
from trainer.metrics import MetricsLog
from trainer.model import GPTConfig, resolve_config
from trainer.optim import build_optimizer
from trainer.progress import StepTimer, format_duration
from trainer.provenance import write_run_config
from trainer.rng import capture_rng, restore_rng, seed_all
from trainer.runlock import RunLock, RunLockHeld, RunLockStopped
from trainer.signals import StopFlag, survive_lost_output
from trainer.state import TrainState
from trainer.step import TrainStep, build_model, to_device, wrap_model
from trainer.tracking import NullTracker, TrackingError, start_tracking

# Dense peak FLOP/s per GPU: (bf16, tf32). Used for MFU when train.peak_flops is 0.
PEAK_FLOPS = {"H100": (989.4e12, 494.7e12), "H200": (989.4e12, 494.7e12), "A100": (312e12, 156e12), "L4": (121e12, 60e12)}


# Test-only fault injection (never set it in a real run): "RANK:STEP[-LAST][,...]" makes that rank's
# loss of those 1-based steps NaN after the backward pass, so only that rank sees it.
FAULT_NAN_ENV = "PRETRAIN_FAULT_NAN"


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: CUDA's ``torch.OutOfMemoryError`` or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


class RefusedError(RuntimeError):
    """The run cannot start as configured (bad geometry, foreign checkpoint, unreadable data)."""


def nan_fault_steps(rank: int, spec: str | None = None) -> set[int]:
    """The steps at which ``PRETRAIN_FAULT_NAN`` poisons this rank's loss (test-only)."""
    spec = os.environ.get(FAULT_NAN_ENV, "") if spec is None else spec
    steps: set[int] = set()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        r, _, span = item.partition(":")
        first, _, last = span.partition("-")
        if int(r) == rank:
            steps.update(range(int(first), int(last or first) + 1))
    return steps


def log0(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, flush=True)


def grad_accum_steps(batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    per_micro = micro_batch * seq_len * world_size
    if batch_tokens <= 0 or batch_tokens % per_micro:
        raise RefusedError(
            f"train.batch_tokens ({batch_tokens}) must be a positive multiple of micro_batch_size * seq_len * world_size "
            f"({micro_batch} * {seq_len} * {world_size} = {per_micro}); e.g. {max(1, round(batch_tokens / per_micro)) * per_micro}"
        )
    return batch_tokens // per_micro


def peak_flops(cfg_peak: float, device: torch.device, bf16: bool) -> float | None:
    if cfg_peak > 0:
        return cfg_peak
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (p_bf16, p_tf32) in PEAK_FLOPS.items():
        if key in name:
            return p_bf16 if bf16 else p_tf32
    return None


def _shape_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}" for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def _resume_meta(ckpt: Path) -> dict[str, Any]:
    """``ckpt``'s meta.json with the fields a resume compares (``Trainer._foreign``). CheckpointError
    (unusable: skipped like one that does not verify) when it is no metadata or lacks them, as one
    written by another code version, or under a marker rewritten over a bad file, would."""
    meta = read_meta(ckpt)
    expected = (("model_shape", dict), ("data_fingerprint", str), ("config", (dict, type(None))))
    wrong = [key for key, kind in expected if not isinstance(meta.get(key), kind)]
    if wrong:
        raise CheckpointError(f"{ckpt}: meta.json has no usable {', '.join(wrong)} (not a training checkpoint of this version)")
    return meta


class Trainer:
    def __init__(self, cfg: TrainJob, env: DistEnv, stop: StopFlag, allow_changes: bool = False):
        self.cfg, self.env, self.stop = cfg, env, stop
        self.allow_changes = allow_changes
        # why the resume is not bitwise (changed hyper-parameters, another world size): the steps
        # after the checkpoint train to other values, and MLflow must get them again (trainer.tracking)
        self.inexact_resume = ""
        self.stop_reason = ""  # why fit() returned EXIT_REFUSED (a run that kept producing NaN)
        tc = cfg.train
        self.run_dir = Path(cfg.run_dir)
        self._check_setup()
        self._build_model()
        self.state = TrainState(
            world_size=env.world_size, model=dataclasses.asdict(self.gpt_cfg), model_shape=self.gpt_cfg.shape(),
            data_fingerprint=self.dataset.fingerprint, data_dir=str(self.dataset.directory), config=cfg.resolved,
        )
        self.metrics = MetricsLog(RunDir(self.run_dir).metrics)
        self._build_data(self._resume() or LoaderState())
        self.tracker = self._start_tracking()
        self.writer = CheckpointWriter(
            self.run_dir, tc.keep_last, tc.keep_every, asynchronous=tc.async_ckpt and env.device.type == "cuda", log=lambda m: log0(env, m)
        ) if env.is_main else None
        self.compiled, self.ddp = wrap_model(self.model, tc, env)
        self.train_step = TrainStep(self.model, self.ddp, self.optimizer, tc, env, self.grad_accum, nan_fault_steps(env.rank))
        self.peak = peak_flops(tc.peak_flops, env.device, self.dtype == torch.bfloat16)
        self.flops_per_token = self.model.flops_per_token(tc.seq_len)
        self._tokenizer = None
        self._tokenizer_failed = False
        # torchrun starts workers in sessions of their own, so if torchrun is SIGKILLed its
        # workers would train on, orphaned, next to a restarted run. Notice and leave.
        self._parent = os.getppid() if env.distributed else None

    # ------------------------------------------------------------------ setup

    def _check_setup(self) -> None:
        """Model shape, batch geometry, dataset and dtype, or RefusedError naming what is wrong."""
        cfg, tc = self.cfg, self.cfg.train
        try:
            self.gpt_cfg: GPTConfig = resolve_config(cfg.model)
        except ValueError as e:
            raise RefusedError(str(e)) from e
        if tc.seq_len > self.gpt_cfg.block_size:
            raise RefusedError(f"train.seq_len ({tc.seq_len}) exceeds the model's block_size ({self.gpt_cfg.block_size})")
        self.grad_accum = grad_accum_steps(tc.batch_tokens, tc.micro_batch_size, tc.seq_len, self.env.world_size)
        try:
            self.dataset = TokenDataset(cfg.data_dir)
        except ShardError as e:
            raise RefusedError(f"data.output_dir: {e}") from e
        try:
            self.dtype = precision.compute_dtype(tc.dtype, self.env.device, key="train.dtype")
        except ValueError as e:
            raise RefusedError(str(e)) from e

    def _build_model(self) -> None:
        """The model (identical init on every rank) and AdamW; then per-rank RNG streams."""
        env, tc = self.env, self.cfg.train
        precision.configure_matmul(env.device)
        if tc.deterministic:  # before the first matmul and before torch.compile traces the model
            make_deterministic()
            log0(env, f"deterministic kernels (train.deterministic): {torch.are_deterministic_algorithms_enabled()}")
        # identical init on every rank (DDP would broadcast rank 0's anyway); then per-rank RNG streams
        seed_all(tc.seed)
        try:
            self.model = build_model(self.gpt_cfg, tc, env.device)
        except ValueError as e:  # train.sdpa_backend or train.fp8 that this device cannot run
            raise RefusedError(str(e)) from e
        except RuntimeError as e:  # torch.OutOfMemoryError is one too
            if not is_out_of_memory(e):
                raise
            shape = ", ".join(f"{k}={v}" for k, v in self.gpt_cfg.shape().items())
            raise RefusedError(f"the model does not fit in {env.device.type} memory ({shape}): choose a smaller model.* "
                               f"shape or a device with more memory ({str(e).strip().splitlines()[0][:200]})") from e
        seed_all(tc.seed + env.rank)
        log0(env, self.model.summary())
        self.optimizer = build_optimizer(self.model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, env.device.type)

    def _build_data(self, loader_state: LoaderState) -> None:
        env, tc = self.env, self.cfg.train
        try:
            self.loader = TrainLoader(self.dataset, tc.micro_batch_size, tc.seq_len, env.rank, env.world_size, tc.seed, loader_state)
        except ValueError as e:
            raise RefusedError(str(e)) from e
        self.val = ValBatches(self.dataset, tc.micro_batch_size, tc.seq_len, env.rank, env.world_size, tc.val_batches) if tc.val_every > 0 else None

    def _resume(self) -> LoaderState | None:
        """Resume from the newest usable checkpoint, or start a new run.

        Rank 0 picks the newest committed checkpoint that verifies and belongs to this run (same
        model shape and data, same hyper-parameters unless ``allow_changes``); every rank loads it
        and the ranks agree on success. One that verifies yet fails to load on any rank is skipped
        with a warning and the next older one tried; once one loads, the unusable newer ones are
        moved aside (``trainer.checkpoint``). None usable while some exist: refused, nothing moved.
        """
        env = self.env
        if env.is_main:
            remove_partials(self.run_dir, log=lambda m: log0(env, m))
        unusable: list[Path] = []  # rank 0: newer checkpoints that failed to verify or load
        while True:
            decision = self._pick_checkpoint(unusable) if env.is_main else None
            decision = broadcast_object(env, decision)
            if decision["error"]:
                raise RefusedError(decision["error"])
            if decision["path"] is None:
                break
            ckpt = Path(decision["path"])
            loader_state, error = self._try_load(ckpt)
            if not any_rank(env, error is not None):
                self._resumed(ckpt, unusable, loader_state)
                return loader_state
            if env.is_main:
                warnings.warn(f"checkpoint {ckpt.name} verifies but does not load ({error or 'failed on another rank'}); "
                              "falling back to the previous committed checkpoint", stacklevel=1)
                log0(env, f"checkpoint: skipping {ckpt.name}: committed but unloadable; trying the previous one")
                unusable.append(ckpt)
        log0(env, f"starting a new run in {self.run_dir}")
        self.state.reset()
        if env.is_main:
            dropped = self.metrics.truncate_after(0)
            if dropped:
                log0(env, f"metrics: dropped {dropped} lines of an earlier attempt that never checkpointed")
        return None

    def _try_load(self, ckpt: Path) -> tuple[LoaderState | None, str | None]:
        """``(loader state, None)``, or ``(None, why)`` when ``ckpt`` does not load on this rank."""
        try:
            return self._load_checkpoint(ckpt), None
        except (OSError, MemoryError, torch.OutOfMemoryError):
            raise  # the machine, not the checkpoint (a retry may help): never discard a checkpoint for it
        except Exception as e:  # noqa: BLE001 - any other failure to load = unusable checkpoint
            error = f"{type(e).__name__}: {e}"
            print(f"rank {self.env.rank}: cannot load {ckpt}: {error}", file=sys.stderr, flush=True)
            return None, error

    def _resumed(self, ckpt: Path, unusable: list[Path], loader_state: LoaderState) -> None:
        """Every rank loaded ``ckpt``: move the unusable newer ones aside, drop metrics past it."""
        env, st = self.env, self.state
        if env.is_main:
            for bad in unusable:
                moved = set_aside(bad, "unusable")
                log0(env, f"checkpoint: moved unusable {bad.name} aside to {moved.name} (kept for inspection)")
            dropped = self.metrics.truncate_after(st.step)
            if dropped:
                log0(env, f"metrics: dropped {dropped} lines past step {st.step} (steps re-run after the resume)")
        log0(env, f"resumed from {ckpt} at step {st.step} ({st.tokens_seen:,} tokens seen), data position {loader_state}")

    def _pick_checkpoint(self, unusable: list[Path]) -> dict[str, Any]:
        """Rank 0: ``{"path": newest usable candidate or None, "error": refusal or None}``."""
        env = self.env
        committed = [p for p in list_committed(self.run_dir) if p not in unusable]
        for ckpt in reversed(committed):
            try:
                verify(ckpt)
                meta = _resume_meta(ckpt)
            except CheckpointError as e:
                log0(env, f"checkpoint: skipping {ckpt.name}: {e}")
                unusable.append(ckpt)
                continue
            problems = self._foreign(ckpt, meta)
            if problems:
                return {"path": None, "error": f"refusing to resume {ckpt}: " + "; ".join(problems)}
            return {"path": str(ckpt), "error": None}
        if unusable:
            return {"path": None, "error": (
                f"{RunDir(self.run_dir).checkpoints}: none of the {len(unusable)} committed checkpoints verifies and loads; "
                "refusing to start from scratch over them (move them away to really start anew)")}
        return {"path": None, "error": None}

    def _foreign(self, ckpt: Path, meta: dict[str, Any]) -> list[str]:
        """Why ``ckpt`` cannot continue this run (other shape or data; changed hyper-parameters)."""
        problems = []
        diff = _shape_mismatch(meta["model_shape"], self.gpt_cfg.shape())
        if diff:
            problems.append("model shape differs (" + "; ".join(diff) + "). Use a new run_dir or the original config")
        if meta["data_fingerprint"] != self.dataset.fingerprint:
            problems.append(
                f"data manifest differs (checkpoint trained on {meta.get('data_dir')} with manifest sha256 "
                f"{meta['data_fingerprint'][:16]}…, data.output_dir {self.dataset.directory} has {self.dataset.fingerprint[:16]}…). "
                "Use a new run_dir or the original data"
            )
        if problems:
            return problems
        changed = changed_hyperparameters(meta.get("config") or {}, self.cfg.resolved)
        if changed and not self.allow_changes:
            return [(f"hyper-parameters changed since {ckpt.name} ({'; '.join(changed)}); a resume continues the same run. "
                     "Restore them, use a new run_dir, or pass --allow-changes to continue with the new values")]
        if changed:
            log0(self.env, f"resume: continuing with changed hyper-parameters (--allow-changes): {'; '.join(changed)}")
            self.inexact_resume = "changed hyper-parameters"
        return []


    def _load_checkpoint(self, ckpt: Path) -> LoaderState:
        """Load weights, optimizer, step, RNG and data position of ``ckpt`` into this rank."""
        env = self.env
        saved = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(torch.load(ckpt / MODEL_FILE, map_location=env.device, weights_only=True))
        # load_state_dict also restores the checkpoint's group settings (weight decay, betas, eps,
        # fused): put this config's back, or an --allow-changes resume would log new values and
        # train with the old ones (and a CUDA checkpoint would ask for the fused kernel on CPU)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(torch.load(ckpt / OPTIM_FILE, map_location=env.device, weights_only=True))
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.state.load_state_dict(saved)
        loader_state, rng = self.state.position_for(env.rank, env.world_size)
        if rng is not None:
            restore_rng(rng)
        else:
            # RNG streams are per rank; with another world size they cannot all be restored
            seed_all(self.cfg.train.seed + env.rank + self.state.step)
            self.inexact_resume = "another world size"
            log0(env, f"resume: world size changed ({len(self.state.rng_states)} -> {env.world_size}); "
                      "RNG streams reseeded, data position kept")
        return loader_state

    def _start_tracking(self):
        env, cfg = self.env, self.cfg
        result: dict[str, Any] = {"run_id": None, "error": None}
        tracker = NullTracker()
        if env.is_main:
            params = flatten(cfg.resolved)
            params.update({f"resolved.model.{k}": v for k, v in dataclasses.asdict(self.gpt_cfg).items()})
            params.update({"resolved.world_size": env.world_size, "resolved.grad_accum": self.grad_accum,
                           "resolved.n_params": self.model.num_params(), "resolved.n_params_non_embedding": self.model.num_params(True)})
            text = cfg.resolved_yaml()
            write_run_config(self.run_dir, text)
            try:
                tracker = start_tracking(cfg.tracking.uri, cfg.tracking.experiment, self.run_dir, self.state.run_id, params,
                                         data_dir=self.dataset.directory, should_stop=lambda: self.stop.is_set,
                                         rewind_to=self.state.step if self.inexact_resume else None)
                tracker.log_text(text, "config.yaml")
                result["run_id"] = tracker.run_id
            except TrackingError as e:
                result["error"] = str(e)
        result = broadcast_object(env, result)
        if result["error"]:
            # the server refused the run (unknown run id, bad URI): rerunning cannot help. An unreachable
            # server is no error: rank 0 trains on and its tracker connects and replays in the background.
            raise RefusedError(result["error"])
        self.state.run_id = result["run_id"]  # None until the run exists; rank 0 picks it up later (see _publish)
        return tracker

    # ------------------------------------------------------------------ steps, val loss, samples

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_device(*self.loader.next_batch(), self.env.device)

    def _timed_step(self) -> dict[str, Any]:
        """One optimizer step (``trainer.step``); advances the state, returns the step's metrics record."""
        env, tc, st = self.env, self.cfg.train, self.state
        t0 = time.time()
        loss, grad_norm, lr, skipped = self.train_step(st.step, self._next_batch)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        st.step += 1
        st.tokens_seen += tc.batch_tokens
        tok_s = tc.batch_tokens / dt
        mfu = self.flops_per_token * tok_s / (self.peak * env.world_size) if self.peak else None
        record: dict[str, Any] = {
            "step": st.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": st.tokens_seen,
            "tokens_per_s": tok_s, "mfu": mfu, "dt": dt, "time": time.time(),
        }
        st.skipped_in_row = st.skipped_in_row + 1 if skipped else 0
        if skipped:
            record["skipped"] = True
            print(f"rank {env.rank}: step {st.step} skipped: non-finite loss or gradient norm on some rank "
                  f"(here loss {loss}, grad norm {grad_norm}); no update, {st.skipped_in_row} in a row "
                  f"(limit train.max_skipped_steps={tc.max_skipped_steps})", file=sys.stderr, flush=True)
        return record

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the fixed val batches of all ranks (None without a val set).

        A stop signal does not cut it short: the step is checkpointed right after, so a val loss
        skipped now would be missing for good from the resumed run's metrics. It is bounded
        (``train.val_batches`` forward passes, about a second for GPT-2 124M on one GPU)."""
        if self.val is None or len(self.val) == 0:
            return None
        self.compiled.eval()
        total = torch.zeros((), device=self.env.device)
        try:
            for x, y in self.val:
                x, y = to_device(x, y, self.env.device)
                with self.train_step.autocast():
                    _, loss = self.compiled(x, y)
                total += loss.detach().float()
        finally:
            self.compiled.train()
        all_reduce_sum(self.env, total)
        return (total / (len(self.val) * self.env.world_size)).item()

    def sample(self) -> str | None:
        """Rank 0: a short continuation of the fixed prompt with the uncompiled model (seeded, so reproducible)."""
        tc = self.cfg.train
        if self._tokenizer is None and not self._tokenizer_failed:
            try:
                from dataprep.tokenizer import get_gpt2

                self._tokenizer = get_gpt2()
            except Exception as e:  # noqa: BLE001 - sampling is a nicety; never crash training for it
                self._tokenizer_failed = True
                warnings.warn(f"sampling disabled: GPT-2 tokenizer unavailable ({e})", stacklevel=2)
        if self._tokenizer is None:
            return None
        enc = self._tokenizer
        prompt = enc.encode(tc.sample_prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
        idx = torch.tensor([prompt], dtype=torch.long, device=self.env.device)
        gen = torch.Generator(device=self.env.device).manual_seed(tc.seed + self.state.step)
        with self.train_step.autocast():
            out = self.model.generate(idx, tc.sample_tokens, temperature=1.0, top_k=50, generator=gen,
                                      should_stop=lambda: self.stop.is_set)
        new = [t for t in out[0, len(prompt):].tolist() if t < enc.n_vocab]
        return tc.sample_prompt + enc.decode(new)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Collective: gathers every rank's loader and RNG state; rank 0 writes (maybe in the background).

        A failed write (this one, or the previous background one) is raised on every rank alike
        (one broadcast per checkpoint), so all ranks stop with the same exit code.
        """
        env, st = self.env, self.state
        st.loader_states = all_gather_object(env, self.loader.state.to_dict())
        st.rng_states = all_gather_object(env, capture_rng())
        failure = None
        if env.is_main:
            try:
                self._write_checkpoint()
            except Exception as e:  # noqa: BLE001 - reported on every rank by _agree_on_failure
                failure = e
        self._agree_on_failure(failure)

    def _wait_writer(self) -> None:
        """Collective: wait for a background write in flight; its failure is raised on every rank."""
        failure = None
        if self.writer is not None:
            try:
                self.writer.wait()
            except Exception as e:  # noqa: BLE001 - reported on every rank by _agree_on_failure
                failure = e
        self._agree_on_failure(failure)

    def _agree_on_failure(self, failure: BaseException | None) -> None:
        report = None if failure is None else {"disk_full": isinstance(failure, DiskFullError), "message": str(failure)}
        report = broadcast_object(self.env, report)
        if report is None:
            return
        if self.env.is_main and failure is not None:
            raise failure
        raise (DiskFullError if report["disk_full"] else CheckpointError)(f"rank 0 failed to write a checkpoint: {report['message']}")

    def _write_checkpoint(self) -> None:
        model_state = self.model.state_dict()
        optim_state = self.optimizer.state_dict()
        if self.writer.asynchronous:
            model_state, optim_state = to_cpu(model_state), to_cpu(optim_state)
        st = self.state
        self.writer.save(st.step, model_state, optim_state, st.state_dict(), st.meta())

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        env, tc, st = self.env, self.cfg.train, self.state
        resume_collector()  # set-up done (torch._dynamo was imported with the optimizer): common.startup
        log0(env, f"training: world size {env.world_size} on {env.device} ({env.backend or 'no process group'}), "
                  f"grad_accum {self.grad_accum}, {tc.batch_tokens:,} tokens/step, steps {st.step}->{tc.max_steps}, "
                  f"{precision.short_name(self.dtype)}{', compiled' if tc.compile else ''}, {_loss_path(tc)}")
        if st.step >= tc.max_steps:
            log0(env, f"already at step {st.step} >= train.max_steps {tc.max_steps}: nothing to do")
            self.tracker.finish("FINISHED")
            return EXIT_OK
        try:
            return self._loop()
        except BaseException:
            if self.env.is_main:
                self.tracker.finish("FAILED")
            raise

    def _loop(self) -> int:
        """Steps until ``train.max_steps``, a stop signal (exit 3) or divergence (exit 2); after each:
        its metrics line (val loss / sample when due), a checkpoint when due, then the stop check."""
        env, tc, st = self.env, self.cfg.train, self.state
        saved_at = -1
        timer = StepTimer()  # the step line's ETA: recent steps, the first ones (compile, warm-up) left out
        while st.step < tc.max_steps:
            record = self._timed_step()
            last = st.step == tc.max_steps
            self._add_val_and_sample(record, last)
            if env.is_main:
                self._publish(record, timer)
            diverged = st.skipped_in_row >= tc.max_skipped_steps
            if (tc.ckpt_every > 0 and st.step % tc.ckpt_every == 0) or last or diverged:
                self.save_checkpoint()
                saved_at = st.step
            if diverged:
                return self._stop_diverged()
            self._exit_if_orphaned()
            if any_rank(env, self.stop.is_set):
                return self._stop_on_signal(saved_at)
        self._wait_writer()
        log0(env, f"finished: {st.step} steps, {st.tokens_seen:,} tokens")
        self._finish("FINISHED")
        return EXIT_OK

    def _add_val_and_sample(self, record: dict[str, Any], last: bool) -> None:
        """The val loss (collective) and rank 0's sample, on the steps they are due."""
        env, tc, step = self.env, self.cfg.train, self.state.step
        if tc.val_every > 0 and (step % tc.val_every == 0 or last):
            val_loss = self.evaluate()
            if val_loss is not None:
                record["val_loss"] = val_loss
        if env.is_main and tc.sample_every > 0 and step % tc.sample_every == 0 and not self.stop.is_set:
            text = self.sample()
            if text is not None:
                record["sample"] = text
                self.tracker.log_text(text, f"samples/step_{step:08d}.txt")

    def _publish(self, record: dict[str, Any], timer: StepTimer) -> None:
        """Rank 0: the metrics line, the tracker (enqueued only: MLflow never blocks the loop) and the step line."""
        tc, st = self.cfg.train, self.state
        self.metrics.append(record)
        self.tracker.log_record(record)
        st.run_id = self.tracker.run_id or st.run_id  # a run created late still reaches the next checkpoint
        timer.tick()
        mfu, dt = record["mfu"], record["dt"]
        mfu_s = f" | mfu {mfu * 100:.1f}%" if mfu is not None else ""
        val_s = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
        eta = timer.eta_s(tc.max_steps - st.step)
        eta_s = f" | eta {format_duration(eta)}" if eta is not None else ""
        mem_s = f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if self.env.device.type == "cuda" else ""
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {st.step}/{tc.max_steps} | loss {record['loss']:.6f}{val_s} | "
              f"lr {record['lr']:.3e} | norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s{mfu_s} | "
              f"{dt * 1000:.0f} ms{eta_s}{mem_s}", flush=True)

    def _stop_diverged(self) -> int:
        """``train.max_skipped_steps`` non-finite steps in a row: checkpointed already; exit 2."""
        tc, st = self.cfg.train, self.state
        self._wait_writer()
        self.stop_reason = (
            f"{st.skipped_in_row} steps in a row (steps {st.step - st.skipped_in_row + 1}-{st.step}) had a "
            f"non-finite loss or gradient norm (train.max_skipped_steps={tc.max_skipped_steps}); checkpoint step "
            f"{st.step} is committed with the last good weights. Lower train.lr / raise train.warmup_steps or check "
            f"the data, then run the same command again (with --allow-changes if you changed hyper-parameters)"
        )
        log0(self.env, f"stopped: {self.stop_reason}")
        self._finish("FAILED")
        return EXIT_REFUSED

    def _stop_on_signal(self, saved_at: int) -> int:
        """A stop signal on some rank: checkpoint (unless this step just was), exit 3."""
        if saved_at != self.state.step:
            self.save_checkpoint()
        self._wait_writer()
        log0(self.env, f"stopped by signal after step {self.state.step}: checkpoint committed, exit {EXIT_REQUEUE} (requeue me)")
        self._finish("KILLED")
        return EXIT_REQUEUE

    def _exit_if_orphaned(self) -> None:
        if self._parent is not None and os.getppid() != self._parent:
            print(f"rank {self.env.rank}: torchrun (pid {self._parent}) is gone; exiting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(EXIT_FAILURE)

    def _finish(self, status: str) -> None:
        if not self.env.is_main:
            return
        self.metrics.close()
        path = self.metrics.path
        if path.exists():
            self.tracker.log_artifact(path)
        self.tracker.finish(status)


def _loss_path(tc: TrainConfig) -> str:
    """How the training loss is computed, for the start line (``train.loss_chunk_tokens``, ``train.loss_kernel``)."""
    if tc.loss_chunk_tokens <= 0:
        return "plain loss"
    kernel = f", {tc.loss_kernel} kernel" if tc.loss_kernel != "torch" else ""
    return f"loss in chunks of {tc.loss_chunk_tokens:,} tokens{kernel}"


# ------------------------------------------------------------------ process entry


def _write_exit_status(env: DistEnv, code: int, reason: str, traceback_file: str | None = None) -> None:
    """Every node's local rank 0 writes the node's outcome: its launcher reports the code, and ranks
    agree on why they stop, so any node's leader knows it. Every rank also writes its own (with
    the time): when a run fails, the launcher names the rank whose error came first, and a rank
    that wrote nothing was killed (the OOM killer, a signal), which no surviving rank can tell.
    ``traceback_file``: where this rank kept its traceback (:mod:`trainer.failure_log`).

    Best effort: the launcher's directory is gone when the launcher was SIGKILLed and the next
    launch swept it up (``common.scratch``) while this rank was still checkpointing; nobody is left
    to read the file then, and the rank must still end as it chose."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not path:
        return
    mine = {"code": code, "reason": reason, "rank": env.rank, "local_rank": env.local_rank, "time": time.time(),
            "traceback_file": traceback_file}
    try:
        atomic_write_json(rank_exit_file(path, env.local_rank), mine)
        if env.local_rank == 0:
            atomic_write_json(path, {"code": code, "reason": reason})
    except OSError as e:
        print(f"train: rank {env.rank}: exit status {code} not written for the launcher ({e})", file=sys.stderr, flush=True)


class StoppedBeforeTraining(RuntimeError):
    """A stop signal came while the run was starting (importing, joining, waiting for the run lock):
    exit 3, nothing to checkpoint; the requeued job starts where the last committed checkpoint is."""


def _take_run_lock(env: DistEnv, run_dir: str, stop: StopFlag) -> RunLock | None:
    """Collective: global rank 0 takes the run dir's ``train`` lock; if another live process holds
    it, every rank raises RefusedError naming the holder (host, pid, SLURM job). A stop signal
    while waiting for it (up to minutes in a requeued job), or already received on any rank (while
    the worker started), raises StoppedBeforeTraining at once."""
    if any_rank(env, stop.is_set):  # nothing to save yet: no step, no lock, just exit 3
        raise StoppedBeforeTraining("a stop signal came while the workers started, before training")
    lock, outcome = None, None
    if env.is_main:
        try:
            lock = RunLock(run_dir, "train", log=lambda m: print(m, flush=True)).acquire(should_stop=lambda: stop.is_set)
        except RunLockStopped as e:
            outcome = ("stopped", str(e))
        except RunLockHeld as e:
            outcome = ("refused", str(e))
        except OSError as e:
            outcome = ("refused", f"{run_dir}: cannot take the run lock: {e}")
    outcome = broadcast_object(env, outcome)
    if outcome:
        kind, message = outcome
        raise (StoppedBeforeTraining if kind == "stopped" else RefusedError)(message)
    return lock


def _join(cfg: TrainJob, stop: StopFlag) -> DistEnv | None:
    """Hear stop signals, then pick the device and join the process group; None (refused, and
    reported) where the configured device cannot be used."""
    try:
        # before the rendezvous, which can wait minutes for other nodes: a stop then is kept
        stop.install(include_usr1=not uses_cuda(cfg.train.device))
        env = init_distributed(cfg.train.device)
    except ValueError as e:  # e.g. train.device=cuda where no GPU is visible
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        _write_exit_status(DistEnv(0, int(os.environ.get("LOCAL_RANK", "0")), 1, torch.device("cpu"), None), EXIT_REFUSED, str(e))
        stop.settle()
        return None
    if env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and env.world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
    return env


def run_worker(resolved: dict[str, Any], allow_changes: bool = False, where: str = "resolved config") -> int:
    """Run this process as one rank (torchrun env) or as a single process. Returns the exit code.

    ``resolved`` is the whole run config as plain data, resolved and validated by the layer above
    (``pretrain train``); the worker reads its own sections of it (:class:`TrainJob`).
    2 (refused) for what a rerun cannot fix: a config error, a foreign checkpoint or changed
    hyper-parameters, the run dir in use, a corrupt dataset (``ShardError``), a full disk, or a
    run that diverged (``train.max_skipped_steps``). 1 only where a retry may help.
    A terminal that goes away (and takes stdout/stderr with it) costs its output, never the
    checkpoint of the stop that follows (:func:`trainer.signals.survive_lost_output`).
    """
    with survive_lost_output():
        return _run_worker(resolved, allow_changes, where)


def _crashed(cfg: TrainJob, env: DistEnv, e: BaseException) -> tuple[str, str | None]:
    """(the reason this rank reports, the file keeping its traceback) for an unexpected error (exit 1)."""
    return f"{type(e).__name__}: {e}", keep_traceback(cfg.run_dir, env.rank, env.world_size, e)


def _run_worker(resolved: dict[str, Any], allow_changes: bool, where: str) -> int:
    reproducible_cpu_math()  # before this process's first CPU op
    try:
        cfg = TrainJob.from_resolved(resolved, where)
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    stop = StopFlag()
    env = _join(cfg, stop)
    if env is None:
        return EXIT_REFUSED
    code, reason, healthy, kept = EXIT_FAILURE, "", False, None
    lock = None
    try:
        lock = _take_run_lock(env, cfg.run_dir, stop)
        trainer = Trainer(cfg, env, stop, allow_changes=allow_changes)
        code = trainer.fit()
        reason = {EXIT_OK: "finished", EXIT_REQUEUE: "stopped by signal; checkpoint committed"}.get(code, trainer.stop_reason)
        healthy = True
    except StoppedBeforeTraining as e:
        code, reason = EXIT_REQUEUE, str(e)
        print(f"train: {e}; exit {EXIT_REQUEUE} (requeue me)", file=sys.stderr, flush=True)
    except (RefusedError, ConfigError) as e:
        code, reason = EXIT_REFUSED, str(e)
        print(f"train: error: {e}", file=sys.stderr, flush=True)
    except DiskFullError as e:
        code, reason = EXIT_REFUSED, str(e)
        print(f"train: error: {e}", file=sys.stderr, flush=True)
    except ShardError as e:
        code, reason = EXIT_REFUSED, f"the dataset is corrupt: {e}; rebuild it (pretrain data) or restore the shard before running again"
        print(f"train: error: {reason}", file=sys.stderr, flush=True)
    except OSError as e:
        if not is_disk_full(e):
            reason, kept = _crashed(cfg, env, e)
            raise
        # e.g. metrics.jsonl on a full disk: retrying cannot help until space is freed
        code, reason = EXIT_REFUSED, f"disk full: {e}; free space, then run the same command again"
        print(f"train: error: {reason}", file=sys.stderr, flush=True)
    except BaseException as e:
        reason, kept = _crashed(cfg, env, e)
        raise
    finally:
        _write_exit_status(env, code, reason, kept)
        stop.settle()
    if healthy:
        # nobody leaves before the checkpoint is committed (torchrun kills the rest once one rank exits)
        barrier(env)
    shutdown(env)
    if lock is not None:
        lock.release()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.train",
                                     description="one training rank (run under torchrun by `pretrain train`)")
    parser.add_argument("config", help="a resolved run config (what `pretrain config show CONFIG [overrides]` prints)")
    parser.add_argument("--allow-changes", action="store_true",
                        help="resume even though hyper-parameters differ from the checkpoint's (the changes are logged)")
    args = parser.parse_args(argv)
    try:
        resolved = read_yaml_mapping(args.config)
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    return run_worker(resolved, allow_changes=args.allow_changes, where=args.config)


if __name__ == "__main__":
    exit_now(main())  # the outcome is written and the checkpoint committed: skip the interpreter's teardown
