#!/bin/bash
# Locate a statically linked busybox (Debian busybox-static) for guest images.
#
# Usage: guest/fetch-busybox.sh
# Prints the path of the binary on stdout. Uses the host's /bin/busybox when the
# busybox-static package is installed, else downloads that package into the cache.

source "$(dirname "$0")/common.sh"

main() {
    if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" = "install ok installed" ] &&
        [ -x /bin/busybox ]; then
        echo /bin/busybox
        return
    fi
    need_cmd apt-get dpkg-deb
    lock_cache
    local dir="$FERROVIRT_GUEST_CACHE/busybox-static"
    if [ ! -x "$dir/bin/busybox" ]; then
        echo "fetching busybox-static into $dir" >&2
        rm -rf "$dir.tmp" "$dir"
        mkdir -p "$dir.tmp/root"
        (cd "$dir.tmp" && apt_download busybox-static)
        dpkg-deb -x "$dir.tmp"/*.deb "$dir.tmp/root" || die "dpkg-deb could not unpack busybox-static"
        mkdir -p "$dir/bin"
        cp "$dir.tmp/root/bin/busybox" "$dir/bin/busybox.tmp"
        rm -rf "$dir.tmp"
        mv "$dir/bin/busybox.tmp" "$dir/bin/busybox"
    fi
    echo "$dir/bin/busybox"
}

main "$@"
