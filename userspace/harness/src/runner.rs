//! The end-to-end runner: a VM whose data memslot is demand-filled from a [`PageSource`] in
//! one of four modes while the workload guest checks every page. This is what the CLI's `run`
//! and the integration tests drive, and a worked example of embedding the library.

use crate::guest::{Event, Mismatch, WorkloadPart, WorkloadVcpu};
use crate::vm::{
    add_data_region, Backing, Region as VmRegion, Vm, VmHandle, VmOptions, DATA_SLOT,
    SHARED_GUEST_MEMFD,
};
use anyhow::{anyhow, ensure, Context, Result};
use kvm_testvm::mem::fallocate;
use kvm_testvm::vm::VCPU_LIMIT;
use kvm_userfault::fault::uffd::{Uffd, UffdMode};
use kvm_userfault::fault::{Access, ReaderExit, StopSignal};
use kvm_userfault::handler::{Handler, HandlerError, Install, Region, Resolver};
use kvm_userfault::ioctls::{set_userfault, FdResolver};
use kvm_userfault::serve::{serve_uffd, serve_userfault_fd, ServeError};
use kvm_userfault::source::PageSource;
use kvm_userfault::uapi::KVM_USERFAULT_FD_FLAG_VCPU_FAULTS;
use kvm_userfault::PAGE_SIZE;
use kvm_userfault::{FaultAction, VcpuFaults};
use nix::sys::mman::{mprotect, ProtFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::ptr::NonNull;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// How faults are delivered and resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// guest_memfd + USERFAULT attribute; vCPU threads handle KVM_EXIT_MEMORY_FAULT exits
    /// (KVM's own accesses, which cannot exit, come through a userfault fd without
    /// VCPU_FAULTS: without a fd they would read the unfilled page); resolved with
    /// KVM_USERFAULT_RESOLVE or KVM_SET_MEMORY_ATTRIBUTES(CLEAR).
    KvmSync,
    /// guest_memfd + USERFAULT; faults (vCPU and KVM's own) read from the userfault fd over
    /// io_uring and resolved with KVM_USERFAULT_RESOLVE.
    KvmAsync,
    /// userfaultfd MISSING on anonymous or shmem memory, resolved with UFFDIO_COPY.
    UffdMissing,
    /// userfaultfd MINOR on shmem, filled through an alias mapping, UFFDIO_CONTINUE.
    UffdMinor,
}

/// How kvm-sync mode clears USERFAULT after filling a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncResolve {
    /// `KVM_USERFAULT_RESOLVE` on the userfault fd: takes neither `slots_lock` nor `mmu_lock`
    /// (docs/kernel-design.md), so it is the default.
    Fd,
    /// `KVM_SET_MEMORY_ATTRIBUTES` with `FLAG_CLEAR`: the generic path (no fd needed).
    Attributes,
}

impl Mode {
    /// True for the modes that need the KVM userfault series.
    pub fn needs_series(self) -> bool {
        matches!(self, Mode::KvmSync | Mode::KvmAsync)
    }
}

/// [`SyncResolve::Attributes`]: clears USERFAULT with `KVM_SET_MEMORY_ATTRIBUTES(CLEAR)`.
/// Through a [`VmHandle`], which keeps the VM's memory mapped for as long as the handler can
/// reach the VM (the runtime's `AttributeResolver` holds a bare `Arc<VmFd>`, which does not).
struct ClearAttribute(VmHandle);

impl Resolver for ClearAttribute {
    fn resolve(&self, gpa: u64, size: u64) -> std::io::Result<()> {
        set_userfault(self.0.fd(), gpa, size, false)
    }
}

