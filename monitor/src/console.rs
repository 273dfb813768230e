//! The guest's serial console on the user's terminal: COM1 output to
//! stdout, stdin to COM1's receiver. On a terminal, raw mode while the guest
//! runs (restored on exit, even on error) and an escape sequence to quit:
//! Ctrl-A then `x`. Piped stdin is forwarded as is until EOF.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;

use crate::backend::Kick;

/// COM1 output: stdout, unbuffered (the guest's echo must appear at once).
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(b)?;
        out.flush()?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Puts the terminal back as it was when dropped.
pub struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    /// Raw mode on stdin if it is a terminal; a no-op otherwise.
    pub fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        let Ok(saved) = nix::sys::termios::tcgetattr(fd) else { return RawMode { saved: None } };
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        // Keep output processing so the host terminal shows guest newlines.
        raw.output_flags = saved.output_flags;
        if nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }

    pub fn is_raw(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin().as_fd(), nix::sys::termios::SetArg::TCSANOW, t);
        }
    }
}

/// The escape key: Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// Starts the stdin thread: bytes go to the returned channel (and kick the
/// vCPU); on a terminal, Ctrl-A `x` sets `quit`, Ctrl-A Ctrl-A sends one
/// Ctrl-A to the guest.
pub fn spawn_input(kick: Kick, quit: Arc<AtomicBool>, terminal: bool) -> Receiver<Vec<u8>> {
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("popek-console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 256];
            let mut escaped = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if terminal && escaped {
                        escaped = false;
                        match b {
                            b'x' | b'X' => {
                                quit.store(true, Ordering::SeqCst);
                                kick();
                                return;
                            }
                            ESCAPE => out.push(ESCAPE),
                            _ => {}
                        }
                    } else if terminal && b == ESCAPE {
                        escaped = true;
                    } else {
                        out.push(b);
                    }
                }
                if !out.is_empty() {
                    if tx.send(out).is_err() {
                        break;
                    }
                    kick();
                }
            }
        })
        .expect("spawn console input thread");
    rx
}
