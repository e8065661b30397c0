//! The series' VM and userfault-fd ioctls on kvm-ioctls' `VmFd`: capability probing, the
//! USERFAULT attribute, `KVM_CREATE_USERFAULT_FD` and the fd's reads, `KVM_USERFAULT_RESOLVE`
//! and `KVM_USERFAULT_REQUEUE`. They take any `&VmFd`, so a VMM calls them on its own VM.

use crate::fault::records::{check_msg_size, parse_records, Record, RecordError};
use crate::uapi::*;
use kvm_bindings::kvm_memory_attributes;
use kvm_ioctls::{Cap, VmFd};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref};

/// The one-line message for kernels without the series.
pub const NO_USERFAULT_MSG: &str =
    "kernel lacks the KVM userfault series (KVM_CAP_USERFAULT); build it with `cargo xtask kernel`";

/// The one-line message for kernels with the series' first (v1) uAPI, which this runtime no
/// longer speaks (`KVM_CAP_USERFAULT_FD_FLAGS` unknown, `KVM_CREATE_USERFAULT_FD` is `_IOW`).
pub const OLD_USERFAULT_UAPI_MSG: &str = "kernel has an older KVM userfault uAPI (v1: no \
     KVM_CAP_USERFAULT_FD_FLAGS, KVM_CREATE_USERFAULT_FD without msg_size); rebuild it with the \
     current series (`cargo xtask kernel`)";

