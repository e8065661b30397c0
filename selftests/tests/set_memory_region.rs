//! Mirrors the memslot-acceptance parts of tools/testing/selftests/kvm/set_memory_region_test.c
//! that concern guest_memfd (host KVM, not ignored), plus the acceptance of the series'
//! capability and USERFAULT attribute (ignored: needs the series).
//!
//! Not mirrored: the move/delete-while-running and MMIO-during-vectoring cases, which do not
//! touch guest_memfd or attributes.

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use kvm_selftests::caps::{kvm_check_cap, skip};
use kvm_selftests::mem::{memfd, HostMapping};
use kvm_selftests::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_USERFAULT, KVM_CAP_VM_TYPES,
    KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR, KVM_MEMORY_ATTRIBUTES_FLAG_SET, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_ATTRIBUTE_USERFAULT, KVM_MEMORY_EXIT_FLAG_USERFAULT, KVM_MEM_GUEST_MEMFD,
};
use kvm_selftests::userfault::set_attributes;
use kvm_selftests::vm::{create_barebones, create_guest_memfd, open_kvm, TEST_GPA};
use kvm_selftests::{require_userfault, Backing, Exit, TestVm};
use nix::errno::Errno;

const MEM_REGION_SIZE: u64 = 0x20_0000;
const MEM_REGION_GPA: u64 = 0xc000_0000;
const MEM_REGION_SLOT: u32 = 10;
const SW_PROTECTED: u64 = kvm_bindings::KVM_X86_SW_PROTECTED_VM as u64;

fn region1(vm: &VmFd, slot: u32, flags: u32, gpa: u64, size: u64, hva: u64) -> Result<(), Errno> {
    let r = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    };
    // SAFETY: either hva is 0/invalid and KVM must reject the region, or the tests keep the
    // mapping alive for the VM's lifetime.
    unsafe { vm.set_user_memory_region(r) }.map_err(|e| Errno::from_raw(e.errno()))
}

#[allow(clippy::too_many_arguments)]
fn region2(
    vm: &VmFd,
    slot: u32,
    flags: u32,
    gpa: u64,
    size: u64,
    hva: u64,
    gmem: i32,
    off: u64,
) -> Result<(), Errno> {
    let r = kvm_bindings::kvm_userspace_memory_region2 {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
        guest_memfd_offset: off,
        guest_memfd: gmem as u32,
        ..Default::default()
    };
    // SAFETY: as for region1.
    unsafe { vm.set_user_memory_region2(r) }.map_err(|e| Errno::from_raw(e.errno()))
}

fn has_sw_protected() -> bool {
    kvm_check_cap(KVM_CAP_VM_TYPES.into()) as u64 & (1 << SW_PROTECTED) != 0
}

/// `test_invalid_memory_region_flags()`.
#[test]
fn invalid_memory_region_flags() {
    let kvm = open_kvm().unwrap();
    let vm = if has_sw_protected() {
        create_barebones(&kvm, SW_PROTECTED)
    } else {
        create_barebones(&kvm, 0)
    }
    .unwrap();
    let mut supported = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY;
    let v2_only = KVM_MEM_GUEST_MEMFD;
    if kvm.check_extension_raw(KVM_CAP_MEMORY_ATTRIBUTES as libc::c_ulong) as u64
        & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
        != 0
    {
        supported |= KVM_MEM_GUEST_MEMFD;
    }
    for i in 0..32 {
        let bit = 1u32 << i;
        if supported & bit != 0 && v2_only & bit == 0 {
            continue;
        }
        assert_eq!(
            region1(&vm, 0, bit, 0, MEM_REGION_SIZE, 0),
            Err(Errno::EINVAL),
            "KVM_SET_USER_MEMORY_REGION should fail on v2-only or unsupported flag {bit:#x}"
        );
        if supported & bit != 0 {
            continue;
        }
        assert_eq!(
            region2(&vm, 0, bit, 0, MEM_REGION_SIZE, 0, 0, 0),
            Err(Errno::EINVAL),
            "KVM_SET_USER_MEMORY_REGION2 should fail on unsupported flag {bit:#x}"
        );
    }
    if supported & KVM_MEM_GUEST_MEMFD != 0 {
        let gfd = create_guest_memfd(&vm, MEM_REGION_SIZE, 0).unwrap();
        assert_eq!(
            region2(
                &vm,
                0,
                KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_GUEST_MEMFD,
                0,
                MEM_REGION_SIZE,
                0,
                gfd.as_raw_fd(),
                0
            ),
            Err(Errno::EINVAL),
            "dirty logging of private memory is unsupported"
        );
        assert_eq!(
            region2(
                &vm,
                0,
                KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD,
                0,
                MEM_REGION_SIZE,
                0,
                gfd.as_raw_fd(),
                0
            ),
            Err(Errno::EINVAL),
            "read-only guest_memfd memslots are unsupported"
        );
    }
}

