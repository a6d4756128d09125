"""The training worker: one process per rank, started by torchrun (``python -m trainer.train CONFIG [overrides]``).

One optimizer step = ``grad_accum`` micro-steps of (B, T) tokens per rank, where
``grad_accum = batch_tokens / (B * T * world_size)``. Gradients are all-reduced only on the last
micro-step (``no_sync`` before it) and each micro-loss is divided by ``grad_accum`` so the
accumulated gradient is the mean over the whole batch, as with one big batch.

After step ``s`` (1-based) the worker, in this order: writes the metrics line of ``s`` (with the
val loss / sample when due), checkpoints when due, then checks (collectively) for a stop signal.
Because checkpoints capture everything that influences the future (weights, AdamW moments,
step, every rank's loader position and RNG state), a resumed run reproduces the uninterrupted
one bit for bit on the same hardware and world size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dataprep.shards import ShardError, TokenDataset
from pipelines.config import ConfigError, PipelineConfig, dump_yaml, flatten, load_config, to_dict
from trainer import EXIT_FAILURE, EXIT_FILE_ENV, EXIT_OK, EXIT_REFUSED, EXIT_REQUEUE
from trainer.checkpoint import (
    MODEL_FILE,
    OPTIM_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointWriter,
    find_resumable,
    read_meta,
    remove_partials,
    to_cpu,
)
from trainer.data import LoaderState, TrainLoader, ValBatches
from trainer.dist import (
    DistEnv,
    all_gather_object,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
)
from trainer.metrics import MetricsLog
from trainer.model import GPT, GPTConfig, resolve_config
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.rng import capture_rng, restore_rng, seed_all
from trainer.signals import StopFlag
from trainer.tracking import NullTracker, TrackingError, start_tracking

STATE_FORMAT = 1

# Dense peak FLOP/s per GPU: (bf16, tf32). Used for MFU when train.peak_flops is 0.
PEAK_FLOPS = {"H100": (989.4e12, 494.7e12), "H200": (989.4e12, 494.7e12), "A100": (312e12, 156e12), "L4": (121e12, 60e12)}


class RefusedError(RuntimeError):
    """The run cannot start as configured (bad geometry, foreign checkpoint, unreadable data)."""


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


class Trainer:
    def __init__(self, cfg: PipelineConfig, env: DistEnv, stop: StopFlag):
        self.cfg, self.env, self.stop = cfg, env, stop
        tc = cfg.train
        self.run_dir = Path(cfg.run_dir)
        try:
            self.gpt_cfg: GPTConfig = resolve_config(cfg.model)
        except ValueError as e:
            raise RefusedError(str(e)) from e
        if tc.seq_len > self.gpt_cfg.block_size:
            raise RefusedError(f"train.seq_len ({tc.seq_len}) exceeds the model's block_size ({self.gpt_cfg.block_size})")
        self.grad_accum = grad_accum_steps(tc.batch_tokens, tc.micro_batch_size, tc.seq_len, env.world_size)
        try:
            self.dataset = TokenDataset(cfg.data.output_dir)
        except ShardError as e:
            raise RefusedError(f"data.output_dir: {e}") from e

        dev = env.device
        self.device_type = dev.type
        if tc.dtype not in ("auto", "bfloat16", "float32"):
            raise RefusedError(f"train.dtype must be auto, bfloat16 or float32, got '{tc.dtype}'")
        self.bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and dev.type == "cuda")
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")

        # identical init on every rank (DDP would broadcast rank 0's anyway); then per-rank RNG streams
        seed_all(tc.seed)
        self.model = GPT(self.gpt_cfg).to(dev)
        seed_all(tc.seed + env.rank)
        log0(env, self.model.summary())
        self.optimizer = build_optimizer(self.model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, dev.type)
        self.step = 0
        self.tokens_seen = 0
        self.run_id: str | None = None
        loader_state = LoaderState()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

        resumed = self._resume()
        if resumed is not None:
            loader_state = resumed
        try:
            self.loader = TrainLoader(self.dataset, tc.micro_batch_size, tc.seq_len, env.rank, env.world_size, tc.seed, loader_state)
        except ValueError as e:
            raise RefusedError(str(e)) from e
        self.val = ValBatches(self.dataset, tc.micro_batch_size, tc.seq_len, env.rank, env.world_size, tc.val_batches) if tc.val_every > 0 else None

        self.tracker = self._start_tracking()
        self.writer = CheckpointWriter(
            self.run_dir, tc.keep_last, tc.keep_every, asynchronous=tc.async_ckpt and dev.type == "cuda", log=lambda m: log0(env, m)
        ) if env.is_main else None

        self.compiled = torch.compile(self.model) if tc.compile else self.model
        if env.distributed:
            self.ddp = DDP(self.compiled, device_ids=[dev.index] if dev.type == "cuda" else None)
        else:
            self.ddp = self.compiled
        self.peak = peak_flops(tc.peak_flops, dev, self.bf16)
        self.flops_per_token = self.model.flops_per_token(tc.seq_len)
        self._tokenizer = None
        self._tokenizer_failed = False
        # torchrun starts workers in sessions of their own, so if torchrun is SIGKILLed its
        # workers would train on, orphaned, next to a restarted run. Notice and leave.
        self._parent = os.getppid() if env.distributed else None

    # ------------------------------------------------------------------ setup

    def _resume(self) -> LoaderState | None:
        """Pick the newest verified checkpoint (rank 0), check it belongs to this run, load it everywhere."""
        env = self.env
        decision: dict[str, Any] = {"path": None, "error": None}
        if env.is_main:
            remove_partials(self.run_dir, log=lambda m: log0(env, m))
            try:
                ckpt = find_resumable(self.run_dir, log=lambda m: log0(env, m))
            except CheckpointError as e:
                ckpt, decision["error"] = None, str(e)
            if ckpt is not None:
                meta = read_meta(ckpt)
                problems = []
                diff = _shape_mismatch(meta["model_shape"], self.gpt_cfg.shape())
                if diff:
                    problems.append("model shape differs (" + "; ".join(diff) + ")")
                if meta["data_fingerprint"] != self.dataset.fingerprint:
                    problems.append(
                        f"data manifest differs (checkpoint trained on {meta.get('data_dir')} with manifest sha256 "
                        f"{meta['data_fingerprint'][:16]}…, data.output_dir {self.dataset.directory} has {self.dataset.fingerprint[:16]}…)"
                    )
                if problems:
                    decision["error"] = (
                        f"refusing to resume {ckpt}: " + "; ".join(problems) + ". Use a new run_dir or the original config/data."
                    )
                else:
                    decision["path"] = str(ckpt)
        decision = broadcast_object(env, decision)
        if decision["error"]:
            raise RefusedError(decision["error"])
        if decision["path"] is None:
            log0(env, f"starting a new run in {self.run_dir}")
            if env.is_main:
                dropped = self.metrics.truncate_after(0)
                if dropped:
                    log0(env, f"metrics: dropped {dropped} lines of an earlier attempt that never checkpointed")
            return None

        ckpt = Path(decision["path"])
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(torch.load(ckpt / MODEL_FILE, map_location=env.device, weights_only=True))
        self.optimizer.load_state_dict(torch.load(ckpt / OPTIM_FILE, map_location=env.device, weights_only=True))
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.run_id = state.get("mlflow_run_id")
        rngs = state["rng_states"]
        loaders = state["loader_states"]
        same_world = len(rngs) == env.world_size
        if same_world:
            restore_rng(rngs[env.rank])
        else:
            # RNG streams are per rank; with another world size they cannot all be restored
            seed_all(self.cfg.train.seed + env.rank + self.step)
            log0(env, f"resume: world size changed ({len(rngs)} -> {env.world_size}); RNG streams reseeded, data position kept")
        # the loader position is global (identical on every rank), see trainer.data
        loader_state = LoaderState.from_dict(loaders[env.rank if same_world else 0])
        log0(env, f"resumed from {ckpt} at step {self.step} ({self.tokens_seen:,} tokens seen), data position {loader_state}")
        if env.is_main:
            dropped = self.metrics.truncate_after(self.step)
            if dropped:
                log0(env, f"metrics: dropped {dropped} lines past step {self.step} (steps re-run after the resume)")
        return loader_state

    def _start_tracking(self):
        env, cfg = self.env, self.cfg
        result: dict[str, Any] = {"run_id": None, "error": None}
        tracker = NullTracker()
        if env.is_main:
            params = flatten(to_dict(cfg))
            params.update({f"resolved.model.{k}": v for k, v in dataclasses.asdict(self.gpt_cfg).items()})
            params.update({"resolved.world_size": env.world_size, "resolved.grad_accum": self.grad_accum,
                           "resolved.n_params": self.model.num_params(), "resolved.n_params_non_embedding": self.model.num_params(True)})
            try:
                tracker = start_tracking(cfg.tracking.uri, cfg.tracking.experiment, self.run_dir, self.run_id, params)
                tracker.log_text(dump_yaml(cfg), "config.yaml")
                result["run_id"] = tracker.run_id
            except TrackingError as e:
                result["error"] = str(e)
        result = broadcast_object(env, result)
        if result["error"]:
            raise TrackingError(result["error"])
        self.run_id = result["run_id"]
        return tracker

    # ------------------------------------------------------------------ pieces of a step

    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device_type == "cuda":
            return x.pin_memory().to(self.env.device, non_blocking=True), y.pin_memory().to(self.env.device, non_blocking=True)
        return x, y

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step; returns (mean loss over the global batch, grad norm before clipping, lr)."""
        tc = self.cfg.train
        lr = lr_at(self.step, tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.env.device)
        for micro in range(self.grad_accum):
            x, y = self._to_device(*self.loader.next_batch())
            last = micro == self.grad_accum - 1
            sync_ctx = self.ddp.no_sync() if (self.env.distributed and not last) else contextlib.nullcontext()
            with sync_ctx:
                with self._autocast():
                    _, loss = self.ddp(x, y)
                loss = loss / self.grad_accum
                loss_sum += loss.detach()
                loss.backward()
        clip = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        all_reduce_sum(self.env, loss_sum)
        loss_value = (loss_sum / self.env.world_size).item()
        return loss_value, float(grad_norm.item()), lr

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the fixed val batches of all ranks; None if cut short by a stop signal."""
        if self.val is None or len(self.val) == 0:
            return None
        self.compiled.eval()
        total = torch.zeros((), device=self.env.device)
        try:
            for x, y in self.val:
                if any_rank(self.env, self.stop.is_set):
                    log0(self.env, "val: interrupted by a stop signal")
                    return None
                x, y = self._to_device(x, y)
                with self._autocast():
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
        gen = torch.Generator(device=self.env.device).manual_seed(tc.seed + self.step)
        with self._autocast():
            out = self.model.generate(idx, tc.sample_tokens, temperature=1.0, top_k=50, generator=gen,
                                      should_stop=lambda: self.stop.is_set)
        new = [t for t in out[0, len(prompt):].tolist() if t < enc.n_vocab]
        return tc.sample_prompt + enc.decode(new)

    def save_checkpoint(self) -> None:
        """Collective: gathers every rank's loader and RNG state; rank 0 writes (maybe in the background)."""
        env = self.env
        loader_states = all_gather_object(env, self.loader.state.to_dict())
        rng_states = all_gather_object(env, capture_rng())
        if not env.is_main:
            return
        model_state = self.model.state_dict()
        optim_state = self.optimizer.state_dict()
        if self.writer.asynchronous:
            model_state, optim_state = to_cpu(model_state), to_cpu(optim_state)
        config = to_dict(self.cfg)
        trainer_state = {
            "format_version": STATE_FORMAT,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": env.world_size,
            # the schedule is a pure function of the step (trainer.optim.lr_at); recorded for inspection
            "schedule": {"next_step": self.step, "next_lr": lr_at(self.step, self.cfg.train.lr, self.cfg.train.min_lr,
                                                                   self.cfg.train.warmup_steps, self.cfg.train.max_steps)},
            "loader_states": loader_states,
            "rng_states": rng_states,
            "mlflow_run_id": self.run_id,
            "data_fingerprint": self.dataset.fingerprint,
            "model_shape": self.gpt_cfg.shape(),
            "config": config,
        }
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": env.world_size,
            "model": dataclasses.asdict(self.gpt_cfg),
            "model_shape": self.gpt_cfg.shape(),
            "data_fingerprint": self.dataset.fingerprint,
            "data_dir": str(self.dataset.directory),
            "mlflow_run_id": self.run_id,
            "loader_states": loader_states,
            "config": config,
            "time": time.time(),
        }
        self.writer.save(self.step, model_state, optim_state, trainer_state, meta)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        env, tc = self.env, self.cfg.train
        log0(env, f"training: world size {env.world_size} on {env.device} ({env.backend or 'no process group'}), "
                  f"grad_accum {self.grad_accum}, {tc.batch_tokens:,} tokens/step, steps {self.step}->{tc.max_steps}, "
                  f"{'bf16' if self.bf16 else 'fp32'}{', compiled' if tc.compile else ''}")
        if self.step >= tc.max_steps:
            log0(env, f"already at step {self.step} >= train.max_steps {tc.max_steps}: nothing to do")
            self.tracker.finish("FINISHED")
            return EXIT_OK
        try:
            return self._loop()
        except BaseException:
            if self.env.is_main:
                self.tracker.finish("FAILED")
            raise

    def _loop(self) -> int:
        env, tc = self.env, self.cfg.train
        saved_at = -1
        while self.step < tc.max_steps:
            t0 = time.time()
            loss, grad_norm, lr = self.train_step()
            if self.device_type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            self.step += 1
            self.tokens_seen += tc.batch_tokens
            tok_s = tc.batch_tokens / dt
            mfu = self.flops_per_token * tok_s / (self.peak * env.world_size) if self.peak else None
            record: dict[str, Any] = {
                "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
                "tokens_per_s": tok_s, "mfu": mfu, "dt": dt, "time": time.time(),
            }
            last = self.step == tc.max_steps
            if tc.val_every > 0 and (self.step % tc.val_every == 0 or last):
                val_loss = self.evaluate()
                if val_loss is not None:
                    record["val_loss"] = val_loss
            if env.is_main and tc.sample_every > 0 and self.step % tc.sample_every == 0 and not self.stop.is_set:
                text = self.sample()
                if text is not None:
                    record["sample"] = text
                    self.tracker.log_text(text, f"samples/step_{self.step:08d}.txt")
            if env.is_main:
                self.metrics.append(record)
                self.tracker.log_metrics(self.step, {k: record.get(k) for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss")})
                mfu_s = f" | mfu {mfu * 100:.1f}%" if mfu is not None else ""
                val_s = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
                print(f"step {self.step}/{tc.max_steps} | loss {loss:.6f}{val_s} | lr {lr:.3e} | norm {grad_norm:.3f} | "
                      f"{tok_s:,.0f} tok/s{mfu_s} | {dt * 1000:.0f} ms", flush=True)
            if (tc.ckpt_every > 0 and self.step % tc.ckpt_every == 0) or last:
                self.save_checkpoint()
                saved_at = self.step
            if self._parent is not None and os.getppid() != self._parent:
                print(f"rank {env.rank}: torchrun (pid {self._parent}) is gone; exiting without a checkpoint", file=sys.stderr, flush=True)
                os._exit(EXIT_FAILURE)
            if any_rank(env, self.stop.is_set):
                if saved_at != self.step:
                    self.save_checkpoint()
                if self.writer is not None:
                    self.writer.wait()
                log0(env, f"stopped by signal after step {self.step}: checkpoint committed, exit {EXIT_REQUEUE} (requeue me)")
                self._finish("KILLED")
                return EXIT_REQUEUE
        if self.writer is not None:
            self.writer.wait()
        log0(env, f"finished: {self.step} steps, {self.tokens_seen:,} tokens")
        self._finish("FINISHED")
        return EXIT_OK

    def _finish(self, status: str) -> None:
        if not self.env.is_main:
            return
        self.metrics.close()
        path = self.metrics.path
        if path.exists():
            self.tracker.log_artifact(path)
        self.tracker.finish(status)


# ------------------------------------------------------------------ process entry


def _write_exit_status(env: DistEnv, code: int, reason: str) -> None:
    # Every node's local rank 0 writes it: its launcher must report the code, and ranks agree
    # on why they stop, so any node's leader knows it.
    path = os.environ.get(EXIT_FILE_ENV)
    if not path or env.local_rank != 0:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"code": code, "reason": reason}, f)
    os.replace(tmp, path)


def run_worker(config: str, overrides: list[str] | tuple[str, ...]) -> int:
    """Run this process as one rank (torchrun env) or as a single process. Returns the exit code."""
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    env = init_distributed(cfg.train.device)
    if env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and env.world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
    stop = StopFlag()
    stop.install(include_usr1=env.backend != "nccl")
    code, reason, healthy = EXIT_FAILURE, "", False
    try:
        trainer = Trainer(cfg, env, stop)
        code = trainer.fit()
        reason = "finished" if code == EXIT_OK else "stopped by signal; checkpoint committed"
        healthy = True
    except (RefusedError, ConfigError) as e:
        code, reason = EXIT_REFUSED, str(e)
        print(f"train: error: {e}", file=sys.stderr, flush=True)
    except TrackingError as e:
        code, reason = EXIT_FAILURE, str(e)
        print(f"train: error: {e}", file=sys.stderr, flush=True)
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        raise
    finally:
        _write_exit_status(env, code, reason)
    if healthy:
        # nobody leaves before the checkpoint is committed (torchrun kills the rest once one rank exits)
        barrier(env)
    shutdown(env)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description="one training rank (run under torchrun)")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    return run_worker(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
