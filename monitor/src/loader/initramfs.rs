//! Gzip'd cpio "newc" archives for Linux's initramfs, built without an
//! external `cpio`.
//!
//! The output is deterministic: entries in byte order of their paths (a
//! directory always before its contents), inode numbers 1, 2, ... in that
//! order, mtime 0, uid/gid 0, nlink 2 for directories and 1 otherwise, and a
//! gzip header with mtime 0 and OS "unknown". The same inputs always give the
//! same bytes, so traces can hash the initramfs.
//!
//! newc format (the kernel's `init/initramfs.c`, `usr/gen_init_cpio.c`): per
//! entry a 110-byte ASCII header ("070701" and 13 eight-digit hex fields),
//! the NUL-terminated name, padding to 4 bytes, the data (file contents or
//! symlink target), padding to 4 bytes; the last entry is "TRAILER!!!".

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Magic of a newc header.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Size of a newc header.
pub const NEWC_HEADER_SIZE: usize = 110;
/// Name of the last entry.
pub const TRAILER: &str = "TRAILER!!!";

/// File type bits of `mode` (as in `stat`).
pub mod mode {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFSOCK: u32 = 0o140000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFIFO: u32 = 0o010000;
    /// Permission bits, setuid/setgid/sticky included.
    pub const PERM: u32 = 0o7777;
}

/// Busybox applets [`busybox_initramfs`] links into `/bin`.
#[rustfmt::skip]
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ash", "ls", "cat", "echo", "true", "false", "uname", "mount", "umount", "poweroff", "reboot", "halt",
    "mkdir", "rmdir", "rm", "cp", "mv", "ln", "ps", "kill", "dmesg", "sleep", "grep", "sed", "awk", "vi", "head",
    "tail", "wc", "date", "df", "free", "top", "env", "sync", "mknod", "chmod", "chown", "hostname", "stty", "tty",
    "id", "seq", "dd", "find", "test", "[", "printf", "hexdump", "md5sum", "sha256sum", "time", "uptime", "which",
    "basename", "dirname", "readlink", "stat", "touch", "xargs", "tr", "cut", "sort", "uniq", "clear", "more",
];

/// A `/init` for [`busybox_initramfs`]: mounts /proc, /sys and devtmpfs,
/// then runs a shell on the console.
pub const DEFAULT_BUSYBOX_INIT: &str = "#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo \"popek: busybox initramfs up ($(uname -r))\"
exec /bin/sh
";

#[derive(Debug, Error)]
pub enum InitramfsError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bad archive path {0:?}: must be a relative or absolute path without `..` and not the root")]
    BadPath(String),
    #[error("archive path {0:?} contains a NUL byte: the kernel reads names as C strings and would see another name")]
    NulInPath(String),
    #[error("archive path {0:?} is the cpio trailer's name: the kernel would stop reading the archive there")]
    TrailerName(String),
    #[error("symlink {path:?}: the target {target:?} contains a NUL byte (the kernel would cut it there)")]
    NulInSymlink { path: String, target: String },
    #[error("{0} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    #[error("{path}: cannot put a {what} in the archive")]
    UnsupportedFileType { path: PathBuf, what: &'static str },
    #[error("archive path {path:?} is used both as a directory and as a {other}")]
    PathConflict { path: String, other: &'static str },
    #[error("{path:?} is {size} bytes; newc entries are limited to 4 GiB")]
    TooLarge { path: String, size: u64 },
    #[error("the /init script must start with \"#!\" (the kernel executes it)")]
    InitNotScript,
    #[error("gzip compression failed: {0}")]
    Gzip(std::io::Error),
    #[error("not a newc cpio archive: {0}")]
    Malformed(&'static str),
}

type Result<T> = std::result::Result<T, InitramfsError>;

/// What an archive entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    /// The link target.
    Symlink(String),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
}

impl EntryKind {
    fn type_bits(&self) -> u32 {
        match self {
            EntryKind::Dir => mode::S_IFDIR,
            EntryKind::File(_) => mode::S_IFREG,
            EntryKind::Symlink(_) => mode::S_IFLNK,
            EntryKind::CharDev { .. } => mode::S_IFCHR,
            EntryKind::BlockDev { .. } => mode::S_IFBLK,
            EntryKind::Fifo => mode::S_IFIFO,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            EntryKind::Dir => "directory",
            EntryKind::File(_) => "file",
            EntryKind::Symlink(_) => "symlink",
            EntryKind::CharDev { .. } => "character device",
            EntryKind::BlockDev { .. } => "block device",
            EntryKind::Fifo => "fifo",
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            EntryKind::File(d) => d,
            EntryKind::Symlink(t) => t.as_bytes(),
            _ => &[],
        }
    }
}

/// One entry to be archived: permission bits and kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Permission bits (`mode::PERM`); the type bits come from `kind`.
    pub perm: u32,
    pub kind: EntryKind,
}

