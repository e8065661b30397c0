//! End-to-end: a guest whose data memory is demand-filled checks every page.
//!
//! The userfaultfd tests run on a stock KVM; the kvm-sync/kvm-async ones need the KVM
//! userfault series and are `#[ignore]`d (run inside the patched VM by `cargo xtask test`).

use kvm_testvm::caps;
use kvm_userfault::fault::StopSignal;
use kvm_userfault::handler::{Handler, Install, Region as HandlerRegion};
use kvm_userfault::handoff::{recv_handoff, send_handoff, RegionDesc};
use kvm_userfault::ioctls::{FdResolver, UserfaultFd};
use kvm_userfault::serve::serve_userfault_fd;
use kvm_userfault::source::{
    serve, write_snapshot, PageSource, RemoteOptions, RemoteSource, SnapshotSource,
};
use kvm_userfault::uapi::KVM_USERFAULT_FD_FLAG_VCPU_FAULTS;
use kvm_userfault_harness::guest::{fill_pattern_page, WorkloadPart, WorkloadVcpu};
use kvm_userfault_harness::runner::{run_workload, Mode, RunConfig};
use kvm_userfault_harness::vm::{add_data_region, Backing, Region, Vm, SHARED_GUEST_MEMFD};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Duration;

const SEED: u64 = 0xC0FFEE;
/// Where the handoff tests put their data region (RunConfig's default too).
const DATA_GPA: u64 = 1 << 30;

fn snapshot(name: &str, pages: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kuf-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    write_snapshot(&p, pages, |i, b| fill_pattern_page(SEED, i, b)).unwrap();
    p
}

fn image_source(name: &str, pages: u64) -> Arc<dyn PageSource> {
    let path = snapshot(name, pages);
    let src = SnapshotSource::open(&path).unwrap();
    // The open fd keeps the data; do not leave images behind in the temp dir.
    std::fs::remove_file(&path).ok();
    Arc::new(src)
}

fn check(cfg: &RunConfig) {
    let r = run_workload(cfg).unwrap_or_else(|e| panic!("{:?}: {e:#}", cfg.mode));
    eprintln!(
        "{:?}: {} pages in {:?}; {}",
        cfg.mode, r.pages, r.elapsed, r.stats
    );
    assert_eq!(r.pages, cfg.pages);
    if !cfg.prefetch {
        // The guest touched every page and nothing else filled them.
        assert_eq!(r.demand_pages, cfg.pages);
    } else {
        assert_eq!(r.demand_pages + r.prefetched_pages, cfg.pages);
    }
}

#[test]
fn uffd_missing_anon_from_snapshot_every_page_checked() {
    if !caps::kvm_available() {
        return;
    }
    let mut cfg = RunConfig::new(Mode::UffdMissing, image_source("anon.snap", 1024), SEED);
    cfg.vcpus = 2;
    cfg.handler_threads = 2;
    check(&cfg);
}

#[test]
fn uffd_missing_shmem_with_prefetch() {
    if !caps::kvm_available() {
        return;
    }
    let mut cfg = RunConfig::new(Mode::UffdMissing, image_source("shmem.snap", 512), SEED);
    cfg.uffd_backing = Backing::Shmem;
    cfg.prefetch = true;
    check(&cfg);
}

#[test]
fn uffd_minor_shmem_from_snapshot() {
    if !caps::kvm_available() {
        return;
    }
    let cfg = RunConfig::new(Mode::UffdMinor, image_source("minor.snap", 512), SEED);
    check(&cfg);
}

#[test]
fn uffd_missing_from_remote_source_over_loopback() {
    if !caps::kvm_available() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let img = image_source("remote.snap", 512);
    std::thread::spawn(move || serve(l, img));
    let remote = Arc::new(RemoteSource::connect(addr, RemoteOptions::default()).unwrap());
    let mut cfg = RunConfig::new(Mode::UffdMissing, remote, SEED);
    cfg.prefetch = true;
    check(&cfg);
}

