"""No config value can run as a command through `pretrain sbatch` or `pretrain submit`, and the
requeue decision follows the exit code (3 requeues; 2 and 1 never do).

Hostile values (newline, `$(...)`, backticks, quotes, `;`, `#`) go through every field that
reaches a batch script. Values SLURM names cannot hold are refused when the config loads (exit 2,
nothing written, nothing submitted). The others are written, and the script is then EXECUTED by
bash with stand-ins for the SLURM executables (`srun`, `scontrol`, `sbatch`, `sinfo`, `sacct`) that only
record their arguments: SLURM itself is not needed to run a script, so these are the only fakes.
A marker file must never appear, and `srun` must receive the exact original values. How real
sbatch parses the quoted `#SBATCH` values is tested on the real cluster in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser, main
from pipelines.config import load_config
from pipelines.launching import train_argv
from slurm.node_command import NodeCommand, rendezvous_port
from submitit.core.utils import UncompletedJobError
from tests.trainer_helpers import make_shard_dir

MARKER = "INJECTED"  # every payload tries to create this file in the directory bash runs in
PAYLOADS = {
    "dollar-paren": f"$(touch {MARKER})",
    "backticks": f"`touch {MARKER}`",
    "single-quote": f"x'; touch {MARKER}; echo '",
    "double-quote": f'x"; touch {MARKER}; echo "',
    "semicolon-hash": f"x; touch {MARKER} # y",
}
NEWLINE = f"gpu\ntouch {MARKER} #"
JOB_ID = "4242"
STUBS = {
    # argv of each call, NUL-separated, one file per call
    "srun": 'printf "%s\\0" "$@" > "$STUB_LOG/srun.$$.argv"; exit "${STUB_SRUN_RC:-0}"',
    "scontrol": 'printf "%s\\0" "$@" > "$STUB_LOG/scontrol.$$.argv"\n[ "$1 $2" = "show hostnames" ] && printf "n1\\nn2\\n"; exit 0',
    "sbatch": f'printf "%s\\0" "$@" > "$STUB_LOG/sbatch.argv"; cp "${{@: -1}}" "$STUB_LOG/submitted.sh"\necho "Submitted batch job {JOB_ID}"',
    "sinfo": 'echo "${STUB_SINFO:-debug*|2|64|(null)|64000}"',
    "sacct": 'printf "%s\\0" "$@" > "$STUB_LOG/sacct.$$.argv"',  # knows no job
}
BASE_CONFIG = {
    "model": {"name": "micro"},
    # a geometry that loads (seq_len within micro's block size, a batch that splits over 2 ranks)
    "train": {"device": "cpu", "nproc_per_node": 2, "max_steps": 4, "micro_batch_size": 4, "seq_len": 32, "batch_tokens": 1024},
    "tracking": {"uri": "none"},
    "slurm": {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 2, "time": "10:00", "partition": "debug"},
}


@pytest.fixture
def stubs(tmp_path, monkeypatch) -> Path:
    """A PATH whose srun/scontrol/sbatch/sinfo/sacct record their argv under the returned directory."""
    bin_dir, log = tmp_path / "stub-bin", tmp_path / "stub-log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    return log


def calls(log: Path, tool: str) -> list[list[str]]:
    return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(log.glob(f"{tool}.*argv"))]


def write_config(path: Path, **sections) -> Path:
    cfg = {k: dict(v) for k, v in BASE_CONFIG.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_script(script: Path, cwd: Path, nodes: int = 1, srun_rc: int = 0) -> subprocess.CompletedProcess:
    """Execute a batch script as the batch host would (bash, SLURM's variables; stubs on PATH)."""
    env = {**os.environ, "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": "n[1-2]",
           "STUB_SRUN_RC": str(srun_rc)}  # fmt: skip
    cwd.mkdir(exist_ok=True)
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def assert_nothing_ran(tmp_path: Path) -> None:
    found = [str(p) for p in tmp_path.rglob(MARKER)]
    assert not found, f"an injected command ran: {found}"


def hostile_setup(tmp_path: Path, payload: str, data: bool = False) -> tuple[Path, Path, list[str]]:
    """Config file, run dir and overrides that all carry `payload` (config path, run_dir,
    data.output_dir, train.sample_prompt across two lines, a slurm.extra value)."""
    run_dir = tmp_path / f"run {payload}"
    data_dir = tmp_path / f"data {payload}"
    if data:
        make_shard_dir(data_dir, seed=1)
    cfg = write_config(tmp_path / f"cfg {payload}.yaml", run_dir=str(run_dir), slurm={"extra": [f"--comment={payload}", "--exclusive"]})
    overrides = [f"train.sample_prompt={payload}\nsecond line {payload}", f"data.output_dir={data_dir}"]
    return cfg, run_dir, overrides


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_sbatch_script_runs_nothing_injected_and_passes_values_exactly(tmp_path, stubs, payload, monkeypatch):
    cfg, _, overrides = hostile_setup(tmp_path, payload)
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "job.sbatch"
    assert main(["sbatch", str(cfg), *overrides, "-o", str(script), "--allow-changes"]) == 0
    header = script.read_text().split("\nset -u\n")[0].splitlines()
    assert all(line.startswith("#") for line in header), "the header holds only comments (#SBATCH lines)"
    assert any(line.startswith("#SBATCH --comment=") for line in header) and "#SBATCH --exclusive" in header

    result = run_script(script, tmp_path / "exec")
    assert result.returncode == 0, result.stderr
    assert_nothing_ran(tmp_path)
    (srun,) = calls(stubs, "srun")
    expected = train_argv(str(cfg), overrides, load_config(cfg, overrides), allow_changes=True)
    filled = {"{nnodes}": "1", "{rdzv_endpoint}": f"127.0.0.1:{rendezvous_port(JOB_ID)}", "{job_id}": JOB_ID}
    assert srun == ["--ntasks-per-node=1", "--kill-on-bad-exit=0", *[filled.get(a, a) for a in expected]]
    # the values themselves, byte for byte, where `pretrain train` will read them
    args = build_parser().parse_args(srun[5:])  # after: srun options, python -m pipelines.cli
    assert (args.command, args.config, args.overrides) == ("train", str(cfg.resolve()), overrides)
    assert args.allow_changes and (args.nnodes, args.rdzv_id) == (1, JOB_ID)


def test_sbatch_multi_node_rendezvous_is_the_first_node(tmp_path, stubs, monkeypatch):
    """2 nodes: torchrun's c10d endpoint is the allocation's first host (`scontrol show
    hostnames`), port from the job id; one node: 127.0.0.1 (torchrun --standalone)."""
    cfg = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "job.sbatch"
    assert main(["sbatch", str(cfg), "slurm.nodes=2", "-o", str(script)]) == 0
    assert run_script(script, tmp_path / "exec", nodes=2).returncode == 0
    (srun,) = calls(stubs, "srun")
    i = srun.index("--rdzv-endpoint")
    assert srun[i - 2 : i + 4] == ["--nnodes", "2", "--rdzv-endpoint", f"n1:{rendezvous_port(JOB_ID)}", "--rdzv-id", JOB_ID]


@pytest.mark.parametrize("srun_rc, requeued", [(3, True), (2, False), (1, False), (0, False)])
def test_sbatch_script_requeues_only_on_exit_3(tmp_path, stubs, monkeypatch, srun_rc, requeued):
    cfg = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "job.sbatch"
    assert main(["sbatch", str(cfg), "-o", str(script)]) == 0
    result = run_script(script, tmp_path / "exec", srun_rc=srun_rc)
    requeues = [c for c in calls(stubs, "scontrol") if c[:1] == ["requeue"]]
    assert requeues == ([["requeue", JOB_ID]] if requeued else []), result.stdout
    assert result.returncode == (0 if requeued else srun_rc), result.stdout + result.stderr


def test_sbatch_script_whose_requeue_fails_does_not_end_completed(tmp_path, stubs, monkeypatch):
    """`scontrol requeue` refused (no permission, controller down): the job neither finished nor comes
    back, so it must not exit 0 (COMPLETED would start the `afterok` stages after it)."""
    cfg = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "job.sbatch"
    assert main(["sbatch", str(cfg), "-o", str(script)]) == 0
    failing = (stubs.parent / "stub-bin" / "scontrol")
    failing.write_text(failing.read_text().replace("exit 0", '[ "$1" = requeue ] && exit 1; exit 0'))
    result = run_script(script, tmp_path / "exec", srun_rc=3)
    assert [c for c in calls(stubs, "scontrol") if c[:1] == ["requeue"]] == [["requeue", JOB_ID]]
    assert result.returncode == 3 and "scontrol requeue failed" in result.stdout, result.stdout + result.stderr


def test_cpu_job_keeps_its_own_rank_count(tmp_path, monkeypatch):
    """Issue 9, 8a: slurm.gpus_per_node=8 must not make a CPU job start 8 ranks (it asks for no GPU)."""
    cfg_path = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"))
    cfg = load_config(cfg_path)
    assert not any(a.startswith("train.nproc_per_node=") for a in train_argv(str(cfg_path), [], cfg))
    gpu = load_config(cfg_path, ["train.device=cuda"])
    assert "train.nproc_per_node=8" in train_argv(str(cfg_path), [], gpu)
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "job.sbatch"
    assert main(["sbatch", str(cfg_path), "-o", str(script)]) == 0
    text = script.read_text()
    assert "train.nproc_per_node" not in text and "--gpus-per-node" not in text


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_submitit_script_runs_nothing_injected_and_passes_values_exactly(tmp_path, stubs, payload, monkeypatch):
    """`pretrain submit`: submitit writes its own sbatch file (here handed to the stub sbatch);
    executing it must run only `srun python -m submitit.core._submit FOLDER`, and the command the
    job will start (pickled by submitit, never seen by a shell) must hold the exact values."""
    from submitit.core.utils import DelayedSubmission

    cfg, run_dir, overrides = hostile_setup(tmp_path, payload, data=True)
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(cfg), *overrides, "--allow-changes"]) == 0
    submitted = stubs / "submitted.sh"
    header = submitted.read_text().split("export SUBMITIT_EXECUTOR")[0].splitlines()
    assert all(line.startswith("#") or not line for line in header), "submitit's header holds only comments"
    assert any(line.startswith("#SBATCH --comment=") for line in header)
    assert "#SBATCH --exclusive" in header and "#SBATCH --partition=debug" in header

    result = run_script(submitted, tmp_path / "exec")
    assert result.returncode == 0, result.stderr
    assert_nothing_ran(tmp_path)
    folder = run_dir.resolve() / "slurm" / "logs" / JOB_ID
    (srun,) = calls(stubs, "srun")
    assert srun[-4:] == ["-u", "-m", "submitit.core._submit", str(run_dir.resolve() / "slurm" / "logs" / "%j")]
    assert srun[:3] == ["--unbuffered", "--output", str(run_dir.resolve() / "slurm" / "logs" / "%j" / "%j_%t_log.out")]
    # The pickle this test process itself just wrote through submitit (not a file of unknown origin).
    node_command = DelayedSubmission.load(folder / f"{JOB_ID}_submitted.pkl").function
    assert isinstance(node_command, NodeCommand)
    assert node_command.argv == train_argv(str(cfg), overrides, load_config(cfg, overrides), allow_changes=True)


