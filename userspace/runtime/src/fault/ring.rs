//! The asynchronous reader of the KVM userfault fd over io_uring.
//!
//! `depth` reads are kept in flight, each into its own buffer of `records_per_read` records.
//! One `io_uring_enter` waits for at least one completion; every completion available then is
//! parsed and handed to the callback as one batch, and the buffers are resubmitted — so the
//! cost is one syscall per wake-up, never one per record. A read on an eventfd in the same ring
//! is the stop signal.
//!
//! Records are `msg_size` bytes each, the size negotiated when the fd was created
//! (`KVM_CREATE_USERFAULT_FD` returns it; [`crate::ioctls::UserfaultFd::msg_size`]); buffers and
//! parsing stride by it.
//!
//! End of file is how a KVM userfault fd says that its VM was destroyed (poll reports
//! POLLHUP): every read in flight completes with 0, and [`AsyncReader::run`] returns
//! [`ReaderExit::VmGone`] instead of resubmitting, so a dead VM never leaves a reader spinning
//! or blocked.

use super::records::{check_msg_size, parse_records, Record, RecordError};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

use io_uring::{opcode, types, IoUring};

const STOP_TAG: u64 = u64::MAX;
const CANCEL_TAG: u64 = u64::MAX - 1;

/// The stop signal of every service loop of a runtime: an eventfd (vmm-sys-util's
/// [`EventFd`]) in semaphore mode, polled by each loop (an [`AsyncReader`] reads it in its own
/// ring; the userfaultfd loop polls it).
#[derive(Debug, Clone)]
pub struct StopSignal {
    fd: Arc<EventFd>,
}

impl StopSignal {
    /// A new, unsignalled stop signal.
    pub fn new() -> io::Result<Self> {
        // Semaphore mode: every reader's read consumes 1 of the large count `stop` adds, so
        // any number of readers (each with its own ring) see the one stop.
        let fd = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE)
            .map_err(|e| io::Error::new(e.kind(), format!("eventfd: {e}")))?;
        Ok(Self { fd: Arc::new(fd) })
    }

    /// Signals every reader waiting on it (now or later).
    pub fn stop(&self) {
        // The counter only fails to take the value if it would overflow, i.e. after 2^31
        // stops, when every reader is long signalled anyway.
        let _ = self.fd.write(1 << 32);
    }
}

impl AsRawFd for StopSignal {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for StopSignal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd is open for as long as `self` (which holds an Arc of it) lives,
        // which bounds the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) }
    }
}

/// Why [`AsyncReader::run`] returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderExit {
    /// The stop signal fired.
    Stopped,
    /// The fd reported end of file: the VM was destroyed (the userfault fd does not keep it
    /// alive), or, for a stand-in producer, its writer closed. No record can arrive any more.
    VmGone,
}

