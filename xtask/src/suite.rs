//! `cargo xtask test`: the whole suite — lint, host tests, the series' per-patch checks, the
//! harness's own checks, then every workspace test binary (with `--ignored`) and the kvm C
//! selftests inside the patched kernel — ending with one summary line in cargo's format.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::console::{self, Counts};
use crate::host;
use crate::initramfs::{self, sh_quote, GuestFile};
use crate::kernel::{self, BuiltKernel, Flavour, SourceChoice};
use crate::layout::Layout;
use crate::qemu::{self, Accel, VmConfig};
use crate::series_check;

/// The Rust target the in-guest binaries are built for (static glibc).
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Debug, Clone)]
pub struct TestOptions {
    pub source: SourceChoice,
    pub flavour: Flavour,
    pub skip_lint: bool,
    pub skip_host: bool,
    pub skip_series_check: bool,
    pub skip_harness_check: bool,
    pub smp: u32,
    pub mem: String,
    pub timeout: Duration,
}

/// One line of the summary.
struct SuiteResult {
    name: &'static str,
    counts: Counts,
    note: String,
}

pub fn run(layout: &Layout, opts: &TestOptions) -> Result<()> {
    let started = Instant::now();
    let mut results: Vec<SuiteResult> = Vec::new();

    if !opts.skip_lint {
        results.push(lint(layout));
    }
    if !opts.skip_host {
        results.push(host_tests(layout));
    }

    let kernel = (|| -> Result<BuiltKernel> {
        let series = kernel::load_series(layout)?;
        if !opts.skip_series_check && !series.is_empty() && !opts.source.no_apply {
            let src = kernel::prepare_source(layout, &opts.source)?;
            let build =
                kernel::build_dir_for(layout, &src, opts.source.kernel_src.is_none(), opts.flavour);
            let branch = opts
                .source
                .kernel_src
                .is_none()
                .then_some(kernel::SERIES_BRANCH);
            let counts = series_check::check(layout, &src, &build, opts.flavour, &series, branch)?;
            results.push(SuiteResult {
                name: "series",
                counts,
                note: format!("{} patches: checkpatch --strict, each builds", series.len()),
            });
        }
        kernel::build(layout, &opts.source, opts.flavour)
    })();
    let kernel = match kernel {
        Ok(k) => k,
        Err(e) => {
            eprintln!("[test] kernel: {e:#}");
            results.push(failed("kernel", format!("{e:#}")));
            return finish(&results, started);
        }
    };

    if !opts.skip_harness_check {
        results.push(harness_check(layout, &kernel));
    }
    match guest_suites(layout, &kernel, opts) {
        Ok(guest) => results.extend(guest),
        Err(e) => {
            eprintln!("[test] guest: {e:#}");
            results.push(failed("guest", format!("{e:#}")));
        }
    }
    finish(&results, started)
}

fn failed(name: &'static str, note: String) -> SuiteResult {
    SuiteResult {
        name,
        counts: Counts {
            failed: 1,
            ..Counts::default()
        },
        note,
    }
}

fn finish(results: &[SuiteResult], started: Instant) -> Result<()> {
    let mut total = Counts::default();
    println!("\n== summary ==");
    for r in results {
        total.add(r.counts);
        let mut line = format!(
            "{:<11} {:>4} passed, {:>3} failed",
            r.name, r.counts.passed, r.counts.failed
        );
        if r.counts.ignored > 0 {
            let _ = write!(line, ", {} ignored", r.counts.ignored);
        }
        if r.counts.skipped > 0 {
            let _ = write!(line, ", {} skipped", r.counts.skipped);
        }
        if !r.note.is_empty() {
            let note = r.note.lines().next().unwrap_or_default();
            let _ = write!(line, "  ({note})");
        }
        println!("{line}");
    }
    let verdict = if total.failed == 0 { "ok" } else { "FAILED" };
    println!(
        "test result: {verdict}. {} passed; {} failed; {} ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        total.passed,
        total.failed,
        total.ignored,
        started.elapsed().as_secs_f64()
    );
    if total.failed > 0 {
        bail!("{} test(s) failed", total.failed);
    }
    Ok(())
}

fn cargo(layout: &Layout) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&layout.repo);
    cmd
}

fn lint(layout: &Layout) -> SuiteResult {
    let mut counts = Counts::default();
    let mut notes = Vec::new();
    let checks: [(&str, &[&str]); 2] = [
        ("cargo fmt --check", &["fmt", "--all", "--check"]),
        (
            "cargo clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--quiet",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    for (name, args) in checks {
        eprintln!("[test] {name}");
        match host::run(cargo(layout).args(args)) {
            Ok(()) => counts.passed += 1,
            Err(e) => {
                counts.failed += 1;
                notes.push(format!("{name}: {e:#}"));
            }
        }
    }
    SuiteResult {
        name: "lint",
        counts,
        note: notes.join("; "),
    }
}

/// Runs a command, echoing its output, and sums the libtest result lines it prints.
fn run_counting(cmd: &mut Command) -> Result<(Counts, bool)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let mut counts = Counts::default();
    for line in BufReader::new(child.stdout.take().context("stdout")?)
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        if let Some(c) = console::libtest_result_in(&line) {
            counts.add(c);
        }
    }
    Ok((counts, child.wait()?.success()))
}

