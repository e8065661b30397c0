//! Where page contents come from: one trait, several sources.
//!
//! A source writes a whole page into a caller-provided buffer or reports an error; the handler
//! makes a page visible to the guest only after `read_page` returned `Ok`, so a short, corrupt
//! or failing source can never leave a guest-visible page with wrong or partial contents.

mod remote;
mod snapshot;

pub use remote::{
    frame_checksum, serve, serve_connection, FrameError, RemoteError, RemoteOptions, RemoteSource,
    ServeError, MAX_QUEUED_PAGES, PROTOCOL_VERSION,
};
pub use snapshot::{
    write_snapshot, HeaderError, SnapshotError, SnapshotSource, SnapshotWriter, SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
};

use crate::PAGE_SIZE;

/// How soon pages passed to [`PageSource::request`] are needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// A vCPU (or KVM) is waiting on them.
    Demand,
    /// Background prefetch: serve after any demand request.
    Prefetch,
}

/// Why a page could not be supplied.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The page index is beyond the source.
    #[error("page {index} is beyond the source's {pages} pages")]
    OutOfRange {
        /// Requested page.
        index: u64,
        /// Pages the source has.
        pages: u64,
    },
    /// The destination buffer is not one page.
    #[error("destination buffer of {0} bytes is not one page")]
    BadBuffer(usize),
    /// Reading the backing file failed or came up short.
    #[error("reading page {index}: {source}")]
    Io {
        /// Page being read.
        index: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The contents do not match their checksum.
    #[error("page {index} is corrupt: checksum {found:#018x}, expected {expected:#018x}")]
    Corrupt {
        /// Page being read.
        index: u64,
        /// Checksum recorded by the producer.
        expected: u64,
        /// Checksum of the bytes received.
        found: u64,
    },
    /// The remote source failed (protocol violation, disconnect, timeout, server error): its
    /// first failure, which every later read of the source returns again.
    #[error("remote source: {0}")]
    Remote(RemoteError),
}

/// An in-memory image whose length is not a whole number of pages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("in-memory image of {len} bytes is not a whole number of {PAGE_SIZE}-byte pages")]
pub struct NotWholePages {
    /// The image's length.
    pub len: usize,
}

/// A provider of guest page contents.
pub trait PageSource: Send + Sync {
    /// Number of pages the source holds.
    fn page_count(&self) -> u64;
    /// Writes page `index` into `dst` (exactly [`PAGE_SIZE`] bytes). On error `dst` may hold
    /// anything; the caller must not expose it.
    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError>;
    /// Writes pages `first..first + dst.len() / PAGE_SIZE` into `dst` (a whole number of
    /// pages). Sources override it to read a contiguous run with one call.
    fn read_pages(&self, first: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        if dst.is_empty() || !dst.len().is_multiple_of(PAGE_SIZE) {
            return Err(SourceError::BadBuffer(dst.len()));
        }
        for (k, page) in dst.chunks_exact_mut(PAGE_SIZE).enumerate() {
            self.read_page(first + k as u64, page)?;
        }
        Ok(())
    }
    /// Announces pages that will be read soon, so a remote source can pipeline requests.
    fn request(&self, _indices: &[u64], _urgency: Urgency) {}
    /// A short description for logs.
    fn describe(&self) -> String;
}

fn check_args(index: u64, pages: u64, dst: &[u8]) -> Result<(), SourceError> {
    if dst.len() != PAGE_SIZE {
        return Err(SourceError::BadBuffer(dst.len()));
    }
    if index >= pages {
        return Err(SourceError::OutOfRange { index, pages });
    }
    Ok(())
}

/// Every page reads as zeros (a fresh VM's memory).
#[derive(Debug, Clone)]
pub struct ZeroSource {
    pages: u64,
}

impl ZeroSource {
    /// A zero source of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self { pages }
    }
}

impl PageSource for ZeroSource {
    fn page_count(&self) -> u64 {
        self.pages
    }
    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        check_args(index, self.pages, dst)?;
        dst.fill(0);
        Ok(())
    }
    fn describe(&self) -> String {
        format!("zero pages ({} pages)", self.pages)
    }
}

