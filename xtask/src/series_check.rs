//! What a maintainer checks before taking a series: `checkpatch.pl --strict` on every patch,
//! every patch builds on its own (bisectability), and no new W=1 warnings in touched files.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
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

/// The note a series check leaves in the tree's git directory while the tree is away from its
/// branch: what to check out again (a branch name, or a commit if the tree was detached).
const RESTORE_NOTE: &str = "kvmuf-series-check-restore";

fn restore_note(tree: &Path) -> Result<PathBuf> {
    Ok(PathBuf::from(git_out(tree, &["rev-parse", "--absolute-git-dir"])?).join(RESTORE_NOTE))
}

/// The branch checked out in `tree`, if HEAD is on one.
fn current_branch(tree: &Path) -> Option<String> {
    git_out(tree, &["symbolic-ref", "-q", "--short", "HEAD"])
        .ok()
        .filter(|b| !b.is_empty())
}

/// Where the tree is: its branch, or the commit of a detached HEAD.
fn current_position(tree: &Path) -> Result<String> {
    match current_branch(tree) {
        Some(b) => Ok(b),
        None => git_out(tree, &["rev-parse", "--verify", "HEAD"]),
    }
}

fn is_branch(tree: &Path, name: &str) -> bool {
    // An exact ref: `rev-parse refs/heads/series~2` would also resolve.
    git_out(
        tree,
        &["show-ref", "--verify", "-q", &format!("refs/heads/{name}")],
    )
    .is_ok()
}

/// Checks out `what`: a branch by name (attached) unless `detach`, anything else detached.
fn switch_to(tree: &Path, what: &str, detach: bool) -> Result<()> {
    let mut cmd = Command::new("git");
    cmd.current_dir(tree).args(["switch", "-q"]);
    if detach || !is_branch(tree, what) {
        cmd.arg("--detach");
    }
    host::run_quiet(cmd.arg(what))
        .with_context(|| format!("git switch to {what} in {}", tree.display()))
}

/// The last `n` commits up to `tip` (a branch name or commit), oldest first: named from the
/// tip, so the answer does not depend on where HEAD is.
fn series_commits(tree: &Path, tip: &str, n: usize) -> Result<Vec<String>> {
    Ok(git_out(
        tree,
        &["rev-list", "--reverse", &format!("{tip}~{n}..{tip}")],
    )?
    .lines()
    .map(str::to_string)
    .collect())
}

/// Puts the tree back on `target` when dropped, on every exit path (`?`, panic); a kill is
/// covered by the note it writes first, which [`recover_interrupted`] acts on next time.
struct Restore {
    tree: PathBuf,
    target: String,
    note: PathBuf,
    done: bool,
}

impl Restore {
    fn begin(tree: &Path, target: &str) -> Result<Self> {
        let note = restore_note(tree)?;
        fs::write(&note, target).with_context(|| format!("writing {}", note.display()))?;
        Ok(Self {
            tree: tree.to_path_buf(),
            target: target.to_string(),
            note,
            done: false,
        })
    }

    fn restore(&mut self) -> Result<()> {
        self.done = true;
        switch_to(&self.tree, &self.target, false)?;
        fs::remove_file(&self.note).with_context(|| format!("removing {}", self.note.display()))
    }

    /// Restores, reporting a failure to the caller.
    fn finish(mut self) -> Result<()> {
        self.restore()
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.restore() {
                eprintln!(
                    "[series] cannot check out {} again in {}: {e:#}",
                    self.target,
                    self.tree.display()
                );
            }
        }
    }
}

