//! Popek's per-user cache directory: what a run can reuse from an earlier
//! one (decompressed kernels, the host TSC's calibration). Everything in it
//! is an optimisation: a missing, unreadable or damaged entry only costs
//! the work it would have saved.

use std::path::{Path, PathBuf};

/// `$POPEK_CACHE_DIR`, else `$XDG_CACHE_HOME/popek`, else
/// `$HOME/.cache/popek`.
pub fn dir() -> Option<PathBuf> {
    let var = |n| std::env::var_os(n).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("POPEK_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("popek")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/popek")))
}

/// Writes `path` whole or not at all: a temporary file in the same
/// directory, renamed over it. Several runs may write the same entry at
/// once; the temporary name is unique per process and call.
pub fn write_atomically(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| std::io::Error::other("a cache file has a directory"))?;
    std::fs::create_dir_all(dir)?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let tmp = dir.join(format!(".{}-{n}.{name}", std::process::id()));
    let r = std::fs::File::create(&tmp).and_then(|mut f| {
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}
