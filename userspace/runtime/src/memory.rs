//! Owned mappings of guest memory (and of the handed-off memory fds).

use std::io;
use std::os::fd::RawFd;

/// Why a mapping could not be made or accessed.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// `mmap` failed.
    #[error("mmap of {len:#x} bytes at offset {offset:#x} of {}", fd_name(*.fd))]
    Mmap {
        /// Bytes asked for.
        len: usize,
        /// The file mapped (None: anonymous memory).
        fd: Option<RawFd>,
        /// Offset into the file.
        offset: i64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A read or write that does not fit in the mapping.
    #[error("{op} of {len} bytes at {offset:#x} past a {mapping_len:#x}-byte mapping")]
    OutOfBounds {
        /// "read" or "write".
        op: &'static str,
        /// Offset into the mapping.
        offset: usize,
        /// Bytes.
        len: usize,
        /// The mapping's length.
        mapping_len: usize,
    },
}

fn fd_name(fd: Option<RawFd>) -> String {
    fd.map_or_else(|| "anonymous memory".to_string(), |fd| format!("fd {fd}"))
}

/// An mmap()ed range, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes: anonymous when `fd` is None, else shared on `fd` at offset 0.
    pub fn new(len: usize, fd: Option<RawFd>) -> Result<Self, MappingError> {
        let (flags, raw_fd) = match fd {
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
                raw_fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MappingError::Mmap {
                len,
                fd,
                offset: 0,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    /// Maps `len` bytes of `fd` shared, starting at `offset` (page aligned).
    pub fn with_offset(len: usize, fd: RawFd, offset: i64) -> Result<Self, MappingError> {
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
            return Err(MappingError::Mmap {
                len,
                fd: Some(fd),
                offset,
                source: io::Error::last_os_error(),
            });
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

    fn check(&self, op: &'static str, offset: usize, len: usize) -> Result<(), MappingError> {
        if offset.checked_add(len).is_some_and(|e| e <= self.len) {
            return Ok(());
        }
        Err(MappingError::OutOfBounds {
            op,
            offset,
            len,
            mapping_len: self.len,
        })
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), MappingError> {
        self.check("write", offset, data.len())?;
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
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), MappingError> {
        self.check("read", offset, out.len())?;
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
