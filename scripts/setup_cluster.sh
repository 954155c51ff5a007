#!/usr/bin/env bash
# Sets up a Python venv for running actwatch inside Ray Data and Spark (PySpark): by default
# ~/.cache/actwatch-venv-cluster, one per machine (about 1.2 GB installed: ray and pyspark's bundled
# jars are most of it). Everything comes from PyPI; pyspark ships only as an sdist (pure Python plus
# its jars), which pip builds into a wheel once and caches. PySpark also needs a Java runtime
# (Spark 4 wants Java 17 or 21): a missing `java` is installed from Debian (openjdk-17-jre-headless)
# when running as root, otherwise this script stops. Idempotent: a complete venv is reused.
#
#   scripts/setup_cluster.sh              # create or reuse the venv, print the environment to use
#   eval "$(scripts/setup_cluster.sh)"    # ... and export it into the current shell
#
# Prints (stdout) `export ...` lines; progress goes to stderr. PYSPARK_PYTHON matters: without it
# Spark's Python workers run `python3` from PATH, not the venv, and fail to import pyarrow.
# Environment: PYTHON (interpreter for a new venv, default python3; 3.10 or newer),
# ACTWATCH_CLUSTER_VENV (venv path, e.g. .venv-cluster for one inside the checkout; `/.venv*/` is
# git-ignored).
set -euo pipefail

venv="${ACTWATCH_CLUSTER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/actwatch-venv-cluster}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Pinned, all in one place. ray[data] brings pandas and fsspec; ray[default] (dashboard, grpcio,
# opencensus, ...) is deliberately not installed (aiohttp alone is, see below). pyspark 4.3 brings py4j.
# pandas is pinned below 3 because pyspark 4.3 warns (FutureWarning, on every mapInArrow) that it does not
# fully support 3.x.
# aiohttp is not used, but without it ray.data.read_parquet over several paths fails at random: its
# listing threads race to import fsspec.implementations.http (which needs aiohttp), and the loser gets
# "ImportError: cannot import name 'HTTPFileSystem'" instead of the ModuleNotFoundError Ray catches.
requirements=(
  "numpy==2.4.6"
  "pyarrow==26.0.1"
  "pytest==9.2.0"
  "maturin==1.16.0"
  "ray[data]==2.60.0"
  "pyspark==4.3.0"
  "pandas==2.3.3"
  "aiohttp==3.14.5"
)
stamp="$venv/.actwatch-requirements"
wanted="$(printf '%s\n' "${requirements[@]}")"

# Java for PySpark.
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "java is missing: installing openjdk-17-jre-headless" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >&2
  else
    echo "error: PySpark needs Java 17 or 21 and \`java\` is not on PATH;" \
      "install it (Debian: apt-get install openjdk-17-jre-headless) or run this script as root" >&2
    exit 1
  fi
fi
java_major="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)"
if [ -z "$java_major" ] || [ "$java_major" -lt 17 ]; then
  echo "error: PySpark 4 needs Java 17 or newer; \`java\` is version ${java_major:-unknown}" >&2
  exit 1
fi
java_home="$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv" >&2
  fi
  echo "installing ${requirements[*]} (about 600 MB of downloads, most of it pyspark's sdist)" >&2
  # --only-binary for everything except pyspark, which PyPI has only as an sdist: nothing compiles.
  "$venv/bin/python" -m pip install --quiet --only-binary=:all: --no-binary=pyspark \
    "${requirements[@]}" >&2
  printf '%s\n' "$wanted" >"$stamp"
fi

"$venv/bin/python" - "${requirements[@]}" >&2 <<'EOF' || { echo "error: $venv does not match the pins" >&2; exit 1; }
import sys
from importlib.metadata import version
bad = []
for req in sys.argv[1:]:
    name, want = req.split("==")
    name = name.split("[")[0]
    got = version(name)
    if got != want:
        bad.append(f"{name} {got} (want {want})")
if bad:
    sys.exit("mismatched: " + ", ".join(bad))
EOF

echo "export ACTWATCH_CLUSTER_PYTHON=\"$venv/bin/python\""
echo "export PYSPARK_PYTHON=\"$venv/bin/python\""
echo "export PYSPARK_DRIVER_PYTHON=\"$venv/bin/python\""
echo "export JAVA_HOME=\"$java_home\""
echo "export SPARK_LOCAL_IP=127.0.0.1"
echo "export RAY_USAGE_STATS_ENABLED=0"
# Ray on Linux otherwise binds its runtime-env agent to the eth0 address even for a local ray.init();
# this (Ray's own macOS/Windows mode) makes the node address 127.0.0.1, so every Ray port is loopback.
echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
