#!/usr/bin/env bash
# Internal PKI for the compose deployment: one CA, one certificate per service (mTLS between
# services), the MongoDB replica-set key file, and a client certificate for operators.
#
#   compose/certs.sh [OUT_DIR]        (default: compose/certs; `make certs`)
#   OTPGATE_PUBLIC_HOSTNAME=api.example.com compose/certs.sh     (name on the edge's public cert)
#
# Existing files are kept (re-running is safe); delete OUT_DIR to issue everything anew.
# Every leaf certificate carries both serverAuth and clientAuth: a service presents the same
# certificate when it serves and when it calls another service (and in its healthcheck).
set -euo pipefail

OUT="${1:-$(cd "$(dirname "$0")" && pwd)/certs}"
DAYS_CA="${OTPGATE_CA_DAYS:-3650}"
DAYS_LEAF="${OTPGATE_CERT_DAYS:-397}"
SERVICES=(edge delivery verification directory botgateway)
# uid/gid of the otpgate user in the image (compose/Dockerfile) and of mongod in the mongo image
SERVICE_UID="${OTPGATE_UID:-10001}"
# the blackbox exporter image runs as nobody
MONITORING_UID="${OTPGATE_MONITORING_UID:-65534}"

command -v openssl >/dev/null || { echo "certs.sh: openssl is required" >&2; exit 1; }
mkdir -p "$OUT"
cd "$OUT"
umask 077

if [[ ! -s ca.key || ! -s ca.crt ]]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days "$DAYS_CA" -subj "/O=otpgate/CN=otpgate internal CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt
  echo "certs.sh: created CA $OUT/ca.crt"
fi

issue() {  # issue NAME SAN
  local name="$1" san="$2"
  if [[ -s "$name.crt" && -s "$name.key" ]] && openssl verify -CAfile ca.crt "$name.crt" >/dev/null 2>&1; then
    return
  fi
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$name.key"
  openssl req -new -key "$name.key" -subj "/O=otpgate/CN=$name" -out "$name.csr"
  cat >"$name.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EXT
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$DAYS_LEAF" \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
  echo "certs.sh: issued $OUT/$name.crt ($san)"
}

for svc in "${SERVICES[@]}"; do
  issue "$svc" "DNS:$svc,DNS:otpgate-$svc,DNS:localhost,IP:127.0.0.1"
done
issue operator "DNS:operator"
# The edge's public listeners (gRPC 50051, HTTP 8080) for trials: replace it with a certificate of a
# public CA in production (OTPGATE_PUBLIC_CERT / OTPGATE_PUBLIC_KEY in compose/.env).
PUBLIC_HOSTNAME="${OTPGATE_PUBLIC_HOSTNAME:-localhost}"
PUBLIC_SAN="DNS:edge,DNS:localhost,IP:127.0.0.1"
[[ "$PUBLIC_HOSTNAME" == localhost ]] || PUBLIC_SAN="DNS:$PUBLIC_HOSTNAME,$PUBLIC_SAN"
issue edge-public "$PUBLIC_SAN"
# The Prometheus blackbox exporter probes every service's gRPC health through mTLS with this one.
issue monitoring "DNS:monitoring"

if [[ ! -s mongo-keyfile ]]; then
  openssl rand -base64 756 | tr -d '\n' >mongo-keyfile
  echo "certs.sh: created $OUT/mongo-keyfile"
fi

# The service containers run as the non-root user $SERVICE_UID and need to read their own key.
# As root, hand each service key to that user (0400); otherwise leave it readable (0644) and keep
# the folder itself private (0700): containers get single files bind-mounted, the host sees nothing.
chmod 0644 ca.crt ./*.crt
chmod 0600 ca.key operator.key mongo-keyfile
for svc in "${SERVICES[@]}" edge-public monitoring; do
  if [[ "$(id -u)" == "0" ]]; then
    if [[ "$svc" == monitoring ]]; then chown "$MONITORING_UID" "$svc.key"; else chown "$SERVICE_UID:$SERVICE_UID" "$svc.key"; fi
    chmod 0400 "$svc.key"
  else
    chmod 0644 "$svc.key"
  fi
done
chmod 0700 .
echo "certs.sh: certificates in $OUT are ready"
