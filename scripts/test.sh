#!/bin/sh
# The whole test suite: host packages, formatting, lints, then every test of the workspace.
set -eu
cd "$(dirname "$0")/.."
# The product reads FERROVIRT_* variables (socket, token, binaries, disk cache, fault hooks); one
# left in the caller's environment would change what the tests see. Test controls are kept.
for v in $(env | sed -n 's/^\(FERROVIRT_[A-Z0-9_]*\)=.*/\1/p'); do
    case "$v" in
    FERROVIRT_TEST_SEED | FERROVIRT_FUZZ_* | FERROVIRT_GUEST_CACHE | FERROVIRT_DEB_ARCHIVE | FERROVIRT_KERNEL_PACKAGE | FERROVIRT_KERNEL_REFRESH) ;;
    *)
        echo "test.sh: ignoring $v from the environment (it would change what the tests see)"
        unset "$v"
        ;;
    esac
done
./scripts/setup-host.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== guest kernel (Debian's cloud kernel, unpacked, not installed)"
./guest/fetch-kernel.sh >/dev/null
echo "== cargo test"
cargo test --workspace --no-fail-fast 2>&1
