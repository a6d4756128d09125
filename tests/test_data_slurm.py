"""The data stage as one SLURM job (`pretrain data --executor slurm --wait`) on the real throw-away
cluster of test_slurm.py (two slurmd "nodes" n1, n2 at 127.0.1.1 and 127.0.1.2, each in its own UTS
namespace): over two nodes, a Ray cluster across the allocation started by the tool; on one, a local
Ray instance as on a workstation. Either is stopped midway and requeued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.corpus import make_corpus
from tests.test_data import REPO, identity, run_cli
from tests.test_slurm import (  # noqa: F401  (cluster: the module's fixture)
    FINAL,
    cluster,
    job_id_of,
    sacct_state,
    scontrol_restarts,
    wait_final,
)

pytestmark = pytest.mark.slow


def write_config(path: Path, source: Path, out: Path, ranks: str, run_dir: Path, **ray) -> Path:
    cfg = {"run_dir": str(run_dir),
           "data": {"source": str(source), "output_dir": str(out), "tokenizer_file": ranks, "chunk_docs": 100,
                    "shard_tokens": 60_000, "val_tokens": 20_000, "cache_dir": str(path.parent / "cache")},
           "ray": {"num_cpus": 2, **ray},
           "slurm": {"cpus_per_task": 2, "gpus_per_node": 0, "time": "10:00", "signal_delay_s": 15}}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    make_corpus(d, n_unique=600, n_exact=40, n_near=40, n_files=2)
    return d


def test_two_node_ray_cluster_job_requeued_midway_makes_the_local_bytes(cluster, corpus_dir, tmp_path, gpt2_ranks):  # noqa: F811
    """One job, two nodes: the Ray head on n1, a worker on n2, the stage against that cluster,
    requeued (`scontrol requeue`: every process killed) once the first tasks finished. The rerun
    keeps them; the shards are the bytes of a local run; the manifest records 2 nodes, 4 CPUs."""
    logs = _job_stopped_midway_beside_a_local_run(corpus_dir, tmp_path, gpt2_ranks, 2, ["scontrol", "requeue"])
    assert "] 2 node(s), 4 CPUs joined the head at 127.0.1.1:" in logs, logs[-4000:]
    assert json.loads((tmp_path / "slurm" / "manifest.json").read_text())["ray_cluster"] == {"nodes": 2, "cpus": 4}


def test_one_node_job_stopped_by_the_time_limit_signal_is_requeued_and_makes_the_local_bytes(cluster, corpus_dir, tmp_path, gpt2_ranks):  # noqa: F811
    """``ray.nodes: 1``: the node runs `pretrain data` with its own local Ray instance. SLURM's
    time-limit warning (USR2 to every process of the step, Ray's daemons included) must stop it with
    exit 3, the only code the job is requeued on; the requeued run keeps the finished tasks and ends
    with the bytes of a local run."""
    logs = _job_stopped_midway_beside_a_local_run(corpus_dir, tmp_path, gpt2_ranks, 1, ["scancel", "--signal=USR2"])
    assert "pretrain data: stopped by SIGUSR2; finished work is kept" in logs, logs[-4000:]
    assert "[node_command] command exited with 3 after the requeue signal" in logs, logs[-4000:]
    assert json.loads((tmp_path / "slurm" / "manifest.json").read_text())["ray_cluster"] == {"nodes": 1, "cpus": 2}


def _job_stopped_midway_beside_a_local_run(corpus_dir: Path, tmp_path: Path, gpt2_ranks: str, nodes: int, stop: list[str]) -> str:
    """The data job over ``nodes`` nodes, stopped with ``stop + [job id]`` once its first tasks
    finished, followed to its end; a local run of the same data builds meanwhile (its own Ray
    instance: the job spends much of its time starting Ray and being requeued, and the bytes do not
    depend on timing). Checks that both make the same data; returns the job's logs."""
    local = write_config(tmp_path / "local.yaml", corpus_dir, tmp_path / "local", gpt2_ranks, tmp_path / "run-local")
    local_log = tmp_path / "local.log"
    with open(local_log, "wb") as local_out:
        local_proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "data", str(local)], cwd=REPO, stdout=local_out,
                                      stderr=subprocess.STDOUT)
    try:
        logs = _job_stopped_midway(corpus_dir, tmp_path, gpt2_ranks, nodes, stop)
        assert local_proc.wait(timeout=300) == 0, local_log.read_text(errors="replace")[-3000:]
    finally:
        if local_proc.poll() is None:
            local_proc.kill()
    assert identity(tmp_path / "slurm") == identity(tmp_path / "local")  # shards and fingerprint: the cluster is not part of the data
    assert json.loads((tmp_path / "local" / "manifest.json").read_text())["ray_cluster"] == {"nodes": 1, "cpus": 2}
    return logs


