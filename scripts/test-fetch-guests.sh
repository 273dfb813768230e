#!/usr/bin/env bash
# Offline tests of fetch-guests.sh: argument parsing, the --from-deb path,
# the mirror method against a fake local mirror (file:// URLs, fake packages
# built with dpkg-deb) and the apt method against the same mirror as an apt
# source (--apt-sources, [trusted=yes]). Downloads nothing. Needs dpkg-deb,
# xz, curl, sha256sum; apt-get for the apt checks (skipped without it).
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
    printf 'Filename: pool/main/%s\nSize: %s\nSHA256: %s\n\n' "${3##*/}" "$(wc -c <"$3")" \
        "$(sha256sum "$3" | cut -d' ' -f1)"
}
{
    stanza linux-image-686 6.1.999-1 "$mdeb" "linux-image-6.1.0-99-686 (= 6.1.999-1)"
    stanza linux-image-6.1.0-99-686 6.1.999-1 "$kdeb" "kmod, linux-base (>= 4.3~), initramfs-tools | linux-initramfs-tool"
    stanza busybox-static 1:1.35.0-4 "$bdeb" ""
} >"$mirror/dists/bookworm/main/binary-i386/Packages"
xz -k "$mirror/dists/bookworm/main/binary-i386/Packages"
# A Release file, so apt takes the mirror as a source (unsigned: the test's
# sources line says [trusted=yes]).
{
    printf 'Suite: bookworm\nCodename: bookworm\nArchitectures: i386\nComponents: main\n'
    printf 'Date: %s\nSHA256:\n' "$(LC_ALL=C date -u '+%a, %d %b %Y %H:%M:%S UTC')"
    for f in main/binary-i386/Packages main/binary-i386/Packages.xz; do
        printf ' %s %s %s\n' "$(sha256sum "$mirror/dists/bookworm/$f" | cut -d' ' -f1)" \
            "$(wc -c <"$mirror/dists/bookworm/$f")" "$f"
    done
} >"$mirror/dists/bookworm/Release"
printf 'deb [trusted=yes] file://%s bookworm main\n' "$mirror" >"$work/fake.list"

check "--help prints usage" bash -c "'$script' --help | grep -q '^Usage:'"
check "-h is --help" bash -c "'$script' -h | grep -q -- '--method'"
check "unknown option rejected" expect_fail "unknown argument '--bogus'" "$script" --bogus
check "missing value rejected" expect_fail "option --dest needs a value" "$script" --dest
check "bad method rejected" expect_fail "must be apt, mirror or auto" "$script" --method yum
check "missing --from-deb file" expect_fail "no such file" "$script" --from-deb "$work/none.deb" --dest "$work/x"
check "no mirror host built in" bash -c "! grep -n '://' '$script'"
check "mirror method without a mirror refused" expect_fail "none is built in" \
    env -u POPEK_DEBIAN_MIRROR "$script" --method mirror --dest "$work/x"
check "--apt-sources must be a .list or .sources" expect_fail "must name a .list or .sources" \
    "$script" --apt-sources "$script"

check "--from-deb extracts" quiet "$script" --from-deb "$kdeb" --from-deb "$bdeb" --dest "$work/local"
check "  vmlinuz" grep -q 'fake bzImage' "$work/local/vmlinuz"
check "  config" grep -q CONFIG_X86_32 "$work/local/config"
check "  busybox executable" test -x "$work/local/busybox"
check "metapackage alone reported" expect_fail "has no /boot" \
    "$script" --from-deb "$mdeb" --from-deb "$bdeb" --dest "$work/meta"
check "  SOURCES" grep -q 'linux-image-6.1.0-99-686 6.1.999-1' "$work/local/SOURCES"

check "mirror dry run resolves the metapackage" bash -c \
    "'$script' --method mirror --mirror 'file://$mirror' --dry-run 2>/dev/null |
     grep -q 'linux-image-6.1.0-99-686 (pool/main/linux-image-6.1.0-99-686_6.1.999-1_i386.deb)'"
check "mirror method fetches and extracts" bash -c "'$script' --method mirror --mirror 'file://$mirror' \
    --dest '$work/m' --keep-debs >'$work/m.out' 2>&1"
check "  vmlinuz" grep -q 'fake bzImage' "$work/m/vmlinuz"
check "  busybox" grep -q 'fake busybox' "$work/m/busybox"
check "  kept debs" test -f "$work/m/debs/busybox-static_1:1.35.0-4_i386.deb"
check "  summary printed" grep -q "Fetched into $work/m" "$work/m.out"
check "second --mirror used when the first fails" quiet "$script" --method mirror --mirror "file://$work/nowhere" \
    --mirror "file://$mirror" --dest "$work/fb"
check "  vmlinuz via the second mirror" grep -q 'fake bzImage' "$work/fb/vmlinuz"
check "POPEK_DEBIAN_MIRROR names the mirrors" quiet env POPEK_DEBIAN_MIRROR="file://$work/nowhere file://$mirror" \
    "$script" --method mirror --dest "$work/env"
check "  vmlinuz via the environment" grep -q 'fake bzImage' "$work/env/vmlinuz"

# A corrupted package fails the checksum.
cp -r "$mirror" "$work/bad"
printf 'x' >>"$work/bad/pool/main/${bdeb##*/}"
check "checksum mismatch detected" expect_fail "SHA256 does not match" \
    "$script" --method mirror --mirror "file://$work/bad" --dest "$work/b"
check "unknown package reported" expect_fail "not in bookworm/main for i386" \
    "$script" --method mirror --mirror "file://$mirror" --busybox-package nope --dest "$work/n"

# The apt method: a private apt state (the host's is not touched) reading
# the fake mirror as its only source.
if command -v apt-get >/dev/null && command -v apt-cache >/dev/null; then
    check "apt dry run resolves the metapackage" bash -c "'$script' --method apt --apt-sources '$work/fake.list' \
        --dry-run 2>'$work/ad.err' | grep -q 'apt-get download linux-image-6.1.0-99-686 busybox-static'"
    check "apt method fetches and extracts" bash -c "'$script' --method apt --apt-sources '$work/fake.list' \
        --dest '$work/a' --keep-debs >'$work/a.out' 2>&1"
    check "  vmlinuz" grep -q 'fake bzImage' "$work/a/vmlinuz"
    check "  busybox" grep -q 'fake busybox' "$work/a/busybox"
    check "  SOURCES" grep -q 'linux-image-6.1.0-99-686 6.1.999-1' "$work/a/SOURCES"
    check "apt unknown package reported" expect_fail "no i386 candidate for nope" \
        "$script" --method apt --apt-sources "$work/fake.list" --busybox-package nope --dest "$work/an"
else
    printf 'skip apt method (apt-get not installed)\n'
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