/// An archive being assembled, keyed by path (no leading `/`).
#[derive(Clone, Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

/// Normalizes an archive path: leading `/` and `.` components dropped; `..`
/// and the root itself rejected. So are names the kernel's initramfs code
/// would read as something else: a NUL ends a name there (it is a C
/// string), and an entry named `TRAILER!!!` (this path, or its top
/// directory) ends the archive.
fn normalize(path: &str) -> Result<String> {
    if path.contains('\0') {
        return Err(InitramfsError::NulInPath(path.to_string()));
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(InitramfsError::BadPath(path.to_string())),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(InitramfsError::BadPath(path.to_string()));
    }
    // The first component becomes an entry of its own (a parent directory).
    if parts[0] == TRAILER {
        return Err(InitramfsError::TrailerName(path.to_string()));
    }
    Ok(parts.join("/"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InitramfsError + '_ {
    move |source| InitramfsError::Io { path: path.to_path_buf(), source }
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// The entries, in archive order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Adds (or replaces) `path`; missing parent directories are created
    /// with mode 0755. A directory already there keeps its contents and takes
    /// the new mode; replacing a directory by something else is an error.
    pub fn add(&mut self, path: &str, perm: u32, kind: EntryKind) -> Result<&mut Self> {
        let path = normalize(path)?;
        if let EntryKind::Symlink(target) = &kind {
            if target.contains('\0') {
                return Err(InitramfsError::NulInSymlink { path, target: target.clone() });
            }
        }
        if let EntryKind::File(d) = &kind {
            if u32::try_from(d.len()).is_err() {
                return Err(InitramfsError::TooLarge { path, size: d.len() as u64 });
            }
        }
        let mut parent = String::new();
        for c in path.split('/').collect::<Vec<_>>().split_last().expect("normalized path is not empty").1 {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Entry { perm: 0o755, kind: EntryKind::Dir });
                }
                Some(Entry { kind: EntryKind::Dir, .. }) => {}
                Some(e) => return Err(InitramfsError::PathConflict { path: parent, other: e.kind.name() }),
            }
        }
        match self.entries.get(&path) {
            Some(Entry { kind: EntryKind::Dir, .. }) if kind != EntryKind::Dir => {
                return Err(InitramfsError::PathConflict { path, other: kind.name() });
            }
            _ => {}
        }
        self.entries.insert(path, Entry { perm: perm & mode::PERM, kind });
        Ok(self)
    }

    pub fn add_dir(&mut self, path: &str, perm: u32) -> Result<&mut Self> {
        self.add(path, perm, EntryKind::Dir)
    }

    pub fn add_file(&mut self, path: &str, perm: u32, data: impl Into<Vec<u8>>) -> Result<&mut Self> {
        self.add(path, perm, EntryKind::File(data.into()))
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        self.add(path, 0o777, EntryKind::Symlink(target.to_string()))
    }

    pub fn add_char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<&mut Self> {
        self.add(path, perm, EntryKind::CharDev { major, minor })
    }

    /// `/dev/console` (c 5 1, 0600) and `/dev/null` (c 1 3, 0666): the kernel
    /// opens /dev/console for init's stdio before any devtmpfs is mounted.
    pub fn add_console_and_null(&mut self) -> Result<&mut Self> {
        self.add_dir("dev", 0o755)?;
        self.add_char_dev("dev/console", 0o600, 5, 1)?;
        self.add_char_dev("dev/null", 0o666, 1, 3)
    }

    /// Adds the host file system object `host` at `path`: a regular file
    /// (symlinks followed), or a directory with all its contents (symlinks
    /// inside kept as symlinks). Permission bits come from the host;
    /// ownership is always root.
    pub fn add_host(&mut self, path: &str, host: &Path) -> Result<&mut Self> {
        let meta = std::fs::metadata(host).map_err(io_err(host))?;
        if meta.is_dir() {
            self.add_dir(path, meta.mode())?;
            self.add_tree_contents(path, host)
        } else {
            self.add_host_entry(path, host, &meta)
        }
    }

    /// Adds everything under the host directory `dir` at the archive root
    /// (the directory itself is not an entry).
    pub fn add_tree(&mut self, dir: &Path) -> Result<&mut Self> {
        self.add_tree_contents("", dir)
    }

    fn add_tree_contents(&mut self, at: &str, dir: &Path) -> Result<&mut Self> {
        let mut children: Vec<_> =
            std::fs::read_dir(dir).map_err(io_err(dir))?.collect::<std::io::Result<_>>().map_err(io_err(dir))?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let host = child.path();
            let name = child.file_name().into_string().map_err(|_| InitramfsError::NonUtf8Path(host.clone()))?;
            let path = if at.is_empty() { name } else { format!("{at}/{name}") };
            let meta = std::fs::symlink_metadata(&host).map_err(io_err(&host))?;
            if meta.is_dir() {
                self.add_dir(&path, meta.mode())?;
                self.add_tree_contents(&path, &host)?;
            } else {
                self.add_host_entry(&path, &host, &meta)?;
            }
        }
        Ok(self)
    }

    /// One non-directory host object, by its (symlink_)metadata.
    fn add_host_entry(&mut self, path: &str, host: &Path, meta: &std::fs::Metadata) -> Result<&mut Self> {
        let ft = meta.file_type();
        let (major, minor) = dev_numbers(meta.rdev());
        let kind = if ft.is_file() {
            if meta.len() > u64::from(u32::MAX) {
                return Err(InitramfsError::TooLarge { path: path.to_string(), size: meta.len() });
            }
            EntryKind::File(std::fs::read(host).map_err(io_err(host))?)
        } else if ft.is_symlink() {
            let target = std::fs::read_link(host).map_err(io_err(host))?;
            EntryKind::Symlink(
                target.into_os_string().into_string().map_err(|t| InitramfsError::NonUtf8Path(t.into()))?,
            )
        } else if ft.is_char_device() {
            EntryKind::CharDev { major, minor }
        } else if ft.is_block_device() {
            EntryKind::BlockDev { major, minor }
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else {
            return Err(InitramfsError::UnsupportedFileType { path: host.to_path_buf(), what: "socket" });
        };
        self.add(path, meta.mode(), kind)
    }

    /// The uncompressed newc archive.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, e)) in self.entries.iter().enumerate() {
            let (rmajor, rminor) = match e.kind {
                EntryKind::CharDev { major, minor } | EntryKind::BlockDev { major, minor } => (major, minor),
                _ => (0, 0),
            };
            let nlink = if e.kind == EntryKind::Dir { 2 } else { 1 };
            let fields = NewcFields {
                ino: ino as u32 + 1,
                mode: e.kind.type_bits() | e.perm,
                nlink,
                rdevmajor: rmajor,
                rdevminor: rminor,
            };
            write_entry(&mut out, path, &fields, e.kind.data());
        }
        write_entry(&mut out, TRAILER, &NewcFields { ino: 0, mode: 0, nlink: 1, rdevmajor: 0, rdevminor: 0 }, &[]);
        out
    }

    /// The gzip'd archive, ready to be an initrd.
    pub fn to_gzip(&self) -> Result<Vec<u8>> {
        gzip(&self.to_cpio())
    }
}

