"""Which process owns a file (host, pid, start time), and whether that process still runs.

Run locks and the temporary files of checkpoint writes record their owner, so that what a killed process left
behind is recognised as stale and taken over or removed, while a live process's files are left alone.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from typing import Any


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """The state letter and start time (clock ticks since boot) of ``pid`` from Linux ``/proc``, or None.

    With the pid, the start time identifies a process: a pid reused by a later process has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # the command name in parentheses may contain spaces
    try:
        return fields[0].decode(), int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


@dataclass(frozen=True)
class Owner:
    """A process: its host name, pid and start time (None where the system does not tell)."""

    host: str
    pid: int
    start: int | None = None

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), _start_ticks(os.getpid()))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Owner:
        return cls(str(values["host"]), int(values["pid"]), values.get("start"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    @property
    def is_this_process(self) -> bool:
        return self.on_this_host and self.pid == os.getpid()

    def alive(self) -> bool | None:
        """Whether the process still runs: True/False on this host, None (unknown) on another host."""
        if not self.on_this_host:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            pass
        stat = _proc_stat(self.pid)
        if stat is None:
            return True
        state, start = stat
        return state != "Z" and (self.start is None or start == self.start)  # a zombie has exited