REFUSED_FIELDS = {
    "slurm.partition": [*PAYLOADS.values(), NEWLINE, "a b", "-x"],
    "slurm.account": [*PAYLOADS.values(), NEWLINE, "a,b"],
    "slurm.qos": [*PAYLOADS.values(), NEWLINE],
    "slurm.constraint": [*PAYLOADS.values(), NEWLINE, "a b", "[a|b", "a)"],
    "slurm.time": [*PAYLOADS.values(), NEWLINE, "25h", "1:2:3:4", "0", "00:00:00"],
    "eval.slurm.partition": [*PAYLOADS.values(), NEWLINE],
    "eval.slurm.account": [*PAYLOADS.values(), NEWLINE],
    "eval.slurm.qos": [*PAYLOADS.values(), NEWLINE],
    "eval.slurm.time": [*PAYLOADS.values(), NEWLINE],
    "run_dir": ["runs/a\ntouch INJECTED", "runs/a\rb", "runs/%j", "runs/a\\b"],
    "data.output_dir": ["d\ntouch INJECTED"],
    "train.sample_prompt": ["a\x1bb", "a\rb"],  # newline and tab are allowed here, other controls not
}


@pytest.mark.parametrize("command", ["sbatch", "submit"])
@pytest.mark.parametrize("field", REFUSED_FIELDS)
def test_unsafe_values_are_refused_before_anything_is_written(tmp_path, stubs, monkeypatch, capsys, command, field):
    monkeypatch.chdir(tmp_path)
    data_dir = make_shard_dir(tmp_path / "data", seed=1)
    for i, value in enumerate(REFUSED_FIELDS[field]):
        run_dir = tmp_path / f"run{i}"
        if field == "run_dir":
            run_dir = tmp_path / value  # the path as the config names it
        cfg = write_config(tmp_path / f"c{i}.yaml", run_dir=str(run_dir), data={"output_dir": str(data_dir)})
        out = tmp_path / f"job{i}.sbatch"
        argv = [command, str(cfg), f"{field}={tmp_path / value if field == 'run_dir' else value}"]
        rc = main([*argv, "-o", str(out)] if command == "sbatch" else argv)
        err = capsys.readouterr().err
        assert rc == 2, f"{field}={value!r} accepted by `pretrain {command}`"
        assert field.split(".")[-1] in err, err
        assert not out.exists() and not run_dir.exists() and not (stubs / "sbatch.argv").exists()
    assert_nothing_ran(tmp_path)


