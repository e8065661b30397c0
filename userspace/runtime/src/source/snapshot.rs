//! The snapshot/image file: a validated header, a per-page checksum table, then the pages.
//!
//! ```text
//! 0      magic "KUFSNAP\0" | version u32 | page_size u32 | page_count u64 | header_sum u64
//! 4096   page_count × u64 checksums (little endian), zero padded to a page boundary
//! data   page_count × 4096 bytes of page contents
//! ```
//! The file's length must be exactly what the header implies. Pages are read with `pread` (a
//! file truncated while in use gives a clear error, never SIGBUS) and checked against their
//! checksum before the handler may expose them.

use super::{check_args, page_checksum, PageSource, SourceError};
use crate::PAGE_SIZE;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The file's first 8 bytes.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"KUFSNAP\0";
/// The format version this crate reads and writes.
pub const SNAPSHOT_VERSION: u32 = 1;
const HEADER_FIELDS: usize = 24;
/// A limit that keeps the checksum table allocation sane (1 TiB of guest memory).
const MAX_PAGES: u64 = 1 << 28;

fn header_sum(fields: &[u8]) -> u64 {
    page_checksum(fields)
}

fn data_offset(pages: u64) -> Option<u64> {
    let table = pages
        .checked_mul(8)?
        .checked_next_multiple_of(PAGE_SIZE as u64)?;
    (PAGE_SIZE as u64).checked_add(table)
}

/// Bytes of the header that mean something (the rest of the first page is zero padding).
const HEADER_LEN: usize = HEADER_FIELDS + 8;

/// The header of a `pages`-page snapshot.
fn encode_header(pages: u64) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
    header[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    header[16..24].copy_from_slice(&pages.to_le_bytes());
    let sum = header_sum(&header[..HEADER_FIELDS]);
    header[24..32].copy_from_slice(&sum.to_le_bytes());
    header
}

/// Why a snapshot header was rejected (inside [`SnapshotError::Header`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The file is shorter than the header page.
    #[error("file of {0} bytes is too short for a {PAGE_SIZE}-byte header")]
    TooShort(u64),
    /// The file does not start with [`SNAPSHOT_MAGIC`].
    #[error("not a snapshot file (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// Another format version.
    #[error("unsupported snapshot version {0} (this build reads version {SNAPSHOT_VERSION})")]
    Version(u32),
    /// Another page size.
    #[error("page size {0} is not {PAGE_SIZE}")]
    PageSize(u32),
    /// The header's checksum does not match its fields.
    #[error("header checksum mismatch (corrupt header)")]
    Checksum,
    /// The page count is 0 or above the limit.
    #[error("page count {0} out of range 1..={MAX_PAGES}")]
    PageCount(u64),
    /// The layout the page count implies overflows.
    #[error("page count overflows")]
    Overflow,
    /// The file's length is not the one the header implies.
    #[error(
        "file is {len} bytes but a {pages}-page snapshot is {expected} bytes ({})",
        if len < expected { "truncated" } else { "trailing data" }
    )]
    Length {
        /// The file's length.
        len: u64,
        /// The header's page count.
        pages: u64,
        /// The length it implies.
        expected: u64,
    },
}

/// Why a snapshot file could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O step on the file failed.
    #[error("snapshot {}: {op}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("cannot open", "reading header", "writing pages", ...).
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The header is not valid.
    #[error("snapshot {}", .path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: HeaderError,
    },
    /// A batch given to [`SnapshotWriter::write_pages`] is not a whole number of pages.
    #[error("snapshot {}: a batch of {len} bytes is not a whole number of pages", .path.display())]
    Batch {
        /// The file.
        path: PathBuf,
        /// The batch's length.
        len: usize,
    },
    /// More pages were written than the snapshot holds.
    #[error("snapshot {}: more than its {pages} pages written", .path.display())]
    TooManyPages {
        /// The file.
        path: PathBuf,
        /// Pages it holds.
        pages: u64,
    },
    /// [`SnapshotWriter::finish`] before every page was written.
    #[error("snapshot {}: finished after {written} of its {pages} pages", .path.display())]
    Unfinished {
        /// The file.
        path: PathBuf,
        /// Pages written.
        written: u64,
        /// Pages it holds.
        pages: u64,
    },
    /// A snapshot of this many pages cannot be written.
    #[error("snapshot {}: {pages} pages is out of range 1..={MAX_PAGES}", .path.display())]
    PageCount {
        /// The file.
        path: PathBuf,
        /// Pages asked for.
        pages: u64,
    },
}

