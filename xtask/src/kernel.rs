//! The kernel under test: the pinned base (or a developer's own tree) with the series applied,
//! configured from tinyconfig plus our fragment, built out of tree in the cache.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::base::{self, BasePin};
use crate::host;
use crate::layout::Layout;
use crate::qemu;
use crate::series_check;

/// Which kernel configuration to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavour {
    /// The QEMU guest fragment only.
    Default,
    /// Plus lockdep, atomic-sleep and list debugging (`config/debug.config`).
    Debug,
}

impl Flavour {
    fn name(self) -> &'static str {
        match self {
            Flavour::Default => "default",
            Flavour::Debug => "debug",
        }
    }

    fn fragments(self) -> &'static [&'static str] {
        match self {
            Flavour::Default => &["qemu-guest.config"],
            Flavour::Debug => &["qemu-guest.config", "debug.config"],
        }
    }

    /// Symbols the flavour exists for, beyond [`REQUIRED_SYMBOLS`]: olddefconfig drops a
    /// symbol whose dependencies are unmet without a word (KASAN under tinyconfig's SLUB_TINY).
    fn required_symbols(self) -> &'static [&'static str] {
        match self {
            Flavour::Default => &[],
            Flavour::Debug => &[
                "PROVE_LOCKING",
                "DEBUG_ATOMIC_SLEEP",
                "KASAN",
                "KASAN_GENERIC",
                "DEBUG_KMEMLEAK",
                "FAILSLAB",
                "FAIL_PAGE_ALLOC",
                "FAULT_INJECTION_DEBUG_FS",
                "KVM_PROVE_MMU",
            ],
        }
    }
}

/// Where the kernel source comes from.
#[derive(Debug, Clone)]
pub struct SourceChoice {
    /// A developer's own kernel git tree instead of the pinned base.
    pub kernel_src: Option<PathBuf>,
    /// Build that tree as it is, without applying the series (for working on the series).
    pub no_apply: bool,
}

/// A configured, built kernel.
#[derive(Debug, Clone)]
pub struct BuiltKernel {
    pub src: PathBuf,
    pub build: PathBuf,
    /// A kernel image to boot instead of the build's own (`xtask vm --kernel-image`), e.g. a
    /// saved build of an earlier series to show that a new test fails on it.
    pub image: Option<PathBuf>,
}

impl BuiltKernel {
    pub fn bzimage(&self) -> PathBuf {
        self.image
            .clone()
            .unwrap_or_else(|| self.build.join("arch/x86/boot/bzImage"))
    }
}

/// One patch of the series, in order.
#[derive(Debug, Clone)]
pub struct Patch {
    pub path: PathBuf,
    pub subject: String,
}

/// The series as listed in `kernel-patches/series/series` (quilt style: one file a line, `#`
/// comments). No file means an empty series: the loop then runs on the unpatched base.
pub fn load_series(layout: &Layout) -> Result<Vec<Patch>> {
    let dir = layout.series_dir();
    let list = dir.join("series");
    let Ok(text) = fs::read_to_string(&list) else {
        return Ok(Vec::new());
    };
    let mut patches = Vec::new();
    for name in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = dir.join(name);
        let body = fs::read_to_string(&path)
            .with_context(|| format!("{} lists {name}, which cannot be read", list.display()))?;
        let subject = subject_of(&body)
            .with_context(|| format!("{name} has no `Subject:` header: not a format-patch file"))?;
        patches.push(Patch { path, subject });
    }
    Ok(patches)
}

/// The subject of a `git format-patch` mail, without the `[PATCH n/m]` prefix.
pub fn subject_of(mail: &str) -> Option<String> {
    let mut lines = mail.lines();
    let mut subject = lines.find_map(|l| l.strip_prefix("Subject: "))?.to_string();
    // RFC 2822 folding: continuation lines start with white space.
    for l in lines {
        if l.starts_with(' ') || l.starts_with('\t') {
            subject.push_str(l.trim_end());
        } else {
            break;
        }
    }
    let s = subject.trim();
    let s = match s.strip_prefix('[') {
        Some(rest) if s.starts_with("[PATCH") || s.starts_with("[RFC") => {
            rest.split_once(']').map_or(s, |(_, r)| r)
        }
        _ => s,
    };
    Some(s.trim().to_string())
}

