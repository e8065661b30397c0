//! `cargo xtask bench`: the cover letter's demand-paging table, reproduced in one command.
//!
//! One boot of the patched kernel (under QEMU with TCG or KVM, or this host itself with
//! `--host`) runs the kvm selftests' `demand_paging_test` (built from the same tree) for every
//! configuration side by side — no userfault, userfaultfd MISSING/MINOR, KVM userfault sync exits
//! and async fd, userfaultfd MISSING with KVM userfault sync, on anonymous, shmem and THP memory
//! — for each vCPU count, several times each. The table reports the median pages/s, each KVM
//! userfault row's ratio to the userfaultfd row of the same backing, and the KVM exits and
//! stage-2 faults per page the test counts. Absolute numbers under TCG mean little; the ratios
//! measured in one run, and the counts, are the result. The same results are written as
//! Markdown, CSV and an SVG chart.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::host;
use crate::initramfs::{sh_quote, GuestFile};
use crate::kernel::{self, Flavour, SourceChoice};
use crate::layout::Layout;
use crate::qemu::{self, Accel};
use crate::suite;

/// vCPU counts under TCG: one host thread runs them all.
pub const MAX_VCPUS_TCG: u32 = 64;
/// vCPU counts with hardware virtualisation (`--accel kvm`, `--host`): the selftests'
/// KVM_MAX_VCPUS.
pub const MAX_VCPUS: u32 = 512;

/// Where the matrix runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// In one boot of the patched kernel under QEMU.
    Qemu { accel: Accel, smp: u32, mem: String },
    /// On this host, which already runs the patched kernel.
    Host,
}

impl Target {
    pub fn max_vcpus(&self) -> u32 {
        match self {
            Target::Qemu {
                accel: Accel::Tcg, ..
            } => MAX_VCPUS_TCG,
            _ => MAX_VCPUS,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub source: SourceChoice,
    pub target: Target,
    pub vcpus: Vec<u32>,
    pub bytes_per_vcpu: String,
    pub repeats: u32,
    pub timeout: Duration,
    /// Where bench-results.{md,csv,svg} go; the run directory if unset.
    pub out_dir: Option<PathBuf>,
    /// Also run the runtime's handler_bench example on the host.
    pub handler_bench: bool,
    /// The command as typed, for the header.
    pub command_line: String,
}

impl BenchOptions {
    /// Checks what clap cannot: the vCPU limit depends on the target.
    pub fn validate(&self) -> Result<()> {
        let max = self.target.max_vcpus();
        if self.vcpus.is_empty() || self.vcpus.iter().any(|&v| v == 0 || v > max) {
            bail!(
                "--vcpus takes counts from 1 to {max}{}",
                if max == MAX_VCPUS_TCG {
                    format!(" under TCG (up to {MAX_VCPUS} with --accel kvm or --host)")
                } else {
                    String::new()
                }
            );
        }
        if let Some(v) = self
            .vcpus
            .iter()
            .enumerate()
            .find_map(|(i, v)| self.vcpus[..i].contains(v).then_some(v))
        {
            bail!("--vcpus lists {v} twice");
        }
        if self.repeats == 0 {
            bail!("--repeats must be at least 1");
        }
        Ok(())
    }
}

/// One row of the table: a `demand_paging_test` configuration.
#[derive(Debug)]
pub struct Config {
    pub name: &'static str,
    pub args: &'static str,
    /// The row this one is compared with (by name).
    pub baseline: Option<&'static str>,
}

impl Config {
    /// Whether the test uses KVM userfault (`-k`), and so prints its exit/record count.
    fn kvm_userfault(&self) -> bool {
        self.args.split_whitespace().any(|w| w == "-k")
    }

    fn backing(&self) -> &'static str {
        if self.args.contains("anonymous_thp") {
            "thp"
        } else if self.args.contains("shmem") {
            "shmem"
        } else {
            "anon"
        }
    }

    /// The chart's colour: one per mechanism, the same on every backing.
    fn colour(&self) -> &'static str {
        let uffd = self.args.contains("-u ");
        match (
            uffd,
            self.args.contains("-k sync"),
            self.args.contains("-k async"),
        ) {
            (true, true, _) => "#9467bd",
            (false, true, _) => "#1f77b4",
            (_, _, true) => "#2ca02c",
            (true, false, false) => "#d62728",
            (false, false, false) => "#555555",
        }
    }

    /// The chart's dash pattern: one per backing.
    fn dash(&self) -> &'static str {
        match self.backing() {
            "shmem" => "7 4",
            "thp" => "2 3",
            _ => "",
        }
    }
}

pub const CONFIGS: &[Config] = &[
    Config {
        name: "anon, no userfault",
        args: "",
        baseline: None,
    },
    Config {
        name: "anon, uffd MISSING",
        args: "-u MISSING",
        baseline: None,
    },
    Config {
        name: "anon, KVM userfault sync",
        args: "-k sync",
        baseline: Some("anon, uffd MISSING"),
    },
    Config {
        name: "anon, KVM userfault async",
        args: "-k async",
        baseline: Some("anon, uffd MISSING"),
    },
    // The 2024 cover letter's "MISSING + KVM userfault": userfaultfd registered for KVM's own
    // accesses, KVM userfault for vCPU faults, pages populated with UFFDIO_COPY.
    Config {
        name: "anon, uffd MISSING + KVM userfault sync",
        args: "-u MISSING -k sync",
        baseline: Some("anon, uffd MISSING"),
    },
    Config {
        name: "shmem, no userfault",
        args: "-s shmem",
        baseline: None,
    },
    Config {
        name: "shmem, uffd MINOR",
        args: "-s shmem -u MINOR",
        baseline: None,
    },
    Config {
        name: "shmem, KVM userfault sync",
        args: "-s shmem -k sync",
        baseline: Some("shmem, uffd MINOR"),
    },
    Config {
        name: "shmem, KVM userfault async",
        args: "-s shmem -k async",
        baseline: Some("shmem, uffd MINOR"),
    },
    Config {
        name: "thp, no userfault",
        args: "-s anonymous_thp",
        baseline: None,
    },
    Config {
        name: "thp, uffd MISSING",
        args: "-s anonymous_thp -u MISSING",
        baseline: None,
    },
    Config {
        name: "thp, KVM userfault sync",
        args: "-s anonymous_thp -k sync",
        baseline: Some("thp, uffd MISSING"),
    },
    Config {
        name: "thp, KVM userfault async",
        args: "-s anonymous_thp -k async",
        baseline: Some("thp, uffd MISSING"),
    },
];

/// The result line of one run: `KVMUF-BENCH CONFIG VCPUS REPEAT key=value…`.
const RESULT_MARK: &str = "KVMUF-BENCH ";
/// `uname -r` of the kernel the runs use.
const KERNEL_MARK: &str = "KVMUF-BENCH-KERNEL ";
/// Its transparent huge page setting.
const THP_MARK: &str = "KVMUF-BENCH-THP ";

/// How many lines of a failed run's output the script prints after its `run failed:` line;
/// `run` shows that line and these on stderr.
const FAILED_RUN_TAIL: usize = 25;

/// One run, as a shell function: runs the test, extracts the rate, the `KVM stats:` counts and
/// the `KVM userfault (…)` count from its output, shows the output if the run failed, and prints
/// one result line (what `parse_result_line` reads). Missing values print as `-`. POSIX sh and
/// basic regular expressions only: busybox in the guest, any sh on the host. `@TAIL@` is
/// `FAILED_RUN_TAIL` (see `run_function`).
///
/// The test runs in the background and is waited for: a shell that is waiting for a foreground
/// command runs a signal's trap only once that command ends, but `wait` returns at once, so the
/// trap `run_on_host` sets takes the running test down with the shell.
const RUN_FUNCTION: &str = r#"bench_run() {
	c=$1 v=$2 rep=$3
	shift 3
	"$DPT" -b "$B" -a -v "$v" -r "$v" "$@" >"$OUT" 2>&1 &
	wait $!
	rc=$?
	r=$(sed -n 's/^Overall demand paging rate:[[:space:]]*\([0-9.]*\).*/\1/p' "$OUT" | head -n 1)
	st=$(sed -n 's/^.*KVM stats:\(.*\)$/\1/p' "$OUT" | head -n 1)
	uf=$(sed -n 's/^.*KVM userfault ([a-z]*): \([0-9][0-9]*\) .*/\1/p' "$OUT" | head -n 1)
	pages=- exits=- pf_taken=- pf_fixed=- k=
	for w in $st; do
		case $k in
		pages) pages=$w ;;
		exits) exits=$w ;;
		pf_taken) pf_taken=$w ;;
		pf_fixed) pf_fixed=$w ;;
		esac
		k=$w
	done
	if [ "$rc" != 0 ] || [ -z "$r" ] || [ -z "$st" ]; then
		echo "run failed: -v $v $* (status $rc)"
		tail -n @TAIL@ "$OUT"
	fi
	echo "KVMUF-BENCH $c $v $rep rc=$rc rate=${r:--} pages=$pages exits=$exits pf_taken=$pf_taken pf_fixed=$pf_fixed uf=${uf:--}"
}
"#;

fn run_function() -> String {
    RUN_FUNCTION.replace("@TAIL@", &FAILED_RUN_TAIL.to_string())
}

