"""End-to-end tests of the client against the real server (`actwatch serve`) on loopback.

The server binary is $ACTWATCH_BIN, default ../../target/debug/actwatch relative to clients/python
(i.e. `cargo build` in the repository root; started by tests/_server.py). The tests skip, saying why,
when that binary does not exist or has no `serve` subcommand yet; set ACTWATCH_REQUIRE_SERVER=1 to make
that a failure. A binary that has `serve` but does not report SERVING on the gRPC health service is a
failure.

Data: the MiniLM activations in ../../../shared/data/minilm (override: $ACTWATCH_MINILM_DIR).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
from _server import HERE, require_binary, running_server

from actwatch_client import (
    ActwatchError,
    Batch,
    Client,
    ComputationScore,
    FlagEvent,
    Provenance,
    ProvenanceConflict,
    ProvenanceMismatchWarning,
    TraceResults,
)

DATA = Path(os.environ.get("ACTWATCH_MINILM_DIR", HERE / "../../../shared/data/minilm")).resolve()
DEFAULT_FPR = 0.01  # MonitorSpec.fpr: 0 means 0.01
FIT_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """Starts `actwatch serve` on a free loopback port with an empty data directory; yields its address."""
    require_binary()
    with running_server(tmp_path_factory.mktemp("actwatch")) as address:
        yield address


@pytest.fixture(scope="session")
def client(server):
    with Client(server) as c:
        c.wait_ready(timeout=10)
        yield c


# -------------------------------------------------------------------------------------- the data


def _load(name: str):
    """(ids, layers, activations float32 [rows, 384]) of one MiniLM file."""
    pq = pytest.importorskip("pyarrow.parquet")
    path = DATA / name
    if not path.exists():
        pytest.skip(f"MiniLM data not found at {path} (set ACTWATCH_MINILM_DIR)")
    table = pq.read_table(path, columns=["id", "layer", "activation"])
    col = table.column("activation").combine_chunks()
    width = col.type.list_size if hasattr(col.type, "list_size") else None
    flat = np.asarray(col.flatten(), dtype=np.float32)
    acts = flat.reshape(len(table), width or flat.size // len(table))
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    layers = np.asarray(table.column("layer").to_numpy())
    return ids, layers, acts


def _by_site(ids, layers, acts, keep=None):
    """[(site, activations, trace_ids)] per layer, rows restricted to ids in `keep`."""
    out = []
    for layer in sorted(set(layers.tolist())):
        m = layers == layer
        if keep is not None:
            m &= np.isin(ids, list(keep))
        out.append((str(layer), acts[m], ids[m].tolist()))
    return out


@pytest.fixture(scope="module")
def minilm(client):
    """A monitor fitted on train.parquet (sites "2", "4", "6"); one reference batch sent as float16."""
    name = "minilm-test"
    ids, layers, acts = _load("train.parquet")
    info = client.create_monitor(name, seed=7)
    assert info.name == name and not info.fitted and info.reference_rows == 0

    batches = []
    for site, a, t in _by_site(ids, layers, acts):
        for start in range(0, len(t), 1500):
            batches.append((site, a[start : start + 1500], t[start : start + 1500]))
    # One batch as float16, sent as such (DTYPE_F16), no up-cast.
    site, a, t = batches[0]
    batches[0] = (site, a.astype(np.float16), t)
    assert batches[0][1].dtype == np.float16

    summary = client.ingest_reference(name, batches)
    assert summary.rows == len(ids) == 18000
    assert summary.total_rows == 18000
    assert summary.batches >= len(batches)
    assert summary.bytes > 0

    phases = []
    report = client.fit(name, on_progress=phases.append, timeout=FIT_TIMEOUT_S)
    return {"name": name, "report": report, "phases": phases}


@pytest.fixture(scope="module")
def code_scores(client, minilm):
    ids, layers, acts = _load("dev_ood_code.parquet")
    result = client.score(minilm["name"], _by_site(ids, layers, acts), complete=True)
    return ids, layers, acts, result


# ----------------------------------------------------------------------------------------- tests


#: Fit phases in order: "calibrate_joint" only when the monitor has a joint detector.
FIT_PHASES = ["fit", "calibrate", "calibrate_joint"]
#: The default monitor's slots at the MiniLM sites: (site, detector) per site, then the joint detector.
DEFAULT_SLOTS = [(site, det) for site in ("2", "4", "6") for det in ("gaussian", "knn")] + [("joint", "gaussian")]


def _check_fit_phases(phases, report, *, joint=True):
    """Fit progress as the server reports it: phase "fit", then "calibrate", then (with a joint
    detector) "calibrate_joint"; in each, a constant rows_total and a rows_done that never goes back,
    ending at rows_total (the phase's finish). The fit phase reads the rows the report says were
    folded."""
    names = [p.name for p in phases]
    want = FIT_PHASES if joint else FIT_PHASES[:2]
    assert set(names) == set(want), names
    assert names == sorted(names, key=want.index), f"phases out of order: {names}"
    for name in dict.fromkeys(names):
        ps = [p for p in phases if p.name == name]
        totals = {p.rows_total for p in ps}
        assert len(totals) == 1 and totals.pop() > 0, (name, ps)
        done = [p.rows_done for p in ps]
        assert done == sorted(done), f"{name}: rows_done went back: {done}"
        # The server drops progress messages only when the client reads slower than 64 behind;
        # this test reads them as they come, so the finish message arrives.
        assert done[-1] == ps[-1].rows_total, f"{name}: ended at {done[-1]} of {ps[-1].rows_total}"
    assert next(p for p in phases if p.name == "fit").rows_total == report.rows_folded


def test_fit_report_and_monitor_info(client, minilm):
    report = minilm["report"]
    assert report.fit_version >= 1
    assert report.reference_rows == 18000
    assert report.calibration_computations > 0
    assert 0.0 <= report.calibration_fpr <= 0.1
    _check_fit_phases(minilm["phases"], report)

    info = client.get_monitor(minilm["name"])
    assert info.fitted and info.fit_version == report.fit_version
    assert info.reference_rows == 18000
    assert {s.name: (s.width, s.reference_rows) for s in info.sites} == {
        "2": (384, 6000),
        "4": (384, 6000),
        "6": (384, 6000),
    }
    assert info.report is not None and info.report.fit_version == report.fit_version
    assert minilm["name"] in [m.name for m in client.list_monitors()]
    # Created without aggregation or joint: the server's defaults, stored as such.
    assert info.spec.aggregation == "max_rolling_mean:8" and info.spec.joint == "gaussian"


def test_default_monitor_fits_a_joint_detector(client, minilm):
    joint = minilm["report"].joint
    assert joint is not None, "the default monitor has a joint gaussian"
    assert joint.sites == ["2", "4", "6"] and joint.width == 3 * 384
    assert joint.skipped == "" and joint.incomplete == 0
    # One joint vector per reference computation (one trace per site, no positions), split between
    # the fit and calibration parts.
    assert joint.fit_rows > 0 and joint.calibration_rows > 0
    assert joint.fit_rows + joint.calibration_rows == 6000
    assert client.get_monitor(minilm["name"]).report.joint == joint
    # Pooled traces are all of one length: one length stratum, holding every calibration computation.
    strata = minilm["report"].length_strata
    assert len(strata) == 1 and strata[0].max_length is None
    assert strata[0].computations == joint.calibration_rows
    assert client.get_monitor(minilm["name"]).spec.length_strata == 4


def test_incremental_fit_folds_only_new_data_and_matches_a_full_refit(client):
    name = "incremental-test"
    ids, layers, acts = _load("train.parquet")
    client.create_monitor(name)
    batches = [(site, a, t) for site, a, t in _by_site(ids, layers, acts)]
    first = [(s, a[:3000], t[:3000]) for s, a, t in batches]
    second = [(s, a[3000:], t[3000:]) for s, a, t in batches]
    client.ingest_reference(name, first)
    r1 = client.fit(name, incremental=True, timeout=FIT_TIMEOUT_S)
    assert not r1.incremental and r1.rows_folded == 9000  # nothing saved yet: a full fit
    client.ingest_reference(name, second)
    r2 = client.fit(name, incremental=True, timeout=FIT_TIMEOUT_S)
    assert r2.incremental and r2.rows_folded == 9000 and r2.reference_rows == 18000

    cids, clayers, cacts = _load("dev_ood_code.parquet")
    inc = client.score(name, _by_site(cids, clayers, cacts), complete=True)
    r3 = client.fit(name, timeout=FIT_TIMEOUT_S)
    assert not r3.incremental and r3.rows_folded == 18000
    full = client.score(name, _by_site(cids, clayers, cacts), complete=True)
    assert [(c.trace_id, c.p_value, c.score) for c in inc.computations] == [
        (c.trace_id, c.p_value, c.score) for c in full.computations
    ]
    client.delete_monitor(name)


def test_score_flags_code(client, minilm, code_scores):
    ids, _, _, result = code_scores
    n = len(set(ids.tolist()))
    assert len(result.traces) == len(ids) == 1500
    assert len(result.computations) == n == 500
    fpr = client.get_monitor(minilm["name"]).spec.fpr or DEFAULT_FPR

    for t in result.traces:
        assert 0.0 < t.p_value <= 1.0
        assert t.site in ("2", "4", "6") and t.position is None
        assert t.detectors and all(0.0 < d.p_value <= 1.0 for d in t.detectors)
    for c in result.computations:
        assert c.monitor == minilm["name"]
        assert 0.0 < c.p_value <= 1.0
        assert c.flagged == (c.p_value <= fpr)
        assert c.traces == 3
        assert c.fit_version == minilm["report"].fit_version
        assert c.scored_at_unix_ms > 0
        assert [(s.site, s.detector) for s in c.slots] == DEFAULT_SLOTS
        assert all(s.p_value is not None and 0.0 < s.p_value <= 1.0 for s in c.slots)
        # A final result; the default monitor flags early, so a flagged one says where (without
        # positions: the index of the trace among the computation's traces at its site).
        assert not c.partial
        assert c.flagged_at == (0 if c.flagged else None)

    table = result.computations_table()
    assert table["p_value"].dtype == np.float64 and table["flagged"].dtype == bool
    assert table["flagged_at"].tolist() == [0 if c.flagged else -1 for c in result.computations]
    assert "p_joint_gaussian" in table
    flagged = int(table["flagged"].sum())
    # Code is far from prose (AUROC ~0.99 for the peers): far more flags than the 1% FPR would give.
    assert flagged > 0.1 * n, f"only {flagged} of {n} code computations flagged"


def test_score_in_distribution_rarely_flags(client, minilm):
    ids, layers, acts = _load("dev_id.parquet")
    keep = sorted(set(ids.tolist()))[:300]
    result = client.score(minilm["name"], _by_site(ids, layers, acts, keep), complete=True)
    assert len(result.computations) == 300
    flagged = sum(c.flagged for c in result.computations)
    assert flagged <= 15, f"{flagged} of 300 held-out prose computations flagged at a 1% target FPR"


def test_score_without_complete_returns_traces_only(client, minilm, code_scores):
    ids, layers, acts, _ = code_scores
    keep = ids[:4].tolist()
    result = client.score(minilm["name"], _by_site(ids, layers, acts, keep), complete=False)
    assert len(result.traces) == 3 * len(set(keep)) and result.computations == []


def test_stream_scores(client, minilm, code_scores):
    ids, layers, acts, unary = code_scores
    keep = sorted(set(ids.tolist()))[:5]
    batches = _by_site(ids, layers, acts, keep)
    results = []
    with client.stream_scores(minilm["name"], timeout=120) as stream:
        for site, a, t in batches[:-1]:
            stream.send(site, a, t)
        # The last site token-by-token style: with positions, and as float16.
        site, a, t = batches[-1]
        stream.send(site, a.astype(np.float16), t, positions=list(range(len(t))))
        stream.complete(keep)
        while sum(isinstance(r, ComputationScore) for r in results) < len(keep):
            results.append(stream.get(timeout=60))

    traces = [t for r in results if isinstance(r, TraceResults) for t in r.traces]
    comps = {r.trace_id: r for r in results if isinstance(r, ComputationScore)}
    assert len(traces) == 3 * len(keep)
    assert set(comps) == set(keep)
    for t in traces:
        assert 0.0 < t.p_value <= 1.0
        assert (t.position is not None) == (t.site == batches[-1][0])
    for tid, c in comps.items():
        assert c.traces == 3 and 0.0 < c.p_value <= 1.0
        ref = unary.computation(tid)
        # Same fit, same vectors (one site rounded to f16): nearly the same p-value.
        assert c.p_value == pytest.approx(ref.p_value, abs=0.05)


def test_stream_early_flags(client, minilm, code_scores):
    """The default monitor (max aggregation, minp fusion) flags early: the response to a batch that
    makes a computation cross the threshold before it is complete carries the computation's running
    result in TraceResults.early_flags (partial, flagged, flagged_at set), once, and the stream's
    on_early_flag callback and WatchFlags get it too; its final result at completion is flagged,
    with the same flagged_at."""
    ids, layers, acts, _ = code_scores
    keep = sorted(set(ids.tolist()))[:60]
    batches = [(site, a, ["early-" + t for t in tids]) for site, a, tids in _by_site(ids, layers, acts, keep)]
    position = 7  # every trace at this position: flagged_at says it
    fpr = client.get_monitor(minilm["name"]).spec.fpr or DEFAULT_FPR

    called: list[ComputationScore] = []
    events: list[ComputationScore] = []
    per_batch: list[list[ComputationScore]] = []
    with client.watch_flags([minilm["name"]]) as watch:
        reader = threading.Thread(target=lambda: events.extend(watch), daemon=True)
        reader.start()
        with client.stream_scores(minilm["name"], timeout=120, on_early_flag=called.append) as stream:
            for site, a, t in batches:
                stream.send(site, a, t, positions=[position] * len(t))
                r = stream.get(timeout=60)
                assert isinstance(r, TraceResults) and len(r.traces) == len(t)
                per_batch.append(r.early_flags)
            stream.complete(batches[0][2])
            finals = {c.trace_id: c for c in stream.computations(n=len(keep), timeout=60)}
        early = [c for flags in per_batch for c in flags]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = list(events)
            if {e.trace_id for e in seen if e.partial} >= {c.trace_id for c in early} and {
                e.trace_id for e in seen if not e.partial
            } >= {c.trace_id for c in finals.values() if c.flagged}:
                break
            time.sleep(0.1)
    reader.join(timeout=10)

    # Code is far from prose: its first site alone makes some computations cross.
    assert per_batch[0], "no computation flagged early by its first site"
    assert len({c.trace_id for c in early}) == len(early), "an early flag was sent twice"
    assert [c.trace_id for c in called] == [c.trace_id for c in early], "on_early_flag saw other flags"
    for i, flags in enumerate(per_batch):
        for c in flags:
            assert c.partial and c.flagged and c.p_value <= fpr, c
            assert c.monitor == minilm["name"] and c.flagged_at == position, c
            assert c.traces == i + 1, c  # the traces seen so far: one per site sent

    assert set(finals) == set(batches[0][2])
    # A computation crosses the threshold before completion exactly when its final result is flagged.
    assert {c.trace_id for c in early} == {t for t, c in finals.items() if c.flagged}
    for c in early:
        final = finals[c.trace_id]
        assert final.flagged and not final.partial and final.traces == 3
        assert final.flagged_at == c.flagged_at == position
        assert final.p_value <= c.p_value  # max aggregation: evidence only accumulates
    assert all(c.flagged_at is None for c in finals.values() if not c.flagged)

    # WatchFlags: each early flag as sent on the stream, then the final result.
    mine = [e for e in events if e.trace_id.startswith("early-")]
    for c in early:
        got = [e for e in mine if e.trace_id == c.trace_id]
        assert [e.partial for e in got] == [True, False], got
        assert got[0].flagged_at == got[1].flagged_at == position
        assert got[0].p_value == c.p_value and got[1].p_value == finals[c.trace_id].p_value


def test_monitor_aggregation_and_joint_options(client):
    """aggregation and joint are stored as given; joint="none" fits no joint detector (no
    calibrate_joint phase, no FitReport.joint, no joint slot)."""
    name = "aggregation-test"
    info = client.create_monitor(name, aggregation="max_rolling_mean:4", joint="none", seed=2)
    try:
        assert (info.spec.aggregation, info.spec.joint) == ("max_rolling_mean:4", "none")
        spec = client.get_monitor(name).spec
        assert (spec.aggregation, spec.joint) == ("max_rolling_mean:4", "none")
        assert spec.detectors == ["gaussian", "knn"] and spec.fusion == "minp"

        ids, layers, acts = _load("train.parquet")
        client.ingest_reference(name, _by_site(ids, layers, acts, sorted(set(ids.tolist()))[:1500]))
        phases = []
        report = client.fit(name, on_progress=phases.append, timeout=FIT_TIMEOUT_S)
        _check_fit_phases(phases, report, joint=False)
        assert report.joint is None and client.get_monitor(name).report.joint is None

        cids, clayers, cacts = _load("dev_ood_code.parquet")
        result = client.score(name, _by_site(cids, clayers, cacts, sorted(set(cids.tolist()))[:50]))
        assert len(result.computations) == 50 and any(c.flagged for c in result.computations)
        for c in result.computations:
            assert [(s.site, s.detector) for s in c.slots] == DEFAULT_SLOTS[:-1]
            # max_rolling_mean flags early too: a flagged computation says where.
            assert c.flagged_at == (0 if c.flagged else None) and not c.partial
    finally:
        client.delete_monitor(name)

    for bad in ({"aggregation": "median"}, {"aggregation": "ema:2"}, {"joint": "gausian"}):
        with pytest.raises(ActwatchError) as e:
            client.create_monitor("bad-spec", **bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert "bad-spec" not in [m.name for m in client.list_monitors()]


def test_stream_scores_error_is_raised(client, minilm):
    with pytest.raises(ActwatchError) as e:
        with client.stream_scores(minilm["name"], timeout=60) as stream:
            stream.send("2", np.zeros((2, 17), dtype=np.float32), ["bad-0", "bad-1"])
            for _ in stream:
                pass
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_watch_flags_and_query_scores(client, minilm, code_scores):
    ids, layers, acts, unary = code_scores
    flagged = [c for c in unary.computations if c.flagged]
    assert flagged
    src = min(flagged, key=lambda c: c.p_value).trace_id
    rows = [(s, a, ["watched-" + src] * len(t)) for s, a, t in _by_site(ids, layers, acts, [src])]

    events: list = []
    with client.watch_flags([minilm["name"]]) as watch:
        reader = threading.Thread(target=lambda: events.extend(watch), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        got = None
        while got is None and time.monotonic() < deadline:
            result = client.score(minilm["name"], rows, complete=True)
            assert result.computations[0].flagged
            for _ in range(20):
                got = next((e for e in list(events) if e.trace_id == "watched-" + src), None)
                if got is not None:
                    break
                time.sleep(0.1)
    reader.join(timeout=10)
    assert got is not None, "no FlagEvent for a flagged computation within 30 s"
    assert got.flagged and got.monitor == minilm["name"] and 0.0 < got.p_value <= 1.0

    logged = client.query_scores(minilm["name"], trace_ids=["watched-" + src])
    assert logged and all(c.trace_id == "watched-" + src for c in logged)
    assert client.query_scores(minilm["name"], trace_ids=[src])[0].p_value == pytest.approx(
        unary.computation(src).p_value
    )
    only_flagged = client.query_scores(minilm["name"], flagged_only=True, limit=5)
    assert 0 < len(only_flagged) <= 5 and all(c.flagged for c in only_flagged)
    stamps = [c.scored_at_unix_ms for c in only_flagged]
    assert stamps == sorted(stamps, reverse=True)
    future = int(time.time() * 1000) + 3_600_000
    assert client.query_scores(minilm["name"], since=future) == []


def test_wrong_width_is_invalid_argument(client, minilm):
    with pytest.raises(ActwatchError) as e:
        client.score(minilm["name"], [("2", np.zeros((2, 100), dtype=np.float32), ["w0", "w1"])])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message


def test_nan_is_invalid_argument(client, minilm):
    a = np.zeros((1, 384), dtype=np.float32)
    a[0, 3] = np.nan
    with pytest.raises(ActwatchError) as e:
        client.score(minilm["name"], [("2", a, ["nan-0"])])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_ingest_wrong_width_is_invalid_argument(client):
    name = "width-test"
    client.create_monitor(name)
    try:
        client.ingest_reference(name, [("a", np.ones((3, 8), dtype=np.float32), ["x", "y", "z"])])
        with pytest.raises(ActwatchError) as e:
            client.ingest_reference(name, [("a", np.ones((2, 9), dtype=np.float32), ["u", "v"])])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        info = client.get_monitor(name)
        assert info.reference_rows == 3 and info.site("a").width == 8
    finally:
        client.delete_monitor(name)


def test_monitor_lifecycle_errors(client):
    name = "lifecycle-test"
    client.create_monitor(name, detectors=["gaussian"], fusion="fisher", fpr=0.05, calibration_fraction=0.3, seed=3)
    try:
        spec = client.get_monitor(name).spec
        assert spec.detectors == ["gaussian"] and spec.fusion == "fisher"
        assert spec.fpr == pytest.approx(0.05) and spec.calibration_fraction == pytest.approx(0.3) and spec.seed == 3
        with pytest.raises(ActwatchError) as e:
            client.create_monitor(name)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
        client.ingest_reference(
            name, [("s", np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32), list("abcd"))]
        )
        with pytest.raises(ActwatchError) as e:
            client.score(name, [("s", np.zeros((1, 4), dtype=np.float32), ["q"])])
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        client.delete_monitor(name)
    with pytest.raises(ActwatchError) as e:
        client.get_monitor(name)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ActwatchError) as e:
        client.score("no-such-monitor", [("s", np.zeros((1, 4), dtype=np.float32), ["q"])])
    assert e.value.code == grpc.StatusCode.NOT_FOUND


# -------------------------------------------------------------------------------------- provenance

#: What the synthetic reference traces of the provenance tests declare.
REF_PROVENANCE = Provenance(
    model="org/model", revision="abc123", capture="test:output", pooling="mean", dtype="float32"
)


def _gaussian_batches(prefix: str, n: int, seed: int, sites=("a", "b"), width: int = 8):
    """[(site, activations, trace_ids)]: one pooled trace per computation and site, N(0, 1)."""
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}-{i}" for i in range(n)]
    return [(site, rng.normal(size=(n, width)).astype(np.float32), ids) for site in sites]


def _rows(client, name):
    info = client.get_monitor(name)
    return info.reference_rows, {s.name: s.reference_rows for s in info.sites}


def test_reference_check_names_an_odd_ingest_and_fit_can_leave_it_out(client):
    name = "poison-check"
    client.create_monitor(name, detectors="gaussian", joint="none")
    rng = np.random.default_rng(9)

    def cloud(prefix: str, n: int, axis: int):
        # Around 4 e_axis, as activations sit around a mean direction (the check, like the
        # default detectors, compares L2-normalised rows).
        ids = [f"{prefix}-{i}" for i in range(n)]
        centre = 4.0 * np.eye(8)[axis]
        return [(site, (rng.normal(size=(n, 8)) + centre).astype(np.float32), ids) for site in ("a", "b")]

    clean = [client.ingest_reference(name, cloud(f"c{i}", 300, 0)).ingest for i in range(4)]
    odd = client.ingest_reference(name, cloud("odd", 80, 3)).ingest
    info = client.get_monitor(name)
    assert [i.id for i in info.ingests] == [*clean, odd]
    assert all(i.committed_unix_ms > 0 and i.rows == 600 for i in info.ingests[:4])

    report = client.fit(name, timeout=FIT_TIMEOUT_S)
    assert report.ingests == [*clean, odd]
    check = report.reference_check
    assert check is not None and check.skipped == "" and check.alpha == 0.01
    assert [c.first_ingest for c in check.suspects] == [odd]
    assert check.suspects[0].flagged_share > 0.5 and check.suspects[0].p_value is not None

    report = client.fit(name, exclude_ingests=[odd], timeout=FIT_TIMEOUT_S)
    assert report.ingests == clean and report.reference_check is not None
    assert report.reference_check.suspects == []
    report = client.fit(name, ingests=clean[:2], reference_check=False, timeout=FIT_TIMEOUT_S)
    assert report.ingests == clean[:2] and report.reference_check is None
    with pytest.raises(ActwatchError) as e:
        client.fit(name, ingests=[12345], timeout=FIT_TIMEOUT_S)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "12345" in str(e.value)
    client.delete_monitor(name)


def test_ingest_records_provenance_per_site_and_refuses_conflicts(client):
    name = "provenance-ingest-test"
    client.create_monitor(name)
    try:
        # Site "c" first without provenance: its fields are fixed by the first batch that declares them.
        client.ingest_reference(name, _gaussian_batches("u", 5, 0, sites=("c",)))
        assert client.get_monitor(name).site("c").provenance == Provenance()
        client.ingest_reference(name, _gaussian_batches("r", 20, 1, sites=("a", "b", "c")), provenance=REF_PROVENANCE)
        # Partial declarations (and none) match; a batch's own fields win over the call's.
        client.ingest_reference(
            name,
            [
                Batch("a", np.zeros((1, 8), np.float32), ["p-0"], provenance=Provenance(dtype="float32")),
                ("b", np.zeros((1, 8), np.float32), ["p-0"]),
            ],
            provenance=Provenance(model="org/model"),
        )
        info = client.get_monitor(name)
        assert {s.name: s.provenance for s in info.sites} == {
            "a": REF_PROVENANCE,
            "b": REF_PROVENANCE,
            "c": REF_PROVENANCE,
        }
        assert info.spec.provenance_policy == "refuse"
        before = _rows(client, name)
        assert before == (67, {"a": 21, "b": 21, "c": 25})

        # A conflicting batch fails the whole stream: the good batch before it is not kept either.
        good = _gaussian_batches("g", 10, 2, sites=("a",))
        bad = [Batch("b", np.zeros((2, 8), np.float32), ["x-0", "x-1"], provenance=Provenance(dtype="bfloat16"))]
        with pytest.raises(ActwatchError) as e:
            client.ingest_reference(name, good + bad, provenance=REF_PROVENANCE)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        msg = e.value.message
        assert '"b"' in msg and "dtype" in msg and "bfloat16" in msg and "float32" in msg, msg
        assert _rows(client, name) == before

        with pytest.raises(ActwatchError) as e:
            client.ingest_reference(name, good, provenance=Provenance(model="org/other-model"))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "model" in e.value.message
        assert _rows(client, name) == before
        assert client.get_monitor(name).site("a").provenance == REF_PROVENANCE

        # The stream session: the session's provenance on every batch, a batch's own fields win.
        with client.ingest_session(name, provenance=REF_PROVENANCE) as session:
            session.send("a", np.zeros((1, 8), np.float32), ["s-0"])
            session.send("b", np.zeros((1, 8), np.float32), ["s-0"], provenance=Provenance(pooling="mean"))
        assert _rows(client, name)[0] == before[0] + 2
    finally:
        client.delete_monitor(name)


def test_hostile_provenance_is_invalid_argument(client):
    name = "provenance-hostile-test"
    client.create_monitor(name)
    try:
        batches = _gaussian_batches("h", 3, 3, sites=("a",))
        for hostile in (Provenance(model="m" * 300), Provenance(capture="hook\noutput")):
            with pytest.raises(ActwatchError) as e:
                client.ingest_reference(name, batches, provenance=hostile)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, hostile
        assert client.get_monitor(name).reference_rows == 0
        with pytest.raises(ActwatchError) as e:
            client.create_monitor("provenance-bad-policy", provenance_policy="ignore")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        client.delete_monitor(name)


@pytest.fixture(scope="module")
def provenance_monitors(client):
    """Two monitors fitted on the same synthetic reference (sites "a", "b", width 8), declared as
    REF_PROVENANCE: one with the default provenance policy (refuse), one with "warn"."""
    names = {"refuse": "provenance-refuse", "warn": "provenance-warn"}
    client.create_monitor(names["refuse"], seed=5)
    client.create_monitor(names["warn"], seed=5, provenance_policy="warn")
    for name in names.values():
        client.ingest_reference(name, _gaussian_batches("ref", 600, 4), provenance=REF_PROVENANCE)
        client.fit(name, timeout=FIT_TIMEOUT_S)
    yield names
    for name in names.values():
        client.delete_monitor(name)


#: A scored batch declaring this conflicts with REF_PROVENANCE at dtype.
BF16 = Provenance(dtype="bfloat16")
BF16_CONFLICTS = [ProvenanceConflict(site=s, field="dtype", declared="bfloat16", recorded="float32") for s in "ab"]


def _p_values(result):
    return [(c.trace_id, c.p_value) for c in result.computations], [
        (t.trace_id, t.site, t.p_value) for t in result.traces
    ]


def test_score_with_conflicting_provenance_is_refused_by_default(client, provenance_monitors):
    name = provenance_monitors["refuse"]
    assert client.get_monitor(name).spec.provenance_policy == "refuse"
    queries = _gaussian_batches("q", 20, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvenanceMismatchWarning)
        plain = client.score(name, queries)
        # Matching and partial declarations score as undeclared batches do.
        assert _p_values(client.score(name, queries, provenance=REF_PROVENANCE)) == _p_values(plain)
        assert _p_values(client.score(name, queries, provenance=Provenance(dtype="float32"))) == _p_values(plain)
    assert plain.provenance_warnings == []
    with pytest.raises(ActwatchError) as e:
        client.score(name, queries, provenance=BF16)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "dtype" in e.value.message and "bfloat16" in e.value.message and "float32" in e.value.message

    with pytest.raises(ActwatchError) as e:
        with client.stream_scores(name, timeout=60, provenance=BF16) as stream:
            for site, a, t in queries:
                stream.send(site, a, t)
            stream.complete(queries[0][2])
            stream.computations(n=20, timeout=60)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "dtype" in e.value.message


def test_score_with_conflicting_provenance_warns_with_policy_warn(client, provenance_monitors):
    name = provenance_monitors["warn"]
    assert client.get_monitor(name).spec.provenance_policy == "warn"
    queries = _gaussian_batches("q", 20, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvenanceMismatchWarning)
        plain = client.score(name, queries)
    assert plain.provenance_warnings == []
    with pytest.warns(ProvenanceMismatchWarning, match="dtype") as caught:
        warned = client.score(name, queries, provenance=BF16)
    # Scored normally: the same p-values as the undeclared batches; one warning per site.
    assert _p_values(warned) == _p_values(plain)
    assert sorted(warned.provenance_warnings, key=lambda w: w.site) == BF16_CONFLICTS
    mine = [w for w in caught if issubclass(w.category, ProvenanceMismatchWarning)]
    assert len(mine) == 2 and all(name in str(w.message) for w in mine)
    assert {("'a'" in str(w.message), "'b'" in str(w.message)) for w in mine} == {(True, False), (False, True)}


def test_stream_with_conflicting_provenance_warns_once_per_site(client, provenance_monitors):
    name = provenance_monitors["warn"]
    queries = _gaussian_batches("q", 20, 6)
    plain = {c.trace_id: c.p_value for c in client.score(name, queries).computations}
    results = []
    with pytest.warns(ProvenanceMismatchWarning) as caught:
        with client.stream_scores(name, timeout=60, provenance=BF16) as stream:
            # Each site in two batches: two warnings in all, one per site.
            for site, a, t in queries:
                stream.send(site, a[:10], t[:10])
                stream.send(site, a[10:], t[10:])
            stream.complete(queries[0][2])
            while sum(isinstance(r, ComputationScore) for r in results) < 20:
                results.append(stream.get(timeout=60))
    per_batch = [r for r in results if isinstance(r, TraceResults)]
    assert len(per_batch) == 4
    for r, site in zip(per_batch, "aabb"):
        assert r.provenance_warnings == [c for c in BF16_CONFLICTS if c.site == site]
    mine = [w for w in caught if issubclass(w.category, ProvenanceMismatchWarning)]
    assert len(mine) == 2, [str(w.message) for w in mine]
    assert {c.trace_id: c.p_value for c in results if isinstance(c, ComputationScore)} == plain


# ---------------------------------------------------------------------------------- concept probes

#: The concept of the probe tests: a shift along the first axis, at every site.
CONCEPT_SHIFT = 3.0
PROBE = "shifted"
#: A second probe: logistic, with a deferral band (verdict "defer").
PROBE_LR = "shifted_lr"
PROBE_SPECS = [PROBE, f"{PROBE_LR}:kind=logistic,c=1,defer_fpr=0.2"]
PROBE_FPR = 0.05
#: Fit phases of a monitor with probes and a joint detector, in order.
PROBE_FIT_PHASES = ["fit", "examples", "calibrate", "calibrate_joint", "calibrate_examples"]


def _concept_batches(prefix: str, n: int, seed: int, shift, sites=("a", "b"), width: int = 8):
    """[(site, activations, trace_ids)]: one pooled trace per computation and site, N(0, 1) moved by
    ``shift`` (a number, or one per computation) along the first axis."""
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}-{i}" for i in range(n)]
    moved = np.zeros((n, width), np.float32)
    moved[:, 0] = np.broadcast_to(np.asarray(shift, np.float32), (n,))
    return [(site, (rng.normal(size=(n, width)) + moved).astype(np.float32), ids) for site in sites]


@pytest.fixture(scope="module")
def probe_monitor(client):
    """A monitor with two concept probes (sites "a", "b", width 8), fitted on 400 reference
    computations and 140 labelled examples: 60 positives labelled per batch (labels=True), 80 labelled
    per row on a session (half positive), as a bool array at site "a" and as {trace id: bool} at "b"."""
    name = "probe-test"
    info = client.create_monitor(name, probes=PROBE_SPECS, fpr=PROBE_FPR, seed=3)
    assert info.spec.probes == PROBE_SPECS and info.example_rows == 0
    ref = client.ingest_reference(name, _concept_batches("ref", 400, 1, 0.0))
    assert (ref.rows, ref.total_rows, ref.example_rows, ref.total_example_rows) == (800, 800, 0, 0)

    pos = client.ingest_reference(name, _concept_batches("pos", 60, 2, CONCEPT_SHIFT), labels=True)
    assert (pos.rows, pos.total_rows, pos.example_rows, pos.total_example_rows) == (120, 800, 120, 120)
    present = np.arange(80) % 2 == 0
    with client.ingest_session(name) as session:
        for site, a, t in _concept_batches("mix", 80, 3, np.where(present, CONCEPT_SHIFT, 0.0)):
            session.send(site, a, t, labels=present if site == "a" else dict(zip(t, present.tolist())))
    mixed = session.close()
    assert (mixed.rows, mixed.total_rows, mixed.example_rows, mixed.total_example_rows) == (160, 800, 160, 280)
    info = client.get_monitor(name)
    assert (info.reference_rows, info.example_rows) == (800, 280)
    assert {s.name: s.reference_rows for s in info.sites} == {"a": 400, "b": 400}

    phases = []
    report = client.fit(name, on_progress=phases.append, timeout=FIT_TIMEOUT_S)
    yield {"name": name, "report": report, "phases": phases}
    client.delete_monitor(name)


def test_probe_fit_report(client, probe_monitor):
    report = probe_monitor["report"]
    assert list(dict.fromkeys(p.name for p in probe_monitor["phases"])) == PROBE_FIT_PHASES
    assert [p.name for p in report.probes] == [PROBE, PROBE_LR]
    assert client.get_monitor(probe_monitor["name"]).report.probes == report.probes
    for probe in report.probes:
        assert report.probe(probe.name) is probe
        assert [s.site for s in probe.sites] == ["a", "b"]
        # 100 labelled positives and 40 negatives, split between fitting and calibration.
        for s in probe.sites:
            assert 0 < s.positive < 100 and 0 < s.negative < 40 and s.reference == 0
        assert probe.heldout_positives == 100 - probe.sites[0].positive
        assert probe.calibration_negatives == 40 - probe.sites[0].negative
        assert probe.calibration_reference > 0
        assert 0.0 <= probe.calibration_fpr <= 0.15 and probe.negatives_fpr is not None
        assert probe.recall is not None and probe.recall >= 0.9, probe  # a 3-sigma shift: easy
    shifted, logistic = report.probes
    assert shifted.kind == "diff_means" and all(s.c is None for s in shifted.sites)
    assert shifted.deferred_benign is None and shifted.deferred_positives is None
    assert logistic.kind == "logistic" and all(s.c == 1.0 for s in logistic.sites)
    assert logistic.deferred_benign is not None and logistic.deferred_positives is not None
    assert report.probe("no-such-probe") is None


@pytest.fixture(scope="module")
def probe_scores(client, probe_monitor):
    """Scores 30 benign and 30 concept computations ("benign-*", "concept-*") with a watcher on the
    monitor; returns the ScoreResult and the FlagEvents it pushed (each flagged final result, once)."""
    name = probe_monitor["name"]
    queries = _concept_batches("benign", 30, 4, 0.0) + _concept_batches("concept", 30, 5, CONCEPT_SHIFT)
    events = []
    with client.watch_flags([name]) as watch:
        reader = threading.Thread(target=lambda: events.extend(watch), daemon=True)
        reader.start()
        result = client.score(name, queries)
        want = {c.trace_id for c in result.computations if c.flagged or any(p.flagged for p in c.probes)}
        deadline = time.monotonic() + 30
        while {e.trace_id for e in list(events)} < want and time.monotonic() < deadline:
            time.sleep(0.05)
    reader.join(timeout=10)
    return result, list(events)


def test_probe_scores(probe_scores):
    result, _ = probe_scores
    assert len(result.computations) == 60
    for c in result.computations:
        assert [p.name for p in c.probes] == [PROBE, PROBE_LR]
        for p in c.probes:
            assert 0.0 < p.p_value <= 1.0
            assert p.flagged == (p.p_value <= PROBE_FPR)
            assert p.verdict == "flag" if p.flagged else p.verdict in ("defer", "pass")
            assert (p.flagged_at is not None) == p.flagged
        assert c.probe(PROBE) is c.probes[0] and c.probe("no-such-probe") is None
        # No deferral band on the diff_means probe; the logistic one has one (defer_fpr=0.2).
        assert c.probe(PROBE).verdict != "defer"
        assert (c.probe(PROBE_LR).verdict == "defer") == (PROBE_FPR < c.probe(PROBE_LR).p_value <= 0.2)
    for probe in (PROBE, PROBE_LR):
        concept = [c.probe(probe) for c in result.computations if c.trace_id.startswith("concept-")]
        benign = [c.probe(probe) for c in result.computations if c.trace_id.startswith("benign-")]
        assert sum(p.flagged for p in concept) >= 27, [p.p_value for p in concept]
        assert sum(p.flagged for p in benign) <= 6, [p.p_value for p in benign]
    # The concept is not an anomaly: the probes flag what the anomaly detectors pass.
    probe_only = [c for c in result.computations if not c.flagged and c.probe(PROBE).flagged]
    assert len(probe_only) >= 20

    table = result.computations_table()
    assert table[f"probe_{PROBE}_p_value"].tolist() == [c.probe(PROBE).p_value for c in result.computations]
    assert table[f"probe_{PROBE_LR}_verdict"].tolist() == [c.probe(PROBE_LR).verdict for c in result.computations]


def test_watch_flags_says_which_question_raised_a_flag(probe_scores):
    result, events = probe_scores
    by_id = {c.trace_id: c for c in result.computations}
    assert all(isinstance(e, FlagEvent) and isinstance(e, ComputationScore) for e in events)
    assert not any(e.partial for e in events)  # Score results only: no early flags
    assert len({e.trace_id for e in events}) == len(events), "a computation was pushed twice"
    want = {t for t, c in by_id.items() if c.flagged or any(p.flagged for p in c.probes)}
    assert {e.trace_id for e in events} == want
    for e in events:
        c = by_id[e.trace_id]
        raised = (["anomaly"] if c.flagged else []) + [p.name for p in c.probes if p.flagged]
        assert sorted(e.raised_by) == sorted(raised), (e.raised_by, c)
        assert (e.flagged, e.p_value, e.probes) == (c.flagged, c.p_value, c.probes)
    # Computations flagged only by a probe are pushed too, not flagged as anomalous.
    probe_only = [e for e in events if e.raised_by and "anomaly" not in e.raised_by]
    assert all(not e.flagged and set(e.raised_by) <= {PROBE, PROBE_LR} for e in probe_only)
    assert sum(PROBE in e.raised_by for e in probe_only) >= 20


def test_query_scores_flagged_by(client, probe_monitor, probe_scores):
    result, _ = probe_scores
    name = probe_monitor["name"]

    def ids(**kw):
        return {c.trace_id for c in client.query_scores(name, limit=1000, **kw)}

    assert ids() == {c.trace_id for c in result.computations}
    for probe in (PROBE, PROBE_LR):
        want = {c.trace_id for c in result.computations if c.probe(probe).flagged}
        assert want and ids(flagged_only=True, flagged_by=probe) == want
        assert ids(flagged_by=probe) == want  # flagged_by implies flagged_only
    assert ids(flagged_only=True, flagged_by="anomaly") == {c.trace_id for c in result.computations if c.flagged}
    assert ids(flagged_only=True) == {
        c.trace_id for c in result.computations if c.flagged or any(p.flagged for p in c.probes)
    }
    logged = client.query_scores(name, flagged_by=PROBE, limit=1)
    assert len(logged) == 1 and logged[0].probe(PROBE).flagged


def test_labels_need_probes(client):
    name = "labels-without-probes-test"
    info = client.create_monitor(name)
    assert info.spec.probes == []
    try:
        for labels in (True, [True, False, True]):
            with pytest.raises(ActwatchError) as e:
                client.ingest_reference(name, _concept_batches("x", 3, 0, 0.0), labels=labels)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "probes" in e.value.message
        with pytest.raises(ActwatchError) as e:
            with client.ingest_session(name) as session:
                session.send("a", np.zeros((2, 8), np.float32), ["s-0", "s-1"], labels=False)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        info = client.get_monitor(name)
        assert (info.reference_rows, info.example_rows) == (0, 0)
    finally:
        client.delete_monitor(name)
    # One label per computation: a computation labelled both ways is refused.
    conflicting = "labels-conflict-test"
    client.create_monitor(conflicting, probes=[PROBE])
    try:
        with pytest.raises(ActwatchError) as e:
            client.ingest_reference(conflicting, ("a", np.zeros((2, 8), np.float32), ["x", "x"]), labels=[True, False])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "per computation" in e.value.message
        assert client.get_monitor(conflicting).example_rows == 0
    finally:
        client.delete_monitor(conflicting)
    # Labels that do not match the rows are refused before anything is sent.
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        client.ingest_reference("no-such-monitor", _concept_batches("y", 3, 0, 0.0), labels=[True, False])
    with pytest.raises(ActwatchError) as e:
        client.create_monitor("bad-probe", probes=["p:kind=svm"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------------- torch hooks


def test_torch_hook_ingest_fit_score(client, torch):
    """Hooks ingest, the monitor fits, hooks score; every batch declares its provenance automatically.
    Casting the model to bfloat16 after a float32 reference makes its batches declare dtype
    "bfloat16": refused by a default monitor, scored with a warning by one with policy "warn"."""
    from actwatch_client.hooks import ActivationMonitorHook

    torch.manual_seed(0)
    d = 8
    model = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, d)).eval()
    sites = {"hidden": "1", "out": "2"}  # widths 16 and d
    names = {"refuse": "torch-hook-test", "warn": "torch-hook-warn-test"}
    client.create_monitor(names["refuse"], fpr=0.05, seed=1)
    client.create_monitor(names["warn"], fpr=0.05, seed=1, provenance_policy="warn")

    def inputs(batch, tokens, shift=0.0, scale=1.0):
        x = torch.randn(batch, tokens, d) * scale + shift
        lengths = torch.randint(1, tokens + 1, (batch,))
        mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
        return x, mask

    def read_all(stream):
        out = []
        while True:
            try:
                out.append(stream.get(timeout=60))
            except StopIteration:
                return out

    try:
        # Reference: 800 computations of random inputs, mean-pooled over their unmasked tokens; two
        # hooks on the model, one per monitor, so both get the same traces.
        hooks = [ActivationMonitorHook(model, sites, client, n, pool="mean", mode="ingest") for n in names.values()]
        for b in range(25):
            x, mask = inputs(32, 6)
            ids = [f"ref-{b}-{i}" for i in range(32)]
            with hooks[0].batch(ids, mask), hooks[1].batch(ids, mask), torch.no_grad():
                model(x)
        for hook in hooks:
            assert hook.close().rows == 2 * 25 * 32
        for name in names.values():
            info = client.get_monitor(name)
            assert {s.name: s.width for s in info.sites} == {"hidden": 16, "out": d}
            # What the hooks declared: the model's class (a plain nn.Sequential has no name or
            # revision), the hooked module's output, the pooling and the dtype the model ran in.
            for site, module in sites.items():
                assert info.site(site).provenance == Provenance(
                    model="torch.nn.modules.container.Sequential",
                    revision=None,
                    capture=f"actwatch_client.hooks:{module}:output",
                    pooling="mean",
                    dtype="float32",
                )
            client.fit(name, timeout=FIT_TIMEOUT_S)

        ok_ids, odd_ids = [f"ok-{i}" for i in range(16)], [f"odd-{i}" for i in range(16)]
        ok_x, ok_mask = inputs(16, 6)
        odd_x, odd_mask = inputs(16, 6, shift=3.0, scale=4.0)

        # The default monitor (provenance policy "refuse"): the float32 pass is scored; the pass in
        # bfloat16 declares dtype "bfloat16" against float32 reference traces and ends the stream.
        hook = ActivationMonitorHook(model, sites, client, names["refuse"], pool="mean", mode="score")
        try:
            with hook.batch(ok_ids, ok_mask), torch.no_grad():
                model(ok_x)
            refused_ok = {c.trace_id: c for c in hook.results.computations(n=16, timeout=60)}
            model.to(torch.bfloat16)
            with pytest.raises(ActwatchError) as refused:
                with hook.batch(odd_ids, odd_mask), torch.no_grad():
                    model(odd_x.to(torch.bfloat16))
                hook.results.computations(n=16, timeout=60)
        finally:
            hook.remove()
            hook.results.cancel()
            model.to(torch.float32)
        assert sorted(refused_ok) == sorted(ok_ids)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "dtype" in refused.value.message and '"bfloat16"' in refused.value.message, refused.value.message

        # The monitor with provenance policy "warn": both passes are scored; the bfloat16 batches
        # (sent as DTYPE_BF16) carry a warning each, and reading them warns once per site.
        early = []
        hook = ActivationMonitorHook(
            model, sites, client, names["warn"], pool="mean", mode="score", on_early_flag=early.append
        )
        with hook.batch(ok_ids, ok_mask), torch.no_grad():
            model(ok_x)
        model.to(torch.bfloat16)
        with hook.batch(odd_ids, odd_mask), torch.no_grad():
            model(odd_x.to(torch.bfloat16))
        hook.close()
        with pytest.warns(ProvenanceMismatchWarning, match="bfloat16") as caught:
            results = read_all(hook.results)
        assert len([w for w in caught if issubclass(w.category, ProvenanceMismatchWarning)]) == 2
        per_batch = [r for r in results if isinstance(r, TraceResults)]
        assert [r.provenance_warnings for r in per_batch] == [[], []] + [
            [ProvenanceConflict(site=site, field="dtype", declared="bfloat16", recorded="float32")] for site in sites
        ]
        comps = {c.trace_id: c for c in results if isinstance(c, ComputationScore)}
        assert len(comps) == 32 and all(c.traces == 2 for c in comps.values())
        ok = [c for k, c in comps.items() if k.startswith("ok-")]
        odd = [c for k, c in comps.items() if k.startswith("odd-")]
        assert sum(c.flagged for c in odd) >= 12, [c.p_value for c in odd]
        assert sum(c.flagged for c in ok) <= 4, [c.p_value for c in ok]
        assert np.mean([c.p_value for c in odd]) < np.mean([c.p_value for c in ok])
        # The default monitor flags early: every flagged computation crossed the threshold before the
        # batch ended (its computations are completed then), and on_early_flag heard of it at once.
        assert all(c.partial and c.flagged and c.flagged_at == 0 for c in early), early
        assert sorted(c.trace_id for c in early) == sorted(k for k, c in comps.items() if c.flagged)
        assert all(c.flagged_at == 0 for c in comps.values() if c.flagged)
    finally:
        model.to(torch.float32)
        for name in names.values():
            client.delete_monitor(name)


def test_torch_hook_token_level_ingest(client, torch):
    from actwatch_client.hooks import ActivationMonitorHook

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    name = "torch-tokens-test"
    client.create_monitor(name)
    try:
        x = torch.randn(3, 5, 4)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
        # Fields set in `provenance` win over the automatic ones; the others stay automatic.
        override = Provenance(model="org/tiny", revision="v1")
        with ActivationMonitorHook(model, ["0"], client, name, pool="none", mode="ingest", provenance=override) as hook:
            with hook.batch(["a", "b", "c"], mask), torch.no_grad():
                model(x)
        assert hook.close().rows == int(mask.sum()) == 9
        site = client.get_monitor(name).site("0")
        assert site.reference_rows == 9
        assert site.provenance == Provenance(
            model="org/tiny", revision="v1", capture="actwatch_client.hooks:0:output", pooling="none", dtype="float32"
        )
    finally:
        client.delete_monitor(name)


def test_torch_hook_ingests_labelled_examples(client, torch):
    """``hook.batch(..., labels=)`` in ingest mode sends labelled examples for the monitor's probes:
    a bool for the batch, one per batch element, or {trace id: bool}; with pool="none" a computation's
    label goes with each of its tokens."""
    from actwatch_client.hooks import ActivationMonitorHook

    torch.manual_seed(2)
    d = 4
    model = torch.nn.Sequential(torch.nn.Linear(d, 8)).eval()
    name, tokens_name = "torch-probe-test", "torch-probe-tokens-test"
    client.create_monitor(name, probes=["concept"], fpr=0.05, seed=4)
    client.create_monitor(tokens_name, probes=["concept"])
    concept = torch.zeros(d)
    concept[0] = 3.0

    def run(hook, prefix, n, present, labels=None):
        x = torch.randn(n, 5, d) + torch.as_tensor(present, dtype=torch.float32).reshape(-1, 1, 1) * concept
        ids = [f"{prefix}-{i}" for i in range(n)]
        with hook.batch(ids, torch.ones(n, 5), labels=labels), torch.no_grad():
            model(x)
        return ids

    try:
        with ActivationMonitorHook(model, ["0"], client, name, mode="ingest") as hook:
            for b in range(12):
                run(hook, f"ref-{b}", 32, 0.0)
            run(hook, "pos", 40, 1.0, labels=True)
            run(hook, "neg", 20, 0.0, labels=False)
            present = np.arange(40) % 2 == 0
            run(hook, "mix", 40, present.astype(np.float32), labels=present.tolist())
            ids = [f"map-{i}" for i in range(20)]
            run(hook, "map", 20, present[:20].astype(np.float32), labels=dict(zip(ids, present[:20].tolist())))
        summary = hook.close()
        assert (summary.rows, summary.total_rows) == (12 * 32 + 120, 12 * 32)
        assert (summary.example_rows, summary.total_example_rows) == (120, 120)
        report = client.fit(name, timeout=FIT_TIMEOUT_S)
        probe = report.probe("concept")
        assert probe is not None and probe.recall is not None and probe.recall >= 0.9, probe
        assert probe.sites[0].positive + probe.heldout_positives == 40 + 20 + 10

        queries = ActivationMonitorHook(model, ["0"], client, name, mode="score")
        try:
            with pytest.raises(ValueError, match="ingest"):
                queries.set_batch(["q"], labels=True)
            run(queries, "q-concept", 16, 1.0)
            comps = queries.results.computations(n=16, timeout=60)
        finally:
            queries.close()
        assert sum(c.probe("concept").flagged for c in comps) >= 14, [c.probes for c in comps]

        # Token rows: each carries its computation's label.
        with ActivationMonitorHook(model, ["0"], client, tokens_name, pool="none") as hook:
            x = torch.randn(3, 5, d)
            mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
            with hook.batch(["t-0", "t-1", "t-2"], mask, labels=[True, False, True]), torch.no_grad():
                model(x)
            with pytest.raises(ValueError, match="2 labels for 3 rows"):
                hook.set_batch(["u-0", "u-1", "u-2"], labels=[True, False])
        assert hook.close().example_rows == int(mask.sum()) == 9
        assert client.get_monitor(tokens_name).example_rows == 9
    finally:
        for n in (name, tokens_name):
            client.delete_monitor(n)


def test_bytes_that_are_no_request_are_invalid_argument(client):
    """Bytes that do not decode as the call's protobuf message are the client's fault: INVALID_ARGUMENT
    on unary and streaming calls alike (tonic's own answer, INTERNAL, blamed the server), and the server
    keeps serving."""
    garbage = b"\xff\xff\xff\x0f\x01"  # wire type 7 does not exist
    calls = {
        "GetMonitor": lambda m: client.channel.unary_unary(m)(garbage, timeout=10),
        "Score": lambda m: client.channel.unary_unary(m)(garbage, timeout=10),
        "IngestReference": lambda m: client.channel.stream_unary(m)(iter([garbage]), timeout=10),
        "StreamScores": lambda m: list(client.channel.stream_stream(m)(iter([garbage]), timeout=10)),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as raised:
            call(f"/actwatch.v1.ActivationMonitor/{name}")
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, raised.value.details())
        assert "malformed request" in raised.value.details(), (name, raised.value.details())
    assert isinstance(client.list_monitors(), list)
