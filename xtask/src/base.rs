//! The pinned base: Debian's binary `linux-source-7.3` package, fetched with `apt-get download`
//! through a private apt configuration whose mirror is taken from the machine's own apt sources
//! (no registry host is written into the repository, and the system's sources are not changed).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::host;
use crate::layout::Layout;

/// The contents of `kernel-patches/BASE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasePin {
    pub version: String,
    pub package: String,
    pub package_version: String,
    pub suite: String,
    pub sha256: String,
}

impl BasePin {
    pub fn load(layout: &Layout) -> Result<Self> {
        let path = layout.patches_dir().join("BASE");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let get = |key: &str| -> Result<String> {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with('#'))
                .find_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    (k.trim() == key).then(|| v.trim().to_string())
                })
                .with_context(|| format!("missing `{key} = …`"))
        };
        let pin = Self {
            version: get("version")?,
            package: get("package")?,
            package_version: get("package_version")?,
            suite: get("suite")?,
            sha256: get("sha256")?,
        };
        if pin.sha256.len() != 64 || !pin.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("sha256 `{}` is not 64 hex digits", pin.sha256);
        }
        Ok(pin)
    }
}

/// Makes sure the pristine base tree exists as a git repository tagged `base`; returns its path.
pub fn ensure_base_tree(layout: &Layout, pin: &BasePin) -> Result<PathBuf> {
    let tree = layout.base_tree(&pin.version);
    if tree.join(".git").exists() && git_has_tag(&tree, "base") {
        return Ok(tree);
    }
    host::ensure(host::Tools::KernelBuild)?;
    let deb = download_package(layout, pin)?;
    let staging = tree.with_extension("partial");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    eprintln!("[base] extracting {}", deb.display());
    // The .deb holds /usr/src/linux-source-X.Y.tar.xz; stream it out and unpack in one pass.
    let script = format!(
        "set -eo pipefail; dpkg-deb --fsys-tarfile '{deb}' | tar -xO ./usr/src/{pkg}.tar.xz | tar -xJ --strip-components=1 -C '{dst}'",
        deb = deb.display(),
        pkg = pin.package,
        dst = staging.display()
    );
    host::run(Command::new("bash").args(["-c", &script])).context("extracting the base tarball")?;
    let makefile = fs::read_to_string(staging.join("Makefile")).context("no top-level Makefile")?;
    let found = kernel_version_of(&makefile);
    if found.as_deref() != Some(pin.version.as_str()) {
        bail!(
            "the package holds Linux {found:?}, expected {}",
            pin.version
        );
    }
    eprintln!("[base] committing the base tree to git (about a minute)");
    let git = |args: &[&str]| -> Result<()> {
        host::run_quiet(
            Command::new("git")
                .current_dir(&staging)
                .args([
                    "-c",
                    "user.name=kvm-userfault base",
                    "-c",
                    "user.email=base@invalid",
                ])
                .args(args),
        )
    };
    git(&["init", "-q"])?;
    // Debian's tree ignores everything at the top level (`/*` in .gitignore): force-add.
    git(&["add", "-A", "-f", "."])?;
    let message = format!(
        "Linux {} (Debian {} {})",
        pin.version, pin.package, pin.package_version
    );
    git(&["commit", "-q", "-m", &message])?;
    git(&["tag", "base"])?;
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    fs::rename(&staging, &tree)?;
    Ok(tree)
}

