//! uAPI definitions the selftests use.
//!
//! The series' definitions (docs/uapi.md) come from the runtime's `kvm_userfault::uapi`, so
//! that there is one definition, checked there against the series' header. This module adds
//! only base (7.x) constants that kvm-bindings 0.14 lacks and the runtime does not need.

pub use kvm_userfault::uapi::*;

pub const KVM_CAP_MEMORY_ATTRIBUTES: u64 = 233;
pub const KVM_CAP_GUEST_MEMFD: u64 = 234;
pub const KVM_CAP_VM_TYPES: u64 = 235;
pub const KVM_CAP_USER_MEMORY2: u64 = 231;
pub const KVM_CAP_MEMORY_FAULT_INFO: u64 = 232;
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
