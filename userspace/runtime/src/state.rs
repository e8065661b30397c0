//! Which guest pages are still missing.
//!
//! One [`MissingMap`] per memslot, indexed by the page's index inside the slot. A page moves
//! `missing → in flight (claimed by one filler) → present`. It becomes present only after its
//! contents were completely written *and* the kernel made it visible (attribute cleared,
//! UFFDIO_COPY/CONTINUE done): see [`MissingMap::complete`]. Threads that find a page in flight
//! can wait for it ([`SlotState::wait_settled`]).

use bitvec::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Outcome of trying to take responsibility for filling a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller now owns the page and must `complete` or `abort` it.
    Fill,
    /// Someone else is filling it.
    InFlight,
    /// It is already present (resolved before this fault was seen, e.g. by prefetch).
    Present,
}

/// The missing/in-flight bitmaps of one memslot (not synchronised; see [`SlotState`]).
#[derive(Debug, Clone)]
pub struct MissingMap {
    missing: BitVec<u64, Lsb0>,
    in_flight: BitVec<u64, Lsb0>,
    missing_count: usize,
}

impl MissingMap {
    /// A map of `pages` pages, all present.
    pub fn new(pages: usize) -> Self {
        Self {
            missing: bitvec![u64, Lsb0; 0; pages],
            in_flight: bitvec![u64, Lsb0; 0; pages],
            missing_count: 0,
        }
    }

    /// A map of `pages` pages, all missing.
    pub fn all_missing(pages: usize) -> Self {
        let mut m = Self::new(pages);
        m.mark_missing(0..pages);
        m
    }

    /// Number of pages tracked.
    pub fn len(&self) -> usize {
        self.missing.len()
    }

    /// True if the map tracks no page.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
    }

    /// Pages still missing (including in flight).
    pub fn missing_count(&self) -> usize {
        self.missing_count
    }

    fn check(&self, r: &Range<usize>) -> Result<(), StateError> {
        if r.start > r.end || r.end > self.len() {
            return Err(StateError::OutOfRange {
                start: r.start,
                end: r.end,
                len: self.len(),
            });
        }
        Ok(())
    }

    /// Marks a range missing (e.g. when the VMM sets the attribute on it).
    pub fn mark_missing(&mut self, r: Range<usize>) {
        let r = r.start.min(self.len())..r.end.min(self.len());
        let newly = self.missing[r.clone()].count_zeros();
        self.missing[r].fill(true);
        self.missing_count += newly;
    }

    /// Marks a range present without filling it: its contents are already in place and
    /// visible (e.g. pages that arrived during a migration's pre-copy and stayed clean).
    /// Returns how many pages were missing. A page being filled cannot be marked present (its
    /// filler owns it): that is [`StateError::InFlight`] and nothing is changed.
    pub fn mark_present(&mut self, r: Range<usize>) -> Result<usize, StateError> {
        self.check(&r)?;
        if let Some(i) = self.in_flight[r.clone()].first_one() {
            return Err(StateError::InFlight(r.start + i));
        }
        let cleared = self.missing[r.clone()].count_ones();
        self.missing[r].fill(false);
        self.missing_count -= cleared;
        Ok(cleared)
    }

    /// Is this page still missing?
    pub fn is_missing(&self, page: usize) -> bool {
        self.missing.get(page).is_some_and(|b| *b)
    }

    /// Tries to claim one page for filling.
    pub fn try_claim(&mut self, page: usize) -> Result<Claim, StateError> {
        self.check(&(page..page + 1))?;
        if !self.missing[page] {
            return Ok(Claim::Present);
        }
        if self.in_flight[page] {
            return Ok(Claim::InFlight);
        }
        self.in_flight.set(page, true);
        Ok(Claim::Fill)
    }

    /// The page was written and made visible: present from now on.
    pub fn complete(&mut self, r: Range<usize>) -> Result<(), StateError> {
        self.check(&r)?;
        let cleared = self.missing[r.clone()].count_ones();
        self.missing[r.clone()].fill(false);
        self.in_flight[r].fill(false);
        self.missing_count -= cleared;
        Ok(())
    }

    /// Filling failed: the pages stay missing and can be claimed again.
    pub fn abort(&mut self, r: Range<usize>) -> Result<(), StateError> {
        self.check(&r)?;
        self.in_flight[r].fill(false);
        Ok(())
    }

    /// The first page at or after `from` (wrapping once) that is missing and not in flight.
    pub fn next_unclaimed(&self, from: usize) -> Option<usize> {
        let len = self.len();
        if len == 0 {
            return None;
        }
        let from = from.min(len);
        let scan = |r: Range<usize>| {
            let mut i = r.start;
            while i < r.end {
                // Skip whole words of present pages quickly.
                let next = self.missing[i..r.end].first_one()? + i;
                if !self.in_flight[next] {
                    return Some(next);
                }
                i = next + 1;
            }
            None
        };
        scan(from..len).or_else(|| scan(0..from))
    }
}

