//! Teardown stress of the KVM userfault uAPI (issue 13): N vCPUs × M resolvers × a thread
//! changing memslots and attributes for a bounded time, then VM teardown with sleepers;
//! 0 hangs, 0 reports.
//!
//! Rounds until a time budget. Each round runs in a **forked child**, so that a teardown
//! includes the real "the VMM process dies" case. The child builds a VM with a data memslot of
//! P pages (anonymous or guest_memfd), all USERFAULT, a userfault fd (VCPU_FAULTS or not,
//! NONBLOCK or not), N vCPUs (2–4) whose guest code loads, checks and stores pattern words of
//! random pages and has KVM's emulator read some (`rep outsb`), M resolvers (1–3) reading
//! records and populating + RESOLVEing them, and a chaos thread adding, deleting, moving and
//! re-flagging a scratch memslot, toggling dirty logging on the data slot (a flags-only update),
//! SETting/CLEARing USERFAULT on random ranges and signalling vCPUs. Late in the run the
//! resolvers start to **withhold** records (read, never resolved), so that at teardown there are
//! sleepers: vCPUs asleep in the kernel on a gfn (VCPU_FAULTS, interruptible), KVM's own
//! accesses asleep (killable, holding `kvm->srcu`, so the chaos thread's next memslot update
//! sleeps in `synchronize_srcu` behind them), vCPU threads parked in userspace on a withheld
//! page, resolvers in blocking reads. The child then tells the parent (over a pipe; it never
//! prints) what it believes sleeps, and the parent tears it down one of four ways:
//!
//! - `kill`: SIGKILL;
//! - `exit`: the child's main thread calls `_exit(0)` with every other thread where it is;
//! - `close`: an orderly close in a random order of the four steps `uf` (close the userfault
//!   fd), `vm` (close the VM fd), `vcpus` (signal the vCPU threads out of KVM_RUN, each closes
//!   its vCPU fd), `mem` (the data memory unmapped: replaced by a PROT_NONE mapping in one
//!   `mmap(MAP_FIXED)`, so that nothing else can land at that address, plus the guest_memfd
//!   closed), while sleepers remain, then the child waits for every thread and exits 0. The
//!   guest_memfd's close runs on a thread of its own: `kvm_gmem_release()` takes
//!   `kvm->slots_lock`, which the chaos thread's memslot update may hold while it waits in
//!   `synchronize_srcu()` for a KVM-access sleeper, so the close sleeps (D) until the fd's close
//!   wakes that sleeper, and must then complete (counted as `gmem_close_blocked`);
//! - `close-kill`: the first 1–3 of those steps, then SIGKILL.
//!
//! Invariants, with docs/uapi.md's Lifetime section made executable:
//!
//! - the parent reaps the child within `KVMUF_STRESS_REAP_SECS` of the teardown (polling
//!   `waitpid(WNOHANG)` against the deadline); else every task's `/proc/<pid>/task/*/{stat,
//!   wchan,stack}` is printed and the round fails (a hang); after the teardown no task of the
//!   child may stay in D state for `KVMUF_STRESS_D_SECS`;
//! - the VM is really destroyed: with debugfs mounted, `/sys/kernel/debug/kvm/<pid>-<vmfd>`
//!   exists while the child runs (checked, so the next check is not vacuous) and no
//!   `<pid>-*` directory remains once it is reaped; an orderly close checks the same in the
//!   child once every reference is closed (the VM must be destroyed while the process lives);
//! - guest content: every word the guest loads holds the pattern the host wrote (a page the
//!   host did not populate never reaches the guest), before and during teardown; what KVM's
//!   emulator reads is the pattern while the fd is open (after it is closed, KVM's accesses go
//!   to memory: the pattern or an unpopulated page's zeros);
//! - exits and records are well formed (USERFAULT exits only without VCPU_FAULTS, for a data
//!   page, exactly one of READ/WRITE; records of the negotiated size, known flags, data gfns);
//! - `close`, step `uf`: closing the fd wakes every waiter (no thread of the child is left in
//!   `kvm_userfault_wait`), and a vCPU that slept there with VCPU_FAULTS returns a synchronous
//!   USERFAULT exit (the documented fall-back); step `vcpus`: a signal makes the KVM_RUN of a
//!   vCPU asleep on a gfn return EINTR; `uf` last, once every other reference is gone: the VM
//!   is destroyed with the fd open, which then polls POLLHUP, reads end of file, and fails
//!   RESOLVE and REQUEUE with ENODEV;
//! - every thread of an orderly close finishes (bounded); the child's own errors are 0.
//!
//! Kernel reports (WARN, KASAN, lockdep, kmemleak) are caught by xtask from the console.
//!
//! Knobs: `KVMUF_STRESS_SECS` (budget, default 10; at least one round of each teardown type
//! runs whatever the budget), `KVMUF_STRESS_SEED` (default from the time; printed first),
//! `KVMUF_STRESS_ROUND` (run only that round of the seed: every per-round choice, the teardown
//! type included, is a function of seed and round number), `KVMUF_STRESS_REAP_SECS` (30),
//! `KVMUF_STRESS_D_SECS` (10), `KVM_SELFTESTS_TIMEOUT_SECS` (120: setup, READY, orderly close).
//! Each round prints one line of its choices and outcome; the run ends with a summary line.
//! A seed reproduces the choices and the guests' access sequences, not the interleaving.
//!
//! `KVMUF_STRESS_SECS=10 cargo test -p kvm-selftests --test userfault_teardown -- --ignored --nocapture`

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kvm_bindings::{kvm_userspace_memory_region2, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use kvm_selftests::caps::env_u64;
use kvm_selftests::guest::{self, read_u64, write_u64};
use kvm_selftests::rng::Rng;
use kvm_selftests::uapi::{
    kvm_userfault_msg, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_CAP_GUEST_MEMFD_FLAGS, KVM_MEMORY_EXIT_FLAG_READ, KVM_MEMORY_EXIT_FLAG_USERFAULT,
    KVM_MEMORY_EXIT_FLAG_WRITE, KVM_USERFAULT_FD_FLAG_NONBLOCK, KVM_USERFAULT_FD_FLAG_VCPU_FAULTS,
    KVM_USERFAULT_MSG_ALL, KVM_USERFAULT_MSG_EXEC, KVM_USERFAULT_MSG_GUEST, KVM_USERFAULT_MSG_READ,
    KVM_USERFAULT_MSG_VCPU, KVM_USERFAULT_MSG_WRITE, USERFAULT_MSG_SIZE,
};
use kvm_selftests::userfault::{
    self as uf, clear_userfault, create_fd, read_raw, requeue, resolve, set_userfault,
};
use kvm_selftests::vm::{open_kvm, TEST_GPA};
use kvm_selftests::{guest_assert_eq, Exit, TestVm, Ucall, Vcpu};
use nix::errno::Errno;

const TEST: &str = "userfault_teardown::teardown_stress";
const PAGE: u64 = 4096;
const MAX_VCPUS: usize = 4;

const DATA_SLOT: u32 = 1;
const DATA_GPA: u64 = TEST_GPA;

/// The scratch memslot the chaos thread adds, deletes, moves and re-flags between
/// `SCRATCH_POSITIONS` places of its window; nothing in the guest touches it.
const SCRATCH_SLOT: u32 = 2;
const SCRATCH_PAGES: u64 = 16;
const SCRATCH_SIZE: u64 = SCRATCH_PAGES * PAGE;
const SCRATCH_POSITIONS: u64 = 4;
const SCRATCH_BASE: u64 = TEST_GPA + (1 << 30);
/// A window no memslot ever covers (SET/CLEAR there succeed and do nothing).
const NOSLOT_GPA: u64 = TEST_GPA + (2 << 30);

const OUTS_PORT: u16 = 0x1001;
const SYNC_EVERY: u64 = 256;
const MISMATCH: u64 = 0xbad0_c0de_bad0_c0de;

const UF_WAIT: &str = "kvm_userfault_wait";
const DEBUGFS_KVM: &str = "/sys/kernel/debug/kvm";

/// The word at `gpa` of a populated page: never 0, different for every word.
#[inline(always)]
fn word_value(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

fn timeout() -> Duration {
    Duration::from_secs(env_u64("KVM_SELFTESTS_TIMEOUT_SECS", 120))
}

// ---- random numbers (splitmix64, as in userfault_fuzz.rs) ----

// ---- guest code ----

#[inline(always)]
fn outs_word(gpa: u64) {
    // SAFETY: string port output from mapped guest memory; only traps to the host.
    unsafe {
        core::arch::asm!("rep outsb", inout("rsi") gpa => _, inout("rcx") 8u64 => _,
                         in("dx") OUTS_PORT, in("r8") gpa, options(nostack, preserves_flags));
    }
}

/// Forever: random words of the first `pages` data pages, `outs` in 256 read by KVM's
/// emulator (`rep outsb`), 32 in 256 stored with their pattern, the rest loaded and checked
/// (a third of those stored back); a SYNC every SYNC_EVERY iterations.
extern "C" fn guest_stress(seed: u64, vcpu: u64, pages: u64, outs: u64) {
    let mut x = seed | 1;
    let mut iter: u64 = 0;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let page = (r >> 40) % pages;
        let word = (r >> 20) & (PAGE / 8 - 1);
        let gpa = DATA_GPA + page * PAGE + word * 8;
        let op = r & 255;
        if op < outs {
            outs_word(gpa);
        } else if op < outs + 32 {
            // SAFETY: the data slot is identity mapped; the store may be the USERFAULT under
            // test and writes the word's own pattern.
            unsafe { write_u64(gpa, word_value(gpa)) };
        } else {
            // SAFETY: as above; the load may be the USERFAULT under test.
            let v = unsafe { read_u64(gpa) };
            if v != word_value(gpa) {
                guest::sync(&[MISMATCH, gpa, v, iter]);
                guest_assert_eq!(v, word_value(gpa), gpa, iter);
            }
            if op < outs + 96 {
                // SAFETY: as above; stores back the value just checked.
                unsafe { write_u64(gpa, v) };
            }
        }
        iter += 1;
        if iter.is_multiple_of(SYNC_EVERY) {
            guest::sync(&[vcpu, iter]);
        }
    }
}

// ---- a round's choices ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Uf,
    Vm,
    Vcpus,
    Mem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Teardown {
    Kill,
    Exit,
    Close(Vec<Step>),
    CloseKill(Vec<Step>),
}

const TEARDOWN_KINDS: [&str; 4] = ["kill", "exit", "close", "close-kill"];

impl Teardown {
    fn kind(&self) -> &'static str {
        match self {
            Teardown::Kill => TEARDOWN_KINDS[0],
            Teardown::Exit => TEARDOWN_KINDS[1],
            Teardown::Close(_) => TEARDOWN_KINDS[2],
            Teardown::CloseKill(_) => TEARDOWN_KINDS[3],
        }
    }

    fn steps(&self) -> &[Step] {
        match self {
            Teardown::Close(s) | Teardown::CloseKill(s) => s,
            _ => &[],
        }
    }

    fn describe(&self) -> String {
        let s: Vec<String> = self
            .steps()
            .iter()
            .map(|s| format!("{s:?}").to_lowercase())
            .collect();
        if s.is_empty() {
            self.kind().to_string()
        } else {
            format!("{}({})", self.kind(), s.join(","))
        }
    }
}

