#!/usr/bin/env bash
# The ONE prepared script a GPU session runs (device time is scarce: one 10-minute command on one
# H100/H200). Parts, in order of importance (each named, for DEVICE_RUN_PARTS):
#   anchor-compile  bench/train_step.py side by side with build-nanogpt's own model, compiled
#                   (GPT-2 124M, B=64, T=1024, 524,288 tokens/step, bf16): a RATIO line (tokens/s, memory);
#   fp8             the project bench compiled with train.fp8=true (FP8 block linears, trainer.fp8);
#   trainer         the real trainer (torchrun, 1 rank, async checkpoints every 10 steps, compiled), 30
#                   steps on real GPT-2 tokens (DEVICE_RUN_DATA, a bench/text_shards.py dir; else synthetic);
#   eval            `pretrain eval` of that run's last checkpoint on the full HellaSwag validation set
#                   (DEVICE_RUN_HELLASWAG, a rowanz-format .jsonl), bf16, timed end to end;
#   eval-dtypes     the scorer on the same checkpoint and rows in fp32 and bf16 (pinned attention kernel,
#                   fp32 head), bf16 with PyTorch's kernel choice, bf16 with a bf16 head: speed and
#                   agreement with fp32 (RESULT_DTYPES);
#   anchor-eager    the side by side without torch.compile;
#   loss-kernel     the chunked loss with its softmax gradient in one Triton kernel (train.loss_kernel=triton,
#                   trainer.loss_kernel): the loss alone three ways (bench/loss_kernel.py: plain, PyTorch
#                   ops, kernel; seconds), then the step side by side with the anchor in eager mode (the
#                   eager goal is >= 1.0x), then compiled (against the anchor-compile part's figures);
#   profile-eager   where the eager gap is: one eager step of each (bench/profile_step.py, 1 warm-up + 2
#                   steps under torch.profiler), their device kernel times compared by category and by
#                   kernel (OUT_DIR/profile_eager.txt; its category table goes into the summary);
#   chunk-on        the project bench compiled with the chunked LM-head loss on (train.loss_chunk_tokens=8192;
#                   configs/gpt2-124m.yaml has it off: measured faster compiled, at more memory);
#   sdpa            SDPA backends pinned (train.sdpa_backend=flash|cudnn), eager;
#   resume          exact stop/resume of a tiny run on the GPU (eager);
#   eval-loop       the batched scorer against build-nanogpt's one-example loop (random init, bf16);
#   compile-modes   the project bench compiled with train.compile_mode=max-autotune-no-cudagraphs and
#                   =reduce-overhead (CUDA graphs), against the anchor-compile part's figures;
#   micro-batch     the project bench compiled at train.micro_batch_size=32 and =128 (chunked loss on,
#                   which is what frees the memory for 128), same 524,288 tokens/step;
#   deterministic   train.deterministic=true (trainer.determinism): the compiled resume check without and
#                   with it (does it make a compiled resume bitwise?), then its cost, the project bench
#                   compiled with it (against the anchor-compile part's figures).
# Usage (repo root, on the GPU machine; .anchors/ = a copy of ../shared/anchors/, git-ignored):
#   bash bench/device_run.sh [OUT_DIR]
# Env: ANCHOR=path of build_nanogpt_step.py (default .anchors/build_nanogpt_step.py);
#      DEVICE_RUN_PARTS=comma list of the parts above (default: all, in that order);
#      DEVICE_RUN_TINY=1 shrinks every part to a tiny model on whatever device is present (the CPU
#      check of this script's logic, compile off);
#      DEVICE_RUN_BUDGET_S=540 (default): the whole script's wall-time budget. Each part is cut at its
#      own limit or at the budget; parts left when it is spent are reported SKIPPED.
# The log is OUT_DIR/device_run.log; OUT_DIR/device_run.summary holds the RESULT/RATIO lines.
set -uo pipefail
out=${1:-${OUT:-/tmp}}
mkdir -p "$out"
log="$out/device_run.log"
: > "$log"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
anchor=${ANCHOR:-.anchors/build_nanogpt_step.py}
data=${DEVICE_RUN_DATA:-$PWD/.devicecarry/data}
hellaswag=${DEVICE_RUN_HELLASWAG:-$PWD/.devicecarry/hellaswag_val.jsonl}
parts=${DEVICE_RUN_PARTS:-anchor-compile,fp8,trainer,eval,eval-dtypes,anchor-eager,loss-kernel,profile-eager,chunk-on,sdpa,resume,eval-loop,compile-modes,micro-batch,deterministic}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "${DEVICE_RUN_TINY:-0}" = 1 ]; then
  shape=(model.name=micro train.micro_batch_size=2 train.seq_len=32 train.batch_tokens=128 train.device=auto)
  micro_batches=(1 4)
  steps=(--steps 1 --warmup 1); csteps=(--steps 1 --warmup 1)
  compile=off; hs_model=micro; hs_rows=12; hs_loop_rows=8
  trainer_model=micro; trainer_b=2; trainer_t=32; trainer_tokens=128; trainer_steps=3; trainer_ckpt=2
  eval_rows=24
  resume_args=(--steps 6 model.name=micro train.micro_batch_size=2 train.seq_len=32 train.batch_tokens=64)
  anchor_shape=(--batch 2 --seq 32 --batch-tokens 128 --n-layer 2 --n-head 2 --n-embd 64)
  t_big=300; t_small=200
  kernel_env=(env TRITON_INTERPRET=1)  # no GPU: Triton's interpreter runs the loss kernel on CPU tensors
  loss_alone=(--rows 256 --vocab 1000 --dim 32 --chunk 96 --iters 2)
