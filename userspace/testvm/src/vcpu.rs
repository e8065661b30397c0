//! A vCPU of a [`TestVm`](crate::TestVm): its entry point, one `KVM_RUN` decoded into an
//! [`Exit`] (ucalls included), and its binary statistics.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use kvm_bindings::kvm_regs;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::guest::{self, GuestFn, UcallRecord, UCALL_PORT};
use crate::image::describe_code;
use crate::vm::VmShared;

/// A decoded ucall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ucall {
    Sync(Vec<u64>),
    Done,
    /// A failed `guest_assert!`, already formatted with file:line, expression and values.
    Assert(String),
    /// An exception the guest did not expect.
    Unhandled {
        vector: u64,
        rip: u64,
        error_code: u64,
        cr2: u64,
    },
}

impl Ucall {
    /// What went wrong in the guest, for a failed assertion or an unexpected exception (with
    /// the exception's name, and where RIP is in the test binary); `None` for SYNC and DONE.
    pub fn failure(&self) -> Option<String> {
        match self {
            Ucall::Assert(msg) => Some(msg.clone()),
            Ucall::Unhandled {
                vector,
                rip,
                error_code,
                cr2,
            } => Some(format!(
                "unexpected guest exception {} ({vector}) at RIP {rip:#x}{}, error code {error_code:#x}, CR2 {cr2:#x}",
                vector_name(*vector),
                describe_code(*rip)
            )),
            Ucall::Sync(_) | Ucall::Done => None,
        }
    }
}

/// Why `KVM_RUN` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Ucall(Ucall),
    /// `KVM_EXIT_MEMORY_FAULT` (KVM_RUN returned -1/EFAULT).
    MemoryFault {
        flags: u64,
        gpa: u64,
        size: u64,
    },
    /// `KVM_EXIT_INTR` (KVM_RUN returned -1/EINTR maps to `Err(EINTR)` instead).
    Intr,
    /// Port output to a port other than the ucall port (e.g. a guest `rep outsb`).
    IoOut {
        port: u16,
        data: Vec<u8>,
    },
    /// Port input from a port other than the ucall port; `len` bytes of
    /// [`Vcpu::io_in_fill`] were supplied.
    IoIn {
        port: u16,
        len: usize,
    },
    Other(String),
}

/// Exception vector names, for messages.
pub fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        _ => "vector",
    }
}

/// One vCPU: owns its fd; `Send`, so tests run it on its own thread.
///
/// It shares ownership of the VM's memory (see [`TestVm`](crate::TestVm)): a vCPU fd keeps
/// the VM alive in the kernel, so the memory its memslots point at stays mapped until the vCPU
/// is dropped too, whatever happens to the `TestVm`. Its fd is therefore only lent out.
#[derive(Debug)]
pub struct Vcpu {
    pub id: u64,
    /// The byte returned for guest port input (see [`Exit::IoIn`]).
    pub io_in_fill: u8,
    stack_top: u64,
    // Declared before `vm`: the vCPU fd is closed before this vCPU's share of the memory goes.
    fd: VcpuFd,
    vm: Arc<VmShared>,
}

impl Vcpu {
    pub(crate) fn new(id: u64, fd: VcpuFd, vm: Arc<VmShared>, stack_top: u64) -> Self {
        Self {
            id,
            io_in_fill: 0,
            stack_top,
            fd,
            vm,
        }
    }

