//! The CLI: help, one-line errors with non-zero exit, serve/fetch over loopback.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvm-userfault"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kuf-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runtime errors are exactly one line starting with "error:" and exit status 1.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(o));
    let e = stderr(o);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 1, "{e}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{e}"
    );
}

#[test]
fn help_for_every_subcommand() {
    for sub in [
        &["--help"][..],
        &["run", "--help"],
        &["serve", "--help"],
        &["fetch", "--help"],
        &["make-image", "--help"],
    ] {
        let o = run(sub);
        assert!(o.status.success(), "{sub:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage"),
            "{sub:?}"
        );
    }
    let o = run(&["run", "--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    for m in ["kvm-sync", "kvm-async", "uffd-missing", "uffd-minor"] {
        assert!(out.contains(m), "{m}");
    }
}

#[test]
fn bad_flags_are_usage_errors() {
    let o = run(&["run", "--image", "x", "--mode", "bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("invalid value 'bogus'"));
    let o = run(&["run", "--mode", "uffd-missing"]);
    assert_eq!(o.status.code(), Some(2), "needs --image or --remote");
    let o = run(&[
        "run",
        "--image",
        "x",
        "--mode",
        "uffd-missing",
        "--vcpus",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["make-image", "--out", "x", "--seed", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a number"));
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let o = run(&[
        "run",
        "--image",
        "/nonexistent/img",
        "--mode",
        "uffd-missing",
    ]);
    assert_one_line_error(&o, "cannot open");

    let img = tmp("trunc.snap");
    assert!(run(&[
        "make-image",
        "--out",
        img.to_str().unwrap(),
        "--size-mib",
        "1"
    ])
    .status
    .success());
    let len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let o = run(&[
        "run",
        "--image",
        img.to_str().unwrap(),
        "--mode",
        "uffd-missing",
    ]);
    assert_one_line_error(&o, "truncated");

    let o = run(&[
        "fetch",
        "--remote",
        "127.0.0.1:1",
        "--out",
        tmp("never").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "connecting to 127.0.0.1:1");

    let o = run(&["serve", "--image", "/nonexistent/img"]);
    assert_one_line_error(&o, "cannot open");
}

#[test]
fn kvm_modes_on_a_kernel_without_the_series_say_how_to_get_it() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: no /dev/kvm");
        return;
    }
    let img = tmp("small.snap");
    assert!(run(&[
        "make-image",
        "--out",
        img.to_str().unwrap(),
        "--size-mib",
        "1"
    ])
    .status
    .success());
    let o = run(&[
        "run",
        "--image",
        img.to_str().unwrap(),
        "--mode",
        "kvm-async",
    ]);
    if o.status.success() {
        eprintln!("SKIP: this kernel has the series");
        return;
    }
    assert_one_line_error(&o, "build it with `cargo xtask kernel`");
}

#[test]
fn serve_and_fetch_over_loopback() {
    let img = tmp("served.snap");
    let out = tmp("fetched.snap");
    assert!(run(&[
        "make-image",
        "--out",
        img.to_str().unwrap(),
        "--size-mib",
        "2",
        "--seed",
        "0x1234"
    ])
    .status
    .success());
    let mut server = bin()
        .args([
            "serve",
            "--image",
            img.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{line}");
    let o = run(&["fetch", "--remote", &addr, "--out", out.to_str().unwrap()]);
    server.kill().ok();
    server.wait().ok();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("fetched 512 pages"));
    assert_eq!(std::fs::read(&img).unwrap(), std::fs::read(&out).unwrap());
}

#[test]
fn run_from_a_remote_server_over_loopback() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("SKIP: no /dev/kvm");
        return;
    }
    let img = tmp("remote-run.snap");
    assert!(run(&[
        "make-image",
        "--out",
        img.to_str().unwrap(),
        "--size-mib",
        "1"
    ])
    .status
    .success());
    let mut server = bin()
        .args([
            "serve",
            "--image",
            img.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    let o = run(&[
        "run",
        "--remote",
        &addr,
        "--mode",
        "uffd-missing",
        "--prefetch",
        "--handler-threads",
        "2",
    ]);
    server.kill().ok();
    server.wait().ok();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("256 pages verified"), "{out}");
    assert!(out.contains("fault->resolved latency"), "{out}");
}
