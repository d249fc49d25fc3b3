"""TLS on the client port (and mTLS), SIGHUP re-reading the certificate, the local responder
over TLS, TLS to a Triton that serves it, and `serve` refusing files it can't use.

Certificates are made per module with the openssl command (tests/tls_support.py)."""

from __future__ import annotations

import asyncio
import queue
import signal
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from proxy_support import HEALTH_SERVING, H2GrpcClient, fp32_inputs, http_status, outcome, raw_unary, wait_until
from tls_support import Pem, common_name, issue, make_ca, needs_openssl, peer_certificate

from tritonpilot import cli
from tritonpilot.proxy.wire import HEALTH_CHECK
from tritonpilot.tools.embedded import EmbeddedTriton

pytestmark = needs_openssl


@dataclass(frozen=True)
class Pki:
    ca: Pem
    proxy_a: Pem
    proxy_b: Pem
    client: Pem
    stranger: Pem  # a client certificate from another CA
    triton: Pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d / "ca")
    other = make_ca(d / "other", "other-ca")
    return Pki(ca=ca, proxy_a=issue(ca, d, "proxy-a", 1001), proxy_b=issue(ca, d, "proxy-b", 1002),
               client=issue(ca, d, "client", 2001), stranger=issue(other, d / "other", "stranger", 3001),
               triton=issue(ca, d, "triton", 4001))


def tls_client(url: str, pki: Pki, cert: Pem | None = None) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        url, ssl=True, root_certificates=str(pki.ca.cert),
        private_key=str(cert.key) if cert else None, certificate_chain=str(cert.cert) if cert else None)


def infer_fast(client: grpcclient.InferenceServerClient, values: list[float]) -> list[float]:
    result = client.infer("fast", fp32_inputs(np.array(values, dtype=np.float32)), client_timeout=30)
    return result.as_numpy("OUTPUT0").tolist()


def tls_options(pki: Pki, server: Pem | None = None, client_ca: bool = False) -> dict[str, str]:
    server = server or pki.proxy_a
    options = {"tls_cert": str(server.cert), "tls_key": str(server.key)}
    if client_ca:
        options["tls_client_ca"] = str(pki.ca.cert)
    return options


# ------------------------------------------------------------------------------ TLS and mTLS


@pytest.mark.triton
def test_tls_client_port_serves_unary_calls_and_streams(triton: EmbeddedTriton, sidecar_factory, pki: Pki) -> None:
    sidecar = sidecar_factory(triton.grpc_url, **tls_options(pki))
    assert common_name(peer_certificate(sidecar.url, pki.ca)) == "proxy-a"  # ALPN h2 checked there too
    client = tls_client(sidecar.url, pki)
    assert infer_fast(client, [1.0, 2.0]) == [1.0, 2.0]

    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for i in range(3):
        client.async_stream_infer("fast", fp32_inputs(np.array([float(i)], dtype=np.float32)), request_id=str(i))
    got = [responses.get(timeout=60) for _ in range(3)]
    assert [e for _, e in got] == [None] * 3
    assert sorted(r.as_numpy("OUTPUT0").tolist()[0] for r, _ in got) == [0.0, 1.0, 2.0]
    client.stop_stream()
    # The relay read the decrypted frames: every request counted under its model.
    wait_until(lambda: sidecar.finished("fast") == {"OK": 4}, what="4 calls counted OK")
    client.close()


@pytest.mark.triton
def test_mtls_serves_only_clients_with_a_certificate_the_client_ca_signed(
        triton: EmbeddedTriton, sidecar_factory, pki: Pki) -> None:
    sidecar = sidecar_factory(triton.grpc_url, **tls_options(pki, client_ca=True))
    certified = tls_client(sidecar.url, pki, pki.client)
    assert infer_fast(certified, [3.0]) == [3.0]

    for cert in (None, pki.stranger):
        refused = tls_client(sidecar.url, pki, cert)
        result = outcome(lambda c=refused: infer_fast(c, [1.0]))  # type: ignore[misc]
        assert not result.ok and result.code == "StatusCode.UNAVAILABLE", (cert, result)
        refused.close()

    # The refusals cost the others nothing: the certified client (and a new one) still work.
    assert infer_fast(certified, [4.0]) == [4.0]
    fresh = tls_client(sidecar.url, pki, pki.client)
    assert infer_fast(fresh, [5.0]) == [5.0]
    assert sidecar.finished("fast") == {"OK": 3}
    certified.close()
    fresh.close()


