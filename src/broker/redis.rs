//! The Redis broker: one node of many sharing one Redis (`REDIS_URL`) or a
//! Redis Cluster (`REDIS_CLUSTER_URLS`). Both modes are this one broker;
//! they differ in the command connection (`commands`), in where a channel
//! lives (`topology`) and in the pub/sub commands (`link::Flavor`: classic
//! with one Redis, sharded with a Cluster so a room's messages stay on the
//! shard that owns the room's slot).
//!
//! - Pub/sub on one subscriber connection per Redis server that holds a
//!   channel of this node (`subscriptions`); channels are reference-counted,
//!   so a room costs the node one subscription however many members it has.
//! - Room history in one Redis Stream per room. A Lua script adds the
//!   message (XADD, which assigns the id) and publishes it in one step, so
//!   every node sees a room's messages with the same ids in the same order.
//! - Each node keeps the recent tail of every room it is subscribed to and
//!   serves resumes from it; only a resume reaching further back reads the
//!   stream, once per room however many clients ask at the same time.
//! - Presence: a hash of user counts per room, plus each node's own
//!   contributions in the same slot and the set of rooms it is in, so a node
//!   that dies is reaped by the others once its liveness entry is older than
//!   `NODE_TTL`.
//! - Subscriptions are supervised: when one is lost (connection failure,
//!   failover, a Cluster slot that moved), the node subscribes again where
//!   the channel lives now and reads each affected room's stream after the
//!   last id it delivered, so local clients lose nothing and never notice.

mod commands;
mod keys;
mod link;
mod scripts;
mod subscriptions;
mod topology;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use futures::future::{BoxFuture, FutureExt};
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::{Client, RedisError, Script, Value};
use tokio::sync::mpsc;

use self::commands::Commands;
use self::keys::Keys;
use self::link::{Endpoint, Flavor};
use self::scripts::Scripts;
use self::subscriptions::{LinkEvent, Subscriptions};
use self::topology::Topology;
use super::{Broker, BrokerError, BrokerState, BrokerStats, Channel, Delivery};
use crate::history::log::{predecessor, RoomLog};
use crate::history::{Replay, Stored};
use crate::protocol::{now_ms, CatchUp, MessageId, MessageTemplate, RoomFrame};

/// How long a command a client waits for may take, retries included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Which Redis the nodes share.
#[derive(Debug, Clone)]
pub enum RedisServers {
    /// One Redis: `redis://host:port`.
    One(String),
    /// Seed nodes of a Redis Cluster (≥ 7.0, for sharded pub/sub).
    Cluster(Vec<String>),
}

/// Where a Redis broker connects and what it names.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub servers: RedisServers,
    /// Prefix of every key and channel, so several deployments can share a Redis.
    pub prefix: String,
    pub node_id: String,
    pub history_size: usize,
    pub history_ttl: Duration,
    /// A node whose liveness entry is older than this drops out of presence.
    pub node_ttl: Duration,
}

/// What the node knows of a subscribed room.
#[derive(Default)]
struct RoomTail {
    /// Recent messages, for resumes.
    log: RoomLog,
    /// The newest id handed to local fan-out: anything at or below is a
    /// duplicate (e.g. delivered again after a reconnect's catch-up).
    dispatched: Option<MessageId>,
    /// The stream's newest id when the node subscribed: older messages
    /// predate every local member (joins replay them on request), so a
    /// reconnect's catch-up starts above it. Kept apart from `dispatched`:
    /// raising that would drop live messages a member still needs.
    subscribed_after: Option<MessageId>,
    /// Whether the node knows where its members' messages start in the
    /// stream: false from subscribing until the stream is first read (or a
    /// message is dispatched). A catch-up before that cannot tell messages
    /// its members missed from ones that predate them.
    floor_known: bool,
    /// While the room's subscription is being restored: live frames wait
    /// here until the stream read that fills the gap has been delivered, so
    /// none overtakes it.
    held: Option<Vec<(Option<MessageId>, Utf8Bytes)>>,
}

/// This node's own presence contributions: the truth a resync writes back.
#[derive(Default)]
struct PresenceMirror {
    /// room → user → connections on this node.
    rooms: HashMap<Arc<str>, HashMap<Arc<str>, i64>>,
    /// Rooms the node left since their names were last taken out of its
    /// room set in Redis.
    left: HashSet<Arc<str>>,
}

#[derive(Default)]
struct Counters {
    channels: AtomicUsize,
    connections: AtomicUsize,
    reconnects: AtomicU64,
    gap_messages_recovered: AtomicU64,
    stream_reads: AtomicU64,
    channels_moved: AtomicU64,
}

