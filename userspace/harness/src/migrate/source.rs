//! The migration source: the writer guest running with dirty logging, pre-copy rounds, the
//! stop, the switch-over, then the page server until the destination is done.

use super::vcpu_state::VcpuState;
use super::wire::{self, Hello, Msg, MAX_RUN};
use super::{bit, build, install_kick_handler, kick, Layout, VmMemorySource, PAGE};
use crate::guest::{Event, WriterState, WriterVcpu, UNLIMITED};
use crate::vm::{Backing, Vm, DATA_SLOT};
use anyhow::{anyhow, bail, Context, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_userfault::source::{serve_connection, PageSource, SourceError};
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How the source migrates.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The VM.
    pub layout: Layout,
    /// Pre-copy rounds after the full copy (round 0), at most.
    pub max_rounds: u32,
    /// Stop pre-copy once a round found at most this many dirty data pages.
    pub dirty_threshold: u64,
    /// Delay the page server adds to every page it reads (an injected network delay).
    pub page_delay: Duration,
    /// Before stopping, wait until the writers wrote at least this many pages since the
    /// last pre-copy round fetched the dirty logs (bounded by 60 s): leaves that many page
    /// writes for post-copy however fast the last round was. Synchronised on the writers'
    /// recorded positions.
    pub min_dirty_writes: u64,
    /// Fault injection: the page server dies (closes its connection) when asked for more
    /// than this many pages after the switch-over, as a killed source would.
    pub die_after_pages: Option<u64>,
    /// Fault injection for tests: clear the lowest set bit of the final dirty bitmap, as a
    /// lost dirty bit would; the destination then releases a stale page as clean, which its
    /// guest must catch.
    pub drop_a_dirty_bit: bool,
    /// Address the page server binds (port 0: any); the destination connects to its port on
    /// the address it reached the source's channel from.
    pub page_bind: String,
}

impl SourceConfig {
    /// Defaults: 8 rounds, threshold 64 pages, no delay, page server on 127.0.0.1.
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            max_rounds: 8,
            dirty_threshold: 64,
            page_delay: Duration::ZERO,
            min_dirty_writes: 0,
            die_after_pages: None,
            drop_a_dirty_bit: false,
            page_bind: "127.0.0.1:0".into(),
        }
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// Data pages sent (all of them in round 0, then those found dirty).
    pub data_pages: u64,
    /// System pages sent (those found dirty).
    pub sys_pages: u64,
    /// How long the round took.
    pub elapsed: Duration,
}

/// What the source did.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// The pre-copy rounds.
    pub rounds: Vec<Round>,
    /// Data pages dirty in the final bitmap (left for post-copy).
    pub dirty_at_switchover: u64,
    /// System pages sent during the stop.
    pub sys_pages_at_switchover: u64,
    /// vCPU stop → switch-over sent.
    pub stop_to_switchover: Duration,
    /// Connected → the destination's Done.
    pub total: Duration,
    /// Where each writer was when stopped.
    pub writers: Vec<WriterState>,
    /// The destination's verdict.
    pub dest_ok: bool,
    /// The destination's message.
    pub dest_message: String,
}

impl SourceReport {
    /// Data pages sent during pre-copy.
    pub fn precopy_pages(&self) -> u64 {
        self.rounds.iter().map(|r| r.data_pages).sum()
    }
}

/// Turns on dirty logging for a memslot (a flags-only change of the slot kvm-testvm made).
fn log_dirty(vm: &Vm, slot: u32) -> Result<()> {
    let r = vm.region(slot);
    let mr = kvm_userspace_memory_region {
        slot,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: r.gpa,
        memory_size: r.size,
        userspace_addr: r.mapping.addr(),
    };
    // SAFETY: the slot's own gpa, size and mapping (owned with the VM fd, so mapped for as long
    // as KVM can use the slot); only the flags change.
    unsafe { vm.fd().set_user_memory_region(mr) }
        .with_context(|| format!("enabling dirty logging on memslot {slot}"))
}

fn dirty_log(vm: &Vm, slot: u32) -> Result<Vec<u64>> {
    let size = vm.region(slot).size as usize;
    vm.fd()
        .get_dirty_log(slot, size)
        .with_context(|| format!("KVM_GET_DIRTY_LOG(slot {slot})"))
}

fn count(map: &[u64]) -> u64 {
    map.iter().map(|w| w.count_ones() as u64).sum()
}

