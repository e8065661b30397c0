//! The test VM: x86_64 long mode, memory regions, vCPUs and the host side of ucalls.
//!
//! Mirrors kvm selftests' `lib/kvm_util.c` + `lib/x86/processor.c`: 4-level page tables, a GDT
//! with 64-bit code/data and a TSS, an IDT whose 256 gates report unexpected exceptions
//! (vector, RIP, error code, CR2) through the ucall channel, and per-vCPU stacks.
//!
//! Guest physical layout of slot 0 (the "system" slot, anonymous memory):
//!
//! | GPA                | what                                                        |
//! |--------------------|-------------------------------------------------------------|
//! | 0x1000             | GDT                                                         |
//! | 0x2000             | IDT (256 gates)                                             |
//! | 0x3000             | TSS                                                         |
//! | 0x10_0000..+4 MiB  | page-table pool                                             |
//! | 0x50_0000..+1 MiB  | shared data ([`TestVm::alloc_guest_mem`])                   |
//! | 0x60_0000..        | vCPU stacks, [`STACK_SIZE`] each, [`VmOptions::max_vcpus`]   |
//! | 0x100_0000.. (or after the stacks, 2 MiB aligned) | copy of the test process's loaded image (see guest.rs) |
//!
//! The GDT/IDT/TSS, shared data and stacks are mapped at [`SYS_GVA`] + GPA, far from where
//! Linux puts executables and libraries; the image copy at the host's own addresses. Test
//! regions go at or above [`TEST_GPA`] (4 GiB, like guest_memfd_test, clear of the PCI hole).
//!
//! # Who owns the memory
//!
//! KVM reads and writes a memslot's memory through its `userspace_addr` for as long as the VM
//! exists in the kernel, which is as long as the VM fd *or any vCPU fd* is open. So the VM fd
//! and every mapping registered as a memslot are owned together, in one shared object that the
//! [`TestVm`], each [`Vcpu`] and each [`VmHandle`] hold: the mappings are unmapped only after
//! the last of them is dropped, and then after the VM fd is closed. The fds are only lent
//! out (`&VmFd`, `&VcpuFd`), so no safe code can close the VM while keeping the memory's
//! address, or unmap the memory while KVM can still reach it. The one way to register other
//! memory is the `unsafe` [`TestVm::set_region2`].

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_segment, kvm_userspace_memory_region2, kvm_xcrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VmFd};
use kvm_userfault::ioctls::{Capabilities, UserfaultError, UserfaultFd};

use crate::guest::{self, GuestFn};
use crate::image::image_segments;
use crate::mem::{Backing, GuestMem, HostMapping};
use crate::uapi;

pub use crate::image::{describe_code, main_executable};
pub use crate::vcpu::{vector_name, Exit, Ucall, Vcpu};

pub const SYS_GVA: u64 = 0x1000_0000_0000;
pub const TEST_GPA: u64 = 1 << 32;
/// vCPUs a VM has stacks for unless [`VmOptions::max_vcpus`] says otherwise.
pub const MAX_VCPUS: usize = 64;
/// The most [`VmOptions::max_vcpus`] accepts (x86's `KVM_MAX_VCPUS` without MAXSMP).
pub const VCPU_LIMIT: usize = 1024;
pub const STACK_SIZE: u64 = 128 << 10;

const GDT_GPA: u64 = 0x1000;
const IDT_GPA: u64 = 0x2000;
const TSS_GPA: u64 = 0x3000;
const PT_POOL_GPA: u64 = 0x10_0000;
const PT_POOL_END: u64 = 0x50_0000;
const SHARED_GPA: u64 = 0x50_0000;
const SHARED_END: u64 = 0x60_0000;
/// Allocations of shared data start on their own cache line.
const SHARED_ALIGN: u64 = 64;
const STACKS_GPA: u64 = 0x60_0000;
const IMAGE_MIN_GPA: u64 = 0x100_0000;
const HUGE: u64 = 2 << 20;

