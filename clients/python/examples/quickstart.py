"""The README's walk-through: ingest MiniLM reference activations, fit, score, watch flags, query.

Start a server (`actwatch serve --data-dir ./actwatch-data`, in another terminal), then run
`python clients/python/examples/quickstart.py [ADDRESS] [DATA_DIR]`.
"""

import sys

import numpy as np
import pyarrow.parquet as pq

from actwatch_client import Client

address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
data = sys.argv[2] if len(sys.argv) > 2 else "../shared/data/minilm"
client = Client(address)
client.create_monitor("minilm", fpr=0.01)  # default: gaussian + knn at every site, a joint gaussian across sites


def batches(path):
    """One batch per layer of a file: site = layer, one computation per sentence id."""
    t = pq.read_table(path, columns=["id", "layer", "activation"]).to_pydict()
    for layer in (2, 4, 6):
        rows = [i for i, x in enumerate(t["layer"]) if x == layer]
        vectors = np.array([t["activation"][i] for i in rows], dtype=np.float32)
        yield str(layer), vectors, [t["id"][i] for i in rows]


print(client.ingest_reference("minilm", batches(f"{data}/train.parquet")))
print(client.fit("minilm", on_progress=print))  # progress, then the fit report

watch = client.watch_flags(["minilm"])  # flagged computations are pushed to every watcher
result = client.score("minilm", batches(f"{data}/dev_ood_code.parquet"))
flagged = [c for c in result.computations if c.flagged]
print(f"{len(flagged)} of {len(result.computations)} computations flagged")
first = next(iter(watch))
print("first flag pushed:", first.trace_id, first.p_value)
watch.cancel()
for c in client.query_scores("minilm", flagged_only=True, limit=3):
    print("logged:", c.trace_id, round(c.score, 2), c.p_value)
