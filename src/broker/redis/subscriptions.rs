//! The node's subscriptions: which channels it needs (reference-counted),
//! and on which subscriber connection each one is active. There is one
//! connection per Redis server holding channels of this node: the one
//! Redis, or, with a Cluster, each master that owns the slot of a channel
//! the node needs — never one per channel.
//!
//! A supervisor task gives every needed channel a home: at start, after a
//! connection failed (closed, silent to pings, a subscription not
//! confirmed), and after a Cluster node dropped a subscription because the
//! channel's slot moved. It reads the slot map, subscribes each channel
//! where it lives now (following `MOVED`), and then has the rooms among
//! them caught up from their streams, exactly as after a reconnect to one
//! Redis; until then their live messages are held back, so none overtakes
//! the catch-up.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::link::{self, Link, Pushed, Reader};
use super::topology::Topology;
use super::{backoff, lock, RedisBroker, SUBSCRIBE_TIMEOUT};
use crate::broker::{BrokerError, Channel};
use crate::history::log::RoomLog;

/// How often each subscriber connection must answer a ping, and how long it
/// may take.
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Subscriptions {
    /// Every channel the node needs, with how many local users need it.
    pub counts: HashMap<Channel, usize>,
    /// The server each needed channel is subscribed on; a needed channel
    /// missing here waits for the supervisor.
    homes: HashMap<Channel, Arc<str>>,
    /// One subscriber connection per server, by address.
    shards: HashMap<Arc<str>, Shard>,
    generations: u64,
}

impl Subscriptions {
    /// Needed channels without a subscription.
    fn homeless(&self) -> Vec<Channel> {
        let mut homeless = Vec::new();
        for channel in self.counts.keys() {
            if !self.homes.contains_key(channel) {
                homeless.push(channel.clone());
            }
        }
        homeless
    }
}

/// A subscriber connection and the task reading it.
struct Shard {
    link: Arc<Link>,
    /// Tells this connection's events from those of an earlier one to the
    /// same server.
    generation: u64,
    /// How many channels are subscribed on it.
    channels: usize,
    reader: JoinHandle<()>,
}

impl Drop for Shard {
    fn drop(&mut self) {
        // The reader task owns the socket's read half and the link its write
        // half: with both gone the connection closes, which unsubscribes it.
        self.reader.abort();
    }
}

/// What reader tasks (and failed requests) tell the supervisor.
pub enum LinkEvent {
    Lost {
        address: Arc<str>,
        generation: u64,
        reason: String,
    },
    Dropped {
        address: Arc<str>,
        generation: u64,
        channel: String,
    },
    /// Something lost its home: look for orphans.
    Check,
}

fn unavailable(err: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {err}"))
}

impl RedisBroker {
    /// The first `subscribe` of a channel subscribes the node where the
    /// channel lives and returns once that is confirmed; later ones count.
    pub(super) async fn subscribe_channel(&self, channel: Channel) -> Result<(), BrokerError> {
        let mut subscriptions = self.subscriptions.lock().await;
        if let Some(count) = subscriptions.counts.get_mut(&channel) {
            *count += 1;
            return Ok(());
        }
        // The tail exists before the SUBSCRIBE: nothing delivered after the
        // confirmation is dropped as "not subscribed here".
        if let Channel::Room(room) = &channel {
            lock(&self.tails).insert(room.clone(), Default::default());
        }
        let name = self.keys.channel(&channel);
        match self.subscribe_first(&mut subscriptions, &name).await {
            Ok(address) => {
                subscriptions.counts.insert(channel.clone(), 1);
                self.home(&mut subscriptions, channel.clone(), &address);
            }
            Err(err) => {
                if let Channel::Room(room) = &channel {
                    lock(&self.tails).remove(room);
                }
                return Err(err);
            }
        }
        drop(subscriptions);
        if let Channel::Room(room) = &channel {
            self.seed_tail(room).await;
        }
        Ok(())
    }

