//! The Redis broker: one node of many sharing one Redis.
//!
//! - Pub/sub on one dedicated subscriber connection per node; channels are
//!   reference-counted, so a room costs the node one SUBSCRIBE however many
//!   members it has here.
//! - Room history in one Redis Stream per room. A Lua script adds the
//!   message (XADD, which assigns the id) and publishes it in one step, so
//!   every node sees a room's messages with the same ids in the same order.
//! - Each node keeps the recent tail of every room it is subscribed to and
//!   serves resumes from it; only a resume reaching further back reads the
//!   stream, once per room however many clients ask at the same time.
//! - Presence: a hash of user counts per room, plus each node's own
//!   contributions, so a node that dies is reaped by the others once its
//!   liveness entry is older than `NODE_TTL`.
//! - The subscriber connection is supervised: when it drops, the node
//!   reconnects with backoff and jitter, resubscribes, and reads every
//!   joined room's stream after the last id it delivered, so local clients
//!   lose nothing and never notice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use futures::future::{BoxFuture, FutureExt};
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::{Client, RedisError, Script, Value};
use tokio::sync::mpsc;

use super::{Broker, BrokerError, BrokerState, BrokerStats, Channel, Delivery};
use crate::history::log::{predecessor, RoomLog};
use crate::history::{Replay, Stored};
use crate::protocol::{now_ms, CatchUp, MessageId, MessageTemplate, RoomFrame};

/// Stores a room message and publishes it, atomically.
/// KEYS: stream, [idempotency key]. ARGV: channel, maxlen, ttl ms, prefix, suffix.
/// The published payload is `<id> <frame>`; the frame is `prefix .. id .. suffix`.
const PUBLISH_SCRIPT: &str = r"
local idem = KEYS[2]
if idem then
  local existing = redis.call('GET', idem)
  if existing then return {existing, 1} end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'p', ARGV[4], 's', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if idem then redis.call('SET', idem, id, 'PX', ARGV[3]) end
redis.call('PUBLISH', ARGV[1], id .. ' ' .. ARGV[4] .. id .. ARGV[5])
return {id, 0}
";

/// Reads a room's stream: where it is complete from, and its newest entries.
/// KEYS: stream. ARGV: count. Returns {max-deleted-entry-id, first id,
/// entries newest first}, or {} when the stream does not exist.
const READ_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local deleted, first = '0-0', ''
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
  if info[i] == 'first-entry' and info[i + 1] then first = info[i + 1][1] end
end
return {deleted, first, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])}
";

/// A connection of `user` enters a room. KEYS: room presence, node presence.
/// ARGV: user, room, channel, event. Publishes the event when the user is new.
const PRESENCE_ADD_SCRIPT: &str = r"
redis.call('HINCRBY', KEYS[2], ARGV[2] .. '\031' .. ARGV[1], 1)
if redis.call('HINCRBY', KEYS[1], ARGV[1], 1) == 1 then
  redis.call('PUBLISH', ARGV[3], '- ' .. ARGV[4])
  return 1
end
return 0
";

/// A connection of `user` leaves a room; same keys and arguments.
const PRESENCE_REMOVE_SCRIPT: &str = r"
local field = ARGV[2] .. '\031' .. ARGV[1]
local mine = redis.call('HINCRBY', KEYS[2], field, -1)
if mine <= 0 then redis.call('HDEL', KEYS[2], field) end
if mine < 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[3], '- ' .. ARGV[4])
  return 1
end
return 0
";

