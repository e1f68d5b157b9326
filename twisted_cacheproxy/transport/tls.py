"""TLS for the connections we open (the proxy to a server, calc-client to
either): whom to trust, and a connection that counts as open only once its
handshake has verified the peer's certificate, so that a certificate that
does not verify is one clear error and never a silent plain-text fallback.

The connection is opened as every connection of ours is, through a
`ClientCreator` Deferred chain (``connectSSL``), then waits for Twisted's
`IHandshakeListener` call.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, protocol, ssl
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer


class TLSError(Exception):
    """The TLS handshake failed (a certificate that does not verify, a peer
    that does not speak TLS); the message says why in words."""


def trust_root(path: str | None) -> Any:
    """The certificates to trust: this host's own (None), the PEM
    certificates of a file (a CA, or a bundle), or of every file in a folder
    (Twisted's ``trustRoots=DIR``). ValueError saying what is wrong otherwise."""
    if path is None:
        return ssl.platformTrust()
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path))
    else:
        files = [path]
    certificates = []
    for name in files:
        try:
            with open(name, "rb") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read {name}: {e.strerror}") from None
        marker = b"-----BEGIN CERTIFICATE-----"
        for block in text.split(marker)[1:]:
            try:
                certificates.append(ssl.Certificate.loadPEM(marker + block))
            except Exception:
                raise ValueError(f"{name} holds a certificate that cannot be read") from None
    if not certificates:
        raise ValueError(f"no PEM certificate in {path}")
    return ssl.trustRootFromCertificates(certificates)


def client_options(host: str, trust: str | None) -> Any:
    """What `connectSSL` needs to reach ``host`` (a name or an address, which
    its certificate must name) and check its certificate against ``trust``
    (`trust_root`)."""
    return ssl.optionsForClientTLS(host, trustRoot=trust_root(trust))


@implementer(IHandshakeListener)
class AwaitsHandshake:
    """Mixed into a client protocol: `handshake` fires with the protocol once
    the TLS handshake has verified the peer, or fails with `TLSError`."""

    handshake: defer.Deferred[Any]

    def makeConnection(self, transport: Any) -> None:
        self.handshake = defer.Deferred()
        super().makeConnection(transport)  # type: ignore[misc]

    def handshakeCompleted(self) -> None:
        self.handshake.callback(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.handshake.called:
            self.handshake.errback(TLSError(describe(reason.value)))
        super().connectionLost(reason)  # type: ignore[misc]


_P = TypeVar("_P", bound=protocol.Protocol)


def connect_tls(
    reactor: Any, kind: type[_P], host: str, port: int, options: Any, timeout: float
) -> defer.Deferred[_P]:
    """A new ``kind`` connection (an `AwaitsHandshake` protocol) to ``host``
    and ``port`` over TLS, through a `ClientCreator`; fires once the handshake
    is done, or fails (`TLSError` when the handshake fails)."""
    creator = protocol.ClientCreator(reactor, kind)
    d = creator.connectSSL(host, port, options, timeout=timeout)
    return d.addCallback(lambda conn: conn.handshake)


def describe(e: BaseException | None) -> str:
    """Why a TLS handshake failed, in a few words."""
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list):
        reasons = [entry[-1] for entry in e.args[0] if entry and entry[-1]]
        if reasons:
            return "TLS handshake failed: " + "; ".join(reasons)
    if isinstance(e, VerificationError):  # the certificate names another host
        return "TLS handshake failed: the certificate is not for this host name or address"
    text = str(e).strip().rstrip(".") if e is not None else ""
    return f"TLS handshake failed: {text or 'the connection closed during it'}"
