//! Mirrors tools/testing/selftests/kvm/demand_paging_test.c, plus the KVM userfault modes the
//! series adds to it (`-k`-style sync exits and the async userfault fd).
//!
//! Each vCPU touches every page of its own partition of the test region (`-o` off); the page
//! contents are supplied on demand by the mode under test and checked twice: the guest checks
//! the first and last word of each page it faults in, and after the run the host checks every
//! word of every page (and the marker the guest wrote). Timing and rates are printed in the C
//! test's format.
//!
//! Knobs (the C test's options, as environment variables because libtest owns the command line):
//! `DEMAND_PAGING_VCPUS` (-v, default 2), `DEMAND_PAGING_BYTES` (-b, per vCPU, default 1M),
//! `DEMAND_PAGING_READERS` (-r, default 1), `DEMAND_PAGING_DELAY_US` (-d, default 0),
//! `DEMAND_PAGING_SINGLE_UFFD=1` (-a); for the THP tests `DEMAND_PAGING_THP_BYTES` (per vCPU,
//! a multiple of 2M, default 2M, at least 4M in all). Defaults are small because the patched
//! kernel runs under QEMU/TCG. Example:
//! `DEMAND_PAGING_VCPUS=8 DEMAND_PAGING_BYTES=64M cargo test --release -p kvm-selftests --test demand_paging -- --nocapture`

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvm_selftests::caps::{env_size, env_u64};
use kvm_selftests::guest::{self, read_u64, write_u64};
use kvm_selftests::mem::{thp_available, HUGE_PAGE_SIZE};
use kvm_selftests::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_EXIT_FLAG_EXEC,
    KVM_MEMORY_EXIT_FLAG_READ, KVM_MEMORY_EXIT_FLAG_USERFAULT, KVM_MEMORY_EXIT_FLAG_WRITE,
    KVM_USERFAULT_FD_FLAG_NONBLOCK, KVM_USERFAULT_FD_FLAG_VCPU_FAULTS,
};
use kvm_selftests::vm::{Region, TEST_GPA};
use kvm_selftests::{
    guest_assert_eq, require_userfault, userfault, Backing, Exit, HostMapping, TestVm, Ucall,
};
use kvm_userfault::fault::uffd::{Uffd, UffdMode, UffdMsg, UFFD_EVENT_PAGEFAULT};

const PAGE: u64 = 4096;
const SEED: u64 = 0x5eed_0bad_c0de_f00d;
const MARK: u64 = 0x6d61_726b_0000_0000;
/// The access bits of a USERFAULT exit; exactly one is set.
const EXIT_ACCESS: u64 =
    KVM_MEMORY_EXIT_FLAG_READ | KVM_MEMORY_EXIT_FLAG_WRITE | KVM_MEMORY_EXIT_FLAG_EXEC;

/// The word at guest physical address `gpa` in the demand-paged "source" image.
#[inline(always)]
fn pattern(gpa: u64) -> u64 {
    gpa ^ SEED
}

/// What the guest writes over the first word of each page it has checked.
#[inline(always)]
fn marker(gpa: u64) -> u64 {
    gpa.wrapping_mul(3) ^ MARK
}

/// `memstress_guest_code()`, reduced to one pass: check the page came in with the right
/// contents, then write to it (the C test writes every page, write_percent = 100).
extern "C" fn guest_code(gva: u64, pages: u64, _: u64, _: u64) {
    let mut i = 0;
    while i < pages {
        let a = gva + i * PAGE;
        // SAFETY: the test region is identity mapped; each access may fault to the handler
        // under test, which is the point.
        unsafe {
            guest_assert_eq!(read_u64(a), pattern(a), a);
            guest_assert_eq!(read_u64(a + PAGE - 8), pattern(a + PAGE - 8), a);
            write_u64(a, marker(a));
        }
        i += 1;
    }
    guest::sync(&[pages]);
}

/// The THP workload: reads every page, one 2 MiB range after the other, each range's pages in
/// a scattered order (page `j * 167 mod 512` of the range at step `j`), so that several pages of
/// a 2 MiB range are read before its other pages are. Checks the first and last word of each
/// page; writes nothing.
extern "C" fn guest_code_thp(gva: u64, pages: u64, _: u64, _: u64) {
    const PER_2M: u64 = 512;
    let mut base = 0;
    while base < pages {
        let mut j = 0;
        while j < PER_2M {
            // 167 is prime, so j -> j * 167 mod 512 visits every page of the range once.
            let a = gva + (base + (j * 167) % PER_2M) * PAGE;
            // SAFETY: the test region is identity mapped; each load may fault to the handler
            // under test.
            unsafe {
                guest_assert_eq!(read_u64(a), pattern(a), a);
                guest_assert_eq!(read_u64(a + PAGE - 8), pattern(a + PAGE - 8), a);
            }
            j += 1;
        }
        base += PER_2M;
    }
    guest::sync(&[pages]);
}

