#!/usr/bin/env bash
# Builds cordon and runs a few sandboxes that show what it does. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo.sh: needs the Rust toolchain (https://rustup.rs) and a C compiler" >&2; exit 1; }
scripts/deps.sh
cargo release-bin
cordon="$PWD/target/release/cordon"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step cordon doctor
"$cordon" doctor || true

step "cordon run -- python3 -c 'print(\"hello from the sandbox\")'"
"$cordon" run -- python3 -c 'print("hello from the sandbox")'

step "cordon run --workspace $work/ws -- sh -c 'echo hi > out.txt'"
"$cordon" run --workspace "$work/ws" -- sh -c 'echo hi > out.txt'
echo "on the host: $(cat "$work/ws/out.txt")"

escape='cat /etc/shadow; ls /home /root; python3 -c "import socket; socket.create_connection((\"93.184.215.14\", 443), timeout=3)"'
step "cordon run -- sh -c '$escape'"
"$cordon" run -- sh -c "$escape" || true

step "cordon run --memory 64M --json -- python3 -c 'bytearray(1 << 30)'"
"$cordon" run --memory 64M --json -- python3 -c 'bytearray(1 << 30)' || true
