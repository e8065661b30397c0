//! The end-to-end runner: a VM whose data memslot is demand-filled from a [`PageSource`] in
//! one of four modes while the workload guest checks every page. This is what the CLI's `run`
//! and the integration tests drive, and a worked example of embedding the library.

use crate::fault::uffd::{Uffd, UffdMode, UffdMsg, UFFD_EVENT_PAGEFAULT};
use crate::fault::{Access, AsyncReader, ReaderExit, StopSignal};
use crate::guest::{self, Mailbox, WorkloadPart, PORT_DONE, PORT_FAIL, PORT_PROGRESS};
use crate::handler::{Handler, Install, Region, Scratch};
use crate::source::PageSource;
use crate::uapi::{KVM_MEMORY_EXIT_FLAG_USERFAULT, KVM_USERFAULT_FD_FLAG_VCPU_FAULTS};
use crate::vm::{AttributeResolver, Backing, FdResolver, UserfaultFd, Vm};
use crate::PAGE_SIZE;
use anyhow::{anyhow, bail, ensure, Context, Result};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc;
use std::sync::{Arc, Once};
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
    /// Backing of the data slot in `uffd-missing` mode (anon or shmem).
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
            uffd_backing: Backing::Anon,
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

/// How long after a failure stuck vCPU threads are given before the runner gives up on them.
const STUCK_GRACE: Duration = Duration::from_secs(10);

extern "C" fn noop_signal(_: libc::c_int) {}

/// Installs a no-op SIGUSR1 handler (without SA_RESTART) used to kick vCPUs out of KVM_RUN.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs an async-signal-safe no-op handler; sigaction is zeroed then filled.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        }
    });
}

