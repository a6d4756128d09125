"""Training stage: GPT-2 with torchrun DDP and exact checkpoint/resume.

Entry points:

* ``pretrain train CONFIG [section.key=value ...] [--allow-changes]``: starts torchrun on this
  machine with ``train.nproc_per_node`` workers, every socket on 127.0.0.1
  (``trainer.torchrun_local``), or, already under torchrun, is the worker. Rerunning the same
  command resumes from the newest committed checkpoint of ``run_dir`` that verifies and loads;
  a resume with changed hyper-parameters is refused unless ``--allow-changes`` (``trainer.config``).
  One training per run dir at a time (``RUN_DIR/.locks/train.lock``, ``trainer.runlock``).
* ``python -m trainer.train CONFIG [overrides]``: one worker (what torchrun runs; a plain
  ``python -m`` runs a single process without a process group).
* ``python bench/train_step.py CONFIG [overrides] --steps N --warmup W``: step time / MFU.

What a run directory holds: ``metrics.jsonl`` (one line per step, see ``trainer.metrics``),
``checkpoints/step_XXXXXXXX/`` (see ``trainer.checkpoint``), ``mlflow_run.json`` (the MLflow
run this training logs to, see ``trainer.tracking``).

For the eval stage (read-only, sees committed checkpoints only)::

    from trainer.checkpoint import list_committed, load_model_for_eval
    for ckpt in list_committed(run_dir):            # oldest first
        model, meta = load_model_for_eval(ckpt, device="cuda")   # GPT in eval mode
        meta["step"], meta["mlflow_run_id"], meta["config"]     # what to log against

Exit codes of ``pretrain train`` / ``python -m trainer.train`` (also what the launcher returns):

* ``EXIT_OK`` (0): reached ``train.max_steps``; a final checkpoint is committed.
* ``EXIT_FAILURE`` (1): crashed in a way a retry may fix; run the same command again to resume
  from the last checkpoint.
* ``EXIT_REFUSED`` (2): a rerun of the same command cannot help, so schedulers must not retry:
  an invalid config value, a checkpoint of another model shape or data manifest, changed
  hyper-parameters without ``--allow-changes``, the run dir held by another training, a corrupt
  shard or out-of-vocabulary token, a full disk (the partial write is deleted, committed
  checkpoints are kept), or ``train.max_skipped_steps`` non-finite steps in a row (checkpointed
  first). Fix the cause named in the message, then run the same command again.
* ``EXIT_REQUEUE`` (3): a stop signal (SIGTERM, SIGUSR2, SIGUSR1 on CPU) arrived, a checkpoint is
  committed: "checkpointed, requeue me". Running the same command again continues exactly.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_REFUSED = 2
EXIT_REQUEUE = 3

# Where the launcher (trainer.launch) wants each node's local rank 0 to report the exit code:
# torchrun itself only exits 0/1, which would hide "requeue me" (3) and "refused" (2).
EXIT_FILE_ENV = "PRETRAIN_EXIT_FILE"


def rank_exit_file(exit_file: str, local_rank: int) -> str:
    """Where local rank ``local_rank`` reports its own outcome beside the node's ``exit_file``: a
    failed run's launcher names the rank that failed first, or one that wrote nothing (killed)."""
    return f"{exit_file}.rank{local_rank}"


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets the same variables)."""
    import os

    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
