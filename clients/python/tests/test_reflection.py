"""gRPC server reflection of `actwatch serve`, read with grpcio-reflection's stock client.

Uses the real server (the `server` fixture of test_client.py: $ACTWATCH_BIN on a free loopback port,
skipping or failing as described there). The server serves both `grpc.reflection.v1` (what grpcurl asks
for first) and `grpc.reflection.v1alpha` (what grpcio-reflection's ProtoReflectionDescriptorDatabase
speaks). The two protocols are the same messages under another service name, so each test runs twice:
with the client as it ships (v1alpha), and through a channel that maps its method onto v1.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import grpc
import pytest

pytest.importorskip("grpc_reflection", reason="grpcio-reflection is not installed (test extra)")

from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from test_client import server  # noqa: F401  (the session fixture: the real server on loopback)

API = "actwatch.v1.ActivationMonitor"
HEALTH = "grpc.health.v1.Health"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/"
V1 = "/grpc.reflection.v1.ServerReflection/"


class _CallDetails(NamedTuple):
    method: str
    timeout: Optional[float]
    metadata: object
    credentials: object
    wait_for_ready: Optional[bool]
    compression: object


class _ReflectionV1(grpc.StreamStreamClientInterceptor):
    """Sends the client's v1alpha reflection calls to the (wire-identical) v1 service."""

    def intercept_stream_stream(self, continuation, details, request_iterator):
        method = details.method
        if method.startswith(V1ALPHA):
            method = V1 + method[len(V1ALPHA) :]
        return continuation(
            _CallDetails(
                method,
                details.timeout,
                details.metadata,
                details.credentials,
                getattr(details, "wait_for_ready", None),
                getattr(details, "compression", None),
            ),
            request_iterator,
        )


@pytest.fixture(
    params=[
        "v1",
        "v1alpha",
    ]
)
def reflection_db(request, server):  # noqa: F811
    channel = grpc.insecure_channel(server)
    if request.param == "v1":
        channel = grpc.intercept_channel(channel, _ReflectionV1())
    try:
        yield ProtoReflectionDescriptorDatabase(channel)
    finally:
        channel.close()


def test_lists_api_and_health_services(reflection_db):
    services = set(reflection_db.get_services())
    assert API in services, services
    assert HEALTH in services, services


def test_resolves_score_input_type(reflection_db):
    pool = DescriptorPool(reflection_db)
    service = pool.FindServiceByName(API)
    assert {"Score", "StreamScores", "IngestReference", "Fit"} <= set(service.methods_by_name)
    score = service.methods_by_name["Score"]
    assert score.input_type.full_name == "actwatch.v1.ScoreRequest"
    assert score.output_type.full_name == "actwatch.v1.ScoreResponse"
    assert not score.client_streaming and not score.server_streaming
    fields = score.input_type.fields_by_name
    assert {"monitor", "batches", "complete"} <= set(fields)
    assert fields["batches"].message_type.full_name == "actwatch.v1.TraceBatch"
    # The same method, looked up by its full name; nested types resolve through the same pool.
    assert pool.FindMethodByName(f"{API}.Score").input_type is score.input_type
    assert (
        pool.FindMessageTypeByName("actwatch.v1.Tensor").fields_by_name["dtype"].enum_type.full_name
        == "actwatch.v1.DType"
    )


def test_resolves_health_check(reflection_db):
    pool = DescriptorPool(reflection_db)
    check = pool.FindServiceByName(HEALTH).methods_by_name["Check"]
    assert check.input_type.full_name == "grpc.health.v1.HealthCheckRequest"
    assert check.output_type.full_name == "grpc.health.v1.HealthCheckResponse"
