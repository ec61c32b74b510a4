#!/usr/bin/env bash
# Generate the TLS files of a dgnh/Dask cluster: a private certificate authority and one
# certificate + key signed by it, used by the scheduler, the workers and the clients
# (Dask checks that a peer's certificate is signed by the CA; it does not check host names).
#
#   deploy/tls/make-certs.sh [OUTDIR] [DAYS]     (defaults: the directory of this script, 365)
#
# Writes OUTDIR/ca.pem (the CA certificate, public), OUTDIR/dask.pem (the certificate) and
# OUTDIR/dask-key.pem (its private key, mode 600). ca-key.pem, the CA's private key, is
# deleted: run the script again (and restart the cluster) to renew. Never commit the files.
set -euo pipefail
out=${1:-$(dirname "$0")}
days=${2:-365}
mkdir -p "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$days" \
    -subj "/CN=dgnh-dask-ca" -keyout "$tmp/ca-key.pem" -out "$out/ca.pem" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -sha256 -subj "/CN=dgnh-dask" \
    -keyout "$out/dask-key.pem" -out "$tmp/dask.csr" 2>/dev/null
printf '%s\n' "subjectAltName=DNS:scheduler,DNS:localhost,IP:127.0.0.1" \
    "extendedKeyUsage=serverAuth,clientAuth" > "$tmp/ext.cnf"
openssl x509 -req -sha256 -days "$days" -in "$tmp/dask.csr" -CA "$out/ca.pem" \
    -CAkey "$tmp/ca-key.pem" -CAserial "$tmp/ca.srl" -CAcreateserial -extfile "$tmp/ext.cnf" \
    -out "$out/dask.pem" 2>/dev/null
chmod 644 "$out/ca.pem" "$out/dask.pem"
chmod 600 "$out/dask-key.pem"
echo "wrote $out/ca.pem, $out/dask.pem and $out/dask-key.pem"
