//! Boots the built kernel under QEMU (TCG, or KVM on a host with nested virtualisation) with an
//! initramfs, streams the serial console to the terminal and a log file, and judges the run: the
//! command's exit status, kernel problem reports, and the timeout.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::console;
use crate::host;

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Accel {
    /// Emulation (`-accel tcg -cpu max`): runs anywhere; QEMU emulates SVM with nested paging for
    /// the guest's own VMs.
    #[default]
    Tcg,
    /// Hardware virtualisation (`-accel kvm -cpu host`): needs /dev/kvm backed by VMX or SVM with
    /// nested virtualisation enabled, since the guest runs VMs of its own.
    Kvm,
}

impl Accel {
    /// The `-accel` and `-cpu` arguments. `mttcg`: multi-threaded TCG (ignored for KVM).
    pub fn qemu_args(self, mttcg: bool) -> [&'static str; 4] {
        match self {
            // One TCG thread for all guest CPUs unless asked otherwise: see `run`.
            Accel::Tcg if mttcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
            Accel::Tcg => ["-accel", "tcg,thread=single", "-cpu", "max"],
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
        }
    }
}

/// Whether `KVMUF_MTTCG=1` asks for multi-threaded TCG.
pub fn mttcg_requested() -> bool {
    std::env::var_os("KVMUF_MTTCG").is_some_and(|v| v == "1")
}

/// What `check_kvm_host` looks at, gathered by `KvmHostProbe::read` (or made up by a test).
#[derive(Debug, Clone)]
pub struct KvmHostProbe {
    /// Whether /dev/kvm opened read-write, or why not.
    pub dev_kvm: Result<(), String>,
    /// The text of /proc/cpuinfo.
    pub cpuinfo: String,
    /// /sys/module/kvm_intel/parameters/nested, if it exists.
    pub nested_intel: Option<String>,
    /// /sys/module/kvm_amd/parameters/nested, if it exists.
    pub nested_amd: Option<String>,
}

/// Whether `path` (/dev/kvm) opens read-write, as KVM's users need it to, or why not.
pub fn open_dev_kvm(path: &Path) -> Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| e.to_string())
}

impl KvmHostProbe {
    pub fn read() -> Self {
        let dev_kvm = open_dev_kvm(Path::new("/dev/kvm"));
        let param = |module: &str| {
            fs::read_to_string(format!("/sys/module/{module}/parameters/nested")).ok()
        };
        Self {
            dev_kvm,
            cpuinfo: fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            nested_intel: param("kvm_intel"),
            nested_amd: param("kvm_amd"),
        }
    }
}

/// Checks that `-accel kvm` can run the guest's own VMs: /dev/kvm opens, the CPU has VMX or SVM
/// (a paravirtual /dev/kvm, as in many cloud VMs, has neither), and the KVM module for it has
/// nested virtualisation on. The error names everything that is missing.
pub fn check_kvm_host(probe: &KvmHostProbe) -> Result<()> {
    let mut missing = Vec::new();
    if let Err(e) = &probe.dev_kvm {
        missing.push(format!("/dev/kvm does not open ({e})"));
    }
    let flags: Vec<&str> = probe
        .cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    let (module, nested) = if flags.contains(&"vmx") {
        ("kvm_intel", &probe.nested_intel)
    } else if flags.contains(&"svm") {
        ("kvm_amd", &probe.nested_amd)
    } else {
        missing.push(
            "hardware virtualisation: the CPU flags in /proc/cpuinfo have neither vmx nor svm \
             (this /dev/kvm cannot give the guest VMX/SVM for its own VMs; use --accel tcg)"
                .to_string(),
        );
        ("", &None)
    };
    if !module.is_empty() {
        let path = format!("/sys/module/{module}/parameters/nested");
        match nested.as_deref().map(str::trim) {
            Some("Y" | "y" | "1") => {}
            Some(v) => missing.push(format!(
                "nested virtualisation: {path} is `{v}` (enable it: `modprobe -r {module} && \
                 modprobe {module} nested=1`)"
            )),
            None => missing.push(format!(
                "nested virtualisation: {path} does not exist ({module} is not loaded)"
            )),
        }
    }
    if !missing.is_empty() {
        bail!(
            "--accel kvm needs /dev/kvm backed by VMX or SVM with nested virtualisation; \
             missing: {}",
            missing.join("; ")
        );
    }
    Ok(())
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub accel: Accel,
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
    pub smp: u32,
    pub mem: String,
    pub timeout: Duration,
    pub log: PathBuf,
    /// Print console lines as they arrive (after boot).
    pub echo: bool,
    /// Kernel parameters after the loop's own (`kvm_amd.npt=0`: KVM_AMD is built in, so its
    /// module parameters can only be set here). Each passed `check_kernel_param`.
    pub extra_cmdline: Vec<String>,
}

