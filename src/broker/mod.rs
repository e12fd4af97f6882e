//! The cross-node transport: what nodes share. A node publishes room
//! messages (stored in history and published as one atomic step), direct
//! messages, broadcasts and presence events through its [`Broker`], and
//! receives, on one stream, every [`Delivery`] for the channels it is
//! subscribed to. The hub and sessions only ever see this trait, so the
//! in-process broker ([`memory`]) and a Redis one are interchangeable.

pub mod memory;
pub mod redis;

use std::fmt;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use futures::future::BoxFuture;
use serde::Serialize;

use crate::history::{Replay, Stored};
use crate::protocol::{CatchUp, MessageTemplate, RoomFrame};

/// A pub/sub channel. Rooms and users each have one; `Broadcast` reaches
/// every node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channel {
    Room(Arc<str>),
    User(Arc<str>),
    Broadcast,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Room(room) => write!(f, "room:{room}"),
            Channel::User(user) => write!(f, "user:{user}"),
            Channel::Broadcast => f.write_str("broadcast"),
        }
    }
}

/// An incoming frame for local fan-out, already encoded.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A room message or presence event, to the room's local members.
    Room(Arc<RoomFrame>),
    /// A direct message, to every local connection of `user`.
    User { user: Arc<str>, text: Utf8Bytes },
    /// To every local connection.
    Broadcast(Utf8Bytes),
    /// The node could not keep the room gap-free (its history no longer
    /// reaches back to what it delivered): the room's local members must
    /// reconnect and resume, and will learn what is lost.
    Resync(Arc<str>),
}

/// Whether the broker can currently carry messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerState {
    Up,
    Down,
}

/// What `/stats` and `/metrics` show of the broker.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BrokerStats {
    pub kind: &'static str,
    pub state: BrokerState,
    /// Channels this node is subscribed to.
    pub channels: usize,
    /// Connections the node subscribes on: one per Redis server holding
    /// channels it needs (with a Redis Cluster, one per such shard).
    pub subscriber_connections: usize,
    /// Times the subscriptions were restored after a subscriber connection failed.
    pub reconnects: u64,
    /// Channels subscribed again elsewhere because a Redis Cluster node stopped
    /// serving them (their slot moved, or their master handed over).
    pub channels_moved: u64,
    /// Messages delivered from history after a reconnect (published while
    /// the node was not listening).
    pub gap_messages_recovered: u64,
    /// History reads that went to the shared store (resumes the node's own
    /// tail could not serve).
    pub stream_reads: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
}

/// The cross-node transport, history and presence store of a node.
///
/// Contracts every implementation keeps:
/// - The node is always subscribed to [`Channel::Broadcast`].
/// - `subscribe`/`unsubscribe` are reference-counted per channel: the first
///   `subscribe` of a channel subscribes the node, the last `unsubscribe`
///   drops it. `subscribe` returns only once a message published afterwards
///   is sure to be delivered, so a join can subscribe, then read history,
///   without a gap.
/// - `publish_room` assigns the message id, stores the message and publishes
///   it as one step: every node sees a room's messages in id order.
/// - Deliveries are frames already encoded for clients; nodes never re-encode
///   them per recipient.
pub trait Broker: Send + Sync {
    /// A short name for `/stats`: `memory`, `redis`, …
    fn kind(&self) -> &'static str;

    fn state(&self) -> BrokerState;

    fn stats(&self) -> BrokerStats;

    /// Stores a room message in history and publishes it to the room's channel.
    fn publish_room<'a>(
        &'a self,
        room: &'a str,
        message: MessageTemplate,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Stored, BrokerError>>;

    /// Publishes an already encoded frame that is not stored in history
    /// (direct, broadcast, presence events). Returns how many nodes were
    /// subscribed to the channel: 0 means nobody received it.
    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        text: Utf8Bytes,
    ) -> BoxFuture<'a, Result<usize, BrokerError>>;

    fn subscribe(&self, channel: Channel) -> BoxFuture<'_, Result<(), BrokerError>>;

    fn unsubscribe(&self, channel: Channel) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// The messages a joining client gets before live ones.
    fn history<'a>(
        &'a self,
        room: &'a str,
        catch_up: CatchUp,
    ) -> BoxFuture<'a, Result<Replay, BrokerError>>;

    /// Counts one more connection of `user` in `room`. When the user was
    /// not present before, publishes `event` (the presence `join` frame) to
    /// the room's channel in the same step, so a room's presence events
    /// never overtake each other; returns whether it did.
    fn presence_add<'a>(
        &'a self,
        room: &'a str,
        user: &'a str,
        event: Utf8Bytes,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// Counts one connection of `user` less in `room`; when it was the
    /// user's last, publishes `event` (the presence `leave` frame) in the
    /// same step and returns true.
    fn presence_remove<'a>(
        &'a self,
        room: &'a str,
        user: &'a str,
        event: Utf8Bytes,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// Stores a single-use ticket for `token`, valid for `ttl`.
    fn put_ticket<'a>(
        &'a self,
        ticket: &'a str,
        token: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Takes a ticket: its token the first time, `None` after that or once
    /// it expired.
    fn take_ticket<'a>(
        &'a self,
        ticket: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BrokerError>>;

    /// The users present in `room`, sorted.
    fn presence<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<Vec<String>, BrokerError>>;

    /// Shares `node`'s stats snapshot (a JSON object) with every node, for
    /// `ttl`: a node that stops sharing drops out of the cluster view.
    fn put_node_stats<'a>(
        &'a self,
        node: &'a str,
        snapshot: String,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// The live snapshots of every node that shares its stats, by node.
    fn node_stats(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, BrokerError>>;
}
