"""Python client of actwatch, the activation-monitoring service (gRPC, ``actwatch.v1``).

``Client`` talks to a running ``actwatch serve``; ``ActivationMonitorHook`` (in ``actwatch_client.hooks``,
needs torch) streams a PyTorch model's hidden states to it.
"""

from .client import (
    ActwatchError,
    Batch,
    Client,
    ComputationScore,
    DetectorScore,
    FitPhase,
    FitReport,
    FlagWatch,
    IngestSession,
    IngestSummary,
    KnnRecall,
    MonitorInfo,
    MonitorSpec,
    ScoreResult,
    ScoreStream,
    SiteInfo,
    SlotPValue,
    TraceResults,
    TraceScore,
)
from .tensors import to_tensor, to_trace_batch

__version__ = "0.1.0"


def __getattr__(name):
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
    "FlagWatch",
    "IngestSession",
    "IngestSummary",
    "KnnRecall",
    "MonitorInfo",
    "MonitorSpec",
    "ScoreResult",
    "ScoreStream",
    "SiteInfo",
    "SlotPValue",
    "TraceResults",
    "TraceScore",
    "to_tensor",
    "to_trace_batch",
]
