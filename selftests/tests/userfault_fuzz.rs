//! A seeded, multi-threaded fuzzer of the KVM userfault uAPI (docs/uapi.md).
//!
//! One VM with a 64-page anonymous data memslot (identity mapped) and two vCPUs. Each guest
//! loops over pseudo-random words of the data slot, asserts every word it reads holds the
//! word's pattern ([`word_value`], never 0), sometimes stores it back unchanged, and reports its
//! iteration count with a SYNC every [`SYNC_EVERY`] iterations; it returns (DONE) once the host
//! sets a stop flag in the framework's system slot. Around it, host threads issue random
//! operations until the deadline:
//!
//! - two vCPU threads run KVM_RUN and serve USERFAULT exits (populate, then CLEAR or RESOLVE);
//! - two resolver threads read records from the userfault fd (poll + blocking reads,
//!   non-blocking reads, random buffer sizes including ones smaller than a record), check them,
//!   populate and RESOLVE;
//! - a chaos thread re-marks pages USERFAULT, clears populated ranges, evicts pages (USERFAULT,
//!   then the host copy is zeroed or dropped), issues invalid calls expecting exact errnos,
//!   REQUEUEs, closes and recreates the fd (alternately with and without VCPU_FAULTS, so vCPU
//!   faults switch between records and exits), signals the vCPU threads, adds, deletes, moves
//!   and re-flags a scratch memslot the guest never touches, toggles dirty logging on the data
//!   slot (a flags-only update), and forks children that RESOLVE one page through the
//!   inherited fd;
//! - a scratch thread races SET/CLEAR/RESOLVE on the scratch window (present or not) and on
//!   gpas with no memslot against the chaos thread's memslot updates;
//! - a watchdog fails the run if a vCPU makes no progress for `KVMUF_FUZZ_STALL_SECS`.
//!
//! Invariants, checked throughout: a page the host did not populate never reaches the guest
//! (the guest's content check: pages start zero-filled and USERFAULT, are only made
//! resolvable, by CLEAR or RESOLVE, after they were populated, and evictions zero them behind a
//! fresh USERFAULT); every exit is a USERFAULT exit for one page of the data slot with exactly
//! one of READ/WRITE; every record is well formed (size, reserved, known flags, GUEST only
//! from a VCPU_FAULTS fd, vcpu_id of a vCPU) and names a gfn of the data slot or the scratch
//! window; invalid calls fail with exactly the errno docs/uapi.md (and the C userfault_test)
//! give, valid ones succeed; each vCPU's SYNC count grows by exactly SYNC_EVERY each time and
//! never stalls. At the end the chaos stops, every page is populated (after the host checked
//! the ones that were), all USERFAULT is cleared, the stop flag is set, and every vCPU must
//! reach DONE and every thread must join within `KVM_SELFTESTS_TIMEOUT_SECS`, with no thread
//! of the process left in D state.
//!
//! Knobs: `KVMUF_FUZZ_SEED` (u64; default derived from the time), `KVMUF_FUZZ_SECS` (default
//! 20), `KVMUF_FUZZ_STALL_SECS` (default 15), `KVM_SELFTESTS_TIMEOUT_SECS` (default 120, the
//! bound of every wait). The seed is printed first (`fuzz seed: N`). Thread `i`'s random
//! generator is seeded from seed + i and each guest's access sequence from the seed, so a seed
//! reproduces every thread's choices and each guest's accesses; the interleaving of the threads
//! (and hence which records and exits each one sees) is up to the scheduler, so a seed
//! reproduces the mix of operations and the kind of races, not one exact run. The run ends
//! with one `fuzz summary: ...` line of counts.
//!
//! Needs the patched kernel; on a kernel without the series it fails with one line saying so
//! (`KVMUF_ALLOW_SKIP=1` makes it skip instead).
//!
//! **Fault injection** (`fuzz_userfault_uapi_failslab`): the same fuzzer with the kernel's
//! failslab and fail_page_alloc (debugfs, the debug flavour; without them it prints a `[SKIP]`
//! line) failing `KVMUF_FUZZ_FAIL_PERCENT` % (default 5) of the slab and page allocations (any
//! order, sleeping ones included, user/highmem pages not) of the worker threads only
//! (`task-filter`, each vCPU, resolver, chaos and scratch thread sets its
//! `/proc/thread-self/make-it-fail` once every thread and the VM exist; the main thread and
//! the watchdog never fail). Only where an allocation can fail are the invariants relaxed, and
//! only while injection is on: any operation may fail with ENOMEM (counted per kind; the
//! operation is then taken as not done: a page stays USERFAULT, a memslot unchanged, no fd
//! until the next creation; a resolver retries the RESOLVE of a record it read, whose waiters
//! would otherwise sleep until a REQUEUE); KVM_RUN may fail with ENOMEM, or with EFAULT where
//! hva_to_pfn turns an allocation failure of the page fault into KVM_PFN_ERR_FAULT (counted,
//! re-entered); fork and the child's RESOLVE may fail (counted); an invalid call fails with its
//! documented errno or ENOMEM. Everything else (content, exits, records, errnos, progress,
//! teardown) stays strict. Before the end phase the main thread sets both probabilities to 0,
//! so that the end phase must succeed; every debugfs knob gets its previous value back
//! afterwards. The stall limit defaults to 30 s; the run prints `fuzz failslab: injected=N ...`.
//! `KVMUF_FUZZ_SECS=20 cargo test -p kvm-selftests --test userfault_fuzz -- --ignored --nocapture`

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kvm_selftests::caps::env_u64;
use kvm_selftests::guest::{self, read_u64, write_u64};
use kvm_selftests::rng::Rng;
use kvm_selftests::uapi::{
    kvm_create_userfault_fd, kvm_userfault_msg, kvm_userfault_range, KVMIO,
    KVM_CAP_USERFAULT_FD_FLAGS, KVM_CREATE_USERFAULT_FD, KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR,
    KVM_MEMORY_ATTRIBUTES_FLAG_SET, KVM_MEMORY_ATTRIBUTE_USERFAULT, KVM_MEMORY_EXIT_FLAG_EXEC,
    KVM_MEMORY_EXIT_FLAG_READ, KVM_MEMORY_EXIT_FLAG_USERFAULT, KVM_MEMORY_EXIT_FLAG_WRITE,
    KVM_USERFAULT_FD_FLAG_NONBLOCK, KVM_USERFAULT_FD_FLAG_VCPU_FAULTS, KVM_USERFAULT_MSG_ALL,
    KVM_USERFAULT_MSG_EXEC, KVM_USERFAULT_MSG_GUEST, KVM_USERFAULT_MSG_READ,
    KVM_USERFAULT_MSG_VCPU, KVM_USERFAULT_MSG_WRITE, KVM_USERFAULT_RESOLVE, USERFAULT_MSG_SIZE,
};
use kvm_selftests::userfault::{
    self as uf, clear_userfault, create_fd_raw, read_raw, requeue, resolve, resolve_raw,
    set_attributes, set_userfault,
};
use kvm_selftests::vm::{SYS_GVA, TEST_GPA};
use kvm_selftests::{guest_assert_eq, Backing, Exit, HostMapping, TestVm, Ucall, Vcpu};
use nix::errno::Errno;
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

const TEST: &str = "userfault_fuzz::fuzz_userfault_uapi";
const TEST_FAILSLAB: &str = "userfault_fuzz::fuzz_userfault_uapi_failslab";
const PAGE: u64 = 4096;
const NR_VCPUS: usize = 2;
const NR_RESOLVERS: usize = 2;

const DATA_SLOT: u32 = 1;
const DATA_PAGES: u64 = 64;
const DATA_GPA: u64 = TEST_GPA;
const DATA_SIZE: u64 = DATA_PAGES * PAGE;

/// The scratch memslot: `SCRATCH_PAGES` pages that the chaos thread adds, deletes and moves
/// between `SCRATCH_POSITIONS` non-overlapping places of the scratch window, far from the data
/// slot. Nothing in the guest touches it.
const SCRATCH_SLOT: u32 = 2;
const SCRATCH_PAGES: u64 = 16;
const SCRATCH_SIZE: u64 = SCRATCH_PAGES * PAGE;
const SCRATCH_POSITIONS: u64 = 4;
const SCRATCH_BASE: u64 = TEST_GPA + (1 << 30);
const SCRATCH_END: u64 = SCRATCH_BASE + SCRATCH_POSITIONS * SCRATCH_SIZE;

/// A window no memslot ever covers: SET/CLEAR/RESOLVE there succeed and do nothing
/// (bad_input_attributes, the C test's "resolving memory without a memslot is fine").
const NOSLOT_GPA: u64 = TEST_GPA + (2 << 30);
const NOSLOT_PAGES: u64 = 1 << 12;

/// The stop flag: a page of the system slot that the framework leaves unused (between the TSS
/// at 0x3000 and the page-table pool at 0x10_0000; see vm.rs), mapped at SYS_GVA + gpa.
const STOP_GPA: u64 = 0x8000;
const STOP_GVA: u64 = SYS_GVA + STOP_GPA;

/// Port of the guest's `rep outsb` (KVM's emulator reads the data slot itself).
const OUTS_PORT: u16 = 0x1001;

/// Guest iterations between two progress SYNCs.
const SYNC_EVERY: u64 = 256;
/// First SYNC argument of a guest content mismatch report (`[MISMATCH, gpa, value, iter]`),
/// sent before the guest assertion so that the host gets the values unformatted.
const MISMATCH: u64 = 0xbad0_c0de_bad0_c0de;

const EXIT_ACCESS: u64 =
    KVM_MEMORY_EXIT_FLAG_READ | KVM_MEMORY_EXIT_FLAG_WRITE | KVM_MEMORY_EXIT_FLAG_EXEC;
const MSG_ACCESS: u32 = KVM_USERFAULT_MSG_READ | KVM_USERFAULT_MSG_WRITE | KVM_USERFAULT_MSG_EXEC;

/// `KVM_SET_MEMORY_ATTRIBUTES = _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)`: a VM ioctl,
/// which the userfault fd must not know.
const KVM_SET_MEMORY_ATTRIBUTES: libc::c_ulong = ioctl_expr(_IOC_WRITE, KVMIO, 0xd2, 32);

/// The word at guest physical address `gpa` (8-byte aligned) of a populated page: a bijection
/// of the gpa (an odd multiplier times a multiple of 8, plus 1), so never 0 (what an unpopulated
/// page holds) and different for every word (a page mapped at the wrong gfn shows).
#[inline(always)]
fn word_value(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

fn page_gpa(page: u64) -> u64 {
    DATA_GPA + page * PAGE
}

fn data_page(gpa: u64) -> Option<u64> {
    (DATA_GPA..DATA_GPA + DATA_SIZE)
        .contains(&gpa)
        .then(|| (gpa - DATA_GPA) / PAGE)
}

fn scratch_gpa(pos: u64) -> u64 {
    SCRATCH_BASE + pos * SCRATCH_SIZE
}

fn timeout() -> Duration {
    Duration::from_secs(env_u64("KVM_SELFTESTS_TIMEOUT_SECS", 120))
}

// ---- random numbers ----

/// Thread `index`'s stream of the run with `seed`.
fn thread_rng(seed: u64, index: u64) -> Rng {
    Rng::new(seed.wrapping_add(index))
}

/// The fuzzer's own draw on top of the shared generator.
trait PageRange {
    /// A range of 1..=max_pages pages starting inside `[base, base + pages)`, clipped to it.
    fn range(&mut self, base: u64, pages: u64, max_pages: u64) -> (u64, u64);
}

impl PageRange for Rng {
    fn range(&mut self, base: u64, pages: u64, max_pages: u64) -> (u64, u64) {
        let start = self.below(pages);
        let len = (1 + self.below(max_pages)).min(pages - start);
        (base + start * PAGE, len * PAGE)
    }
}

// ---- guest code ----

/// `rep outsb` of the 8 bytes at `gpa` to OUTS_PORT, with `gpa` in R8 for the host (string
/// port I/O is emulated: KVM reads guest memory itself, one of "KVM's own accesses").
#[inline(always)]
fn outs_word(gpa: u64) {
    // SAFETY: string port output from mapped guest memory; only traps to the host.
    unsafe {
        core::arch::asm!("rep outsb", inout("rsi") gpa => _, inout("rcx") 8u64 => _,
                         in("dx") OUTS_PORT, in("r8") gpa, options(nostack, preserves_flags));
    }
}

/// Each vCPU: random words of the data slot, mostly loaded and checked against their
/// pattern (sometimes stored back unchanged), sometimes stored blindly with their pattern (a
/// WRITE fault first), rarely read by KVM's emulator (`rep outsb`); a SYNC with the iteration
/// count every SYNC_EVERY iterations; returns (DONE) once the stop flag is set. xorshift64*
/// with the seed the host passed, so the access sequence is a function of the seed.
extern "C" fn guest_fuzz(seed: u64, vcpu: u64, stop_gva: u64, _: u64) {
    let mut x = seed | 1;
    let mut iter: u64 = 0;
    // SAFETY: the stop flag page is mapped (test setup); a load only.
    while unsafe { read_u64(stop_gva) } == 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let page = (r >> 40) % DATA_PAGES;
        let word = (r >> 20) & (PAGE / 8 - 1);
        let gpa = DATA_GPA + page * PAGE + word * 8;
        let op = r & 255;
        if op < 16 {
            // SAFETY: the data slot is identity mapped; the store may be the USERFAULT under
            // test. It writes the word's own pattern, so it changes nothing once the page is
            // populated (and a store that wrongly reached an unpopulated page would leave the
            // rest of it zero, for later loads to find).
            unsafe { write_u64(gpa, word_value(gpa)) };
        } else if op == 16 {
            outs_word(gpa);
        } else {
            // SAFETY: as above; the load may be the USERFAULT under test.
            let v = unsafe { read_u64(gpa) };
            if v != word_value(gpa) {
                guest::sync(&[MISMATCH, gpa, v, iter]);
                guest_assert_eq!(v, word_value(gpa), gpa, iter);
            }
            if op < 48 {
                // SAFETY: as above; the value is the one just checked, so storing it changes
                // nothing but makes the access a write.
                unsafe { write_u64(gpa, v) };
            }
        }
        iter += 1;
        if iter.is_multiple_of(SYNC_EVERY) {
            guest::sync(&[vcpu, iter]);
        }
    }
}

