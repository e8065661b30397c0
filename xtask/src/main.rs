//! `cargo xtask`: the build → boot → test loop for the KVM userfault series.
//!
//! - `cargo xtask kernel`: fetch the pinned base (or take `--kernel-src`), apply the series,
//!   configure and build it out of tree in the cache.
//! - `cargo xtask vm -- CMD…`: boot that kernel under QEMU/TCG and run CMD inside.
//! - `cargo xtask test`: everything, ending in one summary line.

mod base;
mod bench;
mod console;
mod host;
mod initramfs;
mod kernel;
mod layout;
mod qemu;
mod series_check;
mod suite;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::initramfs::{sh_quote, GuestFile};
use crate::kernel::{Flavour, SourceChoice};
use crate::layout::Layout;

#[derive(Parser)]
#[command(about = "Build the patched kernel, boot it under QEMU, run the tests inside")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
struct KernelArgs {
    /// Use this kernel git tree instead of the pinned base; the series is applied with `git am`
    /// unless the tree already ends with it.
    #[arg(long, value_name = "DIR")]
    kernel_src: Option<PathBuf>,
    /// With --kernel-src: build the tree as it is, without applying the series.
    #[arg(long, requires = "kernel_src")]
    no_apply: bool,
    /// Kernel configuration: `debug` adds lockdep and atomic-sleep checking.
    #[arg(long, value_enum, default_value = "default")]
    flavour: Flavour,
}

impl KernelArgs {
    fn source(&self) -> SourceChoice {
        SourceChoice {
            kernel_src: self.kernel_src.clone(),
            no_apply: self.no_apply,
        }
    }
}

#[derive(Args, Clone)]
struct VmShape {
    /// Guest CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    smp: u32,
    /// Guest memory, in QEMU's syntax (512M, 2G).
    #[arg(long, default_value = "2G", value_parser = parse_mem)]
    mem: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the base, apply the series, configure and build the kernel.
    Kernel(KernelArgs),
    /// Boot the built kernel and run a command inside; exits with the command's status.
    Vm {
        #[command(flatten)]
        kernel: KernelArgs,
        #[command(flatten)]
        shape: VmShape,
        /// Seconds before the VM is killed.
        #[arg(long, default_value_t = 300, value_parser = timeout_secs())]
        timeout: u64,
        /// Put a host file in the guest: HOST[:GUEST] (default /usr/local/bin/NAME).
        #[arg(long, value_name = "HOST[:GUEST]")]
        add: Vec<String>,
        /// Add a kernel parameter to the guest's command line (e.g. kvm_amd.npt=0); repeatable.
        #[arg(long, value_name = "PARAM", value_parser = parse_kernel_param)]
        append: Vec<String>,
        /// Boot the existing bzImage without running make first.
        #[arg(long)]
        no_build: bool,
        /// Boot this kernel image instead of the build's (implies --no-build).
        #[arg(long, value_name = "BZIMAGE")]
        kernel_image: Option<PathBuf>,
        /// The command to run in the guest (a shell command line).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The cover letter's demand-paging table: every configuration side by side in one boot.
    Bench(BenchArgs),
    /// The whole suite: lint, host tests, series checks, harness checks, tests in the guest.
    Test {
        #[command(flatten)]
        kernel: KernelArgs,
        #[command(flatten)]
        shape: VmShape,
        /// Seconds before the in-guest run is killed.
        #[arg(long, default_value_t = 2400, value_parser = timeout_secs())]
        timeout: u64,
        #[arg(long)]
        skip_lint: bool,
        #[arg(long)]
        skip_host: bool,
        /// Skip checkpatch and the per-patch builds.
        #[arg(long)]
        skip_series_check: bool,
        /// Skip the harness's own checks (failing command, panic, hang).
        #[arg(long)]
        skip_harness_check: bool,
    },
}

#[derive(Args, Clone)]
struct BenchArgs {
    #[command(flatten)]
    kernel: KernelArgs,
    #[command(flatten)]
    shape: VmShape,
    /// QEMU's accelerator: `tcg` emulates (runs anywhere); `kvm` needs /dev/kvm with real VMX or
    /// SVM and nested virtualisation enabled (checked before anything is built).
    #[arg(long, value_enum, default_value = "tcg")]
    accel: qemu::Accel,
    /// Run the matrix on this host, without QEMU: for a host already booted into the patched
    /// kernel. Not with --accel, --smp or --mem.
    #[arg(long, conflicts_with_all = ["accel", "smp", "mem"])]
    host: bool,
    /// vCPU counts to measure (comma separated): up to 64 under TCG, 512 with --accel kvm or
    /// --host.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 2, 4],
          value_parser = clap::value_parser!(u32).range(1..=i64::from(bench::MAX_VCPUS)))]
    vcpus: Vec<u32>,
    /// Guest memory each vCPU demand-pages (demand_paging_test -b; published runs: 64M).
    #[arg(short = 'b', long, default_value = "16M", value_parser = parse_mem)]
    bytes_per_vcpu: String,
    /// Runs of each configuration; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    repeats: u32,
    /// Seconds before the VM (or, with --host, the runs) are killed.
    #[arg(long, default_value_t = 1800, value_parser = timeout_secs())]
    timeout: u64,
    /// Write bench-results.{md,csv,svg} to DIR instead of the cache's run directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Do not run the runtime's handler_bench example on the host.
    #[arg(long)]
    no_handler_bench: bool,
}

