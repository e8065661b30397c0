//! The runtime under a dying page source (issue 13): the source fails mid-run — the remote
//! peer drops the connection or its server process is SIGKILLed, the snapshot file is truncated or overwritten while in use, the
//! source starts failing with EIO, a peer sends a corrupt frame — and the run must stop with
//! one clear, typed error, within a bounded time, with every thread released, and without the
//! guest ever reading a wrong or partial page.
//!
//! Every scenario runs the workload guest (which checks every word of every page it reads,
//! in order) through `run_workload` with one vCPU and no prefetch unless said otherwise, the
//! source failing after `K` pages were supplied. That makes the outcome exact: the guest
//! verified pages `0..K` (the count it keeps in guest memory, read when it was stopped), the
//! cause names page `K`, and a wrong page would be a `WrongContents` report, which fails the
//! test as "the guest saw a bad page", distinct from "the guest verified K pages, then was
//! stopped".
//!
//! The host tests use userfaultfd (stock KVM); the kvm-sync/kvm-async variants are the same
//! scenarios and need the KVM userfault series (`cargo xtask test` runs them in the patched
//! guest); the SIGKILLed server process has no such variant (the guest has no CLI binary).

use kvm_testvm::caps;
use kvm_userfault::handler::HandlerError;
use kvm_userfault::source::{
    frame_checksum, serve_connection, write_snapshot, MemorySource, PageSource, RemoteOptions,
    RemoteSource, SnapshotSource, SourceError, Urgency, PROTOCOL_VERSION,
};
use kvm_userfault_harness::guest::fill_pattern_page;
use kvm_userfault_harness::runner::{run_workload, Mode, RunCause, RunConfig, RunError, VcpuEnd};
use kvm_userfault_harness::vm::Backing;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SEED: u64 = 0xC0FFEE;
const PAGE: usize = 4096;
/// Pages in the image (the guest is slow on this host: ~140 pages/s).
const PAGES: u64 = 64;
/// Pages supplied before the source dies.
const K: u64 = 20;
/// Data region base (RunConfig's default).
const DATA_GPA: u64 = 1 << 30;
/// A run that has not returned by then hangs.
const HANG: Duration = Duration::from_secs(90);
/// What "stops promptly" means (generous: the machine is shared with kernel builds).
const PROMPT: Duration = Duration::from_secs(30);
/// The remote page timeout used here.
const PAGE_TIMEOUT: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------

/// The scenarios run one at a time: they check that no runtime thread (`kuf-*`) is left once
/// a run returned.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Threads of this process whose name starts with `kuf-` (every runtime thread).
fn runtime_threads() -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(comm) = std::fs::read_to_string(t.path().join("comm")) {
            if comm.starts_with("kuf-") {
                out.push(comm.trim().to_string());
            }
        }
    }
    out.sort();
    out
}

fn available(mode: Mode) -> bool {
    if mode.needs_series() {
        caps::series_present()
    } else {
        caps::kvm_available()
    }
}