@pytest.mark.parametrize(
    "item, message",
    [
        ("--comment=a\ntouch INJECTED", "control character"),
        (f"--$(touch {MARKER})=1", "is not an sbatch option name"),
        ("--comment=a --wrap=b", "single option"),
        ("--comment=a;b --x", "single option"),
        ("--comment=a\\b", "backslash"),
        ("comment=a", "one long sbatch option"),
        (f"#SBATCH --comment=ok\n#SBATCH --wrap=touch {MARKER}", "control character"),
    ],
)
def test_slurm_extra_items_must_each_be_one_option(tmp_path, stubs, monkeypatch, capsys, item, message):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"), slurm={"extra": ["--exclusive", item]})
    out = tmp_path / "job.sbatch"
    assert main(["sbatch", str(cfg), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "slurm.extra" in err and message in err, err
    assert not out.exists() and not (tmp_path / "run").exists()


def test_accepted_slurm_values(tmp_path):
    """What SLURM users write must still load: lists of partitions, feature expressions, times,
    sbatch options with spaces, `#SBATCH` prefixes."""
    cfg = write_config(
        tmp_path / "c.yaml",
        slurm={"partition": "gpu-a100,gpu_h100", "account": "proj.ml-1", "qos": "high", "constraint": "[rack1|rack2]&(a100*2|h100)",
               "time": "2-00:30:00", "extra": ["#SBATCH --exclusive", "--comment=run 7: it's fine", "--mail-type=END,FAIL"]},
        eval={"slurm": {"partition": "cpu", "time": "90"}},
    )  # fmt: skip
    loaded = load_config(cfg)
    assert loaded.slurm.constraint == "[rack1|rack2]&(a100*2|h100)" and loaded.eval.slurm.time == "90"


def test_request_must_fit_one_of_the_named_partitions(stubs, monkeypatch):
    from slurm.config import SlurmConfig
    from slurm.resources import SlurmError, check_fits

    monkeypatch.setenv("STUB_SINFO", "small*|1|4|(null)|1000\nbig|2|64|gpu:8|64000")
    assert check_fits(SlurmConfig(partition="small,big", cpus_per_task=8, gpus_per_node=0), 0).name == "big"
    assert check_fits(SlurmConfig(partition="", cpus_per_task=2), 0).name == "small"
    with pytest.raises(SlurmError, match="unknown partition 'nope'"):
        check_fits(SlurmConfig(partition="small,nope", cpus_per_task=2), 0)
    with pytest.raises(SlurmError, match="cpus_per_task=8 does not fit partition 'small'"):
        check_fits(SlurmConfig(partition="small", cpus_per_task=8), 0)


def test_jobs_listing_passes_no_planted_id_to_slurm(tmp_path, stubs, capsys):
    """`pretrain jobs` reads job ids from RUN_DIR/slurm/jobs.jsonl: one that is not a SLURM job id
    is shown as invalid and never becomes an scontrol/sacct argument."""
    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True)
    records = [{"job_id": "--all", "cluster": "slurm"}, {"job_id": "12", "cluster": "slurm"}]
    (run_dir / "slurm" / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["jobs", str(run_dir)]) == 0
    assert "INVALID JOB ID" in capsys.readouterr().out
    asked = [c for tool in ("scontrol", "sacct") for c in calls(stubs, tool)]
    assert asked and all("12" in c and "--all" not in c for c in asked), asked


def _slurm_env(monkeypatch, nodes: int, rank: int = 0) -> None:
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes),
                       "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": str(rank), "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)  # fmt: skip


