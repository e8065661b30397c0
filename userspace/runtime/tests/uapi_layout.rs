//! The runtime's uAPI definitions (`kvm_userfault::uapi`) against the C definitions: the
//! layout documented in docs/uapi.md, always, and the lines the series' patches add to
//! `include/uapi/linux/kvm.h` (kernel-patches/series/*.patch) whenever that directory exists.
//!
//! The C reader lives here, not in the library: it exists for this check only.

use kvm_userfault::uapi::*;
use std::mem::{offset_of, size_of};

/// (name, size, [(field, offset)]) of one struct.
type StructLayout = (&'static str, usize, Vec<(&'static str, usize)>);

/// The layouts of the series' structs as this crate lays them out.
fn struct_layouts() -> Vec<StructLayout> {
    vec![
        (
            "kvm_create_userfault_fd",
            size_of::<kvm_create_userfault_fd>(),
            vec![
                ("flags", offset_of!(kvm_create_userfault_fd, flags)),
                ("msg_size", offset_of!(kvm_create_userfault_fd, msg_size)),
                ("pad", offset_of!(kvm_create_userfault_fd, pad)),
                ("reserved", offset_of!(kvm_create_userfault_fd, reserved)),
            ],
        ),
        (
            "kvm_userfault_msg",
            size_of::<kvm_userfault_msg>(),
            vec![
                ("size", offset_of!(kvm_userfault_msg, size)),
                ("flags", offset_of!(kvm_userfault_msg, flags)),
                ("gfn", offset_of!(kvm_userfault_msg, gfn)),
                ("vcpu_id", offset_of!(kvm_userfault_msg, vcpu_id)),
                ("reserved", offset_of!(kvm_userfault_msg, reserved)),
            ],
        ),
        (
            "kvm_userfault_range",
            size_of::<kvm_userfault_range>(),
            vec![
                ("gpa", offset_of!(kvm_userfault_range, gpa)),
                ("size", offset_of!(kvm_userfault_range, size)),
                ("flags", offset_of!(kvm_userfault_range, flags)),
                ("reserved", offset_of!(kvm_userfault_range, reserved)),
            ],
        ),
    ]
}

/// (name, value) of every constant of the series this crate defines.
fn constants() -> Vec<(&'static str, u64)> {
    vec![
        ("KVM_CAP_USERFAULT", KVM_CAP_USERFAULT as u64),
        (
            "KVM_CAP_USERFAULT_FD_FLAGS",
            KVM_CAP_USERFAULT_FD_FLAGS as u64,
        ),
        (
            "KVM_MEMORY_ATTRIBUTE_USERFAULT",
            KVM_MEMORY_ATTRIBUTE_USERFAULT,
        ),
        (
            "KVM_MEMORY_ATTRIBUTES_FLAG_SET",
            KVM_MEMORY_ATTRIBUTES_FLAG_SET,
        ),
        (
            "KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR",
            KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR,
        ),
        (
            "KVM_MEMORY_EXIT_FLAG_USERFAULT",
            KVM_MEMORY_EXIT_FLAG_USERFAULT,
        ),
        ("KVM_MEMORY_EXIT_FLAG_READ", KVM_MEMORY_EXIT_FLAG_READ),
        ("KVM_MEMORY_EXIT_FLAG_WRITE", KVM_MEMORY_EXIT_FLAG_WRITE),
        ("KVM_MEMORY_EXIT_FLAG_EXEC", KVM_MEMORY_EXIT_FLAG_EXEC),
        (
            "KVM_USERFAULT_FD_FLAG_NONBLOCK",
            KVM_USERFAULT_FD_FLAG_NONBLOCK,
        ),
        (
            "KVM_USERFAULT_FD_FLAG_VCPU_FAULTS",
            KVM_USERFAULT_FD_FLAG_VCPU_FAULTS,
        ),
        ("KVM_USERFAULT_MSG_READ", KVM_USERFAULT_MSG_READ as u64),
        ("KVM_USERFAULT_MSG_WRITE", KVM_USERFAULT_MSG_WRITE as u64),
        ("KVM_USERFAULT_MSG_EXEC", KVM_USERFAULT_MSG_EXEC as u64),
        ("KVM_USERFAULT_MSG_VCPU", KVM_USERFAULT_MSG_VCPU as u64),
        ("KVM_USERFAULT_MSG_GUEST", KVM_USERFAULT_MSG_GUEST as u64),
        ("KVM_CREATE_USERFAULT_FD", KVM_CREATE_USERFAULT_FD()),
        ("KVM_USERFAULT_RESOLVE", KVM_USERFAULT_RESOLVE()),
        ("KVM_USERFAULT_REQUEUE", KVM_USERFAULT_REQUEUE()),
    ]
}

