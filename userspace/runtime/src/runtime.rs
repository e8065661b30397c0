//! The runtime a VMM embeds: demand-paged regions described the way rust-vmm's vm-memory
//! describes guest memory, one [`Handler`], its inputs, and one [`Runtime::shutdown`].
//!
//! The VMM keeps its `VmFd`, its vCPU threads, its event loop and its guest memory; the
//! runtime never owns any of them. It needs only:
//! - the regions to demand-page, as `Arc<GuestRegionMmap>` (the same `Arc`s the VMM's
//!   `GuestMemoryMmap` holds; holding them keeps the memory mapped while the runtime may
//!   write to it, which is what makes [`Runtime::new`] safe);
//! - a [`PageSource`] and how a filled page becomes visible ([`Install`]: resolve through
//!   the KVM userfault fd or the attribute ioctl, or userfaultfd COPY/CONTINUE).
//!
//! Then: [`Runtime::vcpu_faults`] on each vCPU thread (sync exits), [`Runtime::ring_input`] or
//! [`Runtime::uffd_input`] in the event loop (or [`Runtime::serve_userfault_fd`] /
//! [`Runtime::serve_uffd`] on threads), [`Runtime::add_region`] on hotplug,
//! [`Runtime::shutdown`] at the end. See `examples/mini_vmm.rs`.

use crate::fault::uffd::Uffd;
use crate::fault::{ReaderExit, StopSignal};
use crate::handler::{Handler, HandlerError, Install, Region};
use crate::ioctls::UserfaultFd;
use crate::serve::{self, RingInput, ServeError, UffdInput};
use crate::source::PageSource;
use crate::stats::Stats;
use crate::vcpu::VcpuFaults;
use std::io;
use std::sync::Arc;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

/// One demand-paged region of guest memory.
#[derive(Debug, Clone)]
pub struct DemandRegion {
    /// The guest-visible memory (for `Install::UffdCopy`/`UffdContinue`, the range registered
    /// with userfaultfd; for the KVM modes, the memslot's `userspace_addr` mapping).
    pub memory: Arc<GuestRegionMmap>,
    /// A second mapping of the same memory to fill pages through (`Install::UffdContinue`
    /// only: a shmem or hugetlbfs file mapped twice).
    pub fill_alias: Option<Arc<GuestRegionMmap>>,
    /// The source page that backs the region's first page.
    pub source_first_page: u64,
}

impl DemandRegion {
    /// A region filled from source pages `source_first_page..`.
    pub fn new(memory: Arc<GuestRegionMmap>, source_first_page: u64) -> Self {
        Self {
            memory,
            fill_alias: None,
            source_first_page,
        }
    }

    fn to_region(&self) -> Result<Region, HandlerError> {
        let gpa = self.memory.start_addr().0;
        let size = self.memory.len();
        if let Some(a) = &self.fill_alias {
            if a.len() != size {
                return Err(HandlerError::BadRegion {
                    gpa,
                    size,
                    why: crate::handler::RegionProblem::AliasSize(a.len()),
                });
            }
        }
        Ok(Region {
            gpa,
            size,
            host: self.memory.as_ptr() as usize,
            fill_alias: self.fill_alias.as_ref().map(|a| a.as_ptr() as usize),
            source_first_page: self.source_first_page,
        })
    }
}

/// What can go wrong setting the runtime up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A region was refused.
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// An input could not be set up.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The stop signal (an eventfd) could not be created.
    #[error("creating the runtime's stop signal")]
    StopSignal(#[source] io::Error),
}

/// The runtime. Cheap to share: clone the [`Arc`]s it hands out.
pub struct Runtime {
    handler: Arc<Handler>,
    stop: StopSignal,
}

impl Runtime {
    /// A runtime demand-paging `regions` from `source`, every page missing.
    pub fn new(
        source: Arc<dyn PageSource>,
        install: Install,
        regions: impl IntoIterator<Item = DemandRegion>,
    ) -> Result<Self, RuntimeError> {
        // SAFETY: no region yet; each is added below with the Arcs that keep it mapped.
        let handler = unsafe { Handler::new(Vec::new(), source, install) }?;
        let rt = Self {
            handler: Arc::new(handler),
            stop: StopSignal::new().map_err(RuntimeError::StopSignal)?,
        };
        for r in regions {
            rt.add_region(r)?;
        }
        Ok(rt)
    }

