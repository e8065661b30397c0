//! The vCPU state a migration carries: what the writer guest (64-bit, no interrupts, no
//! devices) depends on.
//!
//! Carried: general registers, special registers (segments, control registers, EFER,
//! descriptor tables), the XSAVE area (x87/SSE/AVX state: host-compiled guest code may use
//! them), XCR0, pending events (`KVM_GET_VCPU_EVENTS`: exception/interrupt shadow state), and
//! the MSRs of [`MSRS`]. Left out, and why: the LAPIC and MP state (kvm-testvm VMs have no
//! in-kernel irqchip), the TSC deadline / kvmclock (no timers: the guest reads no clock),
//! debug registers (unused), nested state (no nesting), CPUID (both sides set the host's
//! supported CPUID: same host type is required, as for any migration without CPU models).

use kvm_bindings::{
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;

/// MSRs saved and restored: the syscall/sysenter and segment-base MSRs a 64-bit guest may
/// have set, and PAT. (EFER is in `sregs`.)
pub const MSRS: [u32; 9] = [
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// Plain data copied byte for byte.
///
/// # Safety
/// Implementors are `repr(C)` structs of integers with no implicit padding (every byte is
/// initialised) for which every bit pattern, including all zeros, is valid.
unsafe trait Pod: Sized {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: per the trait contract every byte of `Self` is initialised.
        unsafe { std::slice::from_raw_parts(self as *const Self as *const u8, size_of::<Self>()) }
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: exactly size_of::<Self>() bytes are read, unaligned, and every bit pattern
        // is a valid `Self` per the trait contract.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const Self) })
    }
}
// SAFETY: these kvm-bindings structs are repr(C) integers with explicit padding fields (the
// sizes are pinned below, which an implicit padding byte would change).
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above (`extra` is a zero-sized flexible array marker).
unsafe impl Pod for kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}
const _: () = assert!(size_of::<kvm_regs>() == 18 * 8);
const _: () = assert!(size_of::<kvm_sregs>() == 312);
const _: () = assert!(size_of::<kvm_xsave>() == 4096);
const _: () = assert!(size_of::<kvm_xcrs>() == 8 + 16 * 16 + 16 * 8);
const _: () = assert!(size_of::<kvm_vcpu_events>() == 64);

/// One vCPU's state.
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    events: kvm_vcpu_events,
    msrs: Vec<(u32, u64)>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("msrs", &self.msrs.len())
            .finish()
    }
}

impl PartialEq for VcpuState {
    fn eq(&self, o: &Self) -> bool {
        self.regs.as_bytes() == o.regs.as_bytes()
            && self.sregs.as_bytes() == o.sregs.as_bytes()
            && self.xsave.as_bytes() == o.xsave.as_bytes()
            && self.xcrs.as_bytes() == o.xcrs.as_bytes()
            && self.events.as_bytes() == o.events.as_bytes()
            && self.msrs == o.msrs
    }
}