@pytest.mark.triton
def test_plaintext_client_on_the_tls_port_fails_cleanly(triton: EmbeddedTriton, sidecar_factory, pki: Pki) -> None:
    sidecar = sidecar_factory(triton.grpc_url, **tls_options(pki))
    plain = grpcclient.InferenceServerClient(sidecar.url)
    result = outcome(lambda: plain.is_server_live(client_timeout=20))
    assert not result.ok
    plain.close()
    # HTTP/2 in clear text (the preface where a ClientHello should be): the connection is closed.
    raw = H2GrpcClient(sidecar.url)
    with pytest.raises(OSError):
        raw.call(HEALTH_CHECK.decode(), b"")
    raw.sock.close()

    client = tls_client(sidecar.url, pki)
    assert infer_fast(client, [7.0]) == [7.0]
    client.close()


# ------------------------------------------------------------------------------ SIGHUP


@pytest.mark.triton
def test_sighup_rereads_the_certificate_for_new_connections(triton: EmbeddedTriton, serve_factory, pki: Pki,
                                                           tmp_path: Path) -> None:
    live = Pem(tmp_path / "live.pem", tmp_path / "live.key")
    live.cert.write_bytes(pki.proxy_a.cert.read_bytes())
    live.key.write_bytes(pki.proxy_a.key.read_bytes())
    proc = serve_factory(triton.grpc_url, "--tls-cert", str(live.cert), "--tls-key", str(live.key))
    assert common_name(peer_certificate(proc.url, pki.ca)) == "proxy-a"
    before = tls_client(proc.url, pki)
    assert infer_fast(before, [1.0]) == [1.0]  # its connection is open from here on

    live.cert.write_bytes(pki.proxy_b.cert.read_bytes())
    live.key.write_bytes(pki.proxy_b.key.read_bytes())
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: common_name(peer_certificate(proc.url, pki.ca)) == "proxy-b",
               what="a new connection to see the new certificate")
    assert peer_certificate(proc.url, pki.ca)["serialNumber"] == f"{1002:X}".rjust(4, "0")
    assert infer_fast(before, [2.0]) == [2.0]  # the connection made before goes on
    assert "sidecar.tls_reloaded" in proc.log()

    # A half-written file: the reload fails, says so, and keeps the certificate it had.
    live.cert.write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "sidecar.tls_reload_failed" in proc.log(), what="the failed reload in the log")
    assert "--tls-cert" in proc.log()
    assert common_name(peer_certificate(proc.url, pki.ca)) == "proxy-b"
    assert proc.proc.poll() is None
    before.close()


# ------------------------------------------------------------------------------ Triton down, Triton with TLS


def test_local_responder_answers_over_tls_when_triton_is_unreachable(sidecar_factory, pki: Pki,
                                                                     free_port: int) -> None:
    sidecar = sidecar_factory(f"127.0.0.1:{free_port}", **tls_options(pki))
    client = tls_client(sidecar.url, pki)
    result = outcome(lambda: infer_fast(client, [1.0]))
    assert not result.ok and result.code == "StatusCode.UNAVAILABLE"
    assert "unreachable" in (result.message or "")
    client.close()
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert.read_bytes())
    with grpc.secure_channel(sidecar.url, credentials) as channel:
        code, _, reply = raw_unary(channel, HEALTH_CHECK.decode(), b"", timeout_s=20.0)
    assert (code, reply) == ("OK", HEALTH_SERVING)


