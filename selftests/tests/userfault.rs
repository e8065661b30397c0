//! The KVM userfault series, case by case: what kernel-patches/ promises (issue 3) under the
//! contract in docs/uapi.md. Mirrors the series' C `userfault_test`.
//!
//! Every test needs the patched kernel, so all are ignored; forced on a kernel without the
//! series (`cargo test -- --ignored`) each fails with one line saying so (`KVMUF_ALLOW_SKIP=1`
//! makes them skip instead; docs/selftests.md).
//!
//! How the two kinds of fault are provoked:
//! - a *vCPU* fault: the guest loads or stores a USERFAULT gfn (a stage-2 fault);
//! - a *KVM* access: the guest runs `rep outsb` from a USERFAULT gfn; string port I/O is
//!   emulated by KVM, whose x86 emulator reads the source bytes itself.
//!
//! Tests synchronise on state, never on time: a task is known to be asleep on a gfn when its
//! `/proc/self/task/<tid>/wchan` names `kvm_userfault_wait`, a record is known to be posted when
//! the fd polls readable. `KVM_SELFTESTS_TIMEOUT_SECS` (default 120) bounds every such wait, so
//! a lost wake-up is a failure with a message, not a hung test run.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use kvm_selftests::caps::{env_u64, skip};
use kvm_selftests::guest::{self, read_u64, write_u64};
use kvm_selftests::uapi::{
    kvm_create_userfault_fd, kvm_userfault_msg, kvm_userfault_range, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_USERFAULT,
    KVM_CAP_USERFAULT_FD_FLAGS, KVM_CAP_VM_TYPES, KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR,
    KVM_MEMORY_ATTRIBUTES_FLAG_SET, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_ATTRIBUTE_USERFAULT,
    KVM_MEMORY_EXIT_FLAG_EXEC, KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_MEMORY_EXIT_FLAG_READ,
    KVM_MEMORY_EXIT_FLAG_USERFAULT, KVM_MEMORY_EXIT_FLAG_WRITE, KVM_USERFAULT_FD_FLAG_NONBLOCK,
    KVM_USERFAULT_FD_FLAG_VCPU_FAULTS, KVM_USERFAULT_MSG_EXEC, KVM_USERFAULT_MSG_GUEST,
    KVM_USERFAULT_MSG_READ, KVM_USERFAULT_MSG_VCPU, KVM_USERFAULT_MSG_WRITE, USERFAULT_MSG_SIZE,
};
use kvm_selftests::userfault::{
    self as uf, clear_userfault, create_fd, create_fd_raw, gettid, poll_in, read_raw, read_records,
    requeue, resolve, resolve_raw, set_attributes, set_userfault, wait_for_wchan, wait_in_syscall,
};
use kvm_selftests::vm::{create_barebones, open_kvm, TEST_GPA};
use kvm_selftests::{require_userfault, Backing, Exit, HostMapping, TestVm, Ucall, Vcpu};
use nix::errno::Errno;

const PAGE: u64 = 4096;
/// Port the `rep outsb` guest writes to (distinct from the ucall port).
const OUTS_PORT: u16 = 0x1001;

fn timeout() -> Duration {
    Duration::from_secs(env_u64("KVM_SELFTESTS_TIMEOUT_SECS", 120))
}

/// The kernel function a task sleeps in while it waits for a gfn to be resolved.
const UF_WAIT: &str = "kvm_userfault_wait";

fn gmem() -> Backing {
    Backing::GuestMemfd {
        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    }
}

/// The two memslot kinds the series covers.
fn backings() -> [(&'static str, Backing); 2] {
    [("guest_memfd", gmem()), ("anonymous", Backing::Anonymous)]
}

/// A default VM with `pages` pages of `backing` identity mapped at TEST_GPA as slot 1.
fn vm_with(backing: Backing, pages: u64) -> TestVm {
    let mut vm = TestVm::new().expect("create VM");
    vm.add_mapped_region(1, TEST_GPA, pages * PAGE, backing)
        .expect("test memslot");
    vm
}

fn page_value(gpa: u64) -> u64 {
    gpa ^ 0xfeed_face_0000_0001
}

/// Writes `page_value(gpa)` into every word of the page at `gpa` through the host mapping
/// (so an access at any offset reads the page's value).
fn fill(vm: &TestVm, gpa: u64) {
    let r = vm.region(1);
    for w in 0..PAGE / 8 {
        r.mapping
            .write_u64((gpa - r.gpa + w * 8) as usize, page_value(gpa));
    }
}

// ---- guest code ----

/// Loads the first word of each of `n` pages, SYNCing each value.
extern "C" fn guest_read(gva: u64, n: u64, _: u64, _: u64) {
    let mut i = 0;
    while i < n {
        // SAFETY: the test maps [gva, gva + n pages); the load may be the fault under test.
        let v = unsafe { read_u64(gva + i * PAGE) };
        guest::sync(&[v]);
        i += 1;
    }
}

/// Stores `val` at `gva`, then SYNCs what it reads back.
extern "C" fn guest_write(gva: u64, val: u64, _: u64, _: u64) {
    // SAFETY: as above.
    unsafe { write_u64(gva, val) };
    // SAFETY: as above.
    guest::sync(&[unsafe { read_u64(gva) }]);
}

/// `rep outsb` of `len` bytes from `gva`: KVM's emulator reads guest memory itself.
extern "C" fn guest_outs(gva: u64, len: u64, _: u64, _: u64) {
    // SAFETY: string port output from mapped guest memory; only traps to the host.
    unsafe {
        core::arch::asm!("rep outsb", inout("rsi") gva => _, inout("rcx") len => _,
                         in("dx") OUTS_PORT, options(nostack, preserves_flags));
    }
    guest::sync(&[len]);
}

/// `rep insb` of `len` bytes into `gva`: KVM's emulator writes guest memory itself.
extern "C" fn guest_ins(gva: u64, len: u64, _: u64, _: u64) {
    // SAFETY: string port input into mapped guest memory; only traps to the host.
    unsafe {
        core::arch::asm!("rep insb", inout("rdi") gva => _, inout("rcx") len => _,
                         in("dx") OUTS_PORT, options(nostack, preserves_flags));
        guest::sync(&[read_u64(gva)]);
    }
}

/// Calls code at `gva` (the test puts a `ret` there): an instruction fetch from test memory.
extern "C" fn guest_call(gva: u64, _: u64, _: u64, _: u64) {
    // SAFETY: once resolved, `gva` holds a `ret`; before that the fetch is the fault under test.
    let f: extern "C" fn() = unsafe { core::mem::transmute(gva as usize) };
    f();
    guest::sync(&[gva]);
}

/// Sums the first word of each of `n` pages, then SYNCs the sum once.
extern "C" fn guest_sum(gva: u64, n: u64, _: u64, _: u64) {
    let mut sum = 0u64;
    let mut i = 0;
    while i < n {
        // SAFETY: the test maps [gva, gva + n pages).
        sum = sum.wrapping_add(unsafe { read_u64(gva + i * PAGE) });
        i += 1;
    }
    guest::sync(&[sum]);
}

// ---- host helpers ----

/// Runs the vCPU on a thread until the first exit that is not an `IoOut` to OUTS_PORT; the
/// port data is collected. Returns the vCPU with the exit.
type RunResult = (Vcpu, Result<Exit, Errno>, Vec<u8>);

/// A vCPU running on its own thread, with the thread's id (to look at its kernel state).
struct VcpuThread {
    handle: JoinHandle<RunResult>,
    tid: libc::pid_t,
}

impl VcpuThread {
    fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    fn as_pthread_t(&self) -> libc::pthread_t {
        use std::os::unix::thread::JoinHandleExt;
        self.handle.as_pthread_t()
    }
}

impl From<VcpuThread> for JoinHandle<RunResult> {
    fn from(t: VcpuThread) -> Self {
        t.handle
    }
}

fn run_async(mut vcpu: Vcpu) -> VcpuThread {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        tx.send(gettid()).expect("report tid");
        let mut outs = Vec::new();
        loop {
            match vcpu.run() {
                Ok(Exit::IoOut { port, data }) if port == OUTS_PORT => {
                    outs.extend_from_slice(&data)
                }
                Ok(Exit::IoIn { port, .. }) if port == OUTS_PORT => {}
                r => {
                    let r = r.map_err(|e| Errno::from_raw(e.errno()));
                    return (vcpu, r, outs);
                }
            }
        }
    });
    let tid = rx.recv().expect("vCPU thread tid");
    VcpuThread { handle, tid }
}

fn join<T>(h: impl Into<JoinHandle<T>>, what: &str) -> T {
    let h = h.into();
    let deadline = Instant::now() + timeout();
    while !h.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what}: vCPU still blocked after {:?} (lost wake-up or hang)",
            timeout()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    h.join().expect("vCPU thread panicked")
}

/// Waits (bounded) until the vCPU thread sleeps in the kernel waiting for a gfn, and asserts
/// that it did (not returned from KVM_RUN, not still running).
fn assert_sleeping(h: &VcpuThread, what: &str) {
    let asleep = wait_for_wchan(h.tid, UF_WAIT, timeout(), || h.is_finished());
    assert!(
        !h.is_finished(),
        "{what}: KVM_RUN returned, but the vCPU should sleep until the gfn is resolved"
    );
    assert!(
        asleep,
        "{what}: the vCPU thread did not sleep in {UF_WAIT} within {:?} (wchan {:?})",
        timeout(),
        uf::wchan(h.tid)
    );
}

fn expect_sync(r: Result<Exit, Errno>, what: &str) -> Vec<u64> {
    match r {
        Ok(Exit::Ucall(Ucall::Sync(a))) => a,
        other => panic!("{what}: expected a guest SYNC, got {other:?}"),
    }
}

/// Waits (bounded) for one record to be readable and returns it.
fn read_one(fd: RawFd, what: &str) -> kvm_userfault_msg {
    let ms = timeout().as_millis() as i32;
    assert_ne!(
        poll_in(fd, ms) & libc::POLLIN,
        0,
        "{what}: no record within {:?}",
        timeout()
    );
    let recs = read_records(fd, 8).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(
        recs.len(),
        1,
        "{what}: expected exactly one record, got {recs:?}"
    );
    check_record_shape(&recs[0], what);
    recs[0]
}

/// Collects exactly `n` records (however the reads batch them), bounded by the timeout.
fn read_n(fd: RawFd, n: usize, what: &str) -> Vec<kvm_userfault_msg> {
    let deadline = Instant::now() + timeout();
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} records within {:?}",
            got.len(),
            timeout()
        );
        if poll_in(fd, 10) & libc::POLLIN != 0 {
            got.extend(
                read_records(fd, n - got.len()).unwrap_or_else(|e| panic!("{what}: read: {e}")),
            );
        }
    }
    for r in &got {
        check_record_shape(r, what);
    }
    assert_eq!(poll_in(fd, 0), 0, "{what}: more than {n} records");
    got
}

fn check_record_shape(r: &kvm_userfault_msg, what: &str) {
    assert_eq!(
        r.size as usize, USERFAULT_MSG_SIZE,
        "{what}: record size field"
    );
    assert_eq!(r.reserved, 0, "{what}: record reserved field");
    let access =
        r.flags & (KVM_USERFAULT_MSG_READ | KVM_USERFAULT_MSG_WRITE | KVM_USERFAULT_MSG_EXEC);
    assert_ne!(access, 0, "{what}: no READ/WRITE/EXEC in {:#x}", r.flags);
    let known = access | KVM_USERFAULT_MSG_VCPU | KVM_USERFAULT_MSG_GUEST;
    assert_eq!(
        r.flags & !known,
        0,
        "{what}: unknown record flags in {:#x}",
        r.flags
    );
}

fn fd_flags(fd: RawFd) -> (i32, i32) {
    // SAFETY: fcntl queries on an open fd.
    unsafe {
        (
            libc::fcntl(fd, libc::F_GETFL),
            libc::fcntl(fd, libc::F_GETFD),
        )
    }
}

