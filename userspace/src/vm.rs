//! VM setup on kvm-ioctls: memslots backed by anonymous memory, shmem (memfd) or guest_memfd
//! (mmap-able, `KVM_SET_USER_MEMORY_REGION2` with `userspace_addr` = the guest_memfd mapping,
//! since KVM's own emulated accesses go through it), vCPUs, capability probing, and the
//! series' VM ioctls (USERFAULT attribute, userfault fd).

use crate::fault::records::{check_msg_size, parse_records, Record, RecordError};
use crate::uapi::*;
use anyhow::{bail, Context, Result};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

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

/// What backs a memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory.
    Anon,
    /// A memfd (shmem), mapped shared; can have a second alias mapping.
    Shmem,
    /// A guest_memfd created with `MMAP | INIT_SHARED`, mapped shared.
    GuestMemfd,
}

/// An mmap()ed range, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes: anonymous when `fd` is None, else shared on `fd` at offset 0.
    pub fn new(len: usize, fd: Option<RawFd>) -> Result<Self> {
        let (flags, fd) = match fd {
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
            Some(fd) => (libc::MAP_SHARED, fd),
        };
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("mmap of {len:#x} bytes"));
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    /// Maps `len` bytes of `fd` shared, starting at `offset` (page aligned).
    pub fn with_offset(len: usize, fd: RawFd, offset: i64) -> Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("mmap of {len:#x} bytes at offset {offset:#x}"));
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    /// Host address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never, in practice).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        anyhow::ensure!(
            offset
                .checked_add(data.len())
                .is_some_and(|e| e <= self.len),
            "write of {} bytes at {offset:#x} past a {:#x}-byte mapping",
            data.len(),
            self.len
        );
        // SAFETY: bounds checked above; the mapping is writable and owned by self.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.addr + offset) as *mut u8,
                data.len(),
            )
        };
        Ok(())
    }

    /// Reads `out.len()` bytes at `offset`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        anyhow::ensure!(
            offset.checked_add(out.len()).is_some_and(|e| e <= self.len),
            "read past the mapping"
        );
        // SAFETY: bounds checked above; the mapping is readable.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.addr + offset) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this object mapped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// One memslot and its backing.
#[derive(Debug)]
pub struct MemSlot {
    /// KVM slot id.
    pub slot: u32,
    /// Guest physical base.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Backing kind.
    pub backing: Backing,
    /// The mapping KVM uses (userspace_addr).
    pub mapping: Mapping,
    /// The memfd or guest_memfd, if any.
    pub fd: Option<OwnedFd>,
}

impl MemSlot {
    /// A second shared mapping of a shmem slot (to fill pages for UFFDIO_CONTINUE).
    pub fn alias(&self) -> Result<Mapping> {
        match (&self.fd, self.backing) {
            (Some(fd), Backing::Shmem) => Mapping::new(self.size as usize, Some(fd.as_raw_fd())),
            _ => bail!("only shmem slots can have an alias mapping"),
        }
    }
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

/// A VM with its memslots.
pub struct Vm {
    /// The /dev/kvm handle.
    pub kvm: Kvm,
    /// The VM fd (shared with vCPU and handler threads).
    pub fd: Arc<VmFd>,
    /// Memslots added so far.
    pub slots: Vec<MemSlot>,
}

impl Vm {
    /// Opens /dev/kvm and creates a default-type VM.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let fd = kvm.create_vm().context("KVM_CREATE_VM")?;
        // Needed on Intel before running vCPUs; placed just below 4 GiB out of our layout.
        fd.set_tss_address(0xfffb_d000)
            .context("KVM_SET_TSS_ADDR")?;
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            slots: Vec::new(),
        })
    }

    /// Probes the capabilities on the VM fd.
    pub fn probe(&self) -> Capabilities {
        let raw = |c: u32| self.fd.check_extension_raw(c as libc::c_ulong).max(0) as u64;
        Capabilities {
            user_memory2: self.fd.check_extension(Cap::UserMemory2),
            guest_memfd: self.fd.check_extension(Cap::GuestMemfd),
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
    pub fn require_userfault(&self) -> Result<u64, UserfaultError> {
        check_userfault_caps(&self.probe())
    }

    /// Adds a memslot of `size` bytes at `gpa`.
    pub fn add_slot(&mut self, gpa: u64, size: u64, backing: Backing) -> Result<&MemSlot> {
        let slot = self.slots.len() as u32;
        let len = size as usize;
        let (fd, mapping, flags, gmem_fd) = match backing {
            Backing::Anon => (None, Mapping::new(len, None)?, 0, 0),
            Backing::Shmem => {
                let name = c"kvm-userfault-guest";
                // SAFETY: memfd_create takes a NUL-terminated name and flags.
                let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
                if raw < 0 {
                    return Err(io::Error::last_os_error()).context("memfd_create");
                }
                // SAFETY: a fresh fd owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                // SAFETY: ftruncate on our memfd.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } < 0 {
                    return Err(io::Error::last_os_error()).context("ftruncate memfd");
                }
                let m = Mapping::new(len, Some(fd.as_raw_fd()))?;
                (Some(fd), m, 0, 0)
            }
            Backing::GuestMemfd => {
                let caps = self.probe();
                if !caps.mmap_guest_memfd() {
                    bail!(
                        "KVM lacks mmap-able shared guest_memfd (KVM_CAP_GUEST_MEMFD_FLAGS = {:#x})",
                        caps.guest_memfd_flags
                    );
                }
                let gmem = kvm_create_guest_memfd {
                    size,
                    flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                    ..Default::default()
                };
                let raw = self
                    .fd
                    .create_guest_memfd(gmem)
                    .context("KVM_CREATE_GUEST_MEMFD")?;
                // SAFETY: a fresh fd returned by KVM, owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let m = Mapping::new(len, Some(fd.as_raw_fd())).context("mmap of guest_memfd")?;
                let gfd = fd.as_raw_fd() as u32;
                (Some(fd), m, KVM_MEM_GUEST_MEMFD, gfd)
            }
        };
        let region = kvm_userspace_memory_region2 {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: mapping.addr() as u64,
            guest_memfd_offset: 0,
            guest_memfd: gmem_fd,
            ..Default::default()
        };
        // SAFETY: the mapping stays alive as long as the slot (both owned by self.slots, and
        // the VM fd is only used through self).
        unsafe { self.fd.set_user_memory_region2(region) }.with_context(|| {
            format!("KVM_SET_USER_MEMORY_REGION2 slot {slot} ({backing:?}) at {gpa:#x}")
        })?;
        self.slots.push(MemSlot {
            slot,
            gpa,
            size,
            backing,
            mapping,
            fd,
        });
        Ok(self.slots.last().expect("just pushed"))
    }

    /// Creates vCPU `id` with the host's supported CPUID (long mode needs LM in guest CPUID).
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd> {
        let vcpu = self
            .fd
            .create_vcpu(id)
            .with_context(|| format!("KVM_CREATE_VCPU {id}"))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
        Ok(vcpu)
    }

    /// Sets or clears USERFAULT on a range, leaving other attributes (delta flags).
    pub fn set_userfault(&self, gpa: u64, size: u64, on: bool) -> Result<()> {
        set_userfault(&self.fd, gpa, size, on).with_context(|| {
            format!("KVM_SET_MEMORY_ATTRIBUTES USERFAULT={on} on {gpa:#x}+{size:#x}")
        })
    }

    /// Creates the VM's userfault fd (`KVM_CREATE_USERFAULT_FD`), negotiating the record size:
    /// it asks for the size of the record this crate knows ([`USERFAULT_MSG_SIZE`]) and every
    /// read of the fd strides by the size KVM returns ([`UserfaultFd::msg_size`]).
    pub fn create_userfault_fd(&self, flags: u64) -> Result<UserfaultFd, UserfaultError> {
        create_userfault_fd(&self.fd, flags)
    }
}

