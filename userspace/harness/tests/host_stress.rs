//! Host stress on real cores: the guest runs under single-threaded TCG, so real parallelism
//! exists only here, on the host. Two tests, each a series of seeded random rounds until a
//! time budget is spent:
//!
//! - the userfaultfd backend (`Install::UffdCopy` + `serve_uffd`, what `uffd-missing` runs)
//!   under 8 faulting threads on random pages of one shared region: duplicate faults on hot
//!   pages, background prefetch racing the demand faults, 1–3 service threads;
//! - the remote source: one server, several concurrent clients, each with demand threads,
//!   background prefetch and extra prefetch hints in flight.
//!
//! Invariants (checked, not only "no crash"): every word a thread reads is the image's; a word
//! a thread wrote after its page was filled is never overwritten (no page is filled twice);
//! every page is read from the source exactly once per round (uffd) or fetched exactly once
//! per client (remote: the documented guarantee, counted by the server per connection);
//! every page is present at the end and memory equals the image; nothing hangs (a watchdog
//! ends the process if a round overruns).
//!
//! `KVMUF_STRESS_SECS` (default 5) bounds each test, `KVMUF_STRESS_SEED` repeats a run (the
//! seed is printed first; it fixes every round's parameters and access sequences, not the
//! interleaving). Counts are printed at the end (`--nocapture` to see them on success).

use kvm_testvm::rng::Rng;
use kvm_userfault::fault::uffd::{Uffd, UffdMode};
use kvm_userfault::fault::StopSignal;
use kvm_userfault::handler::{Handler, Install, NoopResolver, Region, Scratch};
use kvm_userfault::memory::Mapping;
use kvm_userfault::serve::serve_uffd;
use kvm_userfault::source::{
    serve_connection, MemorySource, PageSource, RemoteOptions, RemoteSource, SourceError, Urgency,
};
use kvm_userfault::PAGE_SIZE;
use kvm_userfault_harness::guest::{fill_pattern_page, pattern_word};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

const GPA: u64 = 1 << 32;
const FAULTING_THREADS: usize = 8;

struct Budget {
    seed: u64,
    deadline: Instant,
}

fn budget(test: &str) -> Budget {
    let secs: f64 = std::env::var("KVMUF_STRESS_SECS")
        .ok()
        .map(|s| s.parse().expect("KVMUF_STRESS_SECS: a number of seconds"))
        .unwrap_or(5.0);
    let seed = std::env::var("KVMUF_STRESS_SEED")
        .ok()
        .map(|s| s.parse().expect("KVMUF_STRESS_SEED: a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {seed} (KVMUF_STRESS_SEED={seed} repeats it), {secs} s");
    Budget {
        seed,
        deadline: Instant::now() + Duration::from_secs_f64(secs),
    }
}

/// Ends the process if a round takes longer than `limit` (a hang would otherwise block the
/// test binary forever): waits on a channel that dropping the guard closes.
struct Watchdog(
    Option<mpsc::Sender<()>>,
    Option<std::thread::JoinHandle<()>>,
);

impl Watchdog {
    fn new(what: String, limit: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("WATCHDOG: {what} still running after {limit:?}: hung");
                std::process::exit(101);
            }
        });
        Self(Some(tx), Some(h))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.take());
        if let Some(h) = self.1.take() {
            h.join().ok();
        }
    }
}

fn image(seed: u64, pages: usize) -> Arc<MemorySource> {
    let mut img = vec![0u8; pages * PAGE_SIZE];
    for (i, p) in img.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_pattern_page(seed, i as u64, p);
    }
    Arc::new(MemorySource::new(img).unwrap())
}

/// A source that counts how often each page was read from it.
struct Counting {
    inner: Arc<MemorySource>,
    reads: Vec<AtomicU32>,
}