fn host_tests(layout: &Layout) -> SuiteResult {
    eprintln!("[test] host: cargo test --workspace");
    match run_counting(cargo(layout).args(["test", "--workspace"])) {
        Ok((mut counts, ok)) => {
            if !ok && counts.failed == 0 {
                counts.failed = 1;
            }
            SuiteResult {
                name: "host",
                counts,
                note: String::new(),
            }
        }
        Err(e) => failed("host", format!("{e:#}")),
    }
}

/// The harness proves it catches what it claims to catch: a failing command, a kernel panic
/// and a hang each fail the run.
fn harness_check(layout: &Layout, kernel: &BuiltKernel) -> SuiteResult {
    let mut counts = Counts::default();
    let mut notes = Vec::new();
    type Check = fn(&qemu::VmOutcome) -> bool;
    let cases: [(&str, &str, u64, Check); 4] = [
        ("a passing command passes", "true", 120, |o| o.success()),
        (
            "a failing command fails",
            "echo failing on purpose; exit 3",
            120,
            |o| !o.success() && o.exit_status == Some(3),
        ),
        (
            "a kernel panic fails, with the panic reported",
            "echo c > /proc/sysrq-trigger",
            120,
            |o| !o.success() && o.problems.iter().any(|p| p.contains("Kernel panic")),
        ),
        ("a hang is killed at the timeout", "sleep 100000", 25, |o| {
            !o.success() && o.timed_out
        }),
    ];
    for (name, script, timeout, check) in cases {
        let outcome = boot(
            layout,
            kernel,
            &BootSpec {
                tag: "harness",
                script,
                files: &[],
                extra_cmdline: &[],
                accel: Accel::Tcg,
                smp: 1,
                mem: "512M",
                timeout: Duration::from_secs(timeout),
                echo: false,
            },
        );
        match outcome {
            Ok(o) if check(&o) => {
                eprintln!("[harness] ok: {name} ({:.1?})", o.elapsed);
                counts.passed += 1;
            }
            Ok(o) => {
                eprintln!("[harness] FAILED: {name}\n{}", o.failure_report());
                counts.failed += 1;
                notes.push(name.to_string());
            }
            Err(e) => {
                counts.failed += 1;
                notes.push(format!("{name}: {e:#}"));
            }
        }
    }
    SuiteResult {
        name: "harness",
        counts,
        note: notes.join("; "),
    }
}

/// One boot: what the guest runs and on what.
pub struct BootSpec<'a> {
    /// Names the scratch directory under the run directory.
    pub tag: &'a str,
    /// The shell script /init runs.
    pub script: &'a str,
    /// Host files placed in the guest.
    pub files: &'a [GuestFile],
    /// Kernel parameters after the loop's own; each passed `qemu::check_kernel_param`.
    pub extra_cmdline: &'a [String],
    pub accel: Accel,
    pub smp: u32,
    pub mem: &'a str,
    pub timeout: Duration,
    /// Print console lines as they arrive.
    pub echo: bool,
}

/// Builds an initramfs with the spec's files and script, boots it, returns the outcome.
pub fn boot(layout: &Layout, kernel: &BuiltKernel, spec: &BootSpec) -> Result<qemu::VmOutcome> {
    host::ensure(host::Tools::Vm)?;
    let (staging, initrd, log) = qemu::scratch(&layout.run_dir(), spec.tag)?;
    initramfs::build(&initrd, &staging, spec.script, spec.files)?;
    let outcome = qemu::run(&VmConfig {
        accel: spec.accel,
        bzimage: kernel.bzimage(),
        initrd: initrd.clone(),
        smp: spec.smp,
        mem: spec.mem.to_string(),
        timeout: spec.timeout,
        log: log.clone(),
        echo: spec.echo,
        extra_cmdline: spec.extra_cmdline.to_vec(),
    });
    // Keep only the console log; the staging tree and archive are large.
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_file(&initrd);
    outcome
}

/// Builds every workspace test binary (but xtask's) statically for the guest.
pub fn build_guest_test_binaries(layout: &Layout) -> Result<Vec<(String, PathBuf)>> {
    eprintln!("[test] building static test binaries for the guest");
    let out = cargo(layout)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "xtask",
            "--no-run",
            "--target",
            GUEST_TARGET,
        ])
        .args(["--message-format", "json-render-diagnostics"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the guest test binaries failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(bin) = test_executable_in(line) {
            bins.push(bin);
        }
    }
    if bins.is_empty() {
        bail!("cargo built no test binaries");
    }
    Ok(bins)
}

