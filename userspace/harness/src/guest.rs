//! The workload guest: a guest function on kvm-testvm's ucall framework that reads every page
//! of its part of the data region, in order, and checks each 8-byte word against
//! [`pattern_word`]; and the host side that starts it on a vCPU and decodes what it reports.
//!
//! # What the guest and the host share
//!
//! Each vCPU gets a [`PART_BLOCK`]-byte block of shared guest memory
//! ([`TestVm::alloc_guest_mem`]): the host writes the part to check (first gva, pages, the
//! image offset of its first byte, the seed), the guest writes the number of pages it has
//! verified after each page. That counter is exact when the vCPU is stopped in the middle of
//! its part: it is how the runner tells how far a guest got before its source died.
//!
//! # What the guest reports
//!
//! Through `GUEST_SYNC` ucalls whose first argument says what follows:
//! - [`REPORT_PROGRESS`], pages left: every [`PROGRESS_EVERY`] pages, so that a slow guest
//!   (under TCG, or behind a slow source) is seen to move;
//! - [`REPORT_MISMATCH`], gva, expected, found: the first wrong word; the guest then halts.
//!
//! Returning from the guest function reports DONE: every page of the part was right.
//!
//! The data region is identity-mapped (gva = gpa), so the addresses reported are gpas too.

use kvm_testvm::guest::{self, read_u64, write_u64};
use kvm_testvm::{Exit, GuestMem, TestVm, Ucall, Vcpu};

/// The multiplier of the deterministic pattern.
pub const PATTERN_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The 8-byte word expected at byte `offset` (a multiple of 8) of an image made with `seed`.
/// Depends on the offset, so a page installed at the wrong place is detected too. The guest
/// calls it as well: it must stay `core`-only (see kvm-testvm's `guest` module).
pub fn pattern_word(seed: u64, offset: u64) -> u64 {
    (offset ^ seed).wrapping_mul(PATTERN_MUL)
}

/// Fills `buf` with the pattern of image page `page`.
pub fn fill_pattern_page(seed: u64, page: u64, buf: &mut [u8]) {
    let base = page * kvm_userfault::PAGE_SIZE as u64;
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(seed, base + i as u64 * 8).to_le_bytes());
    }
}

/// First argument of a progress report: the second is the pages left.
pub const REPORT_PROGRESS: u64 = 1;
/// First argument of a mismatch report: then the gva, the expected and the found word.
pub const REPORT_MISMATCH: u64 = 2;
/// Pages between two progress reports.
pub const PROGRESS_EVERY: u64 = 256;

const PAGE: u64 = kvm_userfault::PAGE_SIZE as u64;

// The shared block, in u64 words at these byte offsets.
const BLOCK_GVA: u64 = 0;
const BLOCK_PAGES: u64 = 8;
const BLOCK_IMAGE_OFFSET: u64 = 16;
const BLOCK_SEED: u64 = 24;
const BLOCK_VERIFIED: u64 = 32;
/// Bytes of shared memory per vCPU.
pub const PART_BLOCK: u64 = 40;

/// Words in a page.
const WORDS: u64 = PAGE / 8;

/// Checks the page at guest address `va` against the pattern of image offset `off`: returns
/// the index of the first wrong word with the word expected and the word found there, or
/// [`WORDS`] if all are right. The loop is assembly because it is the guest's whole cost and
/// test binaries are debug builds: compiled at opt-level 0, the same loop in Rust runs more
/// than ten times as many instructions per word, which shows under TCG and on slow hosts.
///
/// # Safety
/// Runs in the guest; `[va, va + PAGE)` must be mapped (or its first read is the demand fault
/// under test, which the vCPU re-executes once the page is there).
#[inline(always)]
unsafe fn check_page(va: u64, off: u64, seed: u64) -> (u64, u64, u64) {
    let (mut i, expected, found): (u64, u64, u64);
    i = 0;
    // SAFETY: reads the 512 words of the page, per the function contract; writes no memory
    // and uses no stack. Each iteration computes `pattern_word(seed, off + 8 * i)`.
    unsafe {
        core::arch::asm!(
            "2:",
            "mov {found}, qword ptr [{va} + {i} * 8]",
            "mov {expected}, {off}",
            "xor {expected}, {seed}",
            "imul {expected}, {mul}",
            "cmp {expected}, {found}",
            "jne 3f",
            "add {off}, 8",
            "inc {i}",
            "cmp {i}, {words}",
            "jne 2b",
            "3:",
            va = in(reg) va,
            off = inout(reg) off => _,
            seed = in(reg) seed,
            mul = in(reg) PATTERN_MUL,
            words = const WORDS,
            i = inout(reg) i,
            expected = out(reg) expected,
            found = out(reg) found,
            options(nostack, readonly),
        );
    }
    (i, expected, found)
}