impl Counting {
    fn new(inner: Arc<MemorySource>) -> Self {
        let reads = (0..inner.page_count()).map(|_| AtomicU32::new(0)).collect();
        Self { inner, reads }
    }
    fn count(&self, first: u64, n: usize) {
        for i in first..first + n as u64 {
            if let Some(c) = self.reads.get(i as usize) {
                c.fetch_add(1, Relaxed);
            }
        }
    }
    /// Pages not read exactly once: (index, reads).
    fn not_once(&self) -> Vec<(usize, u32)> {
        self.reads
            .iter()
            .map(|c| c.load(Relaxed))
            .enumerate()
            .filter(|&(_, n)| n != 1)
            .collect()
    }
}

impl PageSource for Counting {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }
    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        self.count(index, 1);
        self.inner.read_page(index, dst)
    }
    fn read_pages(&self, first: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        self.count(first, dst.len() / PAGE_SIZE);
        self.inner.read_pages(first, dst)
    }
    fn describe(&self) -> String {
        "counting".into()
    }
}

fn read_word(mem: &Mapping, off: usize) -> u64 {
    let mut w = [0u8; 8];
    mem.read(off, &mut w).unwrap();
    u64::from_le_bytes(w)
}

/// The word a faulting thread writes into word 0 of a page it owns.
fn marker(seed: u64, page: usize) -> u64 {
    !pattern_word(seed, (page * PAGE_SIZE) as u64)
}

#[derive(Default)]
struct UffdTotals {
    rounds: u64,
    per_kind: std::collections::BTreeMap<String, u64>,
    minor_unsupported: bool,
    pages: u64,
    accesses: u64,
    writes: u64,
    faults: u64,
    duplicates: u64,
    already_present: u64,
    demand: u64,
    prefetched: u64,
    installs: u64,
}

#[test]
fn uffd_backend_under_many_faulting_threads() {
    let b = budget("uffd stress");
    if let Err(e) = Uffd::new() {
        eprintln!("SKIP: userfaultfd unavailable here: {e:#}");
        return;
    }
    let mut rng = Rng::new(b.seed);
    let mut t = UffdTotals::default();
    while t.rounds == 0 || Instant::now() < b.deadline {
        uffd_round(&mut rng, &mut t);
    }
    eprintln!(
        "uffd stress: {} rounds {:?}, {} pages, {} accesses ({} writes) by {FAULTING_THREADS} \
         threads; handler: {} faults ({} duplicates, {} already present), {} demand + {} \
         prefetched pages, {} install calls",
        t.rounds,
        t.per_kind,
        t.pages,
        t.accesses,
        t.writes,
        t.faults,
        t.duplicates,
        t.already_present,
        t.demand,
        t.prefetched,
        t.installs
    );
    assert!(t.faults > 0, "no fault was ever served");
}