/// A minimal reader of the C header text added by the series: `#define`s with integer
/// expressions, `_IO(KVMIO, nr)` or `_IOR`/`_IOW`/`_IOWR(KVMIO, nr, struct x)`, and structs
/// of `__u32`/`__u64` fields.
mod header {
    use std::collections::HashMap;

    /// A struct from the header: its size and field offsets under the C ABI of x86_64.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct CStruct {
        /// Total size in bytes, padded to the struct's alignment.
        pub size: usize,
        /// Field name → byte offset.
        pub offsets: HashMap<String, usize>,
    }

    /// What the header defines.
    #[derive(Debug, Default)]
    pub struct Header {
        /// Macro name → raw expression text.
        pub defines: HashMap<String, String>,
        /// Struct name (without `struct `) → layout.
        pub structs: HashMap<String, CStruct>,
    }

    /// Extracts the lines a unified diff adds to `include/uapi/linux/kvm.h`.
    pub fn added_kvm_h_lines(patch: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut in_kvm_h = false;
        for line in patch.lines() {
            if let Some(rest) = line.strip_prefix("+++ ") {
                in_kvm_h = rest.trim().ends_with("include/uapi/linux/kvm.h");
                continue;
            }
            if line.starts_with("diff --git") {
                in_kvm_h = false;
                continue;
            }
            if in_kvm_h {
                if let Some(added) = line.strip_prefix('+') {
                    out.push(added.to_string());
                }
            }
        }
        out
    }

    fn type_size(ty: &str) -> Option<usize> {
        match ty {
            "__u8" | "__s8" => Some(1),
            "__u16" | "__s16" => Some(2),
            "__u32" | "__s32" => Some(4),
            "__u64" | "__s64" => Some(8),
            _ => None,
        }
    }

    /// Parses header lines (comments stripped) into defines and structs.
    pub fn parse(lines: &[String]) -> Header {
        let mut h = Header::default();
        let mut current: Option<(String, CStruct, usize, usize)> = None; // name, s, off, align
        for raw in lines {
            let line = strip_comment(raw);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some((name, mut s, mut off, mut align)) = current.take() {
                if line.starts_with('}') {
                    s.size = off.div_ceil(align) * align;
                    h.structs.insert(name, s);
                    continue;
                }
                // "__u64 reserved[7];"
                let decl = line.trim_end_matches(';');
                let mut parts = decl.split_whitespace();
                if let (Some(ty), Some(field)) = (parts.next(), parts.next()) {
                    if let Some(sz) = type_size(ty) {
                        let (fname, count) = match field.split_once('[') {
                            Some((n, rest)) => {
                                (n, rest.trim_end_matches(']').parse::<usize>().unwrap_or(1))
                            }
                            None => (field, 1),
                        };
                        off = off.div_ceil(sz) * sz;
                        s.offsets.insert(fname.to_string(), off);
                        off += sz * count;
                        align = align.max(sz);
                    }
                }
                current = Some((name, s, off, align));
                continue;
            }
            if let Some(rest) = line.strip_prefix("struct ") {
                if let Some(name) = rest.strip_suffix('{') {
                    let s = CStruct {
                        size: 0,
                        offsets: HashMap::new(),
                    };
                    current = Some((name.trim().to_string(), s, 0, 1));
                    continue;
                }
            }
            if let Some(rest) = line.strip_prefix("#define") {
                let rest = rest.trim();
                if let Some((name, expr)) = rest.split_once(char::is_whitespace) {
                    h.defines
                        .insert(name.trim().to_string(), expr.trim().to_string());
                }
            }
        }
        h
    }

    fn strip_comment(line: &str) -> String {
        let mut s = line.to_string();
        while let Some(start) = s.find("/*") {
            match s[start..].find("*/") {
                Some(end) => s.replace_range(start..start + end + 2, ""),
                None => s.truncate(start),
            }
        }
        if let Some(start) = s.find("//") {
            s.truncate(start);
        }
        s
    }

    /// Evaluates a define: integers (with U/UL/ULL suffixes), `(a << b)`, `a | b`,
    /// `_IO(KVMIO, nr)` and `_IOR`/`_IOW`/`_IOWR(KVMIO, nr, struct name)` using the header's
    /// own structs.
    pub fn eval(h: &Header, expr: &str) -> Option<u64> {
        use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};
        let e = expr.trim();
        for (mac, dir) in [
            ("_IOWR(", _IOC_READ | _IOC_WRITE),
            ("_IOW(", _IOC_WRITE),
            ("_IOR(", _IOC_READ),
            ("_IO(", _IOC_NONE),
        ] {
            let Some(args) = e.strip_prefix(mac).and_then(|r| r.strip_suffix(')')) else {
                continue;
            };
            let parts: Vec<&str> = args.split(',').map(str::trim).collect();
            let want_args = if dir == _IOC_NONE { 2 } else { 3 };
            if parts.len() != want_args || parts[0] != "KVMIO" {
                return None;
            }
            let nr = u32::try_from(eval(h, parts[1])?).ok()?;
            let size = match parts.get(2) {
                None => 0,
                Some(ty) => h.structs.get(ty.strip_prefix("struct ")?.trim())?.size,
            };
            return Some(ioctl_expr(
                dir,
                kvm_bindings::KVMIO,
                nr,
                u32::try_from(size).ok()?,
            ));
        }
        let e = strip_parens(e);
        for bit in ["_BITULL(", "_BITUL(", "BIT_ULL(", "BIT("] {
            if let Some(n) = e.strip_prefix(bit).and_then(|r| r.strip_suffix(')')) {
                return 1u64.checked_shl(eval(h, n)? as u32);
            }
        }
        if let Some((a, b)) = split_top(e, "|") {
            return Some(eval(h, a)? | eval(h, b)?);
        }
        if let Some((a, b)) = split_top(e, "<<") {
            return eval(h, a)?.checked_shl(eval(h, b)? as u32);
        }
        let lit = e.trim_end_matches(['U', 'u', 'L', 'l']);
        if let Some(hex) = lit.strip_prefix("0x").or_else(|| lit.strip_prefix("0X")) {
            return u64::from_str_radix(hex, 16).ok();
        }
        if let Ok(v) = lit.parse::<u64>() {
            return Some(v);
        }
        // A reference to another define.
        h.defines.get(e).and_then(|d| eval(h, d))
    }

    fn strip_parens(mut e: &str) -> &str {
        loop {
            let t = e.trim();
            if t.starts_with('(') && t.ends_with(')') && matching_close(t) == Some(t.len() - 1) {
                e = &t[1..t.len() - 1];
            } else {
                return t;
            }
        }
    }

    fn matching_close(t: &str) -> Option<usize> {
        let mut depth = 0i32;
        for (i, c) in t.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        None
    }

    fn split_top<'a>(e: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
        let mut depth = 0i32;
        let bytes = e.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ if depth == 0 && e[i..].starts_with(op) => {
                    return Some((&e[..i], &e[i + op.len()..]));
                }
                _ => {}
            }
            i += 1;
        }
        None
    }
}

