"""Per-model counters shared by relay worker processes (`serve --workers N`).

One shared-memory table, one row per worker. A row is written by its worker alone (single
writer, no locks); the parent reads every row and sums them into a ProxySnapshot.

Each worker keeps its normal in-process ProxyStats (the hot path is unchanged) and
publishes into its row:
- its in-flight count per (model, protocol), on every begin/end: one int64 store, so the
  parent's in-flight sum is exact at any moment;
- the rest of its snapshot (started, finished per code, latency histogram, in-flight
  integral, peaks, connection counts), every `PUBLISH_PERIOD_S` and at exit, as JSON
  behind a sequence lock. Those totals lag by at most that period.

Row layout (int64 cells, then bytes):
  header  [0] slots used (a slot is counted only after its name and protocol are written)
          [1] blob sequence: odd while the worker writes the blob
          [2] blob length in bytes
          [3] generation: bumped by the parent each time it clears the row
  inflight[slots]  this worker's requests of the slot's (model, protocol) in flight now
  protocol[slots]  index into PROTOCOLS
  names[slots]     NAME_BYTES each: a 2-byte length, then the UTF-8 name
  blob             BLOB_BYTES: the published snapshot, JSON
Slots 0 and 1 are (UNKNOWN_MODEL, grpc) and (UNKNOWN_MODEL, http): a name that does not fit
NAME_BYTES, or any name once the slots are full, counts there (as ProxyStats does past
MAX_MODELS).

The table is a file with no name, mapped by every process: a memfd on Linux (elsewhere a
temporary file unlinked as soon as it is made: only a kill between the two leaves it). The
parent keeps its descriptor and hands a copy to each worker it spawns (`TableHandle`,
pickled with the spawn arguments, as multiprocessing passes a Pipe). No name means nothing
to leak and nothing to sweep: however the processes end (SIGKILL, OOM kill, a crash), the
memory goes back when the last process mapping it exits, and there is no stale file in
/dev/shm for a later start to find or to mistake for its own (pid namespaces make an owner
pid in a file name unreliable anyway). Workers notice the parent's death by their pipe's
end of file, drain and exit (sidecar/workers.py). Not multiprocessing.shared_memory: its
resource tracker, in Python 3.11, unlinks a block when a spawned child that attached it
exits, and its blocks have names. Stores are plain 8-byte aligned writes: readers on x86-64
and arm64 never see a torn cell. The blob's sequence lock is read-retry; a row whose blob
cannot be read consistently keeps the reader's previous copy.

When a worker dies the parent calls `SharedStatsReader.retire(row)` before restarting it:
its last published totals become a retired base (counters never go backwards) and its
in-flight cells are zeroed (never negative, never stuck).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Any

from tritonpilot.proxy.limits import ConnectionsSnapshot
from tritonpilot.proxy.stats import (
    GRPC,
    HTTP,
    LATENCY_BUCKETS_S,
    MAX_MODELS,
    UNKNOWN_MODEL,
    ModelSnapshot,
    ModelStats,
    ProxySnapshot,
    ProxyStats,
    _Load,
)

PROTOCOLS: tuple[str, ...] = (GRPC, HTTP)
NAME_BYTES = 256
DEFAULT_SLOTS = (MAX_MODELS + 1) * len(PROTOCOLS)
BLOB_BYTES = 4 << 20
PUBLISH_PERIOD_S = 0.25
_HEADER_CELLS = 4
_USED, _SEQ, _LEN, _GEN = 0, 1, 2, 3


@dataclass(frozen=True)
class _Layout:
    slots: int

    @property
    def inflight_at(self) -> int:
        return _HEADER_CELLS * 8

    @property
    def protocol_at(self) -> int:
        return self.inflight_at + self.slots * 8

    @property
    def names_at(self) -> int:
        return self.protocol_at + self.slots * 8

    @property
    def blob_at(self) -> int:
        return self.names_at + self.slots * NAME_BYTES

    @property
    def row_bytes(self) -> int:
        return self.blob_at + BLOB_BYTES


@dataclass(frozen=True)
class TableHandle:
    """What a worker attaches the table by: its descriptor, rows and slots. Pickled for a
    spawned process, the descriptor goes along (multiprocessing.reduction.DupFd)."""

    fd: int
    rows: int
    slots: int

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction
        return _rebuild_handle, (reduction.DupFd(self.fd), self.rows, self.slots)


def _rebuild_handle(dup: Any, rows: int, slots: int) -> TableHandle:
    return TableHandle(dup.detach(), rows, slots)


MEMFD_NAME = "tritonpilot-stats"  # what /proc/PID/maps shows: /memfd:tritonpilot-stats (deleted)


def _nameless_file(size: int) -> int:
    """A descriptor of a file of `size` bytes (sparse: pages cost memory once written) that
    no name refers to, so nothing is left behind when the processes holding it are gone."""
    try:
        fd = os.memfd_create(MEMFD_NAME)  # close-on-exec: spawned workers get it explicitly
    except (AttributeError, OSError):  # not Linux, or a sandbox without memfd
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix=MEMFD_NAME + "-", dir=base)
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class SharedStatsTable:
    """The mapped table: `create` in the parent, `attach` in a worker (by `handle()`)."""

    def __init__(self, fd: int, rows: int, slots: int, owner: bool) -> None:
        """Maps `fd`; the owner keeps it (for the workers it spawns later), a worker closes it."""
        self.rows, self.slots, self.owner = rows, slots, owner
        self.layout = _Layout(slots)
        try:
            self._map = mmap.mmap(fd, rows * self.layout.row_bytes)
        finally:
            if not owner:
                os.close(fd)
        self._fd = fd if owner else -1
        self._rows = [memoryview(self._map)[i * self.layout.row_bytes:(i + 1) * self.layout.row_bytes]
                      for i in range(rows)]
        lay = self.layout
        self.header = [r[:lay.inflight_at].cast("q") for r in self._rows]
        self.inflight = [r[lay.inflight_at:lay.protocol_at].cast("q") for r in self._rows]
        self.protocol = [r[lay.protocol_at:lay.names_at].cast("q") for r in self._rows]
        self.names = [r[lay.names_at:lay.blob_at] for r in self._rows]
        self.blob = [r[lay.blob_at:] for r in self._rows]

    @classmethod
    def create(cls, rows: int, slots: int = DEFAULT_SLOTS) -> SharedStatsTable:
        fd = _nameless_file(rows * _Layout(slots).row_bytes)
        try:
            table = cls(fd, rows, slots, owner=True)
        except BaseException:
            os.close(fd)
            raise
        for row in range(rows):
            table.clear(row)
        return table

    def handle(self) -> TableHandle:
        """The owner's: what a worker attaches by (pass it to the spawned process)."""
        assert self.owner and self._fd >= 0, "only the table's creator hands it out"
        return TableHandle(self._fd, self.rows, self.slots)

    @classmethod
    def attach(cls, handle: TableHandle) -> SharedStatsTable:
        return cls(handle.fd, handle.rows, handle.slots, owner=False)

    def clear(self, row: int) -> None:
        """Only while no worker writes the row (before its worker starts, after it died)."""
        header, inflight = self.header[row], self.inflight[row]
        header[_USED] = 0
        header[_GEN] += 1  # peers' cached slot lists of this row are stale now
        for i in range(self.slots):
            inflight[i] = 0
        header[_LEN] = 0
        header[_SEQ] = 0
        for index, protocol in enumerate(PROTOCOLS):
            self._write_slot(row, index, UNKNOWN_MODEL, protocol)
        header[_USED] = len(PROTOCOLS)

    def _write_slot(self, row: int, slot: int, name: str, protocol: str) -> None:
        data = name.encode()
        at = slot * NAME_BYTES
        self.names[row][at:at + 2 + len(data)] = struct.pack("<H", len(data)) + data
        self.protocol[row][slot] = PROTOCOLS.index(protocol)

    def add_slot(self, row: int, name: str, protocol: str) -> int | None:
        """The writer's: a new slot for (name, protocol); None when full or the name is too long."""
        header = self.header[row]
        slot = header[_USED]
        if slot >= self.slots or len(name.encode()) > NAME_BYTES - 2:
            return None
        self._write_slot(row, slot, name, protocol)
        header[_USED] = slot + 1  # after the name: a reader never sees a half-written slot
        return slot

    def slot_key(self, row: int, slot: int) -> tuple[str, str]:
        at = slot * NAME_BYTES
        names = self.names[row]
        (length,) = struct.unpack("<H", names[at:at + 2])
        return bytes(names[at + 2:at + 2 + length]).decode(errors="replace"), PROTOCOLS[self.protocol[row][slot]]

    def model_inflight(self, name: str, cache: list[tuple[int, int, list[int]]]) -> int:
        """A model's requests in flight over every row and protocol, read now (what a
        load-shedding cap compares). `cache`: per row (generation, slots scanned, the model's
        slots), kept by the caller: rows only grow until the parent clears them."""
        total = 0
        for row in range(self.rows):
            header = self.header[row]
            generation, used = header[_GEN], self.used(row)
            gen, scanned, slots = cache[row]
            if gen != generation:
                gen, scanned, slots = generation, 0, []
            if scanned < used:
                slots = slots + [i for i in range(scanned, used) if self.slot_key(row, i)[0] == name]
                cache[row] = (gen, used, slots)
            inflight = self.inflight[row]
            total += sum(max(inflight[i], 0) for i in slots)
        return total

    def used(self, row: int) -> int:
        return min(self.header[row][_USED], self.slots)

    def publish(self, row: int, payload: bytes) -> bool:
        """The writer's: store the blob under the sequence lock; False when it does not fit."""
        if len(payload) > BLOB_BYTES:
            return False
        header = self.header[row]
        header[_SEQ] += 1  # odd: writing
        self.blob[row][:len(payload)] = payload
        header[_LEN] = len(payload)
        header[_SEQ] += 1  # even: done
        return True

    def read_blob(self, row: int) -> tuple[int, bytes] | None:
        """(sequence, blob) read consistently, or None after a few torn tries."""
        header = self.header[row]
        for _ in range(8):
            before = header[_SEQ]
            if before % 2:
                continue
            length = min(max(header[_LEN], 0), BLOB_BYTES)
            data = bytes(self.blob[row][:length])
            if header[_SEQ] == before:
                return before, data
        return None

    def close(self) -> None:
        for views in (self.header, self.inflight, self.protocol, self.names, self.blob, self._rows):
            for view in views:
                view.release()
        self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ------------------------------------------------------------------------------ the worker's side


