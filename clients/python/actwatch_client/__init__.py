"""Python client of actwatch, the activation-monitoring service (gRPC, ``actwatch.v1``).

``Client`` talks to a running ``actwatch serve``; ``ActivationMonitorHook`` (in ``actwatch_client.hooks``,
needs torch) streams a PyTorch model's hidden states to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._streams import FlagWatch, IngestSession, ScoreStream
from .client import Client
from .errors import ActwatchError, InsecureTokenWarning, ProvenanceMismatchWarning
from .results import (
    ComputationScore,
    DetectorScore,
    FitPhase,
    FitReport,
    FlagEvent,
    IngestCheck,
    IngestInfo,
    IngestSummary,
    JointFit,
    KnnRecall,
    LengthStratum,
    MonitorInfo,
    MonitorSpec,
    ProbeFit,
    ProbeScore,
    ProbeSiteFit,
    Provenance,
    ProvenanceConflict,
    ReferenceCheck,
    ScoreResult,
    SiteInfo,
    SlotPValue,
    TraceResults,
    TraceScore,
)
from .tensors import Batch, to_tensor, to_trace_batch

if TYPE_CHECKING:
    from .hooks import ActivationMonitorHook

__version__ = "0.1.0"


def __getattr__(name: str) -> type[ActivationMonitorHook]:
    # The hook pulls in torch only when used: `from actwatch_client import ActivationMonitorHook`.
    if name == "ActivationMonitorHook":
        from .hooks import ActivationMonitorHook

        return ActivationMonitorHook
    raise AttributeError(f"module 'actwatch_client' has no attribute {name!r}")


__all__ = [
    "ActivationMonitorHook",
    "ActwatchError",
    "Batch",
    "Client",
    "ComputationScore",
    "DetectorScore",
    "FitPhase",
    "FitReport",
    "FlagEvent",
    "FlagWatch",
    "IngestCheck",
    "IngestInfo",
    "IngestSession",
    "IngestSummary",
    "InsecureTokenWarning",
    "JointFit",
    "KnnRecall",
    "LengthStratum",
    "MonitorInfo",
    "MonitorSpec",
    "ProbeFit",
    "ProbeScore",
    "ProbeSiteFit",
    "Provenance",
    "ProvenanceConflict",
    "ProvenanceMismatchWarning",
    "ReferenceCheck",
    "ScoreResult",
    "ScoreStream",
    "SiteInfo",
    "SlotPValue",
    "TraceResults",
    "TraceScore",
    "to_tensor",
    "to_trace_batch",
]