/// The guest: checks the part described by the shared block at `block` (see the module
/// documentation). Runs in the guest: `core` only, every guest-memory access volatile or in
/// assembly, and no by-value copy of a struct (which a debug build turns into a libc `memcpy`
/// call).
pub extern "C" fn workload_guest(block: u64, _: u64, _: u64, _: u64) {
    // SAFETY: `block` is the shared block WorkloadVcpu::new allocated and filled.
    let (gva, pages, image_offset, seed) = unsafe {
        (
            read_u64(block + BLOCK_GVA),
            read_u64(block + BLOCK_PAGES),
            read_u64(block + BLOCK_IMAGE_OFFSET),
            read_u64(block + BLOCK_SEED),
        )
    };
    let mut page = 0;
    while page < pages {
        let va = gva.wrapping_add(page.wrapping_mul(PAGE));
        let off = image_offset.wrapping_add(page.wrapping_mul(PAGE));
        // SAFETY: the host identity-maps the data region, which holds the whole part.
        let (i, expected, found) = unsafe { check_page(va, off, seed) };
        if i < WORDS {
            guest::sync(&[REPORT_MISMATCH, va.wrapping_add(i * 8), expected, found]);
            guest::halt_forever();
        }
        page += 1;
        // SAFETY: the shared block; the host reads the counter when the vCPU is out of
        // KVM_RUN.
        unsafe { write_u64(block + BLOCK_VERIFIED, page) };
        let left = pages - page;
        if left != 0 && left % PROGRESS_EVERY == 0 {
            guest::sync(&[REPORT_PROGRESS, left]);
        }
    }
}

/// One `KVM_RUN` of a workload vCPU (checker or writer), decoded.
fn decode_step(vcpu: &mut Vcpu) -> Result<Event, GuestError> {
    let exit = match vcpu.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return Ok(Event::Interrupted)
        }
        Err(e) => return Err(GuestError::Run(e)),
    };
    match exit {
        Exit::Ucall(Ucall::Done) => Ok(Event::Done),
        Exit::Ucall(Ucall::Sync(args)) => match args[..] {
            [REPORT_PROGRESS, pages_left] => Ok(Event::Progress { pages_left }),
            [REPORT_MISMATCH, gpa, expected, found] => Ok(Event::Mismatch(Mismatch {
                gpa,
                expected,
                found,
            })),
            _ => Err(GuestError::Unexpected(format!(
                "unknown workload report {args:#x?}"
            ))),
        },
        Exit::Ucall(u) => Err(GuestError::Unexpected(
            u.failure().unwrap_or_else(|| format!("{u:?}")),
        )),
        Exit::MemoryFault { flags, gpa, size } => Ok(Event::MemoryFault { flags, gpa, size }),
        Exit::Intr => Ok(Event::Interrupted),
        Exit::IoOut { port, .. } | Exit::IoIn { port, .. } => Err(GuestError::Unexpected(format!(
            "unexpected port I/O to {port:#x}"
        ))),
        Exit::Other(what) => Err(GuestError::Unexpected(format!("unexpected exit {what}"))),
    }
}

/// What one vCPU of the workload checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadPart {
    /// First guest physical (= virtual) address.
    pub gpa: u64,
    /// Pages to check.
    pub pages: u64,
    /// Image byte offset of `gpa`.
    pub image_offset: u64,
    /// Pattern seed.
    pub seed: u64,
}

/// The first wrong word a guest found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Guest physical (= virtual) address of the wrong word.
    pub gpa: u64,
    /// Pattern value.
    pub expected: u64,
    /// Value read.
    pub found: u64,
}

