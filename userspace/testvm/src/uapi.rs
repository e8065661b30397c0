//! uAPI definitions the selftests use, under one path.
//!
//! The series' definitions (docs/uapi.md) come from the runtime's `kvm_userfault::uapi`, so
//! that there is one definition, checked there against the series' header; the base uAPI
//! comes from kvm-bindings (re-exported here, never redefined).

pub use kvm_userfault::uapi::*;

pub use kvm_bindings::{
    KVMIO, KVM_CAP_GUEST_MEMFD, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_MEM_GUEST_MEMFD,
};
