"""Chaos: random SIGKILL/SIGTERM points across the data, training (checkpoint writes included) and
eval stages of a tiny `pretrain run`; after each one the same command is run again, and the run
that finally completes has the same losses (every step, bit for bit) and the same eval results as
an uninterrupted run.

The kill points are drawn from a seeded RNG (``CHAOS_SEED``, printed; ``CHAOS_KILLS`` scales how
many), so a failure names the schedule that produced it and can be replayed. They are delivered
one after another on the same run dir, in stage order, each to a fresh rerun of the command, so
the whole test costs about one workflow plus one restart per kill point:

* data: SIGKILL or SIGTERM to the whole process group once the stage has finished ``k`` more work
  units (result files under ``OUTPUT_DIR/.work``) in this attempt;
* train: SIGKILL or SIGTERM at a random step, and a SIGKILL of rank 0 in the middle of a
  checkpoint write (files written but not renamed, or renamed but not committed) through the
  trainer's test-only fault hook;
* eval: SIGKILL or SIGTERM a random moment after the eval stage starts.

SIGKILL goes to every process of the run (as when a node dies); SIGTERM goes to the command's
process group (as from a terminal or SLURM), which must answer with exit 3: "stopped cleanly,
resumable, requeue me".
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.trainer_helpers import kill_tree
from tests.workflow_helpers import final_metrics, stage_status, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("CHAOS_SEED", "20261126"))
SCALE = max(1, int(os.environ.get("CHAOS_KILLS", "10")) // 10)
MAX_STEPS, CKPT_EVERY = 12, 6  # tests/workflow_helpers.py's tiny workflow
FAULT_ENV = "PRETRAIN_FAULT_INJECT"  # trainer.checkpoint's test-only hook


@dataclass
class KillPoint:
    stage: str  # data | train | ckpt | eval
    sig: str  # KILL | TERM (ckpt: the fault hook SIGKILLs rank 0 itself)
    at: float  # data: work units finished in this attempt; train: step; ckpt: unused; eval: delay in s
    phase: str = ""  # ckpt: "tmp" (written, not renamed) or "renamed" (not committed)

    def describe(self) -> str:
        if self.stage == "ckpt":
            return f"ckpt-write {self.phase} (rank 0 SIGKILLed mid-write)"
        what = {"data": f"after {int(self.at)} work units", "train": f"at step {int(self.at)}", "eval": f"{self.at:.2f} s into eval"}
        return f"{self.stage} SIG{self.sig} {what[self.stage]}"


def schedule(rng: random.Random) -> list[KillPoint]:
    """Kill points in stage order: 3 in data, 4 at training steps and 2 mid-checkpoint, 2 in eval (×SCALE)."""
    sig = lambda: rng.choice(["KILL", "TERM"])  # noqa: E731
    data = [KillPoint("data", sig(), k) for k in sorted(rng.randint(1, 4) for _ in range(3 * SCALE))]
    steps = sorted(rng.sample(range(1, MAX_STEPS), min(4 * SCALE, MAX_STEPS - 1)))
    train = [KillPoint("train", sig(), s) for s in steps]
    for _ in range(2 * SCALE):
        train.insert(rng.randint(0, len(train)), KillPoint("ckpt", "KILL", 0, rng.choice(["tmp", "renamed"])))
    evals = [KillPoint("eval", sig(), round(rng.uniform(0.0, 1.5), 2)) for _ in range(2 * SCALE)]
    return data + train + evals


def work_units(data_dir: Path) -> int:
    work = data_dir / ".work"
    try:
        return sum(1 for p in work.rglob("*") if p.is_file())
    except OSError:
        return 0


def committed_step(run_dir: Path) -> int:
    from trainer.checkpoint import list_committed, read_meta

    steps = []
    for c in list_committed(run_dir):
        try:
            steps.append(int(read_meta(c)["step"]))
        except (OSError, ValueError, KeyError):
            pass
    return max(steps, default=0)


def running_since(run_dir: Path, stage: str, t0: float) -> bool:
    """`stage` is running in this attempt (workflow.json still says "running" after a SIGKILL)."""
    try:
        st = json.loads((run_dir / "workflow.json").read_text())["stages"][stage]
    except (OSError, ValueError, KeyError):
        return False
    return st.get("status") == "running" and (st.get("started") or 0) >= t0


def step_since(run_dir: Path, t0: float) -> int:
    """The last step this attempt trained (lines left by a killed attempt do not count)."""
    from trainer.metrics import read_metrics

    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if (r.get("time") or 0) >= t0]
    return int(recs[-1]["step"]) if recs else 0


def running_stage(run_dir: Path) -> str:
    return next((k for k, v in stage_status(run_dir).items() if v == "running"), "?")


def deliver(point: KillPoint, cfg: Path, run_dir: Path, data_dir: Path, log: Path, last_step: int) -> tuple[str, int | None]:
    """Run `pretrain run` once and hit it with `point`; returns (stage it was in, exit code)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if point.stage == "ckpt":
        committed = committed_step(run_dir)
        target = min((committed // CKPT_EVERY + 1) * CKPT_EVERY, MAX_STEPS)
        env[FAULT_ENV] = f"{point.phase}:{target}"
    with open(log, "ab") as out:
        out.write(f"\n===== chaos: {point.describe()} =====\n".encode())
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(cfg)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        if point.stage == "ckpt":
            return "train (checkpoint write)", proc.wait(timeout=300)
        start_units = work_units(data_dir)
        eval_seen: float | None = None
        t0 = time.time()
        deadline = t0 + 300
        while True:
            if proc.poll() is not None:
                return "finished before the kill point", proc.returncode
            assert time.time() < deadline, f"kill point never reached: {point.describe()}"
            # (a data point that the previous attempt already passed lands early in training instead)
            if point.stage == "data" and (work_units(data_dir) >= start_units + point.at or running_since(run_dir, "train", t0)):
                break
            if point.stage == "train" and running_since(run_dir, "train", t0) and step_since(run_dir, t0) >= max(point.at, last_step + 1):
                break
            if point.stage == "eval" and running_since(run_dir, "eval", t0):
                eval_seen = eval_seen or time.time()
                if time.time() - eval_seen >= point.at:
                    break
            time.sleep(0.02)
        stage = running_stage(run_dir)
        if point.sig == "KILL":
            kill_tree(proc)
            return stage, proc.wait(timeout=60)
        os.killpg(proc.pid, signal.SIGTERM)
        return stage, proc.wait(timeout=120)
    finally:
        kill_tree(proc)


def test_random_kills_then_rerun_reproduce_the_uninterrupted_run(workflow_reference, workflow_work, gpt2_ranks):
    rng = random.Random(SEED)
    points = schedule(rng)
    cfg, run_dir = write_config(workflow_work, "chaos", gpt2_ranks)
    data_dir = workflow_work / "data" / "chaos"
    log = workflow_work / "chaos.log"
    print(f"chaos: seed {SEED}, {len(points)} kill points")
    delivered: list[str] = []
    last_step = 0
    for point in points:
        t0 = time.time()
        stage, rc = deliver(point, cfg, run_dir, data_dir, log, last_step)
        line = f"{point.describe():<48} landed in {stage:<28} exit {rc} ({time.time() - t0:.0f} s)"
        print("chaos:", line)
        delivered.append(line)
        if point.stage == "train":
            last_step = int(point.at)
        if stage.startswith("finished"):
            continue
        if point.sig == "TERM":
            assert rc == 3, f"SIGTERM must stop the workflow with exit 3 (resumable), got {rc}: {line}\n{log.read_text()[-4000:]}"
        assert all(v != "running" for v in stage_status(run_dir).values()) or point.sig == "KILL", stage_status(run_dir)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    landed = {d.split(" landed in ")[1].split()[0] for d in delivered}
    assert {"data", "train", "eval"} <= landed, f"a stage got no kill point: {delivered}"
    assert sum(1 for d in delivered if "finished before" not in d) >= 10 * SCALE, delivered

    text = log.read_text(errors="replace")
    for stage in ("data", "train", "eval"):  # each killed stage was picked up where it was, not redone from scratch
        assert f"workflow: {stage}: resuming an interrupted run" in text, stage
    assert "removing partial checkpoint" in text  # the mid-write kills left partial checkpoints, cleaned on resume

    got, want = final_metrics(run_dir), final_metrics(workflow_reference)
    assert got["losses"] == want["losses"]  # every step, bit for bit (JSON floats round-trip exactly)
    # a SIGTERM adds a checkpoint at the step it stopped at (evaluated too); the reference's are identical
    assert {k: v for k, v in got["evals"].items() if k in want["evals"]} == want["evals"]
    assert set(want["evals"]) <= set(got["evals"])
    summary = {"seed": SEED, "kill_points": delivered}
    (workflow_work / "chaos-summary.json").write_text(json.dumps(summary, indent=1))
