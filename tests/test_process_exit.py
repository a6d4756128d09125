"""`common.process_exit.exit_now`: a command's fast way out still does what the interpreter's exit
does that a run relies on (a checkpoint thread finishes, atexit clean-ups run, output is flushed,
idle pool workers do not hold the exit up), with the command's exit code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import atexit, concurrent.futures, sys, threading, time
    from pathlib import Path
    from common.process_exit import exit_now

    out = Path(sys.argv[1])
    pool = concurrent.futures.ThreadPoolExecutor(1)   # left idle and never shut down, as an exception path leaves it
    pool.submit(lambda: None).result()

    def slow_write():  # a non-daemon thread still writing (an asynchronous checkpoint write)
        time.sleep(0.5)
        (out / "written").write_text("done")

    threading.Thread(target=slow_write).start()
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    print("last words", end="")  # no newline: only a flush gets it out
    exit_now(3)
""")


def test_exit_now_waits_for_work_runs_atexit_flushes_and_keeps_the_code(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "last words"
    assert (tmp_path / "written").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