    /// The vCPU fd, for ioctls the framework does not wrap (registers, `KVM_GET_*`).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Points the vCPU at `entry` with up to four arguments and a fresh stack whose return
    /// address reports DONE.
    pub fn set_entry(&self, entry: GuestFn, args: &[u64]) -> Result<()> {
        ensure!(args.len() <= 4, "at most four guest arguments");
        // The return address sits at the top of the stack, as if `entry` had been called:
        // the SysV ABI wants RSP + 8 16-byte aligned at function entry (SSE spills use movaps).
        let rsp = self.stack_top - 8;
        {
            let a = self.vm.aspace();
            let gpa = a.gva_to_gpa(rsp, 8).context("stack not mapped")?;
            let (m, off) = a.gpa_to_host(gpa, 8).context("stack not in a slot")?;
            m.write_u64(off, guest::kvm_selftests_guest_return as *const () as u64);
        }
        let mut regs = kvm_regs {
            rflags: 0x2,
            rip: entry as *const () as u64,
            rsp,
            rbp: 0,
            ..Default::default()
        };
        let mut a = [0u64; 4];
        a[..args.len()].copy_from_slice(args);
        (regs.rdi, regs.rsi, regs.rdx, regs.rcx) = (a[0], a[1], a[2], a[3]);
        self.fd.set_regs(&regs).context("KVM_SET_REGS")?;
        Ok(())
    }