/// Sends the pages of `slot` whose bit is set in `which` (all of them with `None`), in runs.
fn send_pages(
    w: &mut impl Write,
    vm: &Vm,
    slot: u32,
    which: Option<&[u64]>,
) -> Result<u64, wire::WireError> {
    let r = vm.region(slot);
    let pages = r.size / PAGE;
    let mut sent = 0;
    let mut p = 0;
    while p < pages {
        if which.is_some_and(|m| !bit(m, p)) {
            p += 1;
            continue;
        }
        let mut n = 1;
        while p + n < pages && (n as usize) < MAX_RUN && which.is_none_or(|m| bit(m, p + n)) {
            n += 1;
        }
        let mut data = vec![0u8; (n * PAGE) as usize];
        r.mapping.read((p * PAGE) as usize, &mut data);
        wire::send(
            w,
            &Msg::Pages {
                slot,
                first: p,
                data,
            },
        )?;
        sent += n;
        p += n;
    }
    Ok(sent)
}

/// [`SourceConfig::die_after_pages`]: serves `left` pages, then drops the connection.
struct Dying {
    inner: VmMemorySource,
    left: AtomicU64,
    sock: TcpStream,
}

impl PageSource for Dying {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }

    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        let left = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if left.is_err() {
            // As a killed process: the connection goes, nothing more is sent.
            self.sock.shutdown(std::net::Shutdown::Both).ok();
            return Err(SourceError::Io {
                index,
                source: std::io::Error::other("injected source death"),
            });
        }
        self.inner.read_page(index, dst)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Runs a writer until told to stop; returns it (out of KVM_RUN) for its state to be saved.
fn writer_loop(mut v: WriterVcpu, stop: &AtomicBool) -> Result<WriterVcpu> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(v);
        }
        match v.step() {
            Ok(Event::Interrupted) => {}
            Ok(e) => bail!(
                "writer vCPU {}: unexpected {e:?} on the source",
                v.vcpu().id
            ),
            Err(e) => bail!("writer vCPU {}: {e}", v.vcpu().id),
        }
    }
}

