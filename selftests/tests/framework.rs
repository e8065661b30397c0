//! Self-tests of the guest framework (the C selftests have no counterpart; these pin down
//! what every other test relies on): long mode, ucalls, guest assertions with file:line and
//! values, exception reporting with vector and RIP, several vCPUs, each backing.

use kvm_selftests::guest::{self, read_u64, write_u64};
use kvm_selftests::vm::TEST_GPA;
use kvm_selftests::{guest_assert, guest_assert_eq, Backing, TestVm, Ucall};

extern "C" fn guest_sync_args(a: u64, b: u64, c: u64, d: u64) {
    guest::sync(&[a, b, c, d]);
    guest::sync(&[a.wrapping_add(b)]);
}

#[test]
fn ucall_sync_and_done() {
    let mut vm = TestVm::new().unwrap();
    let mut vcpu = vm.add_vcpu_with(guest_sync_args, &[1, 2, 3, 4]).unwrap();
    assert_eq!(vcpu.run_to_sync().unwrap(), vec![1, 2, 3, 4]);
    assert_eq!(vcpu.run_to_sync().unwrap(), vec![3]);
    // Returning from the entry point reports DONE.
    vcpu.run_to_done().unwrap();
}

extern "C" fn guest_assert_fails(v: u64, _: u64, _: u64, _: u64) {
    guest_assert_eq!(v, 42);
    guest_assert!(v == 7, v, 0x1234);
}

#[test]
fn guest_assert_reports_file_line_and_values() {
    let mut vm = TestVm::new().unwrap();
    let mut vcpu = vm.add_vcpu_with(guest_assert_fails, &[42]).unwrap();
    match vcpu.run().unwrap() {
        kvm_selftests::Exit::Ucall(Ucall::Assert(msg)) => {
            assert!(msg.contains("tests/framework.rs:"), "{msg}");
            assert!(msg.contains("v == 7"), "{msg}");
            assert!(msg.contains("0x2a, 0x1234"), "{msg}");
        }
        e => panic!("expected a guest assertion, got {e:?}"),
    }
    let err = TestVm::new()
        .unwrap()
        .add_vcpu_with(guest_assert_fails, &[5])
        .unwrap()
        .run_to_done()
        .unwrap_err();
    assert!(format!("{err:#}").contains("v == 42"), "{err:#}");
}

extern "C" fn guest_ud(_: u64, _: u64, _: u64, _: u64) {
    // SAFETY: raises #UD on purpose; the IDT stub reports it.
    unsafe { core::arch::asm!("ud2") };
}

extern "C" fn guest_pf(addr: u64, _: u64, _: u64, _: u64) {
    // SAFETY: the address is unmapped on purpose; the IDT stub reports the #PF.
    unsafe { write_u64(addr, 1) };
}

#[test]
fn exceptions_report_vector_and_rip() {
    let mut vm = TestVm::new().unwrap();
    let mut vcpu = vm.add_vcpu_with(guest_ud, &[]).unwrap();
    match vcpu.run_ucall() {
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("#UD (6)"), "{msg}");
        }
        Ok(u) => panic!("expected #UD, got {u:?}"),
    }
    let mut vcpu = vm.add_vcpu_with(guest_pf, &[0x7000_0000_0000]).unwrap();
    match vcpu.run().unwrap() {
        kvm_selftests::Exit::Ucall(Ucall::Unhandled {
            vector,
            cr2,
            error_code,
            rip,
        }) => {
            assert_eq!(vector, 14);
            assert_eq!(cr2, 0x7000_0000_0000);
            assert_eq!(error_code & 0x3, 0x2, "not-present write");
            // RIP is a host code address in this test binary (the store is in guest_pf, or in
            // ptr::write_volatile when a debug build does not inline it).
            let (_, start, end) = kvm_selftests::vm::main_executable().unwrap();
            let sym = kvm_selftests::vm::describe_code(rip);
            assert!(
                (start..end).contains(&rip),
                "rip {rip:#x}{sym} outside the test executable"
            );
            assert!(sym.contains("framework"), "rip {rip:#x} described as {sym}");
        }
        e => panic!("expected #PF, got {e:?}"),
    }
}

