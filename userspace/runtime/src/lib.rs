//! kvm-userfault: a demand-paging runtime for KVM guest memory.
//!
//! Faults come in from three places — synchronous `KVM_EXIT_MEMORY_FAULT` exits on vCPU
//! threads, asynchronous records from the KVM userfault fd (read over io_uring), and
//! userfaultfd on stock kernels — and all go through one [`handler::Handler`], which claims
//! each missing page once ([`state`]), fills it from a [`source::PageSource`], makes it visible
//! with as few kernel calls as contiguous runs allow, and records [`stats`].
//!
//! This crate is the runtime only: the demo VMM, its workload guest and the CLI are in
//! `kvm-userfault-harness`, the test VM framework in `kvm-testvm`. See docs/runtime.md for the
//! architecture and how a VMM embeds it.

pub mod fault;
pub mod handler;
pub mod handoff;
pub mod ioctls;
pub mod memory;
pub mod runtime;
pub mod serve;
pub mod source;
pub mod state;
pub mod stats;
pub mod uapi;
pub mod vcpu;

pub use runtime::{DemandRegion, Runtime, RuntimeError};
pub use vcpu::{FaultAction, VcpuFaults};

/// The page size this runtime works in (x86_64 base pages).
pub const PAGE_SIZE: usize = 4096;