/// Calls `hook` once, just before the source is asked for more than `limit` pages — before the
/// first read that would take it past `limit`, or before a request hint made once `limit`
/// pages were supplied (so that a remote peer is not even asked for a page past the limit) —
/// then forwards every read to `inner`; counts the pages `inner` supplied.
/// The counter is shared so that the test need not hold the source (the run owns it, and
/// dropping it with the run ends its threads).
struct Tap {
    inner: Arc<dyn PageSource>,
    limit: u64,
    asked: AtomicU64,
    supplied: Arc<AtomicU64>,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Tap {
    fn new(inner: Arc<dyn PageSource>, limit: u64, hook: impl FnOnce() + Send + 'static) -> Self {
        Self {
            inner,
            limit,
            asked: AtomicU64::new(0),
            supplied: Arc::new(AtomicU64::new(0)),
            hook: Mutex::new(Some(Box::new(hook))),
        }
    }
    fn counting(inner: Arc<dyn PageSource>) -> Self {
        Self::new(inner, u64::MAX, || {})
    }
    /// The source for the run and the counter of pages it supplied.
    fn split(self) -> (Arc<dyn PageSource>, Arc<AtomicU64>) {
        let n = self.supplied.clone();
        (Arc::new(self), n)
    }
    fn fire(&self) {
        if let Some(h) = self.hook.lock().unwrap().take() {
            h();
        }
    }
    fn read(&self, n: u64, f: impl FnOnce() -> Result<(), SourceError>) -> Result<(), SourceError> {
        if self.asked.fetch_add(n, Ordering::SeqCst) + n > self.limit {
            self.fire();
        }
        f()?;
        self.supplied.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }
}

impl PageSource for Tap {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }
    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        self.read(1, || self.inner.read_page(index, dst))
    }
    fn read_pages(&self, first: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        self.read((dst.len() / PAGE) as u64, || {
            self.inner.read_pages(first, dst)
        })
    }
    fn request(&self, indices: &[u64], urgency: Urgency) {
        if self.supplied.load(Ordering::SeqCst) >= self.limit {
            self.fire();
        }
        self.inner.request(indices, urgency)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The one wrapper-made failure: supplies `limit` pages, then every read scribbles over the
/// buffer (a partial page) and fails with EIO, as a disk going bad would.
struct FailingDisk {
    inner: Arc<dyn PageSource>,
    limit: u64,
    supplied: Arc<AtomicU64>,
}

impl PageSource for FailingDisk {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }
    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        if self.supplied.load(Ordering::SeqCst) >= self.limit {
            self.inner.read_page(index, dst)?;
            dst[PAGE / 2..].fill(0xEE);
            return Err(SourceError::Io {
                index,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.inner.read_page(index, dst)?;
        self.supplied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn describe(&self) -> String {
        format!("failing disk over {}", self.inner.describe())
    }
}

fn snapshot_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kuf-dying-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.snap"));
    write_snapshot(&p, PAGES, |i, b| fill_pattern_page(SEED, i, b)).unwrap();
    p
}

/// Byte offset of page 0's contents in a `PAGES`-page snapshot.
fn data_offset(p: &PathBuf) -> u64 {
    std::fs::metadata(p).unwrap().len() - PAGES * PAGE as u64
}

fn image() -> Arc<MemorySource> {
    let mut data = vec![0u8; PAGES as usize * PAGE];
    for (i, p) in data.chunks_exact_mut(PAGE).enumerate() {
        fill_pattern_page(SEED, i as u64, p);
    }
    Arc::new(MemorySource::new(data).unwrap())
}

fn quick() -> RemoteOptions {
    RemoteOptions {
        page_timeout: PAGE_TIMEOUT,
        connect_timeout: Duration::from_secs(5),
    }
}

fn config(mode: Mode, source: Arc<dyn PageSource>) -> RunConfig {
    let mut cfg = RunConfig::new(mode, source, SEED);
    // Longer than any scenario needs: the run must stop because the source failed.
    cfg.timeout = Duration::from_secs(60);
    cfg
}

/// Runs the workload on its own thread and waits for it with a timeout (a hang fails the
/// test, it never blocks it); checks that no runtime thread outlives the run.
fn run_until_failure(cfg: RunConfig) -> (RunError, Duration) {
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    let th = std::thread::Builder::new()
        .name("test-run".into())
        .spawn(move || {
            // `cfg` (and with it the source) is dropped on this thread before it reports.
            let r = run_workload(&cfg);
            drop(cfg);
            tx.send(r).ok();
        })
        .unwrap();
    let r = match rx.recv_timeout(HANG) {
        Ok(r) => r,
        Err(_) => panic!(
            "run_workload did not return within {HANG:?} (hung); runtime threads: {:?}",
            runtime_threads()
        ),
    };
    let took = t0.elapsed();
    th.join().expect("run thread panicked");
    // The run owned the source: its threads (a remote source's receiver) end with it too.
    assert_eq!(
        runtime_threads(),
        Vec::<String>::new(),
        "runtime threads left behind after the run returned"
    );
    match r {
        Ok(rep) => panic!("the run succeeded although its source died: {rep:?}"),
        Err(e) => {
            eprintln!("run failed after {took:?}: {e}");
            for v in &e.vcpus {
                eprintln!("  {v:?}");
            }
            (e, took)
        }
    }
}

/// A helper thread (server, peer) joined with a timeout: it reports over a channel.
struct Bounded<T> {
    rx: mpsc::Receiver<T>,
    handle: JoinHandle<()>,
    what: &'static str,
}

fn spawn_bounded<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Bounded<T> {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("test-{what}"))
        .spawn(move || {
            tx.send(f()).ok();
        })
        .unwrap();
    Bounded { rx, handle, what }
}

impl<T> Bounded<T> {
    fn join(self) -> T {
        match self.rx.recv_timeout(HANG) {
            Ok(v) => {
                self.handle.join().unwrap();
                v
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{} still running {HANG:?} after the run", self.what)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{} panicked", self.what),
        }
    }
}

/// The checks every scenario shares: no wrong page reached the guest, no vCPU was left in
/// KVM_RUN, the error is one line and came promptly; `verified` is the exact number of pages
/// the (single) guest vCPU must have checked, `supplied` an upper bound over all vCPUs.
fn assert_clean_stop(e: &RunError, took: Duration, supplied: u64, verified: Option<u64>) {
    if let Some((vcpu, m)) = e.wrong_contents() {
        panic!(
            "the guest saw a bad page: vCPU {vcpu} found {:#018x} instead of {:#018x} at gpa {:#x} ({e})",
            m.found, m.expected, m.gpa
        );
    }
    assert!(
        !matches!(e.cause, RunCause::WrongContents { .. }),
        "guest saw a bad page: {e}"
    );
    assert_eq!(e.stuck_vcpus(), 0, "vCPU threads left in KVM_RUN: {e}");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "error is not one line: {msg:?}");
    assert!(took < PROMPT, "the run took {took:?} to stop");
    assert!(!e.vcpus.is_empty());
    let mut total = 0;
    for v in &e.vcpus {
        assert!(
            matches!(
                v.end,
                VcpuEnd::Stopped(_) | VcpuEnd::Failed(_) | VcpuEnd::Done
            ),
            "vCPU {}: {:?}",
            v.vcpu,
            v.end
        );
        assert!(v.verified_pages <= v.pages);
        total += v.verified_pages;
    }
    assert!(
        total <= supplied,
        "the guest verified {total} pages but the source supplied only {supplied}"
    );
    if let Some(n) = verified {
        assert_eq!(e.vcpus.len(), 1);
        assert_eq!(
            e.vcpus[0].verified_pages, n,
            "guest verified pages 0..{} then was stopped; expected 0..{n}",
            e.vcpus[0].verified_pages
        );
        assert_ne!(e.vcpus[0].end, VcpuEnd::Done);
    }
}

