//! Parsing `struct kvm_userfault_msg` records. The kernel is trusted to follow the uAPI, but a
//! record that does not is a clear error, never a panic or a silently wrong gfn.

use crate::uapi::{
    kvm_userfault_msg, KVM_MEMORY_EXIT_FLAG_EXEC, KVM_MEMORY_EXIT_FLAG_READ,
    KVM_MEMORY_EXIT_FLAG_WRITE, KVM_USERFAULT_MSG_ALL, KVM_USERFAULT_MSG_EXEC,
    KVM_USERFAULT_MSG_READ, KVM_USERFAULT_MSG_VCPU, KVM_USERFAULT_MSG_WRITE,
    USERFAULT_MSG_MIN_SIZE, USERFAULT_MSG_SIZE,
};

/// log2 of the page size gfns are counted in.
const PAGE_SHIFT: u32 = 12;

/// The largest record size a reader accepts. KVM never returns more than the size the reader
/// asked for (this crate asks for [`USERFAULT_MSG_SIZE`]); a larger stride can only come from a
/// peer (a handoff from a VMM built against a newer uAPI), which is bounded so that a corrupt
/// value cannot make readers allocate huge buffers.
pub const MAX_MSG_SIZE: usize = 4096;

/// The kind of access that faulted, from a record's `KVM_USERFAULT_MSG_READ/WRITE/EXEC` or a
/// sync exit's `KVM_MEMORY_EXIT_FLAG_READ/WRITE/EXEC` (the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// A load.
    Read,
    /// A store.
    Write,
    /// An instruction fetch.
    Exec,
}

impl Access {
    /// The access in a record's flags; `None` if it names none or more than one (KVM's own
    /// accesses may report READ | WRITE, e.g. an emulated read-modify-write).
    pub fn from_record_flags(flags: u32) -> Option<Self> {
        match flags & (KVM_USERFAULT_MSG_READ | KVM_USERFAULT_MSG_WRITE | KVM_USERFAULT_MSG_EXEC) {
            KVM_USERFAULT_MSG_READ => Some(Access::Read),
            KVM_USERFAULT_MSG_WRITE => Some(Access::Write),
            KVM_USERFAULT_MSG_EXEC => Some(Access::Exec),
            _ => None,
        }
    }

    /// The access in `run->memory_fault.flags` of a USERFAULT exit; `None` if it names none
    /// (kernels before v2 of the series set no access bit) or more than one.
    pub fn from_exit_flags(flags: u64) -> Option<Self> {
        match flags
            & (KVM_MEMORY_EXIT_FLAG_READ | KVM_MEMORY_EXIT_FLAG_WRITE | KVM_MEMORY_EXIT_FLAG_EXEC)
        {
            KVM_MEMORY_EXIT_FLAG_READ => Some(Access::Read),
            KVM_MEMORY_EXIT_FLAG_WRITE => Some(Access::Write),
            KVM_MEMORY_EXIT_FLAG_EXEC => Some(Access::Exec),
            _ => None,
        }
    }

    /// "read", "write" or "exec".
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Exec => "exec",
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One fault record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The faulting guest frame number.
    pub gfn: u64,
    /// `KVM_USERFAULT_MSG_*`.
    pub flags: u32,
    /// The vCPU, when the fault was raised in a vCPU's context.
    pub vcpu_id: Option<u32>,
}

impl Record {
    /// The kind of access, if the record names exactly one.
    pub fn access(&self) -> Option<Access> {
        Access::from_record_flags(self.flags)
    }
}

/// A malformed read result.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The negotiated record size is one no reader can use.
    #[error(
        "record size {0} is outside {USERFAULT_MSG_MIN_SIZE}..={MAX_MSG_SIZE} bytes \
         (the msg_size negotiated with KVM_CREATE_USERFAULT_FD)"
    )]
    UnsupportedMsgSize(usize),
    /// The read returned a partial record.
    #[error("read of {len} bytes is not a whole number of {msg_size}-byte records")]
    Partial {
        /// Bytes read.
        len: usize,
        /// The negotiated record size.
        msg_size: usize,
    },
    /// A record's size field disagrees with the negotiated record size.
    #[error("record {index}: size field {size}, but the negotiated record size is {expected}")]
    BadSize {
        /// Record position in the read.
        index: usize,
        /// The size field.
        size: u32,
        /// The negotiated record size.
        expected: usize,
    },
    /// Flags outside the uAPI.
    #[error("record {index}: unknown flags {flags:#x}")]
    UnknownFlags {
        /// Record position in the read.
        index: usize,
        /// The flags field.
        flags: u32,
    },
    /// The reserved field is not zero.
    #[error("record {index}: reserved field is {value:#x}, not zero")]
    Reserved {
        /// Record position in the read.
        index: usize,
        /// The reserved field.
        value: u32,
    },
    /// A gfn whose guest physical address does not fit in 64 bits (`gfn << 12` would lose
    /// bits and could alias a real page).
    #[error("record {index}: gfn {gfn:#x} is beyond the guest physical address space")]
    BadGfn {
        /// Record position in the read.
        index: usize,
        /// The gfn field.
        gfn: u64,
    },
}

