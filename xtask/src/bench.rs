//! `cargo xtask bench`: the cover letter's demand-paging table, reproduced in one command.
//!
//! One boot of the patched kernel runs the kvm selftests' `demand_paging_test` (built from the
//! same tree) for every configuration side by side — no userfault, userfaultfd MISSING/MINOR,
//! KVM userfault sync exits and async fd — for each vCPU count, several times each; the table
//! reports the median pages/s and each KVM userfault row's ratio to the userfaultfd row of the
//! same backing. Absolute numbers under TCG mean little; the ratios measured in one run are the
//! result.

use std::fmt::Write as _;
use std::fs;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::initramfs::GuestFile;
use crate::kernel::{self, Flavour, SourceChoice};
use crate::layout::Layout;
use crate::suite;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub source: SourceChoice,
    pub smp: u32,
    pub mem: String,
    pub vcpus: Vec<u32>,
    pub bytes_per_vcpu: String,
    pub repeats: u32,
    pub timeout: Duration,
}

/// One row of the table: a `demand_paging_test` configuration.
struct Config {
    name: &'static str,
    args: &'static str,
    /// The row this one is compared with (by name).
    baseline: Option<&'static str>,
}

const CONFIGS: &[Config] = &[
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
];

const RESULT_MARK: &str = "KVMUF-BENCH ";

pub fn run(layout: &Layout, opts: &BenchOptions) -> Result<()> {
    let kernel = kernel::build(layout, &opts.source, Flavour::Default)?;
    let bins = kernel::build_c_selftests(&kernel, &["demand_paging_test".to_string()])?;
    let (_, dpt) = bins
        .into_iter()
        .next()
        .context("demand_paging_test was not built")?;

    let mut script = String::new();
    for rep in 0..opts.repeats {
        for v in &opts.vcpus {
            for (i, c) in CONFIGS.iter().enumerate() {
                // -a: one uffd for all vCPUs, -r N readers, as in the published runs.
                // The output is kept, and shown if the run gives no rate.
                let _ = writeln!(
                    script,
                    "/bench/demand_paging_test -b {b} -a -v {v} -r {v} {args} >/tmp/out 2>&1; \
                     r=$(sed -n 's/^Overall demand paging rate:[[:space:]]*\\([0-9.]*\\).*/\\1/p' /tmp/out); \
                     [ -n \"$r\" ] || {{ echo 'run failed: -v {v} {args}'; tail -n 25 /tmp/out; }}; \
                     echo '{RESULT_MARK}'{i} {v} {rep} \"${{r:-fail}}\"",
                    b = opts.bytes_per_vcpu,
                    args = c.args,
                );
            }
        }
    }
    let files = [GuestFile {
        host: dpt,
        guest: "/bench/demand_paging_test".into(),
    }];
    eprintln!(
        "[bench] {} configurations x vCPUs {:?} x {} repeats, {} per vCPU",
        CONFIGS.len(),
        opts.vcpus,
        opts.repeats,
        opts.bytes_per_vcpu
    );
    let outcome = suite::boot(
        layout,
        &kernel,
        "bench",
        &script,
        &files,
        &[],
        opts.smp,
        &opts.mem,
        opts.timeout,
        false,
    )?;
    if !outcome.success() {
        bail!("{}", outcome.failure_report());
    }
    for (i, line) in outcome.console.iter().enumerate() {
        if line.starts_with("run failed: ") {
            eprintln!(
                "[bench] {}",
                outcome.console[i..(i + 26).min(outcome.console.len())].join("\n")
            );
        }
    }
    // samples[config][vcpu index] = rates
    let mut samples = vec![vec![Vec::<f64>::new(); opts.vcpus.len()]; CONFIGS.len()];
    let mut failures = Vec::new();
    for line in &outcome.console {
        let Some(rest) = line.split(RESULT_MARK).nth(1) else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let [cfg, v, _rep, rate] = words[..] else {
            continue;
        };
        let (Ok(cfg), Ok(v)) = (cfg.parse::<usize>(), v.parse::<u32>()) else {
            continue;
        };
        let Some(vi) = opts.vcpus.iter().position(|&x| x == v) else {
            continue;
        };
        match rate.parse::<f64>() {
            Ok(r) if cfg < CONFIGS.len() => samples[cfg][vi].push(r),
            _ => failures.push(format!(
                "{} with {v} vCPUs",
                CONFIGS.get(cfg).map_or("?", |c| c.name)
            )),
        }
    }
    if !failures.is_empty() {
        bail!(
            "demand_paging_test failed: {}; console: {}",
            failures.join(", "),
            outcome.log.display()
        );
    }
    let table = render(opts, &samples);
    println!("{table}");
    let out = layout.run_dir().join("bench-results.md");
    fs::write(&out, &table)?;
    eprintln!("[bench] written to {}", out.display());
    Ok(())
}

fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

fn render(opts: &BenchOptions, samples: &[Vec<Vec<f64>>]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "demand_paging_test -b {} -a -v N -r N, median of {} runs, pages/s (ratio to the uffd row of the same backing)\n",
        opts.bytes_per_vcpu, opts.repeats
    );
    let _ = write!(t, "| config |");
    for v in &opts.vcpus {
        let _ = write!(t, " {v} vCPU{} |", if *v == 1 { "" } else { "s" });
    }
    let _ = write!(t, "\n|---|");
    for _ in &opts.vcpus {
        let _ = write!(t, "---|");
    }
    t.push('\n');
    for (ci, c) in CONFIGS.iter().enumerate() {
        let _ = write!(t, "| {} |", c.name);
        for (vi, rates) in samples[ci].iter().enumerate() {
            let m = median(rates);
            let base = c
                .baseline
                .and_then(|b| CONFIGS.iter().position(|x| x.name == b))
                .and_then(|bi| median(&samples[bi][vi]));
            match (m, base) {
                (Some(m), Some(b)) if b > 0.0 => {
                    let _ = write!(t, " {m:.0} ({:.2}x) |", m / b);
                }
                (Some(m), _) => {
                    let _ = write!(t, " {m:.0} |");
                }
                (None, _) => t.push_str(" - |"),
            }
        }
        t.push('\n');
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_medians_and_ratios() {
        let opts = BenchOptions {
            source: SourceChoice {
                kernel_src: None,
                no_apply: false,
            },
            smp: 2,
            mem: "2G".into(),
            vcpus: vec![1, 2],
            bytes_per_vcpu: "16M".into(),
            repeats: 3,
            timeout: Duration::from_secs(1),
        };
        let mut samples = vec![vec![Vec::new(); 2]; CONFIGS.len()];
        samples[1][0] = vec![100.0, 300.0, 200.0]; // uffd MISSING, 1 vCPU: median 200
        samples[2][0] = vec![500.0, 400.0, 600.0]; // KVM sync: median 500
        let t = render(&opts, &samples);
        assert!(t.contains("| anon, uffd MISSING | 200 | - |"), "{t}");
        assert!(
            t.contains("| anon, KVM userfault sync | 500 (2.50x) | - |"),
            "{t}"
        );
        assert_eq!(median(&[]), None);
    }
}
