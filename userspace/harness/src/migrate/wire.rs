//! The migration channel: one TCP connection from the source to the destination carrying
//! length-prefixed, checksummed frames (little-endian). The page server the destination
//! demand-pages from after the switch-over is a second connection, the runtime's remote
//! protocol (`kvm_userfault::source::remote`).
//!
//! Frame: tag (u32), payload length (u32), payload, checksum of the payload (u64,
//! [`page_checksum`]). Nothing read from the peer is trusted: lengths are bounded, every field
//! is checked, and a bad frame is a [`WireError`], never a panic.

use super::vcpu_state::{VcpuState, VcpuStateError};
use kvm_userfault::source::page_checksum;
use kvm_userfault::PAGE_SIZE;
use std::io::{self, Read, Write};

/// "KUFM": the hello's magic.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KUFM");
/// The only protocol version spoken.
pub const VERSION: u32 = 1;
/// Largest frame accepted (a run of pages, or the switch-over with its bitmap).
pub const MAX_FRAME: usize = 16 << 20;
/// Most pages in one `Pages` frame.
pub const MAX_RUN: usize = 256;

const TAG_HELLO: u32 = 1;
const TAG_PAGES: u32 = 2;
const TAG_ROUND: u32 = 3;
const TAG_STOP: u32 = 4;
const TAG_SWITCH: u32 = 5;
const TAG_DONE: u32 = 6;

/// What the source announces first: the VM layout (the destination builds the same VM) and
/// where its page server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// vCPUs (writers), each sweeping `pages / vcpus` pages (the last one the rest).
    pub vcpus: u32,
    /// Pages of the data region.
    pub pages: u64,
    /// Guest physical base of the data region.
    pub data_gpa: u64,
    /// Pattern seed.
    pub seed: u64,
    /// The writers' throttle (spin iterations per page).
    pub delay: u64,
    /// Size of the system memslot: it must match the destination's.
    pub sys_size: u64,
    /// The address of the writer guest's code: the destination must run the same binary at
    /// the same address (the guest's page tables map the image at its host addresses).
    pub guest_fn: u64,
    /// TCP port of the page server on the source's address.
    pub page_port: u16,
}

/// One message.
#[derive(Debug, PartialEq)]
pub enum Msg {
    /// Source → destination, first.
    Hello(Hello),
    /// A run of pages of memslot `slot` (0: system, 1: data) from page `first`.
    Pages {
        /// Memslot.
        slot: u32,
        /// First page (slot-relative).
        first: u64,
        /// Whole pages.
        data: Vec<u8>,
    },
    /// The end of a pre-copy round.
    RoundEnd {
        /// Round number (0 = the full copy).
        round: u32,
        /// Data pages it sent.
        data_pages: u64,
    },
    /// The source is stopping its vCPUs now (downtime starts).
    Stop,
    /// The vCPUs' state and the final dirty bitmap of the data slot (the system slot's final
    /// dirty pages were sent as `Pages` just before).
    SwitchOver {
        /// Per vCPU, in order.
        vcpus: Vec<VcpuState>,
        /// One bit per data page (LSB first in u64 words): dirty since it was last sent.
        dirty: Vec<u64>,
    },
    /// Destination → source: the migration is over (the guest verified its memory, or not).
    Done {
        /// Every page verified.
        ok: bool,
        /// A one-line summary or the error.
        message: String,
    },
}

/// A bad or failed channel.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed.
    #[error("migration channel: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("migration channel: the peer closed the connection")]
    Closed,
    /// The peer sent nothing within the channel's timeout (it is hung, not slow).
    #[error("migration channel: the peer sent nothing within the channel's timeout (hung?)")]
    Silent,
    /// A frame longer than [`MAX_FRAME`].
    #[error("migration channel: frame of {0} bytes is too large")]
    TooLarge(usize),
    /// The checksum does not match the payload.
    #[error("migration channel: frame (tag {tag}) fails its checksum")]
    Checksum {
        /// The frame's tag.
        tag: u32,
    },
    /// A frame that does not parse.
    #[error("migration channel: malformed {what} frame: {why}")]
    Malformed {
        /// Which frame.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A vCPU state that does not parse.
    #[error("migration channel: {0}")]
    VcpuState(#[from] VcpuStateError),
    /// An unknown tag, magic or version.
    #[error("migration channel: {0}")]
    Protocol(String),
}

/// A bounded reader over a payload.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed {
                what: self.what,
                why: format!("{} bytes left, {n} needed", self.buf.len()),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn end(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed {
                what: self.what,
                why: format!("{} trailing bytes", self.buf.len()),
            })
        }
    }
}

