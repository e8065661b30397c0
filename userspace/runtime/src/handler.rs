//! The fault handler shared by every input: claim missing pages once, fill them from the
//! source, make them visible with one kernel call per contiguous run, account.
//!
//! Ordering guarantee: a page is made visible (attribute cleared / UFFDIO_COPY / CONTINUE) only
//! after its full contents were written and the source reported success; it is marked present
//! in the [`crate::state`] only after that kernel call succeeded.

use crate::fault::uffd::{Installed, Uffd};
use crate::source::{PageSource, SourceError, Urgency};
use crate::state::{coalesce_into, Claim, MissingMap, SlotState, StateError};
use crate::stats::Stats;
use crate::PAGE_SIZE;
use std::any::Any;
use std::fmt;
use std::io;
use std::ops::{Index, Range};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Makes a range of guest memory visible after it was written (clears USERFAULT).
pub trait Resolver: Send + Sync {
    /// Resolves `[gpa, gpa+size)`.
    fn resolve(&self, gpa: u64, size: u64) -> io::Result<()>;
}

/// A resolver that does nothing: for memory that is not protected (benchmarks, tests).
#[derive(Debug, Default)]
pub struct NoopResolver;

impl Resolver for NoopResolver {
    fn resolve(&self, _gpa: u64, _size: u64) -> io::Result<()> {
        Ok(())
    }
}

/// How pages become visible to the guest.
pub enum Install {
    /// Write straight into the guest-visible mapping (guest_memfd mmap), then resolve.
    Direct(Box<dyn Resolver>),
    /// Write into a staging buffer, then UFFDIO_COPY into the registered mapping.
    UffdCopy(Arc<Uffd>),
    /// Write into the region's fill alias (second mapping of the same shmem), then
    /// UFFDIO_CONTINUE on the registered mapping.
    UffdContinue(Arc<Uffd>),
}

/// A demand-paged range of guest memory (usually one memslot).
#[derive(Debug, Clone)]
pub struct Region {
    /// Guest physical address of the first byte (page aligned).
    pub gpa: u64,
    /// Size in bytes (page multiple).
    pub size: u64,
    /// Host address of the guest-visible mapping.
    pub host: usize,
    /// Host address of a second mapping to fill through (UFFDIO_CONTINUE mode only).
    pub fill_alias: Option<usize>,
    /// The source page backing the region's first page.
    pub source_first_page: u64,
}

impl Region {
    fn pages(&self) -> usize {
        (self.size / PAGE_SIZE as u64) as usize
    }
}

/// A handler failure.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A fault outside every demand-paged region.
    #[error("fault on gpa {0:#x}, which is outside every demand-paged region")]
    UnknownGpa(u64),
    /// A fault on a host address outside every region (userfaultfd).
    #[error("userfaultfd fault at host address {0:#x}, outside every region")]
    UnknownHostAddress(u64),
    /// The source could not supply a page. The page was not made visible: it stays missing
    /// (USERFAULT set / not mapped), whatever the source left in the buffer.
    ///
    /// Display is one line naming the page, the source and the cause (the cause is part of
    /// the message, not a separate `source()`, so an error chain prints it once).
    #[error("filling gpa {gpa:#x} from {from}: {cause}")]
    Source {
        /// The page that could not be filled (the first of its run that failed).
        gpa: u64,
        /// The source, as [`PageSource::describe`] puts it.
        from: String,
        /// Why.
        cause: SourceError,
    },
    /// The kernel refused to install a page.
    #[error("making gpa {gpa:#x} (+{size:#x}) visible: {cause}")]
    Install {
        /// First byte of the range.
        gpa: u64,
        /// Bytes.
        size: u64,
        /// The ioctl error.
        cause: io::Error,
    },
    /// The runtime is stopping (another thread failed or the VM is done).
    #[error("handler stopped: {0}")]
    Stopped(StopCause),
    /// A `KVM_EXIT_MEMORY_FAULT` whose range no fault can have (larger than
    /// [`MAX_EXIT_SIZE`], or wrapping).
    #[error(
        "memory fault exit of {size:#x} bytes at gpa {gpa:#x}: not a range one access faults on"
    )]
    BadExit {
        /// The exit's gpa.
        gpa: u64,
        /// The exit's size.
        size: u64,
    },
    /// A region (or a range of one) that cannot be handled.
    #[error("region at gpa {gpa:#x} (+{size:#x}): {why}")]
    BadRegion {
        /// Its first byte.
        gpa: u64,
        /// Its size.
        size: u64,
        /// What is wrong with it.
        why: RegionProblem,
    },
}

/// What is wrong with a region given to the handler ([`HandlerError::BadRegion`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionProblem {
    /// Its start or size is not a multiple of the page size, or it is empty.
    #[error("not page aligned, or empty")]
    NotAligned,
    /// It ends beyond the 64-bit address space.
    #[error("ends beyond the 64-bit address space")]
    Wraps,
    /// The source has fewer pages than the region needs.
    #[error("needs source pages {first}..{first}+{pages}, but {source_name} has {source_pages}")]
    BeyondSource {
        /// The region's first source page.
        first: u64,
        /// Its pages.
        pages: u64,
        /// The source, as it describes itself.
        source_name: String,
        /// The source's pages.
        source_pages: u64,
    },
    /// `Install::UffdContinue` without a fill alias.
    #[error("UFFDIO_CONTINUE needs a fill alias")]
    NoFillAlias,
    /// The fill alias is not the region's size.
    #[error("its fill alias has {0:#x} bytes")]
    AliasSize(u64),
    /// It overlaps a region already there.
    #[error("overlaps the region at {gpa:#x} (+{size:#x})")]
    Overlaps {
        /// The other region's first byte.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// The handler has [`MAX_REGIONS`] already.
    #[error("a handler serves at most {MAX_REGIONS} regions")]
    TooMany,
    /// A range that extends beyond the one region it starts in.
    #[error("extends beyond its region")]
    BeyondRegion,
    /// A page of the range is being filled right now (retry once it settled).
    #[error("page {0} of the range is being filled")]
    InFlight(usize),
}