    /// Subscribes `name` on its owner, following `MOVED` a few times; the
    /// owner's address. When the owner the node knows cannot be reached (a
    /// failover this node had no channel in to notice), the slot map is read
    /// again, once.
    async fn subscribe_first(
        &self,
        subscriptions: &mut Subscriptions,
        name: &str,
    ) -> Result<Arc<str>, BrokerError> {
        let mut refreshed = false;
        for _ in 0..3 {
            let owner = self.topology.owner(name);
            let link = match &owner {
                Some(address) => self.connect_shard(subscriptions, address).await,
                None => Err(BrokerError::Unavailable(
                    "the Redis Cluster's slot map is not known yet".into(),
                )),
            };
            let (address, link) = match (owner, link) {
                (Some(address), Ok(link)) => (address, link),
                (_, Err(err)) if refreshed || matches!(self.topology, Topology::Single(_)) => {
                    return Err(err)
                }
                (_, _) => {
                    refreshed = true;
                    self.topology
                        .refresh(&self.commands)
                        .await
                        .map_err(|err| BrokerError::Unavailable(format!("redis: {err}")))?;
                    continue;
                }
            };
            let confirmed =
                tokio::time::timeout(SUBSCRIBE_TIMEOUT, link.subscribe(&[name.to_string()])).await;
            let Ok(mut results) = confirmed else {
                self.drop_shard(
                    subscriptions,
                    &address,
                    None,
                    "a subscription was not confirmed",
                );
                return Err(BrokerError::Unavailable(
                    "Redis did not confirm a SUBSCRIBE".into(),
                ));
            };
            let failure = match results.pop() {
                Some(Ok(())) => return Ok(address),
                Some(Err(err)) => err,
                None => link::LinkError::Closed,
            };
            // A connection opened for this channel alone is of no use now.
            self.close_if_idle(subscriptions, &address);
            match failure.moved() {
                Some((slot, owner)) => self.topology.learn(slot, owner),
                None => return Err(unavailable(failure)),
            }
        }
        Err(BrokerError::Unavailable(
            "the channel's slot keeps moving".into(),
        ))
    }

    /// The last `unsubscribe` of a channel unsubscribes the node.
    pub(super) async fn unsubscribe_channel(&self, channel: Channel) -> Result<(), BrokerError> {
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
        // Homeless (its connection failed): nothing to undo, and it is not
        // subscribed again since it is no longer counted.
        let Some(address) = subscriptions.homes.remove(&channel) else {
            return Ok(());
        };
        let Some(shard) = subscriptions.shards.get_mut(&address) else {
            return Ok(());
        };
        shard.channels -= 1;
        if shard.channels == 0 {
            // Closing the connection unsubscribes it.
            self.close_shard(&mut subscriptions, &address);
            return Ok(());
        }
        let link = shard.link.clone();
        match tokio::time::timeout(
            SUBSCRIBE_TIMEOUT,
            link.unsubscribe(&self.keys.channel(&channel)),
        )
        .await
        {
            Ok(result) => result.map_err(unavailable),
            Err(_) => {
                self.drop_shard(
                    &mut subscriptions,
                    &address,
                    None,
                    "an unsubscription was not confirmed",
                );
                Err(BrokerError::Unavailable(
                    "Redis did not confirm an UNSUBSCRIBE".into(),
                ))
            }
        }
    }

    fn home(&self, subscriptions: &mut Subscriptions, channel: Channel, address: &Arc<str>) {
        if let Some(shard) = subscriptions.shards.get_mut(address) {
            shard.channels += 1;
        }
        subscriptions.homes.insert(channel, address.clone());
        self.counters
            .channels
            .store(subscriptions.counts.len(), Ordering::Relaxed);
    }

