"""TLS for the client port, and for the upstream connection to a Triton that serves TLS.

The client port's listener keeps one SSLContext for its whole life (asyncio binds it at
create_server); its `sni_callback`, which OpenSSL calls on every ClientHello, with or
without a server name, points each new handshake at the *current* context. A SIGHUP
builds a fresh context from the same files (`ServerTls.reload`): new connections use the
new certificate and client CA, connections already made keep theirs. A reload that fails
(a half-written file) keeps the old context and says why.

Errors name the option (and its policy key) they came from, for `serve` to exit 2 with.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

ALPN_H2 = "h2"
ALPN_HTTP1 = "http/1.1"  # the HTTP/REST port (http_relay.py)


class TlsError(ValueError):
    """A certificate, key or CA that cannot be used; the message names its option."""


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None  # set: clients must present a certificate it signed (mTLS)


_WHERE = {"cert": "--tls-cert (proxy.tls.cert)", "key": "--tls-key (proxy.tls.key)",
          "client_ca": "--tls-client-ca (proxy.tls.client_ca)", "triton_ca": "--triton-tls-ca (triton.tls_ca)"}


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise TlsError(f"{_WHERE[what]}: cannot read {path!r} ({exc.strerror or exc})") from None


def server_context(files: TlsFiles, alpn: tuple[str, ...] = (ALPN_H2,)) -> ssl.SSLContext:
    """A TLS 1.2+ server context offering `alpn` (h2 for the gRPC port, http/1.1 for the
    HTTP port), requiring a client certificate when files.client_ca is set. Raises
    TlsError naming the option at fault."""
    _readable(files.cert, "cert")
    _readable(files.key, "key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # HTTP/2 forbids older ones (RFC 9113, 9.2)
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsError(f"{_WHERE['key']}: {files.key!r} is not the key of the certificate in "
                           f"{files.cert!r}") from None
        raise TlsError(f"{_WHERE['cert']} / {_WHERE['key']}: cannot load {files.cert!r} with "
                       f"{files.key!r}: expected a PEM certificate (chain) and its PEM private key "
                       f"({exc.reason or exc})") from None
    ctx.set_alpn_protocols(list(alpn))
    if files.client_ca is not None:
        _load_ca(ctx, files.client_ca, "client_ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def upstream_context(ca_file: str) -> ssl.SSLContext:
    """A client context for Triton's TLS port: Triton's certificate must chain to ca_file and
    name the host the sidecar connects to."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, ca_file, "triton_ca")
    ctx.set_alpn_protocols([ALPN_H2])
    return ctx


def _load_ca(ctx: ssl.SSLContext, path: str, what: str) -> None:
    _readable(path, what)
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsError(f"{_WHERE[what]}: {path!r} holds no PEM CA certificate ({exc})") from None


class ServerTls:
    """The client port's TLS: `listener` goes to create_server; `reload()` re-reads the files."""

    def __init__(self, files: TlsFiles, alpn: tuple[str, ...] = (ALPN_H2,)) -> None:
        self.files = files
        self.alpn = alpn
        self._current = server_context(files, alpn)
        # verify_mode is fixed per connection when the listener's context makes it, before the
        # callback: the listener must want client certificates exactly when the files do.
        self.listener = server_context(files, alpn)
        self.listener.sni_callback = self._select

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        ssl_object.context = self._current

    def reload(self) -> None:
        """New connections use what the files hold now. Raises TlsError (and keeps the
        previous context) when they can't be used."""
        self._current = server_context(self.files, self.alpn)

