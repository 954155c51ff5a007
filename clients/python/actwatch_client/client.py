"""The actwatch gRPC client: monitors, reference ingest, fitting, scoring, flags and the score log.

Every call maps to one RPC of ``actwatch.v1.ActivationMonitor`` (see proto/actwatch/v1/actwatch.proto).
Results come back as frozen dataclasses (``actwatch_client.results``); ``ScoreResult.traces_table()`` /
``computations_table()`` give numpy columns. Every gRPC failure is raised as :class:`ActwatchError`
carrying the status code and the server's message (UNAUTHENTICATED: no token or an unknown one;
PERMISSION_DENIED: a ``read`` token calling an admin RPC). The streams (``ingest_session``,
``stream_scores``, ``watch_flags``) are in ``actwatch_client._streams``; TLS and the bearer token in
``actwatch_client._channel``.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Callable, Optional, TypeVar, Union

import grpc

from ._channel import BearerTokenInterceptor, TlsConfig, is_loopback
from ._proto.actwatch.v1 import actwatch_pb2 as pb
from ._rpc import ActivationMonitorStub, stub
from ._streams import EarlyFlagCallback, FlagWatch, IngestSession, ScoreStream
from .errors import ActwatchError, InsecureTokenWarning, warn_provenance_conflicts
from .results import (
    ComputationScore,
    FitPhase,
    FitReport,
    IngestSummary,
    MonitorInfo,
    MonitorRef,
    Provenance,
    ScoreResult,
)
from .tensors import as_batches, coerce_batch, trace_id_strings
from .types import BatchesLike, ChannelOption, Labels, PemLike, Timestamp, TraceId, TraceIds

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_MAX_BATCH_BYTES", "Client"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Tensor bytes per wire batch when the client splits large batches (ingest and streams). Stays well
# under gRPC's customary 4 MiB message limit.
DEFAULT_MAX_BATCH_BYTES = 2 << 20
_MAX_MESSAGE = 256 << 20

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _name(monitor: MonitorRef) -> str:
    return monitor.name if isinstance(monitor, MonitorInfo) else str(monitor)


def _unix_ms(t: Optional[Timestamp]) -> int:
    if t is None:
        return 0
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None:
            t = t.astimezone()
        return int(t.timestamp() * 1000)
    return int(t)


class Client:
    """A connection to an actwatch server.

    ``timeout`` is the deadline in seconds for unary calls (None: no deadline). Streams have none
    by default; pass ``timeout=`` to the stream methods. Use as a context manager or ``close()``.

    Access control (see the README's "TLS and tokens"): ``token`` is sent as ``authorization: Bearer
    <token>`` on every call (a server with tokens configured answers a missing or unknown one with
    UNAUTHENTICATED, and a ``read`` token calling an admin RPC, CreateMonitor, DeleteMonitor,
    IngestReference or Fit, with PERMISSION_DENIED; both raised as :class:`ActwatchError`). Sending it
    without TLS to an address that is not loopback emits an :class:`InsecureTokenWarning`.

    TLS is used with ``tls=True`` or when any of ``root_certificates`` (the CA to trust; None: grpc's
    default roots), ``client_certificate`` and ``client_key`` (together: a client certificate, for
    servers that require one) or ``server_name`` is given; each certificate or key is PEM, as bytes or
    a file's path. ``server_name`` is the name the server's certificate is checked against when it
    differs from the address's host (the ``grpc.ssl_target_name_override`` channel option).

    ``channel``: a channel of the caller's to use instead (not closed by ``close()``); the token is
    added to its calls, and TLS options are a ValueError (the channel has decided). ``options``:
    further gRPC channel options.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: Optional[float] = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        channel: Optional[grpc.Channel] = None,
        options: Sequence[ChannelOption] = (),
        token: Optional[str] = None,
        tls: Optional[bool] = None,
        root_certificates: Optional[PemLike] = None,
        client_certificate: Optional[PemLike] = None,
        client_key: Optional[PemLike] = None,
        server_name: Optional[str] = None,
    ):
        tls_config = TlsConfig(
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            server_name=server_name,
        )
        if channel is not None and (tls is not None or tls_config.given):
            given = (["tls"] if tls is not None else []) + tls_config.given
            raise ValueError(f"{', '.join(given)} cannot be used with channel= (the channel's credentials decide)")
        interceptor = None if token is None else BearerTokenInterceptor(token)
        if interceptor is not None and channel is None and not tls_config.enabled and not is_loopback(address):
            warnings.warn(
                f"the token is sent without TLS to {address}, which is not a loopback address; "
                "pass tls=True or root_certificates= to encrypt it",
                InsecureTokenWarning,
                stacklevel=2,
            )
        self.address = address
        self.timeout = timeout
        self.max_batch_bytes = max_batch_bytes
        #: Whether this client made the channel (then ``close()`` closes it).
        self._own_channel = channel is None
        if channel is None:
            opts: list[ChannelOption] = [
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                *tls_config.options(),
                *options,
            ]
            if tls_config.enabled:
                channel = grpc.secure_channel(address, tls_config.credentials(), options=opts)
            else:
                channel = grpc.insecure_channel(address, options=opts)
        #: The channel as made (or given), without the token: connectivity and ``close()``.
        self._raw_channel: grpc.Channel = channel
        #: The channel the calls go through (with the token's interceptor when there is a token).
        self.channel: grpc.Channel = channel if interceptor is None else grpc.intercept_channel(channel, interceptor)
        self.stub: ActivationMonitorStub = stub(self.channel)

    # -- lifecycle

    def wait_ready(self, *, timeout: float = 10.0) -> None:
        """Waits until the channel is connected (TimeoutError otherwise). With TLS, a failed handshake
        (an untrusted server certificate, or a client certificate the server refuses) never connects."""
        try:
            grpc.channel_ready_future(self._raw_channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"actwatch server at {self.address} not reachable within {timeout} s") from None

    def close(self) -> None:
        if self._own_channel:
            self._raw_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()

    def _unary(self, method: grpc.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req) -> _Resp:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ActwatchError.from_rpc_error(e) from None

    # -- monitors

    def create_monitor(
        self,
        name: str,
        *,
        detectors: Union[str, Sequence[str], None] = None,
        fusion: Optional[str] = None,
        fpr: Optional[float] = None,
        calibration_fraction: Optional[float] = None,
        seed: int = 0,
        aggregation: Optional[str] = None,
        joint: Union[str, Sequence[str], None] = None,
        length_strata: Optional[int] = None,
        provenance_policy: Optional[str] = None,
        probes: Union[str, Sequence[str], None] = None,
    ) -> MonitorInfo:
        """Creates an empty monitor. None means the server's default (see MonitorSpec in the proto):
        detectors gaussian and knn, fusion minp, fpr 0.01, calibration_fraction 0.25, aggregation
        "max_rolling_mean:8", joint "gaussian".

        ``aggregation``: how a computation's traces at one (site, detector) aggregate before fusion:
        "max", "mean", "ema:ALPHA", "max_rolling_mean:WINDOW" or "topk_mean:K" (with max, ema and
        max_rolling_mean, and minp or fisher fusion, score streams flag computations early).
        ``joint``: detectors on the joint vector of a computation (its per-site vectors concatenated):
        a list as for ``detectors`` (or one comma-separated string), or "none" for no joint detector.
        ``length_strata``: at most this many length strata of the computation-level calibration
        (quantile groups of token counts, each calibrated on its own); 1 for one calibration; None:
        the server's default, 4 (pooled traces always get one). ``provenance_policy``: what scoring
        does with a batch whose declared provenance conflicts with what its site's reference batches
        declared: "refuse" (None: the default; FAILED_PRECONDITION) or "warn" (scored, with
        ``provenance_warnings`` on the result and a ProvenanceMismatchWarning).

        ``probes``: concept probes fitted from labelled examples (``ingest_reference(..., labels=)``),
        each ``NAME[:key=value,...]`` (one string for one probe), e.g. "harmful_request" or
        "harm:kind=logistic,defer_fpr=0.05". Keys: kind ("diff_means", the default, or "logistic"), c
        (logistic: the inverse L2 strength; "auto": cross-validated), sites ("a+b"; default: every site,
        fused), aggregation (as ``aggregation``), reference_negatives ("true": the reference traffic is
        also fitted as negatives), defer_fpr (a deferral band: verdict "defer"). Every computation's
        result then carries per probe a :class:`ProbeScore` (``ComputationScore.probes``), its p-value
        calibrated among benign computations."""
        if isinstance(detectors, str):
            detectors = [detectors]
        if isinstance(probes, str):
            probes = [probes]
        spec = pb.MonitorSpec(
            detectors=list(detectors or []),
            fusion=fusion or "",
            fpr=fpr or 0.0,
            calibration_fraction=calibration_fraction or 0.0,
            seed=seed,
            aggregation=aggregation or "",
            joint=joint if isinstance(joint, str) else ",".join(joint or []),
            length_strata=length_strata or 0,
            provenance_policy=provenance_policy or "",
            probes=list(probes or []),
        )
        req = pb.CreateMonitorRequest(name=name, spec=spec)
        return MonitorInfo._from_pb(self._unary(self.stub.CreateMonitor, req))

    def get_monitor(self, name: MonitorRef) -> MonitorInfo:
        return MonitorInfo._from_pb(self._unary(self.stub.GetMonitor, pb.GetMonitorRequest(name=_name(name))))

    def list_monitors(self) -> list[MonitorInfo]:
        resp = self._unary(self.stub.ListMonitors, pb.ListMonitorsRequest())
        return [MonitorInfo._from_pb(m) for m in resp.monitors]

    def delete_monitor(self, name: MonitorRef) -> None:
        self._unary(self.stub.DeleteMonitor, pb.DeleteMonitorRequest(name=_name(name)))

    # -- reference data and fitting

    def ingest_session(
        self, monitor: MonitorRef, *, timeout: Optional[float] = None, provenance: Optional[Provenance] = None
    ) -> IngestSession:
        """Opens a reference-ingest stream to ``send`` batches on; ``close()`` returns the summary.
        ``provenance`` is declared on every batch sent (see :meth:`ingest_reference`); a batch sent
        with ``labels=`` is labelled examples for the monitor's probes."""
        return IngestSession(self.stub, _name(monitor), self.max_batch_bytes, timeout=timeout, provenance=provenance)

    def ingest_reference(
        self,
        monitor: MonitorRef,
        batches: BatchesLike,
        *,
        timeout: Optional[float] = None,
        provenance: Optional[Provenance] = None,
        labels: Optional[Labels] = None,
    ) -> IngestSummary:
        """Appends trusted reference traces; returns once the server has made them durable.

        ``batches``: an iterable of ``(site, activations, trace_ids[, positions])`` (or :class:`Batch`),
        ``activations`` a 2-D numpy array or torch tensor sent in its own dtype (f32, f16, bf16).
        Large batches are split by rows. If reading or encoding a batch fails, the stream is
        cancelled and the error re-raised: nothing of this call should be kept.

        ``provenance``: what produced the activations, declared on every batch (the fields a batch
        declares itself, as ``Batch.provenance``, win). Each field of a site's provenance is fixed by
        the first reference batch that declares it; a batch declaring another value fails the call
        with FAILED_PRECONDITION (nothing of it is kept).

        ``labels``: the batches are labelled examples for the monitor's concept probes (see
        ``create_monitor(probes=)``), not reference traffic; applied to every batch: one bool for every
        row (True: the concept is present), one per row of each batch (each batch the same rows, e.g.
        one batch per site), or {trace id: bool}. One label per computation. A monitor without probes
        refuses labels (INVALID_ARGUMENT). They are counted in ``example_rows``, not ``total_rows``.
        """
        session = self.ingest_session(monitor, timeout=timeout)
        try:
            for item in as_batches(batches):
                session.send_batch(coerce_batch(item, provenance=provenance), labels=labels)
        except BaseException:
            session.cancel()
            raise
        return session.close()

    def fit(
        self,
        monitor: MonitorRef,
        *,
        on_progress: Optional[Callable[[FitPhase], object]] = None,
        timeout: Optional[float] = None,
        incremental: bool = False,
        ingests: Optional[Sequence[int]] = None,
        exclude_ingests: Optional[Sequence[int]] = None,
        committed_from_unix_ms: int = 0,
        committed_to_unix_ms: int = 0,
        reference_check: bool = True,
    ) -> FitReport:
        """Fits and calibrates the monitor; calls ``on_progress(FitPhase)`` as phases advance and
        returns the final report. With ``incremental=True`` only the reference data ingested since
        the last fit is folded into the saved fit state before recalibrating (the same monitor as a
        full fit, faster); without saved state it fits in full, and ``report.incremental`` says
        which one ran. Progress messages may be skipped when the caller reads slowly (the server
        never waits for them); the report always arrives.

        ``ingests``, ``exclude_ingests`` and ``committed_from_unix_ms``/``committed_to_unix_ms`` (0:
        unbounded) fit on part of the reference data only, by ingest id (``IngestSummary.ingest``,
        ``MonitorInfo.ingests``) or commit time; the selection holds for this fit only and
        ``report.ingests`` says which were used. ``reference_check=False`` skips the reference check
        (``report.reference_check``), which reads the reference data three more times."""
        report = None
        req = pb.FitRequest(
            monitor=_name(monitor),
            incremental=incremental,
            skip_reference_check=not reference_check,
        )
        if ingests is not None or exclude_ingests is not None or committed_from_unix_ms or committed_to_unix_ms:
            req.select.CopyFrom(
                pb.FitSelection(
                    ingests=list(ingests or []),
                    exclude_ingests=list(exclude_ingests or []),
                    committed_from_unix_ms=committed_from_unix_ms,
                    committed_to_unix_ms=committed_to_unix_ms,
                )
            )
        try:
            for ev in self.stub.Fit(req, timeout=timeout):
                kind = ev.WhichOneof("event")
                if kind == "phase" and on_progress is not None:
                    on_progress(FitPhase._from_pb(ev.phase))
                elif kind == "report":
                    report = FitReport._from_pb(ev.report)
        except grpc.RpcError as e:
            raise ActwatchError.from_rpc_error(e) from None
        if report is None:
            raise ActwatchError(grpc.StatusCode.UNKNOWN, "Fit stream ended without a report")
        return report

    # -- scoring

    def score(
        self,
        monitor: MonitorRef,
        batches: BatchesLike,
        *,
        complete: bool = True,
        provenance: Optional[Provenance] = None,
    ) -> ScoreResult:
        """Scores batches in one request: per-trace results, and with ``complete`` one result per
        computation (each computation's traces must all be in this call). For large or continuous
        volumes use :meth:`stream_scores`.

        ``provenance``: what produced the activations, declared on every batch (the fields a batch
        declares itself win). A batch conflicting with its site's recorded provenance fails the call
        with FAILED_PRECONDITION, or with ``provenance_policy="warn"`` is scored: the result's
        ``provenance_warnings`` name the sites, and a ProvenanceMismatchWarning is emitted per site."""
        name = _name(monitor)
        req = pb.ScoreRequest(
            monitor=name,
            batches=[coerce_batch(b, provenance=provenance) for b in as_batches(batches)],
            complete=complete,
        )
        result = ScoreResult._from_pb(self._unary(self.stub.Score, req))
        warn_provenance_conflicts(name, result.provenance_warnings, set(), stacklevel=2)
        return result

    def stream_scores(
        self,
        monitor: MonitorRef,
        *,
        timeout: Optional[float] = None,
        on_early_flag: Optional[EarlyFlagCallback] = None,
        provenance: Optional[Provenance] = None,
    ) -> ScoreStream:
        """Opens a streaming scoring session (see :class:`ScoreStream`). ``on_early_flag`` is called
        (from the stream's reading thread) with each computation flagged before it is complete
        (``partial=True``), as soon as it arrives; the same flags are in ``TraceResults.early_flags``.
        ``provenance`` is declared on every batch sent (see :meth:`score`; the stream emits each
        site's ProvenanceMismatchWarning once)."""
        return ScoreStream(
            self.stub,
            _name(monitor),
            self.max_batch_bytes,
            timeout=timeout,
            on_early_flag=on_early_flag,
            provenance=provenance,
        )

    def watch_flags(
        self,
        monitors: Union[MonitorRef, Iterable[MonitorRef]] = (),
        *,
        max_p_value: float = 0.0,
        ready_timeout: Optional[float] = 10.0,
    ) -> FlagWatch:
        """Streams flagged computations (:class:`FlagEvent`: a :class:`ComputationScore` with
        ``raised_by``, "anomaly" and/or the names of the probes that flagged it) of the given monitors
        (all when empty) with p-value <= ``max_p_value`` (the p-value of a question that raised it; 0:
        every flag), early flags of score streams included (``partial=True``; the final result
        follows). Waits up to ``ready_timeout`` seconds for the server to acknowledge the watch (None:
        don't wait), so flags raised after this returns are not missed."""
        names = [_name(monitors)] if isinstance(monitors, (str, MonitorInfo)) else [_name(m) for m in monitors]
        req = pb.WatchFlagsRequest(monitors=names, max_p_value=max_p_value)
        return FlagWatch(self.stub, req, ready_timeout=ready_timeout)

    def query_scores(
        self,
        monitor: MonitorRef,
        *,
        trace_ids: Union[TraceId, TraceIds] = (),
        since: Optional[Timestamp] = None,
        until: Optional[Timestamp] = None,
        flagged_only: bool = False,
        limit: int = 0,
        flagged_by: Optional[str] = None,
    ) -> list[ComputationScore]:
        """Recent computation results from the durable score log, most recent first. ``trace_ids``:
        one id or several (empty: all). ``since`` / ``until``: ms since the Unix epoch or datetimes
        (None: unbounded); ``limit`` 0: the server's default. ``flagged_only``: only computations
        flagged by some question (anomaly or a probe); ``flagged_by``: only those flagged by this one,
        "anomaly" or a probe's name (implies ``flagged_only``)."""
        if isinstance(trace_ids, (str, bytes, int)) or not isinstance(trace_ids, Iterable):
            trace_ids = [trace_ids]
        req = pb.QueryScoresRequest(
            monitor=_name(monitor),
            trace_ids=trace_id_strings(trace_ids),
            since_unix_ms=_unix_ms(since),
            until_unix_ms=_unix_ms(until),
            flagged_only=flagged_only or bool(flagged_by),
            limit=limit,
            flagged_by=flagged_by or "",
        )
        resp = self._unary(self.stub.QueryScores, req)
        return [ComputationScore._from_pb(c) for c in resp.results]