// ---- capability and attribute acceptance ----

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn capability() {
    require_userfault!("userfault::capability");
    let kvm = open_kvm().unwrap();
    let vm = create_barebones(&kvm, 0).unwrap();
    // KVM_CAP_USERFAULT is a plain yes/no (v1 answered with the fd flags, 3 on x86).
    let sys = kvm.check_extension_raw(KVM_CAP_USERFAULT as libc::c_ulong);
    let on_vm = vm.check_extension_raw(KVM_CAP_USERFAULT as libc::c_ulong);
    assert_eq!(sys, 1, "KVM_CAP_USERFAULT on the system fd");
    assert_eq!(on_vm, 1, "KVM_CAP_USERFAULT on a default VM");
    // The fd flags have their own capability; x86 default VMs accept both.
    let sys = kvm.check_extension_raw(KVM_CAP_USERFAULT_FD_FLAGS as libc::c_ulong) as u64;
    let v = vm.check_extension_raw(KVM_CAP_USERFAULT_FD_FLAGS as libc::c_ulong) as u64;
    assert_eq!(sys, v, "the system fd answers for the default VM type");
    assert_eq!(
        v,
        KVM_USERFAULT_FD_FLAG_NONBLOCK | KVM_USERFAULT_FD_FLAG_VCPU_FAULTS,
        "KVM_CAP_USERFAULT_FD_FLAGS on a default x86 VM"
    );
    // Every advertised flag is accepted by KVM_CREATE_USERFAULT_FD.
    for bit in 0..64 {
        let f = 1u64 << bit;
        if v & f != 0 {
            let fd = create_fd(&vm, f)
                .unwrap_or_else(|e| panic!("advertised flag {f:#x} rejected: {e}"));
            drop(fd);
        }
    }
    let attrs = vm.check_extension_raw(KVM_CAP_MEMORY_ATTRIBUTES as libc::c_ulong) as u64;
    assert_ne!(
        attrs & KVM_MEMORY_ATTRIBUTE_USERFAULT,
        0,
        "default VMs report USERFAULT"
    );
    assert_eq!(
        attrs & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
        0,
        "default VMs have no private memory"
    );
}

// ---- synchronous exits ----

/// A load and a store on a USERFAULT gfn exit with KVM_EXIT_MEMORY_FAULT, the USERFAULT flag,
/// the page-aligned gpa and PAGE_SIZE; after filling and clearing, re-entry completes the
/// access with the new contents.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn sync_exit_fields() {
    require_userfault!("userfault::sync_exit_fields");
    for (name, backing) in backings() {
        let mut vm = vm_with(backing, 2);
        let gpa = TEST_GPA + PAGE;
        set_userfault(vm.fd(), gpa, PAGE).unwrap();
        // An unaligned access inside the page: the exit reports the page.
        let mut vcpu = vm.add_vcpu_with(guest_read, &[gpa + 0x100, 1]).unwrap();
        match vcpu.run() {
            Ok(Exit::MemoryFault {
                flags,
                gpa: g,
                size,
            }) => {
                assert_ne!(
                    flags & KVM_MEMORY_EXIT_FLAG_USERFAULT,
                    0,
                    "{name}: flags {flags:#x}"
                );
                assert_eq!(
                    flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE),
                    0,
                    "{name}: shared access flagged private"
                );
                assert_eq!(g, gpa, "{name}: exit gpa");
                assert_eq!(size, PAGE, "{name}: exit size");
            }
            other => panic!("{name}: expected a USERFAULT memory fault exit, got {other:?}"),
        }
        assert_eq!(
            vcpu.kvm_run().exit_reason,
            kvm_bindings::KVM_EXIT_MEMORY_FAULT,
            "{name}: exit_reason"
        );
        // Re-entering without resolving faults again.
        assert!(
            matches!(vcpu.run(), Ok(Exit::MemoryFault { .. })),
            "{name}: unresolved gfn must fault again"
        );
        fill(&vm, gpa);
        clear_userfault(vm.fd(), gpa, PAGE).unwrap();
        assert_eq!(
            vcpu.run_to_sync().unwrap(),
            vec![page_value(gpa)],
            "{name}: value after resolve"
        );

        // A store, at an unaligned offset.
        let target = TEST_GPA + 0x18;
        set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
        let mut vcpu = vm
            .add_vcpu_with(guest_write, &[target, 0x1234_5678])
            .unwrap();
        match vcpu.run() {
            Ok(Exit::MemoryFault {
                flags,
                gpa: g,
                size,
            }) => {
                assert_ne!(
                    flags & KVM_MEMORY_EXIT_FLAG_USERFAULT,
                    0,
                    "{name}: store flags {flags:#x}"
                );
                assert_eq!((g, size), (TEST_GPA, PAGE), "{name}: store exit gpa/size");
            }
            other => panic!("{name}: expected a USERFAULT exit for the store, got {other:?}"),
        }
        clear_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
        assert_eq!(
            vcpu.run_to_sync().unwrap(),
            vec![0x1234_5678],
            "{name}: store after resolve"
        );
        assert_eq!(
            vm.region(1).mapping.read_u64(0x18),
            0x1234_5678,
            "{name}: store visible to the host"
        );
    }
}

/// A USERFAULT exit names the access, exactly one of READ/WRITE/EXEC (the same bits as the
/// records' `KVM_USERFAULT_MSG_*`): a load exits USERFAULT|READ, a store USERFAULT|WRITE, an
/// instruction fetch USERFAULT|EXEC, again on re-entry while unresolved. (v1 set no access bit.)
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn sync_exit_access_flags() {
    require_userfault!("userfault::sync_exit_access_flags");
    assert_eq!(KVM_MEMORY_EXIT_FLAG_READ, KVM_USERFAULT_MSG_READ as u64);
    assert_eq!(KVM_MEMORY_EXIT_FLAG_WRITE, KVM_USERFAULT_MSG_WRITE as u64);
    assert_eq!(KVM_MEMORY_EXIT_FLAG_EXEC, KVM_USERFAULT_MSG_EXEC as u64);
    for (name, backing) in backings() {
        let mut vm = vm_with(backing, 3);
        set_userfault(vm.fd(), TEST_GPA, 3 * PAGE).unwrap();
        let (load, store, code) = (TEST_GPA, TEST_GPA + PAGE, TEST_GPA + 2 * PAGE);
        let cases: [(&str, guest::GuestFn, [u64; 2], u64, u64); 3] = [
            (
                "load",
                guest_read,
                [load + 8, 1],
                load,
                KVM_MEMORY_EXIT_FLAG_READ,
            ),
            (
                "store",
                guest_write,
                [store + 8, 0x5151],
                store,
                KVM_MEMORY_EXIT_FLAG_WRITE,
            ),
            (
                "fetch",
                guest_call,
                [code + 0x40, 0],
                code,
                KVM_MEMORY_EXIT_FLAG_EXEC,
            ),
        ];
        for (what, entry, args, page, access) in cases {
            let mut vcpu = vm.add_vcpu_with(entry, &args).unwrap();
            for attempt in ["first", "re-entered"] {
                match vcpu.run() {
                    Ok(Exit::MemoryFault { flags, gpa, size }) => {
                        assert_eq!(
                            flags,
                            KVM_MEMORY_EXIT_FLAG_USERFAULT | access,
                            "{name} {what} ({attempt}): exit flags {flags:#x}"
                        );
                        assert_eq!((gpa, size), (page, PAGE), "{name} {what}: gpa/size");
                    }
                    other => panic!("{name} {what}: expected a USERFAULT exit, got {other:?}"),
                }
            }
            let off = (page - TEST_GPA) as usize;
            if access == KVM_MEMORY_EXIT_FLAG_EXEC {
                vm.region(1).mapping.write(off + 0x40, &[0xc3]); // ret
            } else {
                fill(&vm, page);
            }
            clear_userfault(vm.fd(), page, PAGE).unwrap();
            let want = match what {
                "load" => page_value(load),
                "store" => 0x5151,
                _ => code + 0x40,
            };
            assert_eq!(
                vcpu.run_to_sync().unwrap(),
                vec![want],
                "{name} {what}: after resolve"
            );
        }
    }
}

/// Setting USERFAULT on a gfn the guest already has mapped zaps the mapping: the next access
/// exits. Clearing lets it complete again.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn set_zaps_existing_mappings() {
    require_userfault!("userfault::set_zaps_existing_mappings");
    for (name, backing) in backings() {
        let mut vm = vm_with(backing, 1);
        fill(&vm, TEST_GPA);
        let mut vcpu = vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap();
        // The first run maps the page; the second (after setting USERFAULT) must fault.
        assert_eq!(vcpu.run_to_sync().unwrap(), vec![page_value(TEST_GPA)]);
        vcpu.run_to_done().unwrap();
        set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
        vcpu.set_entry(guest_read, &[TEST_GPA, 1]).unwrap();
        match vcpu.run() {
            Ok(Exit::MemoryFault { flags, gpa, .. }) => {
                assert_ne!(flags & KVM_MEMORY_EXIT_FLAG_USERFAULT, 0, "{name}");
                assert_eq!(gpa, TEST_GPA, "{name}");
            }
            other => {
                panic!("{name}: a mapped page must fault after USERFAULT is set, got {other:?}")
            }
        }
        clear_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
        assert_eq!(
            vcpu.run_to_sync().unwrap(),
            vec![page_value(TEST_GPA)],
            "{name}"
        );
    }
}