/// Marks this node alive and reaps nodes silent for longer than the TTL
/// (returns how many, and whether this node was still registered):
/// their users leave every room they were in (with a `leave` event).
/// KEYS: nodes. ARGV: node, ttl ms, key prefix.
/// The `leave` frame is built here, not by the node that left, because that
/// node is gone; names never contain characters JSON would escape.
const LIVENESS_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local registered = redis.call('ZSCORE', KEYS[1], ARGV[1]) and 1 or 0
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
for _, node in ipairs(dead) do
  local mine = ARGV[3] .. ':node-presence:' .. node
  local fields = redis.call('HGETALL', mine)
  for i = 1, #fields, 2 do
    local room, user = string.match(fields[i], '^(.*)\031(.*)$')
    local hash = ARGV[3] .. ':presence:{' .. room .. '}'
    if redis.call('HINCRBY', hash, user, -tonumber(fields[i + 1])) <= 0 then
      redis.call('HDEL', hash, user)
      redis.call('PUBLISH', ARGV[3] .. ':room:{' .. room .. '}',
        '- {"type":"leave","room":"' .. room .. '","user":"' .. user .. '"}')
    end
  end
  redis.call('DEL', mine)
  redis.call('ZREM', KEYS[1], node)
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return {#dead, registered}
"#;

/// Makes this node's recorded presence equal to what it really has, after
/// Redis lost it (restarted empty) or reaped the node during an outage.
/// KEYS: node presence. ARGV: key prefix, then (room, user, connections)
/// triples. Rooms' hashes are named here, as in the liveness script.
const PRESENCE_RESYNC_SCRIPT: &str = r"
local recorded = redis.call('HGETALL', KEYS[1])
for i = 1, #recorded, 2 do
  local room, user = string.match(recorded[i], '^(.*)\031(.*)$')
  local hash = ARGV[1] .. ':presence:{' .. room .. '}'
  if redis.call('HINCRBY', hash, user, -tonumber(recorded[i + 1])) <= 0 then
    redis.call('HDEL', hash, user)
  end
end
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[1], ARGV[i] .. '\031' .. ARGV[i + 1], ARGV[i + 2])
  redis.call('HINCRBY', ARGV[1] .. ':presence:{' .. ARGV[i] .. '}', ARGV[i + 1], ARGV[i + 2])
end
return 1
";

/// Where a Redis broker connects and what it names.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    /// Prefix of every key and channel, so several deployments can share a Redis.
    pub prefix: String,
    pub node_id: String,
    pub history_size: usize,
    pub history_ttl: Duration,
    /// A node whose liveness entry is older than this drops out of presence.
    pub node_ttl: Duration,
}

/// Names of keys and channels. Room and user names sit in `{…}` hash tags,
/// so a room's stream, channel and presence share one Redis Cluster slot.
struct Keys {
    prefix: String,
}

impl Keys {
    fn channel(&self, channel: &Channel) -> String {
        match channel {
            Channel::Room(room) => format!("{}:room:{{{room}}}", self.prefix),
            Channel::User(user) => format!("{}:user:{{{user}}}", self.prefix),
            Channel::Broadcast => format!("{}:broadcast", self.prefix),
        }
    }

    fn parse_channel(&self, name: &str) -> Option<Channel> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix(':')?;
        if rest == "broadcast" {
            return Some(Channel::Broadcast);
        }
        let (kind, tagged) = rest.split_once(':')?;
        let inner = tagged.strip_prefix('{')?.strip_suffix('}')?;
        match kind {
            "room" => Some(Channel::Room(inner.into())),
            "user" => Some(Channel::User(inner.into())),
            _ => None,
        }
    }

    fn stream(&self, room: &str) -> String {
        format!("{}:stream:{{{room}}}", self.prefix)
    }

    fn idempotency(&self, room: &str, key: &str) -> String {
        format!("{}:key:{{{room}}}:{key}", self.prefix)
    }

    fn presence(&self, room: &str) -> String {
        format!("{}:presence:{{{room}}}", self.prefix)
    }

    fn node_presence(&self, node: &str) -> String {
        format!("{}:node-presence:{node}", self.prefix)
    }

    fn ticket(&self, ticket: &str) -> String {
        format!("{}:ticket:{ticket}", self.prefix)
    }

    /// One hash, node → "<expiry ms> <snapshot>": a single key, so it lives
    /// on one shard of a cluster too.
    fn node_stats(&self) -> String {
        format!("{}:node-stats", self.prefix)
    }

    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
}

