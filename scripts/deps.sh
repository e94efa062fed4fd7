#!/usr/bin/env bash
# Installs the Debian packages cordon's tests and benchmarks use. Idempotent; quiet when
# everything is already there. Needs root (or sudo) on Debian 12.
#   scripts/deps.sh          test dependencies
#   scripts/deps.sh --bench  also the tools the benchmarks compare against
set -euo pipefail

pkgs=(bubblewrap nftables iproute2 e2fsprogs util-linux procps curl git openssl python3 python3-requests python3-h2 python3-pip nodejs ca-certificates)
if [[ "${1:-}" == "--bench" ]]; then
  pkgs+=(hyperfine wrk tinyproxy squid mitmproxy)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "deps.sh: need root to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts these services on install; the benchmarks start their own instances.
for svc in tinyproxy squid; do
  if [[ " ${missing[*]} " == *" $svc "* ]]; then
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
  fi
done
