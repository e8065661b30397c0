//! Capability probes and skips, like the C selftests' `TEST_REQUIRE()` / `print_skip()`.
//!
//! Two kinds of missing feature, treated differently:
//! - a **host feature** (THP, hugetlb pages, `KVM_X86_SW_PROTECTED_VM`, EPT/NPT, …): the test
//!   prints `[SKIP] test: why` ([`skip`]) and passes, as kselftest does;
//! - the **KVM userfault series** itself: the tests that need it are `#[ignore]`d, so whoever
//!   runs them asked for them, and a kernel without the series fails them with one line saying
//!   what is missing and how to get it ([`series_missing`], [`require_userfault!`](crate::require_userfault)). A run that
//!   opts in with [`ALLOW_SKIP_ENV`] skips them instead, with a [`SERIES_SKIP_PREFIX`] line;
//!   under [`REQUIRE_SERIES_ENV`] (set by `cargo xtask test` in the patched guest) they fail
//!   whatever else is set, and so does a missing `/dev/kvm` ([`require_dev_kvm`]).

use std::ffi::OsStr;

use crate::uapi;
use crate::vm::open_kvm;

/// Opt-in to skipping: with `KVMUF_ALLOW_SKIP=1` a test that needs the series prints a
/// [`SERIES_SKIP_PREFIX`] line and passes on a kernel without it, instead of failing.
pub const ALLOW_SKIP_ENV: &str = "KVMUF_ALLOW_SKIP";

/// Set (`=1`) by `cargo xtask test` in the patched guest: there every series test must run, so
/// a missing series or `/dev/kvm` fails the test even under [`ALLOW_SKIP_ENV`]. xtask's
/// `console.rs` spells the same name.
pub const REQUIRE_SERIES_ENV: &str = "KVMUF_REQUIRE_SERIES";

/// How the skip line of a test that needs the series starts. xtask's tally (`console.rs`)
/// counts such a line as a failure, so a skip that slips past [`REQUIRE_SERIES_ENV`] still
/// fails `cargo xtask test`. It is not `[SKIP]`: that would read as a host-feature skip.
pub const SERIES_SKIP_PREFIX: &str = "[SKIP series]";

/// Prints the kselftest-style skip line of a missing **host** feature (THP, a VM type, EPT);
/// the test then returns and passes. Not for the series: see [`series_missing`].
pub fn skip(test: &str, why: &str) {
    println!("[SKIP] {test}: {why}");
}

/// Whether an environment flag is on: set, non-empty and not `0`.
fn flag_on(value: Option<&OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// What a test that needs the series does when the series is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesPolicy {
    /// Fail: the default, since the test was asked for explicitly (`--ignored`).
    Fail,
    /// Print a [`SERIES_SKIP_PREFIX`] line and pass ([`ALLOW_SKIP_ENV`]).
    Skip,
    /// Fail, saying the run promised the series ([`REQUIRE_SERIES_ENV`], which wins).
    Required,
}

impl SeriesPolicy {
    /// The policy for these values of [`ALLOW_SKIP_ENV`] and [`REQUIRE_SERIES_ENV`].
    pub fn from_flags(allow_skip: Option<&OsStr>, require_series: Option<&OsStr>) -> Self {
        if flag_on(require_series) {
            SeriesPolicy::Required
        } else if flag_on(allow_skip) {
            SeriesPolicy::Skip
        } else {
            SeriesPolicy::Fail
        }
    }

    /// The policy of this process's environment.
    pub fn from_env() -> Self {
        Self::from_flags(
            std::env::var_os(ALLOW_SKIP_ENV).as_deref(),
            std::env::var_os(REQUIRE_SERIES_ENV).as_deref(),
        )
    }

    /// The one-line failure of `test`, which needs the series, when `why` it cannot run;
    /// `None` when the policy is to skip.
    pub fn failure(self, test: &str, why: &str) -> Option<String> {
        match self {
            SeriesPolicy::Skip => None,
            SeriesPolicy::Fail => Some(format!(
                "{test}: {why}; run it in the patched kernel with `cargo xtask test` (or boot \
                 that kernel with `cargo xtask vm`: docs/selftests.md), or set \
                 {ALLOW_SKIP_ENV}=1 to skip it"
            )),
            SeriesPolicy::Required => Some(format!(
                "{test}: {why}, but {REQUIRE_SERIES_ENV} is set (`cargo xtask test` in the \
                 patched kernel): every test of the series must run here, none may skip"
            )),
        }
    }
}

/// The calling test needs the series and cannot run (`why`): panics with one line saying what
/// is missing and how to get it, or, if the run allows skipping ([`SeriesPolicy::from_env`]),
/// prints a [`SERIES_SKIP_PREFIX`] line and returns, and the test returns too.
#[track_caller]
pub fn series_missing(test: &str, why: &str) {
    match SeriesPolicy::from_env().failure(test, why) {
        Some(line) => panic!("{line}"),
        None => println!("{SERIES_SKIP_PREFIX} {test}: {why}"),
    }
}

/// For a test that needs the series: `true` if the kernel has it; otherwise the policy's
/// failure (or, opted in, a skip: [`series_missing`]) and `false`.
#[track_caller]
pub fn series_present() -> bool {
    match userfault_unsupported() {
        None => true,
        Some(why) => {
            series_missing(&current_test(), &why);
            false
        }
    }
}

/// [`require_dev_kvm`] for the running test.
#[track_caller]
pub fn kvm_available() -> bool {
    require_dev_kvm(&current_test())
}