fn fill_page(buf: &mut [u8], gpa: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern(gpa + i as u64 * 8).to_ne_bytes());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    UffdMissing,
    UffdMinor,
    KvmSync,
    KvmAsync,
}

/// What the guest does with its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// `guest_code`: pages in order, check, then write the marker.
    Sequential,
    /// `guest_code_thp`: read-only, 2 MiB range by range in a scattered order.
    Scattered2M,
}

#[derive(Debug, Clone)]
struct Params {
    mode: Mode,
    backing: Backing,
    workload: Workload,
    /// kvm-sync: resolve through a userfault fd (`KVM_USERFAULT_RESOLVE`, fd without
    /// VCPU_FAULTS, as the runtime does by default) instead of `KVM_SET_MEMORY_ATTRIBUTES`.
    sync_resolve_fd: bool,
    vcpus: u64,
    bytes_per_vcpu: u64,
    single_uffd: bool,
    readers: u64,
    delay: Duration,
}

impl Params {
    fn from_env(mode: Mode, backing: Backing) -> Self {
        let p = Params {
            mode,
            backing,
            workload: Workload::Sequential,
            sync_resolve_fd: false,
            vcpus: env_u64("DEMAND_PAGING_VCPUS", 2),
            bytes_per_vcpu: env_size("DEMAND_PAGING_BYTES", 1 << 20),
            single_uffd: env_u64("DEMAND_PAGING_SINGLE_UFFD", 0) != 0,
            readers: env_u64("DEMAND_PAGING_READERS", 1).max(1),
            delay: Duration::from_micros(env_u64("DEMAND_PAGING_DELAY_US", 0)),
        };
        assert!(p.vcpus >= 1, "DEMAND_PAGING_VCPUS must be >= 1");
        assert!(
            p.bytes_per_vcpu >= PAGE && p.bytes_per_vcpu.is_multiple_of(PAGE),
            "DEMAND_PAGING_BYTES must be a non-zero multiple of the page size"
        );
        p
    }
}

/// A non-blocking eventfd used to stop handler threads (uffd_stop_demand_paging()).
fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes only flags.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn signal(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64.
    let r = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    assert_eq!(r, 8, "eventfd write: {}", std::io::Error::last_os_error());
}

/// Waits until `fd` is readable or `stop` is signalled; returns false on stop.
fn wait_readable(fd: RawFd, stop: RawFd) -> Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        ensure!(
            fds[0].revents & (libc::POLLERR | libc::POLLNVAL) == 0,
            "poll revents {:#x}",
            fds[0].revents
        );
        return Ok(true);
    }
}

/// Per-page "already supplied" flags: the same gfn must never be reported twice, and a page
/// must never be filled twice (a second fill would overwrite the guest's marker).
struct Supplied {
    base: u64,
    pages: Vec<AtomicBool>,
}