/// Checks that `msg_size` (as returned by `KVM_CREATE_USERFAULT_FD`, or received with a
/// handoff) is a record size a reader can stride by.
pub fn check_msg_size(msg_size: usize) -> Result<(), RecordError> {
    if (USERFAULT_MSG_MIN_SIZE..=MAX_MSG_SIZE).contains(&msg_size) {
        Ok(())
    } else {
        Err(RecordError::UnsupportedMsgSize(msg_size))
    }
}

/// Parses the bytes of one `read()` into records of `msg_size` bytes each (the size negotiated
/// at fd creation), appending to `out`. Each record's `size` field must equal `msg_size`; of a
/// record larger than the layout this crate knows only the known prefix is interpreted. On
/// error nothing is appended.
pub fn parse_records(
    bytes: &[u8],
    msg_size: usize,
    out: &mut Vec<Record>,
) -> Result<(), RecordError> {
    check_msg_size(msg_size)?;
    if !bytes.len().is_multiple_of(msg_size) {
        return Err(RecordError::Partial {
            len: bytes.len(),
            msg_size,
        });
    }
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let first = out.len();
    for (index, r) in bytes.chunks_exact(msg_size).enumerate() {
        let fail = |out: &mut Vec<Record>, e| {
            out.truncate(first);
            Err(e)
        };
        let size = u32_at(r, 0);
        if size as usize != msg_size {
            return fail(
                out,
                RecordError::BadSize {
                    index,
                    size,
                    expected: msg_size,
                },
            );
        }
        let flags = u32_at(r, 4);
        if flags & !KVM_USERFAULT_MSG_ALL != 0 {
            return fail(out, RecordError::UnknownFlags { index, flags });
        }
        let reserved = u32_at(r, 20);
        if reserved != 0 {
            return fail(
                out,
                RecordError::Reserved {
                    index,
                    value: reserved,
                },
            );
        }
        let mut gfn = [0u8; 8];
        gfn.copy_from_slice(&r[8..16]);
        let gfn = u64::from_le_bytes(gfn);
        if gfn > u64::MAX >> PAGE_SHIFT {
            return fail(out, RecordError::BadGfn { index, gfn });
        }
        out.push(Record {
            gfn,
            flags,
            vcpu_id: (flags & KVM_USERFAULT_MSG_VCPU != 0).then(|| u32_at(r, 16)),
        });
    }
    Ok(())
}

/// Encodes a record as the kernel would with the default record size (tests, benchmarks, fake
/// producers).
pub fn encode_record(gfn: u64, flags: u32, vcpu_id: u32) -> [u8; USERFAULT_MSG_SIZE] {
    let m = kvm_userfault_msg {
        size: USERFAULT_MSG_SIZE as u32,
        flags,
        gfn,
        vcpu_id,
        reserved: 0,
    };
    let mut b = [0u8; USERFAULT_MSG_SIZE];
    b[0..4].copy_from_slice(&m.size.to_le_bytes());
    b[4..8].copy_from_slice(&m.flags.to_le_bytes());
    b[8..16].copy_from_slice(&m.gfn.to_le_bytes());
    b[16..20].copy_from_slice(&m.vcpu_id.to_le_bytes());
    b[20..24].copy_from_slice(&m.reserved.to_le_bytes());
    b
}

