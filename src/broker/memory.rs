//! The embedded, in-process broker of a single node: subscriptions are
//! counted, deliveries go straight to the node's listener, history is a
//! [`MemoryHistory`] and presence a map of counters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use futures::future::{self, BoxFuture, FutureExt};
use tokio::sync::mpsc;

use super::{Broker, BrokerError, BrokerState, BrokerStats, Channel, Delivery};
use crate::history::memory::MemoryHistory;
use crate::history::{Replay, Stored};
use crate::protocol::{now_ms, CatchUp, MessageTemplate, RoomFrame};

/// Outstanding tickets above which expired ones are swept on the next put.
const TICKETS_BEFORE_SWEEP: usize = 1024;
/// Outstanding tickets at most: a flood of ticket requests cannot exhaust memory.
const MAX_TICKETS: usize = 100_000;

/// Connections per user, in one room.
type UserCounts = HashMap<Arc<str>, usize>;

pub struct MemoryBroker {
    history: MemoryHistory,
    /// Reference counts of subscribed channels.
    subscriptions: Mutex<HashMap<Channel, usize>>,
    presence: Mutex<HashMap<Arc<str>, UserCounts>>,
    /// Ticket → (token, expiry).
    tickets: Mutex<HashMap<String, (String, Instant)>>,
    /// Node → (stats snapshot, expiry). Only this node ever shares here.
    node_stats: Mutex<HashMap<String, (String, Instant)>>,
    /// Unbounded so that publishing never waits: the listener only
    /// offers to bounded client queues, and client input is rate limited.
    deliveries: mpsc::UnboundedSender<Delivery>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryBroker {
    /// The broker and the stream of deliveries for the node's listener. Starts
    /// a task that expires silent rooms' history; it ends with the broker.
    pub fn start(
        history_size: usize,
        history_ttl: Duration,
        history_max_bytes: usize,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Delivery>) {
        let (deliveries, incoming) = mpsc::unbounded_channel();
        let broker = Arc::new(MemoryBroker {
            history: MemoryHistory::new(history_size, history_ttl, history_max_bytes),
            subscriptions: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
            tickets: Mutex::new(HashMap::new()),
            node_stats: Mutex::new(HashMap::new()),
            deliveries,
        });
        let sweep_every =
            (history_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(expire_history(Arc::downgrade(&broker), sweep_every));
        (broker, incoming)
    }

    fn subscribed(&self, channel: &Channel) -> bool {
        *channel == Channel::Broadcast || lock(&self.subscriptions).contains_key(channel)
    }

    /// Delivers a frame without id to the room's members, if any are here.
    fn deliver_to_room(&self, room: &Arc<str>, text: Utf8Bytes) -> usize {
        if !self.subscribed(&Channel::Room(room.clone())) {
            return 0;
        }
        self.deliver(Delivery::Room(Arc::new(RoomFrame {
            room: room.clone(),
            id: None,
            text,
        })));
        1
    }

    fn deliver(&self, delivery: Delivery) {
        // The receiver is gone only while the node shuts down.
        let _ = self.deliveries.send(delivery);
    }
}

async fn expire_history(broker: Weak<MemoryBroker>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match broker.upgrade() {
            Some(broker) => broker.history.expire(Instant::now()),
            None => return,
        }
    }
}

impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn state(&self) -> BrokerState {
        BrokerState::Up
    }

    fn stats(&self) -> BrokerStats {
        BrokerStats {
            kind: self.kind(),
            state: self.state(),
            // The broadcast channel, always, plus the counted ones.
            channels: lock(&self.subscriptions).len() + 1,
            subscriber_connections: 0,
            reconnects: 0,
            channels_moved: 0,
            gap_messages_recovered: 0,
            stream_reads: 0,
        }
    }

