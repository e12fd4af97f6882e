//! Per-room history of recent messages, which lets a reconnecting client
//! resume from its last id and a new joiner read the backlog. The embedded
//! mode keeps a ring buffer per room in memory ([`memory`]).

pub mod log;
pub mod memory;

use std::sync::Arc;

use crate::protocol::RoomFrame;

/// What a join's catch-up read returns.
#[derive(Debug, Default)]
pub struct Replay {
    /// The messages to deliver, oldest first.
    pub messages: Vec<Arc<RoomFrame>>,
    /// False when history no longer reaches back to the requested id, so
    /// messages may have been missed.
    pub recovered: bool,
}

/// The outcome of storing a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub id: crate::protocol::MessageId,
    /// The idempotency key had been seen: nothing new was stored, `id` is the
    /// first message's.
    pub duplicate: bool,
}