/// The cause must be a fill failure of page `page` (if given), whose source error matches.
fn assert_fill_failure(
    e: &RunError,
    page: Option<u64>,
    describe: &str,
    want: impl Fn(&SourceError) -> bool,
) {
    match &e.cause {
        RunCause::Fault(HandlerError::Source { gpa, from, cause }) => {
            if let Some(p) = page {
                assert_eq!(*gpa, DATA_GPA + p * PAGE as u64, "wrong page named: {e}");
                assert!(e.to_string().contains(&format!("{gpa:#x}")), "{e}");
            }
            assert!(from.contains(describe), "source not named: {e}");
            assert!(e.to_string().contains(describe), "source not named: {e}");
            assert!(want(cause), "unexpected source error {cause:?} ({e})");
        }
        other => panic!("expected a page-source failure, got {other:?} ({e})"),
    }
}

// ------------------------------------------------------------------------------------------
// (a) the remote peer drops the connection
// ------------------------------------------------------------------------------------------

/// The project's server (`serve_connection`) on a real socket, which it shuts down when asked
/// for page `K + 1`: the client received exactly `K` pages.
fn dying_server(limit: u64) -> (SocketAddr, Bounded<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = spawn_bounded("server", move || {
        let (s, _) = l.accept().unwrap();
        let kill = s.try_clone().unwrap();
        let src = Arc::new(Tap::new(image(), limit, move || {
            kill.shutdown(Shutdown::Both).unwrap();
        }));
        match serve_connection(s, src) {
            Ok(n) => format!("served {n} pages, then the client left"),
            Err(e) => format!("{e:#}"),
        }
    });
    (addr, h)
}

