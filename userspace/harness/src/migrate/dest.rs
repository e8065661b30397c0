//! The migration destination: the same VM with every data page missing, pre-copied pages
//! written as they arrive, the switch-over (clean pages marked present in one pass, vCPUs
//! restored and started at once), post-copy from the source's page server, the guest's
//! verification.

use super::wire::{self, Msg};
use super::{bit, build, install_kick_handler, kick, runs, Layout, PAGE};
use crate::guest::{Event, Mismatch, UNLIMITED};
use crate::runner::Mode;
use crate::vm::{Backing, Vm, DATA_SLOT, SHARED_GUEST_MEMFD};
use anyhow::{anyhow, bail, ensure, Context, Result};
use kvm_userfault::fault::uffd::{Uffd, UffdMode};
use kvm_userfault::fault::{ReaderExit, StopSignal};
use kvm_userfault::handler::{Handler, HandlerError, Install, Region};
use kvm_userfault::ioctls::FdResolver;
use kvm_userfault::serve::{serve_uffd, serve_userfault_fd, ServeError};
use kvm_userfault::source::{RemoteOptions, RemoteSource};
use kvm_userfault::uapi::KVM_USERFAULT_FD_FLAG_VCPU_FAULTS;
use kvm_userfault::{FaultAction, VcpuFaults, PAGE_SIZE};
use nix::sys::mman::{madvise, mprotect, MmapAdvise, ProtFlags};
use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How the destination runs.
#[derive(Debug, Clone)]
pub struct DestConfig {
    /// kvm-sync, kvm-async or uffd-missing.
    pub mode: Mode,
    /// Pages each writer writes after the switch-over before it verifies its part.
    pub post_copy_pages: u64,
    /// Background prefetch of the pages nobody faulted on (demand faults go first).
    pub prefetch: bool,
    /// How long a page may take before the source counts as dead.
    pub page_timeout: Duration,
    /// Give up after this long.
    pub timeout: Duration,
    /// The most the migration channel may stay silent before the switch-over (a source that
    /// hangs instead of dying): then the migration fails with "the source sent nothing".
    pub channel_timeout: Duration,
}

impl DestConfig {
    /// Defaults: 64 pages per writer after the switch-over, prefetch on, 5 s page timeout.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            post_copy_pages: 64,
            prefetch: true,
            page_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(600),
            channel_timeout: Duration::from_secs(60),
        }
    }
}

/// What the destination measured.
#[derive(Debug, Clone)]
pub struct DestReport {
    /// The mode.
    pub mode: Mode,
    /// The layout the source announced.
    pub layout: Layout,
    /// Data pages received during pre-copy (with repeats).
    pub precopy_pages: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Data pages dirty in the final bitmap or never sent: left missing at the switch-over.
    pub missing_at_switchover: u64,
    /// Pages marked present at the switch-over, and in how many ranges.
    pub clean_pages: u64,
    /// Ranges the clean pages formed.
    pub clean_ranges: u64,
    /// System pages received during the stop.
    pub sys_pages_at_switchover: u64,
    /// The source's Stop received → every vCPU restarted here.
    pub downtime: Duration,
    /// Restart → the last missing page arrived (seen by prefetch; without prefetch, when the
    /// guest finished verifying, which touches every page).
    pub post_copy: Duration,
    /// Hello → the guest verified every page.
    pub total: Duration,
    /// Pages filled on demand (faults that waited for the network).
    pub demand_pages: u64,
    /// Pages filled by prefetch.
    pub prefetched_pages: u64,
    /// Fault notifications.
    pub faults: u64,
    /// Fault → page visible, median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Pages the guest verified.
    pub verified_pages: u64,
    /// The runtime's summary line.
    pub stats: String,
}

/// A failed migration on the destination: one line.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    /// Setup, the channel or the switch-over failed.
    #[error("{0:#}")]
    Setup(#[from] anyhow::Error),
    /// Post-copy failed: the first cause (e.g. the source died); no page the source did not
    /// supply was made visible. `verified` pages had been verified by then.
    #[error("post-copy failed: {cause} (guest verified {verified} pages)")]
    PostCopy {
        /// The first failure.
        cause: String,
        /// Pages verified.
        verified: u64,
    },
    /// The guest found a page that does not hold what the source last wrote.
    #[error("vCPU {vcpu}: guest found wrong contents at gpa {:#x}: expected {:#018x}, found {:#018x}", .m.gpa, .m.expected, .m.found)]
    WrongContents {
        /// The vCPU.
        vcpu: usize,
        /// The word.
        m: Mismatch,
    },
}

