//! The embedding example (`examples/mini_vmm.rs`, a small VMM of its own) run in each mode,
//! every page of its data region checked by its guest, and the counts a VMM would see.
//! userfaultfd runs on any KVM host; the KVM userfault modes need the series (`#[ignore]`,
//! run inside the patched kernel by `cargo xtask test`; without the series they fail with one
//! line saying so, unless KVMUF_ALLOW_SKIP=1: docs/selftests.md).

#[path = "../examples/mini_vmm.rs"]
#[allow(dead_code)]
mod mini_vmm;

use mini_vmm::{run, Mode, Report};

const VCPUS: usize = 2;
const DATA: u64 = 2 << 20;

fn check(mode: Mode, r: &Report) {
    let pages = DATA / 4096;
    assert_eq!(r.pages, pages);
    // The guest read every word of every page and found the source's pattern.
    assert_eq!(
        r.pages_checked, pages,
        "{mode:?}: pages checked by the guest"
    );
    // Each page was filled once, on demand, and nothing is left missing.
    assert_eq!(r.demand_pages, pages, "{mode:?}: pages filled: {r:?}");
    assert_eq!(r.missing_at_end, 0, "{mode:?}: {r:?}");
    // The vCPUs touch disjoint halves and each waits for its page: one fault per page, as an
    // exit (sync) or as a record / userfaultfd message (async, uffd), never both.
    assert_eq!(r.faults, pages, "{mode:?}: faults: {r:?}");
    let exits = if mode == Mode::KvmSync { pages } else { 0 };
    assert_eq!(r.userfault_exits, exits, "{mode:?}: USERFAULT exits: {r:?}");
}

#[test]
fn uffd_every_page_demand_filled_and_checked() {
    if !kvm_testvm::caps::require_dev_kvm("embedding::uffd") {
        return;
    }
    let r = run(Mode::Uffd, VCPUS, DATA).unwrap();
    check(Mode::Uffd, &r);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let e = run(Mode::Uffd, 3, DATA).unwrap_err().to_string();
    assert!(e.contains("a multiple of 3 pages"), "{e}");
    let e = run(Mode::Uffd, 0, DATA).unwrap_err().to_string();
    assert!(e.contains("1 to 8 vCPUs"), "{e}");
    let e = "kvm-fast".parse::<Mode>().unwrap_err().to_string();
    assert!(e.contains("unknown mode \"kvm-fast\""), "{e}");
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_sync_every_page_demand_filled_and_checked() {
    kvm_testvm::require_userfault!("embedding::kvm_sync");
    let r = run(Mode::KvmSync, VCPUS, DATA).unwrap();
    check(Mode::KvmSync, &r);
}

#[test]
#[ignore = "needs the KVM userfault kernel (cargo xtask test)"]
fn kvm_async_every_page_demand_filled_and_checked() {
    kvm_testvm::require_userfault!("embedding::kvm_async");
    let r = run(Mode::KvmAsync, VCPUS, DATA).unwrap();
    check(Mode::KvmAsync, &r);
}
