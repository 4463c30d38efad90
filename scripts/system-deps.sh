#!/usr/bin/env bash
# Debian packages textserve's toolchain and tests need. Installs them when run as root;
# otherwise says exactly what to install and fails if the essential one is missing.
set -euo pipefail
ESSENTIAL=(wordnet-base gcc libc6-dev)   # training data; a C compiler for server/native_tokenizer.pyx
OPTIONAL=(prometheus nginx wrk)          # promtool + Prometheus, nginx, the load generator
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${ESSENTIAL[@]}" "${OPTIONAL[@]}"; do have "$p" || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "system-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts these services on install; textserve's tests start their own.
    for svc in nginx prometheus prometheus-node-exporter; do
        if command -v systemctl >/dev/null; then systemctl stop "$svc" 2>/dev/null || true; fi
        pkill -x "$svc" 2>/dev/null || true
    done
    exit 0
fi
for p in "${ESSENTIAL[@]}"; do
    if ! have "$p"; then
        echo "system-deps: missing Debian package(s): ${missing[*]}" >&2
        echo "system-deps: run: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
done
echo "system-deps: optional packages missing (some tests will skip): ${missing[*]}" >&2
echo "system-deps: run: sudo apt-get install ${missing[*]}" >&2
