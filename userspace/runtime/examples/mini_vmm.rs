//! A small VMM of its own, embedding the kvm-userfault runtime the way Firecracker or Cloud
//! Hypervisor would: the VMM owns the VM fd (kvm-ioctls), the guest memory (vm-memory
//! `GuestRegionMmap`s), the vCPU threads and the event loop; the runtime gets the demand-paged
//! region, a page source, a call in the vCPU loop and an fd in the event loop.
//!
//! The guest (39 bytes of x86-64, long mode, no firmware) reads every 8-byte word of its part
//! of a data region and checks it against the pattern the page source serves, then reports
//! done on port 0x10, or a wrong word on port 0x11. The data region starts with every page
//! missing and is filled on demand:
//!
//! | mode | data memory | faults arrive as | the VMM calls |
//! |---|---|---|---|
//! | `uffd` | anonymous | userfaultfd messages (stock kernels) | `UffdInput` in its event loop |
//! | `kvm-sync` | guest_memfd | `KVM_EXIT_MEMORY_FAULT` on each vCPU thread | `VcpuFaults::on_memory_fault` in its vCPU loop (plus a `RingInput` for KVM's own accesses) |
//! | `kvm-async` | guest_memfd | records on the userfault fd (`VCPU_FAULTS`; vCPUs sleep in the kernel) | `RingInput` in its event loop |
//!
//! Run: `cargo run -p kvm-userfault --example mini_vmm -- [uffd|kvm-sync|kvm-async] [VCPUS] [DATA_KIB]`
//! (the KVM modes need the KVM userfault kernel: `cargo xtask vm -- …`).
//! `tests/embedding.rs` runs it in each mode and checks its report.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_segment, kvm_userspace_memory_region, kvm_userspace_memory_region2,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use kvm_userfault::fault::uffd::{Uffd, UffdMode};
use kvm_userfault::handler::Install;
use kvm_userfault::ioctls::{self, FdResolver};
use kvm_userfault::source::MemorySource;
use kvm_userfault::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_USERFAULT_FD_FLAG_VCPU_FAULTS,
};
use kvm_userfault::{DemandRegion, FaultAction, Runtime, PAGE_SIZE};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

/// How the data region's pages are protected and how faults arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// userfaultfd MISSING on anonymous memory.
    Uffd,
    /// USERFAULT attribute on guest_memfd, synchronous exits.
    KvmSync,
    /// USERFAULT attribute on guest_memfd, a `VCPU_FAULTS` userfault fd.
    KvmAsync,
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "uffd" => Mode::Uffd,
            "kvm-sync" => Mode::KvmSync,
            "kvm-async" => Mode::KvmAsync,
            _ => bail!("unknown mode {s:?}: uffd, kvm-sync or kvm-async"),
        })
    }
}

/// What a run did, as the VMM saw it.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Pages of the data region.
    pub pages: u64,
    /// Pages the guest checked (all of them, or the run failed).
    pub pages_checked: u64,
    /// USERFAULT exits the vCPU loops handled (kvm-sync).
    pub userfault_exits: u64,
    /// Pages the runtime filled on demand.
    pub demand_pages: u64,
    /// Faults the runtime was told about (exits + records + uffd messages).
    pub faults: u64,
    /// Pages still missing at the end.
    pub missing_at_end: usize,
    /// Wall time from the first KVM_RUN to the last vCPU's done.
    pub elapsed: Duration,
}

// Guest physical layout. System memory (present from the start): page tables and code.
const SYS_SIZE: usize = 2 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000; // two PDs: 0..1 GiB and 1..2 GiB, 2 MiB pages
const CODE: u64 = 0x8000;
/// The data region (demand-paged): at 1 GiB.
const DATA_GPA: u64 = 1 << 30;
const MAX_DATA: u64 = 1 << 30;

const PORT_DONE: u16 = 0x10;
const PORT_WRONG_WORD: u16 = 0x11;
const PATTERN_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
const SEED: u64 = 0x5eed_0fda_7a00;

