#!/usr/bin/env bash
# What herd's layers cost: the reference mesh served by plain tonic (herd-raw, no herd layers)
# and by herd (etcd, discovery, p2c, health, context, tracing), one instance per service, the same
# call graph. The load generator runs on CPU 0, every server on CPU 1. Each figure is measured
# RUNS times (default 5); the script prints median, min and max, and the ratios mesh/raw.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-5}"
DURATION="${DURATION:-5}"
WARMUP="${WARMUP:-2}"
CONCURRENCY="${CONCURRENCY:-32}"
BIN="${CARGO_TARGET_DIR:-target}/release"
# PARTS picks what to run (for iterating on one part): any of ceiling raw herd tracing startup.
PARTS="${PARTS:-ceiling raw herd tracing startup}"
part() { [[ " $PARTS " == *" $1 "* ]]; }
CONFIG=deploy/bench/config
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT

cargo build --release -q --workspace --bins

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# exec: started in the background, the recorded pid is the server's own.
on_servers() { exec taskset -c 1 "$@"; }
on_load() { taskset -c 0 "$@"; }

wait_serving() { # address
    for _ in $(seq 1 200); do
        if grpcurl -plaintext -d '{"service":""}' "$1" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then return 0; fi
        sleep 0.05
    done
    echo "error: $1 never reported SERVING" >&2
    return 1
}

field() { grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }

load() { # target, then herd-bench flags
    local target=$1; shift
    on_load "$BIN/herd-bench" --target "$target" --connections 4 --duration "$DURATION" --warmup "$WARMUP" --output json "$@"
}

cpu_ticks() { # pids...: user+system clock ticks of those processes
    local total=0
    for pid in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    echo "$total"
}

peak_rss_mb() { # pid: VmHWM in MB
    awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"
}

stats() { # label unit values...: median, min, max
    local label=$1 unit=$2; shift 2
    printf '%s\n' "$@" | sort -g | awk -v l="$label" -v u="$unit" '{v[NR]=$1} END {printf "%-44s median %10.2f %s  min %10.2f  max %10.2f  (%d runs)\n", l, v[int((NR+1)/2)], u, v[1], v[NR], NR}'
}
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

start_raw() {
    local tax cur pri; tax=$(free_port); cur=$(free_port); pri=$(free_port); GATEWAY=127.0.0.1:$(free_port)
    on_servers "$BIN/herd-raw" --role tax --listen "127.0.0.1:$tax" --config "$CONFIG" & PIDS+=($!)
    on_servers "$BIN/herd-raw" --role currency --listen "127.0.0.1:$cur" --config "$CONFIG" & PIDS+=($!)
    sleep 0.3
    on_servers "$BIN/herd-raw" --role pricing --listen "127.0.0.1:$pri" --config "$CONFIG" --tax "127.0.0.1:$tax" --currency "127.0.0.1:$cur" & PIDS+=($!)
    sleep 0.3
    on_servers "$BIN/herd-raw" --role gateway --listen "$GATEWAY" --config "$CONFIG" --pricing "127.0.0.1:$pri" & PIDS+=($!)
    SERVERS=("${PIDS[@]}")
    sleep 0.5
}

