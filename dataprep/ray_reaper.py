"""Ends what a local Ray instance leaves running when its driver dies without stopping it.

Run as a script (stdlib only) by :mod:`dataprep.local_ray`, once per local instance: it waits for
the driver to end, then SIGKILLs every process still running for the driver's Ray sessions.

Why: Ray ties its GCS and raylet to the driver (they die within 0.2 s of a ``kill -9``, an OOM
kill, a closed terminal), and the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) notice the raylet's death at once, but then report it to the dead GCS
under a fixed 60-second timeout (``ray._private.utils.publish_error_to_driver``) before they exit:
about 200 MiB, a listening port and open files in the session dir for a minute or more after each
such death, beside the next run's own set.

How they are found: every process of a Ray session keeps files open in its session dir, named
``session_<date>_<pid of the driver that started it>`` (``ray/_private/node.py``). The agents
rename themselves (setproctitle), which overwrites their command line and environment, so nothing
else says whose they are; and once the raylet is gone their parent is init.

When: the driver holds the only write end of this script's stdin, so end of file means the driver
has ended, whatever ended it. A driver that stops Ray itself closes it after ``ray.shutdown`` and
waits for the sweep. The stop signals SIGTERM and SIGUSR2 arrive blocked (see
``local_ray._deaf_to_stop_signals``); SIGINT and SIGHUP, which a terminal sends the driver's whole
process group, are ignored: the driver handles them, and this script must outlive it.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

SWEEPS = 20  # rounds of kill-and-look-again: a raylet dying meanwhile may still start a worker
SWEEP_PAUSE_S = 0.1


def session_processes(driver: int) -> list[int]:
    """Processes (not this one, not the driver) with a file open in a session dir of ``driver``."""
    in_session = re.compile(rf"/session_[^/]*_{driver}(?:/|$)")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (os.getpid(), driver):
            continue
        try:  # another user's process (not listable), or one that ended meanwhile
            links = (os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd"))
            if any(in_session.search(link) for link in links):
                found.append(int(entry))
        except OSError:
            continue
    return found


def sweep(driver: int) -> None:
    """SIGKILL the driver's session processes until none is left (or :data:`SWEEPS` rounds)."""
    for _ in range(SWEEPS):
        pids = session_processes(driver)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(SWEEP_PAUSE_S)


def main() -> None:
    driver = int(sys.argv[1])
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    while os.read(0, 4096):  # nothing is ever written: this returns b"" when the driver has ended
        pass
    sweep(driver)


if __name__ == "__main__":
    main()
