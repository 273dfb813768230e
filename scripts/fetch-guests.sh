#!/usr/bin/env bash
# Fetch a Debian i386 kernel and a static busybox for Popek guests.
#
# Output (same layout as the project's pinned guests):
#   DEST/vmlinuz   the 686 bzImage (32-bit boot protocol)
#   DEST/config    that kernel's build configuration
#   DEST/busybox   static i386 busybox
#   DEST/SOURCES   which packages (and versions) they came from
#
# See --help. Needs no root and changes nothing on the host: the apt method
# runs apt with a private, temporary state (the host's sources, keys and apt
# settings, read for the i386 architecture); the mirror method downloads from
# a mirror the user names. The script has no mirror host of its own.
set -euo pipefail

PROG=${0##*/}
DEST=./guests
METHOD=auto
# Mirrors for the mirror method, tried in order: --mirror (repeatable), else
# $POPEK_DEBIAN_MIRROR (space-separated). No default.
MIRRORS=()
SUITE=${POPEK_DEBIAN_SUITE:-bookworm}
APT_SOURCES=""
KERNEL_PKG="linux-image-686"
BUSYBOX_PKG="busybox-static"
KEEP_DEBS=0
FROM_DEBS=()
DRY_RUN=0

usage() {
    cat <<USAGE
Usage: $PROG [options]

Fetch a Debian i386 Linux kernel (686 flavour, non-PAE) and a static i386
busybox into a directory, for booting with Popek (see docs/loaders.md).

Options:
  -d, --dest DIR           where to put vmlinuz, config, busybox (default: ./guests)
  -m, --method METHOD      how to fetch the packages:
                             apt     apt-get update + apt-get download with the
                                     host's apt sources and keys, for the i386
                                     architecture, in a private temporary apt state
                                     (no root; the host's apt state is not touched)
                             mirror  straight from the Debian mirror given with
                                     --mirror, with curl or wget (any Linux host
                                     with dpkg-deb or ar+tar)
                             auto    apt when apt-get is installed, else mirror
                                     (default)
      --mirror URL         a Debian mirror (the directory holding dists/ and
                           pool/) for the mirror method; repeat it to give
                           fallbacks, tried in order (default: the
                           space-separated list in \$POPEK_DEBIAN_MIRROR; no
                           mirror is built in)
      --suite NAME         Debian suite for the mirror method (default: $SUITE)
      --apt-sources FILE   for the apt method: read this sources file (one-line
                           .list or deb822 .sources) instead of the host's
      --kernel-package P   kernel package or metapackage (default: $KERNEL_PKG)
      --busybox-package P  busybox package (default: $BUSYBOX_PKG)
      --from-deb FILE      do not download: extract from this .deb (repeatable;
                           give the kernel image and the busybox packages)
  -k, --keep-debs          keep the downloaded .deb files in DEST/debs
  -n, --dry-run            print what would be fetched and fetch no package (the
                           apt method still reads the package indexes)
  -h, --help               this text

The apt method needs sources that carry i386 packages, as a Debian host's
do. Ubuntu has no i386 kernels: there, use --method mirror --mirror URL with
a Debian mirror.

Tools: apt-get and apt-cache (apt method), or curl or wget, xz or gzip and
sha256sum (mirror method); dpkg-deb, or ar and tar.
USAGE
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
            --mirror) need_value "$@"; MIRRORS+=("$2"); shift 2 ;;
            --mirror=*) MIRRORS+=("${1#*=}"); shift ;;
            --suite) need_value "$@"; SUITE=$2; shift 2 ;;
            --suite=*) SUITE=${1#*=}; shift ;;
            --apt-sources) need_value "$@"; APT_SOURCES=$2; shift 2 ;;
            --apt-sources=*) APT_SOURCES=${1#*=}; shift ;;
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
    if [[ ${#MIRRORS[@]} -eq 0 && -n ${POPEK_DEBIAN_MIRROR:-} ]]; then
        read -r -a MIRRORS <<<"$POPEK_DEBIAN_MIRROR"
    fi
    if [[ -n $APT_SOURCES ]]; then
        [[ -f $APT_SOURCES ]] || die "no such file: $APT_SOURCES"
        case $APT_SOURCES in
            *.list | *.sources) ;;
            *) die "--apt-sources must name a .list or .sources file, not '$APT_SOURCES'" ;;
        esac
    fi
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

# fetch_mirrored PATH FILE: PATH relative to the mirror root, from each
# mirror in turn until one has it.
fetch_mirrored() {
    local m
    for m in "${MIRRORS[@]}"; do
        if fetch "${m%/}/$1" "$2"; then
            return 0
        fi
        note "could not fetch ${m%/}/$1"
    done
    return 1
}

# --- the mirror method --------------------------------------------------------

need_mirror() {
    [[ ${#MIRRORS[@]} -gt 0 ]] ||
        die "the mirror method needs a Debian mirror: pass --mirror URL (or set POPEK_DEBIAN_MIRROR); none is built in"
}

# packages_index FILE: the suite's i386 package index, decompressed, into FILE.
packages_index() {
    local base="dists/$SUITE/main/binary-i386/Packages"
    if have xz && fetch_mirrored "$base.xz" "$1.xz"; then
        xz -dc "$1.xz" >"$1"
    elif fetch_mirrored "$base.gz" "$1.gz"; then
        gzip -dc "$1.gz" >"$1"
    else
        die "cannot download the $SUITE i386 package index from ${MIRRORS[*]}"
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
    need_mirror
    index="$work/Packages"
    note "reading the $SUITE i386 package index from ${MIRRORS[0]}"
    packages_index "$index"
    kernel=$(resolve_kernel_mirror "$index")
    if [[ $DRY_RUN -eq 1 ]]; then
        printf 'would download: %s (%s) and %s (%s) from %s\n' \
            "$kernel" "$(pkg_field "$index" "$kernel" Filename)" \
            "$BUSYBOX_PKG" "$(pkg_field "$index" "$BUSYBOX_PKG" Filename)" "${MIRRORS[0]}"
        exit 0
    fi
    mirror_download "$index" "$kernel" "$work" >"$work/debs.list"
    mirror_download "$index" "$BUSYBOX_PKG" "$work" >>"$work/debs.list"
}

# --- the apt method -----------------------------------------------------------

# apt_setup WORK: a private apt configuration in WORK/apt that reads the
# host's sources and keys (or --apt-sources) for the i386 architecture alone,
# with its own package lists, cache and an empty dpkg status; then reads the
# package indexes. APT_CONFIG names it from here on (the host's apt.conf.d
# settings, such as a proxy, still apply).
apt_setup() {
    local a="$1/apt"
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/sources.list.d"
    : >"$a/status"
    : >"$a/sources.list"
    {
        printf 'APT::Architecture "i386";\nAPT::Architectures { "i386"; };\n'
        printf 'Dir::State::Lists "%s";\nDir::State::status "%s";\nDir::Cache "%s";\n' \
            "$a/lists" "$a/status" "$a/cache"
        printf 'Debug::NoLocking "true";\nAcquire::Languages "none";\n'
        if [[ -n $APT_SOURCES ]]; then
            cp "$APT_SOURCES" "$a/sources.list.d/"
            printf 'Dir::Etc::sourcelist "%s";\nDir::Etc::sourceparts "%s";\n' "$a/sources.list" "$a/sources.list.d"
        fi
        # As root, apt downloads as the _apt user, who cannot write to the
        # private (mode 0700) directory.
        if [[ $(id -u) -eq 0 ]]; then
            printf 'APT::Sandbox::User "root";\n'
        fi
    } >"$a/apt.conf"
    export APT_CONFIG="$a/apt.conf"
    note "reading the i386 package indexes of $(sources_name) (private apt state in $a)"
    if ! apt-get update -q >"$a/update.log" 2>&1; then
        sed 's/^/  /' "$a/update.log" >&2
        die "apt-get update failed for the i386 architecture (see above)"
    fi
    grep '^[WE]:' "$a/update.log" | sed 's/^/  /' >&2 || true
}

# sources_name: what the apt method reads, for messages.
sources_name() {
    if [[ -n $APT_SOURCES ]]; then
        printf '%s\n' "$APT_SOURCES"
    else
        printf 'the host apt sources\n'
    fi
}

apt_has() {
    # Not grep -q: an early exit would fail apt-cache on SIGPIPE (pipefail).
    apt-cache policy "$1" 2>/dev/null | grep 'Candidate: [^(]' >/dev/null
}

# resolve_kernel_apt: the package that holds /boot/vmlinuz-* (follows a
# metapackage such as linux-image-686 to linux-image-6.1.0-N-686).
resolve_kernel_apt() {
    local pkg=$KERNEL_PKG dep depth
    for depth in 1 2 3; do
        case $pkg in
            linux-image-[0-9]*.[0-9]*) break ;;
        esac
        dep=$(apt-cache depends --no-recommends --no-suggests "$pkg" 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^<?linux-image-/ { gsub(/[<>]/, "", $2); sub(/:i386$/, "", $2); print $2; exit }')
        [[ -n $dep ]] || break
        note "$pkg depends on $dep (step $depth)"
        pkg=$dep
    done
    printf '%s\n' "$pkg"
}

fetch_apt() {
    local work=$1 kernel p deb
    if ! have apt-get || ! have apt-cache; then
        die "apt-get is not installed: use --method mirror --mirror URL"
    fi
    apt_setup "$work"
    kernel=$(resolve_kernel_apt)
    for p in "$kernel" "$BUSYBOX_PKG"; do
        apt_has "$p" ||
            die "apt has no i386 candidate for $p in $(sources_name) (Ubuntu has no i386 kernels: use --method mirror --mirror URL)"
    done
    if [[ $DRY_RUN -eq 1 ]]; then
        printf 'would run: apt-get download %s %s (architecture i386)\n' "$kernel" "$BUSYBOX_PKG"
        exit 0
    fi
    mkdir -p "$work/debs"
    (cd "$work/debs" && apt-get download -q "$kernel" "$BUSYBOX_PKG" >&2) ||
        die "apt-get download failed"
    for deb in "$work"/debs/*.deb; do
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
            if have apt-get && have apt-cache; then
                METHOD=apt
                fetch_apt "$work"
            elif [[ ${#MIRRORS[@]} -gt 0 ]]; then
                METHOD=mirror
                note "apt-get is not installed: downloading from ${MIRRORS[0]}"
                fetch_mirror "$work"
            else
                die "apt-get is not installed and no mirror was given: pass --mirror URL (a Debian mirror) or set POPEK_DEBIAN_MIRROR"
            fi
            ;;
    esac
    install_guests "$work"
}

main "$@"