/// FLAG_SET/FLAG_CLEAR are deltas: setting USERFAULT on a private gfn keeps it private (the
/// exit says PRIVATE|USERFAULT) and clearing USERFAULT leaves PRIVATE. Needs a VM type with
/// private memory that also supports userfault; skipped otherwise.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn delta_flags_keep_private() {
    require_userfault!("userfault::delta_flags_keep_private");
    const SW_PROTECTED: u64 = kvm_bindings::KVM_X86_SW_PROTECTED_VM as u64;
    let kvm = open_kvm().unwrap();
    let types = kvm.check_extension_raw(KVM_CAP_VM_TYPES as libc::c_ulong) as u64;
    if types & (1 << SW_PROTECTED) == 0 {
        skip(
            "userfault::delta_flags_keep_private",
            "KVM_X86_SW_PROTECTED_VM not supported",
        );
        return;
    }
    // The shared half of the private slot below; declared before the VM, so it outlives it.
    let anon = HostMapping::anonymous(PAGE as usize).unwrap();
    let mut vm = TestVm::with_type(SW_PROTECTED).unwrap();
    let attrs = vm.check_cap(KVM_CAP_MEMORY_ATTRIBUTES.into()) as u64;
    if attrs & KVM_MEMORY_ATTRIBUTE_USERFAULT == 0 || vm.check_cap(KVM_CAP_USERFAULT as u64) <= 0 {
        // The series supports USERFAULT on SW_PROTECTED VMs (kvm_arch_has_userfault()).
        kvm_selftests::caps::series_missing(
            "userfault::delta_flags_keep_private",
            "SW_PROTECTED VMs do not support USERFAULT here",
        );
        return;
    }
    assert_ne!(
        attrs & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
        0,
        "SW_PROTECTED VMs report PRIVATE | USERFAULT"
    );
    // A private guest_memfd slot cannot be mmap()ed: set it up by hand, with anonymous memory
    // for the shared half.
    let gfd = vm.create_guest_memfd(PAGE, 0).unwrap();
    // SAFETY: `anon` is a PAGE-byte mapping that nothing else touches, declared before `vm`,
    // so it is unmapped after the VM is gone.
    unsafe {
        vm.set_region2(
            2,
            0,
            TEST_GPA + (1 << 30),
            PAGE,
            anon.addr(),
            Some(gfd.as_raw_fd()),
            0,
        )
    }
    .unwrap();
    let gpa = TEST_GPA + (1 << 30);
    vm.map(gpa, gpa, PAGE).unwrap();
    set_attributes(
        vm.fd(),
        gpa,
        PAGE,
        u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
        0,
    )
    .unwrap();
    set_attributes(
        vm.fd(),
        gpa,
        PAGE,
        KVM_MEMORY_ATTRIBUTE_USERFAULT,
        KVM_MEMORY_ATTRIBUTES_FLAG_SET,
    )
    .unwrap();
    let mut vcpu = vm.add_vcpu_with(guest_write, &[gpa, 7]).unwrap();
    match vcpu.run() {
        Ok(Exit::MemoryFault { flags, gpa: g, .. }) => {
            assert_eq!(g, gpa);
            assert_ne!(
                flags & KVM_MEMORY_EXIT_FLAG_USERFAULT,
                0,
                "flags {flags:#x}"
            );
            assert_ne!(
                flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE),
                0,
                "FLAG_SET USERFAULT clobbered PRIVATE: flags {flags:#x}"
            );
        }
        other => panic!("expected a PRIVATE|USERFAULT exit, got {other:?}"),
    }
    // Exact private/shared conversions leave USERFAULT alone: converted to shared, the gfn
    // still exits (USERFAULT without PRIVATE); converted back, PRIVATE|USERFAULT again.
    set_attributes(vm.fd(), gpa, PAGE, 0, 0).expect("exact conversion to shared");
    match vcpu.run() {
        Ok(Exit::MemoryFault { flags, gpa: g, .. }) => {
            assert_eq!(g, gpa);
            assert_eq!(
                flags & (KVM_MEMORY_EXIT_FLAG_USERFAULT | u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE)),
                KVM_MEMORY_EXIT_FLAG_USERFAULT,
                "after an exact conversion to shared: flags {flags:#x}"
            );
        }
        other => panic!("an exact conversion to shared cleared USERFAULT: got {other:?}"),
    }
    set_attributes(
        vm.fd(),
        gpa,
        PAGE,
        u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
        0,
    )
    .expect("exact conversion back to private");
    match vcpu.run() {
        Ok(Exit::MemoryFault { flags, gpa: g, .. }) => {
            assert_eq!(g, gpa);
            assert_eq!(
                flags & (KVM_MEMORY_EXIT_FLAG_USERFAULT | u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE)),
                KVM_MEMORY_EXIT_FLAG_USERFAULT | u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE),
                "after an exact conversion to private: flags {flags:#x}"
            );
        }
        other => panic!("an exact conversion to private cleared USERFAULT: got {other:?}"),
    }
    set_attributes(
        vm.fd(),
        gpa,
        PAGE,
        KVM_MEMORY_ATTRIBUTE_USERFAULT,
        KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR,
    )
    .unwrap();
    // Still private: the private guest_memfd page is mapped and the store completes.
    assert_eq!(
        vcpu.run_to_sync().unwrap(),
        vec![7],
        "access after clearing USERFAULT on a private gfn"
    );
}

// ---- the asynchronous channel ----

/// KVM's own access (the emulator reading `rep outsb`'s source) posts one record (READ, VCPU,
/// not GUEST, vcpu_id) and sleeps; RESOLVE wakes it and the emulated access sees the new
/// contents.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn async_kvm_access_read() {
    require_userfault!("userfault::async_kvm_access_read");
    for (name, backing) in backings() {
        let mut vm = vm_with(backing, 1);
        let fd = create_fd(vm.fd(), 0).unwrap();
        set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
        let _v0 = vm.add_vcpu().unwrap();
        let vcpu = vm.add_vcpu_with(guest_outs, &[TEST_GPA, 8]).unwrap();
        let h = run_async(vcpu);
        let rec = read_one(fd.as_raw_fd(), name);
        assert_eq!(rec.gfn, TEST_GPA / PAGE, "{name}: gfn");
        assert_ne!(
            rec.flags & KVM_USERFAULT_MSG_READ,
            0,
            "{name}: READ in {:#x}",
            rec.flags
        );
        assert_ne!(
            rec.flags & KVM_USERFAULT_MSG_VCPU,
            0,
            "{name}: raised in a vCPU's context"
        );
        assert_eq!(
            rec.flags & KVM_USERFAULT_MSG_GUEST,
            0,
            "{name}: KVM's own access is not a GUEST fault"
        );
        assert_eq!(rec.vcpu_id, 1, "{name}: vcpu_id");
        assert_sleeping(&h, name);
        fill(&vm, TEST_GPA);
        resolve(fd.as_raw_fd(), TEST_GPA, PAGE).unwrap();
        let (_, r, outs) = join(h, name);
        assert_eq!(expect_sync(r, name), vec![8]);
        assert_eq!(
            outs,
            page_value(TEST_GPA).to_le_bytes().to_vec(),
            "{name}: bytes the emulator read"
        );
        // Nothing else was queued.
        assert_eq!(poll_in(fd.as_raw_fd(), 0), 0, "{name}: stray record");
    }
}

/// KVM's own *write* (the emulator storing `rep insb`'s input) posts a WRITE|VCPU record and
/// sleeps; after RESOLVE the store lands in guest memory.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn async_kvm_access_write() {
    require_userfault!("userfault::async_kvm_access_write");
    for (name, backing) in backings() {
        let mut vm = vm_with(backing, 1);
        let fd = create_fd(vm.fd(), 0).unwrap();
        set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
        let mut vcpu = vm.add_vcpu_with(guest_ins, &[TEST_GPA + 16, 8]).unwrap();
        vcpu.io_in_fill = 0x5c;
        let h = run_async(vcpu);
        let rec = read_one(fd.as_raw_fd(), name);
        assert_eq!(rec.gfn, TEST_GPA / PAGE, "{name}: gfn");
        assert_ne!(
            rec.flags & KVM_USERFAULT_MSG_WRITE,
            0,
            "{name}: WRITE in {:#x}",
            rec.flags
        );
        assert_ne!(
            rec.flags & KVM_USERFAULT_MSG_VCPU,
            0,
            "{name}: VCPU in {:#x}",
            rec.flags
        );
        assert_eq!(
            rec.flags & KVM_USERFAULT_MSG_GUEST,
            0,
            "{name}: KVM's own store is not GUEST"
        );
        assert_eq!(rec.vcpu_id, 0, "{name}: vcpu_id");
        assert_sleeping(&h, name);
        assert_eq!(
            vm.region(1).mapping.read_u64(16),
            0,
            "{name}: the store landed before the resolve"
        );
        resolve(fd.as_raw_fd(), TEST_GPA, PAGE).unwrap();
        let (_, r, _) = join(h, name);
        assert_eq!(
            expect_sync(r, name),
            vec![0x5c5c_5c5c_5c5c_5c5c],
            "{name}: guest reads the stored bytes"
        );
        assert_eq!(
            vm.region(1).mapping.read_u64(16),
            0x5c5c_5c5c_5c5c_5c5c,
            "{name}: store visible to the host"
        );
    }
}

/// An instruction fetch from a USERFAULT gfn exits (no fd) or, with VCPU_FAULTS, posts an
/// EXEC|GUEST record; once the page holds code and is resolved, the guest runs it.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn exec_faults() {
    require_userfault!("userfault::exec_faults");
    let mut vm = vm_with(gmem(), 2);
    let code = TEST_GPA + 0x40;
    set_userfault(vm.fd(), TEST_GPA, 2 * PAGE).unwrap();
    let mut vcpu = vm.add_vcpu_with(guest_call, &[code]).unwrap();
    match vcpu.run() {
        Ok(Exit::MemoryFault { flags, gpa, size }) => {
            assert_ne!(
                flags & KVM_MEMORY_EXIT_FLAG_USERFAULT,
                0,
                "flags {flags:#x}"
            );
            assert_eq!((gpa, size), (TEST_GPA, PAGE), "fetch fault gpa/size");
        }
        other => panic!("expected a USERFAULT exit for the instruction fetch, got {other:?}"),
    }
    vm.region(1).mapping.write(0x40, &[0xc3]); // ret
    clear_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
    assert_eq!(vcpu.run_to_sync().unwrap(), vec![code]);
    let fd = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_VCPU_FAULTS).unwrap();
    let code = TEST_GPA + PAGE + 0x80;
    let h = run_async(vm.add_vcpu_with(guest_call, &[code]).unwrap());
    let rec = read_one(fd.as_raw_fd(), "exec");
    assert_eq!(rec.gfn, code / PAGE);
    assert_ne!(
        rec.flags & KVM_USERFAULT_MSG_EXEC,
        0,
        "EXEC in {:#x}",
        rec.flags
    );
    assert_ne!(
        rec.flags & KVM_USERFAULT_MSG_GUEST,
        0,
        "GUEST in {:#x}",
        rec.flags
    );
    vm.region(1).mapping.write((PAGE + 0x80) as usize, &[0xc3]);
    resolve(fd.as_raw_fd(), TEST_GPA + PAGE, PAGE).unwrap();
    let (_, r, _) = join(h, "exec");
    assert_eq!(expect_sync(r, "exec"), vec![code]);
}

/// No huge mapping covers a USERFAULT gfn: after the guest has touched a whole 2 MiB region
/// (which KVM may map with one huge page), setting USERFAULT on one 4 KiB gfn in the middle
/// makes exactly that gfn exit, and every other page stays accessible.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn no_huge_mapping_covers_userfault_gfn() {
    require_userfault!("userfault::no_huge_mapping_covers_userfault_gfn");
    for (name, backing) in backings() {
        let pages = 512;
        let mut vm = vm_with(backing, pages);
        for p in 0..pages {
            fill(&vm, TEST_GPA + p * PAGE);
        }
        let sum = (0..pages)
            .map(|p| page_value(TEST_GPA + p * PAGE))
            .fold(0, u64::wrapping_add);
        let mut vcpu = vm.add_vcpu_with(guest_sum, &[TEST_GPA, pages]).unwrap();
        assert_eq!(vcpu.run_to_sync().unwrap(), vec![sum], "{name}: first pass");
        vcpu.run_to_done().unwrap();
        let hole = TEST_GPA + 300 * PAGE;
        set_userfault(vm.fd(), hole, PAGE).unwrap();
        vcpu.set_entry(guest_sum, &[TEST_GPA, pages]).unwrap();
        let mut exits = Vec::new();
        let got = loop {
            match vcpu.run() {
                Ok(Exit::MemoryFault { flags, gpa, size }) => {
                    assert_ne!(
                        flags & KVM_MEMORY_EXIT_FLAG_USERFAULT,
                        0,
                        "{name}: flags {flags:#x}"
                    );
                    assert_eq!(size, PAGE, "{name}: exit size");
                    exits.push(gpa);
                    assert!(exits.len() < 4, "{name}: exits {exits:x?}");
                    clear_userfault(vm.fd(), gpa, PAGE).unwrap();
                }
                Ok(Exit::Ucall(Ucall::Sync(a))) => break a,
                other => panic!("{name}: unexpected {other:?}"),
            }
        };
        assert_eq!(exits, vec![hole], "{name}: only the USERFAULT gfn may exit");
        assert_eq!(got, vec![sum], "{name}: second pass");
    }
}

