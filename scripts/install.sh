#!/usr/bin/env bash
# Installs what elastictrain needs on a fresh Debian/Ubuntu machine: etcd (Debian's
# etcd-server), the CPU build of torch, and this package with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi

if ! command -v etcd >/dev/null 2>&1; then
  echo "== installing etcd-server (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi
# iproute2 makes the tests' network-namespace hosts (they are skipped without it); best effort
if ! command -v ip >/dev/null 2>&1; then
  echo "== installing iproute2 (apt)"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq iproute2 >/dev/null; } \
    || echo "   (not installed: the tests on namespace hosts will be skipped)"
fi
# Debian's package starts a system etcd on 2379; ours run on free ports, it is not needed.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl stop etcd >/dev/null 2>&1 || true; fi

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "== installing torch (CPU)"
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
echo "== installing elastictrain"
"$PY" -m pip install -q -e ".[dev]"
