#!/usr/bin/env bash
# The whole test suite: installs what the tests need, builds, and runs every test of every
# crate against real sandboxes. Run as root (as CI does) or as a user with unprivileged user
# namespaces; tests that need something missing say so loudly and skip.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
