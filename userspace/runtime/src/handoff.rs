//! Handing the fault handling to a separate process (Firecracker-style): the VMM sends the
//! userfault fd and the memory fds (guest_memfd / memfd) with a region table over a Unix socket
//! (SCM_RIGHTS); the handler process maps the memory and serves the fd. Every ioctl the
//! handler needs (`KVM_USERFAULT_RESOLVE`, `KVM_USERFAULT_REQUEUE`, reads) works on the fd
//! alone, without the VM fd.
//!
//! Message (version 2): `KUFH` magic u32 | version u16 | 0 u16 | region count u32 | record
//! size u32, then per region gpa u64 | size u64 | file offset u64 | memory fd index u32 | 0 u32
//! (32 bytes); fds: the userfault fd first, then the memory fds. The record size is the
//! `msg_size` negotiated when the userfault fd was created: the receiver cannot learn it from
//! the fd, and must stride its reads by it.
//!
//! The receiver is a handler that starts (or restarts) while the VM may already be running:
//! [`recv_handoff`] asks KVM to post again the records that a previous handler read but never
//! resolved (`KVM_USERFAULT_REQUEUE`), so that a handler crash loses no fault.

use crate::ioctls::{UserfaultError, UserfaultFd};
use crate::memory::{Mapping, MappingError};
use crate::PAGE_SIZE;
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const MAGIC: u32 = u32::from_le_bytes(*b"KUFH");
const VERSION: u16 = 2;
const HEADER: usize = 16;
const REGION: usize = 32;
/// Most regions (and memory fds) one handoff carries.
pub const MAX_REGIONS: usize = 32;

