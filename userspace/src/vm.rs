//! VM setup on kvm-ioctls: memslots backed by anonymous memory, shmem (memfd) or guest_memfd
//! (mmap-able, `KVM_SET_USER_MEMORY_REGION2` with `userspace_addr` = the guest_memfd mapping,
//! since KVM's own emulated accesses go through it), vCPUs, capability probing, and the
//! series' VM ioctls (USERFAULT attribute, userfault fd).

use crate::uapi::*;
use anyhow::{bail, Context, Result};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// The one-line message for kernels without the series.
pub const NO_USERFAULT_MSG: &str =
    "kernel lacks the KVM userfault series (KVM_CAP_USERFAULT); build it with `cargo xtask kernel`";

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
    /// `KVM_CAP_USERFAULT` value: accepted `KVM_USERFAULT_FD_FLAG_*` (0 = no series).
    pub userfault: u64,
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
            userfault: raw(KVM_CAP_USERFAULT),
        }
    }

    /// Fails with [`NO_USERFAULT_MSG`] unless the series is present; returns the fd flags.
    pub fn require_userfault(&self) -> Result<u64> {
        let caps = self.probe();
        if caps.userfault == 0 || caps.memory_attributes & KVM_MEMORY_ATTRIBUTE_USERFAULT == 0 {
            bail!(NO_USERFAULT_MSG);
        }
        Ok(caps.userfault)
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

    /// Creates the VM's userfault fd (`KVM_CREATE_USERFAULT_FD`).
    pub fn create_userfault_fd(&self, flags: u64) -> Result<UserfaultFd> {
        let arg = kvm_create_userfault_fd {
            flags,
            reserved: [0; 7],
        };
        // SAFETY: the ioctl reads a kvm_create_userfault_fd we own and returns a new fd.
        let raw = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                KVM_CREATE_USERFAULT_FD as libc::c_ulong,
                &arg,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("KVM_CREATE_USERFAULT_FD flags {flags:#x}"));
        }
        // SAFETY: a fresh fd returned by KVM, owned by nobody else.
        Ok(UserfaultFd(unsafe { OwnedFd::from_raw_fd(raw) }))
    }
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

/// The VM's userfault fd: read records from it, resolve ranges through it.
#[derive(Debug)]
pub struct UserfaultFd(pub OwnedFd);

impl UserfaultFd {
    /// `KVM_USERFAULT_RESOLVE`: clears USERFAULT on the range and wakes its waiters.
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
                self.0.as_raw_fd(),
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
        self.0.as_raw_fd()
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
        if caps.userfault == 0 {
            let e = vm.require_userfault().unwrap_err().to_string();
            assert!(e.contains("cargo xtask kernel"), "{e}");
        }
    }
}