/// What one `KVM_RUN` of a workload vCPU came back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The guest checked every page of its part.
    Done,
    /// `pages_left` pages of the part remain.
    Progress { pages_left: u64 },
    /// The guest found a wrong word; it will not go on.
    Mismatch(Mismatch),
    /// `KVM_EXIT_MEMORY_FAULT`: to be resolved before the vCPU runs again.
    MemoryFault { flags: u64, gpa: u64, size: u64 },
    /// `KVM_RUN` was interrupted (a signal: EINTR, EAGAIN, `KVM_EXIT_INTR`); nothing happened.
    Interrupted,
}

/// Why a workload vCPU cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// `KVM_RUN` failed.
    #[error("KVM_RUN: {0}")]
    Run(kvm_ioctls::Error),
    /// An exit or report the workload does not make: a guest exception, a triple fault, an
    /// emulation failure, an exit nobody expected.
    #[error("{0}")]
    Unexpected(String),
    /// The guest found a wrong word ([`WorkloadVcpu::run_to_end`] only).
    #[error("guest found wrong contents at gpa {:#x}: expected {:#018x}, found {:#018x}", .0.gpa, .0.expected, .0.found)]
    WrongContents(Mismatch),
}

/// A vCPU's verified-pages counter, readable from any thread (it shares the guest memory).
#[derive(Debug, Clone)]
pub struct Progress {
    block: GuestMem,
    pages: u64,
}

impl Progress {
    /// Pages of the part the guest read and found correct, from the first one on:
    /// `gpa..gpa + verified_pages * 4096`.
    pub fn verified_pages(&self) -> u64 {
        // A guest that scribbled on its block cannot make the count exceed its part.
        self.block.read_u64(BLOCK_VERIFIED as usize).min(self.pages)
    }
}

/// A vCPU set up to run [`workload_guest`] on one part.
#[derive(Debug)]
pub struct WorkloadVcpu {
    vcpu: Vcpu,
    part: WorkloadPart,
    progress: Progress,
}

impl WorkloadVcpu {
    /// Adds a vCPU to `vm` that checks `part` (which the caller has mapped, identity).
    pub fn new(vm: &mut TestVm, part: WorkloadPart) -> anyhow::Result<Self> {
        anyhow::ensure!(
            part.gpa.is_multiple_of(PAGE) && part.pages > 0,
            "a workload part is whole pages: {part:?}"
        );
        let block = vm.alloc_guest_mem(PART_BLOCK)?;
        block.write_u64(BLOCK_GVA as usize, part.gpa);
        block.write_u64(BLOCK_PAGES as usize, part.pages);
        block.write_u64(BLOCK_IMAGE_OFFSET as usize, part.image_offset);
        block.write_u64(BLOCK_SEED as usize, part.seed);
        let vcpu = vm.add_vcpu_with(workload_guest, &[block.gva()])?;
        Ok(Self {
            vcpu,
            part,
            progress: Progress {
                block,
                pages: part.pages,
            },
        })
    }

    /// The vCPU's id (its index in the VM).
    pub fn id(&self) -> u64 {
        self.vcpu.id
    }

    pub fn part(&self) -> &WorkloadPart {
        &self.part
    }

    /// Its verified-pages counter, for another thread.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Pages the guest verified so far (see [`Progress::verified_pages`]).
    pub fn verified_pages(&self) -> u64 {
        self.progress.verified_pages()
    }

    /// One `KVM_RUN`, decoded.
    pub fn step(&mut self) -> Result<Event, GuestError> {
        decode_step(&mut self.vcpu)
    }