/// The first failure of the post-copy phase.
struct FirstCause(Mutex<Option<String>>);

impl FirstCause {
    fn record(&self, why: String, h: &Handler) {
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::error!("post-copy failed: {why}");
            h.stop(&why);
            *f = Some(why);
        }
    }
}

/// How one vCPU ended.
enum End {
    Done,
    Wrong(Mismatch),
    Stopped,
}

/// Accepts one source on `listener` and migrates its VM here.
pub fn migrate_dest(cfg: &DestConfig, listener: &TcpListener) -> Result<DestReport, DestError> {
    let (stream, peer) = listener.accept().context("accepting the source")?;
    stream.set_nodelay(true).ok();
    // Until the switch-over the source sends all the time: a silent one is hung, not slow.
    stream
        .set_read_timeout(Some(cfg.channel_timeout))
        .context("setting the migration channel's timeout")?;
    stream
        .set_write_timeout(Some(cfg.channel_timeout))
        .context("setting the migration channel's timeout")?;
    let mut rx = BufReader::with_capacity(1 << 20, stream.try_clone().context("socket")?);
    let mut tx = BufWriter::new(stream);
    let r = run(cfg, &mut rx, peer).map_err(|e| match e.downcast::<DestError>() {
        Ok(d) => d,
        Err(e) => DestError::Setup(e),
    });
    let (ok, message) = match &r {
        Ok(rep) => (true, format!("verified {} pages", rep.verified_pages)),
        Err(e) => (false, e.to_string()),
    };
    // The source waits for this before it stops serving pages.
    if let Err(e) = wire::send(&mut tx, &Msg::Done { ok, message }).and_then(|_| Ok(tx.flush()?)) {
        tracing::warn!("telling the source we are done: {e}");
    }
    r
}

