//! The test process's own loaded image: the segments the VM copies into guest memory (guest
//! code is ordinary code of the test binary, see `guest.rs`), and naming a guest RIP, which is
//! a host code address, in messages.

use anyhow::{ensure, Result};

/// " (in OBJECT: SYMBOL+off)" for a guest RIP, which is a host code address (see guest.rs).
/// Guest code that strays into libc (e.g. a compiler-generated `memcpy` call, whose host
/// variant may use instructions the guest CPU lacks) is then obvious from the message.
pub fn describe_code(rip: u64) -> String {
    let mut info: libc::Dl_info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only inspects the loader's tables; `info` is a valid out-parameter.
    if unsafe { libc::dladdr(rip as *const libc::c_void, &mut info) } == 0 {
        // Static binaries have no dladdr; fall back to the main executable's load range.
        return match main_executable() {
            Some((base, start, end)) if (start..end).contains(&rip) => {
                let off = rip - base;
                let exe = std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                format!(
                    " (in the test executable {exe}+{off:#x}; try addr2line -fCe {exe} {off:#x})"
                )
            }
            _ => " (outside the test executable)".to_string(),
        };
    }
    let cstr = |p: *const libc::c_char| {
        if p.is_null() {
            "?".to_string()
        } else {
            // SAFETY: dladdr returns NUL-terminated strings owned by the loader.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let file = cstr(info.dli_fname);
    if info.dli_sname.is_null() {
        // Internal symbols are not in the dynamic table: give the offset for addr2line.
        let off = rip.wrapping_sub(info.dli_fbase as u64);
        return format!(" (in {file}+{off:#x}; try addr2line -fCe {file} {off:#x})");
    }
    let off = rip.wrapping_sub(info.dli_saddr as u64);
    format!(" (in {file}: {}+{off:#x})", cstr(info.dli_sname))
}

/// (load bias, start, end) of the main executable's loaded segments: the first object
/// `dl_iterate_phdr` reports.
pub fn main_executable() -> Option<(u64, u64, u64)> {
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: valid for the callback's duration; `data` is the Option we passed.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Option<(u64, u64, u64)>)) };
        let (mut lo, mut hi) = (u64::MAX, 0);
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type == libc::PT_LOAD {
                lo = lo.min(info.dlpi_addr + ph.p_vaddr);
                hi = hi.max(info.dlpi_addr + ph.p_vaddr + ph.p_memsz);
            }
        }
        *out = Some((info.dlpi_addr, lo, hi));
        1 // stop after the first object, the executable
    }
    let mut out: Option<(u64, u64, u64)> = None;
    // SAFETY: the callback only reads loader data and writes `out`.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut out as *mut Option<(u64, u64, u64)>).cast()) };
    out
}

/// Page-rounded, merged `PT_LOAD` ranges of every loaded object except the vDSO.
pub(crate) fn image_segments() -> Result<Vec<(u64, u64)>> {
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for this callback's duration; `data` is
        // the Vec we passed below.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Vec<(u64, u64)>)) };
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
            unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        if name.contains("linux-vdso") || name.contains("linux-gate") {
            return 0;
        }
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type != libc::PT_LOAD || ph.p_memsz == 0 {
                continue;
            }
            let start = info.dlpi_addr + ph.p_vaddr;
            out.push((start & !0xfff, (start + ph.p_memsz).div_ceil(4096) * 4096));
        }
        0
    }
    let mut segs: Vec<(u64, u64)> = Vec::new();
    // SAFETY: the callback only reads loader-provided data and pushes into `segs`.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut segs as *mut Vec<(u64, u64)>).cast()) };
    ensure!(!segs.is_empty(), "dl_iterate_phdr found no loaded segments");
    segs.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in segs {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    Ok(merged)
}