use header::Header;
use std::path::PathBuf;

/// The C layout documented in docs/uapi.md, written out by hand.
const DOC_HEADER: &str = r#"
struct kvm_create_userfault_fd {
	__u64 flags;
	__u32 msg_size;   /* in: largest record size the reader understands (>= 24); out: used */
	__u32 pad;        /* must be zero */
	__u64 reserved[6];/* must be zero */
};
struct kvm_userfault_msg {
	__u32 size;       /* sizeof(struct kvm_userfault_msg) = 24 */
	__u32 flags;      /* KVM_USERFAULT_MSG_* */
	__u64 gfn;
	__u32 vcpu_id;    /* valid iff flags & KVM_USERFAULT_MSG_VCPU */
	__u32 reserved;   /* zero */
};
struct kvm_userfault_range {
	__u64 gpa;        /* page aligned */
	__u64 size;       /* page aligned, non-zero, no overflow */
	__u64 flags;      /* must be zero */
	__u64 reserved;   /* must be zero */
};
#define KVM_CAP_USERFAULT 252
#define KVM_CAP_USERFAULT_FD_FLAGS 253
#define KVM_MEMORY_ATTRIBUTE_USERFAULT   (1ULL << 4)
#define KVM_MEMORY_ATTRIBUTES_FLAG_SET     (1ULL << 0)  /* attrs |= attributes  */
#define KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR   (1ULL << 1)  /* attrs &= ~attributes */
#define KVM_MEMORY_EXIT_FLAG_READ        (1ULL << 0)
#define KVM_MEMORY_EXIT_FLAG_WRITE       (1ULL << 1)
#define KVM_MEMORY_EXIT_FLAG_EXEC        (1ULL << 2)
#define KVM_MEMORY_EXIT_FLAG_USERFAULT   (1ULL << 4)
#define KVM_CREATE_USERFAULT_FD  _IOWR(KVMIO, 0xd6, struct kvm_create_userfault_fd)
#define KVM_USERFAULT_FD_FLAG_NONBLOCK     (1ULL << 0)  /* O_NONBLOCK on the new fd */
#define KVM_USERFAULT_FD_FLAG_VCPU_FAULTS  (1ULL << 1)  /* vCPU faults also go through the fd */
#define KVM_USERFAULT_MSG_READ    (1U << 0)
#define KVM_USERFAULT_MSG_WRITE   (1U << 1)
#define KVM_USERFAULT_MSG_EXEC    (1U << 2)
#define KVM_USERFAULT_MSG_VCPU    (1U << 3)  /* raised in a vCPU's context; vcpu_id valid */
#define KVM_USERFAULT_MSG_GUEST   (1U << 4)  /* a guest access (VCPU_FAULTS), not KVM's own */
#define KVM_USERFAULT_RESOLVE  _IOW(KVMIO, 0xd7, struct kvm_userfault_range)
#define KVM_USERFAULT_REQUEUE  _IO(KVMIO, 0xd8)
"#;