impl BenchArgs {
    /// The options, checked. `command_line`: the command as typed, for the results' header.
    fn options(self, command_line: String) -> Result<bench::BenchOptions> {
        let target = if self.host {
            bench::Target::Host
        } else {
            bench::Target::Qemu {
                accel: self.accel,
                smp: self.shape.smp,
                mem: self.shape.mem,
            }
        };
        let opts = bench::BenchOptions {
            source: self.kernel.source(),
            target,
            vcpus: self.vcpus,
            bytes_per_vcpu: self.bytes_per_vcpu,
            repeats: self.repeats,
            timeout: Duration::from_secs(self.timeout),
            out_dir: self.out,
            handler_bench: !self.no_handler_bench,
            command_line,
        };
        opts.validate()?;
        Ok(opts)
    }
}

/// `cargo xtask ARGS…`, quoted for a shell: how this command was run. For the results' header
/// only, so an argument that is not UTF-8 is shown lossily rather than refused.
fn command_line(args: impl IntoIterator<Item = OsString>) -> String {
    std::iter::once("cargo xtask".to_string())
        .chain(
            args.into_iter()
                .skip(1)
                .map(|a| sh_quote(&a.to_string_lossy())),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_mem(s: &str) -> Result<String, String> {
    match bench::size_bytes(s) {
        Some(n) if n > 0 => Ok(s.to_string()),
        _ => Err(format!("`{s}` is not a size like 512M or 2G")),
    }
}

/// `--timeout`: whole seconds, at least one (0 would kill the run before it starts).
fn timeout_secs() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..)
}