/// With VCPU_FAULTS, guest loads and stores also go through the fd (GUEST|VCPU, READ or
/// WRITE) and the vCPU sleeps instead of exiting.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn async_vcpu_faults_read_and_write() {
    require_userfault!("userfault::async_vcpu_faults_read_and_write");
    for (name, backing) in backings() {
        let mut vm = vm_with(backing, 2);
        let fd = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_VCPU_FAULTS).unwrap();
        set_userfault(vm.fd(), TEST_GPA, 2 * PAGE).unwrap();

        let h = run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap());
        let rec = read_one(fd.as_raw_fd(), name);
        assert_eq!(rec.gfn, TEST_GPA / PAGE, "{name}");
        assert_eq!(
            rec.flags & (KVM_USERFAULT_MSG_GUEST | KVM_USERFAULT_MSG_VCPU | KVM_USERFAULT_MSG_READ),
            KVM_USERFAULT_MSG_GUEST | KVM_USERFAULT_MSG_VCPU | KVM_USERFAULT_MSG_READ,
            "{name}: flags {:#x}",
            rec.flags
        );
        assert_eq!(rec.vcpu_id, 0, "{name}");
        assert_sleeping(&h, name);
        fill(&vm, TEST_GPA);
        resolve(fd.as_raw_fd(), TEST_GPA, PAGE).unwrap();
        let (_, r, _) = join(h, name);
        assert_eq!(
            expect_sync(r, name),
            vec![page_value(TEST_GPA)],
            "{name}: loaded value"
        );

        let gpa = TEST_GPA + PAGE;
        let h = run_async(vm.add_vcpu_with(guest_write, &[gpa + 8, 0xabcd]).unwrap());
        let rec = read_one(fd.as_raw_fd(), name);
        assert_eq!(rec.gfn, gpa / PAGE, "{name}");
        assert_ne!(
            rec.flags & KVM_USERFAULT_MSG_WRITE,
            0,
            "{name}: WRITE in {:#x}",
            rec.flags
        );
        assert_eq!(rec.vcpu_id, 1, "{name}");
        resolve(fd.as_raw_fd(), gpa, PAGE).unwrap();
        let (_, r, _) = join(h, name);
        assert_eq!(expect_sync(r, name), vec![0xabcd], "{name}: stored value");
    }
}

/// poll/epoll: no POLLIN while nothing is queued, POLLIN once a record is, none after it was
/// read. The fd is O_CLOEXEC always and O_NONBLOCK only on request; a non-blocking read with
/// nothing queued is EAGAIN; a blocking read waits for the record.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn async_poll_epoll_and_blocking() {
    require_userfault!("userfault::async_poll_epoll_and_blocking");
    let mut vm = vm_with(gmem(), 2);
    {
        let nb = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_NONBLOCK).unwrap();
        let (fl, fdfl) = fd_flags(nb.as_raw_fd());
        assert_ne!(fl & libc::O_NONBLOCK, 0, "NONBLOCK flag gives O_NONBLOCK");
        assert_ne!(
            fdfl & libc::FD_CLOEXEC,
            0,
            "the userfault fd is always O_CLOEXEC"
        );
        assert_eq!(
            read_raw(nb.as_raw_fd(), USERFAULT_MSG_SIZE),
            Err(Errno::EAGAIN),
            "empty non-blocking read"
        );
    }
    let fd = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_VCPU_FAULTS).unwrap();
    let raw = fd.as_raw_fd();
    let (fl, fdfl) = fd_flags(raw);
    assert_eq!(fl & libc::O_NONBLOCK, 0, "no O_NONBLOCK without the flag");
    assert_ne!(
        fdfl & libc::FD_CLOEXEC,
        0,
        "the userfault fd is always O_CLOEXEC"
    );
    assert_eq!(poll_in(raw, 0), 0, "POLLIN with nothing queued");

    // epoll, level triggered.
    // SAFETY: epoll_create1 takes only flags.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    // SAFETY: a fresh descriptor we own.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 7,
    };
    // SAFETY: valid epoll fd, target fd and event.
    let r = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, raw, &mut ev) };
    assert_eq!(r, 0, "epoll_ctl: {}", Errno::last());
    let epoll_wait = |ms: i32| {
        let mut out = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // SAFETY: `out` has room for 2 events.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 2, ms) };
        assert!(n >= 0, "epoll_wait: {}", Errno::last());
        out[..n as usize]
            .iter()
            .map(|e| (e.events, e.u64))
            .collect::<Vec<_>>()
    };
    assert!(epoll_wait(0).is_empty(), "EPOLLIN with nothing queued");

    set_userfault(vm.fd(), TEST_GPA, 2 * PAGE).unwrap();
    // A blocking read started before the fault returns the record.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        tx.send(gettid()).unwrap();
        read_records(raw, 4)
    });
    let reader_tid = rx.recv().unwrap();
    assert!(
        wait_in_syscall(reader_tid, libc::SYS_read, timeout()),
        "the reader never blocked in read(2)"
    );
    assert!(
        !reader.is_finished(),
        "a blocking read with nothing queued must wait"
    );
    let h = run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 2]).unwrap());
    let recs = join(reader, "blocking read").expect("blocking read");
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].gfn, TEST_GPA / PAGE);
    assert_eq!(poll_in(raw, 0), 0, "POLLIN after the only record was read");
    fill(&vm, TEST_GPA);
    resolve(raw, TEST_GPA, PAGE).unwrap();
    let (vcpu, r, _) = join(h, "first page");
    assert_eq!(expect_sync(r, "first page"), vec![page_value(TEST_GPA)]);
    // The second page: now observe POLLIN and EPOLLIN before reading.
    let h = run_async(vcpu);
    let deadline = timeout().as_millis() as i32;
    assert_ne!(
        poll_in(raw, deadline) & libc::POLLIN,
        0,
        "POLLIN for the second fault"
    );
    let evs = epoll_wait(deadline);
    assert_eq!(evs.len(), 1, "epoll events {evs:?}");
    assert_ne!(evs[0].0 & libc::EPOLLIN as u32, 0);
    assert_eq!(evs[0].1, 7);
    let rec = read_one(raw, "second page");
    assert_eq!(rec.gfn, TEST_GPA / PAGE + 1);
    assert!(
        epoll_wait(0).is_empty(),
        "EPOLLIN after the record was read"
    );
    fill(&vm, TEST_GPA + PAGE);
    resolve(raw, TEST_GPA + PAGE, PAGE).unwrap();
    let (_, r, _) = join(h, "second page");
    assert_eq!(
        expect_sync(r, "second page"),
        vec![page_value(TEST_GPA + PAGE)]
    );
}

/// `read(2)` returns whole records, as many as fit; a buffer smaller than one record is
/// EINVAL.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn async_read_sizes() {
    require_userfault!("userfault::async_read_sizes");
    let mut vm = vm_with(gmem(), 4);
    let fd = create_fd(
        vm.fd(),
        KVM_USERFAULT_FD_FLAG_VCPU_FAULTS | KVM_USERFAULT_FD_FLAG_NONBLOCK,
    )
    .unwrap();
    let raw = fd.as_raw_fd();
    assert_eq!(
        read_raw(raw, USERFAULT_MSG_SIZE - 1),
        Err(Errno::EINVAL),
        "buffer smaller than a record"
    );
    set_userfault(vm.fd(), TEST_GPA, 4 * PAGE).unwrap();
    // Three vCPUs fault on three different pages: three records queue up.
    let hs: Vec<_> = (0..3)
        .map(|i| {
            run_async(
                vm.add_vcpu_with(guest_read, &[TEST_GPA + i * PAGE, 1])
                    .unwrap(),
            )
        })
        .collect();
    let deadline = Instant::now() + timeout();
    let mut got: Vec<kvm_userfault_msg> = Vec::new();
    // Read with a buffer of 1.5 records: exactly one whole record each time.
    while got.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "only {} of 3 records arrived",
            got.len()
        );
        match read_raw(raw, USERFAULT_MSG_SIZE * 3 / 2) {
            Ok(b) => {
                assert_eq!(
                    b.len(),
                    USERFAULT_MSG_SIZE,
                    "a 1.5-record buffer returns one whole record"
                );
                got.extend(uf::decode(&b));
            }
            // Wait for the next record (bounded by the loop's deadline), not for time.
            Err(Errno::EAGAIN) => {
                poll_in(raw, 10);
            }
            Err(e) => panic!("read: {e}"),
        }
    }
    assert_eq!(
        read_raw(raw, USERFAULT_MSG_SIZE),
        Err(Errno::EAGAIN),
        "no fourth record"
    );
    let mut gfns: Vec<u64> = got.iter().map(|r| r.gfn).collect();
    gfns.sort();
    assert_eq!(
        gfns,
        (0..3).map(|i| TEST_GPA / PAGE + i).collect::<Vec<_>>()
    );
    let mut ids: Vec<u32> = got.iter().map(|r| r.vcpu_id).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2], "vcpu_id of each record");
    // One resolve over the whole range wakes all three.
    for i in 0..3 {
        fill(&vm, TEST_GPA + i * PAGE);
    }
    resolve(raw, TEST_GPA, 4 * PAGE).unwrap();
    for (i, h) in hs.into_iter().enumerate() {
        let (_, r, _) = join(h, "batched resolve");
        assert_eq!(
            expect_sync(r, "batched resolve"),
            vec![page_value(TEST_GPA + i as u64 * PAGE)]
        );
    }
}

/// io_uring IORING_OP_READ on the fd completes with a record.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn async_io_uring_read() {
    require_userfault!("userfault::async_io_uring_read");
    let mut vm = vm_with(gmem(), 1);
    let fd = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_VCPU_FAULTS).unwrap();
    let mut ring = io_uring::IoUring::new(8).expect("io_uring_setup");
    let mut buf = vec![0u8; 4 * USERFAULT_MSG_SIZE];
    let sqe = io_uring::opcode::Read::new(
        io_uring::types::Fd(fd.as_raw_fd()),
        buf.as_mut_ptr(),
        buf.len() as u32,
    )
    .build()
    .user_data(42);
    // SAFETY: `buf` outlives the request: we wait for its completion below before using or
    // dropping it.
    unsafe { ring.submission().push(&sqe).expect("submission queue full") };
    ring.submit().expect("io_uring_enter");
    set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
    let h = run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap());
    // Wait for the completion with a bound, so a missing wake-up fails instead of hanging.
    let deadline = Instant::now() + timeout();
    let cqe = loop {
        if let Some(c) = ring.completion().next() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "io_uring read did not complete within {:?}",
            timeout()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(cqe.user_data(), 42);
    assert_eq!(
        cqe.result(),
        USERFAULT_MSG_SIZE as i32,
        "io_uring read result (bytes or -errno)"
    );
    let recs = uf::decode(&buf[..USERFAULT_MSG_SIZE]);
    assert_eq!(recs[0].gfn, TEST_GPA / PAGE);
    check_record_shape(&recs[0], "io_uring");
    fill(&vm, TEST_GPA);
    resolve(fd.as_raw_fd(), TEST_GPA, PAGE).unwrap();
    let (_, r, _) = join(h, "io_uring");
    assert_eq!(expect_sync(r, "io_uring"), vec![page_value(TEST_GPA)]);
}

/// Several faults on one outstanding gfn give one record; one resolve wakes every waiter.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn coalescing() {
    require_userfault!("userfault::coalescing");
    let mut vm = vm_with(gmem(), 1);
    let fd = create_fd(
        vm.fd(),
        KVM_USERFAULT_FD_FLAG_VCPU_FAULTS | KVM_USERFAULT_FD_FLAG_NONBLOCK,
    )
    .unwrap();
    set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
    // Three guest loads and one KVM (emulator) access, all on the same gfn.
    let mut hs: Vec<_> = (0..3)
        .map(|_| run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap()))
        .collect();
    let outs = run_async(vm.add_vcpu_with(guest_outs, &[TEST_GPA, 8]).unwrap());
    let first = read_one(fd.as_raw_fd(), "coalescing");
    assert_eq!(first.gfn, TEST_GPA / PAGE);
    // Every vCPU has faulted and joined the waiters once it sleeps in the wait.
    for h in &hs {
        assert_sleeping(h, "coalesced guest load");
    }
    assert_sleeping(&outs, "coalesced emulated access");
    assert_eq!(
        read_raw(fd.as_raw_fd(), 16 * USERFAULT_MSG_SIZE),
        Err(Errno::EAGAIN),
        "further faults on an outstanding gfn must not post records"
    );
    fill(&vm, TEST_GPA);
    resolve(fd.as_raw_fd(), TEST_GPA, PAGE).unwrap();
    for h in hs.drain(..) {
        let (_, r, _) = join(h, "coalesced waiter");
        assert_eq!(
            expect_sync(r, "coalesced waiter"),
            vec![page_value(TEST_GPA)]
        );
    }
    let (_, r, data) = join(outs, "coalesced emulator access");
    assert_eq!(expect_sync(r, "coalesced emulator access"), vec![8]);
    assert_eq!(data, page_value(TEST_GPA).to_le_bytes().to_vec());
    assert_eq!(
        read_raw(fd.as_raw_fd(), USERFAULT_MSG_SIZE),
        Err(Errno::EAGAIN),
        "no record after the resolve"
    );
}

