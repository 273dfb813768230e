#!/usr/bin/env bash
# Offline tests of fetch-guests.sh: argument parsing, the --from-deb path and
# the mirror method against a fake local mirror (file:// URLs, fake packages
# built with dpkg-deb). Downloads nothing. Needs dpkg-deb, xz, curl.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
script="$here/fetch-guests.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/popek-fetch-test.XXXXXX")
trap '[[ -n ${KEEP_WORK:-} ]] || rm -rf "$work"' EXIT
failures=0

check() {
    local what=$1
    shift
    if "$@"; then
        printf 'ok   %s\n' "$what"
    else
        printf 'FAIL %s\n' "$what"
        failures=$((failures + 1))
    fi
}

# quiet CMD...: CMD with its output discarded.
quiet() {
    "$@" >/dev/null 2>&1
}

# expect_fail PATTERN CMD...: CMD fails and its stderr matches PATTERN.
expect_fail() {
    local pattern=$1
    shift
    ! "$@" >"$work/out" 2>"$work/err" && grep -q -- "$pattern" "$work/err"
}

# make_deb NAME VERSION DIR: a binary package with DIR's contents.
make_deb() {
    mkdir -p "$3/DEBIAN"
    printf 'Package: %s\nVersion: %s\nArchitecture: i386\nMaintainer: test <t@example.org>\nDescription: fake\n' \
        "$1" "$2" >"$3/DEBIAN/control"
    dpkg-deb -Zxz --root-owner-group --build "$3" "$work/$1_$2_i386.deb" >/dev/null
    printf '%s\n' "$work/$1_$2_i386.deb"
}

kroot="$work/kroot"
mkdir -p "$kroot/boot"
printf 'fake bzImage\n' >"$kroot/boot/vmlinuz-6.1.0-99-686"
printf 'CONFIG_X86_32=y\n' >"$kroot/boot/config-6.1.0-99-686"
kdeb=$(make_deb linux-image-6.1.0-99-686 6.1.999-1 "$kroot")
broot="$work/broot"
mkdir -p "$broot/bin"
printf 'fake busybox\n' >"$broot/bin/busybox"
chmod 755 "$broot/bin/busybox"
bdeb=$(make_deb busybox-static 1:1.35.0-4 "$broot")
mdeb=$(make_deb linux-image-686 6.1.999-1 "$work/mroot")

# A fake mirror: the metapackage, the image package, busybox.
mirror="$work/mirror"
mkdir -p "$mirror/dists/bookworm/main/binary-i386" "$mirror/pool/main"
cp "$kdeb" "$bdeb" "$mdeb" "$mirror/pool/main/"
stanza() { # package version deb depends
    printf 'Package: %s\nVersion: %s\nArchitecture: i386\n' "$1" "$2"
    [[ -z $4 ]] || printf 'Depends: %s\n' "$4"
    printf 'Filename: pool/main/%s\nSHA256: %s\n\n' "${3##*/}" "$(sha256sum "$3" | cut -d' ' -f1)"
}
{
    stanza linux-image-686 6.1.999-1 "$mdeb" "linux-image-6.1.0-99-686 (= 6.1.999-1)"
    stanza linux-image-6.1.0-99-686 6.1.999-1 "$kdeb" "kmod, linux-base (>= 4.3~), initramfs-tools | linux-initramfs-tool"
    stanza busybox-static 1:1.35.0-4 "$bdeb" ""
} >"$mirror/dists/bookworm/main/binary-i386/Packages"
xz -k "$mirror/dists/bookworm/main/binary-i386/Packages"

check "--help prints usage" bash -c "'$script' --help | grep -q '^Usage:'"
check "-h is --help" bash -c "'$script' -h | grep -q -- '--method'"
check "unknown option rejected" expect_fail "unknown argument '--bogus'" "$script" --bogus
check "missing value rejected" expect_fail "option --dest needs a value" "$script" --dest
check "bad method rejected" expect_fail "must be apt, mirror or auto" "$script" --method yum
check "missing --from-deb file" expect_fail "no such file" "$script" --from-deb "$work/none.deb" --dest "$work/x"

check "--from-deb extracts" quiet "$script" --from-deb "$kdeb" --from-deb "$bdeb" --dest "$work/local"
check "  vmlinuz" grep -q 'fake bzImage' "$work/local/vmlinuz"
check "  config" grep -q CONFIG_X86_32 "$work/local/config"
check "  busybox executable" test -x "$work/local/busybox"
check "metapackage alone reported" expect_fail "has no /boot" \
    "$script" --from-deb "$mdeb" --from-deb "$bdeb" --dest "$work/meta"
check "  SOURCES" grep -q 'linux-image-6.1.0-99-686 6.1.999-1' "$work/local/SOURCES"

check "mirror dry run resolves the metapackage" bash -c \
    "'$script' --method mirror --mirror 'file://$mirror' --fallback-mirror '' --dry-run 2>/dev/null |
     grep -q 'linux-image-6.1.0-99-686 (pool/main/linux-image-6.1.0-99-686_6.1.999-1_i386.deb)'"
check "mirror method fetches and extracts" bash -c "'$script' --method mirror --mirror 'file://$mirror' \
    --fallback-mirror '' --dest '$work/m' --keep-debs >'$work/m.out' 2>&1"
check "  vmlinuz" grep -q 'fake bzImage' "$work/m/vmlinuz"
check "  busybox" grep -q 'fake busybox' "$work/m/busybox"
check "  kept debs" test -f "$work/m/debs/busybox-static_1:1.35.0-4_i386.deb"
check "  summary printed" grep -q "Fetched into $work/m" "$work/m.out"
check "mirror fallback used" quiet "$script" --method mirror --mirror "file://$work/nowhere" \
    --fallback-mirror "file://$mirror" --dest "$work/fb"
check "  vmlinuz via fallback" grep -q 'fake bzImage' "$work/fb/vmlinuz"

# A corrupted package fails the checksum.
cp -r "$mirror" "$work/bad"
printf 'x' >>"$work/bad/pool/main/${bdeb##*/}"
check "checksum mismatch detected" expect_fail "SHA256 does not match" \
    "$script" --method mirror --mirror "file://$work/bad" --fallback-mirror "" --dest "$work/b"
check "unknown package reported" expect_fail "not in bookworm/main for i386" \
    "$script" --method mirror --mirror "file://$mirror" --fallback-mirror "" --busybox-package nope --dest "$work/n"

if command -v dpkg >/dev/null && ! dpkg --print-foreign-architectures | grep -qx i386 &&
    [[ $(dpkg --print-architecture) != i386 ]]; then
    check "apt method explains the i386 setup" expect_fail "dpkg --add-architecture i386" \
        "$script" --method apt --dest "$work/a"
fi

if command -v shellcheck >/dev/null; then
    check "shellcheck clean" shellcheck "$script" "$0"
else
    printf 'skip shellcheck (not installed)\n'
fi

if [[ $failures -ne 0 ]]; then
    printf '%d check(s) failed\n' "$failures"
    exit 1
fi
printf 'all checks passed\n'