/// The capability check behind [`Vm::require_userfault`].
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

/// `KVM_CREATE_USERFAULT_FD` on any VM fd; see [`Vm::create_userfault_fd`].
pub fn create_userfault_fd(vm: &VmFd, flags: u64) -> Result<UserfaultFd, UserfaultError> {
    let asked = USERFAULT_MSG_SIZE as u32;
    let mut arg = kvm_create_userfault_fd {
        flags,
        msg_size: asked,
        ..Default::default()
    };
    // SAFETY: the ioctl reads and writes back the kvm_create_userfault_fd we own (exactly its
    // size, encoded in the ioctl number) and returns a new fd.
    let raw = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_CREATE_USERFAULT_FD as libc::c_ulong,
            &mut arg as *mut kvm_create_userfault_fd,
        )
    };
    if raw < 0 {
        let e = io::Error::last_os_error();
        // A kernel with the v1 uAPI (an _IOW ioctl of another number) or none at all.
        if e.raw_os_error() == Some(libc::ENOTTY) {
            let has_series = vm.check_extension_raw(KVM_CAP_USERFAULT as libc::c_ulong) > 0;
            return Err(if has_series {
                UserfaultError::OldUapi
            } else {
                UserfaultError::Unsupported
            });
        }
        return Err(UserfaultError::Create {
            flags,
            msg_size: asked,
            source: e,
        });
    }
    // SAFETY: a fresh fd returned by KVM, owned by nobody else (closed if we reject it below).
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
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
        // SAFETY: an ioctl without an argument on a fd we own.
        let r = unsafe { libc::ioctl(fd, KVM_USERFAULT_REQUEUE as libc::c_ulong, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENODEV) {
                return Err(UserfaultError::VmGone {
                    op: "KVM_USERFAULT_REQUEUE",
                    fd,
                });
            }
            return Err(UserfaultError::Io {
                op: "KVM_USERFAULT_REQUEUE",
                fd,
                source: e,
            });
        }
        Ok(r as usize)
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
        // SAFETY: the ioctl reads a kvm_userfault_range we own.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                KVM_USERFAULT_RESOLVE as libc::c_ulong,
                &r,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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
    fn probe_and_slots_on_host_kvm() {
        let Ok(mut vm) = Vm::new() else {
            eprintln!("SKIP: no /dev/kvm");
            return;
        };
        let caps = vm.probe();
        assert!(caps.user_memory2);
        vm.add_slot(0, 2 << 20, Backing::Anon).unwrap();
        let s = vm.add_slot(4 << 20, 2 << 20, Backing::Shmem).unwrap();
        let alias = s.alias().unwrap();
        alias.write(4096, b"hello").unwrap();
        let mut out = [0u8; 5];
        vm.slots[1].mapping.read(4096, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(vm.slots[1].mapping.write((2 << 20) - 2, b"abc").is_err());
        if caps.mmap_guest_memfd() {
            vm.add_slot(8 << 20, 2 << 20, Backing::GuestMemfd).unwrap();
        }
        if !caps.userfault {
            let e = vm.require_userfault().unwrap_err().to_string();
            assert!(e.contains("cargo xtask kernel"), "{e}");
            // Creating the fd fails with the same clear message, not a bare ENOTTY.
            let e = vm.create_userfault_fd(0).unwrap_err();
            assert!(matches!(e, UserfaultError::Unsupported), "{e:?}");
        }
    }

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
