//! Host tools the loop needs, installed on demand: a fresh machine is set up by the commands
//! themselves (as root), or told the exact `apt-get install` line (as anyone else).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A Debian package and a file whose presence shows it is installed.
struct Need {
    package: &'static str,
    probe: &'static str,
}

const KERNEL_BUILD: &[Need] = &[
    Need {
        package: "build-essential",
        probe: "/usr/bin/make",
    },
    Need {
        package: "flex",
        probe: "/usr/bin/flex",
    },
    Need {
        package: "bison",
        probe: "/usr/bin/bison",
    },
    Need {
        package: "bc",
        probe: "/usr/bin/bc",
    },
    Need {
        package: "libelf-dev",
        probe: "/usr/include/libelf.h",
    },
    Need {
        package: "libssl-dev",
        probe: "/usr/include/openssl/ssl.h",
    },
    Need {
        package: "xz-utils",
        probe: "/usr/bin/xz",
    },
    Need {
        package: "perl",
        probe: "/usr/bin/perl",
    },
    Need {
        package: "rsync",
        probe: "/usr/bin/rsync",
    },
];

const VM: &[Need] = &[
    Need {
        package: "qemu-system-x86",
        probe: "/usr/bin/qemu-system-x86_64",
    },
    Need {
        package: "busybox-static",
        probe: "/bin/busybox",
    },
    Need {
        package: "cpio",
        probe: "/usr/bin/cpio",
    },
];

/// Which group of tools a step needs.
#[derive(Clone, Copy)]
pub enum Tools {
    KernelBuild,
    Vm,
}

pub fn ensure(tools: Tools) -> Result<()> {
    let needs = match tools {
        Tools::KernelBuild => KERNEL_BUILD,
        Tools::Vm => VM,
    };
    let missing: Vec<&str> = needs
        .iter()
        .filter(|n| !Path::new(n.probe).exists())
        .map(|n| n.package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!("apt-get install -y {}", missing.join(" "));
    if !nix_is_root() {
        bail!("missing host packages; as root run: {line}");
    }
    eprintln!("[host] installing: {}", missing.join(" "));
    // An `apt-get update` first: a fresh machine may have no package lists yet.
    run_quiet(Command::new("apt-get").args(["update", "-q"])).context("apt-get update failed")?;
    run_quiet(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
    .with_context(|| format!("`{line}` failed"))?;
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, showing its output only if it fails.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        bail!(
            "{:?} exited with {}\n{}{}",
            cmd.get_program(),
            out.status,
            tail(&stdout, 20),
            tail(&stderr, 20)
        );
    }
    Ok(())
}

/// Runs a command with inherited stdio, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!(
            "{:?} {:?} exited with {status}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Captures stdout of a command that must succeed.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} exited with {}: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut s = lines[start..].join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

/// The host TSC frequency in kHz, for `tsc_early_khz=`: under TCG the guest's TSC ticks at the
/// host's rate and the guest's own calibration sometimes fails (then KVM_RUN never returns).
pub fn host_tsc_khz() -> Result<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .context("no `cpu MHz` line in /proc/cpuinfo")?;
    Ok((mhz * 1000.0).round() as u64)
}