fn remote_connection_dropped(mode: Mode) {
    if !available(mode) {
        return;
    }
    let _g = serial();
    let (addr, server) = dying_server(K);
    let (client, supplied) =
        Tap::counting(Arc::new(RemoteSource::connect(addr, quick()).unwrap())).split();
    let (e, took) = run_until_failure(config(mode, client));
    eprintln!("server: {}", server.join());
    let supplied = supplied.load(Ordering::SeqCst);
    assert_eq!(
        supplied, K,
        "the client got exactly the pages sent before the drop"
    );
    assert_clean_stop(&e, took, supplied, Some(K));
    assert_fill_failure(
        &e,
        Some(K),
        &addr.to_string(),
        |c| matches!(c, SourceError::Remote(m) if m.to_string().contains(&addr.to_string())),
    );
}

#[test]
fn uffd_remote_connection_dropped_after_k_pages() {
    remote_connection_dropped(Mode::UffdMissing);
}

/// The same drop under load: two vCPUs, two handler threads, background prefetch racing the
/// faults, shmem. Nothing is exact any more, but the guest can only have verified pages the
/// source supplied, and never a wrong one.
#[test]
fn uffd_remote_connection_dropped_with_prefetch_and_two_vcpus() {
    if !caps::kvm_available() {
        return;
    }
    let _g = serial();
    let (addr, server) = dying_server(K);
    let (client, supplied) =
        Tap::counting(Arc::new(RemoteSource::connect(addr, quick()).unwrap())).split();
    let mut cfg = config(Mode::UffdMissing, client);
    cfg.vcpus = 2;
    cfg.handler_threads = 2;
    cfg.prefetch = true;
    cfg.uffd_backing = Backing::Shmem;
    let (e, took) = run_until_failure(cfg);
    eprintln!("server: {}", server.join());
    let supplied = supplied.load(Ordering::SeqCst);
    assert!(supplied <= K, "supplied {supplied}");
    assert_clean_stop(&e, took, supplied, None);
    assert_fill_failure(&e, None, &addr.to_string(), |c| {
        matches!(c, SourceError::Remote(_))
    });
}

/// The CLI's `serve` (a separate process, as a real postcopy source is) on a snapshot of the
/// image; killed and reaped when dropped if nobody killed it before.
struct ServerProcess {
    child: Arc<Mutex<Option<Child>>>,
    addr: SocketAddr,
    /// Kept open so that the server never writes into a closed pipe.
    _stderr: BufReader<ChildStderr>,
}