impl Msg {
    fn encode(&self) -> (u32, Vec<u8>) {
        let mut p = Vec::new();
        let tag = match self {
            Msg::Hello(h) => {
                for v in [MAGIC, VERSION, h.vcpus] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                for v in [h.pages, h.data_gpa, h.seed, h.delay, h.sys_size, h.guest_fn] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                p.extend_from_slice(&h.page_port.to_le_bytes());
                TAG_HELLO
            }
            Msg::Pages { slot, first, data } => {
                p.extend_from_slice(&slot.to_le_bytes());
                p.extend_from_slice(&first.to_le_bytes());
                p.extend_from_slice(data);
                TAG_PAGES
            }
            Msg::RoundEnd { round, data_pages } => {
                p.extend_from_slice(&round.to_le_bytes());
                p.extend_from_slice(&data_pages.to_le_bytes());
                TAG_ROUND
            }
            Msg::Stop => TAG_STOP,
            Msg::SwitchOver { vcpus, dirty } => {
                p.extend_from_slice(&(vcpus.len() as u32).to_le_bytes());
                for v in vcpus {
                    v.encode(&mut p);
                }
                p.extend_from_slice(&(dirty.len() as u64).to_le_bytes());
                for w in dirty {
                    p.extend_from_slice(&w.to_le_bytes());
                }
                TAG_SWITCH
            }
            Msg::Done { ok, message } => {
                p.push(u8::from(*ok));
                p.extend_from_slice(message.as_bytes());
                TAG_DONE
            }
        };
        (tag, p)
    }

    fn decode(tag: u32, payload: &[u8]) -> Result<Msg, WireError> {
        let what = match tag {
            TAG_HELLO => "hello",
            TAG_PAGES => "pages",
            TAG_ROUND => "round",
            TAG_STOP => "stop",
            TAG_SWITCH => "switch-over",
            TAG_DONE => "done",
            t => return Err(WireError::Protocol(format!("unknown frame tag {t}"))),
        };
        let mut c = Cursor { buf: payload, what };
        let m = match tag {
            TAG_HELLO => {
                let (magic, version) = (c.u32()?, c.u32()?);
                if magic != MAGIC {
                    return Err(WireError::Protocol(format!("bad magic {magic:#x}")));
                }
                if version != VERSION {
                    return Err(WireError::Protocol(format!(
                        "peer speaks version {version}, we speak only {VERSION}"
                    )));
                }
                Msg::Hello(Hello {
                    vcpus: c.u32()?,
                    pages: c.u64()?,
                    data_gpa: c.u64()?,
                    seed: c.u64()?,
                    delay: c.u64()?,
                    sys_size: c.u64()?,
                    guest_fn: c.u64()?,
                    page_port: c.u16()?,
                })
            }
            TAG_PAGES => {
                let slot = c.u32()?;
                let first = c.u64()?;
                let data = c.take(c.buf.len())?.to_vec();
                if data.is_empty()
                    || !data.len().is_multiple_of(PAGE_SIZE)
                    || data.len() > MAX_RUN * PAGE_SIZE
                {
                    return Err(WireError::Malformed {
                        what,
                        why: format!("{} bytes is not 1..={MAX_RUN} pages", data.len()),
                    });
                }
                Msg::Pages { slot, first, data }
            }
            TAG_ROUND => Msg::RoundEnd {
                round: c.u32()?,
                data_pages: c.u64()?,
            },
            TAG_STOP => Msg::Stop,
            TAG_SWITCH => {
                let n = c.u32()? as usize;
                let mut vcpus = Vec::new();
                for _ in 0..n {
                    // Each state has a minimum size, so a bogus count runs out of bytes.
                    let (v, rest) = VcpuState::decode(c.buf)?;
                    c.buf = rest;
                    vcpus.push(v);
                }
                let words = c.u64()?;
                if words.checked_mul(8) != Some(c.buf.len() as u64) {
                    return Err(WireError::Malformed {
                        what,
                        why: format!("{words} bitmap words in {} bytes", c.buf.len()),
                    });
                }
                let dirty = (0..words).map(|_| c.u64()).collect::<Result<_, _>>()?;
                Msg::SwitchOver { vcpus, dirty }
            }
            TAG_DONE => {
                let ok = c.take(1)?[0] != 0;
                let message = String::from_utf8_lossy(c.take(c.buf.len())?).into_owned();
                Msg::Done { ok, message }
            }
            _ => unreachable!("tag checked above"),
        };
        c.end()?;
        Ok(m)
    }
}

