"""Training stage: GPT-2 with torchrun DDP and exact checkpoint/resume."""