/// `(target name-kind, executable)` from one cargo JSON message, if it is a test executable.
pub fn test_executable_in(json_line: &str) -> Option<(String, PathBuf)> {
    let msg: serde_json::Value = serde_json::from_str(json_line).ok()?;
    if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
        return None;
    }
    let exe = msg["executable"].as_str()?;
    let name = msg["target"]["name"].as_str()?;
    let kind = msg["target"]["kind"][0].as_str().unwrap_or("test");
    // package_id: "path+file:///…/selftests#kvm-selftests@0.1.0" (or "name 0.1.0 (…)" before
    // cargo 1.77): targets of different packages may share a name.
    let id = msg["package_id"].as_str().unwrap_or_default();
    let package = match id.split_once('#') {
        Some((_, rest)) => rest.split('@').next().unwrap_or(rest),
        None => id.split_whitespace().next().unwrap_or_default(),
    };
    Some((format!("{package}.{name}-{kind}"), PathBuf::from(exe)))
}

fn guest_suites(
    layout: &Layout,
    kernel: &BuiltKernel,
    opts: &TestOptions,
) -> Result<Vec<SuiteResult>> {
    let rust_bins = build_guest_test_binaries(layout)?;
    let c_runs = kernel::c_selftest_list(layout)?;
    let mut c_names: Vec<String> = c_runs.iter().map(|r| r.binary.clone()).collect();
    c_names.sort();
    c_names.dedup();
    eprintln!("[test] building {} kvm selftests statically", c_names.len());
    let c_bins = kernel::build_c_selftests(kernel, &c_names)?;
    let mut groups = group_by_cmdline(&c_runs);
    // The runs without extra parameters share the main boot with the Rust binaries.
    let main_runs = match groups.first() {
        Some((cmdline, _)) if cmdline.is_empty() => groups.remove(0).1,
        _ => Vec::new(),
    };

    let mut files = c_files(&c_bins, &main_runs);
    let mut script = script_start();
    for (name, host_path) in &rust_bins {
        files.push(GuestFile {
            host: host_path.clone(),
            guest: format!("/tests/rust/{name}"),
        });
        push_rust_run(&mut script, name, name, &[]);
    }
    push_c_runs(&mut script, &main_runs);
    script.push_str(SCRIPT_END);
    eprintln!(
        "[test] booting the patched kernel: {} Rust test binaries, {} C selftest runs",
        rust_bins.len(),
        main_runs.len()
    );
    let outcome = boot(
        layout,
        kernel,
        &BootSpec {
            tag: "suite",
            script: &script,
            files: &files,
            extra_cmdline: &[],
            accel: Accel::Tcg,
            smp: opts.smp,
            mem: &opts.mem,
            timeout: opts.timeout,
            echo: true,
        },
    )?;
    if let Some(t) = outcome.boot_time {
        eprintln!(
            "[test] guest booted in {t:.1?}, ran for {:.1?}",
            outcome.elapsed
        );
    }
    let (rust, c) = tally(&outcome.console);
    let mut rust = SuiteResult {
        name: "guest-rust",
        counts: rust,
        note: String::new(),
    };
    let mut c = SuiteResult {
        name: "guest-c",
        counts: c,
        note: String::new(),
    };
    if !outcome.success() {
        if let Some(why) = report_failed_boot(&outcome) {
            c.counts.failed += 1;
            c.note = why;
        }
        if rust.counts.failed + c.counts.failed == 0 {
            rust.counts.failed += 1;
            rust.note = "the guest run failed without a failing test".into();
        }
    }

    // Runs needing kernel parameters: one boot per distinct set, C runs only, tallied into the
    // same guest-c counts. A boot that cannot even start is one failure: the results of the
    // boots before it still stand. If the main boot never got as far as /init, these would
    // not either: each is one failure then, without waiting out its timeout.
    let main_booted = outcome.boot_time.is_some();
    for (i, (cmdline, runs)) in groups.iter().enumerate() {
        let params = cmdline.join(" ");
        let outcome = if main_booted {
            let mut script = script_start();
            let mut files = c_files(&c_bins, runs);
            // The C runs first: a hang of the fuzzer or the stress (what they hunt for) must
            // not keep the required C runs of this boot from running.
            push_c_runs(&mut script, runs);
            for (name, filter) in RUST_IN_EVERY_BOOT {
                let Some((_, host_path)) = rust_bins.iter().find(|(n, _)| n == name) else {
                    bail!("{name}, which runs in every boot (RUST_IN_EVERY_BOOT), was not built");
                };
                files.push(GuestFile {
                    host: host_path.clone(),
                    guest: format!("/tests/rust/{name}"),
                });
                let label = format!("[{params}] {name}");
                let args: Vec<&str> = if filter.is_empty() {
                    Vec::new()
                } else {
                    vec!["--exact", filter]
                };
                push_rust_run(&mut script, &label, name, &args);
            }
            script.push_str(SCRIPT_END);
            eprintln!(
                "[test] booting the patched kernel with `{params}`: {} C selftest runs",
                runs.len()
            );
            boot(
                layout,
                kernel,
                &BootSpec {
                    tag: &format!("suite-cmdline{}", i + 1),
                    script: &script,
                    files: &files,
                    extra_cmdline: cmdline,
                    accel: Accel::Tcg,
                    smp: opts.smp,
                    mem: &opts.mem,
                    timeout: opts.timeout,
                    echo: true,
                },
            )
            .map_err(|e| format!("{e:#}"))
        } else {
            Err(format!(
                "not booted: the main boot never reached {}",
                console::BOOTED_MARKER
            ))
        };
        match &outcome {
            Ok(o) => {
                if let Some(t) = o.boot_time {
                    eprintln!(
                        "[test] guest ({params}) booted in {t:.1?}, ran for {:.1?}",
                        o.elapsed
                    );
                }
            }
            Err(e) => eprintln!("[test] guest ({params}): {e}"),
        }
        let (rust_counts, counts, why) = judge_extra_boot(outcome.as_ref().map_err(String::as_str));
        rust.counts.add(rust_counts);
        c.counts.add(counts);
        if let Some(why) = why {
            c.counts.failed += 1;
            if !c.note.is_empty() {
                c.note.push_str("; ");
            }
            let _ = write!(c.note, "[{params}] {why}");
        }
    }
    Ok(vec![rust, c])
}