else
  shape=(train.nproc_per_node=1)
  micro_batches=(32 128)
  steps=(--steps 6 --warmup 3); csteps=(--steps 6 --warmup 2)
  compile=on; hs_model=gpt2; hs_rows=1000; hs_loop_rows=200
  trainer_model=gpt2; trainer_b=64; trainer_t=1024; trainer_tokens=524288; trainer_steps=30; trainer_ckpt=10
  eval_rows=0
  resume_args=(train.device=cuda)
  anchor_shape=(--batch 64 --seq 1024 --batch-tokens 524288)
  t_big=150; t_small=100
  kernel_env=()
  loss_alone=()  # GPT-2 124M's: 65,536 rows, vocabulary 50,304, width 768, chunks of 8,192
fi
compile_flag=$([ "$compile" = on ] && echo true || echo false)
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
# the GPT-2 BPE without network (the eval needs it): a carried ranks file, if there is one
if [ -f .devicecarry/cache/tokenizers/gpt2.tiktoken ]; then export PRETRAIN_CACHE_DIR=$PWD/.devicecarry/cache; fi

side_by_side() {  # the project's configs/gpt2-124m.yaml as it is against the anchor
  if [ -f "$anchor" ]; then
    run "side-by-side compile=$1" $((2 * t_big)) $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" "${csteps[@]}" \
      --anchor "$anchor" --compile-settings "$1"
  else
    echo "=== side-by-side compile=$1: SKIPPED, no anchor at $anchor (copy ../shared/anchors/ to .anchors/)" | tee -a "$log"
  fi
}

