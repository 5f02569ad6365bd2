#!/usr/bin/env bash
# Certificates for mutual TLS between the tiers without cert-manager (k8s/components/mtls):
# a private CA, the inference tier's server certificate (the names the front door dials it by)
# and the front door's client certificate, written to DIR under the Secrets' key names:
#
#   DIR/kimivl-inference-tls/{tls.crt,tls.key,ca.crt}
#   DIR/kimivl-preprocess-client-tls/{tls.crt,tls.key,ca.crt}
#
# then, from the same directory (the CA key stays in DIR/ca; keep it out of the cluster):
#
#   kubectl -n NAMESPACE create secret generic kimivl-inference-tls --from-file=DIR/kimivl-inference-tls
#   kubectl -n NAMESPACE create secret generic kimivl-preprocess-client-tls --from-file=DIR/kimivl-preprocess-client-tls
#
# Usage: scripts/mtls_certs.sh DIR [NAMESPACE (kimivl)] [DAYS (90)]
# Run again with the same DIR to renew the leaves with the same CA (and `kubectl create ...
# --dry-run=client -o yaml | kubectl apply -f -` to update the Secrets in place: the tiers take
# up the new files without a restart).
set -euo pipefail

dir=${1:?usage: $0 DIR [NAMESPACE] [DAYS]}
ns=${2:-kimivl}
days=${3:-90}
mkdir -p "$dir/ca" "$dir/kimivl-inference-tls" "$dir/kimivl-preprocess-client-tls"
umask 077

ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

if [ ! -f "$dir/ca/ca.key" ]; then
  ec "$dir/ca/ca.key"
  openssl req -x509 -new -key "$dir/ca/ca.key" -sha256 -days 3650 -subj "/CN=kimivl internal CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca/ca.crt"
fi

# leaf NAME CN EXTENSIONS: a key and a certificate signed by the CA, into DIR/NAME
leaf() {
  local out="$dir/$1" ext
  ext=$(mktemp)
  printf '%s\n' "$3" >"$ext"
  ec "$out/tls.key.new"
  openssl req -new -key "$out/tls.key.new" -subj "/CN=$2" -out "$out/tls.csr"
  openssl x509 -req -in "$out/tls.csr" -CA "$dir/ca/ca.crt" -CAkey "$dir/ca/ca.key" -CAcreateserial \
    -sha256 -days "$days" -extfile "$ext" -out "$out/tls.crt.new"
  rm -f "$ext" "$out/tls.csr"
  mv "$out/tls.key.new" "$out/tls.key"
  mv "$out/tls.crt.new" "$out/tls.crt"
  cp "$dir/ca/ca.crt" "$out/ca.crt"
}

leaf kimivl-inference-tls kimivl-inference "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:kimivl-inference,DNS:kimivl-inference.$ns.svc,DNS:kimivl-inference.$ns.svc.cluster.local"
leaf kimivl-preprocess-client-tls kimivl-preprocess "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"

echo "wrote $dir/kimivl-inference-tls and $dir/kimivl-preprocess-client-tls (CA: $dir/ca)"
