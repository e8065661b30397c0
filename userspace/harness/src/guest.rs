//! A minimal x86_64 long-mode guest: identity-mapped page tables, a GDT, the sregs for long
//! mode, a tiny assembler for code blobs, and the workload guest that reads every page of a
//! region and checks it against [`pattern_word`], reporting through port I/O.
//!
//! Guest physical layout of the "system" memory (slot at gpa 0, [`SYSTEM_SIZE`] bytes):
//! ```text
//! 0x1000   GDT (null, code64 0x08, data 0x10, TSS 0x18)
//! 0x2000   mailboxes, MAILBOX_STRIDE bytes per vCPU (fail reports)
//! 0x10000  code
//! 0x20000  PML4, then PDPT, then one PD per GiB mapped (2 MiB pages)
//! ```

use anyhow::{bail, ensure, Context, Result};
use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;

/// Size of the system slot.
pub const SYSTEM_SIZE: u64 = 2 << 20;
/// GDT location.
pub const GDT_GPA: u64 = 0x1000;
/// First mailbox.
pub const MAILBOX_GPA: u64 = 0x2000;
/// Bytes per vCPU mailbox.
pub const MAILBOX_STRIDE: u64 = 64;
/// Most vCPUs the mailbox area holds.
pub const MAX_VCPUS: u64 = 0xE000 / MAILBOX_STRIDE;
/// Where code is loaded and vCPUs start.
pub const CODE_GPA: u64 = 0x10000;
/// Largest code blob.
pub const CODE_MAX: usize = 0x10000;
/// Page-table root.
pub const PML4_GPA: u64 = 0x20000;
/// Most GiB identity-mapped (one PD page each).
pub const MAX_MAPPED_GIB: u64 = 64;

/// Port: the workload is done (all pages correct).
pub const PORT_DONE: u16 = 0xE0;
/// Port: a mismatch; details in the vCPU's mailbox ([`Mailbox`]).
pub const PORT_FAIL: u16 = 0xE1;
/// Port: progress, the 32-bit value is the pages left.
pub const PORT_PROGRESS: u16 = 0xE2;

/// The multiplier of the deterministic pattern.
pub const PATTERN_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The 8-byte word expected at byte `offset` (a multiple of 8) of an image made with `seed`.
/// Depends on the offset, so a page installed at the wrong place is detected too.
pub fn pattern_word(seed: u64, offset: u64) -> u64 {
    (offset ^ seed).wrapping_mul(PATTERN_MUL)
}

/// Fills `buf` with the pattern of image page `page`.
pub fn fill_pattern_page(seed: u64, page: u64, buf: &mut [u8]) {
    let base = page * kvm_userfault::PAGE_SIZE as u64;
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(seed, base + i as u64 * 8).to_le_bytes());
    }
}

const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_PS: u64 = 1 << 7;

/// Writes the GDT and identity-mapping page tables for `[0, map_gib GiB)` into `system`
/// (the contents of the system slot at gpa 0).
pub fn write_system_tables(system: &mut [u8], map_gib: u64) -> Result<()> {
    ensure!(
        (1..=MAX_MAPPED_GIB).contains(&map_gib),
        "can identity-map 1..={MAX_MAPPED_GIB} GiB, not {map_gib}"
    );
    let need = PML4_GPA + (2 + map_gib) * 0x1000;
    ensure!(
        system.len() as u64 >= need,
        "system memory too small for page tables"
    );
    let mut put = |gpa: u64, v: u64| {
        system[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
    };
    // GDT: null, 64-bit code, data, 64-bit TSS (two entries).
    put(GDT_GPA, 0);
    put(GDT_GPA + 8, 0x00af_9b00_0000_ffff);
    put(GDT_GPA + 16, 0x00cf_9300_0000_ffff);
    put(GDT_GPA + 24, 0x0000_8b00_0000_0067);
    put(GDT_GPA + 32, 0);
    let pdpt = PML4_GPA + 0x1000;
    put(PML4_GPA, pdpt | PTE_P | PTE_RW);
    for g in 0..map_gib {
        let pd = pdpt + 0x1000 * (1 + g);
        put(pdpt + g * 8, pd | PTE_P | PTE_RW);
        for j in 0..512u64 {
            let phys = (g << 30) | (j << 21);
            put(pd + j * 8, phys | PTE_P | PTE_RW | PTE_PS);
        }
    }
    Ok(())
}

/// Puts a vCPU in 64-bit long mode with the tables of [`write_system_tables`].
pub fn setup_long_mode(vcpu: &VcpuFd) -> Result<()> {
    let mut s = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        l: 0,
        db: 0,
        ..code
    };
    s.ldt = kvm_segment {
        unusable: 1,
        present: 0,
        ..s.ldt
    };
    s.gdt.base = GDT_GPA;
    s.gdt.limit = 5 * 8 - 1;
    s.cr3 = PML4_GPA;
    s.cr4 = 1 << 5; // PAE
    s.cr0 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31); // PE MP ET NE WP PG
    s.efer = (1 << 8) | (1 << 10); // LME LMA
    vcpu.set_sregs(&s).context("KVM_SET_SREGS (long mode)")?;
    Ok(())
}

