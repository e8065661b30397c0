//! kvm-userfault-harness: the demo VMM built on the `kvm-userfault` runtime.
//!
//! [`vm`] builds the VM (memslots in every backing, vCPUs), [`guest`] is the workload guest
//! (long mode, a checking pattern it reads and writes across its memory), [`runner`] runs that
//! workload demand-paged in each mode (kvm-sync, kvm-async, uffd-missing, uffd-minor) and
//! reports what happened. The CLI (`kvm-userfault`) and the benchmarks sit on it.

pub mod guest;
pub mod runner;
pub mod vm;