/// The word the guest expects at byte `offset` of the data region.
pub fn pattern(offset: u64) -> u64 {
    (offset ^ SEED).wrapping_mul(PATTERN_MUL)
}

/// The guest: for rsi in [rsi, rdi) step 8: check [rsi] == ((rsi - r9) ^ rbx) * r8.
/// Assembled from (Intel syntax): `top: mov rax,rsi; sub rax,r9; xor rax,rbx; imul rax,r8;
/// cmp rax,[rsi]; jne fail; add rsi,8; cmp rsi,rdi; jb top; mov dx,0x10; out dx,al; hlt;
/// fail: mov dx,0x11; out dx,al; hlt`.
const GUEST_CODE: [u8; 39] = [
    0x48, 0x89, 0xf0, 0x4c, 0x29, 0xc8, 0x48, 0x31, 0xd8, 0x49, 0x0f, 0xaf, 0xc0, 0x48, 0x3b, 0x06,
    0x75, 0x0f, 0x48, 0x83, 0xc6, 0x08, 0x48, 0x39, 0xfe, 0x72, 0xe5, 0x66, 0xba, 0x10, 0x00, 0xee,
    0xf4, 0x66, 0xba, 0x11, 0x00, 0xee, 0xf4,
];

/// Runs the guest with `vcpus` vCPUs over `data_bytes` of demand-paged memory.
pub fn run(mode: Mode, vcpus: usize, data_bytes: u64) -> Result<Report> {
    ensure!((1..=8).contains(&vcpus), "1 to 8 vCPUs, not {vcpus}");
    let page = PAGE_SIZE as u64;
    ensure!(
        data_bytes > 0 && data_bytes <= MAX_DATA && data_bytes.is_multiple_of(page * vcpus as u64),
        "data size {data_bytes:#x}: a multiple of {vcpus} pages, at most 1 GiB"
    );
    // Guest memory outlives the VM: `memory` is declared before `vm`, so it is dropped after
    // it (and is leaked if vCPU threads might still run when this function returns).
    let mut memory: Vec<Arc<GuestRegionMmap>> = Vec::new();
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = Arc::new(kvm.create_vm().context("KVM_CREATE_VM")?);
    vm.set_tss_address(0xfffb_d000)
        .context("KVM_SET_TSS_ADDR")?;

    // System memory: anonymous, present.
    let sys = Arc::new(
        GuestRegionMmap::from_range(GuestAddress(0), SYS_SIZE, None)
            .context("mapping system memory")?,
    );
    memory.push(sys.clone());
    write_page_tables(&sys)?;
    sys.write_slice(&GUEST_CODE, vm_memory::MemoryRegionAddress(CODE))
        .context("loading the guest code")?;
    let sys_slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: SYS_SIZE as u64,
        userspace_addr: sys.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `sys` is in `memory`, which stays mapped until the VM is gone (see above).
    unsafe { vm.set_user_memory_region(sys_slot) }.context("memslot 0 (system)")?;

    // The data region and the runtime.
    let image: Vec<u8> = (0..data_bytes / 8)
        .flat_map(|w| pattern(w * 8).to_le_bytes())
        .collect();
    let source = Arc::new(MemorySource::new(image).context("page source")?);
    let (data, setup) = match mode {
        Mode::Uffd => {
            let data = Arc::new(
                GuestRegionMmap::from_range(GuestAddress(DATA_GPA), data_bytes as usize, None)
                    .context("mapping data memory")?,
            );
            add_slot(&vm, 1, &data, None)?;
            let uffd = Arc::new(Uffd::new().context("userfaultfd")?);
            uffd.register(
                data.as_ptr() as usize,
                data_bytes as usize,
                UffdMode::Missing,
            )
            .context("UFFDIO_REGISTER")?;
            (data, Setup::Uffd(uffd))
        }
        Mode::KvmSync | Mode::KvmAsync => {
            ioctls::require_userfault(&vm)?;
            let gmem = kvm_create_guest_memfd {
                size: data_bytes,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                ..Default::default()
            };
            let raw = vm
                .create_guest_memfd(gmem)
                .context("KVM_CREATE_GUEST_MEMFD")?;
            // SAFETY: a new fd KVM just returned, owned by nothing else.
            let gmem_fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mapping = MmapRegion::from_file(
                FileOffset::new(std::fs::File::from(gmem_fd.try_clone()?), 0),
                data_bytes as usize,
            )
            .context("mmap of guest_memfd")?;
            let data = Arc::new(
                GuestRegionMmap::new(mapping, GuestAddress(DATA_GPA))
                    .context("data region address overflows")?,
            );
            add_slot(&vm, 1, &data, Some(&gmem_fd))?;
            // Every page missing before any vCPU runs.
            ioctls::set_userfault(&vm, DATA_GPA, data_bytes, true)
                .context("KVM_SET_MEMORY_ATTRIBUTES USERFAULT")?;
            let flags = if mode == Mode::KvmAsync {
                KVM_USERFAULT_FD_FLAG_VCPU_FAULTS
            } else {
                // Without VCPU_FAULTS the fd reports KVM's own accesses only; vCPUs exit.
                0
            };
            let ufd = Arc::new(ioctls::create_userfault_fd(&vm, flags)?);
            (
                data,
                Setup::Kvm {
                    ufd,
                    _gmem: gmem_fd,
                },
            )
        }
    };
    memory.push(data.clone());
    let install = match &setup {
        Setup::Uffd(u) => Install::UffdCopy(u.clone()),
        Setup::Kvm { ufd, .. } => Install::Direct(Box::new(FdResolver(ufd.clone()))),
    };
    let rt = Runtime::new(source, install, [DemandRegion::new(data.clone(), 0)])?;

    // The event loop's fault input (set up before any vCPU runs).
    let mut ring = match &setup {
        Setup::Kvm { ufd, .. } => Some(rt.ring_input(ufd.clone(), 4, 64)?),
        Setup::Uffd(_) => None,
    };
    let mut uffd_in = match &setup {
        Setup::Uffd(u) => Some(rt.uffd_input(u.clone())),
        Setup::Kvm { .. } => None,
    };

    // vCPU threads: each runs its own loop, with its own VcpuFaults.
    let done = Arc::new(EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?);
    let part = data_bytes / vcpus as u64;
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let mut vcpu_fds = Vec::new();
    for i in 0..vcpus as u64 {
        let vcpu = vm.create_vcpu(i).context("KVM_CREATE_VCPU")?;
        vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
        set_long_mode(&vcpu, DATA_GPA + i * part, DATA_GPA + (i + 1) * part)?;
        vcpu_fds.push(vcpu);
    }
    // From here on no early return until every vCPU thread is joined (or memory is leaked).
    let start = Instant::now();
    let mut threads = Vec::new();
    for vcpu in vcpu_fds {
        let mut faults = rt.vcpu_faults();
        let (done, data, keep) = (done.clone(), data.clone(), memory.clone());
        threads.push(std::thread::spawn(move || {
            // The guest memory outlives this vCPU even if it unwinds: `keep` is dropped after
            // `vcpu`, which `vcpu_loop` consumes.
            let _keep = keep;
            let r = vcpu_loop(vcpu, &mut faults, &data);
            let _ = done.write(1);
            r
        }));
    }

    // The event loop: the fault input and the vCPUs' "done" eventfd.
    let deadline = start + Duration::from_secs(600);
    let mut finished = 0;
    let mut loop_err = None;
    while finished < vcpus {
        let input = match (&ring, &uffd_in) {
            (Some(r), _) => r.as_raw_fd(),
            (_, Some(u)) => u.as_raw_fd(),
            _ => unreachable!("one input per mode"),
        };
        // SAFETY: both fds belong to objects (the input, `done`) that outlive this poll.
        let (input, done_fd) = unsafe {
            (
                BorrowedFd::borrow_raw(input),
                BorrowedFd::borrow_raw(done.as_raw_fd()),
            )
        };
        let mut fds = [
            PollFd::new(input, PollFlags::POLLIN),
            PollFd::new(done_fd, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                rt.shutdown("event loop failed");
                loop_err = Some(anyhow::Error::from(e).context("poll"));
                break;
            }
        }
        if fds[0].any().unwrap_or(false) {
            let r = match (&mut ring, &mut uffd_in) {
                (Some(r), _) => r.process_ready().map(|_| ()),
                (_, Some(u)) => u.process_ready(),
                _ => unreachable!("one input per mode"),
            };
            if let Err(e) = r {
                // Stop every waiter; vCPUs then fail their fault and return.
                rt.shutdown("fault input failed");
                loop_err = Some(anyhow::Error::from(e).context("event loop"));
                break;
            }
        }
        if let Ok(n) = done.read() {
            finished += n as usize;
        }
        if Instant::now() > deadline {
            // vCPUs still run: their memory must stay mapped.
            std::mem::forget(memory);
            bail!("guest did not finish within 600 s ({finished} of {vcpus} vCPUs done)");
        }
    }
    if loop_err.is_some() {
        // vCPUs waiting for a page that will never come must be let go without it.
        release_waiters(&vm, &data, &setup);
    }
    let elapsed = start.elapsed();
    let mut report = Report {
        pages: data_bytes / page,
        elapsed,
        ..Default::default()
    };
    let mut vcpu_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok((checked, exits))) => {
                report.pages_checked += checked / page;
                report.userfault_exits += exits;
            }
            Ok(Err(e)) => vcpu_err = vcpu_err.or(Some(e)),
            Err(_) => vcpu_err = vcpu_err.or(Some(anyhow::anyhow!("vCPU thread panicked"))),
        }
    }
    if let Some(e) = loop_err.or(vcpu_err) {
        return Err(e);
    }
    // Hand over anything read meanwhile, then the one stop.
    if let Some(r) = &mut ring {
        r.pause()?;
    }
    rt.shutdown("guest done");
    let stats = rt.stats();
    report.demand_pages = stats.demand_pages.load(Relaxed);
    report.faults = stats.faults.load(Relaxed);
    report.missing_at_end = rt.missing_pages();
    Ok(report)
}

