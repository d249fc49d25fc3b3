"""Hot policy reload (tritonpilot/sidecar/reload.py).

1. Pure: `diff_policies` says which changes apply live and which need a restart, with
   flags and the environment still winning over the file; the watcher fires on a
   Kubernetes-style `..data` symlink swap and not when nothing changed; the reloader keeps
   the running policy on an invalid file and counts every outcome; the controller takes
   a new set of models at its next tick.
2. A real `tritonpilot serve --policy` in front of the real Triton: a ModelStreamInfer
   stream stays open and keeps working across reloads; a valid file takes effect (the
   controller's models in /status, the relay's restricted protocols on the open
   connection); an invalid one is refused with its key path; SIGHUP reloads too.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry, generate_latest
from proxy_support import WAIT_S, scrape, wait_until
from structlog.testing import capture_logs
from test_loop import POLICY, FakeClock, FakeSources, FakeTriton, RecordingApplier, model_config
from tritonclient.utils import InferenceServerException

from tritonpilot.control.loop import Controller
from tritonpilot.sidecar.reload import (
    Loaded,
    PolicyFileWatcher,
    PolicyReloader,
    ReloadOutcome,
    diff_policies,
)
from tritonpilot.sidecar.serve import apply_environment, option_parser, policy_loader

BASE = """\
control: {interval_s: 0.5, dry_run: true}
models:
  fast: {max_instances: 2}
"""


def loaded(tmp_path: Path, text: str, argv: tuple[str, ...] = (), environ: dict[str, str] | None = None) -> Loaded:
    """What `serve` makes of a policy file under these options and environment."""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    parser = option_parser()
    args = apply_environment(parser, parser.parse_args(["--policy", str(path), *argv]), environ or {})
    return policy_loader(args)()


def keys(changes: Any) -> list[str]:
    return [c.key for c in changes]


# ------------------------------------------------------------------------------ diff


@pytest.mark.parametrize(("edit", "live", "restart"), [
    # nothing, or only a comment
    (lambda t: t, [], []),
    (lambda t: "# a comment\n" + t, [], []),
    # the controller's part: models and control.*
    (lambda t: t.replace("max_instances: 2", "max_instances: 3"), ["models.fast.max_instances"], []),
    (lambda t: t + "  sleep: {}\n", ["models.sleep"], []),
    (lambda t: t.replace("  fast: {max_instances: 2}\n", "  sleep: {}\n"), ["models.fast", "models.sleep"], []),
    (lambda t: t.replace("interval_s: 0.5", "interval_s: 2.0"), ["control.interval_s"], []),
    (lambda t: t + "defaults: {cooldown_s: 3}\n", ["models.fast.cooldown_s"], []),
    # the relay's live settings
    (lambda t: t + "proxy: {max_inflight: 8, max_message_bytes: 1000}\n",
     ["proxy.max_message_bytes", "proxy.max_inflight"], []),
    (lambda t: t.replace("max_instances: 2}", "max_instances: 2, max_inflight: 4}"),
     ["models.fast.max_inflight"], []),
    (lambda t: t + "proxy: {restricted_protocols: ['model-config:admin=yes']}\n", ["proxy.restricted_protocols"], []),
    # what needs a restart
    (lambda t: t + "proxy: {listen: '0.0.0.0:9000'}\n", [], ["proxy.listen"]),
    (lambda t: t + "triton: {grpc: 'elsewhere:8001'}\nmetrics: {listen: '127.0.0.1:9999'}\n",
     [], ["triton.grpc", "metrics.listen"]),
    (lambda t: t + "proxy: {max_connections: 10}\nlogging: {level: DEBUG}\n", [],
     ["proxy.max_connections", "logging.level"]),
    (lambda t: t + "proxy: {max_pings_per_s: 10}\n", [], ["proxy.max_pings_per_s"]),
    # both at once: the live part applies, the rest waits
    (lambda t: t.replace("max_instances: 2", "max_instances: 3") + "proxy: {listen: '0.0.0.0:9000'}\n",
     ["models.fast.max_instances"], ["proxy.listen"]),
])
def test_diff_splits_live_changes_from_restart_needed(tmp_path: Path, edit: Any, live: list[str],
                                                      restart: list[str]) -> None:
    old = loaded(tmp_path, BASE)
    new = loaded(tmp_path, edit(BASE))
    diff = diff_policies(old, new)
    assert (sorted(keys(diff.live)), keys(diff.restart)) == (sorted(live), restart)
    # The config to run with: the new one, but every restart-needed field as it runs now.
    assert diff.config.listen == old.config.listen
    assert diff.config.max_inflight == new.config.max_inflight


def test_a_restart_needed_change_says_from_what_to_what(tmp_path: Path) -> None:
    diff = diff_policies(loaded(tmp_path, BASE), loaded(tmp_path, BASE + "proxy: {listen: '0.0.0.0:9000'}\n"))
    assert [str(c) for c in diff.restart] == ["proxy.listen changed from '0.0.0.0:8101' to '0.0.0.0:9000'"]


def test_flags_and_environment_keep_winning_across_a_reload(tmp_path: Path) -> None:
    argv = ("--max-inflight", "5")
    env = {"TRITONPILOT_LISTEN": "127.0.0.1:7000"}
    old = loaded(tmp_path, BASE, argv, env)
    new = loaded(tmp_path, BASE + "proxy: {max_inflight: 9, listen: '0.0.0.0:9000', grace_period_s: 3}\n",
                 argv, env)
    diff = diff_policies(old, new)
    # Only what neither a flag nor the environment gives changes.
    assert keys(diff.live) == ["proxy.grace_period_s"] and diff.restart == ()
    assert (diff.config.max_inflight, diff.config.listen, diff.config.grace_period_s) == (5, "127.0.0.1:7000", 3.0)


# ------------------------------------------------------------------------------ the watcher


class ConfigMapDir:
    """A directory laid out as kubelet mounts a ConfigMap: `policy.yaml -> ..data/policy.yaml`,
    `..data -> ..<timestamp>`; an update writes a new timestamped directory and renames a new
    `..data` symlink over the old one (atomic)."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.versions = 0
        root.mkdir()
        self.update(text)
        (root / "policy.yaml").symlink_to("..data/policy.yaml")

    @property
    def path(self) -> Path:
        return self.root / "policy.yaml"

    def update(self, text: str, mtime_ns: int | None = None) -> None:
        self.versions += 1
        version = self.root / f"..2026_01_01_00_00_{self.versions:02d}.000000001"
        version.mkdir()
        (version / "policy.yaml").write_text(text)
        if mtime_ns is not None:
            os.utime(version / "policy.yaml", ns=(mtime_ns, mtime_ns))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")


