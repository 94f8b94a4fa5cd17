#!/bin/bash
# Fetch Debian's cloud kernel into the guest cache without installing it on the host.
#
# Usage: guest/fetch-kernel.sh
# Prints key=value lines on stdout:
#   bzimage=PATH      the bzImage (vmlinuz)
#   vmlinux=PATH      the ELF vmlinux unpacked from the bzImage (has a PVH note)
#   modules_dir=PATH  /lib/modules/<version> of that kernel, with modules.dep
#   version=STRING    the kernel release, e.g. 6.1.0-56-cloud-amd64
# Idempotent: a complete cache entry is reused without touching apt.
# FERROVIRT_KERNEL_PACKAGE overrides the meta package (default linux-image-cloud-amd64).

source "$(dirname "$0")/common.sh"

META_PACKAGE="${FERROVIRT_KERNEL_PACKAGE:-linux-image-cloud-amd64}"
KERNEL_CACHE="$FERROVIRT_GUEST_CACHE/kernel"

print_result() {
    local dir="$1" version
    version="$(cat "$dir/version")"
    echo "bzimage=$dir/bzImage"
    echo "vmlinux=$dir/vmlinux"
    echo "modules_dir=$dir/root/lib/modules/$version"
    echo "version=$version"
}

# Reads a little-endian unsigned integer of $3 bytes at offset $2 of file $1.
read_le() {
    od -An -tu"$3" -j "$2" -N "$3" "$1" | tr -d ' \n'
}

# The bzImage payload is the compressed ELF vmlinux at (setup_sects+1)*512 + payload_offset,
# payload_length bytes long; Debian compresses it with LZ4 (legacy frame) and the last 4 bytes
# are the uncompressed size, which lz4 must not see.
extract_vmlinux() {
    local bzimage="$1" out="$2" setup_sects payload_offset payload_length start expected actual magic
    [ "$(dd if="$bzimage" bs=1 skip=$((0x202)) count=4 status=none)" = "HdrS" ] ||
        die "$bzimage is not a bzImage (no HdrS boot header)"
    setup_sects="$(read_le "$bzimage" $((0x1f1)) 1)"
    [ "$setup_sects" -ne 0 ] || setup_sects=4
    payload_offset="$(read_le "$bzimage" $((0x248)) 4)"
    payload_length="$(read_le "$bzimage" $((0x24c)) 4)"
    start=$(((setup_sects + 1) * 512 + payload_offset))
    magic="$(dd if="$bzimage" bs=1M iflag=skip_bytes,count_bytes skip="$start" count=4 status=none | od -An -tx1 | tr -d ' \n')"
    [ "$magic" = "02214c18" ] ||
        die "the bzImage payload is not LZ4 legacy (magic $magic); only LZ4 kernels are supported"
    expected="$(read_le "$bzimage" $((start + payload_length - 4)) 4)"
    dd if="$bzimage" bs=1M iflag=skip_bytes,count_bytes skip="$start" count=$((payload_length - 4)) status=none |
        lz4 -dc >"$out" || die "lz4 could not unpack the kernel payload"
    actual="$(stat -c %s "$out")"
    [ "$actual" = "$expected" ] ||
        die "unpacked vmlinux is $actual bytes, the bzImage says $expected"
    [ "$(od -An -tx1 -N4 "$out" | tr -d ' \n')" = "7f454c46" ] || die "unpacked payload is not an ELF file"
}

main() {
    need_cmd apt-get apt-cache dpkg-deb lz4 od dd
    # Before taking the lock: fetch-busybox.sh may take it itself.
    local busybox
    busybox="$("$(dirname "$0")/fetch-busybox.sh")"
    lock_cache

    # Fast path: a previous run finished (the 'current' link is only set when complete).
    if [ -z "${FERROVIRT_KERNEL_REFRESH:-}" ] && [ -f "$KERNEL_CACHE/current/complete" ]; then
        print_result "$(readlink -f "$KERNEL_CACHE/current")"
        return
    fi

    local package entry tmp deb version
    package="$(apt_first_dependency "$META_PACKAGE")"
    entry="$KERNEL_CACHE/$package"
    if [ ! -f "$entry/complete" ]; then
        echo "fetching $package into $entry" >&2
        rm -rf "$entry" "$entry.tmp"
        tmp="$entry.tmp"
        mkdir -p "$tmp/root"
        (cd "$tmp" && apt_download "$package")
        deb="$(echo "$tmp"/*.deb)"
        [ -f "$deb" ] || die "apt-get download produced no .deb for $package"
        dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb could not unpack $deb"
        rm -f "$deb"
        version="$(basename "$(echo "$tmp"/root/boot/vmlinuz-*)")"
        version="${version#vmlinuz-}"
        [ -d "$tmp/root/lib/modules/$version" ] || die "$package has no /lib/modules/$version"
        echo "$version" >"$tmp/version"
        cp "$tmp/root/boot/vmlinuz-$version" "$tmp/bzImage"
        extract_vmlinux "$tmp/bzImage" "$tmp/vmlinux"
        # Debian's package ships no modules.dep (the postinst runs depmod); busybox's depmod makes one.
        "$busybox" depmod -b "$tmp/root" "$version" || die "depmod failed for $version"
        [ -s "$tmp/root/lib/modules/$version/modules.dep" ] || die "depmod wrote no modules.dep"
        touch "$tmp/complete"
        mv "$tmp" "$entry"
    fi
    ln -sfn "$package" "$KERNEL_CACHE/current"
    print_result "$entry"
}

main "$@"
