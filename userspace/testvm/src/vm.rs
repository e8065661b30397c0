//! The test VM: x86_64 long mode, memory regions, vCPUs and the host side of ucalls.
//!
//! Mirrors kvm selftests' `lib/kvm_util.c` + `lib/x86/processor.c`: 4-level page tables, a GDT
//! with 64-bit code/data and a TSS, an IDT whose 256 gates report unexpected exceptions
//! (vector, RIP, error code, CR2) through the ucall channel, and per-vCPU stacks.
//!
//! Guest physical layout of slot 0 (the "system" slot, anonymous memory):
//!
//! | GPA                | what                                                   |
//! |--------------------|--------------------------------------------------------|
//! | 0x1000             | GDT                                                    |
//! | 0x2000             | IDT (256 gates)                                        |
//! | 0x3000             | TSS                                                    |
//! | 0x10_0000..+4 MiB  | page-table pool                                        |
//! | 0x60_0000..        | vCPU stacks, [`STACK_SIZE`] each, [`MAX_VCPUS`]         |
//! | 0x100_0000..       | copy of the test process's loaded image (see guest.rs) |
//!
//! The GDT/IDT/TSS/stacks are mapped at [`SYS_GVA`] + GPA, far from where Linux puts
//! executables and libraries; the image copy at the host's own addresses. Test regions go at
//! or above [`TEST_GPA`] (4 GiB, like guest_memfd_test, clear of the PCI hole).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_regs, kvm_segment, kvm_userspace_memory_region2, kvm_xcrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::guest::{self, GuestFn, UcallRecord, UCALL_PORT};
use crate::mem::{page_size, Backing, HostMapping};
use crate::uapi;

pub const SYS_GVA: u64 = 0x1000_0000_0000;
pub const TEST_GPA: u64 = 1 << 32;
pub const MAX_VCPUS: usize = 64;
pub const STACK_SIZE: u64 = 128 << 10;

const GDT_GPA: u64 = 0x1000;
const IDT_GPA: u64 = 0x2000;
const TSS_GPA: u64 = 0x3000;
const PT_POOL_GPA: u64 = 0x10_0000;
const PT_POOL_END: u64 = 0x50_0000;
const STACKS_GPA: u64 = 0x60_0000;
const IMAGE_GPA: u64 = 0x100_0000;

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

/// A memslot and its host side.
#[derive(Debug)]
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
struct AddressSpace {
    maps: Vec<GvaMap>,
    /// (gpa, size, mapping) of every region.
    regions: Vec<(u64, u64, Arc<HostMapping>)>,
}

impl AddressSpace {
    fn gpa_to_host(&self, gpa: u64, len: u64) -> Option<(Arc<HostMapping>, usize)> {
        self.regions.iter().find_map(|(base, size, m)| {
            (gpa >= *base && gpa.checked_add(len)? <= base + size)
                .then(|| (m.clone(), (gpa - base) as usize))
        })
    }

    fn gva_to_gpa(&self, gva: u64, len: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|m| gva >= m.gva && gva.checked_add(len).is_some_and(|e| e <= m.gva + m.len))
            .map(|m| m.gpa + (gva - m.gva))
    }

    fn read_gva(&self, gva: u64, out: &mut [u8]) -> Result<()> {
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

    fn read_str(&self, gva: u64, len: u64) -> String {
        let len = len.min(4096) as usize;
        let mut buf = vec![0u8; len];
        match self.read_gva(gva, &mut buf) {
            Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
            Err(e) => format!("<unreadable string at {gva:#x}: {e}>"),
        }
    }
}

/// A decoded ucall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ucall {
    Sync(Vec<u64>),
    Done,
    /// A failed `guest_assert!`, already formatted with file:line, expression and values.
    Assert(String),
    /// An exception the guest did not expect.
    Unhandled {
        vector: u64,
        rip: u64,
        error_code: u64,
        cr2: u64,
    },
}

/// Why `KVM_RUN` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Ucall(Ucall),
    /// `KVM_EXIT_MEMORY_FAULT` (KVM_RUN returned -1/EFAULT).
    MemoryFault {
        flags: u64,
        gpa: u64,
        size: u64,
    },
    /// `KVM_EXIT_INTR` (KVM_RUN returned -1/EINTR maps to `Err(EINTR)` instead).
    Intr,
    /// Port output to a port other than the ucall port (e.g. a guest `rep outsb`).
    IoOut {
        port: u16,
        data: Vec<u8>,
    },
    /// Port input from a port other than the ucall port; `len` bytes of
    /// [`Vcpu::io_in_fill`] were supplied.
    IoIn {
        port: u16,
        len: usize,
    },
    Other(String),
}

