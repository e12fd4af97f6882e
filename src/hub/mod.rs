//! This node's registry of connections, users and rooms, and the fan-out of
//! broker deliveries to the local connections.
//!
//! Fan-out never waits on a client: every connection has a bounded queue
//! ([`Mailbox`]) and gets a cheap clone of an already encoded frame, written
//! straight to its socket when the socket takes it. A connection whose queue
//! is full is a slow consumer and is told to close with 4008; nobody else
//! notices.

mod close;
mod cursors;
mod dispatch;
mod mailbox;

pub use close::{CloseReason, CloseSignal};
pub use dispatch::Dispatcher;
pub use mailbox::{Mailbox, MailboxSettings, Sent, SocketIo};

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use tokio::task::JoinHandle;

use axum::extract::ws::Utf8Bytes;

use crate::broker::{Broker, BrokerError, Channel, Delivery};
use crate::protocol::{MessageId, RoomFrame, ServerFrame};
use crate::stats::Stats;

/// Connections written per task when a fan-out is split over tasks.
const FLUSH_CHUNK: usize = 256;

/// A connection's number on this node.
pub type ConnId = u64;

/// An item for a connection's outbound queue.
#[derive(Debug)]
pub enum Outbound {
    /// A frame for this connection only (replies, direct, broadcast).
    Frame(Utf8Bytes),
    /// A frame of a joined room: deduplicated by id against the join's replay.
    Room(Arc<RoomFrame>),
    /// A join began: hold the room's live frames until its catch-up arrives.
    JoinStarted(Arc<str>),
    /// The join's catch-up: replayed messages, then `joined`, then the held
    /// live frames that are newer than the replay.
    JoinCompleted(Box<JoinCompletion>),
    /// The join failed: send `error`. A first join drops the held frames;
    /// a re-join (still a member) writes them and carries on.
    JoinFailed {
        room: Arc<str>,
        error: Utf8Bytes,
        still_member: bool,
    },
    /// The room was left: forget it and send `left`.
    Left { room: Arc<str>, text: Utf8Bytes },
}

#[derive(Debug)]
pub struct JoinCompletion {
    pub room: Arc<str>,
    /// The client's `since`: it has everything up to here already.
    pub since: Option<MessageId>,
    pub replay: Vec<Arc<RoomFrame>>,
    pub joined: Utf8Bytes,
}

struct Connection {
    user: Arc<str>,
    mailbox: Mailbox,
    rooms: Vec<Arc<str>>,
}

#[derive(Default)]
struct Registry {
    connections: HashMap<ConnId, Connection>,
    users: HashMap<Arc<str>, Vec<ConnId>>,
    rooms: HashMap<Arc<str>, HashMap<ConnId, Mailbox>>,
}

impl Registry {
    /// The local members of a frame's room, and the frame naming the room
    /// with the registry's own `Arc`: the members' cursors hold that same
    /// `Arc` (see [`Hub::room_name`]), so each of them finds its room by a
    /// pointer compare. Counts the frame's delivery latency.
    fn room_of(
        &self,
        frame: Arc<RoomFrame>,
        stats: &Stats,
    ) -> Option<(Arc<RoomFrame>, &HashMap<ConnId, Mailbox>)> {
        let (name, members) = self.rooms.get_key_value(&frame.room)?;
        if let Some(id) = frame.id {
            stats.record_delivery_latency(id.ms);
        }
        let frame = if Arc::ptr_eq(name, &frame.room) {
            frame
        } else {
            Arc::new(RoomFrame {
                room: name.clone(),
                id: frame.id,
                text: frame.text.clone(),
            })
        };
        Some((frame, members))
    }
}

/// Figures for `/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubCounts {
    pub connections: usize,
    pub users: usize,
    pub rooms: usize,
}

pub struct Hub {
    registry: RwLock<Registry>,
    broker: Arc<dyn Broker>,
    stats: Arc<Stats>,
}

