//! Faults an operator or a test injects into a model's workers through the admin API, and the
//! per-replica book that holds them until the worker's next batches take them.
//!
//! The book stores a repeated fault as one `(fault, remaining)` entry, not as `count` copies:
//! its memory is bounded by the number of entries (at most [`MAX_ENTRIES`]), whatever the
//! counts, so no admin call can make the server allocate in proportion to a number it sends.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

/// Distinct entries one replica's book holds at most; consecutive injections of the same fault
/// share an entry, so only alternating kinds use more than one.
pub const MAX_ENTRIES: usize = 64;

/// Faults an operator or a test can inject into a worker, through the admin API.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Fault {
    /// Panic inside the next batch.
    Panic,
    /// Block the next batch for `ms` milliseconds, as a stuck kernel would.
    Hang { ms: u64 },
    /// Add `ms` milliseconds to the next batch, then run it.
    Slow { ms: u64 },
}

/// The faults queued for one replica, oldest first, each with how many batches it still hits.
#[derive(Debug, Default)]
pub struct FaultBook {
    entries: VecDeque<(Fault, u64)>,
}

/// One replica's book, shared by its router (which fills it) and its worker thread (which takes
/// from it); a replacement worker inherits the book of the one it replaces.
pub type FaultQueue = Arc<Mutex<FaultBook>>;

impl FaultBook {
    /// Whether [`push`](Self::push) would take `fault`: it extends the last entry, or there
    /// is room for a new one.
    pub fn has_room_for(&self, fault: Fault) -> bool {
        self.entries.back().is_some_and(|(last, _)| *last == fault)
            || self.entries.len() < MAX_ENTRIES
    }

    /// Queues `fault` for the next `count` batches (after those already queued). Refused when
    /// it would need a new entry and the book is full.
    pub fn push(&mut self, fault: Fault, count: u64) -> Result<(), String> {
        if !self.has_room_for(fault) {
            return Err(format!(
                "already holds {MAX_ENTRIES} different queued faults; let them run first"
            ));
        }
        if count == 0 {
            return Ok(());
        }
        match self.entries.back_mut() {
            Some((last, remaining)) if *last == fault => {
                *remaining = remaining.saturating_add(count)
            }
            _ => self.entries.push_back((fault, count)),
        }
        Ok(())
    }

    /// Takes the fault for the next batch, if any.
    pub fn pop(&mut self) -> Option<Fault> {
        let (fault, remaining) = self.entries.front_mut()?;
        let fault = *fault;
        *remaining -= 1;
        if *remaining == 0 {
            self.entries.pop_front();
        }
        Some(fault)
    }

    /// Batches that faults will still hit.
    pub fn remaining(&self) -> u64 {
        self.entries.iter().map(|(_, n)| n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_fault_is_one_entry_taken_count_times() {
        let mut book = FaultBook::default();
        book.push(Fault::Panic, 1_000_000_000).unwrap();
        book.push(Fault::Panic, 5).unwrap();
        assert_eq!(book.entries.len(), 1);
        assert_eq!(book.remaining(), 1_000_000_005);

        let mut small = FaultBook::default();
        small.push(Fault::Panic, 2).unwrap();
        small.push(Fault::Slow { ms: 10 }, 1).unwrap();
        assert_eq!(small.pop(), Some(Fault::Panic));
        assert_eq!(small.pop(), Some(Fault::Panic));
        assert_eq!(small.pop(), Some(Fault::Slow { ms: 10 }));
        assert_eq!(small.pop(), None);
        assert_eq!(small.remaining(), 0);
    }

    #[test]
    fn the_book_is_bounded_in_entries() {
        let mut book = FaultBook::default();
        for i in 0..MAX_ENTRIES {
            let fault = if i % 2 == 0 {
                Fault::Panic
            } else {
                Fault::Hang { ms: 1 }
            };
            book.push(fault, 1).unwrap();
        }
        // The same fault as the last entry still merges; a different one is refused.
        book.push(Fault::Hang { ms: 1 }, 3).unwrap();
        assert!(!book.has_room_for(Fault::Panic));
        assert!(book.push(Fault::Panic, 1).is_err());
        assert_eq!(book.entries.len(), MAX_ENTRIES);
        // Saturating, never overflowing.
        book.push(Fault::Hang { ms: 1 }, u64::MAX).unwrap();
        assert_eq!(book.entries.back().unwrap().1, u64::MAX);
    }
}
