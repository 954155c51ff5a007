"""The typed face of the generated gRPC stub.

grpcio-tools generates ``actwatch_pb2_grpc.ActivationMonitorStub`` without type annotations (its
attributes are plain ``channel.unary_unary(...)`` results), so the client sees it through this
Protocol: one multi-callable per RPC, typed with the request and response messages. The generated
stub satisfies it at run time; tests/test_results.py checks it against the service descriptor (every
RPC, its streaming kind and its message types), so it cannot drift from the proto.
"""

from __future__ import annotations

from typing import Protocol, cast

import grpc

from ._proto.actwatch.v1 import actwatch_pb2 as pb
from ._proto.actwatch.v1 import actwatch_pb2_grpc as pb_grpc

__all__ = ["ActivationMonitorStub", "stub"]


class ActivationMonitorStub(Protocol):
    """``actwatch.v1.ActivationMonitor``, one attribute per RPC."""

    CreateMonitor: grpc.UnaryUnaryMultiCallable[pb.CreateMonitorRequest, pb.MonitorInfo]
    GetMonitor: grpc.UnaryUnaryMultiCallable[pb.GetMonitorRequest, pb.MonitorInfo]
    ListMonitors: grpc.UnaryUnaryMultiCallable[pb.ListMonitorsRequest, pb.ListMonitorsResponse]
    DeleteMonitor: grpc.UnaryUnaryMultiCallable[pb.DeleteMonitorRequest, pb.DeleteMonitorResponse]
    IngestReference: grpc.StreamUnaryMultiCallable[pb.IngestReferenceRequest, pb.IngestReferenceSummary]
    Fit: grpc.UnaryStreamMultiCallable[pb.FitRequest, pb.FitProgress]
    Score: grpc.UnaryUnaryMultiCallable[pb.ScoreRequest, pb.ScoreResponse]
    StreamScores: grpc.StreamStreamMultiCallable[pb.StreamScoresRequest, pb.StreamScoresResponse]
    WatchFlags: grpc.UnaryStreamMultiCallable[pb.WatchFlagsRequest, pb.FlagEvent]
    QueryScores: grpc.UnaryUnaryMultiCallable[pb.QueryScoresRequest, pb.QueryScoresResponse]


def stub(channel: grpc.Channel) -> ActivationMonitorStub:
    """The generated stub on ``channel``, typed."""
    return cast(ActivationMonitorStub, pb_grpc.ActivationMonitorStub(channel))  # type: ignore[no-untyped-call]
