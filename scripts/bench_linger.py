#!/usr/bin/env python3
"""A/B of the server's compute linger (`actwatch serve --compute-linger-ms`) on StreamScores latency.

Not a test: prints one table. Run it as ``scripts/bench_service.sh --linger-ab [ROUNDS]`` (release
build and venv as for scripts/bench_service.py, whose client and cases it reuses). Starts one server
per linger setting (0 ms, off, and the default; both idle while the other is measured), fits on each
the monitors of bench_service.py's latency cases (one token at 4 sites of width 4,096, 2,000 random
references each; 6,000 random d=384 references for the 1-, 16- and 256-vector batches), then in
ROUNDS interleaved rounds (default 4; per round and server 100 tokens and 200 batches of each size,
after 20 warm-up) measures each case, so that the machine's drift falls on both alike. Prints p50 / p90 /
p99 per case and setting over all rounds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service as bs  # noqa: E402

SITES, WIDE = ["l8", "l16", "l24", "l32"], 4096


def start(binary: Path, linger_ms: str | None) -> bs.Actwatch:
    env = {"ACTWATCH_METRICS_LISTEN": "off"}
    if linger_ms is not None:
        env["ACTWATCH_COMPUTE_LINGER_MS"] = linger_ms
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        aw = bs.Actwatch(binary)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rng = np.random.default_rng(1)
    aw.create("tok")
    for site in SITES:
        aw.ingest("tok", bs.wire(2000, WIDE, "f32", rng), "c", site=site)
    aw.fit("tok")
    aw.create("lat")
    aw.ingest("lat", bs.wire(6000, 384, "f32", rng), "ref")
    aw.fit("lat")
    return aw


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    binary = Path(os.environ.get("ACTWATCH_BIN") or bs.ROOT / "target/release/actwatch")
    servers = [("linger 0 (off)", start(binary, "0")), ("linger default", start(binary, None))]
    cases = ["1 token x 4 sites d=4096", "batch=1 d=384", "batch=16 d=384", "batch=256 d=384"]
    lat = {name: {c: [] for c in cases} for name, _ in servers}
    rng = np.random.default_rng(2)
    for r in range(rounds):
        for name, aw in servers:
            tokens = [bs.wire(len(SITES), WIDE, "f32", rng) for _ in range(120)]
            lat[name][cases[0]] += aw.token_latency("tok", tokens, SITES, 20)
            for case, b in zip(cases[1:], (1, 16, 256)):
                n = 220
                arr = bs.wire(n * b, 384, "f32", rng)
                ids = [f"r{r}-{b}-{i}" for i in range(n * b)]
                batches = [aw.batch("s", arr[i * b:(i + 1) * b], ids[i * b:(i + 1) * b]) for i in range(n)]
                lat[name][case] += aw.stream_latency("lat", batches, 20)
        print(f"round {r + 1} of {rounds} done", file=sys.stderr, flush=True)
    print("| case | setting | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---:|---:|---:|")
    for case in cases:
        for name, _ in servers:
            xs = lat[name][case]
            print(f"| {case} | {name} | {bs.pct(xs, 50) * 1e3:.2f} | {bs.pct(xs, 90) * 1e3:.2f} | "
                  f"{bs.pct(xs, 99) * 1e3:.2f} |")
    print(f"\n{rounds} interleaved rounds; {os.cpu_count()} CPUs; binary {binary}.")
    for _, aw in servers:
        aw.close()


if __name__ == "__main__":
    main()