/// What to run.
#[derive(Clone)]
pub struct RunConfig {
    /// Fault mode.
    pub mode: Mode,
    /// vCPUs sharing the data region (each checks a contiguous part).
    pub vcpus: usize,
    /// Guest physical base of the data region.
    pub data_gpa: u64,
    /// Pages in the data region.
    pub pages: u64,
    /// The source page for the region's first page.
    pub source_first_page: u64,
    /// Pattern seed the guest checks against.
    pub seed: u64,
    /// Where the contents come from.
    pub source: Arc<dyn PageSource>,
    /// Background prefetch of pages nobody faulted on yet.
    pub prefetch: bool,
    /// Backing of the data slot in `uffd-missing` mode (anonymous or shmem).
    pub uffd_backing: Backing,
    /// io_uring reads in flight (kvm-async).
    pub ring_depth: usize,
    /// Records per read (kvm-async).
    pub records_per_read: usize,
    /// Give up (and fail) after this long.
    pub timeout: Duration,
    /// How kvm-sync clears the attribute.
    pub sync_resolve: SyncResolve,
    /// Threads reading the userfault fd / userfaultfd (each with its own io_uring or poll loop;
    /// the kernel hands each record to exactly one of them).
    pub handler_threads: usize,
}

impl RunConfig {
    /// Defaults: 1 vCPU at 1 GiB, every page of the source, no prefetch.
    pub fn new(mode: Mode, source: Arc<dyn PageSource>, seed: u64) -> Self {
        Self {
            mode,
            vcpus: 1,
            data_gpa: 1 << 30,
            pages: source.page_count(),
            source_first_page: 0,
            seed,
            source,
            prefetch: false,
            uffd_backing: Backing::Anonymous,
            ring_depth: 8,
            records_per_read: 64,
            timeout: Duration::from_secs(600),
            handler_threads: 1,
            sync_resolve: SyncResolve::Fd,
        }
    }
}

/// The outcome of a successful run.
#[derive(Debug)]
pub struct RunReport {
    /// Wall time from the first vCPU start to the last vCPU done.
    pub elapsed: Duration,
    /// Per-vCPU time to check its part.
    pub vcpu_times: Vec<Duration>,
    /// Pages checked by the guest.
    pub pages: u64,
    /// The handler's counters, summarised.
    pub stats: String,
    /// Pages filled on demand / by prefetch.
    pub demand_pages: u64,
    /// Pages filled by prefetch.
    pub prefetched_pages: u64,
}

