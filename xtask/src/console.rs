//! Reading the guest's serial console: kernel problem reports, the harness's own markers, and
//! test-runner summaries.

/// Printed by the guest's /init once the command finishes: `KVMUF-EXIT <status>`.
pub const EXIT_MARKER: &str = "KVMUF-EXIT ";
/// Printed by /init before it runs the command.
pub const BOOTED_MARKER: &str = "KVMUF-BOOTED";
/// Printed by the in-guest suite runner around each test binary.
pub const TEST_BEGIN: &str = "KVMUF-TEST-BEGIN ";
pub const TEST_END: &str = "KVMUF-TEST-END ";

/// Kernel reports that fail a run even when the command itself succeeded.
const PROBLEMS: &[&str] = &[
    "Kernel panic - not syncing",
    "kernel BUG at",
    "BUG: ",
    "WARNING: ",
    "Oops: ",
    "general protection fault",
    "INFO: task ",
    "INFO: rcu_",
    "rcu: INFO:",
    "watchdog: BUG: soft lockup",
    "UBSAN: ",
    "KASAN: ",
    "possible circular locking dependency",
    "Unable to handle kernel",
    // kmemleak's scan result ("kmemleak: 2 new suspected memory leaks (see ...)").
    "new suspected memory leaks",
];

/// Strips a `[   12.345678] ` printk timestamp; `None` if the line is not a kernel line.
fn kernel_message(line: &str) -> Option<&str> {
    let rest = line.trim_start_matches(['\r', '\0']).strip_prefix('[')?;
    let (stamp, msg) = rest.split_once("] ")?;
    stamp
        .trim()
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.')
        .then_some(msg)
}

/// If `line` is a kernel problem report, the report's text.
pub fn problem_in(line: &str) -> Option<&str> {
    let msg = kernel_message(line)?;
    PROBLEMS.iter().any(|p| msg.contains(p)).then_some(msg)
}

/// The command's exit status from an `KVMUF-EXIT` line.
pub fn exit_status_in(line: &str) -> Option<i32> {
    let idx = line.find(EXIT_MARKER)?;
    line[idx + EXIT_MARKER.len()..].trim().parse().ok()
}

/// Exported by the in-guest suite script: the Rust tests that need the series fail, rather
/// than skip, if they find it missing (kvm-testvm's `caps::REQUIRE_SERIES_ENV`).
pub const REQUIRE_SERIES_ENV: &str = "KVMUF_REQUIRE_SERIES";
/// How a Rust test's "the series is missing, skipping" line starts (kvm-testvm's
/// `caps::SERIES_SKIP_PREFIX`).
pub const SERIES_SKIP_PREFIX: &str = "[SKIP series]";

/// What a Rust test's skip line says is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// A feature of the host or the kernel's configuration (THP, a VM type, EPT/NPT): a skip.
    Feature,
    /// The series itself: in the patched kernel, a failure.
    Series,
}

/// A test's "feature missing, skipping" line (`[SKIP] name: why`, `SKIP: why`, or
/// [`SERIES_SKIP_PREFIX`]` name: why`), and what it is missing. A plain skip line that names
/// the series (as the runtime's `NO_USERFAULT_MSG` does) or its capability is a series skip
/// too: an older test (or one that prints the runtime's error) must not pass for a skip.
pub fn skip_in(line: &str) -> Option<Skip> {
    let l = line.trim_start_matches(['\r', '\0', ' ', '\t']);
    if l.starts_with(SERIES_SKIP_PREFIX) {
        return Some(Skip::Series);
    }
    if !(l.starts_with("[SKIP]") || l.starts_with("SKIP:")) {
        return None;
    }
    let names_series = ["KVM userfault series", "KVM_CAP_USERFAULT"]
        .iter()
        .any(|s| l.contains(s));
    Some(if names_series {
        Skip::Series
    } else {
        Skip::Feature
    })
}

/// Counts from a libtest (`cargo test`) closing line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub skipped: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.skipped += other.skipped;
    }
}

/// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; …`.
pub fn libtest_result_in(line: &str) -> Option<Counts> {
    let rest = &line[line.find("test result: ")? + "test result: ".len()..];
    let (_, fields) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    let mut seen = false;
    for field in fields.split(';') {
        let mut words = field.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => {
                counts.passed = n;
                seen = true;
            }
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            _ => {}
        }
    }
    seen.then_some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_problems_are_found_only_in_kernel_lines() {
        assert!(
            problem_in("[    3.141592] Kernel panic - not syncing: sysrq triggered crash")
                .is_some()
        );
        assert!(
            problem_in("[   10.000001] WARNING: CPU: 1 PID: 77 at arch/x86/kvm/mmu/mmu.c:123")
                .is_some()
        );
        assert!(problem_in("[ 1.0] BUG: sleeping function called from invalid context").is_some());
        assert!(problem_in(
            "[ 99.1] INFO: task userfault_test:80 blocked for more than 120 seconds."
        )
        .is_some());
        assert!(
            problem_in("\r[ 5.5] WARNING: possible circular locking dependency detected").is_some()
        );
        // A test printing the same words is not a kernel report.
        assert!(problem_in(
            "[ 99.1] kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)"
        )
        .is_some());
        assert!(problem_in("WARNING: this is test output").is_none());
        assert!(problem_in("[ 1.0] kvm_amd: TSC scaling supported").is_none());
        assert!(problem_in("[abc] BUG: nope").is_none());
    }

    #[test]
    fn exit_marker_parses() {
        assert_eq!(exit_status_in("KVMUF-EXIT 0"), Some(0));
        assert_eq!(exit_status_in("noise KVMUF-EXIT 137\r"), Some(137));
        assert_eq!(exit_status_in("KVMUF-EXIT x"), None);
        assert_eq!(exit_status_in("exit 0"), None);
    }

    #[test]
    fn skip_lines_say_what_is_missing() {
        for (line, want) in [
            (
                "[SKIP] collapse: transparent hugepages are not available",
                Some(Skip::Feature),
            ),
            ("SKIP: /dev/kvm not available", Some(Skip::Feature)),
            ("  SKIP: userfaultfd unavailable here", Some(Skip::Feature)),
            (
                "[SKIP] userfault::bad_input_vm_types (EOPNOTSUPP part): every creatable VM \
                 type supports userfault here",
                Some(Skip::Feature),
            ),
            (
                "[SKIP series] userfault::capability: kernel lacks the KVM userfault series",
                Some(Skip::Series),
            ),
            ("\r[SKIP series] x: y", Some(Skip::Series)),
            // Skip lines written before the series had its own prefix.
            (
                "[SKIP] one: KVM_CAP_USERFAULT (252) is not supported",
                Some(Skip::Series),
            ),
            (
                "SKIP: kernel lacks the KVM userfault series (KVM_CAP_USERFAULT); build it \
                 with `cargo xtask kernel`",
                Some(Skip::Series),
            ),
            ("test capability ... ok", None),
            ("a line saying [SKIP] in the middle", None),
            ("SKIPPED: not a skip line", None),
        ] {
            assert_eq!(skip_in(line), want, "{line}");
        }
    }

    #[test]
    fn names_shared_with_the_tests_match() {
        // The tests (kvm-testvm, which xtask does not link) spell the same names; a rename on
        // one side only would make the guest's series skips pass unnoticed.
        let caps = include_str!("../../userspace/testvm/src/caps.rs");
        for decl in [
            format!("pub const REQUIRE_SERIES_ENV: &str = \"{REQUIRE_SERIES_ENV}\";"),
            format!("pub const SERIES_SKIP_PREFIX: &str = \"{SERIES_SKIP_PREFIX}\";"),
        ] {
            assert!(caps.contains(&decl), "caps.rs lacks `{decl}`");
        }
    }

    #[test]
    fn libtest_lines_parse() {
        let c = libtest_result_in(
            "test result: FAILED. 3 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.10s",
        )
        .unwrap();
        assert_eq!(
            c,
            Counts {
                passed: 3,
                failed: 2,
                ignored: 1,
                skipped: 0
            }
        );
        assert!(libtest_result_in("running 3 tests").is_none());
        let mut sum = c;
        sum.add(c);
        assert_eq!(sum.failed, 4);
    }
}