/// The start of every in-guest suite script. Huge pages for the hugetlbfs-backed runs
/// (128 MiB of the guest's memory). `KVMUF_REQUIRE_SERIES=1`: this kernel has the series, so
/// a Rust test that finds it missing fails instead of skipping (whatever `KVMUF_ALLOW_SKIP`
/// says), and so does one that finds no /dev/kvm.
fn script_start() -> String {
    format!(
        "failed=0\necho 64 > /proc/sys/vm/nr_hugepages\nexport {}=1\n",
        console::REQUIRE_SERIES_ENV
    )
}

/// The end: a kmemleak scan where the kernel has kmemleak (the debug flavour), whose
/// "new suspected memory leaks" line fails the run like any other kernel report, with the
/// leaks listed; then the status says whether any test failed. kmemleak reports only objects
/// older than 5 s, so the leaks of the last few seconds' tests are not seen.
const SCRIPT_END: &str = "if [ -w /sys/kernel/debug/kmemleak ]; then \
echo scan > /sys/kernel/debug/kmemleak; head -c 20000 /sys/kernel/debug/kmemleak; fi\n\
exit $failed\n";

/// The C runs grouped by their extra kernel parameters (the same words in the same order), each
/// group in the order of the list; the group without parameters first, if there is one, then
/// the others in the order of their first run.
fn group_by_cmdline(runs: &[kernel::CTestRun]) -> Vec<(Vec<String>, Vec<&kernel::CTestRun>)> {
    let mut groups: Vec<(Vec<String>, Vec<&kernel::CTestRun>)> = Vec::new();
    for run in runs {
        match groups
            .iter_mut()
            .find(|(cmdline, _)| *cmdline == run.cmdline)
        {
            Some((_, members)) => members.push(run),
            None => groups.push((run.cmdline.clone(), vec![run])),
        }
    }
    // Runs without parameters first: they go in the main boot.
    groups.sort_by_key(|(cmdline, _)| !cmdline.is_empty());
    groups
}

/// The built selftest binaries `runs` use, placed where `push_c_runs` runs them.
fn c_files(c_bins: &[(String, PathBuf)], runs: &[&kernel::CTestRun]) -> Vec<GuestFile> {
    c_bins
        .iter()
        .filter(|(name, _)| runs.iter().any(|r| r.binary == *name))
        .map(|(name, host_path)| GuestFile {
            host: host_path.clone(),
            guest: format!("/tests/kvm/{name}"),
        })
        .collect()
}

/// Appends one script line per C run: begin marker, the run, end marker with its status
/// (what `tally` reads); a failure sets `failed`.
fn push_c_runs(script: &mut String, runs: &[&kernel::CTestRun]) {
    for run in runs {
        let label = run.label();
        let command: Vec<String> = std::iter::once(format!("/tests/kvm/{}", run.binary))
            .chain(run.args.iter().cloned())
            .map(|w| sh_quote(&w))
            .collect();
        // KSFT_SKIP (4) is a skip, not a failure, except for the series' own tests: a skip
        // there means the series is missing something it claims.
        let (kind, required) = if run.required {
            (
                "c!",
                "[ $rc = 4 ] && echo 'required test skipped: counted as a failure' && rc=1; ",
            )
        } else {
            ("c", "")
        };
        let _ = writeln!(
            script,
            "echo '{b}{kind} {label}'; {cmd}; rc=$?; {required}echo '{e}{kind} {label}' rc=$rc; [ $rc = 0 ] || [ $rc = 4 ] || failed=1",
            b = console::TEST_BEGIN,
            e = console::TEST_END,
            cmd = command.join(" "),
        );
    }
}