    /// Adds a demand-paged region, every page missing (memory hotplug: the VMM adds the
    /// memslot — and for the KVM modes sets USERFAULT on it — then calls this, before the
    /// guest can touch the new memory). Faults on the other regions go on meanwhile.
    pub fn add_region(&self, r: DemandRegion) -> Result<(), RuntimeError> {
        let region = r.to_region()?;
        let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::new(r);
        // SAFETY: `region`'s host addresses are those of `r.memory` (and `r.fill_alias`),
        // which `owner` keeps mapped for as long as the handler lives. vm-memory accesses
        // guest memory through volatile copies, never Rust references, and the handler writes
        // a page only while it is missing (see Handler::new).
        unsafe { self.handler.add_owned_region(region, owner) }?;
        Ok(())
    }

    /// The per-vCPU handle for a vCPU thread's USERFAULT exits.
    pub fn vcpu_faults(&self) -> VcpuFaults {
        VcpuFaults::new(self.handler.clone())
    }

    /// The KVM userfault fd as an event-loop input (see [`RingInput`]).
    pub fn ring_input(
        &self,
        fd: Arc<UserfaultFd>,
        depth: usize,
        records_per_read: usize,
    ) -> Result<RingInput, RuntimeError> {
        Ok(RingInput::new(
            self.handler.clone(),
            fd,
            depth,
            records_per_read,
        )?)
    }

    /// A userfaultfd as an event-loop input (see [`UffdInput`]).
    pub fn uffd_input(&self, uffd: Arc<Uffd>) -> UffdInput {
        UffdInput::new(self.handler.clone(), uffd)
    }

    /// Serves the KVM userfault fd on the calling thread until [`Runtime::shutdown`] or the
    /// VM's destruction.
    pub fn serve_userfault_fd(
        &self,
        fd: &UserfaultFd,
        depth: usize,
        records_per_read: usize,
    ) -> Result<ReaderExit, ServeError> {
        serve::serve_userfault_fd(
            &self.handler,
            fd,
            self.stop.clone(),
            depth,
            records_per_read,
        )
    }

    /// Serves a userfaultfd on the calling thread until [`Runtime::shutdown`].
    pub fn serve_uffd(&self, uffd: &Uffd) -> Result<(), ServeError> {
        serve::serve_uffd(&self.handler, uffd, &self.stop)
    }

    /// Background prefetch on the calling thread, `batch` pages at a time, until every page
    /// is present or the runtime shuts down; a fill error stops the runtime.
    pub fn prefetch_all(&self, batch: usize) {
        self.handler.prefetch_all(batch)
    }

    /// The one stop: every service loop returns, every vCPU waiting for a page another thread
    /// fills gives up (`HandlerError::Stopped`), prefetch ends, and later calls fail with
    /// `Stopped`. Event-loop inputs are the VMM's: it stops polling them (and may
    /// [`RingInput::pause`] them to hand over the records they read). Pages already present
    /// stay present; missing ones stay missing.
    ///
    /// Threads asleep in the kernel for a missing page (a `VCPU_FAULTS` vCPU, KVM's own
    /// accesses, a userfaultfd fault) are not woken by this: nothing will fill their page. A
    /// VMM ending the VM lets them go without a page by deleting the memslot (KVM modes) or by
    /// making the range inaccessible and waking it (`mprotect(PROT_NONE)`, `UFFDIO_WAKE`), as
    /// `examples/mini_vmm.rs` (`release_waiters`) does; clearing USERFAULT would let them run on
    /// unfilled memory.
    pub fn shutdown(&self, reason: &str) {
        self.handler.stop(reason);
        self.stop.stop();
    }

    /// Marks `[gpa, gpa + size)` present without filling it: see [`Handler::mark_present`].
    /// The VMM makes the range visible first (clears USERFAULT / maps it).
    pub fn mark_present(&self, gpa: u64, size: u64) -> Result<usize, HandlerError> {
        self.handler.mark_present(gpa, size)
    }

    /// Pages still missing.
    pub fn missing_pages(&self) -> usize {
        self.handler.missing_pages()
    }

    /// Counters and the fault→resolved latency histogram.
    pub fn stats(&self) -> &Stats {
        &self.handler.stats
    }