// ---- counters ----

macro_rules! stats {
    ($($name:ident),* $(,)?) => {
        /// Operation counters, all relaxed atomics (read only for the summary).
        #[derive(Default)]
        struct Stats {
            $($name: AtomicU64,)*
        }

        impl Stats {
            fn all(&self) -> BTreeMap<&'static str, u64> {
                [$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
                    .into_iter()
                    .collect()
            }
        }
    };
}

stats!(
    // vCPU threads
    vcpu_runs,
    uf_exits,
    uf_exits_read,
    uf_exits_write,
    vcpu_eintr,
    vcpu_clear,
    vcpu_resolve,
    kvm_reads,
    kvm_reads_unpopulated,
    kvm_reads_unpopulated_fd,
    // page state
    populates,
    // resolver threads
    resolver_ops,
    reads,
    read_eagain,
    read_eintr,
    poll_timeouts,
    records,
    records_guest,
    records_kvm,
    records_scratch,
    resolver_resolves,
    // chaos thread
    chaos_ops,
    set_ranges,
    exact_updates,
    clear_ranges,
    clear_fd_ranges,
    evict_zero,
    evict_dontneed,
    noslot_ops,
    invalid,
    requeue_calls,
    requeued,
    fd_close,
    close_checks,
    fd_create,
    fd_create_vcpu_faults,
    signals_vcpu,
    signals_resolver,
    slot_add,
    slot_delete,
    slot_move,
    slot_flags,
    data_slot_flags,
    fork_resolve,
    // fault injection (besides the per-kind ENOMEM counts)
    kvm_run_efault,
    fork_fail_other,
    // scratch thread
    scratch_ops,
    scratch_set,
    scratch_clear,
    scratch_resolve,
);

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