def test_node_command_rendezvous(monkeypatch):
    import submitit

    argv = ["pretrain", "--nnodes", "{nnodes}", "--rdzv-endpoint", "{rdzv_endpoint}", "--rdzv-id", "{job_id}"]
    _slurm_env(monkeypatch, nodes=2)
    assert NodeCommand(argv, 3, 5).filled_argv(submitit.JobEnvironment()) == argv[:2] + ["2", argv[3], "n1:20077", argv[5], "77"]
    _slurm_env(monkeypatch, nodes=1)
    assert NodeCommand(argv, 3, 5).filled_argv(submitit.JobEnvironment())[4] == "127.0.0.1:20077"


@pytest.mark.parametrize("how, requeued", [("exit 3", True), ("exit 2", False), ("exit 1", False),
                                           ("kill -TERM $$", True), ("kill -USR2 $$", True), ("kill -KILL $$", False)])
def test_node_command_requeues_only_a_stopped_command(stubs, monkeypatch, how, requeued):
    """The command's exit code decides, with a real subprocess: 3, or killed by a stop signal
    (SIGTERM, SIGUSR2: it was starting or exiting) → `scontrol requeue` (and no result, the job is
    coming back); 2 (refused), 1 (failed) and SIGKILL (the OOM killer) → the job fails, no requeue."""
    _slurm_env(monkeypatch, nodes=1)
    cmd = NodeCommand(["sh", "-c", how], requeue_exit_code=3, max_requeues=5)
    with pytest.raises(SystemExit if requeued else RuntimeError) as info:
        cmd()
    requeues = [c for c in calls(stubs, "scontrol") if c[:1] == ["requeue"]]
    assert requeues == ([["requeue", "77"]] if requeued else [])
    if how == "exit 2":
        assert "refused" in str(info.value) and "not requeued" in str(info.value)


