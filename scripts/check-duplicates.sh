#!/usr/bin/env bash
# Fails when the dependency tree holds two versions of a core crate (tonic, prost, tokio, hyper,
# h2, tower, http): one version of each across the workspace.
set -euo pipefail
core='^(tonic|tonic-health|tonic-reflection|tonic-prost|prost|prost-types|tokio|hyper|h2|tower|http|etcd-client)$'
dupes=$(cargo tree --workspace -d --depth 0 -e normal,build --prefix none 2>/dev/null |
    awk 'NF >= 2 { print $1, $2 }' | sort -u |
    awk '{ n[$1]++ } END { for (c in n) if (n[c] > 1) print c }' | grep -E "$core" || true)
if [ -n "$dupes" ]; then
    echo "error: more than one version of: $dupes (see cargo tree -d)" >&2
    exit 1
fi
echo "no duplicate versions of the core crates"