/// `test_zero_memory_regions()`: a VM without memory cannot run guest code; KVM_RUN fails or
/// reports an internal error/shutdown rather than crashing.
#[test]
fn zero_memory_regions() {
    let kvm = open_kvm().unwrap();
    let vm = create_barebones(&kvm, 0).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    // KVM_SET_NR_MMU_PAGES(64), as the C test does.
    const KVM_SET_NR_MMU_PAGES: libc::c_ulong =
        nix::request_code_none!(0xAE, 0x44) as libc::c_ulong;
    // SAFETY: the ioctl takes its argument by value.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_SET_NR_MMU_PAGES, 64 as libc::c_ulong) };
    assert_eq!(r, 0, "KVM_SET_NR_MMU_PAGES: {}", Errno::last());
    match vcpu.run() {
        Ok(kvm_ioctls::VcpuExit::InternalError) => {}
        Ok(other) => panic!("expected KVM_EXIT_INTERNAL_ERROR with no memslots, got {other:?}"),
        Err(e) => panic!("KVM_RUN with no memslots: {e}"),
    }
}

/// `test_add_max_memory_regions()`: slots up to KVM_CAP_NR_MEMSLOTS can be added, slot id
/// KVM_CAP_NR_MEMSLOTS cannot. Adding all ~32K slots takes minutes under QEMU/TCG, so by
/// default the first 256 and the last valid id are added; `KVM_SELFTESTS_ALL_MEMSLOTS=1` adds
/// every one, as the C test does.
#[test]
fn add_max_memory_regions() {
    let kvm = open_kvm().unwrap();
    let max = kvm.get_nr_memslots() as u64;
    assert!(
        max >= 32,
        "KVM_CAP_NR_MEMSLOTS should be at least 32, is {max}"
    );
    let vm = create_barebones(&kvm, 0).unwrap();
    let per = 2u64 << 20;
    let all = kvm_selftests::caps::env_u64("KVM_SELFTESTS_ALL_MEMSLOTS", 0) != 0;
    let slots: Vec<u64> = if all {
        (0..max).collect()
    } else {
        (0..max.min(256)).chain([max - 1]).collect()
    };
    let mem = HostMapping::anonymous((per * slots.len() as u64) as usize).unwrap();
    for (i, slot) in slots.iter().enumerate() {
        let i = i as u64;
        region1(&vm, *slot as u32, 0, i * per, per, mem.addr() + i * per)
            .unwrap_or_else(|e| panic!("adding slot {slot} of {max}: {e}"));
    }
    let extra = HostMapping::anonymous(per as usize).unwrap();
    assert_eq!(
        region1(
            &vm,
            max as u32,
            0,
            slots.len() as u64 * per,
            per,
            extra.addr()
        ),
        Err(Errno::EINVAL),
        "memslot id KVM_CAP_NR_MEMSLOTS ({max}) should be rejected"
    );
}

