//! Both roles in one process over loopback, for the side-by-side comparison of the modes
//! (`kvm-userfault migrate-bench`) and the tests; and the table it prints.

use super::{migrate_dest, migrate_source, DestConfig, DestReport, SourceConfig, SourceReport};
use anyhow::{anyhow, Context, Result};
use std::fmt::Write as _;
use std::net::TcpListener;

/// Migrates one VM from a source thread to a destination on this thread over 127.0.0.1.
pub fn migrate_loopback(
    scfg: &SourceConfig,
    dcfg: &DestConfig,
) -> Result<(SourceReport, DestReport)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the destination")?;
    let addr = listener.local_addr()?;
    let s = scfg.clone();
    let src = std::thread::Builder::new()
        .name("mig-source".into())
        .spawn(move || migrate_source(&s, addr))?;
    let d = migrate_dest(dcfg, &listener);
    let s = src
        .join()
        .map_err(|_| anyhow!("the source thread panicked"))?;
    let d = d?;
    Ok((s?, d))
}

/// One row per migration: the deterministic counts beside the times.
pub fn table(rows: &[(SourceReport, DestReport)]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| mode | rounds | pre-copied | dirty at switch-over | clean ranges | demand faults | prefetched | total | downtime | post-copy | fault p50 | fault p99 |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (s, d) in rows {
        let ms = |x: std::time::Duration| format!("{:.1} ms", x.as_secs_f64() * 1e3);
        let us = |x: std::time::Duration| format!("{:.0} µs", x.as_secs_f64() * 1e6);
        let _ = writeln!(
            t,
            "| {:?} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            d.mode,
            s.rounds.len(),
            s.precopy_pages(),
            d.missing_at_switchover,
            d.clean_ranges,
            d.demand_pages,
            d.prefetched_pages,
            ms(s.total),
            ms(d.downtime),
            ms(d.post_copy),
            us(d.p50),
            us(d.p99),
        );
    }
    t
}

/// Re-executes the process without address-space randomisation unless it already runs so:
/// the source and the destination must place the guest image (which the guest's page tables
/// map at its host addresses) at the same addresses. Returns only if no re-exec was needed.
pub fn reexec_without_aslr() -> Result<()> {
    const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0040000;
    // SAFETY: personality(0xffffffff) only queries the persona.
    let cur = unsafe { libc::personality(0xffff_ffff) };
    if cur < 0 {
        return Err(std::io::Error::last_os_error()).context("personality");
    }
    if cur as libc::c_ulong & ADDR_NO_RANDOMIZE != 0 {
        return Ok(());
    }
    // SAFETY: sets a persona flag that takes effect at the next exec.
    if unsafe { libc::personality(cur as libc::c_ulong | ADDR_NO_RANDOMIZE) } < 0 {
        return Err(std::io::Error::last_os_error()).context("personality(ADDR_NO_RANDOMIZE)");
    }
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let e = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .exec();
    Err(e).context("re-executing without address randomisation")
}