/// One boot with kernel parameters (C runs only), or why it did not run: the C counts its
/// console shows, and why the boot itself failed, if it did — one more failure on top of the
/// counts. A boot that did not run or start, a timeout, a kernel problem report, or a failed
/// run without a failing test each give one; a test that fails inside a boot that otherwise
/// went well is only its own failure.
fn judge_extra_boot(outcome: Result<&qemu::VmOutcome, &str>) -> (Counts, Counts, Option<String>) {
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => return (Counts::default(), Counts::default(), Some(e.to_string())),
    };
    let (rust, counts) = tally(&outcome.console);
    if outcome.success() {
        return (rust, counts, None);
    }
    // The main boot charges a silent failure to the Rust suite; this one to the C suite.
    let why = report_failed_boot(outcome).or_else(|| {
        (counts.failed + rust.failed == 0)
            .then(|| "the guest run failed without a failing test".into())
    });
    (rust, counts, why)
}

/// Rust tests (binary, exact test name or "" for all its `--ignored` tests) that also run in
/// every boot with extra kernel parameters (shadow paging): the fuzzer and the teardown stress
/// go through every access path, and KVM's own page-table walker only runs there.
const RUST_IN_EVERY_BOOT: &[(&str, &str)] = &[
    ("kvm-selftests.userfault_fuzz-test", "fuzz_userfault_uapi"),
    ("kvm-selftests.userfault_teardown-test", ""),
];

/// Appends the script line of one Rust test binary run (`/tests/rust/{name} --ignored
/// {args}`), between begin and end markers labelled `label`; a failure sets `failed`.
fn push_rust_run(script: &mut String, label: &str, name: &str, args: &[&str]) {
    let command: Vec<String> = std::iter::once(format!("/tests/rust/{name}"))
        .chain(std::iter::once("--ignored".to_string()))
        .chain(args.iter().map(|a| a.to_string()))
        .map(|w| sh_quote(&w))
        .collect();
    let _ = writeln!(
        script,
        "echo '{b}rust {label}'; {cmd}; rc=$?; echo '{e}rust {label}' rc=$rc; [ $rc = 0 ] || failed=1",
        b = console::TEST_BEGIN,
        e = console::TEST_END,
        cmd = command.join(" "),
    );
}

/// Prints why a boot failed. Returns the report's first line when the failure is the kernel's
/// or the harness's (a problem report, the timeout, no exit status): a failure of its own,
/// whatever the tests said.
fn report_failed_boot(outcome: &qemu::VmOutcome) -> Option<String> {
    let report = outcome.failure_report();
    eprintln!("{report}");
    (!outcome.problems.is_empty() || outcome.timed_out || outcome.exit_status.is_none())
        .then(|| report.lines().next().unwrap_or_default().to_string())
}

