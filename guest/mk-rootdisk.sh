#!/bin/bash
# Make an ext4 disk image holding a busybox root file system (no root rights or loop devices needed).
#
# Usage: guest/mk-rootdisk.sh OUT.img SIZE_MIB [INIT_SCRIPT]
#   INIT_SCRIPT  a file copied to /sbin/init (default: mount proc/sys/dev, print
#                FERROVIRT-ROOTDISK-UP on the console, power off).
# Booting it: root=/dev/vda rw init=/sbin/init (virtio_blk must be built in or in the initramfs).

source "$(dirname "$0")/common.sh"

usage() {
    echo "usage: $0 OUT.img SIZE_MIB [INIT_SCRIPT]" >&2
    exit 2
}

main() {
    [ $# -ge 2 ] && [ $# -le 3 ] || usage
    local out="$1" size="$2" init="${3:-}" busybox applet
    [[ "$size" =~ ^[0-9]+$ ]] && [ "$size" -ge 8 ] || die "SIZE_MIB must be a whole number >= 8, got '$size'"
    [ -z "$init" ] || [ -f "$init" ] || die "init script '$init' does not exist"
    need_cmd mke2fs
    busybox="$("$(dirname "$0")/fetch-busybox.sh")"

    STAGING="$(mktemp -d "${TMPDIR:-/tmp}/ferrovirt-rootdisk.XXXXXX")"
    trap 'rm -rf "$STAGING"' EXIT
    local staging="$STAGING"
    mkdir -p "$staging"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,mnt}
    chmod 1777 "$staging/tmp"
    cp "$busybox" "$staging/bin/busybox"
    for applet in $("$busybox" --list-full); do
        [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$staging/$applet"
    done
    if [ -n "$init" ]; then
        rm -f "$staging/sbin/init"
        cp "$init" "$staging/sbin/init"
    else
        rm -f "$staging/sbin/init"
        cat >"$staging/sbin/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo FERROVIRT-ROOTDISK-UP >/dev/console
poweroff -f
INIT
    fi
    chmod 0755 "$staging/sbin/init"
    echo "root:x:0:0:root:/root:/bin/sh" >"$staging/etc/passwd"

    rm -f "$out.tmp"
    mke2fs -q -F -E root_owner=0:0 -t ext4 -L ferrovirt-root -d "$staging" "$out.tmp" "${size}M" >/dev/null ||
        die "mke2fs could not build $out"
    mv "$out.tmp" "$out"
    echo "$out"
}

main "$@"