pub struct RedisBroker {
    /// Itself, for the tasks it starts.
    me: Weak<RedisBroker>,
    keys: Keys,
    settings: RedisSettings,
    flavor: Flavor,
    /// The one Redis, or the first seed node (its credentials serve every
    /// node of the Cluster).
    endpoint: Endpoint,
    topology: Topology,
    commands: Commands,
    subscriptions: tokio::sync::Mutex<Subscriptions>,
    /// To the supervisor of the subscriptions.
    events: mpsc::UnboundedSender<LinkEvent>,
    /// A subscriber connection failed since the node was last ready.
    links_lost: AtomicBool,
    up: AtomicBool,
    tails: Mutex<HashMap<Arc<str>, RoomTail>>,
    /// One stream read per room at a time; waiters then find the tail filled.
    reads_in_flight: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
    presence_mirror: Mutex<PresenceMirror>,
    /// Presence changes run side by side (each is one atomic script and one
    /// mirror update); a resync or a tidy-up runs alone, so the mirror it
    /// writes is exact.
    presence_turn: tokio::sync::RwLock<()>,
    /// A presence update could not reach Redis: resync at the next chance.
    presence_dirty: AtomicBool,
    deliveries: mpsc::UnboundedSender<Delivery>,
    counters: Counters,
    scripts: Scripts,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Longest wait for a SUBSCRIBE or UNSUBSCRIBE confirmation; past it the
/// subscriber connection is considered broken.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(3);

fn unavailable(err: RedisError) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {err}"))
}

/// Exponential backoff with full jitter, capped.
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_secs(5);
    let ceiling = Duration::from_millis(100)
        .saturating_mul(1u32 << attempt.min(10))
        .min(cap);
    ceiling.mul_f64(fastrand::f64())
}

