//! One room's recent messages in memory, in id order, and how far back they
//! are known to be complete. Serves the embedded history and the Redis
//! broker's local tail of each subscribed room.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Replay;
use crate::protocol::{CatchUp, MessageId, RoomFrame};

#[derive(Debug, Default)]
pub struct RoomLog {
    messages: VecDeque<Arc<RoomFrame>>,
    /// Bytes of frame text held.
    bytes: usize,
    /// A `since` at or above this id is covered: every later message is in
    /// `messages`. `None`: nothing is known before the first held message.
    complete_after: Option<MessageId>,
}

impl RoomLog {
    pub fn new(complete_after: Option<MessageId>) -> Self {
        RoomLog {
            messages: VecDeque::new(),
            bytes: 0,
            complete_after,
        }
    }

    pub fn last_id(&self) -> Option<MessageId> {
        self.messages.back().and_then(|m| m.id)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Appends a message newer than every held one (older ones are
    /// ignored: they are already here), trimming to `capacity`.
    pub fn push(&mut self, frame: Arc<RoomFrame>, capacity: usize) {
        let Some(id) = frame.id else { return };
        if self.last_id().is_some_and(|last| id <= last) {
            return;
        }
        self.bytes += frame.text.len();
        self.messages.push_back(frame);
        self.trim(capacity);
    }

    fn trim(&mut self, capacity: usize) {
        while self.messages.len() > capacity.max(1) {
            if let Some(trimmed) = self.messages.pop_front() {
                self.bytes -= trimmed.text.len();
                self.complete_after = trimmed.id.or(self.complete_after);
            }
        }
    }

    /// Replaces what is held up to the snapshot's end with `snapshot` (a
    /// complete read of the source), keeping newer held messages.
    pub fn merge(
        &mut self,
        snapshot: Vec<Arc<RoomFrame>>,
        complete_after: MessageId,
        capacity: usize,
    ) {
        let snapshot_end = snapshot.last().and_then(|m| m.id).unwrap_or(complete_after);
        let newer: Vec<_> = self
            .messages
            .iter()
            .filter(|m| m.id.is_some_and(|id| id > snapshot_end))
            .cloned()
            .collect();
        self.messages = snapshot.into_iter().chain(newer).collect();
        self.bytes = self.messages.iter().map(|m| m.text.len()).sum();
        self.complete_after = Some(complete_after);
        self.trim(capacity);
    }

    /// Declares the log complete after `floor` (or from its first message,
    /// if that is earlier): the source was read and had nothing more.
    pub fn assume_complete_after(&mut self, floor: MessageId) {
        let first = self.messages.front().and_then(|m| m.id);
        let floor = match first {
            Some(first) if first <= floor => predecessor(first),
            _ => floor,
        };
        self.complete_after = Some(floor);
    }

    /// The catch-up from this log when it is the authority (the history
    /// itself, or a tail just refilled from it): where it cannot tell,
    /// everything it holds, not recovered.
    pub fn answer(&self, catch_up: CatchUp) -> Replay {
        self.read(catch_up).unwrap_or_else(|| Replay {
            messages: self.messages.iter().cloned().collect(),
            recovered: false,
        })
    }

    /// The catch-up from this log, or `None` when it does not reach back far
    /// enough to know, or `since` is newer than anything it holds.
    pub fn read(&self, catch_up: CatchUp) -> Option<Replay> {
        match catch_up {
            CatchUp::None => Some(Replay {
                messages: Vec::new(),
                recovered: true,
            }),
            CatchUp::Last(n) => {
                if self.messages.len() < n && self.complete_after.is_none() {
                    return None;
                }
                let skip = self.messages.len().saturating_sub(n);
                Some(Replay {
                    messages: self.messages.iter().skip(skip).cloned().collect(),
                    recovered: true,
                })
            }
            CatchUp::Since(since) => {
                // Past everything this log knows of: an id from before a
                // restart whose clock stepped back, or not an id of this
                // room at all. Nothing here can say what came after it.
                let newest = self.messages.back().and_then(|m| m.id);
                if newest
                    .max(self.complete_after)
                    .is_some_and(|newest| since > newest)
                {
                    return None;
                }
                let first = self.messages.front().and_then(|m| m.id);
                let recovered = match (self.complete_after, first) {
                    (Some(floor), _) => since >= floor,
                    (None, Some(first)) if since >= first => true,
                    (None, _) => return None,
                };
                let start = self
                    .messages
                    .partition_point(|m| m.id.is_some_and(|id| id <= since));
                Some(Replay {
                    messages: self.messages.range(start..).cloned().collect(),
                    recovered,
                })
            }
        }
    }
}

/// The largest id below `id`.
pub fn predecessor(id: MessageId) -> MessageId {
    match id.seq.checked_sub(1) {
        Some(seq) => MessageId::new(id.ms, seq),
        None if id.ms > 0 => MessageId::new(id.ms - 1, u64::MAX),
        None => MessageId::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Arc<RoomFrame> {
        Arc::new(RoomFrame {
            room: "r".into(),
            id: Some(MessageId::new(1, seq)),
            text: format!("m{seq}").into(),
        })
    }

    fn seqs(replay: &Replay) -> Vec<u64> {
        replay.messages.iter().map(|m| m.id.unwrap().seq).collect()
    }

    #[test]
    fn a_log_with_an_unknown_start_answers_only_from_its_first_message_on() {
        let mut log = RoomLog::new(None);
        for seq in 5..8 {
            log.push(frame(seq), 10);
        }
        log.push(frame(6), 10);
        assert_eq!(log.len(), 3, "older ids are ignored");
        let replay = log.read(CatchUp::Since(MessageId::new(1, 5))).unwrap();
        assert_eq!((seqs(&replay), replay.recovered), (vec![6, 7], true));
        assert!(log.read(CatchUp::Since(MessageId::new(1, 4))).is_none());
        assert!(log.read(CatchUp::Last(5)).is_none());
        assert_eq!(seqs(&log.read(CatchUp::Last(2)).unwrap()), vec![6, 7]);
    }

    #[test]
    fn trimming_makes_the_start_known() {
        let mut log = RoomLog::new(None);
        for seq in 1..=5 {
            log.push(frame(seq), 3);
        }
        let replay = log.read(CatchUp::Since(MessageId::new(1, 1))).unwrap();
        assert_eq!((seqs(&replay), replay.recovered), (vec![3, 4, 5], false));
        let replay = log.read(CatchUp::Since(MessageId::new(1, 2))).unwrap();
        assert_eq!((seqs(&replay), replay.recovered), (vec![3, 4, 5], true));
    }

    #[test]
    fn a_snapshot_merges_under_newer_live_messages() {
        let mut log = RoomLog::new(None);
        log.push(frame(9), 10);
        log.push(frame(10), 10);
        log.merge(vec![frame(7), frame(8), frame(9)], MessageId::new(1, 6), 10);
        let replay = log.read(CatchUp::Since(MessageId::new(1, 6))).unwrap();
        assert_eq!((seqs(&replay), replay.recovered), (vec![7, 8, 9, 10], true));
        let replay = log.read(CatchUp::Since(MessageId::new(1, 2))).unwrap();
        assert!(!replay.recovered);
        assert_eq!(
            seqs(&log.read(CatchUp::Last(50)).unwrap()),
            vec![7, 8, 9, 10]
        );
    }
}