fn run(
    cfg: &DestConfig,
    rx: &mut BufReader<std::net::TcpStream>,
    peer: SocketAddr,
) -> Result<DestReport> {
    install_kick_handler();
    ensure!(
        cfg.mode != Mode::UffdMinor,
        "migration supports kvm-sync, kvm-async and uffd-missing"
    );
    let hello = match wire::recv(rx)? {
        Msg::Hello(h) => h,
        m => bail!("expected the hello, got {m:?}"),
    };
    let t_hello = Instant::now();
    ensure!(
        hello.guest_fn == crate::guest::writer_guest as *const () as u64,
        "the source runs another binary or at another address (writer guest at {:#x}, ours at {:#x}): \
         both sides must run the same executable without address randomisation",
        hello.guest_fn,
        crate::guest::writer_guest as *const () as u64
    );
    let layout = Layout {
        vcpus: hello.vcpus as usize,
        pages: hello.pages,
        data_gpa: hello.data_gpa,
        seed: hello.seed,
        delay: hello.delay,
    };
    let backing = match cfg.mode {
        Mode::KvmSync | Mode::KvmAsync => SHARED_GUEST_MEMFD,
        _ => Backing::Anonymous,
    };
    if cfg.mode.needs_series() {
        // Before building anything: a stock kernel fails with one clear line.
        Vm::new()?.require_userfault()?;
    }
    // The writers' budget is set at the switch-over; until then they would not run anyway.
    let super::Built {
        mut vm,
        data,
        mut writers,
    } = build(&layout, backing, UNLIMITED)?;
    ensure!(
        vm.region(0).size == hello.sys_size,
        "system memory differs: source {:#x}, here {:#x}",
        hello.sys_size,
        vm.region(0).size
    );
    let size = data.size;
    let host = data.mapping.addr() as usize;
    let pages = layout.pages;

    // Every data page missing before anything runs.
    let mut ufd = None;
    let mut uffd = None;
    match cfg.mode {
        Mode::KvmSync | Mode::KvmAsync => {
            vm.set_userfault(layout.data_gpa, size, true)?;
            let flags = if cfg.mode == Mode::KvmAsync {
                KVM_USERFAULT_FD_FLAG_VCPU_FAULTS
            } else {
                // vCPU faults exit; the fd reports KVM's own accesses (see the runner).
                0
            };
            ufd = Some(Arc::new(vm.create_userfault_fd(flags)?));
        }
        _ => {
            let u = Arc::new(Uffd::new().context("userfaultfd")?);
            u.register(host, size as usize, UffdMode::Missing)
                .context("registering the data region")?;
            uffd = Some(u);
        }
    }
    // The page client, connected now so the switch-over does not wait for a handshake.
    let remote = RemoteSource::connect(
        (peer.ip(), hello.page_port),
        RemoteOptions {
            page_timeout: cfg.page_timeout,
            ..RemoteOptions::default()
        },
    )
    .context("connecting to the source's page server")?;

    // Pre-copy: write pages as they arrive. uffd: a page not yet mapped is placed with
    // UFFDIO_COPY, a mapped one overwritten in place; guest_memfd: written through the
    // mapping (USERFAULT stays set, so nothing can read them yet).
    let mut received = vec![false; pages as usize];
    let sys = vm.region(0).clone();
    let sys_pages = sys.size / PAGE;
    let mut precopy_pages = 0;
    let mut rounds = 0;
    let mut sys_at_switch = 0;
    let mut t_stop = None;
    let (states, dirty) = loop {
        match wire::recv(rx)? {
            Msg::Pages {
                slot,
                first,
                data: d,
            } => {
                let n = (d.len() / PAGE_SIZE) as u64;
                let limit = if slot == 0 { sys_pages } else { pages };
                ensure!(
                    slot == 0 || slot == DATA_SLOT,
                    "pages for unknown memslot {slot}"
                );
                ensure!(
                    first.checked_add(n).is_some_and(|e| e <= limit),
                    "pages {first}+{n} beyond memslot {slot} ({limit} pages)"
                );
                if slot == 0 {
                    sys.mapping.write((first * PAGE) as usize, &d);
                    if t_stop.is_some() {
                        sys_at_switch += n;
                    }
                    continue;
                }
                precopy_pages += n;
                for k in 0..n {
                    let p = (first + k) as usize;
                    let page = &d[k as usize * PAGE_SIZE..(k as usize + 1) * PAGE_SIZE];
                    let dst = host + p * PAGE_SIZE;
                    match &uffd {
                        Some(u) if !received[p] => {
                            // SAFETY: `page` is PAGE_SIZE readable bytes.
                            unsafe { u.copy(dst, page.as_ptr(), PAGE_SIZE) }
                                .with_context(|| format!("UFFDIO_COPY of data page {p}"))?;
                        }
                        _ => data.mapping.write(p * PAGE_SIZE, page),
                    }
                    received[p] = true;
                }
            }
            Msg::RoundEnd { .. } => rounds += 1,
            Msg::Stop => t_stop = Some(Instant::now()),
            Msg::SwitchOver { vcpus, dirty } => break (vcpus, dirty),
            m => bail!("unexpected {m:?} during pre-copy"),
        }
    };
    // Downtime starts at the source's stop (its Stop frame is sent just before it kicks).
    let t_stop = t_stop.unwrap_or_else(Instant::now);
    ensure!(
        states.len() == writers.len(),
        "{} vCPU states for {} vCPUs",
        states.len(),
        writers.len()
    );
    ensure!(
        dirty.len() as u64 == pages.div_ceil(64),
        "dirty bitmap of {} words for {pages} pages",
        dirty.len()
    );

    // The switch-over. Pages to fetch: dirty since last sent, or never sent.
    let missing: Vec<bool> = (0..pages)
        .map(|p| bit(&dirty, p) || !received[p as usize])
        .collect();
    if uffd.is_some() {
        // A dirty page already mapped holds stale contents: unmap it, so that the guest's
        // first access faults (anonymous memory: MADV_DONTNEED makes it missing again).
        let stale = (0..pages as usize).map(|p| received[p] && missing[p]);
        for r in runs(stale) {
            let ptr = NonNull::new((host + r.start as usize * PAGE_SIZE) as *mut libc::c_void)
                .context("null data mapping")?;
            // SAFETY: a range of the data region's mapping, which no Rust reference points
            // at; its pages become missing again and are filled by the handler.
            unsafe {
                madvise(
                    ptr,
                    ((r.end - r.start) * PAGE) as usize,
                    MmapAdvise::MADV_DONTNEED,
                )
            }
            .context("MADV_DONTNEED of stale pages")?;
        }
    }
    let install = match (&ufd, &uffd) {
        (Some(fd), _) => Install::Direct(Box::new(FdResolver(fd.clone()))),
        (None, Some(u)) => Install::UffdCopy(u.clone()),
        (None, None) => unreachable!("one protection per mode"),
    };
    let region = Region {
        gpa: layout.data_gpa,
        size,
        host,
        fill_alias: None,
        source_first_page: 0,
    };
    // SAFETY: `host` is the data region's mapping, `size` bytes, which no Rust reference
    // points at; `data` shares its ownership and is held until every thread using the handler
    // was joined.
    let handler = Arc::new(
        unsafe { Handler::new(vec![region], Arc::new(remote), install) }
            .map_err(anyhow::Error::from)?,
    );
    // One pass over the clean ranges: visible (USERFAULT cleared) and present in the state.
    let clean = runs(missing.iter().map(|m| !m));
    let mut clean_pages = 0;
    for r in &clean {
        let (gpa, len) = (layout.data_gpa + r.start * PAGE, (r.end - r.start) * PAGE);
        if ufd.is_some() {
            vm.set_userfault(gpa, len, false)?;
        }
        clean_pages += handler.mark_present(gpa, len)? as u64;
    }
    for (w, s) in writers.iter().zip(&states) {
        s.restore(w.vcpu().fd())
            .with_context(|| format!("restoring vCPU {}", w.vcpu().id))?;
        w.set_budget(cfg.post_copy_pages);
    }

    // Post-copy: service threads, prefetch, then the vCPUs.
    let stop = StopSignal::new().context("stop signal")?;
    let causes = Arc::new(FirstCause(Mutex::new(None)));
    let mut service = Vec::new();
    if let Some(fd) = &ufd {
        let (h, fd, stop, c) = (handler.clone(), fd.clone(), stop.clone(), causes.clone());
        service.push(
            std::thread::Builder::new()
                .name("mig-async".into())
                .spawn(move || match serve_userfault_fd(&h, &fd, stop, 8, 64) {
                    Ok(ReaderExit::Stopped) => {}
                    Ok(ReaderExit::VmGone) => c.record("the VM was destroyed".into(), &h),
                    Err(ServeError::Handler(HandlerError::Stopped(_))) => {}
                    Err(e) => c.record(format!("userfault fd reader: {e}"), &h),
                })
                .context("spawning the reader")?,
        );
    }
    if let Some(u) = &uffd {
        let (h, u, stop, c) = (handler.clone(), u.clone(), stop.clone(), causes.clone());
        service.push(
            std::thread::Builder::new()
                .name("mig-uffd".into())
                .spawn(move || match serve_uffd(&h, &u, &stop) {
                    Ok(()) | Err(ServeError::Handler(HandlerError::Stopped(_))) => {}
                    Err(e) => c.record(format!("userfaultfd handler: {e}"), &h),
                })
                .context("spawning the uffd handler")?,
        );
    }
    let post_copy_done = Arc::new(Mutex::new(None::<Instant>));
    if cfg.prefetch {
        let (h, c, d) = (handler.clone(), causes.clone(), post_copy_done.clone());
        service.push(
            std::thread::Builder::new()
                .name("mig-prefetch".into())
                .spawn(move || match h.prefetch_until_done(32) {
                    Ok(()) if h.missing_pages() == 0 => {
                        *d.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                    }
                    Ok(()) => {}
                    Err(e) => c.record(e.to_string(), &h),
                })
                .context("spawning prefetch")?,
        );
    }
    let (tx, outcomes) = mpsc::channel::<(usize, End)>();
    let mut vcpus = Vec::new();
    let progress: Vec<_> = writers
        .iter()
        .map(|w| (w.block_gpa(), w.part().pages))
        .collect();
    let t_start = Instant::now();
    for (i, mut w) in writers.drain(..).enumerate() {
        let (h, c, tx) = (handler.clone(), causes.clone(), tx.clone());
        vcpus.push(std::thread::Builder::new().name(format!("mig-vcpu{i}")).spawn(move || {
            let mut faults = VcpuFaults::new(h.clone());
            let end = loop {
                if h.is_stopped() {
                    break End::Stopped;
                }
                match w.step() {
                    Ok(Event::Done) => break End::Done,
                    Ok(Event::Interrupted) | Ok(Event::Progress { .. }) => {}
                    Ok(Event::Mismatch(m)) => {
                        c.record(format!("vCPU {i}: wrong contents at {:#x}", m.gpa), &h);
                        break End::Wrong(m);
                    }
                    Ok(Event::MemoryFault { flags, gpa, size }) => {
                        match faults.on_memory_fault(flags, gpa, size) {
                            Ok(FaultAction::Retry) => {}
                            Ok(FaultAction::NotUserfault) => {
                                c.record(format!("vCPU {i}: memory fault at {gpa:#x} without USERFAULT"), &h);
                                break End::Stopped;
                            }
                            Err(HandlerError::Stopped(_)) => break End::Stopped,
                            Err(e) => {
                                c.record(e.to_string(), &h);
                                break End::Stopped;
                            }
                        }
                    }
                    Err(e) => {
                        if !h.is_stopped() {
                            c.record(format!("vCPU {i}: {e}"), &h);
                        }
                        break End::Stopped;
                    }
                }
            };
            tx.send((i, end)).ok();
            w.verified_pages()
        }).context("spawning a vCPU")?);
    }
    drop(tx);
    // Downtime ends once every vCPU thread is running (all spawned).
    let downtime = Instant::now().saturating_duration_since(t_stop);

    // Wait for the guest; on a failure, the runtime's stop order: kick the vCPUs, and after
    // a grace period release the waiters a signal cannot reach without filling (uffd: the
    // region PROT_NONE, then wake: their retry fails; KVM: delete the data memslot).
    let mut ends: Vec<Option<End>> = (0..vcpus.len()).map(|_| None).collect();
    let mut left = vcpus.len();
    let mut stopped_at = None;
    let mut released = false;
    let deadline = t_start + cfg.timeout;
    while left > 0 {
        match outcomes.recv_timeout(Duration::from_millis(20)) {
            Ok((i, e)) => {
                ends[i] = Some(e);
                left -= 1;
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !handler.is_stopped() && Instant::now() > deadline {
            causes.record(format!("timed out after {:?}", cfg.timeout), &handler);
        }
        if !handler.is_stopped() {
            continue;
        }
        let since = *stopped_at.get_or_insert_with(Instant::now);
        vcpus.iter().for_each(kick);
        if !released && since.elapsed() >= Duration::from_millis(200) {
            released = true;
            match &uffd {
                Some(u) => {
                    if let Some(ptr) = NonNull::new(host as *mut libc::c_void) {
                        // SAFETY: the data region's mapping, no Rust reference to it; the
                        // handler is stopped and nothing reads it afterwards.
                        if unsafe { mprotect(ptr, size as usize, ProtFlags::PROT_NONE) }.is_ok() {
                            u.wake(host, size as usize).ok();
                        }
                    }
                }
                None => {
                    if let Err(e) = vm.remove_region(DATA_SLOT) {
                        tracing::error!("deleting the data memslot: {e:#}");
                    }
                }
            }
        }
        if since.elapsed() > Duration::from_secs(10) {
            // A vCPU that never leaves KVM_RUN: do not hang, and do not unmap what its
            // threads may still use (as the runner: the VM, the memory and the fds leak).
            stop.stop();
            std::mem::forget(data);
            std::mem::forget(vm);
            std::mem::forget(ufd);
            std::mem::forget(uffd);
            std::mem::forget(service);
            std::mem::forget(vcpus);
            let cause = causes.0.lock().unwrap_or_else(|e| e.into_inner()).take();
            bail!(
                "{}; vCPUs did not stop 10 s after it (the VM and its fds were leaked)",
                cause.unwrap_or_else(|| "post-copy failed".into())
            );
        }
    }
    let guest_done = t_start.elapsed();
    let mut verified = 0;
    for t in vcpus {
        verified += t.join().map_err(|_| anyhow!("vCPU thread panicked"))?;
    }
    let total = t_hello.elapsed();
    handler.stop("migration finished");
    stop.stop();
    for t in service {
        t.join().map_err(|_| anyhow!("service thread panicked"))?;
    }
    let wrong = ends.iter().enumerate().find_map(|(i, e)| match e {
        Some(End::Wrong(m)) => Some((i, *m)),
        _ => None,
    });
    if let Some((vcpu, m)) = wrong {
        return Err(DestError::WrongContents { vcpu, m }.into());
    }
    if let Some(cause) = causes.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(DestError::PostCopy { cause, verified }.into());
    }
    if ends.iter().any(|e| !matches!(e, Some(End::Done))) {
        return Err(DestError::PostCopy {
            cause: "a vCPU ended without verifying its part".into(),
            verified,
        }
        .into());
    }
    let expected: u64 = progress.iter().map(|p| p.1).sum();
    if verified != expected {
        bail!("the guest verified {verified} of {expected} pages");
    }
    let st = &handler.stats;
    let post_copy = post_copy_done
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map_or(guest_done, |t| t.saturating_duration_since(t_start));
    Ok(DestReport {
        mode: cfg.mode,
        layout,
        precopy_pages,
        rounds,
        missing_at_switchover: missing.iter().filter(|m| **m).count() as u64,
        clean_pages,
        clean_ranges: clean.len() as u64,
        sys_pages_at_switchover: sys_at_switch,
        downtime,
        post_copy,
        total,
        demand_pages: st.demand_pages.load(Relaxed),
        prefetched_pages: st.prefetched_pages.load(Relaxed),
        faults: st.faults.load(Relaxed),
        p50: st.latency.quantile(0.5),
        p99: st.latency.quantile(0.99),
        verified_pages: verified,
        stats: st.summary(),
    })
}