/// Runs the workload; every page is checked by the guest. Errors name the first failure.
pub fn run_workload(cfg: &RunConfig) -> Result<RunReport> {
    ensure!(
        cfg.vcpus >= 1 && cfg.vcpus as u64 <= guest::MAX_VCPUS,
        "vcpus must be 1..={}",
        guest::MAX_VCPUS
    );
    ensure!(
        cfg.pages >= cfg.vcpus as u64,
        "need at least one page per vCPU"
    );
    ensure!(
        cfg.data_gpa.is_multiple_of(2 << 20) && cfg.data_gpa >= guest::SYSTEM_SIZE,
        "data region must be 2 MiB aligned above the system memory"
    );
    let size = cfg.pages * PAGE_SIZE as u64;
    let end = cfg
        .data_gpa
        .checked_add(size)
        .context("data region overflows")?;
    let map_gib = end.div_ceil(1 << 30);
    ensure!(
        map_gib <= guest::MAX_MAPPED_GIB && end <= 0xfffb_d000,
        "data region ends at {end:#x}, beyond what the guest maps"
    );
    install_kick_handler();

    let mut vm = Vm::new()?;
    if cfg.mode.needs_series() {
        vm.require_userfault()?;
    }
    let sys = vm.add_slot(0, guest::SYSTEM_SIZE, Backing::Anon)?;
    sys.mapping
        .write(0, &guest::system_image(map_gib, &guest::workload_code())?)?;

    let backing = match cfg.mode {
        Mode::KvmSync | Mode::KvmAsync => Backing::GuestMemfd,
        Mode::UffdMissing => cfg.uffd_backing,
        Mode::UffdMinor => Backing::Shmem,
    };
    ensure!(
        !(cfg.mode == Mode::UffdMissing && backing == Backing::GuestMemfd),
        "guest_memfd cannot be registered with userfaultfd"
    );
    vm.add_slot(cfg.data_gpa, size, backing)?;
    let data = &vm.slots[1];

    let mut alias = None;
    let mut uffd = None;
    let mut ufd = None;
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
                SyncResolve::Attributes => {
                    Install::Direct(Box::new(AttributeResolver(vm.fd.clone())))
                }
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
            u.register(data.mapping.addr(), size as usize, UffdMode::Missing)?;
            uffd = Some(u.clone());
            Install::UffdCopy(u)
        }
        Mode::UffdMinor => {
            // MINOR faults need the pages in the page cache: allocate them (zeroed) first.
            let fd = data.fd.as_ref().context("shmem slot without fd")?;
            // SAFETY: fallocate on our own memfd.
            if unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, size as libc::off_t) } < 0 {
                return Err(std::io::Error::last_os_error()).context("fallocate shmem");
            }
            let u = Arc::new(Uffd::new()?);
            u.register(data.mapping.addr(), size as usize, UffdMode::Minor)?;
            uffd = Some(u.clone());
            alias = Some(data.alias()?);
            Install::UffdContinue(u)
        }
    };
    let region = Region {
        gpa: cfg.data_gpa,
        size,
        host: data.mapping.addr(),
        fill_alias: alias.as_ref().map(|m| m.addr()),
        source_first_page: cfg.source_first_page,
    };
    // SAFETY: the region is the data slot's mapping (and alias), owned by `vm`/`alias`, which outlive the handler's use (threads are joined, or the VM is leaked if they are stuck); it is only accessed through raw pointers.
    let handler = Arc::new(unsafe { Handler::new(vec![region], cfg.source.clone(), install) }?);
    tracing::info!(mode = ?cfg.mode, pages = cfg.pages, vcpus = cfg.vcpus, source = %cfg.source.describe(), "run");

    let stop = StopSignal::new()?;
    let mut service_threads = Vec::new();
    ensure!(
        (1..=64).contains(&cfg.handler_threads),
        "handler threads must be 1..=64"
    );
    for t in 0..cfg.handler_threads {
        if let Some(fd) = &ufd {
            let (h, fd, stop) = (handler.clone(), fd.clone(), stop.clone());
            let (depth, per) = (cfg.ring_depth, cfg.records_per_read);
            service_threads.push(
                std::thread::Builder::new()
                    .name(format!("kuf-async{t}"))
                    .spawn(move || {
                        match serve_userfault_fd(&h, &fd, stop, depth, per) {
                            Ok(ReaderExit::Stopped) => {}
                            // The runner holds the VM until the service threads are joined.
                            Ok(ReaderExit::VmGone) => h.fail(&anyhow!(
                                "async userfault reader: the VM was destroyed during the run"
                            )),
                            Err(e) => h.fail(&e.context("async userfault reader")),
                        }
                    })?,
            );
        }
        if let Some(u) = &uffd {
            let (h, u, stop) = (handler.clone(), u.clone(), stop.clone());
            service_threads.push(
                std::thread::Builder::new()
                    .name(format!("kuf-uffd{t}"))
                    .spawn(move || {
                        if let Err(e) = serve_uffd(&h, &u, &stop) {
                            h.fail(&e.context("userfaultfd handler"));
                        }
                    })?,
            );
        }
    }
    if cfg.prefetch {
        let h = handler.clone();
        service_threads.push(
            std::thread::Builder::new()
                .name("kuf-prefetch".into())
                .spawn(move || h.prefetch_all(32))?,
        );
    }

    // vCPUs.
    let (tx, rx) = mpsc::channel::<(usize, Result<Duration>)>();
    let per = cfg.pages / cfg.vcpus as u64;
    let mut vcpu_threads = Vec::new();
    let start = Instant::now();
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
            vcpu: i as u64,
        };
        let vcpu = vm.create_vcpu(i as u64)?;
        guest::setup_long_mode(&vcpu)?;
        guest::setup_workload_regs(&vcpu, &part)?;
        let (h, tx) = (handler.clone(), tx.clone());
        let sys_addr = vm.slots[0].mapping.addr();
        vcpu_threads.push(
            std::thread::Builder::new()
                .name(format!("kuf-vcpu{i}"))
                .spawn(move || {
                    let t = Instant::now();
                    let r = vcpu_loop(vcpu, &h, &part, sys_addr).map(|()| t.elapsed());
                    if let Err(e) = &r {
                        h.fail(e);
                    }
                    tx.send((i, r)).ok();
                })?,
        );
    }
    drop(tx);

    let mut times = vec![Duration::ZERO; cfg.vcpus];
    let mut first_err: Option<anyhow::Error> = None;
    let mut remaining = cfg.vcpus;
    let deadline = start + cfg.timeout;
    let mut unblocked = false;
    let mut stopped_at: Option<Instant> = None;
    let data_addr = vm.slots[1].mapping.addr();
    while remaining > 0 {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((i, Ok(t))) => {
                times[i] = t;
                remaining -= 1;
            }
            Ok((_, Err(e))) => {
                first_err.get_or_insert(e);
                remaining -= 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    handler.stop(&format!("timed out after {:?}", cfg.timeout));
                }
                if handler.is_stopped() {
                    if !unblocked {
                        unblocked = true;
                        if let Some(u) = &uffd {
                            // KVM's own (emulated, uaccess) reads of a userfaultfd page spin
                            // in the kernel while a non-fatal signal is pending and never see
                            // EINTR. Revoke access to the data region and wake the waiters:
                            // their retry fails (-EFAULT) instead of mapping a zero page, and
                            // the vCPU exits.
                            // SAFETY: PROT_NONE on our own data mapping; nothing in this
                            // process reads it through a Rust reference.
                            unsafe {
                                libc::mprotect(
                                    data_addr as *mut libc::c_void,
                                    size as usize,
                                    libc::PROT_NONE,
                                )
                            };
                            u.wake(data_addr, size as usize).ok();
                        }
                    }
                    for t in &vcpu_threads {
                        if !t.is_finished() {
                            // SAFETY: the thread is alive (not finished) and joinable; SIGUSR1
                            // has a no-op handler, so this only interrupts KVM_RUN.
                            unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1) };
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if handler.is_stopped() {
            stopped_at.get_or_insert_with(Instant::now);
        }
        if stopped_at.is_some_and(|t| t.elapsed() > STUCK_GRACE) {
            // A vCPU did not leave KVM_RUN despite the kicks (a kernel that never wakes it).
            // Do not hang the caller: stop the service threads and leak the VM, whose memory
            // the stuck threads may still reference.
            stop.stop();
            let cause = handler.failure().unwrap_or_default();
            std::mem::forget(vm);
            std::mem::forget(alias);
            bail!("{remaining} vCPU thread(s) did not stop after the run failed ({cause})");
        }
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
    if let Some(e) = first_err {
        // Prefer the root cause recorded by a service thread over a vCPU's "stopped".
        return Err(match handler.failure() {
            // The handler's failure is the root cause; what the vCPU saw afterwards is not.
            Some(f) if !f.starts_with("run finished") && !f.contains(&e.to_string()) => {
                anyhow!("{f} (vCPU then stopped: {e:#})")
            }
            _ => e,
        });
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

/// Serves a KVM userfault fd (or anything producing `kvm_userfault_msg` records) until `stop`
/// fires ([`ReaderExit::Stopped`]) or the fd reports end of file because its VM was destroyed
/// ([`ReaderExit::VmGone`], a clean end for a handler process that outlives its VM): io_uring
/// reads striding by the fd's negotiated record size, each batch handed to the handler.
pub fn serve_userfault_fd(
    h: &Handler,
    fd: &UserfaultFd,
    stop: StopSignal,
    depth: usize,
    records_per_read: usize,
) -> Result<ReaderExit> {
    let mut reader =
        AsyncReader::new(fd.as_raw_fd(), fd.msg_size(), depth, records_per_read, stop)?;
    let mut scratch = Scratch::default();
    let mut gpas = Vec::new();
    let exit = reader.run(|batch| {
        let t = Instant::now();
        gpas.clear();
        gpas.extend(batch.iter().map(|r| r.gfn << 12));
        h.handle_gpas(&gpas, t, false, &mut scratch)?;
        Ok(())
    })?;
    if exit == ReaderExit::VmGone {
        tracing::info!(
            fd = fd.as_raw_fd(),
            "userfault fd: VM destroyed, reader stops"
        );
    }
    Ok(exit)
}

/// Serves a userfaultfd until `stop` fires: poll, drain messages in batches, handle.
pub fn serve_uffd(h: &Handler, u: &Uffd, stop: &StopSignal) -> Result<()> {
    let mut msgs = [UffdMsg::default(); 64];
    let mut scratch = Scratch::default();
    let mut gpas = Vec::with_capacity(64);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: u.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two fds we own through a local array.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e).context("poll");
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        loop {
            let n = u.read_msgs(&mut msgs).context("reading userfaultfd")?;
            if n == 0 {
                break;
            }
            let t = Instant::now();
            gpas.clear();
            for m in &msgs[..n] {
                if m.event == UFFD_EVENT_PAGEFAULT {
                    gpas.push(h.host_to_gpa(m.pf_address)?);
                }
            }
            h.handle_gpas(&gpas, t, false, &mut scratch)?;
        }
    }
}

fn vcpu_loop(mut vcpu: VcpuFd, h: &Handler, part: &WorkloadPart, sys_addr: usize) -> Result<()> {
    let _span = tracing::debug_span!("vcpu", id = part.vcpu).entered();
    let mut scratch = Scratch::default();
    loop {
        if h.is_stopped() {
            bail!(
                "vCPU {}: handler stopped: {}",
                part.vcpu,
                h.failure().unwrap_or_default()
            );
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => match port {
                PORT_DONE => return Ok(()),
                PORT_PROGRESS => {
                    let left = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
                    tracing::debug!(vcpu = part.vcpu, pages_left = left, "progress");
                }
                PORT_FAIL => {
                    // SAFETY: the system slot mapping outlives the vCPU threads (joined before
                    // the Vm is dropped); read-only view of its first 2 MiB.
                    let sys = unsafe {
                        std::slice::from_raw_parts(
                            sys_addr as *const u8,
                            guest::SYSTEM_SIZE as usize,
                        )
                    };
                    let off = (guest::MAILBOX_GPA + part.vcpu * guest::MAILBOX_STRIDE) as usize;
                    let w = |i: usize| {
                        u64::from_le_bytes(
                            sys[off + i * 8..off + i * 8 + 8]
                                .try_into()
                                .expect("8 bytes"),
                        )
                    };
                    let m = Mailbox {
                        gpa: w(1),
                        expected: w(2),
                        found: w(3),
                    };
                    bail!(
                        "vCPU {}: guest found wrong contents at gpa {:#x}: expected {:#018x}, found {:#018x}",
                        part.vcpu, m.gpa, m.expected, m.found
                    );
                }
                p => bail!("vCPU {}: unexpected port I/O to {p:#x}", part.vcpu),
            },
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                if flags & KVM_MEMORY_EXIT_FLAG_USERFAULT == 0 {
                    bail!("vCPU {}: memory fault at {gpa:#x} (+{size:#x}) without USERFAULT (flags {flags:#x})", part.vcpu);
                }
                // Exactly one of READ/WRITE/EXEC with the v2 uAPI (none before it).
                let access =
                    Access::from_exit_flags(flags).map_or("unknown-access", Access::as_str);
                tracing::trace!(vcpu = part.vcpu, gpa, access, "userfault exit");
                let t = Instant::now();
                h.handle_gpas(&[gpa], t, true, &mut scratch)
                    .with_context(|| format!("vCPU {} {access} fault at {gpa:#x}", part.vcpu))?;
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                bail!(
                    "vCPU {}: guest shut down (triple fault) near rip {rip:#x}",
                    part.vcpu
                );
            }
            Ok(VcpuExit::Hlt) => bail!("vCPU {}: guest halted before reporting", part.vcpu),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                bail!(
                    "vCPU {}: VM entry failed (reason {reason:#x}, cpu {cpu})",
                    part.vcpu
                )
            }
            Ok(VcpuExit::InternalError) => bail!("vCPU {}: KVM internal error", part.vcpu),
            Ok(other) => bail!("vCPU {}: unexpected exit {other:?}", part.vcpu),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(anyhow!("vCPU {}: KVM_RUN: {e}", part.vcpu)),
        }
    }
}