    /// The connection to `address`, opened (with a reader task) if needed.
    async fn connect_shard(
        &self,
        subscriptions: &mut Subscriptions,
        address: &Arc<str>,
    ) -> Result<Arc<Link>, BrokerError> {
        if let Some(shard) = subscriptions.shards.get(address) {
            return Ok(shard.link.clone());
        }
        let endpoint = match &self.topology {
            Topology::Single(_) => Some(self.endpoint.clone()),
            Topology::Cluster(_) => self.endpoint.at(address),
        }
        .ok_or_else(|| BrokerError::Unavailable(format!("a bad Redis address {address:?}")))?;
        let (link, reader) = link::connect(&endpoint, self.flavor, CONNECT_TIMEOUT)
            .await
            .map_err(unavailable)?;
        subscriptions.generations += 1;
        let generation = subscriptions.generations;
        let link = Arc::new(link);
        let reader = tokio::spawn(read_shard(
            self.me.clone(),
            reader,
            address.clone(),
            generation,
            self.events.clone(),
        ));
        subscriptions.shards.insert(
            address.clone(),
            Shard {
                link: link.clone(),
                generation,
                channels: 0,
                reader,
            },
        );
        self.counters
            .connections
            .store(subscriptions.shards.len(), Ordering::Relaxed);
        tracing::debug!(shard = %address, "opened a subscriber connection");
        Ok(link)
    }

    fn close_if_idle(&self, subscriptions: &mut Subscriptions, address: &Arc<str>) {
        if subscriptions
            .shards
            .get(address)
            .is_some_and(|shard| shard.channels == 0)
        {
            self.close_shard(subscriptions, address);
        }
    }

