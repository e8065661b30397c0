//! A small userfaultfd layer written on libc.
//!
//! Why not the `userfaultfd` crate: it generates its bindings at build time (bindgen/clang on
//! the build host, awkward for the static cross builds the VM harness uses), and we need exact
//! control of EEXIST/EAGAIN handling and of MINOR + UFFDIO_CONTINUE. The kernel ABI used here
//! is small and stable (include/uapi/linux/userfaultfd.h).

use crate::PAGE_SIZE;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};
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
    /// An install kept failing with EAGAIN, without progress, for longer than the stall limit
    /// (returned inside an `io::Error` of kind `TimedOut`).
    #[error(
        "{op} of {len:#x} bytes at {addr:#x}: EAGAIN without progress for {waited:?} after \
         {done:#x} bytes (the address space kept changing)"
    )]
    Stalled {
        /// `UFFDIO_COPY` or `UFFDIO_CONTINUE`.
        op: &'static str,
        /// First byte of the range.
        addr: usize,
        /// Bytes of the range.
        len: usize,
        /// Bytes installed before the stall.
        done: usize,
        /// How long it got EAGAIN without progress.
        waited: Duration,
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

/// How long [`Uffd::copy`] and [`Uffd::cont`] retry EAGAIN without any progress before they
/// fail (the default of [`Uffd::stall_limit`]).
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(2);

/// An open userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    stall_limit: Duration,
}

