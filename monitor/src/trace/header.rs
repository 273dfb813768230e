//! What a trace header says about the machine it was recorded on: the
//! machine's command line, the SHA-256 of its images, the CPUID answers of
//! the guest's policy. Recording writes them, replay rebuilds the machine
//! from them and checks the images. `run` turns a [`MachineSpec`] into run
//! options; nothing here knows about running.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::format::{CpuidEntry, Header, ImageDigest};

/// The machine a trace names: its images and its RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineSpec {
    pub kernel: Option<PathBuf>,
    /// A built-in guest by name, when there is no `kernel`.
    pub guest: Option<String>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// The PC; a header without `--machine` means `isa` (recorded before
    /// there was a choice).
    pub machine: crate::devices::platform::Machine,
    /// A `pc` recorded before its CPU offered the TSC-deadline timer (the
    /// header's CPUID leaf 1 says so): replay gives the guest that CPU, or
    /// the trace would diverge where the kernel chose its timer.
    pub legacy_cpu: bool,
    /// Recorded with device models older than [`MODEL_REVISION`] 1 (the
    /// i8042 announced only the first byte of a keyboard answer): replay
    /// gives the guest that keyboard controller.
    ///
    /// [`MODEL_REVISION`]: crate::trace::format::MODEL_REVISION
    pub legacy_keyboard: bool,
    /// Recorded before [`MODEL_REVISION`] 2, or with `--guest-decompress`:
    /// the guest ran the bzImage's decompressor, so the replay does too.
    ///
    /// [`MODEL_REVISION`]: crate::trace::format::MODEL_REVISION
    pub guest_decompress: bool,
}

#[derive(Debug, Error)]
pub enum HeaderError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no built-in guest named {0:?} (`popek guest list`)")]
    NoSuchGuest(String),
    #[error("header: {0}")]
    Malformed(String),
    #[error("{0} is not a regular file: an image must be one to be hashed")]
    NotAFile(PathBuf),
}

/// Reads an image the header names. Only regular files: a trace is input
/// too, and one naming `/dev/zero` or a FIFO would otherwise make `popek
/// replay` read for ever before the SHA-256 check (docs/reliability.md).
fn read(path: &Path) -> Result<Vec<u8>, HeaderError> {
    let err = |source| HeaderError::Read { path: path.to_owned(), source };
    if !std::fs::metadata(path).map_err(err)?.is_file() {
        return Err(HeaderError::NotAFile(path.to_owned()));
    }
    std::fs::read(path).map_err(err)
}

/// The images `m` loads, with their SHA-256 (a trace's identity check).
pub fn image_digests(m: &MachineSpec) -> Result<Vec<ImageDigest>, HeaderError> {
    use sha2::Digest;
    let digest = |role: &str, name: String, data: &[u8]| ImageDigest {
        role: role.into(),
        name,
        len: data.len() as u64,
        sha256: sha2::Sha256::digest(data).into(),
    };
    let mut v = Vec::new();
    match &m.kernel {
        Some(k) => v.push(digest("kernel", k.display().to_string(), &read(k)?)),
        None => {
            let name = m.guest.as_deref().unwrap_or("demo");
            let g = crate::guests::by_name(name).ok_or_else(|| HeaderError::NoSuchGuest(name.to_string()))?;
            v.push(digest("guest", name.to_string(), &g.image));
        }
    }
    if let Some(i) = &m.initrd {
        v.push(digest("initrd", i.display().to_string(), &read(i)?));
    }
    Ok(v)
}

/// The machine description a trace header keeps (and a replay rebuilds).
pub fn command_line(m: &MachineSpec) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(k) = &m.kernel {
        v.extend(["--kernel".to_string(), k.display().to_string()]);
    }
    if let Some(g) = &m.guest {
        v.extend(["--guest".to_string(), g.clone()]);
    }
    if let Some(i) = &m.initrd {
        v.extend(["--initrd".to_string(), i.display().to_string()]);
    }
    if let Some(a) = &m.append {
        v.extend(["--append".to_string(), a.clone()]);
    }
    v.extend(["--mem".to_string(), m.mem.to_string()]);
    v.extend(["--machine".to_string(), m.machine.name().to_string()]);
    v
}