fn parse_kernel_param(s: &str) -> Result<String, String> {
    qemu::check_kernel_param(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("{e:#}"))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let layout = Layout::discover()?;
    match cli.command {
        Cmd::Kernel(args) => {
            let built = kernel::build(&layout, &args.source(), args.flavour)?;
            println!("{}", built.bzimage().display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vm {
            kernel: args,
            shape,
            timeout,
            add,
            append,
            no_build,
            kernel_image,
            command,
        } => {
            let files = add
                .iter()
                .map(|s| GuestFile::parse(s))
                .collect::<Result<Vec<_>>>()?;
            let built = if let Some(image) = kernel_image {
                // Nothing of the source tree is touched: the tree may hold work in progress.
                if !image.is_file() {
                    bail!("--kernel-image {}: no such file", image.display());
                }
                kernel::BuiltKernel {
                    src: PathBuf::new(),
                    build: PathBuf::new(),
                    image: Some(image),
                }
            } else if no_build {
                let src = kernel::prepare_source(&layout, &args.source())?;
                let build =
                    kernel::build_dir_for(&layout, &src, args.kernel_src.is_none(), args.flavour);
                let k = kernel::BuiltKernel {
                    src,
                    build,
                    image: None,
                };
                if !k.bzimage().exists() {
                    bail!(
                        "--no-build: {} does not exist; run `cargo xtask kernel`",
                        k.bzimage().display()
                    );
                }
                k
            } else {
                kernel::build(&layout, &args.source(), args.flavour)?
            };
            // One word is a command line as typed; several are argv words to quote.
            let script = if command.len() == 1 {
                command[0].clone()
            } else {
                command
                    .iter()
                    .map(|w| sh_quote(w))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let outcome = suite::boot(
                &layout,
                &built,
                &suite::BootSpec {
                    tag: "vm",
                    script: &format!("{script}\n"),
                    files: &files,
                    extra_cmdline: &append,
                    accel: qemu::Accel::Tcg,
                    smp: shape.smp,
                    mem: &shape.mem,
                    timeout: Duration::from_secs(timeout),
                    echo: true,
                },
            )?;
            if let Some(t) = outcome.boot_time {
                eprintln!(
                    "[vm] booted in {t:.1?}; total {:.1?}; log {}",
                    outcome.elapsed,
                    outcome.log.display()
                );
            }
            if outcome.success() {
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("{}", outcome.failure_report());
            let code = match outcome.exit_status {
                Some(rc) if rc != 0 => u8::try_from(rc).unwrap_or(1),
                _ => 1,
            };
            Ok(ExitCode::from(code))
        }
        Cmd::Bench(args) => {
            let opts = args.options(command_line(std::env::args_os()))?;
            bench::run(&layout, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Test {
            kernel: args,
            shape,
            timeout,
            skip_lint,
            skip_host,
            skip_series_check,
            skip_harness_check,
        } => {
            suite::run(
                &layout,
                &suite::TestOptions {
                    source: args.source(),
                    flavour: args.flavour,
                    skip_lint,
                    skip_host,
                    skip_series_check,
                    skip_harness_check,
                    smp: shape.smp,
                    mem: shape.mem,
                    timeout: Duration::from_secs(timeout),
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
    }

    fn bench(args: &[&str]) -> Result<bench::BenchOptions> {
        let all: Vec<&str> = std::iter::once("bench")
            .chain(args.iter().copied())
            .collect();
        let Cmd::Bench(b) = parse(&all)?.command else {
            panic!("not the bench command");
        };
        b.options("cargo xtask bench".into())
    }

    #[test]
    fn bench_defaults_reproduce_the_documented_table() {
        let o = bench(&[]).unwrap();
        assert_eq!(
            (o.vcpus, o.repeats, o.bytes_per_vcpu.as_str()),
            (vec![1, 2, 4], 5, "16M")
        );
        assert_eq!(
            o.target,
            bench::Target::Qemu {
                accel: qemu::Accel::Tcg,
                smp: 2,
                mem: "2G".into()
            }
        );
        assert!(o.handler_bench);
        assert_eq!(o.out_dir, None);
    }

    #[test]
    fn bench_options_combine() {
        // The published command line's -b.
        let o = bench(&["-b", "64M", "--vcpus", "1,64"]).unwrap();
        assert_eq!(o.bytes_per_vcpu, "64M");
        assert_eq!(o.vcpus, [1, 64]);
        assert_eq!(
            bench(&["--bytes-per-vcpu", "64M"]).unwrap().bytes_per_vcpu,
            "64M"
        );

        let o = bench(&[
            "--accel", "kvm", "--smp", "8", "--mem", "16G", "--vcpus", "1,96,512",
        ])
        .unwrap();
        assert_eq!(
            o.target,
            bench::Target::Qemu {
                accel: qemu::Accel::Kvm,
                smp: 8,
                mem: "16G".into()
            }
        );
        assert_eq!(o.vcpus, [1, 96, 512]);

        let o = bench(&[
            "--host",
            "--vcpus",
            "256",
            "--out",
            "docs",
            "--no-handler-bench",
        ])
        .unwrap();
        assert_eq!(o.target, bench::Target::Host);
        assert_eq!(o.vcpus, [256]);
        assert_eq!(o.out_dir, Some(PathBuf::from("docs")));
        assert!(!o.handler_bench);

        assert_eq!(
            bench(&["--accel", "tcg"]).unwrap().target,
            bench(&[]).unwrap().target
        );
    }

    #[test]
    fn bench_refuses_bad_combinations() {
        for (bad, why) in [
            (
                &["--host", "--accel", "kvm"][..],
                "'--host' cannot be used with '--accel <ACCEL>'",
            ),
            (
                &["--host", "--accel", "tcg"],
                "'--host' cannot be used with '--accel <ACCEL>'",
            ),
            (
                &["--host", "--smp", "4"],
                "'--host' cannot be used with '--smp <SMP>'",
            ),
            (
                &["--host", "--mem", "4G"],
                "'--host' cannot be used with '--mem <MEM>'",
            ),
            (
                &["--accel", "hvf"],
                "invalid value 'hvf' for '--accel <ACCEL>'",
            ),
            (&["--vcpus", "65"], "1 to 64 under TCG"),
            (&["--vcpus", "513", "--host"], "513 is not in 1..=512"),
            (
                &["--vcpus", "600", "--accel", "kvm"],
                "600 is not in 1..=512",
            ),
            (&["--vcpus", "1,2,1"], "--vcpus lists 1 twice"),
            (&["-b", "16K"], "`16K` is not a size like 512M or 2G"),
            (&["--out"], "a value is required for '--out <DIR>'"),
            (&["--timeout", "0"], "0 is not in 1.."),
        ] {
            let err = bench(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} was accepted"))
                .to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn command_line_is_quoted() {
        let args = [
            "target/debug/xtask",
            "bench",
            "--vcpus",
            "1,2",
            "--out",
            "my dir",
        ]
        .map(OsString::from);
        assert_eq!(
            command_line(args),
            "cargo xtask bench --vcpus 1,2 --out 'my dir'"
        );
        // An argument that is not UTF-8 is shown, not refused.
        let args = [
            OsString::from("xtask"),
            "bench".into(),
            "--out".into(),
            std::os::unix::ffi::OsStringExt::from_vec(b"d\xffir".to_vec()),
        ];
        assert_eq!(command_line(args), "cargo xtask bench --out 'd\u{fffd}ir'");
    }

    #[test]
    fn vm_appends_kernel_params_in_order() {
        let Cmd::Vm {
            append, command, ..
        } = parse(&[
            "vm",
            "--append",
            "kvm_amd.npt=0",
            "--append=foo=1,2",
            "--",
            "true",
        ])
        .unwrap()
        .command
        else {
            panic!("not the vm command");
        };
        assert_eq!(append, ["kvm_amd.npt=0", "foo=1,2"]);
        assert_eq!(command, ["true"]);
        let Cmd::Vm { append, .. } = parse(&["vm", "--", "true"]).unwrap().command else {
            panic!("not the vm command");
        };
        assert!(append.is_empty());
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        // (arguments, the flag and bad value the error must name, why it is bad).
        for (bad, flag, value, why) in [
            (
                &["bench", "--vcpus", "0"][..],
                "--vcpus <VCPUS>",
                "0",
                "0 is not in 1..=512",
            ),
            (
                &["bench", "--vcpus", "1,x"],
                "--vcpus <VCPUS>",
                "x",
                "invalid digit found in string",
            ),
            (
                &["bench", "--vcpus", "513"],
                "--vcpus <VCPUS>",
                "513",
                "513 is not in 1..=512",
            ),
            (
                &["bench", "--repeats", "0"],
                "--repeats <REPEATS>",
                "0",
                "0 is not in 1..=50",
            ),
            (
                &["bench", "--bytes-per-vcpu", "16K"],
                "--bytes-per-vcpu <BYTES_PER_VCPU>",
                "16K",
                "`16K` is not a size like 512M or 2G",
            ),
            (
                &["bench", "--bytes-per-vcpu", "99999999999G"],
                "--bytes-per-vcpu <BYTES_PER_VCPU>",
                "99999999999G",
                "`99999999999G` is not a size",
            ),
            (
                &["vm", "--mem", "lots", "--", "true"],
                "--mem <MEM>",
                "lots",
                "`lots` is not a size",
            ),
            (
                &["vm", "--mem", "0G", "--", "true"],
                "--mem <MEM>",
                "0G",
                "`0G` is not a size",
            ),
            (
                &["vm", "--mem", "+2G", "--", "true"],
                "--mem <MEM>",
                "+2G",
                "`+2G` is not a size",
            ),
            (
                &["vm", "--smp", "0", "--", "true"],
                "--smp <SMP>",
                "0",
                "0 is not in 1..=16",
            ),
            (
                &["vm", "--timeout", "0", "--", "true"],
                "--timeout <TIMEOUT>",
                "0",
                "0 is not in 1..",
            ),
            (
                &["test", "--timeout", "0"],
                "--timeout <TIMEOUT>",
                "0",
                "0 is not in 1..",
            ),
            (
                &["vm", "--append", "a b", "--", "true"],
                "--append <PARAM>",
                "a b",
                "` ` is not allowed",
            ),
            (
                &["vm", "--append", "", "--", "true"],
                "--append <PARAM>",
                "",
                "empty kernel parameter",
            ),
            (
                &["vm", "--append=x='1'", "--", "true"],
                "--append <PARAM>",
                "x='1'",
                "`'` is not allowed",
            ),
            (
                &["vm", "--append=--", "--", "true"],
                "--append <PARAM>",
                "--",
                "starts with `-`",
            ),
            (
                &["vm", "--append", "console=tty0", "--", "true"],
                "--append <PARAM>",
                "console=tty0",
                "the harness sets `console` itself",
            ),
        ] {
            let err = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} was accepted"));
            let msg = err.to_string();
            // The first line names the flag, the value given and why it is refused.
            let first = msg.lines().next().unwrap_or_default();
            assert!(
                first.contains(&format!("invalid value '{value}' for '{flag}'")),
                "{bad:?}: {msg}"
            );
            assert!(first.contains(why), "{bad:?}: {msg}");
            // `Cli::parse` exits with this: clap's usage-error status, the message on stderr.
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}"
            );
            assert_eq!(err.exit_code(), 2, "{bad:?}");
            assert!(err.use_stderr(), "{bad:?}");
        }
        // A missing command names what is missing and how to give it.
        let err = parse(&["vm"])
            .err()
            .expect("`vm` without a command was accepted");
        let msg = err.to_string();
        assert!(
            msg.contains("the following required arguments were not provided")
                && msg.contains("<COMMAND>...")
                && msg.contains("Usage: xtask vm -- <COMMAND>..."),
            "{msg}"
        );
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert_eq!(err.exit_code(), 2);
        // A good value is taken as given.
        let Cmd::Vm { timeout, .. } = parse(&["vm", "--timeout", "1", "--", "true"])
            .unwrap()
            .command
        else {
            panic!("not the vm command");
        };
        assert_eq!(timeout, 1);
    }
}