/// What can go wrong reading records.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// Bad parameters.
    #[error("async userfault reader: {0}")]
    Config(String),
    /// io_uring could not be set up.
    #[error("io_uring setup ({entries} entries)")]
    Setup {
        /// Ring entries asked for.
        entries: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The submission queue had no room (a bug: it is sized for every read in flight).
    #[error("io_uring submission queue full")]
    QueueFull,
    /// `io_uring_enter` failed.
    #[error("io_uring_enter")]
    Enter(#[source] io::Error),
    /// A read of the fd failed.
    #[error("reading userfault records from fd {fd}")]
    Read {
        /// The fd.
        fd: RawFd,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel returned something that is not whole, well-formed records.
    #[error("malformed userfault record on fd {fd}")]
    Malformed {
        /// The fd.
        fd: RawFd,
        /// What was wrong.
        #[source]
        source: RecordError,
    },
    /// The batch callback failed.
    #[error("handling a batch of {records} userfault records")]
    Handler {
        /// Records in the batch.
        records: usize,
        /// The callback's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Reads userfault records from an fd through io_uring, either in its own loop
/// ([`AsyncReader::run`], on a thread) or driven by the caller's event loop ([`AsyncReader::arm`],
/// then [`AsyncReader::process_ready`] whenever [`AsyncReader::ring_fd`] polls readable).
pub struct AsyncReader<'fd> {
    ring: IoUring,
    fd: RawFd,
    _fd: PhantomData<BorrowedFd<'fd>>,
    msg_size: usize,
    bufs: Vec<Vec<u8>>,
    stop: Option<StopSignal>,
    /// Reads submitted by [`AsyncReader::arm`] (event-loop mode).
    armed: bool,
    stop_buf: Box<[u8; 8]>,
    /// Which buffers (and the stop read) the kernel may still write into.
    in_flight: Vec<bool>,
    stop_in_flight: bool,
    /// Wake-ups (io_uring_enter calls that returned completions).
    pub wakeups: u64,
    /// Reads completed.
    pub reads: u64,
}

impl<'fd> AsyncReader<'fd> {
    /// A reader of `fd`, whose records are `msg_size` bytes (the size negotiated at fd
    /// creation), with `depth` reads in flight of `records_per_read` records each, which
    /// [`AsyncReader::run`] runs until `stop` fires. The borrow keeps `fd` open while the
    /// reader exists.
    pub fn new(
        fd: BorrowedFd<'fd>,
        msg_size: usize,
        depth: usize,
        records_per_read: usize,
        stop: StopSignal,
    ) -> Result<Self, ReaderError> {
        Self::build(
            fd.as_raw_fd(),
            msg_size,
            depth,
            records_per_read,
            Some(stop),
        )
    }

    /// A reader for an event loop: no stop signal of its own (the loop decides when to stop
    /// calling [`AsyncReader::process_ready`] and then calls [`AsyncReader::disarm`]).
    pub fn new_polled(
        fd: BorrowedFd<'fd>,
        msg_size: usize,
        depth: usize,
        records_per_read: usize,
    ) -> Result<Self, ReaderError> {
        Self::build(fd.as_raw_fd(), msg_size, depth, records_per_read, None)
    }

    /// A reader of a raw fd, for an owner that keeps the fd open for the reader's whole life
    /// by other means (holds it in the same struct, dropped after the reader).
    ///
    /// # Safety
    /// `fd` must stay open until the returned reader is dropped.
    pub(crate) unsafe fn from_raw_polled(
        fd: RawFd,
        msg_size: usize,
        depth: usize,
        records_per_read: usize,
    ) -> Result<AsyncReader<'static>, ReaderError> {
        AsyncReader::build(fd, msg_size, depth, records_per_read, None)
    }

    fn build(
        fd: RawFd,
        msg_size: usize,
        depth: usize,
        records_per_read: usize,
        stop: Option<StopSignal>,
    ) -> Result<Self, ReaderError> {
        if !(1..=4096).contains(&depth) || !(1..=4096).contains(&records_per_read) {
            return Err(ReaderError::Config(format!(
                "depth {depth} and records per read {records_per_read} must be 1..=4096"
            )));
        }
        check_msg_size(msg_size).map_err(|e| ReaderError::Config(e.to_string()))?;
        // Room for every read, the stop read and a cancellation of each of them at once.
        let entries = (2 * depth as u32 + 2).next_power_of_two();
        let ring =
            IoUring::new(entries).map_err(|source| ReaderError::Setup { entries, source })?;
        Ok(Self {
            ring,
            fd,
            _fd: PhantomData,
            msg_size,
            bufs: vec![vec![0u8; records_per_read * msg_size]; depth],
            stop,
            armed: false,
            stop_buf: Box::new([0u8; 8]),
            in_flight: vec![false; depth],
            stop_in_flight: false,
            wakeups: 0,
            reads: 0,
        })
    }

    fn push_read(&mut self, i: usize) -> Result<(), ReaderError> {
        let buf = &mut self.bufs[i];
        let sqe = opcode::Read::new(types::Fd(self.fd), buf.as_mut_ptr(), buf.len() as u32)
            .build()
            .user_data(i as u64);
        // SAFETY: the buffer lives in self.bufs, which is neither resized nor dropped while the
        // read is in flight: run() cancels and reaps every read before returning, and a read
        // that cannot be reaped makes Drop leak the buffers instead of freeing them.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| ReaderError::QueueFull)?;
        self.in_flight[i] = true;
        Ok(())
    }

    /// Cancels every outstanding read and waits (bounded) for their completions, so no
    /// buffer is written after `run` returns. Records that reads completed meanwhile (they
    /// raced with the cancellation) are appended to `late`; the first malformed one is
    /// returned instead.
    fn cancel_all(&mut self, late: &mut Vec<Record>) -> Result<(), RecordError> {
        let mut bad = Ok(());
        let mut tags: Vec<u64> = (0..self.bufs.len())
            .filter(|&i| self.in_flight[i])
            .map(|i| i as u64)
            .collect();
        if self.stop_in_flight {
            tags.push(STOP_TAG);
        }
        for &t in &tags {
            let sqe = opcode::AsyncCancel::new(t).build().user_data(CANCEL_TAG);
            // SAFETY: a cancel request references no memory.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                break;
            }
        }
        for _ in 0..50 {
            if !self.stop_in_flight && !self.in_flight.iter().any(|&b| b) {
                break;
            }
            let ts = types::Timespec::new().nsec(100_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => break,
            }
            for (tag, res) in self.take_completions() {
                if tag == CANCEL_TAG {
                    continue;
                }
                self.mark_done(tag);
                // A read that completed with data before its cancellation took effect: those
                // records were consumed from the fd and must not be dropped.
                let buf = (tag != STOP_TAG && res > 0)
                    .then(|| self.bufs.get(tag as usize))
                    .flatten();
                if let Some(buf) = buf {
                    let bytes = &buf[..(res as usize).min(buf.len())];
                    if let Err(e) = parse_records(bytes, self.msg_size, late) {
                        bad = bad.and(Err(e));
                    }
                }
            }
        }
        bad
    }

    /// Every completion posted so far, as (tag, result), taken off the completion queue.
    fn take_completions(&mut self) -> Vec<(u64, i32)> {
        self.ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect()
    }

    fn mark_done(&mut self, tag: u64) {
        if tag == STOP_TAG {
            self.stop_in_flight = false;
        } else if let Some(f) = self.in_flight.get_mut(tag as usize) {
            *f = false;
        }
    }

    /// Runs until the stop signal fires ([`ReaderExit::Stopped`]) or the fd reports end of file
    /// ([`ReaderExit::VmGone`]), calling `on_batch` with every batch of records. No record
    /// that was read is dropped: records read together with the stop, the end of file or a
    /// failed read, and records of reads that complete while the reader cancels the others,
    /// are handed to `on_batch` before `run` returns. An error from the callback, a failed
    /// read or a malformed record ends the loop with that error (the records of the other
    /// reads of that wake-up are handed over first).
    pub fn run<E>(
        &mut self,
        mut on_batch: impl FnMut(&[Record]) -> Result<(), E>,
    ) -> Result<ReaderExit, ReaderError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let res = self.run_inner(&mut on_batch);
        let late_res = self.finish(
            &mut on_batch,
            matches!(res, Err(ReaderError::Handler { .. })),
        );
        let exit = res?;
        late_res?;
        Ok(exit)
    }

    /// Cancels and reaps every read, hands the records that completed meanwhile to
    /// `on_batch` (unless the handler already failed), and reports a malformed one.
    fn finish<E>(
        &mut self,
        on_batch: &mut impl FnMut(&[Record]) -> Result<(), E>,
        handler_failed: bool,
    ) -> Result<(), ReaderError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut late = Vec::new();
        let late_bad = self.cancel_all(&mut late);
        self.armed = false;
        if !late.is_empty() {
            if handler_failed {
                // The handler already failed: it is not given more work. A successor handler
                // gets these back with KVM_USERFAULT_REQUEUE.
                tracing::warn!(
                    records = late.len(),
                    "records read while stopping after a handler error were not handled"
                );
            } else {
                on_batch(&late).map_err(|e| ReaderError::Handler {
                    records: late.len(),
                    source: e.into(),
                })?;
            }
        }
        late_bad.map_err(|source| ReaderError::Malformed {
            fd: self.fd,
            source,
        })
    }

    fn submit_reads(&mut self) -> Result<(), ReaderError> {
        for i in 0..self.bufs.len() {
            self.push_read(i)?;
        }
        Ok(())
    }

    fn run_inner<E>(
        &mut self,
        on_batch: &mut impl FnMut(&[Record]) -> Result<(), E>,
    ) -> Result<ReaderExit, ReaderError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Some(stop) = &self.stop else {
            return Err(ReaderError::Config(
                "run() needs a stop signal: this reader was made for an event loop".into(),
            ));
        };
        let stop_fd = stop.as_raw_fd();
        if self.armed {
            return Err(ReaderError::Config(
                "run() on a reader armed for an event loop".into(),
            ));
        }
        self.submit_reads()?;
        let stop_sqe = opcode::Read::new(types::Fd(stop_fd), self.stop_buf.as_mut_ptr(), 8)
            .build()
            .user_data(STOP_TAG);
        // SAFETY: stop_buf is boxed in self and outlives the ring's use of it (run() reaps the
        // stop read before returning; Drop leaks the box if it cannot).
        unsafe { self.ring.submission().push(&stop_sqe) }.map_err(|_| ReaderError::QueueFull)?;
        self.stop_in_flight = true;

        let mut batch: Vec<Record> = Vec::with_capacity(self.bufs.len() * 64);
        let mut done: Vec<usize> = Vec::with_capacity(self.bufs.len());
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(ReaderError::Enter(e)),
            }
            self.wakeups += 1;
            if let Some(end) = self.reap(on_batch, &mut batch, &mut done, true)? {
                return end;
            }
        }
    }

    /// Hands every completion available now to `on_batch` as one batch and resubmits the
    /// buffers read into; returns how the loop ends if one of them ended it (the stop, end of
    /// file, a read error), in which case nothing is resubmitted.
    #[allow(clippy::type_complexity)]
    fn reap<E>(
        &mut self,
        on_batch: &mut impl FnMut(&[Record]) -> Result<(), E>,
        batch: &mut Vec<Record>,
        done: &mut Vec<usize>,
        resubmit: bool,
    ) -> Result<Option<Result<ReaderExit, ReaderError>>, ReaderError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        batch.clear();
        done.clear();
        // How this wake-up ends the loop, if it does. Every completion of the wake-up is
        // still looked at, so that the records of its other reads are not lost.
        let mut end: Option<Result<ReaderExit, ReaderError>> = None;
        for (tag, res) in self.take_completions() {
            if tag == CANCEL_TAG {
                continue;
            }
            if tag == STOP_TAG {
                self.mark_done(tag);
                end.get_or_insert(Ok(ReaderExit::Stopped));
                continue;
            }
            let i = tag as usize;
            if i >= self.bufs.len() {
                continue;
            }
            self.mark_done(tag);
            if res > 0 {
                self.reads += 1;
            }
            match decode_completion(res, &self.bufs[i], self.msg_size, self.fd, batch) {
                Ok(Completion::Records | Completion::Retry) => done.push(i),
                Ok(Completion::EndOfFile) => {
                    end.get_or_insert(Ok(ReaderExit::VmGone));
                }
                Err(e) => {
                    end.get_or_insert(Err(e));
                }
            }
        }
        if !batch.is_empty() {
            on_batch(batch).map_err(|e| ReaderError::Handler {
                records: batch.len(),
                source: e.into(),
            })?;
        }
        if end.is_some() || !resubmit {
            // Do not resubmit: after a stop nothing more is read, after end of file every
            // further read would return 0 at once, after an error the loop ends; a reader
            // being disarmed reads nothing more.
            return Ok(end);
        }
        for &i in done.iter() {
            self.push_read(i)?;
        }
        Ok(None)
    }

    /// Event-loop mode: submits every read, so that [`AsyncReader::ring_fd`] polls readable
    /// once a record arrives. Call once, then [`AsyncReader::process_ready`] on readiness.
    pub fn arm(&mut self) -> Result<(), ReaderError> {
        if self.armed {
            return Ok(());
        }
        // Only buffers the kernel is done with: a read still in flight (one whose cancellation
        // did not complete) must not get a second read into the same buffer.
        for i in 0..self.bufs.len() {
            if !self.in_flight[i] {
                self.push_read(i)?;
            }
        }
        self.ring.submit().map_err(ReaderError::Enter)?;
        self.armed = true;
        Ok(())
    }

    /// The io_uring fd to poll (readable when a read completed) in event-loop mode.
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Event-loop mode: without blocking, hands every completed read's records to `on_batch`
    /// and resubmits the reads. `Ok(None)`: keep polling; `Ok(Some(ReaderExit::VmGone))`: the
    /// fd reported end of file (disarm and drop the reader). On an error the caller disarms.
    pub fn process_ready<E>(
        &mut self,
        mut on_batch: impl FnMut(&[Record]) -> Result<(), E>,
    ) -> Result<Option<ReaderExit>, ReaderError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if !self.armed {
            return Err(ReaderError::Config("process_ready() before arm()".into()));
        }
        let mut batch = Vec::new();
        let mut done = Vec::new();
        let end = self.reap(&mut on_batch, &mut batch, &mut done, true)?;
        self.wakeups += 1;
        // Resubmitted reads (and none, after an end) take effect with one non-blocking enter.
        self.ring.submit().map_err(ReaderError::Enter)?;
        match end {
            None => Ok(None),
            Some(Ok(exit)) => Ok(Some(exit)),
            Some(Err(e)) => Err(e),
        }
    }

    /// Event-loop mode: cancels and reaps every read; the records of reads that completed
    /// before the cancellation took effect (consumed from the fd, so they exist nowhere else)
    /// are handed to `on_batch`. After this the reader can be armed again (a VMM that pauses
    /// and resumes) or dropped.
    pub fn disarm<E>(
        &mut self,
        mut on_batch: impl FnMut(&[Record]) -> Result<(), E>,
    ) -> Result<(), ReaderError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Completions already posted are handed over first (nothing is resubmitted), then
        // the cancelled rest. An end found meanwhile (end of file, a read error, a malformed
        // record) is returned, after the records are handed over.
        let mut end = None;
        if self.armed {
            let mut batch = Vec::new();
            let mut done = Vec::new();
            end = self.reap(&mut on_batch, &mut batch, &mut done, false)?;
        }
        self.finish(&mut on_batch, false)?;
        match end {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

/// What one read completion on the fd carried (see [`decode_completion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Whole, well-formed records, appended to the batch; the buffer can be read into again.
    Records,
    /// EINTR or EAGAIN: nothing was read; the buffer can be read into again.
    Retry,
    /// End of file: the VM was destroyed (nothing was appended).
    EndOfFile,
}

