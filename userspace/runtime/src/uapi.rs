//! The KVM userfault series' uAPI (docs/uapi.md) plus the upstream guest_memfd definitions that
//! kvm-bindings 0.14 (the 6.15 uAPI) lacks. Nothing kvm-bindings has is defined again here
//! (`KVMIO`, `KVM_MEMORY_EXIT_FLAG_PRIVATE`, the base capabilities: use kvm-bindings').
//!
//! Every number and struct layout here is checked by the integration test
//! `tests/uapi_layout.rs`: against the documented C layout always, and against the lines the
//! series' patches add to `include/uapi/linux/kvm.h` (`kernel-patches/series/*.patch`).

use kvm_bindings::KVMIO;
use std::mem::size_of;
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

// ---- upstream guest_memfd (7.x base), missing from kvm-bindings 0.14 ----

/// `KVM_CAP_GUEST_MEMFD_FLAGS`: the flags `KVM_CREATE_GUEST_MEMFD` accepts.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// The guest_memfd can be mmap()ed.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// The guest_memfd's memory starts shared (host accessible), not private.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

// ---- the series ----

/// `KVM_CAP_USERFAULT` (provisional number): 1 if the VM (on the system fd: the default VM
/// type) supports KVM userfault, else 0. A plain yes/no since v2 (v1 returned the fd flags).
pub const KVM_CAP_USERFAULT: u32 = 252;
/// `KVM_CAP_USERFAULT_FD_FLAGS` (provisional number): the `KVM_USERFAULT_FD_FLAG_*` that
/// `KVM_CREATE_USERFAULT_FD` accepts (0 on kernels without the series, or with its v1 uAPI).
pub const KVM_CAP_USERFAULT_FD_FLAGS: u32 = 253;
/// The memory attribute that makes accesses to a gfn fault to userspace.
pub const KVM_MEMORY_ATTRIBUTE_USERFAULT: u64 = 1 << 4;
/// `KVM_SET_MEMORY_ATTRIBUTES` flag: `attrs |= attributes`.
pub const KVM_MEMORY_ATTRIBUTES_FLAG_SET: u64 = 1 << 0;
/// `KVM_SET_MEMORY_ATTRIBUTES` flag: `attrs &= ~attributes`.
pub const KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR: u64 = 1 << 1;
/// `run->memory_fault.flags` bit: the exit was caused by a USERFAULT gfn.
pub const KVM_MEMORY_EXIT_FLAG_USERFAULT: u64 = 1 << 4;
/// `run->memory_fault.flags` bit (with USERFAULT): the access was a read. Same bit and meaning
/// as [`KVM_USERFAULT_MSG_READ`].
pub const KVM_MEMORY_EXIT_FLAG_READ: u64 = 1 << 0;
/// `run->memory_fault.flags` bit (with USERFAULT): the access was a write.
pub const KVM_MEMORY_EXIT_FLAG_WRITE: u64 = 1 << 1;
/// `run->memory_fault.flags` bit (with USERFAULT): the access was an instruction fetch.
pub const KVM_MEMORY_EXIT_FLAG_EXEC: u64 = 1 << 2;

/// `KVM_USERFAULT_FD_FLAG_NONBLOCK`: O_NONBLOCK on the new fd.
pub const KVM_USERFAULT_FD_FLAG_NONBLOCK: u64 = 1 << 0;
/// `KVM_USERFAULT_FD_FLAG_VCPU_FAULTS`: vCPU faults also go through the fd.
pub const KVM_USERFAULT_FD_FLAG_VCPU_FAULTS: u64 = 1 << 1;