def test_watcher_fires_on_a_configmap_symlink_swap_and_not_when_nothing_changed(tmp_path: Path) -> None:
    cm = ConfigMapDir(tmp_path / "cm", BASE)
    watcher = PolicyFileWatcher(cm.path)
    assert not watcher.changed()
    assert not watcher.changed()
    os.utime(cm.path)  # touched, content as it was
    assert not watcher.changed()
    cm.update(BASE)  # a new directory with the same content
    assert not watcher.changed()

    cm.update(BASE.replace("max_instances: 2", "max_instances: 3"))
    assert watcher.changed()
    assert not watcher.changed()  # once per change

    # Same size, same mtime, different content: the real path moved, so it is read.
    real = Path(os.path.realpath(cm.path))
    cm.update(BASE.replace("max_instances: 2", "max_instances: 4"), mtime_ns=real.stat().st_mtime_ns)
    assert watcher.changed()


def test_watcher_of_a_plain_file_and_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BASE)
    watcher = PolicyFileWatcher(path)
    path.write_text(BASE + "# edited\n")
    assert watcher.changed()
    path.unlink()
    assert not watcher.changed()  # gone: nothing to reload yet
    path.write_text(BASE)
    assert watcher.changed()


def test_watcher_reads_through_injected_file_functions() -> None:
    files = {"/p": b"a"}
    stat = os.stat(__file__)
    watcher = PolicyFileWatcher("/p", realpath=lambda p: p, stat=lambda p: stat, read_bytes=lambda p: files[p])
    files["/p"] = b"b"
    assert not watcher.changed()  # path, inode, mtime and size unchanged: not even read
    watcher._seen = None  # as if the stat had moved
    assert watcher.changed()


# ------------------------------------------------------------------------------ the reloader