/// Exception vector names, for messages.
pub fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        _ => "vector",
    }
}

/// One vCPU: owns its fd; `Send`, so tests run it on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    pub id: u64,
    pub fd: VcpuFd,
    /// The byte returned for guest port input (see [`Exit::IoIn`]).
    pub io_in_fill: u8,
    aspace: Arc<Mutex<AddressSpace>>,
    stack_top: u64,
}

impl Vcpu {
    /// Points the vCPU at `entry` with up to four arguments and a fresh stack whose return
    /// address reports DONE.
    pub fn set_entry(&self, entry: GuestFn, args: &[u64]) -> Result<()> {
        ensure!(args.len() <= 4, "at most four guest arguments");
        // The return address sits at the top of the stack, as if `entry` had been called:
        // the SysV ABI wants RSP + 8 16-byte aligned at function entry (SSE spills use movaps).
        let rsp = self.stack_top - 8;
        {
            let a = self.aspace.lock().unwrap();
            let gpa = a.gva_to_gpa(rsp, 8).context("stack not mapped")?;
            let (m, off) = a.gpa_to_host(gpa, 8).context("stack not in a slot")?;
            m.write_u64(off, guest::kvm_selftests_guest_return as *const () as u64);
        }
        let mut regs = kvm_regs {
            rflags: 0x2,
            rip: entry as *const () as u64,
            rsp,
            rbp: 0,
            ..Default::default()
        };
        let mut a = [0u64; 4];
        a[..args.len()].copy_from_slice(args);
        (regs.rdi, regs.rsi, regs.rdx, regs.rcx) = (a[0], a[1], a[2], a[3]);
        self.fd.set_regs(&regs).context("KVM_SET_REGS")?;
        Ok(())
    }

