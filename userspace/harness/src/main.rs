//! `kvm-userfault`: run a demand-paged guest, serve an image over TCP, fetch one, make one.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kvm_userfault::source::{
    serve, write_snapshot, PageSource, RemoteOptions, RemoteSource, SnapshotSource, SnapshotWriter,
    Urgency,
};
use kvm_userfault::PAGE_SIZE;
use kvm_userfault_harness::guest::fill_pattern_page;
use kvm_userfault_harness::runner::{run_workload, Mode, RunConfig, SyncResolve};
use kvm_userfault_harness::vm::Backing;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "kvm-userfault",
    version,
    about = "Demand paging runtime for KVM guest memory"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum UffdBacking {
    Anon,
    Shmem,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the page-checking guest with its memory demand-filled from an image or a server.
    Run {
        /// Snapshot file (see `make-image`).
        #[arg(long, conflicts_with = "remote", required_unless_present = "remote")]
        image: Option<PathBuf>,
        /// Fetch pages from a `serve` side at HOST:PORT instead.
        #[arg(long)]
        remote: Option<String>,
        /// How faults are delivered and resolved.
        #[arg(long, value_enum)]
        mode: Mode,
        /// vCPUs.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=896))]
        vcpus: u16,
        /// Pattern seed the image was made with.
        #[arg(long, default_value_t = 0x5eed, value_parser = parse_u64)]
        seed: u64,
        /// Prefetch pages in the background.
        #[arg(long)]
        prefetch: bool,
        /// Data slot backing for uffd-missing.
        #[arg(long, value_enum, default_value = "anon")]
        backing: UffdBacking,
        /// io_uring reads in flight (kvm-async).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
        ring_depth: u16,
        /// How kvm-sync clears USERFAULT: the fd's RESOLVE ioctl or the attribute ioctl.
        #[arg(long, value_enum, default_value = "fd")]
        sync_resolve: SyncResolve,
        /// Threads serving the userfault fd / userfaultfd.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        handler_threads: u16,
        /// Fail if not done after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Write a snapshot whose pages hold the pattern the guest checks.
    MakeImage {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Size in MiB.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65536))]
        size_mib: u64,
        /// Pattern seed.
        #[arg(long, default_value_t = 0x5eed, value_parser = parse_u64)]
        seed: u64,
    },
    /// Export a snapshot to remote `fetch`/`run --remote` clients over TCP.
    Serve {
        /// Snapshot file.
        #[arg(long)]
        image: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7788")]
        listen: String,
    },
    /// Live-migrate a running writer guest to a `migrate-dest` (post-copy, docs/migration.md).
    MigrateSource {
        /// The destination's HOST:PORT.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        src: MigrateSourceArgs,
    },
    /// Receive a live migration: restart the guest at the switch-over and demand-page the rest.
    MigrateDest {
        /// Address to listen on for the source.
        #[arg(long, default_value = "127.0.0.1:7790")]
        listen: String,
        #[command(flatten)]
        dest: MigrateDestArgs,
    },
    /// Migrate over loopback in one process, once per mode, and print the table side by side.
    MigrateBench {
        /// Modes to compare.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "uffd-missing,kvm-sync,kvm-async"
        )]
        modes: Vec<Mode>,
        /// Migrations per mode.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        runs: u32,
        #[command(flatten)]
        src: MigrateSourceArgs,
        #[command(flatten)]
        dest: MigrateDestArgs,
    },
    /// Fetch a whole image from a server (prefetch + demand) into a snapshot file.
    Fetch {
        /// Server HOST:PORT.
        #[arg(long)]
        remote: String,
        /// Output snapshot file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct MigrateSourceArgs {
    /// Writer vCPUs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    vcpus: u16,
    /// Data memory in MiB.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=16384))]
    size_mib: u64,
    /// Pattern seed.
    #[arg(long, default_value_t = 0x5eed, value_parser = parse_u64)]
    seed: u64,
    /// Writer throttle: spin iterations after each page it writes.
    #[arg(long, default_value_t = 0)]
    writer_delay: u64,
    /// Pre-copy rounds after the full copy, at most.
    #[arg(long, default_value_t = 8)]
    max_rounds: u32,
    /// Stop pre-copy once a round finds at most this many dirty pages.
    #[arg(long, default_value_t = 64)]
    dirty_threshold: u64,
    /// Before stopping, wait until the writers wrote this many pages after the last round.
    #[arg(long, default_value_t = 0)]
    min_dirty_writes: u64,
    /// Injected delay per page the source serves after the switch-over, in µs.
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
    /// Address the source's page server binds (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    page_bind: String,
}