/// Rebuilds the machine from a trace header's command line.
pub fn machine_from_header(h: &Header) -> Result<MachineSpec, HeaderError> {
    let mut m =
        MachineSpec { mem: h.mem_bytes, machine: crate::devices::platform::Machine::Isa, ..MachineSpec::default() };
    let mut it = h.command_line.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| HeaderError::Malformed(format!("{flag} without a value")));
        match flag.as_str() {
            "--kernel" => m.kernel = Some(PathBuf::from(value()?)),
            "--guest" => m.guest = Some(value()?),
            "--initrd" => m.initrd = Some(PathBuf::from(value()?)),
            "--append" => m.append = Some(value()?),
            "--mem" => m.mem = parse_size(&value()?).map_err(HeaderError::Malformed)?,
            "--machine" => m.machine = value()?.parse().map_err(HeaderError::Malformed)?,
            other => return Err(HeaderError::Malformed(format!("unknown machine option {other:?}"))),
        }
    }
    let tsc_deadline = crate::cpu::policy::ecx1::TSC_DEADLINE;
    m.legacy_cpu = m.machine == crate::devices::platform::Machine::Pc
        && h.cpuid.iter().find(|c| (c.leaf, c.subleaf) == (1, 0)).is_some_and(|c| c.regs[2] & tsc_deadline == 0);
    m.legacy_keyboard = h.model_revision < 1;
    m.guest_decompress = h.model_revision < 2;
    Ok(m)
}

/// The CPUID answers of the guest's policy (recorded in trace headers).
pub fn cpuid_entries(
    machine: crate::devices::platform::Machine,
    tsc_hz: u64,
    isolation: bool,
    legacy_cpu: bool,
) -> Vec<CpuidEntry> {
    let p = crate::run::cpu_policy(machine, tsc_hz, isolation, legacy_cpu);
    let mut v = Vec::new();
    for base in [0u32, 0x8000_0000] {
        let max = p.cpuid(base, 0)[0];
        for leaf in base..=max.min(base + 0x20) {
            v.push(CpuidEntry { leaf, subleaf: 0, regs: p.cpuid(leaf, 0) });
        }
    }
    v
}

/// Parses sizes like `256M`, `1G`, `65536K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size suffix in {s:?} (K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size too large: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
    }

    /// A trace naming a device or a FIFO as its kernel is refused at once
    /// instead of read for ever.
    #[test]
    fn images_must_be_regular_files() {
        for dev in ["/dev/zero", "/dev/null", "/"] {
            let m = MachineSpec { kernel: Some(dev.into()), ..MachineSpec::default() };
            assert!(matches!(image_digests(&m), Err(HeaderError::NotAFile(_))), "{dev}");
        }
        let m = MachineSpec { kernel: Some("/nonexistent/popek".into()), ..MachineSpec::default() };
        assert!(matches!(image_digests(&m), Err(HeaderError::Read { .. })));
    }

    #[test]
    fn a_machine_survives_its_command_line() {
        let m = MachineSpec {
            kernel: Some("k".into()),
            guest: None,
            initrd: Some("i".into()),
            append: Some("console=ttyS0 quiet".into()),
            mem: 128 << 20,
            machine: crate::devices::platform::Machine::Pc,
            legacy_cpu: false,
            legacy_keyboard: false,
            guest_decompress: false,
        };
        let h = Header {
            command_line: command_line(&m),
            mem_bytes: 1,
            model_revision: crate::trace::format::MODEL_REVISION,
            ..Header::default()
        };
        assert_eq!(machine_from_header(&h).unwrap(), m);
        // Recorded before device-model revision 1: the old keyboard IRQ.
        let before = Header { model_revision: 0, ..h.clone() };
        assert!(machine_from_header(&before).unwrap().legacy_keyboard);
        // Before revision 2 (or recorded with --guest-decompress): the
        // guest ran the bzImage's decompressor.
        let rev1 = machine_from_header(&Header { model_revision: 1, ..h.clone() }).unwrap();
        assert!(rev1.guest_decompress && !rev1.legacy_keyboard);
        // Recorded before `--machine` existed: the isa machine.
        let old = Header { command_line: vec!["--mem".into(), "1M".into()], ..Header::default() };
        assert_eq!(machine_from_header(&old).unwrap().machine, crate::devices::platform::Machine::Isa);
    }

    #[test]
    fn a_pc_recorded_without_the_tsc_deadline_timer_replays_on_that_cpu() {
        use crate::devices::platform::Machine;
        let pc = MachineSpec { mem: 1 << 20, machine: Machine::Pc, ..MachineSpec::default() };
        let header = |legacy| Header {
            command_line: command_line(&pc),
            mem_bytes: pc.mem,
            cpuid: cpuid_entries(Machine::Pc, 1_000_000_000, false, legacy),
            ..Header::default()
        };
        assert!(!machine_from_header(&header(false)).unwrap().legacy_cpu, "today's pc");
        let old = machine_from_header(&header(true)).unwrap();
        assert!(old.legacy_cpu, "leaf 1 without TSC-deadline");
        // The CPU replay builds answers CPUID as the recording did.
        assert_eq!(cpuid_entries(old.machine, 1_000_000_000, false, old.legacy_cpu), header(true).cpuid);
        assert_ne!(header(true).cpuid, header(false).cpuid);
    }
}
