//! Post-copy live migration of the writer workload (docs/migration.md).
//!
//! The source ([`source::migrate_source`]) runs the writer guest on several vCPUs with dirty
//! logging, pre-copies its memory in rounds, stops the vCPUs and sends their state and the
//! final dirty bitmap; then it serves the pages the destination still lacks from its stopped
//! memory (the runtime's remote page server: demand requests ahead of prefetch). The
//! destination ([`dest::migrate_dest`]) builds the same VM with every data page missing
//! (USERFAULT on guest_memfd, or userfaultfd MISSING on anonymous memory), writes pre-copied
//! pages as they arrive, and at the switch-over starts the vCPUs at once, after one pass that
//! marks every page the final bitmap says is clean present; the rest is demand-paged from the
//! source while background prefetch pulls it. The guest, on the destination, verifies that
//! every page holds what the source last wrote.

pub mod bench;
pub mod dest;
pub mod source;
pub mod vcpu_state;
pub mod wire;

use crate::guest::{WriterPart, WriterVcpu};
use crate::vm::{add_data_region, Backing, Region, Vm, VmOptions, DATA_SLOT};
use anyhow::{ensure, Result};
use kvm_testvm::vm::VCPU_LIMIT;
use kvm_userfault::source::{PageSource, SourceError};
use kvm_userfault::PAGE_SIZE;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::sync::Once;
use std::time::Duration;

pub use bench::{migrate_loopback, table};
pub use dest::{migrate_dest, DestConfig, DestError, DestReport};
pub use source::{migrate_source, SourceConfig, SourceReport};

const PAGE: u64 = PAGE_SIZE as u64;

/// The VM both sides build: the writer guest on `vcpus` vCPUs over `pages` data pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Writer vCPUs; each sweeps a contiguous part of the data region.
    pub vcpus: usize,
    /// Data pages.
    pub pages: u64,
    /// Guest physical base of the data region (2 MiB aligned).
    pub data_gpa: u64,
    /// Pattern seed.
    pub seed: u64,
    /// Writer throttle: spin iterations after each page.
    pub delay: u64,
}

impl Layout {
    /// 4 vCPUs over 16 MiB at 1 GiB.
    pub fn new(seed: u64) -> Self {
        Self {
            vcpus: 4,
            pages: 4096,
            data_gpa: 1 << 30,
            seed,
            delay: 2000,
        }
    }

    fn check(&self) -> Result<()> {
        ensure!(
            (1..=VCPU_LIMIT).contains(&self.vcpus),
            "vcpus must be 1..={VCPU_LIMIT}"
        );
        ensure!(
            self.pages >= self.vcpus as u64 && self.pages <= 1 << 22,
            "pages must be at least one per vCPU and at most 16 GiB"
        );
        ensure!(
            self.data_gpa.is_multiple_of(2 << 20) && self.data_gpa >= 1 << 30,
            "the data region must be 2 MiB aligned, at 1 GiB or above"
        );
        Ok(())
    }

    /// vCPU `i`'s part.
    fn part(&self, i: usize) -> WriterPart {
        let per = self.pages / self.vcpus as u64;
        let first = i as u64 * per;
        let pages = if i + 1 == self.vcpus {
            self.pages - first
        } else {
            per
        };
        WriterPart {
            gpa: self.data_gpa + first * PAGE,
            pages,
            seed: self.seed,
            delay: self.delay,
        }
    }
}

/// A VM built from a layout: identical on both sides (same binary, same allocations), except
/// for the data region's backing.
pub(crate) struct Built {
    pub vm: Vm,
    pub data: Region,
    pub writers: Vec<WriterVcpu>,
}

pub(crate) fn build(layout: &Layout, backing: Backing, budget: u64) -> Result<Built> {
    layout.check()?;
    let mut vm = Vm::with_options(VmOptions {
        max_vcpus: layout.vcpus,
        ..VmOptions::default()
    })?;
    let data = add_data_region(&mut vm, layout.data_gpa, layout.pages * PAGE, backing)?;
    let writers = (0..layout.vcpus)
        .map(|i| WriterVcpu::new(&mut vm, layout.part(i), budget))
        .collect::<Result<Vec<_>>>()?;
    debug_assert_eq!(data.slot, DATA_SLOT);
    Ok(Built { vm, data, writers })
}

