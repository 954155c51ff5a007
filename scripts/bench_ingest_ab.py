#!/usr/bin/env python3
"""A/B of two server binaries on IngestReference throughput (the ingest path's before and after).

Not a test: prints one line per case. Run it as ``scripts/bench_service.sh --ingest-ab A_BIN B_BIN
[ROUNDS]`` (venv as for scripts/bench_service.py, whose client, payloads and 256-row batches it
reuses). Starts both servers (each idle while the other is measured), then in ROUNDS interleaved
rounds (default 6, the order flipped every round so that the machine's drift falls on both alike)
ingests into a new monitor of each the cases of bench_service.py: f32 and bf16 at d = 384 (50,000
vectors) and d = 4,096 (5,000). Prints per case and binary the median MB/s (1e6 bytes of
activations; the time ends at the summary, sent once the segments are fsynced) and the server's
median CPU time per MB (user + system, from /proc/<pid>/stat around each stream).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service as bs  # noqa: E402

CASES = [(384, "f32", 50000), (384, "bf16", 50000), (4096, "f32", 5000), (4096, "bf16", 5000)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: bench_ingest_ab.py A_BIN B_BIN [ROUNDS]")
    bins = {"A": Path(sys.argv[1]), "B": Path(sys.argv[2])}
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    os.environ["ACTWATCH_METRICS_LISTEN"] = "off"  # two servers: no shared metrics port
    servers = {}
    try:
        for k, b in bins.items():
            servers[k] = bs.Actwatch(b)
        rng = np.random.default_rng(0)
        data = {c: bs.wire(c[2], c[0], c[1], rng) for c in CASES}
        wall = {(c, k): [] for c in CASES for k in bins}
        cpu = {(c, k): [] for c in CASES for k in bins}
        n = 0
        for r in range(rounds):
            for c in CASES:
                for k in (list(bins) if r % 2 == 0 else list(bins)[::-1]):
                    aw = servers[k]
                    name = f"ab{n}"
                    n += 1
                    aw.create(name)
                    before = cpu_seconds(aw.proc.pid)
                    wall[(c, k)].append(aw.ingest(name, data[c], "r"))
                    cpu[(c, k)].append(cpu_seconds(aw.proc.pid) - before)
                    # Deleted at once, so that the runs' segments do not pile up on the disk.
                    aw.stub.DeleteMonitor(aw.pb.DeleteMonitorRequest(name=name))
        print(f"A = {bins['A']}\nB = {bins['B']}\n{rounds} rounds, medians")
        for c in CASES:
            mb = data[c].nbytes / 1e6
            line = f"ingest {c[1]:>4} d={c[0]:<5}{mb:4.0f} MB:"
            for k in bins:
                t = float(np.median(wall[(c, k)]))
                s = float(np.median(cpu[(c, k)]))
                line += f"  {k} {mb / t:5.0f} MB/s, server {1e3 * s / mb:.2f} ms CPU/MB;"
            ta = float(np.median(wall[(c, 'A')]))
            tb = float(np.median(wall[(c, 'B')]))
            print(f"{line}  B/A {ta / tb:.2f}x", flush=True)
    finally:
        for aw in servers.values():
            aw.close()


if __name__ == "__main__":
    main()
