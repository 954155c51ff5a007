"""What the server returns, as frozen dataclasses built from the proto messages.

Each result type mirrors one message of ``actwatch.v1`` field by field (same names) and is built by
keyword in its ``_from_pb``, so a field added to or reordered in the proto cannot be silently swapped
or dropped (tests/test_api.py checks every field of every message). Proto3 ``optional`` fields
that are unset become ``None``; unset message fields (``MonitorInfo.report``) too. The fields of
:class:`Provenance` are plain strings on the wire, "" meaning undeclared: here undeclared is ``None``.
One exception to the mirroring: :class:`FlagEvent` is its message's ``computation`` (a
:class:`ComputationScore`, whose fields it has) with ``raised_by`` added.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Optional, Union

import numpy as np
import numpy.typing as npt

from ._proto.actwatch.v1 import actwatch_pb2 as pb

__all__ = [
    "ComputationScore",
    "DetectorScore",
    "FitPhase",
    "FitReport",
    "FlagEvent",
    "IngestCheck",
    "IngestInfo",
    "IngestSummary",
    "JointFit",
    "KnnRecall",
    "LengthStratum",
    "MonitorInfo",
    "MonitorRef",
    "MonitorSpec",
    "ProbeFit",
    "ProbeScore",
    "ProbeSiteFit",
    "Provenance",
    "ProvenanceConflict",
    "ReferenceCheck",
    "ScoreResult",
    "SiteInfo",
    "SlotPValue",
    "Table",
    "TraceResults",
    "TraceScore",
]

#: Named numpy columns, one entry per row (see ``ScoreResult.traces_table``).
Table = dict[str, npt.NDArray[np.generic]]


#: The fields of a provenance, in proto order.
PROVENANCE_FIELDS = ("model", "revision", "capture", "pooling", "dtype")


@dataclass(frozen=True)
class Provenance:
    """What produced a batch of vectors (``actwatch.v1.Provenance``); each field None: undeclared.

    ``model`` (e.g. "sentence-transformers/all-MiniLM-L6-v2"), ``revision`` (a commit hash, a version,
    a checksum of the weights), ``capture`` (the capture path, e.g. "actwatch capture" or
    "actwatch_client.hooks:encoder.layer.1:output"), ``pooling`` ("none", "mean", ...), ``dtype`` (the
    dtype the model computed in, e.g. "float32"; not the wire dtype). A monitor records, per site,
    what its reference batches declared (each field fixed by the first batch that declares it; a later
    reference batch declaring another value is refused) and compares every scored batch with it: a
    batch conflicts when both declare a field with different values. The server refuses values over
    256 bytes or with control characters (INVALID_ARGUMENT). "" is the same as None (undeclared).
    """

    model: Optional[str] = None
    revision: Optional[str] = None
    capture: Optional[str] = None
    pooling: Optional[str] = None
    dtype: Optional[str] = None

    def __post_init__(self) -> None:
        for name in PROVENANCE_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"Provenance.{name} must be a string or None, got {type(value).__name__}")
            if value == "":
                object.__setattr__(self, name, None)  # "" declares nothing, as on the wire

    @classmethod
    def _from_pb(cls, p: pb.Provenance) -> Provenance:
        return cls(
            model=p.model or None,
            revision=p.revision or None,
            capture=p.capture or None,
            pooling=p.pooling or None,
            dtype=p.dtype or None,
        )

    def _to_pb(self) -> pb.Provenance:
        return pb.Provenance(
            model=self.model or "",
            revision=self.revision or "",
            capture=self.capture or "",
            pooling=self.pooling or "",
            dtype=self.dtype or "",
        )

    def declared(self) -> dict[str, str]:
        """The declared fields: {field: value}, in proto order."""
        return {name: v for name in PROVENANCE_FIELDS if (v := getattr(self, name)) is not None}


def merge_provenance(base: Optional[Provenance], override: Optional[Provenance]) -> Optional[Provenance]:
    """``base`` with the fields ``override`` declares replaced (either may be None; None if both are)."""
    if override is None:
        return base
    if base is None:
        return override
    return Provenance(**{**base.declared(), **override.declared()})


@dataclass(frozen=True)
class ProvenanceConflict:
    """A batch scored despite conflicting provenance (``actwatch.v1.ProvenanceWarning``, monitors with
    ``provenance_policy="warn"``): at ``site``, the first conflicting ``field`` ("model", "revision",
    "capture", "pooling" or "dtype"), the batch's value (``declared``) and the one the monitor's
    reference batches declared (``recorded``)."""

    site: str
    field: str
    declared: str
    recorded: str

    @classmethod
    def _from_pb(cls, w: pb.ProvenanceWarning) -> ProvenanceConflict:
        return cls(site=w.site, field=w.field, declared=w.declared, recorded=w.recorded)


@dataclass(frozen=True)
class MonitorSpec:
    """A monitor's options as stored (0 / empty: the server's default was used)."""

    detectors: list[str] = field(default_factory=list)
    fusion: str = ""
    fpr: float = 0.0
    calibration_fraction: float = 0.0
    seed: int = 0
    #: How a computation's traces at one (site, detector) aggregate before fusion: "max", "mean",
    #: "ema:ALPHA", "max_rolling_mean:WINDOW" (the default: "max_rolling_mean:8") or "topk_mean:K".
    aggregation: str = ""
    #: Detectors on the joint vector of a computation (its per-site vectors, L2-normalised and
    #: concatenated in site order): a detector list as for ``detectors``, or "none".
    joint: str = ""
    #: Length strata of the computation-level calibration (at most this many quantile groups of
    #: the calibration computations' token counts, each calibrated on its own); 1: none.
    length_strata: int = 0
    #: What scoring does with a batch whose declared provenance conflicts with its site's recorded
    #: one: "refuse" (the default; FAILED_PRECONDITION) or "warn" (scored, with
    #: ``provenance_warnings`` on the result).
    provenance_policy: str = ""
    #: Concept probes fitted from labelled examples, each ``NAME[:key=value,...]`` (e.g.
    #: "harmful_request", "harm:kind=logistic,defer_fpr=0.05"); empty: none.
    probes: list[str] = field(default_factory=list)

    @classmethod
    def _from_pb(cls, m: pb.MonitorSpec) -> MonitorSpec:
        return cls(
            detectors=list(m.detectors),
            fusion=m.fusion,
            fpr=m.fpr,
            calibration_fraction=m.calibration_fraction,
            seed=m.seed,
            aggregation=m.aggregation,
            joint=m.joint,
            length_strata=m.length_strata,
            provenance_policy=m.provenance_policy,
            probes=list(m.probes),
        )


@dataclass(frozen=True)
class SiteInfo:
    name: str
    width: int
    reference_rows: int
    #: What the site's reference batches declared (each field fixed by the first batch that declared
    #: it); all fields None when none declared anything.
    provenance: Provenance = field(default_factory=Provenance)

    @classmethod
    def _from_pb(cls, s: pb.SiteInfo) -> SiteInfo:
        return cls(
            name=s.name,
            width=s.width,
            reference_rows=s.reference_rows,
            provenance=Provenance._from_pb(s.provenance),
        )


@dataclass(frozen=True)
class KnnRecall:
    site: str
    detector: str
    queries: int
    k: int
    recall: float

    @classmethod
    def _from_pb(cls, k: pb.KnnRecall) -> KnnRecall:
        return cls(site=k.site, detector=k.detector, queries=k.queries, k=k.k, recall=k.recall)


@dataclass(frozen=True)
class JointFit:
    """What fitting the joint detector saw (``FitReport.joint``)."""

    #: The sites concatenated, in order, and the joint width (the sum of ``site_widths``).
    sites: list[str]
    width: int
    #: Each site's part of the joint vector: its width, or, when the sites' widths add up to more
    #: than 4096, its number of whitened principal coordinates under the site's own Gaussian.
    site_widths: list[int]
    #: Joint vectors (one per computation and position with a trace at every site) of the fit part
    #: and of the calibration part.
    fit_rows: int
    calibration_rows: int
    #: Positions of reference computations left out because some site had no trace there.
    incomplete: int
    #: Non-empty when the spec asks for a joint detector but none was fitted: why.
    skipped: str

    @classmethod
    def _from_pb(cls, j: pb.JointFit) -> JointFit:
        return cls(
            sites=list(j.sites),
            width=j.width,
            site_widths=list(j.site_widths),
            fit_rows=j.fit_rows,
            calibration_rows=j.calibration_rows,
            incomplete=j.incomplete,
            skipped=j.skipped,
        )


@dataclass(frozen=True)
class LengthStratum:
    """One length stratum of the computation-level calibration (``FitReport.length_strata``)."""

    #: The longest computation (most traces at one site) in it; None for the last stratum.
    max_length: Optional[int]
    #: Calibration computations in it.
    computations: int
    #: Fused statistic at or above which its computations are flagged (None: too few to flag).
    threshold: Optional[float]

    @classmethod
    def _from_pb(cls, s: pb.LengthStratum) -> LengthStratum:
        return cls(
            max_length=s.max_length if s.HasField("max_length") else None,
            computations=s.computations,
            threshold=s.threshold if s.HasField("threshold") else None,
        )


@dataclass(frozen=True)
class ProbeSiteFit:
    """What fitting one concept probe saw at one site (``ProbeFit.sites``)."""

    site: str
    #: Computations it was fitted on: labelled positives and negatives, and reference computations
    #: used as negatives (``reference_negatives``).
    positive: int
    negative: int
    reference: int
    #: Logistic probes: the inverse L2 strength used (cross-validated unless given); None otherwise.
    c: Optional[float]

    @classmethod
    def _from_pb(cls, s: pb.ProbeSiteFit) -> ProbeSiteFit:
        return cls(
            site=s.site,
            positive=s.positive,
            negative=s.negative,
            reference=s.reference,
            c=s.c if s.HasField("c") else None,
        )


@dataclass(frozen=True)
class ProbeFit:
    """What fitting one concept probe found (``FitReport.probes``, in ``MonitorSpec.probes`` order).

    Its p-values are calibrated among benign computations: the calibration part of the reference
    traffic (``calibration_reference``) and of the labelled negatives (``calibration_negatives``).
    ``calibration_fpr``: the share of them flagged (each judged against the others); ``negatives_fpr``:
    that share among the labelled negatives (None without any). ``recall``: the share of the held-out
    labelled positives (``heldout_positives``) flagged at the monitor's target rate (None without
    any). With a deferral band (``defer_fpr``): ``deferred_benign`` / ``deferred_positives``, the shares
    of benign calibration computations and of held-out positives deferred (else None).
    """

    name: str
    #: "diff_means" or "logistic".
    kind: str
    sites: list[ProbeSiteFit]
    calibration_reference: int
    calibration_negatives: int
    calibration_fpr: float
    negatives_fpr: Optional[float]
    heldout_positives: int
    recall: Optional[float]
    deferred_benign: Optional[float]
    deferred_positives: Optional[float]

    @classmethod
    def _from_pb(cls, p: pb.ProbeFit) -> ProbeFit:
        return cls(
            name=p.name,
            kind=p.kind,
            sites=[ProbeSiteFit._from_pb(s) for s in p.sites],
            calibration_reference=p.calibration_reference,
            calibration_negatives=p.calibration_negatives,
            calibration_fpr=p.calibration_fpr,
            negatives_fpr=p.negatives_fpr if p.HasField("negatives_fpr") else None,
            heldout_positives=p.heldout_positives,
            recall=p.recall if p.HasField("recall") else None,
            deferred_benign=p.deferred_benign if p.HasField("deferred_benign") else None,
            deferred_positives=p.deferred_positives if p.HasField("deferred_positives") else None,
        )


@dataclass(frozen=True)
class IngestCheck:
    """One ingest (or block of consecutive ingests, beyond 32) in the reference check: the share of its
    rows that are outliers, at level ``ReferenceCheck.alpha``, of a model fitted on the other ingests
    only (``flagged_share``, at ``site``, its worst site), the p-value of that share (binomial over its
    computations, Bonferroni-adjusted; None when no site could be checked) and whether it is
    ``suspect`` (p < 0.001 and a share of at least 5 alpha): look at it before trusting the fit."""

    first_ingest: int
    last_ingest: int
    principals: list[str]
    rows: int
    computations: int
    site: str
    flagged_share: float
    p_value: Optional[float]
    suspect: bool

    @classmethod
    def _from_pb(cls, c: pb.IngestCheck) -> IngestCheck:
        return cls(
            first_ingest=c.first_ingest,
            last_ingest=c.last_ingest,
            principals=list(c.principals),
            rows=c.rows,
            computations=c.computations,
            site=c.site,
            flagged_share=c.flagged_share,
            p_value=c.p_value if c.HasField("p_value") else None,
            suspect=c.suspect,
        )


@dataclass(frozen=True)
class ReferenceCheck:
    """Whether each ingest of the reference data looks unlike the others (``FitReport.reference_check``);
    ``skipped`` says why it did not run, when it did not."""

    skipped: str
    alpha: float
    ingests: list[IngestCheck]
    seconds: float

    @classmethod
    def _from_pb(cls, r: pb.ReferenceCheck) -> ReferenceCheck:
        return cls(
            skipped=r.skipped,
            alpha=r.alpha,
            ingests=[IngestCheck._from_pb(i) for i in r.ingests],
            seconds=r.seconds,
        )

    @property
    def suspects(self) -> list[IngestCheck]:
        """The suspect ingests."""
        return [i for i in self.ingests if i.suspect]


@dataclass(frozen=True)
class IngestInfo:
    """One committed ingest of a monitor (``MonitorInfo.ingests``): its id (what ``Client.fit(select=...)``
    and the reference check name it by), rows, commit time (Unix ms; 0 when not recorded) and the
    token principal that sent it (empty without tokens)."""

    id: int
    rows: int
    example_rows: int
    committed_unix_ms: int
    principal: str

    @classmethod
    def _from_pb(cls, i: pb.IngestInfo) -> IngestInfo:
        return cls(
            id=i.id,
            rows=i.rows,
            example_rows=i.example_rows,
            committed_unix_ms=i.committed_unix_ms,
            principal=i.principal,
        )


@dataclass(frozen=True)
class FitReport:
    fit_version: int
    reference_rows: int
    calibration_computations: int
    calibration_fpr: float
    fit_seconds: float
    calibration_seconds: float
    knn_recall: list[KnnRecall] = field(default_factory=list)
    #: Whether this fit was an incremental update (only new reference data folded in).
    incremental: bool = False
    #: Reference rows read by the fit pass (all of them for a full fit).
    rows_folded: int = 0
    #: The joint detector of this fit; None when the spec asks for none (``joint="none"``).
    joint: Optional[JointFit] = None
    #: The length strata of the computation-level calibration, shortest first.
    length_strata: list[LengthStratum] = field(default_factory=list)
    #: The concept probes of this fit, in ``MonitorSpec.probes`` order.
    probes: list[ProbeFit] = field(default_factory=list)
    #: The ingests this fit used, in commit order.
    ingests: list[int] = field(default_factory=list)
    #: Whether each ingest looks unlike the others; None when skipped (``skip_reference_check``).
    reference_check: Optional[ReferenceCheck] = None

    @classmethod
    def _from_pb(cls, r: pb.FitReport) -> FitReport:
        return cls(
            fit_version=r.fit_version,
            reference_rows=r.reference_rows,
            calibration_computations=r.calibration_computations,
            calibration_fpr=r.calibration_fpr,
            fit_seconds=r.fit_seconds,
            calibration_seconds=r.calibration_seconds,
            knn_recall=[KnnRecall._from_pb(k) for k in r.knn_recall],
            incremental=r.incremental,
            rows_folded=r.rows_folded,
            joint=JointFit._from_pb(r.joint) if r.HasField("joint") else None,
            length_strata=[LengthStratum._from_pb(s) for s in r.length_strata],
            probes=[ProbeFit._from_pb(p) for p in r.probes],
            ingests=list(r.ingests),
            reference_check=ReferenceCheck._from_pb(r.reference_check) if r.HasField("reference_check") else None,
        )

    def probe(self, name: str) -> Optional[ProbeFit]:
        """The fit of the probe called ``name`` (None: no such probe)."""
        return next((p for p in self.probes if p.name == name), None)


@dataclass(frozen=True)
class FitPhase:
    """Progress of a fit: ``name`` is "fit", "calibrate", then "calibrate_joint" when the monitor has a
    joint detector; a monitor with probes also has "examples" (fitting them on the labelled examples)
    after "fit", and "calibrate_examples" after the calibration; "check" (the reference check) is
    last unless skipped."""

    name: str
    rows_done: int
    rows_total: int

    @classmethod
    def _from_pb(cls, p: pb.Phase) -> FitPhase:
        return cls(name=p.name, rows_done=p.rows_done, rows_total=p.rows_total)


@dataclass(frozen=True)
class MonitorInfo:
    name: str
    spec: MonitorSpec
    sites: list[SiteInfo]
    reference_rows: int
    fitted: bool
    fit_version: int
    report: Optional[FitReport]
    #: Empty for a healthy monitor; otherwise why the server could not load it at start (it is not
    #: served and its other fields are unset; ``Client.delete_monitor`` removes it).
    damaged: str
    #: Labelled example rows stored for the monitor's probes, over all sites (not in
    #: ``reference_rows``).
    example_rows: int = 0
    #: Its committed ingests, oldest first.
    ingests: list[IngestInfo] = field(default_factory=list)

    @classmethod
    def _from_pb(cls, m: pb.MonitorInfo) -> MonitorInfo:
        return cls(
            name=m.name,
            spec=MonitorSpec._from_pb(m.spec),
            sites=[SiteInfo._from_pb(s) for s in m.sites],
            reference_rows=m.reference_rows,
            fitted=m.fitted,
            fit_version=m.fit_version,
            report=FitReport._from_pb(m.report) if m.HasField("report") else None,
            damaged=m.damaged,
            example_rows=m.example_rows,
            ingests=[IngestInfo._from_pb(i) for i in m.ingests],
        )

    def site(self, name: str) -> Optional[SiteInfo]:
        return next((s for s in self.sites if s.name == name), None)


#: A monitor, by name or as returned by the server.
MonitorRef = Union[str, MonitorInfo]


@dataclass(frozen=True)
class IngestSummary:
    """``rows`` (all rows sent, labelled examples included), ``bytes``, ``batches``; ``total_rows``: the
    monitor's reference rows after this ingest. ``example_rows``: of ``rows``, the labelled examples;
    ``total_example_rows``: the monitor's labelled rows after this ingest (not in ``total_rows``).
    ``ingest``: this ingest's id (``MonitorInfo.ingests``, ``Client.fit(select=...)``)."""

    rows: int
    bytes: int
    batches: int
    total_rows: int
    example_rows: int = 0
    total_example_rows: int = 0
    ingest: int = 0

    @classmethod
    def _from_pb(cls, s: pb.IngestReferenceSummary) -> IngestSummary:
        return cls(
            rows=s.rows,
            bytes=s.bytes,
            batches=s.batches,
            total_rows=s.total_rows,
            example_rows=s.example_rows,
            total_example_rows=s.total_example_rows,
            ingest=s.ingest,
        )


