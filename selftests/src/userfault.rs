//! Thin, errno-preserving wrappers of the KVM userfault uAPI (docs/uapi.md) for tests.
//!
//! Tests need the raw errno of every call (bad-input cases assert EINVAL/EBUSY/EOPNOTSUPP),
//! and must be able to pass malformed arguments: these call the runtime's errno-exact ioctls
//! (`kvm_userfault::ioctls::{create_raw, resolve_raw, requeue_raw}`, one definition of each
//! ioctl) and return nix's `Errno`, instead of the runtime's typed `UserfaultFd` layer.

use std::os::fd::{OwnedFd, RawFd};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_memory_attributes;
use kvm_ioctls::VmFd;
use kvm_userfault::ioctls;
use nix::errno::Errno;

use crate::uapi::{
    kvm_create_userfault_fd, kvm_userfault_msg, kvm_userfault_range, USERFAULT_MSG_SIZE,
};

/// `KVM_SET_MEMORY_ATTRIBUTES` with explicit `flags` (0 = exact value, or FLAG_SET/FLAG_CLEAR).
pub fn set_attributes(
    vm: &VmFd,
    gpa: u64,
    size: u64,
    attributes: u64,
    flags: u64,
) -> Result<(), Errno> {
    let attr = kvm_memory_attributes {
        address: gpa,
        size,
        attributes,
        flags,
    };
    vm.set_memory_attributes(attr)
        .map_err(|e| Errno::from_raw(e.errno()))
}

/// Sets USERFAULT on a range without touching other attributes (delta semantics).
pub fn set_userfault(vm: &VmFd, gpa: u64, size: u64) -> Result<(), Errno> {
    ioctls::set_userfault(vm, gpa, size, true).map_err(io_errno)
}

/// Clears USERFAULT on a range through the VM (the generic attribute path).
pub fn clear_userfault(vm: &VmFd, gpa: u64, size: u64) -> Result<(), Errno> {
    ioctls::set_userfault(vm, gpa, size, false).map_err(io_errno)
}

/// `KVM_CREATE_USERFAULT_FD` with a full argument (tests pass bad sizes and non-zero
/// reserved words); KVM writes the negotiated record size back into `arg.msg_size`.
pub fn create_fd_raw(vm: &VmFd, arg: &mut kvm_create_userfault_fd) -> Result<OwnedFd, Errno> {
    ioctls::create_raw(vm, arg).map_err(errno)
}

/// `KVM_CREATE_USERFAULT_FD` with `flags`, asking for the record size the tests decode
/// ([`USERFAULT_MSG_SIZE`]); asserts that KVM agrees to it, so that every read of the fd can be
/// decoded with that stride.
pub fn create_fd(vm: &VmFd, flags: u64) -> Result<OwnedFd, Errno> {
    let mut arg = kvm_create_userfault_fd {
        flags,
        msg_size: USERFAULT_MSG_SIZE as u32,
        ..Default::default()
    };
    let fd = create_fd_raw(vm, &mut arg)?;
    assert_eq!(
        arg.msg_size as usize, USERFAULT_MSG_SIZE,
        "KVM_CREATE_USERFAULT_FD negotiated another record size"
    );
    Ok(fd)
}

/// `KVM_USERFAULT_REQUEUE`: returns how many records KVM posted again.
pub fn requeue(fd: RawFd) -> Result<i32, Errno> {
    let n = ioctls::requeue_raw(&fd).map_err(errno)?;
    Ok(i32::try_from(n).expect("the ioctl returned a c_int"))
}

/// `KVM_USERFAULT_RESOLVE` with a full argument.
pub fn resolve_raw(fd: RawFd, range: &kvm_userfault_range) -> Result<(), Errno> {
    ioctls::resolve_raw(&fd, range).map_err(errno)
}

/// Clears USERFAULT on `[gpa, gpa + size)` through the userfault fd and wakes its waiters.
pub fn resolve(fd: RawFd, gpa: u64, size: u64) -> Result<(), Errno> {
    let range = kvm_userfault_range {
        gpa,
        size,
        ..Default::default()
    };
    resolve_raw(fd, &range)
}

fn errno(e: vmm_sys_util::errno::Error) -> Errno {
    Errno::from_raw(e.errno())
}

fn io_errno(e: std::io::Error) -> Errno {
    // The runtime's io::Error always carries KVM's errno (from_raw_os_error).
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// `read(2)` into a buffer of `buf_len` bytes; returns the bytes read.
pub fn read_raw(fd: RawFd, buf_len: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; buf_len];
    // SAFETY: buf has buf_len writable bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf_len) };
    if n < 0 {
        return Err(Errno::last());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Decodes records, checking that the kernel returned whole records of the documented size.
pub fn decode(bytes: &[u8]) -> Vec<kvm_userfault_msg> {
    assert_eq!(
        bytes.len() % USERFAULT_MSG_SIZE,
        0,
        "read returned {} bytes, not whole {USERFAULT_MSG_SIZE}-byte records",
        bytes.len()
    );
    bytes
        .chunks_exact(USERFAULT_MSG_SIZE)
        .map(|c| {
            // SAFETY: kvm_userfault_msg is repr(C) plain integers; c has exactly its size.
            unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<kvm_userfault_msg>()) }
        })
        .collect()
}

/// Reads up to `max` records.
pub fn read_records(fd: RawFd, max: usize) -> Result<Vec<kvm_userfault_msg>, Errno> {
    read_raw(fd, max * USERFAULT_MSG_SIZE).map(|b| decode(&b))
}

/// `poll(2)` on one fd for POLLIN; returns the revents (0 on timeout). POLLHUP is reported
/// whatever the events asked for.
pub fn poll_in(fd: RawFd, timeout_ms: i32) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    assert!(r >= 0, "poll: {}", Errno::last());
    if r == 0 {
        0
    } else {
        p.revents
    }
}

/// The calling thread's id (for `/proc/self/task/<tid>/...`).
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// `/proc/self/task/<tid>/wchan`: the kernel function the thread sleeps in ("0" if running).
pub fn wchan(tid: libc::pid_t) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default()
}

/// Waits, bounded by `timeout`, until thread `tid` sleeps in the kernel in a function whose
/// name contains `function` (per its wchan): synchronises on the waiter's state, not on time.
/// Returns false on timeout, or as soon as `gone()` says the thread cannot get there any more.
pub fn wait_for_wchan(
    tid: libc::pid_t,
    function: &str,
    timeout: Duration,
    gone: impl Fn() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if wchan(tid).contains(function) {
            return true;
        }
        if gone() || Instant::now() > deadline {
            return false;
        }
        // Poll, do not spin: the thread waited for needs a CPU to get where it is awaited.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits, bounded by `timeout`, until thread `tid` is asleep (state S or D) inside system call
/// `nr` (per `/proc/self/task/<tid>/syscall` and `stat`), e.g. a blocking `read(2)`.
pub fn wait_in_syscall(tid: libc::pid_t, nr: libc::c_long, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let sys =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
        let stat =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next());
        if sys.split_whitespace().next() == Some(&nr.to_string())
            && matches!(state, Some("S" | "D"))
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        // Poll, do not spin: the thread waited for needs a CPU to get where it is awaited.
        std::thread::sleep(Duration::from_millis(1));
    }
}