    /// One `KVM_RUN`. `Err` carries the errno of a failed KVM_RUN other than a memory fault
    /// exit (e.g. EINTR, EFAULT without KVM_EXIT_MEMORY_FAULT).
    pub fn run(&mut self) -> std::result::Result<Exit, kvm_ioctls::Error> {
        let fill = self.io_in_fill;
        let exit = match self.fd.run()? {
            VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) if port == UCALL_PORT => None,
            VcpuExit::IoOut(port, data) => {
                return Ok(Exit::IoOut {
                    port,
                    data: data.to_vec(),
                })
            }
            VcpuExit::IoIn(port, data) => {
                // Port input (e.g. a guest `rep insb`): supply `io_in_fill` bytes; KVM stores
                // them into guest memory when the vCPU is re-entered.
                data.fill(fill);
                return Ok(Exit::IoIn {
                    port,
                    len: data.len(),
                });
            }
            VcpuExit::MemoryFault { flags, gpa, size } => {
                return Ok(Exit::MemoryFault { flags, gpa, size })
            }
            VcpuExit::Intr => return Ok(Exit::Intr),
            other => Some(format!("{other:?}")),
        };
        if let Some(other) = exit {
            let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
            let detail = self.internal_error_detail();
            return Ok(Exit::Other(format!(
                "{other} at RIP {rip:#x}{}{detail}",
                describe_code(rip)
            )));
        }
        let rdi = self.fd.get_regs()?.rdi;
        Ok(Exit::Ucall(self.decode_ucall(rdi)))
    }

    /// For KVM_EXIT_INTERNAL_ERROR: the suberror and its data words (e.g. 1 = emulation
    /// failure, typically an instruction fetch from a GPA with no memslot).
    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            return String::new();
        }
        // SAFETY: exit_reason says the `internal` union member is the valid one.
        let ie = unsafe { run.__bindgen_anon_1.internal };
        let n = (ie.ndata as usize).min(ie.data.len());
        format!(" (suberror {}, data {:x?})", ie.suberror, &ie.data[..n])
    }

    /// The ucall whose record the guest passed at `gva` (its RDI at the ucall's port I/O), for
    /// a caller that had to read the registers itself (e.g. after a failed KVM_GET_REGS).
    pub fn decode_ucall(&self, gva: u64) -> Ucall {
        let a = self.aspace.lock().unwrap();
        let mut raw = [0u8; std::mem::size_of::<UcallRecord>()];
        if let Err(e) = a.read_gva(gva, &mut raw) {
            return Ucall::Assert(format!("ucall with an unreadable record at {gva:#x}: {e}"));
        }
        // SAFETY: UcallRecord is repr(C) plain integers; any bit pattern is valid.
        let rec: UcallRecord = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        let args = rec.args[..(rec.nargs as usize).min(guest::UCALL_MAX_ARGS)].to_vec();
        match rec.cmd {
            guest::UCALL_SYNC => Ucall::Sync(args),
            guest::UCALL_DONE => Ucall::Done,
            guest::UCALL_ASSERT => {
                let file = a.read_str(rec.file_ptr, rec.file_len);
                let expr = a.read_str(rec.msg_ptr, rec.msg_len);
                let vals: Vec<String> = args.iter().map(|v| format!("{v:#x}")).collect();
                Ucall::Assert(format!(
                    "guest assertion failed at {file}:{}: `{expr}` (values: {})",
                    rec.line,
                    vals.join(", ")
                ))
            }
            guest::UCALL_UNHANDLED if args.len() >= 4 => Ucall::Unhandled {
                vector: args[0],
                rip: args[1],
                error_code: args[2],
                cr2: args[3],
            },
            guest::UCALL_UNHANDLED => Ucall::Assert(format!(
                "unhandled-exception ucall with {} args",
                args.len()
            )),
            c => Ucall::Assert(format!("unknown ucall command {c}")),
        }
    }

    /// Runs until the next ucall; guest assertion failures, unexpected exceptions, memory-fault
    /// exits and other exits become errors with context.
    pub fn run_ucall(&mut self) -> Result<Ucall> {
        let id = self.id;
        match self.run().with_context(|| format!("vCPU {id}: KVM_RUN"))? {
            Exit::Ucall(Ucall::Assert(msg)) => bail!("vCPU {id}: {msg}"),
            Exit::Ucall(Ucall::Unhandled { vector, rip, error_code, cr2 }) => bail!(
                "vCPU {id}: unexpected guest exception {} ({vector}) at RIP {rip:#x}{}, error code {error_code:#x}, CR2 {cr2:#x}",
                vector_name(vector),
                describe_code(rip)
            ),
            Exit::Ucall(u) => Ok(u),
            other => bail!("vCPU {id}: unexpected exit {other:?}"),
        }
    }

    /// Runs until the guest reports DONE.
    pub fn run_to_done(&mut self) -> Result<()> {
        match self.run_ucall()? {
            Ucall::Done => Ok(()),
            u => bail!("vCPU {}: expected DONE, got {u:?}", self.id),
        }
    }

    /// Runs until the next SYNC and returns its arguments.
    pub fn run_to_sync(&mut self) -> Result<Vec<u64>> {
        match self.run_ucall()? {
            Ucall::Sync(a) => Ok(a),
            u => bail!("vCPU {}: expected SYNC, got {u:?}", self.id),
        }
    }

    /// The raw `kvm_run` page.
    pub fn kvm_run(&mut self) -> &mut kvm_bindings::kvm_run {
        self.fd.get_kvm_run()
    }

    /// A vCPU binary statistic by name (e.g. `pf_taken`, `exits`), like the C tests'
    /// `vcpu_get_stat()`: `KVM_GET_STATS_FD`, then the header, the descriptors and the
    /// statistic's first value read with `pread`.
    pub fn stat(&self, name: &str) -> Result<u64> {
        // `KVM_GET_STATS_FD = _IO(KVMIO, 0xce)`.
        const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
        // SAFETY: an ioctl without an argument on our vCPU fd; returns a new fd or -1.
        let raw = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_GET_STATS_FD, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("KVM_GET_STATS_FD");
        }
        // SAFETY: a fresh fd returned by KVM, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let pread = |off: u64, len: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len];
            // SAFETY: reads at most `len` bytes into `buf`, which has `len` bytes.
            let n = unsafe {
                libc::pread(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    len,
                    off as libc::off_t,
                )
            };
            ensure!(
                n == len as isize,
                "short read of the stats fd ({n} of {len} bytes at {off:#x}): {}",
                std::io::Error::last_os_error()
            );
            Ok(buf)
        };
        let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        // struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset,
        // data_offset (u32 each).
        let h = pread(0, 24)?;
        let (name_size, num_desc) = (u32_at(&h, 4) as usize, u32_at(&h, 8) as usize);
        let (desc_offset, data_offset) = (u32_at(&h, 16) as u64, u32_at(&h, 20) as u64);
        // struct kvm_stats_desc: flags u32, exponent s16, size u16, offset u32, bucket_size
        // u32, then the name (name_size bytes, NUL terminated).
        let stride = 16 + name_size;
        let descs = pread(desc_offset, stride * num_desc)?;
        for d in descs.chunks_exact(stride) {
            let n = &d[16..];
            let n = &n[..n.iter().position(|&c| c == 0).unwrap_or(n.len())];
            if n == name.as_bytes() {
                let offset = u32_at(d, 8) as u64;
                let v = pread(data_offset + offset, 8)?;
                return Ok(u64::from_ne_bytes(v[..8].try_into().unwrap()));
            }
        }
        bail!("vCPU {}: no binary statistic named {name:?}", self.id)
    }
}

