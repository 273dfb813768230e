#!/bin/sh
# Builds a Debian 12 (bookworm) i386 system for `popek run --disk`: a raw
# ext4 image of a root filesystem with systemd, udev, procps and
# python3-minimal, Debian's linux-image-686 and its own initrd (which loads
# virtio_pci, virtio_blk and ext4). Needs mmdebstrap, arch-test (for the
# i386 tree on an amd64 host) and e2fsprogs (apt-get install mmdebstrap
# arch-test), root (or fakeroot), and a reachable Debian mirror:
# mmdebstrap's default or the one apt is configured with; none is written
# here. The root account has an empty password.
#
#   scripts/make-debian-image.sh [OUTDIR] [SIZE]     (default target/debian, 2G)
#   popek run --kernel OUTDIR/vmlinuz --initrd OUTDIR/initrd.img \
#       --disk OUTDIR/debian.img --mem 512M --append "root=/dev/vda console=ttyS0"
set -eu
cd "$(dirname "$0")/.."
OUT=${1:-target/debian}
SIZE=${2:-2G}
mkdir -p "$OUT"
ROOT="$OUT/rootfs"
rm -rf "$ROOT"
mmdebstrap --architectures=i386 --variant=minbase \
    --include=systemd,systemd-sysv,udev,dbus,procps,python3-minimal,linux-image-686,initramfs-tools,e2fsprogs,login,passwd \
    --customize-hook='echo popek > "$1/etc/hostname"' \
    --customize-hook='printf "127.0.1.1 popek\n" >> "$1/etc/hosts"' \
    --customize-hook='printf "/dev/vda / ext4 defaults 0 1\n" > "$1/etc/fstab"' \
    --customize-hook='chroot "$1" passwd -d root' \
    bookworm "$ROOT"
cp "$ROOT"/boot/vmlinuz-* "$OUT/vmlinuz"
cp "$ROOT"/boot/initrd.img-* "$OUT/initrd.img"
rm -f "$OUT/debian.img"
mke2fs -q -t ext4 -L debian -d "$ROOT" "$OUT/debian.img" "$SIZE"
rm -rf "$ROOT"
ls -l "$OUT"