class SharedModelStats(ModelStats):
    """ModelStats that also stores its protocol's in-flight count into the worker's row,
    and whose `inflight` (what a load-shedding cap compares) is the model's over every worker."""

    __slots__ = ("_cells", "_slot", "_table", "_peers")

    def __init__(self, model: str, now_s: float, protocol: str, load: _Load, table: SharedStatsTable, row: int,
                 slot: int) -> None:
        super().__init__(model, now_s, protocol, load)
        self._table = table
        self._cells = table.inflight[row]
        self._slot = slot
        self._peers: list[tuple[int, int, list[int]]] = [(-1, 0, [])] * table.rows

    @property
    def inflight(self) -> int:
        return self._table.model_inflight(self.model, self._peers)

    def begin(self, now_s: float) -> None:
        super().begin(now_s)
        self._cells[self._slot] = self.own.inflight

    def end(self, now_s: float, grpc_code: int, duration_s: float | None) -> None:
        super().end(now_s, grpc_code, duration_s)
        self._cells[self._slot] = self.own.inflight


class SharedProxyStats(ProxyStats):
    """A worker's ProxyStats: counts as usual, and publishes into row `row` of `table`."""

    def __init__(self, table: SharedStatsTable, row: int) -> None:
        super().__init__()
        self._table = table
        self._row = row
        self._published: tuple[object, ...] | None = None  # _unchanged_key at the last publication

    def model(self, name: str, now_s: float, protocol: str = GRPC) -> ModelStats:
        stats = self._models.get((name, protocol))
        if stats is None:
            if len(name.encode()) > NAME_BYTES - 2:
                name = UNKNOWN_MODEL
            stats = super().model(name, now_s, protocol)
        return stats

    def _new_model(self, name: str, now_s: float, protocol: str, load: _Load) -> ModelStats:
        slot = PROTOCOLS.index(protocol) if name == UNKNOWN_MODEL else self._table.add_slot(self._row, name, protocol)
        if slot is None:  # the slots are full: count under the unknown model, as past MAX_MODELS
            return self.model(UNKNOWN_MODEL, now_s, protocol)
        return SharedModelStats(name, now_s, protocol, load, self._table, self._row, slot)

    def publish(self, now_s: float, connections: ConnectionsSnapshot | None = None, force: bool = False) -> bool:
        """Store this worker's totals into its row (peaks: the highest since the last publish).

        Skipped (True) where nothing changed since the last publication: nothing in flight,
        no request began or ended, the same connection counts. The row then says what a new
        publication would: its integral has not grown, its peaks were read already, and the
        reader extrapolates from its `now_s` with the live in-flight cells, zero."""
        unchanged = self._unchanged_key(connections)
        if not force and unchanged is not None and unchanged == self._published:
            return True
        published = self._table.publish(self._row, encode(self.snapshot(now_s, reset_peaks=True), connections))
        # After the snapshot: its peaks were reset to what is in flight now.
        self._published = self._unchanged_key(connections) if published else None
        return published

    def _unchanged_key(self, connections: ConnectionsSnapshot | None) -> tuple[object, ...] | None:
        """What a publication depends on, as a value to compare; None while anything is in
        flight (its integral grows) and so every publication counts."""
        counts = []
        for stats in self._models.values():
            if stats.own.inflight or stats.own.peak:
                return None
            counts.append((stats.started, sum(stats.finished.values())))
        return tuple(counts), connections