/// Before a run touches `tree`: if a series check was interrupted (killed) while the tree was
/// detached, checks out what it was on again. `fallback`: the branch to return to when the
/// tree is detached without a note (a check killed by an xtask from before the note); only
/// for the base tree, whose branch is known. Returns whether it moved the tree.
pub fn recover_interrupted(tree: &Path, fallback: Option<&str>) -> Result<bool> {
    let note = restore_note(tree)?;
    let noted = fs::read_to_string(&note).ok().map(|s| s.trim().to_string());
    let detached = current_branch(tree).is_none();
    let target = match (&noted, fallback) {
        (Some(t), _) if !t.is_empty() => Some(t.clone()),
        (_, Some(b)) if detached && is_branch(tree, b) => Some(b.to_string()),
        _ => None,
    };
    let Some(target) = target else {
        if noted.is_some() {
            fs::remove_file(&note)?;
        }
        return Ok(false);
    };
    let at = git_out(tree, &["rev-parse", "--short", "HEAD"])?;
    let there = if is_branch(tree, &target) {
        current_branch(tree).as_deref() == Some(target.as_str())
    } else {
        detached && git_out(tree, &["rev-parse", "HEAD"])? == target
    };
    // Only a detached tree is moved: one on a branch was moved there by someone on purpose.
    let moved = detached && !there;
    if moved {
        eprintln!(
            "[series] {} is detached at {at}, left by an interrupted series check: checking out {target} again",
            tree.display()
        );
        switch_to(tree, &target, false)?;
    }
    if noted.is_some() {
        fs::remove_file(&note)?;
    }
    Ok(moved)
}