    /// The handler underneath, for what the facade does not cover.
    pub fn handler(&self) -> &Arc<Handler> {
        &self.handler
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::NoopResolver;
    use crate::source::MemorySource;
    use crate::uapi::{KVM_MEMORY_EXIT_FLAG_READ, KVM_MEMORY_EXIT_FLAG_USERFAULT};
    use crate::vcpu::FaultAction;
    use crate::PAGE_SIZE;
    use vm_memory::{Bytes, GuestAddress, MemoryRegionAddress};

    const PAGE: u64 = PAGE_SIZE as u64;
    const UF_READ: u64 = KVM_MEMORY_EXIT_FLAG_USERFAULT | KVM_MEMORY_EXIT_FLAG_READ;

    /// A source of `pages` pages, page `i` filled with byte `i + 1`.
    fn source(pages: u64) -> Arc<MemorySource> {
        let img = (0..pages)
            .flat_map(|i| std::iter::repeat_n(i as u8 + 1, PAGE_SIZE))
            .collect();
        Arc::new(MemorySource::new(img).unwrap())
    }

    fn region(gpa: u64, pages: u64) -> Arc<GuestRegionMmap> {
        Arc::new(
            GuestRegionMmap::from_range(GuestAddress(gpa), (pages * PAGE) as usize, None).unwrap(),
        )
    }

    fn byte_at(r: &GuestRegionMmap, offset: u64) -> u8 {
        r.read_obj(MemoryRegionAddress(offset)).unwrap()
    }

    fn runtime(src: u64, regions: Vec<DemandRegion>) -> Runtime {
        Runtime::new(
            source(src),
            Install::Direct(Box::new(NoopResolver)),
            regions,
        )
        .unwrap()
    }

    #[test]
    fn a_userfault_exit_fills_its_pages_and_only_its_pages() {
        let mem = region(0x10_0000, 4);
        let rt = runtime(4, vec![DemandRegion::new(mem.clone(), 0)]);
        let mut v = rt.vcpu_faults();
        // An exit of 2 bytes straddling pages 1 and 2 covers both.
        let a = v
            .on_memory_fault(UF_READ, 0x10_0000 + 2 * PAGE - 1, 2)
            .unwrap();
        assert_eq!(a, FaultAction::Retry);
        assert_eq!(rt.missing_pages(), 2);
        assert_eq!(byte_at(&mem, PAGE), 2);
        assert_eq!(byte_at(&mem, 2 * PAGE + 4095), 3);
        assert_eq!(byte_at(&mem, 0), 0, "page 0 was not asked for");
        // Size 0 means the page of gpa.
        v.on_memory_fault(UF_READ, 0x10_0000 + 3 * PAGE + 8, 0)
            .unwrap();
        assert_eq!(byte_at(&mem, 3 * PAGE), 4);
        assert_eq!(rt.missing_pages(), 1);
        assert_eq!(
            rt.stats()
                .demand_pages
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
    }

    #[test]
    fn exits_that_are_not_userfault_or_not_a_fault_range_are_refused() {
        let mem = region(0, 2);
        let rt = runtime(2, vec![DemandRegion::new(mem.clone(), 0)]);
        let mut v = rt.vcpu_faults();
        // A private/shared conversion exit is the VMM's business: nothing is filled.
        let a = v
            .on_memory_fault(KVM_MEMORY_EXIT_FLAG_READ, 0, PAGE)
            .unwrap();
        assert_eq!(a, FaultAction::NotUserfault);
        assert_eq!(rt.missing_pages(), 2);
        for (gpa, size) in [(0, (2 << 20) + 1), (u64::MAX - 10, 100)] {
            let e = v.on_memory_fault(UF_READ, gpa, size).unwrap_err();
            assert!(
                matches!(e, HandlerError::BadExit { gpa: g, size: s } if g == gpa && s == size),
                "{e:?}"
            );
        }
        let e = v.on_memory_fault(UF_READ, 5 * PAGE, PAGE).unwrap_err();
        assert!(
            matches!(e, HandlerError::UnknownGpa(g) if g == 5 * PAGE),
            "{e:?}"
        );
        assert_eq!(rt.missing_pages(), 2);
    }

    #[test]
    fn a_region_added_later_is_demand_paged_and_overlaps_are_refused() {
        let a = region(0, 2);
        let rt = runtime(6, vec![DemandRegion::new(a.clone(), 0)]);
        let mut v = rt.vcpu_faults();
        v.on_memory_fault(UF_READ, 0, PAGE).unwrap();
        // Hotplug: a second region, served from source pages 2.., while the first is live.
        let b = region(0x100_0000, 4);
        rt.add_region(DemandRegion::new(b.clone(), 2)).unwrap();
        assert_eq!(rt.missing_pages(), 1 + 4);
        v.on_memory_fault(UF_READ, 0x100_0000 + 3 * PAGE, PAGE)
            .unwrap();
        assert_eq!(byte_at(&b, 3 * PAGE), 6);
        // Overlapping, misaligned-in-size (fill alias) and beyond-the-source regions: typed
        // errors, nothing added.
        let e = rt
            .add_region(DemandRegion::new(region(PAGE, 1), 0))
            .unwrap_err();
        assert!(e.to_string().contains("overlaps the region at 0x0"), "{e}");
        // The kind is typed, for a VMM that handles it.
        assert!(
            matches!(
                e,
                RuntimeError::Handler(HandlerError::BadRegion {
                    why: crate::handler::RegionProblem::Overlaps { gpa: 0, .. },
                    ..
                })
            ),
            "{e:?}"
        );
        let mut bad_alias = DemandRegion::new(region(0x200_0000, 2), 0);
        bad_alias.fill_alias = Some(region(0x300_0000, 1));
        let e = rt.add_region(bad_alias).unwrap_err();
        assert!(e.to_string().contains("fill alias has 0x1000 bytes"), "{e}");
        let e = rt
            .add_region(DemandRegion::new(region(0x400_0000, 2), 5))
            .unwrap_err();
        assert!(e.to_string().contains("needs source pages 5..5+2"), "{e}");
        assert_eq!(rt.handler().regions().count(), 2);
    }

    #[test]
    fn a_batch_with_an_unknown_gpa_claims_nothing() {
        let mem = region(0, 2);
        let rt = Arc::new(runtime(2, vec![DemandRegion::new(mem.clone(), 0)]));
        let mut s = crate::handler::Scratch::default();
        let t = std::time::Instant::now();
        let e = rt
            .handler()
            .handle_gpas(&[0, 7 * PAGE], t, false, &mut s)
            .unwrap_err();
        assert!(
            matches!(e, HandlerError::UnknownGpa(g) if g == 7 * PAGE),
            "{e:?}"
        );
        // Page 0 was not left claimed: a sync fault on it fills it instead of waiting forever.
        let (tx, rx) = std::sync::mpsc::channel();
        let rt2 = rt.clone();
        std::thread::spawn(move || {
            let mut v = rt2.vcpu_faults();
            tx.send(
                v.on_memory_fault(UF_READ, 0, PAGE)
                    .map_err(|e| e.to_string()),
            )
            .unwrap();
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the fault waited for a claim nobody held");
        assert_eq!(r.unwrap(), FaultAction::Retry);
        assert_eq!(byte_at(&mem, 0), 1);
    }

    #[test]
    fn the_region_table_has_a_bound_and_says_so() {
        let rt = runtime(1, Vec::new());
        for i in 0..crate::handler::MAX_REGIONS as u64 {
            rt.add_region(DemandRegion::new(region(i * PAGE, 1), 0))
                .unwrap();
        }
        let e = rt
            .add_region(DemandRegion::new(region(1 << 40, 1), 0))
            .unwrap_err();
        assert!(e.to_string().contains("at most 256 regions"), "{e}");
    }

    #[test]
    fn shutdown_stops_faults_with_its_reason_and_a_failure_keeps_its_type() {
        let mem = region(0, 2);
        let rt = runtime(2, vec![DemandRegion::new(mem, 0)]);
        let h = rt.handler().clone();
        h.fail(HandlerError::UnknownGpa(0x1234));
        rt.shutdown("vm exiting");
        let mut v = rt.vcpu_faults();
        let e = v.on_memory_fault(UF_READ, 0, PAGE).unwrap_err();
        let HandlerError::Stopped(cause) = e else {
            panic!("{e:?}")
        };
        // The first stop wins, and the failure is still a HandlerError underneath.
        let inner = cause.error().and_then(|e| e.downcast_ref::<HandlerError>());
        assert!(
            matches!(inner, Some(HandlerError::UnknownGpa(0x1234))),
            "{cause:?}"
        );
        assert!(cause.to_string().contains("gpa 0x1234"), "{cause}");
        assert_eq!(rt.missing_pages(), 2, "nothing filled after the stop");
    }

    #[test]
    fn shutdown_ends_a_serving_thread() {
        let mem = region(0, 1);
        let rt = Arc::new(runtime(1, vec![DemandRegion::new(mem, 0)]));
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) => panic!("userfaultfd is needed on the build host: {e}"),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let rt2 = rt.clone();
        let t = std::thread::spawn(move || {
            let r = rt2.serve_uffd(&uffd);
            tx.send(()).unwrap();
            r
        });
        rt.shutdown("done");
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("serve_uffd did not return after shutdown");
        t.join().unwrap().unwrap();
    }
}