impl RedisBroker {
    /// Connects (waiting briefly for Redis, then carrying on in the
    /// background) and starts the subscription supervisor and liveness tasks.
    pub async fn start(
        settings: RedisSettings,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Delivery>), BrokerError> {
        let (flavor, endpoint, topology, commands) = match &settings.servers {
            RedisServers::One(url) => {
                let bad = |e: String| BrokerError::Unavailable(format!("bad REDIS_URL: {e}"));
                let client = Client::open(url.as_str()).map_err(|e| bad(e.to_string()))?;
                let endpoint = Endpoint::from_url(url).map_err(bad)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(COMMAND_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let commands =
                    ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
                let topology = Topology::Single(endpoint.address().into());
                (
                    Flavor::Classic,
                    endpoint,
                    topology,
                    Commands::Single(commands),
                )
            }
            RedisServers::Cluster(urls) => {
                let bad =
                    |e: String| BrokerError::Unavailable(format!("bad REDIS_CLUSTER_URLS: {e}"));
                let mut endpoints = urls.iter().map(|url| Endpoint::from_url(url));
                let endpoint = endpoints
                    .next()
                    .ok_or_else(|| bad("no seed node".into()))?
                    .map_err(bad)?;
                endpoints.collect::<Result<Vec<_>, _>>().map_err(bad)?;
                // Retries follow redirections (MOVED, ASK, TRYAGAIN), which
                // the server answers without running the command. A timeout
                // per attempt would be retried too, running a script that
                // was only slow (a master in a fork or an fsync) twice: a
                // publish stored and delivered twice, a join counted twice.
                // So only the whole request times out.
                let client = ClusterClientBuilder::new(urls.iter().map(String::as_str))
                    .retries(3)
                    .min_retry_wait(50)
                    .max_retry_wait(500)
                    .overall_response_timeout(Some(COMMAND_TIMEOUT))
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                // Connects in the background: a Cluster that is not up yet
                // is waited for like one Redis.
                let commands = client.get_pending_async_connection_with_config(
                    ClusterConfig::new().set_connection_timeout(Duration::from_secs(1)),
                );
                (
                    Flavor::Sharded,
                    endpoint,
                    Topology::cluster(),
                    Commands::Cluster(commands),
                )
            }
        };
        let (deliveries, incoming) = mpsc::unbounded_channel();
        let (events, events_received) = mpsc::unbounded_channel();
        // Every node hears broadcasts, from the first connection on.
        let mut subscriptions = Subscriptions::default();
        subscriptions.counts.insert(Channel::Broadcast, 1);
        let broker = Arc::new_cyclic(|me| RedisBroker {
            me: me.clone(),
            keys: Keys {
                prefix: settings.prefix.clone(),
            },
            settings,
            flavor,
            endpoint,
            topology,
            commands,
            subscriptions: tokio::sync::Mutex::new(subscriptions),
            events,
            links_lost: AtomicBool::new(false),
            up: AtomicBool::new(false),
            tails: Mutex::new(HashMap::new()),
            reads_in_flight: Mutex::new(HashMap::new()),
            presence_mirror: Mutex::new(PresenceMirror::default()),
            presence_turn: tokio::sync::RwLock::new(()),
            presence_dirty: AtomicBool::new(false),
            deliveries,
            counters: Counters {
                channels: AtomicUsize::new(1),
                ..Counters::default()
            },
            scripts: Scripts::new(flavor),
        });
        tokio::spawn(subscriptions::supervise(
            Arc::downgrade(&broker),
            events_received,
        ));
        tokio::spawn(keep_alive(Arc::downgrade(&broker)));
        for _ in 0..50 {
            if broker.up.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !broker.up.load(Ordering::Acquire) {
            tracing::warn!(redis = %broker.describe(), "Redis is not reachable yet; retrying in the background");
        }
        Ok((broker, incoming))
    }

    /// Where this broker connects, without passwords, for logs.
    fn describe(&self) -> String {
        match &self.settings.servers {
            RedisServers::One(url) => redact(url),
            RedisServers::Cluster(urls) => urls
                .iter()
                .map(|url| redact(url))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    fn deliver(&self, delivery: Delivery) {
        let _ = self.deliveries.send(delivery);
    }

    /// Handles one pub/sub message: rooms are deduplicated and remembered in
    /// the room's tail before fan-out.
    fn on_message(&self, channel: &str, payload: Bytes) {
        let Some(channel) = self.keys.parse_channel(channel) else {
            return;
        };
        let Ok(text) = Utf8Bytes::try_from(payload) else {
            tracing::warn!(%channel, "dropped a message that is not UTF-8");
            return;
        };
        match channel {
            Channel::Room(room) => {
                let Some((id, frame)) = split_room_payload(&text) else {
                    tracing::warn!(%room, "dropped a malformed room message");
                    return;
                };
                // A view into the same buffer, not a second copy.
                let start = text.len() - frame.len();
                let Ok(frame) = Utf8Bytes::try_from(Bytes::from(text).slice(start..)) else {
                    return;
                };
                self.dispatch_room(room, id, frame);
            }
            Channel::User(user) => self.deliver(Delivery::User { user, text }),
            Channel::Broadcast => self.deliver(Delivery::Broadcast(text)),
        }
    }

    /// A live room frame: to fan-out, or held while the room catches up.
    fn dispatch_room(&self, room: Arc<str>, id: Option<MessageId>, text: Utf8Bytes) {
        let mut tails = lock(&self.tails);
        // Not (or no longer) subscribed here: nobody to deliver to.
        let Some(room) = tails.get_key_value(&room).map(|(name, _)| name.clone()) else {
            return;
        };
        let Some(tail) = tails.get_mut(&room) else {
            return;
        };
        if let Some(held) = &mut tail.held {
            held.push((id, text));
            return;
        }
        self.dispatch_locked(tail, room, id, text);
    }

    /// Hands a room frame to fan-out unless it is a duplicate, and keeps it
    /// in the tail. Called under the tails lock: a resume that reads the
    /// tail either finds this frame there or is already a member and gets
    /// it live.
    fn dispatch_locked(
        &self,
        tail: &mut RoomTail,
        room: Arc<str>,
        id: Option<MessageId>,
        text: Utf8Bytes,
    ) {
        if let Some(id) = id {
            if tail.dispatched.is_some_and(|last| id <= last) {
                return;
            }
            tail.dispatched = Some(id);
        }
        let frame = Arc::new(RoomFrame { room, id, text });
        tail.log.push(frame.clone(), self.settings.history_size);
        self.deliver(Delivery::Room(frame));
    }

    /// After rooms got their subscription back: each room's messages
    /// published while it had none, from the stream, in order, then what
    /// arrived live meanwhile. Where that is impossible (the gap is longer
    /// than the stream, ids went backwards, Redis cannot be read), the
    /// room's local members are told to reconnect and resume, and learn
    /// `recovered:false` from it.
    async fn catch_up_rooms(&self, rooms: Vec<Arc<str>>) {
        // Rooms are independent: after a failover there may be thousands.
        let mut steps = Vec::with_capacity(rooms.len());
        for room in rooms {
            steps.push(
                async move {
                    self.catch_up_room(&room).await;
                    self.release_room(&room);
                }
                .boxed(),
            );
        }
        at_most_16_at_a_time(steps).await;
    }

    async fn catch_up_room(&self, room: &Arc<str>) {
        let Some((dispatched, floor_known)) = lock(&self.tails).get(room).map(|tail| {
            (
                tail.dispatched.max(tail.subscribed_after),
                tail.floor_known || tail.dispatched.is_some(),
            )
        }) else {
            return;
        };
        let mut attempt = 0;
        let read = loop {
            match self.read_stream(room).await {
                Ok(snapshot) => break Ok(snapshot),
                // The command connection may still be reconnecting (or the
                // Cluster still electing a new master).
                Err(err) if attempt < 8 => {
                    tracing::debug!(%room, error = %err, "catch-up read failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(err) => break Err(err),
            }
        };
        match read {
            Err(err) => {
                tracing::error!(%room, error = %err, "cannot catch up a room; its members will resume");
                self.resync_room(room, None);
            }
            Ok(None) => {
                // Redis came back without this room's stream. Messages
                // were refused while it was away, so members keep going;
                // resumes from before the outage will say recovered:false.
                if dispatched.is_some() {
                    tracing::warn!(%room, "room history is gone from Redis");
                }
                if let Some(tail) = lock(&self.tails).get_mut(room) {
                    tail.dispatched = None;
                    tail.floor_known = true;
                    tail.log.assume_complete_after(MessageId::new(now_ms(), 0));
                }
            }
            Ok(Some(snapshot)) if !floor_known => {
                // The stream was never read since subscribing (that read
                // failed, or the connection dropped first): its messages
                // cannot be told apart, so none is delivered as live.
                tracing::warn!(%room, "subscribed without knowing the stream's end; its members will resume");
                self.resync_room(room, Some(snapshot));
            }
            Ok(Some(snapshot)) => {
                let newest = snapshot.messages.last().and_then(|m| m.id);
                let broken = dispatched.is_some_and(|last| {
                    last < snapshot.complete_after || newest.is_some_and(|newest| newest < last)
                });
                if broken {
                    tracing::warn!(%room, "the stream no longer covers what this node delivered; its members will resume");
                    self.resync_room(room, Some(snapshot));
                    return;
                }
                let mut tails = lock(&self.tails);
                let Some(tail) = tails.get_mut(room) else {
                    return;
                };
                let mut recovered = 0;
                for frame in &snapshot.messages {
                    if frame.id > dispatched {
                        recovered += 1;
                        self.dispatch_locked(tail, room.clone(), frame.id, frame.text.clone());
                    }
                }
                tail.log.merge(
                    snapshot.messages,
                    snapshot.complete_after,
                    self.settings.history_size,
                );
                drop(tails);
                if recovered > 0 {
                    self.counters
                        .gap_messages_recovered
                        .fetch_add(recovered, Ordering::Relaxed);
                    tracing::info!(%room, recovered, "delivered messages missed while unsubscribed");
                }
            }
        }
    }

    /// Delivers what arrived live during a room's catch-up, after it.
    fn release_room(&self, room: &Arc<str>) {
        let mut tails = lock(&self.tails);
        let Some(tail) = tails.get_mut(room) else {
            return;
        };
        for (id, text) in tail.held.take().unwrap_or_default() {
            self.dispatch_locked(tail, room.clone(), id, text);
        }
    }

    /// Starts a room's tail afresh and tells its local members to resume.
    fn resync_room(&self, room: &Arc<str>, snapshot: Option<Snapshot>) {
        if let Some(tail) = lock(&self.tails).get_mut(room) {
            tail.log = RoomLog::new(None);
            tail.dispatched = None;
            tail.floor_known = snapshot.is_some();
            if let Some(snapshot) = snapshot {
                tail.dispatched = snapshot.messages.last().and_then(|m| m.id);
                tail.log.merge(
                    snapshot.messages,
                    snapshot.complete_after,
                    self.settings.history_size,
                );
            }
        }
        self.deliver(Delivery::Resync(room.clone()));
    }

    /// Fills a newly subscribed room's tail from its stream and sets the
    /// dedup floor there: the node starts its record of the room complete.
    async fn seed_tail(&self, room: &Arc<str>) {
        let read = self.read_stream(room).await;
        let mut tails = lock(&self.tails);
        let Some(tail) = tails.get_mut(room) else {
            return;
        };
        match read {
            Ok(Some(snapshot)) => {
                let newest = snapshot.messages.last().and_then(|m| m.id);
                tail.subscribed_after = tail.subscribed_after.max(newest);
                tail.floor_known = true;
                tail.log.merge(
                    snapshot.messages,
                    snapshot.complete_after,
                    self.settings.history_size,
                );
            }
            // No stream: everything from here on is in the tail.
            Ok(None) => {
                tail.floor_known = true;
                tail.log.assume_complete_after(MessageId::new(now_ms(), 0));
            }
            Err(err) => tracing::debug!(%room, error = %err, "seeding a room's tail failed"),
        }
    }

    /// The stream's newest `HISTORY_SIZE` messages and where it is complete
    /// from; `None` when the stream does not exist.
    async fn read_stream(&self, room: &Arc<str>) -> Result<Option<Snapshot>, BrokerError> {
        self.counters.stream_reads.fetch_add(1, Ordering::Relaxed);
        let mut commands = self.commands.clone();
        let reply: Vec<Value> = self
            .scripts
            .read
            .key(self.keys.stream(room))
            .arg(self.settings.history_size)
            .invoke_async(&mut commands)
            .await
            .map_err(unavailable)?;
        parse_snapshot(room, reply, self.settings.history_size)
    }

    /// Serves a catch-up from the room's tail, reading the stream (once per
    /// room at a time) only when the tail does not reach back far enough.
    async fn history_read(&self, room: &str, catch_up: CatchUp) -> Result<Replay, BrokerError> {
        let room: Arc<str> = Arc::from(room);
        if let Some(replay) = self.read_tail(&room, catch_up) {
            return Ok(replay);
        }
        let gate = lock(&self.reads_in_flight)
            .entry(room.clone())
            .or_default()
            .clone();
        let _turn = gate.lock().await;
        // Another reader may have filled the tail while this one waited.
        if let Some(replay) = self.read_tail(&room, catch_up) {
            return Ok(replay);
        }
        let snapshot = self.read_stream(&room).await;
        lock(&self.reads_in_flight).remove(&room);
        let snapshot = snapshot?;
        let mut tails = lock(&self.tails);
        let mut unsubscribed = RoomLog::new(None);
        // Subscribed (the normal case for a join): keep the read for the next one.
        let log = match tails.get_mut(&room) {
            Some(tail) => &mut tail.log,
            None => &mut unsubscribed,
        };
        match snapshot {
            Some(snapshot) => log.merge(
                snapshot.messages,
                snapshot.complete_after,
                self.settings.history_size,
            ),
            // No stream (never written, expired, or Redis restarted empty):
            // whatever `since` is, it cannot be shown complete.
            None => log.assume_complete_after(MessageId::new(now_ms(), 0)),
        }
        Ok(log.answer(catch_up))
    }

    fn read_tail(&self, room: &Arc<str>, catch_up: CatchUp) -> Option<Replay> {
        lock(&self.tails).get(room)?.log.read(catch_up)
    }

    /// Stamps this node alive, reaps silent nodes, and keeps this node's
    /// presence in Redis true.
    async fn keep_alive_once(&self) -> Result<(), RedisError> {
        let mut commands = self.commands.clone();
        let (registered, silent): (i64, Vec<String>) = self
            .scripts
            .liveness
            .key(self.keys.nodes())
            .arg(&self.settings.node_id)
            .arg(self.settings.node_ttl.as_millis() as u64)
            .invoke_async(&mut commands)
            .await?;
        if registered == 0 {
            tracing::info!(
                "Redis did not know this node (new, restarted, or reaped it); writing its presence"
            );
            // The script has registered the node again, so the next tick
            // will not say so: the resync stays due until it succeeds, even
            // if this tick fails before it.
            self.presence_dirty.store(true, Ordering::Release);
        }
        for node in silent {
            if node != self.settings.node_id {
                self.reap_node(&node).await?;
            }
        }
        if self.presence_dirty.load(Ordering::Acquire) {
            self.resync_presence().await?;
        }
        self.tidy_node_rooms().await
    }

    /// A silent node's users leave every room it was in (room by room: a
    /// room's presence lives in the room's slot), then the node is forgotten.
    /// Several nodes may reap the same node at once: each room's step finds
    /// nothing left to do the second time.
    async fn reap_node(&self, node: &str) -> Result<(), RedisError> {
        let mut commands = self.commands.clone();
        let rooms: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.node_rooms(node))
            .query_async(&mut commands)
            .await?;
        let mut reaps = Vec::with_capacity(rooms.len());
        for room in &rooms {
            let mut commands = self.commands.clone();
            let mut invocation = self.scripts.reap_room.key(self.keys.presence(room));
            invocation
                .key(self.keys.node_presence(room, node))
                .arg(self.keys.room_channel(room))
                .arg(room);
            reaps.push(async move { invocation.invoke_async::<i64>(&mut commands).await }.boxed());
        }
        let mut left = 0;
        for reaped in at_most_16_at_a_time(reaps).await {
            left += reaped?;
        }
        redis::cmd("DEL")
            .arg(self.keys.node_rooms(node))
            .query_async::<()>(&mut commands)
            .await?;
        redis::cmd("ZREM")
            .arg(self.keys.nodes())
            .arg(node)
            .query_async::<()>(&mut commands)
            .await?;
        tracing::info!(%node, rooms = rooms.len(), users_left = left, "reaped the presence of a silent node");
        Ok(())
    }

    /// Takes the rooms this node left out of its room set in Redis (kept
    /// while present, so a reaper finds every room).
    async fn tidy_node_rooms(&self) -> Result<(), RedisError> {
        if lock(&self.presence_mirror).left.is_empty() {
            return Ok(());
        }
        let _turn = self.presence_turn.write().await;
        let left: Vec<Arc<str>> = {
            let mut mirror = lock(&self.presence_mirror);
            let PresenceMirror { rooms, left } = &mut *mirror;
            left.drain()
                .filter(|room| !rooms.contains_key(room))
                .collect()
        };
        if left.is_empty() {
            return Ok(());
        }
        let mut commands = self.commands.clone();
        let removed = redis::cmd("SREM")
            .arg(self.keys.node_rooms(&self.settings.node_id))
            .arg(left.iter().map(|room| &**room).collect::<Vec<_>>())
            .query_async::<()>(&mut commands)
            .await;
        if removed.is_err() {
            lock(&self.presence_mirror).left.extend(left);
        }
        removed
    }

    /// Writes this node's presence, as it really is, over what Redis has:
    /// every room it is recorded in or really in, then its room set.
    async fn resync_presence(&self) -> Result<(), RedisError> {
        let _turn = self.presence_turn.write().await;
        self.presence_dirty.store(false, Ordering::Release);
        let result = self.resync_presence_locked().await;
        if result.is_err() {
            self.presence_dirty.store(true, Ordering::Release);
        }
        result
    }

    async fn resync_presence_locked(&self) -> Result<(), RedisError> {
        let node = &self.settings.node_id;
        let mut commands = self.commands.clone();
        let recorded: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.node_rooms(node))
            .query_async(&mut commands)
            .await?;
        let mut rooms: HashMap<Arc<str>, Vec<(Arc<str>, i64)>> = {
            let mut mirror = lock(&self.presence_mirror);
            mirror.left.clear();
            mirror
                .rooms
                .iter()
                .map(|(room, users)| {
                    let users = users.iter().map(|(u, n)| (u.clone(), *n)).collect();
                    (room.clone(), users)
                })
                .collect()
        };
        let present: Vec<Arc<str>> = rooms.keys().cloned().collect();
        for room in recorded {
            rooms.entry(room.into()).or_default();
        }
        let mut resyncs = Vec::with_capacity(rooms.len());
        for (room, users) in &rooms {
            let mut commands = self.commands.clone();
            let mut invocation = self.scripts.resync_room.key(self.keys.presence(room));
            invocation.key(self.keys.node_presence(room, node));
            for (user, connections) in users {
                invocation.arg(&**user).arg(*connections);
            }
            resyncs.push(async move { invocation.invoke_async::<()>(&mut commands).await }.boxed());
        }
        for resynced in at_most_16_at_a_time(resyncs).await {
            resynced?;
        }
        let mut invocation = self.scripts.replace_set.key(self.keys.node_rooms(node));
        for room in &present {
            invocation.arg(&**room);
        }
        invocation.invoke_async::<()>(&mut commands).await
    }

    async fn presence_change(
        &self,
        script: &Script,
        delta: i64,
        room: &str,
        user: &str,
        event: Utf8Bytes,
    ) -> Result<bool, BrokerError> {
        let _turn = self.presence_turn.read().await;
        // The node's own record changes whatever Redis says: it is the truth
        // a resync writes back after an outage.
        let new_room = {
            let mut mirror = lock(&self.presence_mirror);
            let room: Arc<str> = Arc::from(room);
            let new_room = !mirror.rooms.contains_key(&room);
            let users = mirror.rooms.entry(room.clone()).or_default();
            let entry = users.entry(Arc::from(user)).or_insert(0);
            *entry += delta;
            if *entry <= 0 {
                users.remove(user);
            }
            if users.is_empty() {
                mirror.rooms.remove(&room);
                mirror.left.insert(room);
            } else {
                mirror.left.remove(&room);
            }
            new_room && delta > 0
        };
        let mut commands = self.commands.clone();
        if new_room {
            // Before the room's own record: a reaper must find every room.
            let added = redis::cmd("SADD")
                .arg(self.keys.node_rooms(&self.settings.node_id))
                .arg(room)
                .query_async::<()>(&mut commands)
                .await;
            if let Err(err) = added {
                self.presence_dirty.store(true, Ordering::Release);
                return Err(unavailable(err));
            }
        }
        let changed: Result<i64, RedisError> = script
            .key(self.keys.presence(room))
            .key(self.keys.node_presence(room, &self.settings.node_id))
            .arg(user)
            .arg(self.keys.room_channel(room))
            .arg(event.as_str())
            .invoke_async(&mut commands)
            .await;
        match changed {
            Ok(changed) => Ok(changed == 1),
            Err(err) => {
                self.presence_dirty.store(true, Ordering::Release);
                Err(unavailable(err))
            }
        }
    }
}

/// Runs per-room steps side by side (on a Cluster they spread over the
/// shards), a bounded number at a time; their results.
async fn at_most_16_at_a_time<T>(steps: Vec<BoxFuture<'_, T>>) -> Vec<T> {
    futures::stream::iter(steps)
        .buffer_unordered(16)
        .collect()
        .await
}

/// A read of a room's stream.
struct Snapshot {
    messages: Vec<Arc<RoomFrame>>,
    complete_after: MessageId,
}

/// `<id> <frame>` or `- <frame>` (presence events have no id).
fn split_room_payload(payload: &str) -> Option<(Option<MessageId>, &str)> {
    let (id, frame) = payload.split_once(' ')?;
    if id == "-" {
        return Some((None, frame));
    }
    Some((Some(id.parse().ok()?), frame))
}

fn parse_snapshot(
    room: &Arc<str>,
    reply: Vec<Value>,
    history_size: usize,
) -> Result<Option<Snapshot>, BrokerError> {
    let bad =
        |what: &str| BrokerError::Unavailable(format!("unexpected stream read reply: {what}"));
    let mut parts = reply.into_iter();
    let (Some(deleted), Some(first), Some(entries)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(None);
    };
    let as_string = |v: Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b).ok(),
            Value::SimpleString(s) => Some(s),
            _ => None,
        }
    };
    let deleted: MessageId = as_string(deleted)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("max-deleted-entry-id"))?;
    let first: Option<MessageId> = as_string(first).and_then(|s| s.parse().ok());
    let Value::Array(entries) = entries else {
        return Err(bad("entries"));
    };
    let full = entries.len() >= history_size;
    let mut messages = Vec::with_capacity(entries.len());
    for entry in entries.into_iter().rev() {
        let Value::Array(mut pair) = entry else {
            return Err(bad("entry"));
        };
        let (Some(Value::Array(fields)), Some(id)) = (pair.pop(), pair.pop()) else {
            return Err(bad("entry shape"));
        };
        let id: MessageId = as_string(id)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("entry id"))?;
        let mut fields = fields.into_iter().map(as_string);
        let (mut prefix, mut suffix) = (None, None);
        while let (Some(Some(name)), Some(Some(value))) = (fields.next(), fields.next()) {
            match name.as_str() {
                "p" => prefix = Some(value),
                "s" => suffix = Some(value),
                _ => {}
            }
        }
        let (Some(prefix), Some(suffix)) = (prefix, suffix) else {
            return Err(bad("entry fields"));
        };
        let template = MessageTemplate { prefix, suffix };
        messages.push(Arc::new(RoomFrame {
            room: room.clone(),
            id: Some(id),
            text: template.with_id(id).into(),
        }));
    }
    // A stream with deletions recorded is complete after the largest deleted
    // id; otherwise from just below its first entry. `MAXLEN ~` trimming
    // keeps at least HISTORY_SIZE entries (and Redis 7.0 does not record
    // what it trims), so a capped read is complete only from just below
    // the oldest entry it returned.
    let mut complete_after = if deleted > MessageId::ZERO {
        deleted
    } else {
        first.map(predecessor).unwrap_or(MessageId::ZERO)
    };
    if full {
        if let Some(oldest) = messages.first().and_then(|m| m.id) {
            complete_after = complete_after.max(predecessor(oldest));
        }
    }
    Ok(Some(Snapshot {
        messages,
        complete_after,
    }))
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

