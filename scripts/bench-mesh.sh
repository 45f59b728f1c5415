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
# BIN: the binaries to measure (a copy of an earlier build's, to compare two builds in pairs);
# unset, the workspace's release build, built first.
BIN="${BIN:-}"
# PARTS picks what to run (for iterating on one part): any of ceiling mesh tls tracing metrics
# startup overload.
PARTS="${PARTS:-ceiling mesh tls tracing metrics startup overload}"
if [ -n "${PERF_DIR:-}" ] && ! command -v perf >/dev/null; then
    echo "PERF_DIR needs perf (Debian's linux-perf)" >&2
    exit 1
fi
part() { [[ " $PARTS " == *" $1 "* ]]; }
# shellcheck source=scripts/goals.sh
. scripts/goals.sh
HALF="${HALF:--}" # the fixed rate of half-load runs; the mesh part sets it from the raw capacity
CONFIG=deploy/bench/config
# The benchmark's quote-signing private key (its public key is in $CONFIG/keys.json): for benchmarks only.
SECRETS=deploy/bench/secrets
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
# The tracing part's sink is stopped apart (after the instances), or here if the script stops.
trap 'cleanup; [ -n "${sink_pid:-}" ] && kill -TERM "$sink_pid" 2>/dev/null; rm -rf "$WORK"' EXIT

if [ -z "$BIN" ]; then
    BIN="${CARGO_TARGET_DIR:-target}/release"
    cargo build --release -q --workspace --bins
fi

# Every quote carries a bearer token from the benchmark issuer (deploy/bench/issuer.json; its
# public key is in deploy/bench/config/auth.json), which herd and herd-raw both verify.
HERD_BENCH_AUTHORIZATION="Bearer $("$BIN/herdctl" auth token --issuer-file deploy/bench/issuer.json --tenant bench --subject bench --ttl 1h)"
export HERD_BENCH_AUTHORIZATION

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# exec: started in the background, the recorded pid is the server's own.
on_servers() { exec taskset -c 1 "$@"; }
on_load() { taskset -c 0 "$@"; }

# With TLS_DIR set (certificates as `herdctl certs init` writes them), every hop of both meshes is
# mutual TLS and the load generator speaks TLS to the gateway.
TLS_DIR=""
transport() { if [ -n "$TLS_DIR" ]; then echo "-cacert $TLS_DIR/ca.pem"; else echo "-plaintext"; fi; }

wait_serving() { # address
    for _ in $(seq 1 200); do
        # shellcheck disable=SC2046
        if grpcurl $(transport) -d '{"service":""}' "$1" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then return 0; fi
        sleep 0.05
    done
    echo "error: $1 never reported SERVING" >&2
    return 1
}

wait_listening() { # host:port — the raw servers have no health service
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; then return 0; fi
        sleep 0.02
    done
    echo "error: nothing listens on $1" >&2
    return 1
}

field() { grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }

load() { # target, then herd-bench flags
    local target=$1; shift
    local tls=(); [ -n "$TLS_DIR" ] && tls=(--tls-ca "$TLS_DIR/ca.pem")
    on_load "$BIN/herd-bench" --target "$target" --connections "${CONNECTIONS:-4}" --duration "$DURATION" --warmup "$WARMUP" --output json "${tls[@]}" "$@"
}