fn hash_hex(parts: &[&[u8]]) -> String {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// The branch the series is applied on in the cached base tree.
pub const SERIES_BRANCH: &str = "series";

fn git(tree: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(tree).args([
        "-c",
        "user.name=kvm-userfault xtask",
        "-c",
        "user.email=xtask@invalid",
    ]);
    cmd
}

/// Returns the source tree to build, with the series applied as asked.
pub fn prepare_source(layout: &Layout, choice: &SourceChoice) -> Result<PathBuf> {
    let series = load_series(layout)?;
    match &choice.kernel_src {
        None => {
            let pin = BasePin::load(layout)?;
            let tree = base::ensure_base_tree(layout, &pin)?;
            series_check::recover_interrupted(&tree, Some(SERIES_BRANCH))?;
            apply_to_base(&tree, &series)?;
            Ok(tree)
        }
        Some(dir) => {
            let tree = dir
                .canonicalize()
                .with_context(|| format!("--kernel-src {}", dir.display()))?;
            if !tree.join("Makefile").exists() || !tree.join("virt/kvm").exists() {
                bail!("--kernel-src {}: not a Linux source tree", tree.display());
            }
            series_check::recover_interrupted(&tree, None)?;
            if !choice.no_apply {
                apply_to_external(&tree, &series)?;
            }
            Ok(tree)
        }
    }
}

/// Applies the series to the cached base tree on branch `series`, unless exactly this series is
/// already applied there (keeping file times, so a warm rebuild stays warm).
fn apply_to_base(tree: &Path, series: &[Patch]) -> Result<()> {
    let contents: Vec<Vec<u8>> = series
        .iter()
        .map(|p| fs::read(&p.path))
        .collect::<std::io::Result<_>>()?;
    let parts: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    let key = hash_hex(&parts);
    let stamp = tree.join(".git/kvmuf-series-applied");
    let clean = host::output(git(tree).args(["status", "--porcelain", "--untracked-files=no"]))?
        .trim()
        .is_empty();
    if clean && fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) {
        return Ok(());
    }
    let _ = fs::remove_file(&stamp);
    host::run_quiet(git(tree).args(["checkout", "-q", "-f", "-B", SERIES_BRANCH, "base"]))?;
    git_am(tree, series)?;
    fs::write(&stamp, &key)?;
    if !series.is_empty() {
        eprintln!("[kernel] applied {} patches to the base", series.len());
    }
    Ok(())
}

/// Applies the series on top of a developer's tree, unless its last commits already are the
/// series (same subjects in the same order).
fn apply_to_external(tree: &Path, series: &[Patch]) -> Result<()> {
    if series.is_empty() {
        return Ok(());
    }
    let log = host::output(git(tree).args(["log", "--format=%s", &format!("-{}", series.len())]))?;
    let mut recent: Vec<&str> = log.lines().collect();
    recent.reverse();
    let wanted: Vec<&str> = series.iter().map(|p| p.subject.as_str()).collect();
    if recent == wanted {
        eprintln!("[kernel] {} already carries the series", tree.display());
        return Ok(());
    }
    git_am(tree, series)
}

fn git_am(tree: &Path, series: &[Patch]) -> Result<()> {
    if series.is_empty() {
        return Ok(());
    }
    let out = git(tree)
        .args(["am", "-q", "--3way"])
        .args(series.iter().map(|p| &p.path))
        .output()
        .context("cannot run git am")?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = git(tree).args(["am", "--abort"]).output();
    let (patch, file) = describe_am_failure(&text, series);
    bail!(
        "patch {} does not apply to {}{}\n{}",
        patch,
        tree.display(),
        file.map(|f| format!(" (at {f})")).unwrap_or_default(),
        host::tail(&text, 15)
    )
}

