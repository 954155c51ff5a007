"""The error every failed RPC is raised as."""

from __future__ import annotations

import grpc

__all__ = ["ActwatchError"]


class ActwatchError(Exception):
    """A failed RPC: ``code`` is the ``grpc.StatusCode``, ``message`` the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ActwatchError:
        """The status of a failed call (``grpc.RpcError`` raised by a call is also a ``grpc.Call``)."""
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")
