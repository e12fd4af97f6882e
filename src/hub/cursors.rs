//! A connection's view of each joined room, applied as frames are queued:
//! the last id written (to drop duplicates between a join's replay and live
//! frames) and, while a join's catch-up is being read, the live frames held
//! back until it arrives.

use std::sync::Arc;

use smallvec::SmallVec;

use axum::extract::ws::Utf8Bytes;

use super::{JoinCompletion, Outbound};
use crate::protocol::{MessageId, RoomFrame};

/// Cursors of one connection, and whether holding frames overflowed.
pub struct Cursors {
    rooms: RoomCursors,
    hold_limit: usize,
    pub overflowed: bool,
}

/// Cursors by room. A connection is in a few rooms, so a linear scan beats
/// hashing the room name of every frame written; the first room's cursor is
/// stored inline, so a fan-out finds it without another cache miss.
#[derive(Default)]
struct RoomCursors(SmallVec<[(Arc<str>, RoomCursor); 1]>);

impl RoomCursors {
    fn position(&self, room: &Arc<str>) -> Option<usize> {
        self.0
            .iter()
            .position(|(name, _)| Arc::ptr_eq(name, room) || **name == **room)
    }

    fn get_mut(&mut self, room: &Arc<str>) -> Option<&mut RoomCursor> {
        let at = self.position(room)?;
        Some(&mut self.0[at].1)
    }