@dataclass(frozen=True)
class DetectorScore:
    detector: str
    raw: float
    p_value: float

    @classmethod
    def _from_pb(cls, d: pb.DetectorScore) -> DetectorScore:
        return cls(detector=d.detector, raw=d.raw, p_value=d.p_value)


@dataclass(frozen=True)
class TraceScore:
    """One trace (one row of one batch): fused over the site's detectors, calibrated per site."""

    trace_id: str
    site: str
    position: Optional[int]
    score: float
    p_value: float
    flagged: bool
    detectors: list[DetectorScore]

    @classmethod
    def _from_pb(cls, t: pb.TraceScore) -> TraceScore:
        return cls(
            trace_id=t.trace_id,
            site=t.site,
            position=t.position if t.HasField("position") else None,
            score=t.score,
            p_value=t.p_value,
            flagged=t.flagged,
            detectors=[DetectorScore._from_pb(d) for d in t.detectors],
        )


@dataclass(frozen=True)
class SlotPValue:
    site: str
    detector: str
    p_value: Optional[float]

    @classmethod
    def _from_pb(cls, s: pb.SlotPValue) -> SlotPValue:
        return cls(site=s.site, detector=s.detector, p_value=s.p_value if s.HasField("p_value") else None)


@dataclass(frozen=True)
class ProbeScore:
    """A computation's answer to one concept probe (``ComputationScore.probes``).

    ``score``: the fused statistic, higher = more of the concept; ``p_value``: conformal, among the
    probe's benign calibration computations; ``flagged``: ``p_value`` at or below the monitor's target
    rate; ``verdict``: "flag", "defer" (not flagged, but ``p_value`` at or below the probe's
    ``defer_fpr``: the cascade's uncertain band) or "pass"; ``flagged_at``: as
    ``ComputationScore.flagged_at``, for this probe.
    """

    name: str
    score: float
    p_value: float
    flagged: bool
    verdict: str
    flagged_at: Optional[int]

    @classmethod
    def _from_pb(cls, p: pb.ProbeScore) -> ProbeScore:
        return cls(
            name=p.name,
            score=p.score,
            p_value=p.p_value,
            flagged=p.flagged,
            verdict=p.verdict,
            flagged_at=p.flagged_at if p.HasField("flagged_at") else None,
        )