impl ServerProcess {
    fn start(image: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvm-userfault"))
            .args(["serve", "--listen", "127.0.0.1:0", "--image"])
            .arg(image)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start `kvm-userfault serve`");
        // "serving <source> on 127.0.0.1:PORT", once it listens.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            if stderr.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("`kvm-userfault serve` exited ({status}) before listening");
            }
            if line.starts_with("serving ") {
                break line.trim().rsplit(' ').next().unwrap().parse().unwrap();
            }
        };
        Self {
            child: Arc::new(Mutex::new(Some(child))),
            addr,
            _stderr: stderr,
        }
    }

    /// A closure that SIGKILLs the server and waits until it is gone, recording how it ended.
    fn killer(
        &self,
    ) -> (
        impl FnOnce() + Send + 'static,
        Arc<Mutex<Option<ExitStatus>>>,
    ) {
        let child = self.child.clone();
        let ended = Arc::new(Mutex::new(None));
        let e2 = ended.clone();
        let kill = move || {
            let mut c = child.lock().unwrap().take().expect("server killed twice");
            c.kill().unwrap(); // SIGKILL
            *e2.lock().unwrap() = Some(c.wait().unwrap());
        };
        (kill, ended)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// The page server is a process of its own, SIGKILLed once the runtime got `K` pages from it,
/// before page `K` is even requested (the handler's demand hint comes first; one vCPU, no
/// prefetch, so nothing else is in flight): its sockets are closed by the kernel, no goodbye.
#[test]
fn uffd_remote_server_process_killed_after_k_pages() {
    if !caps::kvm_available() {
        return;
    }
    let _g = serial();
    let path = snapshot_path("served-by-a-process");
    let server = ServerProcess::start(&path);
    let addr = server.addr;
    let (kill, ended) = server.killer();
    let remote: Arc<dyn PageSource> = Arc::new(RemoteSource::connect(addr, quick()).unwrap());
    let (client, supplied) = Tap::new(remote, K, kill).split();
    let (e, took) = run_until_failure(config(Mode::UffdMissing, client));
    std::fs::remove_file(&path).ok();
    let status = ended
        .lock()
        .unwrap()
        .expect("the server was never killed: the run ended before page K");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "server ended {status}"
    );
    let supplied = supplied.load(Ordering::SeqCst);
    assert_eq!(supplied, K, "pages the runtime got before the kill");
    assert_clean_stop(&e, took, supplied, Some(K));
    assert_fill_failure(
        &e,
        Some(K),
        &addr.to_string(),
        |c| matches!(c, SourceError::Remote(m) if m.to_string().contains(&addr.to_string())),
    );
}

// ------------------------------------------------------------------------------------------
// (b) the snapshot file is truncated while in use
// ------------------------------------------------------------------------------------------

/// After `K` pages, the file is cut in the middle of page `K`: that page must never be
/// installed half-read.
fn snapshot_truncated(mode: Mode) {
    if !available(mode) {
        return;
    }
    let _g = serial();
    let path = snapshot_path(&format!("truncated-{mode:?}"));
    let cut = data_offset(&path) + K * PAGE as u64 + PAGE as u64 / 2;
    let snap: Arc<dyn PageSource> = Arc::new(SnapshotSource::open(&path).unwrap());
    let p2 = path.clone();
    let (src, supplied) = Tap::new(snap, K, move || {
        let f = std::fs::OpenOptions::new().write(true).open(&p2).unwrap();
        f.set_len(cut).unwrap();
    })
    .split();
    let (e, took) = run_until_failure(config(mode, src));
    std::fs::remove_file(&path).ok();
    assert_clean_stop(&e, took, supplied.load(Ordering::SeqCst), Some(K));
    assert_fill_failure(&e, Some(K), &path.display().to_string(), |c| {
        matches!(c, SourceError::Io { index: K, source }
            if source.kind() == std::io::ErrorKind::UnexpectedEof)
    });
    let msg = e.to_string();
    assert!(msg.contains(&format!("reading page {K}")), "{msg}");
    assert!(msg.contains("truncated while in use"), "{msg}");
    assert!(
        msg.contains(&format!("the file is now {cut} bytes")),
        "{msg}"
    );
}

#[test]
fn uffd_snapshot_truncated_mid_page_after_k_pages() {
    snapshot_truncated(Mode::UffdMissing);
}

