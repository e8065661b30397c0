//! Owned mappings of guest memory (and of the handed-off memory fds).

use anyhow::{Context, Result};
use std::io;
use std::os::fd::RawFd;

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