/// Migrates a freshly started writer VM to the destination listening at `dest`.
pub fn migrate_source(cfg: &SourceConfig, dest: impl ToSocketAddrs) -> Result<SourceReport> {
    install_kick_handler();
    let super::Built { vm, data, writers } = build(&cfg.layout, Backing::Anonymous, UNLIMITED)?;
    // From here on every guest write is logged; the host wrote what it wrote identically on
    // the destination, which builds the same VM.
    log_dirty(&vm, 0)?;
    log_dirty(&vm, DATA_SLOT)?;
    let pages_server = TcpListener::bind(&cfg.page_bind)
        .with_context(|| format!("binding the page server to {}", cfg.page_bind))?;
    let page_port = pages_server.local_addr()?.port();
    let served = VmMemorySource::new(data.clone(), cfg.page_delay);
    let die_after = cfg.die_after_pages;

    let stream = TcpStream::connect(dest).context("connecting to the destination")?;
    stream.set_nodelay(true).ok();
    // A destination that stops reading is hung: a send fails after this instead of blocking.
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .context("setting the migration channel's timeout")?;
    let start = Instant::now();
    let mut rx = BufReader::new(stream.try_clone()?);
    let mut tx = BufWriter::with_capacity(1 << 20, stream);
    let l = &cfg.layout;
    wire::send(
        &mut tx,
        &Msg::Hello(Hello {
            vcpus: l.vcpus as u32,
            pages: l.pages,
            data_gpa: l.data_gpa,
            seed: l.seed,
            delay: l.delay,
            sys_size: vm.region(0).size,
            guest_fn: crate::guest::writer_guest as *const () as u64,
            page_port,
        }),
    )?;
    tx.flush()?;

    // The page server: one client (the destination), served from the VM's data memory. It is
    // only asked for pages after the switch-over, when the vCPUs are stopped.
    let server =
        std::thread::Builder::new()
            .name("mig-pages".into())
            .spawn(move || -> Result<u64> {
                let (s, peer) = pages_server.accept().context("accepting the page client")?;
                tracing::info!(%peer, "page client");
                s.set_nodelay(true).ok();
                let source: Arc<dyn PageSource> = match die_after {
                    None => Arc::new(served),
                    Some(n) => Arc::new(Dying {
                        inner: served,
                        left: AtomicU64::new(n),
                        sock: s.try_clone()?,
                    }),
                };
                Ok(serve_connection(s, source)?)
            })?;

    // The writers.
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel();
    let mut threads = Vec::new();
    let watches: Vec<_> = writers.iter().map(|w| w.watch()).collect();
    let written = || watches.iter().map(|w| w.written()).sum::<u64>();
    for (i, w) in writers.into_iter().enumerate() {
        let (stop, done_tx) = (stop.clone(), done_tx.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("mig-src-vcpu{i}"))
                .spawn(move || {
                    let r = writer_loop(w, &stop);
                    done_tx.send(i).ok();
                    r
                })?,
        );
    }
    drop(done_tx);

    let result = (|| -> Result<SourceReport> {
        // Pre-copy. Each round fetches (and clears) the dirty logs first, then sends: a page
        // written after the fetch is dirty in the next round.
        let mut rounds = Vec::new();
        let mut written_at_fetch = 0;
        for round in 0..=cfg.max_rounds {
            let t = Instant::now();
            written_at_fetch = written();
            let sys = dirty_log(&vm, 0)?;
            let dirty = dirty_log(&vm, DATA_SLOT)?;
            let data_pages = if round == 0 {
                send_pages(&mut tx, &vm, DATA_SLOT, None)?
            } else {
                send_pages(&mut tx, &vm, DATA_SLOT, Some(&dirty))?
            };
            let sys_pages = send_pages(&mut tx, &vm, 0, Some(&sys))?;
            wire::send(&mut tx, &Msg::RoundEnd { round, data_pages })?;
            tx.flush()?;
            rounds.push(Round {
                data_pages,
                sys_pages,
                elapsed: t.elapsed(),
            });
            tracing::info!(round, data_pages, sys_pages, "pre-copy round");
            if round > 0 && data_pages <= cfg.dirty_threshold {
                break;
            }
            if threads.iter().any(|t| t.is_finished()) {
                break;
            }
        }

        let wait = Instant::now() + Duration::from_secs(60);
        while written() < written_at_fetch + cfg.min_dirty_writes
            && Instant::now() < wait
            && !threads.iter().any(|t| t.is_finished())
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Stop the vCPUs: the flag, then kicks until every thread has returned (a signal that
        // arrives outside KVM_RUN is lost, so it is repeated).
        wire::send(&mut tx, &Msg::Stop)?;
        tx.flush()?;
        let t_stop = Instant::now();
        stop.store(true, Ordering::SeqCst);
        let mut left = threads.len();
        while left > 0 {
            threads.iter().for_each(kick);
            match done_rx.recv_timeout(Duration::from_millis(1)) {
                Ok(_) => left -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut writers = Vec::new();
        for t in threads.drain(..) {
            writers.push(t.join().map_err(|_| anyhow!("writer thread panicked"))??);
        }
        // The final dirty logs: system pages go now, data pages are left to post-copy.
        let sys = dirty_log(&vm, 0)?;
        let mut dirty = dirty_log(&vm, DATA_SLOT)?;
        if cfg.drop_a_dirty_bit {
            if let Some(w) = dirty.iter_mut().find(|w| **w != 0) {
                *w &= *w - 1;
            }
        }
        let sys_pages_at_switchover = send_pages(&mut tx, &vm, 0, Some(&sys))?;
        let vcpus = writers
            .iter()
            .map(|w| VcpuState::save(w.vcpu().fd()))
            .collect::<Result<Vec<_>, _>>()?;
        let dirty_at_switchover = count(&dirty);
        wire::send(&mut tx, &Msg::SwitchOver { vcpus, dirty })?;
        tx.flush()?;
        let stop_to_switchover = t_stop.elapsed();
        let states = writers.iter().map(|w| w.state()).collect();
        tracing::info!(
            dirty_at_switchover,
            sys_pages_at_switchover,
            ?stop_to_switchover,
            "switched over"
        );

        // Post-copy: the page server runs until the destination says it is done.
        let (dest_ok, dest_message) = match wire::recv(&mut rx) {
            Ok(Msg::Done { ok, message }) => (ok, message),
            Ok(m) => bail!("destination sent {m:?} instead of Done"),
            Err(e) => return Err(anyhow!(e).context("waiting for the destination")),
        };
        Ok(SourceReport {
            rounds,
            dirty_at_switchover,
            sys_pages_at_switchover,
            stop_to_switchover,
            total: start.elapsed(),
            writers: states,
            dest_ok,
            dest_message,
        })
    })();
    // On failure the writers may still run: stop them before the VM goes.
    stop.store(true, Ordering::SeqCst);
    while threads.iter().any(|t| !t.is_finished()) {
        threads.iter().for_each(kick);
        std::thread::yield_now();
    }
    for t in threads {
        t.join().ok();
    }
    // The destination closed its page connection when it finished; a server still waiting for
    // a client that never came is left (its thread ends with the process).
    if server.is_finished() {
        match server.join() {
            Ok(Ok(pages)) => tracing::info!(pages, "page server done"),
            Ok(Err(e)) => tracing::warn!("page server: {e:#}"),
            Err(_) => tracing::warn!("page server panicked"),
        }
    }
    drop(vm);
    result
}
