"""Certificates for the TLS tests, made with the `openssl` command line (no Python package
needed): a CA, and leaf certificates it signs, valid for 127.0.0.1 and localhost."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command makes the test certificates")


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", str(path))


def make_ca(directory: Path, name: str = "tritonpilot-test-ca") -> Pem:
    directory.mkdir(parents=True, exist_ok=True)
    ca = Pem(directory / f"{name}.pem", directory / f"{name}.key")
    _new_key(ca.key)
    _openssl("req", "-x509", "-new", "-key", str(ca.key), "-out", str(ca.cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca


def issue(ca: Pem, directory: Path, name: str, serial: int) -> Pem:
    """A certificate for CN=name, signed by ca, for servers (127.0.0.1, localhost) and clients."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf = Pem(directory / f"{name}.pem", directory / f"{name}.key")
    _new_key(leaf.key)
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    _openssl("req", "-new", "-key", str(leaf.key), "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
                   "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-set_serial", str(serial),
             "-days", "2", "-out", str(leaf.cert), "-extfile", str(ext))
    return leaf


def peer_certificate(url: str, ca: Pem, client: Pem | None = None) -> dict:
    """The certificate a new TLS connection to url is served (ssl's getpeercert() form)."""
    host, port = url.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    ctx.set_alpn_protocols(["h2"])
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as sock:
        assert sock.selected_alpn_protocol() == "h2"
        cert = sock.getpeercert()
        assert cert is not None
        return cert


def common_name(cert: dict) -> str:
    return next(value for rdn in cert["subject"] for key, value in rdn if key == "commonName")
