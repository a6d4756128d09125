#!/usr/bin/env bash
# One GPU session's worth of checks, in one call (device time is scarce): GPT-2 124M step time,
# tokens/s and MFU with compile off/on (bf16, T=1024), then exact stop/resume on the GPU.
# Usage (repo root, on the GPU machine): bash bench/device_run.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-/tmp}}
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  python3 bench/train_step.py configs/gpt2-124m.yaml train.compile=false --steps 10 --warmup 3
  python3 bench/train_step.py configs/gpt2-124m.yaml train.compile=true --steps 10 --warmup 5
  python3 bench/resume_check.py train.device=cuda
  python3 bench/resume_check.py train.device=cuda train.compile=true
  if [ -f bench/hellaswag.py ]; then python3 bench/hellaswag.py --device cuda; fi
} 2>&1 | tee "$out/device_run.log" | grep -E "^(RESULT|torch|GPU|bench:|straight|ratio|hellaswag|examples)|Error|error" 