/// Coalesces page indices into maximal runs of contiguous pages (input in any order, duplicates
/// ignored), so that one kernel call clears a whole run.
pub fn coalesce(pages: &[usize]) -> Vec<Range<usize>> {
    let mut sorted = pages.to_vec();
    let mut out = Vec::new();
    coalesce_into(&mut sorted, &mut out);
    out
}

/// [`coalesce`] without allocating: sorts `pages` in place and appends the runs to `out`.
pub fn coalesce_into(pages: &mut [usize], out: &mut Vec<Range<usize>>) {
    pages.sort_unstable();
    for &p in pages.iter() {
        match out.last_mut() {
            Some(r) if r.contains(&p) => {}
            Some(r) if r.end == p => r.end = p + 1,
            _ => out.push(p..p + 1),
        }
    }
}

/// A bad index handed to the state (a bug in the caller or a bogus record).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The range does not fit the slot.
    #[error("page range {start}..{end} outside a slot of {len} pages")]
    OutOfRange {
        /// First page.
        start: usize,
        /// One past the last page.
        end: usize,
        /// Pages in the slot.
        len: usize,
    },
    /// The page is being filled: only its filler may settle it.
    #[error("page {0} is being filled")]
    InFlight(usize),
}

/// A [`MissingMap`] shared between fillers, with a condition variable for waiters.
#[derive(Debug)]
pub struct SlotState {
    map: Mutex<MissingMap>,
    changed: Condvar,
    /// Threads in `wait_settled`: notifying a condvar is a futex syscall even with nobody
    /// waiting, which would dominate the fault path, so it is skipped when this is zero.
    waiters: AtomicUsize,
}

impl SlotState {
    /// Wraps a map.
    pub fn new(map: MissingMap) -> Self {
        Self {
            map: Mutex::new(map),
            changed: Condvar::new(),
            waiters: AtomicUsize::new(0),
        }
    }

    /// Locks the map (poisoning is ignored: the map is consistent after every operation).
    pub fn lock(&self) -> MutexGuard<'_, MissingMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks pages present and wakes waiters.
    pub fn complete(&self, r: Range<usize>) -> Result<(), StateError> {
        self.lock().complete(r)?;
        self.wake();
        Ok(())
    }

    /// Releases a claim after a failure and wakes waiters (they may claim it themselves).
    pub fn abort(&self, r: Range<usize>) -> Result<(), StateError> {
        self.lock().abort(r)?;
        self.wake();
        Ok(())
    }

    /// Marks `done` present and releases `failed` claims under one lock, then wakes waiters.
    pub fn settle(&self, done: &[Range<usize>], failed: &[Range<usize>]) -> Result<(), StateError> {
        let res = {
            let mut g = self.lock();
            let mut res = Ok(());
            for r in done {
                res = res.and(g.complete(r.clone()));
            }
            for r in failed {
                res = res.and(g.abort(r.clone()));
            }
            res
        };
        self.wake();
        res
    }

    /// Wakes every waiter so that it re-checks its `give_up` condition (a stop). Taking the
    /// lock first orders this after any waiter that checked the condition before it changed:
    /// such a waiter holds the lock until it sleeps, so the notification cannot be lost.
    pub fn wake_for_stop(&self) {
        drop(self.lock());
        self.changed.notify_all();
    }