/// A tiny x86 assembler helper: raw bytes plus labels and rel32 jumps.
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, usize)>,
}

/// A label created by [`Asm::label`].
#[derive(Debug, Clone, Copy)]
pub struct Label(usize);

impl Asm {
    /// Appends raw instruction bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }
    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    /// Binds a label here.
    pub fn bind(&mut self, l: Label) -> &mut Self {
        self.labels[l.0] = Some(self.code.len());
        self
    }
    fn rel32(&mut self, l: Label) {
        self.fixups.push((self.code.len(), l.0));
        self.code.extend_from_slice(&[0; 4]);
    }
    /// `jmp rel32`.
    pub fn jmp(&mut self, l: Label) -> &mut Self {
        self.code.push(0xE9);
        self.rel32(l);
        self
    }
    /// `jcc rel32` with condition code `cc` (0x4 = e/z, 0x5 = ne/nz, …).
    pub fn jcc(&mut self, cc: u8, l: Label) -> &mut Self {
        self.code.extend_from_slice(&[0x0F, 0x80 | cc]);
        self.rel32(l);
        self
    }
    /// `mov dx, port; out dx, al`.
    pub fn out_al(&mut self, port: u16) -> &mut Self {
        let p = port.to_le_bytes();
        self.bytes(&[0x66, 0xBA, p[0], p[1], 0xEE])
    }
    /// `mov dx, port; out dx, eax`.
    pub fn out_eax(&mut self, port: u16) -> &mut Self {
        let p = port.to_le_bytes();
        self.bytes(&[0x66, 0xBA, p[0], p[1], 0xEF])
    }
    /// Resolves the jumps.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        for &(at, l) in &self.fixups {
            let target = self.labels[l].context("unbound label")?;
            let rel = target as i64 - (at as i64 + 4);
            self.code[at..at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        Ok(self.code)
    }
}

/// The workload guest. Inputs (set by [`setup_workload_regs`]): rdi = first gpa, rsi = pages,
/// r8 = image offset of the first byte, r9 = seed, r10 = [`PATTERN_MUL`], r11 = mailbox gpa.
/// For every 8-byte word it compares `[rdi]` with `((r8 ^ r9) * r10)`; on a mismatch it stores
/// the gpa, expected and found words in the mailbox and writes [`PORT_FAIL`]; every 256 pages
/// it writes the pages left to [`PORT_PROGRESS`]; at the end [`PORT_DONE`]. It needs no stack.
pub fn workload_code() -> Vec<u8> {
    let mut a = Asm::default();
    let (outer, inner, done, fail) = (a.label(), a.label(), a.label(), a.label());
    a.bind(outer)
        .bytes(&[0x48, 0x85, 0xF6]) // test rsi, rsi
        .jcc(0x4, done)
        .bytes(&[0xB9, 0x00, 0x02, 0x00, 0x00]) // mov ecx, 512
        .bind(inner)
        .bytes(&[0x4C, 0x89, 0xC0]) // mov rax, r8
        .bytes(&[0x4C, 0x31, 0xC8]) // xor rax, r9
        .bytes(&[0x49, 0x0F, 0xAF, 0xC2]) // imul rax, r10
        .bytes(&[0x48, 0x3B, 0x07]) // cmp rax, [rdi]
        .jcc(0x5, fail)
        .bytes(&[0x48, 0x83, 0xC7, 0x08]) // add rdi, 8
        .bytes(&[0x49, 0x83, 0xC0, 0x08]) // add r8, 8
        .bytes(&[0xFF, 0xC9]) // dec ecx
        .jcc(0x5, inner)
        .bytes(&[0x48, 0xFF, 0xCE]) // dec rsi
        .bytes(&[0xF7, 0xC6, 0xFF, 0x00, 0x00, 0x00]) // test esi, 0xff
        .jcc(0x5, outer)
        .bytes(&[0x89, 0xF0]) // mov eax, esi
        .out_eax(PORT_PROGRESS)
        .jmp(outer)
        .bind(done)
        .out_al(PORT_DONE)
        .bytes(&[0xF4]) // hlt
        .jmp(done)
        .bind(fail)
        .bytes(&[0x49, 0x89, 0x7B, 0x08]) // mov [r11+8], rdi
        .bytes(&[0x49, 0x89, 0x43, 0x10]) // mov [r11+16], rax
        .bytes(&[0x48, 0x8B, 0x07]) // mov rax, [rdi]
        .bytes(&[0x49, 0x89, 0x43, 0x18]) // mov [r11+24], rax
        .out_al(PORT_FAIL)
        .bytes(&[0xF4]) // hlt
        .jmp(fail);
    a.finish().expect("all labels bound")
}