/// Names the failing patch file and source file from `git am` output.
pub fn describe_am_failure(text: &str, series: &[Patch]) -> (String, Option<String>) {
    let failed_subject = text
        .lines()
        .find_map(|l| l.split_once("Patch failed at ").map(|(_, r)| r.to_string()));
    let patch = failed_subject
        .as_ref()
        .and_then(|s| {
            // "0003 KVM: x86: subject" -> match the subject.
            let subject = s.split_once(' ').map_or(s.as_str(), |(_, r)| r);
            series.iter().find(|p| p.subject == subject)
        })
        .map(|p| {
            p.path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .or(failed_subject)
        .unwrap_or_else(|| "(unknown)".to_string());
    let file = text.lines().find_map(|l| {
        let rest = l.strip_prefix("error: patch failed: ").or_else(|| {
            l.strip_prefix("error: ")
                .filter(|r| r.ends_with("does not exist in index"))
        })?;
        Some(
            rest.trim_end_matches(": does not exist in index")
                .to_string(),
        )
    });
    (patch, file)
}

/// The build directory for a source tree and flavour: the base tree's builds are named by
/// flavour; other trees get their own, keyed by path.
pub fn build_dir_for(layout: &Layout, src: &Path, base_tree: bool, flavour: Flavour) -> PathBuf {
    if base_tree {
        layout.build_dir(flavour.name())
    } else {
        let key = hash_hex(&[src.as_os_str().as_encoded_bytes()]);
        layout.build_dir(&format!("tree-{}-{}", &key[..8], flavour.name()))
    }
}

/// Symbols the loop relies on; a fragment that no longer yields them is a clear error.
const REQUIRED_SYMBOLS: &[&str] = &[
    "KVM",
    "KVM_AMD",
    "KVM_INTEL",
    "KVM_GUEST_MEMFD",
    "IO_URING",
    "USERFAULTFD",
    "ACPI",
    "BLK_DEV_INITRD",
    "SERIAL_8250_CONSOLE",
    "DEVTMPFS",
    "MAGIC_SYSRQ",
];

/// Configures (when the fragments changed) and builds bzImage and the uAPI headers.
pub fn build(layout: &Layout, choice: &SourceChoice, flavour: Flavour) -> Result<BuiltKernel> {
    host::ensure(host::Tools::KernelBuild)?;
    let src = prepare_source(layout, choice)?;
    let build = build_dir_for(layout, &src, choice.kernel_src.is_none(), flavour);
    fs::create_dir_all(&build)?;
    configure(layout, &src, &build, flavour)?;
    let started = Instant::now();
    make(&src, &build, &["bzImage"], "bzImage")?;
    make(&src, &build, &["headers_install"], "headers")?;
    eprintln!(
        "[kernel] {} ready ({:.0?})",
        build.join("arch/x86/boot/bzImage").display(),
        started.elapsed()
    );
    Ok(BuiltKernel {
        src,
        build,
        image: None,
    })
}

pub fn configure(layout: &Layout, src: &Path, build: &Path, flavour: Flavour) -> Result<()> {
    let mut parts = Vec::new();
    for name in flavour.fragments() {
        let path = layout.config_fragment(name);
        parts.push(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let key = hash_hex(&refs);
    let stamp = build.join(".kvmuf-config-key");
    if build.join(".config").exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(&key) {
        return Ok(());
    }
    eprintln!(
        "[kernel] configuring {} (tinyconfig + {:?})",
        build.display(),
        flavour.fragments()
    );
    let o = format!("O={}", build.display());
    host::run_quiet(
        Command::new("make")
            .current_dir(src)
            .args([o.as_str(), "tinyconfig"]),
    )?;
    let mut merge = Command::new("scripts/kconfig/merge_config.sh");
    merge
        .current_dir(src)
        .args(["-m", "-O"])
        .arg(build)
        .arg(build.join(".config"));
    for name in flavour.fragments() {
        merge.arg(layout.config_fragment(name));
    }
    host::run_quiet(&mut merge)?;
    host::run_quiet(
        Command::new("make")
            .current_dir(src)
            .args([o.as_str(), "olddefconfig"]),
    )?;
    let config = fs::read_to_string(build.join(".config"))?;
    let missing: Vec<&str> = REQUIRED_SYMBOLS
        .iter()
        .chain(flavour.required_symbols())
        .copied()
        .filter(|s| !config.lines().any(|l| l == format!("CONFIG_{s}=y")))
        .collect();
    if !missing.is_empty() {
        bail!(
            "after olddefconfig these are not =y: {} (check kernel-patches/config/)",
            missing.join(", ")
        );
    }
    fs::write(&stamp, key)?;
    Ok(())
}

/// Runs `make O=build targets` in `src`, with a progress line every 15 s and the full output in
/// `build/<log_name>.log`; on failure prints the log's tail.
pub fn make(src: &Path, build: &Path, targets: &[&str], log_name: &str) -> Result<()> {
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let log_path = build.join(format!("{log_name}.log"));
    let mut log = fs::File::create(&log_path)?;
    let script = format!(
        "exec make O='{}' -j{jobs} {} 2>&1",
        build.display(),
        targets.join(" ")
    );
    let mut child = Command::new("bash")
        .current_dir(src)
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start make")?;
    let stdout = child.stdout.take().context("make stdout")?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut compiled = 0usize;
    let mut tail_lines: Vec<String> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        writeln!(log, "{line}")?;
        if line.starts_with("  CC ") || line.starts_with("  AS ") {
            compiled += 1;
        }
        tail_lines.push(line);
        if tail_lines.len() > 40 {
            tail_lines.remove(0);
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            eprintln!(
                "[kernel] make {}: {compiled} files compiled, {:.0}s",
                targets.join(" "),
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "make {} failed ({status}); full log: {}\n{}",
            targets.join(" "),
            log_path.display(),
            tail_lines.join("\n")
        );
    }
    Ok(())
}

/// One run of a C kvm selftest: `[@PARAM…] [!] binary [args…]`, a line of
/// `kernel-patches/selftests.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CTestRun {
    /// Path relative to tools/testing/selftests/kvm.
    pub binary: String,
    pub args: Vec<String>,
    /// A leading `!`: the run tests the series and must not skip (KSFT_SKIP fails it).
    pub required: bool,
    /// Leading `@PARAM` words, without the `@`: kernel parameters the run needs (e.g.
    /// `kvm_amd.npt=0` for shadow paging), so it runs in a boot of its own with them.
    pub cmdline: Vec<String>,
}

impl CTestRun {
    pub fn parse(line: &str) -> Result<Self> {
        let mut words = line.split_whitespace().peekable();
        if line.contains(['\'', '"', '\\', '$', '`']) {
            bail!("quotes, `$` and backslashes are not allowed in a selftest line");
        }
        let mut cmdline = Vec::new();
        while let Some(word) = words.next_if(|w| w.starts_with('@')) {
            let param = &word[1..];
            qemu::check_kernel_param(param).with_context(|| format!("`{word}`"))?;
            cmdline.push(param.to_string());
        }
        let required = words.next_if_eq(&"!").is_some();
        let binary = words.next().context("empty selftest line")?.to_string();
        if binary.starts_with('@') {
            bail!("`{binary}`: kernel parameters (`@PARAM`) come before the `!`");
        }
        if binary.starts_with('/') || binary.split('/').any(|c| c == "..") {
            bail!("`{binary}`: a selftest is named relative to tools/testing/selftests/kvm");
        }
        Ok(Self {
            binary,
            args: words.map(str::to_string).collect(),
            required,
            cmdline,
        })
    }

    /// The line as written, the parameters in brackets first: the test's name in results,
    /// distinct for the same test run under different kernel parameters.
    pub fn label(&self) -> String {
        let run = std::iter::once(self.binary.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        if self.cmdline.is_empty() {
            run
        } else {
            format!("[{}] {run}", self.cmdline.join(" "))
        }
    }
}

/// The C kvm selftest runs the loop makes (`kernel-patches/selftests.txt`).
pub fn c_selftest_list(layout: &Layout) -> Result<Vec<CTestRun>> {
    let path = layout.patches_dir().join("selftests.txt");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| CTestRun::parse(l).with_context(|| format!("{}: `{l}`", path.display())))
        .collect()
}

/// Builds the listed kvm selftests statically from the kernel's own tree, against the headers
/// it installed; returns (name, binary) pairs.
pub fn build_c_selftests(kernel: &BuiltKernel, names: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let out = kernel.build.join("kselftest-kvm");
    fs::create_dir_all(&out)?;
    let hdr = kernel.build.join("usr");
    let targets: Vec<PathBuf> = names.iter().map(|n| out.join(n)).collect();
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let log_path = kernel.build.join("kselftest-kvm.log");
    let output = Command::new("make")
        .current_dir(kernel.src.join("tools/testing/selftests/kvm"))
        .arg(format!("-j{jobs}"))
        .arg(format!("OUTPUT={}", out.display()))
        .arg(format!("INSTALL_HDR_PATH={}", hdr.display()))
        .arg(format!(
            "KHDR_INCLUDES=-isystem {}",
            hdr.join("include").display()
        ))
        .arg("EXTRA_CFLAGS=-static")
        .args(&targets)
        .output()
        .context("cannot run make for the kvm selftests")?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    fs::write(&log_path, &text)?;
    if !output.status.success() {
        bail!(
            "building kvm selftests failed; log: {}\n{}",
            log_path.display(),
            host::tail(&text, 30)
        );
    }
    Ok(names.iter().cloned().zip(targets).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selftest_lines_parse() {
        let run = CTestRun::parse("demand_paging_test -b 16M -k sync").unwrap();
        assert_eq!(run.binary, "demand_paging_test");
        assert_eq!(run.args, ["-b", "16M", "-k", "sync"]);
        assert_eq!(run.label(), "demand_paging_test -b 16M -k sync");
        assert!(!run.required);
        let run = CTestRun::parse("! x86/userfault_test").unwrap();
        assert!(run.required);
        assert_eq!(run.binary, "x86/userfault_test");
        assert!(CTestRun::parse("!").is_err());
        assert!(CTestRun::parse("/abs/test").is_err());
        assert!(CTestRun::parse("../escape").is_err());
        assert!(CTestRun::parse("  ").is_err());
        assert!(CTestRun::parse("t -x 'a b'").is_err());
    }

    #[test]
    fn selftest_lines_take_kernel_params() {
        let run = CTestRun::parse("demand_paging_test -b 16M").unwrap();
        assert!(run.cmdline.is_empty());
        let run = CTestRun::parse("@kvm_amd.npt=0 ! x86/userfault_test -s").unwrap();
        assert_eq!(run.cmdline, ["kvm_amd.npt=0"]);
        assert!(run.required);
        assert_eq!(run.binary, "x86/userfault_test");
        assert_eq!(run.args, ["-s"]);
        assert_eq!(run.label(), "[kvm_amd.npt=0] x86/userfault_test -s");
        let run = CTestRun::parse("@kvm_amd.npt=0  @a.b=1,2 demand_paging_test").unwrap();
        assert_eq!(run.cmdline, ["kvm_amd.npt=0", "a.b=1,2"]);
        assert!(!run.required);
        assert_eq!(run.label(), "[kvm_amd.npt=0 a.b=1,2] demand_paging_test");
        // Only leading words are parameters: later ones are the test's arguments.
        let run = CTestRun::parse("t -x @y").unwrap();
        assert!(run.cmdline.is_empty());
        assert_eq!(run.args, ["-x", "@y"]);
        for bad in [
            "@ t",
            "@kvm_amd.npt=0",
            "@kvm_amd.npt=0 !",
            "! @kvm_amd.npt=0 t",
            "@a;b t",
            "@a/b t",
            "@-x t",
            "@-- t",
            "@a=\"b c\" t",
            "@a=é t",
        ] {
            let err = CTestRun::parse(bad).err();
            assert!(err.is_some(), "{bad:?} was accepted");
        }
        let err = CTestRun::parse("@a:b t").unwrap_err();
        assert!(format!("{err:#}").contains("`@a:b`"), "{err:#}");
    }

    #[test]
    fn subject_strips_patch_prefix_and_unfolds() {
        let mail = "From abc\nSubject: [PATCH v1 02/07] KVM: x86: Add a\n thing\nDate: x\n\nbody";
        assert_eq!(subject_of(mail).as_deref(), Some("KVM: x86: Add a thing"));
        assert_eq!(subject_of("Subject: plain\n").as_deref(), Some("plain"));
        assert_eq!(subject_of("no headers"), None);
    }

    #[test]
    fn am_failure_names_patch_and_file() {
        let series = vec![
            Patch {
                path: "/s/0001-a.patch".into(),
                subject: "KVM: a".into(),
            },
            Patch {
                path: "/s/0002-b.patch".into(),
                subject: "KVM: x86: b".into(),
            },
        ];
        let out = "Applying: KVM: a\nApplying: KVM: x86: b\nerror: patch failed: virt/kvm/kvm_main.c:120\n\
                   error: virt/kvm/kvm_main.c: patch does not apply\nPatch failed at 0002 KVM: x86: b\n";
        let (patch, file) = describe_am_failure(out, &series);
        assert_eq!(patch, "0002-b.patch");
        assert_eq!(file.as_deref(), Some("virt/kvm/kvm_main.c:120"));
    }
}