thread_local! {
    /// Whether fault injection was on when this thread began its current operation (see
    /// [`arm`]): only then may the operation's calls fail for lack of memory.
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

/// Called by each worker at the start of every operation. Injection only ever goes from on to
/// off (the main thread turns the probabilities to 0 before it clears `injecting`), so a call
/// made after an unarmed start cannot have been injected.
fn arm(sh: &Shared) {
    ARMED.with(|a| a.set(sh.injecting.load(Ordering::SeqCst)));
}

fn armed() -> bool {
    ARMED.with(|a| a.get())
}

// ---- shared state ----

/// One data page's host state. `populated` is the invariant's bit: a page may only be made
/// resolvable while it is set, and only the holder of the page's lock changes it.
#[derive(Default)]
struct PageState {
    populated: bool,
    /// The numbers (in `Shared::evictions`' sequence) of every eviction of the page, ascending,
    /// each pushed before the contents are dropped. All of them, not only the last: a later
    /// eviction must not hide one that happened during an earlier KVM_RUN.
    evictions: Vec<u64>,
    /// The last few operations on the page (µs since start, thread, what), for failure reports.
    history: VecDeque<(u64, &'static str, &'static str)>,
}

/// The current userfault fd. Threads clone the `Arc` for the duration of one operation, so the
/// descriptor number they use stays open (no fd-number reuse race); the chaos thread closes it
/// only once it holds the last reference, so that the close (which wakes every waiter) happens
/// at a known point and the next KVM_CREATE_USERFAULT_FD cannot see it still open.
struct UfFd {
    fd: OwnedFd,
    flags: u64,
    generation: u64,
}

struct Shared {
    /// Declared before `scratch`: fields drop in order, and the VM (with the scratch memslot)
    /// must go before the memory behind it.
    vm: TestVm,
    data: Arc<HostMapping>,
    sys: Arc<HostMapping>,
    scratch: HostMapping,
    pages: Vec<Mutex<PageState>>,
    fd: Mutex<Option<Arc<UfFd>>>,
    /// Bumped just before each close of a fd (so a thread that read it, then the current fd,
    /// then it again and saw no change knows that fd stayed open in between).
    fd_closes: AtomicU64,
    /// Eviction sequence: bumped by each eviction after its SET and before its contents are
    /// dropped (the page's `PageState::evictions` gets the number).
    evictions: AtomicU64,
    /// The fd flags `KVM_CREATE_USERFAULT_FD` accepts here.
    fd_flags_supported: u64,
    start: Instant,
    /// Tells the chaos and scratch threads to finish.
    stop_chaos: AtomicBool,
    /// Set before the host writes the guest's stop flag: from then on DONE is expected.
    stopping: AtomicBool,
    stop_resolvers: AtomicBool,
    stop_watchdog: AtomicBool,
    /// A failure was recorded: every thread returns as soon as it can.
    abort: AtomicBool,
    /// The stall watchdog's bound (also the bound of the close-releases check).
    stall: Duration,
    failure: Mutex<Option<String>>,
    /// Per vCPU: SYNCs seen, last guest iteration count, DONE reached.
    syncs: [AtomicU64; NR_VCPUS],
    iters: [AtomicU64; NR_VCPUS],
    done: [AtomicBool; NR_VCPUS],
    /// Per vCPU: inside KVM_RUN now, and KVM_RUNs returned (for "closing the fd releases
    /// every waiter", checked after closes).
    in_run: [AtomicBool; NR_VCPUS],
    runs_returned: [AtomicU64; NR_VCPUS],
    /// Scratch slot position + 1 (0: absent), for reports.
    scratch_at: AtomicU64,
    /// pthread ids of the vCPU and resolver threads (signal targets), set before the chaos
    /// thread starts. The rule: a listed thread is neither joined nor detached (it is removed
    /// before it is joined; a handle not joined is leaked, not dropped), and every kick is
    /// made with the list's lock held.
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    resolver_threads: Mutex<Vec<libc::pthread_t>>,
    st: Stats,
    /// (operation, errno) → count of invalid calls that failed as expected.
    errnos: Mutex<BTreeMap<(&'static str, i32), u64>>,
    /// The fault-injection run (`fuzz_userfault_uapi_failslab`).
    failslab: bool,
    /// Every worker thread exists (they wait for it before setting make-it-fail).
    spawned: AtomicBool,
    /// Fault injection is on (failslab run only, from `spawned` until the end phase).
    injecting: AtomicBool,
    /// Operation kind → ENOMEMs seen while injection was on.
    enomem: Mutex<BTreeMap<&'static str, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking thread is already a recorded failure; the others go on to report.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn fail(&self, who: &str, msg: String) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some(format!(
                "{who} at {:.3}s: {msg}",
                self.start.elapsed().as_secs_f64()
            ));
        }
        self.abort.store(true, Ordering::SeqCst);
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }

    fn current_fd(&self) -> Option<Arc<UfFd>> {
        lock(&self.fd).clone()
    }

    fn page(&self, page: u64) -> MutexGuard<'_, PageState> {
        lock(&self.pages[page as usize])
    }

    fn log(&self, ps: &mut PageState, who: &'static str, what: &'static str) {
        if ps.history.len() == 8 {
            ps.history.pop_front();
        }
        ps.history.push_back((self.now_us(), who, what));
    }

    /// Writes the page's pattern through the host mapping. Only for unpopulated pages, which are
    /// USERFAULT: the guest cannot be accessing them.
    fn populate(&self, page: u64, ps: &mut PageState, who: &'static str) {
        let mut buf = vec![0u8; PAGE as usize];
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&word_value(page_gpa(page) + i as u64 * 8).to_ne_bytes());
        }
        self.data.write((page * PAGE) as usize, &buf);
        ps.populated = true;
        self.log(ps, who, "populate");
        inc(&self.st.populates);
    }

    /// Serves a fault on `page`: populates it if needed, then makes it resolvable through the fd
    /// (`via`) or KVM_SET_MEMORY_ATTRIBUTES(CLEAR), all under the page's lock. `false`: an
    /// injected ENOMEM, the page stays USERFAULT (and populated).
    fn populate_and_resolve(
        &self,
        page: u64,
        via: Option<&UfFd>,
        who: &'static str,
    ) -> Result<bool> {
        let mut ps = self.page(page);
        if !ps.populated {
            self.populate(page, &mut ps, who);
        }
        let gpa = page_gpa(page);
        match via {
            Some(f) => {
                let r = self.tolerate("resolve", resolve(f.fd.as_raw_fd(), gpa, PAGE));
                if r.with_context(|| {
                    format!(
                        "KVM_USERFAULT_RESOLVE({gpa:#x}, 1 page) on fd #{}",
                        f.generation
                    )
                })?
                .is_none()
                {
                    return Ok(false);
                }
                self.log(&mut ps, who, "resolve");
            }
            None => {
                let r = self.tolerate("clear", clear_userfault(self.vm.fd(), gpa, PAGE));
                if r.with_context(|| format!("CLEAR USERFAULT({gpa:#x}, 1 page)"))?
                    .is_none()
                {
                    return Ok(false);
                }
                self.log(&mut ps, who, "clear");
            }
        }
        Ok(true)
    }

    fn page_report(&self, page: u64) -> String {
        let ps = self.page(page);
        let hist: Vec<String> = ps
            .history
            .iter()
            .map(|(t, who, what)| format!("{:.6}s {who} {what}", *t as f64 / 1e6))
            .collect();
        format!(
            "page {page} (gpa {:#x}): populated={}, history [{}]",
            page_gpa(page),
            ps.populated,
            hist.join(", ")
        )
    }

    fn fd_report(&self) -> String {
        match self.current_fd() {
            Some(f) => format!("fd #{} (flags {:#x})", f.generation, f.flags),
            None => "no userfault fd".to_string(),
        }
    }

    /// Whether `errno` is an ENOMEM that fault injection may have caused (the thread's current
    /// operation began while injection was on); if so, tallies it under `kind`.
    fn enomem(&self, kind: &'static str, errno: i32) -> bool {
        if errno != libc::ENOMEM || !armed() {
            return false;
        }
        *lock(&self.enomem).entry(kind).or_default() += 1;
        true
    }

    /// `r`, with an injected ENOMEM (see [`Shared::enomem`]) as `Ok(None)`: the operation did
    /// not happen.
    fn tolerate<T>(
        &self,
        kind: &'static str,
        r: std::result::Result<T, Errno>,
    ) -> std::result::Result<Option<T>, Errno> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if self.enomem(kind, e as i32) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A valid operation's result: `Ok(true)` once it succeeded, counted in `done`;
    /// `Ok(false)` if it failed with a tolerated ENOMEM (see [`Self::tolerate`]); any other
    /// error with `what` as its context.
    fn counted(
        &self,
        kind: &'static str,
        r: std::result::Result<(), Errno>,
        done: &AtomicU64,
        what: impl FnOnce() -> String,
    ) -> Result<bool> {
        let ok = self.tolerate(kind, r).with_context(what)?.is_some();
        if ok {
            inc(done);
        }
        Ok(ok)
    }

    /// Checks an invalid call failed with exactly `want` and tallies it (or, while injection
    /// is on, with ENOMEM: where the kernel allocates before it finds the call invalid).
    fn expect_errno<T>(
        &self,
        what: &'static str,
        got: std::result::Result<T, Errno>,
        want: Errno,
    ) -> Result<()> {
        match got {
            Err(e) if e == want => {
                inc(&self.st.invalid);
                *lock(&self.errnos).entry((what, e as i32)).or_default() += 1;
                Ok(())
            }
            Err(e) if self.enomem("invalid", e as i32) => Ok(()),
            Err(e) => bail!("{what}: expected {want}, got {e}"),
            Ok(_) => bail!("{what}: expected {want}, but the call succeeded"),
        }
    }

    fn summary(&self, seed: u64, secs: u64) -> String {
        let s = self.st.all();
        let g = |k: &str| s.get(k).copied().unwrap_or(0);
        let per_vcpu = |a: &[AtomicU64; NR_VCPUS]| {
            a.iter()
                .map(|v| v.load(Ordering::Relaxed).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut by_errno: BTreeMap<i32, u64> = BTreeMap::new();
        for ((_, e), n) in lock(&self.errnos).iter() {
            *by_errno.entry(*e).or_default() += n;
        }
        let errnos: Vec<String> = by_errno
            .iter()
            .map(|(e, n)| format!("{:?}:{n}", Errno::from_raw(*e)))
            .collect();
        let ops = g("chaos_ops") + g("scratch_ops") + g("resolver_ops") + g("vcpu_runs");
        format!(
            "seed={seed} secs={secs} elapsed={:.1}s ops={ops} (chaos={} scratch={} resolver={} \
             kvm_run={}) syncs=[{}] guest_iters=[{}] exits={} (read={} write={}) eintr={} \
             records={} (guest={} kvm={} scratch={}) reads={} (eagain={} eintr={} \
             poll_timeouts={}) resolves={} (vcpu_clear={} vcpu_resolve={} resolver={} \
             chaos_clear={} chaos_resolve={} fork={}) kvm_reads={} (unpopulated={} \
             unpopulated_with_fd={}) populates={} sets={} exact={} evicts={} \
             (zero={} dontneed={}) invalid={} ({}) requeue={}/{} fd=created:{},closed:{},\
             released_checked:{},vcpu_faults:{} signals=vcpu:{},resolver:{} memslot=add:{},delete:{},move:{},\
             flags:{},data_flags:{} scratch=set:{},clear:{},resolve:{} noslot={}",
            self.start.elapsed().as_secs_f64(),
            g("chaos_ops"),
            g("scratch_ops"),
            g("resolver_ops"),
            g("vcpu_runs"),
            per_vcpu(&self.syncs),
            per_vcpu(&self.iters),
            g("uf_exits"),
            g("uf_exits_read"),
            g("uf_exits_write"),
            g("vcpu_eintr"),
            g("records"),
            g("records_guest"),
            g("records_kvm"),
            g("records_scratch"),
            g("reads"),
            g("read_eagain"),
            g("read_eintr"),
            g("poll_timeouts"),
            g("vcpu_clear")
                + g("vcpu_resolve")
                + g("resolver_resolves")
                + g("clear_ranges")
                + g("clear_fd_ranges")
                + g("fork_resolve"),
            g("vcpu_clear"),
            g("vcpu_resolve"),
            g("resolver_resolves"),
            g("clear_ranges"),
            g("clear_fd_ranges"),
            g("fork_resolve"),
            g("kvm_reads"),
            g("kvm_reads_unpopulated"),
            g("kvm_reads_unpopulated_fd"),
            g("populates"),
            g("set_ranges"),
            g("exact_updates"),
            g("evict_zero") + g("evict_dontneed"),
            g("evict_zero"),
            g("evict_dontneed"),
            g("invalid"),
            errnos.join(" "),
            g("requeue_calls"),
            g("requeued"),
            g("fd_create"),
            g("fd_close"),
            g("close_checks"),
            g("fd_create_vcpu_faults"),
            g("signals_vcpu"),
            g("signals_resolver"),
            g("slot_add"),
            g("slot_delete"),
            g("slot_move"),
            g("slot_flags"),
            g("data_slot_flags"),
            g("scratch_set"),
            g("scratch_clear"),
            g("scratch_resolve"),
            g("noslot_ops"),
        ) + &if self.failslab {
            format!(" enomem={} ({})", self.enomem_total(), self.enomem_detail())
        } else {
            String::new()
        }
    }

    fn enomem_total(&self) -> u64 {
        lock(&self.enomem).values().sum()
    }

    fn enomem_detail(&self) -> String {
        lock(&self.enomem)
            .iter()
            .map(|(k, n)| format!("{k}:{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn invalid_detail(&self) -> String {
        lock(&self.errnos)
            .iter()
            .map(|((what, e), n)| format!("{what}={:?}x{n}", Errno::from_raw(*e)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

// ---- host helpers ----

/// SIGUSR1 with a no-op handler and without SA_RESTART: a signalled KVM_RUN, poll or blocking
/// read returns EINTR instead of being restarted.
fn install_sigusr1() -> Result<()> {
    extern "C" fn noop(_: libc::c_int) {}
    // Deliberately without SA_RESTART: the signal's purpose is to end a blocking read or poll
    // (-EINTR) and a sleeping KVM_RUN, which SA_RESTART would restart. It is sent only to the
    // vCPU and resolver threads (pthread_kill), whose syscalls handle EINTR; std's own I/O
    // (println!, sleep) retries EINTR.
    // SAFETY: installs an async-signal-safe no-op handler; `sa` is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error()).context("sigaction(SIGUSR1)");
        }
    }
    Ok(())
}

fn kick(thread: libc::pthread_t) {
    // SAFETY: callers take `thread` from Shared::vcpu_threads or resolver_threads with the
    // list's lock held; a listed thread is neither joined nor detached (see there), so the id
    // is valid even if the thread has returned; SIGUSR1 has a no-op handler.
    unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
}

/// `poll(2)` for POLLIN; EINTR (a kick), or an injected ENOMEM, counts as a timeout.
fn poll_fd(sh: &Shared, fd: RawFd, timeout_ms: i32) -> Result<i16> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        let e = Errno::last();
        if e == Errno::EINTR || sh.enomem("poll", e as i32) {
            return Ok(0);
        }
        bail!("poll: {e}");
    }
    Ok(if r == 0 { 0 } else { p.revents })
}

fn proc_task(tid: &str, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/{file}"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn tasks() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The scheduler state letter of a task (`/proc/.../stat`, after the parenthesised name).
fn task_state(tid: &str) -> String {
    let stat = proc_task(tid, "stat");
    stat.rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .unwrap_or("?")
        .to_string()
}

/// Every thread of the process: tid, name, state, wchan; with `stacks`, also the kernel stack
/// where /proc exposes it (root, CONFIG_STACKTRACE), for hang reports.
fn thread_report(stacks: bool) -> String {
    let mut out = Vec::new();
    for tid in tasks() {
        let mut line = format!(
            "{tid} {} {} wchan={}",
            proc_task(&tid, "comm"),
            task_state(&tid),
            uf::wchan(tid.parse().unwrap_or(0))
        );
        if stacks {
            let stack = proc_task(&tid, "stack");
            if !stack.is_empty() {
                let frames: Vec<&str> = stack
                    .lines()
                    .filter_map(|l| l.split_whitespace().nth(1))
                    .collect();
                line += &format!(" stack=[{}]", frames.join(" < "));
            }
        }
        out.push(line);
    }
    out.join("; ")
}

/// No thread of the process stays in uninterruptible sleep (a transient D, e.g. a page fault
/// being served, must clear within a second).
fn check_no_d_state() -> Result<()> {
    let mut stuck = Vec::new();
    for _ in 0..20 {
        stuck = tasks()
            .into_iter()
            .filter(|t| task_state(t) == "D")
            .map(|t| {
                format!(
                    "{t} {} wchan={}",
                    proc_task(&t, "comm"),
                    uf::wchan(t.parse().unwrap_or(0))
                )
            })
            .collect();
        if stuck.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("threads in D state for a second after the run: {stuck:?}")
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".to_string())
}

/// Spawns a named worker; its error or panic becomes the run's failure (first one wins).
fn spawn(
    sh: &Arc<Shared>,
    name: &'static str,
    body: impl FnOnce(&Shared) -> Result<()> + Send + 'static,
) -> Result<JoinHandle<()>> {
    spawn_with(sh, name, false, body)
}

/// [`spawn`]; with `inject` in the failslab run, the thread first waits until every worker
/// exists, then (if injection is still on) makes its own allocations fail.
fn spawn_with(
    sh: &Arc<Shared>,
    name: &'static str,
    inject: bool,
    body: impl FnOnce(&Shared) -> Result<()> + Send + 'static,
) -> Result<JoinHandle<()>> {
    let s = sh.clone();
    let run = move |s: &Shared| -> Result<()> {
        if inject && s.failslab {
            let limit = timeout();
            ensure!(
                wait_until(s, limit, || s.spawned.load(Ordering::SeqCst)),
                "the other workers were not spawned within {limit:?}"
            );
            if s.aborted() {
                return Ok(());
            }
            if s.injecting.load(Ordering::SeqCst) {
                std::fs::write("/proc/thread-self/make-it-fail", "1")
                    .context("write 1 to /proc/thread-self/make-it-fail")?;
            }
        }
        body(s)
    };
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(
            move || match std::panic::catch_unwind(AssertUnwindSafe(|| run(&s))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => s.fail(name, format!("{e:#}")),
                Err(p) => s.fail(name, format!("panicked: {}", panic_message(&*p))),
            },
        )
        .with_context(|| format!("spawn {name}"))
}

/// Waits, bounded by `limit`, until `cond` holds or the run failed.
fn wait_until(sh: &Shared, limit: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !cond() {
        if sh.aborted() || Instant::now() > deadline {
            return cond();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

// ---- vCPU threads ----

const VCPU_NAMES: [&str; NR_VCPUS] = ["uf-vcpu0", "uf-vcpu1"];
const RESOLVER_NAMES: [&str; NR_RESOLVERS] = ["uf-resolver0", "uf-resolver1"];

fn vcpu_thread(sh: &Shared, mut vcpu: Vcpu, idx: usize, mut rng: Rng) -> Result<()> {
    let who = VCPU_NAMES[idx];
    let mut last_iter = 0;
    // The bytes of the current `rep outsb` (KVM may deliver them in several exits), and
    // whether one fd stayed open across every KVM_RUN that produced them.
    let mut outs: Vec<u8> = Vec::new();
    let mut outs_fd_throughout = true;
    // The eviction sequence before its first KVM_RUN and after its last (see check_kvm_read).
    let mut outs_evictions = (0, 0);
    while !sh.aborted() {
        arm(sh);
        inc(&sh.st.vcpu_runs);
        // The close counter before the fd: if it is unchanged after the run, the fd seen here
        // (if any) was open for the whole run (see `Shared::fd_closes`).
        let closes_before = sh.fd_closes.load(Ordering::SeqCst);
        let fd_before = sh.current_fd().map(|f| (f.generation, f.flags));
        let evictions_before = sh.evictions.load(Ordering::SeqCst);
        if sh.failslab {
            // A sentinel, so that an ENOMEM after a ucall exit is told from one of KVM_RUN.
            vcpu.kvm_run().exit_reason = u32::MAX;
        }
        sh.in_run[idx].store(true, Ordering::SeqCst);
        let exit = vcpu.run();
        // First thing after the ioctl (for a port-I/O exit the framework only copied its bytes
        // in between): an eviction numbered after this one dropped its page after the run.
        let evictions_after = sh.evictions.load(Ordering::SeqCst);
        sh.runs_returned[idx].fetch_add(1, Ordering::SeqCst);
        sh.in_run[idx].store(false, Ordering::SeqCst);
        let exit = match exit {
            // The exit happened, but the framework's KVM_GET_REGS for the ucall (it allocates
            // its buffer) failed: decode the ucall here, retrying the registers.
            Err(e) if e.errno() == libc::ENOMEM && armed() && ucall_exit(&mut vcpu) => {
                sh.enomem("get_regs", libc::ENOMEM);
                Ok(Exit::Ucall(
                    recover_ucall(sh, &mut vcpu).context("lost ucall")?,
                ))
            }
            r => r,
        };
        let fd_throughout =
            fd_before.is_some() && sh.fd_closes.load(Ordering::SeqCst) == closes_before;
        match exit {
            Ok(Exit::IoOut { port, data }) if port == OUTS_PORT => {
                if outs.is_empty() {
                    outs_fd_throughout = true;
                    outs_evictions.0 = evictions_before;
                }
                outs_evictions.1 = evictions_after;
                outs_fd_throughout &= fd_throughout;
                outs.extend_from_slice(&data);
                ensure!(
                    outs.len() <= 8,
                    "vCPU {idx}: `rep outsb` of 8 bytes produced {} bytes",
                    outs.len()
                );
                if outs.len() == 8 {
                    let gpa = get_regs(sh, &mut vcpu)?.r8;
                    check_kvm_read(sh, idx, gpa, &outs, outs_fd_throughout, outs_evictions)?;
                    outs.clear();
                }
            }
            Ok(Exit::Ucall(Ucall::Sync(a))) if a.len() == 4 && a[0] == MISMATCH => {
                let (gpa, got, iter) = (a[1], a[2], a[3]);
                let page = data_page(gpa).unwrap_or(u64::MAX);
                let host = if page < DATA_PAGES {
                    format!(
                        "host now reads {:#x} there; {}",
                        sh.data.read_u64((gpa - DATA_GPA) as usize),
                        sh.page_report(page)
                    )
                } else {
                    "gpa outside the data slot".to_string()
                };
                bail!(
                    "vCPU {idx}: the guest read {got:#x} at gpa {gpa:#x} (iteration {iter}), \
                     expected {:#x}: a page the host did not populate reached the guest? {host}; {}",
                    word_value(gpa),
                    sh.fd_report()
                );
            }
            Ok(Exit::Ucall(Ucall::Sync(a))) => {
                ensure!(
                    a.len() == 2 && a[0] == idx as u64,
                    "vCPU {idx}: unexpected SYNC {a:x?}"
                );
                ensure!(
                    a[1] == last_iter + SYNC_EVERY,
                    "vCPU {idx}: progress SYNC at iteration {} after {last_iter} (expected +{SYNC_EVERY})",
                    a[1]
                );
                last_iter = a[1];
                sh.iters[idx].store(last_iter, Ordering::Relaxed);
                sh.syncs[idx].fetch_add(1, Ordering::Relaxed);
            }
            Ok(Exit::Ucall(Ucall::Done)) => {
                ensure!(
                    sh.stopping.load(Ordering::SeqCst),
                    "vCPU {idx}: the guest reported DONE before the host set the stop flag"
                );
                sh.done[idx].store(true, Ordering::SeqCst);
                return Ok(());
            }
            Ok(Exit::Ucall(Ucall::Assert(m))) => bail!("vCPU {idx}: {m}"),
            Ok(Exit::Ucall(u)) => bail!("vCPU {idx}: unexpected guest event {u:?}"),
            Ok(Exit::MemoryFault { flags, gpa, size }) => {
                ensure!(
                    flags & KVM_MEMORY_EXIT_FLAG_USERFAULT != 0,
                    "vCPU {idx}: memory fault exit without USERFAULT (flags {flags:#x}, gpa {gpa:#x}, size {size:#x})"
                );
                // docs/uapi.md: with a VCPU_FAULTS fd open the vCPU sleeps instead of exiting;
                // only a close of that fd (or none being open) turns faults into exits.
                if let (true, Some((generation, fd_flags))) = (fd_throughout, fd_before) {
                    ensure!(
                        fd_flags & KVM_USERFAULT_FD_FLAG_VCPU_FAULTS == 0,
                        "vCPU {idx}: USERFAULT exit (flags {flags:#x}, gpa {gpa:#x}) while fd \
                         #{generation} with VCPU_FAULTS (flags {fd_flags:#x}) was open for the whole \
                         KVM_RUN: the fault must have been a record"
                    );
                }
                let access = flags & EXIT_ACCESS;
                ensure!(
                    flags & !(KVM_MEMORY_EXIT_FLAG_USERFAULT | EXIT_ACCESS) == 0
                        && (access == KVM_MEMORY_EXIT_FLAG_READ
                            || access == KVM_MEMORY_EXIT_FLAG_WRITE),
                    "vCPU {idx}: USERFAULT exit flags {flags:#x} (gpa {gpa:#x}): expected exactly one of READ/WRITE (data pages are never executed) and nothing else"
                );
                ensure!(
                    size == PAGE && gpa % PAGE == 0,
                    "vCPU {idx}: USERFAULT exit for gpa {gpa:#x} size {size:#x}: not one page"
                );
                let page = data_page(gpa).ok_or_else(|| {
                    anyhow!("vCPU {idx}: USERFAULT exit for gpa {gpa:#x}, outside the data slot")
                })?;
                inc(&sh.st.uf_exits);
                inc(if access == KVM_MEMORY_EXIT_FLAG_READ {
                    &sh.st.uf_exits_read
                } else {
                    &sh.st.uf_exits_write
                });
                let fd = if rng.chance(1, 2) {
                    sh.current_fd()
                } else {
                    None
                };
                inc(if fd.is_some() {
                    &sh.st.vcpu_resolve
                } else {
                    &sh.st.vcpu_clear
                });
                sh.populate_and_resolve(page, fd.as_deref(), who)
                    .with_context(|| format!("vCPU {idx}: serving the exit for {gpa:#x}"))?;
            }
            Ok(Exit::Intr) => inc(&sh.st.vcpu_eintr),
            Err(e) if e.errno() == libc::EINTR => inc(&sh.st.vcpu_eintr),
            Err(e) if sh.enomem("kvm_run", e.errno()) => {}
            // hva_to_pfn turns a failed page fault (an injected ENOMEM for a page table of the
            // guest memory's mapping) into KVM_PFN_ERR_FAULT, which KVM_RUN returns as EFAULT.
            Err(e) if e.errno() == libc::EFAULT && armed() => inc(&sh.st.kvm_run_efault),
            Ok(other) => bail!("vCPU {idx}: unexpected exit {other:?}"),
            Err(e) => bail!("vCPU {idx}: KVM_RUN: {e}"),
        }
    }
    Ok(())
}

/// KVM_GET_REGS (which allocates its buffer), retried after injected ENOMEMs.
fn get_regs(sh: &Shared, vcpu: &mut Vcpu) -> Result<kvm_bindings::kvm_regs> {
    let mut tries = 0;
    loop {
        match vcpu.fd().get_regs() {
            Ok(r) => return Ok(r),
            Err(e) if tries < 1000 && sh.enomem("get_regs", e.errno()) => tries += 1,
            Err(e) => bail!("KVM_GET_REGS: {e}"),
        }
    }
}

/// Whether the last KVM_RUN ended in a ucall exit (see the sentinel in `vcpu_thread`).
fn ucall_exit(vcpu: &mut Vcpu) -> bool {
    let run = vcpu.kvm_run();
    // SAFETY: exit_reason says the `io` union member is the valid one.
    run.exit_reason == kvm_bindings::KVM_EXIT_IO
        && unsafe { run.__bindgen_anon_1.io }.port == guest::UCALL_PORT
}

/// The ucall of a port-I/O exit whose KVM_GET_REGS failed with an injected ENOMEM: the
/// registers are retried (they stay until the next KVM_RUN) and the record is decoded as
/// `Vcpu::run` would, so a guest assertion is reported as one and not lost.
fn recover_ucall(sh: &Shared, vcpu: &mut Vcpu) -> Result<Ucall> {
    let gva = get_regs(sh, vcpu)?.rdi;
    Ok(vcpu.decode_ucall(gva))
}

/// What KVM's emulator read from the data slot for a guest `rep outsb` at `gpa`. Without a fd
/// KVM's own accesses are not intercepted (docs/uapi.md) and may read a page that is not
/// populated (zeros); with one they wait for the resolve. So every byte must be the pattern's
/// or 0, and zeros while one fd stayed open throughout are counted (they can also come from
/// an access that passed its USERFAULT check just before an eviction's SET, which the uAPI
/// does not order), not failed. `(before, after)`: the eviction sequence read before the
/// first KVM_RUN that produced the bytes and right after the last one returned.
fn check_kvm_read(
    sh: &Shared,
    idx: usize,
    gpa: u64,
    got: &[u8],
    fd_throughout: bool,
    (before, after): (u64, u64),
) -> Result<()> {
    ensure!(
        gpa.is_multiple_of(8) && data_page(gpa).is_some(),
        "vCPU {idx}: `rep outsb` from gpa {gpa:#x} (R8): not a word of the data slot"
    );
    let want = word_value(gpa).to_le_bytes();
    inc(&sh.st.kvm_reads);
    if got == want {
        return Ok(());
    }
    ensure!(
        got.iter().zip(want).all(|(g, w)| *g == w || *g == 0),
        "vCPU {idx}: KVM's emulator read {got:02x?} at gpa {gpa:#x}, expected {want:02x?} \
         (or zeros of an unpopulated page): wrong contents; {}; {}",
        sh.page_report(data_page(gpa).unwrap()),
        sh.fd_report()
    );
    if !fd_throughout {
        // No fd (or not the same one) throughout: the documented no-fd behaviour.
        inc(&sh.st.kvm_reads_unpopulated);
        return Ok(());
    }
    // With one fd open throughout, KVM's read of a USERFAULT page waits for its resolve, which
    // follows its populate. Zeros are possible only if the page was evicted during the run: a
    // read that passed its USERFAULT check just before the eviction's SET, then read the
    // dropped copy (the uAPI does not order the two; a VMM does not take back present pages).
    // Such an eviction is numbered after `before` (its SET followed the check, which followed
    // the load of `before`) and at most `after` (its drop preceded the read, which preceded
    // the return): only those excuse zeros, not one that came after the run.
    let page = data_page(gpa).unwrap();
    let (during, last) = {
        let ps = sh.page(page);
        let during = ps.evictions.iter().any(|&n| before < n && n <= after);
        (during, ps.evictions.last().copied().unwrap_or(0))
    };
    ensure!(
        during,
        "vCPU {idx}: KVM's emulator read {got:02x?} at gpa {gpa:#x} with one fd open throughout \
         and no eviction of the page during the run (the eviction sequence was at #{before} \
         before it and #{after} when it returned; the page's last eviction is #{last}): a page \
         the host did not populate reached KVM's own access; {}; {}",
        sh.page_report(page),
        sh.fd_report()
    );
    inc(&sh.st.kvm_reads_unpopulated_fd);
    Ok(())
}

// ---- resolver threads ----

enum Target {
    Data(u64),
    Scratch,
}

/// Checks one record read from `f` and says what it is for.
fn check_record(f: &UfFd, r: &kvm_userfault_msg) -> Result<Target> {
    ensure!(
        r.size as usize == USERFAULT_MSG_SIZE && r.reserved == 0,
        "record {r:?}: size must be the negotiated {USERFAULT_MSG_SIZE}, reserved 0"
    );
    ensure!(
        r.flags & !KVM_USERFAULT_MSG_ALL == 0 && r.flags & MSG_ACCESS != 0,
        "record {r:?}: unknown flags or no READ/WRITE/EXEC"
    );
    if r.flags & KVM_USERFAULT_MSG_GUEST != 0 {
        ensure!(
            f.flags & KVM_USERFAULT_FD_FLAG_VCPU_FAULTS != 0,
            "record {r:?}: a GUEST record from fd #{} created without VCPU_FAULTS (flags {:#x})",
            f.generation,
            f.flags
        );
        let access = r.flags & MSG_ACCESS;
        ensure!(
            r.flags & KVM_USERFAULT_MSG_VCPU != 0
                && (access == KVM_USERFAULT_MSG_READ || access == KVM_USERFAULT_MSG_WRITE),
            "record {r:?}: a GUEST record needs VCPU and exactly one of READ/WRITE (the guest never executes data pages)"
        );
    }
    if r.flags & KVM_USERFAULT_MSG_VCPU != 0 {
        ensure!(
            (r.vcpu_id as usize) < NR_VCPUS,
            "record {r:?}: vcpu_id of no vCPU"
        );
    }
    let gpa = r
        .gfn
        .checked_mul(PAGE)
        .ok_or_else(|| anyhow!("record {r:?}: gfn out of range"))?;
    if let Some(page) = data_page(gpa) {
        return Ok(Target::Data(page));
    }
    ensure!(
        (SCRATCH_BASE..SCRATCH_END).contains(&gpa),
        "record {r:?}: gfn {:#x} is in no memslot the fuzzer made (data {:#x}+{DATA_SIZE:#x}, scratch window {SCRATCH_BASE:#x}..{SCRATCH_END:#x})",
        r.gfn,
        DATA_GPA
    );
    Ok(Target::Scratch)
}

fn resolver_thread(sh: &Shared, idx: usize, mut rng: Rng) -> Result<()> {
    let who = RESOLVER_NAMES[idx];
    while !sh.stop_resolvers.load(Ordering::SeqCst) && !sh.aborted() {
        arm(sh);
        let Some(f) = sh.current_fd() else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        inc(&sh.st.resolver_ops);
        let raw = f.fd.as_raw_fd();
        let nonblock = f.flags & KVM_USERFAULT_FD_FLAG_NONBLOCK != 0;
        if rng.chance(1, 16) {
            // Smaller than one record: EINVAL before anything else (blocking or not).
            let len = 1 + rng.below(USERFAULT_MSG_SIZE as u64 - 1) as usize;
            sh.expect_errno("read_short_buffer", read_raw(raw, len), Errno::EINVAL)?;
            continue;
        }
        // A blocking fd is read only once poll says a record is there (another resolver may
        // still take it first: then the read blocks until the next record or a kick); a
        // non-blocking one also without polling.
        if !nonblock || rng.chance(1, 2) {
            let revents = poll_fd(sh, raw, rng.below(20) as i32)?;
            ensure!(
                revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) == 0,
                "poll on fd #{}: revents {revents:#x} while the VM lives",
                f.generation
            );
            if revents & libc::POLLIN == 0 {
                inc(&sh.st.poll_timeouts);
                continue;
            }
        }
        let len = match rng.below(4) {
            0 => USERFAULT_MSG_SIZE,
            1 => USERFAULT_MSG_SIZE * (1 + rng.below(8) as usize),
            2 => USERFAULT_MSG_SIZE * (1 + rng.below(4) as usize) + 1 + rng.below(23) as usize,
            _ => 4096,
        };
        inc(&sh.st.reads);
        let bytes = match read_raw(raw, len) {
            Ok(b) => b,
            Err(Errno::EAGAIN) if nonblock => {
                inc(&sh.st.read_eagain);
                continue;
            }
            Err(Errno::EINTR) if !nonblock => {
                inc(&sh.st.read_eintr);
                continue;
            }
            Err(e) if sh.enomem("read", e as i32) => continue,
            Err(e) => bail!(
                "read({len}) on fd #{} (flags {:#x}): {e}",
                f.generation,
                f.flags
            ),
        };
        ensure!(
            !bytes.is_empty(),
            "read({len}) on fd #{}: end of file while the VM lives",
            f.generation
        );
        ensure!(
            bytes.len() % USERFAULT_MSG_SIZE == 0
                && bytes.len() <= len / USERFAULT_MSG_SIZE * USERFAULT_MSG_SIZE,
            "read({len}) on fd #{} returned {} bytes: not whole records that fit the buffer",
            f.generation,
            bytes.len()
        );
        for r in uf::decode(&bytes) {
            let target = check_record(&f, &r).with_context(|| format!("fd #{}", f.generation))?;
            inc(&sh.st.records);
            inc(if r.flags & KVM_USERFAULT_MSG_GUEST != 0 {
                &sh.st.records_guest
            } else {
                &sh.st.records_kvm
            });
            match target {
                // The record was read: a RESOLVE that fails for lack of memory is retried, as
                // nothing else would report the gfn again before a REQUEUE.
                Target::Data(page) => {
                    let mut tries = 0;
                    while !sh.populate_and_resolve(page, Some(&f), who)? {
                        tries += 1;
                        ensure!(tries < 1000, "RESOLVE of page {page}: ENOMEM {tries} times");
                    }
                    inc(&sh.st.resolver_resolves);
                }
                Target::Scratch => {
                    inc(&sh.st.records_scratch);
                    let mut tries = 0;
                    while sh
                        .tolerate("resolve", resolve(raw, r.gfn * PAGE, PAGE))
                        .with_context(|| format!("RESOLVE scratch gfn {:#x}", r.gfn))?
                        .is_none()
                    {
                        tries += 1;
                        ensure!(
                            tries < 1000,
                            "RESOLVE of scratch gfn {:#x}: ENOMEM {tries} times",
                            r.gfn
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

// ---- chaos thread ----

struct Chaos {
    rng: Rng,
    /// Scratch slot: position (None: absent) and flags.
    scratch: Option<u64>,
    scratch_flags: u32,
    data_flags: u32,
    /// Flags of the last fd created: the next one toggles VCPU_FAULTS.
    last_vcpu_faults: bool,
    next_generation: u64,
}

fn chaos_thread(sh: &Shared, rng: Rng, first_vcpu_faults: bool) -> Result<()> {
    let mut c = Chaos {
        rng,
        scratch: None,
        scratch_flags: 0,
        data_flags: 0,
        last_vcpu_faults: first_vcpu_faults,
        next_generation: 1,
    };
    while !sh.stop_chaos.load(Ordering::SeqCst) && !sh.aborted() {
        arm(sh);
        inc(&sh.st.chaos_ops);
        let op = c.rng.below(100);
        let r = match op {
            0..=13 => c.set_range(sh),
            14..=21 => c.clear_range(sh),
            22..=31 => c.evict(sh),
            32..=47 => c.invalid(sh),
            48..=49 => c.noslot(sh),
            50..=51 => c.exact_update(sh),
            52..=56 => c.requeue(sh),
            57..=60 => c.fd_cycle(sh),
            61..=72 => c.signal(sh),
            73..=84 => c.scratch_slot(sh),
            85..=86 => c.data_slot_flags(sh),
            87 => c.fork_resolve(sh),
            _ => Ok(()), // idle: let the vCPUs run
        };
        r.with_context(|| format!("chaos op {op}"))?;
        std::thread::sleep(Duration::from_micros(c.rng.below(2000)));
    }
    // Leave the memslots as the end phase expects: data slot without dirty logging, scratch
    // slot deleted (injection is off by now: this must succeed).
    arm(sh);
    if c.data_flags != 0 {
        c.data_slot_flags(sh)?;
    }
    if let Some(pos) = c.scratch {
        // SAFETY: a deletion (size 0) registers no memory.
        unsafe {
            sh.vm
                .set_region2(SCRATCH_SLOT, 0, scratch_gpa(pos), 0, 0, None, 0)
        }
        .map_err(|e| anyhow!("delete the scratch slot: {e}"))?;
        sh.scratch_at.store(0, Ordering::Relaxed);
    }
    Ok(())
}

impl Chaos {
    /// SET USERFAULT on a random range around a populated page (re-marking: the guest faults
    /// again); sometimes across the end of the data slot, whose rest has no memslot.
    fn set_range(&mut self, sh: &Shared) -> Result<()> {
        let (gpa, size) = if self.rng.chance(1, 8) {
            let before = 1 + self.rng.below(4);
            (
                DATA_GPA + DATA_SIZE - before * PAGE,
                (before + 1 + self.rng.below(4)) * PAGE,
            )
        } else {
            let start = (0..8)
                .map(|_| self.rng.below(DATA_PAGES))
                .find(|&p| sh.page(p).populated)
                .unwrap_or_else(|| self.rng.below(DATA_PAGES));
            let len = (1 + self.rng.below(8)).min(DATA_PAGES - start);
            (page_gpa(start), len * PAGE)
        };
        sh.counted(
            "set",
            set_userfault(sh.vm.fd(), gpa, size),
            &sh.st.set_ranges,
            || format!("SET USERFAULT({gpa:#x}, {size:#x})"),
        )?;
        Ok(())
    }

    /// CLEAR (or RESOLVE through the fd) a range of populated pages, holding their locks
    /// (ascending order, as everywhere) so that none is evicted meanwhile. Half the time the
    /// range is populated first, else only its populated prefix is cleared.
    fn clear_range(&mut self, sh: &Shared) -> Result<()> {
        let start = self.rng.below(DATA_PAGES);
        let len = (1 + self.rng.below(8)).min(DATA_PAGES - start);
        let fill = self.rng.chance(1, 2);
        let mut guards = Vec::new();
        for p in start..start + len {
            let mut ps = sh.page(p);
            if !ps.populated {
                if !fill {
                    break;
                }
                sh.populate(p, &mut ps, "uf-chaos");
            }
            guards.push(ps);
        }
        if guards.is_empty() {
            return Ok(());
        }
        let (gpa, size) = (page_gpa(start), guards.len() as u64 * PAGE);
        let fd = if self.rng.chance(1, 2) {
            sh.current_fd()
        } else {
            None
        };
        let what = match &fd {
            Some(f) => {
                let r = resolve(f.fd.as_raw_fd(), gpa, size);
                if !sh.counted("resolve", r, &sh.st.clear_fd_ranges, || {
                    format!("RESOLVE({gpa:#x}, {size:#x}) on fd #{}", f.generation)
                })? {
                    return Ok(());
                }
                "range resolve"
            }
            None => {
                let r = clear_userfault(sh.vm.fd(), gpa, size);
                if !sh.counted("clear", r, &sh.st.clear_ranges, || {
                    format!("CLEAR USERFAULT({gpa:#x}, {size:#x})")
                })? {
                    return Ok(());
                }
                "range clear"
            }
        };
        for ps in guards.iter_mut() {
            sh.log(ps, "uf-chaos", what);
        }
        Ok(())
    }

    /// Evicts a populated page: USERFAULT first (which must zap every mapping of it), then the
    /// host copy is zeroed, or dropped with MADV_DONTNEED (anonymous memory reads back as
    /// zeros), and the page is unpopulated. A guest that still reached the old contents through
    /// a stale mapping would not notice, but one that reaches the new contents reads 0.
    fn evict(&mut self, sh: &Shared) -> Result<()> {
        let page = self.rng.below(DATA_PAGES);
        let mut ps = sh.page(page);
        if !ps.populated {
            return Ok(());
        }
        let gpa = page_gpa(page);
        if sh
            .tolerate("set", set_userfault(sh.vm.fd(), gpa, PAGE))
            .with_context(|| format!("SET USERFAULT({gpa:#x}) to evict"))?
            .is_none()
        {
            // Not USERFAULT again: the page must stay as it is.
            return Ok(());
        }
        let n = sh.evictions.fetch_add(1, Ordering::SeqCst) + 1;
        ps.evictions.push(n);
        let off = (page * PAGE) as usize;
        if self.rng.chance(1, 2) {
            sh.data.fill(off, PAGE as usize, 0);
            inc(&sh.st.evict_zero);
            sh.log(&mut ps, "uf-chaos", "evict (zeroed)");
        } else {
            // SAFETY: the page lies inside the data mapping, which lives as long as `sh`;
            // nothing on the host holds a reference into it.
            let r = unsafe {
                libc::madvise(
                    (sh.data.addr() + off as u64) as *mut libc::c_void,
                    PAGE as usize,
                    libc::MADV_DONTNEED,
                )
            };
            ensure!(r == 0, "madvise(MADV_DONTNEED): {}", Errno::last());
            inc(&sh.st.evict_dontneed);
            sh.log(&mut ps, "uf-chaos", "evict (dontneed)");
        }
        ps.populated = false;
        Ok(())
    }

    /// One invalid call, which must fail with exactly the documented errno. The ranges point at
    /// the data slot, so a wrongly accepted CLEAR or RESOLVE would also show as a guest content
    /// failure.
    fn invalid(&mut self, sh: &Shared) -> Result<()> {
        let uf_attr = KVM_MEMORY_ATTRIBUTE_USERFAULT;
        let (set, clear) = (
            KVM_MEMORY_ATTRIBUTES_FLAG_SET,
            KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR,
        );
        let delta = if self.rng.chance(1, 2) { set } else { clear };
        let gpa = page_gpa(self.rng.below(DATA_PAGES));
        let vm = sh.vm.fd();
        let rng = &mut self.rng;
        let einval = Errno::EINVAL;
        let fd = sh.current_fd();
        match rng.below(17) {
            0 => sh.expect_errno(
                "attr_unaligned_gpa",
                set_attributes(vm, gpa + 1 + rng.below(PAGE - 1), PAGE, uf_attr, delta),
                einval,
            ),
            1 => sh.expect_errno(
                "attr_unaligned_size",
                set_attributes(
                    vm,
                    gpa,
                    PAGE * rng.below(4) + 1 + rng.below(PAGE - 1),
                    uf_attr,
                    delta,
                ),
                einval,
            ),
            2 => sh.expect_errno(
                "attr_zero_size",
                set_attributes(vm, gpa, 0, uf_attr, delta),
                einval,
            ),
            3 => {
                // gpa + size wraps past 2^64 (to 0 or above).
                let k = 1 + rng.below(4);
                let (g, s) = (0u64.wrapping_sub(k * PAGE), (k + rng.below(4)) * PAGE);
                sh.expect_errno(
                    "attr_overflow",
                    set_attributes(vm, g, s, uf_attr, delta),
                    einval,
                )
            }
            4 => sh.expect_errno(
                "attr_set_and_clear",
                set_attributes(vm, gpa, PAGE, uf_attr, set | clear),
                einval,
            ),
            5 => {
                let bit = 2 + rng.below(62);
                let flags = (1u64 << bit) | if rng.chance(1, 2) { delta } else { 0 };
                sh.expect_errno(
                    "attr_unknown_flag",
                    set_attributes(vm, gpa, PAGE, uf_attr, flags),
                    einval,
                )
            }
            6 => sh.expect_errno(
                "attr_exact_userfault",
                set_attributes(vm, gpa, PAGE, uf_attr, 0),
                einval,
            ),
            7 => {
                // Any attribute but USERFAULT (PRIVATE included) is unsupported on a default VM.
                let bit = (5 + rng.below(63)) % 64;
                let bit = if bit == 4 { 3 } else { bit };
                let attrs = (1u64 << bit) | if rng.chance(1, 2) { uf_attr } else { 0 };
                sh.expect_errno(
                    "attr_unknown_attribute",
                    set_attributes(vm, gpa, PAGE, attrs, delta),
                    einval,
                )
            }
            n @ 8..=13 if fd.is_some() => {
                let raw = fd.as_ref().unwrap().fd.as_raw_fd();
                let mut r = kvm_userfault_range {
                    gpa,
                    size: PAGE,
                    flags: 0,
                    reserved: 0,
                };
                let what = match n {
                    8 => {
                        r.gpa += 1 + rng.below(PAGE - 1);
                        "resolve_unaligned_gpa"
                    }
                    9 => {
                        r.size = PAGE * rng.below(4) + 1 + rng.below(PAGE - 1);
                        "resolve_unaligned_size"
                    }
                    10 => {
                        r.size = 0;
                        "resolve_zero_size"
                    }
                    11 => {
                        let k = 1 + rng.below(4);
                        (r.gpa, r.size) = (0u64.wrapping_sub(k * PAGE), (k + rng.below(4)) * PAGE);
                        "resolve_overflow"
                    }
                    12 => {
                        r.flags = rng.next_u64() | 1 << rng.below(64);
                        "resolve_flags"
                    }
                    _ => {
                        r.reserved = rng.next_u64() | 1 << rng.below(64);
                        "resolve_reserved"
                    }
                };
                sh.expect_errno(what, resolve_raw(raw, &r), einval)
            }
            14 if fd.is_some() => {
                let raw = fd.as_ref().unwrap().fd.as_raw_fd();
                let len = 1 + rng.below(USERFAULT_MSG_SIZE as u64 - 1) as usize;
                sh.expect_errno("read_short_buffer", read_raw(raw, len), einval)
            }
            15 if fd.is_some() => {
                let raw = fd.as_ref().unwrap().fd.as_raw_fd();
                // Numbers the fd does not implement: neighbours of its own, its own numbers with
                // another direction or size, and VM ioctls.
                let nr = rng.pick(&[
                    ioctl_expr(_IOC_NONE, KVMIO, 0xd9, 0),
                    ioctl_expr(_IOC_NONE, KVMIO, 0xd5, 0),
                    ioctl_expr(_IOC_WRITE, KVMIO, 0xd8, 32),
                    ioctl_expr(_IOC_READ, KVMIO, 0xd7, 32),
                    KVM_CREATE_USERFAULT_FD(),
                    KVM_SET_MEMORY_ATTRIBUTES,
                ]);
                let mut arg = [0u64; 8];
                // SAFETY: an ioctl the fd rejects; `arg` is a valid 64-byte buffer in case
                // anything looked at it.
                let r = unsafe { libc::ioctl(raw, nr, arg.as_mut_ptr()) };
                let got = if r < 0 { Err(Errno::last()) } else { Ok(r) };
                sh.expect_errno("fd_unknown_ioctl", got, Errno::ENOTTY)
            }
            16 if fd.is_some() => {
                // A second fd while one is open (only this thread creates and closes fds).
                let mut arg = kvm_create_userfault_fd {
                    flags: rng.below(4) & sh.fd_flags_supported,
                    msg_size: USERFAULT_MSG_SIZE as u32,
                    ..Default::default()
                };
                sh.expect_errno(
                    "create_second_fd",
                    create_fd_raw(vm, &mut arg),
                    Errno::EBUSY,
                )
            }
            _ => Ok(()),
        }
    }

    /// Bad KVM_CREATE_USERFAULT_FD arguments, tried while no fd is open (with one open the
    /// kernel happens to check the arguments first too, but docs/uapi.md does not order the two
    /// errors).
    fn bad_create(&mut self, sh: &Shared) -> Result<()> {
        let mut arg = kvm_create_userfault_fd {
            msg_size: USERFAULT_MSG_SIZE as u32,
            ..Default::default()
        };
        let what = match self.rng.below(4) {
            0 => {
                let unsupported: Vec<u64> = (0..64)
                    .map(|b| 1u64 << b)
                    .filter(|f| f & sh.fd_flags_supported == 0)
                    .collect();
                arg.flags = self.rng.pick(&unsupported);
                "create_unknown_flag"
            }
            1 => {
                arg.pad = 1 + self.rng.below(u32::MAX as u64) as u32;
                "create_pad"
            }
            2 => {
                arg.reserved[self.rng.below(6) as usize] = 1 + self.rng.below(u64::MAX - 1);
                "create_reserved"
            }
            _ => {
                arg.msg_size = self.rng.below(USERFAULT_MSG_SIZE as u64) as u32;
                "create_msg_size"
            }
        };
        sh.expect_errno(what, create_fd_raw(sh.vm.fd(), &mut arg), Errno::EINVAL)
    }

    /// An exact-value update (flags 0, attributes 0, as VMMs do for private/shared
    /// conversions) over data pages: valid, and it must leave USERFAULT alone (else an
    /// unpopulated page would reach the guest).
    fn exact_update(&mut self, sh: &Shared) -> Result<()> {
        let (gpa, size) = self.rng.range(DATA_GPA, DATA_PAGES, 16);
        let r = set_attributes(sh.vm.fd(), gpa, size, 0, 0);
        sh.counted("exact", r, &sh.st.exact_updates, || {
            format!("exact KVM_SET_MEMORY_ATTRIBUTES(0) on ({gpa:#x}, {size:#x})")
        })?;
        Ok(())
    }

    /// Valid operations where no memslot is: SET/CLEAR/RESOLVE succeed and change nothing.
    fn noslot(&mut self, sh: &Shared) -> Result<()> {
        let (gpa, size) = self.rng.range(NOSLOT_GPA, NOSLOT_PAGES, 64);
        let r = match (self.rng.below(3), sh.current_fd()) {
            (0, _) => set_userfault(sh.vm.fd(), gpa, size),
            (1, Some(f)) => resolve(f.fd.as_raw_fd(), gpa, size),
            _ => clear_userfault(sh.vm.fd(), gpa, size),
        };
        sh.counted("noslot", r, &sh.st.noslot_ops, || {
            format!("SET/CLEAR/RESOLVE without a memslot ({gpa:#x}, {size:#x})")
        })?;
        Ok(())
    }

    /// REQUEUE: re-posts read but unresolved records (resolvers handle the duplicates).
    fn requeue(&mut self, sh: &Shared) -> Result<()> {
        let Some(f) = sh.current_fd() else {
            return Ok(());
        };
        let Some(n) = sh
            .tolerate("requeue", requeue(f.fd.as_raw_fd()))
            .with_context(|| format!("KVM_USERFAULT_REQUEUE on fd #{}", f.generation))?
        else {
            return Ok(());
        };
        ensure!(n >= 0, "KVM_USERFAULT_REQUEUE returned {n}");
        inc(&sh.st.requeue_calls);
        sh.st.requeued.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Closes the fd (if one is open) and usually creates the next one, with VCPU_FAULTS
    /// toggled from the previous one and NONBLOCK and the asked record size at random.
    fn fd_cycle(&mut self, sh: &Shared) -> Result<()> {
        let old = lock(&sh.fd).take();
        if let Some(old) = old {
            let generation = old.generation;
            close_exclusive(sh, old)?;
            inc(&sh.st.fd_close);
            if self.rng.chance(1, 2) {
                check_close_released(sh, generation)?;
            }
            for _ in 0..self.rng.below(3) {
                self.bad_create(sh)?;
            }
            if self.rng.chance(1, 3) {
                // Stay without a fd for a while: vCPU faults are exits only.
                return Ok(());
            }
        }
        let vcpu_faults = !self.last_vcpu_faults;
        let flags = if vcpu_faults {
            KVM_USERFAULT_FD_FLAG_VCPU_FAULTS
        } else {
            0
        } | if self.rng.chance(1, 2) {
            KVM_USERFAULT_FD_FLAG_NONBLOCK
        } else {
            0
        };
        let generation = self.next_generation;
        let Some(f) = create_uf_fd(sh, flags, generation, &mut self.rng)? else {
            // No memory for it: no fd until the next attempt.
            return Ok(());
        };
        self.next_generation += 1;
        self.last_vcpu_faults = vcpu_faults;
        *lock(&sh.fd) = Some(Arc::new(f));
        inc(&sh.st.fd_create);
        if vcpu_faults {
            inc(&sh.st.fd_create_vcpu_faults);
        }
        Ok(())
    }

    fn signal(&mut self, sh: &Shared) -> Result<()> {
        if self.rng.chance(3, 4) {
            let t = lock(&sh.vcpu_threads);
            if !t.is_empty() {
                kick(self.rng.pick(&t[..]));
                inc(&sh.st.signals_vcpu);
            }
        } else {
            // Under the lock: a thread is removed from the list before it is joined.
            let t = lock(&sh.resolver_threads);
            if !t.is_empty() {
                kick(self.rng.pick(&t[..]));
                inc(&sh.st.signals_resolver);
            }
        }
        Ok(())
    }

    /// Adds, deletes, moves or re-flags (dirty logging) the scratch slot, while the scratch
    /// thread SETs, CLEARs and RESOLVEs in its window.
    fn scratch_slot(&mut self, sh: &Shared) -> Result<()> {
        let hva = sh.scratch.addr();
        // `false`: an injected ENOMEM, the memslots unchanged.
        let set_region = |flags: u32, gpa: u64, size: u64, what: &str| -> Result<bool> {
            // SAFETY: `hva` is `sh.scratch`, SCRATCH_SIZE bytes that only raw copies touch;
            // `Shared` drops it after `vm` (field order), and the vCPUs are joined before it.
            match unsafe {
                sh.vm
                    .set_region2(SCRATCH_SLOT, flags, gpa, size, hva, None, 0)
            } {
                Ok(()) => Ok(true),
                Err(e) if sh.enomem("memslot", e.errno()) => Ok(false),
                Err(e) => Err(anyhow!(
                    "{what} scratch slot (gpa {gpa:#x}, size {size:#x}, flags {flags:#x}): {e}"
                )),
            }
        };
        match self.scratch {
            None => {
                let pos = self.rng.below(SCRATCH_POSITIONS);
                let flags = if self.rng.chance(1, 2) {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                };
                if set_region(flags, scratch_gpa(pos), SCRATCH_SIZE, "add")? {
                    self.scratch_flags = flags;
                    self.scratch = Some(pos);
                    inc(&sh.st.slot_add);
                    if self.rng.chance(1, 2) {
                        // State that the delete must drop and the move must carry.
                        sh.tolerate(
                            "set",
                            set_userfault(sh.vm.fd(), scratch_gpa(pos), SCRATCH_SIZE),
                        )
                        .context("SET USERFAULT on the new scratch slot")?;
                    }
                }
            }
            Some(pos) => match self.rng.below(3) {
                0 => {
                    if set_region(0, scratch_gpa(pos), 0, "delete")? {
                        self.scratch = None;
                        inc(&sh.st.slot_delete);
                    }
                }
                1 => {
                    let to = (pos + 1 + self.rng.below(SCRATCH_POSITIONS - 1)) % SCRATCH_POSITIONS;
                    if set_region(self.scratch_flags, scratch_gpa(to), SCRATCH_SIZE, "move")? {
                        self.scratch = Some(to);
                        inc(&sh.st.slot_move);
                    }
                }
                _ => {
                    let flags = self.scratch_flags ^ kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
                    if set_region(flags, scratch_gpa(pos), SCRATCH_SIZE, "re-flag")? {
                        self.scratch_flags = flags;
                        inc(&sh.st.slot_flags);
                    }
                }
            },
        }
        sh.scratch_at
            .store(self.scratch.map_or(0, |p| p + 1), Ordering::Relaxed);
        Ok(())
    }

    /// A flags-only update of the data slot (dirty logging on or off) under the running guest:
    /// the slot's USERFAULT state must survive it (else the guest reads unpopulated pages).
    fn data_slot_flags(&mut self, sh: &Shared) -> Result<()> {
        let flags = self.data_flags ^ kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        // SAFETY: the data slot's own mapping, which the VM owns (`sh.data` is a clone of
        // its region's `Arc`): a flags-only update keeps the same memory.
        match unsafe {
            sh.vm.set_region2(
                DATA_SLOT,
                flags,
                DATA_GPA,
                DATA_SIZE,
                sh.data.addr(),
                None,
                0,
            )
        } {
            Ok(()) => {}
            // The slot keeps its flags.
            Err(e) if sh.enomem("memslot", e.errno()) => return Ok(()),
            Err(e) => bail!("flags-only update of the data slot to {flags:#x}: {e}"),
        }
        self.data_flags = flags;
        inc(&sh.st.data_slot_flags);
        Ok(())
    }

    /// A child process inherits the fd and RESOLVEs one populated page through it (the
    /// page's lock is held until the child is reaped). The child's copy of the (private)
    /// memory is its own, so the page is populated here, before the fork.
    fn fork_resolve(&mut self, sh: &Shared) -> Result<()> {
        let Some(f) = sh.current_fd() else {
            return Ok(());
        };
        let page = self.rng.below(DATA_PAGES);
        let mut ps = sh.page(page);
        if !ps.populated {
            sh.populate(page, &mut ps, "uf-chaos");
        }
        let range = kvm_userfault_range {
            gpa: page_gpa(page),
            size: PAGE,
            flags: 0,
            reserved: 0,
        };
        let raw = f.fd.as_raw_fd();
        // SAFETY: fork in a multi-threaded process: the child runs only async-signal-safe code
        // (one ioctl, reading errno, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above; `range` is a live, initialised kvm_userfault_range.
            unsafe {
                let r = libc::ioctl(
                    raw,
                    KVM_USERFAULT_RESOLVE(),
                    &range as *const kvm_userfault_range,
                );
                let code = if r == 0 {
                    0
                } else {
                    (*libc::__errno_location()).clamp(1, 255)
                };
                libc::_exit(code);
            }
        }
        if pid < 0 && armed() {
            let e = Errno::last();
            if !sh.enomem("fork", e as i32) {
                inc(&sh.st.fork_fail_other);
                println!("fuzz note: fork failed with {e} while injecting");
            }
            return Ok(());
        }
        ensure!(pid > 0, "fork: {}", Errno::last());
        let deadline = Instant::now() + timeout();
        let mut status = 0;
        loop {
            // SAFETY: reaps our own child; `status` is a valid out-parameter.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                break;
            }
            ensure!(r == 0, "waitpid({pid}): {}", Errno::last());
            if Instant::now() > deadline {
                // SAFETY: our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                bail!(
                    "the child resolving page {page} through the inherited fd #{} did not exit within {:?}",
                    f.generation,
                    timeout()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if libc::WIFEXITED(status) && sh.enomem("fork_child_resolve", libc::WEXITSTATUS(status)) {
            // The child inherited make-it-fail; the page stays USERFAULT.
            return Ok(());
        }
        ensure!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child's KVM_USERFAULT_RESOLVE of page {page} through the inherited fd #{}: {}",
            f.generation,
            if libc::WIFEXITED(status) {
                format!("{}", Errno::from_raw(libc::WEXITSTATUS(status)))
            } else {
                format!("wait status {status:#x}")
            }
        );
        sh.log(&mut ps, "uf-chaos", "fork resolve");
        inc(&sh.st.fork_resolve);
        Ok(())
    }
}

/// KVM_CREATE_USERFAULT_FD with `flags` and a random acceptable `msg_size`; checks the
/// negotiated record size and the descriptor flags. `None`: an injected ENOMEM.
fn create_uf_fd(sh: &Shared, flags: u64, generation: u64, rng: &mut Rng) -> Result<Option<UfFd>> {
    let ask = rng.pick(&[24u32, 25, 100, 4096, u32::MAX]);
    let mut arg = kvm_create_userfault_fd {
        flags,
        msg_size: ask,
        ..Default::default()
    };
    let r = sh.tolerate("create_fd", create_fd_raw(sh.vm.fd(), &mut arg));
    let Some(fd) = r.with_context(|| {
        format!("KVM_CREATE_USERFAULT_FD(flags {flags:#x}, msg_size {ask}) #{generation}")
    })?
    else {
        return Ok(None);
    };
    ensure!(
        arg.msg_size as usize == USERFAULT_MSG_SIZE,
        "KVM_CREATE_USERFAULT_FD(msg_size {ask}) negotiated {} bytes, expected {USERFAULT_MSG_SIZE}",
        arg.msg_size
    );
    // SAFETY: fcntl queries on a descriptor we own.
    let (fl, fdfl) = unsafe {
        (
            libc::fcntl(fd.as_raw_fd(), libc::F_GETFL),
            libc::fcntl(fd.as_raw_fd(), libc::F_GETFD),
        )
    };
    ensure!(
        (fl & libc::O_NONBLOCK != 0) == (flags & KVM_USERFAULT_FD_FLAG_NONBLOCK != 0)
            && fdfl & libc::FD_CLOEXEC != 0,
        "fd #{generation} (flags {flags:#x}): F_GETFL {fl:#x}, F_GETFD {fdfl:#x} (O_NONBLOCK iff NONBLOCK; always O_CLOEXEC)"
    );
    Ok(Some(UfFd {
        fd,
        flags,
        generation,
    }))
}

/// Closes the fd once this is its last reference, kicking the resolvers out of blocking reads
/// and polls meanwhile (a read blocked with nothing to come would otherwise hold it forever).
fn close_exclusive(sh: &Shared, old: Arc<UfFd>) -> Result<()> {
    let deadline = Instant::now() + timeout();
    let mut old = old;
    loop {
        match Arc::try_unwrap(old) {
            Ok(f) => {
                sh.fd_closes.fetch_add(1, Ordering::SeqCst);
                drop(f);
                return Ok(());
            }
            Err(a) => old = a,
        }
        ensure!(
            Instant::now() < deadline && !sh.aborted(),
            "fd #{} still in use by {} other threads after {:?}; threads: {}",
            old.generation,
            Arc::strong_count(&old) - 1,
            timeout(),
            thread_report(true)
        );
        for t in lock(&sh.resolver_threads).iter() {
            kick(*t);
            inc(&sh.st.signals_resolver);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// docs/uapi.md: "Closing the fd wakes all waiters". Right after a close, every vCPU that
/// was inside KVM_RUN must return from that KVM_RUN on its own: this thread, the only one that
/// signals, sends nothing meanwhile, so a vCPU asleep on a gfn of the closed fd that the close
/// did not wake stays in it (a lost wake-up), while any other KVM_RUN soon exits (every
/// USERFAULT access is an exit without a fd, and the guest reports progress regularly).
fn check_close_released(sh: &Shared, generation: u64) -> Result<()> {
    let snap: Vec<(u64, bool)> = (0..NR_VCPUS)
        .map(|i| {
            let n = sh.runs_returned[i].load(Ordering::SeqCst);
            (n, sh.in_run[i].load(Ordering::SeqCst))
        })
        .collect();
    // As long as the stall watchdog's bound (a vCPU may legitimately go that long without an
    // exit under TCG and shadow paging), and at least 10 s.
    let limit = sh.stall.max(Duration::from_secs(10)).min(timeout());
    let released = |i: usize| {
        !snap[i].1
            || sh.runs_returned[i].load(Ordering::SeqCst) != snap[i].0
            || sh.done[i].load(Ordering::SeqCst)
    };
    if wait_until(sh, limit, || (0..NR_VCPUS).all(released)) || sh.aborted() {
        inc(&sh.st.close_checks);
        return Ok(());
    }
    let stuck: Vec<usize> = (0..NR_VCPUS).filter(|&i| !released(i)).collect();
    bail!(
        "vCPUs {stuck:?} still in the KVM_RUN they were in when fd #{generation} was closed, \
         {limit:?} later (no signal sent meanwhile): a waiter the close did not release; \
         threads: {}",
        thread_report(true)
    )
}

// ---- scratch thread ----

/// SET/CLEAR/RESOLVE on random ranges of the scratch window (the scratch slot may be there,
/// elsewhere, or nowhere, and may move meanwhile) and where no memslot is: all must succeed.
/// Never touches the data slot, so it needs no page lock.
fn scratch_thread(sh: &Shared, mut rng: Rng) -> Result<()> {
    while !sh.stop_chaos.load(Ordering::SeqCst) && !sh.aborted() {
        arm(sh);
        inc(&sh.st.scratch_ops);
        let (gpa, size) = rng.range(SCRATCH_BASE, SCRATCH_POSITIONS * SCRATCH_PAGES, 24);
        match rng.below(4) {
            0 => {
                let r = sh.tolerate("scratch_set", set_userfault(sh.vm.fd(), gpa, size));
                if r.with_context(|| format!("SET scratch ({gpa:#x}, {size:#x})"))?
                    .is_some()
                {
                    inc(&sh.st.scratch_set);
                }
            }
            1 => {
                let r = sh.tolerate("scratch_clear", clear_userfault(sh.vm.fd(), gpa, size));
                if r.with_context(|| format!("CLEAR scratch ({gpa:#x}, {size:#x})"))?
                    .is_some()
                {
                    inc(&sh.st.scratch_clear);
                }
            }
            2 => {
                if let Some(f) = sh.current_fd() {
                    let r = sh.tolerate("scratch_resolve", resolve(f.fd.as_raw_fd(), gpa, size));
                    if r.with_context(|| {
                        format!(
                            "RESOLVE scratch ({gpa:#x}, {size:#x}) on fd #{}",
                            f.generation
                        )
                    })?
                    .is_some()
                    {
                        inc(&sh.st.scratch_resolve);
                    }
                }
            }
            _ => {
                let (gpa, size) = rng.range(NOSLOT_GPA, NOSLOT_PAGES, 64);
                let r = sh.tolerate("noslot", clear_userfault(sh.vm.fd(), gpa, size));
                if r.with_context(|| format!("CLEAR without a memslot ({gpa:#x}, {size:#x})"))?
                    .is_some()
                {
                    inc(&sh.st.noslot_ops);
                }
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(1000)));
    }
    Ok(())
}

// ---- watchdog ----

fn watchdog_thread(sh: &Shared, stall: Duration, seed: u64, secs: u64) -> Result<()> {
    let mut last = [0u64; NR_VCPUS];
    let mut since = [Instant::now(); NR_VCPUS];
    while !sh.stop_watchdog.load(Ordering::SeqCst) && !sh.aborted() {
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..NR_VCPUS {
            let n = sh.syncs[i].load(Ordering::Relaxed);
            if n != last[i] || sh.done[i].load(Ordering::SeqCst) {
                last[i] = n;
                since[i] = Instant::now();
            } else if since[i].elapsed() > stall {
                bail!(
                    "vCPU {i} made no progress (SYNC count {n}, guest iteration {}) for {stall:?}; \
                     {}; scratch slot at {}; threads: {}; counts: {}",
                    sh.iters[i].load(Ordering::Relaxed),
                    sh.fd_report(),
                    sh.scratch_at.load(Ordering::Relaxed),
                    thread_report(true),
                    sh.summary(seed, secs)
                );
            }
        }
    }
    Ok(())
}

// ---- the test ----

/// libtest runs the two tests in parallel threads of one process: the D-state and thread
/// reports scan /proc/self/task, and two VMs' threads would compete for the guest's CPUs
/// under one watchdog. One fuzzer at a time.
static ONE_FUZZER: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn fuzz_userfault_uapi() {
    let _one = ONE_FUZZER.lock().unwrap_or_else(|e| e.into_inner());
    let seed = fuzz_seed();
    println!("fuzz seed: {seed}");
    kvm_selftests::require_userfault!(TEST);
    if let Err(e) = fuzz(seed, None) {
        panic!("{TEST} failed (seed {seed}; rerun with KVMUF_FUZZ_SEED={seed}): {e:#}");
    }
}

/// The fuzzer under failslab and fail_page_alloc (see the header).
#[test]
#[ignore = "needs the KVM userfault kernel with fault injection (the debug flavour)"]
fn fuzz_userfault_uapi_failslab() {
    let _one = ONE_FUZZER.lock().unwrap_or_else(|e| e.into_inner());
    let seed = fuzz_seed();
    println!("fuzz seed: {seed}");
    kvm_selftests::require_userfault!(TEST_FAILSLAB);
    // Opt-in until its open finding is understood (docs/reliability.md: a valid
    // KVM_CREATE_USERFAULT_FD got EBUSY after every fd had been closed, under injection).
    if env_u64("KVMUF_FUZZ_FAILSLAB", 0) == 0 {
        kvm_selftests::caps::skip(
            TEST_FAILSLAB,
            "opt-in: set KVMUF_FUZZ_FAILSLAB=1 (docs/reliability.md, open finding)",
        );
        return;
    }
    if let Some(why) = FaultInjection::unavailable() {
        kvm_selftests::caps::skip(TEST_FAILSLAB, &why);
        return;
    }
    let percent = env_u64("KVMUF_FUZZ_FAIL_PERCENT", 5);
    let r = FaultInjection::setup(percent).and_then(|fi| {
        println!(
            "fuzz failslab: failslab and fail_page_alloc at {percent}% for the worker threads"
        );
        fuzz(seed, Some(&fi))
        // `fi` restores the knobs here, also after a failure.
    });
    if let Err(e) = r {
        panic!(
            "{TEST_FAILSLAB} failed (seed {seed}; rerun with KVMUF_FUZZ_SEED={seed} \
             KVMUF_FUZZ_FAIL_PERCENT={percent}): {e:#}"
        );
    }
}

const FAILSLAB: &str = "/sys/kernel/debug/failslab";
const FAIL_PAGE_ALLOC: &str = "/sys/kernel/debug/fail_page_alloc";

/// The debugfs knobs of failslab and fail_page_alloc as the failslab run sets them; dropping
/// it writes every knob's previous value back (in reverse order, so task-filter last).
struct FaultInjection {
    saved: Vec<(String, String)>,
}

impl FaultInjection {
    fn unavailable() -> Option<String> {
        let missing: Vec<&str> = [FAILSLAB, FAIL_PAGE_ALLOC]
            .into_iter()
            .filter(|d| !std::path::Path::new(d).join("probability").exists())
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "no {} (needs CONFIG_FAILSLAB, CONFIG_FAIL_PAGE_ALLOC and \
                 CONFIG_FAULT_INJECTION_DEBUG_FS, debugfs at /sys/kernel/debug, root: the \
                 debug flavour)",
                missing.join(", ")
            )
        })
    }

    fn setup(percent: u64) -> Result<Self> {
        ensure!(
            percent <= 100,
            "KVMUF_FUZZ_FAIL_PERCENT={percent}: not a percentage"
        );
        let mut fi = FaultInjection { saved: Vec::new() };
        let percent = percent.to_string();
        // task-filter first: from then on only make-it-fail tasks can fail.
        let common = [
            ("task-filter", "Y"),
            ("probability", percent.as_str()),
            ("interval", "1"),
            ("times", "-1"),
            ("space", "0"),
            ("verbose", "0"),
            ("ignore-gfp-wait", "N"),
        ];
        for dir in [FAILSLAB, FAIL_PAGE_ALLOC] {
            for (knob, value) in common {
                fi.set(dir, knob, value)?;
            }
        }
        fi.set(FAILSLAB, "cache-filter", "N")?;
        // User (highmem-flagged) pages stay out: a failed user page fault is the OOM path, not
        // an errno of the uAPI. Their page tables and everything the kernel allocates for
        // itself, of any order, are in.
        fi.set(FAIL_PAGE_ALLOC, "ignore-gfp-highmem", "Y")?;
        fi.set(FAIL_PAGE_ALLOC, "min-order", "0")?;
        Ok(fi)
    }

    fn set(&mut self, dir: &str, knob: &str, value: &str) -> Result<()> {
        let path = format!("{dir}/{knob}");
        let old = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        self.saved.push((path.clone(), old.trim().to_string()));
        std::fs::write(&path, value).with_context(|| format!("write {value} to {path}"))
    }

    /// No more failures, for anyone (before the end phase).
    fn quiesce(&self) -> Result<()> {
        for dir in [FAILSLAB, FAIL_PAGE_ALLOC] {
            let path = format!("{dir}/probability");
            std::fs::write(&path, "0").with_context(|| format!("write 0 to {path}"))?;
        }
        Ok(())
    }
}

impl Drop for FaultInjection {
    fn drop(&mut self) {
        for (path, old) in self.saved.iter().rev() {
            if let Err(e) = std::fs::write(path, old) {
                println!("fuzz failslab: cannot restore {path} to {old:?}: {e}");
            }
        }
    }
}

fn fuzz_seed() -> u64 {
    match std::env::var("KVMUF_FUZZ_SEED") {
        Ok(_) => env_u64("KVMUF_FUZZ_SEED", 0),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// One fuzz run; `inject`: the failslab run, with the knobs set.
fn fuzz(seed: u64, inject: Option<&FaultInjection>) -> Result<()> {
    let secs = env_u64("KVMUF_FUZZ_SECS", 20);
    let default_stall = if inject.is_some() { 30 } else { 15 };
    let stall = Duration::from_secs(env_u64("KVMUF_FUZZ_STALL_SECS", default_stall));
    println!(
        "fuzz: {secs}s, {NR_VCPUS} vCPUs on {DATA_PAGES} pages, {NR_RESOLVERS} resolvers, \
         chaos + scratch + watchdog threads (the interleaving is not reproducible from the seed)"
    );
    install_sigusr1()?;

    let mut vm = TestVm::new().context("create the VM")?;
    vm.add_mapped_region(DATA_SLOT, DATA_GPA, DATA_SIZE, Backing::Anonymous)
        .context("data memslot")?;
    vm.map(STOP_GVA, STOP_GPA, PAGE)
        .context("map the stop flag")?;
    let sys = vm.region(0).mapping.clone();
    sys.write_u64(STOP_GPA as usize, 0);
    let data = vm.region(DATA_SLOT).mapping.clone();
    let fd_flags_supported = vm.check_cap(KVM_CAP_USERFAULT_FD_FLAGS as u64) as u64;
    ensure!(
        fd_flags_supported & KVM_USERFAULT_FD_FLAG_VCPU_FAULTS != 0,
        "KVM_CAP_USERFAULT_FD_FLAGS {fd_flags_supported:#x} lacks VCPU_FAULTS"
    );
    // No page is populated yet, and every one is USERFAULT.
    set_userfault(vm.fd(), DATA_GPA, DATA_SIZE).context("SET USERFAULT on the data slot")?;
    let mut vcpus = Vec::new();
    for i in 0..NR_VCPUS {
        let guest_seed = thread_rng(seed, 100 + i as u64).next_u64();
        vcpus.push(
            vm.add_vcpu_with(guest_fuzz, &[guest_seed, i as u64, STOP_GVA])
                .with_context(|| format!("vCPU {i}"))?,
        );
    }
    let scratch = HostMapping::anonymous(SCRATCH_SIZE as usize).context("scratch memory")?;

    // Thread indices for the random streams: vCPUs 0.., resolvers 10.., chaos 20, scratch 21.
    let mut chaos_rng = thread_rng(seed, 20);
    let first_vcpu_faults = chaos_rng.chance(1, 2);
    let sh = Arc::new(Shared {
        vm,
        data,
        sys,
        scratch,
        pages: (0..DATA_PAGES).map(|_| Mutex::default()).collect(),
        fd: Mutex::new(None),
        fd_closes: AtomicU64::new(0),
        evictions: AtomicU64::new(0),
        fd_flags_supported,
        start: Instant::now(),
        stop_chaos: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        stop_resolvers: AtomicBool::new(false),
        stop_watchdog: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        stall,
        failure: Mutex::new(None),
        syncs: Default::default(),
        iters: Default::default(),
        done: Default::default(),
        in_run: Default::default(),
        runs_returned: Default::default(),
        scratch_at: AtomicU64::new(0),
        vcpu_threads: Mutex::new(Vec::new()),
        resolver_threads: Mutex::new(Vec::new()),
        st: Stats::default(),
        errnos: Mutex::new(BTreeMap::new()),
        failslab: inject.is_some(),
        spawned: AtomicBool::new(false),
        injecting: AtomicBool::new(false),
        enomem: Mutex::new(BTreeMap::new()),
    });
    // The first fd (or none), as the chaos thread will cycle them.
    if chaos_rng.chance(2, 3) {
        let flags = if first_vcpu_faults {
            KVM_USERFAULT_FD_FLAG_VCPU_FAULTS
        } else {
            0
        } | if chaos_rng.chance(1, 2) {
            KVM_USERFAULT_FD_FLAG_NONBLOCK
        } else {
            0
        };
        // The main thread never fails an allocation: always Some.
        if let Some(f) = create_uf_fd(&sh, flags, 0, &mut chaos_rng)? {
            *lock(&sh.fd) = Some(Arc::new(f));
            inc(&sh.st.fd_create);
            if first_vcpu_faults {
                inc(&sh.st.fd_create_vcpu_faults);
            }
        }
    }

    // Each handle goes into `workers` as soon as its thread exists: if a later spawn fails,
    // the threads already running are torn down (here, or by the drop on any other way out),
    // never detached.
    let mut workers = Workers::new(&sh);
    let spawned = (|| -> Result<()> {
        for (i, vcpu) in vcpus.into_iter().enumerate() {
            let rng = thread_rng(seed, i as u64);
            let h = spawn_with(&sh, VCPU_NAMES[i], true, move |s| {
                vcpu_thread(s, vcpu, i, rng)
            })?;
            lock(&sh.vcpu_threads).push(h.as_pthread_t());
            workers.vcpus.push(h);
        }
        for (i, name) in RESOLVER_NAMES.into_iter().enumerate() {
            let rng = thread_rng(seed, 10 + i as u64);
            let h = spawn_with(&sh, name, true, move |s| resolver_thread(s, i, rng))?;
            lock(&sh.resolver_threads).push(h.as_pthread_t());
            workers.resolvers.push(h);
        }
        workers.watchdog = Some(spawn(&sh, "uf-watchdog", move |s| {
            watchdog_thread(s, stall, seed, secs)
        })?);
        let scratch_rng = thread_rng(seed, 21);
        workers
            .chaos
            .push(spawn_with(&sh, "uf-scratch", true, move |s| {
                scratch_thread(s, scratch_rng)
            })?);
        workers
            .chaos
            .push(spawn_with(&sh, "uf-chaos", true, move |s| {
                chaos_thread(s, chaos_rng, first_vcpu_faults)
            })?);
        Ok(())
    })();
    if let Err(e) = spawned {
        return Err(match workers.teardown() {
            Some(left) => e.context(left),
            None => e,
        });
    }
    // Every worker and the VM exist: the workers may set make-it-fail and go.
    sh.injecting.store(inject.is_some(), Ordering::SeqCst);
    sh.spawned.store(true, Ordering::SeqCst);

    let result = run_and_finish(&sh, secs, inject, workers);
    println!("fuzz summary: {}", sh.summary(seed, secs));
    println!("fuzz invalid calls: {}", sh.invalid_detail());
    if inject.is_some() {
        println!(
            "fuzz failslab: injected={} ({}) kvm_run_efault={} fork_fail_other={} percent={}",
            sh.enomem_total(),
            sh.enomem_detail(),
            sh.st.kvm_run_efault.load(Ordering::Relaxed),
            sh.st.fork_fail_other.load(Ordering::Relaxed),
            env_u64("KVMUF_FUZZ_FAIL_PERCENT", 5)
        );
    }
    result
}

/// The worker threads' handles, each added as soon as its thread is spawned and taken out once
/// joined, so that whatever is left after a failure is torn down by [`Workers::teardown`] --
/// called explicitly, or by the drop on any other way out (an early return, a panic).
struct Workers {
    sh: Arc<Shared>,
    vcpus: Vec<JoinHandle<()>>,
    resolvers: Vec<JoinHandle<()>>,
    /// The chaos and scratch threads.
    chaos: Vec<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
}

impl Workers {
    fn new(sh: &Arc<Shared>) -> Self {
        Self {
            sh: sh.clone(),
            vcpus: Vec::new(),
            resolvers: Vec::new(),
            chaos: Vec::new(),
            watchdog: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
            && self.resolvers.is_empty()
            && self.chaos.is_empty()
            && self.watchdog.is_none()
    }

    /// After a failure: stops every thread and joins it, so that none is left sleeping in the
    /// kernel, none is signalled after it exited, and the next test starts clean. Closing the
    /// fd releases the waiters; signals get vCPUs out of KVM_RUN and resolvers out of reads
    /// and polls; every thread returns once it sees `abort`. Returns what could not be joined
    /// (those handles are leaked, not detached, so that their pthread ids stay valid for a
    /// still-running chaos thread's signals).
    fn teardown(&mut self) -> Option<String> {
        let sh = &*self.sh.clone();
        sh.abort.store(true, Ordering::SeqCst);
        for flag in [
            &sh.stop_chaos,
            &sh.stopping,
            &sh.stop_resolvers,
            &sh.stop_watchdog,
        ] {
            flag.store(true, Ordering::SeqCst);
        }
        sh.sys.write_u64(STOP_GPA as usize, 1);
        sh.fd_closes.fetch_add(1, Ordering::SeqCst);
        drop(lock(&sh.fd).take());
        // finish() may already have waited its own timeout: a shorter bound here.
        let deadline = Instant::now() + timeout().min(Duration::from_secs(30));
        let all_finished = |hs: &[JoinHandle<()>]| hs.iter().all(|h| h.is_finished());
        // The chaos and scratch threads first: they are the only other signallers. Kick the
        // vCPUs and resolvers meanwhile (none is joined yet): a resolver blocked in a read
        // keeps the fd open, and with it a KVM-access sleeper that a chaos memslot update
        // waits for.
        while !all_finished(&self.chaos) && Instant::now() < deadline {
            for list in [&sh.vcpu_threads, &sh.resolver_threads] {
                lock(list).iter().for_each(|t| kick(*t));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let chaos_done = all_finished(&self.chaos);
        if chaos_done {
            self.chaos.drain(..).for_each(|h| drop(h.join()));
        }
        while !(all_finished(&self.vcpus) && all_finished(&self.resolvers))
            && Instant::now() < deadline
        {
            for list in [&sh.vcpu_threads, &sh.resolver_threads] {
                lock(list).iter().for_each(|t| kick(*t));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if chaos_done && all_finished(&self.vcpus) && all_finished(&self.resolvers) {
            lock(&sh.vcpu_threads).clear();
            lock(&sh.resolver_threads).clear();
            self.vcpus.drain(..).for_each(|h| drop(h.join()));
            self.resolvers.drain(..).for_each(|h| drop(h.join()));
        }
        let deadline = deadline.max(Instant::now() + Duration::from_secs(1));
        while self.watchdog.as_ref().is_some_and(|h| !h.is_finished()) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.watchdog.as_ref().is_some_and(|h| h.is_finished()) {
            drop(self.watchdog.take().map(|h| h.join()));
        }
        if self.is_empty() {
            return None;
        }
        let left: Vec<String> = self
            .vcpus
            .iter()
            .chain(&self.resolvers)
            .chain(&self.chaos)
            .chain(&self.watchdog)
            .map(|h| h.thread().name().unwrap_or("?").to_string())
            .collect();
        let report = format!(
            "teardown after the failure left {} threads running ({}); threads: {}",
            left.len(),
            left.join(", "),
            thread_report(true)
        );
        for h in self
            .vcpus
            .drain(..)
            .chain(self.resolvers.drain(..))
            .chain(self.chaos.drain(..))
            .chain(self.watchdog.take())
        {
            std::mem::forget(h);
        }
        Some(report)
    }
}

impl Drop for Workers {
    /// The same bounded teardown when [`Workers::teardown`] was not called (it leaves nothing):
    /// threads still running are reported and leaked, never detached silently.
    fn drop(&mut self) {
        if !self.is_empty() {
            if let Some(left) = self.teardown() {
                eprintln!("fuzz: {left}");
            }
        }
    }
}

/// Runs until the deadline, then (injection turned off) the end phase; any recorded failure
/// wins. Whatever the outcome, no worker thread outlives the call unless the report says so.
fn run_and_finish(
    sh: &Arc<Shared>,
    secs: u64,
    inject: Option<&FaultInjection>,
    mut workers: Workers,
) -> Result<()> {
    let deadline = sh.start + Duration::from_secs(secs);
    while Instant::now() < deadline && !sh.aborted() {
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(fi) = inject {
        // The probabilities first, then the flag: an operation that starts after the flag
        // cannot be injected (see `arm`).
        let q = fi.quiesce();
        sh.injecting.store(false, Ordering::SeqCst);
        if let Err(e) = q {
            sh.fail("main", format!("{e:#}"));
        }
    }
    let r = finish(sh, &mut workers);
    let first = lock(&sh.failure).take();
    let left = if workers.is_empty() {
        None
    } else {
        workers.teardown()
    };
    // Whatever the end phase says, the first failure is the one to report.
    let r = match first {
        Some(f) => Err(anyhow!("{f}")),
        None => r,
    };
    match (r, left) {
        (Err(e), Some(left)) => Err(e.context(left)),
        (Ok(()), Some(left)) => Err(anyhow!("{left}")),
        (r, None) => r,
    }
}

fn finish(sh: &Arc<Shared>, w: &mut Workers) -> Result<()> {
    let limit = timeout();
    let join_all = |hs: &mut Vec<JoinHandle<()>>, what: &str| -> Result<()> {
        ensure!(
            wait_until(sh, limit, || hs.iter().all(|h| h.is_finished())),
            "{what} did not finish within {limit:?}; threads: {}",
            thread_report(true)
        );
        for h in hs.drain(..) {
            // Errors and panics were caught in the thread and recorded as the failure.
            let _ = h.join();
        }
        Ok(())
    };
    // 1. Stop the chaos (its last act deletes the scratch slot and turns dirty logging off).
    sh.stop_chaos.store(true, Ordering::SeqCst);
    join_all(&mut w.chaos, "the chaos and scratch threads")?;
    ensure!(!sh.aborted(), "failure during the run");
    // 2. The host still holds what it populated (nothing wrote anything else), then every page
    //    is populated and all USERFAULT cleared.
    for page in 0..DATA_PAGES {
        let mut ps = sh.page(page);
        if ps.populated {
            for wd in 0..PAGE / 8 {
                let gpa = page_gpa(page) + wd * 8;
                let v = sh.data.read_u64((gpa - DATA_GPA) as usize);
                ensure!(
                    v == word_value(gpa),
                    "populated page {page}: host reads {v:#x} at gpa {gpa:#x}, expected {:#x}",
                    word_value(gpa)
                );
            }
        } else {
            sh.populate(page, &mut ps, "main");
        }
    }
    clear_userfault(sh.vm.fd(), DATA_GPA, DATA_SIZE).context("final CLEAR of the data slot")?;
    // 3. The stop flag: every vCPU must reach DONE.
    sh.stopping.store(true, Ordering::SeqCst);
    sh.sys.write_u64(STOP_GPA as usize, 1);
    let all_done = wait_until(sh, limit, || {
        sh.done.iter().all(|d| d.load(Ordering::SeqCst))
    });
    ensure!(
        all_done,
        "vCPUs DONE {:?} within {limit:?} after the stop flag; {}; threads: {}",
        sh.done
            .iter()
            .map(|d| d.load(Ordering::SeqCst))
            .collect::<Vec<_>>(),
        sh.fd_report(),
        thread_report(true)
    );
    // Off the signal list before they are joined (the chaos thread, the only other
    // signaller, is gone already): a listed thread is never joined nor detached.
    lock(&sh.vcpu_threads).clear();
    join_all(&mut w.vcpus, "the vCPU threads")?;
    // 4. The resolvers, kicked out of blocking reads and polls.
    sh.stop_resolvers.store(true, Ordering::SeqCst);
    let stopped = wait_until(sh, limit, || {
        let done = w.resolvers.iter().all(|h| h.is_finished());
        if !done {
            lock(&sh.resolver_threads).iter().for_each(|t| kick(*t));
        }
        done
    });
    ensure!(
        stopped,
        "resolver threads still running {limit:?} after the stop; threads: {}",
        thread_report(true)
    );
    lock(&sh.resolver_threads).clear();
    join_all(&mut w.resolvers, "the resolver threads")?;
    // 5. No thread left in uninterruptible sleep, then the watchdog.
    check_no_d_state()?;
    sh.stop_watchdog.store(true, Ordering::SeqCst);
    let mut watchdog: Vec<JoinHandle<()>> = w.watchdog.take().into_iter().collect();
    let joined = join_all(&mut watchdog, "the watchdog");
    w.watchdog = watchdog.pop();
    joined?;
    ensure!(!sh.aborted(), "failure in the end phase");
    for i in 0..NR_VCPUS {
        ensure!(
            sh.syncs[i].load(Ordering::Relaxed) > 0,
            "vCPU {i} never reported progress"
        );
    }
    drop(lock(&sh.fd).take());
    Ok(())
}