@dataclass(frozen=True)
class ComputationScore:
    """One computation (all traces sharing a trace id), calibrated among calibration computations.

    ``partial``: an early flag, the running result of a computation not yet complete (in
    ``TraceResults.early_flags`` and from ``watch_flags``; never in the score log); its final result
    follows at completion, flagged too, with the same ``flagged_at``. ``flagged_at``: the position
    of the trace whose running statistic first reached the threshold (without positions, its 0-based
    index among the computation's traces at its site); None unless the monitor flags early
    (aggregation max, ema or max_rolling_mean with minp or fisher fusion) and flagged it.
    ``score`` / ``p_value`` / ``flagged`` answer the anomaly question; ``probes``, one
    :class:`ProbeScore` per concept probe of the monitor (``MonitorSpec.probes`` order), answer the
    probes' (``probe(name)`` finds one).
    """

    monitor: str
    trace_id: str
    score: float
    p_value: float
    flagged: bool
    traces: int
    slots: list[SlotPValue]
    scored_at_unix_ms: int
    fit_version: int
    partial: bool = False
    flagged_at: Optional[int] = None
    probes: list[ProbeScore] = field(default_factory=list)

    @classmethod
    def _from_pb(cls, c: pb.ComputationScore) -> ComputationScore:
        return cls(
            monitor=c.monitor,
            trace_id=c.trace_id,
            score=c.score,
            p_value=c.p_value,
            flagged=c.flagged,
            traces=c.traces,
            slots=[SlotPValue._from_pb(s) for s in c.slots],
            scored_at_unix_ms=c.scored_at_unix_ms,
            fit_version=c.fit_version,
            partial=c.partial,
            flagged_at=c.flagged_at if c.HasField("flagged_at") else None,
            probes=[ProbeScore._from_pb(p) for p in c.probes],
        )

    def probe(self, name: str) -> Optional[ProbeScore]:
        """This computation's answer to the probe called ``name`` (None: no such probe)."""
        return next((p for p in self.probes if p.name == name), None)

    @property
    def p_values(self) -> dict[tuple[str, str], Optional[float]]:
        """{(site, detector): p-value of the computation's most anomalous trace there}."""
        return {(s.site, s.detector): s.p_value for s in self.slots}

    @property
    def scored_at(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.scored_at_unix_ms / 1000, tz=_dt.timezone.utc)