enum Setup {
    Uffd(Arc<Uffd>),
    Kvm {
        ufd: Arc<kvm_userfault::ioctls::UserfaultFd>,
        /// The guest_memfd, kept open for the memslot's life.
        _gmem: OwnedFd,
    },
}

/// Makes every access to a missing page fail instead of wait: vCPUs return from KVM_RUN
/// with an error rather than run on with a page that was never filled.
fn release_waiters(vm: &VmFd, data: &GuestRegionMmap, setup: &Setup) {
    match setup {
        Setup::Kvm { .. } => {
            // Deleting the memslot ends every wait on it (with EFAULT from KVM_RUN).
            let gone = kvm_userspace_memory_region2 {
                slot: 1,
                ..Default::default()
            };
            // SAFETY: deleting a slot makes KVM forget its mapping; nothing is mapped anew.
            let _ = unsafe { vm.set_user_memory_region2(gone) };
        }
        Setup::Uffd(u) => {
            // No access to the range can succeed any more; woken waiters retry and fail.
            // SAFETY: changes the protection of the data mapping only, which stays mapped.
            unsafe { libc::mprotect(data.as_ptr().cast(), data.len() as usize, libc::PROT_NONE) };
            let _ = u.wake(data.as_ptr() as usize, data.len() as usize);
        }
    }
}

