//! What the framework promises about memory and VM lifetime (see `vm.rs`'s module
//! documentation), and the pieces the demo VMM needs: memory that outlives the `TestVm` while a
//! vCPU or a handle can still reach it, memslot removal, shared guest data, more vCPUs than the
//! default, large regions mapped with 2 MiB guest pages.

use kvm_testvm::guest::{self, read_u64, write_u64};
use kvm_testvm::vm::{TEST_GPA, VCPU_LIMIT};
use kvm_testvm::{Backing, Exit, TestVm, VmOptions};

/// Reads the word at `addr`, reports it, then writes `v` there and reports again.
extern "C" fn guest_read_then_write(addr: u64, v: u64, _: u64, _: u64) {
    // SAFETY: the test maps `addr` (identity) before it runs this guest.
    let old = unsafe { read_u64(addr) };
    guest::sync(&[old]);
    // SAFETY: as above.
    unsafe { write_u64(addr, v) };
    guest::sync(&[v]);
}

fn skip_without_kvm() -> bool {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: /dev/kvm not available");
        return true;
    }
    false
}

/// A vCPU keeps the VM alive in the kernel, so it keeps its memory mapped: after the `TestVm`
/// is dropped the guest still reads and writes the region it was given.
#[test]
fn a_vcpu_keeps_the_memory_after_the_vm_is_dropped() {
    if skip_without_kvm() {
        return;
    }
    let mut vm = TestVm::new().unwrap();
    let r = vm
        .add_mapped_region(1, TEST_GPA, 2 << 20, Backing::Anonymous)
        .unwrap()
        .clone();
    r.mapping.write_u64(0x100, 0x1122_3344);
    let mut vcpu = vm
        .add_vcpu_with(guest_read_then_write, &[TEST_GPA + 0x100, 0x55])
        .unwrap();
    let handle = vm.handle();
    drop(vm);
    assert_eq!(vcpu.run_to_sync().unwrap(), vec![0x1122_3344]);
    assert_eq!(vcpu.run_to_sync().unwrap(), vec![0x55]);
    assert_eq!(
        r.mapping.read_u64(0x100),
        0x55,
        "the guest wrote the same memory"
    );
    vcpu.run_to_done().unwrap();
    // The handle still reaches the VM.
    assert!(
        handle
            .fd()
            .check_extension_raw(kvm_bindings::KVM_CAP_USER_MEMORY as _)
            > 0
    );
}

/// A removed region is no longer guest memory (an access becomes MMIO), while the region
/// returned keeps its contents readable; the slot can then be reused.
#[test]
fn removed_region_is_gone_for_the_guest_and_kept_for_the_host() {
    if skip_without_kvm() {
        return;
    }
    let mut vm = TestVm::new().unwrap();
    vm.add_mapped_region(1, TEST_GPA, 2 << 20, Backing::Shmem)
        .unwrap();
    vm.region(1).mapping.write_u64(0, 7);
    let mut vcpu = vm
        .add_vcpu_with(guest_read_then_write, &[TEST_GPA, 8])
        .unwrap();
    assert_eq!(vcpu.run_to_sync().unwrap(), vec![7]);
    let removed = vm.remove_region(1).unwrap();
    assert!(vm.regions().iter().all(|r| r.slot != 1));
    match vcpu.run() {
        Ok(Exit::Other(e)) if e.contains("Mmio") => {}
        other => panic!("a write to a removed memslot must be MMIO, got {other:?}"),
    }
    assert_eq!(
        removed.mapping.read_u64(0),
        7,
        "the write did not reach the memory"
    );
    assert!(vm.remove_region(1).is_err(), "removed twice");
    assert!(vm.remove_region(0).is_err(), "the system slot");
    // The slot and its guest physical range are free again.
    vm.add_region(1, TEST_GPA, 2 << 20, Backing::Anonymous)
        .unwrap();
}

extern "C" fn guest_count_into(counter: u64, n: u64, _: u64, _: u64) {
    let mut i = 0;
    while i < n {
        i += 1;
        // SAFETY: `counter` is shared guest memory the test allocated.
        unsafe { write_u64(counter, i) };
    }
}

