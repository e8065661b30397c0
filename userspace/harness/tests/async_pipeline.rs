//! The kvm-async pipeline on a stock host, against a mock of the kernel side of the uAPI:
//! "vCPU" threads fault on USERFAULT pages, the mock reports each outstanding gfn once as a
//! `kvm_userfault_msg` on a socket (standing in for the userfault fd), sleeps until the gfn is
//! resolved, then reads the page. The runtime's io_uring reader + handler + prefetch serve it.

use kvm_userfault::fault::records::encode_record;
use kvm_userfault::fault::ReaderExit;
use kvm_userfault::fault::StopSignal;
use kvm_userfault::handler::{Handler, Install, Region, Resolver};
use kvm_userfault::ioctls::UserfaultFd;
use kvm_userfault::memory::Mapping;
use kvm_userfault::serve::serve_userfault_fd;
use kvm_userfault::source::MemorySource;
use kvm_userfault::uapi::USERFAULT_MSG_SIZE;
use kvm_userfault::uapi::{
    KVM_USERFAULT_MSG_GUEST, KVM_USERFAULT_MSG_READ, KVM_USERFAULT_MSG_VCPU,
};
use kvm_userfault::PAGE_SIZE;
use kvm_userfault_harness::guest::{fill_pattern_page, pattern_word};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

const GPA: u64 = 1 << 30;
const SEED: u64 = 77;

struct MockKernel {
    /// (USERFAULT attribute, reported-and-unresolved) per page.
    pages: Mutex<Vec<(bool, bool)>>,
    resolved: Condvar,
    fd: Mutex<UnixStream>,
    double_resolves: AtomicU64,
    records: AtomicU64,
}

impl MockKernel {
    /// A guest access from `vcpu`: report once, sleep until resolved.
    fn access(&self, page: usize, vcpu: u32) {
        let mut g = self.pages.lock().unwrap();
        if g[page].0 && !g[page].1 {
            g[page].1 = true;
            let flags = KVM_USERFAULT_MSG_READ | KVM_USERFAULT_MSG_VCPU | KVM_USERFAULT_MSG_GUEST;
            let rec = encode_record((GPA >> 12) + page as u64, flags, vcpu);
            self.fd.lock().unwrap().write_all(&rec).unwrap();
            self.records.fetch_add(1, Ordering::Relaxed);
        }
        while g[page].0 {
            g = self.resolved.wait(g).unwrap();
        }
    }
}

struct MockResolve(Arc<MockKernel>);

impl Resolver for MockResolve {
    fn resolve(&self, gpa: u64, size: u64) -> std::io::Result<()> {
        let first = ((gpa - GPA) / PAGE_SIZE as u64) as usize;
        let mut g = self.0.pages.lock().unwrap();
        for p in first..first + (size / PAGE_SIZE as u64) as usize {
            if !g[p].0 {
                self.0.double_resolves.fetch_add(1, Ordering::Relaxed);
            }
            g[p] = (false, false);
        }
        self.0.resolved.notify_all();
        Ok(())
    }
}

fn setup(pages: usize) -> (Arc<MockKernel>, UserfaultFd, Mapping, Arc<Handler>) {
    let mut img = vec![0u8; pages * PAGE_SIZE];
    for (i, p) in img.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_pattern_page(SEED, i as u64, p);
    }
    let (tx, rx) = UnixStream::pair().unwrap();
    let kernel = Arc::new(MockKernel {
        pages: Mutex::new(vec![(true, false); pages]),
        resolved: Condvar::new(),
        fd: Mutex::new(tx),
        double_resolves: AtomicU64::new(0),
        records: AtomicU64::new(0),
    });
    let mem = Mapping::new(pages * PAGE_SIZE, None).unwrap();
    let region = Region {
        gpa: GPA,
        size: (pages * PAGE_SIZE) as u64,
        host: mem.addr(),
        fill_alias: None,
        source_first_page: 0,
    };
    // SAFETY: `mem` is a fresh anonymous mapping returned with the handler; tests read it only through `Mapping::read` (raw copies), never through a reference.
    let h = unsafe {
        Handler::new(
            vec![region],
            Arc::new(MemorySource::new(img).unwrap()),
            Install::Direct(Box::new(MockResolve(kernel.clone()))),
        )
    }
    .unwrap();
    // The socket stands in for the userfault fd, with the record size KVM would negotiate.
    let rx = UserfaultFd::from_parts(rx.into(), USERFAULT_MSG_SIZE).unwrap();
    (kernel, rx, mem, Arc::new(h))
}