fn check_against(h: &Header, what: &str, require_all: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, size, fields) in struct_layouts() {
        let Some(c) = h.structs.get(name) else {
            if require_all {
                problems.push(format!("{what}: struct {name} missing"));
            }
            continue;
        };
        if c.size != size {
            problems.push(format!(
                "{what}: sizeof({name}) = {} but ours is {size}",
                c.size
            ));
        }
        for (f, off) in fields {
            match c.offsets.get(f) {
                Some(o) if *o == off => {}
                Some(o) => problems.push(format!("{what}: {name}.{f} at {o}, ours at {off}")),
                None => problems.push(format!("{what}: {name}.{f} missing")),
            }
        }
        if c.offsets.len() != fields_len(name) {
            problems.push(format!("{what}: {name} has {} fields", c.offsets.len()));
        }
    }
    for (name, value) in constants() {
        match h.defines.get(name) {
            None if require_all => problems.push(format!("{what}: {name} not defined")),
            None => {}
            Some(expr) => match header::eval(h, expr) {
                Some(v) if v == value => {}
                Some(v) => problems.push(format!("{what}: {name} = {v:#x}, ours {value:#x}")),
                None => problems.push(format!("{what}: cannot evaluate {name} = {expr}")),
            },
        }
    }
    problems
}

fn fields_len(name: &str) -> usize {
    struct_layouts()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, f)| f.len())
        .unwrap_or(0)
}