/// What one vCPU of the workload checks.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadPart {
    /// First guest physical address.
    pub gpa: u64,
    /// Pages to check.
    pub pages: u64,
    /// Image byte offset of `gpa`.
    pub image_offset: u64,
    /// Pattern seed.
    pub seed: u64,
    /// The vCPU's index (selects its mailbox).
    pub vcpu: u64,
}

/// Sets the registers the workload code expects.
pub fn setup_workload_regs(vcpu: &VcpuFd, part: &WorkloadPart) -> Result<()> {
    ensure!(part.vcpu < MAX_VCPUS, "at most {MAX_VCPUS} vCPUs");
    let regs = kvm_regs {
        rip: CODE_GPA,
        rflags: 2,
        rdi: part.gpa,
        rsi: part.pages,
        r8: part.image_offset,
        r9: part.seed,
        r10: PATTERN_MUL,
        r11: MAILBOX_GPA + part.vcpu * MAILBOX_STRIDE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    Ok(())
}

/// A vCPU's mismatch report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mailbox {
    /// Guest physical address of the wrong word.
    pub gpa: u64,
    /// Pattern value.
    pub expected: u64,
    /// Value read.
    pub found: u64,
}

impl Mailbox {
    /// Decodes vCPU `vcpu`'s mailbox from system memory.
    pub fn read(system: &kvm_userfault::memory::Mapping, vcpu: u64) -> Result<Self> {
        let mut b = [0u8; 32];
        system.read((MAILBOX_GPA + vcpu * MAILBOX_STRIDE) as usize, &mut b)?;
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Ok(Self {
            gpa: w(1),
            expected: w(2),
            found: w(3),
        })
    }
}

/// Builds the system slot contents: tables for `map_gib` GiB and `code` at [`CODE_GPA`].
pub fn system_image(map_gib: u64, code: &[u8]) -> Result<Vec<u8>> {
    if code.len() > CODE_MAX {
        bail!("code blob of {} bytes exceeds {CODE_MAX}", code.len());
    }
    let mut sys = vec![0u8; SYSTEM_SIZE as usize];
    write_system_tables(&mut sys, map_gib)?;
    sys[CODE_GPA as usize..CODE_GPA as usize + code.len()].copy_from_slice(code);
    Ok(sys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_on_offset_and_seed() {
        assert_ne!(pattern_word(1, 0), pattern_word(1, 8));
        assert_ne!(pattern_word(1, 0), pattern_word(2, 0));
        let mut a = vec![0u8; 4096];
        fill_pattern_page(7, 3, &mut a);
        assert_eq!(&a[8..16], &pattern_word(7, 3 * 4096 + 8).to_le_bytes());
    }

    #[test]
    fn tables_identity_map_with_2m_pages() {
        let sys = system_image(2, &workload_code()).unwrap();
        let r =
            |gpa: u64| u64::from_le_bytes(sys[gpa as usize..gpa as usize + 8].try_into().unwrap());
        assert_eq!(r(PML4_GPA) & !0xfff, PML4_GPA + 0x1000);
        let pd1 = r(PML4_GPA + 0x1000 + 8) & !0xfff;
        assert_eq!(r(pd1 + 3 * 8), (1 << 30) | (3 << 21) | 0x83);
        assert!(system_image(0, &[]).is_err());
        assert!(system_image(1, &vec![0; CODE_MAX + 1]).is_err());
    }

    #[test]
    fn asm_resolves_backward_and_forward_jumps() {
        let mut a = Asm::default();
        let (top, end) = (a.label(), a.label());
        a.bind(top).jcc(0x4, end).jmp(top).bind(end).bytes(&[0xF4]);
        let c = a.finish().unwrap();
        assert_eq!(
            c,
            vec![0x0F, 0x84, 5, 0, 0, 0, 0xE9, 0xF5, 0xFF, 0xFF, 0xFF, 0xF4]
        );
        let mut b = Asm::default();
        let l = b.label();
        b.jmp(l);
        assert!(b.finish().is_err());
    }
}