/// Clearing USERFAULT through KVM_SET_MEMORY_ATTRIBUTES (not the fd) wakes sleepers too, both
/// a guest fault (VCPU_FAULTS) and a KVM access.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn wake_on_clear_through_attributes() {
    require_userfault!("userfault::wake_on_clear_through_attributes");
    let mut vm = vm_with(Backing::Anonymous, 2);
    let fd = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_VCPU_FAULTS).unwrap();
    set_userfault(vm.fd(), TEST_GPA, 2 * PAGE).unwrap();
    let g = run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap());
    let e = run_async(vm.add_vcpu_with(guest_outs, &[TEST_GPA + PAGE, 8]).unwrap());
    let mut gfns: Vec<u64> = read_n(fd.as_raw_fd(), 2, "wake")
        .iter()
        .map(|r| r.gfn)
        .collect();
    gfns.sort();
    assert_eq!(gfns, vec![TEST_GPA / PAGE, TEST_GPA / PAGE + 1]);
    assert_sleeping(&g, "guest fault");
    assert_sleeping(&e, "KVM access");
    fill(&vm, TEST_GPA);
    fill(&vm, TEST_GPA + PAGE);
    clear_userfault(vm.fd(), TEST_GPA, 2 * PAGE).unwrap();
    let (_, r, _) = join(g, "guest fault woken by KVM_SET_MEMORY_ATTRIBUTES");
    assert_eq!(expect_sync(r, "guest fault"), vec![page_value(TEST_GPA)]);
    let (_, r, data) = join(e, "KVM access woken by KVM_SET_MEMORY_ATTRIBUTES");
    assert_eq!(expect_sync(r, "KVM access"), vec![8]);
    assert_eq!(data, page_value(TEST_GPA + PAGE).to_le_bytes().to_vec());
}

/// Closing the fd wakes every waiter: a VCPU_FAULTS vCPU falls back to a synchronous exit,
/// and KVM's own access proceeds to the memory through the memslot's mapping, as without a fd
/// (v1 failed it as for missing memory).
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn close_wakes_waiters() {
    require_userfault!("userfault::close_wakes_waiters");
    let mut vm = vm_with(gmem(), 2);
    let fd = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_VCPU_FAULTS).unwrap();
    set_userfault(vm.fd(), TEST_GPA, 2 * PAGE).unwrap();
    let g = run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap());
    let e = run_async(vm.add_vcpu_with(guest_outs, &[TEST_GPA + PAGE, 8]).unwrap());
    read_n(fd.as_raw_fd(), 2, "close");
    assert_sleeping(&g, "guest fault");
    assert_sleeping(&e, "KVM access");
    // What the released KVM access will find in memory (USERFAULT stays set).
    fill(&vm, TEST_GPA + PAGE);
    drop(fd);
    let (mut vcpu, r, _) = join(g, "guest fault after close");
    match r {
        Ok(Exit::MemoryFault { flags, gpa, size }) => {
            assert_ne!(flags & KVM_MEMORY_EXIT_FLAG_USERFAULT, 0);
            assert_eq!((gpa, size), (TEST_GPA, PAGE));
        }
        other => panic!("after close, a VCPU_FAULTS vCPU falls back to a sync exit; got {other:?}"),
    }
    fill(&vm, TEST_GPA);
    clear_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
    assert_eq!(vcpu.run_to_sync().unwrap(), vec![page_value(TEST_GPA)]);
    let (_, r, data) = join(e, "KVM access after close");
    assert_eq!(
        expect_sync(r, "KVM access after close"),
        vec![8],
        "the released emulated access completes"
    );
    assert_eq!(
        data,
        page_value(TEST_GPA + PAGE).to_le_bytes().to_vec(),
        "the released emulated access reads the memory"
    );
    // The fd can be created again once the first is closed.
    drop(create_fd(vm.fd(), 0).expect("a new fd after the old one was closed"));
}

/// With no fd open, KVM's own accesses to a USERFAULT gfn are not intercepted: they go to the
/// memory through the memslot's userspace mapping (where userfaultfd could catch them), both
/// reads (`rep outsb`) and writes (`rep insb`), and never hang; a guest access still exits
/// synchronously with USERFAULT. (v1 failed such accesses as for missing memory.)
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn no_fd_kvm_access_goes_to_memory() {
    require_userfault!("userfault::no_fd_kvm_access_goes_to_memory");
    for (name, backing) in backings() {
        let mut vm = vm_with(backing, 2);
        fill(&vm, TEST_GPA);
        set_userfault(vm.fd(), TEST_GPA, 2 * PAGE).unwrap();
        let (_, r, data) = join(
            run_async(vm.add_vcpu_with(guest_outs, &[TEST_GPA, 8]).unwrap()),
            "KVM read without fd",
        );
        assert_eq!(
            expect_sync(r, name),
            vec![8],
            "{name}: the emulated read completes"
        );
        assert_eq!(
            data,
            page_value(TEST_GPA).to_le_bytes().to_vec(),
            "{name}: the emulated read sees the memory"
        );
        // KVM's own store lands in memory; the guest's own load of it then exits.
        let mut vcpu = vm
            .add_vcpu_with(guest_ins, &[TEST_GPA + PAGE + 16, 8])
            .unwrap();
        vcpu.io_in_fill = 0xa7;
        let h = run_async(vcpu);
        let (vcpu, r, _) = join(h, "KVM write without fd");
        match r {
            Ok(Exit::MemoryFault { flags, gpa, size }) => {
                assert_eq!(
                    flags,
                    KVM_MEMORY_EXIT_FLAG_USERFAULT | KVM_MEMORY_EXIT_FLAG_READ,
                    "{name}: the guest's load after the emulated store"
                );
                assert_eq!((gpa, size), (TEST_GPA + PAGE, PAGE), "{name}");
            }
            other => panic!("{name}: expected the guest load to exit, got {other:?}"),
        }
        assert_eq!(
            vm.region(1).mapping.read_u64((PAGE + 16) as usize),
            0xa7a7_a7a7_a7a7_a7a7,
            "{name}: KVM's store reached the memory"
        );
        clear_userfault(vm.fd(), TEST_GPA + PAGE, PAGE).unwrap();
        let mut vcpu = vcpu;
        assert_eq!(
            vcpu.run_to_sync().unwrap(),
            vec![0xa7a7_a7a7_a7a7_a7a7],
            "{name}: guest reads the stored bytes"
        );
    }
}

fn sigusr1_handler_installed() {
    extern "C" fn noop(_: libc::c_int) {}
    // SAFETY: installs an async-signal-safe no-op handler; no SA_RESTART so KVM_RUN sees EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// A signal to a vCPU sleeping on a gfn makes KVM_RUN return EINTR; on re-entry the fault is
/// taken again (joining the still-outstanding record: no new one) and a resolve completes it.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn signal_interrupts_sleeping_vcpu() {
    require_userfault!("userfault::signal_interrupts_sleeping_vcpu");
    sigusr1_handler_installed();
    let mut vm = vm_with(gmem(), 1);
    let fd = create_fd(
        vm.fd(),
        KVM_USERFAULT_FD_FLAG_VCPU_FAULTS | KVM_USERFAULT_FD_FLAG_NONBLOCK,
    )
    .unwrap();
    set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
    let h = run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap());
    read_one(fd.as_raw_fd(), "signal");
    assert_sleeping(&h, "before the signal");
    // SAFETY: the thread is alive (asserted above) and SIGUSR1 has a handler.
    let r = unsafe { libc::pthread_kill(h.as_pthread_t(), libc::SIGUSR1) };
    assert_eq!(r, 0);
    let (vcpu, r, _) = join(h, "signalled vCPU");
    assert!(
        matches!(r, Err(Errno::EINTR) | Ok(Exit::Intr)),
        "KVM_RUN after a signal: expected EINTR, got {r:?}"
    );
    let h = run_async(vcpu);
    assert_sleeping(&h, "re-entered vCPU");
    assert_eq!(
        read_raw(fd.as_raw_fd(), USERFAULT_MSG_SIZE),
        Err(Errno::EAGAIN),
        "re-faulting an outstanding gfn posts no record"
    );
    fill(&vm, TEST_GPA);
    resolve(fd.as_raw_fd(), TEST_GPA, PAGE).unwrap();
    let (_, r, _) = join(h, "re-entered vCPU");
    assert_eq!(
        expect_sync(r, "re-entered vCPU"),
        vec![page_value(TEST_GPA)]
    );
}

/// One stage-2 fault per demand-paged page (the vCPU's `pf_taken` stat), as a first touch
/// costs anyway: after a USERFAULT exit and a resolve, KVM maps the page at the next KVM_RUN
/// before the guest retries; a VCPU_FAULTS wait that ends with the gfn resolved completes the
/// fault in place. So the guest never faults twice on a page, in either mode (v1: twice).
/// Needs two-dimensional paging (EPT/NPT); skipped under shadow paging.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn one_stage2_fault_per_page() {
    require_userfault!("userfault::one_stage2_fault_per_page");
    if !kvm_selftests::caps::tdp_enabled() {
        skip(
            "userfault::one_stage2_fault_per_page",
            "KVM does not use EPT/NPT here (shadow paging)",
        );
        return;
    }
    const N: u64 = 8;
    for (name, backing) in backings() {
        for mode in ["sync exits", "VCPU_FAULTS"] {
            let what = format!("{name}, {mode}");
            let mut vm = vm_with(backing, N);
            for p in 0..N {
                fill(&vm, TEST_GPA + p * PAGE);
            }
            let fd = (mode == "VCPU_FAULTS")
                .then(|| create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_VCPU_FAULTS).unwrap());
            let mut vcpu = vm.add_vcpu_with(guest_read, &[TEST_GPA, N]).unwrap();
            // A first pass maps the guest's code, stack and the pages themselves.
            let pf0 = vcpu.stat("pf_taken").unwrap();
            for p in 0..N {
                assert_eq!(
                    vcpu.run_to_sync().unwrap(),
                    vec![page_value(TEST_GPA + p * PAGE)]
                );
            }
            vcpu.run_to_done().unwrap();
            let first_touch = vcpu.stat("pf_taken").unwrap() - pf0;
            // Demand page them: USERFAULT zaps exactly the pages, nothing else faults again.
            set_userfault(vm.fd(), TEST_GPA, N * PAGE).unwrap();
            vcpu.set_entry(guest_read, &[TEST_GPA, N]).unwrap();
            let mut faults = Vec::new();
            for p in 0..N {
                let gpa = TEST_GPA + p * PAGE;
                let before = vcpu.stat("pf_taken").unwrap();
                match &fd {
                    None => {
                        match vcpu.run() {
                            Ok(Exit::MemoryFault { flags, gpa: g, .. }) => {
                                assert_ne!(flags & KVM_MEMORY_EXIT_FLAG_USERFAULT, 0, "{what}");
                                assert_eq!(g, gpa, "{what}: exit gpa");
                            }
                            other => panic!("{what}: expected a USERFAULT exit, got {other:?}"),
                        }
                        clear_userfault(vm.fd(), gpa, PAGE).unwrap();
                        assert_eq!(vcpu.run_to_sync().unwrap(), vec![page_value(gpa)], "{what}");
                    }
                    Some(fd) => {
                        let h = run_async(vcpu);
                        let rec = read_one(fd.as_raw_fd(), &what);
                        assert_eq!(rec.gfn, gpa / PAGE, "{what}: record gfn");
                        assert_sleeping(&h, &what);
                        resolve(fd.as_raw_fd(), gpa, PAGE).unwrap();
                        let (v, r, _) = join(h, &what);
                        vcpu = v;
                        assert_eq!(expect_sync(r, &what), vec![page_value(gpa)], "{what}");
                    }
                }
                faults.push(vcpu.stat("pf_taken").unwrap() - before);
            }
            vcpu.run_to_done().unwrap();
            println!(
                "{what}: stage-2 faults per page {faults:?} (first touch: {first_touch} in all)"
            );
            assert_eq!(
                faults,
                vec![1; N as usize],
                "{what}: stage-2 faults per demand-paged page"
            );
        }
    }
}

