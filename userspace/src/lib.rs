//! KVM userfault runtime.