#[test]
fn layouts_match_the_documented_contract() {
    assert_eq!(USERFAULT_MSG_SIZE, 24);
    assert_eq!(size_of::<kvm_create_userfault_fd>(), 64);
    assert_eq!(size_of::<kvm_userfault_range>(), 32);
    let lines: Vec<String> = DOC_HEADER.lines().map(String::from).collect();
    let h = header::parse(&lines);
    let problems = check_against(&h, "docs/uapi.md", true);
    assert!(problems.is_empty(), "{problems:#?}");
    // Known-good ioctl numbers, computed independently.
    assert_eq!(KVM_CREATE_USERFAULT_FD(), 0xc040_aed6);
    assert_eq!(KVM_USERFAULT_RESOLVE(), 0x4020_aed7);
    assert_eq!(KVM_USERFAULT_REQUEUE(), 0xaed8);
    assert_eq!(offset_of!(kvm_create_userfault_fd, msg_size), 8);
    assert_eq!(offset_of!(kvm_create_userfault_fd, reserved), 16);
    const { assert!(USERFAULT_MSG_SIZE >= USERFAULT_MSG_MIN_SIZE) };
}

#[test]
fn header_reader_rejects_mismatches() {
    let text = "#define KVM_CAP_USERFAULT 253\nstruct kvm_userfault_msg {\n__u64 size;\n};";
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let h = header::parse(&lines);
    let problems = check_against(&h, "bad", false);
    assert!(problems.iter().any(|p| p.contains("KVM_CAP_USERFAULT")));
    assert!(problems
        .iter()
        .any(|p| p.contains("sizeof(kvm_userfault_msg)")));
}

#[test]
fn matches_series_header() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../kernel-patches/series");
    // Outside this repository (a crate built on its own) there is no series to compare
    // with: only the documented layout is checked. Inside it, an unreadable series fails.
    if !dir.exists() {
        eprintln!(
            "SKIP: no {}; only the documented layout was checked",
            dir.display()
        );
        return;
    }
    let mut patches: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.extension().is_some_and(|x| x == "patch"))
        .collect();
    // Applied in name order (0001-…, 0002-…), so a later patch's define wins.
    patches.sort();
    let mut lines = Vec::new();
    for p in &patches {
        let text =
            std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        lines.extend(header::added_kvm_h_lines(&text));
    }
    assert!(
        !lines.is_empty(),
        "no patch in {} adds to include/uapi/linux/kvm.h: the series' uAPI cannot be checked",
        dir.display()
    );
    let h = header::parse(&lines);
    let problems = check_against(&h, "series", true);
    assert!(
        problems.is_empty(),
        "uAPI drift vs the series: {problems:#?}"
    );
}

#[test]
fn header_reader_evaluates_kernel_styles() {
    let text = "#define A _BITULL(4)\n#define B (1U << 3)\n#define C 0xd6\n#define D (A | B)\n#define E 252UL";
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let h = header::parse(&lines);
    let v = |n: &str| header::eval(&h, &h.defines[n]);
    assert_eq!(v("A"), Some(16));
    assert_eq!(v("B"), Some(8));
    assert_eq!(v("C"), Some(0xd6));
    assert_eq!(v("D"), Some(24));
    assert_eq!(v("E"), Some(252));
    let text = "struct s {\n__u64 a;\n__u32 b;\n};\n#define IO _IO(KVMIO, 0xd8)\n\
                    #define IOR _IOR(KVMIO, 1, struct s)\n#define IOWR _IOWR(KVMIO, 2, struct s)\n\
                    #define BAD _IO(KVMIO, 1, struct s)";
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let h = header::parse(&lines);
    let v = |n: &str| header::eval(&h, &h.defines[n]);
    assert_eq!(v("IO"), Some(0xaed8));
    assert_eq!(v("IOR"), Some(0x8010_ae01));
    assert_eq!(v("IOWR"), Some(0xc010_ae02));
    assert_eq!(v("BAD"), None);
}

#[test]
fn diff_reader_only_takes_kvm_h_additions() {
    let patch = "diff --git a/include/uapi/linux/kvm.h b/include/uapi/linux/kvm.h\n\
                     --- a/include/uapi/linux/kvm.h\n+++ b/include/uapi/linux/kvm.h\n\
                     @@ -1 +1 @@\n+#define KVM_CAP_USERFAULT 252\n-#define OLD 1\n\
                     diff --git a/virt/kvm/kvm_main.c b/virt/kvm/kvm_main.c\n\
                     +++ b/virt/kvm/kvm_main.c\n+#define NOT_UAPI 1\n";
    let lines = header::added_kvm_h_lines(patch);
    assert_eq!(lines, vec!["#define KVM_CAP_USERFAULT 252".to_string()]);
}
