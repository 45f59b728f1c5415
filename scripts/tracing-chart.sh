#!/usr/bin/env bash
# Draws the tracing figures of scripts/bench-mesh.sh (its $TRACING_DATA) as an SVG: server CPU per
# request and throughput at saturation against the share of traces sampled (medians of the runs).
# Usage: scripts/tracing-chart.sh DATA OUT.svg
set -euo pipefail
data=$1 out=$2
command -v gnuplot >/dev/null || { echo "gnuplot is not installed (scripts/install-deps.sh bench)" >&2; exit 1; }
medians=$(mktemp)
trap 'rm -f "$medians"' EXIT
med() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
# position label cpu_us throughput, one row per ratio in the order sampled
i=0
for ratio in $(awk '!/^#/ {print $1}' "$data" | sort -gu); do
    rows=$(awk -v r="$ratio" '$1 == r' "$data")
    label=$(awk -v r="$ratio" 'BEGIN {print (r == 0) ? "none" : r * 100 " %"}')
    echo "$i \"$label\" $(echo "$rows" | awk '{print $4}' | med) $(echo "$rows" | awk '{print $3}' | med)"
    i=$((i + 1))
done >"$medians"
gnuplot <<PLOT
set terminal svg size 960,420 dynamic font "sans,12" background "white"
set output "$out"
set multiplot layout 1,2 title "What tracing costs the reference mesh (one instance per service, one core; medians)"
set style fill solid 0.8 border -1
set boxwidth 0.6
set xrange [-0.6:$((i - 1)).6]
set xlabel "share of traces sampled (every span of a sampled trace exported)"
set grid ytics
unset key
set ylabel "server CPU per request, four services (µs)"
set yrange [0:*]
plot "$medians" using 1:3:xticlabels(2) with boxes lc rgb "#2166ac", \
     "" using 1:3:(sprintf("%.0f", \$3)) with labels offset 0,0.7
set ylabel "throughput at saturation (quotes/s)"
plot "$medians" using 1:4:xticlabels(2) with boxes lc rgb "#1b7837", \
     "" using 1:4:(sprintf("%.0f", \$4)) with labels offset 0,0.7
unset multiplot
PLOT
echo "wrote $out"