#[derive(Debug, Clone)]
struct Round {
    seed: u64,
    vcpus: usize,
    resolvers: usize,
    pages: u64,
    gmem: bool,
    vcpu_faults: bool,
    nonblock: bool,
    run_ms: u64,
    withhold_after_ms: u64,
    /// Once withholding, a record of a not yet withheld page is withheld with 1/this.
    withhold_one_in: u64,
    /// `rep outsb` per 256 guest iterations.
    outs: u64,
    teardown: Teardown,
}

impl Round {
    /// Round `index` of `seed`: a pure function of both (the teardown type too: each cycle of
    /// four rounds is a shuffle of the four types), so KVMUF_STRESS_ROUND replays it alone.
    fn new(seed: u64, index: u64, gmem_ok: bool) -> Round {
        let mut kinds = [0usize, 1, 2, 3];
        Rng::stream(seed, 1, index / 4).shuffle(&mut kinds);
        let mut r = Rng::stream(seed, 2, index);
        let mut steps = vec![Step::Uf, Step::Vm, Step::Vcpus, Step::Mem];
        r.shuffle(&mut steps);
        let teardown = match kinds[(index % 4) as usize] {
            0 => Teardown::Kill,
            1 => Teardown::Exit,
            2 => {
                // Half the full closes end with `uf`: the VM may then be destroyed with the fd
                // open (the POLLHUP/ENODEV check).
                if r.chance(1, 2) {
                    steps.retain(|s| *s != Step::Uf);
                    steps.push(Step::Uf);
                }
                Teardown::Close(steps)
            }
            _ => {
                let n = 1 + r.below(3) as usize;
                steps.truncate(n);
                Teardown::CloseKill(steps)
            }
        };
        let vcpu_faults = r.chance(1, 2);
        let run_ms = 40 + r.below(260);
        Round {
            seed: r.next_u64(),
            vcpus: 2 + r.below(3) as usize,
            resolvers: 1 + r.below(3) as usize,
            pages: [16, 32, 64][r.below(3) as usize],
            gmem: gmem_ok && r.chance(1, 3),
            vcpu_faults,
            nonblock: r.chance(1, 2),
            run_ms,
            withhold_after_ms: run_ms * (20 + r.below(60)) / 100,
            withhold_one_in: [1, 2, 4, 8][r.below(4) as usize],
            outs: if vcpu_faults {
                1 + r.below(4)
            } else {
                2 + r.below(8)
            },
            teardown,
        }
    }

    fn describe(&self) -> String {
        format!(
            "vcpus={} resolvers={} pages={} backing={} fd={}{} run={}ms withhold_after={}ms \
             withhold=1/{} outs={}/256 teardown={}",
            self.vcpus,
            self.resolvers,
            self.pages,
            if self.gmem {
                "guest_memfd"
            } else {
                "anonymous"
            },
            if self.vcpu_faults { "VCPU_FAULTS" } else { "0" },
            if self.nonblock { "|NONBLOCK" } else { "" },
            self.run_ms,
            self.withhold_after_ms,
            self.withhold_one_in,
            self.outs,
            self.teardown.describe()
        )
    }

    fn data_size(&self) -> u64 {
        self.pages * PAGE
    }

    fn data_page(&self, gpa: u64) -> Option<u64> {
        (DATA_GPA..DATA_GPA + self.data_size())
            .contains(&gpa)
            .then(|| (gpa - DATA_GPA) / PAGE)
    }
}

// ---- /proc helpers (both sides) ----

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn tids(pid: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The state letter of a task (after the parenthesised name in `stat`).
fn state_of(pid: &str, tid: &str) -> String {
    let stat = read_trim(&format!("/proc/{pid}/task/{tid}/stat"));
    stat.rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .unwrap_or("?")
        .to_string()
}

fn wchan_of(pid: &str, tid: &str) -> String {
    read_trim(&format!("/proc/{pid}/task/{tid}/wchan"))
}

/// Every task: tid, comm, state, wchan; with `full`, the whole stat line and the kernel stack.
fn task_report(pid: &str, full: bool) -> String {
    let mut out = Vec::new();
    for tid in tids(pid) {
        let base = format!("/proc/{pid}/task/{tid}");
        let mut line = format!(
            "{tid} {} {} wchan={}",
            read_trim(&format!("{base}/comm")),
            state_of(pid, &tid),
            wchan_of(pid, &tid)
        );
        if full {
            line += &format!(" stat=[{}]", read_trim(&format!("{base}/stat")));
            let frames: Vec<String> = read_trim(&format!("{base}/stack"))
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
                .collect();
            line += &format!(" stack=[{}]", frames.join(" < "));
        }
        out.push(line);
    }
    out.join("; ")
}

/// (interruptible, killable) sleepers in `kvm_userfault_wait` among the tasks of `pid`.
fn uf_sleepers(pid: &str) -> (u64, u64) {
    let (mut s, mut d) = (0, 0);
    for tid in tids(pid) {
        if wchan_of(pid, &tid).contains(UF_WAIT) {
            match state_of(pid, &tid).as_str() {
                "S" => s += 1,
                "D" => d += 1,
                _ => {}
            }
        }
    }
    (s, d)
}

fn debugfs_mounted() -> bool {
    read_trim("/proc/mounts")
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("debugfs"))
        && std::path::Path::new(DEBUGFS_KVM).is_dir()
}

/// The debugfs directories of `pid`'s VMs (`<pid>-<fd>`).
fn vm_dirs(pid: i32) -> Vec<String> {
    let prefix = format!("{pid}-");
    let mut v: Vec<String> = std::fs::read_dir(DEBUGFS_KVM)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".to_string())
}

// ---- the child: counters ----

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[derive(Clone, Copy)]
        enum C { $($name,)* }
        const COUNTER_NAMES: &[&str] = &[$(stringify!($name),)*];
    };
}

counters!(
    kvm_runs,
    uf_exits,
    syncs,
    eintr,
    kvm_reads,
    populates,
    vcpu_resolves,
    reads,
    records,
    records_guest,
    records_kvm,
    resolves,
    withheld,
    parked,
    slot_add,
    slot_delete,
    slot_move,
    slot_flags,
    data_flags,
    sets,
    clears,
    scratch_attrs,
    signals,
    eintr_checked,
    uf_exit_checked,
    uf_close_woke,
    hup_checked,
    exits_after_unmap,
    gmem_close_blocked,
);

struct Counters([AtomicU64; COUNTER_NAMES.len()]);