impl RunReport {
    /// Overall demand-paging rate, as the kvm selftest prints it.
    pub fn pages_per_sec(&self) -> f64 {
        self.pages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Why a run failed: the first failure, typed. Later failures it caused (a vCPU told to
/// stop, an access that failed once the runner revoked the data region) are not causes.
#[derive(Debug, thiserror::Error)]
pub enum RunCause {
    /// The VM or the runtime could not be set up (or the configuration is invalid).
    #[error("{0:#}")]
    Setup(anyhow::Error),
    /// A fault could not be served: the page source failed (disconnect, truncated file,
    /// corrupt page, I/O error, timeout) or the kernel refused the install. Names the page,
    /// the source and the cause; that page was not made visible.
    #[error("{0}")]
    Fault(HandlerError),
    /// The guest read a word that does not match the image: a wrong page reached it.
    #[error("vCPU {vcpu}: guest found wrong contents at gpa {:#x}: expected {:#018x}, found {:#018x}", .mismatch.gpa, .mismatch.expected, .mismatch.found)]
    WrongContents {
        /// The vCPU.
        vcpu: usize,
        /// Its report.
        mismatch: Mismatch,
    },
    /// A vCPU failed on its own (unexpected exit, KVM_RUN error).
    #[error("vCPU {vcpu}: {reason}")]
    Vcpu {
        /// The vCPU.
        vcpu: usize,
        /// What happened.
        reason: String,
    },
    /// A fault-reading service thread failed for a reason other than a fill (io_uring,
    /// poll, a malformed record, the VM destroyed under it).
    #[error("{what}: {reason}")]
    Service {
        /// Which loop.
        what: &'static str,
        /// What happened.
        reason: String,
    },
    /// [`RunConfig::timeout`] elapsed.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
}

/// How one vCPU's part of the workload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest checked every page of its part.
    Done,
    /// The runner stopped it after the run failed (the detail says how it left KVM_RUN).
    Stopped(String),
    /// The guest found a wrong word (a wrong or partial page reached it).
    WrongContents(Mismatch),
    /// The vCPU itself failed (its own fault could not be served, an unexpected exit).
    Failed(String),
    /// It did not leave KVM_RUN despite the kicks (the VM was leaked).
    Stuck,
}

/// What one vCPU did before the run ended.
#[derive(Debug, Clone)]
pub struct VcpuOutcome {
    /// The vCPU index.
    pub vcpu: usize,
    /// First guest physical address of its part.
    pub gpa: u64,
    /// Pages in its part.
    pub pages: u64,
    /// Pages of its part the guest read and found correct, from the first one on (the
    /// workload reads its part in order and counts each page it verified in guest memory the
    /// host reads): `gpa..gpa + verified_pages * 4096`. For a stuck vCPU, as far as it got.
    pub verified_pages: u64,
    /// How it ended.
    pub end: VcpuEnd,
}

/// A failed run: the first cause, and what every vCPU had done until then.
///
/// `Display` is one line: the cause (a guest that also saw wrong contents, or vCPU threads
/// that did not stop, are added to it because they break the runtime's guarantees). It has no
/// `source()`: the cause's own text is already in the line, so an error chain prints it once.
#[derive(Debug)]
pub struct RunError {
    /// The first failure.
    pub cause: RunCause,
    /// Per vCPU, in order (empty if the run failed before the vCPUs started).
    pub vcpus: Vec<VcpuOutcome>,
}

impl RunError {
    fn setup(e: anyhow::Error) -> Self {
        Self {
            cause: RunCause::Setup(e),
            vcpus: Vec::new(),
        }
    }

    /// The first wrong word any guest vCPU reported, with its vCPU.
    pub fn wrong_contents(&self) -> Option<(usize, Mismatch)> {
        self.vcpus.iter().find_map(|v| match v.end {
            VcpuEnd::WrongContents(m) => Some((v.vcpu, m)),
            _ => None,
        })
    }

    /// vCPU threads that never left KVM_RUN.
    pub fn stuck_vcpus(&self) -> usize {
        self.vcpus
            .iter()
            .filter(|v| v.end == VcpuEnd::Stuck)
            .count()
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.cause)?;
        if !matches!(self.cause, RunCause::WrongContents { .. }) {
            if let Some((vcpu, m)) = self.wrong_contents() {
                write!(
                    f,
                    "; and vCPU {vcpu} then found wrong contents at gpa {:#x}",
                    m.gpa
                )?;
            }
        }
        let stuck = self.stuck_vcpus();
        if stuck > 0 {
            write!(
                f,
                "; {stuck} vCPU thread(s) did not stop (the VM and its fds were leaked)"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for RunError {}

/// The run's first failure, shared by every thread of the run.
struct FirstCause(Mutex<Option<RunCause>>);

impl FirstCause {
    /// Records `cause` unless one was recorded already, then stops the handler (so every
    /// other thread stops). Recording happens before the stop, so a thread that sees the
    /// handler stopped finds the cause recorded.
    fn record(&self, cause: RunCause, h: &Handler) {
        let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            tracing::error!("run failed: {cause}");
            h.stop(&cause.to_string());
            *first = Some(cause);
        } else {
            tracing::debug!("after the first failure: {cause}");
        }
    }

    fn take(&self) -> Option<RunCause> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Turns a service loop's error into a cause: a fill failure keeps its type; the handler
/// being stopped is a consequence, not a cause.
fn service_cause(e: ServeError, what: &'static str) -> Option<RunCause> {
    match e {
        ServeError::Handler(HandlerError::Stopped(_)) => None,
        ServeError::Handler(h) => Some(RunCause::Fault(h)),
        e => Some(RunCause::Service {
            what,
            reason: format!("{:#}", anyhow::Error::from(e)),
        }),
    }
}

/// How long after a failure stuck vCPU threads are given before the runner gives up on them.
const STUCK_GRACE: Duration = Duration::from_secs(10);
/// How long the runner only signals vCPUs before it also releases the waiters a signal cannot
/// reach (without contents: see `release_waiters`).
const KICK_GRACE: Duration = Duration::from_millis(200);
/// How often the runner checks its vCPUs (and re-kicks them once the run stopped).
const POLL: Duration = Duration::from_millis(20);

extern "C" fn noop_signal(_: libc::c_int) {}

/// Installs a no-op SIGUSR1 handler (without SA_RESTART) used to kick vCPUs out of KVM_RUN.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let kick = SigAction::new(
            SigHandler::Handler(noop_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is async-signal-safe. It replaces the
        // process's SIGUSR1 disposition, which run_workload documents.
        if let Err(e) = unsafe { sigaction(Signal::SIGUSR1, &kick) } {
            tracing::error!("installing the SIGUSR1 kick handler: {e}");
        }
    });
}

/// Runs the workload; every page is checked by the guest.
///
/// On failure the run stops as a whole: the vCPUs are kicked out of KVM_RUN (with SIGUSR1,
/// for which the first run installs a handler that does nothing), waiters are
/// released without contents (no page is ever made visible that the source did not supply
/// whole and verified), every thread is joined, and the error is the first cause with what
/// each vCPU had verified until then.
pub fn run_workload(cfg: &RunConfig) -> Result<RunReport, RunError> {
    run_inner(cfg).map_err(|e| match e.downcast::<RunError>() {
        Ok(r) => r,
        Err(e) => RunError::setup(e),
    })
}

fn run_inner(cfg: &RunConfig) -> Result<RunReport> {
    ensure!(
        cfg.vcpus >= 1 && cfg.vcpus <= VCPU_LIMIT,
        "vcpus must be 1..={VCPU_LIMIT}"
    );
    ensure!(
        cfg.pages >= cfg.vcpus as u64,
        "need at least one page per vCPU"
    );
    ensure!(
        cfg.data_gpa.is_multiple_of(2 << 20),
        "the data region must be 2 MiB aligned"
    );
    ensure!(
        (1..=64).contains(&cfg.handler_threads),
        "handler threads must be 1..=64"
    );
    let size = cfg
        .pages
        .checked_mul(PAGE_SIZE as u64)
        .filter(|s| cfg.data_gpa.checked_add(*s).is_some())
        .context("data region overflows")?;
    install_kick_handler();

    let mut vm = Vm::with_options(VmOptions {
        max_vcpus: cfg.vcpus,
        ..VmOptions::default()
    })?;
    if cfg.mode.needs_series() {
        vm.require_userfault()?;
    }
    let backing = match cfg.mode {
        Mode::KvmSync | Mode::KvmAsync => SHARED_GUEST_MEMFD,
        Mode::UffdMissing => cfg.uffd_backing,
        Mode::UffdMinor => Backing::Shmem,
    };
    ensure!(
        !(cfg.mode == Mode::UffdMissing && matches!(backing, Backing::GuestMemfd { .. })),
        "guest_memfd cannot be registered with userfaultfd"
    );
    // The runner's own share of the data region: it keeps the memory (and the alias) mapped
    // for as long as the handler may fill it, whatever happens to the memslot.
    let data = add_data_region(&mut vm, cfg.data_gpa, size, backing)?;
    let host = data.mapping.addr() as usize;

    let mut uffd = None;
    let mut ufd = None;
    let mut fill_alias = None;
    let install = match cfg.mode {
        Mode::KvmSync => {
            vm.set_userfault(cfg.data_gpa, size, true)?;
            // vCPU faults exit synchronously; KVM's own accesses (emulator, kvm_read_guest)
            // cannot exit, so an fd without VCPU_FAULTS reports just those to the reader.
            // The fd is required: without one, KVM does not intercept its own accesses at all
            // and they would read (or write) the page before it was filled.
            let fd = Arc::new(vm.create_userfault_fd(0)?);
            ufd = Some(fd.clone());
            // Either resolve path wakes the fd's waiters too.
            match cfg.sync_resolve {
                SyncResolve::Fd => Install::Direct(Box::new(FdResolver(fd))),
                SyncResolve::Attributes => Install::Direct(Box::new(ClearAttribute(vm.handle()))),
            }
        }
        Mode::KvmAsync => {
            vm.set_userfault(cfg.data_gpa, size, true)?;
            let fd = Arc::new(vm.create_userfault_fd(KVM_USERFAULT_FD_FLAG_VCPU_FAULTS)?);
            ufd = Some(fd.clone());
            Install::Direct(Box::new(FdResolver(fd)))
        }
        Mode::UffdMissing => {
            let u = Arc::new(Uffd::new()?);
            u.register(host, size as usize, UffdMode::Missing)?;
            uffd = Some(u.clone());
            Install::UffdCopy(u)
        }
        Mode::UffdMinor => {
            // MINOR faults need the pages in the page cache: allocate them (zeroed) first.
            let fd = data.fd.as_ref().context("shmem region without its memfd")?;
            fallocate(fd.as_raw_fd(), 0, 0, size).context("fallocate shmem")?;
            let u = Arc::new(Uffd::new()?);
            u.register(host, size as usize, UffdMode::Minor)?;
            uffd = Some(u.clone());
            let alias = data
                .alias
                .as_ref()
                .context("shmem region without an alias")?;
            fill_alias = Some(alias.addr() as usize);
            Install::UffdContinue(u)
        }
    };
    let region = Region {
        gpa: cfg.data_gpa,
        size,
        host,
        fill_alias,
        source_first_page: cfg.source_first_page,
    };
    // SAFETY: `host` and `fill_alias` are the data region's mapping and alias, `size` bytes
    // each, which no Rust reference points at (kvm-testvm only copies through raw pointers).
    // `data` shares their ownership and is held to the end of this function, after every
    // thread that uses the handler was joined; when vCPU threads are stuck, it is leaked with
    // them.
    let handler = Arc::new(unsafe { Handler::new(vec![region], cfg.source.clone(), install) }?);
    tracing::info!(mode = ?cfg.mode, pages = cfg.pages, vcpus = cfg.vcpus, source = %cfg.source.describe(), "run");

    // The vCPUs are created before any runtime thread starts, so that a failure here
    // returns with nothing running.
    let per = cfg.pages / cfg.vcpus as u64;
    let mut vcpus = Vec::new();
    let mut outcomes = Vec::new();
    let mut progress = Vec::new();
    for i in 0..cfg.vcpus {
        let first = i as u64 * per;
        let pages = if i + 1 == cfg.vcpus {
            cfg.pages - first
        } else {
            per
        };
        let part = WorkloadPart {
            gpa: cfg.data_gpa + first * PAGE_SIZE as u64,
            pages,
            image_offset: (cfg.source_first_page + first) * PAGE_SIZE as u64,
            seed: cfg.seed,
        };
        let vcpu = WorkloadVcpu::new(&mut vm, part)?;
        // Until its thread reports, a vCPU counts as stuck.
        outcomes.push(VcpuOutcome {
            vcpu: i,
            gpa: part.gpa,
            pages,
            verified_pages: 0,
            end: VcpuEnd::Stuck,
        });
        progress.push(vcpu.progress());
        vcpus.push(vcpu);
    }

    let stop = StopSignal::new()?;
    let causes = Arc::new(FirstCause(Mutex::new(None)));
    let mut service_threads = Vec::new();
    for t in 0..cfg.handler_threads {
        if let Some(fd) = &ufd {
            let (h, fd, stop, c) = (handler.clone(), fd.clone(), stop.clone(), causes.clone());
            let (depth, per) = (cfg.ring_depth, cfg.records_per_read);
            service_threads.extend(spawn_or_record(
                format!("kuf-async{t}"),
                &causes,
                &handler,
                move || {
                    const WHAT: &str = "async userfault reader";
                    let cause = match serve_userfault_fd(&h, &fd, stop, depth, per) {
                        Ok(ReaderExit::Stopped) => None,
                        // The runner holds the VM until the service threads are joined.
                        Ok(ReaderExit::VmGone) => Some(RunCause::Service {
                            what: WHAT,
                            reason: "the VM was destroyed during the run".into(),
                        }),
                        Err(e) => service_cause(e, WHAT),
                    };
                    if let Some(cause) = cause {
                        c.record(cause, &h);
                    }
                },
            ));
        }
        if let Some(u) = &uffd {
            let (h, u, stop, c) = (handler.clone(), u.clone(), stop.clone(), causes.clone());
            service_threads.extend(spawn_or_record(
                format!("kuf-uffd{t}"),
                &causes,
                &handler,
                move || {
                    if let Err(e) = serve_uffd(&h, &u, &stop) {
                        if let Some(cause) = service_cause(e, "userfaultfd handler") {
                            c.record(cause, &h);
                        }
                    }
                },
            ));
        }
    }
    if cfg.prefetch {
        let (h, c) = (handler.clone(), causes.clone());
        service_threads.extend(spawn_or_record(
            "kuf-prefetch".into(),
            &causes,
            &handler,
            move || {
                if let Err(e) = h.prefetch_until_done(32) {
                    c.record(RunCause::Fault(e), &h);
                }
            },
        ));
    }

    // vCPUs: the threads are started once everything else is.
    let (tx, rx) = mpsc::channel::<(VcpuOutcome, Duration)>();
    let mut vcpu_threads = Vec::new();
    let start = Instant::now();
    for (i, mut vcpu) in vcpus.into_iter().enumerate() {
        if handler.is_stopped() {
            // A runtime thread could not be started: run no guest.
            break;
        }
        let (h, tx, causes2) = (handler.clone(), tx.clone(), causes.clone());
        let spawned = spawn_or_record(format!("kuf-vcpu{i}"), &causes, &handler, move || {
            let t = Instant::now();
            let mut faults = VcpuFaults::new(h);
            let end = vcpu_loop(&mut vcpu, i, &mut faults, &causes2);
            let part = *vcpu.part();
            let outcome = VcpuOutcome {
                vcpu: i,
                gpa: part.gpa,
                pages: part.pages,
                verified_pages: vcpu.verified_pages(),
                end,
            };
            tx.send((outcome, t.elapsed())).ok();
        });
        match spawned {
            Some(t) => vcpu_threads.push(t),
            None => break,
        }
    }
    for o in outcomes.iter_mut().skip(vcpu_threads.len()) {
        o.end = VcpuEnd::Stopped("not started".into());
    }
    drop(tx);

    let mut times = vec![Duration::ZERO; cfg.vcpus];
    let mut remaining = vcpu_threads.len();
    let deadline = start + cfg.timeout;
    let mut released = false;
    let mut stopped_at: Option<Instant> = None;
    let mut stuck = false;
    while remaining > 0 {
        match rx.recv_timeout(POLL) {
            Ok((o, t)) => {
                times[o.vcpu] = t;
                let i = o.vcpu;
                outcomes[i] = o;
                remaining -= 1;
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !handler.is_stopped() && Instant::now() > deadline {
            causes.record(RunCause::TimedOut(cfg.timeout), &handler);
        }
        if !handler.is_stopped() {
            continue;
        }
        let since = *stopped_at.get_or_insert_with(Instant::now);
        // 1. Stop the vCPUs first: a signal makes KVM_RUN return EINTR from a vCPU waiting in
        //    a userfaultfd fault or in a KVM userfault wait (VCPU_FAULTS), without the page
        //    being resolved. Repeated every POLL: one sent while the thread was outside
        //    KVM_RUN is lost, and the loop checks `is_stopped` before re-entering.
        for t in &vcpu_threads {
            if !t.is_finished() {
                // SAFETY: the thread is alive (not finished) and joinable; SIGUSR1 has a
                // no-op handler, so this only interrupts KVM_RUN (or a syscall) with EINTR.
                unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1) };
            }
        }
        // 2. Then release the waiters a signal cannot reach, so that they fail instead of
        //    being resolved without contents.
        if !released && since.elapsed() >= KICK_GRACE {
            released = true;
            release_waiters(&mut vm, &data, cfg.mode, uffd.as_deref());
        }
        if since.elapsed() > STUCK_GRACE {
            stuck = true;
            break;
        }
    }
    if stuck {
        // A vCPU did not leave KVM_RUN despite the kicks (a kernel that never wakes it). Do
        // not hang the caller: stop the service threads and leak the VM, whose memory the
        // stuck threads may still reference, and every fd whose close would let their
        // faults complete without contents (userfaultfd: a zero page; the KVM userfault fd:
        // KVM's own accesses go to the unfilled memory).
        stop.stop();
        for (o, p) in outcomes.iter_mut().zip(&progress) {
            if o.end == VcpuEnd::Stuck {
                // How far the guest got before it stuck (its memory is leaked, so mapped).
                o.verified_pages = p.verified_pages();
            }
        }
        std::mem::forget(vm);
        std::mem::forget(data);
        std::mem::forget(ufd);
        std::mem::forget(uffd);
        std::mem::forget(vcpu_threads);
        std::mem::forget(service_threads);
        let cause = causes.take().unwrap_or_else(|| RunCause::Service {
            what: "runner",
            reason: handler.failure().map(|c| c.to_string()).unwrap_or_default(),
        });
        return Err(RunError {
            cause,
            vcpus: outcomes,
        }
        .into());
    }
    let elapsed = start.elapsed();
    for t in vcpu_threads {
        t.join().map_err(|_| anyhow!("vCPU thread panicked"))?;
    }
    handler.stop("run finished");
    stop.stop();
    for t in service_threads {
        t.join().map_err(|_| anyhow!("service thread panicked"))?;
    }
    if let Some(cause) = causes.take() {
        return Err(RunError {
            cause,
            vcpus: outcomes,
        }
        .into());
    }
    if let Some(o) = outcomes.iter().find(|o| o.end != VcpuEnd::Done) {
        // Every vCPU records its own failure; this only guards the invariant.
        return Err(RunError {
            cause: RunCause::Vcpu {
                vcpu: o.vcpu,
                reason: format!("ended as {:?} without a recorded cause", o.end),
            },
            vcpus: outcomes,
        }
        .into());
    }
    let stats = &handler.stats;
    use std::sync::atomic::Ordering::Relaxed;
    Ok(RunReport {
        elapsed,
        vcpu_times: times,
        pages: cfg.pages,
        stats: stats.summary(),
        demand_pages: stats.demand_pages.load(Relaxed),
        prefetched_pages: stats.prefetched_pages.load(Relaxed),
    })
}

/// Spawns a runtime thread. A failure to spawn is recorded as the run's cause instead of
/// being returned, so that the threads already running are stopped and joined like after
/// any other failure.
fn spawn_or_record(
    name: String,
    causes: &FirstCause,
    h: &Handler,
    f: impl FnOnce() + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    match std::thread::Builder::new().name(name.clone()).spawn(f) {
        Ok(t) => Some(t),
        Err(e) => {
            causes.record(
                RunCause::Setup(anyhow::Error::new(e).context(format!("spawning {name}"))),
                h,
            );
            None
        }
    }
}

/// Releases, without contents, the fault waiters of a stopped run that a signal does not
/// interrupt, so that their access fails instead of completing:
/// - userfaultfd: KVM's own (emulated, uaccess) reads of a registered page spin in the kernel
///   while a non-fatal signal is pending and never see EINTR. The data region is made
///   PROT_NONE, then the waiters are woken: their retry fails (-EFAULT; the emulator turns it
///   into an MMIO exit the vCPU loop never completes) instead of mapping a zero page, which
///   closing or unregistering the userfaultfd would do.
/// - KVM userfault: KVM's own accesses sleep killable, not interruptible. The data memslot
///   is deleted, which wakes them with a failed access (docs/uapi.md); the fd is never closed
///   and nothing is resolved while they sleep, since either would let them read the unfilled
///   page. The memory stays mapped: `data` (the runner's share of it) still holds it.
fn release_waiters(vm: &mut Vm, data: &VmRegion, mode: Mode, uffd: Option<&Uffd>) {
    let (addr, size) = (data.mapping.addr() as usize, data.size as usize);
    match mode {
        Mode::UffdMissing | Mode::UffdMinor => {
            let Some(ptr) = NonNull::new(addr as *mut libc::c_void) else {
                return;
            };
            // SAFETY: PROT_NONE on the data region's own mapping, which no Rust reference
            // points at (kvm-testvm and the handler access it through raw copies only, and the
            // handler is stopped); nothing reads it afterwards.
            if let Err(e) = unsafe { mprotect(ptr, size, ProtFlags::PROT_NONE) } {
                tracing::error!("revoking the data region: {e}");
                return;
            }
            if let Some(u) = uffd {
                u.wake(addr, size).ok();
            }
        }
        Mode::KvmSync | Mode::KvmAsync => {
            if let Err(e) = vm.remove_region(DATA_SLOT) {
                tracing::error!("deleting the data memslot: {e:#}");
            }
        }
    }
}

/// Runs one vCPU until the guest is done, finds a wrong word, or the run stops; records the
/// vCPU's own failures as the run's cause (unless the run had already failed: what happens to
/// a vCPU after that is a consequence, except a wrong word, which is always reported).
fn vcpu_loop(
    vcpu: &mut WorkloadVcpu,
    id: usize,
    faults: &mut VcpuFaults,
    causes: &FirstCause,
) -> VcpuEnd {
    let _span = tracing::debug_span!("vcpu", id).entered();
    let h = &faults.handler().clone();
    // A failure of this vCPU: the cause if the run had not stopped yet, else a consequence.
    let failed = |reason: String| {
        if h.is_stopped() {
            VcpuEnd::Stopped(reason)
        } else {
            causes.record(
                RunCause::Vcpu {
                    vcpu: id,
                    reason: reason.clone(),
                },
                h,
            );
            VcpuEnd::Failed(reason)
        }
    };
    loop {
        if h.is_stopped() {
            return VcpuEnd::Stopped("signalled".into());
        }
        match vcpu.step() {
            Ok(Event::Done) => return VcpuEnd::Done,
            Ok(Event::Interrupted) => {}
            Ok(Event::Progress { pages_left }) => {
                tracing::debug!(vcpu = id, pages_left, "progress");
            }
            Ok(Event::Mismatch(mismatch)) => {
                causes.record(RunCause::WrongContents { vcpu: id, mismatch }, h);
                return VcpuEnd::WrongContents(mismatch);
            }
            Ok(Event::MemoryFault { flags, gpa, size }) => {
                // The runtime's one arm for a VMM's vCPU loop.
                let access =
                    Access::from_exit_flags(flags).map_or("unknown-access", Access::as_str);
                match faults.on_memory_fault(flags, gpa, size) {
                    Ok(FaultAction::Retry) => {}
                    Ok(FaultAction::NotUserfault) => {
                        return failed(format!(
                            "memory fault at {gpa:#x} (+{size:#x}) without USERFAULT (flags {flags:#x})"
                        ))
                    }
                    Err(HandlerError::Stopped(why)) => {
                        return VcpuEnd::Stopped(format!("{access} fault at {gpa:#x}: {why}"))
                    }
                    Err(e) => {
                        let reason = format!("{access} fault at {gpa:#x}: {e}");
                        causes.record(RunCause::Fault(e), h);
                        return VcpuEnd::Failed(reason);
                    }
                }
            }
            Err(e) => return failed(e.to_string()),
        }
    }
}