fn add_slot(vm: &VmFd, slot: u32, mem: &GuestRegionMmap, gmem: Option<&OwnedFd>) -> Result<()> {
    let region = kvm_userspace_memory_region2 {
        slot,
        flags: if gmem.is_some() {
            KVM_MEM_GUEST_MEMFD
        } else {
            0
        },
        guest_phys_addr: mem.start_addr().0,
        memory_size: mem.len(),
        userspace_addr: mem.as_ptr() as u64,
        guest_memfd: gmem.map_or(0, |f| f.as_raw_fd() as u32),
        guest_memfd_offset: 0,
        ..Default::default()
    };
    // SAFETY: the caller keeps `mem` (an Arc the runtime also holds) mapped until the VM is
    // gone; the guest_memfd stays open as long as the slot.
    unsafe { vm.set_user_memory_region2(region) }
        .with_context(|| format!("memslot {slot} at {:#x}", mem.start_addr().0))
}

/// Identity-maps 0..2 GiB with 2 MiB pages: PML4[0] → PDPT, PDPT[0..2] → two PDs.
fn write_page_tables(sys: &GuestRegionMmap) -> Result<()> {
    const P_RW: u64 = 0b11;
    const PS: u64 = 1 << 7;
    let at = vm_memory::MemoryRegionAddress;
    sys.write_obj(PDPT | P_RW, at(PML4))?;
    for g in 0..2u64 {
        sys.write_obj((PD + g * 0x1000) | P_RW, at(PDPT + g * 8))?;
        for e in 0..512u64 {
            let phys = (g << 30) | (e << 21);
            sys.write_obj(phys | P_RW | PS, at(PD + g * 0x1000 + e * 8))?;
        }
    }
    Ok(())
}