    /// Runs until the guest is done, for callers that resolve faults elsewhere (a userfault fd
    /// with `VCPU_FAULTS`, userfaultfd): progress and interruptions are passed over, a wrong
    /// word or a memory-fault exit is an error.
    pub fn run_to_end(&mut self) -> Result<(), GuestError> {
        loop {
            match self.step()? {
                Event::Done => return Ok(()),
                Event::Progress { .. } | Event::Interrupted => {}
                Event::Mismatch(m) => return Err(GuestError::WrongContents(m)),
                Event::MemoryFault { flags, gpa, size } => {
                    return Err(GuestError::Unexpected(format!(
                        "memory fault exit at {gpa:#x} (+{size:#x}, flags {flags:#x}) with no one to resolve it"
                    )))
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer workload (live migration): each vCPU sweeps its part, rewriting every page with
// a pattern of (address, sweep), and records how far it got; once told to, it checks its
// whole part against what it last wrote.
// ---------------------------------------------------------------------------------------------

// The writer's shared block, in u64 words at these byte offsets.
const W_GVA: u64 = 0;
const W_PAGES: u64 = 8;
const W_SEED: u64 = 16;
const W_SWEEP: u64 = 24;
const W_POS: u64 = 32;
const W_BUDGET: u64 = 40;
const W_DELAY: u64 = 48;
const W_VERIFIED: u64 = 56;
/// Bytes of shared memory per writer vCPU.
pub const WRITER_BLOCK: u64 = 64;
/// A budget that never runs out: the writer sweeps until it is stopped from outside.
pub const UNLIMITED: u64 = u64::MAX;
/// Spreads sweep numbers over the seed's bits so that consecutive sweeps differ everywhere.
const SWEEP_MUL: u64 = 0xD6E8_FEB8_6659_FD93;

/// The key of sweep `sweep` (≥ 1): the page at `va` holds `pattern_word(key, va + 8 i)`.
fn sweep_key(seed: u64, sweep: u64) -> u64 {
    seed ^ sweep.wrapping_mul(SWEEP_MUL)
}

/// The word the writer leaves at guest address `addr` (8-byte aligned) after writing it in
/// sweep `sweep`; sweep 0 is "never written": the zero page. `core` only (the guest calls it).
pub fn writer_word(seed: u64, sweep: u64, addr: u64) -> u64 {
    if sweep == 0 {
        0
    } else {
        pattern_word(sweep_key(seed, sweep), addr)
    }
}

/// Writes the page at `va` with the pattern of `key` (assembly for the reason given at
/// [`check_page`]).
///
/// # Safety
/// Runs in the guest; `[va, va + PAGE)` must be mapped writable (or its first write is the
/// demand fault under test).
#[inline(always)]
unsafe fn write_page(va: u64, key: u64) {
    // SAFETY: writes the 512 words of the page, per the function contract; no stack.
    unsafe {
        core::arch::asm!(
            "2:",
            "mov {w}, {off}",
            "xor {w}, {key}",
            "imul {w}, {mul}",
            "mov qword ptr [{off}], {w}",
            "add {off}, 8",
            "cmp {off}, {end}",
            "jne 2b",
            off = inout(reg) va => _,
            end = in(reg) va + PAGE,
            key = in(reg) key,
            mul = in(reg) PATTERN_MUL,
            w = out(reg) _,
            options(nostack),
        );
    }
}

/// Checks the page at `va` against `pattern_word(key, ..) * (mul != 0)`: with `mul` 0 every
/// word must be zero. Returns (index of the first wrong word or [`WORDS`], expected, found).
///
/// # Safety
/// As for [`check_page`].
#[inline(always)]
unsafe fn check_written_page(va: u64, key: u64, mul: u64) -> (u64, u64, u64) {
    let (mut i, expected, found): (u64, u64, u64);
    i = 0;
    // SAFETY: reads the 512 words of the page, per the function contract; no stack.
    unsafe {
        core::arch::asm!(
            "2:",
            "mov {found}, qword ptr [{va} + {i} * 8]",
            "lea {expected}, [{va} + {i} * 8]",
            "xor {expected}, {key}",
            "imul {expected}, {mul}",
            "cmp {expected}, {found}",
            "jne 3f",
            "inc {i}",
            "cmp {i}, {words}",
            "jne 2b",
            "3:",
            va = in(reg) va,
            key = in(reg) key,
            mul = in(reg) mul,
            words = const WORDS,
            i = inout(reg) i,
            expected = out(reg) expected,
            found = out(reg) found,
            options(nostack, readonly),
        );
    }
    (i, expected, found)
}

/// Spins `n` iterations: throttles the writer so that pre-copy can converge.
#[inline(always)]
fn spin(n: u64) {
    if n == 0 {
        return;
    }
    // SAFETY: a register-only countdown loop.
    unsafe {
        core::arch::asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) n => _, options(nomem, nostack));
    }
}

/// The writer guest (see [`WriterVcpu`]). Its whole state is in registers and its stack, and
/// the block at `block`: sweep and position are written there after every page, so a host
/// that stopped the vCPU knows exactly which pages hold which sweep. Makes no ucall until it
/// verifies, so that a vCPU stopped by a signal is always between two instructions of the
/// guest (no port I/O left half-done for a migration to carry).
pub extern "C" fn writer_guest(block: u64, _: u64, _: u64, _: u64) {
    // SAFETY: `block` is the shared block WriterVcpu::new allocated and filled.
    let (gva, pages, seed, mut sweep, mut pos) = unsafe {
        (
            read_u64(block + W_GVA),
            read_u64(block + W_PAGES),
            read_u64(block + W_SEED),
            read_u64(block + W_SWEEP),
            read_u64(block + W_POS),
        )
    };
    loop {
        // SAFETY: the shared block (the host changes the budget only while the vCPU is out
        // of KVM_RUN).
        let budget = unsafe { read_u64(block + W_BUDGET) };
        if budget == 0 {
            break;
        }
        // SAFETY: the host identity-maps the data region, which holds the whole part.
        unsafe {
            write_page(
                gva.wrapping_add(pos.wrapping_mul(PAGE)),
                sweep_key(seed, sweep),
            )
        };
        pos += 1;
        if pos == pages {
            pos = 0;
            sweep += 1;
        }
        // SAFETY: the shared block.
        unsafe {
            write_u64(block + W_POS, pos);
            write_u64(block + W_SWEEP, sweep);
            if budget != UNLIMITED {
                write_u64(block + W_BUDGET, budget - 1);
            }
        }
        // SAFETY: the shared block.
        spin(unsafe { read_u64(block + W_DELAY) });
    }
    // Every page before `pos` holds this sweep, every page from `pos` on the previous one.
    let mut page = 0;
    while page < pages {
        let s = if page < pos { sweep } else { sweep - 1 };
        let (key, mul) = if s == 0 {
            (0, 0)
        } else {
            (sweep_key(seed, s), PATTERN_MUL)
        };
        let va = gva.wrapping_add(page.wrapping_mul(PAGE));
        // SAFETY: as above.
        let (i, expected, found) = unsafe { check_written_page(va, key, mul) };
        if i < WORDS {
            guest::sync(&[REPORT_MISMATCH, va.wrapping_add(i * 8), expected, found]);
            guest::halt_forever();
        }
        page += 1;
        // SAFETY: the shared block.
        unsafe { write_u64(block + W_VERIFIED, page) };
    }
}

/// What one writer vCPU sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterPart {
    /// First guest physical (= virtual) address.
    pub gpa: u64,
    /// Pages.
    pub pages: u64,
    /// Pattern seed.
    pub seed: u64,
    /// Spin iterations after each page (throttle).
    pub delay: u64,
}

/// Where a writer is: it has written `pos` pages of sweep `sweep` (pages from `pos` on still
/// hold sweep `sweep - 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterState {
    /// Current sweep (starts at 1).
    pub sweep: u64,
    /// Pages of the part written in the current sweep.
    pub pos: u64,
}

/// A writer's recorded position, readable from any thread (it shares the guest memory).
#[derive(Debug, Clone)]
pub struct WriterWatch {
    block: GuestMem,
    pages: u64,
}

impl WriterWatch {
    /// Where the writer is.
    pub fn state(&self) -> WriterState {
        WriterState {
            sweep: self.block.read_u64(W_SWEEP as usize),
            pos: self.block.read_u64(W_POS as usize),
        }
    }

