//! Where things live: the repository, and the cache outside it that keeps the kernel source and
//! build directories between runs (so a warm rebuild after touching one KVM file takes seconds).

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Paths used by every subcommand.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The workspace root (the directory holding the top-level Cargo.toml).
    pub repo: PathBuf,
    /// `$KVMUF_CACHE`, else `$XDG_CACHE_HOME/kvm-userfault`, else `~/.cache/kvm-userfault`.
    pub cache: PathBuf,
}

impl Layout {
    pub fn discover() -> Result<Self> {
        let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let repo = manifest_dir
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let cache = match std::env::var_os("KVMUF_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => match std::env::var_os("XDG_CACHE_HOME") {
                Some(dir) => PathBuf::from(dir).join("kvm-userfault"),
                None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                    .join(".cache/kvm-userfault"),
            },
        };
        Ok(Self { repo, cache })
    }

    pub fn patches_dir(&self) -> PathBuf {
        self.repo.join("kernel-patches")
    }

    pub fn series_dir(&self) -> PathBuf {
        self.patches_dir().join("series")
    }

    pub fn config_fragment(&self, name: &str) -> PathBuf {
        self.patches_dir().join("config").join(name)
    }

    /// The pristine base tree (a git repository tagged `base`) that the series is applied to.
    pub fn base_tree(&self, version: &str) -> PathBuf {
        self.cache.join("src").join(format!("linux-{version}"))
    }

    pub fn downloads(&self) -> PathBuf {
        self.cache.join("downloads")
    }

    pub fn private_apt(&self) -> PathBuf {
        self.cache.join("apt")
    }

    /// Out-of-tree build directory for one kernel flavour and source tree.
    pub fn build_dir(&self, name: &str) -> PathBuf {
        self.cache.join("build").join(name)
    }

    /// Scratch space for one VM run (initramfs staging, console log).
    pub fn run_dir(&self) -> PathBuf {
        self.cache.join("run")
    }
}
