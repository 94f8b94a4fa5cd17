# Shared helpers for the guest/ scripts (sourced, not run).
# Cache root: $FERROVIRT_GUEST_CACHE, or <repo>/target/guest-cache.

set -euo pipefail

FERROVIRT_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FERROVIRT_GUEST_CACHE="${FERROVIRT_GUEST_CACHE:-$FERROVIRT_REPO_ROOT/target/guest-cache}"
# Downloaded .debs are kept here, so a new cache (a test of an empty cache, a second target dir)
# unpacks them again without downloading.
FERROVIRT_DEB_ARCHIVE="${FERROVIRT_DEB_ARCHIVE:-$FERROVIRT_GUEST_CACHE/debs}"

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 1
}

need_cmd() {
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 ||
            die "'$cmd' is not installed (Debian: apt-get install $(pkg_for "$cmd"))"
    done
}

pkg_for() {
    case "$1" in
    apt-get | apt-cache) echo apt ;;
    dpkg-deb) echo dpkg ;;
    lz4) echo lz4 ;;
    flock) echo util-linux ;;
    mke2fs) echo e2fsprogs ;;
    busybox) echo busybox-static ;;
    xz) echo xz-utils ;;
    *) echo "$1" ;;
    esac
}

# Serialise cache writers: tests run in parallel and may all ask at once.
# Holds an exclusive lock on $FERROVIRT_GUEST_CACHE/.lock until the script exits.
lock_cache() {
    need_cmd flock
    mkdir -p "$FERROVIRT_GUEST_CACHE"
    exec 9>"$FERROVIRT_GUEST_CACHE/.lock"
    flock 9
}

# One Debian package's .deb into the current directory (no install): from the archive of earlier
# downloads when it is there, else downloaded (and kept in the archive).
# Refreshes the package lists once if apt does not know the package.
apt_download() {
    local pkg="$1" kept deb tmp
    kept="$(ls "$FERROVIRT_DEB_ARCHIVE/${pkg}"_*.deb 2>/dev/null | head -n1 || true)"
    if [ -n "$kept" ]; then
        cp "$kept" .
        return
    fi
    if ! apt-get download "$pkg" >&2; then
        echo "apt-get download $pkg failed; running apt-get update and retrying" >&2
        apt-get update >&2 || die "apt-get update failed"
        apt-get download "$pkg" >&2 || die "cannot download Debian package $pkg"
    fi
    mkdir -p "$FERROVIRT_DEB_ARCHIVE"
    for deb in "${pkg}"_*.deb; do
        # Copy, then rename: a reader of the archive never sees half a file.
        tmp="$(mktemp "$FERROVIRT_DEB_ARCHIVE/.in.XXXXXX")"
        cp "$deb" "$tmp" && mv "$tmp" "$FERROVIRT_DEB_ARCHIVE/$deb"
    done
}

# The first 'Depends:' of a package, e.g. linux-image-cloud-amd64 -> linux-image-6.1.0-56-cloud-amd64.
apt_first_dependency() {
    local pkg="$1" dep
    dep="$(apt-cache depends "$pkg" 2>/dev/null | awk '/^  Depends:/ { print $2; exit }')"
    if [ -z "$dep" ]; then
        echo "apt does not know $pkg; running apt-get update" >&2
        apt-get update >&2 || die "apt-get update failed"
        dep="$(apt-cache depends "$pkg" 2>/dev/null | awk '/^  Depends:/ { print $2; exit }')"
    fi
    [ -n "$dep" ] || die "cannot resolve the dependency of $pkg with apt-cache"
    echo "$dep"
}
