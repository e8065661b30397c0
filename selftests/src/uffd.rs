//! userfaultfd plumbing, like the C selftests' `lib/userfaultfd_util.c`.
//!
//! The demand_paging test drives userfaultfd directly (this module) for the baseline modes, so
//! that it measures exactly what the C test measures; see docs/selftests.md.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result};

pub const UFFD_API: u64 = 0xAA;
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    pub mapped: i64,
}

/// `struct uffd_msg` for a page fault (the only event registered here).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub flags: u64,
    pub address: u64,
    pub ptid: u64,
}

const UFFDIO: u32 = 0xAA;
const UFFDIO_API: libc::c_ulong =
    nix::request_code_readwrite!(UFFDIO, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong =
    nix::request_code_readwrite!(UFFDIO, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WAKE: libc::c_ulong =
    nix::request_code_read!(UFFDIO, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong =
    nix::request_code_readwrite!(UFFDIO, 0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_CONTINUE: libc::c_ulong =
    nix::request_code_readwrite!(UFFDIO, 0x07, std::mem::size_of::<UffdioContinue>());

/// A userfaultfd (non-blocking, so handler threads can poll it together with a stop eventfd).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> nix::Result<()> {
    // SAFETY: `req` is one of the UFFDIO ioctls above, each taking a pointer to exactly `T`.
    let r = unsafe { libc::ioctl(fd, req, arg as *mut T) };
    if r < 0 {
        Err(nix::errno::Errno::last())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// `userfaultfd(O_CLOEXEC | O_NONBLOCK)` + `UFFDIO_API` with `features`.
    pub fn new(features: u64) -> Result<Self> {
        // SAFETY: the userfaultfd syscall takes only flags.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("userfaultfd()");
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)
            .with_context(|| format!("UFFDIO_API(features {features:#x})"))?;
        Ok(Self { fd })
    }

    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        ioctl(self.as_raw_fd(), UFFDIO_REGISTER, &mut reg)
            .with_context(|| format!("UFFDIO_REGISTER({start:#x}+{len:#x}, mode {mode:#x})"))
    }

    /// Reads one message; `Ok(None)` when none is pending (EAGAIN).
    pub fn read_msg(&self) -> Result<Option<UffdMsg>> {
        let mut msg = UffdMsg::default();
        // SAFETY: reading at most size_of::<UffdMsg>() bytes into a repr(C) plain struct.
        let n = unsafe {
            libc::read(
                self.as_raw_fd(),
                (&mut msg as *mut UffdMsg).cast(),
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if n < 0 {
            let e = nix::errno::Errno::last();
            if e == nix::errno::Errno::EAGAIN {
                return Ok(None);
            }
            return Err(e).context("read(userfaultfd)");
        }
        anyhow::ensure!(
            n as usize == std::mem::size_of::<UffdMsg>(),
            "short read {n} from userfaultfd"
        );
        Ok(Some(msg))
    }

    /// `UFFDIO_COPY`; EEXIST (another reader resolved it first) is success, as in the C test.
    pub fn copy(&self, dst: u64, src: *const u8, len: u64) -> Result<()> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        match ioctl(self.as_raw_fd(), UFFDIO_COPY, &mut c) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("UFFDIO_COPY({dst:#x}+{len:#x})")),
        }
    }

    /// `UFFDIO_CONTINUE`; EEXIST is success, as in the C test.
    pub fn cont(&self, start: u64, len: u64) -> Result<()> {
        let mut c = UffdioContinue {
            range: UffdioRange { start, len },
            mode: 0,
            mapped: 0,
        };
        match ioctl(self.as_raw_fd(), UFFDIO_CONTINUE, &mut c) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("UFFDIO_CONTINUE({start:#x}+{len:#x})")),
        }
    }

    pub fn wake(&self, start: u64, len: u64) -> Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl(self.as_raw_fd(), UFFDIO_WAKE, &mut r).context("UFFDIO_WAKE")
    }
}