def _job_stopped_midway(corpus_dir: Path, tmp_path: Path, gpt2_ranks: str, nodes: int, stop: list[str]) -> str:
    out = tmp_path / "slurm"
    cfg = write_config(tmp_path / "slurm.yaml", corpus_dir, out, gpt2_ranks, tmp_path / "run", nodes=nodes, cpus_per_node=2)
    waiting = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "data", str(cfg), "--executor", "slurm", "--wait"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = waiting.stdout.readline()
    assert f"{nodes} node(s)" in first, first + waiting.communicate()[1]
    job = job_id_of(first)
    scan = out / ".work" / "scan"
    deadline = time.time() + 180
    while not (scan.is_dir() and any(p.suffix == ".npz" for p in scan.iterdir())):
        assert time.time() < deadline and sacct_state(job) not in FINAL, f"no finished task before the job ended: {sacct_state(job)}"
        time.sleep(0.2)
    subprocess.run([*stop, job], check=True, capture_output=True)
    state = wait_final(job, timeout=300)
    rest, err = waiting.communicate(timeout=60)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((tmp_path / "run" / "slurm").rglob("*")) if p.suffix in (".out", ".err"))
    assert state == "COMPLETED", logs[-6000:]
    assert scontrol_restarts(job) == 1
    assert waiting.returncode == 0 and f"job {job} finished: " in rest, rest + err  # --wait follows it through the requeue
    return logs


@pytest.mark.parametrize(
    "override, message",
    [
        ("ray.partition=debug;id", "ray.partition must be a SLURM name"),  # refused when the config loads
        ("ray.nodes=3", "ray.nodes=3 does not fit partition 'debug', which has 2 node(s)"),  # refused by sinfo
        ("ray.address=127.0.0.1:6379", "ray.address='127.0.0.1:6379' joins a running cluster"),
    ],
)
def test_bad_ray_value_is_refused_before_anything_is_queued(cluster, corpus_dir, tmp_path, gpt2_ranks, override, message):  # noqa: F811
    cfg = write_config(tmp_path / "c.yaml", corpus_dir, tmp_path / "out", gpt2_ranks, tmp_path / "run")
    r = run_cli("data", str(cfg), override, "--executor", "slurm", "--wait", timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert "submitted job" not in r.stdout and not (tmp_path / "run" / "slurm").exists()
    assert not (tmp_path / "out").exists()


def test_data_job_request_and_command_come_from_the_ray_section():
    """No cluster needed: what the data job asks for and what its nodes run."""
    from pipelines.config import load_config
    from pipelines.data_job import data_argv, data_resources

    base = ["slurm.partition=gpu", "slurm.account=proj", "slurm.cpus_per_task=32", "slurm.mem_gb=500", "slurm.extra=[--exclusive]"]
    one, gpus = data_resources(load_config(None, base))
    assert (one.nodes, one.cpus_per_task, one.mem_gb, one.partition, one.account, one.extra, gpus) == (1, 32, 500, "gpu", "proj", [], 0)
    cfg = load_config(None, [*base, "ray.nodes=4", "ray.cpus_per_node=64", "ray.mem_gb=100", "ray.partition=cpu", "ray.time=2:00:00"])
    job, _ = data_resources(cfg)
    assert (job.nodes, job.cpus_per_task, job.mem_gb, job.partition, job.account, job.time) == (4, 64, 100, "cpu", "proj", "2:00:00")
    argv = data_argv("c.yaml", ["ray.nodes=4"], cfg)
    assert argv[1:3] == ["-m", "slurm.ray_cluster"] and argv[-1] == "ray.address={ray_address}"
    wrapper = argv[: argv.index("--")]
    assert {"{nnodes}", "{rdzv_endpoint}", "{job_id}"} <= set(wrapper)
    assert wrapper[wrapper.index("--cpus") + 1] == "64" and wrapper[wrapper.index("--object-store-gb") + 1] == "30.0"
    assert data_argv("c.yaml", [], load_config(None, base))[-3:] == ["data", str(Path("c.yaml").resolve()), "ray.num_cpus=32"]