/// The whole matrix as one shell script, repeat-major. `dpt`: the test binary; `out`: a scratch
/// file for one run's output. The guest and `--host` run the same text but for these two paths.
fn script(opts: &BenchOptions, dpt: &str, out: &str) -> String {
    // No pathname expansion: `bench_run` splits the test's `KVM stats:` line into words
    // unquoted, and a `*` or `?` in what the test printed must stay itself.
    let mut s = String::from("set -f\n");
    let _ = writeln!(
        s,
        "DPT={} OUT={} B={}",
        sh_quote(dpt),
        sh_quote(out),
        sh_quote(&opts.bytes_per_vcpu)
    );
    s.push_str(&run_function());
    let _ = writeln!(s, "echo \"{KERNEL_MARK}$(uname -r)\"");
    let _ = writeln!(
        s,
        "echo \"{THP_MARK}$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo unavailable)\""
    );
    for rep in 0..opts.repeats {
        for v in &opts.vcpus {
            for (i, c) in CONFIGS.iter().enumerate() {
                // -a: one uffd for all vCPUs, -r N readers, as in the published runs.
                let line = format!("bench_run {i} {v} {rep} {}", c.args);
                let _ = writeln!(s, "{}", line.trim_end());
            }
        }
    }
    s
}

/// The counts of the test's `KVM stats:` line, summed over vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KvmStats {
    pages: u64,
    exits: u64,
    pf_taken: u64,
    pf_fixed: u64,
}

/// One successful run.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    rate: f64,
    stats: KvmStats,
    /// With `-k`: the exits (sync) or records (async) it reported.
    uf_reports: Option<u64>,
}

/// One result line: which run, and its sample or why it failed.
#[derive(Debug, Clone, PartialEq)]
struct RunResult {
    config: usize,
    vcpus: u32,
    repeat: u32,
    sample: Result<Sample, String>,
}

/// `None`: not a result line. `Some(Err)`: a result line too damaged to say which run it is.
fn parse_result_line(line: &str) -> Option<Result<RunResult, String>> {
    let rest = line.split(RESULT_MARK).nth(1)?;
    let mut words = rest.split_whitespace();
    let malformed = || format!("malformed result line `{}`", line.trim());
    let mut next_num = || words.next().and_then(|w| w.parse::<u64>().ok());
    let (Some(config), Some(vcpus), Some(repeat)) = (next_num(), next_num(), next_num()) else {
        return Some(Err(malformed()));
    };
    let (Ok(config), Ok(vcpus), Ok(repeat)) = (
        usize::try_from(config),
        u32::try_from(vcpus),
        u32::try_from(repeat),
    ) else {
        return Some(Err(malformed()));
    };
    let Some(cfg) = CONFIGS.get(config) else {
        return Some(Err(malformed()));
    };
    let fields: Vec<(&str, &str)> = words.filter_map(|w| w.split_once('=')).collect();
    let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    Some(Ok(RunResult {
        config,
        vcpus,
        repeat,
        sample: sample_from(cfg, get),
    }))
}

fn sample_from<'a>(cfg: &Config, get: impl Fn(&str) -> Option<&'a str>) -> Result<Sample, String> {
    match get("rc").map(str::parse::<i32>) {
        Some(Ok(0)) => {}
        Some(Ok(rc)) => return Err(format!("demand_paging_test exited with status {rc}")),
        _ => return Err("the result line has no exit status".into()),
    }
    let rate = match get("rate") {
        None | Some("-") => return Err("no `Overall demand paging rate:` line".into()),
        Some(r) => r
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("malformed rate `{r}`"))?,
    };
    let keys = ["pages", "exits", "pf_taken", "pf_fixed"];
    let raw = keys.map(&get);
    if raw.iter().all(|v| matches!(v, None | Some("-"))) {
        return Err("no `KVM stats:` line (pages, exits, pf_taken, pf_fixed)".into());
    }
    let mut n = [0u64; 4];
    for ((slot, key), value) in n.iter_mut().zip(keys).zip(raw) {
        *slot = value.and_then(|v| v.parse().ok()).ok_or_else(|| {
            format!(
                "malformed `KVM stats:` line: {key} is `{}`",
                value.unwrap_or("missing")
            )
        })?;
    }
    let [pages, exits, pf_taken, pf_fixed] = n;
    if pages == 0 {
        return Err("the `KVM stats:` line counts 0 pages".into());
    }
    let uf_reports = match get("uf") {
        None | Some("-") => None,
        Some(u) => Some(
            u.parse::<u64>()
                .map_err(|_| format!("malformed KVM userfault count `{u}`"))?,
        ),
    };
    if cfg.kvm_userfault() && uf_reports.is_none() {
        return Err("no `KVM userfault (sync|async): N exits|records` line".into());
    }
    Ok(Sample {
        rate,
        stats: KvmStats {
            pages,
            exits,
            pf_taken,
            pf_fixed,
        },
        uf_reports,
    })
}

/// Everything the runs printed.
#[derive(Debug, Default)]
struct Collected {
    /// `samples[config][vcpu index]`.
    samples: Vec<Vec<Vec<Sample>>>,
    /// One line per failed or missing run.
    failures: Vec<String>,
    /// `uname -r` of the kernel under test.
    kernel: Option<String>,
    /// Its `transparent_hugepage/enabled`.
    thp: Option<String>,
}

fn collect(lines: &[String], vcpus: &[u32], repeats: u32) -> Collected {
    let mut c = Collected {
        samples: vec![vec![Vec::new(); vcpus.len()]; CONFIGS.len()],
        ..Collected::default()
    };
    // (config, vCPU index, repeat) of every result line taken: a run reports once.
    let mut seen = HashSet::new();
    let mut reported = vec![vec![0u32; vcpus.len()]; CONFIGS.len()];
    for line in lines {
        if let Some(k) = line.split(KERNEL_MARK).nth(1) {
            c.kernel.get_or_insert_with(|| k.trim().to_string());
            continue;
        }
        if let Some(t) = line.split(THP_MARK).nth(1) {
            c.thp.get_or_insert_with(|| t.trim().to_string());
            continue;
        }
        let run = match parse_result_line(line) {
            None => continue,
            Some(Err(e)) => {
                c.failures.push(e);
                continue;
            }
            Some(Ok(run)) => run,
        };
        let malformed = |why: String| format!("malformed result line `{}`: {why}", line.trim());
        let Some(vi) = vcpus.iter().position(|&x| x == run.vcpus) else {
            c.failures.push(malformed(format!(
                "a result for {}, which were not asked for",
                vcpu_label(run.vcpus)
            )));
            continue;
        };
        // Also keeps `repeat + 1` below from overflowing.
        if run.repeat >= repeats {
            c.failures.push(malformed(format!(
                "repeat index {} is not below the {repeats} repeats asked for",
                run.repeat
            )));
            continue;
        }
        let name = CONFIGS[run.config].name;
        let which = format!(
            "{name} with {} (repeat {})",
            vcpu_label(run.vcpus),
            run.repeat + 1
        );
        if !seen.insert((run.config, vi, run.repeat)) {
            c.failures.push(malformed(format!(
                "a second result for {which}, not counted"
            )));
            continue;
        }
        reported[run.config][vi] += 1;
        match run.sample {
            Ok(s) => c.samples[run.config][vi].push(s),
            Err(why) => c.failures.push(format!("{which}: {why}")),
        }
    }
    for (ci, cfg) in CONFIGS.iter().enumerate() {
        for (vi, v) in vcpus.iter().enumerate() {
            // At most `repeats`: each repeat below it is taken once.
            let missing = repeats - reported[ci][vi];
            if missing > 0 {
                c.failures.push(format!(
                    "{} with {}: {missing} of {repeats} runs printed no result line",
                    cfg.name,
                    vcpu_label(*v)
                ));
            }
        }
    }
    c
}

/// The middle value; of an even count, the mean of the two middle values.
fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One configuration at one vCPU count, over its repeats.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Cell {
    samples: usize,
    median: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    /// Median against the baseline row's median at the same vCPU count.
    ratio: Option<f64>,
    /// Medians of the per-page counts (deterministic: the median is the value).
    exits_pp: Option<f64>,
    pf_pp: Option<f64>,
    pf_fixed_pp: Option<f64>,
    uf_pp: Option<f64>,
}

fn summarise(samples: &[Vec<Vec<Sample>>]) -> Vec<Vec<Cell>> {
    let per_page = |runs: &[Sample], f: fn(&Sample) -> Option<u64>| {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|s| Some(f(s)? as f64 / s.stats.pages as f64))
            .collect();
        median(&v)
    };
    let mut cells: Vec<Vec<Cell>> = samples
        .iter()
        .map(|row| {
            row.iter()
                .map(|runs| {
                    let rates: Vec<f64> = runs.iter().map(|s| s.rate).collect();
                    Cell {
                        samples: runs.len(),
                        median: median(&rates),
                        min: rates.iter().copied().reduce(f64::min),
                        max: rates.iter().copied().reduce(f64::max),
                        ratio: None,
                        exits_pp: per_page(runs, |s| Some(s.stats.exits)),
                        pf_pp: per_page(runs, |s| Some(s.stats.pf_taken)),
                        pf_fixed_pp: per_page(runs, |s| Some(s.stats.pf_fixed)),
                        uf_pp: per_page(runs, |s| s.uf_reports),
                    }
                })
                .collect()
        })
        .collect();
    for (ci, c) in CONFIGS.iter().enumerate().take(cells.len()) {
        let Some(bi) = c
            .baseline
            .and_then(|b| CONFIGS.iter().position(|x| x.name == b))
        else {
            continue;
        };
        for vi in 0..cells[ci].len() {
            if let (Some(m), Some(b)) = (cells[ci][vi].median, cells[bi][vi].median) {
                if b > 0.0 {
                    cells[ci][vi].ratio = Some(m / b);
                }
            }
        }
    }
    cells
}

/// The handler_bench example's result.
#[derive(Debug, Clone, PartialEq)]
struct HandlerBench {
    /// Its first line after `handler_bench: ` (the workload).
    workload: String,
    best_mrecords: f64,
    ns_per_record: f64,
    mean_mrecords: f64,
}

const HANDLER_BENCH_ARGS: [&str; 6] = [
    "run",
    "--release",
    "-p",
    "kvm-userfault-harness",
    "--example",
    "handler_bench",
];