/// Writes one frame.
pub fn send(w: &mut impl Write, m: &Msg) -> Result<(), WireError> {
    let (tag, p) = m.encode();
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&tag.to_le_bytes());
    head[4..].copy_from_slice(&(p.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(&p)?;
    w.write_all(&page_checksum(&p).to_le_bytes())?;
    Ok(())
}

/// A socket read timeout: EAGAIN/EWOULDBLOCK (what SO_RCVTIMEO gives) or ETIMEDOUT.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads one frame.
pub fn recv(r: &mut impl Read) -> Result<Msg, WireError> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) if is_timeout(&e) => return Err(WireError::Silent),
        r => r?,
    }
    let tag = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut p = vec![0u8; len];
    let mut sum = [0u8; 8];
    r.read_exact(&mut p)
        .and_then(|_| r.read_exact(&mut sum))
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ if is_timeout(&e) => WireError::Silent,
            _ => WireError::Io(e),
        })?;
    if u64::from_le_bytes(sum) != page_checksum(&p) {
        return Err(WireError::Checksum { tag });
    }
    Msg::decode(tag, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: &Msg) -> Msg {
        let mut buf = Vec::new();
        send(&mut buf, m).unwrap();
        recv(&mut &buf[..]).unwrap()
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_errors() {
        let hello = Msg::Hello(Hello {
            vcpus: 3,
            pages: 4096,
            data_gpa: 1 << 30,
            seed: 7,
            delay: 11,
            sys_size: 64 << 20,
            guest_fn: 0xdead_beef,
            page_port: 4242,
        });
        let pages = Msg::Pages {
            slot: 1,
            first: 9,
            data: vec![5u8; 2 * PAGE_SIZE],
        };
        let switch = Msg::SwitchOver {
            vcpus: vec![],
            dirty: vec![1, 2, 3],
        };
        let done = Msg::Done {
            ok: false,
            message: "lost page".into(),
        };
        for m in [hello, switch, done, Msg::Stop] {
            assert_eq!(roundtrip(&m), m);
        }
        assert_eq!(roundtrip(&pages), pages);
        let mut buf = Vec::new();
        send(&mut buf, &pages).unwrap();
        // A flipped payload byte fails the checksum.
        let mut bad = buf.clone();
        bad[20] ^= 1;
        assert!(matches!(
            recv(&mut &bad[..]),
            Err(WireError::Checksum { tag: 2 })
        ));
        // A truncated frame is the peer closing, not a panic.
        assert!(matches!(
            recv(&mut &buf[..buf.len() - 3]),
            Err(WireError::Closed)
        ));
        // A length beyond the bound is refused before anything is allocated.
        let mut huge = buf.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(recv(&mut &huge[..]), Err(WireError::TooLarge(_))));
        // A partial page.
        let partial = Msg::Pages {
            slot: 1,
            first: 0,
            data: vec![0u8; 100],
        };
        let mut buf = Vec::new();
        send(&mut buf, &partial).unwrap();
        assert!(matches!(
            recv(&mut &buf[..]),
            Err(WireError::Malformed { what: "pages", .. })
        ));
        // A switch-over claiming more vCPUs than it carries.
        let mut p = 5u32.to_le_bytes().to_vec();
        p.extend_from_slice(&0u64.to_le_bytes());
        assert!(Msg::decode(TAG_SWITCH, &p).is_err());
        assert!(matches!(Msg::decode(99, &[]), Err(WireError::Protocol(_))));
    }
}
