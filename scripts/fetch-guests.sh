#!/usr/bin/env bash
# Fetch a Debian i386 kernel and a static busybox for Popek guests.
#
# Output (same layout as the project's pinned guests):
#   DEST/vmlinuz   the 686 bzImage (32-bit boot protocol)
#   DEST/config    that kernel's build configuration
#   DEST/busybox   static i386 busybox
#   DEST/SOURCES   which packages (and versions) they came from
#
# See --help. Needs no root, except for the one-time apt setup of the apt
# method (dpkg --add-architecture i386; apt-get update), which the script
# never runs itself: it prints the commands.
set -euo pipefail

PROG=${0##*/}
DEST=./guests
METHOD=auto
MIRROR=${POPEK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
FALLBACK_MIRROR=${POPEK_DEBIAN_FALLBACK_MIRROR:-http://ftp.debian.org/debian}
SUITE=${POPEK_DEBIAN_SUITE:-bookworm}
KERNEL_PKG="linux-image-686"
BUSYBOX_PKG="busybox-static"
KEEP_DEBS=0
FROM_DEBS=()
DRY_RUN=0

usage() {
    cat <<EOF
Usage: $PROG [options]

Fetch a Debian i386 Linux kernel (686 flavour, non-PAE) and a static i386
busybox into a directory, for booting with Popek (see docs/loaders.md).

Options:
  -d, --dest DIR           where to put vmlinuz, config, busybox (default: ./guests)
  -m, --method METHOD      how to fetch the packages:
                             apt     apt-get download (Debian/Ubuntu host with the
                                     i386 architecture enabled; see below)
                             mirror  straight from a Debian mirror with curl/wget
                                     (works on any Linux host with dpkg-deb or ar+tar)
                             auto    apt when i386 packages are available, else mirror
                                     (default)
      --mirror URL         Debian mirror for the mirror method
                           (default: \$POPEK_DEBIAN_MIRROR or $MIRROR)
      --fallback-mirror URL  tried when the first mirror fails ('' for none)
                           (default: \$POPEK_DEBIAN_FALLBACK_MIRROR or $FALLBACK_MIRROR)
      --suite NAME         Debian suite for the mirror method (default: $SUITE)
      --kernel-package P   kernel package or metapackage (default: $KERNEL_PKG)
      --busybox-package P  busybox package (default: $BUSYBOX_PKG)
      --from-deb FILE      do not download: extract from this .deb (repeatable;
                           give the kernel image and the busybox packages)
  -k, --keep-debs          keep the downloaded .deb files in DEST/debs
  -n, --dry-run            print what would be fetched, change nothing
  -h, --help               this text

Root: none of this needs root. The apt method needs the i386 architecture,
which only root can enable, once:
    sudo dpkg --add-architecture i386 && sudo apt-get update
Ubuntu has no i386 kernels; on Ubuntu use --method mirror (a Debian mirror).

Tools: curl or wget; xz or gzip; sha256sum; dpkg-deb, or ar and tar.
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

note() {
    printf '%s: %s\n' "$PROG" "$*" >&2
}

need_value() {
    [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value (see --help)"
}

parse_args() {
    while [[ $# -gt 0 ]]; do
        case $1 in
            -d | --dest) need_value "$@"; DEST=$2; shift 2 ;;
            --dest=*) DEST=${1#*=}; shift ;;
            -m | --method) need_value "$@"; METHOD=$2; shift 2 ;;
            --method=*) METHOD=${1#*=}; shift ;;
            --mirror) need_value "$@"; MIRROR=$2; shift 2 ;;
            --mirror=*) MIRROR=${1#*=}; shift ;;
            --fallback-mirror) [[ $# -ge 2 ]] || die "option $1 needs a value (see --help)"; FALLBACK_MIRROR=$2; shift 2 ;;
            --fallback-mirror=*) FALLBACK_MIRROR=${1#*=}; shift ;;
            --suite) need_value "$@"; SUITE=$2; shift 2 ;;
            --suite=*) SUITE=${1#*=}; shift ;;
            --kernel-package) need_value "$@"; KERNEL_PKG=$2; shift 2 ;;
            --busybox-package) need_value "$@"; BUSYBOX_PKG=$2; shift 2 ;;
            --from-deb) need_value "$@"; FROM_DEBS+=("$2"); shift 2 ;;
            -k | --keep-debs) KEEP_DEBS=1; shift ;;
            -n | --dry-run) DRY_RUN=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown argument '$1' (see --help)" ;;
        esac
    done
    case $METHOD in
        apt | mirror | auto) ;;
        *) die "--method must be apt, mirror or auto, not '$METHOD'" ;;
    esac
    if [[ ${#FROM_DEBS[@]} -gt 0 ]]; then
        METHOD=local
    fi
}

have() {
    command -v "$1" >/dev/null 2>&1
}

# --- downloading --------------------------------------------------------------

# fetch URL FILE: download with curl or wget.
fetch() {
    if have curl; then
        curl -fsSL --retry 2 -o "$2" "$1"
    elif have wget; then
        wget -q -O "$2" "$1"
    else
        die "neither curl nor wget is installed"
    fi
}

# fetch_mirrored PATH FILE: PATH relative to the mirror root; falls back.
fetch_mirrored() {
    local m
    for m in "$MIRROR" "$FALLBACK_MIRROR"; do
        [[ -n $m ]] || continue
        if fetch "${m%/}/$1" "$2"; then
            return 0
        fi
        note "could not fetch ${m%/}/$1"
    done
    return 1
}

# --- the mirror method --------------------------------------------------------

# packages_index FILE: the suite's i386 package index, decompressed, into FILE.
packages_index() {
    local base="dists/$SUITE/main/binary-i386/Packages"
    if have xz && fetch_mirrored "$base.xz" "$1.xz"; then
        xz -dc "$1.xz" >"$1"
    elif fetch_mirrored "$base.gz" "$1.gz"; then
        gzip -dc "$1.gz" >"$1"
    else
        die "cannot download the $SUITE i386 package index from $MIRROR or $FALLBACK_MIRROR"
    fi
}

# pkg_field INDEX PACKAGE FIELD: the field of the package's (first) stanza.
pkg_field() {
    awk -v p="$2" -v f="$3" '
        BEGIN { RS = ""; FS = "\n" }
        {
            mine = 0
            for (i = 1; i <= NF; i++) if ($i == "Package: " p) mine = 1
            if (!mine) next
            for (i = 1; i <= NF; i++)
                if (index($i, f ": ") == 1) { print substr($i, length(f) + 3); exit }
        }' "$1"
}

# first_dep DEPENDS PREFIX: the first dependency whose name starts with PREFIX.
first_dep() {
    printf '%s\n' "$1" | sed -e 's/[,|]/\n/g' | sed -e 's/([^)]*)//g' -e 's/:any//' -e 's/^ *//' -e 's/ *$//' |
        grep -m1 "^$2" || true
}

# mirror_download INDEX PACKAGE DIR: downloads the package's .deb, checks its
# SHA256 against the index, prints the .deb path.
mirror_download() {
    local file sum version deb
    file=$(pkg_field "$1" "$2" Filename)
    [[ -n $file ]] || die "package $2 is not in $SUITE/main for i386"
    sum=$(pkg_field "$1" "$2" SHA256)
    version=$(pkg_field "$1" "$2" Version)
    deb="$3/${file##*/}"
    note "downloading $2 $version ($file)"
    fetch_mirrored "$file" "$deb" || die "cannot download $file"
    if [[ -n $sum ]] && have sha256sum; then
        printf '%s  %s\n' "$sum" "$deb" | sha256sum -c --quiet - >/dev/null ||
            die "$deb: SHA256 does not match the package index"
    fi
    printf '%s %s\n' "$2" "$version" >>"$3/sources"
    printf '%s\n' "$deb"
}

# resolve_kernel_mirror INDEX: the package that holds /boot/vmlinuz-*
# (follows a metapackage such as linux-image-686 to linux-image-6.1.0-N-686).
resolve_kernel_mirror() {
    local pkg=$KERNEL_PKG dep depth
    for depth in 1 2 3; do
        [[ -n $(pkg_field "$1" "$pkg" Filename) ]] || die "package $pkg is not in $SUITE/main for i386"
        case $pkg in
            linux-image-[0-9]*.[0-9]*) printf '%s\n' "$pkg"; return ;;
        esac
        dep=$(first_dep "$(pkg_field "$1" "$pkg" Depends)" linux-image-)
        [[ -n $dep ]] || { printf '%s\n' "$pkg"; return; }
        note "$pkg depends on $dep (step $depth)"
        pkg=$dep
    done
    printf '%s\n' "$pkg"
}

fetch_mirror() {
    local work=$1 index kernel
    index="$work/Packages"
    note "reading the $SUITE i386 package index from $MIRROR"
    packages_index "$index"
    kernel=$(resolve_kernel_mirror "$index")
    if [[ $DRY_RUN -eq 1 ]]; then
        printf 'would download: %s (%s) and %s (%s) from %s\n' \
            "$kernel" "$(pkg_field "$index" "$kernel" Filename)" \
            "$BUSYBOX_PKG" "$(pkg_field "$index" "$BUSYBOX_PKG" Filename)" "$MIRROR"
        exit 0
    fi
    mirror_download "$index" "$kernel" "$work" >"$work/debs.list"
    mirror_download "$index" "$BUSYBOX_PKG" "$work" >>"$work/debs.list"
}

# --- the apt method -----------------------------------------------------------

i386_enabled() {
    have dpkg || return 1
    [[ $(dpkg --print-architecture) == i386 ]] && return 0
    dpkg --print-foreign-architectures | grep -qx i386
}

apt_has() {
    apt-cache policy "$1:i386" 2>/dev/null | grep -q 'Candidate: [^(]'
}

resolve_kernel_apt() {
    local pkg=$KERNEL_PKG dep depth
    for depth in 1 2 3; do
        case $pkg in
            linux-image-[0-9]*.[0-9]*) break ;;
        esac
        dep=$(apt-cache depends --no-recommends --no-suggests "$pkg:i386" 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^<?linux-image-/ { gsub(/[<>]/, "", $2); sub(/:i386$/, "", $2); print $2; exit }')
        [[ -n $dep ]] || break
        note "$pkg depends on $dep (step $depth)"
        pkg=$dep
    done
    printf '%s\n' "$pkg"
}

fetch_apt() {
    local work=$1 kernel p deb
    have apt-get || die "apt-get is not installed: use --method mirror"
    if ! i386_enabled; then
        die "the i386 architecture is not enabled for apt. Enable it once (needs root):
    sudo dpkg --add-architecture i386 && sudo apt-get update
or use --method mirror (no root)."
    fi
    kernel=$(resolve_kernel_apt)
    for p in "$kernel" "$BUSYBOX_PKG"; do
        apt_has "$p" || die "apt has no candidate for $p:i386 (Ubuntu has no i386 kernels: use --method mirror)"
    done
    if [[ $DRY_RUN -eq 1 ]]; then
        printf 'would run: apt-get download %s:i386 %s:i386\n' "$kernel" "$BUSYBOX_PKG"
        exit 0
    fi
    (cd "$work" && apt-get download -q "$kernel:i386" "$BUSYBOX_PKG:i386" >&2) ||
        die "apt-get download failed"
    for deb in "$work"/*.deb; do
        printf '%s\n' "$deb" >>"$work/debs.list"
        printf '%s %s\n' "$(dpkg-deb -f "$deb" Package)" "$(dpkg-deb -f "$deb" Version)" >>"$work/sources"
    done
}

# --- extraction ---------------------------------------------------------------

# extract_deb DEB DIR: unpacks the package's files under DIR.
extract_deb() {
    mkdir -p "$2"
    if have dpkg-deb; then
        dpkg-deb -x "$1" "$2"
        return
    fi
    have ar || die "neither dpkg-deb nor ar is installed: cannot unpack $1"
    local tmp data
    tmp=$(mktemp -d)
    (cd "$tmp" && ar x "$(realpath "$1")")
    data=$(find "$tmp" -maxdepth 1 -name 'data.tar*' | head -n1)
    [[ -n $data ]] || die "$1: no data.tar member"
    tar -xf "$data" -C "$2"
    rm -rf "$tmp"
}

install_guests() {
    local work=$1 root="$1/root" deb vmlinuz config busybox
    while IFS= read -r deb; do
        extract_deb "$deb" "$root"
    done <"$work/debs.list"
    [[ -d $root/boot ]] || die "the kernel package has no /boot (a metapackage? give --kernel-package linux-image-VERSION-686)"
    vmlinuz=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort | tail -n1)
    [[ -n $vmlinuz ]] || die "no /boot/vmlinuz-* in the kernel package"
    config=$(find "$root/boot" -maxdepth 1 -name 'config-*' 2>/dev/null | sort | tail -n1)
    busybox=""
    for p in bin/busybox usr/bin/busybox; do
        [[ -f $root/$p ]] && busybox=$root/$p && break
    done
    [[ -n $busybox ]] || die "no bin/busybox in the busybox package"

    mkdir -p "$DEST"
    install -m 0644 "$vmlinuz" "$DEST/vmlinuz"
    [[ -z $config ]] || install -m 0644 "$config" "$DEST/config"
    install -m 0755 "$busybox" "$DEST/busybox"
    cp "$work/sources" "$DEST/SOURCES"
    if [[ $KEEP_DEBS -eq 1 && $METHOD != local ]]; then
        mkdir -p "$DEST/debs"
        xargs -I{} cp {} "$DEST/debs/" <"$work/debs.list"
    fi

    printf 'Fetched into %s:\n' "$DEST"
    printf '  vmlinuz  %s (from %s, %s bytes)\n' "$DEST/vmlinuz" "${vmlinuz##*/}" "$(wc -c <"$DEST/vmlinuz")"
    [[ -z $config ]] || printf '  config   %s\n' "$DEST/config"
    printf '  busybox  %s (%s bytes)\n' "$DEST/busybox" "$(wc -c <"$DEST/busybox")"
    printf 'Packages:\n'
    sed 's/^/  /' "$DEST/SOURCES"
    printf 'Next: build an initramfs around busybox (popek initramfs, docs/loaders.md) and boot\n'
    printf '  %s/vmlinuz with console=ttyS0.\n' "$DEST"
}

main() {
    parse_args "$@"
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/popek-guests.XXXXXX")
    # shellcheck disable=SC2064 # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    : >"$work/sources"
    : >"$work/debs.list"
    case $METHOD in
        local)
            local deb
            for deb in "${FROM_DEBS[@]}"; do
                [[ -f $deb ]] || die "no such file: $deb"
                realpath "$deb" >>"$work/debs.list"
                if have dpkg-deb; then
                    printf '%s %s\n' "$(dpkg-deb -f "$deb" Package)" "$(dpkg-deb -f "$deb" Version)" >>"$work/sources"
                else
                    printf '%s\n' "${deb##*/}" >>"$work/sources"
                fi
            done
            ;;
        apt) fetch_apt "$work" ;;
        mirror) fetch_mirror "$work" ;;
        auto)
            if have apt-get && i386_enabled && apt_has "$BUSYBOX_PKG" && apt_has "$(resolve_kernel_apt)"; then
                METHOD=apt
                note "using apt (the i386 architecture is enabled)"
                fetch_apt "$work"
            else
                METHOD=mirror
                note "i386 packages are not available through apt here: downloading from $MIRROR"
                fetch_mirror "$work"
            fi
            ;;
    esac
    install_guests "$work"
}

main "$@"
