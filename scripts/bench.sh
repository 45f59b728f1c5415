#!/usr/bin/env bash
# herd's benchmarks on release builds, five runs each (RUNS to change), with the median, min and
# max across runs:
# - configuration propagation: etcd put → every one of 8 instances applied, over 100 changes;
# - the cost of a collector that is down: median CreateQuote latency over 300 calls with a live
#   OTLP receiver and with nothing listening at the endpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-5}"
cargo build --release --workspace --bins
out=$(mktemp)
for i in $(seq 1 "$runs"); do
    cargo test --release -q -p herd-tests --test config d_propagation -- --nocapture 2>/dev/null |
        grep 'REPORT' | tee -a "$out"
    cargo test --release -q -p herd-tests --test tracing e_a_collector -- --nocapture 2>/dev/null |
        grep 'REPORT' | tee -a "$out"
done
summary() { # label, pattern whose second word is the figure, unit
    grep -o "$2 [0-9.]*$3" "$out" | sed "s/$3\$//" | awk '{print $NF}' | sort -n |
        awk -v name="$1" -v unit="$3" '{ v[NR] = $1 } END { printf "%s: median %.3f%s, min %.3f%s, max %.3f%s over %d runs\n", name, v[int((NR + 1) / 2)], unit, v[1], unit, v[NR], unit, NR }'
}
summary "propagation p50" "p50" " ms"
summary "propagation p99" "p99" " ms"
summary "quote latency, collector up" "collector up" " ms"
summary "quote latency, collector down" "collector down" " ms"
median_of() { # pattern whose second word is the figure, unit
    grep -o "$1 [0-9.]*$2" "$out" | sed "s/$2\$//" | awk '{print $NF}' | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'
}
# shellcheck source=scripts/goals.sh
. scripts/goals.sh
goal "configuration propagation p99 (ms)" "$(median_of p99 " ms")" le 10
goal "quote latency, collector down / up" "$(awk -v d="$(median_of "collector down" " ms")" -v u="$(median_of "collector up" " ms")" 'BEGIN {printf "%.3f", d / u}')" le 1.10
rm -f "$out"
goals_exit