/// `test_add_private_memory_region()`.
#[test]
fn add_private_memory_region() {
    if kvm_check_cap(KVM_CAP_GUEST_MEMFD.into()) <= 0 || !has_sw_protected() {
        skip(
            "add_private_memory_region",
            "needs guest_memfd and KVM_X86_SW_PROTECTED_VM",
        );
        return;
    }
    let kvm = open_kvm().unwrap();
    let vm = create_barebones(&kvm, SW_PROTECTED).unwrap();
    let bad = |fd: i32, off: u64, what: &str| {
        assert_eq!(
            region2(
                &vm,
                MEM_REGION_SLOT,
                KVM_MEM_GUEST_MEMFD,
                MEM_REGION_GPA,
                MEM_REGION_SIZE,
                0,
                fd,
                off
            ),
            Err(Errno::EINVAL),
            "{what}"
        );
    };
    bad(kvm.as_raw_fd(), 0, "KVM fd should fail");
    bad(vm.as_raw_fd(), 0, "VM's fd should fail");
    let m = memfd("kvm-selftests", MEM_REGION_SIZE as usize).unwrap();
    bad(m.as_raw_fd(), 0, "regular memfd() should fail");
    let vm2 = create_barebones(&kvm, SW_PROTECTED).unwrap();
    let other = create_guest_memfd(&vm2, MEM_REGION_SIZE, 0).unwrap();
    bad(other.as_raw_fd(), 0, "other VM's guest_memfd() should fail");
    region2(
        &vm2,
        MEM_REGION_SLOT,
        KVM_MEM_GUEST_MEMFD,
        MEM_REGION_GPA,
        MEM_REGION_SIZE,
        0,
        other.as_raw_fd(),
        0,
    )
    .expect("its own VM accepts it");
    let gfd = create_guest_memfd(&vm, MEM_REGION_SIZE, 0).unwrap();
    for off in 1..4096 {
        bad(gfd.as_raw_fd(), off, "unaligned offset should fail");
    }
    region2(
        &vm,
        MEM_REGION_SLOT,
        KVM_MEM_GUEST_MEMFD,
        MEM_REGION_GPA,
        MEM_REGION_SIZE,
        0,
        gfd.as_raw_fd(),
        0,
    )
    .expect("a valid guest_memfd memslot");
}

/// `test_add_overlapping_private_memory_regions()`: overlapping guest_memfd bindings are
/// EEXIST, whether or not the GPA ranges overlap.
#[test]
fn add_overlapping_private_memory_regions() {
    if kvm_check_cap(KVM_CAP_GUEST_MEMFD.into()) <= 0 || !has_sw_protected() {
        skip(
            "add_overlapping_private_memory_regions",
            "needs guest_memfd and KVM_X86_SW_PROTECTED_VM",
        );
        return;
    }
    let kvm = open_kvm().unwrap();
    let vm = create_barebones(&kvm, SW_PROTECTED).unwrap();
    let (sz, gpa, slot) = (MEM_REGION_SIZE, MEM_REGION_GPA, MEM_REGION_SLOT);
    let gfd = create_guest_memfd(&vm, sz * 5, 0).unwrap();
    let fd = gfd.as_raw_fd();
    let f = KVM_MEM_GUEST_MEMFD;
    region2(&vm, slot, f, gpa, sz * 2, 0, fd, 0).unwrap();
    region2(&vm, slot + 1, f, gpa * 2, sz * 2, 0, fd, sz * 2).unwrap();
    // Delete the first, then try to recreate it overlapping the second's binding.
    region2(&vm, slot, f, gpa, 0, 0, -1, 0).unwrap();
    let cases = [
        (gpa, sz, "front half of the other binding"),
        (gpa, sz * 3, "back half of the other binding"),
    ];
    for (g, off, what) in cases {
        assert_eq!(
            region2(&vm, slot, f, g, sz * 2, 0, fd, off),
            Err(Errno::EEXIST),
            "{what}"
        );
    }
    let cases = [
        (gpa * 2 - sz, 0, "overlap in GPA space, front"),
        (gpa * 2 + sz, 0, "overlap in GPA space, back"),
    ];
    for (g, off, what) in cases {
        assert_eq!(
            region2(&vm, slot, f, g, sz * 2, 0, fd, off),
            Err(Errno::EEXIST),
            "{what}"
        );
    }
}