    /// Pages written since it started: whole sweeps and the current position.
    pub fn written(&self) -> u64 {
        let s = self.state();
        s.sweep
            .saturating_sub(1)
            .saturating_mul(self.pages)
            .saturating_add(s.pos)
    }
}

/// A vCPU running [`writer_guest`] over one part: it sweeps while its budget lasts (forever
/// with [`UNLIMITED`]), then checks every page of the part, reporting the first wrong word
/// ([`Event::Mismatch`]) or [`Event::Done`].
#[derive(Debug)]
pub struct WriterVcpu {
    vcpu: Vcpu,
    part: WriterPart,
    block: GuestMem,
}

impl WriterVcpu {
    /// Adds a vCPU to `vm` that sweeps `part` (which the caller has mapped, identity),
    /// starting at sweep 1, page 0, with `budget` pages to write before it verifies.
    pub fn new(vm: &mut TestVm, part: WriterPart, budget: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            part.gpa.is_multiple_of(PAGE) && part.pages > 0,
            "a writer part is whole pages: {part:?}"
        );
        let block = vm.alloc_guest_mem(WRITER_BLOCK)?;
        for (off, v) in [
            (W_GVA, part.gpa),
            (W_PAGES, part.pages),
            (W_SEED, part.seed),
            (W_SWEEP, 1),
            (W_POS, 0),
            (W_BUDGET, budget),
            (W_DELAY, part.delay),
            (W_VERIFIED, 0),
        ] {
            block.write_u64(off as usize, v);
        }
        let vcpu = vm.add_vcpu_with(writer_guest, &[block.gva()])?;
        Ok(Self { vcpu, part, block })
    }