/// Encodes a record of `msg_size` bytes (at least [`USERFAULT_MSG_MIN_SIZE`]): the known
/// layout, zero-padded, with `size = msg_size` — what a kernel with a longer record would send
/// a reader that asked for that size.
pub fn encode_record_sized(gfn: u64, flags: u32, vcpu_id: u32, msg_size: usize) -> Vec<u8> {
    let mut b = vec![0u8; msg_size.max(USERFAULT_MSG_MIN_SIZE)];
    b[..USERFAULT_MSG_SIZE].copy_from_slice(&encode_record(gfn, flags, vcpu_id));
    b[0..4].copy_from_slice(&(msg_size as u32).to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::*;

    #[test]
    fn parses_several_records() {
        let mut buf = Vec::new();
        buf.extend(encode_record(0x1234, KVM_USERFAULT_MSG_READ, 0));
        buf.extend(encode_record(
            7,
            KVM_USERFAULT_MSG_WRITE | KVM_USERFAULT_MSG_VCPU | KVM_USERFAULT_MSG_GUEST,
            3,
        ));
        let mut out = Vec::new();
        parse_records(&buf, USERFAULT_MSG_SIZE, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Record {
                    gfn: 0x1234,
                    flags: KVM_USERFAULT_MSG_READ,
                    vcpu_id: None
                },
                Record {
                    gfn: 7,
                    flags: KVM_USERFAULT_MSG_WRITE
                        | KVM_USERFAULT_MSG_VCPU
                        | KVM_USERFAULT_MSG_GUEST,
                    vcpu_id: Some(3)
                },
            ]
        );
        parse_records(&[], USERFAULT_MSG_SIZE, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].access(), Some(Access::Read));
        assert_eq!(out[1].access(), Some(Access::Write));
    }

    #[test]
    fn strides_by_the_negotiated_size() {
        // A 32-byte record (a longer kernel layout a reader asked for): only the known prefix
        // is interpreted, the stride is 32.
        let mut buf = Vec::new();
        buf.extend(encode_record_sized(5, KVM_USERFAULT_MSG_READ, 0, 32));
        buf.extend(encode_record_sized(
            6,
            KVM_USERFAULT_MSG_EXEC | KVM_USERFAULT_MSG_VCPU,
            2,
            32,
        ));
        let mut out = Vec::new();
        parse_records(&buf, 32, &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.gfn).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(out[1].vcpu_id, Some(2));
        assert_eq!(out[1].access(), Some(Access::Exec));
        // The same bytes parsed with the wrong stride are an error, not wrong gfns.
        let mut none = Vec::new();
        assert_eq!(
            parse_records(&buf, 24, &mut none),
            Err(RecordError::Partial {
                len: 64,
                msg_size: 24
            })
        );
        let two24 = [encode_record(1, KVM_USERFAULT_MSG_READ, 0); 4].concat();
        assert_eq!(
            parse_records(&two24[..96], 48, &mut none),
            Err(RecordError::BadSize {
                index: 0,
                size: 24,
                expected: 48
            })
        );
        assert!(none.is_empty());
        // Record sizes no reader can use.
        for bad in [0, 16, 23, MAX_MSG_SIZE + 1] {
            assert_eq!(
                parse_records(&[], bad, &mut none),
                Err(RecordError::UnsupportedMsgSize(bad))
            );
        }
    }

    #[test]
    fn access_kind_from_exit_and_record_flags() {
        assert_eq!(
            Access::from_exit_flags(KVM_MEMORY_EXIT_FLAG_USERFAULT | KVM_MEMORY_EXIT_FLAG_WRITE),
            Some(Access::Write)
        );
        assert_eq!(
            Access::from_exit_flags(KVM_MEMORY_EXIT_FLAG_USERFAULT | KVM_MEMORY_EXIT_FLAG_EXEC),
            Some(Access::Exec)
        );
        // v1 kernels report no access kind; two kinds at once is not the uAPI.
        assert_eq!(
            Access::from_exit_flags(KVM_MEMORY_EXIT_FLAG_USERFAULT),
            None
        );
        assert_eq!(
            Access::from_exit_flags(KVM_MEMORY_EXIT_FLAG_READ | KVM_MEMORY_EXIT_FLAG_WRITE),
            None
        );
        assert_eq!(
            Access::from_record_flags(KVM_USERFAULT_MSG_READ | KVM_USERFAULT_MSG_GUEST),
            Some(Access::Read)
        );
        // KVM's own read-modify-write accesses may name READ and WRITE: no single kind.
        assert_eq!(
            Access::from_record_flags(KVM_USERFAULT_MSG_READ | KVM_USERFAULT_MSG_WRITE),
            None
        );
        assert_eq!(Access::Write.to_string(), "write");
    }

    #[test]
    fn rejects_malformed_records() {
        let mut out = Vec::new();
        let good = encode_record(1, KVM_USERFAULT_MSG_READ, 0);
        assert_eq!(
            parse_records(&good[..23], USERFAULT_MSG_SIZE, &mut out),
            Err(RecordError::Partial {
                len: 23,
                msg_size: 24
            })
        );

        let mut bad = good;
        bad[0] = 16;
        let mut two = good.to_vec();
        two.extend(bad);
        assert_eq!(
            parse_records(&two, USERFAULT_MSG_SIZE, &mut out),
            Err(RecordError::BadSize {
                index: 1,
                size: 16,
                expected: 24
            })
        );
        assert!(out.is_empty(), "nothing appended from a malformed read");

        let bad = encode_record(1, 1 << 9, 0);
        assert_eq!(
            parse_records(&bad, USERFAULT_MSG_SIZE, &mut out),
            Err(RecordError::UnknownFlags {
                index: 0,
                flags: 1 << 9
            })
        );

        let mut bad = good;
        bad[21] = 1;
        assert_eq!(
            parse_records(&bad, USERFAULT_MSG_SIZE, &mut out),
            Err(RecordError::Reserved {
                index: 0,
                value: 0x100
            })
        );

        // A gfn whose gpa would not fit in 64 bits, rather than a silently truncated gpa.
        let bad = encode_record(1 << 52, KVM_USERFAULT_MSG_READ, 0);
        assert_eq!(
            parse_records(&bad, USERFAULT_MSG_SIZE, &mut out),
            Err(RecordError::BadGfn {
                index: 0,
                gfn: 1 << 52
            })
        );
        let edge = encode_record(u64::MAX >> 12, KVM_USERFAULT_MSG_READ, 0);
        parse_records(&edge, USERFAULT_MSG_SIZE, &mut out).unwrap();
        assert_eq!(out.pop().map(|r| r.gfn << 12), Some(!0xfff));
        assert!(out.is_empty());
    }

    // ---- Property tests --------------------------------------------------------------------
    //
    // Records come from the kernel, which is trusted to follow the uAPI but has no integrity
    // check on a record: the parser rejects everything outside the uAPI (size field, unknown
    // flags, reserved field, gfn overflow, partial records); a flip inside a field's valid
    // range (another gfn, another known flag, another vCPU id) parses, and the caller
    // validates it: the handler looks the gfn up in its regions (`HandlerError::UnknownGpa`
    // otherwise), flags and vCPU id are only reported.

    use proptest::collection::vec;
    use proptest::prelude::*;

    /// A record inside the uAPI: (gfn, flags, vcpu_id).
    fn valid_record() -> impl Strategy<Value = (u64, u32, u32)> {
        (
            prop_oneof![0..1u64 << 20, 0..=u64::MAX >> PAGE_SHIFT],
            0..=KVM_USERFAULT_MSG_ALL,
            any::<u32>(),
        )
    }

    fn record_size() -> impl Strategy<Value = usize> {
        prop_oneof![Just(USERFAULT_MSG_SIZE), Just(32), 24..=64usize]
    }

    fn expected(gfn: u64, flags: u32, vcpu_id: u32) -> Record {
        Record {
            gfn,
            flags,
            vcpu_id: (flags & KVM_USERFAULT_MSG_VCPU != 0).then_some(vcpu_id),
        }
    }

    fn encode_all(recs: &[(u64, u32, u32)], msg_size: usize) -> Vec<u8> {
        recs.iter()
            .flat_map(|&(g, f, v)| encode_record_sized(g, f, v, msg_size))
            .collect()
    }

    fn sentinel() -> Record {
        Record {
            gfn: 0xdead,
            flags: 0,
            vcpu_id: None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any bytes at any record size: no panic; Ok appends exactly one record per
        /// `msg_size` bytes, each one inside the uAPI; an error appends nothing.
        #[test]
        fn arbitrary_bytes_parse_or_give_a_typed_error(
            bytes in vec(any::<u8>(), 0..300),
            msg_size in prop_oneof![0..8200usize, 20..40usize],
            prior in 0..3usize,
        ) {
            let mut out = vec![sentinel(); prior];
            match parse_records(&bytes, msg_size, &mut out) {
                Ok(()) => {
                    prop_assert!((USERFAULT_MSG_MIN_SIZE..=MAX_MSG_SIZE).contains(&msg_size));
                    prop_assert_eq!(out.len(), prior + bytes.len() / msg_size);
                    prop_assert!(out[..prior].iter().all(|r| *r == sentinel()));
                    for (r, raw) in out[prior..].iter().zip(bytes.chunks_exact(msg_size)) {
                        prop_assert_eq!(r.flags & !KVM_USERFAULT_MSG_ALL, 0);
                        prop_assert!(r.gfn.checked_mul(1 << PAGE_SHIFT).is_some());
                        // What was parsed is what a writer of this record would have sent.
                        let vcpu = r.vcpu_id.unwrap_or(u32::from_le_bytes(
                            raw[16..20].try_into().unwrap(),
                        ));
                        let again = encode_record_sized(r.gfn, r.flags, vcpu, msg_size);
                        prop_assert_eq!(&again[..USERFAULT_MSG_SIZE], &raw[..USERFAULT_MSG_SIZE]);
                    }
                }
                Err(e) => {
                    prop_assert_eq!(out.len(), prior, "an error appended records: {}", e);
                    if !(USERFAULT_MSG_MIN_SIZE..=MAX_MSG_SIZE).contains(&msg_size) {
                        prop_assert_eq!(e, RecordError::UnsupportedMsgSize(msg_size));
                    } else if bytes.len() % msg_size != 0 {
                        prop_assert_eq!(
                            e,
                            RecordError::Partial { len: bytes.len(), msg_size }
                        );
                    }
                }
            }
        }

        /// Records inside the uAPI round-trip through the encoder at any record size.
        #[test]
        fn valid_records_round_trip(
            recs in vec(valid_record(), 0..12),
            msg_size in record_size(),
        ) {
            let bytes = encode_all(&recs, msg_size);
            let mut out = Vec::new();
            parse_records(&bytes, msg_size, &mut out).unwrap();
            let want: Vec<Record> = recs.iter().map(|&(g, f, v)| expected(g, f, v)).collect();
            prop_assert_eq!(out, want);
        }

        /// Every single-bit flip or byte replacement of a valid read is rejected with the
        /// error naming its record and field, or -- inside a field's valid range, where a
        /// record has no integrity check -- parses into exactly that one changed field.
        #[test]
        fn every_mutation_is_rejected_or_changes_only_its_field(
            recs in vec(valid_record(), 1..5),
            msg_size in record_size(),
            pos in any::<prop::sample::Index>(),
            change in prop_oneof![(0..8u32).prop_map(|b| 1u8 << b), 1..=255u8],
        ) {
            let good = encode_all(&recs, msg_size);
            let mut bad = good.clone();
            let pos = pos.index(bad.len());
            bad[pos] ^= change;
            let (index, off) = (pos / msg_size, pos % msg_size);
            let rec = &bad[index * msg_size..][..msg_size];
            let u32_at = |o: usize| u32::from_le_bytes(rec[o..o + 4].try_into().unwrap());
            let gfn = u64::from_le_bytes(rec[8..16].try_into().unwrap());
            let mut want: Vec<Record> =
                recs.iter().map(|&(g, f, v)| expected(g, f, v)).collect();
            let (g, f, v) = recs[index];
            let outcome = match off {
                0..4 => Err(RecordError::BadSize {
                    index,
                    size: u32_at(0),
                    expected: msg_size,
                }),
                4..8 if u32_at(4) & !KVM_USERFAULT_MSG_ALL != 0 => {
                    Err(RecordError::UnknownFlags { index, flags: u32_at(4) })
                }
                4..8 => {
                    want[index] = expected(g, u32_at(4), v);
                    Ok(want)
                }
                8..16 if gfn > u64::MAX >> PAGE_SHIFT => Err(RecordError::BadGfn { index, gfn }),
                8..16 => {
                    want[index] = expected(gfn, f, v);
                    Ok(want)
                }
                16..20 => {
                    // The vCPU id counts only when the VCPU flag says so.
                    want[index] = expected(g, f, u32_at(16));
                    Ok(want)
                }
                20..24 => Err(RecordError::Reserved { index, value: u32_at(20) }),
                // The tail of a record longer than the known layout is not interpreted.
                _ => Ok(want),
            };
            let mut out = Vec::new();
            let got = parse_records(&bad, msg_size, &mut out).map(|()| out);
            prop_assert_eq!(got, outcome);
        }

        /// A read cut anywhere: a partial record is an error; a cut at a record boundary
        /// (a shorter read) parses the whole records before it.
        #[test]
        fn truncation_is_partial_or_a_prefix(
            recs in vec(valid_record(), 1..5),
            msg_size in record_size(),
            cut in any::<prop::sample::Index>(),
        ) {
            let good = encode_all(&recs, msg_size);
            let len = cut.index(good.len());
            let mut out = Vec::new();
            let got = parse_records(&good[..len], msg_size, &mut out).map(|()| out);
            if len % msg_size == 0 {
                let want: Vec<Record> = recs[..len / msg_size]
                    .iter()
                    .map(|&(g, f, v)| expected(g, f, v))
                    .collect();
                prop_assert_eq!(got, Ok(want));
            } else {
                prop_assert_eq!(got, Err(RecordError::Partial { len, msg_size }));
            }
        }
    }
}
