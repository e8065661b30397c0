//! The demo VMM's VM: memslots backed by anonymous memory, shmem (memfd) or guest_memfd
//! (mmap-able, `KVM_SET_USER_MEMORY_REGION2` with `userspace_addr` = the guest_memfd mapping,
//! since KVM's own emulated accesses go through it) and vCPUs, on kvm-ioctls.

use anyhow::{bail, Context, Result};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region2, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use kvm_userfault::ioctls::{
    self, create_userfault_fd, set_userfault, Capabilities, UserfaultError, UserfaultFd,
};
use kvm_userfault::memory::Mapping;
use kvm_userfault::uapi::*;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

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
            (Some(fd), Backing::Shmem) => {
                Ok(Mapping::new(self.size as usize, Some(fd.as_raw_fd()))?)
            }
            _ => bail!("only shmem slots can have an alias mapping"),
        }
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
        ioctls::probe(&self.fd)
    }

    /// Fails unless the kernel has the series; see [`ioctls::require_userfault`].
    pub fn require_userfault(&self) -> Result<u64, UserfaultError> {
        ioctls::require_userfault(&self.fd)
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
}