/// Decodes the completion of one read of `buf.len()` bytes into `buf` on `fd`: `res` is the
/// completion's result (bytes read, or a negative errno). Records are appended to `out` only
/// if the whole read is well formed. The I/O-free part of [`AsyncReader::run`]'s loop.
pub(crate) fn decode_completion(
    res: i32,
    buf: &[u8],
    msg_size: usize,
    fd: RawFd,
    out: &mut Vec<Record>,
) -> Result<Completion, ReaderError> {
    if res < 0 {
        // Not `-res`: that overflows (a panic in debug builds) for i32::MIN, which no kernel
        // returns but which must not bring the reader down either.
        let e = res.wrapping_neg();
        if e == libc::EINTR || e == libc::EAGAIN {
            return Ok(Completion::Retry);
        }
        return Err(ReaderError::Read {
            fd,
            source: io::Error::from_raw_os_error(e),
        });
    }
    if res == 0 {
        return Ok(Completion::EndOfFile);
    }
    let Some(bytes) = buf.get(..res as usize) else {
        // More bytes than the buffer holds: not something read(2) can return.
        return Err(ReaderError::Read {
            fd,
            source: io::Error::other(format!(
                "read completed with {res} bytes into a {}-byte buffer",
                buf.len()
            )),
        });
    };
    parse_records(bytes, msg_size, out)
        .map(|()| Completion::Records)
        .map_err(|source| ReaderError::Malformed { fd, source })
}

