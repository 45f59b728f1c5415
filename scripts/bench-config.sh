#!/usr/bin/env bash
# Configuration propagation on release builds: the time from an etcd put to every one of 8
# instances having applied it, over 100 changes, five runs. Prints each run and the median, min and
# max of p50 and p99 across runs.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-5}"
cargo build --release --workspace --bins
out=$(mktemp)
for i in $(seq 1 "$runs"); do
    cargo test --release -q -p herd-tests --test config d_propagation -- --nocapture 2>/dev/null |
        grep 'REPORT config d' | tee -a "$out"
done
summary() { # field name
    grep -o "$1 [0-9.]* ms" "$out" | awk '{print $2}' | sort -n |
        awk -v name="$1" '{ v[NR] = $1 } END { printf "%s: median %.2f ms, min %.2f ms, max %.2f ms over %d runs\n", name, v[int((NR + 1) / 2)], v[1], v[NR], NR }'
}
summary p50
summary p99
rm -f "$out"