#[test]
fn wrong_image_is_detected_by_the_guest() {
    if !caps::kvm_available() {
        return;
    }
    // An image made with another seed: the guest must report the first wrong word.
    let cfg = RunConfig::new(
        Mode::UffdMissing,
        image_source("wrongseed.snap", 64),
        SEED ^ 1,
    );
    let e = format!("{:#}", run_workload(&cfg).unwrap_err());
    assert!(e.contains("wrong contents at gpa 0x40000000"), "{e}");
}

#[test]
fn corrupt_snapshot_page_fails_the_run_cleanly() {
    if !caps::kvm_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let p = snapshot("corrupt.snap", 64);
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    // Flip a byte in the last page.
    f.write_all_at(&[0xAA], len - 100).unwrap();
    let src = Arc::new(SnapshotSource::open(&p).unwrap());
    std::fs::remove_file(&p).ok();
    let mut cfg = RunConfig::new(Mode::UffdMissing, src, SEED);
    cfg.timeout = Duration::from_secs(60);
    let e = format!("{:#}", run_workload(&cfg).unwrap_err());
    assert!(e.contains("page 63 is corrupt"), "{e}");
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_sync_guest_memfd_every_page_checked() {
    if !caps::series_present() {
        return;
    }
    let mut cfg = RunConfig::new(Mode::KvmSync, image_source("sync.snap", 512), SEED);
    cfg.vcpus = 2;
    check(&cfg);
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_guest_memfd_every_page_checked() {
    if !caps::series_present() {
        return;
    }
    let mut cfg = RunConfig::new(Mode::KvmAsync, image_source("async.snap", 512), SEED);
    cfg.vcpus = 2;
    cfg.handler_threads = 2;
    check(&cfg);
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_sync_with_prefetch_races() {
    if !caps::series_present() {
        return;
    }
    let mut cfg = RunConfig::new(Mode::KvmSync, image_source("syncpf.snap", 512), SEED);
    cfg.vcpus = 2;
    cfg.prefetch = true;
    // The generic attribute path, racing prefetch (the other kvm-sync test uses the fd).
    cfg.sync_resolve = kvm_userfault_harness::runner::SyncResolve::Attributes;
    check(&cfg);
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_from_remote_source_over_loopback() {
    if !caps::series_present() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let img = image_source("asyncremote.snap", 512);
    std::thread::spawn(move || serve(l, img));
    let remote = Arc::new(RemoteSource::connect(addr, RemoteOptions::default()).unwrap());
    let mut cfg = RunConfig::new(Mode::KvmAsync, remote, SEED);
    cfg.prefetch = true;
    check(&cfg);
}

/// The VMM's side of the handoff tests: a VM whose guest_memfd data region is all USERFAULT,
/// with a userfault fd (VCPU_FAULTS: the guest's faults are records, not exits).
fn handoff_vm(pages: u64) -> (Vm, Region, UserfaultFd) {
    let mut vm = Vm::new().unwrap();
    let data = add_data_region(&mut vm, DATA_GPA, pages * 4096, SHARED_GUEST_MEMFD).unwrap();
    vm.set_userfault(DATA_GPA, data.size, true).unwrap();
    let ufd = vm
        .create_userfault_fd(KVM_USERFAULT_FD_FLAG_VCPU_FAULTS)
        .unwrap();
    (vm, data, ufd)
}

/// Sends the userfault fd and the data region's guest_memfd over a socket pair, as a VMM hands
/// them to a separate handler process, and closes the VMM's userfault fd; returns the
/// handler's end.
fn hand_off(ufd: UserfaultFd, data: &Region) -> UnixStream {
    let (vmm_sock, handler_sock) = UnixStream::pair().unwrap();
    let gmem = data.fd.as_ref().unwrap().as_raw_fd();
    let region = RegionDesc {
        gpa: data.gpa,
        size: data.size,
        offset: 0,
        fd_index: 0,
    };
    send_handoff(vmm_sock.as_raw_fd(), &ufd, &[gmem], &[region]).unwrap();
    handler_sock
}

/// What a handler that received a handoff did: records re-posted on receipt, pages left
/// missing when it stopped, its counters.
type HandlerEnd = (usize, usize, String);

/// A handler with only what comes over `sock`: it maps the memory itself and serves the fd
/// until `stop`.
fn spawn_handoff_handler(
    sock: UnixStream,
    src: Arc<dyn PageSource>,
    stop: StopSignal,
) -> mpsc::Receiver<HandlerEnd> {
    spawn_reporting(move || {
        let h = recv_handoff(sock.as_raw_fd()).unwrap();
        let mem = h.map(0).unwrap();
        let r = h.regions[0];
        let ufd = Arc::new(h.userfault_fd);
        let region = HandlerRegion {
            gpa: r.gpa,
            size: r.size,
            host: mem.addr(),
            fill_alias: None,
            source_first_page: 0,
        };
        // SAFETY: `mem` is this thread's own mapping of the guest_memfd, which nothing else
        // accesses through a reference, and it is dropped after the handler.
        let handler = unsafe {
            Handler::new(
                vec![region],
                src,
                Install::Direct(Box::new(FdResolver(ufd.clone()))),
            )
        }
        .unwrap();
        serve_userfault_fd(&handler, &ufd, stop, 4, 16).unwrap();
        (h.requeued, handler.missing_pages(), handler.stats.summary())
    })
}

/// Runs `f` on its own thread, which sends what it returns (nothing if it panicked).
fn spawn_reporting<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        tx.send(f()).ok();
    });
    rx
}

/// What `rx`'s thread returned, within `limit` (a hang fails the test instead of blocking it).
fn wait_for<T>(rx: &mpsc::Receiver<T>, limit: Duration, what: &str) -> T {
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: not done within {limit:?} (a lost fault record?)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the thread panicked"),
    }
}

