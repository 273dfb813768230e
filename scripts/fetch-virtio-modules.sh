#!/bin/sh
# Fetches the virtio modules of Debian's i386 686 kernel (the one in
# ../shared/guests/linux-686) into target/guest-modules/linux-686/, for the
# tests that boot it with virtio disks (tests/tests/linux_virtio.rs). Uses
# apt on a Debian host: the i386 architecture is added if it is missing.
# POPEK_VIRTIO_MODULES=DIR puts them elsewhere (the tests read it too).
# Usage: scripts/fetch-virtio-modules.sh [KERNEL_VERSION]   (default 6.1.0-50-686)
set -eu
cd "$(dirname "$0")/.."
V=${1:-6.1.0-50-686}
OUT=${POPEK_VIRTIO_MODULES:-target/guest-modules/linux-686}
if ! dpkg --print-foreign-architectures | grep -qx i386; then
    dpkg --add-architecture i386
    apt-get update -qq
fi
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
(cd "$T" && apt-get download "linux-image-$V:i386")
dpkg-deb -x "$T"/linux-image-*.deb "$T/x"
mkdir -p "$OUT"
K="$T/x/lib/modules/$V/kernel/drivers"
for m in virtio/virtio virtio/virtio_ring virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev \
         virtio/virtio_pci block/virtio_blk char/hw_random/virtio-rng; do
    cp "$K/$m.ko" "$OUT/"
done
echo "$V" > "$OUT/VERSION"
ls -l "$OUT"