extern "C" fn guest_sum(gva: u64, pages: u64, id: u64, _: u64) {
    let mut sum = 0u64;
    let mut i = 0;
    while i < pages {
        // SAFETY: the region [gva, gva + pages * 4096) is mapped by the test.
        unsafe {
            sum = sum.wrapping_add(read_u64(gva + i * 4096));
            write_u64(gva + i * 4096 + 8, id);
        }
        i += 1;
    }
    guest::sync(&[sum]);
}

#[test]
fn several_vcpus_over_each_backing() {
    let backings = [Backing::Anonymous, Backing::Shmem];
    for (n, backing) in backings.into_iter().enumerate() {
        let mut vm = TestVm::new().unwrap();
        let pages = 16u64;
        let slot = 1;
        let gpa = TEST_GPA;
        let region = vm
            .add_mapped_region(slot, gpa, pages * 4096 * 2, backing)
            .unwrap();
        let m = region.mapping.clone();
        for p in 0..pages * 2 {
            m.write_u64((p * 4096) as usize, p);
        }
        let mut threads = Vec::new();
        for id in 0..2u64 {
            let mut vcpu = vm
                .add_vcpu_with(guest_sum, &[gpa + id * pages * 4096, pages, id + 100])
                .unwrap();
            threads.push(std::thread::spawn(move || vcpu.run_to_sync().unwrap()));
        }
        for (id, t) in threads.into_iter().enumerate() {
            let expect: u64 = (0..pages).map(|p| p + id as u64 * pages).sum();
            assert_eq!(t.join().unwrap(), vec![expect], "backing #{n}, vCPU {id}");
        }
        for p in 0..pages * 2 {
            assert_eq!(m.read_u64((p * 4096 + 8) as usize), 100 + p / pages);
        }
    }
}

const OUTS_PORT: u16 = 0x1001;

extern "C" fn guest_outs(gva: u64, len: u64, _: u64, _: u64) {
    // SAFETY: string port output from mapped guest memory; only traps to the host.
    unsafe {
        core::arch::asm!("rep outsb", inout("rsi") gva => _, inout("rcx") len => _,
                         in("dx") OUTS_PORT, options(nostack, preserves_flags));
    }
    guest::sync(&[len]);
}

/// `rep outsb` is emulated by KVM, which reads the source bytes itself: the path the
/// userfault tests use to provoke KVM's own accesses.
#[test]
fn string_io_is_emulated_from_guest_memory() {
    let mut vm = TestVm::new().unwrap();
    let region = vm
        .add_mapped_region(1, TEST_GPA, 4096, Backing::Anonymous)
        .unwrap();
    region.mapping.write(0, b"kvm-test");
    let mut vcpu = vm.add_vcpu_with(guest_outs, &[TEST_GPA, 8]).unwrap();
    let mut out = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            kvm_selftests::Exit::IoOut { port, data } => {
                assert_eq!(port, OUTS_PORT);
                out.extend_from_slice(&data);
            }
            kvm_selftests::Exit::Ucall(Ucall::Sync(a)) => {
                assert_eq!(a, vec![8]);
                break;
            }
            e => panic!("unexpected exit {e:?}"),
        }
    }
    assert_eq!(out, b"kvm-test");
}

extern "C" fn guest_spin(_: u64, _: u64, _: u64, _: u64) {
    loop {
        core::hint::spin_loop();
    }
}

