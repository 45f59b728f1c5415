#!/usr/bin/env bash
# What tracing costs, counted in instructions rather than CPU time: the four services of the
# reference mesh each run under valgrind's callgrind, a fixed number of quotes is sent at a fixed
# rate, and the instructions the services executed while serving them (counters zeroed after a
# warm-up, dumped after the load) are divided by the calls. Unlike CPU time on a shared two-core
# machine, the count repeats to a tenth of a percent, so a cost of a few percent can be judged.
# RUNS pairs (default 3), untraced and at 1 % alternated; then one run each at 0 % (export on,
# nothing sampled) and 100 %. Goal (issue "tracing costs little"): 1 % within 1.03× untraced.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
CALLS_RATE="${CALLS_RATE:-100}"
SECONDS_EACH="${SECONDS_EACH:-20}"
BIN="${CARGO_TARGET_DIR:-target}/release"
CONFIG=deploy/bench/config
SECRETS=deploy/bench/secrets
# shellcheck source=scripts/goals.sh
. scripts/goals.sh
command -v valgrind >/dev/null || { echo "valgrind is missing: scripts/install-deps.sh bench" >&2; exit 1; }
cargo build --release -q --workspace --bins
HERD_BENCH_AUTHORIZATION="Bearer $("$BIN/herdctl" auth token --issuer-file deploy/bench/issuer.json --tenant bench --subject bench --ttl 1h)"
export HERD_BENCH_AUTHORIZATION

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# count RATIO: instructions per call of the four services, sampling at RATIO (`none`: no export).
count() {
    local ratio=$1 work pids=() servers=() env=(OTEL_METRICS_EXPORTER=none)
    work=$(mktemp -d)
    local client peer etcd gateway
    client=$(free_port); peer=$(free_port); etcd="http://127.0.0.1:$client"
    etcd --name b --data-dir "$work/etcd" --listen-client-urls "$etcd" --advertise-client-urls "$etcd" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "b=http://127.0.0.1:$peer" >"$work/etcd.log" 2>&1 & pids+=($!)
    for _ in $(seq 1 100); do ETCDCTL_API=3 etcdctl --endpoints "$etcd" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
    "$BIN/herdctl" --etcd "$etcd" config apply "$CONFIG"/*.json >/dev/null
    if [ "$ratio" != none ]; then
        local sink="127.0.0.1:$(free_port)"
        "$BIN/herd-raw" --role sink --listen "$sink" >"$work/sink.log" 2>&1 & pids+=($!)
        env+=(OTEL_EXPORTER_OTLP_ENDPOINT="http://$sink" OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG="$ratio")
    fi
    gateway="127.0.0.1:$(free_port)"
    local grind=(valgrind --tool=callgrind --dump-instr=no --collect-atstart=yes)
    for s in tax currency pricing gateway; do
        local args=(--etcd "$etcd")
        [ "$s" = gateway ] && args+=(--listen "$gateway" --secrets "$SECRETS")
        env "${env[@]}" RUST_LOG=warn "${grind[@]}" --callgrind-out-file="$work/cg.$s.%p" \
            "$BIN/herd-$s" "${args[@]}" >"$work/$s.log" 2>&1 & pids+=($!); servers+=($!)
    done
    local load=("$BIN/herd-bench" --target "$gateway" --connections 4 --rate "$CALLS_RATE" --output json)
    # Up (slowly, under valgrind), then warm, then counted from zero.
    for _ in $(seq 1 300); do "${load[@]}" --duration 1 --warmup 0 2>/dev/null | grep -q '"failed":{}' && break; sleep 0.2; done
    "${load[@]}" --duration 3 --warmup 0 >/dev/null
    for p in "${servers[@]}"; do callgrind_control -z "$p" >/dev/null 2>&1; done
    local out calls total=0 n
    out=$("${load[@]}" --duration "$SECONDS_EACH" --warmup 0)
    for p in "${servers[@]}"; do callgrind_control -d "$p" >/dev/null 2>&1; done
    calls=$(echo "$out" | grep -o '"calls":[0-9]*' | cut -d: -f2)
    echo "$out" | grep -q '"failed":{}' || { echo "calls failed at $ratio: $out" >&2; exit 1; }
    for f in "$work"/cg.*.*.1; do
        n=$(grep -h '^summary:' "$f" | awk '{print $2}')
        total=$((total + n))
    done
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
    echo $((total / calls))
}

# stats [FORMAT]: median, min and max of the numbers on stdin.
stats() {
    sort -g | awk -v f="${1:-%10.0f}" '{v[NR]=$1} END {printf "median " f "  min " f "  max " f "  (%d runs)", v[int((NR+1)/2)], v[1], v[NR], NR}'
}

untraced=(); one=(); ratios=()
for _ in $(seq 1 "$RUNS"); do
    u=$(count none); o=$(count 0.01)
    untraced+=("$u"); one+=("$o")
    ratios+=("$(awk -v a="$o" -v b="$u" 'BEGIN {printf "%.4f", a / b}')")
done
zero=$(count 0); every=$(count 1)
echo "== instructions per quote, the four services (callgrind, ${SECONDS_EACH} s at ${CALLS_RATE} calls/s)"
echo "untraced             $(printf '%s\n' "${untraced[@]}" | stats)"
echo "1 % sampled          $(printf '%s\n' "${one[@]}" | stats)"
echo "0 % (export on)      $zero"
echo "100 % sampled        $every"
median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
echo "1 %/untraced         $(printf '%s\n' "${ratios[@]}" | stats %10.4f)"
echo "0 %/untraced         $(awk -v a="$zero" -v b="${untraced[0]}" 'BEGIN {printf "%.4f", a / b}')"
echo "100 %/untraced       $(awk -v a="$every" -v b="${untraced[0]}" 'BEGIN {printf "%.4f", a / b}')"
goal "instructions at 1 % sampling / untraced" "$median" le 1.03
goals_exit