/// The subscriber side: which channels this node needs, and the sink to
/// (un)subscribe while connected. Held across SUBSCRIBE round trips (a
/// tokio mutex), so concurrent joins of one room subscribe it once and all
/// return only after the subscription is active.
#[derive(Default)]
struct Subscriptions {
    counts: HashMap<Channel, usize>,
    sink: Option<PubSubSink>,
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
}

#[derive(Default)]
struct Counters {
    channels: AtomicUsize,
    reconnects: AtomicU64,
    gap_messages_recovered: AtomicU64,
    stream_reads: AtomicU64,
}

pub struct RedisBroker {
    keys: Keys,
    settings: RedisSettings,
    client: Client,
    commands: ConnectionManager,
    subscriptions: tokio::sync::Mutex<Subscriptions>,
    up: AtomicBool,
    tails: Mutex<HashMap<Arc<str>, RoomTail>>,
    /// One stream read per room at a time; waiters then find the tail filled.
    reads_in_flight: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
    /// This node's own presence contributions: connections per (room, user).
    presence_mirror: Mutex<HashMap<RoomUser, i64>>,
    /// Presence changes run side by side (each is one atomic script and one
    /// mirror update); a resync runs alone, so the mirror it writes is exact.
    presence_turn: tokio::sync::RwLock<()>,
    /// A presence update could not reach Redis: resync at the next chance.
    presence_dirty: AtomicBool,
    /// The subscriber's sink, for pings that must not wait behind a
    /// (possibly hung) SUBSCRIBE holding `subscriptions`.
    pinger: Mutex<Option<PubSubSink>>,
    /// Asks the subscriber task to drop its connection and start over.
    reconnect: tokio::sync::Notify,
    deliveries: mpsc::UnboundedSender<Delivery>,
    counters: Counters,
    publish_script: Script,
    read_script: Script,
    presence_add_script: Script,
    presence_remove_script: Script,
    liveness_script: Script,
    presence_resync_script: Script,
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
    /// background) and starts the subscriber and liveness tasks.
    pub async fn start(
        settings: RedisSettings,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Delivery>), BrokerError> {
        let client = Client::open(settings.url.as_str())
            .map_err(|e| BrokerError::Unavailable(format!("bad REDIS_URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let commands =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(unavailable)?;
        let (deliveries, incoming) = mpsc::unbounded_channel();
        // Every node hears broadcasts, from the first connection on.
        let mut subscriptions = Subscriptions::default();
        subscriptions.counts.insert(Channel::Broadcast, 1);
        let broker = Arc::new(RedisBroker {
            keys: Keys {
                prefix: settings.prefix.clone(),
            },
            settings,
            client,
            commands,
            subscriptions: tokio::sync::Mutex::new(subscriptions),
            up: AtomicBool::new(false),
            tails: Mutex::new(HashMap::new()),
            reads_in_flight: Mutex::new(HashMap::new()),
            presence_mirror: Mutex::new(HashMap::new()),
            presence_turn: tokio::sync::RwLock::new(()),
            presence_dirty: AtomicBool::new(false),
            pinger: Mutex::new(None),
            reconnect: tokio::sync::Notify::new(),
            deliveries,
            counters: Counters {
                channels: AtomicUsize::new(1),
                ..Counters::default()
            },
            publish_script: Script::new(PUBLISH_SCRIPT),
            read_script: Script::new(READ_SCRIPT),
            presence_add_script: Script::new(PRESENCE_ADD_SCRIPT),
            presence_remove_script: Script::new(PRESENCE_REMOVE_SCRIPT),
            liveness_script: Script::new(LIVENESS_SCRIPT),
            presence_resync_script: Script::new(PRESENCE_RESYNC_SCRIPT),
        });
        tokio::spawn(supervise_subscriber(Arc::downgrade(&broker)));
        tokio::spawn(keep_alive(Arc::downgrade(&broker)));
        for _ in 0..50 {
            if broker.up.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !broker.up.load(Ordering::Acquire) {
            tracing::warn!(url = %redact(&broker.settings.url), "Redis is not reachable yet; retrying in the background");
        }
        Ok((broker, incoming))
    }

    fn deliver(&self, delivery: Delivery) {
        let _ = self.deliveries.send(delivery);
    }

    /// Handles one pub/sub message: rooms are deduplicated and remembered in
    /// the room's tail before fan-out.
    fn on_message(&self, channel: &str, payload: &[u8]) {
        let Some(channel) = self.keys.parse_channel(channel) else {
            return;
        };
        let Ok(text) = Utf8Bytes::try_from(Bytes::copy_from_slice(payload)) else {
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

    fn dispatch_room(&self, room: Arc<str>, id: Option<MessageId>, text: Utf8Bytes) {
        let mut tails = lock(&self.tails);
        // Not (or no longer) subscribed here: nobody to deliver to.
        let Some(room) = tails.get_key_value(&room).map(|(name, _)| name.clone()) else {
            return;
        };
        let Some(tail) = tails.get_mut(&room) else {
            return;
        };
        if let Some(id) = id {
            if tail.dispatched.is_some_and(|last| id <= last) {
                return;
            }
            tail.dispatched = Some(id);
        }
        let frame = Arc::new(RoomFrame { room, id, text });
        tail.log.push(frame.clone(), self.settings.history_size);
        // Under the tails lock: a resume that reads the tail either finds
        // this frame there or is already a member and gets it live.
        self.deliver(Delivery::Room(frame));
    }

    /// After the subscriber reconnected: every subscribed room's messages
    /// published while it was away, from the stream, in order. Where that
    /// is impossible (the gap is longer than the stream, ids went
    /// backwards, Redis cannot be read), the room's local members are told
    /// to reconnect and resume, and learn `recovered:false` from it.
    async fn catch_up_rooms(&self) {
        let rooms: Vec<(Arc<str>, Option<MessageId>)> = lock(&self.tails)
            .iter()
            .map(|(room, tail)| (room.clone(), tail.dispatched.max(tail.subscribed_after)))
            .collect();
        for (room, dispatched) in rooms {
            let mut attempt = 0;
            let read = loop {
                match self.read_stream(&room).await {
                    Ok(snapshot) => break Ok(snapshot),
                    // The command connection may still be reconnecting.
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
                    self.resync_room(&room, None);
                }
                Ok(None) => {
                    // Redis came back without this room's stream. Messages
                    // were refused while it was away, so members keep going;
                    // resumes from before the outage will say recovered:false.
                    if dispatched.is_some() {
                        tracing::warn!(%room, "room history is gone from Redis");
                    }
                    if let Some(tail) = lock(&self.tails).get_mut(&room) {
                        tail.dispatched = None;
                        tail.log.assume_complete_after(MessageId::new(now_ms(), 0));
                    }
                }
                Ok(Some(snapshot)) => {
                    let newest = snapshot.messages.last().and_then(|m| m.id);
                    let broken = dispatched.is_some_and(|last| {
                        last < snapshot.complete_after || newest.is_some_and(|newest| newest < last)
                    });
                    if broken {
                        tracing::warn!(%room, "the stream no longer covers what this node delivered; its members will resume");
                        self.resync_room(&room, Some(snapshot));
                        continue;
                    }
                    let mut recovered = 0;
                    for frame in &snapshot.messages {
                        if frame.id > dispatched {
                            recovered += 1;
                            self.dispatch_room(room.clone(), frame.id, frame.text.clone());
                        }
                    }
                    if let Some(tail) = lock(&self.tails).get_mut(&room) {
                        tail.log.merge(
                            snapshot.messages,
                            snapshot.complete_after,
                            self.settings.history_size,
                        );
                    }
                    if recovered > 0 {
                        self.counters
                            .gap_messages_recovered
                            .fetch_add(recovered, Ordering::Relaxed);
                        tracing::info!(%room, recovered, "delivered messages missed while disconnected");
                    }
                }
            }
        }
    }

    /// Starts a room's tail afresh and tells its local members to resume.
    fn resync_room(&self, room: &Arc<str>, snapshot: Option<Snapshot>) {
        if let Some(tail) = lock(&self.tails).get_mut(room) {
            tail.log = RoomLog::new(None);
            tail.dispatched = None;
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
                tail.log.merge(
                    snapshot.messages,
                    snapshot.complete_after,
                    self.settings.history_size,
                );
            }
            // No stream: everything from here on is in the tail.
            Ok(None) => tail.log.assume_complete_after(MessageId::new(now_ms(), 0)),
            Err(err) => tracing::debug!(%room, error = %err, "seeding a room's tail failed"),
        }
    }

    /// The stream's newest `HISTORY_SIZE` messages and where it is complete
    /// from; `None` when the stream does not exist.
    async fn read_stream(&self, room: &Arc<str>) -> Result<Option<Snapshot>, BrokerError> {
        self.counters.stream_reads.fetch_add(1, Ordering::Relaxed);
        let mut commands = self.commands.clone();
        let reply: Vec<Value> = self
            .read_script
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
        Ok(log.read(catch_up).unwrap_or_default())
    }

    fn read_tail(&self, room: &Arc<str>, catch_up: CatchUp) -> Option<Replay> {
        lock(&self.tails).get(room)?.log.read(catch_up)
    }

    async fn subscribe_channel(&self, channel: Channel) -> Result<(), BrokerError> {
        let mut subscriptions = self.subscriptions.lock().await;
        if let Some(count) = subscriptions.counts.get_mut(&channel) {
            *count += 1;
            return Ok(());
        }
        let mut sink = subscriptions
            .sink
            .clone()
            .ok_or_else(|| BrokerError::Unavailable("not connected to Redis".into()))?;
        // The tail exists before the SUBSCRIBE: nothing delivered after the
        // confirmation is dropped as "not subscribed here".
        if let Channel::Room(room) = &channel {
            lock(&self.tails).insert(room.clone(), RoomTail::default());
        }
        let confirmed = tokio::time::timeout(
            SUBSCRIBE_TIMEOUT,
            sink.subscribe(self.keys.channel(&channel)),
        )
        .await;
        let failure = match confirmed {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(unavailable(err)),
            Err(_) => {
                self.reconnect.notify_one();
                Some(BrokerError::Unavailable(
                    "Redis did not confirm a SUBSCRIBE".into(),
                ))
            }
        };
        if let Some(err) = failure {
            if let Channel::Room(room) = &channel {
                lock(&self.tails).remove(room);
            }
            return Err(err);
        }
        subscriptions.counts.insert(channel.clone(), 1);
        self.counters
            .channels
            .store(subscriptions.counts.len(), Ordering::Relaxed);
        drop(subscriptions);
        if let Channel::Room(room) = &channel {
            self.seed_tail(room).await;
        }
        Ok(())
    }

    async fn unsubscribe_channel(&self, channel: Channel) -> Result<(), BrokerError> {
        let mut subscriptions = self.subscriptions.lock().await;
        let Some(count) = subscriptions.counts.get_mut(&channel) else {
            return Ok(());
        };
        *count -= 1;
        if *count > 0 {
            return Ok(());
        }
        subscriptions.counts.remove(&channel);
        self.counters
            .channels
            .store(subscriptions.counts.len(), Ordering::Relaxed);
        if let Channel::Room(room) = &channel {
            // Its tail can no longer be kept gap-free.
            lock(&self.tails).remove(room);
        }
        // Not connected: nothing to undo, and it is not resubscribed on
        // reconnect since it is no longer counted.
        let Some(mut sink) = subscriptions.sink.clone() else {
            return Ok(());
        };
        match tokio::time::timeout(
            SUBSCRIBE_TIMEOUT,
            sink.unsubscribe(self.keys.channel(&channel)),
        )
        .await
        {
            Ok(result) => result.map_err(unavailable),
            Err(_) => {
                self.reconnect.notify_one();
                Err(BrokerError::Unavailable(
                    "Redis did not confirm an UNSUBSCRIBE".into(),
                ))
            }
        }
    }

    /// One connected period of the subscriber: resubscribe, catch up,
    /// restore presence, then forward messages until the connection fails.
    async fn run_subscriber(
        &self,
        mut sink: PubSubSink,
        mut stream: PubSubStream,
        reconnected: bool,
    ) {
        {
            let mut subscriptions = self.subscriptions.lock().await;
            let names: Vec<String> = subscriptions
                .counts
                .keys()
                .map(|c| self.keys.channel(c))
                .collect();
            match tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(&names)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "resubscribing failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!("resubscribing timed out");
                    return;
                }
            }
            subscriptions.sink = Some(sink.clone());
            *lock(&self.pinger) = Some(sink);
        }
        if reconnected {
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            self.catch_up_rooms().await;
        }
        // Also on the first connection: it clears what a previous process
        // with this NODE_ID left behind.
        if let Err(err) = self.resync_presence().await {
            tracing::warn!(error = %err, "restoring presence failed; retrying later");
            self.presence_dirty.store(true, Ordering::Release);
        }
        // Ready only once caught up: no resume is served from a stale tail.
        self.up.store(true, Ordering::Release);
        tracing::info!(reconnected, "subscribed to Redis");
        let mut ping = tokio::time::interval(Duration::from_secs(5));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => self.on_message(message.get_channel_name(), message.get_payload_bytes()),
                    None => break,
                },
                _ = self.reconnect.notified() => {
                    tracing::warn!("Redis stopped confirming subscriptions");
                    break;
                }
                _ = ping.tick() => {
                    let pinger = lock(&self.pinger).clone();
                    if let Some(mut pinger) = pinger {
                        let alive = tokio::time::timeout(Duration::from_secs(3), pinger.ping::<Value>()).await;
                        if !matches!(alive, Ok(Ok(_))) {
                            tracing::warn!("Redis subscriber stopped answering pings");
                            break;
                        }
                    }
                }
            }
        }
        self.up.store(false, Ordering::Release);
        *lock(&self.pinger) = None;
        self.subscriptions.lock().await.sink = None;
        // A tail is gap-free only within one connected period (Redis may
        // even come back empty): the catch-up refills it.
        for tail in lock(&self.tails).values_mut() {
            tail.log = RoomLog::new(None);
        }
        tracing::warn!("lost the Redis subscriber connection; reconnecting");
    }

