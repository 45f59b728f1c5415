#!/usr/bin/env bash
# Draws scripts/bench-scale.sh's figures (bench/scale.dat, one JSON line per run) as an SVG: time
# until every caller has discovered every instance and holds its subset SERVING, and configuration
# propagation p99, against the number of instances, for etcd of one member and of three.
# Usage: scripts/scale-chart.sh DATA OUT.svg
set -euo pipefail
data=$1 out=$2
command -v gnuplot >/dev/null || { echo "gnuplot is not installed (scripts/install-deps.sh bench)" >&2; exit 1; }
table=$(mktemp)
trap 'rm -f "$table"' EXIT
# members instances discovered_after_last converged_after_last config_p99
python3 - "$data" >"$table" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        if r.get("label"):
            continue
        print(r["members"], r["instances"], r["discovered_after_last_ms"], r["converged_after_last_ms"], r["config_p99_ms"])
PY
gnuplot <<PLOT
set terminal svg size 960,420 dynamic font "sans,12" background "white"
set output "$out"
set multiplot layout 1,2 title "herd-scale: N simulated instances, 64 subsetting callers, one process, real etcd"
set logscale x 10
set xlabel "instances (N)"
set xtics (100, 300, 1000)
set xrange [80:1300]
set key below
set grid
set ylabel "after the last instance registered (ms)"
set yrange [0:*]
plot "< awk '\$1 == 1' $table" using 2:3 with linespoints lw 2 pt 7 lc rgb "#2166ac" title "every caller discovered all (etcd ×1)", \
     "< awk '\$1 == 3' $table" using 2:3 with linespoints lw 2 pt 5 lc rgb "#92c5de" title "(etcd ×3)", \
     "< awk '\$1 == 1' $table" using 2:4 with linespoints lw 2 pt 7 lc rgb "#1b7837" title "every subset SERVING (etcd ×1)", \
     "< awk '\$1 == 3' $table" using 2:4 with linespoints lw 2 pt 5 lc rgb "#a6dba0" title "(etcd ×3)"
set ylabel "configuration applied on all N: p99 (ms)"
plot "< awk '\$1 == 1' $table" using 2:5 with linespoints lw 2 pt 7 lc rgb "#b2182b" title "etcd ×1", \
     "< awk '\$1 == 3' $table" using 2:5 with linespoints lw 2 pt 5 lc rgb "#f4a582" title "etcd ×3"
unset multiplot
PLOT
echo "wrote $out"
