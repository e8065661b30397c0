//! The asynchronous reader of the KVM userfault fd over io_uring.
//!
//! `depth` reads are kept in flight, each into its own buffer of `records_per_read` records.
//! One `io_uring_enter` waits for at least one completion; every completion available then is
//! parsed and handed to the callback as one batch, and the buffers are resubmitted — so the
//! cost is one syscall per wake-up, never one per record. A read on an eventfd in the same ring
//! is the stop signal.

use super::records::{parse_records, Record};
use crate::uapi::USERFAULT_MSG_SIZE;
use anyhow::{bail, Context, Result};
use io_uring::{opcode, types, IoUring};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

const STOP_TAG: u64 = u64::MAX;
const CANCEL_TAG: u64 = u64::MAX - 1;

/// An eventfd that stops an [`AsyncReader`] (and anything else polling it).
#[derive(Debug, Clone)]
pub struct StopSignal {
    fd: Arc<OwnedFd>,
}

impl StopSignal {
    /// A new, unsignalled stop signal.
    pub fn new() -> Result<Self> {
        // Semaphore mode: every reader's read consumes 1 of the large count `stop` adds, so
        // any number of readers (each with its own ring) see the one stop.
        // SAFETY: eventfd takes an initial value and flags; returns a new fd or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: a fresh fd that nothing else owns.
        Ok(Self {
            fd: Arc::new(unsafe { OwnedFd::from_raw_fd(raw) }),
        })
    }

    /// Signals every reader waiting on it (now or later).
    pub fn stop(&self) {
        let one = (1u64 << 32).to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our eventfd.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

impl AsRawFd for StopSignal {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Reads userfault records from an fd through io_uring.
pub struct AsyncReader {
    ring: IoUring,
    fd: RawFd,
    bufs: Vec<Vec<u8>>,
    stop: StopSignal,
    stop_buf: Box<[u8; 8]>,
    /// Which buffers (and the stop read) the kernel may still write into.
    in_flight: Vec<bool>,
    stop_in_flight: bool,
    /// Wake-ups (io_uring_enter calls that returned completions).
    pub wakeups: u64,
    /// Reads completed.
    pub reads: u64,
}

impl AsyncReader {
    /// A reader of `fd` with `depth` reads in flight of `records_per_read` records each.
    /// `fd` must stay open while the reader runs.
    pub fn new(fd: RawFd, depth: usize, records_per_read: usize, stop: StopSignal) -> Result<Self> {
        anyhow::ensure!(
            depth >= 1 && records_per_read >= 1,
            "depth and batch must be >= 1"
        );
        let ring =
            IoUring::new((depth as u32 + 1).next_power_of_two()).context("io_uring setup")?;
        Ok(Self {
            ring,
            fd,
            bufs: vec![vec![0u8; records_per_read * USERFAULT_MSG_SIZE]; depth],
            stop,
            stop_buf: Box::new([0u8; 8]),
            in_flight: vec![false; depth],
            stop_in_flight: false,
            wakeups: 0,
            reads: 0,
        })
    }

    fn push_read(&mut self, i: usize) -> Result<()> {
        let buf = &mut self.bufs[i];
        let sqe = opcode::Read::new(types::Fd(self.fd), buf.as_mut_ptr(), buf.len() as u32)
            .build()
            .user_data(i as u64);
        // SAFETY: the buffer lives in self.bufs, which is neither resized nor dropped while the
        // read is in flight: run() cancels and reaps every read before returning, and a read
        // that cannot be reaped makes Drop leak the buffers instead of freeing them.
        unsafe { self.ring.submission().push(&sqe) }.context("submission queue full")?;
        self.in_flight[i] = true;
        Ok(())
    }

    /// Cancels every outstanding read and waits (bounded) for their completions, so no
    /// buffer is written after `run` returns.
    fn cancel_all(&mut self) {
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
                return;
            }
            let ts = types::Timespec::new().nsec(100_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => break,
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for tag in done {
                self.mark_done(tag);
            }
        }
    }

    fn mark_done(&mut self, tag: u64) {
        if tag == STOP_TAG {
            self.stop_in_flight = false;
        } else if let Some(f) = self.in_flight.get_mut(tag as usize) {
            *f = false;
        }
    }

    /// Runs until the stop signal fires or the fd reports end-of-file, calling `on_batch` with
    /// every batch of records. An error from the callback, a failed read or a malformed record
    /// ends the loop with that error.
    pub fn run(&mut self, on_batch: impl FnMut(&[Record]) -> Result<()>) -> Result<()> {
        let res = self.run_inner(on_batch);
        self.cancel_all();
        res
    }

    fn run_inner(&mut self, mut on_batch: impl FnMut(&[Record]) -> Result<()>) -> Result<()> {
        for i in 0..self.bufs.len() {
            self.push_read(i)?;
        }
        let stop_sqe = opcode::Read::new(
            types::Fd(self.stop.as_raw_fd()),
            self.stop_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(STOP_TAG);
        // SAFETY: stop_buf is boxed in self and outlives the ring's use of it.
        unsafe { self.ring.submission().push(&stop_sqe) }.context("submission queue full")?;
        self.stop_in_flight = true;

        let mut batch: Vec<Record> = Vec::with_capacity(self.bufs.len() * 64);
        let mut done: Vec<usize> = Vec::with_capacity(self.bufs.len());
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e).context("io_uring_enter"),
            }
            self.wakeups += 1;
            batch.clear();
            done.clear();
            let mut eof = false;
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (tag, res) in cqes {
                if tag == CANCEL_TAG {
                    continue;
                }
                self.mark_done(tag);
                if tag == STOP_TAG {
                    return Ok(());
                }
                let i = tag as usize;
                if res < 0 {
                    let e = -res;
                    if e == libc::EINTR || e == libc::EAGAIN {
                        done.push(i);
                        continue;
                    }
                    bail!(
                        "reading userfault records: {}",
                        std::io::Error::from_raw_os_error(e)
                    );
                }
                if res == 0 {
                    eof = true;
                    continue;
                }
                self.reads += 1;
                parse_records(&self.bufs[i][..res as usize], &mut batch)
                    .context("malformed userfault record")?;
                done.push(i);
            }
            if !batch.is_empty() {
                on_batch(&batch)?;
            }
            if eof {
                return Ok(());
            }
            for &i in &done {
                self.push_read(i)?;
            }
        }
    }
}