/// Runs the workload guest on `pages` of the data region on its own thread, until it reports
/// DONE (or fails); reports the pages it verified.
fn spawn_workload_vcpu(vm: &mut Vm, pages: u64) -> mpsc::Receiver<Result<u64, String>> {
    let part = WorkloadPart {
        gpa: DATA_GPA,
        pages,
        image_offset: 0,
        seed: SEED,
    };
    let mut vcpu = WorkloadVcpu::new(vm, part).unwrap();
    spawn_reporting(move || {
        vcpu.run_to_end()
            .map(|()| vcpu.verified_pages())
            .map_err(|e| e.to_string())
    })
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_served_by_a_handler_that_only_has_the_handed_off_fds() {
    if !caps::series_present() {
        return;
    }
    let pages = 256u64;
    let src = image_source("handoff.snap", pages);
    // The VMM: VM, memory, attribute, fd; then it hands the fds away and keeps none.
    let (mut vm, data, ufd) = handoff_vm(pages);
    let sock = hand_off(ufd, &data);
    let stop = StopSignal::new().unwrap();
    let handler = spawn_handoff_handler(sock, src, stop.clone());
    let guest = spawn_workload_vcpu(&mut vm, pages);
    let verified = wait_for(&guest, Duration::from_secs(300), "guest");
    assert_eq!(verified, Ok(pages), "the guest checked every page");
    stop.stop();
    let (requeued, missing, stats) = wait_for(&handler, Duration::from_secs(60), "handler");
    assert_eq!(requeued, 0, "a first handler has nothing to re-read");
    assert_eq!(missing, 0);
    eprintln!("handoff: {stats}");
}

/// A handler that crashes after reading a record loses nothing: the next handler receives the
/// handoff, which re-posts the record (`KVM_USERFAULT_REQUEUE`), and the guest completes.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_restarted_handler_gets_the_records_its_predecessor_read() {
    use kvm_userfault::ioctls::ReadStatus;
    use kvm_userfault::uapi::USERFAULT_MSG_SIZE;

    if !caps::series_present() {
        return;
    }
    let pages = 64u64;
    let src = image_source("restart.snap", pages);
    let (mut vm, data, ufd) = handoff_vm(pages);
    assert_eq!(ufd.msg_size(), USERFAULT_MSG_SIZE, "negotiated record size");
    let guest = spawn_workload_vcpu(&mut vm, pages);

    // The first handler reads the vCPU's first fault (blocking read) and dies with it.
    let mut buf = [0u8; 4 * USERFAULT_MSG_SIZE];
    let mut lost = Vec::new();
    assert_eq!(
        ufd.read_records(&mut buf, &mut lost).unwrap(),
        ReadStatus::Records(1)
    );
    assert_eq!(lost[0].gfn, DATA_GPA >> 12, "the guest's first page");

    // The next handler: only what comes over the socket; the record comes back on receipt.
    let sock = hand_off(ufd, &data);
    let stop = StopSignal::new().unwrap();
    let handler = spawn_handoff_handler(sock, src, stop.clone());
    let verified = wait_for(
        &guest,
        Duration::from_secs(300),
        "guest after the handler restart",
    );
    assert_eq!(verified, Ok(pages));
    stop.stop();
    let (requeued, missing, _) = wait_for(&handler, Duration::from_secs(60), "handler");
    assert_eq!(
        requeued, 1,
        "the record the crashed handler read is posted again"
    );
    assert_eq!(missing, 0);
}

