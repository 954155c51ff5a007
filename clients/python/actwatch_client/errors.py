"""The error every failed RPC is raised as, and the client's warning categories."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, MutableSet

import grpc

from .results import ProvenanceConflict

__all__ = ["ActwatchError", "InsecureTokenWarning", "ProvenanceMismatchWarning"]


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


class ProvenanceMismatchWarning(UserWarning):
    """A monitor with ``provenance_policy="warn"`` scored batches whose declared provenance conflicts
    with what its reference batches declared (``ScoreResult`` / ``TraceResults.provenance_warnings``
    say which site and field). Emitted once per site per ``score`` call or score stream; make it an
    error with ``warnings.simplefilter("error", ProvenanceMismatchWarning)``."""


class InsecureTokenWarning(UserWarning):
    """A ``Client`` sends its bearer token without TLS to an address that is not loopback: anyone on
    the path can read it. Emitted once, when the client is built; pass ``tls=True`` (or
    ``root_certificates=``) to the client, or make it an error with
    ``warnings.simplefilter("error", InsecureTokenWarning)``."""


def warn_provenance_conflicts(
    monitor: str, conflicts: Iterable[ProvenanceConflict], warned: MutableSet[str], *, stacklevel: int
) -> None:
    """Emits one ProvenanceMismatchWarning per site of ``conflicts`` not yet in ``warned`` (and adds it).
    ``stacklevel`` counts from the caller of this function."""
    for c in conflicts:
        if c.site in warned:
            continue
        warned.add(c.site)
        warnings.warn(
            f"monitor {monitor!r}, site {c.site!r}: scored despite conflicting provenance ({c.field} "
            f"declared {c.declared!r}, the reference traces recorded {c.recorded!r}); the monitor's "
            'provenance_policy is "warn"',
            ProvenanceMismatchWarning,
            stacklevel=stacklevel + 1,
        )