/// UFFDIO_CONTINUE and two vCPUs: the file loses its last 24 pages while the vCPUs run.
/// vCPU 1 (pages 32..64) verifies exactly 32..40 and stops at the first page that is gone;
/// vCPU 0's pages are all still in the file.
#[test]
fn uffd_minor_snapshot_truncated_under_two_vcpus() {
    if !caps::kvm_available() {
        return;
    }
    let _g = serial();
    let path = snapshot_path("truncated-minor");
    let keep = 40u64;
    let cut = data_offset(&path) + keep * PAGE as u64;
    let snap: Arc<dyn PageSource> = Arc::new(SnapshotSource::open(&path).unwrap());
    let p2 = path.clone();
    let (src, supplied) = Tap::new(snap, 4, move || {
        let f = std::fs::OpenOptions::new().write(true).open(&p2).unwrap();
        f.set_len(cut).unwrap();
    })
    .split();
    let mut cfg = config(Mode::UffdMinor, src);
    cfg.vcpus = 2;
    let (e, took) = run_until_failure(cfg);
    std::fs::remove_file(&path).ok();
    assert_clean_stop(&e, took, supplied.load(Ordering::SeqCst), None);
    assert_fill_failure(
        &e,
        Some(keep),
        &path.display().to_string(),
        |c| matches!(c, SourceError::Io { index, .. } if *index == keep),
    );
    assert_eq!(e.vcpus[1].gpa, DATA_GPA + 32 * PAGE as u64);
    assert_eq!(e.vcpus[1].verified_pages, keep - 32, "{:?}", e.vcpus[1]);
}

// ------------------------------------------------------------------------------------------
// (c) the snapshot file becomes unreadable: overwritten in place, or failing with EIO
// ------------------------------------------------------------------------------------------

/// After `K` pages, pages `K..` of the open file are overwritten with another VM's memory (a
/// different seed): a page the runtime installed unchecked would fail the guest's check.
fn snapshot_overwritten(mode: Mode) {
    if !available(mode) {
        return;
    }
    let _g = serial();
    let path = snapshot_path(&format!("overwritten-{mode:?}"));
    let data = data_offset(&path);
    let snap: Arc<dyn PageSource> = Arc::new(SnapshotSource::open(&path).unwrap());
    let p2 = path.clone();
    let (src, supplied) = Tap::new(snap, K, move || {
        let f = std::fs::OpenOptions::new().write(true).open(&p2).unwrap();
        let mut page = vec![0u8; PAGE];
        for i in K..PAGES {
            fill_pattern_page(SEED ^ 0xBAD, i, &mut page);
            f.write_all_at(&page, data + i * PAGE as u64).unwrap();
        }
    })
    .split();
    let (e, took) = run_until_failure(config(mode, src));
    std::fs::remove_file(&path).ok();
    assert_clean_stop(&e, took, supplied.load(Ordering::SeqCst), Some(K));
    assert_fill_failure(&e, Some(K), &path.display().to_string(), |c| {
        matches!(c, SourceError::Corrupt { index: K, .. })
    });
    assert!(
        e.to_string().contains(&format!("page {K} is corrupt")),
        "{e}"
    );
}

#[test]
fn uffd_snapshot_overwritten_in_place_after_k_pages() {
    snapshot_overwritten(Mode::UffdMissing);
}

fn disk_fails_with_eio(mode: Mode) {
    if !available(mode) {
        return;
    }
    let _g = serial();
    let supplied = Arc::new(AtomicU64::new(0));
    let src = Arc::new(FailingDisk {
        inner: image(),
        limit: K,
        supplied: supplied.clone(),
    });
    let (e, took) = run_until_failure(config(mode, src));
    assert_clean_stop(&e, took, supplied.load(Ordering::SeqCst), Some(K));
    assert_fill_failure(
        &e,
        Some(K),
        "failing disk",
        |c| matches!(c, SourceError::Io { index: K, source } if source.raw_os_error() == Some(libc::EIO)),
    );
    assert!(e.to_string().contains("os error 5"), "{e}");
}

#[test]
fn uffd_source_failing_with_eio_after_k_pages() {
    disk_fails_with_eio(Mode::UffdMissing);
}