trainer_run() {  # the real trainer on real tokens (synthetic ones where none were carried)
  if [ ! -f "$data/manifest.json" ]; then
    data=$work/data
    $py -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from resume_check import make_data; \
Path(sys.argv[1]).mkdir(parents=True); make_data(Path(sys.argv[1]), int(sys.argv[2]))" "$data" 2000000
  fi
  printf '%s\n' "run_dir: $work/run" "data: {output_dir: $data}" "model: {name: $trainer_model}" \
    "train: {nproc_per_node: 1, micro_batch_size: $trainer_b, seq_len: $trainer_t, batch_tokens: $trainer_tokens," \
    "        max_steps: $trainer_steps, warmup_steps: 5, compile: $compile_flag, val_every: 0," \
    "        sample_every: $trainer_steps, sample_tokens: 24, ckpt_every: $trainer_ckpt, keep_last: 2}" \
    "tracking: {uri: none}" > "$work/train.yaml"
  # the worker takes a resolved config (what `pretrain train` hands it): resolve the file first
  if $py -m pipelines.cli config show "$work/train.yaml" > "$work/resolved.yaml" 2>> "$log"; then
    run "trainer $trainer_steps steps" "$t_big" $py -m torch.distributed.run --standalone --nproc_per_node 1 -m trainer.train "$work/resolved.yaml"
  else
    echo "=== trainer: exit 2 (pretrain config show failed, see the log)" | tee -a "$log"
  fi
}

last_checkpoint() { ls -d "$work"/run/checkpoints/step_* 2>/dev/null | sort | tail -1; }

eval_full() {  # pretrain eval, end to end, of the trained checkpoint
  local ckpt; ckpt=$(last_checkpoint)
  if [ -z "$ckpt" ] || [ ! -f "$hellaswag" ]; then
    echo "=== eval: SKIPPED (checkpoint '$ckpt', data '$hellaswag')" | tee -a "$log"
    return 0
  fi
  run "pretrain eval hellaswag" "$t_big" $py -m pipelines.cli eval "$ckpt" --tasks hellaswag --limit "$eval_rows" \
    eval.hellaswag_path="$hellaswag" eval.tracking_uri=none eval.dtype=auto
  find "$ckpt" -name '*.json' -path '*eval*' -exec grep -H -E '"(acc|acc_norm|elapsed_s|n)"' {} + >> "$log" 2>/dev/null
}

eval_dtypes() {  # bf16 against fp32 on the trained checkpoint (random init where none was written)
  local ckpt; ckpt=$(last_checkpoint)
  local rows=$([ "$eval_rows" = 0 ] && echo 10042 || echo "$eval_rows")
  local src=(--model "$hs_model" --rows "$hs_rows" --data synthetic)
  if [ -n "$ckpt" ] && [ -f "$hellaswag" ]; then src=(--checkpoint "$ckpt" --rows "$rows" --data "$hellaswag"); fi
  run "hellaswag dtypes" "$t_big" $py bench/hellaswag.py "${src[@]}" --dtypes float32,bfloat16 --eval-sdpa both --eval-head both
}

profile_eager() {  # one eager step of each under torch.profiler, compared kernel by kernel
  if [ ! -f "$anchor" ]; then
    echo "=== profile-eager: SKIPPED, no anchor at $anchor" | tee -a "$log"
    return 0
  fi
  run "profile project eager" "$t_small" $py bench/profile_step.py run --json "$work/prof_project.json" -- \
    bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" train.compile=false --steps 2 --warmup 1
  run "profile anchor eager" "$t_small" $py bench/profile_step.py run --json "$work/prof_anchor.json" -- \
    "$anchor" "${anchor_shape[@]}" --no-compile --steps 2 --warmup 1
  if $py bench/profile_step.py diff "$work/prof_project.json" "$work/prof_anchor.json" --top 40 > "$out/profile_eager.txt" 2>> "$log"; then
    sed -n '1,12p' "$out/profile_eager.txt" | sed 's/^/PROFILE /' >> "$log"
  else
    echo "=== profile-eager: no comparison (see the log)" | tee -a "$log"
  fi
}