def test_a_local_job_inside_an_allocation_never_requeues_the_allocation(stubs, monkeypatch):
    """`--executor local` run inside salloc or a batch script: SLURM_JOB_ID is the allocation's.
    A stopped command must say "run it again", not `scontrol requeue` a job id of its own."""
    _slurm_env(monkeypatch, nodes=1)  # the allocation around us
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "31337", "SUBMITIT_LOCAL_NTASKS": "1",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "0",
                       "SUBMITIT_LOCAL_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)  # fmt: skip
    with pytest.raises(UncompletedJobError, match="run it again to resume"):
        NodeCommand(["sh", "-c", "exit 3"], requeue_exit_code=3, max_requeues=5)()
    assert [c for c in calls(stubs, "scontrol") if c[:1] == ["requeue"]] == []


@pytest.mark.parametrize("exit_on_signal, requeued", [(3, True), (2, False), (1, False), (None, True)])
def test_checkpoint_signal_requeues_only_if_the_command_checkpointed(tmp_path, exit_on_signal, requeued):
    """submitit's requeue signal path (NodeCommand.checkpoint): the command gets USR2 and its exit
    code decides; a command that refuses (2) after the signal is not brought back. One without a
    handler yet (None: killed by the USR2) stopped, it did not fail: it comes back."""
    ready = tmp_path / "ready"
    if exit_on_signal is None:
        script = f"touch {ready}; exec sleep 30"
    else:
        script = f'trap \'kill $!; exit {exit_on_signal}\' USR2; touch {ready}; sleep 30 & wait'
    cmd = NodeCommand(["sh", "-c", script], requeue_exit_code=3, max_requeues=5, grace_s=20)
    cmd._proc = subprocess.Popen(cmd.argv)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline and cmd._proc.poll() is None, "the command did not start"
        time.sleep(0.05)
    try:
        again = cmd.checkpoint()
    finally:
        if cmd._proc.poll() is None:
            cmd._proc.send_signal(signal.SIGKILL)
    assert cmd._proc.wait(timeout=10) == (-signal.SIGUSR2 if exit_on_signal is None else exit_on_signal)
    assert (again is not None) == requeued
    if requeued:
        assert again.function is cmd


