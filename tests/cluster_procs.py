"""Process bookkeeping for tests that start their own Ray (a `ray start --head`, a cluster_utils cluster):
find exactly the processes they started and stop exactly those. Never `ray stop` or pkill: other Rays run
on this machine."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now on loopback (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (ppid, session id, start time, state) from /proc; start time tells a reused pid apart."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[3]), int(fields[19]), fields[0])
    return table


def processes_of(root_pid: int, session: int) -> dict[int, int]:
    """The live processes `ray start` started: its session (gcs, raylet, dashboard, workers) plus anything
    that left the session but descends from it (a job's driver runs in a session of its own)."""
    table = _proc_table()
    mine = {root_pid} & table.keys()
    grew = True
    while grew:
        grew = False
        for pid, (ppid, sid, _, _) in table.items():
            if pid not in mine and (sid == session or ppid in mine):
                mine.add(pid)
                grew = True
    return {pid: table[pid][2] for pid in mine if table[pid][3] != "Z"}


def stop_processes(procs: dict[int, int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL whatever of exactly these processes (pid + start time) is still alive."""

    def alive() -> list[int]:
        table = _proc_table()
        return [p for p, start in procs.items() if p in table and table[p][2] == start and table[p][3] != "Z"]

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    return alive()
