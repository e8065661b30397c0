//! Code that runs inside the guest: the ucall channel, guest assertions, and the exception
//! stubs the IDT points at.
//!
//! # How guest code gets into the guest
//!
//! Like the C selftests (which load their own ELF into the guest), the framework copies every
//! loaded segment of the test process's executable and shared objects into guest memory and maps
//! each at the *same* guest virtual address as in the host (`TestVm::with_options`). A guest
//! entry point is then simply an ordinary `extern "C" fn` of the test binary, and strings such
//! as `file!()` have the same address on both sides. Guest functions must stick to `core`
//! (no allocation, no I/O, no thread-locals: the guest has no `fs` base); use the volatile
//! helpers here for guest memory so that the compiler keeps every access. Nor may they call
//! libc, which a debug build does behind the code's back for an array initialiser (`[0; N]`),
//! iterating an array by value, or a struct copied by value (`memset`/`memcpy`, whose host
//! variants may use instructions the guest CPU lacks): such a guest stops with an internal
//! error whose RIP names the libc function.

use core::arch::{asm, global_asm};

/// Port the guest writes to for a ucall (the C selftests use port 0x1000 too).
pub const UCALL_PORT: u16 = 0x1000;

/// Ucall commands, as in `ucall_common.h`.
pub const UCALL_SYNC: u64 = 1;
pub const UCALL_DONE: u64 = 2;
pub const UCALL_ASSERT: u64 = 3;
/// An unexpected exception, reported by the IDT stubs.
pub const UCALL_UNHANDLED: u64 = 4;

pub const UCALL_MAX_ARGS: usize = 4;

/// The record a ucall passes (by guest virtual address, in RDI) to the host.
/// The layout is shared with the exception stubs in assembly below.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UcallRecord {
    pub cmd: u64,
    pub file_ptr: u64,
    pub file_len: u64,
    pub line: u64,
    pub msg_ptr: u64,
    pub msg_len: u64,
    pub nargs: u64,
    pub args: [u64; UCALL_MAX_ARGS],
}

/// Builds a record in place on the stack and sends it to the host (the vCPU exits with
/// KVM_EXIT_IO on [`UCALL_PORT`]).
///
/// Every field is written separately through a raw pointer: a by-value copy or
/// `Default::default()` of the 88-byte record compiles (in debug builds) to calls to libc's
/// `memcpy`/`memset`, which the host's libc may have resolved to AVX variants the guest CPU
/// lacks. Guest code must never depend on libc.
#[inline(never)]
pub fn ucall_raw(cmd: u64, file: &'static str, line: u32, msg: &'static str, args: &[u64]) {
    let mut rec = core::mem::MaybeUninit::<UcallRecord>::uninit();
    let p = rec.as_mut_ptr();
    let n = if args.len() < UCALL_MAX_ARGS {
        args.len()
    } else {
        UCALL_MAX_ARGS
    };
    // SAFETY: `p` points at a live, suitably aligned stack slot; fields are written through
    // raw pointers (no reads of uninitialised memory) and the host only reads the record.
    unsafe {
        core::ptr::addr_of_mut!((*p).cmd).write_volatile(cmd);
        core::ptr::addr_of_mut!((*p).file_ptr).write_volatile(file.as_ptr() as u64);
        core::ptr::addr_of_mut!((*p).file_len).write_volatile(file.len() as u64);
        core::ptr::addr_of_mut!((*p).line).write_volatile(line as u64);
        core::ptr::addr_of_mut!((*p).msg_ptr).write_volatile(msg.as_ptr() as u64);
        core::ptr::addr_of_mut!((*p).msg_len).write_volatile(msg.len() as u64);
        core::ptr::addr_of_mut!((*p).nargs).write_volatile(n as u64);
        let a = core::ptr::addr_of_mut!((*p).args).cast::<u64>();
        let mut i = 0;
        while i < UCALL_MAX_ARGS {
            a.add(i)
                .write_volatile(if i < n { *args.as_ptr().add(i) } else { 0 });
            i += 1;
        }
        asm!("out dx, al", in("dx") UCALL_PORT, in("al") 0u8, in("rdi") p,
             options(nostack, preserves_flags));
    }
}

/// `GUEST_SYNC(args...)`: stop and let the host look at `args`; resumes on the next KVM_RUN.
#[inline(never)]
pub fn sync(args: &[u64]) {
    ucall_raw(UCALL_SYNC, "", 0, "", args);
}

/// `GUEST_DONE()`: the guest has finished; parks the vCPU if the host re-enters anyway.
#[inline(never)]
pub fn done() -> ! {
    ucall_raw(UCALL_DONE, "", 0, "", &[]);
    halt_forever()
}

/// Report a failed guest assertion (use [`guest_assert!`](crate::guest_assert)).
#[cold]
#[inline(never)]
pub fn assert_failed(file: &'static str, line: u32, expr: &'static str, args: &[u64]) -> ! {
    ucall_raw(UCALL_ASSERT, file, line, expr, args);
    halt_forever()
}

