"""Triton's process memory, read from /proc: the leak watchdog's CPU source (control/leak.py).

Why not Triton's own `nv_cpu_memory_used_bytes`: in Triton 2.51 it is the host's used
memory (MemTotal - MemAvailable-like, from /proc/meminfo; checked against `free`), every
process on the machine together, not Triton's. So the sidecar reads Triton's processes
itself, where it can see them (same host, or a pod with shareProcessNamespace): without
that, it says "no data" and only GPU memory is watched.

What counts as Triton's: tritonserver and, when it leads its own session (a container's
init, `tritonpilot triton`), every live process in that session: the Python backend's
stubs and anything they started that is still alive, as a container's memory would
count them. Otherwise tritonserver and its descendants. The figure is the sum of
resident set sizes (shared pages count once per process: fine for a trend).

Which tritonserver: the only process named `tritonserver`; with several, the one whose
command line names the gRPC port the sidecar talks to (`--grpc-port`, default 8001).
Ambiguity or a missing process is "no data", never a guess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    sid: int
    comm: str


def _read_stat(proc: Path, pid: int) -> _Proc | None:
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    close = raw.rfind(b")")
    fields = raw[close + 2:].split()
    if len(fields) < 4 or fields[0] in (b"Z", b"X"):
        return None
    comm = raw[raw.find(b"(") + 1:close].decode(errors="replace")
    return _Proc(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), comm=comm)


def _rss_bytes(proc: Path, pid: int) -> int | None:
    try:
        return int((proc / str(pid) / "statm").read_text().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def _grpc_port(cmdline: list[str]) -> int:
    for i, arg in enumerate(cmdline):
        if arg.startswith("--grpc-port="):
            return int(arg.split("=", 1)[1])
        if arg == "--grpc-port" and i + 1 < len(cmdline):
            return int(cmdline[i + 1])
    return 8001


class TritonProcessMemory:
    """`read()` -> (bytes or None, source or the reason there is no data). Blocking: a pass over /proc."""

    def __init__(self, grpc_port: int | None = None, proc: str | Path = "/proc") -> None:
        self._port = grpc_port
        self._proc = Path(proc)

    def read(self) -> tuple[int | None, str]:
        procs = {}
        try:
            entries = [e.name for e in os.scandir(self._proc) if e.name.isdigit()]
        except OSError as exc:
            return None, f"no /proc: {exc}"
        for name in entries:
            p = _read_stat(self._proc, int(name))
            if p is not None:
                procs[p.pid] = p
        servers = [p for p in procs.values() if p.comm == "tritonserver"]
        if len(servers) > 1 and self._port is not None:
            servers = [p for p in servers if self._port_of(p.pid) == self._port]
        if len(servers) != 1:
            return None, ("no tritonserver process visible" if not servers
                          else f"{len(servers)} tritonserver processes, none told apart by its gRPC port")
        triton = servers[0]
        if triton.sid == triton.pid:
            members = [p.pid for p in procs.values() if p.sid == triton.sid]
        else:
            members = _descendants(procs, triton.pid)
        sizes = [_rss_bytes(self._proc, pid) for pid in members]
        if sizes[members.index(triton.pid)] is None:
            return None, "tritonserver's memory is not readable"
        return sum(s for s in sizes if s is not None), "procfs"

    def _port_of(self, pid: int) -> int | None:
        try:
            raw = (self._proc / str(pid) / "cmdline").read_bytes()
            return _grpc_port([a.decode(errors="replace") for a in raw.split(b"\0") if a])
        except (OSError, ValueError):
            return None


def _descendants(procs: dict[int, _Proc], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out
