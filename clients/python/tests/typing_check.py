"""Type-checked usage of the public API (mypy --strict, from scripts/check.sh); never run by pytest.

The package ships py.typed, so its annotations are a promise: the calls below are how the README and
the tests use the client, and must type-check as written. The lines marked ``type: ignore[...]`` are
misuse that must stay a type error (mypy reports an ignore that is no longer needed).
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import grpc
import numpy as np
import numpy.typing as npt

from actwatch_client import (
    ActwatchError,
    Batch,
    Client,
    ComputationScore,
    FitPhase,
    FitReport,
    FlagEvent,
    IngestSummary,
    InsecureTokenWarning,
    JointFit,
    MonitorInfo,
    ProbeFit,
    ProbeScore,
    Provenance,
    ProvenanceConflict,
    ProvenanceMismatchWarning,
    ScoreResult,
    TraceResults,
    to_tensor,
    to_trace_batch,
)
from actwatch_client.types import BatchDict, BatchTuple


def batches(acts: npt.NDArray[np.float32], ids: list[str]) -> Iterator[tuple[str, npt.NDArray[np.float32], list[str]]]:
    for layer in (2, 4, 6):
        yield str(layer), acts, ids


def usage(client: Client, acts: npt.NDArray[np.float32], ids: list[str], id_array: npt.NDArray[np.object_]) -> None:
    info: MonitorInfo = client.create_monitor("m", fpr=0.01)
    client.create_monitor("m2", detectors=["gaussian"], fusion="fisher", calibration_fraction=0.3, seed=3)
    client.create_monitor("m3", detectors="knn")
    client.create_monitor("m4", aggregation="max_rolling_mean:4", joint="none")
    client.create_monitor("m5", aggregation=None, joint=["gaussian", "knn:k=5"])
    print(info.spec.aggregation, info.spec.joint)
    client.get_monitor(info)
    client.wait_ready(timeout=5)

    summary: IngestSummary = client.ingest_reference("m", batches(acts, ids))
    client.ingest_reference("m", ("2", acts.astype(np.float16), ids))  # one batch tuple
    client.ingest_reference("m", [Batch("2", acts, id_array), ("4", [[0.0, 1.0]], [1], [0])], timeout=30)
    as_dict: BatchDict = {"site": 6, "activations": acts, "trace_ids": np.arange(3)}
    client.ingest_reference("m", [as_dict, to_trace_batch("2", acts, ids)])
    print(summary.rows)

    phases: list[FitPhase] = []
    report: FitReport = client.fit("m", on_progress=phases.append, timeout=900)
    client.fit("m", on_progress=print, incremental=True)
    print(report.knn_recall[0].recall)
    joint: Optional[JointFit] = report.joint
    if joint is not None:
        print(joint.sites, joint.width, joint.fit_rows + joint.calibration_rows, joint.skipped)

    result: ScoreResult = client.score("m", batches(acts, ids), complete=False)
    table = result.computations_table()
    print(table["p_value"].mean(), result.traces[0].detectors[0].p_value)
    one: BatchTuple = ("2", acts, ids, None)
    client.score(info, [one])

    early: list[ComputationScore] = []
    with client.stream_scores("m", timeout=60, on_early_flag=early.append) as stream:
        stream.send("2", acts, ids, positions=np.arange(len(ids)))
        stream.send(4, acts.tolist(), id_array)
        stream.complete(ids)
        item = stream.get(timeout=1)
        if isinstance(item, TraceResults):
            print(item.table()["score"])
            for flag in item.early_flags:
                at: Optional[int] = flag.flagged_at
                print(flag.partial, at)
        comps: list[ComputationScore] = stream.computations(n=3, timeout=30)
        print(comps[0].p_values, comps[0].scored_at)

    with client.watch_flags(["m"], max_p_value=0.001, ready_timeout=None) as watch:
        for flagged in watch:
            if not flagged.partial:
                print(flagged.trace_id)
    client.watch_flags(info)
    client.watch_flags()

    since = dt.datetime.now() - dt.timedelta(hours=1)
    logged = client.query_scores("m", trace_ids=["a", "b"], since=since, until=1_700_000_000_000, limit=5)
    client.query_scores("m", trace_ids="a", flagged_only=True)
    print(logged[0].slots[0].p_value)
    print(to_tensor(acts).shape)

    prov = Provenance(model="org/model", revision="abc", capture="mine", pooling="mean", dtype="float32")
    client.create_monitor("m6", provenance_policy="warn")
    client.ingest_reference("m", batches(acts, ids), provenance=prov, timeout=30)
    client.ingest_reference("m", [Batch("2", acts, ids, provenance=prov), ("4", acts, ids, None, prov)])
    with_prov: BatchDict = {"site": 6, "activations": acts, "trace_ids": ids, "provenance": None}
    client.ingest_reference("m", [with_prov, to_trace_batch("2", acts, ids, provenance=prov)])
    with client.ingest_session("m", provenance=prov) as session:
        session.send("2", acts, ids, provenance=Provenance(dtype="bfloat16"))
    recorded: Optional[str] = client.get_monitor("m").sites[0].provenance.model
    print(recorded, client.get_monitor("m").spec.provenance_policy, prov.declared())
    warnings.simplefilter("error", ProvenanceMismatchWarning)
    conflicts: list[ProvenanceConflict] = client.score("m", batches(acts, ids), provenance=prov).provenance_warnings
    print([(c.site, c.field, c.declared, c.recorded) for c in conflicts])
    with client.stream_scores("m", provenance=prov) as pstream:
        pstream.send("2", acts, ids, provenance=Provenance(pooling="none"))
        got = pstream.get(timeout=1)
        if isinstance(got, TraceResults):
            print(got.provenance_warnings)

    # Concept probes: labelled examples, the fit's probes, per-computation answers, flags by question.
    client.create_monitor("p", probes=["harm", "harm_lr:kind=logistic,defer_fpr=0.05"])
    client.create_monitor("p2", probes="harm")
    print(client.get_monitor("p").spec.probes, client.get_monitor("p").example_rows)
    labelled: IngestSummary = client.ingest_reference("p", batches(acts, ids), labels=True)
    client.ingest_reference("p", batches(acts, ids), labels=[i % 2 == 0 for i in range(len(ids))])
    client.ingest_reference("p", batches(acts, ids), labels={t: True for t in ids})
    with client.ingest_session("p") as lsession:
        lsession.send("2", acts, ids, labels=np.ones(len(ids), dtype=bool))
        lsession.send_batch(to_trace_batch("4", acts, ids), labels=False)
    print(labelled.example_rows, labelled.total_example_rows)
    fitted: Optional[ProbeFit] = client.fit("p").probe("harm")
    if fitted is not None:
        recall: Optional[float] = fitted.recall
        print(fitted.kind, fitted.sites[0].c, fitted.heldout_positives, recall)
    for comp in client.score("p", batches(acts, ids)).computations:
        answer: Optional[ProbeScore] = comp.probe("harm")
        print([(p.name, p.p_value, p.flagged, p.verdict, p.flagged_at) for p in comp.probes], answer)
    with client.watch_flags("p") as pwatch:
        for event in pwatch:
            ev: FlagEvent = event
            also: ComputationScore = event
            print(ev.raised_by, also.trace_id, "anomaly" in ev.raised_by)
    print(client.query_scores("p", flagged_only=True, flagged_by="harm", limit=10))

    try:
        client.delete_monitor("m")
    except ActwatchError as e:
        print(e.code.name, e.message)


def connect(ca: Path, token: str) -> list[Client]:
    """TLS and tokens: PEM as bytes or paths (str, os.PathLike), a given channel with a token."""
    warnings.simplefilter("error", InsecureTokenWarning)
    return [
        Client("127.0.0.1:50051", token=token),
        Client("actwatch.internal:50051", token=token, root_certificates=ca),
        Client("actwatch.internal:50051", token=token, root_certificates=str(ca), timeout=5.0),
        Client(
            "10.0.0.7:50051",
            token=token,
            root_certificates=ca.read_bytes(),
            client_certificate="client.pem",
            client_key=Path("client.key"),
            server_name="actwatch.internal",
        ),
        Client("actwatch.example.com:443", tls=True, token=token),
        Client(channel=grpc.insecure_channel("127.0.0.1:50051"), token=token),
    ]


def misuse(client: Client, acts: npt.NDArray[np.float32]) -> None:
    client.create_monitor("m", None, None, 0.01)  # type: ignore[call-arg]
    client.fit("m", print)  # type: ignore[call-arg]
    client.score("m", [("2", acts, ["a"])], False)  # type: ignore[call-arg]
    client.wait_ready(5)  # type: ignore[call-arg]
    client.query_scores("m", ["a"])  # type: ignore[call-arg]
    client.score("m", [("2", acts)])  # type: ignore[list-item]
    client.score("m", [("2", object(), ["a"])])  # type: ignore[list-item]
    client.create_monitor("m", fpr="0.01")  # type: ignore[arg-type]
    client.create_monitor("m", aggregation=["max"])  # type: ignore[arg-type]
    client.stream_scores("m", on_early_flag=1)  # type: ignore[arg-type]
    client.score("m", [("2", acts, ["a"])], provenance="org/model")  # type: ignore[arg-type]
    client.create_monitor("m", provenance_policy=True)  # type: ignore[arg-type]
    Provenance(model=1)  # type: ignore[arg-type]
    client.create_monitor("m", probes=[1])  # type: ignore[list-item]
    client.ingest_reference("m", [("2", acts, ["a"])], labels=0.5)  # type: ignore[arg-type]
    client.query_scores("m", flagged_by=True)  # type: ignore[arg-type]
    Client("127.0.0.1:50051", token=b"secret")  # type: ignore[arg-type]
    Client("127.0.0.1:50051", root_certificates=1)  # type: ignore[arg-type]
    Client("127.0.0.1:50051", tls="yes")  # type: ignore[arg-type]
    Client("127.0.0.1:50051", None, 2 << 20, None, (), "token")  # type: ignore[call-arg]
    info = client.get_monitor("m")
    info.fitted = True  # type: ignore[misc]
    info.sites[0].provenance.dtype = "float32"  # type: ignore[misc]