/// A [`PageSource`] over a stopped VM's data region: what the source serves after the
/// switch-over. It holds a share of the region, so the memory stays mapped while it serves.
/// Optionally delays every page it reads (an injected network delay).
pub struct VmMemorySource {
    region: Region,
    delay: Duration,
}

impl VmMemorySource {
    /// Serves `region` (whose vCPUs must be stopped: nothing may write it any more).
    pub fn new(region: Region, delay: Duration) -> Self {
        Self { region, delay }
    }
}

impl PageSource for VmMemorySource {
    fn page_count(&self) -> u64 {
        self.region.size / PAGE
    }

    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        if dst.len() != PAGE_SIZE {
            return Err(SourceError::BadBuffer(dst.len()));
        }
        if index >= self.page_count() {
            return Err(SourceError::OutOfRange {
                index,
                pages: self.page_count(),
            });
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        self.region.mapping.read((index * PAGE) as usize, dst);
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "memory of the stopped source VM ({} pages at {:#x})",
            self.page_count(),
            self.region.gpa
        )
    }
}

extern "C" fn noop_signal(_: libc::c_int) {}

/// Installs a no-op SIGUSR1 handler (without SA_RESTART) to kick vCPUs out of KVM_RUN: the
/// same disposition the runner installs, so either may install it first.
pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let kick = SigAction::new(
            SigHandler::Handler(noop_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        if let Err(e) = unsafe { sigaction(Signal::SIGUSR1, &kick) } {
            tracing::error!("installing the SIGUSR1 kick handler: {e}");
        }
    });
}

/// Interrupts `t`'s KVM_RUN (or blocking syscall) with SIGUSR1.
pub(crate) fn kick<T>(t: &std::thread::JoinHandle<T>) {
    use std::os::unix::thread::JoinHandleExt;
    if !t.is_finished() {
        // SAFETY: the thread is alive and joinable; SIGUSR1 has a no-op handler.
        unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1) };
    }
}

/// Runs of set bits in `bits` (page ranges).
pub(crate) fn runs(bits: impl Iterator<Item = bool>) -> Vec<std::ops::Range<u64>> {
    let mut out = Vec::new();
    let mut start = None;
    let mut n = 0;
    for (i, b) in bits.enumerate() {
        let i = i as u64;
        match (b, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(s..i);
                start = None;
            }
            _ => {}
        }
        n = i + 1;
    }
    if let Some(s) = start {
        out.push(s..n);
    }
    out
}

/// Bit `i` of an LSB-first u64 bitmap.
pub(crate) fn bit(map: &[u64], i: u64) -> bool {
    map.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_bits() {
        let v = [true, true, false, true, false, false, true];
        assert_eq!(runs(v.iter().copied()), vec![0..2, 3..4, 6..7]);
        assert!(runs([false; 3].into_iter()).is_empty());
        let map = [0b1010u64, 1];
        assert!(bit(&map, 1) && bit(&map, 3) && bit(&map, 64));
        assert!(!bit(&map, 0) && !bit(&map, 65) && !bit(&map, 1000));
    }

    #[test]
    fn layout_parts_cover_the_region() {
        let l = Layout {
            vcpus: 3,
            pages: 10,
            ..Layout::new(1)
        };
        let parts: Vec<_> = (0..3).map(|i| l.part(i)).collect();
        assert_eq!(parts.iter().map(|p| p.pages).sum::<u64>(), 10);
        assert_eq!(parts[2].gpa, l.data_gpa + 6 * PAGE);
        assert!(Layout { vcpus: 0, ..l }.check().is_err());
        assert!(Layout {
            data_gpa: 4096,
            ..l
        }
        .check()
        .is_err());
    }
}