/// Clearing USERFAULT with KVM_SET_MEMORY_ATTRIBUTES(FLAG_CLEAR) takes no lock, like
/// KVM_USERFAULT_RESOLVE: a memslot update that waits (holding slots_lock) for SRCU readers,
/// one of which is KVM's own access asleep on the very gfn, cannot block it. The CLEAR returns,
/// wakes the sleeper, and then the memslot update completes. (A CLEAR under slots_lock would
/// deadlock until the process is killed.)
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn clear_does_not_wait_for_a_memslot_update() {
    require_userfault!("userfault::clear_does_not_wait_for_a_memslot_update");
    // Memory for the memslot that is added while the sleeper holds SRCU (outlives the VM).
    let extra = HostMapping::anonymous(PAGE as usize).unwrap();
    let mut vm = vm_with(Backing::Anonymous, 1);
    let fd = create_fd(vm.fd(), 0).unwrap();
    set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
    let e = run_async(vm.add_vcpu_with(guest_outs, &[TEST_GPA, 8]).unwrap());
    let rec = read_one(fd.as_raw_fd(), "KVM access");
    assert_eq!(rec.gfn, TEST_GPA / PAGE);
    assert_sleeping(&e, "KVM access");
    let vm = std::sync::Arc::new(vm);
    let (tx, rx) = std::sync::mpsc::channel();
    let (v, hva) = (vm.clone(), extra.addr());
    let creator = std::thread::spawn(move || {
        tx.send(gettid()).unwrap();
        // SAFETY: `hva` is `extra`, a PAGE-byte mapping only raw copies touch, which the test
        // keeps until after the VM's last use.
        unsafe { v.set_region2(2, 0, TEST_GPA + (1 << 30), PAGE, hva, None, 0) }
            .map_err(|e| Errno::from_raw(e.errno()))
    });
    let tid = rx.recv().unwrap();
    assert!(
        wait_in_syscall(tid, libc::SYS_ioctl, timeout()),
        "the memslot update never blocked"
    );
    assert!(
        !creator.is_finished(),
        "the memslot update returned while a KVM access slept on the gfn (it must wait for it)"
    );
    fill(&vm, TEST_GPA);
    let v = vm.clone();
    let clearer = std::thread::spawn(move || clear_userfault(v.fd(), TEST_GPA, PAGE));
    join(
        clearer,
        "KVM_SET_MEMORY_ATTRIBUTES(CLEAR) behind a memslot update",
    )
    .expect("CLEAR USERFAULT");
    let (_, r, data) = join(e, "the KVM access after CLEAR");
    assert_eq!(expect_sync(r, "KVM access"), vec![8]);
    assert_eq!(data, page_value(TEST_GPA).to_le_bytes().to_vec());
    join(creator, "the memslot update after CLEAR").expect("memslot update");
    assert_eq!(poll_in(fd.as_raw_fd(), 0), 0, "one record only");
    drop(vm);
    drop(extra);
}

/// Deleting a memslot does not wait for tasks asleep on its gfns: KVM's own access (the
/// emulator's read for `rep outsb`) is woken and fails (the emulator then treats the gpa,
/// which has no memslot any more, as MMIO), and a VCPU_FAULTS vCPU is woken and retakes the
/// fault on the new memslots (no memslot: an MMIO exit). Neither the delete nor KVM_RUN hangs
/// until a resolve.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn memslot_delete_wakes_sleepers() {
    require_userfault!("userfault::memslot_delete_wakes_sleepers");
    for (name, backing) in backings() {
        for (kind, flags) in [
            ("KVM access", 0),
            ("VCPU_FAULTS vCPU", KVM_USERFAULT_FD_FLAG_VCPU_FAULTS),
        ] {
            let what = format!("{name}: {kind}");
            let mut vm = vm_with(backing, 1);
            let fd = create_fd(vm.fd(), flags).unwrap();
            set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
            let vcpu = if flags == 0 {
                vm.add_vcpu_with(guest_outs, &[TEST_GPA, 8]).unwrap()
            } else {
                vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap()
            };
            let h = run_async(vcpu);
            let rec = read_one(fd.as_raw_fd(), &what);
            assert_eq!(rec.gfn, TEST_GPA / PAGE, "{what}");
            assert_sleeping(&h, &what);
            let vm = std::sync::Arc::new(vm);
            let v = vm.clone();
            let deleter = std::thread::spawn(move || {
                // SAFETY: a deletion (size 0) registers no memory.
                unsafe { v.set_region2(1, 0, TEST_GPA, 0, 0, None, 0) }
                    .map_err(|e| Errno::from_raw(e.errno()))
            });
            join(
                deleter,
                &format!("{what}: memslot delete under the sleeper"),
            )
            .unwrap_or_else(|e| panic!("{what}: delete: {e}"));
            let (_, r, outs) = join(h, &format!("{what}: after its memslot was deleted"));
            match &r {
                Ok(Exit::Other(exit)) if exit.contains("Mmio") => {}
                other => panic!(
                    "{what}: after the delete expected an MMIO exit (the gfn has no memslot), \
                     got {other:?} (port output {outs:x?})"
                ),
            }
            assert!(
                outs.is_empty(),
                "{what}: the emulated read completed: {outs:x?}"
            );
        }
    }
}

// ---- v2: record size negotiation, requeue, VM teardown under an open fd ----

fn create_arg(msg_size: u32) -> kvm_create_userfault_fd {
    kvm_create_userfault_fd {
        msg_size,
        ..Default::default()
    }
}

/// KVM_CREATE_USERFAULT_FD negotiates the record size: a `msg_size` below the first layout (24
/// bytes, including 0) is EINVAL; a larger one is cut down to KVM's record size, which KVM writes
/// back; a non-zero `pad` is EINVAL. Reads then return whole records of the negotiated size,
/// each with that size in its `size` field, however large the buffer.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn create_fd_msg_size() {
    require_userfault!("userfault::create_fd_msg_size");
    let kvm = open_kvm().unwrap();
    let vm = create_barebones(&kvm, 0).unwrap();
    for bad in [0u32, 1, 16, 23] {
        let mut arg = create_arg(bad);
        assert_eq!(
            create_fd_raw(&vm, &mut arg).err(),
            Some(Errno::EINVAL),
            "msg_size {bad}"
        );
    }
    let mut arg = create_arg(USERFAULT_MSG_SIZE as u32);
    arg.pad = 1;
    assert_eq!(
        create_fd_raw(&vm, &mut arg).err(),
        Some(Errno::EINVAL),
        "non-zero pad"
    );
    for ask in [24u32, 25, 4096, u32::MAX] {
        let mut arg = create_arg(ask);
        let fd = create_fd_raw(&vm, &mut arg).unwrap_or_else(|e| panic!("msg_size {ask}: {e}"));
        assert_eq!(
            arg.msg_size, 24,
            "record size negotiated for msg_size {ask}"
        );
        drop(fd);
    }

    // Records from a fd negotiated with msg_size 4096.
    let mut tvm = vm_with(gmem(), 2);
    let mut arg = create_arg(4096);
    arg.flags = KVM_USERFAULT_FD_FLAG_VCPU_FAULTS;
    let fd = create_fd_raw(tvm.fd(), &mut arg).unwrap();
    assert_eq!(arg.msg_size, 24);
    set_userfault(tvm.fd(), TEST_GPA, 2 * PAGE).unwrap();
    let hs: Vec<_> = (0..2)
        .map(|i| {
            run_async(
                tvm.add_vcpu_with(guest_read, &[TEST_GPA + i * PAGE, 1])
                    .unwrap(),
            )
        })
        .collect();
    for h in &hs {
        assert_sleeping(h, "msg_size 4096");
    }
    assert_eq!(
        read_raw(fd.as_raw_fd(), 23),
        Err(Errno::EINVAL),
        "a buffer smaller than the negotiated record"
    );
    let bytes = read_raw(fd.as_raw_fd(), 4096).unwrap();
    assert_eq!(
        bytes.len(),
        48,
        "two whole 24-byte records in a 4096-byte buffer"
    );
    let recs = uf::decode(&bytes);
    for r in &recs {
        check_record_shape(r, "msg_size 4096");
    }
    let mut gfns: Vec<u64> = recs.iter().map(|r| r.gfn).collect();
    gfns.sort();
    assert_eq!(gfns, vec![TEST_GPA / PAGE, TEST_GPA / PAGE + 1]);
    fill(&tvm, TEST_GPA);
    fill(&tvm, TEST_GPA + PAGE);
    resolve(fd.as_raw_fd(), TEST_GPA, 2 * PAGE).unwrap();
    for (i, h) in hs.into_iter().enumerate() {
        let (_, r, _) = join(h, "msg_size 4096");
        assert_eq!(
            expect_sync(r, "msg_size 4096"),
            vec![page_value(TEST_GPA + i as u64 * PAGE)]
        );
    }
}

/// KVM_USERFAULT_REQUEUE re-posts what a crashed handler read but never resolved: nothing while
/// the record is still unread; once it was read, REQUEUE queues it once (a second REQUEUE
/// finds it queued: 0) and it reads again unchanged; after a second "crash" it is queued again;
/// once resolved, nothing is outstanding (0). The faulting vCPU sleeps throughout.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn requeue_after_handler_restart() {
    require_userfault!("userfault::requeue_after_handler_restart");
    let mut vm = vm_with(gmem(), 1);
    let fd = create_fd(
        vm.fd(),
        KVM_USERFAULT_FD_FLAG_VCPU_FAULTS | KVM_USERFAULT_FD_FLAG_NONBLOCK,
    )
    .unwrap();
    let raw = fd.as_raw_fd();
    set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
    let h = run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap());
    assert_sleeping(&h, "requeue");
    assert_ne!(poll_in(raw, 0) & libc::POLLIN, 0, "the record is queued");
    assert_eq!(requeue(raw), Ok(0), "still unread: nothing to queue again");
    let first = read_one(raw, "first read");
    assert_eq!(first.gfn, TEST_GPA / PAGE);
    let flags = KVM_USERFAULT_MSG_GUEST | KVM_USERFAULT_MSG_VCPU | KVM_USERFAULT_MSG_READ;
    assert_eq!(first.flags, flags, "record flags");
    assert_eq!(read_raw(raw, 4 * USERFAULT_MSG_SIZE), Err(Errno::EAGAIN));

    // The handler "crashed" with the record: REQUEUE posts it once more.
    assert_eq!(requeue(raw), Ok(1), "the read, unresolved record");
    assert_eq!(requeue(raw), Ok(0), "already queued again");
    let again = read_one(raw, "read after REQUEUE");
    assert_eq!(again, first, "the requeued record");
    assert_eq!(read_raw(raw, 4 * USERFAULT_MSG_SIZE), Err(Errno::EAGAIN));
    assert_sleeping(&h, "after REQUEUE");

    // And once more after a second crash.
    assert_eq!(requeue(raw), Ok(1), "read again, still unresolved");
    assert_eq!(read_one(raw, "third read"), first);

    fill(&vm, TEST_GPA);
    resolve(raw, TEST_GPA, PAGE).unwrap();
    let (_, r, _) = join(h, "requeue");
    assert_eq!(expect_sync(r, "requeue"), vec![page_value(TEST_GPA)]);
    assert_eq!(requeue(raw), Ok(0), "nothing outstanding after the resolve");
    assert_eq!(read_raw(raw, 4 * USERFAULT_MSG_SIZE), Err(Errno::EAGAIN));
}

