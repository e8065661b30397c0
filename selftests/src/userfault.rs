//! Thin, errno-preserving wrappers of the KVM userfault uAPI (docs/uapi.md) for tests.
//!
//! Tests need the raw errno of every call (bad-input cases assert EINVAL/EBUSY/EOPNOTSUPP),
//! and must be able to pass malformed arguments, so these wrap the ioctls one to one instead of
//! going through the runtime's higher-level VM type.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use kvm_bindings::kvm_memory_attributes;
use kvm_ioctls::VmFd;
use nix::errno::Errno;

use crate::uapi::{
    kvm_create_userfault_fd, kvm_userfault_msg, kvm_userfault_range, KVM_CREATE_USERFAULT_FD,
    KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR, KVM_MEMORY_ATTRIBUTES_FLAG_SET,
    KVM_MEMORY_ATTRIBUTE_USERFAULT, KVM_USERFAULT_RESOLVE, USERFAULT_MSG_SIZE,
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
    set_attributes(
        vm,
        gpa,
        size,
        KVM_MEMORY_ATTRIBUTE_USERFAULT,
        KVM_MEMORY_ATTRIBUTES_FLAG_SET,
    )
}

/// Clears USERFAULT on a range through the VM (the generic attribute path).
pub fn clear_userfault(vm: &VmFd, gpa: u64, size: u64) -> Result<(), Errno> {
    set_attributes(
        vm,
        gpa,
        size,
        KVM_MEMORY_ATTRIBUTE_USERFAULT,
        KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR,
    )
}

/// `KVM_CREATE_USERFAULT_FD` with a full argument (tests pass non-zero reserved words).
pub fn create_fd_raw(vm: &VmFd, arg: &kvm_create_userfault_fd) -> Result<OwnedFd, Errno> {
    // SAFETY: the ioctl reads exactly one kvm_create_userfault_fd from `arg`.
    let r = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_CREATE_USERFAULT_FD as libc::c_ulong,
            arg as *const _,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: on success KVM returns a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// `KVM_CREATE_USERFAULT_FD` with `flags`.
pub fn create_fd(vm: &VmFd, flags: u64) -> Result<OwnedFd, Errno> {
    create_fd_raw(
        vm,
        &kvm_create_userfault_fd {
            flags,
            reserved: [0; 7],
        },
    )
}

/// `KVM_USERFAULT_RESOLVE` with a full argument.
pub fn resolve_raw(fd: RawFd, range: &kvm_userfault_range) -> Result<(), Errno> {
    // SAFETY: the ioctl reads exactly one kvm_userfault_range from `range`.
    let r = unsafe {
        libc::ioctl(
            fd,
            KVM_USERFAULT_RESOLVE as libc::c_ulong,
            range as *const _,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Clears USERFAULT on `[gpa, gpa + size)` through the userfault fd and wakes its waiters.
pub fn resolve(fd: RawFd, gpa: u64, size: u64) -> Result<(), Errno> {
    resolve_raw(
        fd,
        &kvm_userfault_range {
            gpa,
            size,
            flags: 0,
            reserved: 0,
        },
    )
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

/// `poll(2)` on one fd for POLLIN; returns the revents (0 on timeout).
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
