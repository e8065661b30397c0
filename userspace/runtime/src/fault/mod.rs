//! Fault inputs: userfault records (parsed from the KVM userfault fd), the io_uring reader that
//! drains them in batches, and the userfaultfd layer.

pub mod records;
pub mod ring;
pub mod uffd;

pub use records::{parse_records, Access, Record, RecordError};
pub use ring::{AsyncReader, ReaderError, ReaderExit, StopSignal};