/// Reads `best round 15ms = 2.16 M records/s (463 ns/record); mean 1.95 M records/s`.
fn parse_handler_bench(stdout: &str) -> Result<HandlerBench> {
    let parsed = (|| {
        let line = stdout.lines().find(|l| l.starts_with("best round "))?;
        let (_, rest) = line.split_once(" = ")?;
        let (best, rest) = rest.split_once(" M records/s (")?;
        let (ns, rest) = rest.split_once(" ns/record)")?;
        let (_, mean) = rest.split_once("mean ")?;
        let (mean, _) = mean.split_once(" M records/s")?;
        Some(HandlerBench {
            workload: stdout
                .lines()
                .find_map(|l| l.strip_prefix("handler_bench: "))
                .unwrap_or_default()
                .trim()
                .to_string(),
            best_mrecords: best.trim().parse().ok()?,
            ns_per_record: ns.trim().parse().ok()?,
            mean_mrecords: mean.trim().parse().ok()?,
        })
    })();
    parsed.with_context(|| {
        format!(
            "handler_bench printed no line of the form `best round T = X M records/s (Y ns/record); \
             mean Z M records/s`; its output:\n{}",
            host::tail(stdout, 10)
        )
    })
}

fn run_handler_bench(layout: &Layout) -> Result<HandlerBench> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("[bench] cargo {}", HANDLER_BENCH_ARGS.join(" "));
    let out = Command::new(cargo)
        .current_dir(&layout.repo)
        .args(HANDLER_BENCH_ARGS)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo for handler_bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`cargo {}` exited with {}:\n{}",
            HANDLER_BENCH_ARGS.join(" "),
            out.status,
            host::tail(&stdout, 10)
        );
    }
    parse_handler_bench(&stdout)
}

/// The header: what ran where, as (label, value) pairs.
type Meta = Vec<(&'static str, String)>;

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

fn cpu_count(cpuinfo: &str) -> usize {
    cpuinfo
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.trim() == "processor")
        })
        .count()
}

fn mem_total_gib(meminfo: &str) -> Option<f64> {
    let kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / (1024.0 * 1024.0))
}

/// `Linux 6.1.0, AMD EPYC 7B13, 2 CPUs, 23.5 GiB` from the host's files.
fn host_description(osrelease: &str, cpuinfo: &str, meminfo: &str) -> String {
    let mut s = format!(
        "Linux {}, {}, {} CPUs",
        osrelease.trim(),
        cpu_model(cpuinfo).unwrap_or_else(|| "unknown CPU".into()),
        match cpu_count(cpuinfo) {
            0 => std::thread::available_parallelism().map_or(0, |n| n.get()),
            n => n,
        }
    );
    if let Some(gib) = mem_total_gib(meminfo) {
        let _ = write!(s, ", {gib:.1} GiB");
    }
    s
}

fn accel_description(target: &Target) -> String {
    match target {
        Target::Qemu { accel, smp, mem } => {
            let mttcg = qemu::mttcg_requested() && *accel == Accel::Tcg;
            format!(
                "QEMU {} -smp {smp} -m {mem}",
                accel.qemu_args(mttcg).join(" ")
            )
        }
        Target::Host => "none: run on the host itself (--host), no QEMU".into(),
    }
}

fn qemu_version() -> String {
    match host::output(Command::new("qemu-system-x86_64").arg("--version")) {
        Ok(out) => out.lines().next().unwrap_or_default().trim().to_string(),
        Err(e) => format!("unknown ({e:#})"),
    }
}

fn meta(opts: &BenchOptions, collected: &Collected) -> Meta {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let mut m: Meta = vec![
        ("Command", format!("`{}`", opts.command_line)),
        (
            "Host",
            host_description(
                &read("/proc/sys/kernel/osrelease"),
                &read("/proc/cpuinfo"),
                &read("/proc/meminfo"),
            ),
        ),
        (
            "Kernel under test",
            collected
                .kernel
                .clone()
                .unwrap_or_else(|| "unknown (no uname -r line)".into()),
        ),
    ];
    if matches!(opts.target, Target::Qemu { .. }) {
        m.push(("QEMU", qemu_version()));
    }
    m.push(("Accelerator", accel_description(&opts.target)));
    if let Some(thp) = &collected.thp {
        m.push(("THP (transparent_hugepage/enabled)", thp.clone()));
    }
    if let Ok(date) = host::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])) {
        m.push(("Date", date.trim().to_string()));
    }
    m
}

/// Everything the three renderings show.
struct Report<'a> {
    meta: &'a Meta,
    bytes_per_vcpu: &'a str,
    repeats: u32,
    vcpus: &'a [u32],
    cells: &'a [Vec<Cell>],
    failures: &'a [String],
    /// `None`: not run (`--no-handler-bench`).
    handler: Option<&'a Result<HandlerBench, String>>,
}

impl Report<'_> {
    fn workload(&self) -> String {
        format!(
            "demand_paging_test -b {} -a -v N -r N, median of {} run{}",
            self.bytes_per_vcpu,
            self.repeats,
            if self.repeats == 1 { "" } else { "s" }
        )
    }

    fn handler_line(&self) -> Option<String> {
        Some(match self.handler? {
            Ok(h) => format!(
                "{:.2} M records/s best round ({:.0} ns/record), {:.2} M records/s mean ({})",
                h.best_mrecords, h.ns_per_record, h.mean_mrecords, h.workload
            ),
            Err(e) => format!(
                "failed: {}",
                e.lines().next().unwrap_or_default().trim_end_matches(':')
            ),
        })
    }
}

fn vcpu_label(v: u32) -> String {
    format!("{v} vCPU{}", if v == 1 { "" } else { "s" })
}

