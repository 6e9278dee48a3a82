//! A stream's tail: what a client whose connection dropped after it sent `end` may have
//! missed of its stream's last messages (its summary, and the results just before it). The
//! session stops at its summary, so it hands these to the hub ([`StreamEnded`]), which keeps
//! them for the resume window: a resume of the ended stream gets them again, exactly as sent,
//! then the close 1000 (docs/streaming.md, "Resume").
//!
//! Only streams that send checkpoints leave one (their resume tokens are what a client comes
//! back with), and it is bounded: the last messages that fit [`TAIL_BYTES`], the summary
//! always among them (a summary larger than that leaves no tail; a resume is then refused
//! `ended` as before).
//!
//! [`StreamEnded`]: super::StreamEnded

use std::collections::VecDeque;
use std::sync::Arc;

use bytestring::ByteString;

use super::StreamSession;

/// The most a stream's tail holds, its bookkeeping counted ([`EndedTail::bytes`]): about
/// 20 s of per-chunk probabilities (many checkpoints' worth: a client has its newest one),
/// or a summary of some 1,500 speech segments.
pub const TAIL_BYTES: usize = 64 * 1024;
/// What one kept message costs besides its text: its `seq` and the `ByteString` handle.
const ENTRY_OVERHEAD: usize = 48;
/// What a tail costs besides its messages: the hub's map entry and the tail's own fields.
const TAIL_OVERHEAD: usize = 256;

/// The end of a stream that ended here with its summary, for a resume that missed it.
#[derive(Clone, Debug)]
pub struct EndedTail {
    pub model: String,
    pub version: String,
    /// The `started` a resume is answered with (`resumed: true`), as of the stream's end.
    pub started: ByteString,
    /// The stream's last messages, in `seq` order, its summary last.
    pub messages: Arc<[(u64, ByteString)]>,
}

/// Why a tail cannot answer a resume: it is then refused `ended`, as without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TailRefused {
    /// The client has the summary: there is nothing to send.
    HasAll,
    /// The client's first missed message is older than the tail's first.
    NotKept,
}

impl EndedTail {
    /// What the tail costs in memory, near enough (what the hub's budget counts).
    pub fn bytes(&self) -> usize {
        let messages: usize = self
            .messages
            .iter()
            .map(|(_, text)| text.len() + ENTRY_OVERHEAD)
            .sum();
        TAIL_OVERHEAD + self.model.len() + self.version.len() + self.started.len() + messages
    }

    /// The messages a client that received up to `last_seq` missed, summary included.
    pub fn missed(&self, last_seq: Option<u64>) -> Result<Vec<ByteString>, TailRefused> {
        let from = last_seq.map_or(0, |last| last + 1);
        let (Some(&(first, _)), Some(&(summary, _))) =
            (self.messages.first(), self.messages.last())
        else {
            return Err(TailRefused::NotKept);
        };
        if from > summary {
            return Err(TailRefused::HasAll);
        }
        if from < first {
            return Err(TailRefused::NotKept);
        }
        Ok(self
            .messages
            .iter()
            .filter(|(seq, _)| *seq >= from)
            .map(|(_, text)| text.clone())
            .collect())
    }
}

/// The last messages of `outbox` that fit `budget` (each counted with its overhead), in
/// order; none if even the last (the summary) does not fit.
pub fn last_fitting(
    outbox: &VecDeque<(u64, ByteString)>,
    budget: usize,
) -> Option<Arc<[(u64, ByteString)]>> {
    let mut left = budget;
    let mut kept = 0;
    for (_, text) in outbox.iter().rev() {
        let cost = text.len() + ENTRY_OVERHEAD;
        if cost > left {
            break;
        }
        left -= cost;
        kept += 1;
    }
    if kept == 0 {
        return None;
    }
    Some(outbox.iter().skip(outbox.len() - kept).cloned().collect())
}

impl StreamSession {
    /// The tail the hub keeps of a stream that ended with its summary, if it sent checkpoints.
    pub(super) fn ended_tail(&self) -> Option<EndedTail> {
        if !self.summarized || self.params.checkpoint_samples == 0 {
            return None;
        }
        let started = self.started_message(true, false).to_json();
        let (model, version) = (&self.model.info.name, &self.model.info.version);
        let fixed = TAIL_OVERHEAD + model.len() + version.len() + started.len();
        Some(EndedTail {
            messages: last_fitting(&self.outbox, TAIL_BYTES.checked_sub(fixed)?)?,
            model: model.clone(),
            version: version.clone(),
            started: started.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(seqs: std::ops::Range<u64>, len: usize) -> VecDeque<(u64, ByteString)> {
        seqs.map(|seq| (seq, ByteString::from("x".repeat(len))))
            .collect()
    }

    fn tail(messages: Arc<[(u64, ByteString)]>) -> EndedTail {
        EndedTail {
            model: "m".into(),
            version: "1".into(),
            started: ByteString::from_static("{}"),
            messages,
        }
    }

    #[test]
    fn the_last_messages_that_fit_are_kept_in_order() {
        let kept = last_fitting(&outbox(0..10, 52), 3 * 100 + 99).unwrap();
        let seqs: Vec<u64> = kept.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [7, 8, 9]);
        assert_eq!(
            last_fitting(&outbox(0..10, 52), 1_000_000).unwrap().len(),
            10
        );
    }

    #[test]
    fn a_summary_larger_than_the_budget_leaves_no_tail() {
        assert!(last_fitting(&outbox(0..3, 200), 100).is_none());
        assert!(last_fitting(&VecDeque::new(), 100).is_none());
    }

    #[test]
    fn a_resume_gets_what_follows_its_last_seq_up_to_the_summary() {
        let tail = tail(last_fitting(&outbox(5..10, 4), 1 << 20).unwrap());
        assert_eq!(tail.missed(Some(6)).unwrap().len(), 3);
        assert_eq!(tail.missed(Some(4)).unwrap().len(), 5);
        assert_eq!(tail.missed(Some(8)).unwrap().len(), 1);
        assert_eq!(tail.missed(Some(9)), Err(TailRefused::HasAll));
        assert_eq!(tail.missed(Some(12)), Err(TailRefused::HasAll));
        assert_eq!(tail.missed(Some(3)), Err(TailRefused::NotKept));
        assert_eq!(tail.missed(None), Err(TailRefused::NotKept));
    }

    #[test]
    fn a_tail_counts_its_messages_and_overheads() {
        let tail = tail(last_fitting(&outbox(0..2, 10), 1 << 20).unwrap());
        assert_eq!(
            tail.bytes(),
            TAIL_OVERHEAD + 1 + 1 + 2 + 2 * (10 + ENTRY_OVERHEAD)
        );
    }
}
