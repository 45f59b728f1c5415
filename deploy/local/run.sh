#!/usr/bin/env bash
# Runs the whole mesh on this machine: etcd on loopback (one member, or a cluster of three; data
# in .run/), the demo configuration where absent, two instances of each service, gateways on
# 127.0.0.1:50051 and 127.0.0.1:50052. Ctrl-C stops everything gracefully: the instances first
# (they drain, deregister and exit), etcd last, so that no instance loses etcd while it drains.
#
# Settings (environment): ETCD_MEMBERS (1, or 3 for a three-member cluster), HERD_ETCD_PORTS and
# HERD_ETCD_PEER_PORTS (one port per member: "2379" and "2380", or for three members
# "2379 22379 32379" and "2380 22380 32380"), HERD_GATEWAY_PORTS ("50051 50052"),
# HERD_METRICS_PORTS (each instance's Prometheus endpoint, in start order: tax, currency, pricing,
# tax, currency, pricing, gateway, gateway; "9471 9472 9473 9474 9475 9476 9477 9478", the targets
# of deploy/prometheus/prometheus.yml), HERD_RUN_DIR
# (.run: etcd's data, logs, and the pids of what was started), HERD_BIN_DIR (the debug binaries
# of the build). The gateways' private signing keys are in $HERD_RUN_DIR/secrets; every hop is
# mutual TLS, with development certificates in $HERD_RUN_DIR/certs (the CA kept from run to run,
# the certificates new on every run).
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN="${HERD_BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}"
RUN="${HERD_RUN_DIR:-.run}"
MEMBERS="${ETCD_MEMBERS:-1}"
case "$MEMBERS" in
    1) default_ports="2379"; default_peers="2380" ;;
    3) default_ports="2379 22379 32379"; default_peers="2380 22380 32380" ;;
    *) echo "error: ETCD_MEMBERS is 1 or 3, got $MEMBERS" >&2; exit 64 ;;
esac
read -r -a ETCD_PORTS <<<"${HERD_ETCD_PORTS:-$default_ports}"
read -r -a ETCD_PEER_PORTS <<<"${HERD_ETCD_PEER_PORTS:-$default_peers}"
if [ "${#ETCD_PORTS[@]}" -ne "$MEMBERS" ] || [ "${#ETCD_PEER_PORTS[@]}" -ne "$MEMBERS" ]; then
    echo "error: HERD_ETCD_PORTS and HERD_ETCD_PEER_PORTS need one port per member ($MEMBERS)" >&2
    exit 64
fi
read -r -a GATEWAY_PORTS <<<"${HERD_GATEWAY_PORTS:-50051 50052}"
read -r -a METRICS_PORTS <<<"${HERD_METRICS_PORTS:-9471 9472 9473 9474 9475 9476 9477 9478}"
if [ "${#METRICS_PORTS[@]}" -ne $((6 + ${#GATEWAY_PORTS[@]})) ]; then
    echo "error: HERD_METRICS_PORTS needs one port per instance ($((6 + ${#GATEWAY_PORTS[@]})))" >&2
    exit 64
fi
endpoints=(); cluster=(); names=()
for i in $(seq 0 $((MEMBERS - 1))); do
    endpoints+=("http://127.0.0.1:${ETCD_PORTS[$i]}")
    name="herd-$i"; [ "$MEMBERS" -eq 1 ] && name="herd-local"
    names+=("$name")
    cluster+=("$name=http://127.0.0.1:${ETCD_PEER_PORTS[$i]}")
done
# Every member's endpoint, as --etcd takes them.
ETCD=$(IFS=,; echo "${endpoints[*]}")
mkdir -p "$RUN/logs"

pids=()
etcd_pids=()
stop() {
    trap - INT TERM EXIT
    echo
    echo "stopping the mesh..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "${#etcd_pids[@]}" -gt 0 ]; then
        echo "stopping etcd..."
        for pid in "${etcd_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for pid in "${etcd_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    fi
    echo "stopped."
}
trap stop INT TERM EXIT

for port in "${ETCD_PORTS[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
        echo "error: something already listens on 127.0.0.1:${port}; set HERD_ETCD_PORTS" >&2
        exit 1
    fi
done
# Each member in a session of its own: Ctrl-C signals the terminal's process group, and etcd must
# outlive the instances' drain; stop() ends it once they have exited.
for i in $(seq 0 $((MEMBERS - 1))); do
    data="$RUN/etcd"; [ "$MEMBERS" -gt 1 ] && data="$RUN/etcd-$i"
    setsid etcd --name "${names[$i]}" --data-dir "$data" \
        --listen-client-urls "${endpoints[$i]}" --advertise-client-urls "${endpoints[$i]}" \
        --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORTS[$i]}" \
        --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORTS[$i]}" \
        --initial-cluster "$(IFS=,; echo "${cluster[*]}")" \
        >"$RUN/logs/etcd-$i.log" 2>&1 &
    etcd_pids+=($!)
done

deadline=$((SECONDS + 20))
until ETCDCTL_API=3 etcdctl --endpoints "$ETCD" endpoint health >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
        echo "error: etcd did not become healthy; see $RUN/logs/etcd-*.log" >&2
        exit 1
    fi
    sleep 0.2
done
echo "etcd is up at $ETCD ($MEMBERS member(s), data in $RUN/)"

# The gateways' private signing keys: files, never etcd (the seed writes k1's here).
SECRETS="$RUN/secrets"
"$BIN/herdctl" --etcd "$ETCD" config seed --secrets "$SECRETS"
CERTS="$RUN/certs"
# herdctl's own certificate: `config status` asks every instance over mutual TLS.
"$BIN/herdctl" certs init "$CERTS" --services gateway,pricing,tax,currency,herdctl >/dev/null

started=0
start() {
    local name=$1 listen=$2 log=$3
    local metrics="127.0.0.1:${METRICS_PORTS[$started]}"
    started=$((started + 1))
    "$BIN/herd-$name" --etcd "$ETCD" --listen "$listen" --secrets "$SECRETS" --metrics-listen "$metrics" \
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
printf '%s\n' "${etcd_pids[@]}" "${pids[@]}" >"$RUN/pids"

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
  printf %s "\$JWT" > $RUN/token.jwt
  $BIN/herd-caller --etcd $ETCD --tls-ca $CERTS/ca.pem --token-file $RUN/token.jwt --quotes 3
  $BIN/herdctl --etcd $ETCD --tls-cert $CERTS/herdctl.pem --tls-key $CERTS/herdctl-key.pem --tls-ca $CERTS/ca.pem config status

Each instance serves Prometheus metrics on http://127.0.0.1:<port>/metrics, ports ${METRICS_PORTS[*]}
(deploy/prometheus/prometheus.yml scrapes them; deploy/grafana/ has the dashboard).

Press Ctrl-C to stop everything.
MSG

wait "${pids[@]}" "${etcd_pids[@]}" || true