def test_shlex_and_sbatch_quote_round_trip():
    """sbatch's own #SBATCH parser: backslash escapes in and out of quotes, '#' ends the line
    unquoted. Our quoting, read back by a transcription of that parser, gives the value."""
    from slurm.validation import sbatch_quote

    def sbatch_read(line: str) -> str:  # sbatch/opt.c _get_argument(), one argument
        out, quote, escape = [], "", False
        for ch in line:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
                continue
            elif quote:
                if ch == quote:
                    quote = ""
                    continue
            elif ch in "\"'":
                quote = ch
                continue
            elif ch == "#" or ch.isspace():
                break
            out.append(ch)
        return "".join(out)

    for value in ["plain", "a b", "it's", 'say "hi"', "a\\b", "x # y", f"$(touch {MARKER}) `id`; z", "/p/%x-%j.out"]:
        assert sbatch_read(sbatch_quote(value)) == value, value
    with pytest.raises(ValueError):
        sbatch_quote("a\nb")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_submit_wait_reads_a_refusal_that_came_before_the_launcher_ran(tmp_path):
    """A config edited while the job was queued: `pretrain train` refuses at load (exit 2) and prints
    no "pretrain train: exit N" line. `submit --wait` must still say 2 (fix it), not 1 (retry)."""
    from pipelines.launching import wait_for_training
    from slurm.config import SlurmConfig
    from slurm.submit import submit_command

    cfg = load_config(write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run")))
    refusal = "echo 'pretrain train: config error: c.yaml: unknown key train.lrr' >&2; exit 2"
    job = submit_command(["sh", "-c", refusal], SlurmConfig(), tmp_path / "logs", "local", "train", requeue_exit_code=3)
    code, why = wait_for_training(job, cfg, poll_s=0.2)
    assert code == 2 and "training exited 2" in why, why


def test_requests_the_cluster_cannot_run_are_refused_before_queueing_naming_the_keys_set(tmp_path, stubs, monkeypatch, capsys):
    """`submit --with-evals` checks the eval jobs' request before training is queued (it used to
    queue training, then crash); refusals name `eval.slurm.*` / `ray.*`, the keys the user sets."""
    cfg = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(cfg), "--executor", "slurm", "--with-evals", "eval.slurm.gpus=16"]) == 2
    err = capsys.readouterr().err
    assert "eval.slurm.gpus=16 does not fit partition 'debug'" in err and "Traceback" not in err, err
    assert not (stubs / "sbatch.argv").exists(), "nothing may be queued"
    assert main(["run", str(cfg), "--executor", "slurm", "ray.nodes=5"]) == 2
    assert "ray.nodes=5 does not fit partition 'debug', which has 2 node(s)" in capsys.readouterr().err


