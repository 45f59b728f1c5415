#!/usr/bin/env bash
# herd at 100, 300 and 1000 instances: `herd-scale` (N simulated instances and subsetting callers in
# one process, see crates/herd-bench/src/scale.rs) against a fresh etcd of one member, then of three,
# for each N. Prints a table, writes bench/scale.dat (one JSON line per run) and docs/scale.svg, and
# exits non-zero, naming it, when a goal is missed.
# Settings: SIZES (default "100 300 1000"), MEMBERS (default "1 3"), CALLERS (64), RUNS (1),
# MEMLIMIT_SIZES (default "1000"): sizes run again with etcd under GOMEMLIMIT=256MiB (Go's soft
# memory limit: etcd's heap is collected harder instead of growing to twice what it holds);
# PROXY_SIZES (default "1000"): sizes run again with every instance reaching etcd through one
# `etcd grpc-proxy` (the proxy holds the instances' connections and coalesces their watches).
# etcd's memory goal (300 MB) is judged on the two ways README gives of running etcd for a thousand
# instances, GOMEMLIMIT and a proxy tier; the default-GC rows are printed for comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES="${SIZES:-100 300 1000}"
MEMBERS="${MEMBERS:-1 3}"
CALLERS="${CALLERS:-64}"
RUNS="${RUNS:-1}"
MEMLIMIT_SIZES="${MEMLIMIT_SIZES-1000}"
PROXY_SIZES="${PROXY_SIZES-1000}"
BIN="${CARGO_TARGET_DIR:-target}/release"
DATA=bench/scale.dat
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT

cargo build --release -q -p herd-bench --bin herd-scale
# Every simulated instance holds an etcd connection, a listener and its callers' connections.
ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ETCD_URLS=""
ETCD_ENV=()
start_etcd() { # members
    local n=$1 cluster="" clients=() peers=()
    for i in $(seq 1 "$n"); do
        clients+=("$(free_port)"); peers+=("$(free_port)")
        cluster+="${cluster:+,}m$i=http://127.0.0.1:${peers[-1]}"
    done
    ETCD_URLS=""
    for i in $(seq 1 "$n"); do
        local c=${clients[$((i - 1))]} p=${peers[$((i - 1))]}
        env "${ETCD_ENV[@]}" etcd --name "m$i" --data-dir "$WORK/etcd-$c" \
            --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
            --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
            --initial-cluster "$cluster" --initial-cluster-state new >"$WORK/etcd-$c.log" 2>&1 &
        PIDS+=($!)
        ETCD_URLS+="${ETCD_URLS:+,}http://127.0.0.1:$c"
    done
    until_healthy "etcd ($n members)"
}

until_healthy() { # what: waits (20 s at most) until $ETCD_URLS answers etcd's health check
    for _ in $(seq 1 200); do
        ETCDCTL_API=3 etcdctl --endpoints "$ETCD_URLS" endpoint health >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "error: $1 never became healthy" >&2
    return 1
}

