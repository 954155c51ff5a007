#!/usr/bin/env bash
# Writes the TLS fixtures of the tests (tests/data/tls): a CA, a server certificate for localhost /
# 127.0.0.1 and a client certificate (for mTLS), each signed by the CA, valid for 100 years.
# TEST ONLY: their private keys are public, in this repository. Rerun to replace them.
set -euo pipefail
cd "$(dirname "$0")/../tests/data/tls"
days=36500
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=actwatch test CA" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
issue() { # name, subject CN, extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue server localhost "subjectAltName=DNS:localhost,IP:127.0.0.1
basicConstraints=critical,CA:FALSE
extendedKeyUsage=serverAuth"
issue client "actwatch test client" "basicConstraints=critical,CA:FALSE
extendedKeyUsage=clientAuth"
rm -f ca.srl ca.key
echo "wrote $(pwd): ca.pem, server.pem/.key, client.pem/.key" >&2