impl SnapshotError {
    fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }
}

/// What a valid header says: the page count and where the pages start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) pages: u64,
    pub(crate) data_offset: u64,
}

/// Validates the first [`HEADER_LEN`] bytes of a file of `len` bytes (their contents do not
/// matter if the file is shorter than a page): magic, version, page size, header checksum,
/// page count, and that the length is exactly what the header implies.
pub(crate) fn parse_header(header: &[u8; HEADER_LEN], len: u64) -> Result<Layout, HeaderError> {
    if len < PAGE_SIZE as u64 {
        return Err(HeaderError::TooShort(len));
    }
    let magic: [u8; 8] = header[0..8].try_into().expect("8 bytes");
    if magic != SNAPSHOT_MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != SNAPSHOT_VERSION {
        return Err(HeaderError::Version(version));
    }
    let page_size = u32_at(12);
    if page_size as usize != PAGE_SIZE {
        return Err(HeaderError::PageSize(page_size));
    }
    if u64_at(24) != header_sum(&header[..HEADER_FIELDS]) {
        return Err(HeaderError::Checksum);
    }
    let pages = u64_at(16);
    if pages == 0 || pages > MAX_PAGES {
        return Err(HeaderError::PageCount(pages));
    }
    let data_offset = data_offset(pages).ok_or(HeaderError::Overflow)?;
    let expected = data_offset + pages * PAGE_SIZE as u64;
    if len != expected {
        return Err(HeaderError::Length {
            len,
            pages,
            expected,
        });
    }
    Ok(Layout { pages, data_offset })
}

/// Writes a snapshot of `pages` pages, page `i` produced by `fill(i, buf)`: `fill` is called
/// once per page, in order, and the bytes it produced are both what is written and what the
/// page's checksum covers (a producer that changes between calls still gives a valid image).
pub fn write_snapshot(
    path: &Path,
    pages: u64,
    mut fill: impl FnMut(u64, &mut [u8]),
) -> Result<(), SnapshotError> {
    let mut w = SnapshotWriter::create(path, pages)?;
    let mut page = vec![0u8; PAGE_SIZE];
    for i in 0..pages {
        fill(i, &mut page);
        w.write_pages(&page)?;
    }
    w.finish()
}

/// Writes a snapshot file as its pages come, in order, in batches of any whole number of
/// pages: each batch goes to the file at once and only its checksums are kept (8 bytes a
/// page), so memory stays bounded whatever the image's size. The checksum table and then the
/// header are written by [`SnapshotWriter::finish`]: a file left unfinished (an error, a
/// crash) has no valid header and is rejected by [`SnapshotSource::open`].
#[derive(Debug)]
pub struct SnapshotWriter {
    out: BufWriter<File>,
    path: PathBuf,
    pages: u64,
    written: u64,
    /// The checksum table, padded to a page boundary.
    table: Vec<u8>,
}