impl Drop for AsyncReader {
    fn drop(&mut self) {
        self.cancel_all();
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
    use crate::fault::records::encode_record;
    use crate::uapi::KVM_USERFAULT_MSG_READ;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn drains_records_in_batches_until_eof() {
        // A socketpair stands in for the KVM userfault fd: reads return whole records.
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let stop = StopSignal::new().unwrap();
        let mut reader = AsyncReader::new(rx.as_raw_fd(), 4, 32, stop).unwrap();
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
        reader
            .run(|b| {
                seen.extend(b.iter().map(|r| r.gfn));
                Ok(())
            })
            .unwrap();
        producer.join().unwrap();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert!(reader.wakeups < 1000, "one wake-up per record is too many");
        drop(rx);
    }

    #[test]
    fn one_stop_reaches_every_reader() {
        let stop = StopSignal::new().unwrap();
        let pairs: Vec<_> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        std::thread::scope(|s| {
            let hs: Vec<_> = pairs
                .iter()
                .map(|(_, rx)| {
                    let stop = stop.clone();
                    let fd = rx.as_raw_fd();
                    s.spawn(move || AsyncReader::new(fd, 2, 8, stop).unwrap().run(|_| Ok(())))
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(50));
            stop.stop();
            for h in hs {
                h.join().unwrap().unwrap();
            }
        });
    }

    #[test]
    fn stop_signal_ends_the_loop_and_bad_records_are_errors() {
        let (_tx, rx) = UnixStream::pair().unwrap();
        let stop = StopSignal::new().unwrap();
        let mut reader = AsyncReader::new(rx.as_raw_fd(), 2, 8, stop.clone()).unwrap();
        let s2 = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            s2.stop();
        });
        reader.run(|_| Ok(())).unwrap();
        // Every read was cancelled and reaped: no buffer can be written after run().
        assert!(!reader.stop_in_flight && reader.in_flight.iter().all(|&b| !b));

        let (mut tx, rx) = UnixStream::pair().unwrap();
        let mut reader =
            AsyncReader::new(rx.as_raw_fd(), 2, 8, StopSignal::new().unwrap()).unwrap();
        let mut rec = encode_record(1, KVM_USERFAULT_MSG_READ, 0);
        rec[0] = 99;
        tx.write_all(&rec).unwrap();
        let e = reader.run(|_| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("size field 99"), "{e:#}");
    }
}
