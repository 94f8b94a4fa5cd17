#!/bin/sh
# The whole test suite: host packages, formatting, lints, then every test of the workspace.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup-host.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== guest kernel (Debian's cloud kernel, unpacked, not installed)"
./guest/fetch-kernel.sh >/dev/null
echo "== cargo test"
cargo test --workspace --no-fail-fast 2>&1
