//! The demo VMM's VM: kvm-testvm's [`TestVm`](kvm_testvm::TestVm) (named [`Vm`] here), with
//! the workload's data region in memslot [`DATA_SLOT`].
//!
//! The VM owns its memory together with its fd (see kvm-testvm's `vm` module): the fd is lent
//! (`vm.fd()`), other threads get a [`VmHandle`] that keeps the memory mapped too, and a fault
//! handler that fills a region through raw pointers holds a clone of the [`Region`], which
//! keeps that region's mappings alive for as long as the handler may write to them.

use anyhow::{bail, Result};
use kvm_userfault::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

pub use kvm_testvm::{Backing, Region, TestVm as Vm, VmHandle, VmOptions};

/// The memslot of the data region (slot 0 is kvm-testvm's system memory).
pub const DATA_SLOT: u32 = 1;

/// A guest_memfd the host can map, shared from creation: KVM's own accesses to the slot and
/// the runtime's fills go through its mapping, which is the memslot's `userspace_addr`.
pub const SHARED_GUEST_MEMFD: Backing = Backing::GuestMemfd {
    flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
};

/// Adds the data region, `size` bytes at `gpa` in [`DATA_SLOT`], identity-mapped for the guest
/// (with 2 MiB guest pages where `gpa` and the size allow), and returns a clone of it.
pub fn add_data_region(vm: &mut Vm, gpa: u64, size: u64, backing: Backing) -> Result<Region> {
    if let Backing::GuestMemfd { flags } = backing {
        let caps = vm.probe();
        if flags & GUEST_MEMFD_FLAG_MMAP != 0 && !caps.mmap_guest_memfd() {
            bail!(
                "KVM lacks mmap-able shared guest_memfd (KVM_CAP_GUEST_MEMFD_FLAGS = {:#x})",
                caps.guest_memfd_flags
            );
        }
    }
    let system_end = vm.region(0).size;
    if gpa < system_end {
        bail!("the data region at {gpa:#x} overlaps the system memory (up to {system_end:#x})");
    }
    Ok(vm.add_mapped_region(DATA_SLOT, gpa, size, backing)?.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_userfault::ioctls::UserfaultError;

    #[test]
    fn data_regions_in_every_backing_on_host_kvm() {
        if std::fs::metadata("/dev/kvm").is_err() {
            eprintln!("SKIP: no /dev/kvm");
            return;
        }
        let caps = Vm::new().unwrap().probe();
        assert!(caps.user_memory2);
        let mut vm = Vm::new().unwrap();
        assert!(
            add_data_region(&mut vm, 0, 2 << 20, Backing::Anonymous).is_err(),
            "over the system memory"
        );
        let r = add_data_region(&mut vm, 1 << 30, 2 << 20, Backing::Shmem).unwrap();
        // The alias reaches the same page cache as the memslot's mapping.
        r.alias.as_ref().unwrap().write(4096, b"hello");
        let mut out = [0u8; 5];
        r.mapping.read(4096, &mut out);
        assert_eq!(&out, b"hello");
        assert_eq!(vm.region(DATA_SLOT).hva(1 << 30), r.mapping.addr());
        if caps.mmap_guest_memfd() {
            let mut vm = Vm::new().unwrap();
            let g = add_data_region(&mut vm, 1 << 30, 2 << 20, SHARED_GUEST_MEMFD).unwrap();
            assert!(g.fd.is_some());
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
