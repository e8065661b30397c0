//! Host mappings of guest memory: anonymous (optionally THP), shmem (memfd) and guest_memfd
//! backings.
//!
//! Mirrors the backing-source part of kvm selftests' `lib/kvm_util.c`
//! (`vm_mem_backing_src_type`): a region is one memslot plus the host mapping KVM uses as its
//! `userspace_addr`, and, for shared backings, the file descriptor (and an optional second
//! "alias" mapping, which userfaultfd MINOR mode fills behind the guest's back).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

/// The x86_64 PMD (transparent huge page) size.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Whether anonymous transparent huge pages can be used here: THP is built in and not
/// disabled (`always`, or `madvise` with [`Backing::AnonymousThp`]'s `MADV_HUGEPAGE`).
pub fn thp_available() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| !s.contains("[never]"))
        .unwrap_or(false)
}

/// Host page size; KVM requires memslots and guest_memfd sizes to be multiples of it.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(r).unwrap_or(4096)
}

/// What backs a memory region on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`, like the C tests' `VM_MEM_SRC_ANONYMOUS`.
    Anonymous,
    /// Anonymous memory aligned to 2 MiB with `MADV_HUGEPAGE`, like `VM_MEM_SRC_ANONYMOUS_THP`:
    /// each 2 MiB of it is backed by one transparent huge page once touched (when THP is
    /// available). Sizes must be multiples of 2 MiB.
    AnonymousThp,
    /// A memfd mapped `MAP_SHARED`, like `VM_MEM_SRC_SHMEM`; has an alias mapping.
    Shmem,
    /// A guest_memfd created with these `GUEST_MEMFD_FLAG_*` flags; must include `MMAP` so
    /// that the host can map it (the mapping is the memslot's `userspace_addr`, since KVM's own
    /// accesses to the slot go through it).
    GuestMemfd { flags: u64 },
}

impl std::str::FromStr for Backing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "anonymous" | "anon" => Backing::Anonymous,
            "anonymous_thp" | "thp" => Backing::AnonymousThp,
            "shmem" | "shared" => Backing::Shmem,
            "guest_memfd" | "gmem" => Backing::GuestMemfd {
                flags: crate::uapi::GUEST_MEMFD_FLAG_MMAP
                    | crate::uapi::GUEST_MEMFD_FLAG_INIT_SHARED,
            },
            _ => bail!(
                "unknown backing {s:?}: expected anonymous, anonymous_thp, shmem or guest_memfd"
            ),
        })
    }
}