/// The running test's name: libtest runs each test on a thread named after it.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string()
}

/// Whether `/dev/kvm` can be opened. If not, a host-feature skip ([`skip`]) and `false`, but
/// under [`REQUIRE_SERIES_ENV`] a panic: the patched guest always has KVM, and a test that
/// passes there without running would hide that it never ran.
#[track_caller]
pub fn require_dev_kvm(test: &str) -> bool {
    let Err(e) = open_kvm() else {
        return true;
    };
    let why = format!("{e:#}");
    if SeriesPolicy::from_env() == SeriesPolicy::Required {
        panic!("{test}: {why}, but {REQUIRE_SERIES_ENV} is set: the patched kernel has KVM");
    }
    skip(test, &why);
    false
}

/// `KVM_CHECK_EXTENSION` on /dev/kvm; 0 when KVM itself is unavailable.
pub fn kvm_check_cap(cap: u64) -> i32 {
    open_kvm()
        .map(|k| k.check_extension_raw(cap as libc::c_ulong))
        .unwrap_or(0)
}

/// Why the KVM userfault series is unusable here, or `None` if a default VM supports it
/// (`KVM_CAP_USERFAULT` non-zero and `KVM_CAP_MEMORY_ATTRIBUTES` reporting USERFAULT). The
/// reason names the capability (or `/dev/kvm`) that is missing; [`series_missing`] adds how
/// to get it.
pub fn userfault_unsupported() -> Option<String> {
    let kvm = match open_kvm() {
        Ok(k) => k,
        Err(e) => return Some(format!("no usable KVM: {e:#}")),
    };
    let vm = match kvm.create_vm() {
        Ok(v) => v,
        Err(e) => return Some(format!("no usable KVM: KVM_CREATE_VM: {e}")),
    };
    let uf = vm.check_extension_raw(uapi::KVM_CAP_USERFAULT as libc::c_ulong);
    let attrs = vm.check_extension_raw(uapi::KVM_CAP_MEMORY_ATTRIBUTES as libc::c_ulong) as u64;
    if uf <= 0 {
        return Some(format!(
            "kernel lacks the KVM userfault series (KVM_CAP_USERFAULT ({}) is {uf})",
            uapi::KVM_CAP_USERFAULT
        ));
    }
    if attrs & uapi::KVM_MEMORY_ATTRIBUTE_USERFAULT == 0 {
        return Some(format!(
            "kernel lacks the KVM userfault series (KVM_CAP_MEMORY_ATTRIBUTES reports {attrs:#x}, \
             without USERFAULT, on a default VM)"
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

/// The start of a test that needs the series: if the series is missing, fails the test with
/// one line saying so and how to get the series, or, where the run allows skipping, returns
/// early with a [`SERIES_SKIP_PREFIX`] line (see [`series_missing`]).
#[macro_export]
macro_rules! require_userfault {
    ($test:expr) => {
        if let Some(why) = $crate::caps::userfault_unsupported() {
            $crate::caps::series_missing($test, &why);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_policy_follows_the_flags() {
        let on = Some(OsStr::new("1"));
        let off = Some(OsStr::new("0"));
        let empty = Some(OsStr::new(""));
        assert_eq!(SeriesPolicy::from_flags(None, None), SeriesPolicy::Fail);
        assert_eq!(SeriesPolicy::from_flags(on, None), SeriesPolicy::Skip);
        assert_eq!(
            SeriesPolicy::from_flags(Some(OsStr::new("yes")), None),
            SeriesPolicy::Skip
        );
        // `=0` and `=` are "off", as one would write to turn a flag off again.
        assert_eq!(SeriesPolicy::from_flags(off, None), SeriesPolicy::Fail);
        assert_eq!(SeriesPolicy::from_flags(empty, None), SeriesPolicy::Fail);
        // The patched guest's promise wins over an opt-in to skipping.
        assert_eq!(SeriesPolicy::from_flags(on, on), SeriesPolicy::Required);
        assert_eq!(SeriesPolicy::from_flags(None, on), SeriesPolicy::Required);
        assert_eq!(SeriesPolicy::from_flags(on, off), SeriesPolicy::Skip);
    }

    #[test]
    fn series_failures_are_one_line_naming_the_cure() {
        let why = "kernel lacks the KVM userfault series (KVM_CAP_USERFAULT (252) is 0)";
        assert_eq!(SeriesPolicy::Skip.failure("t", why), None);
        let fail = SeriesPolicy::Fail
            .failure("userfault::capability", why)
            .unwrap();
        assert!(
            fail.starts_with(&format!("userfault::capability: {why}; ")),
            "{fail}"
        );
        for needle in ["cargo xtask test", "cargo xtask vm", "KVMUF_ALLOW_SKIP=1"] {
            assert!(fail.contains(needle), "{needle}: {fail}");
        }
        let required = SeriesPolicy::Required.failure("t", why).unwrap();
        assert!(
            required.contains("KVMUF_REQUIRE_SERIES is set"),
            "{required}"
        );
        assert!(!required.contains("KVMUF_ALLOW_SKIP"), "{required}");
        for line in [fail, required] {
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn skip_lines_of_the_two_kinds_differ() {
        // xtask tells them apart by their start: a series skip must not read as "[SKIP] ".
        assert!(!SERIES_SKIP_PREFIX.starts_with("[SKIP]"));
        assert!(SERIES_SKIP_PREFIX.starts_with("[SKIP"));
    }

    #[test]
    fn sizes_parse_like_the_c_tests() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size(" 2m "), Some(2 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999G"), None);
    }
}