def test_reloader_applies_valid_keeps_old_on_invalid_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BASE)
    parser = option_parser()
    load = policy_loader(parser.parse_args(["--policy", str(path)]))
    applied: list[tuple[Loaded, Any]] = []
    registry = CollectorRegistry()
    reloader = PolicyReloader(str(path), load(), load, lambda new, diff: applied.append((new, diff)),
                              registry=registry, wall_clock=lambda: 1_800_000_000.25)
    assert reloader.status() == {"file": str(path), "last": None}

    path.write_text(BASE.replace("max_instances: 2", "max_instances: 3"))
    assert reloader.reload("file") is ReloadOutcome.OK
    assert [c.key for c in applied[-1][1].live] == ["models.fast.max_instances"]

    path.write_text(BASE.replace("max_instances: 2", "max_instancez: 3"))
    with capture_logs() as logs:
        assert reloader.reload("sighup") is ReloadOutcome.INVALID
    assert len(applied) == 1 and reloader.current.policy.models["fast"].max_instances == 3  # old one kept
    (event,) = [e for e in logs if e["event"] == "policy.reload"]
    assert event["log_level"] == "error" and event["result"] == "invalid"
    assert any(p.startswith("models.fast.max_instancez: got 3; unknown key; did you mean max_instances?")
               for p in event["problems"])
    last = reloader.status()["last"]
    assert (last["result"], last["trigger"], last["at"]) == ("invalid", "sighup", "2027-01-15T08:00:00.250Z")
    assert "models.fast.max_instancez" in last["error"]

    path.write_text(BASE.replace("max_instances: 2", "max_instances: 3") + "proxy: {listen: '0.0.0.0:9000'}\n")
    with capture_logs() as logs:
        assert reloader.reload("sighup") is ReloadOutcome.UNCHANGED  # nothing live; the listener waits
    (event,) = [e for e in logs if e["event"] == "policy.reload"]
    assert event["log_level"] == "warning"
    assert event["restart_needed"] == ["needs a restart: proxy.listen changed from '0.0.0.0:8101' to '0.0.0.0:9000'"]
    assert reloader.current.config.listen == "0.0.0.0:8101"

    counts = {s.labels["result"]: s.value for f in registry.collect() for s in f.samples
              if s.name == "tritonpilot_policy_reloads_total"}
    assert counts == {"ok": 1.0, "invalid": 1.0, "unchanged": 1.0}


# ------------------------------------------------------------------------------ the controller


def test_controller_takes_new_models_at_its_next_tick() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        triton = FakeTriton({"m": model_config(), "n": model_config()})
        registry = CollectorRegistry()
        controller = Controller({"m": POLICY}, FakeSources(triton), RecordingApplier(), dry_run=True,
                                registry=registry, clock=clock)
        await controller.tick(0.0)
        clock.now_s = 1.0
        await controller.tick(1.0)
        history = list(controller.status()["models"]["m"]["decisions"])
        controller.replace_policies({"m": replace(POLICY, max_instances=2), "n": replace(POLICY, model="n")},
                                    interval_s=2.0, dry_run=True, max_concurrent_reloads=2,
                                    max_reloads_per_minute=None)
        assert set(controller.status()["models"]) == {"m"}  # not before the next tick
        clock.now_s = 2.0
        decisions = await controller.tick(2.0)
        assert [d.model for d in decisions] == ["m", "n"]
        status = controller.status()
        assert status["models"]["m"]["policy"]["max_instances"] == 2
        assert status["models"]["m"]["decisions"][:len(history)] == history  # its state kept
        assert (controller.interval_s, controller.max_concurrent_reloads) == (2.0, 2)

        controller.replace_policies({"n": replace(POLICY, model="n")}, interval_s=2.0, dry_run=True,
                                    max_concurrent_reloads=2, max_reloads_per_minute=None)
        clock.now_s = 4.0
        await controller.tick(4.0)
        assert set(controller.status()["models"]) == {"n"}
        metrics = generate_latest(registry).decode()
        assert 'tritonpilot_model_instances{model="n"}' in metrics
        assert 'tritonpilot_model_instances{model="m"}' not in metrics

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ a real process


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def reloads(serve: Any) -> dict[str, float]:
    return {dict(labels)["result"]: value for (name, labels), value in scrape(serve.metrics_url + "/metrics").items()
            if name == "tritonpilot_policy_reloads_total"}


