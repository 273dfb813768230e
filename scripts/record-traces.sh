#!/bin/sh
# Re-records the trace corpus in tests/traces/ that `cargo test` replays
# (tests/tests/traces.rs). Run it after a change that legitimately alters
# what guests see (device models, CPUID policy, virtual time), and say so
# in the commit. Needs ../shared/guests (or POPEK_GUESTS) for Linux.
#
# The Linux trace is per CPU vendor (linux.amd.trace, linux.intel.trace):
# translated code runs natively, and the flags some instructions leave
# undefined differ between AMD and Intel. This records the current host's.
# `--linux-only` leaves the demo and nano traces alone.
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p popek
P=target/release/popek
G=${POPEK_GUESTS:-../shared/guests}
T=tests/traces
case "$(grep -m1 vendor_id /proc/cpuinfo)" in
    *AuthenticAMD*) V=amd ;;
    *GenuineIntel*) V=intel ;;
    *) echo "unknown CPU vendor: no Linux trace name for it" >&2; exit 1 ;;
esac
if [ "${1:-}" != "--linux-only" ]; then
    $P run --guest demo --no-input --record $T/demo.trace > $T/demo.console
    $P run --guest nano --no-input --record $T/nano.trace > $T/nano.console
fi
$P initramfs --busybox "$G/linux-686/busybox" --init $T/linux-init.sh -o target/linux-trace.cpio.gz
# The line is typed after the guest asks for it (a boot takes ~10 s here);
# it enters the guest at the first designated point after it arrives.
(sleep 25; printf 'echo "got [hello popek]"; poweroff -f\n'; sleep 5) | $P run --kernel "$G/linux-686/vmlinuz" --initrd target/linux-trace.cpio.gz \
    --append "console=ttyS0 panic=-1 quiet" --mem 128M --record $T/linux.$V.trace > $T/linux.$V.console
for t in $T/*.trace; do $P trace info "$t"; done