def encode(snapshot: ProxySnapshot, connections: ConnectionsSnapshot | None) -> bytes:
    return json.dumps({
        "now_s": snapshot.now_s,
        "protocols": [[m.model, m.protocol, m.inflight_peak, m.inflight_seconds, m.started_total, m.finished_total,
                       m.latency_bucket_counts, m.latency_sum_s, m.latency_count]
                      for m in snapshot.protocols.values()],
        "models": {m.model: [m.inflight_peak, m.inflight_seconds] for m in snapshot.models.values()},
        "connections": None if connections is None else [
            connections.open, connections.refused_total, connections.goaway_total, connections.http2_refused_total],
    }, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------ the parent's side


@dataclass
class _Totals:
    """What a (model, protocol) pair has counted, summed over rows."""
    seconds: float = 0.0
    started: int = 0
    finished: dict[str, int] | None = None
    buckets: list[int] | None = None  # cumulative, as ModelSnapshot's: sums of cumulative counts stay cumulative
    latency_sum_s: float = 0.0
    latency_count: int = 0

    def add(self, seconds: float, started: int, finished: dict[str, int], buckets: list[int],
            latency_sum_s: float, latency_count: int) -> None:
        self.seconds += seconds
        self.started += started
        self.finished = self.finished or {}
        for code, n in finished.items():
            self.finished[code] = self.finished.get(code, 0) + n
        if self.buckets is None:
            self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        for i, n in enumerate(buckets[:len(self.buckets)]):
            self.buckets[i] += n
        self.latency_sum_s += latency_sum_s
        self.latency_count += latency_count


class _Row:
    """The reader's copy of one row's last consistent blob."""

    def __init__(self) -> None:
        self.seq = -1
        self.blob: dict[str, Any] | None = None
        self.peaks_seen_seq = -1  # the blob whose window peaks were folded since the last reset

    def read(self, table: SharedStatsTable, row: int) -> None:
        got = table.read_blob(row)
        if got is None or got[0] == self.seq:
            return
        seq, data = got
        if not data:
            self.seq, self.blob = seq, None
            return
        try:
            blob = json.loads(data)
        except ValueError:
            return
        self.seq, self.blob = seq, blob


class SharedStatsReader:
    """The parent's view: a ProxySnapshot summed over every worker's row, plus retired rows.

    In flight is exact (the sum of the cells now). Totals are the workers' last published
    ones. The in-flight integral is extrapolated from each worker's publication to now with
    its exact in-flight count. Peaks: the highest of the exact sums this reader has seen and
    the sum of each worker's peak in its last publication window, an upper bound when the
    workers' peaks did not coincide; `poll()` (every PUBLISH_PERIOD_S) keeps them current.
    """

    def __init__(self, table: SharedStatsTable) -> None:
        self.table = table
        self._rows = [_Row() for _ in range(table.rows)]
        self._retired: dict[tuple[str, str], _Totals] = {}
        self._retired_model_s: dict[str, float] = {}
        self._retired_connections: list[ConnectionsSnapshot] = []
        self._peaks: dict[tuple[str, str], int] = {}  # (model, "") for a model over its protocols

    def cells(self) -> list[dict[tuple[str, str], int]]:
        """Each row's in-flight count per (model, protocol), read now."""
        out = []
        for row in range(self.table.rows):
            inflight = self.table.inflight[row]
            counts: dict[tuple[str, str], int] = {}
            for slot in range(self.table.used(row)):
                n = inflight[slot]
                if n > 0 or slot >= len(PROTOCOLS):
                    key = self.table.slot_key(row, slot)
                    counts[key] = counts.get(key, 0) + max(n, 0)
            out.append(counts)
        return out

    def poll(self) -> None:
        for row, state in enumerate(self._rows):
            state.read(self.table, row)
        self._fold_peaks(self.cells())

    def _fold_peaks(self, cells: list[dict[tuple[str, str], int]]) -> None:
        candidates: dict[tuple[str, str], int] = {}
        for row_cells in cells:
            for key, n in row_cells.items():
                candidates[key] = candidates.get(key, 0) + n
                candidates[(key[0], "")] = candidates.get((key[0], ""), 0) + n
        for key, n in candidates.items():
            if n > self._peaks.get(key, 0):
                self._peaks[key] = n
        windows: dict[tuple[str, str], int] = {}
        for state in self._rows:
            if state.blob is None or state.seq == state.peaks_seen_seq:
                continue
            for entry in state.blob["protocols"]:
                key = (entry[0], entry[1])
                windows[key] = windows.get(key, 0) + entry[2]
            for model, (peak, _) in state.blob["models"].items():
                windows[(model, "")] = windows.get((model, ""), 0) + peak
        for key, n in windows.items():
            if n > self._peaks.get(key, 0):
                self._peaks[key] = n

    def retire(self, row: int) -> None:
        """A dead worker's row: keep its last totals as a base, then clear it for its successor."""
        state = self._rows[row]
        state.read(self.table, row)
        if state.blob is not None:
            for entry in state.blob["protocols"]:
                key = (entry[0], entry[1])
                self._retired.setdefault(key, _Totals()).add(entry[3], entry[4], entry[5], entry[6], entry[7],
                                                             entry[8])
            for model, (_, seconds) in state.blob["models"].items():
                self._retired_model_s[model] = self._retired_model_s.get(model, 0.0) + seconds
            conns = state.blob.get("connections")
            if conns is not None:
                self._retired_connections.append(ConnectionsSnapshot(0, conns[1], conns[2], conns[3]))
        self.table.clear(row)
        self._rows[row] = _Row()

    def snapshot(self, now_s: float, reset_peaks: bool = False) -> ProxySnapshot:
        self.poll()
        cells = self.cells()
        totals: dict[tuple[str, str], _Totals] = {}
        for key, base in self._retired.items():
            totals.setdefault(key, _Totals()).add(base.seconds, base.started, base.finished or {},
                                                  base.buckets or [], base.latency_sum_s, base.latency_count)
        model_s = dict(self._retired_model_s)
        inflight: dict[tuple[str, str], int] = {}
        for row, state in enumerate(self._rows):
            for key, n in cells[row].items():
                inflight[key] = inflight.get(key, 0) + n
                totals.setdefault(key, _Totals())
            if state.blob is None:
                continue
            lag_s = max(0.0, now_s - state.blob["now_s"])
            row_model_inflight: dict[str, int] = {}
            for (model, _), n in cells[row].items():
                row_model_inflight[model] = row_model_inflight.get(model, 0) + n
            for entry in state.blob["protocols"]:
                key = (entry[0], entry[1])
                seconds = entry[3] + cells[row].get(key, 0) * lag_s
                totals.setdefault(key, _Totals()).add(seconds, entry[4], entry[5], entry[6], entry[7], entry[8])
            for model, (_, seconds) in state.blob["models"].items():
                model_s[model] = model_s.get(model, 0.0) + seconds + row_model_inflight.get(model, 0) * lag_s
        protocols: dict[tuple[str, str], ModelSnapshot] = {}
        for key, t in totals.items():
            if t.started == 0 and inflight.get(key, 0) == 0 and key[0] == UNKNOWN_MODEL:
                continue  # the reserved slots, unused
            protocols[key] = _snapshot(key[0], key[1], inflight.get(key, 0), self._peaks.get(key, 0), t)
        models: dict[str, ModelSnapshot] = {}
        for model in sorted({m for m, _ in protocols}):
            parts = [s for (m, _), s in protocols.items() if m == model]
            summed = _Totals()
            for p in parts:
                summed.add(0.0, p.started_total, p.finished_total, list(p.latency_bucket_counts),
                           p.latency_sum_s, p.latency_count)
            summed.seconds = model_s.get(model, sum(p.inflight_seconds for p in parts))
            models[model] = _snapshot(model, "", sum(p.inflight for p in parts), self._peaks.get((model, ""), 0),
                                      summed)
        if reset_peaks:
            self._peaks = {key: inflight.get(key, 0) for key in self._peaks if key[1]}
            for (model, _), n in inflight.items():
                self._peaks[(model, "")] = self._peaks.get((model, ""), 0) + n
            for state in self._rows:
                state.peaks_seen_seq = state.seq
        return ProxySnapshot(now_s=now_s, models=models, protocols=protocols)

    def connections(self) -> ConnectionsSnapshot:
        """Connection counts summed over workers (open: as last published) and retired rows."""
        parts = list(self._retired_connections)
        for row, state in enumerate(self._rows):
            state.read(self.table, row)
            conns = state.blob.get("connections") if state.blob is not None else None
            if conns is not None:
                parts.append(ConnectionsSnapshot(conns[0], conns[1], conns[2], conns[3]))
        if not parts:
            return ConnectionsSnapshot(open=0, refused_total={}, goaway_total={}, http2_refused_total={})
        return _summed_connections(parts)


def _summed_connections(parts: list[ConnectionsSnapshot]) -> ConnectionsSnapshot:
    def add(maps: list[dict[str, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in maps:
            for key, n in m.items():
                out[key] = out.get(key, 0) + n
        return out
    return ConnectionsSnapshot(open=sum(p.open for p in parts),
                               refused_total=add([dict(p.refused_total) for p in parts]),
                               goaway_total=add([dict(p.goaway_total) for p in parts]),
                               http2_refused_total=add([dict(p.http2_refused_total) for p in parts]))


def _snapshot(model: str, protocol: str, inflight: int, peak: int, t: _Totals) -> ModelSnapshot:
    return ModelSnapshot(model=model, inflight=inflight, inflight_peak=max(peak, inflight),
                         inflight_seconds=t.seconds, started_total=t.started, finished_total=dict(t.finished or {}),
                         latency_bucket_counts=tuple(t.buckets or [0] * (len(LATENCY_BUCKETS_S) + 1)),
                         latency_sum_s=t.latency_sum_s, latency_count=t.latency_count, protocol=protocol)
