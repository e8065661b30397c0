//! Post-copy live migration of the writer workload, source and destination in one process
//! over 127.0.0.1 (issue 14). The guest, on the destination, checks that every page of the
//! data region holds what the source last wrote (the sweep its recorded position says), so a
//! lost, stale or wrong page fails the test with the page's address.
//!
//! Host: userfaultfd (stock KVM). The kvm-sync / kvm-async variants need the series and run
//! in the patched guest (`--ignored`).

use kvm_testvm::{caps, require_userfault};
use kvm_userfault_harness::migrate::{
    migrate_dest, migrate_source, DestConfig, DestError, DestReport, Layout, SourceConfig,
    SourceReport,
};
use kvm_userfault_harness::runner::Mode;
use std::net::TcpListener;
use std::time::Duration;

fn layout(seed: u64) -> Layout {
    Layout {
        vcpus: 3,
        pages: 768,
        data_gpa: 1 << 30,
        seed,
        delay: 0,
    }
}

/// Migrates once; returns both reports (the destination's error fails the test).
fn migrate(
    mode: Mode,
    layout: Layout,
    delay: Duration,
    prefetch: bool,
) -> (SourceReport, DestReport) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut scfg = SourceConfig::new(layout);
    scfg.page_delay = delay;
    scfg.max_rounds = 4;
    // Leave pages for post-copy however fast the last round was.
    scfg.min_dirty_writes = 24;
    let src = std::thread::spawn(move || migrate_source(&scfg, addr));
    let mut dcfg = DestConfig::new(mode);
    dcfg.post_copy_pages = 16;
    dcfg.prefetch = prefetch;
    let d = migrate_dest(&dcfg, &listener);
    let s = src.join().unwrap().unwrap();
    let d = d.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    assert!(s.dest_ok, "{}", s.dest_message);
    (s, d)
}

/// The counts that must hold in every mode.
fn check(s: &SourceReport, d: &DestReport) {
    let l = d.layout;
    // Every page was verified by the guest, after the switch-over.
    assert_eq!(d.verified_pages, l.pages);
    // Round 0 sent every page; the destination received what the source sent.
    assert_eq!(s.rounds[0].data_pages, l.pages);
    assert_eq!(d.precopy_pages, s.precopy_pages());
    assert_eq!(d.rounds as usize, s.rounds.len());
    // What the final bitmap left dirty is exactly what was missing at the switch-over, and
    // the rest was marked present in ranges, not page by page.
    assert_eq!(d.missing_at_switchover, s.dirty_at_switchover);
    assert_eq!(d.clean_pages + d.missing_at_switchover, l.pages);
    assert!(d.clean_ranges <= d.missing_at_switchover + 1, "{d:?}");
    // The writers were running (several sweeps), and stopped mid-way with pages dirty.
    assert!(s.writers.iter().all(|w| w.sweep >= 1), "{:?}", s.writers);
    assert!(
        s.dirty_at_switchover > 0,
        "nothing left for post-copy: {s:?}"
    );
    // Every missing page arrived: on demand or by prefetch, exactly once.
    assert_eq!(
        d.demand_pages + d.prefetched_pages,
        d.missing_at_switchover,
        "{}",
        d.stats
    );
}

#[test]
fn migrate_writer_through_userfaultfd() {
    if !caps::require_dev_kvm("migrate_writer_through_userfaultfd") {
        return;
    }
    // Repeated, with different seeds: no run may lose or mix up a page.
    for seed in 1..=3 {
        // Without prefetch every missing page is a demand fault (the guest reads them all).
        let prefetch = seed != 3;
        let (s, d) = migrate(Mode::UffdMissing, layout(seed), Duration::ZERO, prefetch);
        check(&s, &d);
        if !prefetch {
            assert_eq!(d.demand_pages, d.missing_at_switchover, "{}", d.stats);
            assert!(d.p50 > Duration::ZERO);
        }
        eprintln!(
            "uffd seed {seed}: rounds {:?}, dirty at switch-over {}, downtime {:?}, post-copy {:?}, demand {} prefetch {}, p50 {:?} p99 {:?}",
            s.rounds.iter().map(|r| r.data_pages).collect::<Vec<_>>(),
            s.dirty_at_switchover,
            d.downtime,
            d.post_copy,
            d.demand_pages,
            d.prefetched_pages,
            d.p50,
            d.p99
        );
    }
}