def _model_ready(triton: EmbeddedTriton, model: str) -> bool:
    if not triton.is_running():
        raise AssertionError(f"tritonserver exited:\n{triton.log_tail()}")
    try:
        with urllib.request.urlopen(f"{triton.http_url}/v2/models/{model}/ready", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.mark.triton
def test_tls_to_a_triton_that_serves_tls(triton_factory, sidecar_factory, pki: Pki) -> None:
    secure = triton_factory(load_models=["fast"], start=False, extra_args=[
        "--grpc-use-ssl=true", f"--grpc-server-cert={pki.triton.cert}", f"--grpc-server-key={pki.triton.key}",
        f"--grpc-root-cert={pki.ca.cert}"])
    secure.start(wait=False)  # its readiness probe speaks plaintext gRPC: wait on HTTP instead
    wait_until(lambda: _model_ready(secure, "fast"), timeout_s=180, interval_s=0.2, what="Triton with TLS ready")

    # TLS on both sides: client -> proxy (proxy-a) and proxy -> Triton (verified against the CA).
    sidecar = sidecar_factory(secure.grpc_url, triton_tls_ca=str(pki.ca.cert), **tls_options(pki))
    client = tls_client(sidecar.url, pki)
    assert infer_fast(client, [1.5, 2.5]) == [1.5, 2.5]
    assert sidecar.finished("fast") == {"OK": 1}
    wait_until(lambda: http_status(sidecar.metrics_url + "/readyz") == 200, what="/readyz over TLS to Triton")
    client.close()

    # The controller's own client (model config, statistics, loads) speaks TLS to it too.
    from tritonpilot.control.triton import TritonClient, TritonError

    async def config_over(**tls: str) -> dict:
        client = TritonClient(secure.grpc_url, rpc_timeout_s=5, **tls)  # grpc.aio: made on the loop it runs on
        try:
            return await client.get_config("fast")
        finally:
            await client.close()
    assert asyncio.run(config_over(tls_ca=str(pki.ca.cert)))["name"] == "fast"
    with pytest.raises(TritonError):
        asyncio.run(config_over())

    # Plaintext to Triton's TLS port fails fast; it does not hang or take the proxy down.
    plain_upstream = sidecar_factory(secure.grpc_url, **tls_options(pki))
    client = tls_client(plain_upstream.url, pki)
    assert not outcome(lambda: infer_fast(client, [1.0])).ok
    client.close()


# ------------------------------------------------------------------------------ files serve can't use


def _serve(*args: str) -> int:
    return cli.main(["serve", "--triton", "127.0.0.1:1", "--listen", "127.0.0.1:0",
                     "--metrics-listen", "127.0.0.1:0", *args])


def test_serve_exits_2_naming_the_option_of_a_file_it_cannot_use(pki: Pki, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    a, b = pki.proxy_a, pki.proxy_b
    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(a.key)], "--tls-cert", "cannot read"),
        (["--tls-cert", str(a.cert), "--tls-key", str(tmp_path / "missing.key")], "--tls-key", "cannot read"),
        (["--tls-cert", str(a.cert), "--tls-key", str(b.key)], "--tls-key", "is not the key of the certificate"),
        (["--tls-cert", str(garbage), "--tls-key", str(a.key)], "--tls-cert", "cannot load"),
        (["--tls-cert", str(a.cert)], "--tls-key", "required with --tls-cert"),
        (["--tls-cert", str(a.cert), "--tls-key", str(a.key), "--tls-client-ca", str(garbage)],
         "--tls-client-ca", "no PEM CA certificate"),
        (["--triton-tls-ca", str(tmp_path / "missing-ca.pem")], "--triton-tls-ca", "cannot read"),
    ]
    for args, option, words in cases:
        assert _serve(*args) == 2, args
        err = capsys.readouterr().err
        assert option in err and words in err, (args, err)


def test_serve_takes_the_certificate_from_the_environment(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRITONPILOT_TLS_CERT", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("TRITONPILOT_TLS_KEY", str(pki.proxy_a.key))
    assert _serve() == 2
    assert "--tls-cert (proxy.tls.cert): cannot read" in capsys.readouterr().err
