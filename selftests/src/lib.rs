//! kvm-selftests: Rust mirrors of the kernel's KVM selftests (tools/testing/selftests/kvm),
//! including the cases for the KVM userfault series.
//!
//! The library is the equivalent of the C selftests' `lib/`: [`vm`] builds x86_64 long-mode
//! VMs (page tables, GDT, IDT reporting exceptions, vCPUs), [`guest`] is the code that runs
//! inside them (ucalls over port I/O, guest assertions), [`mem`] the memory backings,
//! [`caps`] capability probes and skip helpers.
//! The tests themselves live in `tests/*.rs`, one file per C test.

pub mod caps;
pub mod guest;
pub mod mem;
pub mod uapi;
pub mod userfault;
pub mod vm;

pub use mem::{page_size, Backing, HostMapping};
pub use vm::{Exit, TestVm, Ucall, Vcpu};