/// 64-bit mode straight from reset state, without a GDT in memory: KVM takes the segment
/// registers as given, and the guest never reloads one.
fn set_long_mode(vcpu: &VcpuFd, from: u64, to: u64) -> Result<()> {
    let mut s = vcpu.get_sregs()?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code
    };
    (s.cs, s.ds, s.es, s.ss) = (code, data, data, data);
    s.cr3 = PML4;
    s.cr4 = 1 << 5; // PAE
    s.cr0 = 0x8000_0033; // PG | NE | ET | MP | PE
    s.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&s)?;
    let mut r = vcpu.get_regs()?;
    r.rip = CODE;
    r.rflags = 2;
    (r.rsi, r.rdi, r.r9, r.rbx, r.r8) = (from, to, DATA_GPA, SEED, PATTERN_MUL);
    vcpu.set_regs(&r)?;
    Ok(())
}

/// The VMM's vCPU loop, with the runtime's one arm. Returns (bytes checked, USERFAULT exits).
fn vcpu_loop(
    mut vcpu: VcpuFd,
    faults: &mut kvm_userfault::VcpuFaults,
    data: &GuestRegionMmap,
) -> Result<(u64, u64)> {
    let from = vcpu.get_regs()?.rsi;
    let mut exits = 0;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_DONE, _)) => {
                let r = vcpu.get_regs()?;
                return Ok((r.rsi - from, exits));
            }
            Ok(VcpuExit::IoOut(PORT_WRONG_WORD, _)) => {
                // The guest stopped at the word: rsi is its gpa, rax what it expected.
                let r = vcpu.get_regs()?;
                let at = vm_memory::MemoryRegionAddress(r.rsi - DATA_GPA);
                let got: u64 = data.read_obj(at)?;
                bail!(
                    "guest read {got:#x} at gpa {:#x}, expected {:#x}",
                    r.rsi,
                    r.rax
                );
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                match faults.on_memory_fault(flags, gpa, size)? {
                    FaultAction::Retry => exits += 1,
                    FaultAction::NotUserfault => {
                        bail!("memory fault exit at {gpa:#x} (flags {flags:#x}) not for USERFAULT")
                    }
                }
            }
            Ok(e) => bail!("unexpected exit {e:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(e).context("KVM_RUN"),
        }
    }
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mode: Mode = args.next().as_deref().unwrap_or("uffd").parse()?;
    let vcpus: usize = match args.next() {
        Some(v) => v.parse().with_context(|| format!("VCPUS {v:?}"))?,
        None => 2,
    };
    let kib: u64 = match args.next() {
        Some(v) => v.parse().with_context(|| format!("DATA_KIB {v:?}"))?,
        None => 2048,
    };
    let r = run(mode, vcpus, kib << 10)?;
    println!("{mode:?}: {r:?}");
    Ok(())
}