fn run(pages: usize, vcpus: usize, prefetch: bool) {
    let (kernel, rx, mem, h) = setup(pages);
    let stop = StopSignal::new().unwrap();
    std::thread::scope(|s| {
        // Two readers with their own rings on one fd: each record goes to one of them.
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (h, stop, fd) = (h.clone(), stop.clone(), &rx);
                s.spawn(move || serve_userfault_fd(&h, fd, stop, 4, 16))
            })
            .collect();
        if prefetch {
            let h = h.clone();
            s.spawn(move || h.prefetch_all(8));
        }
        let workers: Vec<_> = (0..vcpus)
            .map(|v| {
                let (kernel, mem) = (kernel.clone(), &mem);
                s.spawn(move || {
                    // Interleaved and overlapping: every vCPU touches every page, in its own
                    // order, so duplicate faults on one gfn are common.
                    let mut word = [0u8; 8];
                    for k in 0..pages {
                        let page = (k * (2 * v + 1) + v * 7) % pages;
                        kernel.access(page, v as u32);
                        for off in [0usize, 8, PAGE_SIZE - 8] {
                            mem.read(page * PAGE_SIZE + off, &mut word).unwrap();
                            let o = (page * PAGE_SIZE + off) as u64;
                            assert_eq!(
                                u64::from_le_bytes(word),
                                pattern_word(SEED, o),
                                "page {page}"
                            );
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.stop();
        for r in readers {
            assert_eq!(r.join().unwrap().unwrap(), ReaderExit::Stopped);
        }
    });
    let mut full = vec![0u8; pages * PAGE_SIZE];
    mem.read(0, &mut full).unwrap();
    for (i, p) in full.chunks_exact(PAGE_SIZE).enumerate() {
        let mut want = vec![0u8; PAGE_SIZE];
        fill_pattern_page(SEED, i as u64, &mut want);
        assert_eq!(p, &want[..], "page {i}");
    }
    assert_eq!(h.missing_pages(), 0);
    assert_eq!(
        kernel.double_resolves.load(Ordering::Relaxed),
        0,
        "a gfn was resolved twice"
    );
    let st = &h.stats;
    let filled =
        st.demand_pages.load(Ordering::Relaxed) + st.prefetched_pages.load(Ordering::Relaxed);
    assert_eq!(filled, pages as u64);
    eprintln!(
        "records {} ; {}",
        kernel.records.load(Ordering::Relaxed),
        h.stats
    );
}

#[test]
fn async_pipeline_every_page_once_with_duplicate_faults() {
    run(600, 4, false);
}

#[test]
fn async_pipeline_with_prefetch_racing_faults() {
    run(600, 3, true);
}

#[test]
fn record_for_an_unknown_gfn_is_a_clear_error() {
    let (kernel, rx, _mem, h) = setup(8);
    let rec = encode_record(5, KVM_USERFAULT_MSG_READ, 0);
    kernel.fd.lock().unwrap().write_all(&rec).unwrap();
    let e = serve_userfault_fd(&h, &rx, StopSignal::new().unwrap(), 2, 4).unwrap_err();
    assert!(
        format!("{e:#}").contains("gpa 0x5000, which is outside every demand-paged region"),
        "{e:#}"
    );
}

#[test]
fn end_of_file_stops_the_service_cleanly() {
    // The producer (for the real fd: the VM) goes away with records still unread: they are
    // served, then the reader reports VmGone instead of hanging or spinning.
    let (kernel, rx, mem, h) = setup(8);
    let flags = KVM_USERFAULT_MSG_READ | KVM_USERFAULT_MSG_VCPU | KVM_USERFAULT_MSG_GUEST;
    for p in 0..3u64 {
        let rec = encode_record((GPA >> 12) + p, flags, 0);
        kernel.fd.lock().unwrap().write_all(&rec).unwrap();
    }
    // Closing the mock's write end is end of file for the reader.
    drop(std::mem::replace(
        &mut *kernel.fd.lock().unwrap(),
        UnixStream::pair().unwrap().0,
    ));
    let exit = serve_userfault_fd(&h, &rx, StopSignal::new().unwrap(), 4, 4).unwrap();
    assert_eq!(exit, ReaderExit::VmGone);
    assert_eq!(h.missing_pages(), 5, "the three records were served first");
    let mut word = [0u8; 8];
    mem.read(2 * PAGE_SIZE, &mut word).unwrap();
    assert_eq!(
        u64::from_le_bytes(word),
        pattern_word(SEED, 2 * PAGE_SIZE as u64)
    );
}

/// Counts the pages the server reads.
struct Counting(Arc<MemorySource>, AtomicU64);

impl kvm_userfault::source::PageSource for Counting {
    fn page_count(&self) -> u64 {
        self.0.page_count()
    }
    fn read_page(
        &self,
        index: u64,
        dst: &mut [u8],
    ) -> Result<(), kvm_userfault::source::SourceError> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.read_page(index, dst)
    }
    fn describe(&self) -> String {
        "counting".into()
    }
}

#[test]
fn remote_prefetch_with_lookahead_and_demand_fetches_each_page_once() {
    use kvm_userfault::handler::{NoopResolver, Scratch};
    use kvm_userfault::source::{serve, RemoteOptions, RemoteSource};
    use std::time::Instant;

    let pages = 700usize;
    let mut img = vec![0u8; pages * PAGE_SIZE];
    for (i, p) in img.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_pattern_page(SEED, i as u64, p);
    }
    let image = Arc::new(MemorySource::new(img).unwrap());
    let served = Arc::new(Counting(image.clone(), AtomicU64::new(0)));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let s2 = served.clone();
    std::thread::spawn(move || serve(l, s2));
    let remote = Arc::new(RemoteSource::connect(addr, RemoteOptions::default()).unwrap());
    let mem = Mapping::new(pages * PAGE_SIZE, None).unwrap();
    let region = Region {
        gpa: GPA,
        size: (pages * PAGE_SIZE) as u64,
        host: mem.addr(),
        fill_alias: None,
        source_first_page: 0,
    };
    // SAFETY: `mem` outlives `h` and is read only through `Mapping::read`.
    let h = unsafe {
        Handler::new(
            vec![region],
            remote,
            Install::Direct(Box::new(NoopResolver)),
        )
    }
    .unwrap();
    std::thread::scope(|s| {
        s.spawn(|| h.prefetch_all(16));
        for t in 0..2u64 {
            let h = &h;
            s.spawn(move || {
                let mut scratch = Scratch::default();
                for p in (0..pages as u64).rev().filter(|p| p % 2 == t) {
                    h.handle_gpas(
                        &[GPA + p * PAGE_SIZE as u64],
                        Instant::now(),
                        true,
                        &mut scratch,
                    )
                    .unwrap();
                }
            });
        }
    });
    assert_eq!(h.missing_pages(), 0);
    let mut full = vec![0u8; pages * PAGE_SIZE];
    mem.read(0, &mut full).unwrap();
    assert!(full == image.bytes(), "guest memory differs from the image");
    assert_eq!(
        served.1.load(Ordering::Relaxed),
        pages as u64,
        "each page fetched exactly once"
    );
    eprintln!("{}", h.stats);
}