// ------------------------------------------------------------------------------------------
// (d) a corrupt frame from the peer
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BadFrame {
    /// The page's payload has a flipped byte (the header's checksum is the true one).
    Checksum,
    /// Header and 1000 payload bytes, then the peer closes.
    CutShortThenClose,
    /// Header and 1000 payload bytes, then the peer goes silent (keeps the connection).
    CutShortThenSilent,
    /// 24 bytes of garbage instead of a header.
    Garbage,
    /// A valid frame for a page nobody requested.
    Unrequested,
    /// A header with an undefined status.
    Status,
}

fn frame(index: u64, status: u32, sum: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(24 + payload.len());
    f.extend_from_slice(b"KUFP");
    f.extend_from_slice(&status.to_le_bytes());
    f.extend_from_slice(&index.to_le_bytes());
    f.extend_from_slice(&sum.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// A hand-made peer speaking the wire protocol: answers every requested page correctly until
/// `K` pages were sent, then sends `bad` in place of the next one. Unless the bad frame is
/// the last thing it does, it keeps the connection open (reading) until the client leaves, so
/// that the failure is the frame's, not a disconnect's.
fn bad_peer(bad: BadFrame) -> (SocketAddr, Bounded<()>) {
    let img = image();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = spawn_bounded("peer", move || {
        {
            let (mut s, _) = l.accept().unwrap();
            let mut hello = [0u8; 8];
            s.read_exact(&mut hello).unwrap();
            assert_eq!(&hello[..4], b"KUFR");
            let mut reply = [0u8; 24];
            reply[..4].copy_from_slice(b"KUFR");
            reply[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            reply[8..12].copy_from_slice(&(PAGE as u32).to_le_bytes());
            reply[16..24].copy_from_slice(&PAGES.to_le_bytes());
            s.write_all(&reply).unwrap();
            let mut sent = 0u64;
            let mut req = [0u8; 20];
            while s.read_exact(&mut req).is_ok() {
                assert_eq!(&req[..4], b"KUFQ");
                let count = u32::from_le_bytes(req[8..12].try_into().unwrap()) as u64;
                let first = u64::from_le_bytes(req[12..20].try_into().unwrap());
                for i in first..first + count {
                    let page = &img.bytes()[i as usize * PAGE..][..PAGE];
                    if sent < K {
                        sent += 1;
                        if s.write_all(&frame(i, 0, frame_checksum(i, page), page))
                            .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    let f = match bad {
                        BadFrame::Checksum => {
                            let mut p = page.to_vec();
                            p[1234] ^= 0x40;
                            frame(i, 0, frame_checksum(i, page), &p)
                        }
                        BadFrame::CutShortThenClose | BadFrame::CutShortThenSilent => {
                            frame(i, 0, frame_checksum(i, page), &page[..1000])
                        }
                        BadFrame::Garbage => vec![0xAB; 24],
                        BadFrame::Unrequested => {
                            let j = PAGES - 1;
                            let q = &img.bytes()[j as usize * PAGE..][..PAGE];
                            frame(j, 0, frame_checksum(j, q), q)
                        }
                        BadFrame::Status => frame(i, 7, 0, &[]),
                    };
                    s.write_all(&f).ok();
                    if bad == BadFrame::CutShortThenClose {
                        return;
                    }
                    // Stay connected, answering nothing more, until the client leaves.
                    let mut sink = [0u8; 256];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                    return;
                }
            }
        }
    });
    (addr, h)
}

fn corrupt_frame(mode: Mode, bad: BadFrame) {
    if !available(mode) {
        return;
    }
    let _g = serial();
    let (addr, peer) = bad_peer(bad);
    let (client, supplied) =
        Tap::counting(Arc::new(RemoteSource::connect(addr, quick()).unwrap())).split();
    let (e, took) = run_until_failure(config(mode, client));
    // The run dropped the client, so the peer sees the connection end.
    peer.join();
    let supplied = supplied.load(Ordering::SeqCst);
    assert_eq!(supplied, K);
    assert_clean_stop(&e, took, supplied, Some(K));
    let want = match bad {
        BadFrame::Checksum => format!("page {K} is corrupt"),
        BadFrame::CutShortThenClose => format!("page {K} cut short"),
        BadFrame::CutShortThenSilent => {
            format!("timed out after {PAGE_TIMEOUT:?} waiting for page {K}")
        }
        BadFrame::Garbage => "bad magic".into(),
        BadFrame::Unrequested => format!("page {}, which was never requested", PAGES - 1),
        BadFrame::Status => format!("unknown status 7 for page {K}"),
    };
    assert_fill_failure(
        &e,
        Some(K),
        &addr.to_string(),
        |c| matches!(c, SourceError::Remote(m) if m.to_string().contains(&want)),
    );
    if bad == BadFrame::CutShortThenSilent {
        assert!(
            took >= PAGE_TIMEOUT,
            "failed before the page timeout: {took:?}"
        );
    }
}

#[test]
fn uffd_peer_sends_a_page_with_a_bad_checksum() {
    corrupt_frame(Mode::UffdMissing, BadFrame::Checksum);
}

#[test]
fn uffd_peer_cuts_a_frame_short_and_closes() {
    corrupt_frame(Mode::UffdMissing, BadFrame::CutShortThenClose);
}

#[test]
fn uffd_peer_cuts_a_frame_short_and_goes_silent() {
    corrupt_frame(Mode::UffdMissing, BadFrame::CutShortThenSilent);
}

#[test]
fn uffd_peer_sends_a_garbage_header() {
    corrupt_frame(Mode::UffdMissing, BadFrame::Garbage);
}

#[test]
fn uffd_peer_sends_a_page_never_requested() {
    corrupt_frame(Mode::UffdMissing, BadFrame::Unrequested);
}

#[test]
fn uffd_peer_sends_an_unknown_status() {
    corrupt_frame(Mode::UffdMissing, BadFrame::Status);
}

// ------------------------------------------------------------------------------------------
// The same scenarios through the KVM userfault series (sync exits, async fd)
// ------------------------------------------------------------------------------------------

macro_rules! kvm_variants {
    ($($name:ident => $body:expr;)*) => {$(
        #[test]
        #[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
        fn $name() {
            $body
        }
    )*};
}

kvm_variants! {
    kvm_sync_remote_connection_dropped_after_k_pages => remote_connection_dropped(Mode::KvmSync);
    kvm_async_remote_connection_dropped_after_k_pages => remote_connection_dropped(Mode::KvmAsync);
    kvm_sync_snapshot_truncated_mid_page_after_k_pages => snapshot_truncated(Mode::KvmSync);
    kvm_async_snapshot_truncated_mid_page_after_k_pages => snapshot_truncated(Mode::KvmAsync);
    kvm_sync_snapshot_overwritten_in_place_after_k_pages => snapshot_overwritten(Mode::KvmSync);
    kvm_async_snapshot_overwritten_in_place_after_k_pages => snapshot_overwritten(Mode::KvmAsync);
    kvm_sync_source_failing_with_eio_after_k_pages => disk_fails_with_eio(Mode::KvmSync);
    kvm_async_source_failing_with_eio_after_k_pages => disk_fails_with_eio(Mode::KvmAsync);
    kvm_sync_peer_sends_a_page_with_a_bad_checksum => corrupt_frame(Mode::KvmSync, BadFrame::Checksum);
    kvm_async_peer_sends_a_page_with_a_bad_checksum => corrupt_frame(Mode::KvmAsync, BadFrame::Checksum);
    kvm_sync_peer_cuts_a_frame_short_and_goes_silent => corrupt_frame(Mode::KvmSync, BadFrame::CutShortThenSilent);
    kvm_async_peer_cuts_a_frame_short_and_goes_silent => corrupt_frame(Mode::KvmAsync, BadFrame::CutShortThenSilent);
    kvm_sync_peer_sends_a_page_never_requested => corrupt_frame(Mode::KvmSync, BadFrame::Unrequested);
    kvm_async_peer_sends_a_page_never_requested => corrupt_frame(Mode::KvmAsync, BadFrame::Unrequested);
}