/// Runs all checks on the series applied at the top of `src`; one count per check. `branch`:
/// the branch the series was applied on (the base tree's [`kernel::SERIES_BRANCH`]); `None`
/// for a developer's tree, where it is the branch (or commit) checked out now.
pub fn check(
    layout: &Layout,
    src: &Path,
    build: &Path,
    flavour: Flavour,
    series: &[Patch],
    branch: Option<&str>,
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

    // The tree is only ever moved under a guard that puts it back on every exit path (and
    // leaves a note that `recover_interrupted` acts on if the process is killed meanwhile);
    // every commit is named relative to the tip by name, never relative to HEAD.
    let tip_name = match branch {
        Some(b) => b.to_string(),
        None => current_position(src)?,
    };
    let head = git_out(
        src,
        &["rev-parse", "--verify", &format!("{tip_name}^{{commit}}")],
    )?;
    let commits = series_commits(src, &tip_name, series.len())?;
    let stamp = build.join(".kvmuf-series-checked");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(head.as_str()) {
        eprintln!("[series] every patch already built at {}", &head[..12]);
        counts.passed += commits.len() as u64 + 1;
        return Ok(counts);
    }
    fs::create_dir_all(build)?;
    let restore = Restore::begin(src, &tip_name)?;
    let mut all_built = true;
    for (i, commit) in commits.iter().enumerate() {
        switch_to(src, commit, true)?;
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

    let w1 = new_w1_warnings(src, build, &tip_name, commits.len());
    restore.finish()?;
    match w1 {
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

/// Kernel C files the last `n` commits up to `tip` touch (not tools/, not Documentation/).
fn touched_kernel_c_files(src: &Path, tip: &str, n: usize) -> Result<Vec<String>> {
    let out = git_out(src, &["diff", "--name-only", &format!("{tip}~{n}"), tip])?;
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
/// base. Warnings are compared without line numbers, which the series shifts. Moves the tree
/// (to the tip, then the base): the caller holds a [`Restore`].
fn new_w1_warnings(src: &Path, build: &Path, tip: &str, n: usize) -> Result<BTreeSet<String>> {
    switch_to(src, tip, true)?;
    let files = touched_kernel_c_files(src, tip, n)?;
    if files.is_empty() {
        return Ok(BTreeSet::new());
    }
    let objects: Vec<String> = files.iter().map(|f| f.replace(".c", ".o")).collect();
    let tip_warnings = w1_warnings(src, build, &objects)?;
    switch_to(src, &format!("{tip}~{n}"), true)?;
    // Files the series adds do not exist at the base.
    let base_objects: Vec<String> = objects
        .iter()
        .filter(|o| src.join(o.replace(".o", ".c")).exists())
        .cloned()
        .collect();
    let base = w1_warnings(src, build, &base_objects)?;
    Ok(tip_warnings.difference(&base).cloned().collect())
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

    /// A throwaway repository: branch `topic` with commits c1, c2, c3 (one file each), HEAD
    /// on `topic`. Git runs without the user's or the system's configuration.
    struct Repo {
        dir: PathBuf,
        commits: Vec<String>,
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .args(["-c", "user.name=t", "-c", "user.email=t@invalid"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    impl Repo {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("xtask-series-check-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            git(&dir, &["init", "-q", "--initial-branch=topic"]);
            let mut commits = Vec::new();
            for i in 1..=3 {
                fs::write(dir.join(format!("f{i}.c")), format!("int x{i};\n")).unwrap();
                git(&dir, &["add", "."]);
                git(&dir, &["commit", "-q", "-m", &format!("c{i}")]);
                commits.push(git(&dir, &["rev-parse", "HEAD"]));
            }
            Self { dir, commits }
        }
        fn branch(&self) -> Option<String> {
            current_branch(&self.dir)
        }
        fn head(&self) -> String {
            git(&self.dir, &["rev-parse", "HEAD"])
        }
        fn note(&self) -> bool {
            restore_note(&self.dir).unwrap().exists()
        }
    }

    impl Drop for Repo {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_check_killed_while_detached_is_undone_by_the_next_run() {
        let r = Repo::new("killed");
        // What a check does before it is killed: the note, then the tree detached at c1.
        let guard = Restore::begin(&r.dir, "topic").unwrap();
        switch_to(&r.dir, &r.commits[0], true).unwrap();
        std::mem::forget(guard); // SIGKILL: no destructor runs
        assert_eq!(r.branch(), None);
        assert!(r.note());
        assert!(recover_interrupted(&r.dir, None).unwrap());
        assert_eq!(r.branch().as_deref(), Some("topic"));
        assert_eq!(r.head(), r.commits[2]);
        assert!(!r.note(), "the note is gone once acted on");
        // Nothing more to do the time after.
        assert!(!recover_interrupted(&r.dir, None).unwrap());
    }

    #[test]
    fn the_base_tree_is_recovered_without_a_note() {
        // Left detached by an xtask from before the note: the base tree's branch is known.
        let r = Repo::new("legacy");
        switch_to(&r.dir, &r.commits[0], true).unwrap();
        assert!(
            !recover_interrupted(&r.dir, None).unwrap(),
            "no note, no branch: left"
        );
        assert_eq!(r.branch(), None);
        assert!(recover_interrupted(&r.dir, Some("topic")).unwrap());
        assert_eq!(r.branch().as_deref(), Some("topic"));
    }

    #[test]
    fn a_tree_on_a_branch_is_never_moved() {
        let r = Repo::new("on-branch");
        git(&r.dir, &["switch", "-q", "-c", "other", &r.commits[1]]);
        fs::write(restore_note(&r.dir).unwrap(), "topic").unwrap();
        assert!(!recover_interrupted(&r.dir, Some("topic")).unwrap());
        assert_eq!(r.branch().as_deref(), Some("other"));
        assert!(!r.note(), "a stale note is dropped");
    }

    #[test]
    fn the_guard_restores_on_error_paths_and_a_detached_start() {
        let r = Repo::new("guard");
        let res = (|| -> Result<()> {
            let _restore = Restore::begin(&r.dir, "topic")?;
            switch_to(&r.dir, &r.commits[1], true)?;
            switch_to(&r.dir, "no-such-commit", true)?; // fails: `?` drops the guard
            Ok(())
        })();
        assert!(res.is_err());
        assert_eq!(r.branch().as_deref(), Some("topic"));
        assert!(!r.note());
        // A tree that was detached when the check began goes back to that commit.
        switch_to(&r.dir, &r.commits[1], true).unwrap();
        let at = current_position(&r.dir).unwrap();
        assert_eq!(at, r.commits[1]);
        let restore = Restore::begin(&r.dir, &at).unwrap();
        switch_to(&r.dir, "topic~2", true).unwrap();
        restore.finish().unwrap();
        assert_eq!((r.branch(), r.head()), (None, r.commits[1].clone()));
    }

    #[test]
    fn the_series_is_named_from_the_branch_wherever_head_is() {
        let r = Repo::new("commits");
        for at in [&r.commits[2], &r.commits[0]] {
            switch_to(&r.dir, at, true).unwrap();
            assert_eq!(series_commits(&r.dir, "topic", 2).unwrap(), r.commits[1..]);
            assert_eq!(
                touched_kernel_c_files(&r.dir, "topic", 2).unwrap().len(),
                // Only files present in the working tree count: at c1, f2.c and f3.c are not.
                if at == &r.commits[2] { 2 } else { 0 }
            );
        }
        // HEAD~2 from c1 does not exist: what the check used to compute.
        assert!(git_out(&r.dir, &["rev-parse", "--verify", "HEAD~2"]).is_err());
    }

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
