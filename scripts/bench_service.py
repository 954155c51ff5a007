#!/usr/bin/env python3
"""Benchmark of the actwatch gRPC service against Arrow Flight (Arrow over gRPC) on loopback.

Not a test: prints one table. Run it through scripts/bench_service.sh (builds the release binary,
prepares the venv). What it measures, in one run:

* the disk's sequential write bandwidth with fsync, the same bytes in the same batches written to a
  file beside the server's data directory (the physical limit of an ingest that fsyncs what it
  acknowledges);
* ingest throughput of ``IngestReference`` (MB/s of activation bytes, vectors/s), f32 and bf16,
  d = 384 and d = 4096, batches of 256 rows, timed from the first send to the summary (which the
  server sends once every batch is fsynced), against the same payloads sent with Flight ``DoPut`` to
  a minimal ``FlightServerBase`` (in a subprocess) that reads the stream and drops it (no disk), and
  that appends it to an Arrow IPC file and fsyncs it (the same durability as the ingest);
* ``StreamScores`` latency (p50/p99 per batch of 1, 16, 256 vectors, one batch in flight at a time)
  on a monitor fitted on random d=384 vectors with the default detectors, against a Flight
  ``DoPut`` round trip with a per-batch ack (small answer, like the scores) and a ``DoExchange``
  echo (the batch comes back).

Both sides are driven from Python (grpcio raw stubs with prebuilt protobuf messages; pyarrow.flight
with prebuilt record batches), so every number includes the Python client's overhead on both sides.
Flight carries bf16 as uint16 words (Arrow has no bf16): same bytes on the wire.

    python scripts/bench_service.py [--bin target/release/actwatch] [--reps 3] [--quick]
    python scripts/bench_service.py --flight-server   # internal: the Flight sink/echo server
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))

ROWS_PER_BATCH = 256
MAX_MSG = 64 << 20  # the server's default max_message_bytes


# ------------------------------------------------------------------------------ the Flight server


def flight_server_main() -> None:
    import pyarrow as pa
    import pyarrow.flight as flight

    class Server(flight.FlightServerBase):
        def do_put(self, context, descriptor, reader, writer):
            if descriptor.command.startswith(b"file:"):
                return self.put_to_file(descriptor.command[5:].decode(), reader)
            ack = descriptor.command == b"ack"
            token = pa.py_buffer(b"k")
            while True:
                try:
                    reader.read_chunk()
                except StopIteration:
                    break
                if ack:
                    writer.write(token)

        @staticmethod
        def put_to_file(path, reader):
            """The stream's batches appended to an Arrow IPC file as they arrive, then the file
            and its directory fsynced before the call returns (the client's close waits for it):
            what an ingest that acknowledges only durable bytes does, with no re-encoding."""
            sink = pa.OSFile(path, "wb")
            out = None
            try:
                for chunk in reader:
                    if out is None:
                        out = pa.ipc.new_file(sink, chunk.data.schema)
                    out.write_batch(chunk.data)
                if out is not None:
                    out.close()
                sink.flush()
                os.fsync(sink.fileno())
            finally:
                sink.close()
            dfd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            os.unlink(path)

        def do_exchange(self, context, descriptor, reader, writer):
            started = False
            for chunk in reader:
                if chunk.data is None:
                    continue
                if not started:
                    writer.begin(chunk.data.schema)
                    started = True
                writer.write_batch(chunk.data)

    server = Server("grpc://127.0.0.1:0")
    print(server.port, flush=True)
    server.serve()


# ------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wire(n: int, d: int, dtype: str, rng: np.random.Generator) -> np.ndarray:
    """[n, d] activations as they go on the wire: float32, or bf16 bits as uint16."""
    a = rng.standard_normal((n, d), dtype=np.float32)
    if dtype == "f32":
        return a
    return (a.view(np.uint32) >> 16).astype(np.uint16)


def disk_write(directory: Path, arr: np.ndarray, rows: int) -> float:
    """Seconds to write `arr`'s bytes to a new file beside the server's data directory, one
    `rows`-row batch per write, and fsync it (file and directory): the disk's sequential write
    bandwidth with fsync, the limit an ingest that keeps every acknowledged byte can reach."""
    path = directory / "disk-probe.bin"
    data = arr.tobytes()
    step = rows * arr.shape[1] * arr.itemsize
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(0, len(data), step):
            os.write(fd, data[i:i + step])
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


class Actwatch:
    def __init__(self, binary: Path):
        import grpc

        from actwatch_client._proto.actwatch.v1 import actwatch_pb2 as pb
        from actwatch_client._proto.actwatch.v1 import actwatch_pb2_grpc as pb_grpc

        self.pb = pb
        self.tmp = Path(tempfile.mkdtemp(prefix="actwatch-bench-"))
        (self.tmp / "data").mkdir()
        self.address = f"127.0.0.1:{free_port()}"
        self.log = open(self.tmp / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--data-dir", str(self.tmp / "data"), "--listen", self.address],
            stdout=self.log, stderr=subprocess.STDOUT)
        opts = [("grpc.max_send_message_length", MAX_MSG), ("grpc.max_receive_message_length", MAX_MSG)]
        self.channel = grpc.insecure_channel(self.address, options=opts)
        self.stub = pb_grpc.ActivationMonitorStub(self.channel)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.tmp / 'server.log').read_text()[-2000:]}")
            try:
                self.stub.ListMonitors(pb.ListMonitorsRequest(), timeout=1)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def batch(self, site, arr, ids):
        pb = self.pb
        dt = pb.DTYPE_F32 if arr.dtype == np.float32 else pb.DTYPE_BF16
        return pb.TraceBatch(site=site, trace_ids=ids,
                             activations=pb.Tensor(data=arr.tobytes(), shape=list(arr.shape), dtype=dt))

    def create(self, name):
        self.stub.CreateMonitor(self.pb.CreateMonitorRequest(name=name))

    def ingest(self, name, arr, prefix, site="s"):
        reqs = [self.pb.IngestReferenceRequest(
                    monitor=name,
                    batch=self.batch(site, arr[i:i + ROWS_PER_BATCH],
                                     [f"{prefix}{j}" for j in range(i, min(i + ROWS_PER_BATCH, len(arr)))]))
                for i in range(0, len(arr), ROWS_PER_BATCH)]
        t0 = time.perf_counter()
        summary = self.stub.IngestReference(iter(reqs))
        dt = time.perf_counter() - t0
        assert summary.rows == len(arr), summary
        return dt

    def fit(self, name):
        for ev in self.stub.Fit(self.pb.FitRequest(monitor=name)):
            if ev.WhichOneof("event") == "report":
                return ev.report

    def open_stream(self, name):
        """A StreamScores call fed from a queue: (queue, responses)."""
        q: queue.Queue = queue.Queue()
        q.put(self.pb.StreamScoresRequest(monitor=name))
        return q, self.stub.StreamScores(iter(q.get, None))

    @staticmethod
    def close_stream(q, call):
        q.put(None)
        for _ in call:
            pass

    def stream_latency(self, name, batches, warmup):
        pb = self.pb
        reqs = [pb.StreamScoresRequest(batch=b) for b in batches]
        q, call = self.open_stream(name)
        lat = []
        for i, r in enumerate(reqs):
            t0 = time.perf_counter()
            q.put(r)
            resp = next(call)
            t = time.perf_counter() - t0
            assert resp.WhichOneof("event") == "traces" and len(resp.traces.traces) == len(r.batch.trace_ids)
            if i >= warmup:
                lat.append(t)
        self.close_stream(q, call)
        return lat

    def token_latency(self, name, tokens, sites, warmup):
        """One computation per step: one row at each site, then `complete`; timed from the first
        send to its ComputationScore (the trace answers of the sites arrive before it)."""
        pb = self.pb
        q, call = self.open_stream(name)
        lat = []
        for i, rows in enumerate(tokens):
            tid = f"tok{i}"
            reqs = [pb.StreamScoresRequest(batch=self.batch(site, row[None, :], [tid]))
                    for site, row in zip(sites, rows)]
            done = pb.StreamScoresRequest(complete=pb.CompleteComputations(trace_ids=[tid]))
            t0 = time.perf_counter()
            for r in reqs:
                q.put(r)
            q.put(done)
            while True:
                resp = next(call)
                if resp.WhichOneof("event") == "computation":
                    break
            t = time.perf_counter() - t0
            assert resp.computation.trace_id == tid and resp.computation.traces == len(sites), resp
            if i >= warmup:
                lat.append(t)
        self.close_stream(q, call)
        return lat

    def close(self):
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Flight:
    def __init__(self):
        import pyarrow as pa
        import pyarrow.flight as flight

        self.pa, self.flight = pa, flight
        self.proc = subprocess.Popen([sys.executable, __file__, "--flight-server"], stdout=subprocess.PIPE)
        port = int(self.proc.stdout.readline())
        self.client = flight.FlightClient(f"grpc://127.0.0.1:{port}")
        self.client.wait_for_available(timeout=30)

    def record_batch(self, arr, ids):
        pa = self.pa
        n, d = arr.shape
        values = pa.array(arr.reshape(-1))  # zero-copy from numpy
        act = pa.FixedSizeListArray.from_arrays(values, d)
        return pa.record_batch([pa.array(ids, pa.string()), act], names=["trace_id", "activation"])

    def batches(self, arr, prefix):
        return [self.record_batch(arr[i:i + ROWS_PER_BATCH],
                                  [f"{prefix}{j}" for j in range(i, min(i + ROWS_PER_BATCH, len(arr)))])
                for i in range(0, len(arr), ROWS_PER_BATCH)]

    def put(self, rbs, path=None):
        """Seconds to DoPut `rbs`: dropped by the server, or with `path` written to that Arrow
        IPC file and fsynced before the call ends."""
        cmd = b"sink" if path is None else b"file:" + str(path).encode()
        desc = self.flight.FlightDescriptor.for_command(cmd)
        t0 = time.perf_counter()
        writer, _ = self.client.do_put(desc, rbs[0].schema)
        for rb in rbs:
            writer.write_batch(rb)
        writer.close()  # half-closes and waits for the server to finish reading
        return time.perf_counter() - t0

    def put_ack_latency(self, rbs, warmup):
        desc = self.flight.FlightDescriptor.for_command(b"ack")
        writer, acks = self.client.do_put(desc, rbs[0].schema)
        lat = []
        for i, rb in enumerate(rbs):
            t0 = time.perf_counter()
            writer.write_batch(rb)
            acks.read()
            t = time.perf_counter() - t0
            if i >= warmup:
                lat.append(t)
        writer.close()
        return lat

    def exchange_latency(self, rbs, warmup):
        desc = self.flight.FlightDescriptor.for_command(b"echo")
        writer, reader = self.client.do_exchange(desc)
        writer.begin(rbs[0].schema)
        lat = []
        for i, rb in enumerate(rbs):
            t0 = time.perf_counter()
            writer.write_batch(rb)
            chunk = reader.read_chunk()
            t = time.perf_counter() - t0
            assert chunk.data.num_rows == rb.num_rows
            if i >= warmup:
                lat.append(t)
        writer.done_writing()
        try:
            while True:
                reader.read_chunk()
        except StopIteration:
            pass
        writer.close()
        return lat

    def close(self):
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=20)


# ---------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/release/actwatch"))
    ap.add_argument("--reps", type=int, default=3, help="ingest repetitions per case (median reported)")
    ap.add_argument("--lat-batches", type=int, default=300, help="timed batches per latency case")
    ap.add_argument("--ref-rows", type=int, default=6000, help="reference vectors of the latency monitor")
    ap.add_argument("--wide-ref-rows", type=int, default=2000,
                    help="reference computations of the 4-site d=4096 token-latency monitor")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument("--flight-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flight_server:
        flight_server_main()
        return 0

    cases = [("f32", 384, 50_000), ("bf16", 384, 50_000), ("f32", 4096, 5_000), ("bf16", 4096, 5_000)]
    if args.quick:
        cases = [(t, d, n // 10) for t, d, n in cases]
        args.reps, args.lat_batches, args.ref_rows, args.wide_ref_rows = 1, 40, 1500, 600
    warmup = 20 if not args.quick else 5
    rng = np.random.default_rng(0)

    aw = Actwatch(Path(args.bin))
    fl = Flight()
    rows = []  # (metric, case, actwatch, flight, flight2)
    try:
        # ---- ingest throughput
        for dtype, d, n in cases:
            arr = wire(n, d, dtype, rng)
            mb = arr.nbytes / 1e6
            fl_rbs = fl.batches(arr, "r")
            fl.put(fl_rbs[:4])  # warm the connection
            t_aw, t_fl, t_ipc = [], [], []
            for rep in range(args.reps):
                name = f"ingest-{dtype}-{d}-{rep}"
                aw.create(name)
                t_aw.append(aw.ingest(name, arr, "r"))
                t_fl.append(fl.put(fl_rbs))
                t_ipc.append(fl.put(fl_rbs, aw.tmp / "flight-probe.arrow"))
            t_disk = [disk_write(aw.tmp, arr, ROWS_PER_BATCH) for _ in range(args.reps)]
            ta, tf, td = statistics.median(t_aw), statistics.median(t_fl), statistics.median(t_disk)
            ti = statistics.median(t_ipc)
            case = f"ingest {dtype:>4} d={d:<4} {n} vec, {mb:.0f} MB"
            rows.append(("ingest MB/s", case, mb / ta, mb / tf, None))
            rows.append(("ingest vectors/s", case, n / ta, n / tf, None))
            rows.append(("ingest MB/s vs DoPut to a fsynced IPC file", case, mb / ta, mb / ti, None))
            rows.append(("disk MB/s (write + fsync)", case, mb / td, None, None))
            del fl_rbs, arr

        # ---- StreamScores latency
        d = 384
        aw.create("lat")
        ref = wire(args.ref_rows, d, "f32", rng)
        aw.ingest("lat", ref, "ref")
        t0 = time.perf_counter()
        report = aw.fit("lat")
        fit_s = time.perf_counter() - t0
        for b in (1, 16, 256):
            n = args.lat_batches + warmup
            arr = wire(n * b, d, "f32", rng)
            ids = [f"q{b}-{i}" for i in range(n * b)]
            aw_batches = [aw.batch("s", arr[i * b:(i + 1) * b], ids[i * b:(i + 1) * b]) for i in range(n)]
            fl_rbs = [fl.record_batch(arr[i * b:(i + 1) * b], ids[i * b:(i + 1) * b]) for i in range(n)]
            la = aw.stream_latency("lat", aw_batches, warmup)
            lp = fl.put_ack_latency(fl_rbs, warmup)
            lx = fl.exchange_latency(fl_rbs, warmup)
            for q in (50, 99):
                rows.append((f"latency p{q} ms", f"StreamScores batch={b:<3} f32 d=384",
                             pct(la, q) * 1e3, pct(lp, q) * 1e3, pct(lx, q) * 1e3))

        # ---- one token at 4 sites of width 4096 (a live monitor on a 4096-wide model)
        sites, dw = ["l8", "l16", "l24", "l32"], 4096
        aw.create("tok")
        wide_refs = [wire(args.wide_ref_rows, dw, "f32", rng) for _ in sites]
        for site, ref in zip(sites, wide_refs):
            aw.ingest("tok", ref, "c", site=site)
        t0 = time.perf_counter()
        wide_report = aw.fit("tok")
        wide_fit_s = time.perf_counter() - t0
        n = args.lat_batches + warmup
        tokens = [wire(len(sites), dw, "f32", rng) for _ in range(n)]
        lt = aw.token_latency("tok", tokens, sites, warmup)
        fl_rbs = [fl.record_batch(t, [f"t{i}"] * len(sites)) for i, t in enumerate(tokens)]
        lp = fl.put_ack_latency(fl_rbs, warmup)
        lx = fl.exchange_latency(fl_rbs, warmup)
        for q in (50, 99):
            rows.append((f"latency p{q} ms", "StreamScores 1 token x 4 sites f32 d=4096",
                         pct(lt, q) * 1e3, pct(lp, q) * 1e3, pct(lx, q) * 1e3))
        # The memory floor of that token's exact kNN: numpy (BLAS, all threads) multiplying each
        # site's row by the references kNN keeps there (the 3/4 not held out for calibration by
        # default), f32, the same tokens; what reading the references once costs on this machine.
        kept = [ref[: len(ref) * 3 // 4] for ref in wide_refs]
        floor = []
        for tok in tokens:
            t0 = time.perf_counter()
            for ref, row in zip(kept, tok):
                ref @ row
            floor.append(time.perf_counter() - t0)
        floor_mb = sum(k.nbytes for k in kept) / 1e6
        floor_ms = (pct(floor[warmup:], 50) * 1e3, pct(floor[warmup:], 99) * 1e3)
    finally:
        fl.close()
        aw.close()

    def fmt(x):
        if x is None:
            return "-"
        return f"{x:,.0f}" if x >= 1000 else (f"{x:,.1f}" if x >= 10 else f"{x:.3f}")

    hdr = ("metric", "case", "actwatch gRPC", "Flight DoPut", "Flight DoExchange echo", "actwatch / DoPut")
    body = []
    for metric, case, a, f, x in rows:
        body.append((metric, case, fmt(a), fmt(f), fmt(x), f"{a / f:.2f}x" if f else "-"))
    widths = [max(len(r[i]) for r in [hdr] + body) for i in range(len(hdr))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    print()
    print(line(hdr))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in body:
        print(line(r))
    print()
    print(f"Loopback, one client, {os.cpu_count()} CPUs; server: {args.bin} . Both sides driven from Python "
          f"(grpcio raw stubs / pyarrow.flight, payloads prebuilt), so the numbers include Python client overhead on both.")
    print(f"Ingest: {ROWS_PER_BATCH}-row batches, one stream per run, median of {args.reps}; MB = 1e6 bytes of "
          f"activations; actwatch time ends at the summary, sent after the rows are fsynced to Arrow IPC segments; disk: "
          f"the same bytes written in the same batches to one file beside the data directory, then fsynced; the "
          f"Flight server reads and drops the batches (no disk), or in the 'fsynced IPC file' rows appends them to an "
          f"Arrow IPC file beside the data directory and fsyncs it before DoPut returns. Flight carries bf16 as uint16.")
    print(f"Latency: one batch in flight at a time, {args.lat_batches} timed batches after {warmup} warm-up; monitor "
          f"fitted on {args.ref_rows} random f32 d=384 vectors, default detectors (fit {fit_s:.1f} s, "
          f"fit_version {report.fit_version}). Token case: {len(sites)} sites of d={dw}, each fitted on "
          f"{args.wide_ref_rows} random f32 vectors with the default detectors (fit {wide_fit_s:.1f} s, fit_version "
          f"{wide_report.fit_version}); actwatch: one row per site, then complete -> ComputationScore received; Flight: "
          f"the same 4 rows as one record batch. The token's floor: numpy multiplying each site's row by the "
          f"references exact kNN keeps there ({floor_mb:.0f} MB of f32, read once per token), took {floor_ms[0]:.2f} / "
          f"{floor_ms[1]:.2f} ms p50 / p99 in this run. actwatch: send batch -> TraceScores received; "
          f"DoPut: write_batch -> 1-byte ack; DoExchange: write_batch -> same batch echoed back. Ratio column: "
          f"actwatch / Flight DoPut (throughput: <1 is slower; latency: >1 is slower).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
