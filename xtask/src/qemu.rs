//! Boots the built kernel under QEMU/TCG with an initramfs, streams the serial console to the
//! terminal and a log file, and judges the run: the command's exit status, kernel problem
//! reports, and the timeout.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::console;
use crate::host;

/// How to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
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

fn kernel_cmdline(tsc_khz: u64, extra: &[String]) -> String {
    let mut cmdline = format!(
        "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 rdinit=/init tsc_early_khz={tsc_khz} \
         hung_task_panic=0 nokaslr"
    );
    // Last, so a parameter given twice takes the caller's value.
    for param in extra {
        cmdline.push(' ');
        cmdline.push_str(param);
    }
    cmdline
}

/// An extra kernel parameter is one word of plain characters: the command line is a single
/// QEMU argument split by the kernel at spaces, where quotes have their own meaning. A leading
/// `-` is refused too: `--` ends the kernel's parameters and hands the rest to /init.
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
    Ok(())
}

/// Boots and waits for the outcome.
pub fn run(cfg: &VmConfig) -> Result<VmOutcome> {
    let started = Instant::now();
    // One TCG thread for all guest CPUs. Multi-threaded TCG running nested SVM guests
    // intermittently triple-faults or hangs the nested guest (seen with QEMU 7.2 and 10.0, on the
    // unpatched base, with upstream demand_paging_test -v 2 -u MISSING: about one run in ten).
    // Round-robin TCG still interleaves the guest CPUs, showed no failure in 40 such runs, and
    // on two host cores is faster than MTTCG (docs/qemu.md). KVMUF_MTTCG=1 asks for MTTCG, for
    // runs that start no nested vCPU and need guest CPUs that really run in parallel (the
    // concurrent-resolver benchmark).
    let accel = if std::env::var_os("KVMUF_MTTCG").is_some_and(|v| v == "1") {
        "tcg,thread=multi"
    } else {
        "tcg,thread=single"
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            accel,
            "-cpu",
            "max",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-serial", "stdio", "-monitor", "none"])
        .args(["-smp", &cfg.smp.to_string(), "-m", &cfg.mem])
        .arg("-kernel")
        .arg(&cfg.bzimage)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .args([
            "-append",
            &kernel_cmdline(host::host_tsc_khz()?, &cfg.extra_cmdline),
        ])
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
        let base = kernel_cmdline(2_000_000, &[]);
        assert!(base.starts_with("console=ttyS0 "), "{base}");
        assert!(base.contains(" tsc_early_khz=2000000 "), "{base}");
        let extra = ["kvm_amd.npt=0".to_string(), "foo=a,b".to_string()];
        assert_eq!(
            kernel_cmdline(2_000_000, &extra),
            format!("{base} kvm_amd.npt=0 foo=a,b")
        );
    }

    #[test]
    fn kernel_params_are_plain_words() {
        for good in ["kvm_amd.npt=0", "nokaslr", "a-b_c.d=1,2", "x=-1"] {
            check_kernel_param(good).unwrap();
        }
        for bad in [
            "", "a b", "a\tb", "x='1'", "x=\"1\"", "a;b", "--", "-x", "a/b", "é",
        ] {
            assert!(check_kernel_param(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