impl Counters {
    fn new() -> Self {
        Counters(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    fn inc(&self, c: C) {
        self.0[c as usize].fetch_add(1, SeqCst);
    }

    fn format(&self) -> String {
        COUNTER_NAMES
            .iter()
            .zip(&self.0)
            .map(|(n, v)| format!("{n}={}", v.load(SeqCst)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

// ---- the child: shared state ----

#[derive(Default)]
struct PageState {
    populated: bool,
    /// A record for the page was read and deliberately not resolved.
    withheld: bool,
}

const EXPECT_NONE: u8 = 0;
const EXPECT_EINTR: u8 = 1;
const EXPECT_UF_EXIT: u8 = 2;

#[derive(Default)]
struct VcpuState {
    tid: AtomicI32,
    in_run: AtomicBool,
    parked: AtomicBool,
    /// What the current KVM_RUN must return (set by the main thread for a sleeper it acts on).
    expect: AtomicU8,
    finished: AtomicBool,
}

struct Shared {
    round: Round,
    /// Never dropped: the orderly close closes its VM fd by number, and the child `_exit`s.
    vm: ManuallyDrop<TestVm>,
    vm_fd: RawFd,
    report: RawFd,
    data_addr: u64,
    gmem: Mutex<Option<OwnedFd>>,
    pages: Vec<Mutex<PageState>>,
    uf: Mutex<Option<Arc<OwnedFd>>>,
    /// `true` once the orderly close began. Whoever uses the VM fd or the userfault fd from a
    /// vCPU, touches the data memory, or signals a vCPU from the chaos thread holds it for
    /// reading and checks it first, so that after the write the main thread may close and unmap.
    serve: RwLock<bool>,
    teardown: AtomicBool,
    close_vcpus: AtomicBool,
    stop_resolvers: AtomicBool,
    stop_chaos: AtomicBool,
    withholding: AtomicBool,
    uf_closed: AtomicBool,
    mem_unmapped: AtomicBool,
    park: (Mutex<()>, Condvar),
    vcpus: Vec<VcpuState>,
    vcpu_pthreads: Mutex<Vec<libc::pthread_t>>,
    /// The thread closing the guest_memfd (step `mem`).
    gmem_closer: AtomicI32,
    errors: AtomicU64,
    ct: Counters,
    start: Instant,
}

impl Shared {
    /// Sends one line to the parent (whole lines below PIPE_BUF are atomic).
    fn send(&self, line: &str) {
        send_line(self.report, line);
    }

    fn err(&self, who: &str, msg: String) {
        self.errors.fetch_add(1, SeqCst);
        self.send(&format!(
            "ERR {who} at {:.3}s: {msg}",
            self.start.elapsed().as_secs_f64()
        ));
    }

    fn page(&self, p: u64) -> MutexGuard<'_, PageState> {
        lock(&self.pages[p as usize])
    }

    fn populate(&self, p: u64, ps: &mut PageState) {
        let mut buf = vec![0u8; PAGE as usize];
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&word_value(DATA_GPA + p * PAGE + i as u64 * 8).to_ne_bytes());
        }
        // SAFETY: page `p` lies inside the data mapping, which stays mapped while `serve` is
        // false (every caller checked it under the read lock, or runs before the threads).
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                (self.data_addr + p * PAGE) as *mut u8,
                PAGE as usize,
            )
        };
        ps.populated = true;
        self.ct.inc(C::populates);
    }

    fn kick(&self, idx: usize) {
        if let Some(t) = lock(&self.vcpu_pthreads).get(idx) {
            // SAFETY: the vCPU threads are joined only after every signaller stopped (the chaos
            // thread signals under `serve` before the teardown, the main thread itself), so the
            // id is valid; SIGUSR1 has a no-op handler.
            unsafe { libc::pthread_kill(*t, libc::SIGUSR1) };
        }
    }

    fn park_until_close(&self, me: &VcpuState) {
        me.parked.store(true, SeqCst);
        let mut g = lock(&self.park.0);
        while !self.close_vcpus.load(SeqCst) {
            g = self.park.1.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        drop(g);
        me.parked.store(false, SeqCst);
    }

    fn self_pid(&self) -> String {
        std::process::id().to_string()
    }
}

/// `poll(2)` for POLLIN; a signal (EINTR) counts as a timeout.
fn poll_in(fd: RawFd, ms: i32) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r <= 0 {
        0
    } else {
        p.revents
    }
}

fn send_line(fd: RawFd, line: &str) {
    let mut s: String = line.chars().filter(|c| *c != '\n').take(4000).collect();
    s.push('\n');
    let mut b = s.as_bytes();
    while !b.is_empty() {
        // SAFETY: writes from a valid buffer to our pipe.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n <= 0 {
            if n < 0 && Errno::last() == Errno::EINTR {
                continue;
            }
            return;
        }
        b = &b[n as usize..];
    }
}

fn spawn(
    sh: &Arc<Shared>,
    name: &'static str,
    body: impl FnOnce(&Shared) -> Result<()> + Send + 'static,
) -> Result<JoinHandle<()>> {
    let s = sh.clone();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(
            move || match std::panic::catch_unwind(AssertUnwindSafe(|| body(&s))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => s.err(name, format!("{e:#}")),
                Err(p) => s.err(name, format!("panicked: {}", panic_message(&*p))),
            },
        )
        .with_context(|| format!("spawn {name}"))
}