impl SnapshotWriter {
    /// Creates (or truncates) `path` for a snapshot of `pages` pages.
    pub fn create(path: &Path, pages: u64) -> Result<Self, SnapshotError> {
        let data = match data_offset(pages) {
            Some(d) if (1..=MAX_PAGES).contains(&pages) => d,
            _ => {
                return Err(SnapshotError::PageCount {
                    path: path.to_owned(),
                    pages,
                })
            }
        };
        let io = |op| SnapshotError::io(path, op);
        let mut file = File::create(path).map_err(io("creating"))?;
        // The header and table stay a hole (zeros) until `finish`.
        file.seek(SeekFrom::Start(data)).map_err(io("creating"))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, file),
            path: path.to_owned(),
            pages,
            written: 0,
            table: Vec::with_capacity((data - PAGE_SIZE as u64) as usize),
        })
    }

    /// Pages written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends the next `data.len() / PAGE_SIZE` pages (a whole number of them).
    pub fn write_pages(&mut self, data: &[u8]) -> Result<(), SnapshotError> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(SnapshotError::Batch {
                path: self.path.clone(),
                len: data.len(),
            });
        }
        let n = (data.len() / PAGE_SIZE) as u64;
        if self.written + n > self.pages {
            return Err(SnapshotError::TooManyPages {
                path: self.path.clone(),
                pages: self.pages,
            });
        }
        for page in data.chunks_exact(PAGE_SIZE) {
            self.table
                .extend_from_slice(&page_checksum(page).to_le_bytes());
        }
        self.out
            .write_all(data)
            .map_err(SnapshotError::io(&self.path, "writing pages"))?;
        self.written += n;
        Ok(())
    }

    /// Writes the checksum table, then the header, and syncs the file. Fails unless every
    /// page was written.
    pub fn finish(mut self) -> Result<(), SnapshotError> {
        if self.written != self.pages {
            return Err(SnapshotError::Unfinished {
                path: self.path,
                written: self.written,
                pages: self.pages,
            });
        }
        self.table
            .resize(self.table.len().next_multiple_of(PAGE_SIZE), 0);
        let path = &self.path;
        let file = self
            .out
            .into_inner()
            .map_err(|e| SnapshotError::io(path, "writing pages")(e.into_error()))?;
        file.write_all_at(&self.table, PAGE_SIZE as u64)
            .map_err(SnapshotError::io(path, "writing the checksum table"))?;
        file.write_all_at(&encode_header(self.pages), 0)
            .map_err(SnapshotError::io(path, "writing the header"))?;
        file.sync_all().map_err(SnapshotError::io(path, "syncing"))
    }
}

/// A validated snapshot file.
#[derive(Debug)]
pub struct SnapshotSource {
    file: File,
    path: PathBuf,
    pages: u64,
    data_offset: u64,
    checksums: Vec<u64>,
}

impl SnapshotSource {
    /// Opens and validates a snapshot: magic, version, page size, header checksum, and that the
    /// file length is exactly what the header implies.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let io = |op| SnapshotError::io(path, op);
        let file = File::open(path).map_err(io("cannot open"))?;
        let len = file.metadata().map_err(io("cannot stat"))?.len();
        let mut header = [0u8; HEADER_LEN];
        if len >= PAGE_SIZE as u64 {
            file.read_exact_at(&mut header, 0)
                .map_err(io("reading header"))?;
        }
        let Layout { pages, data_offset } =
            parse_header(&header, len).map_err(|source| SnapshotError::Header {
                path: path.to_owned(),
                source,
            })?;
        let mut raw = vec![0u8; pages as usize * 8];
        file.read_exact_at(&mut raw, PAGE_SIZE as u64)
            .map_err(io("reading checksum table"))?;
        let checksums = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok(Self {
            file,
            path: path.to_owned(),
            pages,
            data_offset,
            checksums,
        })
    }
}

