//! The embedded history: a ring of the last `HISTORY_SIZE` messages per room,
//! dropped after `HISTORY_TTL` of silence, with idempotency keys remembered
//! for the same TTL.
//!
//! Ids are `<ms>-<seq>` like Redis Stream ids and increase across the whole
//! node, so a room whose history expired and started again never reuses an
//! id a client may still hold.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::log::{predecessor, RoomLog};
use super::{Replay, Stored};
use crate::protocol::{CatchUp, MessageId, MessageTemplate, RoomFrame};

/// How many idempotency keys a room remembers per message of history.
const KEYS_PER_HISTORY_SLOT: usize = 4;
/// What `HISTORY_MAX_BYTES` charges beyond the text, roughly what the
/// allocations around it take: per message held, per key remembered (its
/// text twice, in the map and in the expiry order), per room.
const MESSAGE_OVERHEAD: usize = 96;
const KEY_OVERHEAD: usize = 96;
const ROOM_OVERHEAD: usize = 256;

pub struct MemoryHistory {
    inner: Mutex<Inner>,
    capacity: usize,
    ttl: Duration,
    max_bytes: usize,
}

struct Inner {
    rooms: HashMap<Arc<str>, RoomHistory>,
    last_issued: MessageId,
    /// What the rooms cost over all ([`RoomHistory::cost`]).
    bytes: usize,
}

struct RoomHistory {
    /// Starts complete just below its first id: earlier ids are unknown to it.
    log: RoomLog,
    last_activity: Instant,
    keys: HashMap<Box<str>, MessageId>,
    key_order: VecDeque<(Box<str>, Instant)>,
    /// Bytes of the keys' text, as held (twice each).
    key_bytes: usize,
}

impl MemoryHistory {
    /// `max_bytes` bounds what the rooms hold over all (messages, keys and
    /// their bookkeeping): past it, the rooms silent the longest are dropped
    /// whole (their resumes then say `recovered:false`, and their keys are
    /// forgotten), so publishing to endless new rooms cannot exhaust memory.
    pub fn new(capacity: usize, ttl: Duration, max_bytes: usize) -> Self {
        MemoryHistory {
            inner: Mutex::new(Inner {
                rooms: HashMap::new(),
                last_issued: MessageId::ZERO,
                bytes: 0,
            }),
            capacity: capacity.max(1),
            ttl,
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stores a message and hands the new frame to `publish` while the lock is
    /// still held, so frames reach subscribers in id order. A repeated
    /// idempotency key stores nothing and returns the first id.
    pub fn append(
        &self,
        room: &str,
        template: &MessageTemplate,
        key: Option<&str>,
        now_ms: u64,
        publish: impl FnOnce(Arc<RoomFrame>),
    ) -> Stored {
        let now = Instant::now();
        let ttl = self.ttl;
        let mut inner = self.lock();
        let Inner { rooms, bytes, .. } = &mut *inner;
        if let Some(history) = rooms.get_mut(room) {
            *bytes -= history.forget_keys_older_than(now, ttl);
            if let Some(id) = key.and_then(|k| history.keys.get(k)) {
                return Stored {
                    id: *id,
                    duplicate: true,
                };
            }
        }
        let last = inner.last_issued;
        let id = if now_ms > last.ms {
            MessageId::new(now_ms, 0)
        } else {
            last.successor()
        };
        inner.last_issued = id;
        let room: Arc<str> = match inner.rooms.get_key_value(room) {
            Some((name, _)) => name.clone(),
            None => Arc::from(room),
        };
        let history = inner
            .rooms
            .entry(room.clone())
            .or_insert_with(|| RoomHistory {
                log: RoomLog::new(Some(predecessor(id))),
                last_activity: now,
                keys: HashMap::new(),
                key_order: VecDeque::new(),
                key_bytes: 0,
            });
        let frame = Arc::new(RoomFrame {
            room,
            id: Some(id),
            text: template.with_id(id).into(),
        });
        // A new room costs nothing before this.
        let before = if history.log.is_empty() {
            0
        } else {
            history.cost(&frame.room)
        };
        history.log.push(frame.clone(), self.capacity);
        history.last_activity = now;
        if let Some(key) = key {
            history.remember_key(key, id, now, self.capacity * KEYS_PER_HISTORY_SLOT);
        }
        let after = history.cost(&frame.room);
        inner.bytes = inner.bytes + after - before;
        while inner.bytes > self.max_bytes {
            let Some(oldest) = inner
                .rooms
                .iter()
                .min_by_key(|(_, h)| h.last_activity)
                .map(|(name, _)| name.clone())
            else {
                break;
            };
            if let Some(dropped) = inner.rooms.remove(&oldest) {
                inner.bytes -= dropped.cost(&oldest);
                tracing::warn!(room = %oldest, "history over HISTORY_MAX_BYTES: dropped the room silent the longest");
            }
        }
        publish(frame);
        Stored {
            id,
            duplicate: false,
        }
    }

    /// The messages a joining client needs first.
    pub fn read(&self, room: &str, catch_up: CatchUp) -> Replay {
        let inner = self.lock();
        match inner.rooms.get(room) {
            // Every log here knows where it starts, so it answers; a `since`
            // past its newest id gets all it holds, not recovered.
            Some(history) => history.log.answer(catch_up),
            // A room without history cannot prove that nothing after `since`
            // existed (it may have expired, or the node restarted).
            None => Replay {
                messages: Vec::new(),
                recovered: !matches!(catch_up, CatchUp::Since(_)),
            },
        }
    }

    /// Drops rooms silent for longer than the TTL, and expired keys.
    pub fn expire(&self, now: Instant) {
        let ttl = self.ttl;
        let mut inner = self.lock();
        let Inner { rooms, bytes, .. } = &mut *inner;
        rooms.retain(|name, history| {
            if now.duration_since(history.last_activity) >= ttl {
                *bytes -= history.cost(name);
                return false;
            }
            *bytes -= history.forget_keys_older_than(now, ttl);
            true
        });
    }

    /// (rooms with history, messages held)
    pub fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        let messages = inner.rooms.values().map(|h| h.log.len()).sum();
        (inner.rooms.len(), messages)
    }
}

impl RoomHistory {
    /// What `HISTORY_MAX_BYTES` charges for this room.
    fn cost(&self, name: &str) -> usize {
        ROOM_OVERHEAD
            + name.len()
            + self.log.bytes()
            + self.log.len() * MESSAGE_OVERHEAD
            + self.key_bytes
            + self.key_order.len() * KEY_OVERHEAD
    }