fn install_sigusr1() -> Result<()> {
    extern "C" fn noop(_: libc::c_int) {}
    // SAFETY: an async-signal-safe no-op handler, without SA_RESTART so that a signalled
    // KVM_RUN, poll or blocking read returns EINTR; `sa` is fully initialised.
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

// ---- the child: vCPU threads ----

const VCPU_NAMES: [&str; MAX_VCPUS] = ["td-vcpu0", "td-vcpu1", "td-vcpu2", "td-vcpu3"];
const RESOLVER_NAMES: [&str; 3] = ["td-resolver0", "td-resolver1", "td-resolver2"];

/// How a KVM_RUN ended, for the main thread's expectations.
fn run_kind(r: &std::result::Result<Exit, kvm_ioctls::Error>) -> (u8, String) {
    match r {
        Err(e) if e.errno() == libc::EINTR => (EXPECT_EINTR, "EINTR".into()),
        Ok(Exit::Intr) => (EXPECT_EINTR, "KVM_EXIT_INTR".into()),
        Ok(Exit::MemoryFault { flags, gpa, .. }) if flags & KVM_MEMORY_EXIT_FLAG_USERFAULT != 0 => {
            (
                EXPECT_UF_EXIT,
                format!("USERFAULT exit {flags:#x} at {gpa:#x}"),
            )
        }
        Ok(e) => (EXPECT_NONE, format!("{e:?}")),
        Err(e) => (EXPECT_NONE, format!("KVM_RUN error {e}")),
    }
}

fn vcpu_thread(sh: &Shared, mut vcpu: Vcpu, idx: usize) -> Result<()> {
    let who = VCPU_NAMES[idx];
    let me = &sh.vcpus[idx];
    me.tid.store(uf::gettid(), SeqCst);
    let round = &sh.round;
    let mut outs: Vec<u8> = Vec::new();
    let mut outs_fd_closed = false;
    let mut last_iter = 0;
    let mut use_fd = idx.is_multiple_of(2);
    while !sh.close_vcpus.load(SeqCst) {
        me.in_run.store(true, SeqCst);
        sh.ct.inc(C::kvm_runs);
        let r = vcpu.run();
        me.in_run.store(false, SeqCst);
        let expect = me.expect.swap(EXPECT_NONE, SeqCst);
        if expect != EXPECT_NONE {
            let (kind, what) = run_kind(&r);
            if kind == expect {
                sh.ct.inc(if expect == EXPECT_EINTR {
                    C::eintr_checked
                } else {
                    C::uf_exit_checked
                });
            } else {
                sh.err(
                    who,
                    format!(
                        "KVM_RUN of a vCPU asleep on a gfn returned {what} after {}: expected {}",
                        if expect == EXPECT_EINTR {
                            "a signal"
                        } else {
                            "the userfault fd was closed"
                        },
                        if expect == EXPECT_EINTR {
                            "EINTR (docs/uapi.md, Lifetime)"
                        } else {
                            "a synchronous USERFAULT exit (closing the fd: VCPU_FAULTS vCPUs fall back to sync exits)"
                        }
                    ),
                );
            }
        }
        let torn = sh.teardown.load(SeqCst);
        let unmapped = sh.mem_unmapped.load(SeqCst);
        let fd_closed = sh.uf_closed.load(SeqCst);
        match r {
            Ok(Exit::IoOut { port, data }) if port == OUTS_PORT => {
                sh.ct.inc(C::kvm_reads);
                if outs.is_empty() {
                    outs_fd_closed = false;
                }
                outs_fd_closed |= fd_closed;
                outs.extend_from_slice(&data);
                ensure!(
                    outs.len() <= 8,
                    "`rep outsb` of 8 bytes gave {}",
                    outs.len()
                );
                if outs.len() == 8 || torn {
                    let gpa = vcpu.fd().get_regs().context("KVM_GET_REGS")?.r8;
                    check_kvm_read(sh, who, gpa, &outs, outs_fd_closed);
                    outs.clear();
                }
            }
            Ok(Exit::Ucall(Ucall::Sync(a))) if a.len() == 4 && a[0] == MISMATCH => {
                let populated = round.data_page(a[1]).map(|p| sh.page(p).populated);
                sh.err(
                    who,
                    format!(
                        "the guest read {:#x} at gpa {:#x} (iteration {}), expected {:#x}: a page \
                         the host did not populate reached the guest (host: populated={populated:?})",
                        a[2],
                        a[1],
                        a[3],
                        word_value(a[1])
                    ),
                );
                sh.park_until_close(me);
            }
            Ok(Exit::Ucall(Ucall::Sync(a))) => {
                ensure!(
                    a.len() == 2 && a[0] == idx as u64 && a[1] == last_iter + SYNC_EVERY,
                    "unexpected SYNC {a:x?} after iteration {last_iter}"
                );
                last_iter = a[1];
                sh.ct.inc(C::syncs);
            }
            Ok(Exit::MemoryFault { flags, gpa, size }) if !unmapped => {
                let access = flags & (KVM_MEMORY_EXIT_FLAG_READ | KVM_MEMORY_EXIT_FLAG_WRITE);
                let page = round.data_page(gpa);
                ensure!(
                    flags & KVM_MEMORY_EXIT_FLAG_USERFAULT != 0
                        && flags & !(KVM_MEMORY_EXIT_FLAG_USERFAULT | access) == 0
                        && access.count_ones() == 1
                        && size == PAGE
                        && gpa % PAGE == 0
                        && page.is_some(),
                    "memory fault exit flags {flags:#x} gpa {gpa:#x} size {size:#x}: expected \
                     USERFAULT with exactly one of READ/WRITE for one data page"
                );
                sh.ct.inc(C::uf_exits);
                ensure!(
                    !round.vcpu_faults || fd_closed,
                    "USERFAULT exit (flags {flags:#x}, gpa {gpa:#x}) while the VCPU_FAULTS fd was \
                     open: the fault must have been a record"
                );
                if torn || !serve_exit(sh, page.unwrap(), &mut use_fd)? {
                    sh.park_until_close(me);
                }
            }
            Ok(Exit::Intr) => sh.ct.inc(C::eintr),
            Err(e) if e.errno() == libc::EINTR => sh.ct.inc(C::eintr),
            Ok(Exit::Ucall(u)) => bail!("unexpected guest event {u:?}"),
            other if unmapped => {
                // The data memory is gone: the guest's and KVM's accesses fail as they may.
                sh.ct.inc(C::exits_after_unmap);
                let _ = other;
                sh.park_until_close(me);
            }
            Ok(other) => bail!("unexpected exit {other:?}"),
            Err(e) => bail!("KVM_RUN: {e}"),
        }
        if torn && !sh.close_vcpus.load(SeqCst) {
            // Stopped for the teardown: a VMM does not resume a vCPU it is closing.
            sh.park_until_close(me);
        }
    }
    // The `vcpus` step: close the vCPU fd (and unmap its kvm_run).
    drop(vcpu);
    me.finished.store(true, SeqCst);
    Ok(())
}

/// Serves a USERFAULT exit (no VCPU_FAULTS): populate, then CLEAR or RESOLVE, unless the page
/// is withheld (then `false`: the vCPU parks, waiting for a page that never comes).
fn serve_exit(sh: &Shared, page: u64, use_fd: &mut bool) -> Result<bool> {
    let g = sh.serve.read().unwrap_or_else(|e| e.into_inner());
    if *g {
        return Ok(false);
    }
    let mut ps = sh.page(page);
    if ps.withheld {
        sh.ct.inc(C::parked);
        return Ok(false);
    }
    if !ps.populated {
        sh.populate(page, &mut ps);
    }
    let gpa = DATA_GPA + page * PAGE;
    *use_fd = !*use_fd;
    let fd = if *use_fd { lock(&sh.uf).clone() } else { None };
    match fd {
        Some(f) => {
            resolve(f.as_raw_fd(), gpa, PAGE).with_context(|| format!("RESOLVE {gpa:#x}"))?
        }
        None => {
            clear_userfault(sh.vm.fd(), gpa, PAGE).with_context(|| format!("CLEAR {gpa:#x}"))?
        }
    }
    sh.ct.inc(C::vcpu_resolves);
    Ok(true)
}

/// What KVM's emulator read at `gpa`: the pattern while the fd stayed open; after it was
/// closed KVM's access goes to memory, so an unpopulated page's zeros are allowed too.
fn check_kvm_read(sh: &Shared, who: &str, gpa: u64, got: &[u8], fd_closed: bool) {
    let Some(page) = sh.round.data_page(gpa).filter(|_| gpa.is_multiple_of(8)) else {
        sh.err(
            who,
            format!("`rep outsb` from gpa {gpa:#x}: not a data word"),
        );
        return;
    };
    let want = word_value(gpa).to_le_bytes();
    if got == &want[..got.len()] {
        return;
    }
    let populated = sh.page(page).populated;
    let zeros_ok = fd_closed && !populated;
    let ok = zeros_ok && got.iter().zip(want).all(|(g, w)| *g == w || *g == 0);
    if !ok {
        sh.err(
            who,
            format!(
                "KVM's emulator read {got:02x?} at gpa {gpa:#x}, expected {want:02x?} (fd closed \
                 meanwhile: {fd_closed}, page populated: {populated}): a page the host did not \
                 populate reached KVM's own access"
            ),
        );
    }
}

// ---- the child: resolvers ----

fn check_record(round: &Round, r: &kvm_userfault_msg) -> Result<u64> {
    let access =
        r.flags & (KVM_USERFAULT_MSG_READ | KVM_USERFAULT_MSG_WRITE | KVM_USERFAULT_MSG_EXEC);
    ensure!(
        r.size as usize == USERFAULT_MSG_SIZE
            && r.reserved == 0
            && r.flags & !KVM_USERFAULT_MSG_ALL == 0
            && access != 0,
        "malformed record {r:?}"
    );
    if r.flags & KVM_USERFAULT_MSG_GUEST != 0 {
        ensure!(
            round.vcpu_faults
                && r.flags & KVM_USERFAULT_MSG_VCPU != 0
                && access.count_ones() == 1
                && access != KVM_USERFAULT_MSG_EXEC,
            "GUEST record {r:?}: needs a VCPU_FAULTS fd, VCPU and one of READ/WRITE"
        );
    }
    if r.flags & KVM_USERFAULT_MSG_VCPU != 0 {
        ensure!(
            (r.vcpu_id as usize) < round.vcpus,
            "record {r:?}: no such vCPU"
        );
    }
    round
        .data_page(r.gfn.wrapping_mul(PAGE))
        .ok_or_else(|| anyhow!("record {r:?}: gfn {:#x} outside the data slot", r.gfn))
}

fn resolver_thread(sh: &Shared, mut rng: Rng) -> Result<()> {
    let Some(f) = lock(&sh.uf).clone() else {
        return Ok(());
    };
    let raw = f.as_raw_fd();
    let round = &sh.round;
    while !sh.stop_resolvers.load(SeqCst) {
        // A blocking fd is sometimes read without polling first (kicked out by a signal at an
        // orderly close, or still blocked when the process dies).
        let direct = if round.nonblock {
            rng.chance(1, 8)
        } else {
            rng.chance(1, 4)
        };
        if !direct {
            let rev = poll_in(raw, 20);
            ensure!(
                rev & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) == 0,
                "poll revents {rev:#x} while the VM lives"
            );
            if rev & libc::POLLIN == 0 {
                continue;
            }
        }
        let len = match rng.below(3) {
            0 => USERFAULT_MSG_SIZE,
            1 => USERFAULT_MSG_SIZE * (1 + rng.below(8) as usize),
            _ => 4096,
        };
        sh.ct.inc(C::reads);
        let bytes = match read_raw(raw, len) {
            Ok(b) => b,
            Err(Errno::EAGAIN) if round.nonblock => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => bail!("read({len}): {e}"),
        };
        ensure!(!bytes.is_empty(), "read: end of file while the VM lives");
        for r in uf::decode(&bytes) {
            let page = check_record(round, &r)?;
            sh.ct.inc(C::records);
            sh.ct.inc(if r.flags & KVM_USERFAULT_MSG_GUEST != 0 {
                C::records_guest
            } else {
                C::records_kvm
            });
            let mut ps = sh.page(page);
            if ps.withheld {
                continue;
            }
            if sh.withholding.load(SeqCst) && rng.chance(1, round.withhold_one_in) {
                ps.withheld = true;
                sh.ct.inc(C::withheld);
                continue;
            }
            if !ps.populated {
                sh.populate(page, &mut ps);
            }
            let gpa = DATA_GPA + page * PAGE;
            resolve(raw, gpa, PAGE).with_context(|| format!("RESOLVE {gpa:#x}"))?;
            sh.ct.inc(C::resolves);
        }
    }
    Ok(())
}

// ---- the child: the memslot and attribute thread ----

struct Chaos<'a> {
    sh: &'a Shared,
    vm: VmFd,
    rng: Rng,
    scratch_hva: u64,
    scratch: Option<u64>,
    scratch_flags: u32,
    data_flags: u32,
}