const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
const KERNEL_TSS: u16 = 0x18;

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// A memslot and its host side: a description, and a share of its memory.
///
/// Cloning a region is cheap and shares its mappings and fd: while any clone lives, the memory
/// stays mapped, so a clone handed to another thread (a fault handler that fills the region
/// through raw pointers) never writes to unmapped or reused memory, even if the VM is gone.
/// Changing a clone's fields changes nothing in KVM.
#[derive(Debug, Clone)]
pub struct Region {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub backing: Backing,
    /// The memslot's `userspace_addr` mapping.
    pub mapping: Arc<HostMapping>,
    /// memfd (shmem) or guest_memfd.
    pub fd: Option<Arc<OwnedFd>>,
    /// A second mapping of a shmem region, not registered with anyone (userfaultfd MINOR fills
    /// the page cache through it).
    pub alias: Option<Arc<HostMapping>>,
}

impl Region {
    pub fn hva(&self, gpa: u64) -> u64 {
        assert!(
            gpa >= self.gpa && gpa < self.gpa + self.size,
            "gpa {gpa:#x} outside slot {}",
            self.slot
        );
        self.mapping.addr() + (gpa - self.gpa)
    }
}

#[derive(Debug, Clone, Copy)]
struct GvaMap {
    gva: u64,
    gpa: u64,
    len: u64,
}

/// What vCPU threads need to decode ucalls: the guest virtual → host address translation.
#[derive(Debug, Default)]
pub(crate) struct AddressSpace {
    maps: Vec<GvaMap>,
    /// (gpa, size, mapping) of every region.
    regions: Vec<(u64, u64, Arc<HostMapping>)>,
}

impl AddressSpace {
    pub(crate) fn gpa_to_host(&self, gpa: u64, len: u64) -> Option<(Arc<HostMapping>, usize)> {
        self.regions.iter().find_map(|(base, size, m)| {
            (gpa >= *base && gpa.checked_add(len)? <= base + size)
                .then(|| (m.clone(), (gpa - base) as usize))
        })
    }

    pub(crate) fn gva_to_gpa(&self, gva: u64, len: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|m| gva >= m.gva && gva.checked_add(len).is_some_and(|e| e <= m.gva + m.len))
            .map(|m| m.gpa + (gva - m.gva))
    }

    pub(crate) fn read_gva(&self, gva: u64, out: &mut [u8]) -> Result<()> {
        let len = out.len() as u64;
        let gpa = self
            .gva_to_gpa(gva, len)
            .ok_or_else(|| anyhow!("guest address {gva:#x} (+{len}) not mapped"))?;
        let (m, off) = self
            .gpa_to_host(gpa, len)
            .ok_or_else(|| anyhow!("gpa {gpa:#x} (+{len}) not in a memslot"))?;
        m.read(off, out);
        Ok(())
    }

    pub(crate) fn read_str(&self, gva: u64, len: u64) -> String {
        let len = len.min(4096) as usize;
        let mut buf = vec![0u8; len];
        match self.read_gva(gva, &mut buf) {
            Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
            Err(e) => format!("<unreadable string at {gva:#x}: {e}>"),
        }
    }
}

/// The kernel VM and the memory its memslots point at, owned together (see the module
/// documentation): shared by the [`TestVm`], its vCPUs and its [`VmHandle`]s.
pub(crate) struct VmShared {
    // Declared first, so that it is closed before the mappings in `aspace` are unmapped.
    pub(crate) fd: VmFd,
    /// Every region's mapping, and the guest virtual → host translation vCPU threads need to
    /// decode ucalls.
    aspace: Mutex<AddressSpace>,
}

impl VmShared {
    /// The address space; a thread that panicked while holding it left it consistent (every
    /// update is a single push or retain).
    pub(crate) fn aspace(&self) -> MutexGuard<'_, AddressSpace> {
        self.aspace.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for VmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShared")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

/// A shared handle on a VM's fd, for other threads (resolvers, teardown ioctls). It holds the
/// VM's memory too, so that memory stays mapped for as long as anything can use the fd
/// through the handle, even after the [`TestVm`] is dropped.
#[derive(Debug, Clone)]
pub struct VmHandle(Arc<VmShared>);

impl VmHandle {
    pub fn fd(&self) -> &VmFd {
        &self.0.fd
    }
}

/// How to build a [`TestVm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOptions {
    /// `KVM_CREATE_VM`'s type (0: the default VM).
    pub vm_type: u64,
    /// vCPUs the system slot has stacks for (1..=[`VCPU_LIMIT`]). Stack memory is only
    /// allocated where a guest touches it, so a large value costs address space only.
    pub max_vcpus: usize,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            vm_type: 0,
            max_vcpus: MAX_VCPUS,
        }
    }
}