/// A VM under test.
pub struct TestVm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub vm_type: u64,
    regions: Vec<Region>,
    aspace: Arc<Mutex<AddressSpace>>,
    pml4: u64,
    pt_next: u64,
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
        Self::with_type(0)
    }

    pub fn with_type(vm_type: u64) -> Result<Self> {
        let kvm = open_kvm()?;
        let fd = create_barebones(&kvm, vm_type)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        let image = image_segments()?;
        let image_size: u64 = image.iter().map(|s| s.1 - s.0).sum();
        let sys_size = align_up(IMAGE_GPA + image_size, 2 << 20);
        let mut vm = TestVm {
            kvm,
            fd,
            vm_type,
            regions: Vec::new(),
            aspace: Arc::default(),
            pml4: 0,
            pt_next: PT_POOL_GPA,
            next_vcpu: 0,
            cpuid,
        };
        vm.add_region(0, 0, sys_size, Backing::Anonymous)
            .context("system memslot")?;
        vm.pml4 = vm.alloc_pt_page()?;
        // GDT/IDT/TSS page and the stacks, at SYS_GVA + gpa.
        vm.map(SYS_GVA + GDT_GPA, GDT_GPA, 0x3000)?;
        vm.map(
            SYS_GVA + STACKS_GPA,
            STACKS_GPA,
            STACK_SIZE * MAX_VCPUS as u64,
        )?;
        vm.write_descriptor_tables()?;
        // The image copy, at the host's addresses.
        let mut gpa = IMAGE_GPA;
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
                let fd = crate::mem::memfd("kvm-selftests", len)?;
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
        self.set_region2(slot, 0, gpa, size, mapping.addr(), gmem, 0)
            .map_err(|e| anyhow!("KVM_SET_USER_MEMORY_REGION2(slot {slot}, gpa {gpa:#x}, size {size:#x}, {backing:?}): {e}"))?;
        let mapping = Arc::new(mapping);
        self.aspace
            .lock()
            .unwrap()
            .regions
            .push((gpa, size, mapping.clone()));
        self.regions.push(Region {
            slot,
            gpa,
            size,
            backing,
            mapping,
            fd: fd.map(Arc::new),
            alias,
        });
        Ok(self.regions.last().unwrap())
    }

    /// Raw `KVM_SET_USER_MEMORY_REGION2`; returns the errno so tests can check rejections.
    #[allow(clippy::too_many_arguments)]
    pub fn set_region2(
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
        // SAFETY: callers pass either a mapping they keep alive for the slot's lifetime
        // (add_region stores it) or a deliberately invalid region that KVM must reject; KVM
        // itself validates the address range against the caller's mm.
        unsafe { self.fd.set_user_memory_region2(region) }
    }

    /// `KVM_CREATE_GUEST_MEMFD`.
    pub fn create_guest_memfd(
        &self,
        size: u64,
        flags: u64,
    ) -> std::result::Result<OwnedFd, kvm_ioctls::Error> {
        create_guest_memfd(&self.fd, size, flags)
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
            let mut a = self.aspace.lock().unwrap();
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
        ensure!((id as usize) < MAX_VCPUS, "at most {MAX_VCPUS} vCPUs");
        let fd = self
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
        Ok(Vcpu {
            id,
            fd,
            io_in_fill: 0,
            aspace: self.aspace.clone(),
            stack_top: SYS_GVA + STACKS_GPA + (id + 1) * STACK_SIZE,
        })
    }

    /// Adds a vCPU and points it at `entry(args...)`.
    pub fn add_vcpu_with(&mut self, entry: GuestFn, args: &[u64]) -> Result<Vcpu> {
        let v = self.add_vcpu()?;
        v.set_entry(entry, args)?;
        Ok(v)
    }

    /// `KVM_CHECK_EXTENSION` on the VM fd.
    pub fn check_cap(&self, cap: u64) -> i32 {
        self.fd.check_extension_raw(cap as libc::c_ulong)
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

/// " (in OBJECT: SYMBOL+off)" for a guest RIP, which is a host code address (see guest.rs).
/// Guest code that strays into libc (e.g. a compiler-generated `memcpy` call, whose host
/// variant may use instructions the guest CPU lacks) is then obvious from the message.
pub fn describe_code(rip: u64) -> String {
    let mut info: libc::Dl_info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only inspects the loader's tables; `info` is a valid out-parameter.
    if unsafe { libc::dladdr(rip as *const libc::c_void, &mut info) } == 0 {
        // Static binaries have no dladdr; fall back to the main executable's load range.
        return match main_executable() {
            Some((base, start, end)) if (start..end).contains(&rip) => {
                let off = rip - base;
                let exe = std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                format!(
                    " (in the test executable {exe}+{off:#x}; try addr2line -fCe {exe} {off:#x})"
                )
            }
            _ => " (outside the test executable)".to_string(),
        };
    }
    let cstr = |p: *const libc::c_char| {
        if p.is_null() {
            "?".to_string()
        } else {
            // SAFETY: dladdr returns NUL-terminated strings owned by the loader.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let file = cstr(info.dli_fname);
    if info.dli_sname.is_null() {
        // Internal symbols are not in the dynamic table: give the offset for addr2line.
        let off = rip.wrapping_sub(info.dli_fbase as u64);
        return format!(" (in {file}+{off:#x}; try addr2line -fCe {file} {off:#x})");
    }
    let off = rip.wrapping_sub(info.dli_saddr as u64);
    format!(" (in {file}: {}+{off:#x})", cstr(info.dli_sname))
}

/// (load bias, start, end) of the main executable's loaded segments: the first object
/// `dl_iterate_phdr` reports.
pub fn main_executable() -> Option<(u64, u64, u64)> {
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: valid for the callback's duration; `data` is the Option we passed.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Option<(u64, u64, u64)>)) };
        let (mut lo, mut hi) = (u64::MAX, 0);
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type == libc::PT_LOAD {
                lo = lo.min(info.dlpi_addr + ph.p_vaddr);
                hi = hi.max(info.dlpi_addr + ph.p_vaddr + ph.p_memsz);
            }
        }
        *out = Some((info.dlpi_addr, lo, hi));
        1 // stop after the first object, the executable
    }
    let mut out: Option<(u64, u64, u64)> = None;
    // SAFETY: the callback only reads loader data and writes `out`.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut out as *mut Option<(u64, u64, u64)>).cast()) };
    out
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Page-rounded, merged `PT_LOAD` ranges of every loaded object except the vDSO.
fn image_segments() -> Result<Vec<(u64, u64)>> {
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for this callback's duration; `data` is
        // the Vec we passed below.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Vec<(u64, u64)>)) };
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
            unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        if name.contains("linux-vdso") || name.contains("linux-gate") {
            return 0;
        }
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type != libc::PT_LOAD || ph.p_memsz == 0 {
                continue;
            }
            let start = info.dlpi_addr + ph.p_vaddr;
            out.push((start & !0xfff, (start + ph.p_memsz).div_ceil(4096) * 4096));
        }
        0
    }
    let mut segs: Vec<(u64, u64)> = Vec::new();
    // SAFETY: the callback only reads loader-provided data and pushes into `segs`.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut segs as *mut Vec<(u64, u64)>).cast()) };
    ensure!(!segs.is_empty(), "dl_iterate_phdr found no loaded segments");
    segs.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in segs {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let _ = page_size();
    Ok(merged)
}