/// Why a handoff could not be sent, received or used. A received message that is malformed
/// is one of these, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// fstat of a region's memory fd failed.
    #[error("fstat of the memory fd of region {index}")]
    Stat {
        /// The region.
        index: usize,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// A region that does not lie inside its memory fd's file.
    #[error("region {index} ({size:#x} bytes at offset {offset:#x}) ends beyond its file ({file_size:#x} bytes)")]
    BeyondFile {
        /// The region.
        index: usize,
        /// Its offset in the file.
        offset: u64,
        /// Its size.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// What the sender was asked to send does not fit the message.
    #[error(
        "a handoff carries 1..={MAX_REGIONS} regions and at most {MAX_REGIONS} memory fds, \
         not {regions} regions and {fds} fds"
    )]
    Limits {
        /// Regions asked for.
        regions: usize,
        /// Memory fds asked for.
        fds: usize,
    },
    /// A region to send refers to a memory fd that is not sent.
    #[error("region {index} refers to memory fd {fd_index} of {fds}")]
    SendFdIndex {
        /// The region.
        index: usize,
        /// The fd it names.
        fd_index: u32,
        /// Memory fds sent.
        fds: usize,
    },
    /// `sendmsg` failed.
    #[error("sendmsg of the handoff")]
    Send(#[source] Errno),
    /// `sendmsg` sent part of the message.
    #[error("handoff sent short ({sent} of {len} bytes)")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Bytes of the message.
        len: usize,
    },
    /// `recvmsg` failed.
    #[error("recvmsg of the handoff")]
    Recv(#[source] Errno),
    /// More fds came than the control buffer holds (the kernel closed the rest).
    #[error("control messages truncated (too many fds)")]
    FdsTruncated(#[source] Errno),
    /// The message is shorter than its header.
    #[error("handoff of {0} bytes is shorter than its header")]
    Short(usize),
    /// The message does not start with the handoff magic.
    #[error("handoff has bad magic")]
    BadMagic,
    /// Another version of the message.
    #[error("handoff version {0}, expected {VERSION}")]
    Version(u16),
    /// The header's reserved field is not zero.
    #[error("handoff header's reserved field is not zero")]
    HeaderReserved,
    /// The region count is out of range.
    #[error("handoff announces {0} regions")]
    RegionCount(usize),
    /// The message length does not match its region count.
    #[error("handoff of {len} bytes, {regions} regions need {need}")]
    Length {
        /// Bytes received.
        len: usize,
        /// Regions announced.
        regions: usize,
        /// Bytes those regions need.
        need: usize,
    },
    /// No fd came with the message.
    #[error("handoff carried no fds")]
    NoFds,
    /// The userfault fd's record size cannot be used.
    #[error("handoff of the userfault fd")]
    UserfaultFd(#[source] UserfaultError),
    /// A region's reserved field is not zero.
    #[error("handoff region {0}'s reserved field is not zero")]
    RegionReserved(usize),
    /// A region is empty or not page aligned.
    #[error("handoff region {index} is not page aligned: {region:?}")]
    Unaligned {
        /// The region.
        index: usize,
        /// What it says.
        region: RegionDesc,
    },
    /// A region's end overflows.
    #[error("handoff region {0} overflows")]
    Overflow(usize),
    /// A region names a memory fd that did not come.
    #[error("handoff region {index} uses memory fd {fd_index} of {fds}")]
    FdIndex {
        /// The region.
        index: usize,
        /// The fd it names.
        fd_index: u32,
        /// Memory fds received.
        fds: usize,
    },
    /// `KVM_USERFAULT_REQUEUE` on receipt failed.
    #[error("re-posting the records of a previous handler")]
    Requeue(#[source] UserfaultError),
    /// [`Handoff::map`] of a region that does not exist.
    #[error("no region {index} (the handoff has {regions})")]
    NoSuchRegion {
        /// The region asked for.
        index: usize,
        /// Regions there are.
        regions: usize,
    },
    /// Mapping a region failed.
    #[error("mapping handoff region {index}")]
    Map {
        /// The region.
        index: usize,
        /// Why.
        #[source]
        source: MappingError,
    },
}

/// One region of guest memory backed by a memory fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes (page multiple).
    pub size: u64,
    /// Offset into the memory fd (page multiple).
    pub offset: u64,
    /// Which memory fd (index into the memory fds sent).
    pub fd_index: u32,
}

/// What the handler process receives.
#[derive(Debug)]
pub struct Handoff {
    /// The userfault fd, with the record size its creator negotiated.
    pub userfault_fd: UserfaultFd,
    /// The memory fds.
    pub memory_fds: Vec<OwnedFd>,
    /// The regions.
    pub regions: Vec<RegionDesc>,
    /// Records KVM posted again on receipt (`KVM_USERFAULT_REQUEUE`): faults a previous
    /// handler read but did not resolve. 0 for a first handler.
    pub requeued: usize,
}

impl Handoff {
    /// Maps region `i` shared, for the handler to write pages into.
    pub fn map(&self, i: usize) -> Result<Mapping, HandoffError> {
        let r = self.regions.get(i).ok_or(HandoffError::NoSuchRegion {
            index: i,
            regions: self.regions.len(),
        })?;
        // `parse` checked every region's fd index against the fds received.
        let fd = self
            .memory_fds
            .get(r.fd_index as usize)
            .ok_or(HandoffError::FdIndex {
                index: i,
                fd_index: r.fd_index,
                fds: self.memory_fds.len(),
            })?;
        // A region beyond the end of its file would map, and then SIGBUS on first access.
        let file_size = nix::sys::stat::fstat(fd.as_fd())
            .map_err(|e| HandoffError::Stat {
                index: i,
                source: e.into(),
            })?
            .st_size as u64;
        if r.offset
            .checked_add(r.size)
            .is_none_or(|end| end > file_size)
        {
            return Err(HandoffError::BeyondFile {
                index: i,
                offset: r.offset,
                size: r.size,
                file_size,
            });
        }
        Mapping::with_offset(r.size as usize, fd.as_raw_fd(), r.offset as i64)
            .map_err(|source| HandoffError::Map { index: i, source })
    }
}

/// Sends the userfault fd (and its record size), memory fds and region table over a connected
/// Unix socket.
pub fn send_handoff(
    sock: RawFd,
    userfault_fd: &UserfaultFd,
    memory_fds: &[RawFd],
    regions: &[RegionDesc],
) -> Result<(), HandoffError> {
    if regions.is_empty() || regions.len() > MAX_REGIONS || memory_fds.len() > MAX_REGIONS {
        return Err(HandoffError::Limits {
            regions: regions.len(),
            fds: memory_fds.len(),
        });
    }
    let mut msg = Vec::with_capacity(HEADER + REGION * regions.len());
    msg.extend_from_slice(&MAGIC.to_le_bytes());
    msg.extend_from_slice(&VERSION.to_le_bytes());
    msg.extend_from_slice(&0u16.to_le_bytes());
    msg.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    msg.extend_from_slice(&(userfault_fd.msg_size() as u32).to_le_bytes());
    for (index, r) in regions.iter().enumerate() {
        if r.fd_index as usize >= memory_fds.len() {
            return Err(HandoffError::SendFdIndex {
                index,
                fd_index: r.fd_index,
                fds: memory_fds.len(),
            });
        }
        msg.extend_from_slice(&r.gpa.to_le_bytes());
        msg.extend_from_slice(&r.size.to_le_bytes());
        msg.extend_from_slice(&r.offset.to_le_bytes());
        msg.extend_from_slice(&r.fd_index.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
    }
    let mut fds = vec![userfault_fd.as_raw_fd()];
    fds.extend_from_slice(memory_fds);
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<()>(sock, &[IoSlice::new(&msg)], &cmsg, MsgFlags::empty(), None)
        .map_err(HandoffError::Send)?;
    if n != msg.len() {
        return Err(HandoffError::ShortSend {
            sent: n,
            len: msg.len(),
        });
    }
    Ok(())
}

/// Receives a handoff, then re-posts the records a previous handler of the fd read but never
/// resolved ([`UserfaultFd::requeue`], counted in [`Handoff::requeued`]): the caller is the
/// fd's only handler from now on. Every malformed message is an error, and every fd received
/// is closed unless returned.
pub fn recv_handoff(sock: RawFd) -> Result<Handoff, HandoffError> {
    let mut h = receive(sock)?;
    h.requeued = h.userfault_fd.requeue().map_err(HandoffError::Requeue)?;
    if h.requeued > 0 {
        tracing::info!(
            records = h.requeued,
            "handoff: records read by a previous handler were posted again"
        );
    }
    Ok(h)
}

/// Receives and validates a handoff, without touching the userfault fd.
fn receive(sock: RawFd) -> Result<Handoff, HandoffError> {
    let mut buf = vec![0u8; HEADER + REGION * MAX_REGIONS + 1];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_REGIONS + 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock,
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(HandoffError::Recv)?;
    let bytes = msg.bytes;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs().map_err(HandoffError::FdsTruncated)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds in our table for us; nothing else
            // owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let data = &buf[..bytes];
    parse(data, fds)
}

fn parse(data: &[u8], mut fds: Vec<OwnedFd>) -> Result<Handoff, HandoffError> {
    // Bounds are checked before every read below (the header first, then the exact length).
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
    if data.len() < HEADER {
        return Err(HandoffError::Short(data.len()));
    }
    if u32_at(0) != MAGIC {
        return Err(HandoffError::BadMagic);
    }
    let version = u16::from_le_bytes([data[4], data[5]]);
    if version != VERSION {
        return Err(HandoffError::Version(version));
    }
    if data[6..8] != [0, 0] {
        return Err(HandoffError::HeaderReserved);
    }
    let n = u32_at(8) as usize;
    if !(1..=MAX_REGIONS).contains(&n) {
        return Err(HandoffError::RegionCount(n));
    }
    let msg_size = u32_at(12) as usize;
    if data.len() != HEADER + n * REGION {
        return Err(HandoffError::Length {
            len: data.len(),
            regions: n,
            need: HEADER + n * REGION,
        });
    }
    if fds.is_empty() {
        return Err(HandoffError::NoFds);
    }
    let userfault_fd =
        UserfaultFd::from_parts(fds.remove(0), msg_size).map_err(HandoffError::UserfaultFd)?;
    let mut regions = Vec::with_capacity(n);
    for i in 0..n {
        let o = HEADER + i * REGION;
        let r = RegionDesc {
            gpa: u64_at(o),
            size: u64_at(o + 8),
            offset: u64_at(o + 16),
            fd_index: u32_at(o + 24),
        };
        if u32_at(o + 28) != 0 {
            return Err(HandoffError::RegionReserved(i));
        }
        let ps = PAGE_SIZE as u64;
        if r.size == 0
            || !r.gpa.is_multiple_of(ps)
            || !r.size.is_multiple_of(ps)
            || !r.offset.is_multiple_of(ps)
        {
            return Err(HandoffError::Unaligned {
                index: i,
                region: r,
            });
        }
        if r.gpa.checked_add(r.size).is_none() {
            return Err(HandoffError::Overflow(i));
        }
        if r.fd_index as usize >= fds.len() {
            return Err(HandoffError::FdIndex {
                index: i,
                fd_index: r.fd_index,
                fds: fds.len(),
            });
        }
        regions.push(r);
    }
    Ok(Handoff {
        userfault_fd,
        memory_fds: fds,
        regions,
        requeued: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn memfd(size: usize) -> OwnedFd {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"kuf-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate of the memfd we own; no memory of ours is passed.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
        assert_eq!(r, 0);
        fd
    }

    #[test]
    fn fds_and_regions_cross_the_socket_and_memory_is_shared() {
        let (a, b) = UnixStream::pair().unwrap();
        let (ufd_stand_in, _other) = UnixStream::pair().unwrap();
        let mem = memfd(8 * PAGE_SIZE);
        let regions = [
            RegionDesc {
                gpa: 0x10_0000,
                size: 4 * PAGE_SIZE as u64,
                offset: 0,
                fd_index: 0,
            },
            RegionDesc {
                gpa: 0x40_0000,
                size: 4 * PAGE_SIZE as u64,
                offset: 4 * PAGE_SIZE as u64,
                fd_index: 0,
            },
        ];
        // A 32-byte record size travels with the fd (a stand-in: no requeue on receipt).
        let ufd = UserfaultFd::from_parts(OwnedFd::from(ufd_stand_in), 32).unwrap();
        send_handoff(a.as_raw_fd(), &ufd, &[mem.as_raw_fd()], &regions).unwrap();
        let h = receive(b.as_raw_fd()).unwrap();
        assert_eq!(h.regions, regions);
        assert_eq!(h.userfault_fd.msg_size(), 32);
        // The public receiver re-posts unresolved records; a socket is no userfault fd.
        send_handoff(a.as_raw_fd(), &ufd, &[mem.as_raw_fd()], &regions).unwrap();
        let e = recv_handoff(b.as_raw_fd()).unwrap_err();
        assert!(
            matches!(
                &e,
                HandoffError::Requeue(UserfaultError::Io {
                    op: "KVM_USERFAULT_REQUEUE",
                    ..
                })
            ),
            "{e:?}"
        );
        assert_eq!(h.memory_fds.len(), 1);
        // The receiver writes through its own mapping; the sender's mapping sees it.
        h.map(1).unwrap().write(8, b"from the handler").unwrap();
        let mine = Mapping::with_offset(8 * PAGE_SIZE, mem.as_raw_fd(), 0).unwrap();
        let mut out = [0u8; 16];
        mine.read(4 * PAGE_SIZE + 8, &mut out).unwrap();
        assert_eq!(&out, b"from the handler");

        // A region that reaches past the end of its file is refused, not mapped (its first
        // access would be a SIGBUS).
        let short = memfd(6 * PAGE_SIZE);
        send_handoff(a.as_raw_fd(), &ufd, &[short.as_raw_fd()], &regions).unwrap();
        let h = receive(b.as_raw_fd()).unwrap();
        h.map(0).unwrap();
        let e = h.map(1).unwrap_err();
        assert!(
            matches!(
                e,
                HandoffError::BeyondFile {
                    index: 1,
                    file_size,
                    ..
                } if file_size == 6 * PAGE_SIZE as u64
            ),
            "{e:?}"
        );
    }

    #[test]
    fn malformed_handoffs_are_errors() {
        let region = |size: u64, idx: u32| {
            let mut v = Vec::new();
            v.extend_from_slice(&MAGIC.to_le_bytes());
            v.extend_from_slice(&VERSION.to_le_bytes());
            v.extend_from_slice(&[0, 0]);
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&24u32.to_le_bytes());
            v.extend_from_slice(&0x1000u64.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&0u64.to_le_bytes());
            v.extend_from_slice(&idx.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
            v
        };
        let two_fds = || vec![memfd(PAGE_SIZE), memfd(PAGE_SIZE)];
        let err = |d: &[u8], fds| parse(d, fds).unwrap_err().to_string();
        assert!(parse(&region(4096, 0), two_fds()).is_ok());
        assert!(err(&region(4096, 0)[..10], two_fds()).contains("shorter than its header"));
        assert!(err(&region(4096, 0)[..40], two_fds()).contains("need 48"));
        assert!(err(&region(100, 0), two_fds()).contains("not page aligned"));
        assert!(err(&region(4096, 1), two_fds()).contains("uses memory fd 1 of 1"));
        assert!(err(&region(4096, 0), vec![]).contains("no fds"));
        let mut bad = region(4096, 0);
        bad[0] = b'X';
        assert!(err(&bad, two_fds()).contains("bad magic"));
        let mut bad = region(4096, 0);
        bad[4] = 7;
        assert!(err(&bad, two_fds()).contains("version 7"));
        let mut bad = region(4096, 0);
        bad[8] = 0;
        assert!(err(&bad, two_fds()).contains("0 regions"));
        // Version 1 carried no record size.
        let mut bad = region(4096, 0);
        bad[4] = 1;
        assert!(err(&bad, two_fds()).contains("version 1, expected 2"));
        let mut bad = region(4096, 0);
        bad[6] = 1;
        assert!(err(&bad, two_fds()).contains("header's reserved field"));
        let mut bad = region(4096, 0);
        bad[44] = 1;
        assert!(err(&bad, two_fds()).contains("region 0's reserved field"));
        let mut bad = region(4096, 0);
        bad[12] = 16;
        let e = parse(&bad, two_fds()).unwrap_err();
        assert!(
            matches!(e, HandoffError::UserfaultFd(UserfaultError::MsgSize(_))),
            "{e:?}"
        );
        // The cause, down the source chain: the record size refused.
        let chain: Vec<String> =
            std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .map(|e| e.to_string())
                .collect();
        assert!(
            chain.iter().any(|m| m.contains("record size 16")),
            "{chain:?}"
        );
    }
}
