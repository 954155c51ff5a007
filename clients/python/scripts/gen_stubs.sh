#!/usr/bin/env bash
# Regenerates the committed gRPC/protobuf stubs in actwatch_client/_proto/ from ../../proto.
#
# Usage: clients/python/scripts/gen_stubs.sh   (from anywhere; uses $PYTHON, else the venv's python)
# Needs grpcio-tools (pip install grpcio-tools). After regenerating, raise the grpcio/protobuf lower
# bounds in pyproject.toml if the generated files demand newer runtimes (they check at import).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
proto_root="$(cd "$here/../../proto" && pwd)"
out="$here/actwatch_client/_proto"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"

mkdir -p "$out/actwatch/v1"
rm -f "$out"/actwatch/v1/actwatch_pb2*.py "$out"/actwatch/v1/actwatch_pb2*.pyi

"$python" -m grpc_tools.protoc \
  -I "$proto_root" \
  --python_out="$out" \
  --pyi_out="$out" \
  --grpc_python_out="$out" \
  "$proto_root/actwatch/v1/actwatch.proto"

# protoc writes absolute imports (`from actwatch.v1 import actwatch_pb2`), which only work with
# _proto/ on sys.path. Make them relative so the stubs work inside the package.
sed -i -E 's/^from actwatch\.v1 import (actwatch_pb2)/from . import \1/' \
  "$out/actwatch/v1/actwatch_pb2_grpc.py"

for d in "$out" "$out/actwatch" "$out/actwatch/v1"; do
  [ -f "$d/__init__.py" ] || echo '"""Generated code: see scripts/gen_stubs.sh."""' > "$d/__init__.py"
done

"$python" - <<PY
import re, sys
sys.path.insert(0, "$here")
from actwatch_client._proto.actwatch.v1 import actwatch_pb2, actwatch_pb2_grpc  # noqa: F401
src = open("$out/actwatch/v1/actwatch_pb2.py").read()
m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)", src)
g = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", open("$out/actwatch/v1/actwatch_pb2_grpc.py").read())
print("stubs OK; need protobuf >= %s, grpcio >= %s" % (".".join(m.groups()) if m else "?", g.group(1) if g else "?"))
PY
