"""Training stage: GPT-2 with torchrun DDP and exact checkpoint/resume.

Exit codes of ``pretrain train`` / ``python -m trainer.train`` (also what the launcher returns):

* ``EXIT_OK`` (0): reached ``train.max_steps``; a final checkpoint is committed.
* ``EXIT_FAILURE`` (1): crashed; run the same command again to resume from the last checkpoint.
* ``EXIT_REFUSED`` (2): configuration error, or the run dir's checkpoint belongs to another model
  shape or data manifest; nothing was trained; fix the config or use another run_dir.
* ``EXIT_REQUEUE`` (3): a stop signal (SIGTERM, SIGUSR2, SIGUSR1 on CPU) arrived, a checkpoint is
  committed: "checkpointed, requeue me". Running the same command again continues exactly.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_REFUSED = 2
EXIT_REQUEUE = 3