fn render_markdown(r: &Report) -> String {
    let mut t = String::new();
    for (k, v) in r.meta {
        let _ = writeln!(t, "- {k}: {v}");
    }
    let _ = writeln!(
        t,
        "\n{}: pages/s (ratio to the uffd row of the same backing) · KVM exits per page · \
         stage-2 faults (pf_taken) per page; [n/{}]: only n runs succeeded\n",
        r.workload(),
        r.repeats
    );
    let _ = write!(t, "| config |");
    for v in r.vcpus {
        let _ = write!(t, " {} |", vcpu_label(*v));
    }
    let _ = write!(t, "\n|---|");
    for _ in r.vcpus {
        let _ = write!(t, "---|");
    }
    t.push('\n');
    for (ci, c) in CONFIGS.iter().enumerate() {
        let _ = write!(t, "| {} |", c.name);
        for cell in &r.cells[ci] {
            let Some(m) = cell.median else {
                t.push_str(" - |");
                continue;
            };
            let _ = write!(t, " {m:.0}");
            if let Some(ratio) = cell.ratio {
                let _ = write!(t, " ({ratio:.2}x)");
            }
            if let Some(e) = cell.exits_pp {
                let _ = write!(t, " · {e:.2} exit/pg");
            }
            if let Some(p) = cell.pf_pp {
                let _ = write!(t, " · {p:.2} pf/pg");
            }
            if cell.samples < r.repeats as usize {
                let _ = write!(t, " [{}/{}]", cell.samples, r.repeats);
            }
            t.push_str(" |");
        }
        t.push('\n');
    }
    if let Some(h) = r.handler_line() {
        let _ = writeln!(
            t,
            "\nThe runtime's handler alone (`cargo {}`, on the host, one thread): {h}",
            HANDLER_BENCH_ARGS.join(" ")
        );
    }
    if !r.failures.is_empty() {
        let _ = writeln!(t, "\nFailed runs (not in the medians):");
        for f in r.failures {
            let _ = writeln!(t, "- {f}");
        }
    }
    t
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn render_csv(r: &Report) -> String {
    let mut t = String::new();
    // Metadata as comment lines: most CSV readers take `#` lines as comments when told to
    // (pandas: comment="#").
    for (k, v) in r.meta {
        let _ = writeln!(t, "# {k}: {}", v.trim_matches('`'));
    }
    let _ = writeln!(t, "# Workload: {}", r.workload());
    if let Some(h) = r.handler_line() {
        let _ = writeln!(t, "# handler_bench: {h}");
    }
    let _ = writeln!(t, "# Failed runs: {}", r.failures.len());
    t.push_str(
        "config,args,baseline,vcpus,samples,median_pages_per_s,min_pages_per_s,max_pages_per_s,\
         ratio,exits_per_page,pf_taken_per_page,pf_fixed_per_page,kvm_userfault_reports_per_page\n",
    );
    let num = |x: Option<f64>, prec: usize| x.map_or(String::new(), |x| format!("{x:.prec$}"));
    for (ci, c) in CONFIGS.iter().enumerate() {
        for (vi, v) in r.vcpus.iter().enumerate() {
            let cell = &r.cells[ci][vi];
            let _ = writeln!(
                t,
                "{},{},{},{v},{},{},{},{},{},{},{},{},{}",
                csv_field(c.name),
                csv_field(c.args),
                csv_field(c.baseline.unwrap_or_default()),
                cell.samples,
                num(cell.median, 2),
                num(cell.min, 2),
                num(cell.max, 2),
                num(cell.ratio, 3),
                num(cell.exits_pp, 3),
                num(cell.pf_pp, 3),
                num(cell.pf_fixed_pp, 3),
                num(cell.uf_pp, 3),
            );
        }
    }
    t
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A tick step of 1, 2, 2.5 or 5 × 10^k giving about five ticks from 0, and the axis top (a
/// multiple of the step at or above `max`).
fn nice_ticks(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    (step, (max / step).ceil() * step)
}

/// `v` with as many decimals as `step` needs (0.25: two).
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (0..6)
        .find(|&d| {
            let scaled = step * 10f64.powi(d);
            (scaled - scaled.round()).abs() < 1e-9 * scaled.max(1.0)
        })
        .unwrap_or(6) as usize;
    format!("{v:.decimals$}")
}

/// A measured value for a tooltip: rates whole, per-page counts to three decimals.
fn value_label(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

// The chart is hand-written SVG: a few polylines, axes, ticks and a legend are simpler to emit
// than a plotting crate is to vet and build, and it keeps xtask free of dependencies.
const SVG_W: f64 = 1000.0;
const PLOT_X: f64 = 90.0;
const PLOT_W: f64 = 560.0;
const PLOT_H: f64 = 180.0;
const PANEL_H: f64 = 270.0;
const TOP: f64 = 62.0;
const LEGEND_X: f64 = 690.0;

/// A panel: its title, its y axis label, its value.
type Measure = (&'static str, &'static str, fn(&Cell) -> Option<f64>);

const MEASURES: [Measure; 3] = [
    ("pages/s (median)", "pages/s", |c| c.median),
    ("KVM exits per page", "exits/page", |c| c.exits_pp),
    ("stage-2 faults (pf_taken) per page", "pf_taken/page", |c| {
        c.pf_pp
    }),
];

fn render_svg(r: &Report) -> String {
    let height = TOP + PANEL_H * MEASURES.len() as f64 + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{height}" viewBox="0 0 {SVG_W} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{SVG_W}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{PLOT_X}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        xml_escape(&r.workload())
    );
    // Under it, where it ran.
    let where_: Vec<String> = r
        .meta
        .iter()
        .filter(|(k, _)| ["Accelerator", "Kernel under test"].contains(k))
        .map(|(k, v)| format!("{}: {v}", k.to_lowercase()))
        .collect();
    let _ = writeln!(
        s,
        r##"<text x="{PLOT_X}" y="40" fill="#444">{}</text>"##,
        xml_escape(&where_.join("; "))
    );
    let n = r.vcpus.len().max(1) as f64;
    let x_of = |i: usize| PLOT_X + PLOT_W * (i as f64 + 0.5) / n;
    for (pi, (label, y_label, measure)) in MEASURES.iter().enumerate() {
        let top = TOP + PANEL_H * pi as f64 + 20.0;
        let bottom = top + PLOT_H;
        let max = r
            .cells
            .iter()
            .flatten()
            .filter_map(measure)
            .fold(0.0, f64::max);
        let (step, y_top) = nice_ticks(max);
        let y_of = |v: f64| bottom - v / y_top * PLOT_H;
        let _ = writeln!(
            s,
            r#"<g><text x="{PLOT_X}" y="{:.1}" font-weight="bold">{}</text>"#,
            top - 8.0,
            xml_escape(label)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{PLOT_X}" y="{top:.1}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="#888"/>"##
        );
        let ticks = (y_top / step).round() as usize;
        for k in 0..=ticks {
            let v = step * k as f64;
            let y = y_of(v);
            let _ = writeln!(
                s,
                r##"<line x1="{PLOT_X}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                PLOT_X + PLOT_W,
                PLOT_X - 6.0,
                y + 4.0,
                tick_label(v, step)
            );
        }
        for (i, v) in r.vcpus.iter().enumerate() {
            let x = x_of(i);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{bottom:.1}" x2="{x:.1}" y2="{:.1}" stroke="#888"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{v}</text>"##,
                bottom + 5.0,
                bottom + 18.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">vCPUs</text>"#,
            PLOT_X + PLOT_W / 2.0,
            bottom + 34.0
        );
        let (ly, lx) = ((top + bottom) / 2.0, PLOT_X - 62.0);
        let _ = writeln!(
            s,
            r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" transform="rotate(-90 {lx:.1} {ly:.1})">{}</text>"#,
            xml_escape(y_label)
        );
        for (ci, c) in CONFIGS.iter().enumerate() {
            let points: Vec<Option<(f64, f64)>> = r.cells[ci]
                .iter()
                .enumerate()
                .map(|(i, cell)| measure(cell).map(|v| (x_of(i), y_of(v))))
                .collect();
            let dash = match c.dash() {
                "" => String::new(),
                d => format!(r#" stroke-dasharray="{d}""#),
            };
            // A missing value breaks the line.
            for segment in points.split(Option::is_none) {
                if segment.len() < 2 {
                    continue;
                }
                let pts: Vec<String> = segment
                    .iter()
                    .flatten()
                    .map(|(x, y)| format!("{x:.1},{y:.1}"))
                    .collect();
                let _ = writeln!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.8"{dash}/>"#,
                    pts.join(" "),
                    c.colour()
                );
            }
            for (i, p) in points.iter().enumerate() {
                let (Some((x, y)), Some(v)) = (p, measure(&r.cells[ci][i])) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{}"><title>{}</title></circle>"#,
                    c.colour(),
                    xml_escape(&format!(
                        "{}, {}: {}",
                        c.name,
                        vcpu_label(r.vcpus[i]),
                        value_label(v)
                    ))
                );
            }
        }
        s.push_str("</g>\n");
    }
    // The legend, beside the first panel: colour = mechanism, dash = backing.
    s.push_str("<g>\n");
    for (ci, c) in CONFIGS.iter().enumerate() {
        let y = TOP + 30.0 + 17.0 * ci as f64;
        let dash = match c.dash() {
            "" => String::new(),
            d => format!(r#" stroke-dasharray="{d}""#),
        };
        let _ = writeln!(
            s,
            r#"<line x1="{LEGEND_X}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEGEND_X + 30.0,
            c.colour(),
            LEGEND_X + 36.0,
            y + 4.0,
            xml_escape(c.name)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{LEGEND_X}" y="{:.1}" fill="#444">colour: mechanism; dash: backing</text>"##,
        TOP + 30.0 + 17.0 * CONFIGS.len() as f64 + 6.0
    );
    s.push_str("</g>\n</svg>\n");
    s
}

/// The start of every script `run_on_host` runs. The shell's parent-death signal is SIGTERM
/// (see `spawn_on_host`): when xtask ends, however it ends (Ctrl-C, which reaches only xtask's
/// process group, included), the shell kills its own process group, the running test with it.
/// `kill -9 0` ends the shell too, so the script does not go on to the next run.
const HOST_PROLOGUE: &str = "trap 'kill -9 0' HUP INT TERM\n";

/// Starts `sh DIR/bench.sh` holding `HOST_PROLOGUE` and `script`, in a process group of its
/// own. A file rather than `sh -c`: one argument is limited to 128 KiB, and the unrolled
/// matrix can be longer.
fn spawn_on_host(script: &str, dir: &Path) -> Result<Child> {
    let file = dir.join("bench.sh");
    fs::write(&file, format!("{HOST_PROLOGUE}{script}"))
        .with_context(|| format!("writing {}", file.display()))?;
    let parent = std::process::id();
    let mut cmd = Command::new("sh");
    cmd.arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group, so a timeout ends the test it is running too. That also keeps
        // the terminal's Ctrl-C from reaching it: the parent-death signal stands in.
        .process_group(0);
    // The signal comes when the thread that started sh ends: `run_on_host`'s caller, which
    // waits for sh before it returns.
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2) and
    // getppid(2), which are async-signal-safe, and builds its errors without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // xtask may have ended between fork and prctl: then no signal will come.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn().context("cannot start sh")
}

/// Runs `script` with `sh` on this host (its file in `dir`), collecting its stdout lines until
/// it exits or `timeout` passes (then its process group is killed). Returns the lines and, on
/// a timeout, why the run is incomplete.
fn run_on_host(
    script: &str,
    dir: &Path,
    timeout: Duration,
) -> Result<(Vec<String>, Option<String>)> {
    let started = Instant::now();
    let mut child = spawn_on_host(script, dir)?;
    let stdout = child.stdout.take().context("sh stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = started + timeout;
    let mut lines = Vec::new();
    let mut timed_out = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            if let Ok(pgid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on the process group this function started; no memory is
                // involved.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            timed_out = Some(format!(
                "the runs on the host timed out after {timeout:.0?} and were killed"
            ));
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    Ok((lines, timed_out))
}

/// `--host`: this host must have KVM that this user may use (whether it is the patched kernel,
/// the runs tell).
fn check_host_kvm(dev_kvm: &Path) -> Result<()> {
    if !dev_kvm.exists() {
        bail!(
            "--host: {} does not exist: this host has no KVM; boot it into the patched kernel \
             with KVM enabled, or drop --host to run under QEMU",
            dev_kvm.display()
        );
    }
    if let Err(e) = qemu::open_dev_kvm(dev_kvm) {
        bail!(
            "--host: {} does not open read-write ({e}): the tests need it; run as a user in its \
             group (usually `kvm`) or as root",
            dev_kvm.display()
        );
    }
    Ok(())
}

/// `--host`: the built test must run here (it is static, but the host may lack something).
fn check_test_runs(dpt: &Path) -> Result<()> {
    if !dpt.is_file() {
        bail!("{} was not built", dpt.display());
    }
    let status = Command::new(dpt)
        .arg("-h")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("--host: cannot run {} -h", dpt.display()))?;
    if status.code().is_none() {
        bail!("--host: {} -h was killed: {status}", dpt.display());
    }
    Ok(())
}

/// `16M`, `2G` in bytes: digits and a unit, nothing else (no sign, no spaces); `None` if it
/// is not such a size or does not fit in a u64. `--mem` and `-b` take the same syntax.
pub fn size_bytes(s: &str) -> Option<u64> {
    let (num, shift) = match (s.strip_suffix('M'), s.strip_suffix('G')) {
        (Some(num), _) => (num, 20),
        (_, Some(num)) => (num, 30),
        _ => return None,
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// A directory that is removed when dropped, on every way out of the function that holds it.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(path: PathBuf) -> Result<Self> {
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// How many failures the final error names; the rest are in bench-results.md.
const FAILURES_SHOWN: usize = 3;

/// The final error's line about failed runs: their count, the first few, where the rest are.
fn failures_summary(failures: &[String], results: &Path, log: &str) -> String {
    let mut s = format!(
        "{} demand_paging_test run{} failed ({}",
        failures.len(),
        if failures.len() == 1 { "" } else { "s" },
        failures[..failures.len().min(FAILURES_SHOWN)].join("; ")
    );
    if failures.len() > FAILURES_SHOWN {
        let _ = write!(s, "; and {} more", failures.len() - FAILURES_SHOWN);
    }
    let _ = write!(s, "); all of them in {}; console: {log}", results.display());
    s
}

pub fn run(layout: &Layout, opts: &BenchOptions) -> Result<()> {
    opts.validate()?;
    // What the target needs, before anything is built.
    match &opts.target {
        Target::Qemu {
            accel: Accel::Kvm, ..
        } => qemu::check_kvm_host(&qemu::KvmHostProbe::read())?,
        Target::Host => check_host_kvm(Path::new("/dev/kvm"))?,
        Target::Qemu { .. } => {}
    }
    if let Target::Qemu { mem, .. } = &opts.target {
        let max_v = opts.vcpus.iter().copied().max().unwrap_or(1);
        if let (Some(b), Some(m)) = (size_bytes(&opts.bytes_per_vcpu), size_bytes(mem)) {
            if b.saturating_mul(u64::from(max_v)) > m / 4 * 3 {
                eprintln!(
                    "[bench] warning: {max_v} vCPUs x {} is more than 3/4 of the guest's {mem} \
                     (--mem): the largest runs may fail",
                    opts.bytes_per_vcpu
                );
            }
        }
    }
    let kernel = kernel::build(layout, &opts.source, Flavour::Default)?;
    let bins = kernel::build_c_selftests(&kernel, &["demand_paging_test".to_string()])?;
    let (_, dpt) = bins
        .into_iter()
        .next()
        .context("demand_paging_test was not built")?;

    eprintln!(
        "[bench] {} configurations x vCPUs {:?} x {} repeats, {} per vCPU ({})",
        CONFIGS.len(),
        opts.vcpus,
        opts.repeats,
        opts.bytes_per_vcpu,
        accel_description(&opts.target)
    );
    let mut problems = Vec::new();
    let (lines, log) = match &opts.target {
        Target::Qemu { accel, smp, mem } => {
            let script = script(opts, "/bench/demand_paging_test", "/tmp/out");
            let files = [GuestFile {
                host: dpt,
                guest: "/bench/demand_paging_test".into(),
            }];
            let outcome = suite::boot(
                layout,
                &kernel,
                &suite::BootSpec {
                    tag: "bench",
                    script: &script,
                    files: &files,
                    extra_cmdline: &[],
                    accel: *accel,
                    smp: *smp,
                    mem,
                    timeout: opts.timeout,
                    echo: false,
                },
            )?;
            if !outcome.success() {
                // Keep what finished (a timeout at the last runs loses little), unless nothing
                // did.
                if !outcome.console.iter().any(|l| l.contains(RESULT_MARK)) {
                    bail!("{}", outcome.failure_report());
                }
                eprintln!("{}", outcome.failure_report());
                problems.push(
                    outcome
                        .failure_report()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            (outcome.console, outcome.log.display().to_string())
        }
        Target::Host => {
            check_test_runs(&dpt)?;
            let scratch = ScratchDir::create(
                layout
                    .run_dir()
                    .join(format!("bench-host-{}", std::process::id())),
            )?;
            let out = scratch.0.join("out");
            let script = script(opts, &dpt.to_string_lossy(), &out.to_string_lossy());
            let (lines, timed_out) = run_on_host(&script, &scratch.0, opts.timeout)?;
            drop(scratch);
            problems.extend(timed_out);
            (lines, "the output above".to_string())
        }
    };
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("run failed: ") {
            // The line and the output tail the script shows after it.
            let end = (i + 1 + FAILED_RUN_TAIL).min(lines.len());
            eprintln!("[bench] {}", lines[i..end].join("\n"));
        }
    }
    let dir = opts.out_dir.clone().unwrap_or_else(|| layout.run_dir());
    let collected = collect(&lines, &opts.vcpus, opts.repeats);
    if !collected.failures.is_empty() {
        problems.push(failures_summary(
            &collected.failures,
            &dir.join("bench-results.md"),
            &log,
        ));
    }
    let handler = opts.handler_bench.then(|| {
        run_handler_bench(layout).map_err(|e| {
            let e = format!("{e:#}");
            eprintln!("[bench] handler_bench: {e}");
            problems.push(format!(
                "handler_bench: {}",
                e.lines().next().unwrap_or_default()
            ));
            e
        })
    });
    let meta = meta(opts, &collected);
    let cells = summarise(&collected.samples);
    let report = Report {
        meta: &meta,
        bytes_per_vcpu: &opts.bytes_per_vcpu,
        repeats: opts.repeats,
        vcpus: &opts.vcpus,
        cells: &cells,
        failures: &collected.failures,
        handler: handler.as_ref(),
    };
    let md = render_markdown(&report);
    println!("{md}");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (ext, text) in [
        ("md", md),
        ("csv", render_csv(&report)),
        ("svg", render_svg(&report)),
    ] {
        let path = dir.join(format!("bench-results.{ext}"));
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("[bench] written to {}", path.display());
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(vcpus: &[u32], repeats: u32) -> BenchOptions {
        BenchOptions {
            source: SourceChoice {
                kernel_src: None,
                no_apply: false,
            },
            target: Target::Qemu {
                accel: Accel::Tcg,
                smp: 2,
                mem: "2G".into(),
            },
            vcpus: vcpus.to_vec(),
            bytes_per_vcpu: "16M".into(),
            repeats,
            timeout: Duration::from_secs(1),
            out_dir: None,
            handler_bench: false,
            command_line: "cargo xtask bench".into(),
        }
    }

    fn idx(name: &str) -> usize {
        CONFIGS.iter().position(|c| c.name == name).unwrap()
    }

    fn sample(rate: f64, pages: u64, exits: u64, pf: u64) -> Sample {
        Sample {
            rate,
            stats: KvmStats {
                pages,
                exits,
                pf_taken: pf,
                pf_fixed: pages,
            },
            uf_reports: Some(pages),
        }
    }

    #[test]
    fn configs_are_the_published_rows_and_more() {
        let rows: Vec<(&str, &str)> = CONFIGS.iter().map(|c| (c.name, c.args)).collect();
        for row in [
            (
                "anon, uffd MISSING + KVM userfault sync",
                "-u MISSING -k sync",
            ),
            ("thp, no userfault", "-s anonymous_thp"),
            ("thp, uffd MISSING", "-s anonymous_thp -u MISSING"),
            ("thp, KVM userfault sync", "-s anonymous_thp -k sync"),
            ("thp, KVM userfault async", "-s anonymous_thp -k async"),
            ("shmem, uffd MINOR", "-s shmem -u MINOR"),
        ] {
            assert!(rows.contains(&row), "{row:?}");
        }
        for c in CONFIGS {
            if let Some(b) = c.baseline {
                let base = &CONFIGS[idx(b)];
                assert!(base.baseline.is_none(), "{}", c.name);
                assert_eq!(base.backing(), c.backing(), "{}", c.name);
            }
            assert_eq!(c.kvm_userfault(), c.args.contains("-k "), "{}", c.name);
        }
        assert_eq!(
            CONFIGS[idx("thp, KVM userfault sync")].baseline,
            Some("thp, uffd MISSING")
        );
        assert_eq!(
            CONFIGS[idx("anon, uffd MISSING + KVM userfault sync")].baseline,
            Some("anon, uffd MISSING")
        );
    }

    #[test]
    fn vcpu_limits_depend_on_the_target() {
        let mut o = options(&[1, 64], 1);
        o.validate().unwrap();
        o.vcpus = vec![65];
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("1 to 64 under TCG"), "{e}");
        for target in [
            Target::Host,
            Target::Qemu {
                accel: Accel::Kvm,
                smp: 2,
                mem: "2G".into(),
            },
        ] {
            o.target = target;
            o.vcpus = vec![1, 96, 512];
            o.validate().unwrap();
            o.vcpus = vec![513];
            assert!(o.validate().unwrap_err().to_string().contains("1 to 512"));
        }
        o.vcpus = vec![1, 2, 1];
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("lists 1 twice"), "{e}");
        o.vcpus = vec![];
        assert!(o.validate().is_err());
    }

    #[test]
    fn result_lines_parse() {
        let anon = idx("anon, no userfault");
        let sync = idx("anon, KVM userfault sync");
        let ok = format!(
            "[   12.3] KVMUF-BENCH {sync} 2 1 rc=0 rate=5084.5 pages=8192 exits=8200 pf_taken=8196 pf_fixed=8192 uf=8192"
        );
        assert_eq!(
            parse_result_line(&ok),
            Some(Ok(RunResult {
                config: sync,
                vcpus: 2,
                repeat: 1,
                sample: Ok(Sample {
                    rate: 5084.5,
                    stats: KvmStats {
                        pages: 8192,
                        exits: 8200,
                        pf_taken: 8196,
                        pf_fixed: 8192
                    },
                    uf_reports: Some(8192),
                }),
            }))
        );
        // No `-k`: no userfault count needed.
        let line = format!(
            "KVMUF-BENCH {anon} 1 0 rc=0 rate=12118 pages=4096 exits=4100 pf_taken=4098 pf_fixed=4096 uf=-"
        );
        let run = parse_result_line(&line).unwrap().unwrap();
        assert_eq!(run.sample.unwrap().uf_reports, None);

        assert_eq!(parse_result_line("Overall demand paging rate: 5.0"), None);
        assert_eq!(parse_result_line("KVMUF-BENCH-KERNEL 7.3.4"), None);

        let why = |line: String| {
            parse_result_line(&line)
                .unwrap()
                .unwrap()
                .sample
                .unwrap_err()
        };
        let full = "pages=4096 exits=4100 pf_taken=4098 pf_fixed=4096";
        assert!(
            why(format!("KVMUF-BENCH {sync} 1 0 rc=0 rate=5000 {full} uf=-"))
                .contains("no `KVM userfault")
        );
        assert!(why(format!(
            "KVMUF-BENCH {anon} 1 0 rc=0 rate=5000 pages=- exits=- pf_taken=- pf_fixed=- uf=-"
        ))
        .contains("no `KVM stats:` line"));
        assert!(why(format!("KVMUF-BENCH {anon} 1 0 rc=0 rate=5000")).contains("no `KVM stats:`"));
        assert!(why(format!(
            "KVMUF-BENCH {anon} 1 0 rc=0 rate=5000 pages=4096 exits=x pf_taken=1 pf_fixed=1"
        ))
        .contains("exits is `x`"));
        assert!(why(format!(
            "KVMUF-BENCH {anon} 1 0 rc=0 rate=5000 pages=4096 exits=1 pf_fixed=1"
        ))
        .contains("pf_taken is `missing`"));
        assert!(why(format!(
            "KVMUF-BENCH {anon} 1 0 rc=0 rate=5000 pages=0 exits=1 pf_taken=1 pf_fixed=1"
        ))
        .contains("0 pages"));
        assert!(why(format!("KVMUF-BENCH {anon} 1 0 rc=0 rate=- {full}"))
            .contains("no `Overall demand paging rate:`"));
        assert!(
            why(format!("KVMUF-BENCH {anon} 1 0 rc=0 rate=1.2.3 {full}"))
                .contains("malformed rate `1.2.3`")
        );
        assert!(why(format!("KVMUF-BENCH {anon} 1 0 rc=254 rate=- {full}"))
            .contains("exited with status 254"));
        assert!(why(format!("KVMUF-BENCH {anon} 1 0 rate=5000 {full}")).contains("no exit status"));
        assert!(why(format!(
            "KVMUF-BENCH {sync} 1 0 rc=0 rate=5000 {full} uf=lots"
        ))
        .contains("malformed KVM userfault count"));

        // Lines that cannot be attributed to a run.
        for bad in [
            "KVMUF-BENCH ".to_string(),
            "KVMUF-BENCH 1 x 0 rc=0".to_string(),
            format!("KVMUF-BENCH {} 1 0 rc=0", CONFIGS.len()),
            "KVMUF-BENCH -1 1 0 rc=0".to_string(),
        ] {
            let e = parse_result_line(&bad).unwrap().unwrap_err();
            assert!(e.contains("malformed result line"), "{bad}: {e}");
        }
    }

    #[test]
    fn collect_counts_failures_and_missing_runs() {
        let anon = idx("anon, no userfault");
        let full = "pages=4096 exits=4096 pf_taken=4096 pf_fixed=4096 uf=-";
        let lines: Vec<String> = vec![
            "KVMUF-BENCH-KERNEL 7.3.4-kvmuf".into(),
            "KVMUF-BENCH-THP always [madvise] never".into(),
            format!("KVMUF-BENCH {anon} 1 0 rc=0 rate=100 {full}"),
            format!("KVMUF-BENCH {anon} 1 1 rc=0 rate=300 {full}"),
            format!("KVMUF-BENCH {anon} 2 0 rc=0 rate=200 pages=4096"),
            format!("KVMUF-BENCH {anon} 8 0 rc=0 rate=200 {full}"),
            "KVMUF-BENCH garbage".into(),
            // The same run again: a failure, not a third sample.
            format!("KVMUF-BENCH {anon} 1 1 rc=0 rate=900 {full}"),
            // Repeats out of range: u32::MAX once made `repeat + 1` overflow.
            format!("KVMUF-BENCH {anon} 2 {} rc=0 rate=200 {full}", u32::MAX),
            format!("KVMUF-BENCH {anon} 2 2 rc=0 rate=200 {full}"),
        ];
        let c = collect(&lines, &[1, 2], 2);
        assert_eq!(c.kernel.as_deref(), Some("7.3.4-kvmuf"));
        assert_eq!(c.thp.as_deref(), Some("always [madvise] never"));
        let rates: Vec<f64> = c.samples[anon][0].iter().map(|s| s.rate).collect();
        assert_eq!(rates, [100.0, 300.0]);
        assert!(c.samples[anon][1].is_empty());
        let f = c.failures.join("\n");
        assert!(
            f.contains(&format!(
                "malformed result line `KVMUF-BENCH {anon} 1 1 rc=0 rate=900 {full}`: a second \
                 result for anon, no userfault with 1 vCPU (repeat 2), not counted"
            )),
            "{f}"
        );
        assert!(
            f.contains(&format!(
                "`KVMUF-BENCH {anon} 2 {} rc=0 rate=200 {full}`: repeat index {} is not below \
                 the 2 repeats asked for",
                u32::MAX,
                u32::MAX
            )),
            "{f}"
        );
        assert!(
            f.contains(&format!("rate=200 {full}`: repeat index 2 is not below")),
            "{f}"
        );
        assert!(
            f.contains("anon, no userfault with 2 vCPUs (repeat 1): malformed `KVM stats:`"),
            "{f}"
        );
        assert!(
            f.contains(&format!(
                "`KVMUF-BENCH {anon} 8 0 rc=0 rate=200 {full}`: a result for 8 vCPUs, which \
                 were not asked for"
            )),
            "{f}"
        );
        assert!(
            f.contains("malformed result line `KVMUF-BENCH garbage`"),
            "{f}"
        );
        assert!(
            f.contains("anon, no userfault with 2 vCPUs: 1 of 2 runs printed no result line"),
            "{f}"
        );
        // Every other configuration is missing both runs at both counts.
        assert!(
            f.contains("thp, KVM userfault async with 1 vCPU: 2 of 2 runs"),
            "{f}"
        );
        assert_eq!(c.failures.len(), 3 + 3 + 1 + 2 * (CONFIGS.len() - 1));
    }

    #[test]
    fn median_of_even_counts_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[300.0, 100.0]), Some(200.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[1.0, 1.0, 5.0, 9.0]), Some(3.0));
    }

    /// A scratch directory for one test, removed however the test ends.
    fn test_dir(name: &str) -> ScratchDir {
        ScratchDir::create(
            std::env::temp_dir().join(format!("xtask-bench-{name}-{}", std::process::id())),
        )
        .unwrap()
    }

    /// The script, run by the host's sh against a stand-in for demand_paging_test printing what
    /// the real one prints: the extraction and the result lines, end to end.
    #[test]
    fn script_extracts_rate_and_counts() {
        let scratch = test_dir("script");
        let dir = &scratch.0;
        let fake = dir.join("demand_paging_test");
        // -v 1: a good run (sync/async print their count); -v 2: no stats line; -v 4: the test
        // fails after printing its rate.
        fs::write(
            &fake,
            r#"#!/bin/sh
v=0 k=
while getopts "ab:v:r:u:k:s:" o; do
	case $o in v) v=$OPTARG ;; k) k=$OPTARG ;; esac
done
echo "Populate memory time: 0.1s"
case $k in
sync) echo "KVM userfault (sync): 4096 exits for 4096 pages (0 repeated); guest first reads: 4096 with the pattern" ;;
async) echo "KVM userfault (async): 4096 records for 4096 pages (0 repeated); guest first reads: 4096" ;;
esac
echo "Overall demand paging rate:	5084.123456 pgs/sec"
case $v in
1) printf 'KVM stats:\tpages 4096 exits 4100 pf_taken 4098 pf_fixed 4096 (per page: 1.001 1.000 1.000)\n' ;;
4) echo "==== Test Assertion Failure ===="; exit 254 ;;
esac
exit 0
"#,
        )
        .unwrap();
        let mut perm = fs::metadata(&fake).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        fs::set_permissions(&fake, perm).unwrap();

        let opts = options(&[1, 2, 4], 1);
        let text = script(
            &opts,
            &fake.to_string_lossy(),
            &dir.join("out with space").to_string_lossy(),
        );
        assert!(text.contains(&run_function()));
        assert!(RUN_FUNCTION.contains(&format!("echo \"{RESULT_MARK}$c ")));
        assert!(
            text.contains(&format!("\ttail -n {FAILED_RUN_TAIL} \"$OUT\"\n"))
                && !text.contains("@TAIL@"),
            "{text}"
        );
        let sync = idx("anon, KVM userfault sync");
        assert!(
            text.contains(&format!("\nbench_run {sync} 2 0 -k sync\n")),
            "{text}"
        );
        assert!(text.contains("\nbench_run 0 1 0\n"), "{text}");
        let (lines, timed_out) = run_on_host(&text, dir, Duration::from_secs(60)).unwrap();
        assert_eq!(timed_out, None);
        check_extraction(&opts, &lines);

        // The guest runs it with busybox's sh, sed, head and tail: the same again with those,
        // where busybox is installed. Nothing else `cargo test` runs needs busybox (the VM
        // commands install it when they need it), so without it this half is skipped, saying so.
        let busybox = Path::new("/bin/busybox");
        if !busybox.is_file() {
            eprintln!(
                "script_extracts_rate_and_counts: skipping the busybox half: no /bin/busybox \
                 (apt-get install busybox-static)"
            );
        } else {
            let applets = dir.join("applets");
            fs::create_dir_all(&applets).unwrap();
            for applet in ["sh", "sed", "head", "tail", "cat", "uname"] {
                std::os::unix::fs::symlink(busybox, applets.join(applet)).unwrap();
            }
            let file = dir.join("script");
            fs::write(&file, &text).unwrap();
            let (lines, timed_out) = run_on_host(
                &format!(
                    "PATH={}:$PATH exec /bin/busybox sh {}",
                    sh_quote(&applets.to_string_lossy()),
                    sh_quote(&file.to_string_lossy())
                ),
                dir,
                Duration::from_secs(60),
            )
            .unwrap();
            assert_eq!(timed_out, None);
            check_extraction(&opts, &lines);
        }
    }

    fn check_extraction(opts: &BenchOptions, lines: &[String]) {
        let c = collect(lines, &opts.vcpus, 1);
        assert_eq!(c.kernel.as_deref().map(str::is_empty), Some(false));
        for (ci, cfg) in CONFIGS.iter().enumerate() {
            assert_eq!(
                c.samples[ci][0],
                [Sample {
                    rate: 5084.123456,
                    stats: KvmStats {
                        pages: 4096,
                        exits: 4100,
                        pf_taken: 4098,
                        pf_fixed: 4096
                    },
                    uf_reports: cfg.kvm_userfault().then_some(4096),
                }],
                "{}",
                cfg.name
            );
            assert!(c.samples[ci][1].is_empty() && c.samples[ci][2].is_empty());
        }
        let f = c.failures.join("\n");
        assert_eq!(c.failures.len(), 2 * CONFIGS.len(), "{f}");
        assert!(
            f.contains("shmem, uffd MINOR with 2 vCPUs (repeat 1): no `KVM stats:` line"),
            "{f}"
        );
        assert!(
            f.contains("thp, uffd MISSING with 4 vCPUs (repeat 1): demand_paging_test exited with status 254"),
            "{f}"
        );
        // A failed run's output is shown.
        let shown = lines
            .iter()
            .position(|l| {
                l.starts_with("run failed: -v 4 -s anonymous_thp -u MISSING (status 254)")
            })
            .unwrap();
        assert!(lines[shown..]
            .iter()
            .any(|l| l.contains("Test Assertion Failure")));
    }

    #[test]
    fn run_on_host_times_out() {
        let scratch = test_dir("timeout");
        let (lines, why) = run_on_host(
            "echo started; sleep 30; echo late",
            &scratch.0,
            Duration::from_millis(300),
        )
        .unwrap();
        assert_eq!(lines, ["started"]);
        assert!(why.unwrap().contains("timed out"));
    }

    /// `--host --vcpus 1,2,4,8,16,32,64 --repeats 50` unrolls to more than the 128 KiB one
    /// `sh -c` argument may hold.
    #[test]
    fn run_on_host_takes_long_scripts() {
        let mut opts = options(&[1, 2, 4, 8, 16, 32, 64], 50);
        opts.target = Target::Host;
        opts.validate().unwrap();
        let long = script(&opts, "/nonexistent/demand_paging_test", "/nonexistent/out");
        assert!(long.len() > 128 << 10, "{}", long.len());
        // As long, but quick to run.
        let filler = ": padding padding padding padding padding padding padding padding\n";
        let text = format!(
            "{}echo done\n",
            filler.repeat(long.len() / filler.len() + 1)
        );
        let scratch = test_dir("long");
        let (lines, timed_out) = run_on_host(&text, &scratch.0, Duration::from_secs(60)).unwrap();
        assert_eq!((lines, timed_out), (vec!["done".to_string()], None));
    }

    /// When xtask ends, the shell and the test it is running end too, though they are in a
    /// process group of their own. The parent-death signal comes when the thread that started
    /// the shell ends, which a test can do without ending the test binary.
    #[test]
    fn host_runs_die_with_xtask() {
        let scratch = test_dir("pdeathsig");
        let pid_file = scratch.0.join("pid");
        // The sleep stands in for a demand_paging_test run, started as `bench_run` starts it.
        let script = format!(
            "sleep 60 &\necho $! >{}.tmp && mv {0}.tmp {0}\nwait $!\necho survived\n",
            sh_quote(&pid_file.to_string_lossy())
        );
        let dir = scratch.0.clone();
        let watched = pid_file.clone();
        let mut child = std::thread::spawn(move || {
            let child = spawn_on_host(&script, &dir).unwrap();
            let started = Instant::now();
            while !watched.exists() {
                assert!(started.elapsed() < Duration::from_secs(30), "no pid file");
                std::thread::sleep(Duration::from_millis(10));
            }
            child
        })
        .join()
        .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "{status}"
        );
        assert_eq!(out, "");
        // The sleep is gone too: no process, or a zombie nobody has reaped yet.
        let pid = fs::read_to_string(&pid_file).unwrap();
        let stat = PathBuf::from(format!("/proc/{}/stat", pid.trim()));
        let started = Instant::now();
        loop {
            match fs::read_to_string(&stat) {
                Err(_) => break,
                Ok(s)
                    if s.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('Z')) =>
                {
                    break
                }
                Ok(s) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "still running: {s}"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn report_fixture() -> (Meta, Vec<Vec<Cell>>, Vec<String>) {
        let mut samples = vec![vec![Vec::new(); 2]; CONFIGS.len()];
        // uffd MISSING, 1 vCPU: median 200.
        samples[idx("anon, uffd MISSING")][0] = vec![
            sample(100.0, 4096, 4096, 4096),
            sample(300.0, 4096, 4096, 4096),
            sample(200.0, 4096, 4096, 4096),
        ];
        // KVM sync: median 500, 1.25 exits and 1.5 stage-2 faults per page.
        samples[idx("anon, KVM userfault sync")][0] = vec![
            sample(500.0, 4096, 5120, 6144),
            sample(400.0, 4096, 5120, 6144),
            sample(600.0, 4096, 5120, 6144),
        ];
        samples[idx("anon, KVM userfault sync")][1] = vec![sample(700.0, 4096, 4096, 4096)];
        let cells = summarise(&samples);
        let meta: Meta = vec![
            (
                "Command",
                "`cargo xtask bench --vcpus 1,2 --repeats 3`".into(),
            ),
            ("Host", "Linux 6.1.0, AMD EPYC <x> & \"y\", 2 CPUs".into()),
            ("Accelerator", accel_description(&options(&[1], 1).target)),
        ];
        (
            meta,
            cells,
            vec!["thp, uffd MISSING with 2 vCPUs (repeat 1): no `KVM stats:` line".into()],
        )
    }

    fn report<'a>(
        meta: &'a Meta,
        cells: &'a [Vec<Cell>],
        failures: &'a [String],
        handler: Option<&'a Result<HandlerBench, String>>,
    ) -> Report<'a> {
        Report {
            meta,
            bytes_per_vcpu: "16M",
            repeats: 3,
            vcpus: &[1, 2],
            cells,
            failures,
            handler,
        }
    }

    #[test]
    fn table_shows_medians_ratios_and_counts() {
        let (meta, cells, failures) = report_fixture();
        let handler = Ok(HandlerBench {
            workload: "32768 records x 10 rounds".into(),
            best_mrecords: 2.16,
            ns_per_record: 463.0,
            mean_mrecords: 1.95,
        });
        let t = render_markdown(&report(&meta, &cells, &failures, Some(&handler)));
        assert!(
            t.starts_with(
                "- Command: `cargo xtask bench --vcpus 1,2 --repeats 3`\n- Host: Linux 6.1.0"
            ),
            "{t}"
        );
        assert!(t.contains("- Accelerator: QEMU -accel tcg,thread="), "{t}");
        assert!(
            t.contains("| config | 1 vCPU | 2 vCPUs |\n|---|---|---|\n"),
            "{t}"
        );
        assert!(
            t.contains("| anon, uffd MISSING | 200 · 1.00 exit/pg · 1.00 pf/pg | - |"),
            "{t}"
        );
        assert!(
            t.contains(
                "| anon, KVM userfault sync | 500 (2.50x) · 1.25 exit/pg · 1.50 pf/pg | 700 · 1.00 exit/pg · 1.00 pf/pg [1/3] |"
            ),
            "{t}"
        );
        assert!(t.contains("| thp, KVM userfault async | - | - |"), "{t}");
        assert!(
            t.contains("2.16 M records/s best round (463 ns/record)"),
            "{t}"
        );
        assert!(
            t.contains("Failed runs (not in the medians):\n- thp, uffd MISSING"),
            "{t}"
        );

        let failed =
            Err("handler_bench printed no line of the form `best round`; its output:\nx".into());
        let t = render_markdown(&report(&meta, &cells, &[], Some(&failed)));
        assert!(
            t.contains("one thread): failed: handler_bench printed no line"),
            "{t}"
        );
        assert!(!t.contains("Failed runs"), "{t}");
        let t = render_markdown(&report(&meta, &cells, &[], None));
        assert!(!t.contains("handler"), "{t}");
    }

    #[test]
    fn csv_has_one_row_per_config_and_vcpu_count() {
        let (meta, cells, failures) = report_fixture();
        let csv = render_csv(&report(&meta, &cells, &failures, None));
        let comments: Vec<&str> = csv.lines().take_while(|l| l.starts_with('#')).collect();
        assert_eq!(
            comments[0],
            "# Command: cargo xtask bench --vcpus 1,2 --repeats 3"
        );
        assert!(comments
            .iter()
            .any(|l| l.starts_with("# Accelerator: QEMU -accel tcg")));
        assert!(comments.contains(&"# Failed runs: 1"));
        let rows: Vec<&str> = csv.lines().skip(comments.len()).collect();
        assert!(rows[0].starts_with("config,args,baseline,vcpus,samples,median_pages_per_s,"));
        assert_eq!(rows.len(), 1 + 2 * CONFIGS.len());
        let columns = rows[0].split(',').count();
        assert!(rows.contains(
            &"\"anon, KVM userfault sync\",-k sync,\"anon, uffd MISSING\",1,3,500.00,400.00,600.00,2.500,1.250,1.500,1.000,1.000"
        ), "{csv}");
        assert!(
            rows.contains(&"\"anon, no userfault\",,,2,0,,,,,,,,"),
            "{csv}"
        );
        for row in &rows[1..] {
            // Quoted fields hold the commas: count the columns outside quotes.
            let mut quoted = false;
            let n = 1 + row
                .chars()
                .filter(|&ch| {
                    if ch == '"' {
                        quoted = !quoted;
                    }
                    ch == ',' && !quoted
                })
                .count();
            assert_eq!(n, columns, "{row}");
        }
        assert_eq!(csv_field("a \"b\", c"), "\"a \"\"b\"\", c\"");
        assert_eq!(csv_field("-u MISSING"), "-u MISSING");
    }

    /// A minimal XML well-formedness check: tags nest and close, attributes are quoted, `&` only
    /// starts the five entities, one root element.
    fn check_xml(text: &str) -> Result<(), String> {
        fn check_text(t: &str) -> Result<(), String> {
            if t.contains(['<', '>']) {
                return Err(format!("markup character in text `{t}`"));
            }
            for (i, _) in t.match_indices('&') {
                let rest = &t[i..];
                if !["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| rest.starts_with(e))
                {
                    return Err(format!("bare & in `{t}`"));
                }
            }
            Ok(())
        }
        let mut stack: Vec<&str> = Vec::new();
        let mut roots = 0;
        let mut rest = text;
        while let Some(open) = rest.find('<') {
            check_text(&rest[..open])?;
            if stack.is_empty() && !rest[..open].trim().is_empty() {
                return Err("text outside the root".into());
            }
            let close = rest[open..].find('>').ok_or("unclosed tag")? + open;
            let tag = &rest[open + 1..close];
            rest = &rest[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(top) if top == name.trim() => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
                continue;
            }
            let (body, self_closing) = match tag.strip_suffix('/') {
                Some(b) => (b, true),
                None => (tag, false),
            };
            let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
            let name = &body[..name_end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(format!("bad tag name in <{tag}>"));
            }
            // Attributes: name="value" pairs.
            let mut attrs = body[name_end..].trim();
            while !attrs.is_empty() {
                let eq = attrs
                    .find("=\"")
                    .ok_or_else(|| format!("unquoted attribute in <{tag}>"))?;
                let an = &attrs[..eq];
                if an.is_empty()
                    || !an
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-:".contains(c))
                {
                    return Err(format!("bad attribute name `{an}` in <{tag}>"));
                }
                let end = attrs[eq + 2..].find('"').ok_or("unterminated attribute")? + eq + 2;
                check_text(&attrs[eq + 2..end])?;
                attrs = attrs[end + 1..].trim_start();
            }
            if stack.is_empty() {
                roots += 1;
            }
            if !self_closing {
                stack.push(name);
            }
        }
        check_text(rest)?;
        if !rest.trim().is_empty() {
            return Err("text after the root".into());
        }
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        if roots != 1 {
            return Err(format!("{roots} root elements"));
        }
        Ok(())
    }

    #[test]
    fn xml_checker_catches_what_it_should() {
        check_xml("<svg a=\"1\"><g><text>x &amp; y</text></g><line/></svg>\n").unwrap();
        for bad in [
            "<svg><g></svg>",
            "<svg></g>",
            "<svg a=1></svg>",
            "<svg><text>a & b</text></svg>",
            "<svg><text>a < b</text></svg>",
            "<svg/><svg/>",
            "<svg>",
        ] {
            assert!(check_xml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn svg_is_well_formed_with_axes_lines_and_legend() {
        let (mut meta, cells, failures) = report_fixture();
        meta.push(("Accelerator", "QEMU <x> & \"y\"".into()));
        meta.swap_remove(2);
        let svg = render_svg(&report(&meta, &cells, &failures, None));
        check_xml(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        // The title shows the accelerator, escaped.
        assert!(
            svg.contains("QEMU &lt;x&gt; &amp; &quot;y&quot;</text>"),
            "{svg}"
        );
        for label in [
            "pages/s (median)",
            "KVM exits per page",
            "stage-2 faults (pf_taken) per page",
            "vCPUs",
        ] {
            assert!(svg.contains(&format!(">{label}</text>")), "{label}");
        }
        for c in CONFIGS {
            assert!(
                svg.contains(&format!(">{}</text>", xml_escape(c.name))),
                "{}",
                c.name
            );
        }
        // Two configurations have values: only the one with two vCPU counts gets lines (one per
        // panel); each measured point is a circle.
        assert_eq!(svg.matches("<polyline ").count(), 3);
        assert_eq!(svg.matches("<circle ").count(), 3 * 3);
        // An empty report still renders.
        let empty = vec![vec![Cell::default(); 2]; CONFIGS.len()];
        check_xml(&render_svg(&report(&meta, &empty, &[], None))).unwrap();
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_ticks(12118.0), (2500.0, 12500.0));
        assert_eq!(nice_ticks(1.25), (0.25, 1.25));
        assert_eq!(nice_ticks(1.0), (0.2, 1.0));
        assert_eq!(nice_ticks(0.0), (0.2, 1.0));
        assert_eq!(nice_ticks(f64::NAN), (0.2, 1.0));
        assert_eq!(tick_label(10000.0, 2500.0), "10000");
        assert_eq!(tick_label(0.5, 0.25), "0.50");
        assert_eq!(tick_label(0.4, 0.2), "0.4");
    }

    #[test]
    fn handler_bench_output_parses() {
        let out = "handler_bench: 32768 records x 10 rounds, 64 records/read, shuffled gfns, 4 KiB copy each\n\
                   best round 15.17ms = 2.16 M records/s (463 ns/record); mean 1.95 M records/s\n\
                   bare 4 KiB copies alone: 5.10 M pages/s (196 ns/page) -> handler overhead 267 ns/record\n";
        assert_eq!(
            parse_handler_bench(out).unwrap(),
            HandlerBench {
                workload:
                    "32768 records x 10 rounds, 64 records/read, shuffled gfns, 4 KiB copy each"
                        .into(),
                best_mrecords: 2.16,
                ns_per_record: 463.0,
                mean_mrecords: 1.95,
            }
        );
        for bad in [
            "",
            "best round 1ms = fast\n",
            "best round 1ms = x M records/s (463 ns/record); mean 1.95 M records/s\n",
        ] {
            let e = format!("{:#}", parse_handler_bench(bad).unwrap_err());
            assert!(
                e.contains("handler_bench printed no line of the form"),
                "{e}"
            );
        }
        assert_eq!(
            HANDLER_BENCH_ARGS.join(" "),
            "run --release -p kvm-userfault-harness --example handler_bench"
        );
    }

    #[test]
    fn host_header_from_proc_files() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_count(cpuinfo), 2);
        assert_eq!(
            host_description("6.1.0-28-amd64\n", cpuinfo, "MemTotal:       24641536 kB\n"),
            "Linux 6.1.0-28-amd64, AMD EPYC 7B13, 2 CPUs, 23.5 GiB"
        );
        assert!(host_description("6.1", "", "").starts_with("Linux 6.1, unknown CPU, "));
        assert_eq!(
            accel_description(&Target::Host),
            "none: run on the host itself (--host), no QEMU"
        );
        assert_eq!(
            accel_description(&Target::Qemu {
                accel: Accel::Kvm,
                smp: 4,
                mem: "8G".into()
            }),
            "QEMU -accel kvm -cpu host -smp 4 -m 8G"
        );
    }

    #[test]
    fn host_mode_checks() {
        let e = check_host_kvm(Path::new("/nonexistent/kvm"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/kvm does not exist"), "{e}");
        // There but not openable read-write (a directory stands in for a /dev/kvm this user
        // may not open: the check is the same open).
        let scratch = test_dir("kvm");
        let e = check_host_kvm(&scratch.0).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{} does not open read-write (",
                scratch.0.display()
            )),
            "{e}"
        );
        let e = check_test_runs(Path::new("/nonexistent/dpt"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "/nonexistent/dpt was not built");
        check_test_runs(Path::new("/bin/true")).unwrap();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(size_bytes("64M"), Some(64 << 20));
        assert_eq!(size_bytes("2G"), Some(2 << 30));
        assert_eq!(size_bytes("0M"), Some(0));
        assert_eq!(size_bytes("17179869183G"), Some(17179869183 << 30));
        for bad in [
            "",
            "M",
            "G",
            "2K",
            "2",
            "+2M",
            "-2M",
            " 2M",
            "2 M",
            "1.5G",
            "2MM",
            "2m",
            "é",
            "17179869184G",
        ] {
            assert_eq!(size_bytes(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn scratch_dir_goes_on_every_path() {
        let path = std::env::temp_dir().join(format!("xtask-bench-drop-{}", std::process::id()));
        // As in `run`: an early `?` while the directory is held.
        let result = (|| -> Result<()> {
            let dir = ScratchDir::create(path.clone())?;
            fs::write(dir.0.join("f"), "x")?;
            assert!(path.is_dir());
            bail!("a failure with the directory held")
        })();
        assert!(result.is_err());
        assert!(!path.exists());
    }

    #[test]
    fn many_failures_are_counted_not_listed() {
        let results = Path::new("/r/bench-results.md");
        let one = failures_summary(&["a: why".into()], results, "the output above");
        assert_eq!(
            one,
            "1 demand_paging_test run failed (a: why); all of them in /r/bench-results.md; \
             console: the output above"
        );
        let many: Vec<String> = (1..=40).map(|i| format!("run {i}: why")).collect();
        let s = failures_summary(&many, results, "/r/console.log");
        assert_eq!(
            s,
            "40 demand_paging_test runs failed (run 1: why; run 2: why; run 3: why; and 37 \
             more); all of them in /r/bench-results.md; console: /r/console.log"
        );
    }

    #[test]
    fn workload_counts_runs_in_the_plural() {
        let (meta, cells, failures) = report_fixture();
        let mut r = report(&meta, &cells, &failures, None);
        assert!(
            r.workload().ends_with("median of 3 runs"),
            "{}",
            r.workload()
        );
        r.repeats = 1;
        assert!(
            r.workload().ends_with("median of 1 run"),
            "{}",
            r.workload()
        );
    }
}