    /// One `KVM_RUN`. `Err` carries the errno of a failed KVM_RUN other than a memory fault
    /// exit (e.g. EINTR, EFAULT without KVM_EXIT_MEMORY_FAULT).
    pub fn run(&mut self) -> std::result::Result<Exit, kvm_ioctls::Error> {
        let fill = self.io_in_fill;
        let exit = match self.fd.run()? {
            VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) if port == UCALL_PORT => None,
            VcpuExit::IoOut(port, data) => {
                return Ok(Exit::IoOut {
                    port,
                    data: data.to_vec(),
                })
            }
            VcpuExit::IoIn(port, data) => {
                // Port input (e.g. a guest `rep insb`): supply `io_in_fill` bytes; KVM stores
                // them into guest memory when the vCPU is re-entered.
                data.fill(fill);
                return Ok(Exit::IoIn {
                    port,
                    len: data.len(),
                });
            }
            VcpuExit::MemoryFault { flags, gpa, size } => {
                return Ok(Exit::MemoryFault { flags, gpa, size })
            }
            VcpuExit::Intr => return Ok(Exit::Intr),
            other => Some(format!("{other:?}")),
        };
        if let Some(other) = exit {
            let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
            let detail = self.internal_error_detail();
            return Ok(Exit::Other(format!(
                "{other} at RIP {rip:#x}{}{detail}",
                describe_code(rip)
            )));
        }
        let rdi = self.fd.get_regs()?.rdi;
        Ok(Exit::Ucall(self.decode_ucall(rdi)))
    }

    /// For KVM_EXIT_INTERNAL_ERROR: the suberror and its data words (e.g. 1 = emulation
    /// failure, typically an instruction fetch from a GPA with no memslot).
    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            return String::new();
        }
        // SAFETY: exit_reason says the `internal` union member is the valid one.
        let ie = unsafe { run.__bindgen_anon_1.internal };
        let n = (ie.ndata as usize).min(ie.data.len());
        format!(" (suberror {}, data {:x?})", ie.suberror, &ie.data[..n])
    }

    /// The ucall whose record the guest passed at `gva` (its RDI at the ucall's port I/O), for
    /// a caller that had to read the registers itself (e.g. after a failed KVM_GET_REGS).
    pub fn decode_ucall(&self, gva: u64) -> Ucall {
        let a = self.vm.aspace();
        let mut raw = [0u8; std::mem::size_of::<UcallRecord>()];
        if let Err(e) = a.read_gva(gva, &mut raw) {
            return Ucall::Assert(format!("ucall with an unreadable record at {gva:#x}: {e}"));
        }
        // SAFETY: UcallRecord is repr(C) plain integers; any bit pattern is valid.
        let rec: UcallRecord = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        let args = rec.args[..(rec.nargs as usize).min(guest::UCALL_MAX_ARGS)].to_vec();
        match rec.cmd {
            guest::UCALL_SYNC => Ucall::Sync(args),
            guest::UCALL_DONE => Ucall::Done,
            guest::UCALL_ASSERT => {
                let file = a.read_str(rec.file_ptr, rec.file_len);
                let expr = a.read_str(rec.msg_ptr, rec.msg_len);
                let vals: Vec<String> = args.iter().map(|v| format!("{v:#x}")).collect();
                Ucall::Assert(format!(
                    "guest assertion failed at {file}:{}: `{expr}` (values: {})",
                    rec.line,
                    vals.join(", ")
                ))
            }
            guest::UCALL_UNHANDLED if args.len() >= 4 => Ucall::Unhandled {
                vector: args[0],
                rip: args[1],
                error_code: args[2],
                cr2: args[3],
            },
            guest::UCALL_UNHANDLED => Ucall::Assert(format!(
                "unhandled-exception ucall with {} args",
                args.len()
            )),
            c => Ucall::Assert(format!("unknown ucall command {c}")),
        }
    }

    /// Runs until the next ucall; guest assertion failures, unexpected exceptions, memory-fault
    /// exits and other exits become errors with context.
    pub fn run_ucall(&mut self) -> Result<Ucall> {
        let id = self.id;
        match self.run().with_context(|| format!("vCPU {id}: KVM_RUN"))? {
            Exit::Ucall(u) => match u.failure() {
                Some(why) => bail!("vCPU {id}: {why}"),
                None => Ok(u),
            },
            other => bail!("vCPU {id}: unexpected exit {other:?}"),
        }
    }

    /// Runs until the guest reports DONE.
    pub fn run_to_done(&mut self) -> Result<()> {
        match self.run_ucall()? {
            Ucall::Done => Ok(()),
            u => bail!("vCPU {}: expected DONE, got {u:?}", self.id),
        }
    }

    /// Runs until the next SYNC and returns its arguments.
    pub fn run_to_sync(&mut self) -> Result<Vec<u64>> {
        match self.run_ucall()? {
            Ucall::Sync(a) => Ok(a),
            u => bail!("vCPU {}: expected SYNC, got {u:?}", self.id),
        }
    }

    /// The raw `kvm_run` page.
    pub fn kvm_run(&mut self) -> &mut kvm_bindings::kvm_run {
        self.fd.get_kvm_run()
    }

    /// A vCPU binary statistic by name (e.g. `pf_taken`, `exits`), like the C tests'
    /// `vcpu_get_stat()`: `KVM_GET_STATS_FD`, then the header, the descriptors and the
    /// statistic's first value read with `pread`.
    pub fn stat(&self, name: &str) -> Result<u64> {
        // `KVM_GET_STATS_FD = _IO(KVMIO, 0xce)`.
        const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
        // SAFETY: an ioctl without an argument on our vCPU fd; returns a new fd or -1.
        let raw = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_GET_STATS_FD, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("KVM_GET_STATS_FD");
        }
        // SAFETY: a fresh fd returned by KVM, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let pread = |off: u64, len: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len];
            // SAFETY: reads at most `len` bytes into `buf`, which has `len` bytes.
            let n = unsafe {
                libc::pread(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    len,
                    off as libc::off_t,
                )
            };
            ensure!(
                n == len as isize,
                "short read of the stats fd ({n} of {len} bytes at {off:#x}): {}",
                std::io::Error::last_os_error()
            );
            Ok(buf)
        };
        let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        // struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset,
        // data_offset (u32 each).
        let h = pread(0, 24)?;
        let (name_size, num_desc) = (u32_at(&h, 4) as usize, u32_at(&h, 8) as usize);
        let (desc_offset, data_offset) = (u32_at(&h, 16) as u64, u32_at(&h, 20) as u64);
        // struct kvm_stats_desc: flags u32, exponent s16, size u16, offset u32, bucket_size
        // u32, then the name (name_size bytes, NUL terminated).
        let stride = 16 + name_size;
        let descs = pread(desc_offset, stride * num_desc)?;
        for d in descs.chunks_exact(stride) {
            let n = &d[16..];
            let n = &n[..n.iter().position(|&c| c == 0).unwrap_or(n.len())];
            if n == name.as_bytes() {
                let offset = u32_at(d, 8) as u64;
                let v = pread(data_offset + offset, 8)?;
                return Ok(u64::from_ne_bytes(v[..8].try_into().unwrap()));
            }
        }
        bail!("vCPU {}: no binary statistic named {name:?}", self.id)
    }
}