/// Probes and the ioctl agree, on any kernel: a default VM whose KVM_CAP_MEMORY_ATTRIBUTES
/// lacks USERFAULT rejects it with EINVAL; one that reports it accepts it (with FLAG_SET, the
/// only way to set it: an exact update listing it is EINVAL).
#[test]
fn memory_attributes_probe_matches_ioctl() {
    let mut vm = TestVm::new().unwrap();
    vm.add_region(1, TEST_GPA, 4096, Backing::Anonymous)
        .unwrap();
    let attrs = vm.check_cap(KVM_CAP_MEMORY_ATTRIBUTES.into()) as u64;
    let uf = KVM_MEMORY_ATTRIBUTE_USERFAULT;
    let r = set_attributes(vm.fd(), TEST_GPA, 4096, uf, KVM_MEMORY_ATTRIBUTES_FLAG_SET);
    if attrs & KVM_MEMORY_ATTRIBUTE_USERFAULT == 0 {
        // EINVAL for an unsupported attribute; ENOTTY where the VM supports no attributes at
        // all and the ioctl is not even dispatched.
        assert!(
            matches!(r, Err(Errno::EINVAL) | Err(Errno::ENOTTY)),
            "USERFAULT not advertised (attributes {attrs:#x}) but the ioctl gave {r:?}"
        );
        assert_eq!(
            vm.check_cap(KVM_CAP_USERFAULT as u64).max(0),
            0,
            "KVM_CAP_USERFAULT reported without the USERFAULT attribute"
        );
    } else {
        r.expect("USERFAULT advertised but rejected");
        assert_eq!(
            set_attributes(vm.fd(), TEST_GPA, 4096, uf, 0),
            Err(Errno::EINVAL),
            "an exact (flags 0) update listing USERFAULT"
        );
    }
}

/// Loads the word at `gva` and SYNCs it.
extern "C" fn guest_load(gva: u64, _: u64, _: u64, _: u64) {
    // SAFETY: the test maps `gva`; the load may be the USERFAULT exit under test.
    let v = unsafe { kvm_selftests::guest::read_u64(gva) };
    kvm_selftests::guest::sync(&[v]);
}

/// Runs a fresh vCPU that loads the word at `gva`; asserts that the load exits with USERFAULT
/// for `gva`'s page, then clears USERFAULT on that page and asserts that the load completes.
fn assert_userfault_exit(vm: &mut TestVm, gva: u64, what: &str) {
    let mut vcpu = vm.add_vcpu_with(guest_load, &[gva]).unwrap();
    match vcpu.run() {
        Ok(Exit::MemoryFault { flags, gpa, .. }) => {
            assert_ne!(
                flags & KVM_MEMORY_EXIT_FLAG_USERFAULT,
                0,
                "{what}: flags {flags:#x}"
            );
            assert_eq!(gpa, gva & !0xfff, "{what}: exit gpa");
        }
        other => panic!("{what}: expected a USERFAULT exit, got {other:?}"),
    }
    set_attributes(
        vm.fd(),
        gva & !0xfff,
        4096,
        KVM_MEMORY_ATTRIBUTE_USERFAULT,
        KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR,
    )
    .unwrap();
    vcpu.run_to_sync()
        .unwrap_or_else(|e| panic!("{what}: load after CLEAR: {e:#}"));
}