/// A VM under test.
///
/// Its fields are private: the VM fd is lent out ([`TestVm::fd`], [`TestVm::handle`]), the
/// regions are read-only views ([`TestVm::regions`]) and removing one goes through
/// [`TestVm::remove_region`], which deletes the memslot before it gives the memory back.
pub struct TestVm {
    kvm: Kvm,
    vm: Arc<VmShared>,
    vm_type: u64,
    max_vcpus: usize,
    regions: Vec<Region>,
    pml4: u64,
    pt_next: u64,
    shared_next: u64,
    next_vcpu: u64,
    cpuid: kvm_bindings::CpuId,
}

impl std::fmt::Debug for TestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestVm")
            .field("vm_type", &self.vm_type)
            .field("regions", &self.regions)
            .finish()
    }
}

/// Opens /dev/kvm with a message that says what is missing.
pub fn open_kvm() -> Result<Kvm> {
    Kvm::new().context("open /dev/kvm (is KVM available and are you allowed to use it?)")
}

/// A VM with no memory or vCPUs (`vm_create_barebones_type`).
pub fn create_barebones(kvm: &Kvm, vm_type: u64) -> Result<VmFd> {
    kvm.create_vm_with_type(vm_type)
        .with_context(|| format!("KVM_CREATE_VM(type {vm_type})"))
}

impl TestVm {
    /// A default-type VM with the system slot set up and the test image loaded.
    pub fn new() -> Result<Self> {
        Self::with_options(VmOptions::default())
    }

    pub fn with_type(vm_type: u64) -> Result<Self> {
        Self::with_options(VmOptions {
            vm_type,
            ..VmOptions::default()
        })
    }