/// What happened.
#[derive(Debug)]
pub struct VmOutcome {
    /// The command's exit status, if /init got to report it.
    pub exit_status: Option<i32>,
    /// Kernel problem reports seen on the console.
    pub problems: Vec<String>,
    pub timed_out: bool,
    pub console: Vec<String>,
    pub log: PathBuf,
    pub elapsed: Duration,
    /// Time from start to the boot marker.
    pub boot_time: Option<Duration>,
}

impl VmOutcome {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0) && self.problems.is_empty() && !self.timed_out
    }

    /// One paragraph saying why a run failed, with the relevant part of the console.
    pub fn failure_report(&self) -> String {
        let mut why = Vec::new();
        if self.timed_out {
            why.push(format!(
                "timed out after {:.0?} and was killed",
                self.elapsed
            ));
        }
        if let Some(p) = self.problems.first() {
            why.push(format!("the kernel reported: {p}"));
        }
        match self.exit_status {
            Some(0) => {}
            Some(rc) => why.push(format!("the command exited with status {rc}")),
            None if !self.timed_out => {
                why.push("the guest stopped before the command finished".into())
            }
            None => {}
        }
        // Show the first problem's surroundings if there is one, else the tail.
        let start = self
            .problems
            .first()
            .and_then(|p| self.console.iter().position(|l| l.contains(p.as_str())))
            .map_or(self.console.len().saturating_sub(40), |i| {
                i.saturating_sub(5)
            });
        let end = (start + 60).min(self.console.len());
        format!(
            "VM run failed: {}\n--- console ({}) lines {}..{} ---\n{}\n---",
            why.join("; "),
            self.log.display(),
            start + 1,
            end,
            self.console[start..end].join("\n")
        )
    }
}

/// `tsc_khz`: the host TSC rate, given to a TCG guest whose own calibration can fail (a KVM guest
/// calibrates against kvmclock, and the host's `cpu MHz` need not be its TSC rate).
fn kernel_cmdline(tsc_khz: Option<u64>, extra: &[String]) -> String {
    let mut cmdline = String::from("console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 rdinit=/init");
    if let Some(khz) = tsc_khz {
        let _ = write!(cmdline, " tsc_early_khz={khz}");
    }
    cmdline.push_str(" hung_task_panic=0 nokaslr");
    // Last. Most parameters given twice take the last value, so the caller's wins, but not
    // all (each `console=` adds a console, some take the first): `check_kernel_param` refuses
    // the loop's own that the harness depends on.
    for param in extra {
        cmdline.push(' ');
        cmdline.push_str(param);
    }
    cmdline
}

/// The loop's own kernel parameters that an extra one must not name: the harness reads the
/// serial console, needs the reboot a panic causes to end the run, and boots the initramfs's
/// /init.
const HARNESS_PARAMS: [&str; 4] = ["console", "earlyprintk", "panic", "rdinit"];

/// An extra kernel parameter is one word of plain characters: the command line is a single
/// QEMU argument split by the kernel at spaces, where quotes have their own meaning. A leading
/// `-` is refused too: `--` ends the kernel's parameters and hands the rest to /init. So are
/// the parameters in `HARNESS_PARAMS`.
pub fn check_kernel_param(param: &str) -> Result<()> {
    if param.is_empty() {
        bail!("empty kernel parameter");
    }
    if let Some(c) = param
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.,=-".contains(*c)))
    {
        bail!("kernel parameter `{param}`: `{c}` is not allowed (only A-Z a-z 0-9 _ . , = -)");
    }
    if param.starts_with('-') {
        bail!("kernel parameter `{param}` starts with `-`");
    }
    let name = param.split_once('=').map_or(param, |(name, _)| name);
    if HARNESS_PARAMS.contains(&name) {
        bail!(
            "kernel parameter `{param}`: the harness sets `{name}` itself and depends on it \
             (not allowed: {})",
            HARNESS_PARAMS.join(", ")
        );
    }
    Ok(())
}

/// QEMU's arguments for `cfg`. `tsc_khz`: see `kernel_cmdline`; `mttcg`: see `run`.
pub fn qemu_args(cfg: &VmConfig, tsc_khz: Option<u64>, mttcg: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = cfg
        .accel
        .qemu_args(mttcg)
        .iter()
        .chain(&["-nodefaults", "-display", "none"])
        .chain(&["-no-reboot", "-serial", "stdio", "-monitor", "none"])
        .map(OsString::from)
        .collect();
    args.extend(
        [
            "-smp".into(),
            cfg.smp.to_string(),
            "-m".into(),
            cfg.mem.clone(),
        ]
        .map(OsString::from),
    );
    args.push("-kernel".into());
    args.push(cfg.bzimage.clone().into());
    args.push("-initrd".into());
    args.push(cfg.initrd.clone().into());
    args.push("-append".into());
    args.push(kernel_cmdline(tsc_khz, &cfg.extra_cmdline).into());
    args
}

