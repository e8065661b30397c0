//! kvm-testvm: a test VM framework for KVM, the Rust equivalent of the C selftests' `lib/`.
//!
//! [`vm`] builds x86_64 long-mode VMs (page tables, GDT, IDT reporting exceptions, memslots in
//! every backing, shared guest data) and their vCPUs (`Vcpu`: entry points, `KVM_RUN` decoded
//! into exits and ucalls, statistics); [`guest`] is the code that runs inside them (ucalls over
//! port I/O, guest assertions); [`mem`] the host side of guest memory; [`caps`] capability
//! probes and skip helpers. A VM owns its memory together with its fd, so that no safe code
//! can unmap memory KVM may still access (see [`vm`]). The Rust selftests (`selftests/`) and
//! the demo VMM (`userspace/harness`) are written on it.

pub mod caps;
pub mod guest;
mod image;
pub mod mem;
pub mod rng;
pub mod uapi;
mod vcpu;
pub mod vm;

pub use mem::{page_size, Backing, GuestMem, HostMapping};
pub use vm::{Exit, Region, TestVm, Ucall, Vcpu, VmHandle, VmOptions};