impl Chaos<'_> {
    fn region(&self, slot: u32, flags: u32, gpa: u64, size: u64, hva: u64) -> Result<()> {
        let region = kvm_userspace_memory_region2 {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
            ..Default::default()
        };
        // SAFETY: the scratch mapping is never unmapped (leaked), the data mapping stays at its
        // address (replaced by PROT_NONE at most); KVM validates the range against our mm.
        unsafe { self.vm.set_user_memory_region2(region) }.map_err(|e| {
            anyhow!("KVM_SET_USER_MEMORY_REGION2(slot {slot}, flags {flags:#x}, gpa {gpa:#x}, size {size:#x}): {e}")
        })
    }

    fn scratch_op(&mut self) -> Result<()> {
        let pos = self.rng.below(SCRATCH_POSITIONS);
        let gpa_of = |p: u64| SCRATCH_BASE + p * SCRATCH_SIZE;
        match self.scratch {
            None => {
                let flags = if self.rng.chance(1, 2) {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                };
                self.region(
                    SCRATCH_SLOT,
                    flags,
                    gpa_of(pos),
                    SCRATCH_SIZE,
                    self.scratch_hva,
                )?;
                (self.scratch, self.scratch_flags) = (Some(pos), flags);
                self.sh.ct.inc(C::slot_add);
            }
            Some(at) => match self.rng.below(3) {
                0 => {
                    self.region(SCRATCH_SLOT, 0, gpa_of(at), 0, 0)?;
                    self.scratch = None;
                    self.sh.ct.inc(C::slot_delete);
                }
                1 if pos != at => {
                    self.region(
                        SCRATCH_SLOT,
                        self.scratch_flags,
                        gpa_of(pos),
                        SCRATCH_SIZE,
                        self.scratch_hva,
                    )?;
                    self.scratch = Some(pos);
                    self.sh.ct.inc(C::slot_move);
                }
                _ => {
                    let flags = self.scratch_flags ^ KVM_MEM_LOG_DIRTY_PAGES;
                    self.region(
                        SCRATCH_SLOT,
                        flags,
                        gpa_of(at),
                        SCRATCH_SIZE,
                        self.scratch_hva,
                    )?;
                    self.scratch_flags = flags;
                    self.sh.ct.inc(C::slot_flags);
                }
            },
        }
        Ok(())
    }

    fn data_flags_op(&mut self) -> Result<()> {
        if self.sh.round.gmem {
            return Ok(()); // guest_memfd slots refuse dirty logging
        }
        let flags = self.data_flags ^ KVM_MEM_LOG_DIRTY_PAGES;
        let r = &self.sh.round;
        self.region(DATA_SLOT, flags, DATA_GPA, r.data_size(), self.sh.data_addr)?;
        self.data_flags = flags;
        self.sh.ct.inc(C::data_flags);
        Ok(())
    }

    fn data_range(&mut self) -> (u64, u64) {
        let pages = self.sh.round.pages;
        let start = self.rng.below(pages);
        (start, (1 + self.rng.below(8)).min(pages - start))
    }

    fn set_data(&mut self) -> Result<()> {
        let (start, len) = self.data_range();
        let (gpa, size) = (DATA_GPA + start * PAGE, len * PAGE);
        set_userfault(&self.vm, gpa, size).with_context(|| format!("SET({gpa:#x}, {size:#x})"))?;
        self.sh.ct.inc(C::sets);
        Ok(())
    }

    /// CLEAR a run of pages that are not withheld, populated first (half the time) or only
    /// the populated prefix; under `serve` (it writes the data memory), page locks ascending.
    fn clear_data(&mut self) -> Result<()> {
        let (start, len) = self.data_range();
        let fill = self.rng.chance(1, 2);
        let g = self.sh.serve.read().unwrap_or_else(|e| e.into_inner());
        if *g {
            return Ok(());
        }
        let mut guards = Vec::new();
        for p in start..start + len {
            let mut ps = self.sh.page(p);
            if ps.withheld || (!ps.populated && !fill) {
                break;
            }
            if !ps.populated {
                self.sh.populate(p, &mut ps);
            }
            guards.push(ps);
        }
        if guards.is_empty() {
            return Ok(());
        }
        let (gpa, size) = (DATA_GPA + start * PAGE, guards.len() as u64 * PAGE);
        clear_userfault(&self.vm, gpa, size)
            .with_context(|| format!("CLEAR({gpa:#x}, {size:#x})"))?;
        self.sh.ct.inc(C::clears);
        Ok(())
    }

    fn scratch_attrs(&mut self) -> Result<()> {
        let (base, pages) = if self.rng.chance(3, 4) {
            (SCRATCH_BASE, SCRATCH_POSITIONS * SCRATCH_PAGES)
        } else {
            (NOSLOT_GPA, 1 << 12)
        };
        let start = self.rng.below(pages);
        let len = (1 + self.rng.below(24)).min(pages - start);
        let (gpa, size) = (base + start * PAGE, len * PAGE);
        if self.rng.chance(1, 2) {
            set_userfault(&self.vm, gpa, size)
        } else {
            clear_userfault(&self.vm, gpa, size)
        }
        .with_context(|| format!("SET/CLEAR outside the data slot ({gpa:#x}, {size:#x})"))?;
        self.sh.ct.inc(C::scratch_attrs);
        Ok(())
    }

    fn signal(&mut self) {
        let g = self.sh.serve.read().unwrap_or_else(|e| e.into_inner());
        if !*g {
            self.sh
                .kick(self.rng.below(self.sh.round.vcpus as u64) as usize);
            self.sh.ct.inc(C::signals);
        }
    }
}

fn chaos_thread(sh: &Shared, vm: VmFd, rng: Rng) -> Result<()> {
    let scratch = kvm_selftests::HostMapping::anonymous(SCRATCH_SIZE as usize)?;
    let mut c = Chaos {
        sh,
        vm,
        rng,
        scratch_hva: scratch.addr(),
        scratch: None,
        scratch_flags: 0,
        data_flags: 0,
    };
    // The scratch memslot may outlive this thread: its memory stays mapped.
    std::mem::forget(scratch);
    while !sh.stop_chaos.load(SeqCst) {
        match c.rng.below(100) {
            0..=29 => c.scratch_op()?,
            30..=37 => c.data_flags_op()?,
            38..=54 => c.set_data()?,
            55..=69 => c.clear_data()?,
            70..=84 => c.scratch_attrs()?,
            85..=89 => c.signal(),
            _ => {}
        }
        std::thread::sleep(Duration::from_micros(c.rng.below(2000)));
    }
    // Dropping `c` closes this thread's descriptor of the VM.
    Ok(())
}

// ---- the child: main ----

/// The child's entry after fork: never returns (`_exit`).
fn child_main(round: Round, report: RawFd, cmd: RawFd) -> ! {
    // Silence the default panic hook: the child reports over the pipe, never prints.
    std::panic::set_hook(Box::new(|_| {}));
    let code = match std::panic::catch_unwind(AssertUnwindSafe(|| child_run(round, report, cmd))) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            send_line(report, &format!("ERR child main: {e:#}"));
            2
        }
        Err(p) => {
            send_line(
                report,
                &format!("ERR child main panicked: {}", panic_message(&*p)),
            );
            2
        }
    };
    // SAFETY: ends the child without running the parent's atexit handlers or destructors.
    unsafe { libc::_exit(code) }
}

/// Bounded poll of a condition (the thing waited for needs a CPU to get there).
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn child_run(round: Round, report: RawFd, cmd: RawFd) -> Result<i32> {
    install_sigusr1()?;
    let start = Instant::now();
    let mut vm = TestVm::new().context("create the VM")?;
    let vm_fd = vm.fd().as_raw_fd();
    let size = round.data_size();
    let gmem = if round.gmem {
        Some(
            vm.create_guest_memfd(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
                .map_err(|e| anyhow!("KVM_CREATE_GUEST_MEMFD: {e}"))?,
        )
    } else {
        None
    };
    let (mflags, mfd) = match &gmem {
        Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a fresh mapping of our own; it stays at this address for the child's life (the
    // `mem` step replaces it in place by PROT_NONE).
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            mflags,
            mfd,
            0,
        )
    };
    ensure!(addr != libc::MAP_FAILED, "mmap data: {}", Errno::last());
    let data_addr = addr as u64;
    // SAFETY: `data_addr` is the round's own mapping of `size` bytes, which no Rust
    // reference points at and which is never unmapped while the round's VM exists.
    unsafe {
        vm.set_region2(
            DATA_SLOT,
            0,
            DATA_GPA,
            size,
            data_addr,
            gmem.as_ref().map(|f| f.as_raw_fd()),
            0,
        )
    }
    .map_err(|e| anyhow!("data memslot: {e}"))?;
    vm.map(DATA_GPA, DATA_GPA, size)?;
    set_userfault(vm.fd(), DATA_GPA, size).context("SET USERFAULT on the data slot")?;
    let flags = if round.vcpu_faults {
        KVM_USERFAULT_FD_FLAG_VCPU_FAULTS
    } else {
        0
    } | if round.nonblock {
        KVM_USERFAULT_FD_FLAG_NONBLOCK
    } else {
        0
    };
    let uf_fd = create_fd(vm.fd(), flags).map_err(|e| anyhow!("KVM_CREATE_USERFAULT_FD: {e}"))?;
    let mut vcpus = Vec::new();
    for i in 0..round.vcpus {
        let gseed = Rng::stream(round.seed, 3, i as u64).next_u64();
        vcpus.push(vm.add_vcpu_with(guest_stress, &[gseed, i as u64, round.pages, round.outs])?);
    }
    // The chaos thread's own descriptor of the VM, so that closing the VM fd (the `vm` step)
    // never races with its ioctls; the VM lives until that one is closed too.
    // SAFETY: dup of a descriptor we own.
    let dup = unsafe { libc::dup(vm_fd) };
    ensure!(dup >= 0, "dup(VM fd): {}", Errno::last());
    // SAFETY: `dup` is a new descriptor of the VM file that only this VmFd owns.
    let chaos_vm =
        unsafe { vm.kvm().create_vmfd_from_rawfd(dup) }.map_err(|e| anyhow!("VmFd: {e}"))?;

    let sh = Arc::new(Shared {
        vm: ManuallyDrop::new(vm),
        vm_fd,
        report,
        data_addr,
        gmem: Mutex::new(gmem),
        pages: (0..round.pages).map(|_| Mutex::default()).collect(),
        uf: Mutex::new(Some(Arc::new(uf_fd))),
        serve: RwLock::new(false),
        teardown: AtomicBool::new(false),
        close_vcpus: AtomicBool::new(false),
        stop_resolvers: AtomicBool::new(false),
        stop_chaos: AtomicBool::new(false),
        withholding: AtomicBool::new(false),
        uf_closed: AtomicBool::new(false),
        mem_unmapped: AtomicBool::new(false),
        park: (Mutex::new(()), Condvar::new()),
        vcpus: (0..round.vcpus).map(|_| VcpuState::default()).collect(),
        vcpu_pthreads: Mutex::new(Vec::new()),
        gmem_closer: AtomicI32::new(0),
        errors: AtomicU64::new(0),
        ct: Counters::new(),
        start,
        round: round.clone(),
    });
    let mut vcpu_handles = Vec::new();
    for (i, v) in vcpus.into_iter().enumerate() {
        let h = spawn(&sh, VCPU_NAMES[i], move |s| vcpu_thread(s, v, i))?;
        lock(&sh.vcpu_pthreads).push(h.as_pthread_t());
        vcpu_handles.push(h);
    }
    let mut resolver_handles = Vec::new();
    for (i, name) in RESOLVER_NAMES.iter().take(round.resolvers).enumerate() {
        let rng = Rng::stream(round.seed, 4, i as u64);
        let h = spawn(&sh, name, move |s| resolver_thread(s, rng))?;
        resolver_handles.push((h.as_pthread_t(), h));
    }
    let crng = Rng::stream(round.seed, 5, 0);
    let chaos = spawn(&sh, "td-chaos", move |s| chaos_thread(s, chaos_vm, crng))?;

    // The run: a phase of normal demand paging, then one where records get withheld.
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(round.withhold_after_ms));
    sh.withholding.store(true, SeqCst);
    std::thread::sleep(Duration::from_millis(
        round.run_ms - round.withhold_after_ms,
    ));
    // Give sleepers a bounded chance to form (state, not time: stop as soon as one sleeps).
    let pid = sh.self_pid();
    wait_for(Duration::from_secs(1), || {
        let (s, d) = uf_sleepers(&pid);
        s + d > 0
    });
    let (ks, kd) = uf_sleepers(&pid);
    let withheld = sh.pages.iter().filter(|p| lock(p).withheld).count();
    let in_run = sh.vcpus.iter().filter(|v| v.in_run.load(SeqCst)).count();
    let parked = sh.vcpus.iter().filter(|v| v.parked.load(SeqCst)).count();
    sh.send(&format!(
        "READY vmfd={vm_fd} run_ms={} withheld_pages={withheld} vcpus_in_run={in_run} \
         vcpus_parked={parked} kernel_sleepers_s={ks} kernel_sleepers_d={kd} {}",
        t0.elapsed().as_millis(),
        sh.ct.format()
    ));

    let mut c = [0u8; 1];
    // SAFETY: a one-byte read into a valid buffer from our command pipe.
    let n = unsafe { libc::read(cmd, c.as_mut_ptr().cast(), 1) };
    if n != 1 {
        return Ok(1); // the parent went away
    }
    if c[0] == b'E' {
        // SAFETY: the `exit` teardown: the process ends here, every other thread where it is.
        unsafe { libc::_exit(0) };
    }
    orderly_close(&sh, vcpu_handles, resolver_handles, chaos)?;
    if matches!(round.teardown, Teardown::CloseKill(_)) {
        sh.send("STEPS");
        // SAFETY: as above; blocks until the parent's SIGKILL (or its exit: end of file).
        unsafe { libc::read(cmd, c.as_mut_ptr().cast(), 1) };
        return Ok(1);
    }
    sh.send(&format!("CLOSED {}", sh.ct.format()));
    Ok(if sh.errors.load(SeqCst) == 0 { 0 } else { 1 })
}

