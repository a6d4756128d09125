#!/usr/bin/env bash
# The ONE prepared script a GPU session runs (device time is scarce; ~8 minutes on one H100/H200):
#   1. bench/train_step.py side by side with build-nanogpt's own model, compile on and off
#      (GPT-2 124M, B=64, T=1024, 524,288 tokens/step, bf16): RATIO lines (tokens/s, peak memory);
#   2. the chunked LM-head loss off (train.loss_chunk_tokens=0), compile on and off: the side-by-side
#      runs above measured it on (the default), so these give its effect on this GPU;
#   3. HellaSwag scorer: fp32 vs bf16 (pinned attention kernel) vs bf16 with PyTorch's own kernel
#      choice, 1000 HellaSwag-shaped rows (RESULT_DTYPES), then the batched-vs-loop bench in bf16;
#   4. the real trainer (torchrun, 1 rank, synthetic shards, async checkpoints every 8 steps), 25 steps,
#      on the config `pretrain config show` resolves (the worker takes a resolved config);
#   5. SDPA backends pinned (train.sdpa_backend=flash|cudnn), eager;
#   6. exact stop/resume of a tiny run on the GPU (eager).
# Usage (repo root, on the GPU machine; copy ../shared/anchors/ to .anchors/ first, it is git-ignored):
#   bash bench/device_run.sh [OUT_DIR]
# Env: ANCHOR=path of build_nanogpt_step.py (default .anchors/build_nanogpt_step.py);
#      DEVICE_RUN_TINY=1 shrinks every part to a tiny model on whatever device is present (the CPU
#      check of this script's logic: about 3 minutes on 2 cores, compile off only).
#      DEVICE_RUN_BUDGET_S=540 (default): the whole script's wall-time budget. Parts run in order of
#      importance; each is cut at its own limit or at the budget, and parts left when it is spent
#      are reported SKIPPED, so the script ends inside one 10-minute device command.
# The log is OUT_DIR/device_run.log; OUT_DIR/device_run.summary holds the RESULT/RATIO lines.
set -uo pipefail
out=${1:-${OUT:-/tmp}}
mkdir -p "$out"
log="$out/device_run.log"
: > "$log"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
anchor=${ANCHOR:-.anchors/build_nanogpt_step.py}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "${DEVICE_RUN_TINY:-0}" = 1 ]; then
  shape=(model.name=micro train.micro_batch_size=2 train.seq_len=32 train.batch_tokens=128)
  steps=(--steps 1 --warmup 1); csteps=(--steps 1 --warmup 1)
  compile_settings=off; hs_model=micro; hs_rows=12; hs_loop_rows=8
  trainer_model=micro; trainer_b=2; trainer_t=32; trainer_tokens=128; trainer_steps=3; trainer_data=60000
  resume_args=(--steps 6 model.name=micro train.micro_batch_size=2 train.seq_len=32 train.batch_tokens=64)
  t_big=300; t_small=200
else
  shape=(train.nproc_per_node=1)
  steps=(--steps 6 --warmup 3); csteps=(--steps 6 --warmup 2)
  compile_settings=on,off; hs_model=gpt2; hs_rows=1000; hs_loop_rows=200
  trainer_model=gpt2; trainer_b=64; trainer_t=1024; trainer_tokens=524288; trainer_steps=25; trainer_data=16000000
  resume_args=(train.device=cuda)
  t_big=240; t_small=120
fi

budget=${DEVICE_RUN_BUDGET_S:-540}

# run NAME LIMIT_S CMD...: one part, its wall time and exit code in the log, within the budget
run() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: SKIPPED (budget of $budget s spent)" | tee -a "$log"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*" | tee -a "$log"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$log"
  return 0
}

{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"
} 2>&1 | tee -a "$log"

# 1. side by side with build-nanogpt (the project's default config: chunked loss on, SDPA auto)
if [ -f "$anchor" ]; then
  run side-by-side $((2 * t_big + 2 * t_small)) $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" "${csteps[@]}" \
    --anchor "$anchor" --compile-settings "$compile_settings"
else
  echo "=== side-by-side: SKIPPED, no anchor at $anchor (copy ../shared/anchors/ to .anchors/)" | tee -a "$log"
fi

# 2. the chunked loss off, for its effect (on = the side-by-side project runs)
for c in ${compile_settings//,/ }; do
  flag=$([ "$c" = on ] && echo true || echo false)
  run "loss-chunk-off compile=$c" "$t_big" $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" \
    train.compile="$flag" train.loss_chunk_tokens=0 "${steps[@]}"
done

# 3. eval: bf16 vs fp32 speed and agreement (random init: agreement is only indicative), then batched vs loop
run "hellaswag dtypes" "$t_small" $py bench/hellaswag.py --model "$hs_model" --rows "$hs_rows" --data synthetic \
  --dtypes float32,bfloat16 --eval-sdpa both
run "hellaswag bf16 batched-vs-loop" "$t_small" $py bench/hellaswag.py --model "$hs_model" --rows "$hs_loop_rows" --data synthetic --dtype auto

# 4. the real trainer: torchrun, 1 rank, async checkpoints every 8 steps, compiled
$py - "$work/data" "$trainer_data" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from resume_check import make_data
Path(sys.argv[1]).mkdir(parents=True)
make_data(Path(sys.argv[1]), int(sys.argv[2]))
EOF
compile_trainer=$([ "$compile_settings" = off ] && echo false || echo true)
cat > "$work/train.yaml" <<EOF
run_dir: $work/run
data: {output_dir: $work/data}
model: {name: $trainer_model}
train: {nproc_per_node: 1, micro_batch_size: $trainer_b, seq_len: $trainer_t, batch_tokens: $trainer_tokens,
        max_steps: $trainer_steps, warmup_steps: 5, compile: $compile_trainer, val_every: 0, sample_every: 0,
        ckpt_every: 8, keep_last: 2}
tracking: {uri: none}
EOF
# the worker takes a resolved config (what `pretrain train` hands it): resolve the file first
if $py -m pipelines.cli config show "$work/train.yaml" > "$work/resolved.yaml" 2>> "$log"; then
  run "trainer $trainer_steps steps" "$t_big" $py -m torch.distributed.run --standalone --nproc_per_node 1 -m trainer.train "$work/resolved.yaml"
else
  echo "=== trainer $trainer_steps steps: exit 2 (pretrain config show failed, see the log)" | tee -a "$log"
fi

# 5. SDPA backends, eager (auto = the side-by-side compile-off project run)
for b in flash cudnn; do
  if [ "${DEVICE_RUN_TINY:-0}" = 1 ] && [ "$b" != flash ]; then continue; fi  # no CPU kernel for cudnn
  run "sdpa=$b" "$t_small" $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" train.compile=false \
    train.sdpa_backend="$b" "${steps[@]}"
done

# 6. exact resume (eager) on this device
run "resume check" "$t_small" $py bench/resume_check.py "${resume_args[@]}"

echo "=== summary" | tee -a "$log"
grep -E "^(  )?(RESULT|RATIO)|^=== .*exit|^([0-9-]+ [0-9:]+ )?step [0-9]+/|max_logprob|differ|identical" "$log" | tee "$out/device_run.summary"