    async fn keep_alive_once(&self) -> Result<(), RedisError> {
        let mut commands = self.commands.clone();
        let (reaped, registered): (i64, i64) = self
            .liveness_script
            .key(self.keys.nodes())
            .arg(&self.settings.node_id)
            .arg(self.settings.node_ttl.as_millis() as u64)
            .arg(&self.settings.prefix)
            .invoke_async(&mut commands)
            .await?;
        if reaped > 0 {
            tracing::info!(nodes = reaped, "reaped the presence of silent nodes");
        }
        let dirty = self.presence_dirty.load(Ordering::Acquire);
        if registered == 0 || dirty {
            if registered == 0 {
                tracing::info!("Redis did not know this node (new, restarted, or reaped it); writing its presence");
            }
            self.resync_presence().await?;
        }
        Ok(())
    }

    /// Writes this node's presence, as it really is, over what Redis has.
    async fn resync_presence(&self) -> Result<(), RedisError> {
        let _turn = self.presence_turn.write().await;
        let mut invocation = self
            .presence_resync_script
            .key(self.keys.node_presence(&self.settings.node_id));
        invocation.arg(&self.settings.prefix);
        for ((room, user), connections) in lock(&self.presence_mirror).iter() {
            invocation.arg(&**room).arg(&**user).arg(*connections);
        }
        self.presence_dirty.store(false, Ordering::Release);
        let mut commands = self.commands.clone();
        let result: Result<i64, RedisError> = invocation.invoke_async(&mut commands).await;
        if result.is_err() {
            self.presence_dirty.store(true, Ordering::Release);
        }
        result.map(|_| ())
    }
}