/// The orderly close: stop serving, stop the resolvers, then the round's steps in order; for
/// a full close, wait for every thread and check the VM is gone.
fn orderly_close(
    sh: &Arc<Shared>,
    vcpu_handles: Vec<JoinHandle<()>>,
    resolvers: Vec<(libc::pthread_t, JoinHandle<()>)>,
    chaos: JoinHandle<()>,
) -> Result<()> {
    let pid = sh.self_pid();
    let limit = timeout();
    {
        let mut g = sh.serve.write().unwrap_or_else(|e| e.into_inner());
        *g = true;
        sh.teardown.store(true, SeqCst);
    }
    sh.stop_chaos.store(true, SeqCst);
    sh.stop_resolvers.store(true, SeqCst);
    // The resolvers, kicked out of blocking reads and polls (reads are interruptible).
    let stopped = wait_for(limit, || {
        let done = resolvers.iter().all(|(_, h)| h.is_finished());
        for (t, h) in &resolvers {
            if !h.is_finished() {
                // SAFETY: a thread of ours not yet joined; SIGUSR1 has a no-op handler.
                unsafe { libc::pthread_kill(*t, libc::SIGUSR1) };
            }
        }
        done
    });
    ensure!(
        stopped,
        "resolvers did not stop within {limit:?}: {}",
        task_report(&pid, true)
    );
    for (_, h) in resolvers {
        let _ = h.join();
    }
    let steps = sh.round.teardown.steps().to_vec();
    // Threads that must finish too: the chaos thread, the guest_memfd's closer.
    let mut others = vec![chaos];
    let full = matches!(sh.round.teardown, Teardown::Close(_));
    for (i, step) in steps.iter().enumerate() {
        let last = full && i + 1 == steps.len();
        match step {
            Step::Uf => {
                if last {
                    hup_check(sh, &vcpu_handles, &others)?;
                }
                close_uf(sh)?;
            }
            Step::Vm => {
                // SAFETY: the TestVm is never dropped (ManuallyDrop), and after `serve` no
                // thread uses this descriptor (the chaos thread has its own): no double close,
                // no use of a reused number.
                let r = unsafe { libc::close(sh.vm_fd) };
                ensure!(r == 0, "close(VM fd): {}", Errno::last());
            }
            Step::Vcpus => close_vcpus(sh)?,
            Step::Mem => others.extend(unmap_memory(sh)?),
        }
        sh.send(&format!(
            "STEP {step:?} done at {:.3}s",
            sh.start.elapsed().as_secs_f64()
        ));
    }
    if !full {
        return Ok(());
    }
    // Every thread finishes: vCPUs kicked until they return (a killable sleeper was woken by
    // the fd's close), the chaos thread once its last memslot update got past the sleepers.
    let all = wait_for(limit, || {
        kick_unfinished(sh, &vcpu_handles);
        vcpu_handles.iter().chain(&others).all(|h| h.is_finished())
    });
    ensure!(
        all,
        "threads still running {limit:?} after the orderly close (a blocked guest_memfd close \
         must complete once the userfault fd's close woke the sleepers): {}",
        task_report(&pid, true)
    );
    for h in vcpu_handles.into_iter().chain(others) {
        let _ = h.join();
    }
    // Nothing refers to the VM any more: it is destroyed now, with the process alive.
    if debugfs_mounted() {
        let dir = format!("{DEBUGFS_KVM}/{pid}-{}", sh.vm_fd);
        ensure!(
            !std::path::Path::new(&dir).exists(),
            "{dir} still exists after every VM fd, vCPU fd, mapping and guest_memfd was closed: \
             the VM was not destroyed"
        );
    }
    Ok(())
}

fn kick_unfinished(sh: &Shared, handles: &[JoinHandle<()>]) {
    for (i, h) in handles.iter().enumerate() {
        if !h.is_finished() {
            sh.kick(i);
        }
    }
}

/// Step `uf` when it is the last one: if every other reference is gone (no vCPU left in a
/// killable sleep, the chaos thread done), the VM is destroyed with the fd open, which must
/// then report it (docs/uapi.md, Lifetime).
fn hup_check(sh: &Shared, vcpus: &[JoinHandle<()>], others: &[JoinHandle<()>]) -> Result<()> {
    let pid = sh.self_pid();
    let tid_asleep = |i: usize| {
        let t = sh.vcpus[i].tid.load(SeqCst).to_string();
        wchan_of(&pid, &t).contains(UF_WAIT)
    };
    // Bounded: until each vCPU thread finished or sleeps killably on a gfn (nothing but the
    // fd's close can wake that one now). A sleeper keeps the VM alive (and may hold up the
    // chaos thread's last memslot update): then there is nothing to check.
    let settled = wait_for(timeout(), || {
        kick_unfinished(sh, vcpus);
        (0..vcpus.len()).all(|i| vcpus[i].is_finished() || tid_asleep(i))
    });
    ensure!(
        settled,
        "vCPU threads neither finished nor asleep on a gfn: {}",
        task_report(&pid, true)
    );
    if !vcpus.iter().all(|h| h.is_finished()) {
        return Ok(());
    }
    // No sleeper: neither the chaos thread's memslot updates nor the guest_memfd's close can
    // be held up.
    ensure!(
        wait_for(timeout(), || others.iter().all(|h| h.is_finished())),
        "the chaos thread or the guest_memfd close did not finish although nothing sleeps on a \
         gfn: {}",
        task_report(&pid, true)
    );
    let f = lock(&sh.uf)
        .clone()
        .ok_or_else(|| anyhow!("no userfault fd"))?;
    let raw = f.as_raw_fd();
    let rev = poll_in(raw, 0);
    ensure!(
        rev & libc::POLLHUP != 0,
        "the VM is gone (VM fd, vCPU fds, memory closed) but its userfault fd polls {rev:#x}, not POLLHUP"
    );
    let r = read_raw(raw, 4096);
    ensure!(
        matches!(&r, Ok(b) if b.is_empty()),
        "read after the VM's destruction: {r:?}, expected end of file"
    );
    let r = resolve(raw, DATA_GPA, PAGE);
    ensure!(
        r == Err(Errno::ENODEV),
        "RESOLVE after the VM's destruction: {r:?}, expected ENODEV"
    );
    let r = requeue(raw);
    ensure!(
        r == Err(Errno::ENODEV),
        "REQUEUE after the VM's destruction: {r:?}, expected ENODEV"
    );
    if debugfs_mounted() {
        let dir = format!("{DEBUGFS_KVM}/{pid}-{}", sh.vm_fd);
        ensure!(
            !std::path::Path::new(&dir).exists(),
            "{dir} exists although the fd reports the VM destroyed"
        );
    }
    sh.ct.inc(C::hup_checked);
    Ok(())
}

/// Sets `expect` for every vCPU thread asleep interruptibly on a gfn (a VCPU_FAULTS guest
/// fault); returns how many.
fn expect_for_guest_sleepers(sh: &Shared, expect: u8) -> u64 {
    let pid = sh.self_pid();
    let mut n = 0;
    for v in &sh.vcpus {
        if v.finished.load(SeqCst) {
            continue;
        }
        let t = v.tid.load(SeqCst).to_string();
        if wchan_of(&pid, &t).contains(UF_WAIT) && state_of(&pid, &t) == "S" {
            v.expect.store(expect, SeqCst);
            n += 1;
        }
    }
    n
}

