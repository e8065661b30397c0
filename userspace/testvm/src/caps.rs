//! Capability probes and skips, like the C selftests' `TEST_REQUIRE()` / `print_skip()`.

use crate::uapi;
use crate::vm::open_kvm;

/// Prints the kselftest-style skip line. Tests call it and return, so that running an
/// ignored test on a kernel without the series says why instead of failing obscurely.
pub fn skip(test: &str, why: &str) {
    println!("[SKIP] {test}: {why}");
}

/// `KVM_CHECK_EXTENSION` on /dev/kvm; 0 when KVM itself is unavailable.
pub fn kvm_check_cap(cap: u64) -> i32 {
    open_kvm()
        .map(|k| k.check_extension_raw(cap as libc::c_ulong))
        .unwrap_or(0)
}

/// Why the KVM userfault series is unusable here, or `None` if a default VM supports it
/// (`KVM_CAP_USERFAULT` non-zero and `KVM_CAP_MEMORY_ATTRIBUTES` reporting USERFAULT).
pub fn userfault_unsupported() -> Option<String> {
    let kvm = match open_kvm() {
        Ok(k) => k,
        Err(e) => return Some(format!("{e:#}")),
    };
    let vm = match kvm.create_vm() {
        Ok(v) => v,
        Err(e) => return Some(format!("KVM_CREATE_VM: {e}")),
    };
    let uf = vm.check_extension_raw(uapi::KVM_CAP_USERFAULT as libc::c_ulong);
    let attrs = vm.check_extension_raw(uapi::KVM_CAP_MEMORY_ATTRIBUTES as libc::c_ulong) as u64;
    if uf <= 0 {
        return Some(format!(
            "KVM_CAP_USERFAULT ({}) is not supported by this kernel (needs the KVM userfault series: cargo xtask test)",
            uapi::KVM_CAP_USERFAULT
        ));
    }
    if attrs & uapi::KVM_MEMORY_ATTRIBUTE_USERFAULT == 0 {
        return Some(format!(
            "KVM_CAP_MEMORY_ATTRIBUTES reports {attrs:#x} without USERFAULT on a default VM (needs the KVM userfault series)"
        ));
    }
    None
}

/// Whether KVM uses two-dimensional paging (EPT or NPT) for its guests, per the `kvm_intel`
/// or `kvm_amd` module parameter; `false` (shadow paging) if neither module says so.
pub fn tdp_enabled() -> bool {
    [
        "/sys/module/kvm_intel/parameters/ept",
        "/sys/module/kvm_amd/parameters/npt",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .any(|v| matches!(v.trim(), "Y" | "1"))
}

/// Returns early from the calling test with a skip message if the series is missing.
#[macro_export]
macro_rules! require_userfault {
    ($test:expr) => {
        if let Some(why) = $crate::caps::userfault_unsupported() {
            $crate::caps::skip($test, &why);
            return;
        }
    };
}

/// Reads a size from the environment (`4096`, `64K`, `2M`, `1G`), like the C tests' `-b`.
pub fn env_size(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => parse_size(&s)
            .unwrap_or_else(|| panic!("{name}={s:?}: expected a size like 4096, 64K, 2M or 1G")),
        Err(_) => default,
    }
}

/// Reads an integer from the environment.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={s:?}: expected an integer")),
        Err(_) => default,
    }
}

/// `parse_size()` from the C selftests' test_util.c.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}