fn git_has_tag(tree: &Path, tag: &str) -> bool {
    Command::new("git")
        .current_dir(tree)
        .args(["rev-parse", "-q", "--verify", &format!("refs/tags/{tag}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `VERSION.PATCHLEVEL.SUBLEVEL` from a top-level kernel Makefile.
pub fn kernel_version_of(makefile: &str) -> Option<String> {
    let field = |name: &str| {
        makefile.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    Some(format!(
        "{}.{}.{}",
        field("VERSION")?,
        field("PATCHLEVEL")?,
        field("SUBLEVEL")?
    ))
}

fn download_package(layout: &Layout, pin: &BasePin) -> Result<PathBuf> {
    let dir = layout.downloads();
    fs::create_dir_all(&dir)?;
    let file = dir.join(format!(
        "{}_{}_all.deb",
        pin.package,
        pin.package_version.replace(':', "%3a")
    ));
    if file.exists() && sha256_of(&file)? == pin.sha256 {
        return Ok(file);
    }
    let apt_conf = private_apt_config(layout, &pin.suite)?;
    eprintln!(
        "[base] apt-get update ({} via a private apt config)",
        pin.suite
    );
    host::run_quiet(
        Command::new("apt-get")
            .env("APT_CONFIG", &apt_conf)
            .args(["update", "-q"]),
    )
    .context("apt-get update with the private config")?;
    eprintln!("[base] downloading {}={}", pin.package, pin.package_version);
    host::run_quiet(
        Command::new("apt-get")
            .current_dir(&dir)
            .env("APT_CONFIG", &apt_conf)
            .args([
                "download",
                "-q",
                &format!("{}={}", pin.package, pin.package_version),
            ]),
    )
    .with_context(|| {
        format!(
            "downloading {}={} from {}; if the archive no longer carries this version, \
             pin another in kernel-patches/BASE or pass --kernel-src",
            pin.package, pin.package_version, pin.suite
        )
    })?;
    let digest = sha256_of(&file)?;
    if digest != pin.sha256 {
        bail!(
            "{} has sha256 {digest}, kernel-patches/BASE pins {}",
            file.display(),
            pin.sha256
        );
    }
    Ok(file)
}

fn sha256_of(file: &Path) -> Result<String> {
    let out = host::output(Command::new("sha256sum").arg(file))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Writes an apt configuration that uses only its own lists and cache, with one source: the
/// machine's Debian mirror and `suite`. Returns the path for `APT_CONFIG`.
fn private_apt_config(layout: &Layout, suite: &str) -> Result<PathBuf> {
    let mirror = debian_mirror_from_system()?;
    let root = layout.private_apt();
    for sub in [
        "lists/partial",
        "cache/archives/partial",
        "sources.list.d",
        "preferences.d",
    ] {
        fs::create_dir_all(root.join(sub))?;
    }
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    fs::write(
        root.join("sources.list"),
        format!("deb [signed-by={keyring}] {mirror} {suite} main\n"),
    )?;
    let conf = root.join("apt.conf");
    let r = root.display();
    fs::write(
        &conf,
        format!(
            "Dir::Etc::sourcelist \"{r}/sources.list\";\n\
             Dir::Etc::sourceparts \"{r}/sources.list.d\";\n\
             Dir::Etc::preferencesparts \"{r}/preferences.d\";\n\
             Dir::State::Lists \"{r}/lists\";\n\
             Dir::Cache \"{r}/cache\";\n\
             APT::Sandbox::User \"root\";\n"
        ),
    )?;
    Ok(conf)
}

/// The first Debian archive URI in the machine's apt sources (one-line or deb822 format),
/// skipping the security archive, which does not carry backports.
fn debian_mirror_from_system() -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut extra: Vec<PathBuf> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
        extra.sort();
        files.extend(extra);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        if let Some(uri) = debian_mirror_in(&text) {
            return Ok(uri);
        }
    }
    bail!("no Debian archive found in the machine's apt sources (/etc/apt/sources.list{{,.d}})")
}

/// Finds a Debian archive URI in one sources file. A Debian archive is recognised by the
/// Debian keyring or a Debian suite name, not by a host name.
pub fn debian_mirror_in(text: &str) -> Option<String> {
    const SUITES: &[&str] = &[
        "bookworm", "trixie", "forky", "sid", "unstable", "stable", "testing",
    ];
    let is_debian_suite = |s: &str| SUITES.contains(&s.split('-').next().unwrap_or(s));
    let usable = |uri: &str| !uri.contains("security") && uri.starts_with("http");
    // deb822 stanzas
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
            })
        };
        if let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) {
            let debian = suites.split_whitespace().any(is_debian_suite)
                || field("Signed-By").is_some_and(|k| k.contains("debian-archive-keyring"));
            if let Some(uri) = uris.split_whitespace().find(|u| usable(u)) {
                if debian && suites.split_whitespace().all(|s| !s.contains("security")) {
                    return Some(uri.trim_end_matches('/').to_string());
                }
            }
        }
    }
    // one-line format: deb [opts] URI SUITE COMPONENTS…
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = match rest.trim_start().strip_prefix('[') {
            Some(r) => r.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if usable(uri) && is_debian_suite(suite) && !suite.contains("security") {
            return Some(uri.trim_end_matches('/').to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_skips_security_and_foreign_repos() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(
            debian_mirror_in(text).as_deref(),
            Some("http://mirror.example/debian")
        );
        let foreign = "Types: deb\nURIs: https://deb.nodesource.example/node_20.x\nSuites: nodistro\nComponents: main\n";
        assert_eq!(debian_mirror_in(foreign), None);
    }

    #[test]
    fn mirror_from_one_line_format() {
        let text = "# comment\ndeb [arch=amd64] http://m.example/debian/ trixie main\n";
        assert_eq!(
            debian_mirror_in(text).as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(
            debian_mirror_in("deb http://m.example/x cloud-sdk main\n"),
            None
        );
    }

    #[test]
    fn base_pin_parses_and_rejects_bad_digest() {
        let good = "version = 7.3.4\npackage = linux-source-7.3\npackage_version = 7.3.4-1\nsuite = trixie-backports\nsha256 = ".to_string() + &"a".repeat(64);
        let pin = BasePin::parse(&good).unwrap();
        assert_eq!(pin.version, "7.3.4");
        let bad = good.replace(&"a".repeat(64), "xyz");
        assert!(BasePin::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("64 hex"));
        assert!(BasePin::parse("version = 1")
            .unwrap_err()
            .to_string()
            .contains("package"));
    }

    #[test]
    fn kernel_version_from_makefile() {
        let mk = "VERSION = 7\nPATCHLEVEL = 3\nSUBLEVEL = 4\nEXTRAVERSION =\n";
        assert_eq!(kernel_version_of(mk).as_deref(), Some("7.3.4"));
        assert_eq!(kernel_version_of("VERSION = 7\n"), None);
    }
}