@dataclass(frozen=True)
class FlagEvent(ComputationScore):
    """A flagged computation, as ``Client.watch_flags`` yields it: the :class:`ComputationScore`
    (``actwatch.v1.FlagEvent.computation``, its fields flattened into this one) and ``raised_by``,
    the questions that flagged it: "anomaly" (``flagged``) and/or the names of the probes that
    flagged it. A computation flagged only by a probe has ``flagged`` False."""

    raised_by: list[str] = field(default_factory=list)

    @classmethod
    def _from_pb(cls, e: pb.FlagEvent) -> FlagEvent:  # type: ignore[override]
        c = ComputationScore._from_pb(e.computation)
        return cls(**{f.name: getattr(c, f.name) for f in fields(ComputationScore)}, raised_by=list(e.raised_by))


def _traces_table(traces: Sequence[TraceScore]) -> Table:
    detectors = sorted({d.detector for t in traces for d in t.detectors})
    out: Table = {
        "trace_id": np.array([t.trace_id for t in traces], dtype=object),
        "site": np.array([t.site for t in traces], dtype=object),
        "position": np.array([-1 if t.position is None else t.position for t in traces], dtype=np.int64),
        "score": np.array([t.score for t in traces], dtype=np.float64),
        "p_value": np.array([t.p_value for t in traces], dtype=np.float64),
        "flagged": np.array([t.flagged for t in traces], dtype=bool),
    }
    for name in detectors:
        by = [{d.detector: d for d in t.detectors}.get(name) for t in traces]
        out[f"raw_{name}"] = np.array([np.nan if d is None else d.raw for d in by], dtype=np.float64)
        out[f"p_{name}"] = np.array([np.nan if d is None else d.p_value for d in by], dtype=np.float64)
    return out