loss_kernel() {  # train.loss_kernel=triton: eager side by side with the anchor, then compiled
  local chunked=(train.loss_chunk_tokens=8192 train.loss_kernel=triton)
  run "loss alone: plain, chunked, kernel" "$t_small" "${kernel_env[@]}" $py bench/loss_kernel.py "${loss_alone[@]}"
  if [ -f "$anchor" ]; then
    run "loss_kernel=triton side-by-side compile=off" $((2 * t_big)) "${kernel_env[@]}" $py bench/train_step.py configs/gpt2-124m.yaml \
      "${shape[@]}" "${chunked[@]}" "${csteps[@]}" --anchor "$anchor" --compile-settings off
  fi
  if [ "$compile" = on ]; then
    run "loss_kernel=triton compile=on" "$t_big" "${kernel_env[@]}" $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" \
      train.compile=true "${chunked[@]}" "${csteps[@]}"
  fi
}

IFS=, read -ra order <<< "$parts"
for part in "${order[@]}"; do
  case $part in
    anchor-compile) side_by_side "$compile" ;;
    fp8) run "fp8 compile=$compile" "$t_big" $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" \
           train.compile="$compile_flag" train.fp8=true "${csteps[@]}" ;;
    trainer) trainer_run ;;
    eval) eval_full ;;
    eval-dtypes) eval_dtypes ;;
    anchor-eager) if [ "$compile" = on ]; then side_by_side off; fi ;;
    loss-kernel) loss_kernel ;;
    profile-eager) profile_eager ;;
    chunk-on) run "loss-chunk-on compile=$compile" "$t_big" $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" \
                train.compile="$compile_flag" train.loss_chunk_tokens=8192 "${csteps[@]}" ;;
    sdpa) for b in flash cudnn; do
            if [ "${DEVICE_RUN_TINY:-0}" = 1 ] && [ "$b" != flash ]; then continue; fi  # no CPU kernel for cudnn
            run "sdpa=$b" "$t_small" $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" train.compile=false \
              train.sdpa_backend="$b" "${steps[@]}"
          done ;;
    resume) run "resume check" "$t_small" $py bench/resume_check.py "${resume_args[@]}" ;;
    eval-loop) run "hellaswag bf16 batched-vs-loop" "$t_small" $py bench/hellaswag.py --model "$hs_model" --rows "$hs_loop_rows" \
                 --data synthetic --dtype auto ;;
    compile-modes) if [ "$compile" = on ]; then
                     for m in max-autotune-no-cudagraphs reduce-overhead; do
                       run "compile_mode=$m" "$t_big" $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" \
                         train.compile=true train.compile_mode="$m" "${csteps[@]}"
                     done
                   fi ;;
    micro-batch) for b in "${micro_batches[@]}"; do
                   run "micro_batch_size=$b compile=$compile" "$t_big" $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" \
                     train.compile="$compile_flag" train.micro_batch_size="$b" train.loss_chunk_tokens=8192 "${csteps[@]}"
                 done ;;
    deterministic) for d in false true; do
                     run "resume check compile=$compile deterministic=$d" "$t_big" $py bench/resume_check.py "${resume_args[@]}" \
                       train.compile="$compile_flag" train.deterministic="$d"
                   done
                   run "deterministic compile=$compile" "$t_big" $py bench/train_step.py configs/gpt2-124m.yaml "${shape[@]}" \
                     train.compile="$compile_flag" train.deterministic=true "${csteps[@]}" ;;
    *) echo "=== $part: unknown part (known: anchor-compile fp8 trainer eval eval-dtypes anchor-eager loss-kernel profile-eager chunk-on sdpa resume eval-loop compile-modes micro-batch deterministic)" | tee -a "$log" ;;
  esac
done

echo "=== summary" | tee -a "$log"
grep -E "^(  )?(RESULT|RATIO|PROFILE|GRADS)|^=== .*(exit|SKIPPED)|^([0-9-]+ [0-9:]+ )?step [0-9]+/|max_logprob|differ|identical|same ending|\"(acc|acc_norm|elapsed_s)\"|eval: .*computed" "$log" | tee "$out/device_run.summary"