async fn keep_alive(broker: Weak<RedisBroker>) {
    loop {
        let Some(strong) = broker.upgrade() else {
            return;
        };
        let every = strong.settings.node_ttl / 3;
        if let Err(err) = strong.keep_alive_once().await {
            tracing::debug!(error = %err, "liveness update failed");
        }
        drop(strong);
        tokio::time::sleep(every).await;
    }
}

impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        match self.flavor {
            Flavor::Classic => "redis",
            Flavor::Sharded => "redis-cluster",
        }
    }

    fn state(&self) -> BrokerState {
        if self.up.load(Ordering::Acquire) {
            BrokerState::Up
        } else {
            BrokerState::Down
        }
    }

    fn stats(&self) -> BrokerStats {
        BrokerStats {
            kind: self.kind(),
            state: self.state(),
            channels: self.counters.channels.load(Ordering::Relaxed),
            subscriber_connections: self.counters.connections.load(Ordering::Relaxed),
            reconnects: self.counters.reconnects.load(Ordering::Relaxed),
            channels_moved: self.counters.channels_moved.load(Ordering::Relaxed),
            gap_messages_recovered: self.counters.gap_messages_recovered.load(Ordering::Relaxed),
            stream_reads: self.counters.stream_reads.load(Ordering::Relaxed),
        }
    }

    fn publish_room<'a>(
        &'a self,
        room: &'a str,
        message: MessageTemplate,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Stored, BrokerError>> {
        async move {
            let mut commands = self.commands.clone();
            let mut invocation = self.scripts.publish.key(self.keys.stream(room));
            if let Some(key) = key {
                invocation.key(self.keys.idempotency(room, key));
            }
            let (id, duplicate): (String, i64) = invocation
                .arg(self.keys.room_channel(room))
                .arg(self.settings.history_size)
                .arg(self.settings.history_ttl.as_millis() as u64)
                .arg(&message.prefix)
                .arg(&message.suffix)
                .invoke_async(&mut commands)
                .await
                .map_err(unavailable)?;
            let id = id
                .parse()
                .map_err(|_| BrokerError::Unavailable(format!("Redis returned a bad id {id:?}")))?;
            Ok(Stored {
                id,
                duplicate: duplicate == 1,
            })
        }
        .boxed()
    }

    fn publish<'a>(
        &'a self,
        channel: &'a Channel,
        text: Utf8Bytes,
    ) -> BoxFuture<'a, Result<usize, BrokerError>> {
        async move {
            let payload = match channel {
                Channel::Room(_) => format!("- {}", text.as_str()),
                _ => text.as_str().to_string(),
            };
            let mut commands = self.commands.clone();
            let receivers: usize = redis::cmd(self.flavor.publish())
                .arg(self.keys.channel(channel))
                .arg(payload)
                .query_async(&mut commands)
                .await
                .map_err(unavailable)?;
            Ok(receivers)
        }
        .boxed()
    }

    fn subscribe(&self, channel: Channel) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.subscribe_channel(channel).boxed()
    }

    fn unsubscribe(&self, channel: Channel) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.unsubscribe_channel(channel).boxed()
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        catch_up: CatchUp,
    ) -> BoxFuture<'a, Result<Replay, BrokerError>> {
        self.history_read(room, catch_up).boxed()
    }

    fn presence_add<'a>(
        &'a self,
        room: &'a str,
        user: &'a str,
        event: Utf8Bytes,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        self.presence_change(&self.scripts.presence_add, 1, room, user, event)
            .boxed()
    }

    fn presence_remove<'a>(
        &'a self,
        room: &'a str,
        user: &'a str,
        event: Utf8Bytes,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        self.presence_change(&self.scripts.presence_remove, -1, room, user, event)
            .boxed()
    }

    fn put_ticket<'a>(
        &'a self,
        ticket: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let mut commands = self.commands.clone();
            redis::cmd("SET")
                .arg(self.keys.ticket(ticket))
                .arg(token)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async::<()>(&mut commands)
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn take_ticket<'a>(
        &'a self,
        ticket: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BrokerError>> {
        async move {
            let mut commands = self.commands.clone();
            redis::cmd("GETDEL")
                .arg(self.keys.ticket(ticket))
                .query_async(&mut commands)
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn presence<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<Vec<String>, BrokerError>> {
        async move {
            let mut commands = self.commands.clone();
            let mut users: Vec<String> = redis::cmd("HKEYS")
                .arg(self.keys.presence(room))
                .query_async(&mut commands)
                .await
                .map_err(unavailable)?;
            users.sort();
            Ok(users)
        }
        .boxed()
    }

    fn put_node_stats<'a>(
        &'a self,
        node: &'a str,
        snapshot: String,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let mut commands = self.commands.clone();
            let expires = now_ms() + ttl.as_millis() as u64;
            let key = self.keys.node_stats();
            redis::pipe()
                .hset(&key, node, format!("{expires} {snapshot}"))
                .ignore()
                .pexpire(&key, ttl.as_millis() as i64)
                .ignore()
                .query_async::<()>(&mut commands)
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn node_stats(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, BrokerError>> {
        async move {
            let mut commands = self.commands.clone();
            let key = self.keys.node_stats();
            let all: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut commands)
                .await
                .map_err(unavailable)?;
            let now = now_ms();
            let (mut live, stale): (Vec<_>, Vec<_>) = all
                .into_iter()
                .filter_map(|(node, value)| {
                    let (expires, snapshot) = value.split_once(' ')?;
                    Some((
                        node,
                        expires.parse::<u64>().ok()? > now,
                        snapshot.to_string(),
                    ))
                })
                .partition(|(_, live, _)| *live);
            if !stale.is_empty() {
                let nodes: Vec<&str> = stale.iter().map(|(node, _, _)| node.as_str()).collect();
                // Best effort: a crashed node's entry is only skipped until then.
                let _ = redis::cmd("HDEL")
                    .arg(&key)
                    .arg(&nodes)
                    .query_async::<()>(&mut commands)
                    .await;
            }
            live.sort();
            Ok(live
                .into_iter()
                .map(|(node, _, snapshot)| (node, snapshot))
                .collect())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_payloads_carry_the_id_or_a_dash() {
        assert_eq!(
            split_room_payload("12-3 {\"a\":1}"),
            Some((Some(MessageId::new(12, 3)), "{\"a\":1}"))
        );
        assert_eq!(split_room_payload("- {}"), Some((None, "{}")));
        assert_eq!(split_room_payload("nonsense"), None);
        assert_eq!(split_room_payload("x-y {}"), None);
    }

    #[test]
    fn backoff_grows_with_full_jitter_and_a_cap() {
        for attempt in 0..40 {
            let delay = backoff(attempt);
            assert!(delay <= Duration::from_secs(5));
            assert!(delay <= Duration::from_millis(100) * (1 << attempt.min(10)));
        }
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