fn errno_result(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a non-blocking userfaultfd (syscall, falling back to /dev/userfaultfd) and does the
    /// API handshake. Kernel-mode faults (KVM's GUP) must be handled, so no USER_MODE_ONLY.
    pub fn new() -> Result<Self, UffdError> {
        Self::with_features(0)
    }

    /// How long an install retries EAGAIN without progress ([`DEFAULT_STALL_LIMIT`] unless
    /// changed with [`Uffd::set_stall_limit`]).
    pub fn stall_limit(&self) -> Duration {
        self.stall_limit
    }

    /// Sets [`Uffd::stall_limit`].
    pub fn set_stall_limit(&mut self, limit: Duration) {
        self.stall_limit = limit;
    }

    /// [`Uffd::new`] asking for the `UFFD_FEATURE_*` bits `features` in the handshake.
    fn with_features(features: u64) -> Result<Self, UffdError> {
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
            features,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes exactly the uffdio_api we borrow mutably.
        let r = unsafe { ioctl_with_mut_ref(&fd, nr::UFFDIO_API(), &mut api) };
        if r < 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            stall_limit: DEFAULT_STALL_LIMIT,
        })
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
    /// the faulting threads. EAGAIN (the address space is changing, or a partial copy) is
    /// retried, but not forever: after [`Uffd::stall_limit`] without progress the copy fails
    /// with an error of kind `TimedOut` carrying [`UffdError::Stalled`].
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes.
    pub unsafe fn copy(&self, dst: usize, src: *const u8, len: usize) -> io::Result<Installed> {
        self.install("UFFDIO_COPY", dst, len, |done| {
            let mut c = UffdioCopy {
                dst: (dst + done) as u64,
                src: src as u64 + done as u64,
                len: (len - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: the kernel reads `len - done` bytes at `src + done` (inside what the
            // caller promised readable) and writes only the uffdio_copy we borrow mutably.
            let r = unsafe { ioctl_with_mut_ref(&self.fd, nr::UFFDIO_COPY(), &mut c) };
            (errno_result(r), c.copy)
        })
    }

    /// Maps the page-cache pages of `[start, start+len)` into the registered range and wakes
    /// the faulting threads; EAGAIN is retried as for [`Uffd::copy`], within the same bound.
    pub fn cont(&self, start: usize, len: usize) -> io::Result<Installed> {
        self.install("UFFDIO_CONTINUE", start, len, |done| {
            let mut c = UffdioContinue {
                range: UffdioRange {
                    start: (start + done) as u64,
                    len: (len - done) as u64,
                },
                mode: 0,
                mapped: 0,
            };
            // SAFETY: UFFDIO_CONTINUE reads and writes only the uffdio_continue we borrow
            // mutably; the range is validated by the kernel against our registration.
            let r = unsafe { ioctl_with_mut_ref(&self.fd, nr::UFFDIO_CONTINUE(), &mut c) };
            (errno_result(r), c.mapped)
        })
    }

    /// The install loop of [`Uffd::copy`] and [`Uffd::cont`]: `attempt(done)` installs
    /// `[addr + done, addr + len)` and returns the ioctl's result and the bytes it reports
    /// installed (the `copy`/`mapped` field: > 0 on a partial install, else 0 or -errno).
    fn install(
        &self,
        op: &'static str,
        addr: usize,
        len: usize,
        mut attempt: impl FnMut(usize) -> (io::Result<()>, i64),
    ) -> io::Result<Installed> {
        let mut done = 0usize;
        let mut stalled_since: Option<Instant> = None;
        let mut skipped = false;
        while done < len {
            let (res, installed) = attempt(done);
            let Err(err) = res else {
                break;
            };
            match err.raw_os_error() {
                // The first page of what is left is mapped already (by someone else): step
                // past it and install the rest, which would otherwise stay missing while the
                // caller marks it present. Its waiters are woken below.
                Some(libc::EEXIST) => {
                    done = (done + PAGE_SIZE).min(len);
                    skipped = true;
                    stalled_since = None;
                }
                // A partial install: go on with the rest.
                Some(libc::EAGAIN) if installed > 0 => {
                    done = done.saturating_add(installed as usize).min(len);
                    stalled_since = None;
                }
                // The address space is changing (mmap_changing: an mremap, fork, or a
                // MADV_DONTNEED whose event the handler has not read yet). That ends unless the
                // changing task waits for us, so a bounded wait turns a livelock into an error.
                Some(libc::EAGAIN) => {
                    let since = *stalled_since.get_or_insert_with(Instant::now);
                    let waited = since.elapsed();
                    if waited >= self.stall_limit {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            UffdError::Stalled {
                                op,
                                addr,
                                len,
                                done,
                                waited,
                            },
                        ));
                    }
                    // Give the task changing the address space the CPU, then back off.
                    if waited < Duration::from_millis(1) {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
                _ => return Err(err),
            }
        }
        if skipped {
            // A waiter on a page mapped by someone else may have queued before it was.
            self.wake(addr, len)?;
            return Ok(Installed::AlreadyMapped);
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
        // SAFETY: `page` is still a readable local array of PAGE_SIZE bytes.
        let r = unsafe { uffd.copy(base + 2 * crate::PAGE_SIZE, page.as_ptr(), crate::PAGE_SIZE) };
        assert_eq!(r.unwrap(), Installed::AlreadyMapped);
        // A run whose middle page is mapped already: the pages around it are still installed
        // (not left missing while the caller marks the run present).
        let run = [0x17u8; 3 * crate::PAGE_SIZE];
        // SAFETY: `run` is a readable local array of three pages; pages 1..4 are registered.
        let r = unsafe { uffd.copy(base + crate::PAGE_SIZE, run.as_ptr(), run.len()) };
        assert_eq!(r.unwrap(), Installed::AlreadyMapped);
        for (page, want) in [(1, 0x17u8), (2, 0x42), (3, 0x17)] {
            let at = base + page * crate::PAGE_SIZE;
            let mut resident = [0u8; 1];
            // SAFETY: mincore of one page of our mapping into a one-byte vector.
            let r = unsafe { libc::mincore(at as *mut _, crate::PAGE_SIZE, resident.as_mut_ptr()) };
            assert_eq!(r, 0);
            // Checked first so that a page left missing fails here instead of faulting.
            assert_eq!(resident[0] & 1, 1, "page {page} was left missing");
            // SAFETY: the page is mapped (resident, checked above): no fault.
            let b = unsafe { std::ptr::read_volatile(at as *const u8) };
            assert_eq!(b, want, "page {page}");
        }
        // SAFETY: unmapping the mapping made above; no references into it remain.
        unsafe { libc::munmap(p, len) };
    }

    /// `UFFD_FEATURE_EVENT_REMOVE`: MADV_DONTNEED on a registered range posts an event and
    /// waits until it is read, with the address space marked as changing meanwhile.
    const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
    /// `UFFD_EVENT_REMOVE`.
    const UFFD_EVENT_REMOVE: u8 = 0x15;

    #[test]
    fn eagain_while_the_address_space_changes_is_bounded() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let Ok(mut uffd) = Uffd::with_features(UFFD_FEATURE_EVENT_REMOVE) else {
            eprintln!("SKIP: userfaultfd with EVENT_REMOVE unavailable here");
            return;
        };
        assert_eq!(uffd.stall_limit(), DEFAULT_STALL_LIMIT);
        uffd.set_stall_limit(Duration::from_millis(50));
        let ps = crate::PAGE_SIZE;
        let mem = crate::memory::Mapping::new(2 * ps, None).unwrap();
        let base = mem.addr();
        uffd.register(base, 2 * ps, UffdMode::Missing).unwrap();
        // A thread drops page 1: the kernel marks the address space as changing and the
        // thread sleeps until the REMOVE event is read.
        let dropper = std::thread::spawn(move || {
            // SAFETY: MADV_DONTNEED on a page of a private anonymous mapping that outlives
            // this thread (joined below) and that nothing else references.
            unsafe { libc::madvise((base + ps) as *mut libc::c_void, ps, libc::MADV_DONTNEED) }
        });
        // Synchronise on the event being queued (after the kernel marked the change).
        let mut fds = [PollFd::new(uffd.fd.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::try_from(10_000).unwrap()).unwrap();
        assert_eq!(ready, 1, "no REMOVE event within 10 s");
        let page = [0x42u8; crate::PAGE_SIZE];
        // SAFETY: page is a readable local array of PAGE_SIZE bytes.
        let e = unsafe { uffd.copy(base, page.as_ptr(), ps) }.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        match e.get_ref().and_then(|e| e.downcast_ref::<UffdError>()) {
            Some(UffdError::Stalled {
                op: "UFFDIO_COPY",
                addr,
                len,
                done: 0,
                waited,
            }) => {
                assert_eq!((*addr, *len), (base, ps));
                assert!(*waited >= Duration::from_millis(50), "{waited:?}");
            }
            other => panic!("not a stall: {other:?} ({e})"),
        }
        // Reading the event lets the change finish; the same copy then succeeds.
        let mut msgs = [UffdMsg::default(); 4];
        assert_eq!(uffd.read_msgs(&mut msgs).unwrap(), 1);
        assert_eq!(msgs[0].event, UFFD_EVENT_REMOVE);
        assert_eq!(dropper.join().unwrap(), 0, "madvise failed");
        // SAFETY: `page` is still a readable local array of PAGE_SIZE bytes.
        let r = unsafe { uffd.copy(base, page.as_ptr(), ps) };
        assert_eq!(r.unwrap(), Installed::All);
        let mut out = [0u8; 8];
        mem.read(0, &mut out).unwrap();
        assert_eq!(out, [0x42; 8]);
    }
}