fn uffd_round(rng: &mut Rng, t: &mut UffdTotals) {
    let round_seed = rng.next_u64();
    let pages = rng.between(16, 1024) as usize;
    let services = rng.between(1, 3) as usize;
    let prefetch = rng.chance(70, 100).then(|| rng.between(1, 64) as usize);
    let hot: Vec<usize> = (0..rng.between(1, 4))
        .map(|_| rng.below(pages as u64) as usize)
        .collect();
    let kind = match rng.below(3) {
        0 => Kind::AnonMissing,
        1 => Kind::ShmemMissing,
        _ if t.minor_unsupported => Kind::ShmemMissing,
        _ => Kind::ShmemMinor,
    };
    let what = format!(
        "uffd round {} (seed {round_seed}, {kind:?}, {pages} pages, {services} service threads, \
         prefetch {prefetch:?})",
        t.rounds
    );
    let _dog = Watchdog::new(what.clone(), Duration::from_secs(120));

    let img = image(round_seed, pages);
    let source = Arc::new(Counting::new(img.clone()));
    let len = pages * PAGE_SIZE;
    let shmem = (kind != Kind::AnonMissing).then(|| memfd(len, kind == Kind::ShmemMinor));
    let mem = Mapping::new(len, shmem.as_ref().map(|f| f.as_raw_fd())).unwrap();
    // MINOR: the handler fills through a second mapping of the same file.
    let alias = (kind == Kind::ShmemMinor)
        .then(|| Mapping::new(len, shmem.as_ref().map(|f| f.as_raw_fd())).unwrap());
    let uffd = Arc::new(Uffd::new().unwrap());
    let mode = match kind {
        Kind::ShmemMinor => UffdMode::Minor,
        _ => UffdMode::Missing,
    };
    if let Err(e) = uffd.register(mem.addr(), len, mode) {
        assert_eq!(kind, Kind::ShmemMinor, "{what}: {e:#}");
        eprintln!("SKIP: userfaultfd MINOR on shmem unsupported here ({e:#}); MISSING only");
        t.minor_unsupported = true;
        return;
    }
    let region = Region {
        gpa: GPA,
        size: len as u64,
        host: mem.addr(),
        fill_alias: alias.as_ref().map(|a| a.addr()),
        source_first_page: 0,
    };
    let install = match kind {
        Kind::ShmemMinor => Install::UffdContinue(uffd.clone()),
        _ => Install::UffdCopy(uffd.clone()),
    };
    // SAFETY: `mem` and `alias` outlive the handler (dropped after it, at the end of this
    // function) and are only accessed through `Mapping::read/write` (raw copies), never
    // through a reference.
    let h = unsafe { Handler::new(vec![region], source.clone(), install) }.unwrap();
    let stop = StopSignal::new().unwrap();
    let start = Barrier::new(FAULTING_THREADS);
    let accesses = AtomicU64::new(0);
    let writes = AtomicU64::new(0);

    std::thread::scope(|s| {
        let svc: Vec<_> = (0..services)
            .map(|_| s.spawn(|| serve_uffd(&h, &uffd, &stop)))
            .collect();
        let pf = prefetch.map(|batch| {
            let h = &h;
            s.spawn(move || h.prefetch_all(batch))
        });
        let workers: Vec<_> = (0..FAULTING_THREADS)
            .map(|w| {
                let mut r =
                    Rng::new(round_seed ^ (w as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
                let (mem, hot, start, accesses, writes, what) =
                    (&mem, &hot, &start, &accesses, &writes, &what);
                s.spawn(move || {
                    // Thread w owns word 0 of pages p with p % threads == w: it writes its
                    // marker there once and checks it on every later visit, so a page filled
                    // a second time (after the write) is caught.
                    let mut written = vec![false; pages];
                    let mut visit = |p: usize, r: &mut Rng| {
                        let off =
                            p * PAGE_SIZE + 8 * r.between(1, PAGE_SIZE as u64 / 8 - 1) as usize;
                        let want = pattern_word(round_seed, off as u64);
                        let got = read_word(mem, off);
                        assert_eq!(got, want, "{what}: thread {w}, page {p}, offset {off:#x}");
                        if p % FAULTING_THREADS == w {
                            let w0 = p * PAGE_SIZE;
                            if written[p] {
                                assert_eq!(
                                    read_word(mem, w0),
                                    marker(round_seed, p),
                                    "{what}: page {p} was filled again after thread {w} wrote it"
                                );
                            } else if r.chance(50, 100) {
                                mem.write(w0, &marker(round_seed, p).to_le_bytes()).unwrap();
                                written[p] = true;
                                writes.fetch_add(1, Relaxed);
                            }
                        }
                        accesses.fetch_add(1, Relaxed);
                    };
                    // Every thread faults on the same hot pages at once: duplicate faults.
                    start.wait();
                    for &p in hot {
                        visit(p, &mut r);
                    }
                    for _ in 0..pages * 2 / FAULTING_THREADS {
                        let p = r.below(pages as u64) as usize;
                        visit(p, &mut r);
                    }
                    // Then every page, from a random starting point.
                    let first = r.below(pages as u64) as usize;
                    for k in 0..pages {
                        visit((first + k) % pages, &mut r);
                    }
                    written
                })
            })
            .collect();
        let written: Vec<Vec<bool>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        if let Some(pf) = pf {
            pf.join().unwrap();
        }
        stop.stop();
        for sv in svc {
            sv.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }

        // Every page present, memory equals the image except the owners' markers.
        assert_eq!(h.missing_pages(), 0, "{what}");
        assert!(h.failure().is_none(), "{what}: {:?}", h.failure());
        let mut full = vec![0u8; pages * PAGE_SIZE];
        mem.read(0, &mut full).unwrap();
        for (p, (got, want)) in full
            .chunks_exact(PAGE_SIZE)
            .zip(img.bytes().chunks_exact(PAGE_SIZE))
            .enumerate()
        {
            let w0 = u64::from_le_bytes(got[..8].try_into().unwrap());
            if written[p % FAULTING_THREADS][p] {
                assert_eq!(w0, marker(round_seed, p), "{what}: page {p}, word 0");
            } else {
                assert_eq!(&got[..8], &want[..8], "{what}: page {p}, word 0");
            }
            assert!(
                got[8..] == want[8..],
                "{what}: page {p} differs from the image"
            );
        }
    });

    let not_once = source.not_once();
    assert!(
        not_once.is_empty(),
        "{what}: pages not read from the source exactly once (page, reads): {:?}",
        &not_once[..not_once.len().min(10)]
    );
    let st = &h.stats;
    let (demand, prefetched) = (
        st.demand_pages.load(Relaxed),
        st.prefetched_pages.load(Relaxed),
    );
    assert_eq!(demand + prefetched, pages as u64, "{what}: {st}");
    if prefetch.is_none() {
        assert_eq!(prefetched, 0, "{what}");
    }
    t.rounds += 1;
    t.pages += pages as u64;
    t.accesses += accesses.load(Relaxed);
    t.writes += writes.load(Relaxed);
    t.faults += st.faults.load(Relaxed);
    t.duplicates += st.duplicate_faults.load(Relaxed);
    t.already_present += st.already_present.load(Relaxed);
    t.demand += demand;
    t.prefetched += prefetched;
    t.installs += st.install_calls.load(Relaxed);
    *t.per_kind.entry(format!("{kind:?}")).or_default() += 1;
    drop(h);
    drop(alias);
    drop(mem);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Anonymous memory, MISSING, UFFDIO_COPY (`uffd-missing`).
    AnonMissing,
    /// A memfd, MISSING, UFFDIO_COPY (`uffd-missing --backing shmem`).
    ShmemMissing,
    /// A fallocated memfd, MINOR, filled through an alias, UFFDIO_CONTINUE (`uffd-minor`).
    ShmemMinor,
}

/// A memfd of `len` bytes; `populate` allocates its (zeroed) pages in the page cache, which
/// MINOR faults need.
fn memfd(len: usize, populate: bool) -> OwnedFd {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; returns a new fd or -1.
    let raw = unsafe { libc::memfd_create(c"kuf-stress".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let size = len as libc::off_t;
    // SAFETY: ftruncate/fallocate on our own memfd.
    let r = unsafe {
        if populate {
            libc::fallocate(fd.as_raw_fd(), 0, 0, size)
        } else {
            libc::ftruncate(fd.as_raw_fd(), size)
        }
    };
    assert_eq!(
        r,
        0,
        "sizing the memfd: {}",
        std::io::Error::last_os_error()
    );
    fd
}

#[derive(Default)]
struct RemoteTotals {
    rounds: u64,
    clients: u64,
    pages: u64,
    demand_calls: u64,
    hints: u64,
    faults: u64,
    duplicates: u64,
    already_present: u64,
    demand: u64,
    prefetched: u64,
    sent: u64,
}

#[test]
fn remote_source_one_server_many_clients() {
    let b = budget("remote stress");
    let mut rng = Rng::new(b.seed);
    let mut t = RemoteTotals::default();
    while t.rounds == 0 || Instant::now() < b.deadline {
        remote_round(&mut rng, &mut t);
    }
    eprintln!(
        "remote stress: {} rounds, {} clients, {} pages fetched (once per client); clients: \
         {} demand calls, {} prefetch hints, {} faults ({} duplicates, {} already present), \
         {} demand + {} prefetched pages; server sent {} pages",
        t.rounds,
        t.clients,
        t.pages,
        t.demand_calls,
        t.hints,
        t.faults,
        t.duplicates,
        t.already_present,
        t.demand,
        t.prefetched,
        t.sent
    );
    assert!(t.sent > 0);
}

fn remote_round(rng: &mut Rng, t: &mut RemoteTotals) {
    let round_seed = rng.next_u64();
    let pages = rng.between(16, 768) as usize;
    let clients = rng.between(2, 4) as usize;
    let what = format!(
        "remote round {} (seed {round_seed}, {pages} pages, {clients} clients)",
        t.rounds
    );
    let _dog = Watchdog::new(what.clone(), Duration::from_secs(120));
    let img = image(round_seed, pages);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Per client: demand threads, prefetch batch (None: no background prefetch), hints.
    let plans: Vec<(usize, Option<usize>, usize, u64)> = (0..clients)
        .map(|_| {
            (
                rng.between(1, 3) as usize,
                rng.chance(75, 100).then(|| rng.between(1, 48) as usize),
                rng.between(0, 32) as usize,
                rng.next_u64(),
            )
        })
        .collect();

    std::thread::scope(|s| {
        // The server: one listener, each connection served on its own thread with its own
        // counting view of the image, so that reads are counted per client.
        let server = {
            let img = img.clone();
            let listener = &listener;
            s.spawn(move || {
                let conns: Vec<_> = (0..clients)
                    .map(|_| {
                        let (stream, _) = listener.accept().unwrap();
                        let counting = Arc::new(Counting::new(img.clone()));
                        let c2 = counting.clone();
                        (
                            counting,
                            std::thread::spawn(move || serve_connection(stream, c2)),
                        )
                    })
                    .collect();
                conns
                    .into_iter()
                    .map(|(c, h)| (c, h.join().unwrap()))
                    .collect::<Vec<_>>()
            })
        };
        let client_threads: Vec<_> = plans
            .iter()
            .enumerate()
            .map(|(c, &(demanders, prefetch, hints, cseed))| {
                let (img, what) = (&img, &what);
                s.spawn(move || {
                    let remote = Arc::new(
                        RemoteSource::connect(
                            addr,
                            RemoteOptions {
                                page_timeout: Duration::from_secs(60),
                                connect_timeout: Duration::from_secs(10),
                            },
                        )
                        .unwrap(),
                    );
                    let mem = Mapping::new(pages * PAGE_SIZE, None).unwrap();
                    let region = Region {
                        gpa: GPA,
                        size: (pages * PAGE_SIZE) as u64,
                        host: mem.addr(),
                        fill_alias: None,
                        source_first_page: 0,
                    };
                    // SAFETY: `mem` outlives the handler (dropped at the end of this closure,
                    // after it) and is only accessed through `Mapping::read` (raw copies).
                    let h = unsafe {
                        Handler::new(
                            vec![region],
                            remote.clone(),
                            Install::Direct(Box::new(NoopResolver)),
                        )
                    }
                    .unwrap();
                    let demand_calls = AtomicU64::new(0);
                    std::thread::scope(|s| {
                        if let Some(batch) = prefetch {
                            let h = &h;
                            s.spawn(move || h.prefetch_all(batch));
                        }
                        // Extra prefetch hints straight to the source, racing everything.
                        let mut hr = Rng::new(cseed ^ 0x5555);
                        let remote2 = remote.clone();
                        s.spawn(move || {
                            for _ in 0..hints {
                                let first = hr.below(pages as u64);
                                let n = hr.between(1, 300).min(pages as u64 - first);
                                let idx: Vec<u64> = (first..first + n).collect();
                                remote2.request(&idx, Urgency::Prefetch);
                                std::thread::yield_now();
                            }
                        });
                        for d in 0..demanders {
                            let (h, mem, demand_calls) = (&h, &mem, &demand_calls);
                            let mut r = Rng::new(cseed ^ (d as u64 + 1).wrapping_mul(0x9E37_79B9));
                            s.spawn(move || {
                                let mut scratch = Scratch::default();
                                let mut page = vec![0u8; PAGE_SIZE];
                                let mut demand = |ps: &[u64]| {
                                    let gpas: Vec<u64> =
                                        ps.iter().map(|&p| GPA + p * PAGE_SIZE as u64).collect();
                                    h.handle_gpas(&gpas, Instant::now(), true, &mut scratch)
                                        .unwrap_or_else(|e| panic!("{what}: client {c}: {e}"));
                                    demand_calls.fetch_add(1, Relaxed);
                                    // With `wait`, every page asked for is present now.
                                    for &p in ps {
                                        let p = p as usize;
                                        mem.read(p * PAGE_SIZE, &mut page).unwrap();
                                        assert!(
                                            page[..] == img.bytes()[p * PAGE_SIZE..][..PAGE_SIZE],
                                            "{what}: client {c}, page {p} differs from the image"
                                        );
                                    }
                                };
                                for _ in 0..pages / 4 {
                                    // A batch of 1..8 random pages, duplicates allowed.
                                    let n = r.between(1, 8) as usize;
                                    let ps: Vec<u64> =
                                        (0..n).map(|_| r.below(pages as u64)).collect();
                                    demand(&ps);
                                }
                                let first = r.below(pages as u64);
                                for k in 0..pages as u64 {
                                    demand(&[(first + k) % pages as u64]);
                                }
                            });
                        }
                    });
                    assert_eq!(h.missing_pages(), 0, "{what}: client {c}");
                    let mut full = vec![0u8; pages * PAGE_SIZE];
                    mem.read(0, &mut full).unwrap();
                    assert!(full == img.bytes(), "{what}: client {c}: memory differs");
                    let st = &h.stats;
                    let counts = [
                        demand_calls.load(Relaxed),
                        hints as u64,
                        st.faults.load(Relaxed),
                        st.duplicate_faults.load(Relaxed),
                        st.already_present.load(Relaxed),
                        st.demand_pages.load(Relaxed),
                        st.prefetched_pages.load(Relaxed),
                    ];
                    assert_eq!(counts[5] + counts[6], pages as u64, "{what}: client {c}");
                    // Dropping the handler and the source closes the connection, which ends
                    // the server's thread for it.
                    drop(h);
                    drop(remote);
                    counts
                })
            })
            .collect();
        for ct in client_threads {
            let c = ct.join().unwrap();
            t.demand_calls += c[0];
            t.hints += c[1];
            t.faults += c[2];
            t.duplicates += c[3];
            t.already_present += c[4];
            t.demand += c[5];
            t.prefetched += c[6];
        }
        for (k, (counting, res)) in server.join().unwrap().into_iter().enumerate() {
            let sent = res.unwrap_or_else(|e| panic!("{what}: connection {k}: {e:#}"));
            assert_eq!(sent, pages as u64, "{what}: connection {k}: pages sent");
            let not_once = counting.not_once();
            assert!(
                not_once.is_empty(),
                "{what}: connection {k}: pages not fetched exactly once (page, reads): {:?}",
                &not_once[..not_once.len().min(10)]
            );
            t.sent += sent;
        }
    });
    t.rounds += 1;
    t.clients += clients as u64;
    t.pages += (pages * clients) as u64;
}