def _computations_table(comps: Sequence[ComputationScore]) -> Table:
    slots: list[tuple[str, str]] = sorted({(s.site, s.detector) for c in comps for s in c.slots})
    out: Table = {
        "trace_id": np.array([c.trace_id for c in comps], dtype=object),
        "score": np.array([c.score for c in comps], dtype=np.float64),
        "p_value": np.array([c.p_value for c in comps], dtype=np.float64),
        "flagged": np.array([c.flagged for c in comps], dtype=bool),
        "traces": np.array([c.traces for c in comps], dtype=np.int64),
        "scored_at_unix_ms": np.array([c.scored_at_unix_ms for c in comps], dtype=np.int64),
        "flagged_at": np.array([-1 if c.flagged_at is None else c.flagged_at for c in comps], dtype=np.int64),
    }
    for site, det in slots:
        vals = [c.p_values.get((site, det)) for c in comps]
        out[f"p_{site}_{det}"] = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
    for name in dict.fromkeys(p.name for c in comps for p in c.probes):
        answers = [c.probe(name) for c in comps]
        out[f"probe_{name}_p_value"] = np.array([np.nan if a is None else a.p_value for a in answers], dtype=np.float64)
        out[f"probe_{name}_verdict"] = np.array(["" if a is None else a.verdict for a in answers], dtype=object)
    return out


