#!/usr/bin/env bash
# Runs the whole mesh on this machine: a single-node etcd on loopback (data in .run/), the demo
# configuration where absent, two instances of each service, gateways on 127.0.0.1:50051 and
# 127.0.0.1:50052. Ctrl-C stops everything gracefully: the instances first (they drain, deregister
# and exit), etcd last, so that no instance loses etcd while it drains.
#
# Settings (environment): HERD_ETCD_PORT and HERD_ETCD_PEER_PORT (2379, 2380), HERD_GATEWAY_PORTS
# ("50051 50052"), HERD_RUN_DIR (.run: etcd's data, logs, and the pids of what was started),
# HERD_BIN_DIR (the debug binaries of the build). The gateways' private signing keys are in
# $HERD_RUN_DIR/secrets; every hop is mutual TLS, with development certificates in
# $HERD_RUN_DIR/certs (the CA kept from run to run, the certificates new on every run).
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN="${HERD_BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}"
RUN="${HERD_RUN_DIR:-.run}"
ETCD_PORT="${HERD_ETCD_PORT:-2379}"
ETCD_PEER_PORT="${HERD_ETCD_PEER_PORT:-2380}"
read -r -a GATEWAY_PORTS <<<"${HERD_GATEWAY_PORTS:-50051 50052}"
ETCD="http://127.0.0.1:${ETCD_PORT}"
mkdir -p "$RUN/logs"

pids=()
etcd_pid=""
stop() {
    trap - INT TERM EXIT
    echo
    echo "stopping the mesh..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "$etcd_pid" ]; then
        echo "stopping etcd..."
        kill -TERM "$etcd_pid" 2>/dev/null || true
        wait "$etcd_pid" 2>/dev/null || true
    fi
    echo "stopped."
}
trap stop INT TERM EXIT

if (exec 3<>"/dev/tcp/127.0.0.1/${ETCD_PORT}") 2>/dev/null; then
    echo "error: something already listens on 127.0.0.1:${ETCD_PORT}; set HERD_ETCD_PORT" >&2
    exit 1
fi
# In a session of its own: Ctrl-C signals the terminal's process group, and etcd must outlive the
# instances' drain; stop() ends it once they have exited.
setsid etcd --name herd-local --data-dir "$RUN/etcd" \
    --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster "herd-local=http://127.0.0.1:${ETCD_PEER_PORT}" \
    >"$RUN/logs/etcd.log" 2>&1 &
etcd_pid=$!

deadline=$((SECONDS + 20))
until ETCDCTL_API=3 etcdctl --endpoints "$ETCD" endpoint health >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
        echo "error: etcd did not become healthy; see $RUN/logs/etcd.log" >&2
        exit 1
    fi
    sleep 0.2
done
echo "etcd is up at $ETCD (data in $RUN/etcd)"

# The gateways' private signing keys: files, never etcd (the seed writes k1's here).
SECRETS="$RUN/secrets"
"$BIN/herdctl" --etcd "$ETCD" config seed --secrets "$SECRETS"
CERTS="$RUN/certs"
"$BIN/herdctl" certs init "$CERTS" >/dev/null

start() {
    local name=$1 listen=$2 log=$3
    "$BIN/herd-$name" --etcd "$ETCD" --listen "$listen" --secrets "$SECRETS" \
        --tls-cert "$CERTS/$name.pem" --tls-key "$CERTS/$name-key.pem" --tls-ca "$CERTS/ca.pem" \
        >"$RUN/logs/$log.log" 2>&1 &
    pids+=($!)
}
for i in 1 2; do
    start tax 127.0.0.1:0 "tax-$i"
    start currency 127.0.0.1:0 "currency-$i"
    start pricing 127.0.0.1:0 "pricing-$i"
done
for i in "${!GATEWAY_PORTS[@]}"; do
    start gateway "127.0.0.1:${GATEWAY_PORTS[$i]}" "gateway-$((i + 1))"
done
printf '%s\n' "$etcd_pid" "${pids[@]}" >"$RUN/pids"

deadline=$((SECONDS + 30))
for port in "${GATEWAY_PORTS[@]}"; do
    until grpcurl -cacert "$CERTS/ca.pem" -d '{"service":"herd.quote.v1.QuoteService"}' "127.0.0.1:$port" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; do
        if [ $SECONDS -ge $deadline ]; then
            echo "error: the gateway on port $port is not SERVING; see $RUN/logs/" >&2
            exit 1
        fi
        sleep 0.2
    done
done

"$BIN/herdctl" --etcd "$ETCD" instances
cat <<MSG

The mesh is up. Logs are in $RUN/logs/. Try:

  export JWT=\$($BIN/herdctl auth token --issuer-file $SECRETS/dev-issuer.json --tenant acme --subject alice --ttl 5m)
  grpcurl -cacert $CERTS/ca.pem 127.0.0.1:${GATEWAY_PORTS[0]} list
  grpcurl -cacert $CERTS/ca.pem -H "authorization: Bearer \$JWT" -d '{"context":{"tenantId":"acme"},"items":[{"sku":"hammer","quantity":3},{"sku":"apple","quantity":4}],"currency":"EUR","region":"US-CA"}' 127.0.0.1:${GATEWAY_PORTS[0]} herd.quote.v1.QuoteService/CreateQuote
  grpcurl -cacert $CERTS/ca.pem -H "authorization: Bearer \$JWT" -d '{"context":{"tenantId":"acme"},"token":"<token from CreateQuote>"}' 127.0.0.1:${GATEWAY_PORTS[-1]} herd.quote.v1.QuoteService/VerifyQuote
  $BIN/herdctl --etcd $ETCD instances

Press Ctrl-C to stop everything.
MSG

wait "${pids[@]}" "$etcd_pid" || true
