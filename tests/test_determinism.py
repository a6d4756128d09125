"""`train.deterministic`: the kernels a compiled run needs to resume bit for bit (trainer.determinism).

What a GPU would show (a compiled resume equal to the uninterrupted run) cannot be seen here; what
can: the code inductor generates for the model's training step, which adds the embeddings'
gradients with atomic adds (their order, and so the rounding, changes from run to run on a GPU)
unless the mode is on; and a training run in that mode (strict: an op with no deterministic
implementation would raise) that gives the default run's losses bit for bit. Also: one rank on two
threads, where the default run itself once differed from one run to the next, repeats itself
(trainer.determinism's ``reproducible_cpu_math``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_helpers import make_shard_dir

REPO = Path(__file__).resolve().parents[1]

# One compiled forward and backward of a small GPT-2 (the trainer's model, the real vocabulary), and
# what the code inductor generated for it contains.
COMPILED_STEP = """
import json, sys
import torch
from torch._inductor.utils import run_and_get_code
from trainer.determinism import make_deterministic
from trainer.model import GPT, GPTConfig

if sys.argv[1] == "on":
    make_deterministic()
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
step = torch.compile(model)
x = torch.randint(0, 50257, (4, 16))
y = torch.randint(0, 50257, (4, 16))

def train_step():
    _, loss = step(x, y)
    loss.backward()

_, code = run_and_get_code(train_step)
text = "\\n".join(code)
print(json.dumps({"atomic_add": "atomic_add" in text, "index_put": "aten.index_put" in text}))
"""


@pytest.mark.slow
def test_the_compiled_step_adds_embedding_gradients_without_atomics_only_in_deterministic_mode():
    found = {}
    for mode in ("off", "on"):  # one after another: the other xdist worker may be timing a SLURM job
        proc = subprocess.run([sys.executable, "-c", COMPILED_STEP, mode], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["off"] == {"atomic_add": True, "index_put": False}
    assert found["on"] == {"atomic_add": False, "index_put": True}


RUN_CONFIG = """\
run_dir: {run_dir}
data: {{output_dir: {data_dir}}}
model: {{name: micro}}
train: {{nproc_per_node: {nproc}, device: cpu, micro_batch_size: 4, seq_len: 32, batch_tokens: 256, max_steps: 6,
        warmup_steps: 2, lr: 3.0e-3, min_lr: 3.0e-4, val_every: 3, val_batches: 2, sample_every: 6, sample_tokens: 4,
        ckpt_every: 3, keep_last: 2, deterministic: {deterministic}}}
tracking: {{uri: none}}
"""


def _train(tmp: Path, data: Path, name: str, deterministic: bool = False, ranks: int = 2) -> list[dict]:
    """A 6-step run through `pretrain train` (validation, a sample and checkpoints included): on 2
    gloo ranks with one thread each (torchrun's default), or on one rank with 2 intra-op threads."""
    config = tmp / f"{name}.yaml"
    config.write_text(RUN_CONFIG.format(run_dir=tmp / name, data_dir=data, deterministic=str(deterministic).lower(), nproc=ranks))
    env = os.environ if ranks > 1 else {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", str(config)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    said = "deterministic kernels (train.deterministic): True" in proc.stdout + proc.stderr
    assert said == deterministic, proc.stdout[-2000:]
    return [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]


def _history(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


@pytest.mark.slow
def test_a_deterministic_run_trains_with_the_default_runs_losses_bit_for_bit(tmp_path):
    data = make_shard_dir(tmp_path / "data", seed=5)
    default, deterministic = _train(tmp_path, data, "default"), _train(tmp_path, data, "deterministic", deterministic=True)
    assert [s for s, _ in _history(deterministic, "loss")] == list(range(1, 7))
    for key in ("loss", "grad_norm", "val_loss"):
        assert _history(deterministic, key) == _history(default, key), key
    assert default[-1]["loss"] < default[0]["loss"], "the run must learn, or equal losses prove little"


@pytest.mark.slow
def test_one_rank_on_two_threads_repeats_itself_bit_for_bit(tmp_path):
    """MKL's vector math once made such runs differ in their last bits from one run to the next (its
    first call, made from both threads at once, differed from the later ones in 2 to 5 of 8
    processes). Before ``reproducible_cpu_math`` this test failed 2 times in 3 here."""
    data = make_shard_dir(tmp_path / "data", seed=5)
    first, *others = (_train(tmp_path, data, name, ranks=1) for name in ("first", "second", "third"))
    assert [s for s, _ in _history(first, "loss")] == list(range(1, 7))
    for key in ("loss", "grad_norm", "val_loss"):
        for other in others:
            assert _history(other, key) == _history(first, key), key


def test_cudnn_attention_is_refused_in_deterministic_mode():
    """PyTorch has no deterministic backward for cuDNN attention: a config error, not a crash at step 1."""
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="sdpa_backend 'cudnn' has no deterministic backward"):
        load_config(str(REPO / "configs" / "smoke.yaml"), ["train.deterministic=true", "train.sdpa_backend=cudnn"])
    assert load_config(str(REPO / "configs" / "smoke.yaml"), ["train.deterministic=true"]).train.deterministic