/// Step `uf`: closing the fd wakes every waiter.
fn close_uf(sh: &Shared) -> Result<()> {
    let pid = sh.self_pid();
    let guests = expect_for_guest_sleepers(sh, EXPECT_UF_EXIT);
    let (_, killable) = uf_sleepers(&pid);
    let f = lock(&sh.uf)
        .take()
        .ok_or_else(|| anyhow!("no userfault fd"))?;
    let f = Arc::try_unwrap(f).map_err(|a| {
        anyhow!(
            "the userfault fd is still used by {} others",
            Arc::strong_count(&a) - 1
        )
    })?;
    sh.uf_closed.store(true, SeqCst);
    drop(f);
    let limit = timeout();
    let woke = wait_for(limit, || {
        let (s, d) = uf_sleepers(&pid);
        s + d == 0
    });
    ensure!(
        woke,
        "closing the userfault fd did not wake its waiters ({guests} guest, {killable} KVM-access \
         sleepers before; {limit:?} later: {})",
        task_report(&pid, true)
    );
    if guests + killable > 0 {
        sh.ct.inc(C::uf_close_woke);
    }
    Ok(())
}

/// Step `vcpus`: a signal gets each vCPU thread out of KVM_RUN (EINTR for one asleep on a
/// gfn), and each closes its vCPU fd. Killable sleepers (KVM's own accesses) stay until the
/// fd's close; the step does not wait for them.
fn close_vcpus(sh: &Shared) -> Result<()> {
    let pid = sh.self_pid();
    expect_for_guest_sleepers(sh, EXPECT_EINTR);
    {
        let _g = lock(&sh.park.0);
        sh.close_vcpus.store(true, SeqCst);
        sh.park.1.notify_all();
    }
    let limit = timeout();
    let settled = wait_for(limit, || {
        let mut all = true;
        for (i, v) in sh.vcpus.iter().enumerate() {
            if v.finished.load(SeqCst) {
                continue;
            }
            let t = v.tid.load(SeqCst).to_string();
            if wchan_of(&pid, &t).contains(UF_WAIT) && state_of(&pid, &t) == "D" {
                continue;
            }
            all = false;
            sh.kick(i);
        }
        all
    });
    ensure!(
        settled,
        "vCPU threads neither returned from KVM_RUN nor slept killably on a gfn {limit:?} after \
         the signals: {}",
        task_report(&pid, true)
    );
    Ok(())
}