@dataclass(frozen=True)
class ScoreResult:
    """Per-trace results (in request order) and, with ``complete``, one result per computation.
    ``provenance_warnings``: the sites whose batches were scored despite conflicting provenance
    (monitors with ``provenance_policy="warn"``), one per site."""

    traces: list[TraceScore]
    computations: list[ComputationScore]
    provenance_warnings: list[ProvenanceConflict] = field(default_factory=list)

    @classmethod
    def _from_pb(cls, r: pb.ScoreResponse) -> ScoreResult:
        return cls(
            traces=[TraceScore._from_pb(t) for t in r.traces],
            computations=[ComputationScore._from_pb(c) for c in r.computations],
            provenance_warnings=[ProvenanceConflict._from_pb(w) for w in r.provenance_warnings],
        )

    def traces_table(self) -> Table:
        """Columns as numpy arrays: trace_id, site, position (-1: none), score, p_value, flagged,
        raw_<detector>, p_<detector>."""
        return _traces_table(self.traces)

    def computations_table(self) -> Table:
        """Columns as numpy arrays: trace_id, score, p_value, flagged, traces, scored_at_unix_ms,
        flagged_at (-1: none), p_<site>_<detector> (NaN where the computation had no trace at the
        site; site "joint" for the joint detector's slots), and per probe probe_<name>_p_value and
        probe_<name>_verdict ("flag", "defer" or "pass")."""
        return _computations_table(self.computations)

    def computation(self, trace_id: str) -> Optional[ComputationScore]:
        return next((c for c in self.computations if c.trace_id == trace_id), None)


@dataclass(frozen=True)
class TraceResults:
    """Per-trace results of one batch sent on a :class:`ScoreStream`, and the computations this batch
    made cross the threshold before they are complete (``early_flags``: each computation once,
    ``partial`` set; its final result arrives at completion). ``provenance_warnings``: this batch
    was scored despite conflicting provenance (monitors with ``provenance_policy="warn"``)."""

    traces: list[TraceScore]
    early_flags: list[ComputationScore] = field(default_factory=list)
    provenance_warnings: list[ProvenanceConflict] = field(default_factory=list)

    @classmethod
    def _from_pb(cls, r: pb.TraceScores) -> TraceResults:
        return cls(
            traces=[TraceScore._from_pb(t) for t in r.traces],
            early_flags=[ComputationScore._from_pb(c) for c in r.early_flags],
            provenance_warnings=[ProvenanceConflict._from_pb(w) for w in r.provenance_warnings],
        )

    def table(self) -> Table:
        return _traces_table(self.traces)