/// Header fields that vary per entry (the others are 0).
struct NewcFields {
    ino: u32,
    mode: u32,
    nlink: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

fn write_entry(out: &mut Vec<u8>, name: &str, f: &NewcFields, data: &[u8]) {
    debug_assert!(out.len().is_multiple_of(4));
    let namesize = name.len() as u32 + 1;
    let filesize = data.len() as u32;
    out.extend_from_slice(NEWC_MAGIC);
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    for v in [f.ino, f.mode, 0, 0, f.nlink, 0, filesize, 0, 0, f.rdevmajor, f.rdevminor, namesize, 0] {
        out.extend_from_slice(format!("{v:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// Major and minor numbers of a Linux `dev_t`.
fn dev_numbers(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xFFF) | ((rdev >> 32) & !0xFFF);
    let minor = (rdev & 0xFF) | ((rdev >> 12) & !0xFF);
    (major as u32, minor as u32)
}

/// Deterministic gzip: mtime 0, OS "unknown", best compression.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::with_capacity(data.len() / 2), flate2::Compression::best());
    enc.write_all(data).map_err(InitramfsError::Gzip)?;
    enc.finish().map_err(InitramfsError::Gzip)
}

/// What `popek initramfs` builds: a host directory tree, single host files
/// or directories at chosen archive paths, and an optional `/init` script.
/// `/dev/console` and `/dev/null` are always added.
#[derive(Clone, Debug, Default)]
pub struct InitramfsSpec {
    /// Host directory whose contents become the archive root.
    pub dir: Option<PathBuf>,
    /// (archive path, host path) pairs, added after `dir` (they win).
    pub files: Vec<(String, PathBuf)>,
    /// Text of `/init` (mode 0755), added last; must start with `#!`.
    pub init: Option<String>,
}

/// The archive for `spec`, uncompressed.
pub fn archive(spec: &InitramfsSpec) -> Result<Archive> {
    let mut a = Archive::new();
    a.add_console_and_null()?;
    if let Some(dir) = &spec.dir {
        a.add_tree(dir)?;
    }
    for (path, host) in &spec.files {
        a.add_host(path, host)?;
    }
    if let Some(init) = &spec.init {
        if !init.starts_with("#!") {
            return Err(InitramfsError::InitNotScript);
        }
        a.add_file("init", 0o755, init.as_bytes())?;
    }
    Ok(a)
}

/// Builds the gzip'd initramfs for `spec`.
pub fn build(spec: &InitramfsSpec) -> Result<Vec<u8>> {
    archive(spec)?.to_gzip()
}

/// A busybox system: `/bin/busybox`, `/bin/<applet>` symlinks for
/// [`BUSYBOX_APPLETS`], `/proc /sys /dev /tmp /root /etc`, the console and
/// null devices, `extra` (archive path ← host path) and `/init` =
/// `init_script` (see [`DEFAULT_BUSYBOX_INIT`]). Returns the gzip'd archive.
pub fn busybox_initramfs(busybox: &Path, init_script: &str, extra: &[(String, PathBuf)]) -> Result<Vec<u8>> {
    busybox_archive(busybox, init_script, extra)?.to_gzip()
}

/// [`busybox_initramfs`] before compression.
pub fn busybox_archive(busybox: &Path, init_script: &str, extra: &[(String, PathBuf)]) -> Result<Archive> {
    let spec = InitramfsSpec { dir: None, files: Vec::new(), init: None };
    let mut a = archive(&spec)?;
    for d in ["proc", "sys", "etc", "root"] {
        a.add_dir(d, 0o755)?;
    }
    a.add_dir("tmp", 0o1777)?;
    a.add_dir("bin", 0o755)?;
    let data = std::fs::read(busybox).map_err(io_err(busybox))?;
    a.add_file("bin/busybox", 0o755, data)?;
    for applet in BUSYBOX_APPLETS {
        a.add_symlink(&format!("bin/{applet}"), "busybox")?;
    }
    for (path, host) in extra {
        a.add_host(path, host)?;
    }
    if !init_script.starts_with("#!") {
        return Err(InitramfsError::InitNotScript);
    }
    a.add_file("init", 0o755, init_script.as_bytes())?;
    Ok(a)
}

/// One entry read back from a newc archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpioEntry {
    pub name: String,
    pub ino: u32,
    /// Type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdevmajor: u32,
    pub rdevminor: u32,
    pub data: Vec<u8>,
}

/// Reads a newc archive (uncompressed) up to its trailer, which is not
/// returned. For `popek initramfs --list`-style tools and tests.
pub fn read_cpio(mut data: &[u8]) -> Result<Vec<CpioEntry>> {
    let bad = InitramfsError::Malformed;
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let hdr = data.get(..NEWC_HEADER_SIZE).ok_or(bad("truncated header"))?;
        if &hdr[..6] != NEWC_MAGIC {
            return Err(bad("bad magic"));
        }
        let field = |i: usize| {
            let s = std::str::from_utf8(&hdr[6 + 8 * i..14 + 8 * i]).map_err(|_| bad("non-ASCII header"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad("non-hex header field"))
        };
        let namesize = field(11)? as usize;
        let filesize = field(6)? as usize;
        let name_end = NEWC_HEADER_SIZE.checked_add(namesize).ok_or(bad("name size"))?;
        let name = data.get(NEWC_HEADER_SIZE..name_end).ok_or(bad("truncated name"))?;
        let name = name.strip_suffix(&[0]).ok_or(bad("name not NUL-terminated"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad("non-UTF-8 name"))?;
        // Padding is relative to the archive start.
        let data_start = (pos + name_end).next_multiple_of(4) - pos;
        let data_end = data_start.checked_add(filesize).ok_or(bad("file size"))?;
        let body = data.get(data_start..data_end).ok_or(bad("truncated data"))?.to_vec();
        let next = ((pos + data_end).next_multiple_of(4) - pos).min(data.len());
        if name == TRAILER {
            return Ok(out);
        }
        out.push(CpioEntry {
            name,
            ino: field(0)?,
            mode: field(1)?,
            uid: field(2)?,
            gid: field(3)?,
            nlink: field(4)?,
            mtime: field(5)?,
            rdevmajor: field(9)?,
            rdevminor: field(10)?,
            data: body,
        });
        data = &data[next..];
        pos += next;
    }
}

/// Decompresses a gzip'd archive and reads it.
pub fn read_gzip_cpio(gz: &[u8]) -> Result<Vec<CpioEntry>> {
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut raw).map_err(InitramfsError::Gzip)?;
    read_cpio(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("popek-initramfs-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn by_name(entries: &[CpioEntry], name: &str) -> CpioEntry {
        entries.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("no {name} in the archive")).clone()
    }

    #[test]
    fn golden_header_bytes() {
        let mut a = Archive::new();
        a.add_file("init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        let cpio = a.to_cpio();
        let first = "070701\
            00000001000081ED000000000000000000000001000000000000000A\
            00000000000000000000000000000000000000050000000";
        assert_eq!(&cpio[..NEWC_HEADER_SIZE + 5], format!("{first}0init\0").as_bytes());
        // 110 + 5 = 115 → padded to 116; data 10 → padded to 12.
        assert_eq!(&cpio[115..116], &[0]);
        assert_eq!(&cpio[116..126], b"#!/bin/sh\n");
        assert_eq!(&cpio[126..128], &[0, 0]);
        let trailer = &cpio[128..];
        assert_eq!(&trailer[..6], b"070701");
        assert_eq!(&trailer[6..14], b"00000000");
        assert_eq!(&trailer[6 + 8 * 4..6 + 8 * 5], b"00000001"); // nlink
        assert_eq!(&trailer[6 + 8 * 11..6 + 8 * 12], b"0000000B"); // namesize
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
        assert_eq!(trailer.len(), 124);
        assert_eq!(cpio.len() % 4, 0);
    }

    #[test]
    fn padding_for_every_name_and_data_length() {
        let mut a = Archive::new();
        for n in 1..=8 {
            a.add_file(&"f".repeat(n), 0o644, vec![n as u8; n]).unwrap();
        }
        let back = read_cpio(&a.to_cpio()).unwrap();
        for n in 1..=8 {
            assert_eq!(by_name(&back, &"f".repeat(n)).data, vec![n as u8; n]);
        }
    }

    #[test]
    fn tree_round_trip() {
        let t = TempDir::new("tree");
        let root = &t.0;
        std::fs::create_dir_all(root.join("etc/init.d")).unwrap();
        std::fs::write(root.join("etc/hostname"), "popek\n").unwrap();
        std::fs::write(root.join("etc/init.d/rcS"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("etc/init.d/rcS"), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::set_permissions(root.join("etc/init.d"), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::os::unix::fs::symlink("../etc/hostname", root.join("etc/name")).unwrap();
        let extra = root.join("extra.bin");
        std::fs::write(&extra, [0u8, 1, 2, 3, 4]).unwrap();
        let spec = InitramfsSpec {
            dir: Some(root.join("etc").parent().unwrap().to_path_buf()),
            files: vec![("/usr/share/blob".into(), extra.clone())],
            init: Some("#!/bin/sh\nexec sh\n".into()),
        };
        let gz = build(&spec).unwrap();
        assert_eq!(&gz[..4], &[0x1F, 0x8B, 8, 0]);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]); // gzip mtime 0
        let back = read_gzip_cpio(&gz).unwrap();
        let names: Vec<&str> = back.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "dev/null",
                "etc",
                "etc/hostname",
                "etc/init.d",
                "etc/init.d/rcS",
                "etc/name",
                "extra.bin",
                "init",
                "usr",
                "usr/share",
                "usr/share/blob"
            ]
        );
        let inos: Vec<u32> = back.iter().map(|e| e.ino).collect();
        assert_eq!(inos, (1..=13).collect::<Vec<_>>());
        assert!(back.iter().all(|e| e.mtime == 0 && e.uid == 0 && e.gid == 0));
        let rcs = by_name(&back, "etc/init.d/rcS");
        assert_eq!(rcs.mode, 0o100750);
        assert_eq!(rcs.data, b"#!/bin/sh\necho hi\n");
        assert_eq!(by_name(&back, "etc/init.d").mode, 0o040711);
        assert_eq!(by_name(&back, "etc/init.d").nlink, 2);
        let link = by_name(&back, "etc/name");
        assert_eq!((link.mode, link.data.as_slice()), (0o120777, &b"../etc/hostname"[..]));
        let console = by_name(&back, "dev/console");
        assert_eq!((console.mode, console.rdevmajor, console.rdevminor), (0o020600, 5, 1));
        let null = by_name(&back, "dev/null");
        assert_eq!((null.mode, null.rdevmajor, null.rdevminor), (0o020666, 1, 3));
        assert_eq!(by_name(&back, "usr/share/blob").data, [0, 1, 2, 3, 4]);
        assert_eq!(by_name(&back, "usr").mode, 0o040755);
        let init = by_name(&back, "init");
        assert_eq!((init.mode, init.data.as_slice()), (0o100755, &b"#!/bin/sh\nexec sh\n"[..]));
        // Deterministic: the same inputs, the same bytes.
        assert_eq!(build(&spec).unwrap(), gz);
    }

    /// Found by `popek fuzz initramfs`: the writer accepted names that the
    /// kernel's initramfs code reads as something else. An entry named
    /// TRAILER!!! ended the archive (every entry after it was lost: here
    /// all of them, since it sorts first), and a NUL in a name or a symlink
    /// target cut it short.
    #[test]
    fn names_the_kernel_reads_differently_are_refused() {
        let mut a = Archive::new();
        assert!(matches!(a.add_dir("TRAILER!!!", 0o755), Err(InitramfsError::TrailerName(_))));
        assert!(matches!(a.add_file("/./TRAILER!!!", 0o644, vec![1]), Err(InitramfsError::TrailerName(_))));
        assert!(matches!(a.add_file("TRAILER!!!/x", 0o644, vec![1]), Err(InitramfsError::TrailerName(_))));
        assert!(matches!(a.add_file("a\0b", 0o644, vec![]), Err(InitramfsError::NulInPath(_))));
        assert!(matches!(a.add_symlink("l", "/bin\0sh"), Err(InitramfsError::NulInSymlink { .. })));
        // Below the root the name is harmless: the kernel compares whole names.
        a.add_file("dir/TRAILER!!!", 0o644, vec![7]).unwrap();
        a.add_file("zzz", 0o644, vec![8]).unwrap();
        let back = read_cpio(&a.to_cpio()).unwrap();
        assert_eq!(back.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["dir", "dir/TRAILER!!!", "zzz"]);
    }

    #[test]
    fn errors() {
        let mut a = Archive::new();
        for p in ["", "/", "a/../b", ".."] {
            assert!(matches!(a.add_dir(p, 0o755), Err(InitramfsError::BadPath(_))), "{p}");
        }
        a.add_file("x", 0o644, vec![]).unwrap();
        assert!(matches!(a.add_file("x/y", 0o644, vec![]), Err(InitramfsError::PathConflict { .. })));
        a.add_dir("d/e", 0o755).unwrap();
        assert!(matches!(a.add_file("d", 0o644, vec![]), Err(InitramfsError::PathConflict { .. })));
        // A file replaces a file; a dir re-added keeps its contents.
        a.add_file("x", 0o600, b"new".to_vec()).unwrap();
        a.add_dir("d", 0o700).unwrap();
        let back = read_cpio(&a.to_cpio()).unwrap();
        assert_eq!(by_name(&back, "x").data, b"new");
        assert_eq!(by_name(&back, "d").mode, 0o040700);
        assert!(back.iter().any(|e| e.name == "d/e"));
        let spec = InitramfsSpec { init: Some("echo no shebang".into()), ..Default::default() };
        assert!(matches!(build(&spec), Err(InitramfsError::InitNotScript)));
        let spec = InitramfsSpec { dir: Some("/nonexistent/popek".into()), ..Default::default() };
        assert!(matches!(build(&spec), Err(InitramfsError::Io { .. })));
        // The reader rejects damage.
        let cpio = a.to_cpio();
        let mut bad = cpio.clone();
        bad[0] = b'1';
        assert!(matches!(read_cpio(&bad), Err(InitramfsError::Malformed("bad magic"))));
        assert!(matches!(read_cpio(&cpio[..cpio.len() - 20]), Err(InitramfsError::Malformed(_))));
        let mut bad = cpio.clone();
        bad[6 + 8 * 6] = b'G';
        assert!(matches!(read_cpio(&bad), Err(InitramfsError::Malformed("non-hex header field"))));
    }

    #[test]
    fn busybox_layout() {
        let t = TempDir::new("bb");
        // A stand-in binary: the real one is checked below when present.
        let fake = t.0.join("busybox");
        std::fs::write(&fake, b"\x7fELF fake busybox").unwrap();
        let extra_file = t.0.join("nb32");
        std::fs::write(&extra_file, b"bench").unwrap();
        let a = busybox_archive(&fake, DEFAULT_BUSYBOX_INIT, &[("bin/nb32".into(), extra_file)]).unwrap();
        let back = read_cpio(&a.to_cpio()).unwrap();
        let bb = by_name(&back, "bin/busybox");
        assert_eq!((bb.mode, bb.data.as_slice()), (0o100755, &b"\x7fELF fake busybox"[..]));
        for applet in ["sh", "ls", "cat", "uname", "mount", "echo", "true", "poweroff", "reboot"] {
            let l = by_name(&back, &format!("bin/{applet}"));
            assert_eq!((l.mode, l.data.as_slice()), (0o120777, &b"busybox"[..]), "{applet}");
        }
        for d in ["proc", "sys", "dev", "etc", "root"] {
            assert_eq!(by_name(&back, d).mode, 0o040755, "{d}");
        }
        assert_eq!(by_name(&back, "tmp").mode, 0o041777);
        assert_eq!(by_name(&back, "bin/nb32").data, b"bench");
        assert_eq!(by_name(&back, "init").data, DEFAULT_BUSYBOX_INIT.as_bytes());
        assert_eq!(by_name(&back, "dev/console").rdevmajor, 5);
        assert!(matches!(busybox_initramfs(&fake, "", &[]), Err(InitramfsError::InitNotScript)));
        assert!(matches!(
            busybox_initramfs(&t.0.join("none"), DEFAULT_BUSYBOX_INIT, &[]),
            Err(InitramfsError::Io { .. })
        ));
    }

    #[test]
    fn real_busybox_initramfs() {
        let bb = Path::new("/work/shared/guests/linux-686/busybox");
        if !bb.exists() {
            println!("skipped: {} is absent", bb.display());
            return;
        }
        let gz = busybox_initramfs(bb, DEFAULT_BUSYBOX_INIT, &[]).unwrap();
        let back = read_gzip_cpio(&gz).unwrap();
        assert_eq!(by_name(&back, "bin/busybox").data, std::fs::read(bb).unwrap());
        assert!(gz.len() < std::fs::metadata(bb).unwrap().len() as usize);
        assert_eq!(busybox_initramfs(bb, DEFAULT_BUSYBOX_INIT, &[]).unwrap(), gz);
    }

    #[test]
    fn dev_numbers_decode_linux_dev_t() {
        assert_eq!(dev_numbers(0x0501), (5, 1));
        assert_eq!(dev_numbers(0x0103), (1, 3));
        // major 259, minor 70000 (large numbers use the high bits)
        let dev = (70000u64 & 0xFF) | ((259u64 & 0xFFF) << 8) | ((70000u64 & !0xFF) << 12);
        assert_eq!(dev_numbers(dev), (259, 70000));
    }
}