/// A signal to a thread in KVM_RUN makes it return EINTR (the mechanism the userfault signal
/// test relies on; the handler has no SA_RESTART).
#[test]
fn signal_interrupts_kvm_run() {
    extern "C" fn noop(_: libc::c_int) {}
    // SAFETY: installs an async-signal-safe no-op handler without SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let mut vm = TestVm::new().unwrap();
    let mut vcpu = vm.add_vcpu_with(guest_spin, &[]).unwrap();
    let h = std::thread::spawn(move || vcpu.run().map_err(|e| e.errno()));
    std::thread::sleep(std::time::Duration::from_millis(100));
    use std::os::unix::thread::JoinHandleExt;
    // Keep signalling until the thread returns: the first signal may arrive before KVM_RUN.
    while !h.is_finished() {
        // SAFETY: the thread is alive (not finished) and SIGUSR1 has a handler.
        unsafe { libc::pthread_kill(h.as_pthread_t(), libc::SIGUSR1) };
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = h.join().unwrap();
    assert!(
        matches!(r, Err(libc::EINTR) | Ok(kvm_selftests::Exit::Intr)),
        "KVM_RUN after a signal: {r:?}"
    );
}

extern "C" fn guest_stack_alignment(_: u64, _: u64, _: u64, _: u64) {
    let rsp: u64;
    // SAFETY: reads RSP only.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
    // Report RSP and the address of a 16-byte-aligned local: the compiler places it relative
    // to RSP assuming the ABI's entry alignment, so a misaligned entry shows up here.
    let local = core::hint::black_box(0u128);
    guest::sync(&[rsp, &local as *const u128 as u64]);
}

/// Entry points start with the SysV stack alignment (RSP + 8 16-byte aligned at entry), so
/// compiler-generated aligned SSE spills cannot fault.
#[test]
fn entry_stack_is_abi_aligned() {
    let mut vm = TestVm::new().unwrap();
    let mut vcpu = vm.add_vcpu_with(guest_stack_alignment, &[]).unwrap();
    let a = vcpu.run_to_sync().unwrap();
    assert_eq!(
        a[1] % 16,
        0,
        "a u128 local must be 16-byte aligned (rsp {:#x}, local {:#x})",
        a[0],
        a[1]
    );
    vcpu.run_to_done().unwrap();
}

extern "C" fn guest_ins(gva: u64, len: u64, _: u64, _: u64) {
    // SAFETY: string port input into mapped guest memory; only traps to the host.
    unsafe {
        core::arch::asm!("rep insb", inout("rdi") gva => _, inout("rcx") len => _,
                         in("dx") OUTS_PORT, options(nostack, preserves_flags));
        guest::sync(&[read_u64(gva)]);
    }
}

/// `rep insb` is emulated too: KVM writes the bytes userspace supplied into guest memory
/// (the KVM-write path of the userfault tests).
#[test]
fn string_input_is_emulated_into_guest_memory() {
    let mut vm = TestVm::new().unwrap();
    let region = vm
        .add_mapped_region(1, TEST_GPA, 4096, Backing::Anonymous)
        .unwrap();
    let m = region.mapping.clone();
    let mut vcpu = vm.add_vcpu_with(guest_ins, &[TEST_GPA + 8, 8]).unwrap();
    vcpu.io_in_fill = 0xab;
    let mut supplied = 0;
    loop {
        match vcpu.run().unwrap() {
            kvm_selftests::Exit::IoIn { port, len } => {
                assert_eq!(port, OUTS_PORT);
                supplied += len;
            }
            kvm_selftests::Exit::Ucall(Ucall::Sync(a)) => {
                assert_eq!(a, vec![0xabab_abab_abab_abab]);
                break;
            }
            e => panic!("unexpected exit {e:?}"),
        }
    }
    assert_eq!(supplied, 8);
    assert_eq!(m.read_u64(8), 0xabab_abab_abab_abab);
    assert_eq!(m.read_u64(0), 0, "bytes before the destination untouched");
}

extern "C" fn guest_call(gva: u64, _: u64, _: u64, _: u64) {
    // SAFETY: the test put a `ret` at `gva`, identity mapped and executable.
    let f: extern "C" fn() = unsafe { core::mem::transmute(gva as usize) };
    f();
    guest::sync(&[gva]);
}

/// Guest code can run from test memory (the exec-fault path of the userfault tests).
#[test]
fn execute_from_test_memory() {
    let mut vm = TestVm::new().unwrap();
    let region = vm
        .add_mapped_region(1, TEST_GPA, 4096, Backing::Anonymous)
        .unwrap();
    region.mapping.write(0x10, &[0xc3]); // ret
    let mut vcpu = vm.add_vcpu_with(guest_call, &[TEST_GPA + 0x10]).unwrap();
    assert_eq!(vcpu.run_to_sync().unwrap(), vec![TEST_GPA + 0x10]);
}
