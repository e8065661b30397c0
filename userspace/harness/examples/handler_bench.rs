//! Handler micro-benchmark on a synthetic record stream: parse records (as read from the
//! userfault fd), look up the gfn, claim it, copy 4 KiB from an in-memory image into guest
//! memory, resolve (a no-op: the kernel's clear cost is excluded) and mark it present.
//! One thread. Run: `cargo run --release -p kvm-userfault-harness --example handler_bench [PAGES] [ROUNDS]`

use kvm_userfault::fault::records::{encode_record, parse_records};
use kvm_userfault::handler::{Handler, Install, NoopResolver, Region, Scratch};
use kvm_userfault::source::MemorySource;
use kvm_userfault::uapi::{
    KVM_USERFAULT_MSG_GUEST, KVM_USERFAULT_MSG_READ, KVM_USERFAULT_MSG_VCPU, USERFAULT_MSG_SIZE,
};
use kvm_userfault::PAGE_SIZE;
use std::sync::Arc;
use std::time::{Duration, Instant};

const GPA: u64 = 1 << 30;
const RECORDS_PER_READ: usize = 64;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let pages: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(32768);
    let rounds: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);

    let image: Vec<u8> = (0..pages * PAGE_SIZE)
        .map(|i| ((i * 131) >> 7) as u8)
        .collect();
    let source = Arc::new(MemorySource::new(image)?);
    let mut guest = vec![0u8; pages * PAGE_SIZE];

    // A shuffled fault order (xorshift), so runs rarely coalesce: the worst case per record.
    let mut order: Vec<u64> = (0..pages as u64).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let flags = KVM_USERFAULT_MSG_READ | KVM_USERFAULT_MSG_VCPU | KVM_USERFAULT_MSG_GUEST;
    let mut stream = Vec::with_capacity(pages * USERFAULT_MSG_SIZE);
    for (k, &p) in order.iter().enumerate() {
        stream.extend(encode_record((GPA >> 12) + p, flags, (k % 8) as u32));
    }

    let mut best = Duration::MAX;
    let mut total = Duration::ZERO;
    for _ in 0..rounds {
        guest.fill(0);
        let region = Region {
            gpa: GPA,
            size: (pages * PAGE_SIZE) as u64,
            host: guest.as_mut_ptr() as usize,
            fill_alias: None,
            source_first_page: 0,
        };
        // SAFETY: `guest` is a Vec that outlives `h` (dropped at the end of the round) and is not borrowed while `h` writes into it.
        let h = unsafe {
            Handler::new(
                vec![region],
                source.clone(),
                Install::Direct(Box::new(NoopResolver)),
            )
        }?;
        let mut scratch = Scratch::default();
        let mut records = Vec::with_capacity(RECORDS_PER_READ);
        let mut gpas = Vec::with_capacity(RECORDS_PER_READ);
        let t = Instant::now();
        for read in stream.chunks(RECORDS_PER_READ * USERFAULT_MSG_SIZE) {
            let now = Instant::now();
            records.clear();
            parse_records(read, USERFAULT_MSG_SIZE, &mut records)?;
            gpas.clear();
            gpas.extend(records.iter().map(|r| r.gfn << 12));
            h.handle_gpas(&gpas, now, false, &mut scratch)?;
        }
        let dt = t.elapsed();
        anyhow::ensure!(h.missing_pages() == 0, "pages left missing");
        best = best.min(dt);
        total += dt;
    }
    anyhow::ensure!(
        guest == source.bytes(),
        "guest memory differs from the image"
    );

    // Baseline: the bare 4 KiB copies in the same order, to separate handler overhead from
    // memory bandwidth on this machine.
    let mut copy_best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for &p in &order {
            let o = p as usize * PAGE_SIZE;
            guest[o..o + PAGE_SIZE].copy_from_slice(&source.bytes()[o..o + PAGE_SIZE]);
        }
        std::hint::black_box(&guest);
        copy_best = copy_best.min(t.elapsed());
    }
    let rate = pages as f64 / best.as_secs_f64();
    println!(
        "handler_bench: {pages} records x {rounds} rounds, {RECORDS_PER_READ} records/read, shuffled gfns, 4 KiB copy each"
    );
    println!(
        "best round {:?} = {:.2} M records/s ({:.0} ns/record); mean {:.2} M records/s",
        best,
        rate / 1e6,
        1e9 / rate,
        (pages * rounds) as f64 / total.as_secs_f64() / 1e6
    );
    println!(
        "bare 4 KiB copies alone: {:.2} M pages/s ({:.0} ns/page) -> handler overhead {:.0} ns/record",
        pages as f64 / copy_best.as_secs_f64() / 1e6,
        copy_best.as_nanos() as f64 / pages as f64,
        (best.as_nanos() as f64 - copy_best.as_nanos() as f64) / pages as f64
    );
    Ok(())
}