impl SnapshotSource {
    /// Reads pages `first..` into `dst` (a whole number of pages, bounds already checked) with
    /// `pread`, retrying only short reads and EINTR. A file that ends early (truncated while
    /// in use) is an [`SourceError::Io`] of kind `UnexpectedEof` naming the first page not
    /// wholly read and the file's length; any other failure is [`SourceError::Io`] naming the
    /// page being read. Nothing else is retried.
    fn read_run(&self, first: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        let off = self.data_offset + first * PAGE_SIZE as u64;
        let mut done = 0usize;
        while done < dst.len() {
            let index = first + (done / PAGE_SIZE) as u64;
            match self.file.read_at(&mut dst[done..], off + done as u64) {
                Ok(0) => {
                    let file_len = self.file.metadata().map_or(off + done as u64, |m| m.len());
                    let page_end = self.data_offset + (index + 1) * PAGE_SIZE as u64;
                    return Err(SourceError::Io {
                        index,
                        source: std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!(
                                "cut short: the file is now {file_len} bytes but the page ends at byte {page_end} (truncated while in use)"
                            ),
                        ),
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(SourceError::Io { index, source }),
            }
        }
        Ok(())
    }
}

impl PageSource for SnapshotSource {
    fn page_count(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        check_args(index, self.pages, dst)?;
        self.read_run(index, dst)?;
        let expected = self.checksums[index as usize];
        let found = page_checksum(dst);
        if found != expected {
            return Err(SourceError::Corrupt {
                index,
                expected,
                found,
            });
        }
        Ok(())
    }

    fn read_pages(&self, first: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        if dst.is_empty() || !dst.len().is_multiple_of(PAGE_SIZE) {
            return Err(SourceError::BadBuffer(dst.len()));
        }
        let n = (dst.len() / PAGE_SIZE) as u64;
        let last = first.saturating_add(n - 1);
        if last >= self.pages {
            return Err(SourceError::OutOfRange {
                index: last,
                pages: self.pages,
            });
        }
        // One pread for the run, then every page checked against its own checksum.
        self.read_run(first, dst)?;
        for (k, page) in dst.chunks_exact(PAGE_SIZE).enumerate() {
            let index = first + k as u64;
            let expected = self.checksums[index as usize];
            let found = page_checksum(page);
            if found != expected {
                return Err(SourceError::Corrupt {
                    index,
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("snapshot {} ({} pages)", self.path.display(), self.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kuf-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn make(name: &str, pages: u64) -> PathBuf {
        let p = tmp(name);
        write_snapshot(&p, pages, |i, b| b.fill(i as u8 ^ 0x5a)).unwrap();
        p
    }

    fn patch(p: &Path, off: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(bytes, off).unwrap();
    }

    fn err(p: &Path) -> String {
        crate::source::error_chain(&SnapshotSource::open(p).unwrap_err())
    }

    #[test]
    fn roundtrip() {
        let p = make("ok", 600); // table spans two pages
        let s = SnapshotSource::open(&p).unwrap();
        assert_eq!(s.page_count(), 600);
        let mut buf = vec![0u8; PAGE_SIZE];
        for i in [0u64, 1, 599] {
            s.read_page(i, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == i as u8 ^ 0x5a));
        }
        assert!(matches!(
            s.read_page(600, &mut buf),
            Err(SourceError::OutOfRange { .. })
        ));
    }

    #[test]
    fn rejects_bad_headers() {
        let p = make("magic", 4);
        patch(&p, 0, b"NOTSNAP!");
        assert!(err(&p).contains("bad magic"), "{}", err(&p));

        let p = make("version", 4);
        patch(&p, 8, &2u32.to_le_bytes());
        assert!(
            err(&p).contains("unsupported snapshot version 2"),
            "{}",
            err(&p)
        );

        let p = make("pagesize", 4);
        patch(&p, 12, &8192u32.to_le_bytes());
        assert!(err(&p).contains("page size 8192"), "{}", err(&p));

        let p = make("count", 4);
        patch(&p, 16, &5u64.to_le_bytes());
        assert!(err(&p).contains("header checksum"), "{}", err(&p));

        let p = tmp("tiny");
        std::fs::write(&p, b"KUFSNAP\0").unwrap();
        assert!(err(&p).contains("too short"), "{}", err(&p));

        assert!(err(&tmp("does-not-exist")).contains("cannot open"));
    }

    #[test]
    fn rejects_truncated_and_padded_files() {
        let p = make("trunc", 4);
        let len = std::fs::metadata(&p).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        assert!(err(&p).contains("truncated"), "{}", err(&p));
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len + 4096)
            .unwrap();
        assert!(err(&p).contains("trailing data"), "{}", err(&p));
    }

    #[test]
    fn corrupt_page_is_an_error_on_read() {
        let p = make("corrupt", 4);
        let data = data_offset(4).unwrap();
        patch(&p, data + 2 * PAGE_SIZE as u64 + 100, &[0xff]);
        let s = SnapshotSource::open(&p).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        s.read_page(1, &mut buf).unwrap();
        assert!(matches!(
            s.read_page(2, &mut buf),
            Err(SourceError::Corrupt { index: 2, .. })
        ));
        // A run read reports the corrupt page inside it, and checks the run's bounds.
        let mut run = vec![0u8; 3 * PAGE_SIZE];
        assert!(matches!(
            s.read_pages(0, &mut run),
            Err(SourceError::Corrupt { index: 2, .. })
        ));
        s.read_pages(0, &mut run[..2 * PAGE_SIZE]).unwrap();
        assert!(run[..2 * PAGE_SIZE].iter().all(|&b| b == 0x5a || b == 0x5b));
        assert!(matches!(
            s.read_pages(2, &mut run),
            Err(SourceError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.read_pages(0, &mut run[..10]),
            Err(SourceError::BadBuffer(10))
        ));
    }

    #[test]
    fn file_truncated_after_open_is_an_io_error_not_sigbus() {
        let p = make("shrink", 4);
        let s = SnapshotSource::open(&p).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 2 * PAGE_SIZE as u64)
            .unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        assert!(matches!(
            s.read_page(3, &mut buf),
            Err(SourceError::Io { index: 3, .. })
        ));
    }

    #[test]
    fn a_producer_that_changes_between_calls_still_writes_a_valid_image() {
        // Every call returns other bytes (a clock, a live guest): the image must hold, and
        // checksum, the bytes of the one call made for each page.
        let mut calls = 0u64;
        let mut produced: Vec<Vec<u8>> = Vec::new();
        let p = tmp("changing");
        write_snapshot(&p, 5, |i, b| {
            calls += 1;
            b.fill((calls * 37 + i) as u8);
            produced.push(b.to_vec());
        })
        .unwrap();
        assert_eq!(calls, 5, "fill is called once per page");
        let s = SnapshotSource::open(&p).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        for (i, want) in produced.iter().enumerate() {
            s.read_page(i as u64, &mut buf).unwrap();
            assert_eq!(&buf, want, "page {i}");
        }
    }

    #[test]
    fn writer_takes_batches_and_an_unfinished_file_does_not_open() {
        let page = |i: u64| vec![i as u8 + 1; PAGE_SIZE];
        let p = tmp("batches");
        let mut w = SnapshotWriter::create(&p, 5).unwrap();
        w.write_pages(&[page(0), page(1), page(2)].concat())
            .unwrap();
        assert_eq!(w.written(), 3);
        assert!(matches!(
            w.write_pages(&[0u8; 100]),
            Err(SnapshotError::Batch { len: 100, .. })
        ));
        assert!(matches!(
            w.write_pages(&[page(3), page(4), page(5)].concat()),
            Err(SnapshotError::TooManyPages { pages: 5, .. })
        ));
        // Stopped before the end: no header, so the file is refused.
        assert!(matches!(
            w.finish(),
            Err(SnapshotError::Unfinished {
                written: 3,
                pages: 5,
                ..
            })
        ));
        assert!(err(&p).contains("bad magic"), "{}", err(&p));
        let mut w = SnapshotWriter::create(&p, 5).unwrap();
        w.write_pages(&page(0)).unwrap();
        w.write_pages(&[page(1), page(2), page(3), page(4)].concat())
            .unwrap();
        w.finish().unwrap();
        let s = SnapshotSource::open(&p).unwrap();
        let mut all = vec![0u8; 5 * PAGE_SIZE];
        s.read_pages(0, &mut all).unwrap();
        assert_eq!(all, (0..5).flat_map(page).collect::<Vec<u8>>());
        assert!(matches!(
            SnapshotWriter::create(&p, 0),
            Err(SnapshotError::PageCount { pages: 0, .. })
        ));
    }

    // ---- Property tests --------------------------------------------------------------------
    //
    // What is integrity-checked: the 32 header bytes (fixed fields, and a checksum over the
    // rest), the file length, and every page against its entry in the checksum table. Not
    // checked (no meaning, never read): the zero padding after the header and after the
    // table. The table itself is not covered by a checksum: a changed entry opens, and the
    // page it describes then fails its read as corrupt -- the caller (the handler) never
    // exposes a page whose read failed.

    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn expected_len(pages: u64) -> u64 {
        data_offset(pages).unwrap() + pages * PAGE_SIZE as u64
    }

    fn any_pages() -> impl Strategy<Value = u64> {
        prop_oneof![1..=600u64, 1..=MAX_PAGES]
    }

    /// A bit flip or a byte replacement (never a no-op).
    fn change() -> impl Strategy<Value = u8> {
        prop_oneof![(0..8u32).prop_map(|b| 1u8 << b), 1..=255u8]
    }

    fn open_err(bytes: &[u8]) -> Result<Vec<Result<(), String>>, HeaderError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = tmp(&format!("prop-{}", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&p, bytes).unwrap();
        let r = SnapshotSource::open(&p);
        std::fs::remove_file(&p).unwrap();
        let s = r.map_err(|e| match e {
            SnapshotError::Header { source, .. } => source,
            e => panic!("not a header error: {e:?}"),
        })?;
        // Every page, one at a time and as one run: Ok, or the error as text.
        let mut page = vec![0u8; PAGE_SIZE];
        let mut reads: Vec<_> = (0..s.page_count())
            .map(|i| s.read_page(i, &mut page).map_err(|e| e.to_string()))
            .collect();
        let mut all = vec![0u8; s.page_count() as usize * PAGE_SIZE];
        reads.push(s.read_pages(0, &mut all).map_err(|e| e.to_string()));
        Ok(reads)
    }

    /// A small snapshot file's bytes, in memory.
    fn small_file(pages: u64, seed: u8) -> Vec<u8> {
        let p = tmp(&format!(
            "small-{pages}-{seed}-{:?}",
            std::thread::current().id()
        ));
        write_snapshot(&p, pages, |i, b| {
            for (k, x) in b.iter_mut().enumerate() {
                *x = (k as u8).wrapping_mul(seed | 1) ^ i as u8;
            }
        })
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any 32 header bytes and any length: no panic, and a header is accepted exactly
        /// when it is the one this crate writes for its page count and the length is exact.
        #[test]
        fn arbitrary_headers_parse_or_give_a_typed_error(
            raw in any::<[u8; HEADER_LEN]>(),
            near in (any_pages(), -5000..5000i64, any::<bool>()),
            len in any::<u64>(),
        ) {
            let (pages, delta, use_near) = near;
            // Mostly random headers are rejected at the magic: also try real ones.
            let header = if use_near { encode_header(pages) } else { raw };
            let len = if use_near { expected_len(pages).saturating_add_signed(delta) } else { len };
            match parse_header(&header, len) {
                Ok(l) => {
                    prop_assert_eq!(header, encode_header(l.pages));
                    prop_assert_eq!(len, expected_len(l.pages));
                    prop_assert_eq!(l.data_offset, data_offset(l.pages).unwrap());
                }
                Err(HeaderError::TooShort(n)) => prop_assert!(n == len && n < PAGE_SIZE as u64),
                Err(HeaderError::Length { len: n, pages: p, expected }) => {
                    prop_assert_eq!(n, len);
                    prop_assert_eq!(expected, expected_len(p));
                    prop_assert_ne!(n, expected);
                }
                Err(e) => prop_assert!(header != encode_header(u64::from_le_bytes(
                    header[16..24].try_into().unwrap())), "{}", e),
            }
        }

        /// Every valid header round-trips.
        #[test]
        fn headers_round_trip(pages in any_pages()) {
            prop_assert_eq!(
                parse_header(&encode_header(pages), expected_len(pages)),
                Ok(Layout { pages, data_offset: data_offset(pages).unwrap() })
            );
        }

        /// Every change of one header byte is rejected with the error of its field (the page
        /// count and the checksum both under the checksum), and any other length than the
        /// exact one is too short, truncated or trailing data.
        #[test]
        fn every_header_mutation_is_rejected(
            pages in any_pages(),
            pos in 0..HEADER_LEN,
            change in change(),
            len_delta in -100_000..100_000i64,
        ) {
            let mut h = encode_header(pages);
            h[pos] ^= change;
            let len = expected_len(pages);
            let want = match pos {
                0..8 => HeaderError::BadMagic(h[0..8].try_into().unwrap()),
                8..12 => HeaderError::Version(u32::from_le_bytes(h[8..12].try_into().unwrap())),
                12..16 => HeaderError::PageSize(u32::from_le_bytes(h[12..16].try_into().unwrap())),
                _ => HeaderError::Checksum,
            };
            prop_assert_eq!(parse_header(&h, len), Err(want));
            prop_assume!(len_delta != 0);
            let bad_len = len.saturating_add_signed(len_delta);
            let want = if bad_len < PAGE_SIZE as u64 {
                HeaderError::TooShort(bad_len)
            } else {
                HeaderError::Length { len: bad_len, pages, expected: len }
            };
            prop_assert_eq!(parse_header(&encode_header(pages), bad_len), Err(want));
        }
    }

    proptest! {
        // Each case writes and opens a file: fewer cases.
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// One changed byte anywhere in a small snapshot file: the header is rejected with
        /// its field's error; a changed checksum-table entry or page byte opens but fails
        /// exactly that page's read as corrupt (and the run read with it); a change in the
        /// padding is harmless. Every other page reads back intact.
        #[test]
        fn every_file_mutation_is_rejected_or_fails_that_page(
            pages in 1..=3u64,
            seed in any::<u8>(),
            pos in any::<prop::sample::Index>(),
            change in change(),
        ) {
            let good = small_file(pages, seed);
            prop_assert!(open_err(&good).unwrap().iter().all(|r| r.is_ok()));
            let mut bad = good.clone();
            let pos = pos.index(bad.len());
            bad[pos] ^= change;
            let data = data_offset(pages).unwrap() as usize;
            let table = PAGE_SIZE..PAGE_SIZE + pages as usize * 8;
            let got = open_err(&bad);
            let corrupt_page = if pos < HEADER_LEN {
                prop_assert!(got.is_err(), "header byte {} changed, yet it opened", pos);
                let e = got.unwrap_err();
                let ok = match pos {
                    0..8 => matches!(e, HeaderError::BadMagic(_)),
                    8..12 => matches!(e, HeaderError::Version(_)),
                    12..16 => matches!(e, HeaderError::PageSize(_)),
                    _ => e == HeaderError::Checksum,
                };
                prop_assert!(ok, "byte {}: {}", pos, e);
                return Ok(());
            } else if table.contains(&pos) {
                Some(((pos - PAGE_SIZE) / 8) as u64)
            } else if pos >= data {
                Some(((pos - data) / PAGE_SIZE) as u64)
            } else {
                None // padding
            };
            let reads = got.unwrap();
            for (i, r) in reads[..pages as usize].iter().enumerate() {
                if Some(i as u64) == corrupt_page {
                    let e = r.as_ref().unwrap_err();
                    prop_assert!(e.starts_with(&format!("page {i} is corrupt")), "{}", e);
                } else {
                    prop_assert!(r.is_ok(), "page {}: {:?}", i, r);
                }
            }
            prop_assert_eq!(reads[pages as usize].is_err(), corrupt_page.is_some());
        }

        /// A file cut or extended anywhere is rejected at open.
        #[test]
        fn truncated_or_extended_files_are_rejected(
            pages in 1..=3u64,
            new_len in 0..6 * PAGE_SIZE,
        ) {
            let mut f = small_file(pages, 1);
            let full = f.len();
            prop_assume!(new_len != full);
            f.resize(new_len, 0);
            let e = open_err(&f).unwrap_err();
            if new_len < PAGE_SIZE {
                prop_assert_eq!(e, HeaderError::TooShort(new_len as u64));
            } else {
                prop_assert_eq!(e, HeaderError::Length {
                    len: new_len as u64,
                    pages,
                    expected: full as u64,
                });
            }
        }
    }
}
