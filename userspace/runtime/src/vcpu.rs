//! What a VMM's vCPU loop calls on a USERFAULT exit.
//!
//! With `KVM_MEMORY_ATTRIBUTE_USERFAULT` and no `VCPU_FAULTS` fd, an access to a missing page
//! makes `KVM_RUN` return `KVM_EXIT_MEMORY_FAULT` with `KVM_MEMORY_EXIT_FLAG_USERFAULT`. The
//! VMM's loop (Firecracker's `Vcpu::run_emulation`, Cloud Hypervisor's `Vcpu::run`) gains one
//! arm:
//!
//! ```ignore
//! VcpuExit::MemoryFault { flags, gpa, size } => match faults.on_memory_fault(flags, gpa, size)? {
//!     FaultAction::Retry => continue,          // the page is present: KVM_RUN again
//!     FaultAction::NotUserfault => /* a private/shared conversion, the VMM's business */,
//! }
//! ```
//!
//! The call fills every missing page of the exit's range from the source and makes it
//! present before it returns (waiting, if another thread is filling one of them, until that
//! thread is done), so re-entering cannot exit again for the same pages.

use crate::fault::Access;
use crate::handler::{Handler, HandlerError, Scratch, MAX_EXIT_SIZE};
use crate::uapi::KVM_MEMORY_EXIT_FLAG_USERFAULT;
use crate::PAGE_SIZE;
use std::sync::Arc;
use std::time::Instant;

/// What the vCPU loop does after [`VcpuFaults::on_memory_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Every page of the exit is present: enter the guest again.
    Retry,
    /// The exit is not a USERFAULT exit (no `KVM_MEMORY_EXIT_FLAG_USERFAULT`): the runtime did
    /// nothing; the VMM handles it as it would without the runtime.
    NotUserfault,
}

/// The per-vCPU side of the runtime: one per vCPU thread (its buffers make the fault path
/// allocation-free), created with [`crate::runtime::Runtime::vcpu_faults`] or
/// [`VcpuFaults::new`].
pub struct VcpuFaults {
    handler: Arc<Handler>,
    scratch: Scratch,
    gpas: Vec<u64>,
}

impl VcpuFaults {
    /// The per-vCPU state for `handler`.
    pub fn new(handler: Arc<Handler>) -> Self {
        Self {
            handler,
            scratch: Scratch::default(),
            gpas: Vec::new(),
        }
    }

    /// Handles a `KVM_EXIT_MEMORY_FAULT` (`flags`, `gpa`, `size` as `kvm_run.memory_fault`
    /// has them): for a USERFAULT exit, fills and installs every missing page of
    /// `[gpa, gpa + size)` and returns [`FaultAction::Retry`] once they are all present.
    /// A size of 0 means the page of `gpa`.
    pub fn on_memory_fault(
        &mut self,
        flags: u64,
        gpa: u64,
        size: u64,
    ) -> Result<FaultAction, HandlerError> {
        if flags & KVM_MEMORY_EXIT_FLAG_USERFAULT == 0 {
            return Ok(FaultAction::NotUserfault);
        }
        let access = Access::from_exit_flags(flags);
        let _span = tracing::debug_span!("vcpu_fault", gpa, size, ?access).entered();
        let t = Instant::now();
        let page = PAGE_SIZE as u64;
        let end = gpa
            .checked_add(size.max(1))
            .filter(|_| size <= MAX_EXIT_SIZE)
            .and_then(|e| e.checked_next_multiple_of(page))
            .ok_or(HandlerError::BadExit { gpa, size })?;
        self.gpas.clear();
        self.gpas
            .extend((gpa / page * page..end).step_by(PAGE_SIZE));
        self.handler
            .handle_gpas(&self.gpas, t, true, &mut self.scratch)
            .inspect_err(
                |e| tracing::warn!(gpa, size, ?access, error = %e, "USERFAULT exit not resolved"),
            )?;
        Ok(FaultAction::Retry)
    }

    /// The handler this vCPU's faults go to.
    pub fn handler(&self) -> &Arc<Handler> {
        &self.handler
    }
}