/// Sums results per language from the console: libtest lines for Rust binaries (a binary that
/// dies without one counts as one failure), the exit status for C selftests.
fn tally(console_lines: &[String]) -> (Counts, Counts) {
    let mut rust = Counts::default();
    let mut c = Counts::default();
    let mut current_rust_counts: Option<Counts> = None;
    // Within a Rust binary: how many of its tests printed a series skip line.
    let mut series_skips = 0u64;
    // Within a required C run: whether one of its cases printed a kselftest skip.
    let mut required_c_skipped: Option<bool> = None;
    for line in console_lines {
        if let Some(rest) = line.split(console::TEST_BEGIN).nth(1) {
            current_rust_counts = rest.starts_with("rust ").then(Counts::default);
            series_skips = 0;
            required_c_skipped = rest.starts_with("c! ").then_some(false);
            continue;
        }
        // kselftest's "ok N name # SKIP why": a required run must not skip any case, even
        // when it exits 0 (ksft_finished() counts skips as passes).
        if let Some(skipped) = required_c_skipped.as_mut() {
            if line.contains("# SKIP") {
                *skipped = true;
            }
        }
        if let Some(counts) = current_rust_counts.as_mut() {
            if let Some(found) = console::libtest_result_in(line) {
                counts.add(found);
            }
            // A test that finds its feature missing prints a skip line and returns: libtest
            // calls that a pass, the summary calls it a skip, or a failure if what is missing
            // is the series this kernel has (as for the required C runs).
            match console::skip_in(line) {
                Some(console::Skip::Feature) => counts.skipped += 1,
                Some(console::Skip::Series) => series_skips += 1,
                None => {}
            }
        }
        let Some(rest) = line.split(console::TEST_END).nth(1) else {
            continue;
        };
        let rc: Option<i32> = rest
            .rsplit("rc=")
            .next()
            .and_then(|r| r.trim().parse().ok());
        if rest.starts_with("rust ") {
            let mut counts = current_rust_counts.take().unwrap_or_default();
            // Each skip line was a libtest pass; a series skip is a failure even when the
            // binary exits 0.
            counts.passed -= series_skips.min(counts.passed);
            counts.failed += series_skips;
            let moved = counts.skipped.min(counts.passed);
            counts.passed -= moved;
            counts.skipped = moved;
            if rc != Some(0) && counts.failed == 0 {
                counts.failed = 1;
            }
            rust.add(counts);
        } else if rest.starts_with("c ") || rest.starts_with("c! ") {
            let skipped_case = required_c_skipped.take().unwrap_or(false);
            match rc {
                Some(0) if skipped_case => c.failed += 1,
                Some(0) => c.passed += 1,
                Some(4) => c.skipped += 1,
                _ => c.failed += 1,
            }
        }
    }
    (rust, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn tally_counts_rust_and_c() {
        let lines: Vec<String> = [
            "KVMUF-TEST-BEGIN rust a-test",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out",
            "KVMUF-TEST-END rust a-test rc=0",
            "KVMUF-TEST-BEGIN rust s-test",
            "[SKIP] one: transparent hugepages are not available",
            "SKIP: no /dev/kvm",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "KVMUF-TEST-END rust s-test rc=0",
            "KVMUF-TEST-BEGIN rust b-test",
            "thread panicked",
            "KVMUF-TEST-END rust b-test rc=101",
            "KVMUF-TEST-BEGIN c guest_memfd_test",
            "KVMUF-TEST-END c guest_memfd_test rc=0",
            "KVMUF-TEST-BEGIN c x86/private_mem_kvm_exits_test",
            "KVMUF-TEST-END c x86/private_mem_kvm_exits_test rc=4",
            "KVMUF-TEST-BEGIN c demand_paging_test",
            "KVMUF-TEST-END c demand_paging_test rc=254",
            "KVMUF-TEST-BEGIN c! x86/userfault_hugepage_test",
            "ok 1 per_page/thp/resolve",
            "ok 2 per_page/hugetlb/resolve # SKIP no hugetlb pages",
            "KVMUF-TEST-END c! x86/userfault_hugepage_test rc=0",
            "KVMUF-TEST-BEGIN c! x86/userfault_test",
            "ok 1 # SKIP is fine in a run that is not required, not here",
            "required test skipped: counted as a failure",
            "KVMUF-TEST-END c! x86/userfault_test rc=1",
            "KVMUF-TEST-BEGIN c! x86/userfault_access_test",
            "ok 1 a kvmclock_nofd",
            "KVMUF-TEST-END c! x86/userfault_access_test rc=0",
            "KVMUF-TEST-BEGIN c x86/other_test",
            "ok 1 thing # SKIP not required",
            "KVMUF-TEST-END c x86/other_test rc=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (rust, c) = tally(&lines);
        assert_eq!(
            rust,
            Counts {
                passed: 3,
                failed: 1,
                ignored: 0,
                skipped: 2
            }
        );
        assert_eq!(
            c,
            Counts {
                passed: 3,
                failed: 3,
                ignored: 0,
                skipped: 1
            }
        );
    }

    #[test]
    fn rust_series_skips_are_failures() {
        let lines: Vec<String> = [
            "KVMUF-TEST-BEGIN rust kvm-selftests.userfault-test",
            "running 4 tests",
            "[SKIP series] userfault::capability: kernel lacks the KVM userfault series",
            "test capability ... ok",
            "[SKIP] userfault::one_stage2_fault_per_page: KVM does not use EPT/NPT here",
            "test one_stage2_fault_per_page ... ok",
            // Printed by a harness test through the runtime's error, without the prefix.
            "SKIP: kernel lacks the KVM userfault series (KVM_CAP_USERFAULT); build it with \
             `cargo xtask kernel`",
            "test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            // The binary exited 0: libtest saw four passes.
            "KVMUF-TEST-END rust kvm-selftests.userfault-test rc=0",
            // Counting restarts with the next binary.
            "KVMUF-TEST-BEGIN rust kvm-selftests.framework-test",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "KVMUF-TEST-END rust kvm-selftests.framework-test rc=0",
            // A series test that failed (KVMUF_REQUIRE_SERIES) is one failure, not two.
            "KVMUF-TEST-BEGIN rust kvm-userfault-harness.demand_paging-test",
            "thread 'kvm_sync' panicked at tests/demand_paging.rs:150:5:",
            "kvm_sync: kernel lacks the KVM userfault series, but KVMUF_REQUIRE_SERIES is set",
            "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            "KVMUF-TEST-END rust kvm-userfault-harness.demand_paging-test rc=101",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (rust, c) = tally(&lines);
        assert_eq!(
            rust,
            Counts {
                passed: 2,
                failed: 3,
                ignored: 0,
                skipped: 1
            }
        );
        assert_eq!(c, Counts::default());
        // The script the guest runs promises the series to the tests.
        let start = script_start();
        assert!(
            start.lines().any(|l| l == "export KVMUF_REQUIRE_SERIES=1"),
            "{start}"
        );
    }

    #[test]
    fn c_runs_group_by_kernel_params() {
        let runs: Vec<kernel::CTestRun> = [
            "@kvm_amd.npt=0 ! x86/userfault_test",
            "guest_memfd_test",
            "@a=1 t",
            "! x86/userfault_test",
            "@kvm_amd.npt=0 demand_paging_test -b 8M",
        ]
        .iter()
        .map(|l| kernel::CTestRun::parse(l).unwrap())
        .collect();
        let groups = group_by_cmdline(&runs);
        let shape: Vec<(Vec<String>, Vec<String>)> = groups
            .iter()
            .map(|(cmdline, runs)| (cmdline.clone(), runs.iter().map(|r| r.label()).collect()))
            .collect();
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shape,
            [
                (vec![], owned(&["guest_memfd_test", "x86/userfault_test"])),
                (
                    owned(&["kvm_amd.npt=0"]),
                    owned(&[
                        "[kvm_amd.npt=0] x86/userfault_test",
                        "[kvm_amd.npt=0] demand_paging_test -b 8M"
                    ])
                ),
                (owned(&["a=1"]), owned(&["[a=1] t"])),
            ]
        );
        let no_main = group_by_cmdline(&runs[2..3]);
        assert_eq!(no_main.len(), 1);
        assert_eq!(no_main[0].0, ["a=1"]);
    }

    #[test]
    fn c_run_script_lines_tally() {
        let run = kernel::CTestRun::parse("@kvm_amd.npt=0 ! x86/userfault_test -s").unwrap();
        let mut script = String::new();
        push_c_runs(&mut script, &[&run]);
        assert_eq!(
            script,
            "echo 'KVMUF-TEST-BEGIN c! [kvm_amd.npt=0] x86/userfault_test -s'; \
             /tests/kvm/x86/userfault_test -s; rc=$?; [ $rc = 4 ] && echo 'required test \
             skipped: counted as a failure' && rc=1; echo 'KVMUF-TEST-END c! [kvm_amd.npt=0] \
             x86/userfault_test -s' rc=$rc; [ $rc = 0 ] || [ $rc = 4 ] || failed=1\n"
        );
        let bins = [
            ("x86/userfault_test".to_string(), PathBuf::from("/b/u")),
            ("guest_memfd_test".to_string(), PathBuf::from("/b/g")),
        ];
        let files = c_files(&bins, &[&run]);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].guest, "/tests/kvm/x86/userfault_test");
        let console: Vec<String> = [
            "KVMUF-TEST-BEGIN c! [kvm_amd.npt=0] x86/userfault_test -s",
            "KVMUF-TEST-END c! [kvm_amd.npt=0] x86/userfault_test -s rc=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            tally(&console).1,
            Counts {
                passed: 1,
                ..Counts::default()
            }
        );
    }

    fn outcome(exit_status: Option<i32>, console: &[&str]) -> qemu::VmOutcome {
        qemu::VmOutcome {
            exit_status,
            problems: Vec::new(),
            timed_out: false,
            console: console.iter().map(|s| s.to_string()).collect(),
            log: "/r/console.log".into(),
            elapsed: Duration::from_secs(9),
            boot_time: Some(Duration::from_secs(3)),
        }
    }

    /// An extra boot's C counts and its own failure.
    fn judge_c(o: Result<&qemu::VmOutcome, &str>) -> (Counts, Option<String>) {
        let (_, c, why) = judge_extra_boot(o);
        (c, why)
    }

    #[test]
    fn extra_boots_count_their_rust_runs() {
        // A Rust run in an extra boot is tallied as Rust; its failure explains the exit status.
        let failing = outcome(
            Some(1),
            &[
                "KVMUF-TEST-BEGIN rust [kvm_amd.npt=0] kvm-selftests.userfault_fuzz-test",
                "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 1 filtered out",
                "KVMUF-TEST-END rust [kvm_amd.npt=0] kvm-selftests.userfault_fuzz-test rc=101",
                PASSING_RUN[0],
                PASSING_RUN[1],
            ],
        );
        let (rust, c, why) = judge_extra_boot(Ok(&failing));
        assert_eq!((rust.failed, rust.passed, c.passed, why), (1, 0, 1, None));
        let mut script = String::new();
        push_rust_run(&mut script, "[a=1] b-test", "b-test", &["--exact", "t"]);
        assert_eq!(
            script,
            "echo 'KVMUF-TEST-BEGIN rust [a=1] b-test'; /tests/rust/b-test --ignored --exact t; \
             rc=$?; echo 'KVMUF-TEST-END rust [a=1] b-test' rc=$rc; [ $rc = 0 ] || failed=1\n"
        );
    }

    /// The failures one extra boot adds to guest-c: its tests' and its own.
    fn failures((counts, why): (Counts, Option<String>)) -> u64 {
        counts.failed + u64::from(why.is_some())
    }

    const PASSING_RUN: [&str; 2] = [
        "KVMUF-TEST-BEGIN c [a=1] guest_memfd_test",
        "KVMUF-TEST-END c [a=1] guest_memfd_test rc=0",
    ];

    #[test]
    fn extra_boots_are_judged() {
        // It went well.
        let ok = outcome(Some(0), &PASSING_RUN);
        let (counts, why) = judge_c(Ok(&ok));
        assert_eq!((counts.passed, counts.failed, why), (1, 0, None));

        // It did not start (or was skipped): one failure, with the reason.
        let (counts, why) = judge_c(Err("cannot start qemu-system-x86_64"));
        assert_eq!(counts, Counts::default());
        assert_eq!(why.as_deref(), Some("cannot start qemu-system-x86_64"));

        // A timeout, even after its tests passed: one failure.
        let mut hung = outcome(None, &PASSING_RUN);
        hung.timed_out = true;
        let judged = judge_c(Ok(&hung));
        assert_eq!(judged.0.passed, 1);
        assert!(
            judged.1.as_deref().unwrap().contains("timed out after"),
            "{judged:?}"
        );
        assert_eq!(failures(judged), 1);

        // A kernel problem report, though every test passed and the script exited 0.
        let mut warned = outcome(Some(0), &PASSING_RUN);
        warned.problems = vec!["WARNING: CPU: 0 PID: 1 at mm/gup.c:1 x".into()];
        let judged = judge_c(Ok(&warned));
        assert!(
            judged
                .1
                .as_deref()
                .unwrap()
                .contains("the kernel reported: WARNING: "),
            "{judged:?}"
        );
        assert_eq!(failures(judged), 1);

        // A non-zero exit that no test accounts for.
        let judged = judge_c(Ok(&outcome(Some(1), &PASSING_RUN)));
        assert_eq!(
            judged.1.as_deref(),
            Some("the guest run failed without a failing test")
        );
        assert_eq!(failures(judged), 1);

        // A non-zero exit a failing test explains: that test's failure only.
        let failing = outcome(
            Some(1),
            &[
                "KVMUF-TEST-BEGIN c [a=1] demand_paging_test",
                "KVMUF-TEST-END c [a=1] demand_paging_test rc=254",
            ],
        );
        let judged = judge_c(Ok(&failing));
        assert_eq!((judged.0.failed, &judged.1), (1, &None));

        // A required run that skips a case (exit 0) or as a whole (rc 4, which the script turns
        // into 1): a failure, here as in the main boot.
        let skipped_case = outcome(
            Some(0),
            &[
                "KVMUF-TEST-BEGIN c! [kvm_amd.npt=0] x86/userfault_test",
                "ok 1 sync # SKIP no KVM_CAP_USERFAULT",
                "KVMUF-TEST-END c! [kvm_amd.npt=0] x86/userfault_test rc=0",
            ],
        );
        let judged = judge_c(Ok(&skipped_case));
        assert_eq!((judged.0.failed, judged.0.passed), (1, 0));
        assert_eq!(failures(judged), 1);
        let skipped_run = outcome(
            Some(1),
            &[
                "KVMUF-TEST-BEGIN c! [kvm_amd.npt=0] x86/userfault_test",
                "required test skipped: counted as a failure",
                "KVMUF-TEST-END c! [kvm_amd.npt=0] x86/userfault_test rc=1",
            ],
        );
        let judged = judge_c(Ok(&skipped_run));
        assert_eq!((judged.0.failed, &judged.1), (1, &None));
    }

    #[test]
    fn cargo_json_test_artifacts() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/selftests#kvm-selftests@0.1.0","target":{"kind":["test"],"crate_types":["bin"],"name":"userfault","src_path":"/s"},"profile":{"opt_level":"0","test":true},"executable":"/t/debug/deps/userfault-abc","fresh":true}"#;
        let (name, exe) = test_executable_in(line).unwrap();
        assert_eq!(name, "kvm-selftests.userfault-test");
        assert_eq!(exe, Path::new("/t/debug/deps/userfault-abc"));
        let lib = line.replace("\"kind\":[\"test\"]", "\"kind\":[\"lib\"]");
        assert_eq!(
            test_executable_in(&lib).unwrap().0,
            "kvm-selftests.userfault-lib"
        );
        let not_test = line.replace(
            "\"opt_level\":\"0\",\"test\":true",
            "\"opt_level\":\"0\",\"test\":false",
        );
        assert!(test_executable_in(&not_test).is_none());
        assert!(test_executable_in(r#"{"reason":"build-finished","success":true}"#).is_none());
    }
}