/// The source's page server dies after `k` pages of post-copy: the destination stops with one
/// error naming the dead source, every vCPU released, and the guest never read a page the
/// source did not supply (it would report wrong contents).
fn dying_source(mode: Mode, k: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut scfg = SourceConfig::new(layout(11));
    scfg.max_rounds = 2;
    scfg.min_dirty_writes = 24;
    scfg.die_after_pages = Some(k);
    let src = std::thread::spawn(move || migrate_source(&scfg, addr));
    let mut dcfg = DestConfig::new(mode);
    dcfg.prefetch = false;
    let t = std::time::Instant::now();
    let e = migrate_dest(&dcfg, &listener).unwrap_err();
    let took = t.elapsed();
    let s = src.join().unwrap().unwrap();
    assert!(!s.dest_ok);
    assert!(s.dirty_at_switchover > k, "{s:?}");
    match &e {
        DestError::PostCopy { cause, verified } => {
            assert!(cause.contains("closed the connection"), "{e}");
            // Verification comes after the writes, which fault on the missing pages first.
            assert!(*verified < layout(11).pages, "{e}");
        }
        other => panic!("{mode:?}: expected a post-copy failure, got: {other}"),
    }
    assert!(took < Duration::from_secs(60), "{took:?}");
    eprintln!("{mode:?}: {e} after {took:?}");
}

#[test]
fn a_lost_dirty_bit_is_caught_by_the_guest() {
    // The verification can fail: a source that loses one dirty bit makes the destination
    // release a page it holds only an older sweep of, and the guest finds it.
    if !caps::kvm_available() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut scfg = SourceConfig::new(layout(13));
    scfg.max_rounds = 2;
    scfg.min_dirty_writes = 24;
    scfg.drop_a_dirty_bit = true;
    let src = std::thread::spawn(move || migrate_source(&scfg, addr));
    let mut dcfg = DestConfig::new(Mode::UffdMissing);
    dcfg.post_copy_pages = 16;
    let e = migrate_dest(&dcfg, &listener).unwrap_err();
    let s = src.join().unwrap().unwrap();
    assert!(!s.dest_ok);
    assert!(
        matches!(e, DestError::WrongContents { .. }),
        "expected the guest to find the stale page, got: {e}"
    );
}

#[test]
fn a_hung_source_fails_the_destination_instead_of_blocking_it() {
    // A source that connects and then says nothing (hung, not dead): the destination gives up
    // after its channel timeout with an error that says so, rather than waiting forever.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hung = std::thread::spawn(move || {
        let s = std::net::TcpStream::connect(addr).unwrap();
        // Held open until the destination has given up (it closes its end).
        let mut b = [0u8; 1];
        let _ = std::io::Read::read(&mut &s, &mut b);
    });
    let mut cfg = DestConfig::new(Mode::UffdMissing);
    cfg.channel_timeout = Duration::from_secs(1);
    let t = std::time::Instant::now();
    let e = migrate_dest(&cfg, &listener).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(
        msg.contains("sent nothing within the channel's timeout"),
        "{msg}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    hung.join().unwrap();
}

#[test]
fn a_dying_source_stops_a_userfaultfd_destination() {
    if !caps::require_dev_kvm("a_dying_source_stops_a_userfaultfd_destination") {
        return;
    }
    dying_source(Mode::UffdMissing, 4);
}

#[test]
#[ignore = "needs the KVM userfault series (run in the patched guest)"]
fn a_dying_source_stops_a_kvm_sync_destination() {
    require_userfault!("a_dying_source_stops_a_kvm_sync_destination");
    dying_source(Mode::KvmSync, 4);
}

#[test]
#[ignore = "needs the KVM userfault series (run in the patched guest)"]
fn a_dying_source_stops_a_kvm_async_destination() {
    require_userfault!("a_dying_source_stops_a_kvm_async_destination");
    dying_source(Mode::KvmAsync, 4);
}

fn kvm_mode(mode: Mode) {
    // Unthrottled under TCG the writers dirty every page each round (pre-copy never
    // converges: everything is post-copied); throttled, pre-copy converges and most pages are
    // released at the switch-over (USERFAULT cleared on ranges). Both, with and without
    // prefetch.
    for (delay, prefetch) in [(0, true), (1_000_000, false)] {
        let l = Layout { delay, ..layout(7) };
        let (s, d) = migrate(mode, l, Duration::from_micros(30), prefetch);
        check(&s, &d);
        if !prefetch {
            assert_eq!(d.demand_pages, d.missing_at_switchover, "{}", d.stats);
        }
        if delay > 0 {
            assert!(d.clean_pages > 0, "pre-copy did not converge: {s:?}");
        }
        eprintln!("{mode:?} prefetch {prefetch}: {d:?}");
    }
}