impl Supplied {
    fn new(base: u64, pages: u64) -> Self {
        Self {
            base,
            pages: (0..pages).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn claim(&self, gpa: u64) -> Result<()> {
        let idx = ((gpa - self.base) / PAGE) as usize;
        let slot = self
            .pages
            .get(idx)
            .with_context(|| format!("fault at gpa {gpa:#x} outside the test region"))?;
        ensure!(
            !slot.swap(true, Ordering::AcqRel),
            "gpa {gpa:#x} was reported again after it was supplied"
        );
        Ok(())
    }
}

/// One uffd reader thread (uffd_handler_thread_fn() + handle_uffd_page_request()), on the
/// runtime's userfaultfd layer (`kvm_userfault::fault::uffd`).
fn uffd_reader(
    uffd: Arc<Uffd>,
    stop: RawFd,
    region: Arc<Region>,
    mode: UffdMode,
    delay: Duration,
) -> Result<u64> {
    let mut buf = vec![0u8; PAGE as usize];
    let mut msgs = [UffdMsg::default(); 16];
    let mut n = 0;
    while wait_readable(uffd.as_raw_fd(), stop)? {
        loop {
            let got = uffd.read_msgs(&mut msgs).context("read(userfaultfd)")?;
            if got == 0 {
                break;
            }
            for msg in &msgs[..got] {
                ensure!(
                    msg.event == UFFD_EVENT_PAGEFAULT,
                    "unexpected uffd event {:#x}",
                    msg.event
                );
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                let addr = msg.pf_address & !(PAGE - 1);
                // EEXIST (another reader installed the page first) comes back as
                // AlreadyMapped, which the C test tolerates too.
                if mode == UffdMode::Missing {
                    let gpa = region.gpa + (addr - region.mapping.addr());
                    fill_page(&mut buf, gpa);
                    // SAFETY: `buf` holds PAGE readable bytes for the duration of the call.
                    unsafe { uffd.copy(addr as usize, buf.as_ptr(), PAGE as usize) }
                        .with_context(|| format!("UFFDIO_COPY at {addr:#x}"))?;
                } else {
                    uffd.cont(addr as usize, PAGE as usize)
                        .with_context(|| format!("UFFDIO_CONTINUE at {addr:#x}"))?;
                }
                n += 1;
            }
        }
    }
    Ok(n)
}

/// A vCPU thread: run to the guest's SYNC; in kvm-sync mode, service USERFAULT exits on the way.
fn vcpu_worker(
    mut vcpu: kvm_selftests::Vcpu,
    vm: Arc<TestVm>,
    region: Arc<Region>,
    supplied: Arc<Supplied>,
    mode: Mode,
    exits: Arc<AtomicU64>,
    resolve_fd: Option<RawFd>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut buf = vec![0u8; PAGE as usize];
    loop {
        match vcpu
            .run()
            .with_context(|| format!("vCPU {}: KVM_RUN", vcpu.id))?
        {
            Exit::MemoryFault { flags, gpa, size } if mode == Mode::KvmSync => {
                ensure!(
                    flags & KVM_MEMORY_EXIT_FLAG_USERFAULT != 0,
                    "memory fault exit without USERFAULT: flags {flags:#x} gpa {gpa:#x}"
                );
                ensure!(
                    size == PAGE && gpa % PAGE == 0,
                    "USERFAULT exit with gpa {gpa:#x} size {size:#x}, expected one aligned page"
                );
                let access = flags & EXIT_ACCESS;
                ensure!(
                    access.count_ones() == 1,
                    "USERFAULT exit at {gpa:#x} names {} of READ/WRITE/EXEC: flags {flags:#x}",
                    access.count_ones()
                );
                supplied.claim(gpa)?;
                fill_page(&mut buf, gpa);
                region.mapping.write((gpa - region.gpa) as usize, &buf);
                match resolve_fd {
                    Some(fd) => userfault::resolve(fd, gpa, PAGE)
                        .with_context(|| format!("KVM_USERFAULT_RESOLVE at {gpa:#x}"))?,
                    None => userfault::clear_userfault(vm.fd(), gpa, PAGE)
                        .with_context(|| format!("clear USERFAULT at {gpa:#x}"))?,
                }
                exits.fetch_add(1, Ordering::Relaxed);
            }
            Exit::Ucall(Ucall::Sync(_)) => return Ok(start.elapsed()),
            Exit::Ucall(Ucall::Assert(m)) => bail!("vCPU {}: {m}", vcpu.id),
            other => bail!("vCPU {}: unexpected exit {other:?}", vcpu.id),
        }
    }
}

/// The async userfault-fd reader: fill each reported page, then resolve it through the fd.
fn kvm_async_reader(
    fd: RawFd,
    stop: RawFd,
    region: Arc<Region>,
    supplied: Arc<Supplied>,
) -> Result<u64> {
    let mut buf = vec![0u8; PAGE as usize];
    let mut n = 0;
    while wait_readable(fd, stop)? {
        let recs = match userfault::read_records(fd, 64) {
            Ok(r) => r,
            Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(e).context("read(userfault fd)"),
        };
        for r in recs {
            let gpa = r.gfn * PAGE;
            supplied.claim(gpa)?;
            fill_page(&mut buf, gpa);
            region.mapping.write((gpa - region.gpa) as usize, &buf);
            userfault::resolve(fd, gpa, PAGE)
                .with_context(|| format!("KVM_USERFAULT_RESOLVE at {gpa:#x}"))?;
            n += 1;
        }
    }
    Ok(n)
}

fn run_test(p: &Params) -> Result<()> {
    let total = p.vcpus * p.bytes_per_vcpu;
    let pages_per_vcpu = p.bytes_per_vcpu / PAGE;
    let mut vm = TestVm::new()?;
    let gpa = TEST_GPA;
    println!(
        "Testing mode {:?}, backing {:?}, {} vCPUs, {} bytes per vCPU",
        p.mode, p.backing, p.vcpus, p.bytes_per_vcpu
    );
    println!("guest physical test memory: [{gpa:#x}, {:#x})", gpa + total);
    vm.add_mapped_region(1, gpa, total, p.backing)?;
    let region = Arc::new(vm.region(1).clone());
    if p.backing == Backing::AnonymousThp {
        // Back every 2 MiB with a (zero) huge page before the guest runs, as a THP-backed
        // destination of a postcopy migration is: touching one byte of each 2 MiB range of a
        // MADV_HUGEPAGE mapping faults in a whole THP. A fault on a USERFAULT gfn must then
        // still be mapped 4K (v1 mapped the whole 2 MiB over pages never fetched).
        for off in (0..total).step_by(HUGE_PAGE_SIZE as usize) {
            region.mapping.write_u64(off as usize, 0);
        }
        let huge = region.mapping.anon_huge_bytes()?;
        ensure!(
            huge >= total,
            "only {huge:#x} of {total:#x} bytes are backed by transparent huge pages: the test \
             would not cover huge mappings (THP settings in /sys/kernel/mm/transparent_hugepage)"
        );
        println!("THP-backed: {} MiB of anonymous huge pages", huge >> 20);
    }

    // Content that must be in place before the guest runs.
    let mut buf = vec![0u8; PAGE as usize];
    match p.mode {
        Mode::None => {
            for pg in 0..total / PAGE {
                fill_page(&mut buf, gpa + pg * PAGE);
                region.mapping.write((pg * PAGE) as usize, &buf);
            }
        }
        Mode::UffdMinor => {
            // prefault_mem(): populate the page cache through the alias, so that the guest's
            // mapping only takes minor faults.
            let alias = region
                .alias
                .as_ref()
                .context("MINOR mode needs a shared backing with an alias")?;
            for pg in 0..total / PAGE {
                fill_page(&mut buf, gpa + pg * PAGE);
                alias.write((pg * PAGE) as usize, &buf);
            }
        }
        _ => {}
    }

    let entry: kvm_selftests::guest::GuestFn = match p.workload {
        Workload::Sequential => guest_code,
        Workload::Scattered2M => {
            ensure!(
                p.bytes_per_vcpu.is_multiple_of(HUGE_PAGE_SIZE),
                "the 2 MiB workload needs a multiple of 2 MiB per vCPU"
            );
            guest_code_thp
        }
    };
    let mut vcpus = Vec::new();
    for i in 0..p.vcpus {
        vcpus.push(vm.add_vcpu_with(entry, &[gpa + i * p.bytes_per_vcpu, pages_per_vcpu])?);
    }

    let stop = eventfd();
    let mut handlers: Vec<std::thread::JoinHandle<Result<u64>>> = Vec::new();
    let supplied = Arc::new(Supplied::new(gpa, total / PAGE));
    let mut ufd: Option<OwnedFd> = None;
    match p.mode {
        Mode::UffdMissing | Mode::UffdMinor => {
            let mode = if p.mode == Mode::UffdMissing {
                UffdMode::Missing
            } else {
                UffdMode::Minor
            };
            let nr = if p.single_uffd { 1 } else { p.vcpus };
            let len = total / nr;
            for i in 0..nr {
                let uffd = Arc::new(Uffd::new()?);
                uffd.register(
                    (region.mapping.addr() + i * len) as usize,
                    len as usize,
                    mode,
                )?;
                for _ in 0..p.readers {
                    let (u, r, s, d) = (uffd.clone(), region.clone(), stop.as_raw_fd(), p.delay);
                    handlers.push(std::thread::spawn(move || uffd_reader(u, s, r, mode, d)));
                }
            }
        }
        Mode::KvmSync => {
            userfault::set_userfault(vm.fd(), gpa, total)
                .context("set USERFAULT on the test region")?;
            if p.sync_resolve_fd {
                // vCPU faults still exit: no VCPU_FAULTS. (This guest makes KVM access none
                // of the test memory itself, so no record is ever posted.)
                let fd = userfault::create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_NONBLOCK)
                    .context("KVM_CREATE_USERFAULT_FD(NONBLOCK)")?;
                ufd = Some(fd);
            }
        }
        Mode::KvmAsync => {
            userfault::set_userfault(vm.fd(), gpa, total)
                .context("set USERFAULT on the test region")?;
            let fd = userfault::create_fd(
                vm.fd(),
                KVM_USERFAULT_FD_FLAG_VCPU_FAULTS | KVM_USERFAULT_FD_FLAG_NONBLOCK,
            )
            .context("KVM_CREATE_USERFAULT_FD(VCPU_FAULTS | NONBLOCK)")?;
            for _ in 0..p.readers {
                let (r, s, sup, raw) = (
                    region.clone(),
                    stop.as_raw_fd(),
                    supplied.clone(),
                    fd.as_raw_fd(),
                );
                handlers.push(std::thread::spawn(move || kvm_async_reader(raw, s, r, sup)));
            }
            ufd = Some(fd);
        }
        Mode::None => {}
    }
    println!("Finished creating vCPUs and starting uffd threads");

    let vm = Arc::new(vm);
    let exits = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let resolve_fd = match p.mode {
        Mode::KvmSync => ufd.as_ref().map(|f| f.as_raw_fd()),
        _ => None,
    };
    let threads: Vec<_> = vcpus
        .into_iter()
        .map(|v| {
            let (vm, r, s, e, mode) = (
                vm.clone(),
                region.clone(),
                supplied.clone(),
                exits.clone(),
                p.mode,
            );
            std::thread::spawn(move || vcpu_worker(v, vm, r, s, mode, e, resolve_fd))
        })
        .collect();
    println!("Started all vCPUs");
    let mut per_vcpu = Vec::new();
    let mut errors = Vec::new();
    for (i, t) in threads.into_iter().enumerate() {
        match t.join().expect("vCPU thread panicked") {
            Ok(d) => per_vcpu.push(d),
            Err(e) => errors.push(format!("vCPU {i}: {e:#}")),
        }
    }
    let elapsed = start.elapsed();
    println!("All vCPU threads joined");
    signal(stop.as_raw_fd());
    let mut handled = 0;
    for h in handlers {
        match h.join().expect("handler thread panicked") {
            Ok(n) => handled += n,
            Err(e) => errors.push(format!("handler: {e:#}")),
        }
    }
    drop(ufd);
    ensure!(
        errors.is_empty(),
        "demand paging failed:\n{}",
        errors.join("\n")
    );

    for (i, d) in per_vcpu.iter().enumerate() {
        println!(
            "vCPU {i} execution time: {}.{:09}s, {:.2} pgs/sec",
            d.as_secs(),
            d.subsec_nanos(),
            pages_per_vcpu as f64 / d.as_secs_f64()
        );
    }
    println!(
        "Total guest execution time:\t{}.{:09}s",
        elapsed.as_secs(),
        elapsed.subsec_nanos()
    );
    let rate = pages_per_vcpu as f64 / elapsed.as_secs_f64();
    println!("Per-vcpu demand paging rate:\t{rate:.6} pgs/sec/vcpu");
    println!(
        "Overall demand paging rate:\t{:.6} pgs/sec",
        rate * p.vcpus as f64
    );

    // Every page was demand paged exactly once by the mode under test...
    let paged = match p.mode {
        Mode::None => None,
        Mode::UffdMissing | Mode::UffdMinor | Mode::KvmAsync => Some(handled),
        Mode::KvmSync => Some(exits.load(Ordering::Relaxed)),
    };
    if let Some(n) = paged {
        // With several readers, a duplicate uffd message for one page is legitimate (the C
        // test tolerates the resulting EEXIST); KVM userfault must report each gfn once.
        let ok = match p.mode {
            Mode::UffdMissing | Mode::UffdMinor => n >= total / PAGE,
            _ => n == total / PAGE,
        };
        ensure!(
            ok,
            "{n} pages demand paged by {:?}, expected {}",
            p.mode,
            total / PAGE
        );
    }
    // ... and holds the source contents plus the guest's marker, word for word.
    let view: &HostMapping = region.alias.as_deref().unwrap_or(&region.mapping);
    for pg in 0..total / PAGE {
        let page_gpa = gpa + pg * PAGE;
        for w in 0..PAGE / 8 {
            let a = page_gpa + w * 8;
            let got = view.read_u64((a - gpa) as usize);
            let marked = w == 0 && p.workload == Workload::Sequential;
            let want = if marked { marker(a) } else { pattern(a) };
            ensure!(
                got == want,
                "gpa {a:#x}: found {got:#x}, expected {want:#x}"
            );
        }
    }
    Ok(())
}

#[test]
fn none_anonymous() {
    run_test(&Params::from_env(Mode::None, Backing::Anonymous)).unwrap();
}

#[test]
fn none_shmem() {
    run_test(&Params::from_env(Mode::None, Backing::Shmem)).unwrap();
}

#[test]
fn uffd_missing_anonymous() {
    run_test(&Params::from_env(Mode::UffdMissing, Backing::Anonymous)).unwrap();
}

#[test]
fn uffd_missing_shmem() {
    run_test(&Params::from_env(Mode::UffdMissing, Backing::Shmem)).unwrap();
}

#[test]
fn uffd_minor_shmem() {
    run_test(&Params::from_env(Mode::UffdMinor, Backing::Shmem)).unwrap();
}

/// `-a -r 2`: one uffd for all vCPUs with two readers (duplicate messages are tolerated).
#[test]
fn uffd_missing_single_uffd_two_readers() {
    let mut p = Params::from_env(Mode::UffdMissing, Backing::Anonymous);
    p.single_uffd = true;
    p.readers = 2;
    run_test(&p).unwrap();
}

fn gmem() -> Backing {
    Backing::GuestMemfd {
        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    }
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_sync_guest_memfd() {
    require_userfault!("demand_paging::kvm_sync_guest_memfd");
    run_test(&Params::from_env(Mode::KvmSync, gmem())).unwrap();
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_sync_anonymous() {
    require_userfault!("demand_paging::kvm_sync_anonymous");
    run_test(&Params::from_env(Mode::KvmSync, Backing::Anonymous)).unwrap();
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_guest_memfd() {
    require_userfault!("demand_paging::kvm_async_guest_memfd");
    run_test(&Params::from_env(Mode::KvmAsync, gmem())).unwrap();
}

/// THP-backed anonymous memory (2 MiB aligned, MADV_HUGEPAGE, pre-faulted huge), USERFAULT on
/// all of it, read 2 MiB range by range in a scattered order: every page must exit exactly once
/// and every word the guest reads must be the page's pattern. A huge mapping installed over
/// pages not yet fetched (v1: after the first resolve in a 2 MiB range) shows up as a guest
/// assertion on a zero word and as missing exits.
fn thp_params(mode: Mode) -> Option<Params> {
    if !thp_available() {
        kvm_selftests::caps::skip(
            &format!("demand_paging::thp {mode:?}"),
            "transparent hugepages are not available",
        );
        return None;
    }
    let mut p = Params::from_env(mode, Backing::AnonymousThp);
    p.workload = Workload::Scattered2M;
    let min_per_vcpu = (4u64 << 20)
        .div_ceil(p.vcpus)
        .next_multiple_of(HUGE_PAGE_SIZE);
    p.bytes_per_vcpu = env_size("DEMAND_PAGING_THP_BYTES", HUGE_PAGE_SIZE).max(min_per_vcpu);
    assert!(
        p.bytes_per_vcpu.is_multiple_of(HUGE_PAGE_SIZE),
        "DEMAND_PAGING_THP_BYTES must be a multiple of 2M"
    );
    Some(p)
}

/// kvm-sync, resolved through the userfault fd (`KVM_USERFAULT_RESOLVE`), as the runtime's
/// kvm-sync mode does by default.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_sync_anonymous_thp() {
    require_userfault!("demand_paging::kvm_sync_anonymous_thp");
    if let Some(mut p) = thp_params(Mode::KvmSync) {
        p.sync_resolve_fd = true;
        run_test(&p).unwrap();
    }
}

/// kvm-sync without a userfault fd, resolved with `KVM_SET_MEMORY_ATTRIBUTES` CLEAR.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_sync_anonymous_thp_attributes() {
    require_userfault!("demand_paging::kvm_sync_anonymous_thp_attributes");
    if let Some(p) = thp_params(Mode::KvmSync) {
        run_test(&p).unwrap();
    }
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_anonymous_thp() {
    require_userfault!("demand_paging::kvm_async_anonymous_thp");
    if let Some(p) = thp_params(Mode::KvmAsync) {
        run_test(&p).unwrap();
    }
}