start_etcd() {
    local client peer; client=$(free_port); peer=$(free_port)
    ETCD="http://127.0.0.1:$client"
    on_servers etcd --name bench --data-dir "$WORK/etcd-$client" --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "bench=http://127.0.0.1:$peer" >"$WORK/etcd.log" 2>&1 & PIDS+=($!)
    for _ in $(seq 1 100); do ETCDCTL_API=3 etcdctl --endpoints "$ETCD" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
    "$BIN/herdctl" --etcd "$ETCD" config apply "$CONFIG"/*.json >/dev/null
}

start_herd() { # extra environment assignments for the services
    start_etcd
    local etcd_pid=${PIDS[-1]}
    GATEWAY=127.0.0.1:$(free_port)
    for s in tax currency pricing; do
        env "$@" RUST_LOG=warn taskset -c 1 "$BIN/herd-$s" --etcd "$ETCD" >"$WORK/$s.log" 2>&1 & PIDS+=($!)
    done
    env "$@" RUST_LOG=warn taskset -c 1 "$BIN/herd-gateway" --etcd "$ETCD" --listen "$GATEWAY" >"$WORK/gateway.log" 2>&1 & PIDS+=($!)
    SERVERS=()
    for pid in "${PIDS[@]}"; do [ "$pid" != "$etcd_pid" ] && SERVERS+=("$pid"); done
    wait_serving "$GATEWAY"
    # Every downstream instance must be in its callers' balancers before measuring.
    for _ in $(seq 1 100); do
        grpcurl -plaintext -d '{"context":{"tenantId":"bench"},"items":[{"sku":"widget","quantity":1}],"currency":"EUR","region":"US-CA"}' \
            "$GATEWAY" herd.quote.v1.QuoteService/CreateQuote >/dev/null 2>&1 && break
        sleep 0.1
    done
}

# Saturation and half-load runs against $GATEWAY; sets SAT, P50, P99, CPU_US, RSS arrays.
measure() { # label rate
    local label=$1 rate=$2 out
    SAT=(); P50=(); P99=(); CPU_US=()
    for _ in $(seq 1 "$RUNS"); do
        local before; before=$(cpu_ticks "${SERVERS[@]}")
        out=$(load "$GATEWAY" --concurrency "$CONCURRENCY")
        local after; after=$(cpu_ticks "${SERVERS[@]}")
        local calls; calls=$(echo "$out" | field calls)
        SAT+=("$(echo "$out" | field throughput)")
        # Ticks are 1/100 s; the warm-up's calls are not counted, so this slightly overstates.
        CPU_US+=("$(awk -v t=$((after - before)) -v c="$calls" -v d="$DURATION" -v w="$WARMUP" 'BEGIN {printf "%.1f", t * 10000 / (c * (d + w) / d)}')")
    done
    if [ "$rate" != "-" ]; then
        for _ in $(seq 1 "$RUNS"); do
            out=$(load "$GATEWAY" --rate "$rate")
            P50+=("$(echo "$out" | field p50_us)")
            P99+=("$(echo "$out" | field p99_us)")
        done
    fi
    RSS=()
    for pid in "${SERVERS[@]}"; do RSS+=("$(peak_rss_mb "$pid")"); done
    echo "== $label"
    stats "throughput at saturation (closed/$CONCURRENCY)" "ok/s" "${SAT[@]}"
    if [ "$rate" != "-" ]; then
        stats "p50 at $rate calls/s" "µs" "${P50[@]}"
        stats "p99 at $rate calls/s" "µs" "${P99[@]}"
    fi
    stats "server CPU time per request (all services)" "µs" "${CPU_US[@]}"
    echo "peak RSS per instance (MB): ${RSS[*]}"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F)"

# The ceiling: a plain tonic hello-world (health Check) server.
if part ceiling; then
HELLO=127.0.0.1:$(free_port)
on_servers "$BIN/herd-raw" --role hello --listen "$HELLO" & PIDS+=($!)
sleep 0.3
H=()
for _ in $(seq 1 "$RUNS"); do H+=("$(load "$HELLO" --method health --concurrency "$CONCURRENCY" | field throughput)"); done
echo "== ceiling"
stats "plain tonic hello-world throughput" "ok/s" "${H[@]}"
cleanup
fi

RAW_SAT=; RAW_P50=; RAW_P99=; RAW_CPU=; HALF=${HALF:--}
if part raw; then
start_raw
measure "raw (plain tonic, no herd layers)" -
RAW_SAT=$(median "${SAT[@]}")
HALF=$(awk -v c="$RAW_SAT" 'BEGIN {printf "%d", c / 2}')
measure "raw at half its capacity" "$HALF" >/dev/null
RAW_P50=$(median "${P50[@]}"); RAW_P99=$(median "${P99[@]}"); RAW_CPU=$(median "${CPU_US[@]}")
echo "== raw at $HALF calls/s"; stats "p50" "µs" "${P50[@]}"; stats "p99" "µs" "${P99[@]}"
cleanup
fi

MESH_SAT=; MESH_P50=; MESH_P99=; MESH_CPU=
if part herd; then
start_herd
measure "herd (no exporter)" "$HALF"
MESH_SAT=$(median "${SAT[@]}"); MESH_P50=$(median "${P50[@]}"); MESH_P99=$(median "${P99[@]}"); MESH_CPU=$(median "${CPU_US[@]}")
[ "$HALF" = - ] && MESH_P50= && MESH_P99=
cleanup
fi

if part tracing; then
SINK=127.0.0.1:$(free_port)
for ratio in 0.01 1; do
    on_servers "$BIN/herd-raw" --role sink --listen "$SINK" & PIDS+=($!)
    start_herd OTEL_EXPORTER_OTLP_ENDPOINT="http://$SINK" OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG="$ratio"
    measure "herd, tracing sampled at $ratio" "$HALF"
    cleanup
done
fi

# Start-up: from exec to SERVING, as the instance logs it.
if part startup; then
start_etcd
T=()
for _ in $(seq 1 "$RUNS"); do
    started=$(date +%s.%N)
    RUST_LOG=info "$BIN/herd-tax" --etcd "$ETCD" >"$WORK/startup.log" 2>&1 & pid=$!
    for _ in $(seq 1 200); do grep -q ' serving ' "$WORK/startup.log" && break; sleep 0.01; done
    serving=$(grep -m1 ' serving ' "$WORK/startup.log" | cut -d' ' -f1)
    T+=("$(awk -v s="$started" -v t="$(date -d "$serving" +%s.%N)" 'BEGIN {printf "%.1f", (t - s) * 1000}')")
    kill -TERM "$pid"; wait "$pid" || true
done
echo "== start-up"
stats "process start to SERVING (herd-tax)" "ms" "${T[@]}"
cleanup
fi

ratio() { # label mesh raw [goal]
    [ -n "$2" ] && [ -n "$3" ] && awk -v m="$2" -v r="$3" -v l="$1" -v g="${4:-}" 'BEGIN {printf "%-36s %.2f%s\n", l, m / r, g}' || true
}
echo "== ratios (medians)"
ratio "throughput mesh/raw at saturation:" "$MESH_SAT" "$RAW_SAT" " (goal >= 0.90)"
ratio "p50 mesh/raw at half load:" "$MESH_P50" "$RAW_P50"
ratio "p99 mesh/raw at half load:" "$MESH_P99" "$RAW_P99" " (goal <= 1.25)"
ratio "CPU per request mesh/raw:" "$MESH_CPU" "$RAW_CPU"