/// An owned `mmap` of `len` bytes, unmapped on drop.
///
/// Guest memory is shared with running vCPUs (and with other processes for shared backings),
/// so it is never exposed as a Rust slice: all host accesses go through raw copies, exactly like
/// two processes sharing memory.
#[derive(Debug)]
pub struct HostMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this object; all accesses are raw pointer
// copies whose races with guests are those of any shared memory, not Rust aliasing violations.
unsafe impl Send for HostMapping {}
// SAFETY: as above; `&HostMapping` only hands out raw pointers and copies.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Anonymous private memory.
    pub fn anonymous(len: usize) -> Result<Self> {
        Self::map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    }

    /// Anonymous private memory at a 2 MiB-aligned address with `MADV_HUGEPAGE`; `len` must be
    /// a multiple of 2 MiB.
    pub fn anonymous_thp(len: usize) -> Result<Self> {
        const HUGE: usize = HUGE_PAGE_SIZE as usize;
        if len == 0 || !len.is_multiple_of(HUGE) {
            bail!("THP-backed mapping of {len:#x} bytes: not a multiple of 2 MiB");
        }
        // Over-allocate by 2 MiB, then trim to the aligned part.
        let big = std::mem::ManuallyDrop::new(Self::anonymous(len + HUGE)?);
        let start = big.addr() as usize;
        let aligned = start.next_multiple_of(HUGE);
        let end = start + len + HUGE;
        // SAFETY: both ranges lie inside the mapping `big` owns (which is never dropped: it is
        // replaced by the aligned mapping below), and nothing refers to them.
        unsafe {
            if aligned > start {
                libc::munmap(start as *mut libc::c_void, aligned - start);
            }
            if end > aligned + len {
                libc::munmap((aligned + len) as *mut libc::c_void, end - (aligned + len));
            }
        }
        let m = Self {
            ptr: NonNull::new(aligned as *mut u8).expect("mmap returned NULL"),
            len,
        };
        // SAFETY: advice on the range `m` owns; no memory is accessed.
        if unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("madvise(MADV_HUGEPAGE) on {len:#x} bytes"));
        }
        Ok(m)
    }

    /// Bytes of this mapping backed by anonymous transparent huge pages: the `AnonHugePages`
    /// of the VMAs in `/proc/self/smaps` that lie within it.
    pub fn anon_huge_bytes(&self) -> Result<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").context("read /proc/self/smaps")?;
        let (lo, hi) = (self.addr(), self.addr() + self.len as u64);
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = a >= lo && b <= hi;
                    continue;
                }
            }
            if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                if inside {
                    let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    total += kb * 1024;
                }
            }
        }
        Ok(total)
    }

    /// `MAP_SHARED` mapping of `fd` at `offset`.
    pub fn shared(fd: RawFd, len: usize, offset: u64) -> Result<Self> {
        Self::map(len, libc::MAP_SHARED, fd, offset)
    }

    /// Like `mmap(2)`; returns the errno on failure so tests can assert on it.
    pub fn try_map(
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
        fd: RawFd,
        offset: u64,
    ) -> std::result::Result<Self, nix::errno::Errno> {
        let off = libc::off_t::try_from(offset).map_err(|_| nix::errno::Errno::EOVERFLOW)?;
        // SAFETY: a fresh mapping (no MAP_FIXED) cannot alias existing Rust objects.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(nix::errno::Errno::last());
        }
        Ok(Self {
            ptr: NonNull::new(p.cast()).expect("mmap returned NULL"),
            len,
        })
    }

    fn map(len: usize, flags: libc::c_int, fd: RawFd, offset: u64) -> Result<Self> {
        Self::try_map(len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, offset).with_context(
            || format!("mmap({len:#x} bytes, flags {flags:#x}, fd {fd}, offset {offset:#x})"),
        )
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "access [{offset:#x}, +{len:#x}) outside a {:#x}-byte mapping",
            self.len
        );
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: bounds checked above; the mapping is live for &self; `data` is a separate
        // Rust allocation, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        }
    }

    /// Copies from the mapping at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        self.check(offset, out.len());
        // SAFETY: bounds checked above; see `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        }
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        self.check(offset, len);
        // SAFETY: bounds checked above.
        unsafe { std::ptr::write_bytes(self.as_ptr().add(offset), byte, len) }
    }

    pub fn read_u64(&self, offset: usize) -> u64 {
        self.check(offset, 8);
        // SAFETY: bounds checked; volatile because a guest may write concurrently.
        unsafe { std::ptr::read_volatile(self.as_ptr().add(offset).cast::<u64>()) }
    }

    pub fn write_u64(&self, offset: usize, v: u64) {
        self.check(offset, 8);
        // SAFETY: bounds checked; volatile because a guest may read concurrently.
        unsafe { std::ptr::write_volatile(self.as_ptr().add(offset).cast::<u64>(), v) }
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        self.check(offset, 1);
        // SAFETY: bounds checked.
        unsafe { std::ptr::read_volatile(self.as_ptr().add(offset)) }
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing refers to it after drop.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A range of guest memory as the host sees it: where the guest finds it, and raw accessors
/// for the host side. It shares ownership of the mapping it lies in, so its accesses never
/// reach unmapped memory, whatever happened to the VM. Made by
/// [`TestVm::alloc_guest_mem`](crate::TestVm::alloc_guest_mem).
#[derive(Debug, Clone)]
pub struct GuestMem {
    gva: u64,
    gpa: u64,
    mapping: Arc<HostMapping>,
    offset: usize,
    len: usize,
}

impl GuestMem {
    pub(crate) fn new(
        gva: u64,
        gpa: u64,
        mapping: Arc<HostMapping>,
        offset: usize,
        len: usize,
    ) -> Self {
        mapping.check(offset, len);
        Self {
            gva,
            gpa,
            mapping,
            offset,
            len,
        }
    }

    /// The guest virtual address of the first byte.
    pub fn gva(&self) -> u64 {
        self.gva
    }

    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, offset: usize, len: usize) -> usize {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "access [{offset:#x}, +{len:#x}) outside {:#x} bytes of guest memory at {:#x}",
            self.len,
            self.gva
        );
        self.offset + offset
    }

    /// A volatile load: the guest may be writing it concurrently.
    pub fn read_u64(&self, offset: usize) -> u64 {
        self.mapping.read_u64(self.at(offset, 8))
    }

    /// A volatile store: the guest may be reading it concurrently.
    pub fn write_u64(&self, offset: usize, v: u64) {
        self.mapping.write_u64(self.at(offset, 8), v)
    }

    pub fn write(&self, offset: usize, data: &[u8]) {
        self.mapping.write(self.at(offset, data.len()), data)
    }

    pub fn read(&self, offset: usize, out: &mut [u8]) {
        self.mapping.read(self.at(offset, out.len()), out)
    }
}

/// Creates a memfd of `len` bytes (the shmem backing).
pub fn memfd(name: &str, len: usize) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).context("memfd name")?;
    // SAFETY: cname is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fd is valid.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error()).context("ftruncate(memfd)");
    }
    Ok(fd)
}

/// `fallocate(2)` returning the errno, for tests that assert on failures.
pub fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> nix::Result<()> {
    // SAFETY: fallocate has no memory-safety preconditions.
    let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}