class Stream:
    """A ModelStreamInfer stream to `fast` through the proxy, held open."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        self.sent = 0

    def roundtrip(self) -> None:
        self.sent += 1
        data = np.full(4, float(self.sent), dtype=np.float32)
        inp = grpcclient.InferInput("INPUT0", [4], "FP32")
        inp.set_data_from_numpy(data)
        self.client.async_stream_infer("fast", [inp], request_id=str(self.sent))
        result, error = self.responses.get(timeout=WAIT_S)
        assert error is None, error
        assert result.get_response().id == str(self.sent)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


@pytest.mark.triton
def test_reload_in_a_running_sidecar_keeps_the_stream_open(triton: Any, serve_factory: Any, tmp_path: Path) -> None:
    # dry_run: the shared Triton is never reloaded; the controller still reads it and /status shows its policy.
    cm = ConfigMapDir(tmp_path / "cm", BASE)
    serve = serve_factory(triton.grpc_url, "--policy", str(cm.path))
    status_url = serve.metrics_url + "/status"
    assert get_json(status_url)["policy_reload"] == {"file": str(cm.path), "last": None}
    wait_until(lambda: get_json(status_url)["models"]["fast"]["instances"] == 1, what="the controller")
    stream = Stream(serve.url)
    try:
        stream.roundtrip()
        stream.client.get_model_config("fast")  # not restricted yet

        # A valid update, as kubelet makes it: applied live, the stream untouched.
        cm.update(BASE.replace("max_instances: 2", "max_instances: 3") + "  identity_fp32: {}\n"
                  + "proxy:\n  restricted_protocols: ['model-config:admin=yes']\n  listen: '0.0.0.0:1'\n")
        last = wait_until(lambda: get_json(status_url)["policy_reload"]["last"], what="the reload")
        assert (last["result"], last["trigger"], last["error"]) == ("ok", "file", None)
        assert "models.fast.max_instances changed from 2 to 3" in last["changes"]
        assert last["restart_needed"] == []  # --listen is given: the file's proxy.listen does not count
        models = wait_until(lambda: (m := get_json(status_url)["models"]).keys() == {"fast", "identity_fp32"} and m,
                            what="the new model under control")
        assert models["fast"]["policy"]["max_instances"] == 3
        stream.roundtrip()
        # The relay took the restriction on this same, already open connection.
        with pytest.raises(InferenceServerException, match="expecting header 'triton-grpc-protocol-admin'"):
            stream.client.get_model_config("fast")
        stream.client.get_model_config("fast", headers={"triton-grpc-protocol-admin": "yes"})

        # An invalid one: refused, named by its key path, the running policy kept.
        cm.update(BASE.replace("max_instances: 2", "max_instancez: 2"))
        last = wait_until(lambda: (s := get_json(status_url)["policy_reload"]["last"])["result"] == "invalid" and s,
                          what="the invalid reload")
        assert "models.fast.max_instancez" in last["error"]
        assert get_json(status_url)["models"]["fast"]["policy"]["max_instances"] == 3
        assert reloads(serve) == {"ok": 1.0, "invalid": 1.0, "unchanged": 0.0}
        stream.roundtrip()

        # SIGHUP reads the file again: still invalid, counted again.
        serve.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(serve)["invalid"] == 2.0, what="the SIGHUP reload")
        assert get_json(status_url)["policy_reload"]["last"]["trigger"] == "sighup"

        # Fixed, and SIGHUP again before the watcher could see it; either way, once applied.
        cm.update(BASE)
        serve.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: get_json(status_url)["models"].keys() == {"fast"}, what="the model set back")
        assert get_json(status_url)["models"]["fast"]["policy"]["max_instances"] == 2
        stream.client.get_model_config("fast")  # the restriction is gone with it
        stream.roundtrip()
        assert serve.proc.poll() is None
    finally:
        stream.close()
    events = [json.loads(line) for line in serve.log().splitlines() if line.startswith("{")]
    reload_events = [e for e in events if e.get("event") == "policy.reload"]
    assert any(e["result"] == "invalid" and any("models.fast.max_instancez" in p for p in e["problems"])
               for e in reload_events)
