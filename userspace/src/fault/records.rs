//! Parsing `struct kvm_userfault_msg` records. The kernel is trusted to follow the uAPI, but a
//! record that does not is a clear error, never a panic or a silently wrong gfn.

use crate::uapi::{
    kvm_userfault_msg, KVM_USERFAULT_MSG_ALL, KVM_USERFAULT_MSG_VCPU, USERFAULT_MSG_SIZE,
};

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

/// A malformed read result.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The read returned a partial record.
    #[error("read of {0} bytes is not a whole number of {USERFAULT_MSG_SIZE}-byte records")]
    Partial(usize),
    /// A record's size field is wrong.
    #[error("record {index}: size field {size}, expected {USERFAULT_MSG_SIZE}")]
    BadSize {
        /// Record position in the read.
        index: usize,
        /// The size field.
        size: u32,
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
}

/// Parses the bytes of one `read()` into records, appending to `out`.
pub fn parse_records(bytes: &[u8], out: &mut Vec<Record>) -> Result<(), RecordError> {
    if !bytes.len().is_multiple_of(USERFAULT_MSG_SIZE) {
        return Err(RecordError::Partial(bytes.len()));
    }
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    for (index, r) in bytes.chunks_exact(USERFAULT_MSG_SIZE).enumerate() {
        let size = u32_at(r, 0);
        if size as usize != USERFAULT_MSG_SIZE {
            return Err(RecordError::BadSize { index, size });
        }
        let flags = u32_at(r, 4);
        if flags & !KVM_USERFAULT_MSG_ALL != 0 {
            return Err(RecordError::UnknownFlags { index, flags });
        }
        let reserved = u32_at(r, 20);
        if reserved != 0 {
            return Err(RecordError::Reserved {
                index,
                value: reserved,
            });
        }
        let mut gfn = [0u8; 8];
        gfn.copy_from_slice(&r[8..16]);
        out.push(Record {
            gfn: u64::from_le_bytes(gfn),
            flags,
            vcpu_id: (flags & KVM_USERFAULT_MSG_VCPU != 0).then(|| u32_at(r, 16)),
        });
    }
    Ok(())
}

/// Encodes a record as the kernel would (tests, benchmarks, fake producers).
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
        parse_records(&buf, &mut out).unwrap();
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
        parse_records(&[], &mut out).unwrap();
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn rejects_malformed_records() {
        let mut out = Vec::new();
        let good = encode_record(1, KVM_USERFAULT_MSG_READ, 0);
        assert_eq!(
            parse_records(&good[..23], &mut out),
            Err(RecordError::Partial(23))
        );

        let mut bad = good;
        bad[0] = 16;
        let mut two = good.to_vec();
        two.extend(bad);
        assert_eq!(
            parse_records(&two, &mut out),
            Err(RecordError::BadSize { index: 1, size: 16 })
        );

        let bad = encode_record(1, 1 << 9, 0);
        assert_eq!(
            parse_records(&bad, &mut out),
            Err(RecordError::UnknownFlags {
                index: 0,
                flags: 1 << 9
            })
        );

        let mut bad = good;
        bad[21] = 1;
        assert_eq!(
            parse_records(&bad, &mut out),
            Err(RecordError::Reserved {
                index: 0,
                value: 0x100
            })
        );
    }
}
