#!/bin/sh
# Installs the Debian packages ferrovirt's build, tests and demo need. Idempotent.
set -eu
PACKAGES="qemu-system-x86 qemu-utils busybox-static cpio lz4 e2fsprogs util-linux iproute2 time ca-certificates genisoimage openssl fio nftables dnsmasq-base curl mount"
# Installing one package can remove another that conflicts with it: a new machine's qemu-utils
# from bookworm-backports goes when qemu-system-x86 (bookworm) comes. So check again after each
# install and install what is missing, at most three rounds.
missing_packages() {
    for p in $PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf ' %s' "$p"
    done
}
updated=""
for round in 1 2 3; do
    missing=$(missing_packages)
    [ -n "$missing" ] || break
    echo "setup-host: installing$missing" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-host: run as root (apt-get install needs it)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    [ -n "$updated" ] || { apt-get update -qq; updated=1; }
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
done
missing=$(missing_packages)
[ -z "$missing" ] || { echo "setup-host: could not install$missing" >&2; exit 1; }
command -v cargo >/dev/null || { echo "setup-host: cargo not found; install Rust stable (rustup)" >&2; exit 1; }