impl Hub {
    pub fn new(broker: Arc<dyn Broker>, stats: Arc<Stats>) -> Self {
        Hub {
            registry: RwLock::new(Registry::default()),
            broker,
            stats,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection of `user`, subscribing the node to the user's
    /// channel for direct messages.
    pub async fn connect(
        &self,
        id: ConnId,
        user: Arc<str>,
        mailbox: Mailbox,
    ) -> Result<(), BrokerError> {
        self.broker.subscribe(Channel::User(user.clone())).await?;
        let mut registry = self.write();
        registry.users.entry(user.clone()).or_default().push(id);
        registry.connections.insert(
            id,
            Connection {
                user,
                mailbox,
                rooms: Vec::new(),
            },
        );
        Ok(())
    }

    /// Removes a connection from its rooms and the registry.
    pub async fn disconnect(&self, id: ConnId) {
        let Some(connection) = self.write().connections.remove(&id) else {
            return;
        };
        for room in &connection.rooms {
            self.remove_member(id, room.clone(), &connection.user).await;
        }
        {
            let mut registry = self.write();
            if let Some(conns) = registry.users.get_mut(&connection.user) {
                conns.retain(|c| *c != id);
                if conns.is_empty() {
                    registry.users.remove(&connection.user);
                }
            }
        }
        if let Err(err) = self
            .broker
            .unsubscribe(Channel::User(connection.user.clone()))
            .await
        {
            tracing::warn!(user = %connection.user, error = %err, "unsubscribing a user channel failed");
        }
    }

    /// The name of `room` for a connection joining it: the registry's own
    /// `Arc` if the room has members here, so that frames and cursors share
    /// one `Arc` (see `Registry::room_of`).
    pub fn room_name(&self, room: &str) -> Arc<str> {
        match self.read().rooms.get_key_value(room) {
            Some((name, _)) => name.clone(),
            None => Arc::from(room),
        }
    }

    /// Adds the connection to `room`: the node is subscribed to the room's
    /// channel before this returns, so a history read afterwards misses
    /// nothing. Returns false if the connection was already a member.
    pub async fn join(&self, id: ConnId, room: &Arc<str>) -> Result<bool, BrokerError> {
        let user = {
            let registry = self.read();
            match registry.connections.get(&id) {
                Some(c) if c.rooms.contains(room) => return Ok(false),
                Some(c) => c.user.clone(),
                None => return Ok(false),
            }
        };
        self.broker.subscribe(Channel::Room(room.clone())).await?;
        let added = {
            let mut registry = self.write();
            let Registry {
                connections, rooms, ..
            } = &mut *registry;
            match connections.get_mut(&id) {
                Some(connection) => {
                    connection.rooms.push(room.clone());
                    rooms
                        .entry(room.clone())
                        .or_default()
                        .insert(id, connection.mailbox.clone());
                    true
                }
                None => false,
            }
        };
        if !added {
            // Disconnected meanwhile: give the subscription back.
            let _ = self.broker.unsubscribe(Channel::Room(room.clone())).await;
            return Ok(false);
        }
        let event = ServerFrame::Join { room, user: &user }.encode();
        if let Err(err) = self.broker.presence_add(room, &user, event.into()).await {
            tracing::warn!(%room, %user, error = %err, "presence update failed");
        }
        Ok(true)
    }

    /// Joins as a session does as far as the hub and the connection's room
    /// cursor go (tests of the fan-out, which have no session).
    #[cfg(test)]
    pub async fn join_tracked(&self, id: ConnId, room: &Arc<str>) -> Result<bool, BrokerError> {
        let mailbox = self.read().connections.get(&id).map(|c| c.mailbox.clone());
        if let Some(mailbox) = mailbox {
            mailbox.track_room(room);
        }
        self.join(id, room).await
    }

    /// Removes the connection from `room`; false if it was not a member.
    pub async fn leave(&self, id: ConnId, room: &str) -> bool {
        let (room, user) = {
            let mut registry = self.write();
            let Some(connection) = registry.connections.get_mut(&id) else {
                return false;
            };
            let Some(at) = connection.rooms.iter().position(|r| &**r == room) else {
                return false;
            };
            (connection.rooms.swap_remove(at), connection.user.clone())
        };
        self.remove_member(id, room, &user).await;
        true
    }

    async fn remove_member(&self, id: ConnId, room: Arc<str>, user: &Arc<str>) {
        {
            let mut registry = self.write();
            if let Some(members) = registry.rooms.get_mut(&room) {
                members.remove(&id);
                if members.is_empty() {
                    registry.rooms.remove(&room);
                }
            }
        }
        let event = ServerFrame::Leave { room: &room, user }.encode();
        if let Err(err) = self.broker.presence_remove(&room, user, event.into()).await {
            tracing::warn!(%room, %user, error = %err, "presence update failed");
        }
        if let Err(err) = self.broker.unsubscribe(Channel::Room(room.clone())).await {
            tracing::warn!(%room, error = %err, "unsubscribing a room channel failed");
        }
    }

    /// Fans a delivery out to the local connections it is for.
    pub async fn dispatch(&self, delivery: Delivery) {
        self.dispatch_all(&mut vec![delivery]).await;
    }

    /// Fans out every delivery in `deliveries` (emptying it). Mailboxes are
    /// corked while the batch is queued and written once each at the end, so
    /// a burst costs one write per connection, not one per frame.
    pub async fn dispatch_all(&self, deliveries: &mut Vec<Delivery>) {
        let started = Instant::now();
        match deliveries.as_mut_slice() {
            [Delivery::Room(frame)] => {
                let frame = frame.clone();
                deliveries.clear();
                // The next delivery waits for every part of this one: a
                // connection must get its frames in order.
                for part in self.deliver_room(frame) {
                    let _ = part.await;
                }
            }
            _ => {
                let mut corked = Vec::new();
                self.queue_corked(deliveries, &mut corked);
                self.flush(corked);
            }
        }
        self.stats.record_fanout(started.elapsed());
    }

    /// Queues every delivery (emptying `deliveries`) without writing: the
    /// mailboxes this corks are added to `corked`, for [`flush`](Self::flush).
    /// Until then anything else for those connections queues behind. Timed
    /// as a fan-out, like [`dispatch_all`](Self::dispatch_all).
    pub fn queue_corked(&self, deliveries: &mut Vec<Delivery>, corked: &mut Vec<Mailbox>) {
        let started = Instant::now();
        let registry = self.read();
        let stats = &*self.stats;
        let mut queue = |mailbox: &Mailbox, item: Outbound| {
            if mailbox.queue(item) {
                corked.push(mailbox.clone());
            }
        };
        for delivery in deliveries.drain(..) {
            match delivery {
                Delivery::Room(frame) => {
                    if let Some((frame, members)) = registry.room_of(frame, stats) {
                        for mailbox in members.values() {
                            queue(mailbox, Outbound::Room(frame.clone()));
                        }
                    }
                }
                Delivery::User { user, text } => {
                    for id in registry.users.get(&user).into_iter().flatten() {
                        if let Some(connection) = registry.connections.get(id) {
                            queue(&connection.mailbox, Outbound::Frame(text.clone()));
                        }
                    }
                }
                Delivery::Broadcast(text) => {
                    for connection in registry.connections.values() {
                        queue(&connection.mailbox, Outbound::Frame(text.clone()));
                    }
                }
                Delivery::Resync(room) => {
                    for mailbox in registry
                        .rooms
                        .get(&room)
                        .into_iter()
                        .flat_map(|m| m.values())
                    {
                        mailbox.close().close(CloseReason::RESYNC);
                    }
                }
            }
        }
        drop(registry);
        self.stats.record_fanout(started.elapsed());
    }

    /// Writes corked mailboxes, each once, with everything they gathered.
    pub fn flush(&self, corked: Vec<Mailbox>) {
        // Not waited for: the queues already hold every frame in order.
        in_parts(corked, |part| part.iter().for_each(Mailbox::flush));
    }

    /// One room frame on its own (the common case below saturation): each
    /// member gets it written straight from the shared frame, without a
    /// copy or a cork. A big room is split over tasks so every core writes.
    /// Returns the tasks writing the other parts.
    fn deliver_room(&self, frame: Arc<RoomFrame>) -> Vec<JoinHandle<()>> {
        let registry = self.read();
        let Some((frame, members)) = registry.room_of(frame, &self.stats) else {
            return Vec::new();
        };
        if members.len() <= 2 * FLUSH_CHUNK {
            // Small enough for this task alone: no list to copy.
            deliver_each(members.values(), &frame, &self.stats);
            return Vec::new();
        }
        let mailboxes: Vec<Mailbox> = members.values().cloned().collect();
        drop(registry);
        let stats = self.stats.clone();
        in_parts(mailboxes, move |part| deliver_each(part, &frame, &stats))
    }

    pub fn mailboxes(&self) -> Vec<Mailbox> {
        self.read()
            .connections
            .values()
            .map(|c| c.mailbox.clone())
            .collect()
    }

    pub fn counts(&self) -> HubCounts {
        let registry = self.read();
        HubCounts {
            connections: registry.connections.len(),
            users: registry.users.len(),
            rooms: registry.rooms.len(),
        }
    }
}

/// Delivers `frame` to each mailbox, counting what went out once.
fn deliver_each<'a>(
    mailboxes: impl IntoIterator<Item = &'a Mailbox>,
    frame: &Arc<RoomFrame>,
    stats: &Stats,
) {
    let mut sent = Sent::default();
    for mailbox in mailboxes {
        mailbox.deliver(frame, &mut sent);
    }
    sent.count(stats);
}

/// Runs `work` over `items`: this task takes the first part, and past
/// 2 × [`FLUSH_CHUNK`] the rest goes to tasks of [`FLUSH_CHUNK`] each, so
/// that every core writes to sockets. Returns those tasks.
fn in_parts<T: Send + Sync + 'static>(
    mut items: Vec<T>,
    work: impl Fn(&[T]) + Clone + Send + 'static,
) -> Vec<JoinHandle<()>> {
    let mut parts = Vec::new();
    while items.len() > 2 * FLUSH_CHUNK {
        let chunk = items.split_off(items.len() - FLUSH_CHUNK);
        let work = work.clone();
        parts.push(tokio::spawn(async move { work(&chunk) }));
    }
    work(&items);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use std::time::Duration;

    fn hub() -> (Arc<Hub>, Arc<MemoryBroker>, Arc<Stats>) {
        let (broker, _incoming) = MemoryBroker::start(10, Duration::from_secs(60), usize::MAX);
        let stats = Arc::new(Stats::new());
        let hub = Arc::new(Hub::new(broker.clone(), stats.clone()));
        (hub, broker, stats)
    }

    /// A mailbox without a socket: frames stay queued for `texts`.
    fn mailbox(capacity: usize) -> Mailbox {
        Mailbox::new(
            MailboxSettings {
                capacity,
                stats: Arc::new(Stats::new()),
            },
            None,
        )
    }

    fn room_frame(room: &str, seq: u64) -> Delivery {
        Delivery::Room(Arc::new(RoomFrame {
            room: room.into(),
            id: Some(MessageId::new(1, seq)),
            text: format!("m{seq}").into(),
        }))
    }

    fn texts(mailbox: &Mailbox) -> Vec<String> {
        mailbox.take_texts()
    }

    #[tokio::test]
    async fn room_frames_reach_members_only() {
        let (hub, _, _) = hub();
        let a_rx = mailbox(8);
        let a = a_rx.clone();
        let b_rx = mailbox(8);
        let b = b_rx.clone();
        hub.connect(1, "amy".into(), a).await.unwrap();
        hub.connect(2, "bob".into(), b).await.unwrap();
        assert!(hub.join_tracked(1, &"r".into()).await.unwrap());
        assert!(!hub.join_tracked(1, &"r".into()).await.unwrap());
        texts(&a_rx); // amy's own presence event
        hub.dispatch(room_frame("r", 1)).await;
        hub.dispatch(room_frame("other", 2)).await;
        assert_eq!(texts(&a_rx), vec!["m1"]);
        assert!(texts(&b_rx).is_empty());
        assert_eq!(
            hub.counts(),
            HubCounts {
                connections: 2,
                users: 2,
                rooms: 1
            }
        );
    }

    #[tokio::test]
    async fn direct_frames_reach_every_connection_of_the_user() {
        let (hub, _, _) = hub();
        let phone_rx = mailbox(8);
        let phone = phone_rx.clone();
        let laptop_rx = mailbox(8);
        let laptop = laptop_rx.clone();
        let other_rx = mailbox(8);
        let other = other_rx.clone();
        hub.connect(1, "amy".into(), phone).await.unwrap();
        hub.connect(2, "amy".into(), laptop).await.unwrap();
        hub.connect(3, "bob".into(), other).await.unwrap();
        hub.dispatch(Delivery::User {
            user: "amy".into(),
            text: "hi".into(),
        })
        .await;
        assert_eq!(texts(&phone_rx), vec!["hi"]);
        assert_eq!(texts(&laptop_rx), vec!["hi"]);
        assert!(texts(&other_rx).is_empty());
        hub.dispatch(Delivery::Broadcast("all".into())).await;
        assert_eq!(texts(&other_rx), vec!["all"]);
        assert_eq!(hub.counts().users, 2);
    }

    #[tokio::test]
    async fn a_full_queue_closes_only_that_connection_as_slow_consumer() {
        let (hub, _, stats) = hub();
        let slow = Mailbox::new(
            MailboxSettings {
                capacity: 1,
                stats: stats.clone(),
            },
            None,
        );
        let fast_rx = mailbox(64);
        let fast = fast_rx.clone();
        let slow_close = slow.clone();
        hub.connect(1, "slow".into(), slow).await.unwrap();
        hub.connect(2, "fast".into(), fast).await.unwrap();
        hub.join_tracked(1, &"r".into()).await.unwrap();
        hub.join_tracked(2, &"r".into()).await.unwrap();
        texts(&fast_rx);
        for seq in 0..5 {
            hub.dispatch(room_frame("r", seq)).await;
        }
        assert_eq!(
            slow_close.close().reason(),
            Some(CloseReason::SLOW_CONSUMER)
        );
        assert_eq!(texts(&fast_rx), vec!["m0", "m1", "m2", "m3", "m4"]);
        assert_eq!(
            slow_close.take_texts(),
            Vec::<String>::new(),
            "a slow consumer's queue is dropped"
        );
        assert_eq!(stats.snapshot_counters().slow_consumer_closes, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_room_fanned_out_over_several_tasks_gets_every_frame_in_order() {
        let (hub, _, _) = hub();
        let members: Vec<Mailbox> = (0..4 * FLUSH_CHUNK + 10).map(|_| mailbox(1000)).collect();
        let room: Arc<str> = "big".into();
        for (id, member) in members.iter().enumerate() {
            let id = id as ConnId;
            hub.connect(id, "fan".into(), member.clone()).await.unwrap();
            hub.join_tracked(id, &room).await.unwrap();
        }
        for seq in 0..100 {
            hub.dispatch(room_frame("big", seq)).await;
        }
        let expected: Vec<String> = (0..100).map(|seq| format!("m{seq}")).collect();
        for member in &members {
            assert_eq!(member.take_texts(), expected);
        }
    }

    #[tokio::test]
    async fn a_room_with_members_here_is_named_by_the_registrys_own_arc() {
        let (hub, _, _) = hub();
        let first: Arc<str> = hub.room_name("r");
        hub.connect(1, "amy".into(), mailbox(8)).await.unwrap();
        hub.join_tracked(1, &first).await.unwrap();
        assert!(Arc::ptr_eq(&hub.room_name("r"), &first));
        assert!(!Arc::ptr_eq(&hub.room_name("q"), &hub.room_name("q")));
        let registry = hub.read();
        let stats = Stats::new();
        let frame = Arc::new(RoomFrame {
            room: "r".into(),
            id: None,
            text: "x".into(),
        });
        let (frame, _) = registry.room_of(frame, &stats).unwrap();
        assert!(Arc::ptr_eq(&frame.room, &first), "the frame is renamed too");
    }

    #[tokio::test]
    async fn leaving_and_disconnecting_unsubscribe_the_last_member() {
        let (hub, broker, _) = hub();
        let a = mailbox(8);
        let b = mailbox(8);
        hub.connect(1, "amy".into(), a).await.unwrap();
        hub.connect(2, "bob".into(), b).await.unwrap();
        hub.join_tracked(1, &"r".into()).await.unwrap();
        hub.join_tracked(2, &"r".into()).await.unwrap();
        let room = Channel::Room("r".into());
        assert!(hub.leave(1, "r").await);
        assert!(!hub.leave(1, "r").await);
        assert_eq!(broker.publish(&room, "x".into()).await.unwrap(), 1);
        assert_eq!(broker.presence("r").await.unwrap(), vec!["bob"]);
        hub.disconnect(2).await;
        assert_eq!(broker.publish(&room, "x".into()).await.unwrap(), 0);
        assert!(broker.presence("r").await.unwrap().is_empty());
        assert_eq!(hub.counts().rooms, 0);
        assert_eq!(hub.counts().users, 1);
        hub.disconnect(1).await;
        let amy = Channel::User("amy".into());
        assert_eq!(broker.publish(&amy, "x".into()).await.unwrap(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_room_frame_follows_left_when_a_big_rooms_fan_out_is_split() {
        let (hub, _, _) = hub();
        let room: Arc<str> = "big".into();
        let members: Vec<Mailbox> = (0..2 * FLUSH_CHUNK + 10).map(|_| mailbox(1000)).collect();
        for (id, member) in members.iter().enumerate() {
            hub.connect(id as ConnId, "fan".into(), member.clone())
                .await
                .unwrap();
            hub.join_tracked(id as ConnId, &room).await.unwrap();
        }
        for member in &members {
            member.take_texts();
        }
        // The parts run in tasks of their own, after the member list was
        // taken and the registry lock released.
        let mut fanout = Box::pin(hub.dispatch(room_frame("big", 1)));
        assert!(
            futures::poll!(&mut fanout).is_pending(),
            "waits for its parts"
        );
        // Meanwhile every member leaves, as a session does: hub, then `left`.
        for (id, member) in members.iter().enumerate() {
            assert!(hub.leave(id as ConnId, "big").await);
            member.offer(Outbound::Left {
                room: room.clone(),
                text: "left".into(),
            });
        }
        fanout.await;
        let late: Vec<Vec<String>> = members
            .iter()
            .map(|m| m.take_texts())
            .filter(|texts| texts.last().map(String::as_str) != Some("left"))
            .collect();
        assert!(
            late.is_empty(),
            "{} members got a room frame after `left`, e.g. {:?}",
            late.len(),
            late.first()
        );
    }
}
