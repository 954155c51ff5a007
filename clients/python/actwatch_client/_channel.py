"""The client's channel: plaintext or TLS (optionally with a client certificate), and the bearer token.

The token travels as the ``authorization: Bearer <token>`` metadata of every call, added by
:class:`BearerTokenInterceptor` (all four call kinds) on a ``grpc.intercept_channel`` over the raw
channel, so it works on plaintext and TLS channels alike. The server answers a missing or unknown
token with UNAUTHENTICATED, and a ``read`` token calling an admin RPC with PERMISSION_DENIED.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TypeVar, Union

import grpc

from .types import ChannelOption, PemLike

if TYPE_CHECKING:
    # Only in the type stubs (types-grpcio): what interceptors' continuations return.
    from grpc import _CallFuture, _CallIterator

__all__ = ["BearerTokenInterceptor", "TlsConfig", "check_token", "is_loopback", "read_pem", "tls_credentials"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Metadata = tuple[tuple[str, Union[str, bytes]], ...]

#: Schemes of a gRPC target whose connection never leaves the machine.
_LOCAL_SCHEMES = ("unix:", "unix-abstract:", "vsock:")


def check_token(token: object) -> str:
    """``token`` as sent after ``Bearer ``: a non-empty str of visible ASCII (no spaces), else ValueError.
    The message never contains the token."""
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {type(token).__name__}")
    if not token:
        raise ValueError("token is empty")
    if token.lower().startswith("bearer "):
        raise ValueError('token must be the token itself, without "Bearer " (the client adds it)')
    if not all("!" <= ch <= "~" for ch in token):
        raise ValueError("token must be visible ASCII characters only (no spaces, control or non-ASCII characters)")
    return token


class _CallDetails(grpc.ClientCallDetails):
    """``base`` with other metadata (grpc reads these attributes by name)."""

    def __init__(self, base: grpc.ClientCallDetails, metadata: _Metadata):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (replacing an ``authorization`` entry the
    call already has). The token is not in its repr."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {check_token(token)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(token=...)"

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        kept = tuple((k, v) for k, v in (details.metadata or ()) if k.lower() != "authorization")
        return _CallDetails(details, (*kept, self._header))

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], _CallFuture[_Resp]],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> _CallFuture[_Resp]:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], _CallIterator[_Resp]],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> _CallIterator[_Resp]:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], _CallFuture[_Resp]],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> _CallFuture[_Resp]:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], _CallIterator[_Resp]],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> _CallIterator[_Resp]:
        return continuation(self._details(client_call_details), request_iterator)


def read_pem(value: PemLike, what: str) -> bytes:
    """PEM bytes: ``value`` itself (bytes, or a str holding PEM text), or the file at the path ``value``.
    ValueError when the result is not PEM (``what`` names the argument; the contents are never shown)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data, source = bytes(value), "the bytes given"
    elif isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        data, source = value.encode("ascii", errors="replace"), "the text given"
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        data, source = path.read_bytes(), str(path)
    else:
        raise TypeError(f"{what} must be bytes or a path (str or os.PathLike), got {type(value).__name__}")
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what}: {source} is not PEM (no -----BEGIN line)")
    return data


class TlsConfig:
    """What ``Client`` was given about TLS, checked: ``enabled`` says whether to use it."""

    def __init__(
        self,
        *,
        tls: Optional[bool],
        root_certificates: Optional[PemLike],
        client_certificate: Optional[PemLike],
        client_key: Optional[PemLike],
        server_name: Optional[str],
    ):
        given = [
            name
            for name, value in (
                ("root_certificates", root_certificates),
                ("client_certificate", client_certificate),
                ("client_key", client_key),
                ("server_name", server_name),
            )
            if value is not None
        ]
        if tls is False and given:
            raise ValueError(f"tls=False contradicts {', '.join(given)} (TLS options)")
        if (client_certificate is None) != (client_key is None):
            raise ValueError("client_certificate and client_key must be given together (mutual TLS)")
        if server_name is not None and (not isinstance(server_name, str) or not server_name):
            raise ValueError("server_name must be a non-empty str")
        self.given = given
        self.enabled = bool(tls) or bool(given)
        self.root_certificates = root_certificates
        self.client_certificate = client_certificate
        self.client_key = client_key
        self.server_name = server_name

    def options(self) -> list[ChannelOption]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]

    def credentials(self) -> grpc.ChannelCredentials:
        return tls_credentials(
            root_certificates=self.root_certificates,
            client_certificate=self.client_certificate,
            client_key=self.client_key,
        )


def tls_credentials(
    *,
    root_certificates: Optional[PemLike] = None,
    client_certificate: Optional[PemLike] = None,
    client_key: Optional[PemLike] = None,
) -> grpc.ChannelCredentials:
    """``grpc.ssl_channel_credentials`` from PEM bytes or paths (None roots: grpc's default roots)."""
    return grpc.ssl_channel_credentials(
        root_certificates=None if root_certificates is None else read_pem(root_certificates, "root_certificates"),
        private_key=None if client_key is None else read_pem(client_key, "client_key"),
        certificate_chain=None if client_certificate is None else read_pem(client_certificate, "client_certificate"),
    )


def is_loopback(address: str) -> bool:
    """Whether the gRPC target ``address`` stays on this machine: a Unix socket, ``localhost`` or a
    loopback IP (``127.0.0.0/8``, ``::1``), with or without a ``dns:``/``ipv4:``/``ipv6:`` scheme.
    Anything it cannot tell is not loopback."""
    target = address.strip()
    if target.startswith(_LOCAL_SCHEMES):
        return True
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            if target.startswith("//"):  # dns://authority/host:port
                target = target[2:].partition("/")[2]
            target = target.split(",")[0]  # ipv4:a:1,b:2: the first address
            break
    if target.startswith("["):
        host = target[1:].partition("]")[0]
    elif target.count(":") == 1:
        host = target.rpartition(":")[0]
    else:
        host = target  # no port, or a bare IPv6 address
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False