impl MigrateSourceArgs {
    fn config(&self) -> kvm_userfault_harness::migrate::SourceConfig {
        let mut layout = kvm_userfault_harness::migrate::Layout::new(self.seed);
        layout.vcpus = self.vcpus as usize;
        layout.pages = self.size_mib * (1 << 20) / PAGE_SIZE as u64;
        layout.delay = self.writer_delay;
        let mut c = kvm_userfault_harness::migrate::SourceConfig::new(layout);
        c.max_rounds = self.max_rounds;
        c.dirty_threshold = self.dirty_threshold;
        c.min_dirty_writes = self.min_dirty_writes;
        c.page_delay = Duration::from_micros(self.delay_us);
        c.page_bind = self.page_bind.clone();
        c
    }
}

#[derive(clap::Args, Clone)]
struct MigrateDestArgs {
    /// kvm-sync, kvm-async or uffd-missing (migrate-dest only; migrate-bench takes --modes).
    #[arg(long, value_enum, default_value = "uffd-missing")]
    mode: Mode,
    /// Pages each writer writes after the switch-over before the guest verifies its part.
    #[arg(long, default_value_t = 64)]
    post_copy_pages: u64,
    /// No background prefetch: every page left is demand-faulted.
    #[arg(long)]
    no_prefetch: bool,
    /// A page the source does not deliver within this many seconds fails the migration.
    #[arg(long, default_value_t = 5)]
    page_timeout_secs: u64,
}