#[test]
#[ignore = "needs the KVM userfault series (run in the patched guest)"]
fn migrate_writer_kvm_sync() {
    require_userfault!("migrate_writer_kvm_sync");
    kvm_mode(Mode::KvmSync);
}

#[test]
#[ignore = "needs the KVM userfault series (run in the patched guest)"]
fn migrate_writer_kvm_async() {
    require_userfault!("migrate_writer_kvm_async");
    kvm_mode(Mode::KvmAsync);
}

// ------------------------------------------------------------------------------------------
// The CLI, in two processes; and a source that dies during post-copy.
// ------------------------------------------------------------------------------------------

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_kvm-userfault");

/// Kills and reaps a child when dropped (a failing test leaves no process behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Starts `migrate-dest` on a free port; returns it and the address it listens on (read from
/// its "waiting for a source on" line).
fn spawn_dest(args: &[&str]) -> (Reaped, String, BufReader<std::process::ChildStderr>) {
    let mut c = Command::new(BIN)
        .args(["migrate-dest", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(c.stderr.take().unwrap());
    let c = Reaped(c);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "migrate-dest exited");
        if let Some(a) = line.trim().strip_prefix("waiting for a source on ") {
            return (c, a.to_string(), err);
        }
    }
}

fn source_cmd(to: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["migrate-source", "--to", to, "--page-bind", "127.0.0.1:0"])
        .args([
            "--vcpus",
            "2",
            "--size-mib",
            "2",
            "--min-dirty-writes",
            "24",
        ])
        .args(args);
    c
}

#[test]
fn cli_migrates_between_two_processes() {
    if !caps::require_dev_kvm("cli_migrates_between_two_processes") {
        return;
    }
    let (mut dest, addr, _err) = spawn_dest(&["--post-copy-pages", "8"]);
    let out = source_cmd(&addr, &["--delay-us", "30"]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{s}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.contains("destination: verified 512 pages"), "{s}");
    let d = dest.0.wait_with_output_ref();
    assert!(d.0.success(), "{}", d.1);
    assert!(d.1.contains("guest verified 512 pages"), "{}", d.1);
}

trait WaitRef {
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, String);
}

impl WaitRef for Child {
    /// Waits and collects stdout (stderr was taken by the caller).
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, String) {
        let mut out = String::new();
        if let Some(o) = self.stdout.as_mut() {
            std::io::Read::read_to_string(o, &mut out).ok();
        }
        (self.wait().unwrap(), out)
    }
}

#[test]
fn a_source_killed_during_post_copy_stops_the_destination_cleanly() {
    if !caps::require_dev_kvm("a_source_killed_during_post_copy_stops_the_destination_cleanly") {
        return;
    }
    // Every page left is demand-faulted (no prefetch), each served 20 ms late: post-copy
    // lasts long enough for the kill to land in it.
    let (mut dest, addr, mut derr) = spawn_dest(&["--no-prefetch", "--page-timeout-secs", "30"]);
    let mut src = source_cmd(&addr, &["--delay-us", "20000"])
        .env("RUST_LOG", "kvm_userfault_harness=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let serr = BufReader::new(src.stderr.take().unwrap());
    let mut src = Reaped(src);
    // Synchronised on the source's own report that it switched over.
    let mut switched = false;
    for line in serr.lines() {
        if line.unwrap().contains("switched over") {
            switched = true;
            break;
        }
    }
    assert!(switched, "the source never switched over");
    src.0.kill().unwrap();
    let t = std::time::Instant::now();
    let (status, _) = dest.0.wait_with_output_ref();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut derr, &mut err).ok();
    assert!(!status.success(), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    // One clear error: post-copy failed because the source went away; never wrong contents
    // (a page the source did not supply is never mapped: the guest would have said so).
    let last = err
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(last.contains("post-copy failed"), "{err}");
    // A killed peer closes (FIN), or resets if our requests were still unread in its socket.
    assert!(
        last.contains("closed the connection") || last.contains("Connection reset by peer"),
        "{err}"
    );
    assert!(!err.contains("wrong contents"), "{err}");
    eprintln!("after {:?}: {last}", t.elapsed());
}
