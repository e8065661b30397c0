//! kvm-selftests: Rust mirrors of the kernel's KVM selftests (tools/testing/selftests/kvm),
//! including the cases for the KVM userfault series. The tests live in `tests/*.rs`, one file
//! per C test, on the test VM framework `kvm-testvm` (re-exported here so a test names one
//! crate); [`userfault`] holds the errno-exact wrappers of the series' ioctls the tests assert
//! on.

pub use kvm_testvm::{caps, guest, mem, rng, uapi, vm};
pub use kvm_testvm::{guest_assert, guest_assert_eq, require_userfault};
pub use kvm_testvm::{page_size, Backing, Exit, HostMapping, TestVm, Ucall, Vcpu};

pub mod userfault;
