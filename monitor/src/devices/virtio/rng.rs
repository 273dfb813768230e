//! virtio-rng (entropy device): one queue whose writable buffers are filled
//! with bytes from the host's `getrandom`.

use vm_memory::GuestMemoryMmap;

use super::{write_guest, Chain, VirtioDevice, VirtioError, TYPE_RNG};

/// Entries of the one queue.
pub const QUEUE_SIZE: u16 = 16;

#[derive(Default)]
pub struct Rng {
    pub bytes: u64,
}

fn host_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled rest of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n > 0 {
            done += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // getrandom cannot fail with valid arguments on Linux ≥ 3.17; a
            // zero-filled buffer beats a panic if it ever does.
            tracing::warn!("getrandom failed: {}", std::io::Error::last_os_error());
            return;
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        TYPE_RNG
    }
    fn name(&self) -> &'static str {
        "virtio-rng"
    }
    fn features(&self) -> u32 {
        0
    }
    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn serve(&mut self, _queue: usize, chain: &Chain, mem: &GuestMemoryMmap) -> Result<u32, VirtioError> {
        let mut written = 0u32;
        for d in chain.descs.iter().filter(|d| d.is_write_only()) {
            let mut buf = vec![0u8; d.len() as usize];
            host_random(&mut buf);
            write_guest(mem, d.addr(), &buf)?;
            written = written.saturating_add(d.len());
        }
        self.bytes += u64::from(written);
        Ok(written)
    }
    fn stats(&self) -> Vec<(&'static str, u64)> {
        vec![("bytes", self.bytes)]
    }
}