/// Most bytes one `KVM_EXIT_MEMORY_FAULT` may ask for: a USERFAULT exit covers the page the
/// access touched (4 KiB, or a 2 MiB mapping at most).
pub const MAX_EXIT_SIZE: u64 = 2 << 20;

impl HandlerError {
    /// The guest physical address the error is about, if it names one.
    pub fn gpa(&self) -> Option<u64> {
        match self {
            Self::UnknownGpa(g) => Some(*g),
            Self::Source { gpa, .. }
            | Self::Install { gpa, .. }
            | Self::BadExit { gpa, .. }
            | Self::BadRegion { gpa, .. } => Some(*gpa),
            Self::UnknownHostAddress(_) | Self::Stopped(_) => None,
        }
    }
}

/// Why a handler stopped: the first [`Handler::stop`] or [`Handler::fail`].
#[derive(Debug, Clone)]
pub enum StopCause {
    /// An orderly stop, with the caller's reason ("vm exiting").
    Requested(Arc<str>),
    /// A fatal error, kept with its type and chain (downcast it with
    /// `err.downcast_ref::<HandlerError>()` and friends).
    Failed(Arc<dyn std::error::Error + Send + Sync>),
}

impl StopCause {
    /// The error, if the stop was a failure.
    pub fn error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Self::Requested(_) => None,
            Self::Failed(e) => Some(e.as_ref()),
        }
    }
}

impl fmt::Display for StopCause {
    /// One line: the reason, or the error followed by each of its causes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Requested(r) => f.write_str(r),
            Self::Failed(e) => {
                write!(f, "{e}")?;
                let mut cause = e.source();
                while let Some(c) = cause {
                    write!(f, ": {c}")?;
                    cause = c.source();
                }
                Ok(())
            }
        }
    }
}

/// Per-thread scratch buffers, so the fault path does not allocate.
#[derive(Debug, Default)]
pub struct Scratch {
    /// (region, page) of each gpa of the batch being handled.
    located: Vec<(usize, usize)>,
    claimed: Vec<(usize, usize)>,
    pages: Vec<usize>,
    staging: Vec<u8>,
    indices: Vec<u64>,
    waits: Vec<(usize, usize)>,
    runs: Vec<Range<usize>>,
    done: Vec<Range<usize>>,
    lookahead: Vec<u64>,
}

/// Longest run written by one install call (bounds the staging buffer: 1 MiB).
const MAX_RUN_PAGES: usize = 256;

struct RegionState {
    region: Region,
    state: SlotState,
    /// What keeps the region's memory mapped, for regions added through a safe constructor
    /// (e.g. vm-memory's `Arc<GuestRegionMmap>`): dropped only with the handler.
    _owner: Option<Arc<dyn Any + Send + Sync>>,
    /// The VMM may access this memory itself (a safely added region): fills are staged and
    /// copied in with volatile writes.
    shared: bool,
}

/// Most regions one handler serves, those added later with [`Handler::add_region`] included.
pub const MAX_REGIONS: usize = 256;

/// The handler's regions: append-only, so that a region can be added (memory hotplug) while
/// faults are handled, without a lock on the fault path. An index, once returned by a lookup,
/// stays valid: slots are written once, before the length that covers them is published.
struct RegionTable {
    slots: Box<[OnceLock<RegionState>]>,
    len: AtomicUsize,
    /// Serialises appends (and their overlap check).
    append: Mutex<()>,
}

impl RegionTable {
    fn new() -> Self {
        Self {
            slots: (0..MAX_REGIONS).map(|_| OnceLock::new()).collect(),
            len: AtomicUsize::new(0),
            append: Mutex::new(()),
        }
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn iter(&self) -> impl Iterator<Item = &RegionState> {
        self.slots[..self.len()].iter().filter_map(OnceLock::get)
    }

    /// Appends `r` unless it overlaps a region already there or the table is full.
    fn push(&self, r: RegionState) -> Result<usize, HandlerError> {
        let _g = self.append.lock().unwrap_or_else(|e| e.into_inner());
        let (gpa, size) = (r.region.gpa, r.region.size);
        let bad = |why: RegionProblem| HandlerError::BadRegion { gpa, size, why };
        if let Some(o) = self
            .iter()
            .find(|o| gpa < o.region.gpa + o.region.size && o.region.gpa < gpa + size)
        {
            return Err(bad(RegionProblem::Overlaps {
                gpa: o.region.gpa,
                size: o.region.size,
            }));
        }
        let i = self.len.load(Ordering::Relaxed);
        let slot = self
            .slots
            .get(i)
            .ok_or_else(|| bad(RegionProblem::TooMany))?;
        if slot.set(r).is_err() {
            // Only appends (serialised above) set slots, each at the current length.
            unreachable!("region slot {i} written twice");
        }
        self.len.store(i + 1, Ordering::Release);
        Ok(i)
    }
}

impl Index<usize> for RegionTable {
    type Output = RegionState;

    fn index(&self, i: usize) -> &RegionState {
        // Indices come from lookups over `0..len()`, and a slot is set before `len` covers it.
        self.slots[i]
            .get()
            .expect("region index below the published length")
    }
}

/// The handler.
pub struct Handler {
    regions: RegionTable,
    source: Arc<dyn PageSource>,
    install: Install,
    /// Counters and latency.
    pub stats: Stats,
    stopped: AtomicBool,
    failure: Mutex<Option<StopCause>>,
    prefetch_cursor: Mutex<(usize, usize)>,
}

impl Handler {
    /// A handler over `regions`, every page initially missing.
    ///
    /// # Safety
    /// For every region, `host` (and `fill_alias`, if any) must be the address of a writable
    /// mapping of at least `size` bytes that stays mapped for the handler's lifetime. The
    /// handler writes a page's contents there only while it holds the page's claim, i.e. while
    /// the page is still missing (USERFAULT set, or not mapped in the userfaultfd range), so
    /// neither the guest nor KVM accesses those bytes meanwhile; the caller must not access a
    /// missing page through the mapping either (a VMM's device emulation reads guest memory
    /// only once the page is present).
    pub unsafe fn new(
        regions: Vec<Region>,
        source: Arc<dyn PageSource>,
        install: Install,
    ) -> Result<Self, HandlerError> {
        let h = Self {
            regions: RegionTable::new(),
            source,
            install,
            stats: Stats::default(),
            stopped: AtomicBool::new(false),
            failure: Mutex::new(None),
            prefetch_cursor: Mutex::new((0, 0)),
        };
        for r in regions {
            h.push_region(r, None)?;
        }
        Ok(h)
    }

