//! Popek's virtual machine monitor: the execution host, the virtual CPU,
//! devices, loaders, backends, traces and benchmarks.

pub mod backend;
pub mod bench;
pub mod cache;
pub mod console;
pub mod cpu;
pub mod deterministic;
pub mod devices;
pub mod fuzz;
pub mod guest_log;
pub mod guests;
pub mod host;
pub mod jail;
pub mod layout;
pub mod loader;
pub mod localize;
pub mod memory;
pub mod run;
pub mod trace;
pub mod vm;