/// Boots and waits for the outcome.
pub fn run(cfg: &VmConfig) -> Result<VmOutcome> {
    let started = Instant::now();
    // Under TCG, one thread for all guest CPUs. Multi-threaded TCG running nested SVM guests
    // intermittently triple-faults or hangs the nested guest (seen with QEMU 7.2 and 10.0, on the
    // unpatched base, with upstream demand_paging_test -v 2 -u MISSING: about one run in ten).
    // Round-robin TCG still interleaves the guest CPUs, showed no failure in 40 such runs, and
    // on two host cores is faster than MTTCG (docs/qemu.md). KVMUF_MTTCG=1 asks for MTTCG, for
    // runs that start no nested vCPU and need guest CPUs that really run in parallel (the
    // concurrent-resolver benchmark).
    let tsc_khz = match cfg.accel {
        Accel::Tcg => Some(host::host_tsc_khz()?),
        Accel::Kvm => None,
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args(qemu_args(cfg, tsc_khz, mttcg_requested()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let tx_err = tx.clone();
    std::thread::spawn(move || forward_lines(stdout, &tx));
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx_err.send(format!("qemu: {line}"));
        }
    });
    let mut log =
        fs::File::create(&cfg.log).with_context(|| format!("creating {}", cfg.log.display()))?;
    let mut outcome = VmOutcome {
        exit_status: None,
        problems: Vec::new(),
        timed_out: false,
        console: Vec::new(),
        log: cfg.log.clone(),
        elapsed: Duration::ZERO,
        boot_time: None,
    };
    let deadline = started + cfg.timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            outcome.timed_out = true;
            kill(&mut child);
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(line) => {
                let line = line.trim_end_matches(['\r', '\n']).to_string();
                writeln!(log, "{line}")?;
                if let Some(p) = console::problem_in(&line) {
                    outcome.problems.push(p.to_string());
                }
                if outcome.boot_time.is_none() && line.contains(console::BOOTED_MARKER) {
                    outcome.boot_time = Some(started.elapsed());
                }
                if let Some(rc) = console::exit_status_in(&line) {
                    outcome.exit_status = Some(rc);
                }
                if cfg.echo && (outcome.boot_time.is_some() || console::problem_in(&line).is_some())
                {
                    println!("{line}");
                }
                outcome.console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            // Both pipes closed: QEMU exited (poweroff, or reboot after a panic).
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    outcome.elapsed = started.elapsed();
    if outcome.timed_out {
        writeln!(
            log,
            "[xtask] killed QEMU at the {:.0?} timeout",
            cfg.timeout
        )?;
    }
    Ok(outcome)
}

fn forward_lines(stdout: impl std::io::Read, tx: &mpsc::Sender<String>) {
    // The console can carry bytes that are not UTF-8 (early boot noise): read raw lines.
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                    break;
                }
            }
        }
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
}