    /// Adds a demand-paged region (memory hotplug), every page missing, while faults on the
    /// others are being handled. Returns its index.
    ///
    /// # Safety
    /// As for [`Handler::new`].
    pub unsafe fn add_region(&self, region: Region) -> Result<usize, HandlerError> {
        self.push_region(region, None)
    }

    /// Adds a region whose memory `owner` keeps mapped: the handler holds `owner` until it is
    /// dropped, so the mapping outlives every write the handler makes.
    ///
    /// # Safety
    /// `region.host` (and `fill_alias`) must lie in mappings that `owner` keeps alive, and the
    /// access rule of [`Handler::new`] holds.
    pub(crate) unsafe fn add_owned_region(
        &self,
        region: Region,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<usize, HandlerError> {
        self.push_region(region, Some(owner))
    }

    fn push_region(
        &self,
        r: Region,
        owner: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<usize, HandlerError> {
        let bad = |why: RegionProblem| HandlerError::BadRegion {
            gpa: r.gpa,
            size: r.size,
            why,
        };
        let page = PAGE_SIZE as u64;
        if !r.gpa.is_multiple_of(page) || !r.size.is_multiple_of(page) || r.size == 0 {
            return Err(bad(RegionProblem::NotAligned));
        }
        if r.gpa.checked_add(r.size).is_none() {
            return Err(bad(RegionProblem::Wraps));
        }
        let (first, n) = (r.source_first_page, r.size / page);
        if first
            .checked_add(n)
            .is_none_or(|end| end > self.source.page_count())
        {
            return Err(bad(RegionProblem::BeyondSource {
                first,
                pages: n,
                source_name: self.source.describe(),
                source_pages: self.source.page_count(),
            }));
        }
        if matches!(self.install, Install::UffdContinue(_)) && r.fill_alias.is_none() {
            return Err(bad(RegionProblem::NoFillAlias));
        }
        let pages = r.pages();
        let shared = owner.is_some();
        self.regions.push(RegionState {
            region: r,
            state: SlotState::new(MissingMap::all_missing(pages)),
            _owner: owner,
            shared,
        })
    }

    /// The regions handled.
    pub fn regions(&self) -> impl Iterator<Item = &Region> {
        self.regions.iter().map(|r| &r.region)
    }

    /// Pages still missing, over all regions.
    pub fn missing_pages(&self) -> usize {
        self.regions
            .iter()
            .map(|r| r.state.lock().missing_count())
            .sum()
    }

    /// Is the page at `gpa` still missing?
    pub fn is_missing(&self, gpa: u64) -> bool {
        self.lookup_gpa(gpa)
            .is_some_and(|(r, p)| self.regions[r].state.lock().is_missing(p))
    }

    /// Marks `[gpa, gpa + size)` present without filling it, for memory whose contents are
    /// already in place and visible to the guest (a migration destination: pages that arrived
    /// in pre-copy and stayed clean, after their USERFAULT was cleared). The range must lie in
    /// one region and be page aligned; a page being filled refuses the whole range. Returns the
    /// pages that were missing. Faults on these pages are then answered as already present.
    pub fn mark_present(&self, gpa: u64, size: u64) -> Result<usize, HandlerError> {
        let page = PAGE_SIZE as u64;
        let bad = |why: RegionProblem| HandlerError::BadRegion { gpa, size, why };
        if !gpa.is_multiple_of(page) || !size.is_multiple_of(page) {
            return Err(bad(RegionProblem::NotAligned));
        }
        if size == 0 {
            return Ok(0);
        }
        let (r, first) = self.lookup_gpa(gpa).ok_or(HandlerError::UnknownGpa(gpa))?;
        let rs = &self.regions[r];
        let n = (size / page) as usize;
        if first + n > rs.region.pages() {
            return Err(bad(RegionProblem::BeyondRegion));
        }
        let done = rs
            .state
            .lock()
            .mark_present(first..first + n)
            .map_err(|e| match e {
                StateError::InFlight(p) => bad(RegionProblem::InFlight(p - first)),
                _ => bad(RegionProblem::BeyondRegion),
            })?;
        Ok(done)
    }

    /// Stops the handler: later calls fail with `Stopped`, waiters give up.
    pub fn stop(&self, reason: &str) {
        self.stop_with(StopCause::Requested(reason.into()));
    }

    fn stop_with(&self, cause: StopCause) {
        {
            let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
            f.get_or_insert(cause);
            self.stopped.store(true, Ordering::SeqCst);
        }
        // Waiters for pages in flight give up now, not at their next tick.
        for r in self.regions.iter() {
            r.state.wake_for_stop();
        }
    }

    fn stopped_error(&self) -> HandlerError {
        HandlerError::Stopped(
            self.failure()
                .unwrap_or_else(|| StopCause::Requested("stopped".into())),
        )
    }

    /// True once stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// The first failure recorded with [`Handler::fail`] or [`Handler::stop`].
    pub fn failure(&self) -> Option<StopCause> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records a fatal error (the first one is kept, typed) and stops.
    pub fn fail(&self, err: impl Into<Box<dyn std::error::Error + Send + Sync>>) {
        self.stop_with(StopCause::Failed(Arc::from(err.into())));
    }

    /// Maps a guest physical address to (region, page).
    pub fn lookup_gpa(&self, gpa: u64) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .position(|r| gpa >= r.region.gpa && gpa - r.region.gpa < r.region.size)
            .map(|i| {
                (
                    i,
                    ((gpa - self.regions[i].region.gpa) / PAGE_SIZE as u64) as usize,
                )
            })
    }

    /// Maps a host address of a guest-visible mapping to a guest physical address.
    pub fn host_to_gpa(&self, addr: u64) -> Result<u64, HandlerError> {
        for r in self.regions.iter() {
            let base = r.region.host as u64;
            if addr >= base && addr - base < r.region.size {
                return Ok(r.region.gpa + ((addr - base) & !(PAGE_SIZE as u64 - 1)));
            }
        }
        Err(HandlerError::UnknownHostAddress(addr))
    }

    /// Handles faults on `gpas` (any order, duplicates allowed), `faulted_at` being when they
    /// were observed. Every page is filled and visible on return, except pages another thread
    /// is filling: with `wait`, those are waited for (sync exits must not re-enter early);
    /// without, the other filler's install wakes the kernel waiters.
    pub fn handle_gpas(
        &self,
        gpas: &[u64],
        faulted_at: Instant,
        wait: bool,
        scratch: &mut Scratch,
    ) -> Result<(), HandlerError> {
        if self.is_stopped() {
            return Err(self.stopped_error());
        }
        let _span = tracing::debug_span!("fault_batch", n = gpas.len()).entered();
        // Every gpa is looked up once, and the whole batch before anything is claimed: a
        // batch with an unknown gpa is refused as it is, since a claim taken and then
        // abandoned would leave the waiters of its page hanging.
        scratch.located.clear();
        for &gpa in gpas {
            let at = self.lookup_gpa(gpa).ok_or(HandlerError::UnknownGpa(gpa))?;
            scratch.located.push(at);
        }
        Stats::add(&self.stats.faults, gpas.len() as u64);
        scratch.claimed.clear();
        scratch.waits.clear();
        let mut present_wakes: Vec<(usize, usize)> = Vec::new();
        let mut locked: Option<(usize, std::sync::MutexGuard<'_, MissingMap>)> = None;
        for (&gpa, &(ri, page)) in gpas.iter().zip(&scratch.located) {
            // One lock acquisition for a run of records on the same region.
            let map = match &mut locked {
                Some((r, g)) if *r == ri => g,
                _ => {
                    locked = None;
                    &mut locked.insert((ri, self.regions[ri].state.lock())).1
                }
            };
            let claim = map
                .try_claim(page)
                .map_err(|_| HandlerError::UnknownGpa(gpa))?;
            match claim {
                Claim::Fill => scratch.claimed.push((ri, page)),
                Claim::InFlight => {
                    Stats::add(&self.stats.duplicate_faults, 1);
                    scratch.waits.push((ri, page));
                }
                Claim::Present => {
                    Stats::add(&self.stats.already_present, 1);
                    present_wakes.push((ri, page));
                }
            }
        }
        drop(locked);
        tracing::trace!(claimed = scratch.claimed.len(), "claimed");
        // A userfaultfd waiter may have queued before the page was installed by someone else;
        // an extra wake is harmless, a missing one would hang it.
        if let Install::UffdCopy(u) | Install::UffdContinue(u) = &self.install {
            for (ri, page) in present_wakes {
                let host = self.regions[ri].region.host + page * PAGE_SIZE;
                u.wake(host, PAGE_SIZE).ok();
            }
        }
        let claimed = std::mem::take(&mut scratch.claimed);
        let res = self.fill_claimed(&claimed, Urgency::Demand, scratch);
        scratch.claimed = claimed;
        let filled = res?;
        Stats::add(&self.stats.demand_pages, filled as u64);
        self.stats
            .latency
            .record_n(faulted_at.elapsed(), filled as u64);
        if wait {
            let mut retry = Vec::new();
            for &(ri, page) in &scratch.waits {
                let st = &self.regions[ri].state;
                if st.wait_settled(page, Duration::from_millis(50), || self.is_stopped())
                    != Claim::Present
                {
                    if self.is_stopped() {
                        return Err(self.stopped_error());
                    }
                    // The other filler gave up on it: claim and fill it ourselves.
                    retry.push(self.regions[ri].region.gpa + (page * PAGE_SIZE) as u64);
                }
            }
            if !retry.is_empty() {
                return self.handle_gpas(&retry, faulted_at, wait, scratch);
            }
        }
        Ok(())
    }

    /// Fills up to `max` pages nobody asked for yet (background prefetch). Returns how many
    /// were filled; 0 means every page is present or in flight.
    pub fn prefetch(&self, max: usize, scratch: &mut Scratch) -> Result<usize, HandlerError> {
        if self.is_stopped() {
            return Err(self.stopped_error());
        }
        if self.regions.len() == 0 {
            return Ok(0);
        }
        let mut claimed = std::mem::take(&mut scratch.claimed);
        claimed.clear();
        let mut lookahead = std::mem::take(&mut scratch.lookahead);
        lookahead.clear();
        {
            let mut cur = self
                .prefetch_cursor
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut tried = 0;
            while claimed.len() < max && tried <= self.regions.len() {
                let (ri, from) = *cur;
                let mut map = self.regions[ri].state.lock();
                let mut next = from;
                while claimed.len() < max {
                    match map.next_unclaimed(next) {
                        Some(p) if p >= next => {
                            if map.try_claim(p) == Ok(Claim::Fill) {
                                claimed.push((ri, p));
                            }
                            next = p + 1;
                        }
                        _ => break,
                    }
                }
                if claimed.len() < max {
                    *cur = ((ri + 1) % self.regions.len(), 0);
                    tried += 1;
                } else {
                    *cur = (ri, next);
                    // Look ahead: the next batch (not claimed) is announced to the source
                    // after this one, so a remote source keeps a window in flight.
                    lookahead.clear();
                    let mut p = next;
                    while lookahead.len() < max {
                        match map.next_unclaimed(p) {
                            Some(q) if q >= p => {
                                lookahead
                                    .push(self.regions[ri].region.source_first_page + q as u64);
                                p = q + 1;
                            }
                            _ => break,
                        }
                    }
                }
            }
        }
        let _span = tracing::debug_span!("prefetch", n = claimed.len()).entered();
        let res = self.fill_claimed(&claimed, Urgency::Prefetch, scratch);
        if !lookahead.is_empty() {
            self.source.request(&lookahead, Urgency::Prefetch);
        }
        scratch.lookahead = lookahead;
        scratch.claimed = claimed;
        let n = res?;
        Stats::add(&self.stats.prefetched_pages, n as u64);
        Ok(n)
    }

    /// Fills and installs claimed pages; on failure every claim not completed is released.
    fn fill_claimed(
        &self,
        claimed: &[(usize, usize)],
        urgency: Urgency,
        scratch: &mut Scratch,
    ) -> Result<usize, HandlerError> {
        if claimed.is_empty() {
            return Ok(0);
        }
        scratch.indices.clear();
        scratch.indices.extend(
            claimed
                .iter()
                .map(|&(ri, p)| self.regions[ri].region.source_first_page + p as u64),
        );
        self.source.request(&scratch.indices, urgency);
        let mut filled = 0;
        for ri in 0..self.regions.len() {
            scratch.pages.clear();
            scratch
                .pages
                .extend(claimed.iter().filter(|c| c.0 == ri).map(|c| c.1));
            if scratch.pages.is_empty() {
                continue;
            }
            let mut runs = std::mem::take(&mut scratch.runs);
            runs.clear();
            coalesce_into(&mut scratch.pages, &mut runs);
            let res = self.fill_runs(ri, &runs, claimed, scratch);
            scratch.runs = runs;
            filled += res?;
        }
        Ok(filled)
    }

    fn fill_runs(
        &self,
        ri: usize,
        runs: &[Range<usize>],
        claimed: &[(usize, usize)],
        scratch: &mut Scratch,
    ) -> Result<usize, HandlerError> {
        let st = &self.regions[ri].state;
        let mut done = std::mem::take(&mut scratch.done);
        done.clear();
        let mut result = Ok(0);
        'runs: for (k, run) in runs.iter().enumerate() {
            let mut start = run.start;
            while start < run.end {
                let chunk = start..(start + MAX_RUN_PAGES).min(run.end);
                if let Err(e) = self.fill_run(ri, chunk.clone(), scratch) {
                    // Installed chunks become present; this chunk and every later claim are
                    // released so that a retry can claim them again.
                    let mut failed = Vec::with_capacity(runs.len() - k);
                    failed.push(chunk.start..run.end);
                    failed.extend(runs[k + 1..].iter().cloned());
                    st.settle(&done, &failed).ok();
                    for other in ri + 1..self.regions.len() {
                        for &(_, p) in claimed.iter().filter(|c| c.0 == other) {
                            self.regions[other].state.abort(p..p + 1).ok();
                        }
                    }
                    done.clear();
                    result = Err(e);
                    break 'runs;
                }
                done.push(chunk.clone());
                start = chunk.end;
            }
        }
        if result.is_ok() {
            // One lock for the whole batch: mark every installed page present.
            st.settle(&done, &[])
                .map_err(|_| HandlerError::UnknownGpa(self.regions[ri].region.gpa))?;
            result = Ok(done.iter().map(|r| r.len()).sum());
        }
        scratch.done = done;
        result
    }

    fn fill_run(
        &self,
        ri: usize,
        pages: Range<usize>,
        scratch: &mut Scratch,
    ) -> Result<(), HandlerError> {
        let rs = &self.regions[ri];
        let r = &rs.region;
        let gpa = r.gpa + (pages.start * PAGE_SIZE) as u64;
        let len = pages.len() * PAGE_SIZE;
        let _span = tracing::trace_span!("fill_run", gpa, pages = pages.len()).entered();
        // Where the contents are written before being made visible.
        // Where the contents are written before being made visible: the guest memory itself,
        // or — for UFFDIO_COPY, and for memory the VMM shares with its own device models
        // (regions added through `Runtime`) — a staging buffer, so that no Rust reference is
        // ever formed over memory another party may touch; the copy into such memory is
        // volatile (vm-memory's convention for guest memory).
        let guest: *mut u8 = match &self.install {
            Install::Direct(_) => (r.host + pages.start * PAGE_SIZE) as *mut u8,
            Install::UffdContinue(_) => {
                (r.fill_alias.expect("checked in new") + pages.start * PAGE_SIZE) as *mut u8
            }
            Install::UffdCopy(_) => std::ptr::null_mut(),
        };
        let staged = guest.is_null() || rs.shared;
        let target: *mut u8 = if staged {
            if scratch.staging.len() < len {
                scratch.staging.resize(MAX_RUN_PAGES * PAGE_SIZE, 0);
            }
            scratch.staging.as_mut_ptr()
        } else {
            guest
        };
        // SAFETY: target..target+len lies inside the staging buffer sized above, or inside the
        // region's mapping for a region added with the unsafe constructors, whose contract is
        // that nothing but the handler accesses a missing page. The pages are claimed by this
        // thread and still USERFAULT / unmapped in the registered range, so neither the guest,
        // KVM nor another filler accesses these bytes while we write them.
        let dst = unsafe { std::slice::from_raw_parts_mut(target, len) };
        let first = r.source_first_page + pages.start as u64;
        self.source.read_pages(first, dst).map_err(|cause| {
            // The page the source names, if it lies in this run; else the run's first page.
            let run = first..first + pages.len() as u64;
            let bad = match &cause {
                SourceError::Corrupt { index, .. }
                | SourceError::OutOfRange { index, .. }
                | SourceError::Io { index, .. }
                    if run.contains(index) =>
                {
                    index - r.source_first_page
                }
                _ => pages.start as u64,
            };
            HandlerError::Source {
                gpa: r.gpa + bad * PAGE_SIZE as u64,
                from: self.source.describe(),
                cause,
            }
        })?;
        if staged && !guest.is_null() {
            // SAFETY: guest..guest+len lies inside the region's mapping (or its fill alias),
            // which the region's owner keeps mapped for the handler's life; a VolatileSlice
            // only ever does volatile accesses, so a device model touching the page at the
            // same time races on its contents, not on Rust's aliasing rules.
            let vs = unsafe { vm_memory::VolatileSlice::new(guest, len) };
            vs.copy_from(&scratch.staging[..len]);
        }
        let ierr = |cause| HandlerError::Install {
            gpa,
            size: len as u64,
            cause,
        };
        match &self.install {
            Install::Direct(res) => res.resolve(gpa, len as u64).map_err(ierr)?,
            Install::UffdCopy(u) => {
                let host = r.host + pages.start * PAGE_SIZE;
                // SAFETY: the staging buffer holds `len` initialised bytes.
                let how = unsafe { u.copy(host, target, len) }.map_err(ierr)?;
                if how == Installed::AlreadyMapped {
                    tracing::debug!(gpa, "range was already mapped");
                }
            }
            Install::UffdContinue(u) => {
                let host = r.host + pages.start * PAGE_SIZE;
                u.cont(host, len).map_err(ierr)?;
            }
        }
        Stats::add(&self.stats.install_calls, 1);
        tracing::trace!(gpa, pages = pages.len(), "installed");
        Ok(())
    }

    /// Runs prefetch until every page is present or the handler stops; errors stop the handler.
    pub fn prefetch_all(&self, batch: usize) {
        if let Err(e) = self.prefetch_until_done(batch) {
            tracing::error!(gpa = e.gpa(), error = %e, "prefetch failed");
            self.fail(e);
        }
    }

    /// Runs prefetch until every page is present (`Ok`) or the handler stops (`Ok`: stopping
    /// is not this loop's failure); the first fill error ends it and is returned, typed, for
    /// the caller to record (it does not stop the handler itself). Never retries a failure.
    pub fn prefetch_until_done(&self, batch: usize) -> Result<(), HandlerError> {
        let mut scratch = Scratch::default();
        loop {
            match self.prefetch(batch, &mut scratch) {
                Ok(0) => {
                    if self.missing_pages() == 0 || self.is_stopped() {
                        return Ok(());
                    }
                    // Everything left is in flight elsewhere.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(_) => {}
                Err(HandlerError::Stopped(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemorySource;
    use std::sync::atomic::AtomicUsize;

    struct CountingResolver(Arc<Mutex<Vec<(u64, u64)>>>);
    impl Resolver for CountingResolver {
        fn resolve(&self, gpa: u64, size: u64) -> io::Result<()> {
            self.0.lock().unwrap().push((gpa, size));
            Ok(())
        }
    }

    struct Fixture {
        mem: Vec<u8>,
        img: Arc<MemorySource>,
        calls: Arc<Mutex<Vec<(u64, u64)>>>,
        h: Handler,
    }

    const GPA: u64 = 0x10_0000;

    fn fixture(pages: usize, src: Option<Arc<dyn PageSource>>) -> Fixture {
        let data: Vec<u8> = (0..pages * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 ^ (i as u8).wrapping_mul(3))
            .collect();
        let img = Arc::new(MemorySource::new(data).unwrap());
        let mut mem = vec![0u8; pages * PAGE_SIZE];
        let calls = Arc::new(Mutex::new(Vec::new()));
        let region = Region {
            gpa: GPA,
            size: (pages * PAGE_SIZE) as u64,
            host: mem.as_mut_ptr() as usize,
            fill_alias: None,
            source_first_page: 0,
        };
        // SAFETY: `mem` lives in the fixture next to the handler and is only read after the handler is done with the pages it reads.
        let h = unsafe {
            Handler::new(
                vec![region],
                src.unwrap_or_else(|| img.clone()),
                Install::Direct(Box::new(CountingResolver(calls.clone()))),
            )
        }
        .unwrap();
        Fixture { mem, img, calls, h }
    }

    #[test]
    fn pages_marked_present_are_neither_filled_nor_resolved() {
        let f = fixture(16, None);
        let ps = PAGE_SIZE as u64;
        assert_eq!(f.h.mark_present(GPA + 2 * ps, 4 * ps).unwrap(), 4);
        assert_eq!(f.h.missing_pages(), 12);
        // A fault on a marked page is already present: no fill, no resolve, no prefetch.
        let mut s = Scratch::default();
        f.h.handle_gpas(&[GPA + 3 * ps], Instant::now(), false, &mut s)
            .unwrap();
        assert!(f.calls.lock().unwrap().is_empty());
        assert!(f.mem[3 * PAGE_SIZE..4 * PAGE_SIZE].iter().all(|b| *b == 0));
        assert_eq!(f.h.stats.already_present.load(Ordering::Relaxed), 1);
        // Prefetch fills exactly the others.
        while f.h.prefetch(8, &mut s).unwrap() > 0 {}
        assert_eq!(f.h.missing_pages(), 0);
        assert_eq!(f.h.stats.prefetched_pages.load(Ordering::Relaxed), 12);
        assert!(f.mem[2 * PAGE_SIZE..6 * PAGE_SIZE].iter().all(|b| *b == 0));
        assert_eq!(&f.mem[..2 * PAGE_SIZE], &f.img.bytes()[..2 * PAGE_SIZE]);
        // Bad ranges are typed errors.
        assert!(f.h.mark_present(GPA + 1, ps).is_err());
        assert!(f.h.mark_present(GPA + 15 * ps, 2 * ps).is_err());
        assert!(matches!(
            f.h.mark_present(0, ps),
            Err(HandlerError::UnknownGpa(0))
        ));
    }

    #[test]
    fn batch_is_filled_coalesced_and_correct() {
        let f = fixture(64, None);
        let mut s = Scratch::default();
        let gpas: Vec<u64> = [5u64, 3, 4, 10, 4, 11, 12, 40]
            .iter()
            .map(|p| GPA + p * PAGE_SIZE as u64 + 17)
            .collect();
        f.h.handle_gpas(&gpas, Instant::now(), false, &mut s)
            .unwrap();
        let calls = f.calls.lock().unwrap().clone();
        let ps = PAGE_SIZE as u64;
        assert_eq!(
            calls,
            vec![
                (GPA + 3 * ps, 3 * ps),
                (GPA + 10 * ps, 3 * ps),
                (GPA + 40 * ps, ps)
            ]
        );
        for p in [3usize, 4, 5, 10, 11, 12, 40] {
            assert_eq!(
                &f.mem[p * PAGE_SIZE..][..PAGE_SIZE],
                &f.img.bytes()[p * PAGE_SIZE..][..PAGE_SIZE]
            );
            assert!(!f.h.is_missing(GPA + (p * PAGE_SIZE) as u64));
        }
        assert!(f.h.is_missing(GPA + 6 * ps));
        assert_eq!(f.h.missing_pages(), 64 - 7);
        assert_eq!(f.h.stats.demand_pages.load(Ordering::Relaxed), 7);
        // The duplicate gfn 4 in one batch was deduplicated by the claim.
        assert_eq!(f.h.stats.already_present.load(Ordering::Relaxed), 0);
        assert_eq!(f.h.stats.duplicate_faults.load(Ordering::Relaxed), 1);
        // Faulting again on a present page is counted and harmless.
        f.h.handle_gpas(&[GPA + 3 * ps], Instant::now(), true, &mut s)
            .unwrap();
        assert_eq!(f.h.stats.already_present.load(Ordering::Relaxed), 1);
        assert_eq!(f.calls.lock().unwrap().len(), 3);
        drop(f.mem);
    }

    #[test]
    fn unknown_gpa_is_an_error() {
        let f = fixture(4, None);
        let e =
            f.h.handle_gpas(&[0x1000], Instant::now(), false, &mut Scratch::default());
        assert!(matches!(e, Err(HandlerError::UnknownGpa(0x1000))));
        assert!(f.h.host_to_gpa(1).is_err());
        drop(f.mem);
    }

    #[test]
    fn prefetch_fills_everything_and_faults_then_find_pages_present() {
        let f = fixture(100, None);
        let mut s = Scratch::default();
        let mut total = 0;
        loop {
            let n = f.h.prefetch(16, &mut s).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 100);
        assert_eq!(f.mem, f.img.bytes());
        f.h.handle_gpas(&[GPA], Instant::now(), true, &mut s)
            .unwrap();
        assert_eq!(f.h.stats.already_present.load(Ordering::Relaxed), 1);
        drop(f.mem);
    }

    #[test]
    fn faults_racing_prefetch_on_many_threads_fill_each_page_once() {
        let f = fixture(512, None);
        let h = &f.h;
        std::thread::scope(|sc| {
            sc.spawn(|| h.prefetch_all(8));
            for t in 0..3u64 {
                sc.spawn(move || {
                    let mut s = Scratch::default();
                    for p in (0..512u64).rev() {
                        if p % 3 == t || p % 7 == 0 {
                            h.handle_gpas(
                                &[GPA + p * PAGE_SIZE as u64],
                                Instant::now(),
                                true,
                                &mut s,
                            )
                            .unwrap();
                            assert!(!h.is_missing(GPA + p * PAGE_SIZE as u64));
                        }
                    }
                });
            }
        });
        assert_eq!(h.missing_pages(), 0);
        assert_eq!(f.mem, f.img.bytes());
        let st = &h.stats;
        let filled =
            st.demand_pages.load(Ordering::Relaxed) + st.prefetched_pages.load(Ordering::Relaxed);
        assert_eq!(filled, 512, "every page filled exactly once");
        let covered: u64 = f.calls.lock().unwrap().iter().map(|c| c.1).sum();
        assert_eq!(
            covered,
            512 * PAGE_SIZE as u64,
            "every page resolved exactly once"
        );
        drop(f.mem);
    }

    /// A source that fails on one page and counts reads.
    struct Flaky {
        inner: Arc<MemorySource>,
        bad: u64,
        reads: AtomicUsize,
    }
    impl PageSource for Flaky {
        fn page_count(&self) -> u64 {
            self.inner.page_count()
        }
        fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.read_page(index, dst)?;
            if index == self.bad {
                dst[..100].fill(0xEE); // partial garbage written before failing
                return Err(SourceError::Corrupt {
                    index,
                    expected: 1,
                    found: 2,
                });
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    #[test]
    fn failing_source_never_resolves_the_page() {
        let data = vec![9u8; 8 * PAGE_SIZE];
        let flaky = Arc::new(Flaky {
            inner: Arc::new(MemorySource::new(data).unwrap()),
            bad: 5,
            reads: AtomicUsize::new(0),
        });
        let f = fixture(8, Some(flaky.clone()));
        let mut s = Scratch::default();
        let ps = PAGE_SIZE as u64;
        let e =
            f.h.handle_gpas(
                &[GPA + 4 * ps, GPA + 5 * ps, GPA + 6 * ps],
                Instant::now(),
                false,
                &mut s,
            )
            .unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        assert!(
            e.to_string().contains(&format!("{:#x}", GPA + 5 * ps)),
            "{e}"
        );
        // Nothing of the run 4..7 was resolved, the pages stay missing and claimable.
        assert!(f.calls.lock().unwrap().is_empty());
        for p in 4..7 {
            assert!(f.h.is_missing(GPA + p * ps));
        }
        f.h.handle_gpas(&[GPA + 4 * ps], Instant::now(), false, &mut s)
            .unwrap();
        assert_eq!(f.calls.lock().unwrap().clone(), vec![(GPA + 4 * ps, ps)]);
        drop(f.mem);
    }

    #[test]
    fn two_regions_batches_and_prefetch_cover_both() {
        let pages = 40usize;
        let data: Vec<u8> = (0..pages * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8)
            .collect();
        let img = Arc::new(MemorySource::new(data).unwrap());
        let mut a = vec![0u8; 10 * PAGE_SIZE];
        let mut b = vec![0u8; 30 * PAGE_SIZE];
        let calls = Arc::new(Mutex::new(Vec::new()));
        let ps = PAGE_SIZE as u64;
        let regions = vec![
            Region {
                gpa: 0x10_0000,
                size: 10 * ps,
                host: a.as_mut_ptr() as usize,
                fill_alias: None,
                source_first_page: 0,
            },
            Region {
                gpa: 0x80_0000,
                size: 30 * ps,
                host: b.as_mut_ptr() as usize,
                fill_alias: None,
                source_first_page: 10,
            },
        ];
        // SAFETY: `a` and `b` outlive `h` and are only read after the handler filled them.
        let h = unsafe {
            Handler::new(
                regions,
                img,
                Install::Direct(Box::new(CountingResolver(calls.clone()))),
            )
        }
        .unwrap();
        let mut s = Scratch::default();
        // One batch spanning both regions, interleaved.
        h.handle_gpas(
            &[
                0x80_0000 + 2 * ps,
                0x10_0000 + ps,
                0x80_0000 + 3 * ps,
                0x10_0000,
            ],
            Instant::now(),
            false,
            &mut s,
        )
        .unwrap();
        assert_eq!(
            calls.lock().unwrap().clone(),
            vec![(0x10_0000, 2 * ps), (0x80_0000 + 2 * ps, 2 * ps)]
        );
        while h.prefetch(7, &mut s).unwrap() > 0 {}
        assert_eq!(h.missing_pages(), 0);
        for (i, p) in a.chunks_exact(PAGE_SIZE).enumerate() {
            assert!(p.iter().all(|&x| x == i as u8), "region a page {i}");
        }
        for (i, p) in b.chunks_exact(PAGE_SIZE).enumerate() {
            assert!(p.iter().all(|&x| x == (i + 10) as u8), "region b page {i}");
        }
        let covered: u64 = calls.lock().unwrap().iter().map(|c| c.1).sum();
        assert_eq!(covered, 40 * ps);
        assert_eq!(
            h.host_to_gpa(b.as_ptr() as u64 + 5 * ps + 3).unwrap(),
            0x80_0000 + 5 * ps
        );
    }

    /// Fails the first read (slowly), succeeds afterwards.
    /// Fails its first read, once the test opens its gate: the test decides the order of
    /// events by state, not by sleeping.
    struct FailOnce {
        inner: Arc<MemorySource>,
        failed: AtomicBool,
        entered: Mutex<std::sync::mpsc::Sender<()>>,
        gate: Mutex<std::sync::mpsc::Receiver<()>>,
    }
    impl PageSource for FailOnce {
        fn page_count(&self) -> u64 {
            self.inner.page_count()
        }
        fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
            if !self.failed.swap(true, Ordering::SeqCst) {
                self.entered.lock().unwrap().send(()).unwrap();
                self.gate
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30))
                    .expect("the test never opened the gate");
                return Err(SourceError::Io {
                    index,
                    source: std::io::Error::other("transient"),
                });
            }
            self.inner.read_page(index, dst)
        }
        fn describe(&self) -> String {
            "fail-once".into()
        }
    }

    #[test]
    fn waiter_takes_over_a_page_whose_filler_failed() {
        let data: Vec<u8> = (0..4 * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 + 1)
            .collect();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (open, gate) = std::sync::mpsc::channel();
        let src = Arc::new(FailOnce {
            inner: Arc::new(MemorySource::new(data).unwrap()),
            failed: AtomicBool::new(false),
            entered: Mutex::new(entered_tx),
            gate: Mutex::new(gate),
        });
        let f = fixture(4, Some(src));
        let h = &f.h;
        let gpa = GPA + 2 * PAGE_SIZE as u64;
        std::thread::scope(|s| {
            // A claims the page and is inside the source's read.
            let a =
                s.spawn(|| h.handle_gpas(&[gpa], Instant::now(), false, &mut Scratch::default()));
            entered.recv_timeout(Duration::from_secs(30)).unwrap();
            // B finds the page in flight and waits for it.
            let b =
                s.spawn(|| h.handle_gpas(&[gpa], Instant::now(), true, &mut Scratch::default()));
            let deadline = Instant::now() + Duration::from_secs(30);
            while h.stats.duplicate_faults.load(Ordering::SeqCst) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "B never found the page in flight"
                );
                std::thread::yield_now();
            }
            // A's read fails: A gives up, B sees that and fills the page itself.
            open.send(()).unwrap();
            assert!(a.join().unwrap().is_err());
            b.join().unwrap().unwrap();
        });
        assert!(!h.is_missing(gpa));
        assert!(f.mem[2 * PAGE_SIZE..3 * PAGE_SIZE].iter().all(|&b| b == 3));
        assert_eq!(
            f.calls.lock().unwrap().clone(),
            vec![(gpa, PAGE_SIZE as u64)]
        );
    }

    #[test]
    fn region_larger_than_source_is_rejected() {
        let img = Arc::new(MemorySource::new(vec![0; PAGE_SIZE]).unwrap());
        let r = Region {
            gpa: 0,
            size: 2 * PAGE_SIZE as u64,
            host: 0,
            fill_alias: None,
            source_first_page: 0,
        };
        // SAFETY: construction fails before any memory is touched.
        let e = unsafe { Handler::new(vec![r], img, Install::Direct(Box::new(NoopResolver))) }
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("needs source pages 0..0+2, but memory image (1 pages) has 1"),
            "{e}"
        );
    }
}