/// The fd does not keep the VM alive: once the VM's own fds are closed (VM, vCPUs,
/// guest_memfd and its mappings), the VM is destroyed while the fd stays open; the fd then
/// polls POLLHUP, read() returns 0 (end of file, also on a blocking fd), and RESOLVE and
/// REQUEUE fail with ENODEV. (v1's fd held a VM reference: no HUP ever.)
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn hup_when_vm_destroyed() {
    require_userfault!("userfault::hup_when_vm_destroyed");
    for (name, backing) in backings() {
        let mut vm = vm_with(backing, 1);
        let vcpu = vm.add_vcpu().unwrap();
        let fd = create_fd(vm.fd(), 0).unwrap();
        let raw = fd.as_raw_fd();
        set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
        assert_eq!(
            poll_in(raw, 0),
            0,
            "{name}: nothing to report while the VM lives"
        );
        drop(vcpu);
        drop(vm);
        let revents = poll_in(raw, timeout().as_millis() as i32);
        assert_ne!(
            revents & libc::POLLHUP,
            0,
            "{name}: POLLHUP after the VM was destroyed (revents {revents:#x})"
        );
        assert_eq!(
            read_raw(raw, 4 * USERFAULT_MSG_SIZE),
            Ok(vec![]),
            "{name}: read() at end of file"
        );
        assert_eq!(
            resolve(raw, TEST_GPA, PAGE),
            Err(Errno::ENODEV),
            "{name}: RESOLVE on a dead VM"
        );
        assert_eq!(
            requeue(raw),
            Err(Errno::ENODEV),
            "{name}: REQUEUE on a dead VM"
        );
    }
}

// ---- a second process ----

/// This test binary, to re-execute as a helper process: /proc/self/exe, or argv[0] where
/// /proc is not mounted (a minimal initramfs).
fn self_exe() -> std::path::PathBuf {
    std::env::current_exe().unwrap_or_else(|_| std::env::args_os().next().expect("argv[0]").into())
}

const HELPER_ENV: &str = "KVM_SELFTESTS_USERFAULT_HELPER_FD";

fn send_fds(sock: RawFd, fds: &[RawFd], byte: u8) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [IoSlice::new(std::slice::from_ref(&byte))];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None).expect("sendmsg(SCM_RIGHTS)");
}

fn recv_fds(sock: RawFd) -> (u8, Vec<OwnedFd>) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::empty()).expect("recvmsg");
    let mut fds = Vec::new();
    for c in msg.cmsgs().expect("cmsgs") {
        if let ControlMessageOwned::ScmRights(v) = c {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process for us.
            fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    (byte[0], fds)
}

/// The resolver process: receives [userfault fd, guest_memfd] over the socket, waits for a
/// record, fills the page through its own guest_memfd mapping, resolves through the fd (a VM
/// ioctl is impossible from here: different mm) and reports the gfn back. Runs only when
/// spawned by `resolve_from_second_process`.
#[test]
#[ignore = "helper process of resolve_from_second_process"]
fn second_process_helper() {
    let Ok(sock) = std::env::var(HELPER_ENV) else {
        return;
    };
    let sock: RawFd = sock.parse().expect("helper socket fd");
    let (_, fds) = recv_fds(sock);
    assert_eq!(
        fds.len(),
        2,
        "expected the userfault fd and the guest_memfd"
    );
    let (ufd, gfd) = (fds[0].as_raw_fd(), fds[1].as_raw_fd());
    let rec = read_one(ufd, "helper");
    let gpa = rec.gfn * PAGE;
    let m =
        HostMapping::shared(gfd, PAGE as usize, gpa - TEST_GPA).expect("helper: mmap guest_memfd");
    m.write_u64(0, page_value(gpa) ^ 0x5);
    resolve(ufd, gpa, PAGE).expect("helper: KVM_USERFAULT_RESOLVE");
    let reply = rec.gfn.to_le_bytes();
    // SAFETY: writes 8 bytes from a live array.
    assert_eq!(unsafe { libc::write(sock, reply.as_ptr().cast(), 8) }, 8);
}

/// Firecracker's model: another process gets the fd over SCM_RIGHTS, reads the record, fills
/// the page (through the guest_memfd it also received) and resolves through the fd.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn resolve_from_second_process() {
    require_userfault!("userfault::resolve_from_second_process");
    let mut vm = vm_with(gmem(), 1);
    let fd = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_VCPU_FAULTS).unwrap();
    let gfd = vm.region(1).fd.clone().unwrap();
    let mut pair = [0; 2];
    // SAFETY: `pair` has room for two descriptors. Only pair[1] is inheritable (no CLOEXEC).
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) };
    assert_eq!(r, 0);
    // SAFETY: fresh descriptors we own.
    let (mine, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(mine.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let exe = self_exe();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "second_process_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, theirs.as_raw_fd().to_string())
        .stdout(Stdio::inherit())
        .spawn()
        .expect("spawn the resolver process");
    drop(theirs);
    send_fds(mine.as_raw_fd(), &[fd.as_raw_fd(), gfd.as_raw_fd()], 0);
    // Our copy stays open: the child resolves through its own descriptor of the same file.
    set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
    let h = run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap());
    let (_, r, _) = join(h, "vCPU resolved by the other process");
    assert_eq!(
        expect_sync(r, "second process"),
        vec![page_value(TEST_GPA) ^ 0x5],
        "contents written by the other process"
    );
    let mut reply = [0u8; 8];
    // SAFETY: reads 8 bytes into a live array.
    let n = unsafe { libc::read(mine.as_raw_fd(), reply.as_mut_ptr().cast(), 8) };
    assert_eq!(n, 8, "helper reply");
    assert_eq!(
        u64::from_le_bytes(reply),
        TEST_GPA / PAGE,
        "gfn the helper saw"
    );
    let status = child.wait().expect("wait for the resolver process");
    assert!(status.success(), "resolver process failed: {status}");
}

/// A process whose vCPU sleeps on a gfn dies promptly on SIGKILL (the wait is killable) and
/// the VM is torn down with the waiter present, without hanging.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn teardown_with_sleeping_waiters() {
    require_userfault!("userfault::teardown_with_sleeping_waiters");
    let exe = self_exe();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "teardown_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KVM_SELFTESTS_TEARDOWN_HELPER", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the teardown helper");
    // The helper prints READY once its vCPU is asleep on the gfn.
    let out = child.stdout.take().unwrap();
    let ready = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("TEARDOWN-READY"))
    });
    assert!(
        join(ready, "teardown helper setup"),
        "the helper never reported a sleeping vCPU"
    );
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + timeout();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(st.signal(), Some(libc::SIGKILL), "helper status {st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a process with a vCPU asleep on a gfn did not die on SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "helper process of teardown_with_sleeping_waiters"]
fn teardown_helper() {
    if std::env::var("KVM_SELFTESTS_TEARDOWN_HELPER").is_err() {
        return;
    }
    let mut vm = vm_with(gmem(), 1);
    let fd = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_VCPU_FAULTS).unwrap();
    set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
    let _emu = vm.add_vcpu().unwrap();
    let g = run_async(vm.add_vcpu_with(guest_read, &[TEST_GPA, 1]).unwrap());
    let e = run_async(vm.add_vcpu_with(guest_outs, &[TEST_GPA, 8]).unwrap());
    read_one(fd.as_raw_fd(), "teardown helper");
    assert_sleeping(&g, "teardown helper");
    assert_sleeping(&e, "teardown helper");
    println!("TEARDOWN-READY");
    std::thread::sleep(timeout() * 2);
    panic!("teardown helper was not killed");
}

