//! A small userfaultfd layer written on libc.
//!
//! Why not the `userfaultfd` crate: it generates its bindings at build time (bindgen/clang on
//! the build host, awkward for the static cross builds the VM harness uses), and we need exact
//! control of EEXIST/EAGAIN handling and of MINOR + UFFDIO_CONTINUE. The kernel ABI used here
//! is small and stable (include/uapi/linux/userfaultfd.h).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// `struct uffd_msg` (32 bytes); only the page-fault member is interpreted.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `arg.pagefault.flags`.
    pub pf_flags: u64,
    /// `arg.pagefault.address`.
    pub pf_address: u64,
    /// `arg.pagefault.feat.ptid` (+ padding).
    pub pf_feat: u64,
}

/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `UFFD_PAGEFAULT_FLAG_MINOR`.
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 4;

// The userfaultfd ioctl numbers (include/uapi/linux/userfaultfd.h), in a private module: each
// macro defines a `fn NAME() -> c_ulong` from the argument type's size.
mod nr {
    use super::{UffdioApi, UffdioContinue, UffdioCopy, UffdioRange, UffdioRegister, UFFDIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    // _IOR in the kernel header, although the kernel only reads the range.
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, UffdioContinue);
    // On /dev/userfaultfd: the flags are the integer argument.
    ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
}