/// Record flag: read access.
pub const KVM_USERFAULT_MSG_READ: u32 = 1 << 0;
/// Record flag: write access.
pub const KVM_USERFAULT_MSG_WRITE: u32 = 1 << 1;
/// Record flag: instruction fetch.
pub const KVM_USERFAULT_MSG_EXEC: u32 = 1 << 2;
/// Record flag: raised in a vCPU's context; `vcpu_id` is valid.
pub const KVM_USERFAULT_MSG_VCPU: u32 = 1 << 3;
/// Record flag: a guest access (VCPU_FAULTS mode), not one of KVM's own.
pub const KVM_USERFAULT_MSG_GUEST: u32 = 1 << 4;
/// Every record flag the series defines; anything else in a record is rejected.
pub const KVM_USERFAULT_MSG_ALL: u32 = KVM_USERFAULT_MSG_READ
    | KVM_USERFAULT_MSG_WRITE
    | KVM_USERFAULT_MSG_EXEC
    | KVM_USERFAULT_MSG_VCPU
    | KVM_USERFAULT_MSG_GUEST;

/// `struct kvm_create_userfault_fd`, the argument of `KVM_CREATE_USERFAULT_FD` (read and
/// written: KVM stores the negotiated record size in `msg_size`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct kvm_create_userfault_fd {
    /// `KVM_USERFAULT_FD_FLAG_*`.
    pub flags: u64,
    /// In: the largest record size the reader understands (at least
    /// [`USERFAULT_MSG_MIN_SIZE`]); out: the record size KVM uses,
    /// `min(in, sizeof(struct kvm_userfault_msg))`.
    pub msg_size: u32,
    /// Must be zero.
    pub pad: u32,
    /// Must be zero.
    pub reserved: [u64; 6],
}

/// `struct kvm_userfault_msg`, one record read from the userfault fd.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct kvm_userfault_msg {
    /// The record size negotiated at fd creation (`msg_size`; 24 with this layout).
    pub size: u32,
    /// `KVM_USERFAULT_MSG_*`.
    pub flags: u32,
    /// The faulting guest frame number.
    pub gfn: u64,
    /// Valid iff `flags & KVM_USERFAULT_MSG_VCPU`.
    pub vcpu_id: u32,
    /// Zero.
    pub reserved: u32,
}

/// `struct kvm_userfault_range`, the argument of `KVM_USERFAULT_RESOLVE`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct kvm_userfault_range {
    /// Page aligned.
    pub gpa: u64,
    /// Page aligned, non-zero.
    pub size: u64,
    /// Must be zero.
    pub flags: u64,
    /// Must be zero.
    pub reserved: u64,
}

/// Size of the record this crate knows (`sizeof(struct kvm_userfault_msg)` it was built with):
/// what it asks for in `msg_size`. Records are read with the size KVM returns, not this.
pub const USERFAULT_MSG_SIZE: usize = size_of::<kvm_userfault_msg>();
/// The smallest `msg_size` KVM accepts: the first record layout (24 bytes), which every kernel
/// with this uAPI provides; a smaller `msg_size` is -EINVAL.
pub const USERFAULT_MSG_MIN_SIZE: usize = 24;

// The series' ioctl numbers, in one place (the kvm-ioctls pattern: each macro defines a
// `fn NAME() -> c_ulong` computing `_IO`/`_IOW`/`_IOWR(KVMIO, nr, type)` from the type's size).
//
// KVM_CREATE_USERFAULT_FD = _IOWR(KVMIO, 0xd6, struct kvm_create_userfault_fd): a VM ioctl;
// v1 of the series had `_IOW`, so a v1 kernel answers this number with ENOTTY.
ioctl_iowr_nr!(
    KVM_CREATE_USERFAULT_FD,
    KVMIO,
    0xd6,
    kvm_create_userfault_fd
);
// KVM_USERFAULT_RESOLVE = _IOW(KVMIO, 0xd7, struct kvm_userfault_range): a userfault fd ioctl.
ioctl_iow_nr!(KVM_USERFAULT_RESOLVE, KVMIO, 0xd7, kvm_userfault_range);
// KVM_USERFAULT_REQUEUE = _IO(KVMIO, 0xd8): a userfault fd ioctl without an argument; posts a
// record again for every outstanding gfn whose record was already read, returns how many.
ioctl_io_nr!(KVM_USERFAULT_REQUEUE, KVMIO, 0xd8);
