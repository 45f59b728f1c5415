# Sourced by the benchmark scripts: each goal is checked against the figure measured, named when
# it is missed, and the script exits non-zero at the end (`goals_exit`) if any was.
MISSED=()

# goal NAME VALUE le|ge BOUND: VALUE must be at most (le) or at least (ge) BOUND.
goal() {
    local name=$1 value=$2 op=$3 bound=$4 met
    met=$(awk -v v="$value" -v b="$bound" -v op="$op" 'BEGIN { if (v == "" || v != v + 0) { print 0 } else if (op == "le") { print (v <= b) ? 1 : 0 } else { print (v >= b) ? 1 : 0 } }')
    local sign="<="; [ "$op" = ge ] && sign=">="
    if [ "$met" = 1 ]; then
        echo "goal met: $name: $value (goal $sign $bound)"
    else
        echo "GOAL MISSED: $name: $value (goal $sign $bound)"
        MISSED+=("$name")
    fi
}

# Exits 1 naming every goal missed, if any.
goals_exit() {
    if [ "${#MISSED[@]}" -gt 0 ]; then
        printf 'goal missed: %s\n' "${MISSED[@]}" >&2
        exit 1
    fi
}
