"""Access control: TLS, mutual TLS and bearer tokens (``Client(token=, root_certificates=, ...)``).

The end-to-end tests run one real server (tests/_server.py: $ACTWATCH_BIN on a free loopback port,
skipping or failing as test_client.py does) with TLS (the fixtures in tests/data/tls of the
repository: ca.pem, server.pem/.key for localhost and 127.0.0.1, client.pem/.key signed by ca.pem),
client certificates required, and two tokens: one of role ``admin``, one of role ``read``. The
offline tests (argument checks, the token's interceptor on all four call kinds against an in-process
Python server) need no binary.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import warnings
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from _server import REPO, SERVICE, require_binary, running_server, skip_or_fail

from actwatch_client import ActwatchError, Client, InsecureTokenWarning
from actwatch_client._channel import BearerTokenInterceptor, is_loopback, read_pem
from actwatch_client._proto.actwatch.v1 import actwatch_pb2 as pb

TLS = REPO / "tests/data/tls"
CA, SERVER_CERT, SERVER_KEY = TLS / "ca.pem", TLS / "server.pem", TLS / "server.key"
CLIENT_CERT, CLIENT_KEY = TLS / "client.pem", TLS / "client.key"
ADMIN_TOKEN = secrets.token_hex(32)
READ_TOKEN = secrets.token_hex(32)
# Calls that must fail (refused handshakes, wrong credentials) get this deadline, so they cannot hang.
FAIL_TIMEOUT_S = 5
WIDTH = 16


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _toml_str(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mtls(**kwargs) -> dict:
    """Client arguments: trust ca.pem and present the client certificate (paths as str and Path)."""
    return {"root_certificates": str(CA), "client_certificate": CLIENT_CERT, "client_key": str(CLIENT_KEY), **kwargs}


# ------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory):
    """`actwatch serve` with TLS, client certificates required (mTLS) and tokens "ops" (admin) and
    "dashboard" (read); yields its address."""
    help_ = require_binary()
    if "tls" not in help_.lower():
        skip_or_fail("the actwatch binary has no TLS support yet (`serve --help` does not mention it)")
    for f in (CA, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY):
        assert f.exists(), f"TLS fixture missing: {f}"
    root = tmp_path_factory.mktemp("actwatch-access")
    config = root / "actwatch.toml"
    config.write_text(
        "[tls]\n"
        f"cert = {_toml_str(SERVER_CERT)}\n"
        f"key = {_toml_str(SERVER_KEY)}\n"
        f"client_ca = {_toml_str(CA)}\n"
        "\n[[tokens]]\n"
        'name = "ops"\n'
        'role = "admin"\n'
        f'sha256 = "{_sha256(ADMIN_TOKEN)}"\n'
        "\n[[tokens]]\n"
        'name = "dashboard"\n'
        'role = "read"\n'
        f'sha256 = "{_sha256(READ_TOKEN)}"\n'
    )
    credentials = grpc.ssl_channel_credentials(CA.read_bytes(), CLIENT_KEY.read_bytes(), CLIENT_CERT.read_bytes())
    with running_server(
        root,
        args=["--config", str(config)],
        channel=lambda address: grpc.secure_channel(address, credentials),
    ) as address:
        yield address


@pytest.fixture(scope="session")
def admin(tls_server):
    with Client(tls_server, token=ADMIN_TOKEN, **_mtls()) as c:
        c.wait_ready(timeout=10)
        yield c


@pytest.fixture(scope="session")
def reader(tls_server):
    # PEM bytes this time (the admin client reads paths).
    with Client(
        tls_server,
        token=READ_TOKEN,
        root_certificates=CA.read_bytes(),
        client_certificate=CLIENT_CERT.read_bytes(),
        client_key=CLIENT_KEY.read_bytes(),
    ) as c:
        c.wait_ready(timeout=10)
        yield c


def _batches(prefix: str, n: int, seed: int):
    """One site "a" of width WIDTH: n computations of one trace each (a seeded Gaussian)."""
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((n, WIDTH)).astype(np.float32)
    return [("a", acts, [f"{prefix}-{i}" for i in range(n)])]


@pytest.fixture(scope="module")
def fitted(admin):
    """A monitor the admin client created, filled with 600 reference computations and fitted."""
    name = "access-fitted"
    info = admin.create_monitor(name, seed=3)
    assert info.name == name and not info.fitted
    summary = admin.ingest_reference(name, _batches("ref", 600, 0))
    assert summary.rows == summary.total_rows == 600
    report = admin.fit(name, timeout=300)
    assert admin.get_monitor(name).fitted
    return {"name": name, "report": report}


def _code(excinfo: pytest.ExceptionInfo[ActwatchError]) -> grpc.StatusCode:
    return excinfo.value.code


# ------------------------------------------------------------------------------------ admin and read


def test_admin_creates_ingests_fits_and_scores(admin, fitted):
    name = fitted["name"]
    assert any(m.name == name for m in admin.list_monitors())
    result = admin.score(name, _batches("live", 20, 1))
    assert len(result.traces) == 20 and len(result.computations) == 20
    assert all(0.0 < c.p_value <= 1.0 for c in result.computations)

    # Every admin RPC, DeleteMonitor included.
    admin.create_monitor("access-admin-scratch")
    admin.delete_monitor("access-admin-scratch")
    assert all(m.name != "access-admin-scratch" for m in admin.list_monitors())


def test_read_token_reads_and_scores(reader, fitted):
    name = fitted["name"]
    assert name in {m.name for m in reader.list_monitors()}
    info = reader.get_monitor(name)
    assert info.fitted and info.reference_rows == 600
    result = reader.score(name, _batches("read", 10, 2))
    assert len(result.computations) == 10
    assert {c.trace_id for c in reader.query_scores(name, limit=100)} >= {f"read-{i}" for i in range(10)}

    # The streaming read RPCs: StreamScores (client and server streaming) and WatchFlags.
    with reader.watch_flags(name, ready_timeout=10):
        pass
    with reader.stream_scores(name, timeout=60) as stream:
        acts, ids = _batches("stream", 5, 3)[0][1:]
        stream.send("a", acts, ids)
        stream.complete(ids)
        assert {c.trace_id for c in stream.computations(n=5, timeout=30)} == set(ids)


def test_read_token_cannot_change_anything(reader, fitted):
    name = fitted["name"]
    before = reader.get_monitor(name)
    denied = {
        "create_monitor": lambda: reader.create_monitor("access-read-created"),
        "delete_monitor": lambda: reader.delete_monitor(name),
        "ingest_reference": lambda: reader.ingest_reference(name, _batches("denied", 5, 4), timeout=30),
        "fit": lambda: reader.fit(name, timeout=30),
    }
    for what, call in denied.items():
        with pytest.raises(ActwatchError) as e:
            call()
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED, (what, e.value)
    names = {m.name for m in reader.list_monitors()}
    assert name in names and "access-read-created" not in names
    after = reader.get_monitor(name)
    assert (after.reference_rows, after.fitted) == (before.reference_rows, before.fitted)


def test_missing_or_unknown_token_is_unauthenticated(tls_server):
    for token in (None, secrets.token_hex(32)):
        with Client(tls_server, token=token, timeout=FAIL_TIMEOUT_S, **_mtls()) as c:
            with pytest.raises(ActwatchError) as e:
                c.list_monitors()
            assert _code(e) == grpc.StatusCode.UNAUTHENTICATED, (token is None, e.value)
            # A streaming call too.
            with pytest.raises(ActwatchError) as e:
                c.watch_flags(ready_timeout=FAIL_TIMEOUT_S)
            assert _code(e) == grpc.StatusCode.UNAUTHENTICATED, (token is None, e.value)


# ------------------------------------------------------------------------------------ TLS


def test_without_client_certificate_the_handshake_is_refused(tls_server):
    with Client(tls_server, token=ADMIN_TOKEN, root_certificates=CA, timeout=FAIL_TIMEOUT_S) as c:
        with pytest.raises(ActwatchError) as e:
            c.list_monitors()
        assert _code(e) == grpc.StatusCode.UNAVAILABLE, e.value


def test_plaintext_to_the_tls_port_fails(tls_server):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InsecureTokenWarning)  # loopback: no warning
        c = Client(tls_server, token=ADMIN_TOKEN, timeout=FAIL_TIMEOUT_S)
    with c:
        with pytest.raises(ActwatchError) as e:
            c.list_monitors()
        assert _code(e) == grpc.StatusCode.UNAVAILABLE, e.value


def test_untrusted_server_certificate_fails(tls_server):
    # Trusting only the client's certificate (not a CA of the server's): the server is not verified.
    with Client(tls_server, token=ADMIN_TOKEN, **_mtls(root_certificates=CLIENT_CERT), timeout=FAIL_TIMEOUT_S) as c:
        with pytest.raises(ActwatchError) as e:
            c.list_monitors()
        assert _code(e) == grpc.StatusCode.UNAVAILABLE, e.value


def test_server_name_overrides_the_checked_name(tls_server):
    port = tls_server.rpartition(":")[2]
    # "localhost" is in the certificate: checking against it works whatever the address says.
    with Client(f"127.0.0.1:{port}", token=READ_TOKEN, server_name="localhost", **_mtls()) as c:
        c.wait_ready(timeout=10)
        c.list_monitors()
    with Client(f"localhost:{port}", token=READ_TOKEN, **_mtls()) as c:
        c.list_monitors()
    # A name the certificate does not have: the server's certificate is refused.
    with Client(tls_server, token=READ_TOKEN, server_name="elsewhere.example", timeout=FAIL_TIMEOUT_S, **_mtls()) as c:
        with pytest.raises(ActwatchError) as e:
            c.list_monitors()
        assert _code(e) == grpc.StatusCode.UNAVAILABLE, e.value


def test_explicit_tls_channel_with_token(tls_server):
    credentials = grpc.ssl_channel_credentials(CA.read_bytes(), CLIENT_KEY.read_bytes(), CLIENT_CERT.read_bytes())
    channel = grpc.secure_channel(tls_server, credentials)
    try:
        with Client(tls_server, channel=channel, token=READ_TOKEN) as c:
            c.wait_ready(timeout=10)
            assert isinstance(c.list_monitors(), list)
        # close() left the caller's channel open.
        with Client(tls_server, channel=channel, token=ADMIN_TOKEN) as c:
            c.create_monitor("access-own-channel")
            c.delete_monitor("access-own-channel")
    finally:
        channel.close()


# ------------------------------------------------------------------------------------ health, reflection


def test_health_answers_without_token(tls_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = grpc.ssl_channel_credentials(CA.read_bytes(), CLIENT_KEY.read_bytes(), CLIENT_CERT.read_bytes())
    with grpc.secure_channel(tls_server, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=FAIL_TIMEOUT_S)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


def test_health_on_the_clients_channel(reader):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # The client's channel carries its token; the health service ignores it.
    health = health_pb2_grpc.HealthStub(reader.channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=FAIL_TIMEOUT_S)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_a_token(tls_server, reader):
    pytest.importorskip("grpc_reflection", reason="grpcio-reflection is not installed (test extra)")
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    # A read token may use reflection (through the client's intercepted channel)...
    assert SERVICE in set(ProtoReflectionDescriptorDatabase(reader.channel).get_services())
    # ... no token may not.
    with Client(tls_server, timeout=FAIL_TIMEOUT_S, **_mtls()) as c:
        with pytest.raises(grpc.RpcError) as e:
            ProtoReflectionDescriptorDatabase(c.channel).get_services()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ------------------------------------------------------------------------------------ offline


class _Recorder:
    """An in-process ActivationMonitor with four methods, one per call kind, recording the
    ``authorization`` metadata of each call."""

    def __init__(self):
        self.seen: list[tuple[str, list[str]]] = []
        self._lock = threading.Lock()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        values = [v for k, v in context.invocation_metadata() if k == "authorization"]
        with self._lock:
            self.seen.append((method, values))

    def list_monitors(self, request, context):
        self._record("ListMonitors", context)
        return pb.ListMonitorsResponse()

    def fit(self, request, context):
        self._record("Fit", context)
        yield pb.FitProgress(report=pb.FitReport())

    def ingest(self, requests, context):
        self._record("IngestReference", context)
        for _ in requests:
            pass
        return pb.IngestReferenceSummary()

    def stream_scores(self, requests, context):
        self._record("StreamScores", context)
        for _ in requests:
            pass
        yield from ()

    def handler(self) -> grpc.GenericRpcHandler:
        def des(cls):
            return cls.FromString

        def ser(msg):
            return msg.SerializeToString()

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ListMonitors": grpc.unary_unary_rpc_method_handler(
                    self.list_monitors, des(pb.ListMonitorsRequest), ser
                ),
                "Fit": grpc.unary_stream_rpc_method_handler(self.fit, des(pb.FitRequest), ser),
                "IngestReference": grpc.stream_unary_rpc_method_handler(
                    self.ingest, des(pb.IngestReferenceRequest), ser
                ),
                "StreamScores": grpc.stream_stream_rpc_method_handler(
                    self.stream_scores, des(pb.StreamScoresRequest), ser
                ),
            },
        )


@pytest.fixture
def recorder():
    rec = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((rec.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield rec, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def _call_all_kinds(c: Client) -> None:
    c.stub.ListMonitors(pb.ListMonitorsRequest(), timeout=10)
    c.list_monitors()
    c.fit("m", timeout=10)  # unary-stream
    list(c.stub.Fit(pb.FitRequest(monitor="m"), timeout=10))
    c.stub.IngestReference(iter([pb.IngestReferenceRequest(monitor="m")]), timeout=10)
    c.stub.IngestReference.future(iter([pb.IngestReferenceRequest(monitor="m")]), timeout=10).result()
    list(c.stub.StreamScores(iter([pb.StreamScoresRequest(monitor="m")]), timeout=10))


def test_token_is_sent_on_every_call_kind(recorder):
    rec, address = recorder
    token = secrets.token_hex(16)
    with Client(address, token=token) as c:
        c.wait_ready(timeout=10)  # through the raw channel
        _call_all_kinds(c)
        # A caller's own authorization metadata is replaced, not doubled.
        c.stub.ListMonitors(pb.ListMonitorsRequest(), metadata=(("authorization", "Bearer other"),), timeout=10)
    methods = [m for m, _ in rec.seen]
    assert set(methods) == {"ListMonitors", "Fit", "IngestReference", "StreamScores"}, methods
    assert all(values == [f"Bearer {token}"] for _, values in rec.seen), rec.seen


def test_token_on_a_given_channel_and_no_token(recorder):
    rec, address = recorder
    channel = grpc.insecure_channel(address)
    try:
        with Client(address, channel=channel, token="tok-1") as c:
            c.wait_ready(timeout=10)
            _call_all_kinds(c)
        with Client(address, channel=channel) as c:
            c.list_monitors()
    finally:
        channel.close()
    assert all(values == ["Bearer tok-1"] for _, values in rec.seen[:-1]), rec.seen
    assert rec.seen[-1] == ("ListMonitors", [])


def test_tls_arguments_are_checked():
    with pytest.raises(ValueError, match="together"):
        Client("127.0.0.1:1", root_certificates=CA, client_certificate=CLIENT_CERT)
    with pytest.raises(ValueError, match="together"):
        Client("127.0.0.1:1", client_key=CLIENT_KEY)
    with pytest.raises(ValueError, match="tls=False"):
        Client("127.0.0.1:1", tls=False, root_certificates=CA)
    channel = grpc.insecure_channel("127.0.0.1:1")
    try:
        for kwargs in ({"tls": True}, {"root_certificates": CA}, {"server_name": "localhost"}, _mtls()):
            with pytest.raises(ValueError, match="channel="):
                Client("127.0.0.1:1", channel=channel, **kwargs)
    finally:
        channel.close()
    for bad in ("", "Bearer abc", "two words", "caf\u00e9", "line\nbreak"):
        with pytest.raises(ValueError):
            Client("127.0.0.1:1", token=bad)
    with pytest.raises(TypeError):
        Client("127.0.0.1:1", token=b"bytes")
    assert "s3cr3t" not in repr(BearerTokenInterceptor("s3cr3t"))


def test_pem_arguments(tmp_path):
    pem = CA.read_bytes()
    assert read_pem(CA, "x") == read_pem(str(CA), "x") == read_pem(pem, "x") == read_pem(pem.decode(), "x") == pem
    not_pem = tmp_path / "key.der"
    not_pem.write_bytes(b"\x30\x82secret")
    with pytest.raises(ValueError, match="not PEM") as e:
        read_pem(not_pem, "client_key")
    assert "client_key" in str(e.value) and "secret" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1:1", root_certificates=tmp_path / "missing.pem")
    # TLS clients build without connecting (lazily), from paths, bytes or none (grpc's default roots).
    for kwargs in ({"tls": True}, {"root_certificates": pem}, {"server_name": "localhost"}, _mtls()):
        Client("127.0.0.1:1", **kwargs).close()


def test_insecure_token_warning():
    with pytest.warns(InsecureTokenWarning, match="without TLS"):
        Client("actwatch.example.com:50051", token="t").close()
    with pytest.warns(InsecureTokenWarning):
        Client("dns:///10.1.2.3:50051", token="t").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for address in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "unix:/tmp/actwatch.sock"):
            Client(address, token="t").close()
        Client("actwatch.example.com:50051", token="t", tls=True).close()
        Client("actwatch.example.com:50051", token="t", root_certificates=CA).close()
        Client("actwatch.example.com:50051").close()  # no token: nothing to protect


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.1:1", True),
        ("localhost:50051", True),
        ("LOCALHOST", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", True),
        ("ipv6:[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("dns://8.8.8.8/localhost:50051", True),
        ("unix:/run/actwatch.sock", True),
        ("unix-abstract:actwatch", True),
        ("10.0.0.1:50051", False),
        ("0.0.0.0:50051", False),
        ("[2001:db8::1]:50051", False),
        ("actwatch.example.com:443", False),
        ("localhost.example.com:1", False),
        ("dns:///actwatch.example.com:443", False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback
