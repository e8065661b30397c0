//! End-to-end: a guest whose data memory is demand-filled checks every page.
//!
//! The userfaultfd tests run on a stock KVM; the kvm-sync/kvm-async ones need the KVM
//! userfault series and are `#[ignore]`d (run inside the patched VM by `cargo xtask test`).

use kvm_userfault::ioctls::NO_USERFAULT_MSG;
use kvm_userfault::source::{
    serve, write_snapshot, PageSource, RemoteOptions, RemoteSource, SnapshotSource,
};
use kvm_userfault_harness::guest::fill_pattern_page;
use kvm_userfault_harness::runner::{run_workload, Mode, RunConfig};
use kvm_userfault_harness::vm::{add_data_region, Backing, Vm, SHARED_GUEST_MEMFD};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const SEED: u64 = 0xC0FFEE;
const SERIES: &str = "needs the KVM userfault kernel (cargo xtask test)";

fn kvm_available() -> bool {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm not available");
        return false;
    }
    true
}

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
    if !kvm_available() {
        return;
    }
    let mut cfg = RunConfig::new(Mode::UffdMissing, image_source("anon.snap", 1024), SEED);
    cfg.vcpus = 2;
    cfg.handler_threads = 2;
    check(&cfg);
}

#[test]
fn uffd_missing_shmem_with_prefetch() {
    if !kvm_available() {
        return;
    }
    let mut cfg = RunConfig::new(Mode::UffdMissing, image_source("shmem.snap", 512), SEED);
    cfg.uffd_backing = Backing::Shmem;
    cfg.prefetch = true;
    check(&cfg);
}

#[test]
fn uffd_minor_shmem_from_snapshot() {
    if !kvm_available() {
        return;
    }
    let cfg = RunConfig::new(Mode::UffdMinor, image_source("minor.snap", 512), SEED);
    check(&cfg);
}

#[test]
fn uffd_missing_from_remote_source_over_loopback() {
    if !kvm_available() {
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
    if !kvm_available() {
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
    if !kvm_available() {
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

fn series_present() -> bool {
    if !kvm_available() {
        return false;
    }
    match Vm::new().and_then(|vm| Ok(vm.require_userfault()?)) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: {e:#}");
            assert!(e.to_string().contains(NO_USERFAULT_MSG) || !e.to_string().is_empty());
            false
        }
    }
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_sync_guest_memfd_every_page_checked() {
    let _ = SERIES;
    if !series_present() {
        return;
    }
    let mut cfg = RunConfig::new(Mode::KvmSync, image_source("sync.snap", 512), SEED);
    cfg.vcpus = 2;
    check(&cfg);
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_guest_memfd_every_page_checked() {
    if !series_present() {
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
    if !series_present() {
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
    if !series_present() {
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

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_served_by_a_handler_that_only_has_the_handed_off_fds() {
    use kvm_userfault::fault::StopSignal;
    use kvm_userfault::handler::{Handler, Install, Region};
    use kvm_userfault::handoff::{recv_handoff, send_handoff, RegionDesc};
    use kvm_userfault::ioctls::{FdResolver, UserfaultFd};
    use kvm_userfault::serve::serve_userfault_fd;
    use kvm_userfault::uapi::KVM_USERFAULT_FD_FLAG_VCPU_FAULTS;
    use kvm_userfault_harness::guest::{WorkloadPart, WorkloadVcpu};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    if !series_present() {
        return;
    }
    let pages = 256u64;
    let size = pages * 4096;
    let gpa = 1u64 << 30;
    let src = image_source("handoff.snap", pages);

    // The VMM: VM, memory, attribute, fd; then it hands the fds away and keeps none.
    let mut vm = Vm::new().unwrap();
    let data = add_data_region(&mut vm, gpa, size, SHARED_GUEST_MEMFD).unwrap();
    vm.set_userfault(gpa, size, true).unwrap();
    let ufd = vm
        .create_userfault_fd(KVM_USERFAULT_FD_FLAG_VCPU_FAULTS)
        .unwrap();
    let (vmm_sock, handler_sock) = UnixStream::pair().unwrap();
    let gmem = data.fd.as_ref().unwrap().as_raw_fd();
    let region = RegionDesc {
        gpa,
        size,
        offset: 0,
        fd_index: 0,
    };
    send_handoff(vmm_sock.as_raw_fd(), &ufd, &[gmem], &[region]).unwrap();
    drop(ufd);

    // The handler side: only what came over the socket.
    let stop = StopSignal::new().unwrap();
    let stop2 = stop.clone();
    let handler_thread = std::thread::spawn(move || {
        let h = recv_handoff(handler_sock.as_raw_fd()).unwrap();
        assert_eq!(h.requeued, 0, "a first handler has nothing to re-read");
        let mem = h.map(0).unwrap();
        let r = h.regions[0];
        let ufd: Arc<UserfaultFd> = Arc::new(h.userfault_fd);
        let region = Region {
            gpa: r.gpa,
            size: r.size,
            host: mem.addr(),
            fill_alias: None,
            source_first_page: 0,
        };
        // SAFETY: `mem` is the handler's own mapping of the guest_memfd, alive until the end of this closure, after the handler.
        let handler = unsafe {
            Handler::new(
                vec![region],
                src,
                Install::Direct(Box::new(FdResolver(ufd.clone()))),
            )
        }
        .unwrap();
        serve_userfault_fd(&handler, &ufd, stop2, 4, 32).unwrap();
        assert_eq!(handler.missing_pages(), 0);
        handler.stats.summary()
    });

    let part = WorkloadPart {
        gpa,
        pages,
        image_offset: 0,
        seed: SEED,
    };
    let mut vcpu = WorkloadVcpu::new(&mut vm, part).unwrap();
    if let Err(e) = vcpu.run_to_end() {
        panic!("the guest failed: {e}");
    }
    assert_eq!(vcpu.verified_pages(), pages);
    stop.stop();
    eprintln!("handoff: {}", handler_thread.join().unwrap());
}

/// Runs the workload guest on its own thread until it reports DONE (or fails).
fn spawn_workload_vcpu(
    vm: &mut Vm,
    gpa: u64,
    pages: u64,
) -> std::thread::JoinHandle<Result<(), String>> {
    use kvm_userfault_harness::guest::{WorkloadPart, WorkloadVcpu};
    let part = WorkloadPart {
        gpa,
        pages,
        image_offset: 0,
        seed: SEED,
    };
    let mut vcpu = WorkloadVcpu::new(vm, part).unwrap();
    std::thread::spawn(move || vcpu.run_to_end().map_err(|e| e.to_string()))
}

fn join_within<T>(h: std::thread::JoinHandle<T>, limit: Duration, what: &str) -> T {
    let deadline = std::time::Instant::now() + limit;
    while !h.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not done within {limit:?} (a lost fault record?)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    h.join().expect("thread panicked")
}

/// A handler that crashes after reading a record loses nothing: the next handler receives the
/// handoff, which re-posts the record (`KVM_USERFAULT_REQUEUE`), and the guest completes.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_restarted_handler_gets_the_records_its_predecessor_read() {
    use kvm_userfault::fault::StopSignal;
    use kvm_userfault::handler::{Handler, Install, Region};
    use kvm_userfault::handoff::{recv_handoff, send_handoff, RegionDesc};
    use kvm_userfault::ioctls::{FdResolver, ReadStatus};
    use kvm_userfault::serve::serve_userfault_fd;
    use kvm_userfault::uapi::{KVM_USERFAULT_FD_FLAG_VCPU_FAULTS, USERFAULT_MSG_SIZE};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    if !series_present() {
        return;
    }
    let pages = 64u64;
    let (gpa, size) = (1u64 << 30, 64 * 4096);
    let src = image_source("restart.snap", pages);
    let mut vm = Vm::new().unwrap();
    let data = add_data_region(&mut vm, gpa, size, SHARED_GUEST_MEMFD).unwrap();
    vm.set_userfault(gpa, size, true).unwrap();
    let ufd = vm
        .create_userfault_fd(KVM_USERFAULT_FD_FLAG_VCPU_FAULTS)
        .unwrap();
    assert_eq!(ufd.msg_size(), USERFAULT_MSG_SIZE, "negotiated record size");
    let vcpu = spawn_workload_vcpu(&mut vm, gpa, pages);

    // The first handler reads the vCPU's first fault (blocking read) and dies with it.
    let mut buf = [0u8; 4 * USERFAULT_MSG_SIZE];
    let mut lost = Vec::new();
    assert_eq!(
        ufd.read_records(&mut buf, &mut lost).unwrap(),
        ReadStatus::Records(1)
    );
    assert_eq!(lost[0].gfn, gpa >> 12, "the guest's first page");

    // The next handler: only what comes over the socket; the record comes back on receipt.
    let (vmm_sock, handler_sock) = UnixStream::pair().unwrap();
    let gmem = data.fd.as_ref().unwrap().as_raw_fd();
    let region = RegionDesc {
        gpa,
        size,
        offset: 0,
        fd_index: 0,
    };
    send_handoff(vmm_sock.as_raw_fd(), &ufd, &[gmem], &[region]).unwrap();
    drop(ufd);
    let stop = StopSignal::new().unwrap();
    let stop2 = stop.clone();
    let handler = std::thread::spawn(move || {
        let h = recv_handoff(handler_sock.as_raw_fd()).unwrap();
        let requeued = h.requeued;
        let mem = h.map(0).unwrap();
        let ufd = Arc::new(h.userfault_fd);
        let region = Region {
            gpa,
            size,
            host: mem.addr(),
            fill_alias: None,
            source_first_page: 0,
        };
        // SAFETY: `mem` is this thread's mapping of the guest_memfd and outlives the handler.
        let handler = unsafe {
            Handler::new(
                vec![region],
                src,
                Install::Direct(Box::new(FdResolver(ufd.clone()))),
            )
        }
        .unwrap();
        serve_userfault_fd(&handler, &ufd, stop2, 4, 16).unwrap();
        (requeued, handler.missing_pages())
    });
    join_within(
        vcpu,
        Duration::from_secs(300),
        "guest after the handler restart",
    )
    .unwrap();
    stop.stop();
    let (requeued, missing) = join_within(handler, Duration::from_secs(60), "handler");
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
    use kvm_userfault::fault::{ReaderExit, StopSignal};
    use kvm_userfault::handler::{Handler, Install, NoopResolver, Region};
    use kvm_userfault::ioctls::{ReadStatus, UserfaultError};
    use kvm_userfault::memory::Mapping;
    use kvm_userfault::serve::serve_userfault_fd;
    use kvm_userfault::source::MemorySource;
    use kvm_userfault::uapi::USERFAULT_MSG_SIZE;

    if !series_present() {
        return;
    }
    let mut vm = Vm::new().unwrap();
    vm.add_region(1, 1 << 30, 1 << 20, Backing::Anonymous)
        .unwrap();
    let ufd = Arc::new(vm.create_userfault_fd(0).unwrap());
    let mem = Mapping::new(1 << 20, None).unwrap();
    let region = Region {
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
    let t = std::thread::spawn(move || serve_userfault_fd(&h, &fd, stop2, 4, 8));
    drop(vm);
    let exit = join_within(
        t,
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
