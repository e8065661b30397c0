//! Feeding fault inputs to a [`Handler`], in the two shapes a VMM uses:
//!
//! - **its own event loop**: [`RingInput`] (the KVM userfault fd, read over io_uring) and
//!   [`UffdInput`] (a userfaultfd) are fds to poll; on readiness the loop calls
//!   `process_ready()`, which handles everything available without blocking;
//! - **a thread per input**: [`serve_userfault_fd`] and [`serve_uffd`] run until a
//!   [`StopSignal`] fires (or the VM is destroyed).
//!
//! Either way a record, once read from the fd, reaches the handler: it exists nowhere else.

use crate::fault::records::Record;
use crate::fault::uffd::{Uffd, UffdMsg, UFFD_EVENT_PAGEFAULT};
use crate::fault::{AsyncReader, ReaderError, ReaderExit, StopSignal};
use crate::handler::{Handler, HandlerError, Scratch};
use crate::ioctls::UserfaultFd;
use crate::PAGE_SIZE;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

/// A service loop's failure.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The handler failed (returned as itself, so its kind survives).
    #[error(transparent)]
    Handler(#[from] HandlerError),
    /// The io_uring reader of the userfault fd failed.
    #[error(transparent)]
    Reader(ReaderError),
    /// Polling the inputs failed.
    #[error("poll of userfaultfd {fd} and the stop signal")]
    Poll {
        /// The userfaultfd.
        fd: RawFd,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Reading the userfaultfd failed.
    #[error("reading userfaultfd {fd}")]
    UffdRead {
        /// The userfaultfd.
        fd: RawFd,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

impl From<ReaderError> for ServeError {
    /// A handler error the reader carried back from its callback is unwrapped, typed.
    fn from(e: ReaderError) -> Self {
        match e {
            ReaderError::Handler { records, source } => match source.downcast::<HandlerError>() {
                Ok(h) => ServeError::Handler(*h),
                Err(source) => ServeError::Reader(ReaderError::Handler { records, source }),
            },
            e => ServeError::Reader(e),
        }
    }
}

/// Hands one batch of records to the handler (as gpas, faulted now, not waiting on pages
/// another thread fills: that filler's install wakes the kernel waiters).
fn handle_records(
    h: &Handler,
    batch: &[Record],
    gpas: &mut Vec<u64>,
    scratch: &mut Scratch,
) -> Result<(), HandlerError> {
    let t = Instant::now();
    gpas.clear();
    gpas.extend(batch.iter().map(|r| r.gfn * PAGE_SIZE as u64));
    h.handle_gpas(gpas, t, false, scratch)
}

/// Serves a KVM userfault fd (or anything producing `kvm_userfault_msg` records) until `stop`
/// fires ([`ReaderExit::Stopped`]) or the fd reports end of file because its VM was destroyed
/// ([`ReaderExit::VmGone`], a clean end for a handler process that outlives its VM): io_uring
/// reads striding by the fd's negotiated record size, each batch handed to the handler.
pub fn serve_userfault_fd(
    h: &Handler,
    fd: &UserfaultFd,
    stop: StopSignal,
    depth: usize,
    records_per_read: usize,
) -> Result<ReaderExit, ServeError> {
    let _span = tracing::debug_span!("userfault_fd_reader", fd = fd.as_raw_fd()).entered();
    let mut reader = AsyncReader::new(fd.as_fd(), fd.msg_size(), depth, records_per_read, stop)?;
    let mut scratch = Scratch::default();
    let mut gpas = Vec::new();
    let exit = reader.run(|batch| handle_records(h, batch, &mut gpas, &mut scratch))?;
    if exit == ReaderExit::VmGone {
        tracing::info!(
            fd = fd.as_raw_fd(),
            "userfault fd: VM destroyed, reader stops"
        );
    }
    Ok(exit)
}

/// The KVM userfault fd as an input of the VMM's own event loop: poll [`RingInput`]'s fd
/// (`AsRawFd`, the io_uring fd) for readability and call [`RingInput::process_ready`]. Reads
/// stay in flight between calls, so records arrive with no system call per record.
pub struct RingInput {
    // Field order is drop order: the reader (which reads the fd) goes before the fd.
    reader: AsyncReader<'static>,
    fd: Arc<UserfaultFd>,
    handler: Arc<Handler>,
    scratch: Scratch,
    gpas: Vec<u64>,
}

impl RingInput {
    /// An input reading `fd` for `handler`, `depth` reads of `records_per_read` records in
    /// flight; armed (reading) on return.
    pub fn new(
        handler: Arc<Handler>,
        fd: Arc<UserfaultFd>,
        depth: usize,
        records_per_read: usize,
    ) -> Result<Self, ServeError> {
        // SAFETY: `fd` is held in the same struct and dropped after the reader (field order),
        // so the raw fd stays open for the reader's whole life.
        let mut reader = unsafe {
            AsyncReader::from_raw_polled(fd.as_raw_fd(), fd.msg_size(), depth, records_per_read)
        }?;
        reader.arm()?;
        Ok(Self {
            reader,
            fd,
            handler,
            scratch: Scratch::default(),
            gpas: Vec::new(),
        })
    }

    /// Handles every record available now, without blocking. `Ok(None)`: poll again;
    /// `Ok(Some(ReaderExit::VmGone))`: the VM was destroyed, nothing more will arrive.
    pub fn process_ready(&mut self) -> Result<Option<ReaderExit>, ServeError> {
        let _span = tracing::trace_span!("userfault_fd_ready", fd = self.fd.as_raw_fd()).entered();
        let (h, gpas, scratch) = (&self.handler, &mut self.gpas, &mut self.scratch);
        Ok(self
            .reader
            .process_ready(|batch| handle_records(h, batch, gpas, scratch))?)
    }

    /// Stops reading (a VMM pausing): cancels the reads in flight and handles the records
    /// they completed with meanwhile, so none is lost. [`RingInput::resume`] reads again.
    pub fn pause(&mut self) -> Result<(), ServeError> {
        let (h, gpas, scratch) = (&self.handler, &mut self.gpas, &mut self.scratch);
        Ok(self
            .reader
            .disarm(|batch| handle_records(h, batch, gpas, scratch))?)
    }

    /// Reads again after [`RingInput::pause`].
    pub fn resume(&mut self) -> Result<(), ServeError> {
        Ok(self.reader.arm()?)
    }

    /// The fd read.
    pub fn userfault_fd(&self) -> &Arc<UserfaultFd> {
        &self.fd
    }
}

impl AsRawFd for RingInput {
    fn as_raw_fd(&self) -> RawFd {
        self.reader.ring_fd()
    }
}

impl Drop for RingInput {
    /// Records read but not handled yet are handed to the handler, not dropped: they exist
    /// nowhere else (the kernel does not post a gfn twice).
    fn drop(&mut self) {
        if let Err(e) = self.pause() {
            tracing::error!(error = %e, "userfault fd input dropped: handing over its last records failed");
        }
    }
}

/// Reusable buffers of a userfaultfd drain.
struct UffdDrain {
    msgs: Vec<UffdMsg>,
    scratch: Scratch,
    gpas: Vec<u64>,
}

impl UffdDrain {
    fn new() -> Self {
        Self {
            msgs: vec![UffdMsg::default(); 64],
            scratch: Scratch::default(),
            gpas: Vec::with_capacity(64),
        }
    }

    /// Reads (non-blocking) and handles messages until the userfaultfd has none left.
    fn drain(&mut self, h: &Handler, u: &Uffd) -> Result<(), ServeError> {
        loop {
            let n = u
                .read_msgs(&mut self.msgs)
                .map_err(|source| ServeError::UffdRead {
                    fd: u.as_raw_fd(),
                    source,
                })?;
            if n == 0 {
                return Ok(());
            }
            let t = Instant::now();
            self.gpas.clear();
            // Messages are consumed once read: the known faults of a batch are handled even if
            // another one is outside every region (that one is the error returned).
            let mut unknown = None;
            for m in &self.msgs[..n] {
                if m.event == UFFD_EVENT_PAGEFAULT {
                    match h.host_to_gpa(m.pf_address) {
                        Ok(gpa) => self.gpas.push(gpa),
                        Err(e) => {
                            unknown.get_or_insert(e);
                        }
                    }
                }
            }
            h.handle_gpas(&self.gpas, t, false, &mut self.scratch)?;
            if let Some(e) = unknown {
                return Err(e.into());
            }
        }
    }
}

/// A userfaultfd as an input of the VMM's own event loop: poll its fd for readability and
/// call [`UffdInput::process_ready`].
pub struct UffdInput {
    uffd: Arc<Uffd>,
    handler: Arc<Handler>,
    drain: UffdDrain,
}

impl UffdInput {
    /// An input reading `uffd` (opened non-blocking by [`Uffd::new`]) for `handler`.
    pub fn new(handler: Arc<Handler>, uffd: Arc<Uffd>) -> Self {
        Self {
            uffd,
            handler,
            drain: UffdDrain::new(),
        }
    }

    /// Handles every fault message available now, without blocking.
    pub fn process_ready(&mut self) -> Result<(), ServeError> {
        let _span = tracing::trace_span!("uffd_ready", fd = self.uffd.as_raw_fd()).entered();
        self.drain.drain(&self.handler, &self.uffd)
    }
}

impl AsRawFd for UffdInput {
    fn as_raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }
}

/// Serves a userfaultfd until `stop` fires: poll, drain messages in batches, handle.
pub fn serve_uffd(h: &Handler, u: &Uffd, stop: &StopSignal) -> Result<(), ServeError> {
    let _span = tracing::debug_span!("uffd_loop", fd = u.as_raw_fd()).entered();
    let mut drain = UffdDrain::new();
    // SAFETY: `u` is borrowed for the whole loop, so its fd stays open while this borrow lives.
    let ufd = unsafe { BorrowedFd::borrow_raw(u.as_raw_fd()) };
    loop {
        let mut fds = [
            PollFd::new(ufd, PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return Err(ServeError::Poll {
                    fd: u.as_raw_fd(),
                    source: e.into(),
                })
            }
        }
        if fds[1].any().unwrap_or(true) {
            return Ok(());
        }
        drain.drain(h, u)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::records::encode_record;
    use crate::handler::{Install, NoopResolver, Region};
    use crate::memory::Mapping;
    use crate::source::MemorySource;
    use crate::uapi::{KVM_USERFAULT_MSG_READ, USERFAULT_MSG_SIZE};
    use std::io::Write;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    const PAGES: u64 = 16;

    /// Waits (bounded) until `fd` polls readable: synchronises on the input's state.
    fn wait_readable(fd: RawFd) {
        // SAFETY: the caller's input owns `fd` and outlives this call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::from(30_000u16)).unwrap();
        assert_eq!(n, 1, "input never became readable");
    }

    /// A handler over an anonymous mapping of PAGES pages (page i holds byte i + 1), and a
    /// RingInput reading records from a socketpair standing in for the userfault fd.
    fn setup() -> (Mapping, Arc<Handler>, UnixStream, RingInput) {
        let img = (0..PAGES)
            .flat_map(|i| std::iter::repeat_n(i as u8 + 1, PAGE_SIZE))
            .collect();
        let src = Arc::new(MemorySource::new(img).unwrap());
        let mem = Mapping::new(PAGES as usize * PAGE_SIZE, None).unwrap();
        let region = Region {
            gpa: 0,
            size: PAGES * PAGE_SIZE as u64,
            host: mem.addr(),
            fill_alias: None,
            source_first_page: 0,
        };
        // SAFETY: `mem` is returned with the handler and outlives it in every test (dropped
        // last); nothing else touches it while pages are missing.
        let h = Arc::new(
            unsafe { Handler::new(vec![region], src, Install::Direct(Box::new(NoopResolver))) }
                .unwrap(),
        );
        let (tx, rx) = UnixStream::pair().unwrap();
        let ufd = Arc::new(UserfaultFd::from_parts(OwnedFd::from(rx), USERFAULT_MSG_SIZE).unwrap());
        let input = RingInput::new(h.clone(), ufd, 2, 4).unwrap();
        (mem, h, tx, input)
    }

    fn records(gfns: impl IntoIterator<Item = u64>) -> Vec<u8> {
        gfns.into_iter()
            .flat_map(|g| encode_record(g, KVM_USERFAULT_MSG_READ, 0))
            .collect()
    }

    #[test]
    fn ring_input_fills_on_readiness_and_pause_loses_no_record() {
        let (mem, h, mut tx, mut input) = setup();
        // Readiness, then one call handles what arrived.
        tx.write_all(&records(0..3)).unwrap();
        while h.missing_pages() > (PAGES - 3) as usize {
            wait_readable(input.as_raw_fd());
            assert_eq!(input.process_ready().unwrap(), None);
        }
        let mut b = [0u8; 1];
        mem.read(2 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b[0], 3);
        // Records that arrive just before a pause are handled by the pause itself, or are
        // still in the fd for after the resume: never consumed and dropped.
        tx.write_all(&records(3..11)).unwrap();
        input.pause().unwrap();
        let after_pause = h.missing_pages();
        input.resume().unwrap();
        while h.missing_pages() > (PAGES - 11) as usize {
            wait_readable(input.as_raw_fd());
            input.process_ready().unwrap();
        }
        assert!(after_pause >= (PAGES - 11) as usize);
        assert_eq!(h.missing_pages(), (PAGES - 11) as usize);
        // End of file is how the fd says its VM is gone.
        drop(tx);
        let exit = loop {
            wait_readable(input.as_raw_fd());
            if let Some(exit) = input.process_ready().unwrap() {
                break exit;
            }
        };
        assert_eq!(exit, ReaderExit::VmGone);
        drop(input);
        drop(h);
        drop(mem);
    }

    #[test]
    fn ring_input_returns_the_handlers_error_typed() {
        let (_mem, _h, mut tx, mut input) = setup();
        tx.write_all(&records([PAGES + 5])).unwrap();
        let e = loop {
            wait_readable(input.as_raw_fd());
            match input.process_ready() {
                Ok(None) => continue,
                Ok(Some(x)) => panic!("{x:?}"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(e, ServeError::Handler(HandlerError::UnknownGpa(g)) if g == (PAGES + 5) * PAGE_SIZE as u64),
            "{e:?}"
        );
    }
}