/// The series' acceptance on default VMs: the capability, the attribute in
/// KVM_CAP_MEMORY_ATTRIBUTES, and KVM_SET_MEMORY_ATTRIBUTES changing USERFAULT with SET and
/// CLEAR only, over guest_memfd, anonymous and shmem memslots and over gfns without a memslot:
/// an exact update (flags 0) listing USERFAULT is EINVAL, and one of other attributes
/// (attributes 0 here) leaves USERFAULT as it was (the next access still exits).
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn userfault_attribute_accepted() {
    require_userfault!("set_memory_region::userfault_attribute_accepted");
    let mut vm = TestVm::new().unwrap();
    assert_eq!(
        vm.check_cap(KVM_CAP_USERFAULT as u64),
        1,
        "KVM_CAP_USERFAULT is a yes/no"
    );
    let attrs = vm.check_cap(KVM_CAP_MEMORY_ATTRIBUTES.into()) as u64;
    assert_ne!(
        attrs & KVM_MEMORY_ATTRIBUTE_USERFAULT,
        0,
        "attributes {attrs:#x}"
    );
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    vm.add_mapped_region(1, TEST_GPA, 2 << 20, Backing::GuestMemfd { flags })
        .unwrap();
    vm.add_mapped_region(2, TEST_GPA + (1 << 30), 2 << 20, Backing::Anonymous)
        .unwrap();
    vm.add_mapped_region(3, TEST_GPA + (2 << 30), 2 << 20, Backing::Shmem)
        .unwrap();
    let uf = KVM_MEMORY_ATTRIBUTE_USERFAULT;
    for (what, gpa, has_slot) in [
        ("guest_memfd", TEST_GPA, true),
        ("anonymous", TEST_GPA + (1 << 30), true),
        ("shmem", TEST_GPA + (2 << 30), true),
        ("no memslot", TEST_GPA + (3 << 30), false),
    ] {
        assert_eq!(
            set_attributes(vm.fd(), gpa, 2 << 20, uf, 0),
            Err(Errno::EINVAL),
            "{what}: exact value listing USERFAULT"
        );
        set_attributes(
            vm.fd(),
            gpa + 4096,
            4096,
            uf,
            KVM_MEMORY_ATTRIBUTES_FLAG_SET,
        )
        .unwrap_or_else(|e| panic!("{what}: SET one page: {e}"));
        // An exact update of the other attributes does not touch USERFAULT.
        set_attributes(vm.fd(), gpa, 2 << 20, 0, 0)
            .unwrap_or_else(|e| panic!("{what}: exact 0: {e}"));
        if has_slot {
            assert_userfault_exit(&mut vm, gpa + 4096 + 8, &format!("{what} after exact 0"));
        }
        // Clearing a range wider than what is set is fine.
        set_attributes(vm.fd(), gpa, 2 << 20, uf, KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR)
            .unwrap_or_else(|e| panic!("{what}: CLEAR wider: {e}"));
        set_attributes(vm.fd(), gpa, 2 << 20, 0, 0)
            .unwrap_or_else(|e| panic!("{what}: exact 0: {e}"));
    }
    // Memslots can still be added and deleted over gfns that were SET without a memslot. The
    // state is kept per memslot, so a new memslot starts without USERFAULT: a load from it
    // completes without an exit.
    let gpa4 = TEST_GPA + (4 << 30);
    set_attributes(vm.fd(), gpa4, 2 << 20, uf, KVM_MEMORY_ATTRIBUTES_FLAG_SET).unwrap();
    vm.add_mapped_region(4, gpa4, 2 << 20, Backing::Anonymous)
        .expect("memslot over USERFAULT gfns");
    let mut vcpu = vm.add_vcpu_with(guest_load, &[gpa4 + 8]).unwrap();
    assert_eq!(
        vcpu.run_to_sync().expect("load from the new memslot"),
        vec![0],
        "a new memslot's memory is not USERFAULT"
    );
    // SAFETY: a deletion (size 0) registers no memory.
    unsafe { vm.set_region2(4, 0, gpa4, 0, 0, None, 0) }.expect("delete that memslot");
}