    pub fn with_options(opts: VmOptions) -> Result<Self> {
        let VmOptions { vm_type, max_vcpus } = opts;
        ensure!(
            (1..=VCPU_LIMIT).contains(&max_vcpus),
            "max_vcpus must be 1..={VCPU_LIMIT}, not {max_vcpus}"
        );
        let kvm = open_kvm()?;
        let fd = create_barebones(&kvm, vm_type)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        let image = image_segments()?;
        let image_size: u64 = image.iter().map(|s| s.1 - s.0).sum();
        let stacks = STACK_SIZE * max_vcpus as u64;
        let image_gpa = align_up(STACKS_GPA + stacks, HUGE).max(IMAGE_MIN_GPA);
        let sys_size = align_up(image_gpa + image_size, HUGE);
        let mut vm = TestVm {
            kvm,
            vm: Arc::new(VmShared {
                fd,
                aspace: Mutex::default(),
            }),
            vm_type,
            max_vcpus,
            regions: Vec::new(),
            pml4: 0,
            pt_next: PT_POOL_GPA,
            shared_next: SHARED_GPA,
            next_vcpu: 0,
            cpuid,
        };
        vm.add_region(0, 0, sys_size, Backing::Anonymous)
            .context("system memslot")?;
        vm.pml4 = vm.alloc_pt_page()?;
        // GDT/IDT/TSS page, the shared data and the stacks, at SYS_GVA + gpa.
        vm.map(SYS_GVA + GDT_GPA, GDT_GPA, 0x3000)?;
        vm.map(SYS_GVA + SHARED_GPA, SHARED_GPA, SHARED_END - SHARED_GPA)?;
        vm.map(SYS_GVA + STACKS_GPA, STACKS_GPA, stacks)?;
        vm.write_descriptor_tables()?;
        // The image copy, at the host's addresses.
        let mut gpa = image_gpa;
        let sys = vm.regions[0].mapping.clone();
        for (start, end) in image {
            let len = end - start;
            // SAFETY: [start, end) is a page-rounded PT_LOAD range of a loaded object, mapped
            // and readable for the life of the process (we only read it).
            let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, len as usize) };
            sys.write(gpa as usize, bytes);
            vm.map(start, gpa, len)
                .with_context(|| format!("map image segment {start:#x}..{end:#x}"))?;
            gpa += len;
        }
        Ok(vm)
    }

    /// The /dev/kvm handle the VM was created from.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd, lent: it cannot outlive the VM's memory. What is created from it is not
    /// covered: a `VcpuFd` made with `fd().create_vcpu()` keeps the VM alive but not its memory
    /// (and neither do guest_memfds a test keeps), so vCPUs are made with
    /// [`TestVm::add_vcpu`], whose `Vcpu` holds the memory too. (This is a test framework: the
    /// selftests need the raw fd for the ioctls they test.)
    pub fn fd(&self) -> &VmFd {
        &self.vm.fd
    }

    /// A handle on the VM fd that other threads can own; it keeps the VM's memory mapped.
    pub fn handle(&self) -> VmHandle {
        VmHandle(self.vm.clone())
    }

    pub fn vm_type(&self) -> u64 {
        self.vm_type
    }

    /// vCPUs this VM has stacks for.
    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    pub fn region(&self, slot: u32) -> &Region {
        self.regions
            .iter()
            .find(|r| r.slot == slot)
            .unwrap_or_else(|| panic!("no slot {slot}"))
    }

    /// Creates the backing for and registers memslot `slot` at `gpa`. Guest_memfd regions use
    /// `KVM_SET_USER_MEMORY_REGION2` with the guest_memfd mapping as `userspace_addr`.
    pub fn add_region(
        &mut self,
        slot: u32,
        gpa: u64,
        size: u64,
        backing: Backing,
    ) -> Result<&Region> {
        let len = size as usize;
        let (mapping, fd, alias) = match backing {
            Backing::Anonymous => (HostMapping::anonymous(len)?, None, None),
            Backing::AnonymousThp => (HostMapping::anonymous_thp(len)?, None, None),
            Backing::Shmem => {
                let fd = crate::mem::memfd("kvm-testvm", len)?;
                let m = HostMapping::shared(fd.as_raw_fd(), len, 0)?;
                let alias = HostMapping::shared(fd.as_raw_fd(), len, 0)?;
                (m, Some(fd), Some(Arc::new(alias)))
            }
            Backing::GuestMemfd { flags } => {
                ensure!(
                    flags & uapi::GUEST_MEMFD_FLAG_MMAP != 0,
                    "guest_memfd regions need GUEST_MEMFD_FLAG_MMAP"
                );
                let fd = self.create_guest_memfd(size, flags).map_err(|e| {
                    anyhow!("KVM_CREATE_GUEST_MEMFD(size {size:#x}, flags {flags:#x}): {e}")
                })?;
                let m = HostMapping::shared(fd.as_raw_fd(), len, 0).context("mmap(guest_memfd)")?;
                (m, Some(fd), None)
            }
        };
        let gmem = match backing {
            Backing::GuestMemfd { .. } => fd.as_ref().map(|f| f.as_raw_fd()),
            _ => None,
        };
        let mapping = Arc::new(mapping);
        // The mapping joins the VM's memory before KVM can use it: from here on it lives as
        // long as the VM.
        self.vm.aspace().regions.push((gpa, size, mapping.clone()));
        // SAFETY: `mapping` is `len` bytes of memory no Rust reference points at, and it is
        // now owned with the VM fd (above), so it stays mapped while KVM can use the slot.
        let r = unsafe { self.set_region2(slot, 0, gpa, size, mapping.addr(), gmem, 0) };
        if let Err(e) = r {
            self.vm
                .aspace()
                .regions
                .retain(|(_, _, m)| !Arc::ptr_eq(m, &mapping));
            bail!("KVM_SET_USER_MEMORY_REGION2(slot {slot}, gpa {gpa:#x}, size {size:#x}, {backing:?}): {e}");
        }
        self.regions.push(Region {
            slot,
            gpa,
            size,
            backing,
            mapping,
            fd: fd.map(Arc::new),
            alias,
        });
        Ok(self.regions.last().expect("just pushed"))
    }

    /// Deletes memslot `slot` and returns its region. KVM no longer references the memory once
    /// the deletion returned, so the memory now lives exactly as long as the returned region
    /// (or another clone of it). The guest page tables still map the range, now to no memslot.
    pub fn remove_region(&mut self, slot: u32) -> Result<Region> {
        ensure!(slot != 0, "slot 0 holds the page tables and the guest code");
        let i = self
            .regions
            .iter()
            .position(|r| r.slot == slot)
            .with_context(|| format!("no slot {slot}"))?;
        let gpa = self.regions[i].gpa;
        // SAFETY: a size of 0 deletes the slot; KVM registers no memory.
        unsafe { self.set_region2(slot, 0, gpa, 0, 0, None, 0) }
            .map_err(|e| anyhow!("deleting memslot {slot} (gpa {gpa:#x}): {e}"))?;
        let r = self.regions.remove(i);
        self.vm
            .aspace()
            .regions
            .retain(|(_, _, m)| !Arc::ptr_eq(m, &r.mapping));
        Ok(r)
    }

    /// Raw `KVM_SET_USER_MEMORY_REGION2`; returns the errno so tests can check rejections.
    ///
    /// # Safety
    /// If KVM accepts a slot of non-zero `size`, `[hva, hva + size)` must stay mapped, and not
    /// be memory that Rust code accesses through references, until the slot is deleted or the
    /// VM (its fd, every vCPU fd and every [`VmHandle`]) is gone: KVM reads and writes it on
    /// the guest's behalf. Memory the regions of this VM own qualifies; deletions (size 0) and
    /// calls KVM rejects have no requirement.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn set_region2(
        &self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        hva: u64,
        guest_memfd: Option<RawFd>,
        gmem_offset: u64,
    ) -> std::result::Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region2 {
            slot,
            flags: flags
                | if guest_memfd.is_some() {
                    uapi::KVM_MEM_GUEST_MEMFD
                } else {
                    0
                },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
            guest_memfd_offset: gmem_offset,
            guest_memfd: guest_memfd.unwrap_or(0) as u32,
            ..Default::default()
        };
        // SAFETY: the caller upholds this function's contract for the memory; KVM itself
        // validates the address range against the process's mm.
        unsafe { self.vm.fd.set_user_memory_region2(region) }
    }

    /// `KVM_CREATE_GUEST_MEMFD`.
    pub fn create_guest_memfd(
        &self,
        size: u64,
        flags: u64,
    ) -> std::result::Result<OwnedFd, kvm_ioctls::Error> {
        create_guest_memfd(&self.vm.fd, size, flags)
    }

    /// Allocates `len` bytes of zeroed guest memory for data the host and the guest share
    /// (arguments, results, progress counters), like the C selftests' `vm_vaddr_alloc()`: in
    /// the system slot, mapped at [`GuestMem::gva`], each allocation on its own cache line.
    pub fn alloc_guest_mem(&mut self, len: u64) -> Result<GuestMem> {
        let gpa = self.shared_next;
        let end = gpa
            .checked_add(len)
            .filter(|&e| len > 0 && e <= SHARED_END)
            .with_context(|| {
                format!(
                    "shared guest memory exhausted: {len:#x} bytes asked, {:#x} left",
                    SHARED_END - gpa
                )
            })?;
        self.shared_next = align_up(end, SHARED_ALIGN).min(SHARED_END);
        let sys = self.regions[0].mapping.clone();
        sys.fill(gpa as usize, len as usize, 0);
        Ok(GuestMem::new(
            SYS_GVA + gpa,
            gpa,
            sys,
            gpa as usize,
            len as usize,
        ))
    }

    fn alloc_pt_page(&mut self) -> Result<u64> {
        ensure!(self.pt_next < PT_POOL_END, "page-table pool exhausted");
        let gpa = self.pt_next;
        self.pt_next += 4096;
        self.regions[0].mapping.fill(gpa as usize, 4096, 0);
        Ok(gpa)
    }

    fn pte_slot(&mut self, table: u64, index: u64, leaf: bool) -> Result<(usize, u64)> {
        let off = (table + index * 8) as usize;
        let sys = self.regions[0].mapping.clone();
        let e = sys.read_u64(off);
        if leaf || e & PTE_P != 0 {
            return Ok((off, e));
        }
        let next = self.alloc_pt_page()?;
        sys.write_u64(off, next | PTE_P | PTE_RW);
        Ok((off, next | PTE_P | PTE_RW))
    }

    /// Maps `[gva, gva+len)` to `[gpa, gpa+len)` (`virt_map`), with 2 MiB pages where both are
    /// aligned. Overlapping an existing mapping is an error (e.g. the image copy).
    pub fn map(&mut self, gva: u64, gpa: u64, len: u64) -> Result<()> {
        ensure!(
            gva.is_multiple_of(4096) && gpa.is_multiple_of(4096) && len.is_multiple_of(4096),
            "unaligned map {gva:#x} -> {gpa:#x} +{len:#x}"
        );
        ensure!(
            gva + len <= 1 << 47,
            "gva {gva:#x} +{len:#x} is not canonical in 4-level paging"
        );
        {
            let mut a = self.vm.aspace();
            if let Some(m) = a
                .maps
                .iter()
                .find(|m| gva < m.gva + m.len && m.gva < gva + len)
            {
                bail!(
                    "mapping {gva:#x}+{len:#x} overlaps existing {:#x}+{:#x}",
                    m.gva,
                    m.len
                );
            }
            a.maps.push(GvaMap { gva, gpa, len });
        }
        let sys = self.regions[0].mapping.clone();
        let mut off = 0;
        while off < len {
            let (va, pa) = (gva + off, gpa + off);
            let huge = va % (2 << 20) == 0 && pa % (2 << 20) == 0 && len - off >= 2 << 20;
            let (_, pml4e) = self.pte_slot(self.pml4, (va >> 39) & 511, false)?;
            let (_, pdpte) = self.pte_slot(pml4e & PTE_ADDR, (va >> 30) & 511, false)?;
            if huge {
                let (o, _) = self.pte_slot(pdpte & PTE_ADDR, (va >> 21) & 511, true)?;
                sys.write_u64(o, pa | PTE_P | PTE_RW | PTE_PS);
                off += 2 << 20;
            } else {
                let (_, pde) = self.pte_slot(pdpte & PTE_ADDR, (va >> 21) & 511, false)?;
                ensure!(pde & PTE_PS == 0, "4K mapping of {va:#x} inside a 2M page");
                let (o, _) = self.pte_slot(pde & PTE_ADDR, (va >> 12) & 511, true)?;
                sys.write_u64(o, pa | PTE_P | PTE_RW);
                off += 4096;
            }
        }
        Ok(())
    }

    /// Adds a region at `gpa` and identity-maps it (gva == gpa), the common case for tests.
    pub fn add_mapped_region(
        &mut self,
        slot: u32,
        gpa: u64,
        size: u64,
        backing: Backing,
    ) -> Result<&Region> {
        self.add_region(slot, gpa, size, backing)?;
        self.map(gpa, gpa, size)?;
        Ok(self.region(slot))
    }

    fn write_descriptor_tables(&mut self) -> Result<()> {
        let sys = self.regions[0].mapping.clone();
        let tss_base = SYS_GVA + TSS_GPA;
        let gdt: [u64; 5] = [
            0,
            0x00af_9b00_0000_ffff, // 64-bit code, DPL0, accessed
            0x00cf_9300_0000_ffff, // data, writable, accessed
            // 64-bit busy TSS (type 0xb), limit 0x67; 16 bytes.
            0x67 | ((tss_base & 0xff_ffff) << 16)
                | (0x8b << 40)
                | (((tss_base >> 24) & 0xff) << 56),
            tss_base >> 32,
        ];
        for (i, d) in gdt.iter().enumerate() {
            sys.write_u64(GDT_GPA as usize + i * 8, *d);
        }
        let stubs = guest::kvm_selftests_idt_stubs as *const () as u64;
        for v in 0..256u64 {
            let h = stubs + v * guest::IDT_STUB_SIZE;
            let lo = (h & 0xffff)
                | ((KERNEL_CS as u64) << 16)
                | (0x8e << 40)
                | (((h >> 16) & 0xffff) << 48);
            sys.write_u64((IDT_GPA + v * 16) as usize, lo);
            sys.write_u64((IDT_GPA + v * 16 + 8) as usize, h >> 32);
        }
        Ok(())
    }

    /// Adds a vCPU in 64-bit mode with the host's supported CPUID, ready for `set_entry`.
    pub fn add_vcpu(&mut self) -> Result<Vcpu> {
        let id = self.next_vcpu;
        ensure!(
            (id as usize) < self.max_vcpus,
            "at most {} vCPUs (VmOptions::max_vcpus)",
            self.max_vcpus
        );
        let fd = self
            .vm
            .fd
            .create_vcpu(id)
            .with_context(|| format!("KVM_CREATE_VCPU({id})"))?;
        self.next_vcpu += 1;
        fd.set_cpuid2(&self.cpuid).context("KVM_SET_CPUID2")?;
        let has_xsave = self
            .cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 1 && e.ecx & (1 << 26) != 0);
        let mut sregs = fd.get_sregs().context("KVM_GET_SREGS")?;
        let code = kvm_segment {
            selector: KERNEL_CS,
            limit: 0xffff_ffff,
            type_: 0xb,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: KERNEL_DS,
            type_: 0x3,
            l: 0,
            db: 1,
            ..code
        };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_segment {
            selector: KERNEL_TSS,
            base: SYS_GVA + TSS_GPA,
            limit: 0x67,
            type_: 0xb,
            present: 1,
            ..Default::default()
        };
        sregs.ldt = kvm_segment {
            unusable: 1,
            ..Default::default()
        };
        sregs.gdt.base = SYS_GVA + GDT_GPA;
        sregs.gdt.limit = 5 * 8 - 1;
        sregs.idt.base = SYS_GVA + IDT_GPA;
        sregs.idt.limit = 256 * 16 - 1;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | if has_xsave { CR4_OSXSAVE } else { 0 };
        sregs.cr3 = self.pml4;
        // NXE as in the C selftests (vcpu_init_sregs): besides allowing NX, it makes
        // instruction fetches identifiable in page-fault error codes.
        let has_nx = self
            .cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 20) != 0);
        sregs.efer = EFER_LME | EFER_LMA | if has_nx { EFER_NXE } else { 0 };
        fd.set_sregs(&sregs).context("KVM_SET_SREGS")?;
        if has_xsave {
            // Enable every user state KVM supports so that host-compiled code (e.g. libc
            // string functions picked for the host CPU) runs unmodified in the guest.
            let xcr0 = self
                .cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == 0xd && e.index == 0)
                .map(|e| e.eax as u64 | (e.edx as u64) << 32)
                .unwrap_or(3);
            let mut xcrs = kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = xcr0 | 3;
            fd.set_xcrs(&xcrs).context("KVM_SET_XCRS")?;
        }
        let stack_top = SYS_GVA + STACKS_GPA + (id + 1) * STACK_SIZE;
        Ok(Vcpu::new(id, fd, self.vm.clone(), stack_top))
    }

    /// Adds a vCPU and points it at `entry(args...)`.
    pub fn add_vcpu_with(&mut self, entry: GuestFn, args: &[u64]) -> Result<Vcpu> {
        let v = self.add_vcpu()?;
        v.set_entry(entry, args)?;
        Ok(v)
    }

    /// `KVM_CHECK_EXTENSION` on the VM fd.
    pub fn check_cap(&self, cap: u64) -> i32 {
        self.vm.fd.check_extension_raw(cap as libc::c_ulong)
    }

    /// `KVM_CHECK_EXTENSION`-based probe of the KVM userfault series and guest_memfd support.
    pub fn probe(&self) -> Capabilities {
        kvm_userfault::ioctls::probe(&self.vm.fd)
    }

    /// Fails, with a message that says how to get it, unless the kernel has the KVM
    /// userfault series; returns `KVM_CAP_USERFAULT`.
    pub fn require_userfault(&self) -> std::result::Result<u64, UserfaultError> {
        kvm_userfault::ioctls::require_userfault(&self.vm.fd)
    }

    /// Sets or clears USERFAULT on `[gpa, gpa + size)`, leaving other attributes alone.
    pub fn set_userfault(&self, gpa: u64, size: u64, on: bool) -> Result<()> {
        kvm_userfault::ioctls::set_userfault(&self.vm.fd, gpa, size, on).with_context(|| {
            format!("KVM_SET_MEMORY_ATTRIBUTES USERFAULT={on} on {gpa:#x}+{size:#x}")
        })
    }

    /// `KVM_CREATE_USERFAULT_FD`, with the record size negotiated (see the runtime's
    /// `create_userfault_fd`).
    pub fn create_userfault_fd(
        &self,
        flags: u64,
    ) -> std::result::Result<UserfaultFd, UserfaultError> {
        kvm_userfault::ioctls::create_userfault_fd(&self.vm.fd, flags)
    }
}

/// `KVM_CREATE_GUEST_MEMFD` on any VM fd.
pub fn create_guest_memfd(
    vm: &VmFd,
    size: u64,
    flags: u64,
) -> std::result::Result<OwnedFd, kvm_ioctls::Error> {
    let gmem = kvm_create_guest_memfd {
        size,
        flags,
        ..Default::default()
    };
    let fd = vm.create_guest_memfd(gmem)?;
    // SAFETY: KVM returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}
