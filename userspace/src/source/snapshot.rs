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
use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
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

/// Writes a snapshot of `pages` pages, page `i` produced by `fill(i, buf)`.
pub fn write_snapshot(path: &Path, pages: u64, mut fill: impl FnMut(u64, &mut [u8])) -> Result<()> {
    ensure!(
        pages > 0 && pages <= MAX_PAGES,
        "snapshot of {pages} pages is out of range"
    );
    let mut write = || -> Result<()> {
        let f = File::create(path)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let mut header = vec![0u8; PAGE_SIZE];
        header[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
        header[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        header[16..24].copy_from_slice(&pages.to_le_bytes());
        let sum = header_sum(&header[..HEADER_FIELDS]);
        header[24..32].copy_from_slice(&sum.to_le_bytes());
        w.write_all(&header)?;
        let mut page = vec![0u8; PAGE_SIZE];
        let mut table = Vec::with_capacity((data_offset(pages).unwrap() as usize) - PAGE_SIZE);
        for i in 0..pages {
            fill(i, &mut page);
            table.extend_from_slice(&page_checksum(&page).to_le_bytes());
        }
        table.resize(table.len().next_multiple_of(PAGE_SIZE), 0);
        w.write_all(&table)?;
        for i in 0..pages {
            fill(i, &mut page);
            w.write_all(&page)?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    };
    write().with_context(|| format!("writing snapshot {}", path.display()))
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
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path).with_context(|| format!("snapshot {}", path.display()))
    }

    fn open_inner(path: &Path) -> Result<Self> {
        let file = File::open(path).context("cannot open")?;
        let len = file.metadata().context("cannot stat")?.len();
        ensure!(
            len >= PAGE_SIZE as u64,
            "file of {len} bytes is too short for a {PAGE_SIZE}-byte header"
        );
        let mut header = [0u8; 32];
        file.read_exact_at(&mut header, 0)
            .context("reading header")?;
        if header[0..8] != SNAPSHOT_MAGIC {
            bail!("not a snapshot file (bad magic {:02x?})", &header[0..8]);
        }
        let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        ensure!(
            version == SNAPSHOT_VERSION,
            "unsupported snapshot version {version} (this build reads version {SNAPSHOT_VERSION})"
        );
        let page_size = u32_at(12);
        ensure!(
            page_size as usize == PAGE_SIZE,
            "page size {page_size} is not {PAGE_SIZE}"
        );
        let sum = u64_at(24);
        ensure!(
            sum == header_sum(&header[..HEADER_FIELDS]),
            "header checksum mismatch (corrupt header)"
        );
        let pages = u64_at(16);
        ensure!(
            pages > 0 && pages <= MAX_PAGES,
            "page count {pages} out of range 1..={MAX_PAGES}"
        );
        let data_offset = data_offset(pages).context("page count overflows")?;
        let expected = data_offset + pages * PAGE_SIZE as u64;
        ensure!(
            len == expected,
            "file is {len} bytes but a {pages}-page snapshot is {expected} bytes ({})",
            if len < expected {
                "truncated"
            } else {
                "trailing data"
            }
        );
        let mut raw = vec![0u8; pages as usize * 8];
        file.read_exact_at(&mut raw, PAGE_SIZE as u64)
            .context("reading checksum table")?;
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

impl PageSource for SnapshotSource {
    fn page_count(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, index: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        check_args(index, self.pages, dst)?;
        let off = self.data_offset + index * PAGE_SIZE as u64;
        self.file
            .read_exact_at(dst, off)
            .map_err(|source| SourceError::Io { index, source })?;
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
        let off = self.data_offset + first * PAGE_SIZE as u64;
        self.file
            .read_exact_at(dst, off)
            .map_err(|source| SourceError::Io {
                index: first,
                source,
            })?;
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
        format!("{:#}", SnapshotSource::open(p).unwrap_err())
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
}