pub fn halt_forever() -> ! {
    loop {
        // SAFETY: hlt only stops the vCPU (a KVM_EXIT_HLT without an in-kernel irqchip).
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// `__GUEST_ASSERT(cond, ...)`: up to four values travel with the failure report.
#[macro_export]
macro_rules! guest_assert {
    ($cond:expr $(, $arg:expr)* $(,)?) => {
        if !($cond) {
            $crate::guest::assert_failed(file!(), line!(), stringify!($cond), &[$(($arg) as u64),*])
        }
    };
}

/// `GUEST_ASSERT_EQ(a, b)`: reports both values (as u64) on failure, plus up to two more.
#[macro_export]
macro_rules! guest_assert_eq {
    ($a:expr, $b:expr $(, $arg:expr)* $(,)?) => {{
        let (a, b) = (($a) as u64, ($b) as u64);
        if a != b {
            $crate::guest::assert_failed(
                file!(), line!(), concat!(stringify!($a), " == ", stringify!($b)),
                &[a, b $(, ($arg) as u64)*])
        }
    }};
}

/// Volatile guest-memory accessors: the compiler must neither elide nor merge guest accesses
/// (each one may be the fault under test) nor turn loops into `memset`/`memcpy` calls.
///
/// # Safety
/// `addr` must be mapped in the guest (or the access is the expected fault under test).
#[inline(always)]
pub unsafe fn read_u8(addr: u64) -> u8 {
    // SAFETY: per the function contract.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// # Safety
/// See [`read_u8`].
#[inline(always)]
pub unsafe fn write_u8(addr: u64, v: u8) {
    // SAFETY: per the function contract.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

/// # Safety
/// See [`read_u8`]; `addr` must be 8-byte aligned.
#[inline(always)]
pub unsafe fn read_u64(addr: u64) -> u64 {
    // SAFETY: per the function contract.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// # Safety
/// See [`read_u64`].
#[inline(always)]
pub unsafe fn write_u64(addr: u64, v: u64) {
    // SAFETY: per the function contract.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Signature of guest entry points: up to four arguments in RDI, RSI, RDX, RCX. Returning
/// reports DONE (the framework pushes a return address that does so).
pub type GuestFn = extern "C" fn(u64, u64, u64, u64);

extern "C" fn guest_return_rust() -> ! {
    done()
}

extern "C" {
    /// First of 256 16-byte exception stubs (`kvm_selftests_idt_stubs + 16 * vector`).
    pub fn kvm_selftests_idt_stubs();
    /// Where a guest entry point returns to: realigns the stack and reports DONE.
    pub fn kvm_selftests_guest_return();
}

pub const IDT_STUB_SIZE: u64 = 16;

// The exception stubs. Each vector gets a 16-byte stub that pushes a dummy error code (for
// vectors where the CPU pushes none), then the vector, and jumps to a common tail that builds
// a `UcallRecord { cmd: UNHANDLED, args: [vector, rip, error code, cr2] }` on the stack and
// ucalls it, like the C selftests' route_exception() with no handler installed. AT&T syntax so
// that `.set` symbols are unambiguous immediates.
global_asm!(
    ".pushsection .text.kvm_selftests_idt,\"ax\",@progbits",
    ".balign 16",
    ".globl kvm_selftests_idt_stubs",
    "kvm_selftests_idt_stubs:",
    ".set kvm_st_vec, 0",
    ".rept 256",
    ".balign 16",
    // Vectors 8, 10-14, 17, 21, 29 and 30 push an error code; the rest get a dummy 0.
    ".if (kvm_st_vec != 8) && ((kvm_st_vec < 10) || (kvm_st_vec > 14)) && (kvm_st_vec != 17) && (kvm_st_vec != 21) && (kvm_st_vec != 29) && (kvm_st_vec != 30)",
    "pushq $0",
    ".endif",
    "pushq $kvm_st_vec",
    "jmp kvm_selftests_idt_common",
    ".set kvm_st_vec, kvm_st_vec + 1",
    ".endr",
    "kvm_selftests_idt_common:",
    // Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
    "movq 0(%rsp), %rsi",
    "movq 8(%rsp), %rdx",
    "movq 16(%rsp), %rcx",
    "movq %cr2, %r8",
    "subq $96, %rsp",
    "andq $-16, %rsp",
    "movq ${unhandled}, 0(%rsp)",
    "movq $0, 8(%rsp)",
    "movq $0, 16(%rsp)",
    "movq $0, 24(%rsp)",
    "movq $0, 32(%rsp)",
    "movq $0, 40(%rsp)",
    "movq $4, 48(%rsp)",
    "movq %rsi, 56(%rsp)",
    "movq %rcx, 64(%rsp)",
    "movq %rdx, 72(%rsp)",
    "movq %r8, 80(%rsp)",
    "movq %rsp, %rdi",
    "movw ${port}, %dx",
    "outb %al, %dx",
    "2: hlt",
    "jmp 2b",
    ".balign 16",
    ".globl kvm_selftests_guest_return",
    "kvm_selftests_guest_return:",
    "andq $-16, %rsp",
    "call {ret}",
    "ud2",
    ".popsection",
    unhandled = const UCALL_UNHANDLED,
    port = const UCALL_PORT,
    ret = sym guest_return_rust,
    options(att_syntax)
);