    /// With a Cluster: whether `address` is a master, asked on a connection
    /// of its own (the subscriber connection cannot ask in subscribed mode).
    async fn check_master(&self, address: &Arc<str>) -> Result<(), link::LinkError> {
        if self.flavor == link::Flavor::Classic {
            return Ok(());
        }
        let endpoint = self
            .endpoint
            .at(address)
            .ok_or_else(|| link::LinkError::Connect(address.to_string()))?;
        link::connect(&endpoint, self.flavor, CONNECT_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Closes a connection that no longer carries any channel.
    fn close_shard(&self, subscriptions: &mut Subscriptions, address: &Arc<str>) {
        subscriptions.shards.remove(address);
        self.counters
            .connections
            .store(subscriptions.shards.len(), Ordering::Relaxed);
        tracing::debug!(shard = %address, "closed an idle subscriber connection");
    }

    /// A connection failed: closes it, and its channels wait for a new home.
    /// `generation`, when given, must match (a late event about an older
    /// connection changes nothing).
    fn drop_shard(
        &self,
        subscriptions: &mut Subscriptions,
        address: &Arc<str>,
        generation: Option<u64>,
        reason: &str,
    ) {
        match subscriptions.shards.get(address) {
            Some(shard) if generation.is_none_or(|g| g == shard.generation) => {}
            _ => return,
        }
        self.close_shard(subscriptions, address);
        let lost: Vec<Channel> = subscriptions
            .homes
            .iter()
            .filter(|(_, home)| *home == address)
            .map(|(channel, _)| channel.clone())
            .collect();
        for channel in &lost {
            subscriptions.homes.remove(channel);
            self.orphan(channel);
        }
        self.links_lost.store(true, Ordering::Release);
        tracing::warn!(shard = %address, channels = lost.len(), reason, "lost a Redis subscriber connection; subscribing again");
        let _ = self.events.send(LinkEvent::Check);
    }

    /// A channel lost its subscription: the node is not ready until it has
    /// one again, and a room's live messages wait for its catch-up.
    fn orphan(&self, channel: &Channel) {
        self.up.store(false, Ordering::Release);
        if let Channel::Room(room) = channel {
            if let Some(tail) = lock(&self.tails).get_mut(room) {
                // A tail is gap-free only while subscribed (Redis may even
                // come back empty): the catch-up refills it.
                tail.log = RoomLog::new(None);
                tail.held.get_or_insert_with(Vec::new);
            }
        }
    }

    async fn handle_event(&self, event: LinkEvent) {
        match event {
            LinkEvent::Check => {}
            LinkEvent::Lost {
                address,
                generation,
                reason,
            } => {
                let mut subscriptions = self.subscriptions.lock().await;
                self.drop_shard(&mut subscriptions, &address, Some(generation), &reason);
            }
            LinkEvent::Dropped {
                address,
                generation,
                channel: name,
            } => {
                let Some(channel) = self.keys.parse_channel(&name) else {
                    return;
                };
                let mut subscriptions = self.subscriptions.lock().await;
                let current = subscriptions
                    .shards
                    .get(&address)
                    .is_some_and(|shard| shard.generation == generation);
                // Only a channel the node still has there (not one it just
                // left itself).
                if !current || subscriptions.homes.get(&channel) != Some(&address) {
                    return;
                }
                subscriptions.homes.remove(&channel);
                self.orphan(&channel);
                self.counters.channels_moved.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%channel, shard = %address, "Redis ended a subscription (its slot moved, or its master handed over); subscribing where it lives now");
                if let Some(shard) = subscriptions.shards.get_mut(&address) {
                    shard.channels -= 1;
                }
                self.close_if_idle(&mut subscriptions, &address);
            }
        }
    }

    /// Every connection must answer a ping in time.
    async fn ping_shards(&self) {
        let links: Vec<(Arc<str>, u64, Arc<Link>)> = self
            .subscriptions
            .lock()
            .await
            .shards
            .iter()
            .map(|(address, shard)| (address.clone(), shard.generation, shard.link.clone()))
            .collect();
        let answers = futures::future::join_all(links.into_iter().map(
            |(address, generation, link)| async move {
                let answer = tokio::time::timeout(PING_TIMEOUT, link.ping()).await;
                (address, generation, matches!(answer, Ok(Ok(()))))
            },
        ))
        .await;
        for (address, generation, alive) in answers {
            if !alive {
                let mut subscriptions = self.subscriptions.lock().await;
                self.drop_shard(
                    &mut subscriptions,
                    &address,
                    Some(generation),
                    "no answer to a ping",
                );
            }
        }
    }

    /// Subscribes every homeless channel where it lives now. Returns `None`
    /// when there was nothing to do, else the rooms that got a home (to
    /// catch up) and whether every channel has one.
    async fn home_orphans(&self) -> Option<(Vec<Arc<str>>, bool)> {
        if self.subscriptions.lock().await.homeless().is_empty() {
            return None;
        }
        self.up.store(false, Ordering::Release);
        // A stale map still works: a wrong owner answers MOVED, or is found
        // out as no master.
        let refreshed = self.topology.refresh(&self.commands).await;
        let mut subscriptions = self.subscriptions.lock().await;
        let mut by_owner: HashMap<Arc<str>, Vec<Channel>> = HashMap::new();
        let mut unknown = 0;
        for channel in subscriptions.homeless() {
            match self.topology.owner(&self.keys.channel(&channel)) {
                Some(owner) => by_owner.entry(owner).or_default().push(channel),
                None => unknown += 1,
            }
        }
        match refreshed {
            Err(err) if unknown > 0 => {
                tracing::warn!(error = %err, channels = unknown, "cannot read the Redis Cluster's slot map (is it a cluster, and up?)");
            }
            Err(err) => {
                tracing::debug!(error = %err, "reading the Redis Cluster's slot map failed")
            }
            Ok(()) => {}
        }
        let mut rooms = Vec::new();
        for (address, channels) in by_owner {
            // Held from the SUBSCRIBE on: live messages wait for the catch-up.
            for channel in &channels {
                self.orphan(channel);
            }
            let link = match self.connect_shard(&mut subscriptions, &address).await {
                Ok(link) => link,
                Err(err) => {
                    tracing::debug!(shard = %address, error = %err, "cannot reach a Redis server yet");
                    continue;
                }
            };
            let names: Vec<String> = channels.iter().map(|c| self.keys.channel(c)).collect();
            let Ok(results) = tokio::time::timeout(SUBSCRIBE_TIMEOUT, link.subscribe(&names)).await
            else {
                self.drop_shard(
                    &mut subscriptions,
                    &address,
                    None,
                    "subscriptions were not confirmed",
                );
                continue;
            };
            let mut homed = Vec::new();
            for (channel, result) in channels.into_iter().zip(results) {
                match result {
                    Ok(()) => {
                        self.home(&mut subscriptions, channel.clone(), &address);
                        homed.push(channel);
                    }
                    Err(err) => match err.moved() {
                        Some((slot, owner)) => self.topology.learn(slot, owner),
                        None => tracing::debug!(%channel, error = %err, "subscribing failed"),
                    },
                }
            }
            self.close_if_idle(&mut subscriptions, &address);
            if homed.is_empty() {
                continue;
            }
            // The map may have been stale and the server demoted (a manual
            // failover) just before it confirmed: a replica confirms too, and
            // would miss messages until the Cluster makes it its new
            // master's replica. Asked after the confirmations, a master
            // still was one when it took them (and will push sunsubscribe
            // when it stops).
            if let Err(err) = self.check_master(&address).await {
                self.drop_shard(&mut subscriptions, &address, None, &err.to_string());
                continue;
            }
            rooms.extend(homed.into_iter().filter_map(|channel| match channel {
                Channel::Room(room) => Some(room),
                _ => None,
            }));
        }
        let complete = subscriptions.homeless().is_empty();
        Some((rooms, complete))
    }
}

/// Forwards one connection's messages until it fails.
async fn read_shard(
    broker: Weak<RedisBroker>,
    mut reader: Reader,
    address: Arc<str>,
    generation: u64,
    events: mpsc::UnboundedSender<LinkEvent>,
) {
    loop {
        match reader.next().await {
            Ok(Pushed::Message { channel, payload }) => {
                let Some(broker) = broker.upgrade() else {
                    return;
                };
                // Checked to be UTF-8 by the reader.
                if let Ok(channel) = std::str::from_utf8(&channel) {
                    broker.on_message(channel, payload);
                }
            }
            Ok(Pushed::Dropped(channel)) => {
                let _ = events.send(LinkEvent::Dropped {
                    address: address.clone(),
                    generation,
                    channel,
                });
            }
            Err(err) => {
                let _ = events.send(LinkEvent::Lost {
                    address,
                    generation,
                    reason: err.to_string(),
                });
                return;
            }
        }
    }
}

/// The supervisor: homes channels, catches their rooms up, restores
/// presence after a connection was lost, pings, and says when the node is
/// ready. Ends when the broker is gone.
pub(super) async fn supervise(
    broker: Weak<RedisBroker>,
    mut events: mpsc::UnboundedReceiver<LinkEvent>,
) {
    let mut attempt = 0u32;
    let mut connected_before = false;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(strong) = broker.upgrade() else {
            return;
        };
        let mut retry = None;
        if let Some((rooms, complete)) = strong.home_orphans().await {
            // Rooms that got a home now are caught up even if others wait.
            strong.catch_up_rooms(rooms).await;
            if complete {
                let reconnected = strong.links_lost.swap(false, Ordering::AcqRel);
                if reconnected && connected_before {
                    strong.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                // Also on the first connection: it clears what a previous
                // process with this NODE_ID left behind.
                if reconnected || !connected_before {
                    if let Err(err) = strong.resync_presence().await {
                        tracing::warn!(error = %err, "restoring presence failed; retrying later");
                    }
                }
                // Ready only once caught up: no resume is served from a stale tail.
                strong.up.store(true, Ordering::Release);
                if !connected_before || reconnected {
                    tracing::info!(reconnected = connected_before, "subscribed to Redis");
                }
                connected_before = true;
                attempt = 0;
            } else {
                retry = Some(backoff(attempt));
                attempt = attempt.saturating_add(1);
            }
        }
        drop(strong);
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return };
                let Some(strong) = broker.upgrade() else { return };
                strong.handle_event(event).await;
            }
            _ = ping.tick() => {
                let Some(strong) = broker.upgrade() else { return };
                strong.ping_shards().await;
            }
            _ = tokio::time::sleep(retry.unwrap_or(PING_EVERY)), if retry.is_some() => {}
        }
    }
}