/// Errors of the KVM userfault ioctls and the userfault fd.
#[derive(Debug, thiserror::Error)]
pub enum UserfaultError {
    /// The kernel does not have the series.
    #[error("{NO_USERFAULT_MSG}")]
    Unsupported,
    /// The kernel has the series with an incompatible (older) uAPI.
    #[error("{OLD_USERFAULT_UAPI_MSG}")]
    OldUapi,
    /// `KVM_CREATE_USERFAULT_FD` failed.
    #[error("KVM_CREATE_USERFAULT_FD flags {flags:#x} msg_size {msg_size}")]
    Create {
        /// The flags asked for.
        flags: u64,
        /// The record size asked for.
        msg_size: u32,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A record size (returned by KVM or received with a handoff) that cannot be used.
    #[error("userfault fd record size")]
    MsgSize(#[source] RecordError),
    /// KVM returned a record size larger than the one asked for (against the uAPI).
    #[error("KVM_CREATE_USERFAULT_FD returned msg_size {got}, more than the {asked} asked for")]
    MsgSizeGrew {
        /// What was asked for.
        asked: u32,
        /// What KVM returned.
        got: u32,
    },
    /// The fd's VM was destroyed (ENODEV from its ioctls): nothing is left to resolve.
    #[error("{op} on userfault fd {fd}: the VM is gone (ENODEV)")]
    VmGone {
        /// The operation.
        op: &'static str,
        /// The fd.
        fd: RawFd,
    },
    /// An ioctl or read on the userfault fd failed.
    #[error("{op} on userfault fd {fd}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The fd.
        fd: RawFd,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A read returned bytes that are not well-formed records.
    #[error("read of userfault fd {fd}")]
    Records {
        /// The fd.
        fd: RawFd,
        /// What was wrong.
        #[source]
        source: RecordError,
    },
}

/// Capabilities relevant to this runtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capabilities {
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: bool,
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` value (0 if absent).
    pub guest_memfd_flags: u64,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` value.
    pub memory_attributes: u64,
    /// `KVM_CAP_USERFAULT`: the VM supports KVM userfault.
    pub userfault: bool,
    /// Raw `KVM_CAP_USERFAULT` value (1 with the series; v1 of it returned the fd flags).
    pub userfault_raw: u64,
    /// `KVM_CAP_USERFAULT_FD_FLAGS`: the `KVM_USERFAULT_FD_FLAG_*` the fd accepts (0 = none,
    /// or a kernel that does not know the capability).
    pub userfault_fd_flags: u64,
}

impl Capabilities {
    /// Whether guest_memfd with `MMAP | INIT_SHARED` is available.
    pub fn mmap_guest_memfd(&self) -> bool {
        let want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        self.guest_memfd && self.guest_memfd_flags & want == want
    }
}
/// Probes the capabilities this runtime cares about on a VM fd.
pub fn probe(vm: &VmFd) -> Capabilities {
    let raw = |c: u32| vm.check_extension_raw(c as libc::c_ulong).max(0) as u64;
    Capabilities {
        user_memory2: vm.check_extension(Cap::UserMemory2),
        guest_memfd: vm.check_extension(Cap::GuestMemfd),
        guest_memfd_flags: raw(KVM_CAP_GUEST_MEMFD_FLAGS),
        memory_attributes: raw(kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES),
        userfault: raw(KVM_CAP_USERFAULT) != 0,
        userfault_raw: raw(KVM_CAP_USERFAULT),
        userfault_fd_flags: raw(KVM_CAP_USERFAULT_FD_FLAGS),
    }
}

/// Fails with [`UserfaultError::Unsupported`] ([`NO_USERFAULT_MSG`]) unless the series is
/// present, or [`UserfaultError::OldUapi`] if it has the old (v1) uAPI; returns the
/// `KVM_USERFAULT_FD_FLAG_*` the fd accepts.
pub fn require_userfault(vm: &VmFd) -> Result<u64, UserfaultError> {
    check_userfault_caps(&probe(vm))
}

/// The capability check behind [`require_userfault`].
pub fn check_userfault_caps(caps: &Capabilities) -> Result<u64, UserfaultError> {
    if !caps.userfault || caps.memory_attributes & KVM_MEMORY_ATTRIBUTE_USERFAULT == 0 {
        return Err(UserfaultError::Unsupported);
    }
    // v2 answers KVM_CAP_USERFAULT with 1 and always accepts NONBLOCK; v1 answered with its
    // fd flags and does not know KVM_CAP_USERFAULT_FD_FLAGS (0).
    if caps.userfault_raw != 1 || caps.userfault_fd_flags & KVM_USERFAULT_FD_FLAG_NONBLOCK == 0 {
        return Err(UserfaultError::OldUapi);
    }
    Ok(caps.userfault_fd_flags)
}

/// `KVM_CREATE_USERFAULT_FD` with the caller's argument as is (no check of it, no
/// negotiation): KVM writes the record size it uses back into `arg.msg_size`. The errno is
/// KVM's, unchanged, for callers that assert it (the selftests); a VMM calls
/// [`create_userfault_fd`].
pub fn create_raw(vm: &VmFd, arg: &mut kvm_create_userfault_fd) -> Result<OwnedFd, errno::Error> {
    // SAFETY: the number is _IOWR of exactly one kvm_create_userfault_fd, so KVM reads and
    // writes back only `arg`, which we borrow mutably for the call; `vm` is a VM fd.
    let ret = unsafe { ioctl_with_mut_ref(vm, KVM_CREATE_USERFAULT_FD(), arg) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    // SAFETY: on success KVM returns a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// `KVM_USERFAULT_RESOLVE` on the userfault fd `fd` with the caller's range as is; the errno
/// is KVM's, unchanged (EINVAL for a bad range, ENODEV once the VM is gone).
pub fn resolve_raw(fd: &impl AsRawFd, range: &kvm_userfault_range) -> Result<(), errno::Error> {
    // SAFETY: the number is _IOW of exactly one kvm_userfault_range: the kernel reads only
    // `range`, which we borrow for the call, and writes no memory of ours.
    let ret = unsafe { ioctl_with_ref(fd, KVM_USERFAULT_RESOLVE(), range) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// `KVM_USERFAULT_REQUEUE` on the userfault fd `fd`: how many records KVM posted again, or
/// KVM's errno, unchanged.
pub fn requeue_raw(fd: &impl AsRawFd) -> Result<usize, errno::Error> {
    // SAFETY: the number is _IO (no argument): the kernel reads and writes no memory of ours.
    let ret = unsafe { ioctl(fd, KVM_USERFAULT_REQUEUE()) };
    // A count is never negative; anything else is an errno.
    usize::try_from(ret).map_err(|_| errno::Error::last())
}

/// Creates the VM's userfault fd (`KVM_CREATE_USERFAULT_FD`), negotiating the record size:
/// it asks for the size of the record this crate knows ([`USERFAULT_MSG_SIZE`]) and every
/// read of the fd strides by the size KVM returns ([`UserfaultFd::msg_size`]).
pub fn create_userfault_fd(vm: &VmFd, flags: u64) -> Result<UserfaultFd, UserfaultError> {
    let asked = USERFAULT_MSG_SIZE as u32;
    let mut arg = kvm_create_userfault_fd {
        flags,
        msg_size: asked,
        ..Default::default()
    };
    let fd = create_raw(vm, &mut arg).map_err(|e| {
        // A kernel with the v1 uAPI (an _IOW ioctl of another number) or none at all.
        if e.errno() == libc::ENOTTY {
            let has_series = vm.check_extension_raw(KVM_CAP_USERFAULT as libc::c_ulong) > 0;
            return if has_series {
                UserfaultError::OldUapi
            } else {
                UserfaultError::Unsupported
            };
        }
        UserfaultError::Create {
            flags,
            msg_size: asked,
            source: e.into(),
        }
    })?;
    // The fd is closed on the error paths below (`fd` owns it).
    if arg.msg_size > asked {
        return Err(UserfaultError::MsgSizeGrew {
            asked,
            got: arg.msg_size,
        });
    }
    UserfaultFd::from_parts(fd, arg.msg_size as usize)
}

/// `KVM_SET_MEMORY_ATTRIBUTES` with the series' delta flags.
pub fn set_userfault(vm: &VmFd, gpa: u64, size: u64, on: bool) -> io::Result<()> {
    let attr = kvm_memory_attributes {
        address: gpa,
        size,
        attributes: KVM_MEMORY_ATTRIBUTE_USERFAULT,
        flags: if on {
            KVM_MEMORY_ATTRIBUTES_FLAG_SET
        } else {
            KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR
        },
    };
    vm.set_memory_attributes(attr)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// What one [`UserfaultFd::read_records`] call got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    /// This many records were appended.
    Records(usize),
    /// Nothing queued (non-blocking fd).
    WouldBlock,
    /// A signal interrupted the wait.
    Interrupted,
    /// End of file: the VM was destroyed; no record will ever come.
    VmGone,
}

/// The VM's userfault fd, with the record size negotiated when it was created: read records
/// from it, resolve ranges through it, and re-post records a crashed handler read
/// ([`UserfaultFd::requeue`]).
#[derive(Debug)]
pub struct UserfaultFd {
    fd: OwnedFd,
    msg_size: usize,
}

impl UserfaultFd {
    /// Wraps a userfault fd whose records are `msg_size` bytes (e.g. one received over
    /// SCM_RIGHTS with the size its creator negotiated). Fails if no reader can stride by
    /// `msg_size`.
    pub fn from_parts(fd: OwnedFd, msg_size: usize) -> Result<Self, UserfaultError> {
        check_msg_size(msg_size).map_err(UserfaultError::MsgSize)?;
        Ok(Self { fd, msg_size })
    }

    /// The size of each record read from this fd (what `KVM_CREATE_USERFAULT_FD` returned).
    pub fn msg_size(&self) -> usize {
        self.msg_size
    }

    /// The fd.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Gives up the wrapper.
    pub fn into_parts(self) -> (OwnedFd, usize) {
        (self.fd, self.msg_size)
    }

    /// One `read(2)` into `buf` (whose length is rounded down to whole records; it must hold
    /// at least one), parsing the records into `out`. Blocks unless the fd is non-blocking.
    pub fn read_records(
        &self,
        buf: &mut [u8],
        out: &mut Vec<Record>,
    ) -> Result<ReadStatus, UserfaultError> {
        let fd = self.fd.as_raw_fd();
        let len = buf.len() / self.msg_size * self.msg_size;
        if len == 0 {
            return Err(UserfaultError::Io {
                op: "read",
                fd,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "buffer of {} bytes is smaller than one {}-byte record",
                        buf.len(),
                        self.msg_size
                    ),
                ),
            });
        }
        // SAFETY: reads at most `len` <= buf.len() bytes into `buf`, which we borrow mutably.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), len) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(ReadStatus::WouldBlock),
                Some(libc::EINTR) => Ok(ReadStatus::Interrupted),
                _ => Err(UserfaultError::Io {
                    op: "read",
                    fd,
                    source: e,
                }),
            };
        }
        if n == 0 {
            return Ok(ReadStatus::VmGone);
        }
        let bytes = buf.get(..n as usize).ok_or_else(|| UserfaultError::Io {
            op: "read",
            fd,
            source: io::Error::other(format!("read returned {n} bytes for a {len}-byte read")),
        })?;
        let before = out.len();
        parse_records(bytes, self.msg_size, out)
            .map_err(|source| UserfaultError::Records { fd, source })?;
        Ok(ReadStatus::Records(out.len() - before))
    }

    /// `KVM_USERFAULT_REQUEUE`: posts a record again for every outstanding (unresolved) gfn
    /// whose record was already read, and returns how many were queued.
    ///
    /// For a handler that (re)starts while the VM runs (e.g. a handler process that received
    /// the fd after its predecessor crashed): records the predecessor read but never resolved
    /// would otherwise be lost, leaving their faulting tasks asleep. Call it only when no other
    /// handler serves the fd: a record still being handled elsewhere would be handled twice,
    /// and the second fill could overwrite what the guest wrote after the first resolve.
    pub fn requeue(&self) -> Result<usize, UserfaultError> {
        let fd = self.fd.as_raw_fd();
        requeue_raw(&self.fd).map_err(|e| {
            if e.errno() == libc::ENODEV {
                UserfaultError::VmGone {
                    op: "KVM_USERFAULT_REQUEUE",
                    fd,
                }
            } else {
                UserfaultError::Io {
                    op: "KVM_USERFAULT_REQUEUE",
                    fd,
                    source: e.into(),
                }
            }
        })
    }

    /// `KVM_USERFAULT_RESOLVE`: clears USERFAULT on the range and wakes its waiters (ENODEV
    /// once the VM is gone).
    pub fn resolve(&self, gpa: u64, size: u64) -> io::Result<()> {
        let r = kvm_userfault_range {
            gpa,
            size,
            flags: 0,
            reserved: 0,
        };
        resolve_raw(&self.fd, &r).map_err(io::Error::from)
    }
}

impl AsRawFd for UserfaultFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for UserfaultFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Resolves by clearing the attribute with the VM ioctl (sync mode, no fd).
pub struct AttributeResolver(pub Arc<VmFd>);

impl crate::handler::Resolver for AttributeResolver {
    fn resolve(&self, gpa: u64, size: u64) -> io::Result<()> {
        set_userfault(&self.0, gpa, size, false)
    }
}

/// Resolves through the userfault fd (async mode; wakes the waiters).
pub struct FdResolver(pub Arc<UserfaultFd>);

impl crate::handler::Resolver for FdResolver {
    fn resolve(&self, gpa: u64, size: u64) -> io::Result<()> {
        self.0.resolve(gpa, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_check_tells_v1_from_v2_and_none() {
        let caps = |userfault_raw: u64, fd_flags: u64| Capabilities {
            memory_attributes: KVM_MEMORY_ATTRIBUTE_USERFAULT,
            userfault: userfault_raw != 0,
            userfault_raw,
            userfault_fd_flags: fd_flags,
            ..Default::default()
        };
        assert_eq!(check_userfault_caps(&caps(1, 3)).unwrap(), 3);
        assert!(matches!(
            check_userfault_caps(&caps(0, 0)),
            Err(UserfaultError::Unsupported)
        ));
        // v1: KVM_CAP_USERFAULT was the flag set, KVM_CAP_USERFAULT_FD_FLAGS unknown.
        let e = check_userfault_caps(&caps(3, 0)).unwrap_err();
        assert!(matches!(e, UserfaultError::OldUapi), "{e:?}");
        assert!(e.to_string().contains("older KVM userfault uAPI"), "{e}");
        let mut no_attr = caps(1, 3);
        no_attr.memory_attributes = 0;
        assert!(matches!(
            check_userfault_caps(&no_attr),
            Err(UserfaultError::Unsupported)
        ));
    }

    #[test]
    fn userfault_fd_reads_stride_by_the_negotiated_size() {
        use crate::fault::records::{encode_record, encode_record_sized};
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        // A socket stands in for the fd: 32-byte records (a handoff from a newer VMM).
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let ufd = UserfaultFd::from_parts(OwnedFd::from(rx), 32).unwrap();
        assert_eq!(ufd.msg_size(), 32);
        for g in 0..3 {
            tx.write_all(&encode_record_sized(g, KVM_USERFAULT_MSG_READ, 0, 32))
                .unwrap();
        }
        let mut buf = [0u8; 100]; // three whole records fit; the rest is not used
        let mut out = Vec::new();
        assert_eq!(
            ufd.read_records(&mut buf, &mut out).unwrap(),
            ReadStatus::Records(3)
        );
        assert_eq!(out.iter().map(|r| r.gfn).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(ufd.read_records(&mut buf[..31], &mut out).is_err());
        // A record whose size field disagrees with the negotiated size: a typed error.
        tx.write_all(&encode_record(9, KVM_USERFAULT_MSG_READ, 0))
            .unwrap();
        tx.write_all(&[0u8; 8]).unwrap();
        let e = ufd.read_records(&mut buf[..32], &mut out).unwrap_err();
        assert!(
            matches!(
                e,
                UserfaultError::Records {
                    source: RecordError::BadSize {
                        size: 24,
                        expected: 32,
                        ..
                    },
                    ..
                }
            ),
            "{e:?}"
        );
        // End of file is a status, not an error.
        drop(tx);
        assert_eq!(
            ufd.read_records(&mut buf, &mut out).unwrap(),
            ReadStatus::VmGone
        );
        // Sizes no reader can use are refused.
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            UserfaultFd::from_parts(OwnedFd::from(a), 16),
            Err(UserfaultError::MsgSize(_))
        ));
    }
}