impl MigrateDestArgs {
    fn config(&self, mode: Mode) -> kvm_userfault_harness::migrate::DestConfig {
        let mut c = kvm_userfault_harness::migrate::DestConfig::new(mode);
        c.post_copy_pages = self.post_copy_pages;
        c.prefetch = !self.no_prefetch;
        c.page_timeout = Duration::from_secs(self.page_timeout_secs);
        c
    }
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("`{s}` is not a number: {e}"))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run {
            image,
            remote,
            mode,
            vcpus,
            seed,
            prefetch,
            backing,
            ring_depth,
            handler_threads,
            sync_resolve,
            timeout_secs,
        } => {
            let source: Arc<dyn PageSource> = match (image, remote) {
                (Some(p), _) => Arc::new(SnapshotSource::open(&p)?),
                (None, Some(addr)) => Arc::new(RemoteSource::connect(
                    addr.as_str(),
                    RemoteOptions::default(),
                )?),
                (None, None) => unreachable!("clap requires one"),
            };
            let mut cfg = RunConfig::new(mode, source, seed);
            cfg.vcpus = vcpus as usize;
            cfg.prefetch = prefetch;
            cfg.ring_depth = ring_depth as usize;
            cfg.handler_threads = handler_threads as usize;
            cfg.sync_resolve = sync_resolve;
            cfg.timeout = Duration::from_secs(timeout_secs);
            cfg.uffd_backing = match backing {
                UffdBacking::Anon => Backing::Anonymous,
                UffdBacking::Shmem => Backing::Shmem,
            };
            let r = run_workload(&cfg)?;
            println!(
                "{:?}: {} pages verified by {} vCPU(s) in {:?} ({:.0} pages/s)",
                mode,
                r.pages,
                cfg.vcpus,
                r.elapsed,
                r.pages_per_sec()
            );
            for (i, t) in r.vcpu_times.iter().enumerate() {
                let part = r.pages / cfg.vcpus as u64
                    + if i + 1 == cfg.vcpus {
                        r.pages % cfg.vcpus as u64
                    } else {
                        0
                    };
                println!(
                    "  vCPU {i}: {part} pages in {t:?} ({:.0} pages/s)",
                    part as f64 / t.as_secs_f64().max(1e-9)
                );
            }
            println!("  {}", r.stats);
        }
        Cmd::MakeImage {
            out,
            size_mib,
            seed,
        } => {
            let pages = size_mib * (1 << 20) / PAGE_SIZE as u64;
            write_snapshot(&out, pages, |i, b| fill_pattern_page(seed, i, b))?;
            println!("wrote {} ({pages} pages, seed {seed:#x})", out.display());
        }
        Cmd::Serve { image, listen } => {
            let src = Arc::new(SnapshotSource::open(&image)?);
            let l = TcpListener::bind(&listen).with_context(|| format!("listening on {listen}"))?;
            eprintln!("serving {} on {}", src.describe(), l.local_addr()?);
            serve(l, src)?;
        }
        Cmd::MigrateSource { to, src } => {
            use kvm_userfault_harness::migrate;
            migrate::bench::reexec_without_aslr()?;
            let r = migrate::migrate_source(&src.config(), to.as_str())?;
            println!(
                "migrated to {to}: {} rounds ({} pages pre-copied), {} dirty at switch-over, stop to switch-over {:?}, total {:?}",
                r.rounds.len(),
                r.precopy_pages(),
                r.dirty_at_switchover,
                r.stop_to_switchover,
                r.total
            );
            anyhow::ensure!(r.dest_ok, "destination: {}", r.dest_message);
            println!("destination: {}", r.dest_message);
        }
        Cmd::MigrateDest { listen, dest } => {
            use kvm_userfault_harness::migrate;
            migrate::bench::reexec_without_aslr()?;
            let l = TcpListener::bind(&listen).with_context(|| format!("listening on {listen}"))?;
            eprintln!("waiting for a source on {}", l.local_addr()?);
            let d = migrate::migrate_dest(&dest.config(dest.mode), &l)?;
            println!(
                "{:?}: guest verified {} pages; downtime {:?}, post-copy {:?}, total {:?}; {} missing at switch-over, {} clean in {} ranges; {}",
                d.mode, d.verified_pages, d.downtime, d.post_copy, d.total,
                d.missing_at_switchover, d.clean_pages, d.clean_ranges, d.stats
            );
        }
        Cmd::MigrateBench {
            modes,
            runs,
            src,
            dest,
        } => {
            use kvm_userfault_harness::migrate;
            let mut rows = Vec::new();
            for mode in modes {
                for _ in 0..runs {
                    rows.push(
                        migrate::migrate_loopback(&src.config(), &dest.config(mode))
                            .with_context(|| format!("{mode:?}"))?,
                    );
                }
            }
            print!("{}", migrate::table(&rows));
        }
        Cmd::Fetch { remote, out } => {
            let src = RemoteSource::connect(remote.as_str(), RemoteOptions::default())?;
            let pages = src.page_count();
            let t = Instant::now();
            // Pipeline the image as prefetch, one window ahead of the one being read, and
            // write each window to the file as it completes: memory stays bounded by one
            // window (4 MiB) and the checksum table (8 bytes a page), whatever the image size.
            const WINDOW: u64 = 1024;
            let window = |w: u64| (w..(w + WINDOW).min(pages)).collect::<Vec<u64>>();
            let mut file = SnapshotWriter::create(&out, pages)?;
            let mut batch = vec![0u8; WINDOW as usize * PAGE_SIZE];
            src.request(&window(0), Urgency::Prefetch);
            for w in (0..pages).step_by(WINDOW as usize) {
                src.request(&window(w + WINDOW), Urgency::Prefetch);
                let idx = window(w);
                let batch = &mut batch[..idx.len() * PAGE_SIZE];
                for (&i, page) in idx.iter().zip(batch.chunks_exact_mut(PAGE_SIZE)) {
                    src.read_page(i, page)?;
                }
                file.write_pages(batch)?;
            }
            file.finish()?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "fetched {pages} pages in {secs:.3}s ({:.0} pages/s) into {}",
                pages as f64 / secs,
                out.display()
            );
        }
    }
    Ok(())
}