// ---- bad input ----

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn bad_input_create_fd() {
    require_userfault!("userfault::bad_input_create_fd");
    let kvm = open_kvm().unwrap();
    let vm = create_barebones(&kvm, 0).unwrap();
    let supported = vm.check_extension_raw(KVM_CAP_USERFAULT_FD_FLAGS as libc::c_ulong) as u64;
    assert_ne!(supported, 0, "KVM_CAP_USERFAULT_FD_FLAGS");
    for bit in 0..64 {
        let f = 1u64 << bit;
        if supported & f == 0 {
            assert_eq!(
                create_fd(&vm, f).err(),
                Some(Errno::EINVAL),
                "unknown flag {f:#x}"
            );
        }
    }
    let good = kvm_create_userfault_fd {
        msg_size: USERFAULT_MSG_SIZE as u32,
        ..Default::default()
    };
    for i in 0..6 {
        let mut arg = good;
        arg.reserved[i] = 1;
        assert_eq!(
            create_fd_raw(&vm, &mut arg).err(),
            Some(Errno::EINVAL),
            "non-zero reserved[{i}]"
        );
    }
    let mut arg = good;
    arg.pad = 1;
    assert_eq!(
        create_fd_raw(&vm, &mut arg).err(),
        Some(Errno::EINVAL),
        "non-zero pad"
    );
    let first = create_fd(&vm, 0).unwrap();
    assert_eq!(
        create_fd(&vm, 0).err(),
        Some(Errno::EBUSY),
        "a second fd while one is open"
    );
    assert_eq!(
        create_fd(&vm, KVM_USERFAULT_FD_FLAG_NONBLOCK).err(),
        Some(Errno::EBUSY),
        "a second fd, other flags"
    );
    drop(first);
    drop(create_fd(&vm, 0).expect("a new fd once the first is closed"));
    // Another VM has its own fd.
    let vm2 = create_barebones(&kvm, 0).unwrap();
    let _a = create_fd(&vm, 0).unwrap();
    let _b = create_fd(&vm2, 0).expect("fds are per VM");
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn bad_input_vm_types() {
    require_userfault!("userfault::bad_input_vm_types");
    let kvm: Kvm = open_kvm().unwrap();
    let types = kvm.check_extension_raw(KVM_CAP_VM_TYPES as libc::c_ulong) as u64;
    let mut unsupported = 0;
    for t in (0..64).filter(|t| types & (1 << t) != 0) {
        let Ok(vm) = create_barebones(&kvm, t) else {
            // Some types need hardware (SEV, TDX) to be created at all.
            continue;
        };
        let cap = vm.check_extension_raw(KVM_CAP_USERFAULT as libc::c_ulong);
        let attrs = vm.check_extension_raw(KVM_CAP_MEMORY_ATTRIBUTES as libc::c_ulong) as u64;
        if cap <= 0 {
            unsupported += 1;
            assert_eq!(
                create_fd(&vm, 0).err(),
                Some(Errno::EOPNOTSUPP),
                "VM type {t} without userfault"
            );
            assert_eq!(
                attrs & KVM_MEMORY_ATTRIBUTE_USERFAULT,
                0,
                "VM type {t}: USERFAULT attribute advertised without the capability"
            );
        } else {
            assert_ne!(
                attrs & KVM_MEMORY_ATTRIBUTE_USERFAULT,
                0,
                "VM type {t}: capability without the attribute"
            );
            drop(
                create_fd(&vm, 0)
                    .unwrap_or_else(|e| panic!("VM type {t} advertises userfault but: {e}")),
            );
        }
    }
    if unsupported == 0 {
        skip(
            "userfault::bad_input_vm_types (EOPNOTSUPP part)",
            "every creatable VM type supports userfault here",
        );
    }
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn bad_input_attributes() {
    require_userfault!("userfault::bad_input_attributes");
    let vm = vm_with(gmem(), 4);
    let uf_attr = KVM_MEMORY_ATTRIBUTE_USERFAULT;
    let set = KVM_MEMORY_ATTRIBUTES_FLAG_SET;
    let clear = KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR;
    let cases: [(&str, u64, u64, u64, u64); 10] = [
        // USERFAULT changes only with SET and CLEAR.
        ("exact value listing USERFAULT", TEST_GPA, PAGE, uf_attr, 0),
        ("unaligned gpa", TEST_GPA + 1, PAGE, uf_attr, set),
        ("unaligned size", TEST_GPA, PAGE + 1, uf_attr, set),
        ("zero size", TEST_GPA, 0, uf_attr, set),
        ("gpa + size overflows", !(PAGE - 1), 2 * PAGE, uf_attr, set),
        (
            "SET and CLEAR together",
            TEST_GPA,
            PAGE,
            uf_attr,
            set | clear,
        ),
        ("unknown flag", TEST_GPA, PAGE, uf_attr, 1 << 2),
        ("unknown flag (high)", TEST_GPA, PAGE, uf_attr, 1 << 63),
        ("unknown attribute", TEST_GPA, PAGE, 1 << 5, set),
        (
            "PRIVATE on a default VM",
            TEST_GPA,
            PAGE,
            u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
            set,
        ),
    ];
    for (what, gpa, size, attrs, flags) in cases {
        assert_eq!(
            set_attributes(vm.fd(), gpa, size, attrs, flags),
            Err(Errno::EINVAL),
            "{what}"
        );
    }
    // The valid forms are accepted: an exact value of the other attributes, SET, CLEAR, over
    // both slot kinds and over gfns with no memslot.
    set_attributes(vm.fd(), TEST_GPA, PAGE, 0, 0).expect("exact value 0");
    set_attributes(vm.fd(), TEST_GPA, 4 * PAGE, uf_attr, set).expect("FLAG_SET");
    set_attributes(vm.fd(), TEST_GPA, 4 * PAGE, uf_attr, clear).expect("FLAG_CLEAR");
    set_attributes(vm.fd(), 0, PAGE, uf_attr, set).expect("FLAG_SET on the anonymous system slot");
    set_attributes(vm.fd(), 0, PAGE, uf_attr, clear)
        .expect("FLAG_CLEAR on the anonymous system slot");
    set_attributes(vm.fd(), TEST_GPA + (1 << 30), PAGE, uf_attr, set).expect("SET, no memslot");
    set_attributes(vm.fd(), TEST_GPA + (1 << 30), PAGE, uf_attr, clear).expect("CLEAR, no memslot");
}

/// An exact KVM_SET_MEMORY_ATTRIBUTES (flags 0), as VMMs use for private/shared conversions,
/// leaves USERFAULT as it was: after SET, an exact update to attributes 0 over the page (and
/// over a wider range) keeps it USERFAULT, so the next access still exits; it does not make a
/// page USERFAULT either. Only CLEAR (or RESOLVE) lifts it.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn exact_update_keeps_userfault() {
    require_userfault!("userfault::exact_update_keeps_userfault");
    for (name, backing) in backings() {
        let mut vm = vm_with(backing, 2);
        fill(&vm, TEST_GPA);
        fill(&vm, TEST_GPA + PAGE);
        set_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
        set_attributes(vm.fd(), TEST_GPA, PAGE, 0, 0).expect("exact 0 over the page");
        set_attributes(vm.fd(), TEST_GPA, 2 * PAGE, 0, 0).expect("exact 0 over both pages");
        let mut vcpu = vm.add_vcpu_with(guest_read, &[TEST_GPA, 2]).unwrap();
        match vcpu.run() {
            Ok(Exit::MemoryFault { flags, gpa, size }) => {
                assert_eq!(
                    flags,
                    KVM_MEMORY_EXIT_FLAG_USERFAULT | KVM_MEMORY_EXIT_FLAG_READ,
                    "{name}: exit flags"
                );
                assert_eq!((gpa, size), (TEST_GPA, PAGE), "{name}: exit gpa/size");
            }
            other => panic!("{name}: an exact update cleared USERFAULT: got {other:?}"),
        }
        // Still USERFAULT after another exact update on the re-entry path.
        set_attributes(vm.fd(), TEST_GPA, PAGE, 0, 0).unwrap();
        assert!(
            matches!(vcpu.run(), Ok(Exit::MemoryFault { gpa, .. }) if gpa == TEST_GPA),
            "{name}: USERFAULT must survive exact updates until cleared"
        );
        clear_userfault(vm.fd(), TEST_GPA, PAGE).unwrap();
        assert_eq!(
            vcpu.run_to_sync().unwrap(),
            vec![page_value(TEST_GPA)],
            "{name}: first page after CLEAR"
        );
        // The second page was never SET: exact updates did not make it USERFAULT.
        assert_eq!(
            vcpu.run_to_sync().unwrap(),
            vec![page_value(TEST_GPA + PAGE)],
            "{name}: second page"
        );
    }
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn bad_input_resolve_and_read() {
    require_userfault!("userfault::bad_input_resolve_and_read");
    let vm = vm_with(gmem(), 4);
    let fd = create_fd(vm.fd(), KVM_USERFAULT_FD_FLAG_NONBLOCK).unwrap();
    let raw = fd.as_raw_fd();
    let r = |gpa, size, flags, reserved| kvm_userfault_range {
        gpa,
        size,
        flags,
        reserved,
    };
    let cases = [
        ("unaligned gpa", r(TEST_GPA + 8, PAGE, 0, 0)),
        ("unaligned size", r(TEST_GPA, PAGE - 1, 0, 0)),
        ("zero size", r(TEST_GPA, 0, 0, 0)),
        ("gpa + size overflows", r(!(PAGE - 1), 2 * PAGE, 0, 0)),
        ("non-zero flags", r(TEST_GPA, PAGE, 1, 0)),
        ("non-zero reserved", r(TEST_GPA, PAGE, 0, 1)),
    ];
    for (what, range) in cases {
        assert_eq!(
            resolve_raw(raw, &range),
            Err(Errno::EINVAL),
            "KVM_USERFAULT_RESOLVE with {what}"
        );
    }
    // Resolving a range without USERFAULT is harmless.
    resolve(raw, TEST_GPA, 4 * PAGE).expect("resolve of a range that is not USERFAULT");
    for len in [1, 8, USERFAULT_MSG_SIZE - 1] {
        assert_eq!(
            read_raw(raw, len),
            Err(Errno::EINVAL),
            "read buffer of {len} bytes (smaller than a record)"
        );
    }
    // REQUEUE with nothing outstanding queues nothing.
    assert_eq!(requeue(raw), Ok(0), "KVM_USERFAULT_REQUEUE with no fault");
    // Unknown ioctls on the fd are rejected (0xd8 is KVM_USERFAULT_REQUEUE now).
    for nr in [0xaed9u64, 0x4020_aed8, 0xaed5] {
        // SAFETY: an ioctl number the fd does not implement, with no argument.
        let r = unsafe { libc::ioctl(raw, nr as libc::c_ulong, 0) };
        assert!(r < 0, "unknown ioctl {nr:#x} on the userfault fd");
        assert_eq!(Errno::last(), Errno::ENOTTY, "unknown ioctl {nr:#x}");
    }
}

/// The probe behind `require_userfault!` agrees with the kernel (not ignored; runs
/// everywhere). Without `KVM_CAP_USERFAULT` it refuses and names what is missing. With it, the
/// capability promises what every series test relies on, so the probe must accept, and a
/// default VM must report the USERFAULT attribute and create a userfault fd.
#[test]
fn probe_matches_capabilities() {
    let cap = kvm_selftests::caps::kvm_check_cap(KVM_CAP_USERFAULT as u64);
    let why = kvm_selftests::caps::userfault_unsupported();
    if cap <= 0 {
        let why = why.expect("no KVM_CAP_USERFAULT, but the probe says supported");
        assert!(
            why.contains("KVM_CAP_USERFAULT") || why.contains("/dev/kvm"),
            "{why}"
        );
        return;
    }
    assert_eq!(
        why, None,
        "KVM_CAP_USERFAULT is {cap}, yet the probe refuses"
    );
    let kvm = open_kvm().unwrap();
    let vm = create_barebones(&kvm, 0).unwrap();
    let attrs = vm.check_extension_raw(KVM_CAP_MEMORY_ATTRIBUTES as libc::c_ulong) as u64;
    assert_ne!(
        attrs & KVM_MEMORY_ATTRIBUTE_USERFAULT,
        0,
        "KVM_CAP_USERFAULT is {cap}, but a default VM's KVM_CAP_MEMORY_ATTRIBUTES is {attrs:#x}"
    );
    drop(create_fd(&vm, 0).unwrap_or_else(|e| {
        panic!("KVM_CAP_USERFAULT is {cap}, but KVM_CREATE_USERFAULT_FD fails: {e}")
    }));
}

/// Wake-up races: several vCPUs read the same pages (so faults on one gfn coalesce while others
/// are being resolved) and two reader threads resolve records as they come, for several
/// rounds, re-arming USERFAULT on every page between rounds. Each round every gfn must be
/// reported exactly once and every vCPU must finish (a lost wake-up is a timeout failure).
/// `KVM_SELFTESTS_STRESS_ROUNDS` (default 4) sets the rounds.
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn stress_wake_races() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    require_userfault!("userfault::stress_wake_races");
    let pages = 32;
    let nr_vcpus = 4;
    let rounds = env_u64("KVM_SELFTESTS_STRESS_ROUNDS", 4);
    let mut vm = vm_with(gmem(), pages);
    for p in 0..pages {
        fill(&vm, TEST_GPA + p * PAGE);
    }
    let sum = (0..pages)
        .map(|p| page_value(TEST_GPA + p * PAGE))
        .fold(0, u64::wrapping_add);
    let fd = Arc::new(
        create_fd(
            vm.fd(),
            KVM_USERFAULT_FD_FLAG_VCPU_FAULTS | KVM_USERFAULT_FD_FLAG_NONBLOCK,
        )
        .unwrap(),
    );
    let counts = Arc::new(Mutex::new(vec![0u32; pages as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (fd, counts, stop) = (fd.clone(), counts.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    if poll_in(fd.as_raw_fd(), 10) & libc::POLLIN == 0 {
                        continue;
                    }
                    let recs = match read_records(fd.as_raw_fd(), 8) {
                        Ok(r) => r,
                        Err(Errno::EAGAIN) => continue,
                        Err(e) => panic!("reader: {e}"),
                    };
                    for r in recs {
                        let idx = (r.gfn - TEST_GPA / PAGE) as usize;
                        counts.lock().unwrap()[idx] += 1;
                        resolve(fd.as_raw_fd(), r.gfn * PAGE, PAGE).expect("resolve");
                    }
                }
            })
        })
        .collect();
    let mut vcpus: Vec<Vcpu> = (0..nr_vcpus).map(|_| vm.add_vcpu().unwrap()).collect();
    for round in 0..rounds {
        counts.lock().unwrap().iter_mut().for_each(|c| *c = 0);
        set_userfault(vm.fd(), TEST_GPA, pages * PAGE).unwrap();
        let hs: Vec<_> = vcpus
            .drain(..)
            .map(|v| {
                v.set_entry(guest_sum, &[TEST_GPA, pages]).unwrap();
                run_async(v)
            })
            .collect();
        for h in hs {
            let (v, r, _) = join(h, &format!("round {round}"));
            assert_eq!(
                expect_sync(r, "stress"),
                vec![sum],
                "round {round}: vCPU {}",
                v.id
            );
            vcpus.push(v);
        }
        // Every gfn was faulted by someone, and reported exactly once.
        let deadline = Instant::now() + timeout();
        loop {
            let c = counts.lock().unwrap().clone();
            if c.iter().all(|&n| n == 1) {
                break;
            }
            assert!(
                c.iter().all(|&n| n <= 1),
                "round {round}: a gfn was reported twice: {c:?}"
            );
            assert!(
                Instant::now() < deadline,
                "round {round}: records per gfn {c:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    stop.store(true, Ordering::Release);
    for r in readers {
        r.join().expect("reader panicked");
    }
}