cpu_ticks() { # pids...: user+system clock ticks of those processes
    local total=0 pid ticks
    for pid in "$@"; do
        # A server that exited during a run is reported (with the instances' logs), not summed.
        if ! ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null); then
            echo "error: server process $pid exited during the run" >&2
            tail -n 20 "$WORK"/*.log >&2 2>/dev/null || true
            return 1
        fi
        total=$((total + ticks))
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
    local tax cur pri tls=(); tax=$(free_port); cur=$(free_port); pri=$(free_port); GATEWAY=127.0.0.1:$(free_port)
    [ -n "$TLS_DIR" ] && tls=(--tls-dir "$TLS_DIR")
    on_servers "$BIN/herd-raw" --role tax --listen "127.0.0.1:$tax" --config "$CONFIG" "${tls[@]}" & PIDS+=($!)
    on_servers "$BIN/herd-raw" --role currency --listen "127.0.0.1:$cur" --config "$CONFIG" "${tls[@]}" & PIDS+=($!)
    wait_listening "127.0.0.1:$tax"
    wait_listening "127.0.0.1:$cur"
    on_servers "$BIN/herd-raw" --role pricing --listen "127.0.0.1:$pri" --config "$CONFIG" --tax "127.0.0.1:$tax" --currency "127.0.0.1:$cur" "${tls[@]}" & PIDS+=($!)
    wait_listening "127.0.0.1:$pri"
    on_servers "$BIN/herd-raw" --role gateway --listen "$GATEWAY" --config "$CONFIG" --secrets "$SECRETS" --pricing "127.0.0.1:$pri" "${tls[@]}" & PIDS+=($!)
    SERVERS=("${PIDS[@]}")
    wait_listening "$GATEWAY"
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

start_herd() { # extra environment assignments for the services; METRICS=1: each serves /metrics
    start_etcd
    local first=${#PIDS[@]}
    GATEWAY=127.0.0.1:$(free_port)
    METRICS_URLS=()
    tls_of() { [ -n "$TLS_DIR" ] && echo "--tls-cert $TLS_DIR/$1.pem --tls-key $TLS_DIR/$1-key.pem --tls-ca $TLS_DIR/ca.pem"; }
    # Sets METRICS_FLAG for the next service and records its URL (not in a $(...) subshell, whose
    # assignments would be lost).
    metrics_of() {
        METRICS_FLAG=()
        [ -n "${METRICS:-}" ] || return 0
        local address; address=127.0.0.1:$(free_port)
        METRICS_URLS+=("http://$address/metrics")
        METRICS_FLAG=(--metrics-listen "$address")
    }
    for s in tax currency pricing; do
        metrics_of
        # shellcheck disable=SC2046
        env "$@" RUST_LOG="${HERD_LOG:-warn}" taskset -c 1 "$BIN/herd-$s" --etcd "$ETCD" $(tls_of "$s") "${METRICS_FLAG[@]}" >"$WORK/$s.log" 2>&1 & PIDS+=($!)
    done
    metrics_of
    # shellcheck disable=SC2046
    env "$@" RUST_LOG="${HERD_LOG:-warn}" taskset -c 1 "$BIN/herd-gateway" --etcd "$ETCD" --listen "$GATEWAY" --secrets "$SECRETS" $(tls_of gateway) "${METRICS_FLAG[@]}" >"$WORK/gateway.log" 2>&1 & PIDS+=($!)
    SERVERS=("${PIDS[@]:first}")
    wait_serving "$GATEWAY"
    # Every downstream instance must be in its callers' balancers before measuring.
    for _ in $(seq 1 100); do
        # shellcheck disable=SC2046
        grpcurl $(transport) -H "authorization: $HERD_BENCH_AUTHORIZATION" -d '{"context":{"tenantId":"bench"},"items":[{"sku":"widget","quantity":1}],"currency":"EUR","region":"US-CA"}' \
            "$GATEWAY" herd.quote.v1.QuoteService/CreateQuote >/dev/null 2>&1 && break
        sleep 0.1
    done
}

# CPU µs per call: TICKS (1/100 s) spent over warm-up and measurement, CALLS counted over the
# measurement only (scaled up to the whole run), printed with DECIMALS decimals.
us_per_call() { # ticks calls decimals
    awk -v t="$1" -v c="$2" -v d="$DURATION" -v w="$WARMUP" -v p="$3" 'BEGIN {printf "%.*f", p, t * 10000 / (c * (d + w) / d)}'
}

# One saturation run: prints throughput and server CPU µs per request.
sat_run() { # gateway server-pids...
    local gateway=$1 before after out calls; shift
    before=$(cpu_ticks "$@")
    # PERF_DIR=dir: each saturation run's servers are profiled (perf on CPU 0, call graphs), into
    # dir/BINARY.N.data, the run's calls in dir/BINARY.N.calls (BINARY: the first server's, herd-raw or herd-tax).
    local perf_pid="" profile=""
    if [ -n "${PERF_DIR:-}" ]; then
        mkdir -p "$PERF_DIR"
        profile="$PERF_DIR/$(basename "$(readlink "/proc/$1/exe")").$(date +%s%N)"
        taskset -c 0 perf record -q -F 999 -g -p "$(IFS=,; echo "$*")" -o "$profile.data" >/dev/null 2>&1 & perf_pid=$!
    fi
    out=$(load "$gateway" --concurrency "$CONCURRENCY")
    [ -z "$perf_pid" ] || { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
    after=$(cpu_ticks "$@")
    calls=$(echo "$out" | field calls)
    [ -z "$profile" ] || echo "$calls" >"$profile.calls"
    echo "$(echo "$out" | field throughput) $(us_per_call $((after - before)) "$calls" 1)"
}

# One fixed-rate run: prints p50 and p99 in µs.
half_run() { # gateway rate
    local out; out=$(load "$1" --rate "$2")
    echo "$(echo "$out" | field p50_us) $(echo "$out" | field p99_us)"
}

# Saturation and half-load runs against $GATEWAY; sets SAT, P50, P99, CPU_US, RSS arrays.
measure() { # label rate
    local label=$1 rate=$2 sat cpu p50 p99
    SAT=(); P50=(); P99=(); CPU_US=()
    for _ in $(seq 1 "$RUNS"); do
        read -r sat cpu < <(sat_run "$GATEWAY" "${SERVERS[@]}")
        SAT+=("$sat"); CPU_US+=("$cpu")
    done
    if [ "$rate" != "-" ]; then
        for _ in $(seq 1 "$RUNS"); do
            read -r p50 p99 < <(half_run "$GATEWAY" "$rate")
            P50+=("$p50"); P99+=("$p99")
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

ratio_of() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F)"

# The ceiling: a plain tonic hello-world (health Check) server.
if part ceiling; then
HELLO=127.0.0.1:$(free_port)
on_servers "$BIN/herd-raw" --role hello --listen "$HELLO" & PIDS+=($!)
wait_listening "$HELLO"
H=()
for _ in $(seq 1 "$RUNS"); do H+=("$(load "$HELLO" --method health --concurrency "$CONCURRENCY" | field throughput)"); done
echo "== ceiling"
stats "plain tonic hello-world throughput" "ok/s" "${H[@]}"
cleanup
fi

# Raw and herd in pairs taken back to back, so that both see the same machine (it drifts over
# minutes) and each ratio compares two neighbouring runs. Only one mesh runs at a time, started
# fresh for each run: a saturation run, then a run at half the raw saturation throughput of the
# same pair.
# Raw and herd in pairs, as the comparisons below take them; LABEL names the setting.
pairs() {
    LABEL=$1
    R_SAT=(); R_CPU=(); H_SAT=(); H_CPU=(); SAT_RATIO=(); CPU_RATIO=()
    R_P50=(); R_P99=(); H_P50=(); H_P99=(); P50_RATIO=(); P99_RATIO=(); RATES=()
    for _ in $(seq 1 "$RUNS"); do
        start_raw
        read -r rs rc < <(sat_run "$GATEWAY" "${SERVERS[@]}")
        HALF=$(awk -v c="$rs" 'BEGIN {printf "%d", c / 2}')
        read -r r50 r99 < <(half_run "$GATEWAY" "$HALF")
        RAW_RSS=(); for pid in "${SERVERS[@]}"; do RAW_RSS+=("$(peak_rss_mb "$pid")"); done
        cleanup
        start_herd
        read -r hs hc < <(sat_run "$GATEWAY" "${SERVERS[@]}")
        read -r h50 h99 < <(half_run "$GATEWAY" "$HALF")
        HERD_RSS=(); for pid in "${SERVERS[@]}"; do HERD_RSS+=("$(peak_rss_mb "$pid")"); done
        cleanup
        RATES+=("$HALF")
        R_SAT+=("$rs"); R_CPU+=("$rc"); H_SAT+=("$hs"); H_CPU+=("$hc")
        R_P50+=("$r50"); R_P99+=("$r99"); H_P50+=("$h50"); H_P99+=("$h99")
        SAT_RATIO+=("$(ratio_of "$hs" "$rs")"); CPU_RATIO+=("$(ratio_of "$hc" "$rc")")
        P50_RATIO+=("$(ratio_of "$h50" "$r50")"); P99_RATIO+=("$(ratio_of "$h99" "$r99")")
    done
    HALF=$(median "${RATES[@]}")
    for mesh in raw herd; do
        if [ $mesh = raw ]; then
            echo "== raw (plain tonic, no herd layers)$LABEL"
            stats "throughput at saturation (closed/$CONCURRENCY)" "ok/s" "${R_SAT[@]}"
            stats "p50 at half load (~$HALF calls/s)" "µs" "${R_P50[@]}"; stats "p99 at half load" "µs" "${R_P99[@]}"
            stats "server CPU time per request (all services)" "µs" "${R_CPU[@]}"
            rss=("${RAW_RSS[@]}")
        else
            echo "== herd (no exporter)$LABEL"
            stats "throughput at saturation (closed/$CONCURRENCY)" "ok/s" "${H_SAT[@]}"
            stats "p50 at half load (~$HALF calls/s)" "µs" "${H_P50[@]}"; stats "p99 at half load" "µs" "${H_P99[@]}"
            stats "server CPU time per request (all services)" "µs" "${H_CPU[@]}"
            rss=("${HERD_RSS[@]}")
        fi
        echo "peak RSS per instance (MB, last run): ${rss[*]}"
    done
    echo "== ratios herd/raw$LABEL (each of two back-to-back runs; half-load rates: ${RATES[*]} calls/s)"
    stats "throughput at saturation (goal >= 0.95)" "" "${SAT_RATIO[@]}"
    stats "p50 at half the raw capacity" "" "${P50_RATIO[@]}"
    stats "p99 at half the raw capacity (goal <= 1.25)" "" "${P99_RATIO[@]}"
    stats "server CPU time per request" "" "${CPU_RATIO[@]}"
    goal "herd/raw throughput$LABEL" "$(median "${SAT_RATIO[@]}")" ge 0.95
    goal "herd/raw p99 at half load$LABEL" "$(median "${P99_RATIO[@]}")" le 1.25
    cleanup
}

if part mesh; then
pairs ""
fi

# The same pairs with mutual TLS on every hop: herd's rustls seam against tonic's own TLS (the
# same rustls, ring), certificates from herdctl certs init; then what a connection costs, each
# call on a connection of its own (TCP, the TLS 1.3 handshake, HTTP/2's preface, a health check).
if part tls; then
TLS_DIR="$WORK/certs"
"$BIN/herdctl" certs init "$TLS_DIR" --services gateway,pricing,tax,currency,hello >/dev/null
mesh_half=$HALF
pairs ", mutual TLS"
HALF=$mesh_half
connect_rate() { # target, then herd-bench flags
    load "$1" --method connect --concurrency "${HANDSHAKE_CONCURRENCY:-4}" "${@:2}" | field throughput
}
RG=(); HG=(); HT=(); PG=()
for _ in $(seq 1 "$RUNS"); do
    # Plain tonic's hello world over its TLS: herd-raw's gateway serves no health service.
    HELLO=127.0.0.1:$(free_port)
    on_servers "$BIN/herd-raw" --role hello --listen "$HELLO" --tls-dir "$TLS_DIR" & PIDS+=($!)
    wait_listening "$HELLO"
    RG+=("$(connect_rate "$HELLO")"); cleanup
    start_herd
    HG+=("$(connect_rate "$GATEWAY")")
    tax=$(ETCDCTL_API=3 etcdctl --endpoints "$ETCD" get --prefix /herd/services/tax/ --print-value-only | grep -o '"address":"[^"]*"' | cut -d'"' -f4 | head -1)
    HT+=("$(connect_rate "$tax" --tls-cert "$TLS_DIR/gateway.pem" --tls-key "$TLS_DIR/gateway-key.pem")")
    cleanup
    saved=$TLS_DIR; TLS_DIR=""; start_herd; PG+=("$(connect_rate "$GATEWAY")"); cleanup; TLS_DIR=$saved
done
echo "== new connections per second (closed/${HANDSHAKE_CONCURRENCY:-4}; each: TCP, TLS 1.3 handshake, one health check)"
stats "plain tonic server, its TLS, no client cert" "conn/s" "${RG[@]}"
stats "herd gateway, mTLS, no client certificate" "conn/s" "${HG[@]}"
stats "herd tax, mTLS, client certificate verified" "conn/s" "${HT[@]}"
stats "herd gateway, plaintext (no handshake)" "conn/s" "${PG[@]}"
TLS_DIR=""
cleanup
fi

# What tracing costs: per run, a fresh herd mesh without an exporter, then one for each sampling
# ratio exporting into an OTLP sink (which counts and discards; it runs on the load generator's
# core, as a collector would run elsewhere), each measured at saturation and at half the untraced
# capacity of the same run. Ratios are taken within a run. Every instance logs, as it stops, how
# many spans it exported, failed to export and dropped. Figures go to $TRACING_DATA;
# scripts/tracing-chart.sh draws them.
if part tracing; then
RATIOS="${RATIOS:-0.01 0.1 1}"
TRACING_DATA="${TRACING_DATA:-bench/tracing.dat}"
TRACING_CHART="${TRACING_CHART:-docs/tracing.svg}"
mkdir -p "$(dirname "$TRACING_DATA")"
span_count() { # field of the instances' "span export stopped" lines, summed
    cat "$WORK"/{gateway,pricing,tax,currency}.log | grep "span export stopped" | grep -o "$1=[0-9]*" | cut -d= -f2 | awk '{s += $1} END {print s + 0}'
}
ROWS=()
for run in $(seq 1 "$RUNS"); do
    start_herd
    read -r sat0 cpu0 < <(sat_run "$GATEWAY" "${SERVERS[@]}")
    half=$(awk -v c="$sat0" 'BEGIN {printf "%d", c / 2}')
    read -r p50 p99 < <(half_run "$GATEWAY" "$half")
    cleanup
    ROWS+=("0 $run $sat0 $cpu0 $p50 $p99 $half 0 0 0 0")
    for ratio in $RATIOS; do
        # The sink outlives the instances (it is not in PIDS): stopped after them, it says how
        # many spans it received, which must be what they say they exported.
        SINK=127.0.0.1:$(free_port)
        # exec: the recorded pid is the sink's own.
        (exec taskset -c 0 "$BIN/herd-raw" --role sink --listen "$SINK" >"$WORK/sink.log" 2>&1) & sink_pid=$!
        wait_listening "$SINK"
        HERD_LOG="warn,herd::telemetry::export=info" start_herd OTEL_METRICS_EXPORTER=none OTEL_EXPORTER_OTLP_ENDPOINT="http://$SINK" OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG="$ratio"
        read -r sat cpu < <(sat_run "$GATEWAY" "${SERVERS[@]}")
        read -r p50 p99 < <(half_run "$GATEWAY" "$half")
        cleanup
        kill -TERM "$sink_pid"; wait "$sink_pid" || true; sink_pid=
        received=$(grep -o 'spans received: [0-9]*' "$WORK/sink.log" | grep -o '[0-9]*$' || echo 0)
        ROWS+=("$ratio $run $sat $cpu $p50 $p99 $half $(span_count exported_spans) $(span_count dropped_spans) $(span_count failed_spans) $received")
        echo "tracing run $run: sampled $ratio: ${ROWS[-1]}" >&2
    done
done
{
    echo "# ratio run saturation_ok_s cpu_us_per_request p50_us p99_us half_load_per_s spans_exported spans_dropped spans_failed spans_received"
    printf '%s\n' "${ROWS[@]}"
} >"$TRACING_DATA"
echo "== tracing ($RUNS runs; each ratio against the untraced mesh of the same run; half load ~$half calls/s in the last)"
col() { printf '%s\n' "${ROWS[@]}" | awk -v r="$1" -v f="$2" '$1 == r {print $f}'; }
against() { # ratio field: that field over the untraced one, per run
    local ratio=$1 f=$2
    printf '%s\n' "${ROWS[@]}" | awk -v r="$ratio" -v f="$f" '$1 == 0 {base[$2] = $f} $1 == r {printf "%.3f\n", $f / base[$2]}'
}
for ratio in 0 $RATIOS; do
    label="sampled $ratio"; [ "$ratio" = 0 ] && label="no exporter"
    # shellcheck disable=SC2046
    stats "$label: throughput at saturation" "ok/s" $(col "$ratio" 3)
    # shellcheck disable=SC2046
    stats "$label: server CPU per request" "µs" $(col "$ratio" 4)
    # shellcheck disable=SC2046
    stats "$label: p99 at half load" "µs" $(col "$ratio" 6)
    [ "$ratio" = 0 ] && continue
    # shellcheck disable=SC2046
    stats "$label / none: CPU per request" "" $(against "$ratio" 4)
    # shellcheck disable=SC2046
    stats "$label / none: throughput" "" $(against "$ratio" 3)
    # shellcheck disable=SC2046
    stats "$label / none: p99 at half load" "" $(against "$ratio" 6)
    echo "$label: spans exported $(col "$ratio" 8 | paste -sd' '), dropped $(col "$ratio" 9 | paste -sd' '), failed $(col "$ratio" 10 | paste -sd' '), received by the sink $(col "$ratio" 11 | paste -sd' ') (per run)"
done
# shellcheck disable=SC2046
goal "tracing 1 %: CPU per request / untraced" "$(median $(against 0.01 4))" le 1.03
# shellcheck disable=SC2046
goal "tracing 100 %: CPU per request / untraced" "$(median $(against 1 4))" le 1.25
# shellcheck disable=SC2046
goal "tracing 100 %: throughput / untraced" "$(median $(against 1 3))" ge 0.80
# shellcheck disable=SC2046
goal "tracing 100 %: p99 at half load / untraced" "$(median $(against 1 6))" le 1.25
goal "tracing: spans dropped" "$(printf '%s\n' "${ROWS[@]}" | awk '$1 != 0 {d += $9} END {print d + 0}')" le 0
goal "tracing: spans the sink did not receive" "$(printf '%s\n' "${ROWS[@]}" | awk '$1 != 0 {m += $8 - $11} END {print m + 0}')" le 0
if command -v gnuplot >/dev/null 2>&1; then scripts/tracing-chart.sh "$TRACING_DATA" "$TRACING_CHART"; fi
cleanup
fi

# What golden metrics cost: the mesh without them and with every instance serving /metrics, scraped
# every second during the run (Prometheus scrapes every 15 s by default), in pairs whose order
# alternates from run to run (the machine drifts). Saturation only: throughput and server CPU per
# request, ratios within each pair.
if part metrics; then
METRICS_DATA="${METRICS_DATA:-bench/metrics.dat}"
mkdir -p "$(dirname "$METRICS_DATA")"
scraper() { # urls...: scrapes each every second until killed; prints the scrapes that failed
    exec taskset -c 0 python3 -c '
import signal, sys, time, urllib.request
failed = 0
def stop(*_):
    print(failed); sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    for url in sys.argv[1:]:
        try:
            urllib.request.urlopen(url, timeout=2).read()
        except Exception:
            failed += 1
    time.sleep(1)
' "$@"
}
metrics_run() { # on|off: prints throughput and CPU per request
    if [ "$1" = on ]; then
        METRICS=1 start_herd
        scraper "${METRICS_URLS[@]}" >"$WORK/scrapes" & scraper_pid=$!
    else
        start_herd
    fi
    sat_run "$GATEWAY" "${SERVERS[@]}"
    if [ "$1" = on ]; then
        kill -TERM "$scraper_pid"; wait "$scraper_pid" || true
        [ "$(cat "$WORK/scrapes")" = 0 ] || echo "metrics: $(cat "$WORK/scrapes") scrapes failed" >&2
    fi
    cleanup
}
ROWS=()
for run in $(seq 1 "$RUNS"); do
    order="off on"; [ $((run % 2)) = 0 ] && order="on off"
    for m in $order; do
        metrics_run "$m" >"$WORK/metrics_run"
        read -r sat cpu <"$WORK/metrics_run"
        ROWS+=("$m $run $sat $cpu")
    done
    echo "metrics run $run: ${ROWS[-2]} | ${ROWS[-1]}" >&2
done
{
    echo "# metrics run saturation_ok_s cpu_us_per_request"
    printf '%s
' "${ROWS[@]}"
} >"$METRICS_DATA"
echo "== metrics ($RUNS pairs; each against the mesh without metrics of the same pair)"
mcol() { printf '%s
' "${ROWS[@]}" | awk -v m="$1" -v f="$2" '$1 == m {print $f}'; }
mratio() { printf '%s
' "${ROWS[@]}" | awk -v f="$1" '$1 == "off" {base[$2] = $f} $1 == "on" {on[$2] = $f} END {for (r in on) printf "%.3f\n", on[r] / base[r]}'; }
# shellcheck disable=SC2046
stats "without metrics: throughput at saturation" "ok/s" $(mcol off 3)
# shellcheck disable=SC2046
stats "without metrics: server CPU per request" "µs" $(mcol off 4)
# shellcheck disable=SC2046
stats "with metrics: throughput at saturation" "ok/s" $(mcol on 3)
# shellcheck disable=SC2046
stats "with metrics: server CPU per request" "µs" $(mcol on 4)
# shellcheck disable=SC2046
stats "with / without: throughput (goal >= 0.97)" "" $(mratio 3)
# shellcheck disable=SC2046
stats "with / without: CPU per request (goal <= 1.03)" "" $(mratio 4)
# shellcheck disable=SC2046
goal "metrics: throughput with / without" "$(median $(mratio 3))" ge 0.97
# shellcheck disable=SC2046
goal "metrics: CPU per request with / without" "$(median $(mratio 4))" le 1.03
cleanup
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

# Overload: open-loop load at multiples of the raw mesh's capacity, for raw and for herd, each
# level on a fresh mesh (raw, then herd, back to back). Goodput is successful calls per second
# (answered OK within the deadline), p99 that of the successful calls, RSS the largest peak of the
# four instances. Figures go to $OVERLOAD_DATA; scripts/overload-chart.sh draws them.
if part overload; then
LEVELS="${LEVELS:-0.5 1 2 4 8}"
OVERLOAD_RUNS="${OVERLOAD_RUNS:-3}"
OVERLOAD_MESHES="${OVERLOAD_MESHES:-raw herd}" # the meshes offered each level (both capacities are measured)
DEADLINE_MS="${DEADLINE_MS:-1000}"
OVERLOAD_DATA="${OVERLOAD_DATA:-bench/overload.dat}"
OVERLOAD_CHART="${OVERLOAD_CHART:-docs/overload.svg}"
mkdir -p "$(dirname "$OVERLOAD_DATA")"
max_rss_mb() { local m=0; for pid in "$@"; do m=$(awk -v a="$m" -v b="$(peak_rss_mb "$pid")" 'BEGIN {print (b > a) ? b : a}'); done; echo "$m"; }
refused() { grep -o '"failed":{[^}]*}' | grep -o '[0-9]\+' | awk '{s += $1} END {print s + 0}'; }
# url: the p99 of the successful quotes the gateway served, as it timed them (from its
# rpc_server_duration histogram: the upper bound of the bucket that holds the 99th percentile).
served_p99() {
    python3 -c '
import re, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=2).read().decode()
buckets = []
for line in text.splitlines():
    if line.startswith("rpc_server_duration_seconds_bucket{") and "CreateQuote" in line and "rpc_grpc_status_code=\"0\"" in line:
        le = re.search("le=\"([^\"]+)\"", line).group(1)
        buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
buckets.sort()
total = buckets[-1][1] if buckets else 0
print(next((f"{le * 1000:g} ms" for le, n in buckets if n >= 0.99 * total), "none") if total else "none")
' "$1" 2>/dev/null || echo "unknown"
}
overload_run() { # mesh rate: prints goodput p99_us rss_mb refused lag_p99_us gateway_cpu
    local out rss before after gateway
    "start_$1"
    gateway=${SERVERS[-1]}
    before=$(cpu_ticks "$gateway")
    out=$(load "$GATEWAY" --rate "$2" --timeout-ms "$DEADLINE_MS")
    after=$(cpu_ticks "$gateway")
    rss=$(max_rss_mb "${SERVERS[@]}")
    # METRICS=1: the gateway's own p99 of what it served, beside the caller's (warm-up included).
    if [ "$1" = herd ] && [ -n "${METRICS:-}" ]; then
        echo "overload: herd at $2 calls/s: the gateway's own p99 of its successes $(served_p99 "${METRICS_URLS[-1]}"), the caller's $(echo "$out" | field p99_us) µs" >&2
    fi
    cleanup
    # What failed, by status (refusals, and calls that ran out their deadline), for the log.
    echo "overload: $1 at $2 calls/s failed $(echo "$out" | grep -o '"failed":{[^}]*}' | sed 's/"failed"://'), for example $(echo "$out" | grep -o '"failed_example":{[^}]*}' | sed 's/"failed_example"://')" >&2
    # gateway_cpu: the share of its core the gateway used over warm-up and measurement.
    echo "$(echo "$out" | field throughput) $(echo "$out" | field p99_us) $rss $(echo "$out" | refused) $(echo "$out" | field start_lag_p99_us) $(awk -v t=$((after - before)) -v d="$((DURATION + WARMUP))" 'BEGIN {printf "%.2f", t / 100 / d}')"
}
ROWS=(); raw_caps=(); herd_caps=()
for run in $(seq 1 "$OVERLOAD_RUNS"); do
    start_raw; read -r raw_cap _ < <(sat_run "$GATEWAY" "${SERVERS[@]}"); cleanup
    start_herd; read -r herd_cap _ < <(sat_run "$GATEWAY" "${SERVERS[@]}"); cleanup
    raw_caps+=("$raw_cap"); herd_caps+=("$herd_cap")
    for level in $LEVELS; do
        rate=$(awk -v c="$raw_cap" -v l="$level" 'BEGIN {printf "%d", c * l}')
        for mesh in $OVERLOAD_MESHES; do
            cap=$raw_cap; [ $mesh = herd ] && cap=$herd_cap
            read -r good p99 rss refused lag gwcpu < <(overload_run $mesh "$rate")
            ROWS+=("$mesh $level $run $rate $cap $good $p99 $rss $refused $lag $gwcpu")
            echo "overload run $run: $mesh at ${level}x ($rate calls/s): $good ok/s of capacity $cap, p99 $p99 µs, refused $refused, peak RSS $rss MB, start lag p99 $lag µs, gateway CPU $gwcpu" >&2
        done
    done
done
{
    echo "# mesh level run offered_per_s capacity_ok_s goodput_ok_s p99_us peak_rss_mb refused start_lag_p99_us gateway_cpu"
    printf '%s\n' "${ROWS[@]}"
} >"$OVERLOAD_DATA"
echo "== overload (open loop, deadline $DEADLINE_MS ms, $OVERLOAD_RUNS runs; each level on fresh meshes)"
for mesh in $OVERLOAD_MESHES; do
    for level in $LEVELS; do
        mine() { printf '%s\n' "${ROWS[@]}" | awk -v m=$mesh -v l="$level" -v f="$1" '$1 == m && $2 == l {print $f}'; }
        share=(); while read -r g c; do share+=("$(awk -v g="$g" -v c="$c" 'BEGIN {printf "%.3f", g / c}')"); done < <(printf '%s\n' "${ROWS[@]}" | awk -v m=$mesh -v l="$level" '$1 == m && $2 == l {print $6, $5}')
        # shellcheck disable=SC2046
        stats "$mesh at ${level}x: goodput/capacity" "" "${share[@]}"
        # shellcheck disable=SC2046
        stats "$mesh at ${level}x: p99 of successes" "µs" $(mine 7)
        # shellcheck disable=SC2046
        stats "$mesh at ${level}x: peak RSS (largest instance)" "MB" $(mine 8)
    done
done
herd_share() { printf '%s\n' "${ROWS[@]}" | awk -v l="$1" '$1 == "herd" && $2 == l {printf "%.3f\n", $6 / $5}'; }
herd_col() { printf '%s\n' "${ROWS[@]}" | awk -v l="$1" -v f="$2" '$1 == "herd" && $2 == l {print $f}'; }
# Goals only for what ran (LEVELS may leave levels out, OVERLOAD_MESHES may leave herd out).
herd_ran() { [[ " $OVERLOAD_MESHES " == *" herd "* ]] && [[ " $LEVELS " == *" $1 "* ]]; }
# shellcheck disable=SC2046
herd_ran 2 && goal "overload: herd goodput/capacity at 2x" "$(median $(herd_share 2))" ge 0.90
# shellcheck disable=SC2046
herd_ran 8 && goal "overload: herd goodput/capacity at 8x" "$(median $(herd_share 8))" ge 0.85
# shellcheck disable=SC2046
herd_ran 2 && herd_ran 0.5 && goal "overload: herd p99 of successes at 2x / at 0.5x" "$(awk -v a="$(median $(herd_col 2 7))" -v b="$(median $(herd_col 0.5 7))" 'BEGIN {printf "%.2f", a / b}')" le 3
[ -z "$(printf '%s\n' "${ROWS[@]}" | awk '$1 == "herd"')" ] || goal "overload: herd peak RSS, largest instance (MB)" "$(printf '%s\n' "${ROWS[@]}" | awk '$1 == "herd" && $8 > m {m = $8} END {print m + 0}')" le 30
if [ "${#ROWS[@]}" -gt 0 ] && command -v gnuplot >/dev/null 2>&1; then scripts/overload-chart.sh "$OVERLOAD_DATA" "$OVERLOAD_CHART"; fi

# The floor under a refusal: a server on h2 alone that refuses every call at once (herd-raw
# --role refuse: no hyper, no tonic, no task per call), offered 8x the raw capacity on the
# servers' core. Its CPU per call is the least any server on h2 spends to say no; beside it, what
# a refusal may cost for herd to keep 85 % of its capacity at 8x (the refusals' share of the core
# is then 15 %).
REFUSAL_US=()
rate8=$(awk -v c="$(median "${raw_caps[@]}")" 'BEGIN {printf "%d", 8 * c}')
for run in $(seq 1 "$OVERLOAD_RUNS"); do
    address=127.0.0.1:$(free_port)
    on_servers "$BIN/herd-raw" --role refuse --listen "$address" & PIDS+=($!)
    wait_listening "$address"
    before=$(cpu_ticks "${PIDS[-1]}")
    out=$(load "$address" --rate "$rate8" --timeout-ms "$DEADLINE_MS")
    after=$(cpu_ticks "${PIDS[-1]}")
    cleanup
    REFUSAL_US+=("$(us_per_call $((after - before)) "$(echo "$out" | refused)" 2)")
    echo "refusal floor run $run: $rate8 calls/s refused by h2 alone, ${REFUSAL_US[-1]} µs of CPU each" >&2
done
echo "== the floor under a refusal ($rate8 calls/s = 8x raw capacity, refused by a server on h2 alone)"
stats "CPU per refusal, h2 alone" "µs" "${REFUSAL_US[@]}"
echo "for 85 % of herd's capacity at 8x, a refusal may cost at most: $(awk -v r="$rate8" -v c="$(median "${herd_caps[@]}")" 'BEGIN {printf "%.2f", 0.15 * 1e6 / (r - 0.85 * c)}') µs"

# Memory under a flood with every span exported: herd offered 4x the raw capacity for
# $FLOOD_SECONDS from $FLOOD_CONNECTIONS connections, tracing sampled at 100 % into a sink. Per
# run: the largest instance's RSS when steady (after 2 s at half load), its peak during the flood,
# and how long after the flood every instance is back within 25 % (+2 MB) of its steady size.
FLOOD_SECONDS="${FLOOD_SECONDS:-30}"
FLOOD_CONNECTIONS="${FLOOD_CONNECTIONS:-200}"
FLOOD_RUNS="${FLOOD_RUNS:-$OVERLOAD_RUNS}"
FLOOD_SAMPLED="${FLOOD_SAMPLED:-1}" # the share of calls traced (the goal is for 1: every one)
rss_now_mb() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
flood_rate=$(awk -v c="$(median "${raw_caps[@]}")" 'BEGIN {printf "%d", 4 * c}')
STEADY=(); PEAK=(); BACK=()
for run in $(seq 1 "$FLOOD_RUNS"); do
    SINK=127.0.0.1:$(free_port)
    on_servers "$BIN/herd-raw" --role sink --listen "$SINK" & PIDS+=($!)
    wait_listening "$SINK"
    start_herd OTEL_EXPORTER_OTLP_ENDPOINT="http://$SINK" OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG="$FLOOD_SAMPLED"
    DURATION=2 WARMUP=0 load "$GATEWAY" --rate "$((flood_rate / 8))" >/dev/null
    steady=(); for pid in "${SERVERS[@]}"; do steady+=("$(rss_now_mb "$pid")"); done
    # FLOOD_TRACE=file: every instance's RSS every 0.1 s during the flood, appended as lines of
    # "run seconds MB MB MB MB" (tax, currency, pricing, gateway).
    tracer=
    if [ -n "${FLOOD_TRACE:-}" ]; then
        (began=$(date +%s.%N); while :; do
            echo "$run $(awk -v b="$began" -v n="$(date +%s.%N)" 'BEGIN {printf "%.1f", n - b}') $(for pid in "${SERVERS[@]}"; do rss_now_mb "$pid"; printf ' '; done)"
            sleep 0.1
        done >>"$FLOOD_TRACE") & tracer=$!; PIDS+=("$tracer")
    fi
    out=$(CONNECTIONS=$FLOOD_CONNECTIONS DURATION=$FLOOD_SECONDS WARMUP=0 load "$GATEWAY" --rate "$flood_rate" --timeout-ms "$DEADLINE_MS")
    [ -z "$tracer" ] || kill "$tracer"
    ended=$(date +%s.%N); back=never
    for _ in $(seq 1 200); do
        over=0
        for i in "${!SERVERS[@]}"; do
            awk -v r="$(rss_now_mb "${SERVERS[$i]}")" -v s="${steady[$i]}" 'BEGIN {exit !(r > s * 1.25 + 2)}' && over=1
        done
        if [ $over = 0 ]; then back=$(awk -v e="$ended" -v n="$(date +%s.%N)" 'BEGIN {printf "%.1f", n - e}'); break; fi
        sleep 0.1
    done
    STEADY+=("$(printf '%s\n' "${steady[@]}" | sort -g | tail -1)"); PEAK+=("$(max_rss_mb "${SERVERS[@]}")"); BACK+=("$back")
    echo "flood run $run: ${flood_rate} calls/s for ${FLOOD_SECONDS} s from $FLOOD_CONNECTIONS connections, tracing $(awk -v s="$FLOOD_SAMPLED" 'BEGIN {print s * 100}') %: $(echo "$out" | field throughput) ok/s, steady ${STEADY[-1]} MB, peak ${PEAK[-1]} MB, back to steady after ${back} s" >&2
    cleanup
done
if [ "$FLOOD_RUNS" -gt 0 ]; then
    echo "== flood with tracing at $(awk -v s="$FLOOD_SAMPLED" 'BEGIN {print s * 100}') % ($flood_rate calls/s = 4x raw capacity, $FLOOD_SECONDS s, $FLOOD_CONNECTIONS connections)"
    stats "largest instance's RSS, steady" "MB" "${STEADY[@]}"
    stats "largest instance's RSS, peak" "MB" "${PEAK[@]}"
    echo "seconds until every instance is back to steady: ${BACK[*]}"
    goal "flood with tracing: peak RSS, largest instance (MB)" "$(printf '%s\n' "${PEAK[@]}" | sort -g | tail -1)" le 30
fi
fi

goals_exit