/// Step `mem`: the data memory goes away under the memslot (one `mmap(MAP_FIXED)` of
/// PROT_NONE over it: the invalidation of an munmap, and no other mapping can land there), and
/// the guest_memfd is closed. That close may block: `kvm_gmem_release()` takes
/// `kvm->slots_lock`, which a memslot update (the chaos thread's) holds while it waits in
/// `synchronize_srcu()` for a KVM-access sleeper, which only the userfault fd's close (or a
/// RESOLVE) wakes. So it runs on its own thread, returned for the final join: once the fd is
/// closed it must complete.
fn unmap_memory(sh: &Arc<Shared>) -> Result<Option<JoinHandle<()>>> {
    let size = sh.round.data_size() as usize;
    sh.mem_unmapped.store(true, SeqCst);
    // SAFETY: replaces our own data mapping; after `serve` nothing on the host touches it.
    let r = unsafe {
        libc::mmap(
            sh.data_addr as *mut libc::c_void,
            size,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    ensure!(
        r != libc::MAP_FAILED,
        "mmap(PROT_NONE) over the data: {}",
        Errno::last()
    );
    let Some(gmem) = lock(&sh.gmem).take() else {
        return Ok(None);
    };
    let h = spawn(sh, "td-gmem-close", move |s| {
        s.gmem_closer.store(uf::gettid(), SeqCst);
        drop(gmem);
        Ok(())
    })?;
    // Bounded: until the close returned or sleeps (state, not time).
    let pid = sh.self_pid();
    let settled = wait_for(timeout(), || {
        let t = sh.gmem_closer.load(SeqCst);
        h.is_finished() || (t != 0 && state_of(&pid, &t.to_string()) == "D")
    });
    ensure!(
        settled,
        "the guest_memfd close neither returned nor slept: {}",
        task_report(&pid, true)
    );
    if !h.is_finished() {
        sh.ct.inc(C::gmem_close_blocked);
    }
    Ok(Some(h))
}

// ---- the parent ----

/// The parent's end of a round's child.
struct ChildProc {
    pid: i32,
    from: OwnedFd,
    to: Option<OwnedFd>,
    buf: Vec<u8>,
    lines: Vec<String>,
    eof: bool,
    status: Option<i32>,
}

impl ChildProc {
    /// Reads whatever the child sent, waiting at most `ms`.
    fn pump(&mut self, ms: i32) {
        if self.eof {
            if ms > 0 {
                std::thread::sleep(Duration::from_millis(ms as u64));
            }
            return;
        }
        let mut p = libc::pollfd {
            fd: self.from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r <= 0 {
            return;
        }
        let mut b = [0u8; 8192];
        // SAFETY: reads into a valid buffer from our pipe.
        let n = unsafe { libc::read(self.from.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        if n == 0 {
            self.eof = true;
        }
        if n > 0 {
            self.buf.extend_from_slice(&b[..n as usize]);
            while let Some(i) = self.buf.iter().position(|c| *c == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                self.lines
                    .push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            }
        }
    }

    fn try_reap(&mut self) -> bool {
        if self.status.is_some() {
            return true;
        }
        let mut st = 0;
        // SAFETY: waits for our own child without blocking.
        let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
        if r == self.pid {
            self.status = Some(st);
        }
        self.status.is_some()
    }

    fn line(&self, prefix: &str) -> Option<&String> {
        self.lines.iter().find(|l| l.starts_with(prefix))
    }

    /// Waits, bounded, for a line starting with `prefix`; `Err` if the child ended first.
    fn wait_line(&mut self, prefix: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.line(prefix) {
                return Ok(l.clone());
            }
            if self.try_reap() {
                while !self.eof {
                    self.pump(100);
                }
                if let Some(l) = self.line(prefix) {
                    return Ok(l.clone());
                }
                bail!(
                    "the child ended ({}) before sending {prefix}; it sent: {:?}",
                    describe_status(self.status.unwrap()),
                    self.lines
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no {prefix} from the child within {limit:?} (a hang?); it sent {:?}; tasks: {}",
                    self.lines,
                    task_report(&self.pid.to_string(), true)
                );
            }
            self.pump(20);
        }
    }

    fn command(&mut self, c: u8) -> Result<()> {
        let fd = self.to.as_ref().ok_or_else(|| anyhow!("no command pipe"))?;
        // SAFETY: a one-byte write from a valid buffer to our pipe.
        let n = unsafe { libc::write(fd.as_raw_fd(), [c].as_ptr().cast(), 1) };
        ensure!(n == 1, "command to the child: {}", Errno::last());
        Ok(())
    }

    fn kill(&self) {
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    /// After the teardown began: reaped within `reap`, no task in D for `d_limit`; else the
    /// full task report and an error (the child is then SIGKILLed and reaped if it can be).
    fn reap(&mut self, reap: Duration, d_limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let pid = self.pid.to_string();
        let mut d_since: BTreeMap<String, Instant> = BTreeMap::new();
        let failure = loop {
            if self.try_reap() {
                return Ok(t0.elapsed());
            }
            let now = Instant::now();
            let in_d: Vec<String> = tids(&pid)
                .into_iter()
                .filter(|t| state_of(&pid, t) == "D")
                .collect();
            d_since.retain(|t, _| in_d.contains(t));
            for t in in_d {
                d_since.entry(t).or_insert(now);
            }
            if let Some((t, since)) = d_since.iter().find(|(_, s)| s.elapsed() > d_limit) {
                break format!("task {t} of the child in D state for {:?}", since.elapsed());
            }
            if t0.elapsed() > reap {
                break format!("the child was not reaped within {reap:?} of the teardown");
            }
            self.pump(10);
        };
        let report = task_report(&pid, true);
        self.kill();
        wait_for(reap, || self.try_reap());
        bail!(
            "HANG: {failure}; tasks: {report}; after a further SIGKILL: {}",
            match self.status {
                Some(s) => format!("reaped, {}", describe_status(s)),
                None => format!("still not reaped: {}", task_report(&pid, true)),
            }
        )
    }
}

fn describe_status(st: i32) -> String {
    if libc::WIFEXITED(st) {
        format!("exit {}", libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        format!("signal {}", libc::WTERMSIG(st))
    } else {
        format!("status {st:#x}")
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `p`.
    let r = unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) };
    ensure!(r == 0, "pipe2: {}", Errno::last());
    // SAFETY: fresh descriptors that we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// "k=v" tokens of a line.
fn kv(line: &str) -> BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

#[derive(Default)]
struct Totals {
    per_kind: BTreeMap<&'static str, u64>,
    counts: BTreeMap<String, u64>,
    rounds_with_sleepers: u64,
    max_reap: Duration,
    debugfs_checked: u64,
}

impl Totals {
    fn add(&mut self, k: &str, n: u64) {
        *self.counts.entry(k.to_string()).or_default() += n;
    }

    fn get(&self, k: &str) -> u64 {
        self.counts.get(k).copied().unwrap_or(0)
    }
}

/// One round: fork, run, tear down, check. Returns the round's outcome line.
fn run_round(round: &Round, debugfs: bool, tot: &mut Totals) -> Result<String> {
    let (from_r, from_w) = pipe()?;
    let (to_r, to_w) = pipe()?;
    // SAFETY: the child only uses what is safe after fork in practice (glibc malloc, which
    // fork resets; its own new threads; raw syscalls), never prints, and ends with `_exit`.
    let pid = unsafe { libc::fork() };
    ensure!(pid >= 0, "fork: {}", Errno::last());
    if pid == 0 {
        drop(from_r);
        drop(to_w);
        child_main(round.clone(), from_w.as_raw_fd(), to_r.as_raw_fd());
    }
    drop(from_w);
    drop(to_r);
    let mut child = ChildProc {
        pid,
        from: from_r,
        to: Some(to_w),
        buf: Vec::new(),
        lines: Vec::new(),
        eof: false,
        status: None,
    };
    let result = drive(round, &mut child, debugfs, tot);
    if child.status.is_none() {
        child.kill();
        let reaped = wait_for(Duration::from_secs(30), || child.try_reap());
        let after = if reaped {
            "reaped".to_string()
        } else {
            format!(
                "NOT reaped within 30s: {}",
                task_report(&pid.to_string(), true)
            )
        };
        return result
            .with_context(|| format!("after the failure the child was SIGKILLed: {after}"));
    }
    result
}

fn drive(round: &Round, child: &mut ChildProc, debugfs: bool, tot: &mut Totals) -> Result<String> {
    let limit = timeout();
    let reap_limit = Duration::from_secs(env_u64("KVMUF_STRESS_REAP_SECS", 30));
    let d_limit = Duration::from_secs(env_u64("KVMUF_STRESS_D_SECS", 10));
    let pid = child.pid.to_string();
    let ready = child.wait_line("READY", limit)?;
    let r = kv(&ready);
    let vm_fd = r.get("vmfd").copied().unwrap_or(u64::MAX);
    // What the parent sees asleep on gfns, at the moment it decides.
    let (ps, pd) = uf_sleepers(&pid);
    if debugfs {
        let dir = format!("{DEBUGFS_KVM}/{pid}-{vm_fd}");
        ensure!(
            std::path::Path::new(&dir).is_dir(),
            "{dir} does not exist while the child's VM lives (the destroyed-VM check would be vacuous); have {:?}",
            vm_dirs(child.pid)
        );
    }
    match &round.teardown {
        Teardown::Kill => child.kill(),
        Teardown::Exit => child.command(b'E')?,
        Teardown::Close(_) => {
            child.command(b'C')?;
            child.wait_line("CLOSED", limit)?;
        }
        Teardown::CloseKill(_) => {
            child.command(b'C')?;
            child.wait_line("STEPS", limit)?;
            child.kill();
        }
    }
    let reap_time = child.reap(reap_limit, d_limit)?;
    while !child.eof {
        child.pump(100);
    }
    let st = child.status.unwrap();
    let errors: Vec<&String> = child
        .lines
        .iter()
        .filter(|l| l.starts_with("ERR"))
        .collect();
    ensure!(errors.is_empty(), "the child reported: {errors:#?}");
    let status_ok = match round.teardown {
        Teardown::Kill | Teardown::CloseKill(_) => {
            libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL
        }
        Teardown::Exit | Teardown::Close(_) => libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
    };
    ensure!(
        status_ok,
        "child ended with {} after teardown {}",
        describe_status(st),
        round.teardown.kind()
    );
    if debugfs {
        let left = vm_dirs(child.pid);
        ensure!(
            left.is_empty(),
            "VM not destroyed: debugfs still has {left:?} after the child was reaped"
        );
        tot.debugfs_checked += 1;
    }
    // Totals: the READY counters (every teardown type has them), plus what the orderly close
    // checked.
    for (k, v) in &r {
        tot.add(k, *v);
    }
    if let Some(c) = child.line("CLOSED") {
        let c = kv(c);
        for k in [
            "eintr_checked",
            "uf_exit_checked",
            "uf_close_woke",
            "hup_checked",
            "exits_after_unmap",
            "gmem_close_blocked",
        ] {
            tot.add(k, c.get(k).copied().unwrap_or(0));
        }
    }
    tot.add("parent_sleepers_s", ps);
    tot.add("parent_sleepers_d", pd);
    if ps + pd > 0 {
        tot.rounds_with_sleepers += 1;
    }
    *tot.per_kind.entry(round.teardown.kind()).or_default() += 1;
    tot.max_reap = tot.max_reap.max(reap_time);
    let g = |k: &str| r.get(k).copied().unwrap_or(0);
    Ok(format!(
        "sleepers at teardown: child saw withheld_pages={} in_run={} parked={} kernel S={} D={}, \
         parent saw S={ps} D={pd}; records={} resolves={} exits={} memslot_changes={}; reaped \
         {:.0}ms after the teardown, {}",
        g("withheld_pages"),
        g("vcpus_in_run"),
        g("vcpus_parked"),
        g("kernel_sleepers_s"),
        g("kernel_sleepers_d"),
        g("records"),
        g("resolves") + g("vcpu_resolves"),
        g("uf_exits"),
        g("slot_add") + g("slot_delete") + g("slot_move") + g("slot_flags") + g("data_flags"),
        reap_time.as_secs_f64() * 1e3,
        describe_status(st)
    ))
}

fn stress_seed() -> u64 {
    match std::env::var("KVMUF_STRESS_SEED") {
        Ok(_) => env_u64("KVMUF_STRESS_SEED", 0),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        }
    }
}

fn stress(seed: u64) -> Result<()> {
    let secs = env_u64("KVMUF_STRESS_SECS", 10);
    let only = std::env::var("KVMUF_STRESS_ROUND")
        .ok()
        .map(|_| env_u64("KVMUF_STRESS_ROUND", 0));
    let kvm = open_kvm()?;
    let gmem_flags = kvm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS as libc::c_ulong) as u64;
    let gmem_ok = gmem_flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        == GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    drop(kvm);
    let debugfs = debugfs_mounted();
    if !debugfs {
        println!(
            "teardown: debugfs is not mounted at /sys/kernel/debug (or has no kvm directory): \
             the destroyed-VM check (no {DEBUGFS_KVM}/<pid>-* after the reap) is OFF"
        );
    }
    println!(
        "teardown: budget {secs}s (at least one round per teardown type), guest_memfd {}, \
         debugfs check {}",
        if gmem_ok { "on" } else { "unavailable" },
        if debugfs { "on" } else { "off" }
    );
    let start = Instant::now();
    let mut tot = Totals::default();
    let mut index = only.unwrap_or(0);
    loop {
        let round = Round::new(seed, index, gmem_ok);
        println!("round {index}: {}", round.describe());
        let t = Instant::now();
        let outcome = run_round(&round, debugfs, &mut tot).with_context(|| {
            format!(
                "round {index} ({}) (rerun: KVMUF_STRESS_SEED={seed} KVMUF_STRESS_ROUND={index})",
                round.describe()
            )
        })?;
        println!(
            "round {index}: {outcome} ({:.2}s)",
            t.elapsed().as_secs_f64()
        );
        index += 1;
        let all_kinds = TEARDOWN_KINDS.iter().all(|k| tot.per_kind.contains_key(k));
        if only.is_some() || (start.elapsed().as_secs() >= secs && all_kinds) {
            break;
        }
    }
    let kinds: Vec<String> = TEARDOWN_KINDS
        .iter()
        .map(|k| format!("{k}={}", tot.per_kind.get(k).copied().unwrap_or(0)))
        .collect();
    println!(
        "teardown summary: seed={seed} rounds={} ({}) elapsed={:.1}s hangs=0 child_errors=0 \
         kvm_runs={} exits={} records={} (guest={} kvm={}) resolves={} (resolver={} vcpu={} \
         clear_ranges={}) withheld={} parked={} sleepers_at_teardown: parent S={} D={} (rounds \
         with a kernel sleeper: {}), child withheld_pages={} vcpus_in_run={} memslot: add={} \
         delete={} move={} flags={} data_flags={} sets={} scratch_attrs={} signals={} \
         lifetime checks: eintr={} uf_exit={} uf_close_woke={} hup={} exits_after_unmap={} \
         gmem_close_blocked={} \
         max_reap={:.0}ms debugfs_checks={}",
        tot.per_kind.values().sum::<u64>(),
        kinds.join(" "),
        start.elapsed().as_secs_f64(),
        tot.get("kvm_runs"),
        tot.get("uf_exits"),
        tot.get("records"),
        tot.get("records_guest"),
        tot.get("records_kvm"),
        tot.get("resolves") + tot.get("vcpu_resolves") + tot.get("clears"),
        tot.get("resolves"),
        tot.get("vcpu_resolves"),
        tot.get("clears"),
        tot.get("withheld"),
        tot.get("parked"),
        tot.get("parent_sleepers_s"),
        tot.get("parent_sleepers_d"),
        tot.rounds_with_sleepers,
        tot.get("withheld_pages"),
        tot.get("vcpus_in_run"),
        tot.get("slot_add"),
        tot.get("slot_delete"),
        tot.get("slot_move"),
        tot.get("slot_flags"),
        tot.get("data_flags"),
        tot.get("sets"),
        tot.get("scratch_attrs"),
        tot.get("signals"),
        tot.get("eintr_checked"),
        tot.get("uf_exit_checked"),
        tot.get("uf_close_woke"),
        tot.get("hup_checked"),
        tot.get("exits_after_unmap"),
        tot.get("gmem_close_blocked"),
        tot.max_reap.as_secs_f64() * 1e3,
        tot.debugfs_checked,
    );
    Ok(())
}

/// The only test of this binary (it forks: nothing else may run beside it).
#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn teardown_stress() {
    let seed = stress_seed();
    println!("teardown seed: {seed}");
    kvm_selftests::require_userfault!(TEST);
    if let Err(e) = stress(seed) {
        panic!("{TEST} failed (seed {seed}): {e:#}");
    }
}