    /// The vCPU (its fd, for saving and restoring its state).
    pub fn vcpu(&self) -> &Vcpu {
        &self.vcpu
    }

    pub fn part(&self) -> &WriterPart {
        &self.part
    }

    /// The guest address of its shared block (system memory).
    pub fn block_gpa(&self) -> u64 {
        self.block.gpa()
    }

    /// Where the writer is, as it recorded after its last whole page.
    pub fn state(&self) -> WriterState {
        WriterState {
            sweep: self.block.read_u64(W_SWEEP as usize),
            pos: self.block.read_u64(W_POS as usize),
        }
    }

    /// A reader of its recorded position, for another thread.
    pub fn watch(&self) -> WriterWatch {
        WriterWatch {
            block: self.block.clone(),
            pages: self.part.pages,
        }
    }

    /// Pages it may still write before it verifies. Set only while the vCPU is out of KVM_RUN.
    pub fn set_budget(&self, pages: u64) {
        self.block.write_u64(W_BUDGET as usize, pages);
    }

    /// Pages the verification found correct, from the first one on.
    pub fn verified_pages(&self) -> u64 {
        self.block
            .read_u64(W_VERIFIED as usize)
            .min(self.part.pages)
    }

    /// One `KVM_RUN`, decoded as for the checker ([`WorkloadVcpu::step`]).
    pub fn step(&mut self) -> Result<Event, GuestError> {
        decode_step(&mut self.vcpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_testvm::Backing;

    #[test]
    fn pattern_depends_on_offset_and_seed() {
        assert_ne!(pattern_word(1, 0), pattern_word(1, 8));
        assert_ne!(pattern_word(1, 0), pattern_word(2, 0));
        let mut a = vec![0u8; 4096];
        fill_pattern_page(7, 3, &mut a);
        assert_eq!(&a[8..16], &pattern_word(7, 3 * 4096 + 8).to_le_bytes());
        // The images `make-image` wrote so far must stay valid: pin the formula.
        assert_eq!(pattern_word(0x5eed, 0x1000), 0x6072_3583_89c3_4571);
    }

    /// A VM with `pages` of the pattern (image offset `first_page` pages) at 1 GiB, already
    /// in place: no demand paging, just the guest's checks.
    fn filled_vm(pages: u64, first_page: u64, seed: u64) -> Option<(TestVm, kvm_testvm::Region)> {
        if std::fs::metadata("/dev/kvm").is_err() {
            eprintln!("SKIP: /dev/kvm not available");
            return None;
        }
        let mut vm = TestVm::new().unwrap();
        let gpa = 1 << 30;
        let r = vm
            .add_mapped_region(1, gpa, pages * PAGE, Backing::Anonymous)
            .unwrap()
            .clone();
        let mut buf = vec![0u8; PAGE as usize];
        for p in 0..pages {
            fill_pattern_page(seed, first_page + p, &mut buf);
            r.mapping.write((p * PAGE) as usize, &buf);
        }
        Some((vm, r))
    }

    #[test]
    fn guest_checks_every_page_and_reports_progress() {
        let Some((mut vm, r)) = filled_vm(300, 5, 9) else {
            return;
        };
        let part = WorkloadPart {
            gpa: r.gpa,
            pages: 300,
            image_offset: 5 * PAGE,
            seed: 9,
        };
        let mut v = WorkloadVcpu::new(&mut vm, part).unwrap();
        let mut left = Vec::new();
        loop {
            match v.step().unwrap() {
                Event::Done => break,
                Event::Progress { pages_left } => {
                    left.push(pages_left);
                    assert_eq!(v.verified_pages(), 300 - pages_left);
                }
                Event::Interrupted => {}
                e => panic!("{e:?}"),
            }
        }
        assert_eq!(left, vec![PROGRESS_EVERY]);
        assert_eq!(v.verified_pages(), 300);
        assert_eq!(v.progress().verified_pages(), 300);
    }

    #[test]
    fn guest_reports_the_first_wrong_word_and_how_far_it_got() {
        let Some((mut vm, r)) = filled_vm(8, 0, 3) else {
            return;
        };
        // One wrong word in page 5, and another later that must not be reported.
        let bad = 5 * PAGE + 0x128;
        r.mapping.write_u64(bad as usize, 0xdead);
        r.mapping.write_u64((7 * PAGE) as usize, 0xbeef);
        let part = WorkloadPart {
            gpa: r.gpa,
            pages: 8,
            image_offset: 0,
            seed: 3,
        };
        let mut v = WorkloadVcpu::new(&mut vm, part).unwrap();
        let want = Mismatch {
            gpa: r.gpa + bad,
            expected: pattern_word(3, bad),
            found: 0xdead,
        };
        match v.run_to_end() {
            Err(GuestError::WrongContents(m)) => assert_eq!(m, want),
            other => panic!("{other:?}"),
        }
        assert_eq!(v.verified_pages(), 5);
        // A wrong seed fails on the first word.
        let mut w = WorkloadVcpu::new(&mut vm, WorkloadPart { seed: 4, ..part }).unwrap();
        let e = w.run_to_end().unwrap_err().to_string();
        assert!(e.contains("wrong contents at gpa 0x40000000"), "{e}");
        assert_eq!(w.verified_pages(), 0);
    }

    #[test]
    fn writer_sweeps_then_verifies_and_catches_a_stale_page() {
        let Some((mut vm, r)) = filled_vm(8, 0, 3) else {
            return;
        };
        // Pages 0..8 hold the checker's pattern: the writer overwrites them all in sweep 1.
        let part = WriterPart {
            gpa: r.gpa,
            pages: 8,
            seed: 5,
            delay: 0,
        };
        let mut w = WriterVcpu::new(&mut vm, part, 8 + 3).unwrap();
        loop {
            match w.step().unwrap() {
                Event::Done => break,
                Event::Interrupted => {}
                e => panic!("{e:?}"),
            }
        }
        assert_eq!(w.state(), WriterState { sweep: 2, pos: 3 });
        assert_eq!(w.watch().written(), 11);
        assert_eq!(w.verified_pages(), 8);
        assert_eq!(r.mapping.read_u64(8), writer_word(5, 2, r.gpa + 8));
        assert_eq!(
            r.mapping.read_u64(4 * PAGE as usize),
            writer_word(5, 1, r.gpa + 4 * PAGE)
        );
        // A second writer on fresh zero pages, one of them stale (not what it wrote last).
        let g = vm
            .add_mapped_region(2, 2 << 30, 4 * PAGE, Backing::Anonymous)
            .unwrap()
            .clone();
        let part = WriterPart {
            gpa: g.gpa,
            pages: 4,
            seed: 5,
            delay: 0,
        };
        // Writes pages 0 and 1 in sweep 1; 2 and 3 must still be zero.
        let mut w = WriterVcpu::new(&mut vm, part, 0).unwrap();
        w.set_budget(2);
        g.mapping.write_u64((3 * PAGE + 16) as usize, 1);
        match w.step().unwrap() {
            Event::Mismatch(m) => assert_eq!(
                m,
                Mismatch {
                    gpa: g.gpa + 3 * PAGE + 16,
                    expected: 0,
                    found: 1
                }
            ),
            e => panic!("{e:?}"),
        }
        assert_eq!(w.verified_pages(), 3);
    }

    #[test]
    fn a_part_outside_the_mapped_memory_is_a_guest_exception() {
        let Some((mut vm, r)) = filled_vm(1, 0, 3) else {
            return;
        };
        let part = WorkloadPart {
            gpa: r.gpa,
            pages: 2,
            image_offset: 0,
            seed: 3,
        };
        let mut v = WorkloadVcpu::new(&mut vm, part).unwrap();
        let e = v.run_to_end().unwrap_err().to_string();
        assert!(e.contains("#PF"), "{e}");
        assert_eq!(v.verified_pages(), 1);
    }
}