PROXY_PID=""
start_proxy() { # in front of the members start_etcd started; sets ETCD_URLS to the proxy
    local port members=${ETCD_URLS//http:\/\//}
    port=$(free_port)
    etcd grpc-proxy start --endpoints "$members" --listen-addr "127.0.0.1:$port" >"$WORK/proxy-$port.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    ETCD_URLS="http://127.0.0.1:$port"
    until_healthy "etcd grpc-proxy"
}

mkdir -p bench docs
: >"$DATA"
run_sizes() { # label sizes [proxy]
    local label=$1 sizes=$2 proxy=${3:-}
    for members in $MEMBERS; do
        for n in $sizes; do
            for run in $(seq 1 "$RUNS"); do
                start_etcd "$members"
                pids=$(IFS=,; echo "${PIDS[*]}")
                PROXY_PID=""
                [ -z "$proxy" ] || start_proxy
                echo "== $n instances, $CALLERS callers, etcd of $members ${label:-with the default GC} (run $run)" >&2
                "$BIN/herd-scale" --etcd "$ETCD_URLS" --etcd-pids "$pids" ${PROXY_PID:+--proxy-pids "$PROXY_PID"} \
                    --instances "$n" --callers "$CALLERS" --label "$label" >>"$DATA"
                cleanup
            done
        done
    done
}
run_sizes "" "$SIZES"
ETCD_ENV=(GOMEMLIMIT=256MiB)
run_sizes "GOMEMLIMIT=256MiB" "$MEMLIMIT_SIZES"
ETCD_ENV=()
run_sizes "grpc-proxy" "$PROXY_SIZES" proxy

status=0
python3 - "$DATA" <<'PY' || status=$?
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cols = [("members", "etcd", "{}"), ("label", "etcd run with", "{}"), ("instances", "N", "{}"), ("subset", "subset", "{}"),
        ("start_ms", "start (ms)", "{:.0f}"), ("discovered_after_last_ms", "discovered after last (ms)", "{:.0f}"),
        ("converged_after_last_ms", "subsets SERVING after last (ms)", "{:.0f}"),
        ("new_instance_first_call_ms", "new instance: first call (ms)", "{:.0f}"),
        ("config_p50_ms", "config p50 (ms)", "{:.1f}"), ("config_p99_ms", "config p99 (ms)", "{:.1f}"),
        ("writes_per_change", "writes/change", "{:.1f}"),
        ("connections_per_caller_max", "conns/caller max", "{}"),
        ("connections_per_instance_min", "conns/instance min", "{}"), ("connections_per_instance_max", "max", "{}"),
        ("failed_calls", "failed calls", "{}"), ("calls", "of", "{}"),
        ("etcd_cpu_s", "etcd CPU (s)", "{:.1f}"), ("etcd_peak_rss_mib", "etcd peak RSS (MiB)", "{:.0f}"),
        ("proxy_peak_rss_mib", "proxy peak RSS (MiB)", "{:.0f}"),
        ("etcd_db_mib", "etcd db (MiB)", "{:.1f}"), ("harness_cpu_s", "harness CPU (s)", "{:.1f}")]
print("| " + " | ".join(c[1] for c in cols) + " |")
print("|" + " --- |" * len(cols))
for r in rows:
    print("| " + " | ".join(fmt.format(r[k]) for k, _, fmt in cols) + " |")
print()
print("| N callers over N instances (computed; churn: the mean of ten places) | callers per instance | " + " | ".join(w for w, _, _ in rows[0]["ring_churn"]) + " |")
print("| --- | --- |" + " --- |" * len(rows[0]["ring_churn"]))
for n in sorted({r["instances"] for r in rows}):
    r = next(r for r in rows if r["instances"] == n)
    churn = " | ".join(f"{c} callers ({100 * c / n:.0f} %), {m} members" for _, c, m in r["ring_churn"])
    print(f"| {n} | {r['ring_per_instance_min']}–{r['ring_per_instance_max']} | {churn} |")
missed = []
for r in rows:
    n, m = r["instances"], f'{r["members"]}{" " + r["label"] if r["label"] else ""}'
    if r["discovered_after_last_ms"] > 5000: missed.append(f"N={n}/{m}: discovered {r['discovered_after_last_ms']:.0f} ms after the last start (goal 5000)")
    if r["config_p99_ms"] > 100: missed.append(f"N={n}/{m}: config p99 {r['config_p99_ms']:.1f} ms (goal 100)")
    if r["connections_per_caller_max"] > r["subset"]: missed.append(f"N={n}/{m}: a caller held {r['connections_per_caller_max']} connections (subset {r['subset']})")
    if r["writes_per_change"] > 1 + n / 100: missed.append(f"N={n}/{m}: {r['writes_per_change']:.1f} writes per change (goal {1 + n / 100:.0f})")
    if r["etcd_peak_rss_mib"] > 300:
        if r["label"]: missed.append(f"N={n}/{m}: etcd peak RSS {r['etcd_peak_rss_mib']:.0f} MiB (goal 300)")
        else: print(f"note: N={n}/{m}: etcd peak RSS {r['etcd_peak_rss_mib']:.0f} MiB with Go's default GC (not judged: README runs etcd for a thousand instances under GOMEMLIMIT or behind a proxy)", file=sys.stderr)
    if r["failed_calls"] > 0: missed.append(f"N={n}/{m}: {r['failed_calls']} failed calls")
    if r["ring_per_instance_max"] > 1.3 * max(r["ring_per_instance_min"], 1): missed.append(f"N={n}: callers per instance {r['ring_per_instance_min']}–{r['ring_per_instance_max']} (goal max/min 1.3)")
for line in missed: print("goal missed: " + line, file=sys.stderr)
sys.exit(1 if missed else 0)
PY
scripts/scale-chart.sh "$DATA" docs/scale.svg || true
exit $status