    /// Remembers `key`; the oldest keys past `max_keys` are forgotten.
    fn remember_key(&mut self, key: &str, id: MessageId, now: Instant, max_keys: usize) {
        self.keys.insert(key.into(), id);
        self.key_order.push_back((key.into(), now));
        self.key_bytes += 2 * key.len();
        while self.key_order.len() > max_keys {
            self.forget_oldest_key();
        }
    }

    /// Forgets keys older than `ttl`; what that frees of the room's cost.
    fn forget_keys_older_than(&mut self, now: Instant, ttl: Duration) -> usize {
        let mut freed = 0;
        while let Some((_, at)) = self.key_order.front() {
            if now.duration_since(*at) < ttl {
                break;
            }
            freed += self.forget_oldest_key();
        }
        freed
    }

    fn forget_oldest_key(&mut self) -> usize {
        let Some((key, _)) = self.key_order.pop_front() else {
            return 0;
        };
        self.keys.remove(&key);
        self.key_bytes -= 2 * key.len();
        2 * key.len() + KEY_OVERHEAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn template(n: u32) -> MessageTemplate {
        let data = RawValue::from_string(n.to_string()).unwrap();
        MessageTemplate::new("r", "u", &data)
    }

    fn publish(h: &MemoryHistory, n: u32, now_ms: u64) -> MessageId {
        h.append("r", &template(n), None, now_ms, |_| {}).id
    }

    fn ids(replay: &Replay) -> Vec<MessageId> {
        replay.messages.iter().map(|m| m.id.unwrap()).collect()
    }

    #[test]
    fn ids_increase_within_a_millisecond_and_when_the_clock_goes_back() {
        let h = MemoryHistory::new(10, Duration::from_secs(60), usize::MAX);
        let a = publish(&h, 1, 100);
        let b = publish(&h, 2, 100);
        let c = publish(&h, 3, 90);
        let d = publish(&h, 4, 101);
        assert_eq!(a, MessageId::new(100, 0));
        assert_eq!(b, MessageId::new(100, 1));
        assert_eq!(c, MessageId::new(100, 2));
        assert_eq!(d, MessageId::new(101, 0));
    }

    #[test]
    fn since_replays_exactly_the_later_messages_in_order() {
        let h = MemoryHistory::new(10, Duration::from_secs(60), usize::MAX);
        let all: Vec<_> = (0..5).map(|n| publish(&h, n, 100 + n as u64)).collect();
        let replay = h.read("r", CatchUp::Since(all[1]));
        assert!(replay.recovered);
        assert_eq!(ids(&replay), all[2..].to_vec());
        let replay = h.read("r", CatchUp::Since(all[4]));
        assert!(replay.recovered);
        assert!(replay.messages.is_empty());
        let text = h.read("r", CatchUp::Last(1)).messages[0].text.to_string();
        assert!(text.contains("\"data\":4"), "{text}");
    }

    #[test]
    fn since_before_trimmed_history_is_not_recovered() {
        let h = MemoryHistory::new(3, Duration::from_secs(60), usize::MAX);
        let all: Vec<_> = (0..6).map(|n| publish(&h, n, 100 + n as u64)).collect();
        // Kept: 3, 4, 5. A client that saw 2 misses nothing; one that saw 1 missed 2.
        let replay = h.read("r", CatchUp::Since(all[2]));
        assert!(replay.recovered);
        assert_eq!(ids(&replay), all[3..].to_vec());
        let replay = h.read("r", CatchUp::Since(all[1]));
        assert!(!replay.recovered);
        assert_eq!(ids(&replay), all[3..].to_vec());
    }

    #[test]
    fn since_from_before_the_room_log_existed_is_not_recovered() {
        let h = MemoryHistory::new(3, Duration::from_secs(60), usize::MAX);
        assert!(!h.read("r", CatchUp::Since(MessageId::new(5, 0))).recovered);
        let first = publish(&h, 1, 100);
        assert!(!h.read("r", CatchUp::Since(MessageId::new(5, 0))).recovered);
        assert!(h.read("r", CatchUp::Since(first)).recovered);
    }

    #[test]
    fn last_n_gives_at_most_what_is_kept() {
        let h = MemoryHistory::new(3, Duration::from_secs(60), usize::MAX);
        assert!(h.read("r", CatchUp::Last(5)).messages.is_empty());
        let all: Vec<_> = (0..5).map(|n| publish(&h, n, 100 + n as u64)).collect();
        assert_eq!(ids(&h.read("r", CatchUp::Last(2))), all[3..].to_vec());
        assert_eq!(ids(&h.read("r", CatchUp::Last(50))), all[2..].to_vec());
    }

    #[test]
    fn a_repeated_key_is_stored_once_and_answers_the_first_id() {
        let h = MemoryHistory::new(10, Duration::from_secs(60), usize::MAX);
        let mut published = 0;
        let first = h.append("r", &template(1), Some("k"), 100, |_| published += 1);
        let again = h.append("r", &template(1), Some("k"), 200, |_| published += 1);
        let other_room = h.append("s", &template(1), Some("k"), 300, |_| published += 1);
        assert!(!first.duplicate);
        assert!(again.duplicate);
        assert_eq!(again.id, first.id);
        assert!(!other_room.duplicate);
        assert_eq!(published, 2);
        assert_eq!(h.read("r", CatchUp::Last(10)).messages.len(), 1);
    }

    #[test]
    fn past_the_byte_budget_the_room_silent_the_longest_is_dropped() {
        let frame_bytes = template(1).with_id(MessageId::new(100, 0)).len();
        // Room "old" with one message and room "new" with two fill it.
        let budget = 2 * (ROOM_OVERHEAD + 3) + 3 * (frame_bytes + MESSAGE_OVERHEAD);
        let h = MemoryHistory::new(10, Duration::from_secs(60), budget);
        let old = h.append("old", &template(1), None, 100, |_| {}).id;
        std::thread::sleep(Duration::from_millis(2));
        h.append("new", &template(1), None, 101, |_| {});
        h.append("new", &template(2), None, 102, |_| {});
        assert_eq!(h.size(), (2, 3));
        h.append("new", &template(3), None, 103, |_| {});
        assert_eq!(h.size(), (1, 3), "the old room went, the busy one stays");
        assert!(!h.read("old", CatchUp::Since(old)).recovered);
    }

    #[test]
    fn silent_rooms_expire_and_new_ids_stay_above_old_ones() {
        let h = MemoryHistory::new(10, Duration::from_millis(50), usize::MAX);
        let old = publish(&h, 1, 1_000);
        h.expire(Instant::now() + Duration::from_millis(100));
        assert_eq!(h.size(), (0, 0));
        assert!(!h.read("r", CatchUp::Since(old)).recovered);
        let new = publish(&h, 2, 500);
        assert!(new > old);
    }

    #[test]
    fn the_byte_budget_counts_idempotency_keys() {
        let budget = 64 * 1024;
        let h = MemoryHistory::new(100, Duration::from_secs(60), budget);
        let long = "k".repeat(120);
        for room in 0..50 {
            let room = format!("room-{room}");
            for n in 0..400u32 {
                let key = format!("user {long}{n}");
                h.append(&room, &template(n), Some(&key), 1_000 + n as u64, |_| {});
            }
        }
        let inner = h.lock();
        let held: usize = inner
            .rooms
            .values()
            .map(|r| r.log.bytes() + r.keys.keys().map(|k| 2 * k.len()).sum::<usize>())
            .sum();
        assert!(
            held <= budget,
            "{held} bytes of messages and keys held, budget {budget}"
        );
        let costs: usize = inner.rooms.iter().map(|(name, r)| r.cost(name)).sum();
        assert_eq!(inner.bytes, costs, "the running total matches the rooms");
        drop(inner);
        h.expire(Instant::now() + Duration::from_secs(120));
        assert_eq!(h.lock().bytes, 0, "all of it freed once expired");
    }

    #[test]
    fn a_since_past_every_id_issued_is_not_recovered_and_gets_what_there_is() {
        let h = MemoryHistory::new(10, Duration::from_secs(60), usize::MAX);
        // A client saw 2000-3 before a restart whose clock stepped back.
        let missed = publish(&h, 1, 1_000);
        let replay = h.read("r", CatchUp::Since(MessageId::new(2_000, 3)));
        assert!(!replay.recovered);
        assert_eq!(ids(&replay), vec![missed]);
    }
}