    fn publish_room<'a>(
        &'a self,
        room: &'a str,
        message: MessageTemplate,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Stored, BrokerError>> {
        // Checked under the history lock: a joiner that subscribes after this
        // check reads history after this append, so it misses nothing.
        let stored = self.history.append(room, &message, key, now_ms(), |frame| {
            if self.subscribed(&Channel::Room(frame.room.clone())) {
                self.deliver(Delivery::Room(frame));
            }
        });
        future::ready(Ok(stored)).boxed()
    }

    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        text: Utf8Bytes,
    ) -> BoxFuture<'a, Result<usize, BrokerError>> {
        let receivers = match channel {
            Channel::Room(room) => self.deliver_to_room(room, text),
            _ if !self.subscribed(channel) => 0,
            Channel::User(user) => {
                self.deliver(Delivery::User {
                    user: user.clone(),
                    text,
                });
                1
            }
            Channel::Broadcast => {
                self.deliver(Delivery::Broadcast(text));
                1
            }
        };
        future::ready(Ok(receivers)).boxed()
    }

    fn subscribe(&self, channel: Channel) -> BoxFuture<'_, Result<(), BrokerError>> {
        *lock(&self.subscriptions).entry(channel).or_insert(0) += 1;
        future::ready(Ok(())).boxed()
    }

    fn unsubscribe(&self, channel: Channel) -> BoxFuture<'_, Result<(), BrokerError>> {
        let mut subscriptions = lock(&self.subscriptions);
        if let Some(count) = subscriptions.get_mut(&channel) {
            *count -= 1;
            if *count == 0 {
                subscriptions.remove(&channel);
            }
        }
        future::ready(Ok(())).boxed()
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        catch_up: CatchUp,
    ) -> BoxFuture<'a, Result<Replay, BrokerError>> {
        future::ready(Ok(self.history.read(room, catch_up))).boxed()
    }

    fn presence_add<'a>(
        &'a self,
        room: &'a str,
        user: &'a str,
        event: Utf8Bytes,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        let mut presence = lock(&self.presence);
        let room = match presence.get_key_value(room) {
            Some((name, _)) => name.clone(),
            None => Arc::from(room),
        };
        let users = presence.entry(room.clone()).or_default();
        let count = users.entry(Arc::from(user)).or_insert(0);
        *count += 1;
        let arrived = *count == 1;
        if arrived {
            // Still under the presence lock: events stay in order.
            self.deliver_to_room(&room, event);
        }
        future::ready(Ok(arrived)).boxed()
    }

    fn presence_remove<'a>(
        &'a self,
        room: &'a str,
        user: &'a str,
        event: Utf8Bytes,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        let mut presence = lock(&self.presence);
        let mut gone = false;
        if let Some(users) = presence.get_mut(room) {
            if let Some(count) = users.get_mut(user) {
                *count -= 1;
                if *count == 0 {
                    users.remove(user);
                    gone = true;
                }
            }
            if users.is_empty() {
                presence.remove(room);
            }
        }
        if gone {
            // Still under the presence lock: events stay in order.
            self.deliver_to_room(&Arc::from(room), event);
        }
        future::ready(Ok(gone)).boxed()
    }

    fn put_ticket<'a>(
        &'a self,
        ticket: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let now = Instant::now();
        let mut tickets = lock(&self.tickets);
        if tickets.len() >= TICKETS_BEFORE_SWEEP {
            tickets.retain(|_, (_, expires)| *expires > now);
        }
        if tickets.len() >= MAX_TICKETS {
            return future::ready(Err(BrokerError::Unavailable(
                "too many outstanding tickets; retry shortly".into(),
            )))
            .boxed();
        }
        tickets.insert(ticket.to_string(), (token.to_string(), now + ttl));
        future::ready(Ok(())).boxed()
    }

    fn take_ticket<'a>(
        &'a self,
        ticket: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BrokerError>> {
        let token = lock(&self.tickets)
            .remove(ticket)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(token, _)| token);
        future::ready(Ok(token)).boxed()
    }

    fn presence<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<Vec<String>, BrokerError>> {
        let mut users: Vec<String> = lock(&self.presence)
            .get(room)
            .map(|users| users.keys().map(|u| u.to_string()).collect())
            .unwrap_or_default();
        users.sort();
        future::ready(Ok(users)).boxed()
    }

    fn put_node_stats<'a>(
        &'a self,
        node: &'a str,
        snapshot: String,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        lock(&self.node_stats).insert(node.to_string(), (snapshot, Instant::now() + ttl));
        future::ready(Ok(())).boxed()
    }

    fn node_stats(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, BrokerError>> {
        let now = Instant::now();
        let mut all = lock(&self.node_stats);
        all.retain(|_, (_, expires)| *expires > now);
        let mut live: Vec<(String, String)> = all
            .iter()
            .map(|(node, (snapshot, _))| (node.clone(), snapshot.clone()))
            .collect();
        live.sort();
        future::ready(Ok(live)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscriptions_are_counted_and_only_subscribed_channels_deliver() {
        let (broker, mut incoming) = MemoryBroker::start(10, Duration::from_secs(60), usize::MAX);
        let alice = Channel::User("alice".into());
        assert_eq!(broker.publish(&alice, "x".into()).await.unwrap(), 0);
        broker.subscribe(alice.clone()).await.unwrap();
        broker.subscribe(alice.clone()).await.unwrap();
        broker.unsubscribe(alice.clone()).await.unwrap();
        assert_eq!(broker.publish(&alice, "y".into()).await.unwrap(), 1);
        match incoming.recv().await.unwrap() {
            Delivery::User { user, text } => assert_eq!((&*user, text.as_str()), ("alice", "y")),
            other => panic!("unexpected {other:?}"),
        }
        broker.unsubscribe(alice.clone()).await.unwrap();
        assert_eq!(broker.publish(&alice, "z".into()).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn room_messages_are_stored_even_without_subscribers() {
        let (broker, mut incoming) = MemoryBroker::start(10, Duration::from_secs(60), usize::MAX);
        let data = serde_json::value::RawValue::from_string("1".into()).unwrap();
        let template = MessageTemplate::new("r", "u", &data);
        let stored = broker
            .publish_room("r", template.clone(), None)
            .await
            .unwrap();
        assert!(incoming.try_recv().is_err());
        let replay = broker.history("r", CatchUp::Last(5)).await.unwrap();
        assert_eq!(replay.messages[0].id, Some(stored.id));
        broker.subscribe(Channel::Room("r".into())).await.unwrap();
        let second = broker.publish_room("r", template, None).await.unwrap();
        match incoming.recv().await.unwrap() {
            Delivery::Room(frame) => assert_eq!(frame.id, Some(second.id)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn presence_counts_connections_per_user() {
        let (broker, _incoming) = MemoryBroker::start(10, Duration::from_secs(60), usize::MAX);
        let (broker, mut incoming) = (broker, _incoming);
        broker.subscribe(Channel::Room("r".into())).await.unwrap();
        let event = |t: &str| Utf8Bytes::from(t.to_string());
        assert!(broker
            .presence_add("r", "bob", event("+bob"))
            .await
            .unwrap());
        assert!(!broker
            .presence_add("r", "bob", event("+bob again"))
            .await
            .unwrap());
        assert!(broker
            .presence_add("r", "amy", event("+amy"))
            .await
            .unwrap());
        assert_eq!(broker.presence("r").await.unwrap(), vec!["amy", "bob"]);
        assert!(!broker
            .presence_remove("r", "bob", event("-bob early"))
            .await
            .unwrap());
        assert!(broker
            .presence_remove("r", "bob", event("-bob"))
            .await
            .unwrap());
        assert_eq!(broker.presence("r").await.unwrap(), vec!["amy"]);
        let mut events = Vec::new();
        while let Ok(Delivery::Room(frame)) = incoming.try_recv() {
            events.push(frame.text.to_string());
        }
        assert_eq!(events, vec!["+bob", "+amy", "-bob"]);
    }
}
