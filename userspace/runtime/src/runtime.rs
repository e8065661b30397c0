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
use crate::PAGE_SIZE;
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
                    why: format!("its fill alias has {:#x} bytes", a.len()),
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
    pub fn shutdown(&self, reason: &str) {
        self.handler.stop(reason);
        self.stop.stop();
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

    /// The page size regions must be aligned to.
    pub const PAGE_SIZE: usize = PAGE_SIZE;
}