/// Saving, restoring or decoding a vCPU state failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// An ioctl failed.
    #[error("{what}: {source}")]
    Ioctl {
        /// Which.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A state from the wire that does not parse.
    #[error("malformed vCPU state: {0}")]
    Malformed(String),
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuStateError> {
    r.map_err(|source| VcpuStateError::Ioctl { what, source })
}

const MAX_MSRS: usize = 64;

impl VcpuState {
    /// The state of a vCPU that is out of KVM_RUN.
    pub fn save(fd: &VcpuFd) -> Result<Self, VcpuStateError> {
        let entries: Vec<kvm_msr_entry> = MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| VcpuStateError::Malformed(format!("MSR list: {e:?}")))?;
        // KVM stops at the first MSR it cannot read: keep those it read.
        let n = ioctl("KVM_GET_MSRS", fd.get_msrs(&mut msrs))?;
        Ok(Self {
            regs: ioctl("KVM_GET_REGS", fd.get_regs())?,
            sregs: ioctl("KVM_GET_SREGS", fd.get_sregs())?,
            xsave: ioctl("KVM_GET_XSAVE", fd.get_xsave())?,
            xcrs: ioctl("KVM_GET_XCRS", fd.get_xcrs())?,
            events: ioctl("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?,
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
        })
    }

    /// Loads the state into a vCPU of an identically built VM (before its first KVM_RUN).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        // sregs first (CR4.OSXSAVE gates XCR0), then XCR0 before the XSAVE area it validates.
        ioctl("KVM_SET_SREGS", fd.set_sregs(&self.sregs))?;
        ioctl("KVM_SET_XCRS", fd.set_xcrs(&self.xcrs))?;
        // SAFETY: `xsave` is a whole legacy-size kvm_xsave (no FAM beyond 4096 bytes is read:
        // the VM was not switched to KVM_GET_XSAVE2 sizes), saved by KVM_GET_XSAVE.
        ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave(&self.xsave) })?;
        ioctl("KVM_SET_REGS", fd.set_regs(&self.regs))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| VcpuStateError::Malformed(format!("MSR list: {e:?}")))?;
        let n = ioctl("KVM_SET_MSRS", fd.set_msrs(&msrs))?;
        if n != entries.len() {
            return Err(VcpuStateError::Malformed(format!(
                "KVM_SET_MSRS set {n} of {} MSRs (MSR {:#x} refused)",
                entries.len(),
                entries[n].index
            )));
        }
        ioctl("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&self.events))?;
        Ok(())
    }

    /// The instruction pointer (for reports).
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.regs.as_bytes());
        out.extend_from_slice(self.sregs.as_bytes());
        out.extend_from_slice(self.xsave.as_bytes());
        out.extend_from_slice(self.xcrs.as_bytes());
        out.extend_from_slice(self.events.as_bytes());
        out.extend_from_slice(&(self.msrs.len() as u32).to_le_bytes());
        for (i, d) in &self.msrs {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&d.to_le_bytes());
        }
    }

    /// Parses one state off the front of `b`; returns it and the rest.
    pub fn decode(b: &[u8]) -> Result<(Self, &[u8]), VcpuStateError> {
        fn take<T: Pod>(b: &mut &[u8], what: &str) -> Result<T, VcpuStateError> {
            let n = size_of::<T>();
            if b.len() < n {
                return Err(VcpuStateError::Malformed(format!("{what} truncated")));
            }
            let (a, rest) = b.split_at(n);
            *b = rest;
            T::from_bytes(a).ok_or_else(|| VcpuStateError::Malformed(what.into()))
        }
        let mut b = b;
        let regs = take::<kvm_regs>(&mut b, "regs")?;
        let sregs = take::<kvm_sregs>(&mut b, "sregs")?;
        let xsave = take::<kvm_xsave>(&mut b, "xsave")?;
        let xcrs = take::<kvm_xcrs>(&mut b, "xcrs")?;
        let events = take::<kvm_vcpu_events>(&mut b, "vcpu events")?;
        if b.len() < 4 {
            return Err(VcpuStateError::Malformed("MSR count truncated".into()));
        }
        let n = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
        b = &b[4..];
        if n > MAX_MSRS || b.len() < n * 12 {
            return Err(VcpuStateError::Malformed(format!("{n} MSRs")));
        }
        let msrs = (0..n)
            .map(|k| {
                let e = &b[k * 12..k * 12 + 12];
                (
                    u32::from_le_bytes(e[..4].try_into().expect("4 bytes")),
                    u64::from_le_bytes(e[4..].try_into().expect("8 bytes")),
                )
            })
            .collect();
        let state = Self {
            regs,
            sregs,
            xsave,
            xcrs,
            events,
            msrs,
        };
        Ok((state, &b[n * 12..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_the_wire_and_a_vcpu_round_trip() {
        if std::fs::metadata("/dev/kvm").is_err() {
            eprintln!("SKIP: no /dev/kvm");
            return;
        }
        let mut vm = kvm_testvm::TestVm::new().unwrap();
        let v = vm.add_vcpu().unwrap();
        let mut regs = v.fd().get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0xabc0;
        v.fd().set_regs(&regs).unwrap();
        let s = VcpuState::save(v.fd()).unwrap();
        assert_eq!(s.rip(), 0xabc0);
        let mut buf = Vec::new();
        s.encode(&mut buf);
        buf.push(0xee);
        let (d, rest) = VcpuState::decode(&buf).unwrap();
        assert_eq!(rest, &[0xee]);
        assert_eq!(d, s);
        // Into another vCPU: it reads back the same.
        let w = vm.add_vcpu().unwrap();
        d.restore(w.fd()).unwrap();
        let back = VcpuState::save(w.fd()).unwrap();
        assert_eq!(back.regs.rax, 0x1234_5678);
        assert_eq!(back.sregs.as_bytes(), s.sregs.as_bytes());
        // Truncated or with a bogus MSR count: errors.
        assert!(VcpuState::decode(&buf[..100]).is_err());
        let mut bogus = buf.clone();
        let at = buf.len() - 1 - 4 - 12 * s.msrs.len();
        bogus[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(VcpuState::decode(&bogus).is_err());
    }
}
