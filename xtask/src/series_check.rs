//! What a maintainer checks before taking a series: `checkpatch.pl --strict` on every patch,
//! every patch builds on its own (bisectability), and no new W=1 warnings in touched files.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::console::Counts;
use crate::host;
use crate::kernel::{self, Flavour, Patch};
use crate::layout::Layout;

fn git_out(tree: &Path, args: &[&str]) -> Result<String> {
    Ok(
        host::output(Command::new("git").current_dir(tree).args(args))?
            .trim()
            .to_string(),
    )
}

/// Runs all checks on the series applied at the top of `src`; one count per check.
pub fn check(
    layout: &Layout,
    src: &Path,
    build: &Path,
    flavour: Flavour,
    series: &[Patch],
) -> Result<Counts> {
    let mut counts = Counts::default();
    for patch in series {
        let name = patch.path.file_name().unwrap_or_default().to_string_lossy();
        let out = Command::new("perl")
            .current_dir(src)
            // The base is a tarball import without history, so commit ids (a `Fixes:` tag)
            // cannot be looked up; new files are covered by the existing KVM entries of
            // MAINTAINERS (virt/kvm/, tools/testing/selftests/kvm/).
            .args([
                "scripts/checkpatch.pl",
                "--strict",
                "--no-summary",
                "--quiet",
                "--ignore",
                "UNKNOWN_COMMIT_ID,FILE_PATH_CHANGES",
            ])
            .arg(&patch.path)
            .output()
            .context("cannot run checkpatch.pl")?;
        if out.status.success() && out.stdout.is_empty() {
            counts.passed += 1;
        } else {
            counts.failed += 1;
            eprintln!(
                "[series] checkpatch --strict: {name}\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }

    let head = git_out(src, &["rev-parse", "HEAD"])?;
    let branch = git_out(src, &["symbolic-ref", "-q", "--short", "HEAD"]).unwrap_or_default();
    let commits: Vec<String> = git_out(
        src,
        &[
            "rev-list",
            "--reverse",
            &format!("HEAD~{}..HEAD", series.len()),
        ],
    )?
    .lines()
    .map(str::to_string)
    .collect();
    let stamp = build.join(".kvmuf-series-checked");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(head.as_str()) {
        eprintln!("[series] every patch already built at {}", &head[..12]);
        counts.passed += commits.len() as u64 + 1;
        return Ok(counts);
    }
    fs::create_dir_all(build)?;
    let mut all_built = true;
    let result = (|| -> Result<()> {
        for (i, commit) in commits.iter().enumerate() {
            host::run_quiet(
                Command::new("git")
                    .current_dir(src)
                    .args(["checkout", "-q", "--detach", commit]),
            )?;
            kernel::configure(layout, src, build, flavour)?;
            eprintln!("[series] building patch {}/{}", i + 1, commits.len());
            match kernel::make(src, build, &["bzImage"], "series-build") {
                Ok(()) => counts.passed += 1,
                Err(e) => {
                    all_built = false;
                    counts.failed += 1;
                    eprintln!("[series] patch {} does not build: {e:#}", i + 1);
                }
            }
        }
        Ok(())
    })();
    let target = if branch.is_empty() {
        head.as_str()
    } else {
        branch.as_str()
    };
    host::run_quiet(
        Command::new("git")
            .current_dir(src)
            .args(["checkout", "-q", target]),
    )?;
    result?;

    match new_w1_warnings(src, build, commits.len()) {
        Ok(new) if new.is_empty() => counts.passed += 1,
        Ok(new) => {
            counts.failed += 1;
            eprintln!(
                "[series] new W=1 warnings in touched files:\n{}",
                new.into_iter().collect::<Vec<_>>().join("\n")
            );
        }
        Err(e) => {
            counts.failed += 1;
            eprintln!("[series] W=1 check failed: {e:#}");
        }
    }
    if all_built && counts.failed == 0 {
        fs::write(&stamp, &head)?;
    }
    Ok(counts)
}

/// Kernel C files the last `n` commits touch (not tools/, not Documentation/).
fn touched_kernel_c_files(src: &Path, n: usize) -> Result<Vec<String>> {
    let out = git_out(src, &["diff", "--name-only", &format!("HEAD~{n}"), "HEAD"])?;
    Ok(out
        .lines()
        .filter(|f| {
            f.ends_with(".c") && !f.starts_with("tools/") && !f.starts_with("Documentation/")
        })
        .filter(|f| src.join(f).exists())
        .map(str::to_string)
        .collect())
}

/// W=1 warnings of the touched files at the series tip that the same files do not have at the
/// base. Warnings are compared without line numbers, which the series shifts.
fn new_w1_warnings(src: &Path, build: &Path, n: usize) -> Result<BTreeSet<String>> {
    let files = touched_kernel_c_files(src, n)?;
    if files.is_empty() {
        return Ok(BTreeSet::new());
    }
    let objects: Vec<String> = files.iter().map(|f| f.replace(".c", ".o")).collect();
    let tip = w1_warnings(src, build, &objects)?;
    let head = git_out(src, &["rev-parse", "HEAD"])?;
    let branch = git_out(src, &["symbolic-ref", "-q", "--short", "HEAD"]).unwrap_or_default();
    host::run_quiet(Command::new("git").current_dir(src).args([
        "checkout",
        "-q",
        "--detach",
        &format!("HEAD~{n}"),
    ]))?;
    // Files the series adds do not exist at the base.
    let base_objects: Vec<String> = objects
        .iter()
        .filter(|o| src.join(o.replace(".o", ".c")).exists())
        .cloned()
        .collect();
    let base = w1_warnings(src, build, &base_objects);
    let target = if branch.is_empty() { head } else { branch };
    host::run_quiet(
        Command::new("git")
            .current_dir(src)
            .args(["checkout", "-q", &target]),
    )?;
    let base = base?;
    Ok(tip.difference(&base).cloned().collect())
}

fn w1_warnings(src: &Path, build: &Path, objects: &[String]) -> Result<BTreeSet<String>> {
    if objects.is_empty() {
        return Ok(BTreeSet::new());
    }
    let out = Command::new("make")
        .current_dir(src)
        .arg(format!("O={}", build.display()))
        .arg("W=1")
        .arg(format!(
            "-j{}",
            std::thread::available_parallelism().map_or(2, |n| n.get())
        ))
        .args(objects)
        .output()
        .context("cannot run make W=1")?;
    let text = String::from_utf8_lossy(&out.stderr);
    Ok(text
        .lines()
        .filter(|l| l.contains("warning:"))
        .map(strip_line_numbers)
        .collect())
}

/// `file.c:12:5: warning: x` -> `file.c: warning: x`.
pub fn strip_line_numbers(line: &str) -> String {
    let mut parts = line.splitn(2, ": warning:");
    let location = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default();
    let file = location.split(':').next().unwrap_or(location);
    format!("{file}: warning:{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_compare_without_line_numbers() {
        assert_eq!(
            strip_line_numbers(
                "virt/kvm/kvm_main.c:120:5: warning: unused variable 'x' [-Wunused-variable]"
            ),
            "virt/kvm/kvm_main.c: warning: unused variable 'x' [-Wunused-variable]"
        );
    }
}
