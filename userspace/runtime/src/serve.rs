//! The service loops a VMM runs on its own threads: the io_uring reader of a KVM userfault fd
//! and the poll loop of a userfaultfd, each handing its batches to a [`Handler`].

use crate::fault::uffd::{Uffd, UffdMsg, UFFD_EVENT_PAGEFAULT};
use crate::fault::{AsyncReader, ReaderExit, StopSignal};
use crate::handler::{Handler, HandlerError, Scratch};
use crate::ioctls::UserfaultFd;
use anyhow::{anyhow, Context, Result};
use std::os::fd::AsRawFd;
use std::time::Instant;

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
) -> Result<ReaderExit> {
    let mut reader =
        AsyncReader::new(fd.as_raw_fd(), fd.msg_size(), depth, records_per_read, stop)?;
    let mut scratch = Scratch::default();
    let mut gpas = Vec::new();
    // The handler's error is returned as itself (typed, for `downcast`), not wrapped in the
    // reader's "handling a batch" error.
    let mut failed: Option<HandlerError> = None;
    let res = reader.run(|batch| {
        let t = Instant::now();
        gpas.clear();
        gpas.extend(batch.iter().map(|r| r.gfn << 12));
        h.handle_gpas(&gpas, t, false, &mut scratch).map_err(|e| {
            let msg = e.to_string();
            failed = Some(e);
            anyhow!(msg)
        })
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    let exit = res?;
    if exit == ReaderExit::VmGone {
        tracing::info!(
            fd = fd.as_raw_fd(),
            "userfault fd: VM destroyed, reader stops"
        );
    }
    Ok(exit)
}

/// Serves a userfaultfd until `stop` fires: poll, drain messages in batches, handle.
pub fn serve_uffd(h: &Handler, u: &Uffd, stop: &StopSignal) -> Result<()> {
    let mut msgs = [UffdMsg::default(); 64];
    let mut scratch = Scratch::default();
    let mut gpas = Vec::with_capacity(64);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: u.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two fds we own through a local array.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e).context("poll");
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        loop {
            let n = u.read_msgs(&mut msgs).context("reading userfaultfd")?;
            if n == 0 {
                break;
            }
            let t = Instant::now();
            gpas.clear();
            for m in &msgs[..n] {
                if m.event == UFFD_EVENT_PAGEFAULT {
                    gpas.push(h.host_to_gpa(m.pf_address)?);
                }
            }
            h.handle_gpas(&gpas, t, false, &mut scratch)?;
        }
    }
}
