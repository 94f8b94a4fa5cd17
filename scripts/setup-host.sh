#!/bin/sh
# Installs the Debian packages ferrovirt's build, tests and demo need. Idempotent.
set -eu
PACKAGES="qemu-system-x86 qemu-utils busybox-static cpio lz4 e2fsprogs util-linux iproute2 time ca-certificates genisoimage openssl fio nftables dnsmasq-base curl mount"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup-host: installing$missing" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-host: run as root (apt-get install needs it)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
command -v cargo >/dev/null || { echo "setup-host: cargo not found; install Rust stable (rustup)" >&2; exit 1; }