/// The userfault fd does not keep the VM alive: when the VMM destroys the VM, a handler still
/// serving the fd stops cleanly (end of file, `ReaderExit::VmGone`), and the fd's ioctls say
/// ENODEV.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_reader_stops_when_the_vm_is_destroyed() {
    use kvm_userfault::fault::ReaderExit;
    use kvm_userfault::handler::NoopResolver;
    use kvm_userfault::ioctls::{ReadStatus, UserfaultError};
    use kvm_userfault::memory::Mapping;
    use kvm_userfault::source::MemorySource;
    use kvm_userfault::uapi::USERFAULT_MSG_SIZE;

    if !caps::series_present() {
        return;
    }
    let mut vm = Vm::new().unwrap();
    vm.add_region(1, 1 << 30, 1 << 20, Backing::Anonymous)
        .unwrap();
    let ufd = Arc::new(vm.create_userfault_fd(0).unwrap());
    let mem = Mapping::new(1 << 20, None).unwrap();
    let region = HandlerRegion {
        gpa: 1 << 30,
        size: 1 << 20,
        host: mem.addr(),
        fill_alias: None,
        source_first_page: 0,
    };
    // SAFETY: the handler writes `mem` only while handling a record, and this VM has no vCPU
    // to fault, so no write can happen after `mem` is dropped; nothing else touches it.
    let handler = Arc::new(
        unsafe {
            Handler::new(
                vec![region],
                Arc::new(MemorySource::new(vec![0u8; 1 << 20]).unwrap()),
                Install::Direct(Box::new(NoopResolver)),
            )
        }
        .unwrap(),
    );
    let stop = StopSignal::new().unwrap();
    let (h, fd, stop2) = (handler.clone(), ufd.clone(), stop.clone());
    let t = spawn_reporting(move || serve_userfault_fd(&h, &fd, stop2, 4, 8));
    drop(vm);
    let exit = wait_for(
        &t,
        Duration::from_secs(30),
        "reader after the VM was destroyed",
    );
    stop.stop();
    assert_eq!(exit.unwrap(), ReaderExit::VmGone);
    drop(handler);
    drop(mem);
    let mut buf = [0u8; USERFAULT_MSG_SIZE];
    let mut out = Vec::new();
    assert_eq!(
        ufd.read_records(&mut buf, &mut out).unwrap(),
        ReadStatus::VmGone
    );
    assert!(matches!(ufd.requeue(), Err(UserfaultError::VmGone { .. })));
    assert_eq!(
        ufd.resolve(1 << 30, 4096).unwrap_err().raw_os_error(),
        Some(libc::ENODEV)
    );
}