#[test]
fn shared_guest_memory_is_seen_by_both_sides() {
    if skip_without_kvm() {
        return;
    }
    let mut vm = TestVm::new().unwrap();
    let a = vm.alloc_guest_mem(8).unwrap();
    let b = vm.alloc_guest_mem(100).unwrap();
    assert_eq!(a.gva() % 64, 0);
    assert!(b.gva() >= a.gva() + 64, "allocations share a cache line");
    b.write_u64(0, u64::MAX);
    let mut vcpu = vm
        .add_vcpu_with(guest_count_into, &[a.gva(), 1000])
        .unwrap();
    vcpu.run_to_done().unwrap();
    assert_eq!(a.read_u64(0), 1000);
    assert_eq!(
        b.read_u64(0),
        u64::MAX,
        "the guest wrote outside its allocation"
    );
    assert!(
        vm.alloc_guest_mem(64 << 20).is_err(),
        "more than the area holds"
    );
    assert!(vm.alloc_guest_mem(0).is_err());
}

extern "C" fn guest_deep_stack(depth: u64, _: u64, _: u64, _: u64) {
    // 2 KiB of stack per vCPU: a vCPU beyond the default 64 must have a stack of its own.
    // Uninitialised and written word by word: `[0; N]` would be a call to libc's memset.
    let mut buf = core::mem::MaybeUninit::<[u64; 256]>::uninit();
    let p = buf.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < 256 {
        // SAFETY: `p + i` lies in the local array; volatile so that the stack use stays.
        unsafe { p.add(i).write_volatile(depth + i as u64) };
        i += 1;
    }
    // SAFETY: written above.
    let last = unsafe { p.add(255).read_volatile() };
    guest::sync(&[last]);
}

#[test]
fn more_vcpus_than_the_default() {
    if skip_without_kvm() {
        return;
    }
    let n = 70;
    let mut vm = TestVm::with_options(VmOptions {
        max_vcpus: n,
        ..VmOptions::default()
    })
    .unwrap();
    let mut vcpus: Vec<_> = (0..n)
        .map(|i| vm.add_vcpu_with(guest_deep_stack, &[i as u64]).unwrap())
        .collect();
    assert!(vm.add_vcpu().is_err(), "one vCPU more than max_vcpus");
    // The last two, whose stacks lie beyond the default area.
    for v in vcpus.iter_mut().rev().take(2) {
        let id = v.id;
        assert_eq!(v.run_to_sync().unwrap(), vec![id + 255]);
    }
    assert!(TestVm::with_options(VmOptions {
        max_vcpus: VCPU_LIMIT + 1,
        ..VmOptions::default()
    })
    .is_err());
}

extern "C" fn guest_write_words(a: u64, b: u64, c: u64, _: u64) {
    // Three stores, not a loop over an array: iterating one by value is a libc memcpy in a
    // debug build, which the guest must not call.
    // SAFETY: the test maps the region the three addresses lie in.
    unsafe {
        write_u64(a, a);
        write_u64(b, b);
        write_u64(c, c);
    }
}

/// A 4 GiB region is mapped with 2 MiB guest pages: with 4 KiB pages its 2048 page tables
/// would not fit the 4 MiB page-table pool. The guest reaches its first, a middle and its last
/// page (only those: with THP each touched 2 MiB costs 2 MiB of memory).
#[test]
fn large_region_mapped_with_huge_guest_pages() {
    if skip_without_kvm() {
        return;
    }
    let mut vm = TestVm::new().unwrap();
    let (gpa, len) = (TEST_GPA, 4u64 << 30);
    vm.add_mapped_region(1, gpa, len, Backing::Anonymous)
        .unwrap();
    let words = [gpa, gpa + len / 2 + 0x1008, gpa + len - 8];
    let mut vcpu = vm.add_vcpu_with(guest_write_words, &words).unwrap();
    vcpu.run_to_done().unwrap();
    let m = &vm.region(1).mapping;
    for w in words {
        assert_eq!(m.read_u64((w - gpa) as usize), w);
    }
}