def test_side_jobs_do_not_inherit_trainings_exclusive_node(tmp_path):
    """The eval watcher (1 CPU, alive for the whole training) and the report job must not carry
    `slurm.extra`/`constraint`: `--exclusive` would hold a whole node for nothing."""
    from pipelines.stages import stage

    cfg = load_config(write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"),
                                   slurm={**BASE_CONFIG["slurm"], "extra": ["--exclusive"], "constraint": "h100"}))
    assert stage("train").resources(cfg)[0].extra == ["--exclusive"]
    for name in ("eval", "report", "data"):
        job, _ = stage(name).resources(cfg)
        assert (job.extra, job.constraint) == ([], ""), name


def test_status_refreshes_the_run_dir_it_is_given_whatever_the_current_directory(tmp_path, stubs, monkeypatch):
    """A config with a relative run_dir, submitted from one directory; `pretrain status /abs/run`
    from another must read that run, never a same-named directory under the new cwd."""
    from pipelines.status import status_json

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    (elsewhere / "runs" / "r").mkdir(parents=True)
    home.mkdir()
    cfg = write_config(home / "c.yaml", run_dir="runs/r")
    run_dir = home / "runs" / "r"
    run_dir.mkdir(parents=True)
    stage = {"status": "submitted", "fingerprint": "", "config": {}, "attempts": 1, "job_ids": ["777"], "outputs": {}}
    (run_dir / "workflow.json").write_text(json.dumps({"format": 1, "config_path": str(cfg), "overrides": [], "executor": "slurm",
                                                       "stages": {"data": stage}}))
    failing = stubs.parent / "stub-bin" / "sacct"
    failing.write_text(failing.read_text() + '\necho "FAILED|00:01:00"\n')
    monkeypatch.chdir(elsewhere)
    before = (run_dir / "workflow.json").read_bytes()
    status = json.loads(status_json(run_dir))
    assert status["workflow"]["stages"]["data"]["status"] == "failed", status["workflow"]
    # shown, never written: `status` holds no lock, and its copy written back could erase the job
    # ids a concurrent `pretrain run --executor slurm` has just saved (that run refreshes for itself)
    assert (run_dir / "workflow.json").read_bytes() == before
    assert list((elsewhere / "runs" / "r").iterdir()) == [], "another directory's run was written"


def test_a_stage_whose_job_slurm_forgot_is_done_when_its_outputs_verify(tmp_path, stubs):
    """Without accounting (or after a purge) a finished job is UNKNOWN to scontrol and sacct: its
    verified outputs say it finished, and a rerun must not submit that stage again."""
    from pipelines.workflow import Workflow

    cfg = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    submitted = {"status": "submitted", "fingerprint": "", "config": {}, "attempts": 1, "job_ids": ["777"], "outputs": {}}
    (run_dir / "workflow.json").write_text(json.dumps({"format": 1, "config_path": str(cfg), "overrides": [], "executor": "slurm",
                                                       "stages": {"report": submitted, "eval": submitted}}))
    (run_dir / "report.png").write_bytes(b"png")
    (run_dir / "report.csv").write_text("step,loss\n")
    w = Workflow(str(cfg), [], load_config(cfg), log=lambda m: None)
    w.refresh_slurm()
    assert w.stages["report"].status == "done"
    assert w.stages["eval"].status == "submitted", "no final checkpoint: the eval stage cannot be done"
