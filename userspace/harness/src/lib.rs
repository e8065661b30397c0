//! kvm-userfault-harness: the demo VMM built on the `kvm-userfault` runtime and the
//! `kvm-testvm` framework.
//!
//! [`vm`] is the VM (kvm-testvm's `TestVm`, with the data region the workload checks),
//! [`guest`] the workload guest (a Rust guest function that checks a pattern across its part
//! of that region and reports over ucalls), [`runner`] runs that workload demand-paged in each
//! mode (kvm-sync, kvm-async, uffd-missing, uffd-minor) and reports what happened. The CLI
//! (`kvm-userfault`) and the benchmarks sit on it.

pub mod guest;
pub mod migrate;
pub mod runner;
pub mod vm;
