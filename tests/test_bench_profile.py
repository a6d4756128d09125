"""bench/profile_step.py: a step script profiled unchanged (its exit code kept), and two profiles
compared so the largest difference comes first (what a GPU session reads to find a throughput gap)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_MICRO = ["bench/train_step.py", "configs/smoke.yaml", "model.name=micro", "train.nproc_per_node=1",
               "train.seq_len=32", "train.micro_batch_size=2", "train.batch_tokens=64", "--steps", "1", "--warmup", "0"]


def _profile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/profile_step.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_profiled_bench_step_records_its_operators_and_a_diff_ranks_the_changed_one_first(tmp_path):
    ours = tmp_path / "ours.json"
    proc = _profile("run", "--json", str(ours), "--", *BENCH_MICRO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESULT " in proc.stdout and "PROFILE script=bench/train_step.py exit=0" in proc.stdout
    record = json.loads(ours.read_text())
    assert record["argv"] == BENCH_MICRO[1:] and record["measure"] == "CPU operator self time"
    calls, us = record["by_name"]["aten::mm"]  # the model's matmuls ran under the profiler
    assert calls > 0 and us > 0

    # a reference whose matmuls took 1 s longer: the diff names matmuls first, by category and by name
    ref = dict(record, by_name={**record["by_name"], "aten::mm": [calls, us + 1e6]})
    ref_path = tmp_path / "ref.json"
    ref_path.write_text(json.dumps(ref))
    proc = _profile("diff", str(ours), str(ref_path), "--top", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    table = lines.index(next(ln for ln in lines if ln.startswith("category")))
    assert lines[table + 1].split()[0] == "matmul" and lines[table + 1].split()[-1] == "-1000.0"
    assert lines[-3].endswith("aten::mm") and "-1000.0" in lines[-3]
    assert len(lines) - lines.index(next(ln for ln in lines if "largest difference first" in ln)) - 1 == 3


def test_the_profiled_script_keeps_its_exit_code_and_a_damaged_profile_is_refused_by_name(tmp_path):
    out = tmp_path / "bad.json"
    proc = _profile("run", "--json", str(out), "--", *BENCH_MICRO[:2], "train.no_such_key=1")
    assert proc.returncode == 2, proc.stdout + proc.stderr  # the bench's own refusal, not the profiler's
    assert "no_such_key" in proc.stderr and "exit=2" in proc.stdout

    torn = tmp_path / "torn.json"
    torn.write_text('{"format": "profile_step/1", "by_na')
    proc = _profile("diff", str(torn), str(out))
    assert proc.returncode == 2 and str(torn) in proc.stderr and "Traceback" not in proc.stderr
    proc = _profile("run", "--json", str(out), "--", "bench/no_such_script.py")
    assert proc.returncode == 2 and "no_such_script.py" in proc.stderr