    fn wake(&self) {
        // SeqCst pairs with the increment in wait_settled, which happens under the lock
        // before the waiter re-checks the map: a waiter either sees the update or is counted.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_all();
        }
    }

    /// Waits until `page` is present or no longer in flight; returns the claim state then.
    /// `give_up` is polled every `tick` so a stopping runtime never hangs here.
    pub fn wait_settled(&self, page: usize, tick: Duration, give_up: impl Fn() -> bool) -> Claim {
        let mut g = self.lock();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            if !g.is_missing(page) {
                break Claim::Present;
            }
            if !g.in_flight[page] || give_up() {
                break Claim::InFlight;
            }
            g = self
                .changed
                .wait_timeout(g, tick)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mark_present_clears_missing_pages_but_not_claimed_ones() {
        let mut m = MissingMap::all_missing(16);
        assert_eq!(m.try_claim(9), Ok(Claim::Fill));
        assert_eq!(m.mark_present(0..4), Ok(4));
        // Already present: nothing more to clear.
        assert_eq!(m.mark_present(2..6), Ok(2));
        assert_eq!(m.missing_count(), 10);
        assert!(!m.is_missing(5) && m.is_missing(6));
        assert_eq!(m.try_claim(3), Ok(Claim::Present));
        // A range with a page in flight is refused as a whole.
        assert_eq!(m.mark_present(8..12), Err(StateError::InFlight(9)));
        assert!(m.is_missing(8) && m.is_missing(10));
        assert_eq!(m.missing_count(), 10);
        assert!(matches!(
            m.mark_present(15..17),
            Err(StateError::OutOfRange { .. })
        ));
    }

    use super::*;

    #[test]
    fn claim_complete_cycle() {
        let mut m = MissingMap::all_missing(10);
        assert_eq!(m.missing_count(), 10);
        assert_eq!(m.try_claim(3), Ok(Claim::Fill));
        assert_eq!(m.try_claim(3), Ok(Claim::InFlight));
        // Still missing while in flight: nobody may treat it as present yet.
        assert!(m.is_missing(3));
        m.complete(3..4).unwrap();
        assert!(!m.is_missing(3));
        assert_eq!(m.try_claim(3), Ok(Claim::Present));
        assert_eq!(m.missing_count(), 9);
    }

    #[test]
    fn abort_leaves_page_missing_and_claimable() {
        let mut m = MissingMap::all_missing(4);
        assert_eq!(m.try_claim(1), Ok(Claim::Fill));
        m.abort(1..2).unwrap();
        assert!(m.is_missing(1));
        assert_eq!(m.missing_count(), 4);
        assert_eq!(m.try_claim(1), Ok(Claim::Fill));
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let mut m = MissingMap::all_missing(4);
        assert!(matches!(m.try_claim(4), Err(StateError::OutOfRange { .. })));
        assert!(m.complete(2..9).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let bad = 3..2;
        assert!(m.abort(bad).is_err());
        assert_eq!(m.missing_count(), 4);
    }

    #[test]
    fn mark_missing_counts_only_new_pages() {
        let mut m = MissingMap::new(100);
        m.mark_missing(10..20);
        m.mark_missing(15..30);
        assert_eq!(m.missing_count(), 20);
        m.mark_missing(90..200); // clamped
        assert_eq!(m.missing_count(), 30);
    }

    #[test]
    fn next_unclaimed_skips_present_and_in_flight_and_wraps() {
        let mut m = MissingMap::new(200);
        m.mark_missing(5..8);
        m.mark_missing(150..151);
        assert_eq!(m.try_claim(5), Ok(Claim::Fill));
        assert_eq!(m.next_unclaimed(0), Some(6));
        assert_eq!(m.next_unclaimed(8), Some(150));
        assert_eq!(m.next_unclaimed(151), Some(6));
        m.complete(5..8).unwrap();
        m.complete(150..151).unwrap();
        assert_eq!(m.next_unclaimed(0), None);
    }

    #[test]
    fn coalesce_merges_contiguous_runs() {
        assert_eq!(coalesce(&[]), Vec::<Range<usize>>::new());
        assert_eq!(
            coalesce(&[7, 3, 4, 5, 9, 8, 4, 20]),
            vec![3..6, 7..10, 20..21]
        );
        assert_eq!(coalesce(&[1]), vec![1..2]);
    }

    #[test]
    fn waiters_wake_on_complete() {
        use std::sync::Arc;
        let s = Arc::new(SlotState::new(MissingMap::all_missing(2)));
        assert_eq!(s.lock().try_claim(0), Ok(Claim::Fill));
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait_settled(0, Duration::from_millis(50), || false));
        std::thread::sleep(Duration::from_millis(20));
        s.complete(0..1).unwrap();
        assert_eq!(t.join().unwrap(), Claim::Present);
    }
}
