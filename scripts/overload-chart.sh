#!/usr/bin/env bash
# Draws the overload figures of scripts/bench-mesh.sh (its $OVERLOAD_DATA) as an SVG: goodput and
# p99 of successful calls against offered load, herd beside plain tonic (medians of the runs).
# Usage: scripts/overload-chart.sh DATA OUT.svg
set -euo pipefail
data=$1 out=$2
command -v gnuplot >/dev/null || { echo "gnuplot is not installed (scripts/install-deps.sh bench)" >&2; exit 1; }
medians=$(mktemp)
trap 'rm -f "$medians"' EXIT
# mesh level: median goodput (ok/s), median p99 (ms), each column's own median over the runs. A
# tail needs successes: the p99 is the median of the runs that had any, and is left out (NaN,
# which gnuplot skips) where the median goodput is under 1 % of the capacity.
med() { sort -g | awk '{v[NR]=$1} END {print (NR ? v[int((NR+1)/2)] : "NaN")}'; }
for mesh in raw herd; do
    for level in $(awk '!/^#/ {print $2}' "$data" | sort -gu); do
        rows=$(awk -v m="$mesh" -v l="$level" '$1 == m && $2 == l' "$data")
        [ -n "$rows" ] || continue
        good=$(echo "$rows" | awk '{print $6}' | med)
        capacity=$(echo "$rows" | awk '{print $5}' | med)
        p99=$(echo "$rows" | awk '$7 > 0 {print $7 / 1000}' | med)
        awk -v g="$good" -v c="$capacity" 'BEGIN {exit !(g < 0.01 * c)}' && p99=NaN
        echo "$mesh $level $good $p99"
    done
done >"$medians"
gnuplot <<PLOT
set terminal svg size 960,420 dynamic font "sans,12" background "white"
set output "$out"
set multiplot layout 1,2 title "Open-loop load at multiples of plain tonic's capacity (one instance per service, one core)"
set logscale x 2
set xlabel "offered load (× raw capacity)"
set xtics ("0.5" 0.5, "1" 1, "2" 2, "4" 4, "8" 8)
set xrange [0.4:10]
set key below
set grid
set ylabel "goodput (successful calls/s)"
set yrange [0:*]
plot "< awk '\$1 == \"herd\"' $medians" using 2:3 with linespoints lw 2 pt 7 lc rgb "#1b7837" title "herd", \
     "< awk '\$1 == \"raw\"' $medians" using 2:3 with linespoints lw 2 pt 5 lc rgb "#b2182b" title "plain tonic"
set ylabel "p99 of successful calls (ms)"
set logscale y 10
set yrange [1:*]
plot "< awk '\$1 == \"herd\"' $medians" using 2:4 with linespoints lw 2 pt 7 lc rgb "#1b7837" title "herd", \
     "< awk '\$1 == \"raw\"' $medians" using 2:4 with linespoints lw 2 pt 5 lc rgb "#b2182b" title "plain tonic"
unset multiplot
PLOT
echo "wrote $out"