/// Scratch paths for one run, unique per process so concurrent runs do not collide.
pub fn scratch(run_dir: &Path, tag: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let dir = run_dir.join(format!("{tag}-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok((
        dir.join("root"),
        dir.join("initrd.cpio"),
        dir.join("console.log"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_params_follow_the_loops_own() {
        let base = kernel_cmdline(Some(2_000_000), &[]);
        assert!(base.starts_with("console=ttyS0 "), "{base}");
        assert!(base.contains(" tsc_early_khz=2000000 "), "{base}");
        let extra = ["kvm_amd.npt=0".to_string(), "foo=a,b".to_string()];
        assert_eq!(
            kernel_cmdline(Some(2_000_000), &extra),
            format!("{base} kvm_amd.npt=0 foo=a,b")
        );
        let kvm = kernel_cmdline(None, &[]);
        assert!(!kvm.contains("tsc_early_khz"), "{kvm}");
        assert_eq!(kvm, base.replace(" tsc_early_khz=2000000", ""));
    }

    fn config(accel: Accel) -> VmConfig {
        VmConfig {
            accel,
            bzimage: "/k/bzImage".into(),
            initrd: "/r/initrd.cpio".into(),
            smp: 2,
            mem: "2G".into(),
            timeout: Duration::from_secs(1),
            log: "/r/console.log".into(),
            echo: false,
            extra_cmdline: vec!["kvm_amd.npt=0".into()],
        }
    }

    fn args_of(cfg: &VmConfig, tsc: Option<u64>, mttcg: bool) -> Vec<String> {
        qemu_args(cfg, tsc, mttcg)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn qemu_command_line_per_accelerator() {
        let tcg = args_of(&config(Accel::Tcg), Some(2_000_000), false);
        assert_eq!(
            tcg[..4],
            ["-accel", "tcg,thread=single", "-cpu", "max"],
            "{tcg:?}"
        );
        let tail = [
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-smp",
            "2",
            "-m",
            "2G",
            "-kernel",
            "/k/bzImage",
            "-initrd",
            "/r/initrd.cpio",
            "-append",
        ];
        assert_eq!(tcg[4..tcg.len() - 1], tail, "{tcg:?}");
        assert_eq!(
            tcg.last().unwrap(),
            &kernel_cmdline(Some(2_000_000), &["kvm_amd.npt=0".into()])
        );

        let mttcg = args_of(&config(Accel::Tcg), Some(2_000_000), true);
        assert_eq!(mttcg[..4], ["-accel", "tcg,thread=multi", "-cpu", "max"]);
        assert_eq!(mttcg[4..], tcg[4..]);

        // KVM: host CPU (its VMX/SVM passed through), no TSC rate, KVMUF_MTTCG has no effect.
        for mttcg in [false, true] {
            let kvm = args_of(&config(Accel::Kvm), None, mttcg);
            assert_eq!(kvm[..4], ["-accel", "kvm", "-cpu", "host"], "{kvm:?}");
            assert_eq!(kvm[4..kvm.len() - 1], tail);
            let cmdline = kvm.last().unwrap();
            assert!(!cmdline.contains("tsc_early_khz"), "{cmdline}");
            assert!(cmdline.ends_with(" kvm_amd.npt=0"), "{cmdline}");
        }
    }

    fn probe(flags: &str, intel: Option<&str>, amd: Option<&str>) -> KvmHostProbe {
        KvmHostProbe {
            dev_kvm: Ok(()),
            cpuinfo: format!(
                "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu {flags} sse2\n\n\
                 processor\t: 1\nflags\t\t: fpu {flags} sse2\n"
            ),
            nested_intel: intel.map(String::from),
            nested_amd: amd.map(String::from),
        }
    }

    #[test]
    fn kvm_accel_needs_vmx_or_svm_and_nested() {
        check_kvm_host(&probe("vmx ept", Some("Y\n"), None)).unwrap();
        check_kvm_host(&probe("svm npt", None, Some("1\n"))).unwrap();

        // A paravirtual /dev/kvm (this project's cloud VM): opens, but no VMX/SVM.
        let err = check_kvm_host(&probe("hypervisor", None, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither vmx nor svm"), "{err}");
        assert!(!err.contains("/dev/kvm does not open"), "{err}");

        let err = check_kvm_host(&probe("vmx", Some("N\n"), Some("1")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/sys/module/kvm_intel/parameters/nested is `N`"),
            "{err}"
        );
        let err = check_kvm_host(&probe("svm", Some("Y"), None))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/sys/module/kvm_amd/parameters/nested does not exist"),
            "{err}"
        );

        // Everything missing at once: every reason is named.
        let mut p = probe("", None, None);
        p.dev_kvm = Err("No such file or directory (os error 2)".into());
        let err = check_kvm_host(&p).unwrap_err().to_string();
        assert!(
            err.contains("/dev/kvm does not open (No such file or directory"),
            "{err}"
        );
        assert!(err.contains("neither vmx nor svm"), "{err}");
        // No flags line at all is no VMX/SVM either.
        let mut p = probe("vmx", Some("Y"), None);
        p.cpuinfo = "processor: 0\n".into();
        assert!(check_kvm_host(&p).is_err());
    }

    #[test]
    fn kernel_params_are_plain_words() {
        for good in ["kvm_amd.npt=0", "nokaslr", "a-b_c.d=1,2", "x=-1"] {
            check_kernel_param(good).unwrap();
        }
        for (bad, why) in [
            ("", "empty kernel parameter"),
            ("a b", "` ` is not allowed"),
            ("a\tb", "`\t` is not allowed"),
            ("x='1'", "`'` is not allowed"),
            ("x=\"1\"", "`\"` is not allowed"),
            ("a;b", "`;` is not allowed"),
            ("--", "starts with `-`"),
            ("-x", "starts with `-`"),
            ("a/b", "`/` is not allowed"),
            ("é", "`é` is not allowed"),
            ("console=tty0", "sets `console` itself"),
            ("earlyprintk=vga", "sets `earlyprintk` itself"),
            ("panic=10", "sets `panic` itself"),
            ("rdinit=sh", "sets `rdinit` itself"),
            ("console", "sets `console` itself"),
        ] {
            let err = check_kernel_param(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} was accepted"))
                .to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        // Only the name counts: these merely start like one of the harness's.
        for good in ["panic_on_warn=1", "consoleblank=0", "x=console"] {
            check_kernel_param(good).unwrap();
        }
    }
}
