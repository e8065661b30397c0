//! The guest's root file system: busybox, an /init that mounts what the tests need and runs one
//! command, and the binaries to test. Packed uncompressed, since decompressing under TCG is slow.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::console::{BOOTED_MARKER, EXIT_MARKER};

/// A host file to place in the guest.
#[derive(Debug, Clone)]
pub struct GuestFile {
    pub host: PathBuf,
    /// Absolute path inside the guest.
    pub guest: String,
}

impl GuestFile {
    /// `HOST[:GUEST]`; without GUEST the file goes to /usr/local/bin under its own name.
    pub fn parse(spec: &str) -> Result<Self> {
        let (host, guest) = match spec.split_once(':') {
            Some((h, g)) => (h, g.to_string()),
            None => {
                let name = Path::new(spec)
                    .file_name()
                    .with_context(|| format!("--add {spec}: no file name"))?;
                (spec, format!("/usr/local/bin/{}", name.to_string_lossy()))
            }
        };
        if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") {
            bail!("--add {spec}: the guest path must be absolute, without `..`");
        }
        let host = PathBuf::from(host);
        if !host.is_file() {
            bail!("--add {spec}: {} is not a file", host.display());
        }
        Ok(Self { host, guest })
    }
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/hugepages /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t hugetlbfs hugetlbfs /dev/hugepages
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ip link set lo up
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp TMPDIR=/tmp
export RUST_BACKTRACE=1
cd /tmp
echo "@BOOTED@ $(uname -r) cpus=$(nproc)"
sh /etc/kvmuf-command
rc=$?
echo "@EXIT@$rc"
sync
poweroff -f
"#;

/// Quotes one word for POSIX sh.
pub fn sh_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Builds `out` (a newc cpio archive) holding busybox, /init, `command` and `files`.
/// `command` is a shell script body; with `argv` the words are quoted into one command line.
pub fn build(out: &Path, staging: &Path, script: &str, files: &[GuestFile]) -> Result<()> {
    if staging.exists() {
        fs::remove_dir_all(staging)?;
    }
    for dir in ["bin", "etc", "usr/local/bin"] {
        fs::create_dir_all(staging.join(dir))?;
    }
    fs::copy("/bin/busybox", staging.join("bin/busybox")).context("copying /bin/busybox")?;
    let init = INIT
        .replace("@BOOTED@", BOOTED_MARKER)
        .replace("@EXIT@", EXIT_MARKER);
    write_exec(&staging.join("init"), &init)?;
    fs::write(staging.join("etc/kvmuf-command"), script)?;
    for f in files {
        let dst = staging.join(f.guest.trim_start_matches('/'));
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)?;
        }
        // Hard links where possible: test binaries are large and copying them is wasted time.
        if fs::hard_link(&f.host, &dst).is_err() {
            fs::copy(&f.host, &dst).with_context(|| format!("copying {}", f.host.display()))?;
        }
    }
    let list = Command::new("find")
        .current_dir(staging)
        .args([".", "-mindepth", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run find")?;
    let archive = fs::File::create(out)?;
    let status = Command::new("cpio")
        .current_dir(staging)
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .stdin(list.stdout.context("find stdout")?)
        .stdout(archive)
        .status()
        .context("cannot run cpio")?;
    if !status.success() {
        bail!("cpio failed with {status}");
    }
    Ok(())
}

fn write_exec(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("abc/def-1"), "abc/def-1");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn guest_file_specs_are_checked() {
        let exe = std::env::current_exe().unwrap();
        let spec = exe.display().to_string();
        let f = GuestFile::parse(&spec).unwrap();
        assert!(f.guest.starts_with("/usr/local/bin/"));
        let f = GuestFile::parse(&format!("{spec}:/opt/x")).unwrap();
        assert_eq!(f.guest, "/opt/x");
        assert!(GuestFile::parse(&format!("{spec}:relative")).is_err());
        assert!(GuestFile::parse(&format!("{spec}:/a/../b")).is_err());
        assert!(GuestFile::parse("/nonexistent/file").is_err());
    }
}