/// Pages held in memory (tests, benchmarks, an already-loaded image).
#[derive(Debug, Clone)]
pub struct MemorySource {
    data: Vec<u8>,
}

impl MemorySource {
    /// Wraps `data`, whose length must be a multiple of the page size.
    pub fn new(data: Vec<u8>) -> Result<Self, NotWholePages> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(NotWholePages { len: data.len() });
        }
        Ok(Self { data })
    }
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

impl PageSource for MemorySource {
    fn page_count(&self) -> u64 {
        (self.data.len() / PAGE_SIZE) as u64
    }
    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        check_args(index, self.page_count(), dst)?;
        let off = index as usize * PAGE_SIZE;
        dst.copy_from_slice(&self.data[off..off + PAGE_SIZE]);
        Ok(())
    }
    fn read_pages(&self, first: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        if dst.is_empty() || !dst.len().is_multiple_of(PAGE_SIZE) {
            return Err(SourceError::BadBuffer(dst.len()));
        }
        let n = (dst.len() / PAGE_SIZE) as u64;
        let last = first.saturating_add(n - 1);
        if last >= self.page_count() {
            return Err(SourceError::OutOfRange {
                index: last,
                pages: self.page_count(),
            });
        }
        let off = first as usize * PAGE_SIZE;
        dst.copy_from_slice(&self.data[off..off + dst.len()]);
        Ok(())
    }
    fn describe(&self) -> String {
        format!("memory image ({} pages)", self.page_count())
    }
}

/// An error and its causes, one line (what anyhow's `{:#}` prints), for tests that look for
/// a cause's words.
#[cfg(test)]
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

const CK_PRIME: u64 = 0x9E37_79B9_7F4A_7C15;

/// A fast 64-bit checksum of a page (four independent multiply-rotate lanes so it runs at
/// memory speed). It detects corruption and truncation; it is not an authenticator.
pub fn page_checksum(data: &[u8]) -> u64 {
    let mut lanes: [u64; 4] = [
        0x243F_6A88_85A3_08D3,
        0x1319_8A2E_0370_7344,
        0xA409_3822_299F_31D0,
        0x082E_FA98_EC4E_6C89,
    ];
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&c[i * 8..i * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(w))
                .wrapping_mul(CK_PRIME)
                .rotate_left(29);
        }
    }
    let mut h = data.len() as u64;
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(CK_PRIME);
    }
    for l in lanes {
        h = (h ^ l).wrapping_mul(CK_PRIME).rotate_left(31);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_detects_single_bit_flips_and_length() {
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();
        let base = page_checksum(&page);
        for pos in [0, 1, 8, 31, 32, 2048, PAGE_SIZE - 1] {
            let mut p = page.clone();
            p[pos] ^= 0x10;
            assert_ne!(page_checksum(&p), base, "flip at {pos}");
        }
        assert_ne!(page_checksum(&page[..PAGE_SIZE - 8]), base);
        assert_ne!(page_checksum(&[0u8; 4096]), page_checksum(&[0u8; 4088]));
    }

    #[test]
    fn zero_and_memory_sources_check_arguments() {
        let z = ZeroSource::new(2);
        let mut buf = vec![1u8; PAGE_SIZE];
        z.read_page(1, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(matches!(
            z.read_page(2, &mut buf),
            Err(SourceError::OutOfRange { index: 2, pages: 2 })
        ));
        assert!(matches!(
            z.read_page(0, &mut buf[..100]),
            Err(SourceError::BadBuffer(100))
        ));
        assert_eq!(
            MemorySource::new(vec![0; 100]).unwrap_err(),
            NotWholePages { len: 100 }
        );
        let m = MemorySource::new(
            (0..2 * PAGE_SIZE)
                .map(|i| (i / PAGE_SIZE) as u8 + 1)
                .collect(),
        )
        .unwrap();
        m.read_page(1, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 2));
    }
}