/// (room, user)
type RoomUser = (Arc<str>, Arc<str>);

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

async fn supervise_subscriber(broker: std::sync::Weak<RedisBroker>) {
    let mut attempt = 0u32;
    let mut connected_before = false;
    loop {
        let Some(strong) = broker.upgrade() else {
            return;
        };
        let connection =
            tokio::time::timeout(Duration::from_secs(2), strong.client.get_async_pubsub()).await;
        match connection {
            Ok(Ok(pubsub)) => {
                let (sink, stream) = pubsub.split();
                let started = tokio::time::Instant::now();
                strong.run_subscriber(sink, stream, connected_before).await;
                connected_before = true;
                if started.elapsed() > Duration::from_secs(10) {
                    attempt = 0;
                }
            }
            Ok(Err(err)) => tracing::debug!(error = %err, "connecting the Redis subscriber failed"),
            Err(_) => tracing::debug!("connecting the Redis subscriber timed out"),
        }
        drop(strong);
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

async fn keep_alive(broker: std::sync::Weak<RedisBroker>) {
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
        "redis"
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
            reconnects: self.counters.reconnects.load(Ordering::Relaxed),
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
            let mut invocation = self.publish_script.key(self.keys.stream(room));
            if let Some(key) = key {
                invocation.key(self.keys.idempotency(room, key));
            }
            let (id, duplicate): (String, i64) = invocation
                .arg(self.keys.channel(&Channel::Room(Arc::from(room))))
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
            let receivers: usize = redis::cmd("PUBLISH")
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
        self.presence_change(&self.presence_add_script, 1, room, user, event)
            .boxed()
    }

    fn presence_remove<'a>(
        &'a self,
        room: &'a str,
        user: &'a str,
        event: Utf8Bytes,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        self.presence_change(&self.presence_remove_script, -1, room, user, event)
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

impl RedisBroker {
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
        {
            let mut mirror = lock(&self.presence_mirror);
            let key = (Arc::from(room), Arc::from(user));
            let entry = mirror.entry(key.clone()).or_insert(0);
            *entry += delta;
            if *entry <= 0 {
                mirror.remove(&key);
            }
        }
        let mut commands = self.commands.clone();
        let changed: Result<i64, RedisError> = script
            .key(self.keys.presence(room))
            .key(self.keys.node_presence(&self.settings.node_id))
            .arg(user)
            .arg(room)
            .arg(self.keys.channel(&Channel::Room(Arc::from(room))))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip_and_foreign_ones_are_ignored() {
        let keys = Keys {
            prefix: "rc".into(),
        };
        for channel in [
            Channel::Room("chat:1".into()),
            Channel::User("bob@example.com".into()),
            Channel::Broadcast,
        ] {
            assert_eq!(keys.parse_channel(&keys.channel(&channel)), Some(channel));
        }
        assert_eq!(keys.channel(&Channel::Room("r".into())), "rc:room:{r}");
        assert_eq!(keys.parse_channel("other:room:{r}"), None);
        assert_eq!(keys.parse_channel("rc:room:r"), None);
    }

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
