//! kvm-testvm: a test VM framework for KVM, the Rust equivalent of the C selftests' `lib/`.
//!
//! [`vm`] builds x86_64 long-mode VMs (page tables, GDT, IDT reporting exceptions, vCPUs),
//! [`guest`] is the code that runs inside them (ucalls over port I/O, guest assertions),
//! [`mem`] the memory backings, [`caps`] capability probes and skip helpers. The Rust
//! selftests (`selftests/`) are written on it.

pub mod caps;
pub mod guest;
mod image;
pub mod mem;
pub mod uapi;
mod vcpu;
pub mod vm;

pub use mem::{page_size, Backing, GuestMem, HostMapping};
pub use vm::{Exit, Region, TestVm, Ucall, Vcpu, VmHandle, VmOptions};