    fn entry(&mut self, room: Arc<str>) -> &mut RoomCursor {
        let at = match self.position(&room) {
            Some(at) => at,
            None => {
                self.0.push((room, RoomCursor::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[at].1
    }

    fn remove(&mut self, room: &Arc<str>) {
        if let Some(at) = self.position(room) {
            self.0.swap_remove(at);
        }
    }
}

#[derive(Default)]
struct RoomCursor {
    last: Option<MessageId>,
    held: Option<Vec<Arc<RoomFrame>>>,
}

impl RoomCursor {
    /// False for a frame at or below the last id written.
    fn admit(&mut self, frame: &RoomFrame) -> bool {
        if let Some(id) = frame.id {
            if self.last.is_some_and(|last| id <= last) {
                return false;
            }
            self.last = Some(id);
        }
        true
    }

    fn pass(&mut self, frame: &RoomFrame, emit: &mut impl FnMut(Utf8Bytes)) {
        if self.admit(frame) {
            emit(frame.text.clone());
        }
    }
}

impl Cursors {
    pub fn new(hold_limit: usize) -> Self {
        Cursors {
            rooms: RoomCursors::default(),
            hold_limit,
            overflowed: false,
        }
    }

    /// The newest id of `room` written to this connection.
    pub fn last_written(&self, room: &Arc<str>) -> Option<MessageId> {
        let at = self.rooms.position(room)?;
        self.rooms.0[at].1.last
    }

    /// A cursor for `room` as a completed join leaves it (tests of the
    /// fan-out, which join through the hub alone).
    #[cfg(test)]
    pub fn track(&mut self, room: Arc<str>) {
        self.rooms.entry(room);
    }

    /// Whether a live room frame is to be written now. If not, it is held
    /// (a join of its room is under way), or dropped as already written, or
    /// the hold overflowed (`overflowed`).
    pub fn admit(&mut self, frame: &Arc<RoomFrame>) -> bool {
        match self.rooms.get_mut(&frame.room) {
            Some(RoomCursor {
                held: Some(held), ..
            }) => {
                if held.len() >= self.hold_limit {
                    self.overflowed = true;
                } else {
                    held.push(frame.clone());
                }
                false
            }
            Some(cursor) => cursor.admit(frame),
            // Not (or no longer) a member: a fan-out that took the member
            // list before a `leave` must not write after `left`.
            None => false,
        }
    }

    /// Turns a queue item into the frames to write, in order.
    pub fn apply(&mut self, item: Outbound, emit: &mut impl FnMut(Utf8Bytes)) {
        match item {
            Outbound::Frame(text) => emit(text),
            Outbound::Room(frame) => {
                if self.admit(&frame) {
                    emit(frame.text.clone());
                }
            }
            Outbound::JoinStarted(room) => {
                // A re-join keeps `last`: what was written stays written once.
                self.rooms.entry(room).held = Some(Vec::new());
            }
            Outbound::JoinCompleted(completion) => {
                let JoinCompletion {
                    room,
                    since,
                    replay,
                    joined,
                } = *completion;
                let cursor = self.rooms.entry(room);
                // Live frames the client already has (up to `since`) are not
                // repeated, even if this node delivers them late.
                cursor.last = cursor.last.max(since);
                let held = cursor.held.take().unwrap_or_default();
                for frame in &replay {
                    cursor.pass(frame, emit);
                }
                emit(joined);
                for frame in &held {
                    cursor.pass(frame, emit);
                }
            }
            Outbound::JoinFailed {
                room,
                error,
                still_member,
            } => {
                emit(error);
                if !still_member {
                    self.rooms.remove(&room);
                } else if let Some(cursor) = self.rooms.get_mut(&room) {
                    for frame in cursor.held.take().unwrap_or_default() {
                        cursor.pass(&frame, emit);
                    }
                }
            }
            Outbound::Left { room, text } => {
                self.rooms.remove(&room);
                emit(text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(room: &str, seq: Option<u64>, text: &str) -> Arc<RoomFrame> {
        Arc::new(RoomFrame {
            room: room.into(),
            id: seq.map(|s| MessageId::new(1, s)),
            text: text.into(),
        })
    }

    /// A join's catch-up without `since`.
    fn completed(room: &str, replay: Vec<Arc<RoomFrame>>, joined: &str) -> Outbound {
        Outbound::JoinCompleted(Box::new(JoinCompletion {
            room: room.into(),
            since: None,
            replay,
            joined: joined.into(),
        }))
    }

    fn run(cursors: &mut Cursors, items: Vec<Outbound>) -> Vec<String> {
        let mut out = Vec::new();
        for item in items {
            cursors.apply(item, &mut |text| out.push(text));
        }
        out.into_iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn live_frames_during_a_join_wait_for_the_replay_and_duplicates_are_dropped() {
        let mut cursors = Cursors::new(100);
        let out = run(
            &mut cursors,
            vec![
                Outbound::Frame("before".into()),
                Outbound::JoinStarted("r".into()),
                Outbound::Room(frame("r", Some(3), "m3")),
                Outbound::Room(frame("r", None, "presence")),
                Outbound::Room(frame("r", Some(4), "m4")),
                Outbound::Frame("direct".into()),
                completed(
                    "r",
                    vec![frame("r", Some(2), "m2"), frame("r", Some(3), "m3")],
                    "joined",
                ),
                Outbound::Room(frame("r", Some(4), "m4")),
                Outbound::Room(frame("r", Some(5), "m5")),
            ],
        );
        assert_eq!(
            out,
            vec!["before", "direct", "m2", "m3", "joined", "presence", "m4", "m5"]
        );
    }

    #[test]
    fn other_rooms_flow_while_one_is_joining_and_frames_of_rooms_left_are_dropped() {
        let mut cursors = Cursors::new(100);
        let out = run(
            &mut cursors,
            vec![
                Outbound::Room(frame("b", Some(1), "b1 before joining b")),
                Outbound::JoinStarted("b".into()),
                completed("b", vec![], "joined b"),
                Outbound::JoinStarted("a".into()),
                Outbound::Room(frame("b", Some(2), "b2")),
                completed("a", vec![], "joined a"),
                Outbound::Left {
                    room: "a".into(),
                    text: "left a".into(),
                },
                Outbound::JoinStarted("a".into()),
                Outbound::JoinFailed {
                    room: "a".into(),
                    error: "error".into(),
                    still_member: false,
                },
                Outbound::Room(frame("a", Some(9), "a9")),
            ],
        );
        assert_eq!(out, vec!["joined b", "b2", "joined a", "left a", "error"]);
        assert_eq!(cursors.rooms.0.len(), 1, "only b is left");
    }

    #[test]
    fn a_rejoin_with_since_does_not_repeat_what_was_already_written() {
        let mut cursors = Cursors::new(100);
        let completion = |replay| completed("r", replay, "joined");
        let out = run(
            &mut cursors,
            vec![
                Outbound::JoinStarted("r".into()),
                completion(vec![]),
                Outbound::Room(frame("r", Some(5), "m5")),
                Outbound::Room(frame("r", Some(6), "m6")),
                Outbound::JoinStarted("r".into()),
                completion(vec![frame("r", Some(5), "m5"), frame("r", Some(6), "m6")]),
                Outbound::Room(frame("r", Some(7), "m7")),
            ],
        );
        assert_eq!(out, vec!["joined", "m5", "m6", "joined", "m7"]);
    }

    #[test]
    fn a_failed_rejoin_keeps_the_live_frames_it_held() {
        let mut cursors = Cursors::new(100);
        let out = run(
            &mut cursors,
            vec![
                Outbound::JoinStarted("r".into()),
                completed("r", vec![], "joined"),
                Outbound::Room(frame("r", Some(1), "m1")),
                Outbound::JoinStarted("r".into()),
                Outbound::Room(frame("r", Some(2), "m2")),
                Outbound::JoinFailed {
                    room: "r".into(),
                    error: "error".into(),
                    still_member: true,
                },
                Outbound::Room(frame("r", Some(3), "m3")),
            ],
        );
        assert_eq!(out, vec!["joined", "m1", "error", "m2", "m3"]);
    }

    #[test]
    fn holding_more_than_the_queue_bound_marks_a_slow_consumer() {
        let mut cursors = Cursors::new(2);
        run(
            &mut cursors,
            vec![
                Outbound::JoinStarted("r".into()),
                Outbound::Room(frame("r", Some(1), "1")),
                Outbound::Room(frame("r", Some(2), "2")),
            ],
        );
        assert!(!cursors.overflowed);
        run(&mut cursors, vec![Outbound::Room(frame("r", Some(3), "3"))]);
        assert!(cursors.overflowed);
    }
}