impl Drop for AsyncReader<'_> {
    fn drop(&mut self) {
        let mut late = Vec::new();
        // Only a run() that panicked leaves requests in flight.
        let _ = self.cancel_all(&mut late);
        if !late.is_empty() {
            tracing::error!(
                records = late.len(),
                "userfault records read while the reader was dropped were not handled"
            );
        }
        if self.stop_in_flight || self.in_flight.iter().any(|&b| b) {
            // The kernel may still write into these: leak them rather than free them.
            tracing::error!("io_uring reads not reaped at teardown; leaking their buffers");
            std::mem::forget(std::mem::take(&mut self.bufs));
            std::mem::forget(std::mem::replace(&mut self.stop_buf, Box::new([0; 8])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::records::{encode_record, encode_record_sized};
    use crate::uapi::{KVM_USERFAULT_MSG_READ, USERFAULT_MSG_SIZE};
    use std::convert::Infallible;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn gettid() -> libc::pid_t {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }

    /// Waits (bounded) until thread `tid` sleeps (state S) in system call `nr`, per
    /// `/proc/self/task/<tid>/{syscall,stat}`: synchronises on the reader's state, not on time.
    fn wait_asleep_in(tid: libc::pid_t, nr: libc::c_long) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let task = format!("/proc/self/task/{tid}");
            let sys = std::fs::read_to_string(format!("{task}/syscall")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("{task}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            if sys.split_whitespace().next() == Some(&nr.to_string()) && state == Some("S") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// A reader of 24-byte records (depth 2, 8 per read) on one end of a socketpair; the other
    /// end is the writer. `rx` must outlive the reader, which reads its raw fd.
    fn reader_on(rx: &UnixStream) -> AsyncReader<'_> {
        AsyncReader::new(
            rx.as_fd(),
            USERFAULT_MSG_SIZE,
            2,
            8,
            StopSignal::new().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn drains_records_in_batches_until_eof() {
        // A socketpair stands in for the KVM userfault fd: reads return whole records, and
        // closing the writer is end of file, as a destroyed VM is for the real fd.
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let stop = StopSignal::new().unwrap();
        let mut reader = AsyncReader::new(rx.as_fd(), USERFAULT_MSG_SIZE, 4, 32, stop).unwrap();
        let producer = std::thread::spawn(move || {
            for chunk in 0..50u64 {
                let mut buf = Vec::new();
                for k in 0..20 {
                    buf.extend(encode_record(chunk * 20 + k, KVM_USERFAULT_MSG_READ, 0));
                }
                tx.write_all(&buf).unwrap();
            }
        });
        let mut seen = Vec::new();
        let exit = reader
            .run(|b| {
                seen.extend(b.iter().map(|r| r.gfn));
                Ok::<(), Infallible>(())
            })
            .unwrap();
        producer.join().unwrap();
        assert_eq!(exit, ReaderExit::VmGone);
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert!(reader.wakeups < 1000, "one wake-up per record is too many");
        drop(reader);
        drop(rx);
    }

    #[test]
    fn end_of_file_is_a_prompt_clean_stop_not_a_spin() {
        // Nothing but end of file: every read in flight completes with 0 at once. The reader
        // returns VmGone after one wake-up instead of resubmitting reads that return 0.
        let (tx, rx) = UnixStream::pair().unwrap();
        drop(tx);
        let mut reader = AsyncReader::new(
            rx.as_fd(),
            USERFAULT_MSG_SIZE,
            8,
            4,
            StopSignal::new().unwrap(),
        )
        .unwrap();
        let t = Instant::now();
        let exit = reader
            .run(|_| -> Result<(), Infallible> { panic!("no records") })
            .unwrap();
        assert_eq!(exit, ReaderExit::VmGone);
        assert!(reader.wakeups <= 8, "{} wake-ups", reader.wakeups);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!reader.stop_in_flight && reader.in_flight.iter().all(|&b| !b));
    }

    #[test]
    fn strides_by_the_negotiated_record_size() {
        // A reader built for 24-byte records that negotiated 32 (e.g. handed a fd by a newer
        // VMM) strides by 32.
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let mut reader =
            AsyncReader::new(rx.as_fd(), 32, 2, 8, StopSignal::new().unwrap()).unwrap();
        for g in 0..10 {
            tx.write_all(&encode_record_sized(g, KVM_USERFAULT_MSG_READ, 0, 32))
                .unwrap();
        }
        drop(tx);
        let mut seen = Vec::new();
        reader
            .run(|b| {
                seen.extend(b.iter().map(|r| r.gfn));
                Ok::<(), Infallible>(())
            })
            .unwrap();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        // Record sizes no reader can stride by are refused up front.
        for bad in [0, 23, 1 << 20] {
            let e = AsyncReader::new(rx.as_fd(), bad, 2, 8, StopSignal::new().unwrap())
                .err()
                .unwrap();
            assert!(e.to_string().contains("record size"), "{e}");
        }
    }

    #[test]
    fn one_stop_reaches_every_reader() {
        let stop = StopSignal::new().unwrap();
        let pairs: Vec<_> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        std::thread::scope(|s| {
            let (tx, tids) = std::sync::mpsc::channel();
            let hs: Vec<_> = pairs
                .iter()
                .map(|(_, rx)| {
                    let (stop, tx) = (stop.clone(), tx.clone());
                    let fd = rx.as_fd();
                    s.spawn(move || {
                        tx.send(gettid()).unwrap();
                        AsyncReader::new(fd, USERFAULT_MSG_SIZE, 2, 8, stop)
                            .unwrap()
                            .run(|_| Ok::<(), Infallible>(()))
                    })
                })
                .collect();
            // Every reader is asleep in its ring before the one stop is signalled.
            for tid in tids.iter().take(3) {
                assert!(wait_asleep_in(tid, libc::SYS_io_uring_enter));
            }
            stop.stop();
            for h in hs {
                assert_eq!(h.join().unwrap().unwrap(), ReaderExit::Stopped);
            }
        });
    }

    #[test]
    fn stop_signal_ends_the_loop_and_bad_records_are_errors() {
        let (_tx, rx) = UnixStream::pair().unwrap();
        let stop = StopSignal::new().unwrap();
        let mut reader =
            AsyncReader::new(rx.as_fd(), USERFAULT_MSG_SIZE, 2, 8, stop.clone()).unwrap();
        let (s2, tid) = (stop.clone(), gettid());
        let stopper = std::thread::spawn(move || {
            // Signal the stop once the reader sleeps in its ring, with every read in flight.
            let asleep = wait_asleep_in(tid, libc::SYS_io_uring_enter);
            s2.stop();
            asleep
        });
        assert_eq!(
            reader.run(|_| Ok::<(), Infallible>(())).unwrap(),
            ReaderExit::Stopped
        );
        assert!(
            stopper.join().unwrap(),
            "the reader never slept in io_uring_enter"
        );
        // Every read was cancelled and reaped: no buffer can be written after run().
        assert!(!reader.stop_in_flight && reader.in_flight.iter().all(|&b| !b));

        let (mut tx, rx) = UnixStream::pair().unwrap();
        let mut reader = reader_on(&rx);
        let mut rec = encode_record(1, KVM_USERFAULT_MSG_READ, 0);
        rec[0] = 99;
        tx.write_all(&rec).unwrap();
        let e = reader.run(|_| Ok::<(), Infallible>(())).unwrap_err();
        assert!(
            matches!(
                e,
                ReaderError::Malformed {
                    source: RecordError::BadSize { size: 99, .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert!(chain.contains("size field 99"), "{chain}");

        // A callback error comes back typed, with its cause.
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let mut reader = reader_on(&rx);
        tx.write_all(&encode_record(1, KVM_USERFAULT_MSG_READ, 0))
            .unwrap();
        let e = reader
            .run(|_| Err(anyhow::anyhow!("page source down")))
            .unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert!(chain.contains("page source down"), "{chain}");
    }

    #[test]
    fn records_read_with_the_stop_are_handed_over() {
        // Records and the stop are both ready at the first wake-up: the read completions and
        // the stop's come back together. The records, already consumed from the fd, must reach
        // the callback rather than be dropped with the stop.
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let stop = StopSignal::new().unwrap();
        let mut buf = Vec::new();
        for g in 0..3 {
            buf.extend(encode_record(g, KVM_USERFAULT_MSG_READ, 0));
        }
        tx.write_all(&buf).unwrap();
        stop.stop();
        let mut reader = AsyncReader::new(rx.as_fd(), USERFAULT_MSG_SIZE, 2, 8, stop).unwrap();
        let mut seen = Vec::new();
        let exit = reader
            .run(|b| {
                seen.extend(b.iter().map(|r| r.gfn));
                Ok::<(), Infallible>(())
            })
            .unwrap();
        assert_eq!(exit, ReaderExit::Stopped);
        let mut rest = [0u8; USERFAULT_MSG_SIZE];
        rx.set_nonblocking(true).unwrap();
        let unread = match (&rx).read(&mut rest) {
            Ok(n) => n / USERFAULT_MSG_SIZE,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("{e}"),
        };
        // Each record was either handed over or is still unread in the fd: none is lost.
        assert_eq!(
            seen.len() + unread,
            3,
            "handed over {seen:?}, {unread} unread"
        );
        assert_eq!(seen, (0..seen.len() as u64).collect::<Vec<_>>());
    }

    /// Waits (bounded) until the ring fd polls readable.
    fn wait_ring(r: &AsyncReader<'_>) {
        let mut p = libc::pollfd {
            fd: r.ring_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one fd through a local pollfd.
        let n = unsafe { libc::poll(&mut p, 1, 30_000) };
        assert_eq!(n, 1, "the ring never became readable");
    }

    #[test]
    fn paused_and_resumed_reader_of_odd_depth_loses_and_repeats_nothing() {
        // Depth 3 (not a power of two), one record per read: completed reads, cancellations
        // and the resubmission must all fit the ring, and no buffer gets two reads.
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let mut r = AsyncReader::new_polled(rx.as_fd(), USERFAULT_MSG_SIZE, 3, 1).unwrap();
        let mut seen = Vec::new();
        let mut next = 0u64;
        for round in 0..20 {
            r.arm().unwrap();
            // Two records arrive and their reads complete, unreaped; then pause with the third
            // read in flight: the pause reaps two completions and cancels three reads.
            for _ in 0..2 {
                tx.write_all(&encode_record(next, KVM_USERFAULT_MSG_READ, 0))
                    .unwrap();
                next += 1;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while r.ring.completion().len() < 2 {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: reads never completed"
                );
                wait_ring(&r);
                std::thread::yield_now();
            }
            r.disarm(|b| {
                seen.extend(b.iter().map(|x| x.gfn));
                Ok::<(), Infallible>(())
            })
            .unwrap();
            assert!(
                r.in_flight.iter().all(|&f| !f),
                "round {round}: a read survived the pause"
            );
        }
        // Whatever a pause did not hand over is still in the fd: read it once more.
        r.arm().unwrap();
        while seen.len() < next as usize {
            wait_ring(&r);
            r.process_ready(|b| {
                seen.extend(b.iter().map(|x| x.gfn));
                Ok::<(), Infallible>(())
            })
            .unwrap();
        }
        r.disarm(|_| Ok::<(), Infallible>(())).unwrap();
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            seen.len(),
            "a record was handed over twice: {seen:?}"
        );
        assert_eq!(sorted, (0..next).collect::<Vec<_>>(), "a record was lost");
    }

    // ---- Property tests --------------------------------------------------------------------

    use proptest::collection::vec;
    use proptest::prelude::*;

    fn any_completion() -> impl Strategy<Value = i32> {
        prop_oneof![
            Just(0),
            Just(i32::MIN),
            -4096..0i32,
            Just(-libc::EINTR),
            Just(-libc::EAGAIN),
            0..200i32,
            any::<i32>(),
        ]
    }

    #[test]
    fn most_negative_completion_is_a_read_error_not_an_overflow() {
        // Found by the property below: `-res` panicked ("attempt to negate with overflow").
        let e = decode_completion(i32::MIN, &[], USERFAULT_MSG_SIZE, 7, &mut Vec::new());
        assert!(matches!(e, Err(ReaderError::Read { fd: 7, .. })), "{e:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any completion result over any buffer: no panic, and exactly one of: retry
        /// (EINTR/EAGAIN), end of file, a read error carrying the errno (or the impossible
        /// length), or what `parse_records` makes of the bytes read. Nothing is appended
        /// unless the whole read is well formed.
        #[test]
        fn any_completion_decodes_or_gives_a_typed_error(
            res in any_completion(),
            buf in vec(any::<u8>(), 0..100),
            msg_size in prop_oneof![Just(24usize), Just(32usize)],
            well_formed in any::<bool>(),
        ) {
            let mut buf = buf;
            if well_formed {
                // Mostly garbage otherwise: give the parser something it accepts too.
                buf = (0..buf.len() / msg_size)
                    .flat_map(|g| encode_record_sized(g as u64, KVM_USERFAULT_MSG_READ, 0, msg_size))
                    .collect();
            }
            let mut out = Vec::new();
            let got = decode_completion(res, &buf, msg_size, 7, &mut out);
            match res {
                r if r == -libc::EINTR || r == -libc::EAGAIN => {
                    prop_assert_eq!(got.unwrap(), Completion::Retry)
                }
                r if r < 0 => {
                    let Err(ReaderError::Read { fd: 7, source }) = got else {
                        panic!("{got:?}");
                    };
                    prop_assert_eq!(source.raw_os_error(), Some(r.wrapping_neg()));
                }
                0 => prop_assert_eq!(got.unwrap(), Completion::EndOfFile),
                r if r as usize > buf.len() => {
                    prop_assert!(matches!(got, Err(ReaderError::Read { fd: 7, .. })), "{got:?}")
                }
                r => {
                    let mut want = Vec::new();
                    match parse_records(&buf[..r as usize], msg_size, &mut want) {
                        Ok(()) => prop_assert_eq!(got.unwrap(), Completion::Records),
                        Err(e) => {
                            let Err(ReaderError::Malformed { fd: 7, source }) = got else {
                                panic!("{got:?}");
                            };
                            prop_assert_eq!(source, e);
                        }
                    }
                    prop_assert_eq!(&out, &want);
                }
            }
            if !matches!(decode_completion(res, &buf, msg_size, 7, &mut Vec::new()),
                         Ok(Completion::Records)) {
                prop_assert!(out.is_empty());
            }
        }
    }

    proptest! {
        // Each case runs a ring on a socketpair: few cases.
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Records written in arbitrary record-aligned chunks reach the callback, every one
        /// exactly once, whatever the depth and read size; a malformed record after them ends
        /// the run with the parser's error, after the records read before it.
        #[test]
        fn reader_hands_over_every_record_written(
            gfns in vec(0..1u64 << 40, 0..200),
            chunks in vec(1..40usize, 1..20),
            depth in 1..6usize,
            per_read in 1..20usize,
            msg_size in prop_oneof![Just(24usize), Just(32usize)],
            trailing_bad in any::<bool>(),
        ) {
            let (mut tx, rx) = UnixStream::pair().unwrap();
            let mut reader =
                AsyncReader::new(rx.as_fd(), msg_size, depth, per_read, StopSignal::new().unwrap())
                    .unwrap();
            let to_send = gfns.clone();
            let writer = std::thread::spawn(move || {
                let mut rest = &to_send[..];
                for &n in chunks.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (now, later) = rest.split_at(n.min(rest.len()));
                    let bytes: Vec<u8> = now
                        .iter()
                        .flat_map(|&g| encode_record_sized(g, KVM_USERFAULT_MSG_READ, 0, msg_size))
                        .collect();
                    tx.write_all(&bytes).unwrap();
                    rest = later;
                }
                if trailing_bad {
                    let mut bad = encode_record_sized(1, KVM_USERFAULT_MSG_READ, 0, msg_size);
                    bad[20] = 1;
                    tx.write_all(&bad).unwrap();
                }
            });
            let mut seen = Vec::new();
            let res = reader.run(|b| {
                seen.extend(b.iter().map(|r| r.gfn));
                Ok::<(), Infallible>(())
            });
            writer.join().unwrap();
            let mut want = gfns.clone();
            want.sort_unstable();
            seen.sort_unstable();
            if trailing_bad {
                let Err(ReaderError::Malformed { source, .. }) = res else {
                    panic!("{res:?}");
                };
                prop_assert!(
                    matches!(source, RecordError::Reserved { value: 1, .. }),
                    "{source:?}"
                );
                // Records read together with the bad one are not handed over (the read is
                // rejected whole); none is handed over twice or invented.
                let mut rest = want.clone();
                for g in &seen {
                    let k = rest.binary_search(g).expect("a record that was never written");
                    rest.remove(k);
                }
            } else {
                prop_assert_eq!(res.unwrap(), ReaderExit::VmGone);
                prop_assert_eq!(seen, want);
            }
            prop_assert!(!reader.stop_in_flight && reader.in_flight.iter().all(|&b| !b));
        }
    }
}