/// Why a userfaultfd could not be opened or registered.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither the syscall nor /dev/userfaultfd gave a userfaultfd.
    #[error("userfaultfd syscall failed ({syscall}) and /dev/userfaultfd is unavailable")]
    Open {
        /// Why the syscall failed.
        syscall: io::Error,
        /// Why /dev/userfaultfd could not be opened.
        #[source]
        dev: io::Error,
    },
    /// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd failed.
    #[error("USERFAULTFD_IOC_NEW on /dev/userfaultfd")]
    DevNew(#[source] io::Error),
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API")]
    Api(#[source] io::Error),
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER {mode:?} of {len:#x} bytes at {start:#x}")]
    Register {
        /// The mode asked for.
        mode: UffdMode,
        /// First byte of the range.
        start: usize,
        /// Bytes.
        len: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

/// Registration mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdMode {
    /// Faults on pages absent from the page tables and the page cache; resolve with COPY.
    Missing,
    /// Faults on pages present in the page cache but not mapped; resolve with CONTINUE.
    Minor,
}

/// Result of an install ioctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The whole range was installed.
    All,
    /// Part or all of the range was already mapped by someone else (EEXIST).
    AlreadyMapped,
}

/// An open userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a non-blocking userfaultfd (syscall, falling back to /dev/userfaultfd) and does the
    /// API handshake. Kernel-mode faults (KVM's GUP) must be handled, so no USER_MODE_ONLY.
    pub fn new() -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the syscall takes an int of flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        let fd = if raw >= 0 {
            // SAFETY: the kernel just returned this fd to us; nothing else owns it.
            unsafe { OwnedFd::from_raw_fd(raw) }
        } else {
            let sys_err = io::Error::last_os_error();
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|dev| UffdError::Open {
                    syscall: sys_err,
                    dev,
                })?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and touches
            // no memory of ours; it returns a new fd or -1.
            let raw =
                unsafe { ioctl_with_val(&dev, nr::USERFAULTFD_IOC_NEW(), flags as libc::c_ulong) };
            if raw < 0 {
                return Err(UffdError::DevNew(io::Error::last_os_error()));
            }
            // SAFETY: a new fd returned by the ioctl, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(raw) }
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes exactly the uffdio_api we borrow mutably.
        let r = unsafe { ioctl_with_mut_ref(&fd, nr::UFFDIO_API(), &mut api) };
        if r < 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        Ok(Self { fd })
    }

    /// Registers `[start, start+len)` in `mode`.
    pub fn register(&self, start: usize, len: usize, mode: UffdMode) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: match mode {
                UffdMode::Missing => 1,
                UffdMode::Minor => 4,
            },
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register we own; the range is a
        // mapping the caller owns (the kernel validates it).
        let r = unsafe { ioctl_with_mut_ref(&self.fd, nr::UFFDIO_REGISTER(), &mut reg) };
        if r < 0 {
            return Err(UffdError::Register {
                mode,
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Atomically copies `len` bytes from `src` into the registered range at `dst` and wakes
    /// the faulting threads.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes.
    pub unsafe fn copy(&self, dst: usize, src: *const u8, len: usize) -> io::Result<Installed> {
        let mut done = 0usize;
        while done < len {
            let mut c = UffdioCopy {
                dst: (dst + done) as u64,
                src: src as u64 + done as u64,
                len: (len - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: the kernel reads `len` bytes at src (the caller's contract) and writes
            // only the uffdio_copy we own.
            let r = unsafe { ioctl_with_mut_ref(&self.fd, nr::UFFDIO_COPY(), &mut c) };
            if r == 0 {
                return Ok(Installed::All);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    // Someone mapped (part of) the range; make sure waiters run.
                    self.wake(dst, len)?;
                    return Ok(Installed::AlreadyMapped);
                }
                // The mm is changing (or a partial copy): retry the rest.
                Some(libc::EAGAIN) => {
                    if c.copy > 0 {
                        done += c.copy as usize;
                    }
                }
                _ => return Err(err),
            }
        }
        Ok(Installed::All)
    }

    /// Maps the page-cache pages of `[start, start+len)` into the registered range and wakes
    /// the faulting threads.
    pub fn cont(&self, start: usize, len: usize) -> io::Result<Installed> {
        let mut done = 0usize;
        while done < len {
            let mut c = UffdioContinue {
                range: UffdioRange {
                    start: (start + done) as u64,
                    len: (len - done) as u64,
                },
                mode: 0,
                mapped: 0,
            };
            // SAFETY: UFFDIO_CONTINUE reads and writes a uffdio_continue we own.
            let r = unsafe { ioctl_with_mut_ref(&self.fd, nr::UFFDIO_CONTINUE(), &mut c) };
            if r == 0 {
                return Ok(Installed::All);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    self.wake(start, len)?;
                    return Ok(Installed::AlreadyMapped);
                }
                Some(libc::EAGAIN) => {
                    if c.mapped > 0 {
                        done += c.mapped as usize;
                    }
                }
                _ => return Err(err),
            }
        }
        Ok(Installed::All)
    }

    /// Wakes threads waiting on `[start, start+len)`.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE reads only the uffdio_range we borrow.
        let ret = unsafe { ioctl_with_ref(&self.fd, nr::UFFDIO_WAKE(), &r) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads as many pending messages as fit in `buf` without blocking; Ok(0) when none.
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: buf is a writable array of plain-old-data structs of `bytes` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e);
        }
        let n = n as usize;
        if !n.is_multiple_of(size_of::<UffdMsg>()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("userfaultfd returned {n} bytes, not a whole number of messages"),
            ));
        }
        Ok(n / size_of::<UffdMsg>())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes() {
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(size_of::<UffdioCopy>(), 40);
        assert_eq!(size_of::<UffdioContinue>(), 32);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        // Values from the kernel header, computed independently.
        assert_eq!(nr::UFFDIO_API(), 0xc018aa3f);
        assert_eq!(nr::UFFDIO_REGISTER(), 0xc020aa00);
        assert_eq!(nr::UFFDIO_COPY(), 0xc028aa03);
        assert_eq!(nr::UFFDIO_WAKE(), 0x8010aa02);
        assert_eq!(nr::UFFDIO_CONTINUE(), 0xc020aa07);
        assert_eq!(nr::USERFAULTFD_IOC_NEW(), 0xaa00);
    }

    #[test]
    fn missing_fault_is_served_by_copy() {
        let Ok(uffd) = Uffd::new() else {
            eprintln!("SKIP: userfaultfd unavailable here");
            return;
        };
        let len = 4 * crate::PAGE_SIZE;
        // SAFETY: fresh anonymous mapping owned by this test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as usize;
        uffd.register(base, len, UffdMode::Missing).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: reads a registered page; the main thread resolves the fault.
            unsafe { std::ptr::read_volatile((base + 2 * crate::PAGE_SIZE + 8) as *const u64) }
        });
        let mut msgs = [UffdMsg::default(); 4];
        let n = loop {
            let n = uffd.read_msgs(&mut msgs).unwrap();
            if n > 0 {
                break n;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(n, 1);
        assert_eq!(msgs[0].event, UFFD_EVENT_PAGEFAULT);
        assert_eq!(
            msgs[0].pf_address as usize & !0xfff,
            base + 2 * crate::PAGE_SIZE
        );
        let page = [0x42u8; crate::PAGE_SIZE];
        // SAFETY: page is a readable local array of PAGE_SIZE bytes.
        let r = unsafe { uffd.copy(base + 2 * crate::PAGE_SIZE, page.as_ptr(), crate::PAGE_SIZE) };
        assert_eq!(r.unwrap(), Installed::All);
        assert_eq!(reader.join().unwrap(), 0x4242_4242_4242_4242);
        // A second copy of the same page reports it as already mapped.
        // SAFETY: as above.
        let r = unsafe { uffd.copy(base + 2 * crate::PAGE_SIZE, page.as_ptr(), crate::PAGE_SIZE) };
        assert_eq!(r.unwrap(), Installed::AlreadyMapped);
        // SAFETY: unmapping the mapping made above; no references into it remain.
        unsafe { libc::munmap(p, len) };
    }
}
