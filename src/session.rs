//! One client socket: a reader that parses and serves the client's frames,
//! and a writer task that drains the connection's bounded queue onto the
//! socket (many frames per flush), sends heartbeat pings and closes the
//! socket with the right code.

use std::collections::HashSet;
use std::future::poll_fn;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::time::{sleep_until, timeout, Instant};

use crate::auth::Identity;
use crate::broker::Channel;
use crate::config::Config;
use crate::hub::{
    mailbox, CloseReason, CloseSignal, ConnId, JoinCompletion, Mailbox, Outbound, Outbox,
};
use crate::limits::TokenBucket;
use crate::node::NodeState;
use crate::protocol::{
    encode_error, now_ms, parse_client_frame, CatchUp, ErrorCode, MessageId, MessageTemplate,
    Parsed, Rejection, Request, RoomFrame, ServerFrame,
};
use crate::stats::Stats;

/// Read buffer per socket, allocated up front and also the most read per
/// syscall. tungstenite's default (128 KiB) would dominate the memory of an
/// idle connection; client frames are mostly small, and a large one costs a
/// few more reads, not more memory.
const READ_BUFFER_BYTES: usize = 1024;
/// Outgoing bytes buffered before a write is forced.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Frames written per flush at most.
const MAX_BATCH: usize = 64;
/// How long a closing socket waits for its close frame to go out and for
/// the peer's reply. A slow consumer's close frame waits behind everything
/// already in its socket buffers, so this is seconds, not milliseconds.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Most users listed in a `presence` reply; beyond it the reply says
/// `"truncated":true` and gives the `count`.
const PRESENCE_LIMIT: usize = 1000;
/// How long before `exp` a session is told its token is expiring.
const EXPIRING_NOTICE: Duration = Duration::from_secs(30);

/// Applies the node's frame limits and buffer sizes to an upgrade.
pub fn configure(upgrade: WebSocketUpgrade, config: &Config) -> WebSocketUpgrade {
    let max = config.max_message_bytes;
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(WRITE_BUFFER_BYTES + 2 * max + 4096)
        .max_message_size(max)
        .max_frame_size(max)
}

/// When this connection last heard from its peer.
struct Liveness {
    epoch: std::time::Instant,
    heard_ms: AtomicU64,
}

impl Liveness {
    fn new() -> Self {
        Liveness {
            epoch: std::time::Instant::now(),
            heard_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.heard_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let heard = Duration::from_millis(self.heard_ms.load(Relaxed));
        self.epoch.elapsed().saturating_sub(heard)
    }
}

/// Serves one upgraded socket until it closes, holding `admission` (the
/// connection's slots in the node's limits) until then.
///
/// The socket is split before the session's future exists: an async fn keeps
/// its arguments for its whole life, and an unsplit socket is large.
pub fn serve(
    socket: WebSocket,
    node: Arc<NodeState>,
    identity: Identity,
    client: IpAddr,
    admission: impl Send + 'static,
) -> impl std::future::Future<Output = ()> + Send {
    let (sink, stream) = socket.split();
    run(sink, stream, node, identity, client, admission)
}

async fn run(
    sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
    node: Arc<NodeState>,
    identity: Identity,
    client: IpAddr,
    _admission: impl Send,
) {
    let _live = node.sessions.enter();
    let started = Instant::now();
    let conn = node.next_conn_id();
    let conn_name = format!("c-{conn}");
    let user = identity.user.clone();
    node.stats.connection_opened();

    let (mailbox, outbound) = mailbox(node.config.client_queue, Arc::default());
    let liveness = Arc::new(Liveness::new());
    let writer = Writer {
        sink,
        outbound,
        close: mailbox.close.clone(),
        liveness: liveness.clone(),
        heartbeat: node.config.heartbeat_interval,
        write_delay: node.config.write_delay,
        cursors: Cursors::new(node.config.client_queue),
        stats: node.stats.clone(),
    };
    tracing::info!(conn = %conn_name, %user, %client, "connected");

    // `welcome` is queued first and written only once the hub (and, with
    // Redis, the user's channel) has the connection: a client that has its
    // welcome is reachable, and nothing is ever written before it.
    let welcome = ServerFrame::Welcome {
        conn: &conn_name,
        user: &user,
        node: &node.node_id,
        heartbeat_ms: node.config.heartbeat_interval.as_millis() as u64,
    }
    .encode();
    mailbox.offer(Outbound::Frame(welcome.into()), &node.stats);
    // Boxed, like the disconnect: one-off futures that would otherwise
    // size this connection's whole task for its whole life.
    let registered = Box::pin(node.hub.connect(conn, user.clone(), mailbox.clone())).await;
    let writer = tokio::spawn(writer.run());
    let reason = match registered {
        Ok(()) => {
            if node.is_draining() {
                mailbox.close.close(CloseReason::DRAINING);
            }
            let mut reader = Reader {
                bucket: TokenBucket::new(node.config.rate_limit, node.config.rate_burst as f64),
                node: node.clone(),
                conn,
                identity,
                mailbox: mailbox.clone(),
                liveness,
                refused_in_row: 0,
                rooms: HashSet::new(),
                expiring_sent_for: None,
            };
            reader.run(stream).await
        }
        Err(err) => {
            tracing::error!(conn = %conn_name, %user, error = %err, "registering the connection failed");
            mailbox.close.close(CloseReason::INTERNAL);
            CloseReason::INTERNAL
        }
    };
    Box::pin(node.hub.disconnect(conn)).await;
    drop(mailbox);
    let _ = writer.await;
    node.stats.connection_closed(reason.code);
    tracing::info!(
        conn = %conn_name,
        %user,
        duration_ms = started.elapsed().as_millis() as u64,
        close_code = reason.code,
        close_reason = reason.text,
        "disconnected"
    );
}

struct Reader {
    node: Arc<NodeState>,
    conn: ConnId,
    identity: Identity,
    mailbox: Mailbox,
    liveness: Arc<Liveness>,
    bucket: TokenBucket,
    refused_in_row: u32,
    rooms: HashSet<Arc<str>>,
    /// The `exp` an `expiring` notice was sent for.
    expiring_sent_for: Option<u64>,
}

impl Reader {
    /// Reads until the connection closes; returns why it closed.
    async fn run(&mut self, mut stream: SplitStream<WebSocket>) -> CloseReason {
        let close = self.mailbox.close.clone();
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                reason = close.closed() => {
                    if reason.send_frame {
                        Box::pin(self.await_peer_close(&mut stream)).await;
                    }
                    return reason;
                }
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    self.on_deadline();
                }
                message = stream.next() => match message {
                    Some(Ok(message)) => {
                        self.liveness.touch();
                        // Boxed: the reader future stays small while idle,
                        // which is what most connections are.
                        if let Some(reason) = Box::pin(self.on_message(message)).await {
                            close.close(reason);
                        }
                    }
                    Some(Err(err)) => {
                        close.close(reason_for_read_error(err));
                    }
                    None => {
                        close.close(CloseReason::GONE);
                    }
                },
            }
        }
    }

    /// After the server's close frame, give the peer a moment to answer.
    async fn await_peer_close(&self, stream: &mut SplitStream<WebSocket>) {
        let _ = timeout(CLOSE_GRACE, async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    /// Handles one frame; returns a reason when the connection must close.
    async fn on_message(&mut self, message: Message) -> Option<CloseReason> {
        match message {
            Message::Text(text) => {
                self.node.stats.received(text.len());
                let parsed = parse_client_frame(&text);
                if let Err(close) = self.within_rate(parsed.reference) {
                    return close;
                }
                self.on_frame(parsed).await;
                None
            }
            Message::Binary(data) => {
                self.node.stats.received(data.len());
                if let Err(close) = self.within_rate(None) {
                    return close;
                }
                self.reject(
                    Rejection::bad_request(
                        "binary frames are not supported: send JSON text frames",
                    ),
                    None,
                );
                None
            }
            Message::Close(frame) => {
                Some(CloseReason::by_peer(frame.map(|f| f.code).unwrap_or(1005)))
            }
            Message::Ping(_) | Message::Pong(_) => None,
        }
    }

    /// Takes a token for one frame. `Err(None)`: over the limit, the frame is
    /// refused with an error; `Err(Some(close))`: refused too often in a row.
    fn within_rate(&mut self, reference: Option<&RawValue>) -> Result<(), Option<CloseReason>> {
        if self.bucket.try_take(Instant::now()) {
            self.refused_in_row = 0;
            return Ok(());
        }
        self.refused_in_row += 1;
        if self.refused_in_row >= self.node.config.rate_burst {
            return Err(Some(CloseReason::RATE_LIMITED));
        }
        let message = format!(
            "rate limit: at most {} frames per second, bursts of {}; this frame was dropped",
            self.node.config.rate_limit, self.node.config.rate_burst
        );
        self.reject(Rejection::new(ErrorCode::RateLimited, message), reference);
        Err(None)
    }

    async fn on_frame(&mut self, parsed: Parsed<'_>) {
        let outcome = match parsed.request {
            Ok(request) => self.serve(request, parsed.reference).await,
            Err(rejection) => Err(rejection),
        };
        if let Err(rejection) = outcome {
            self.reject(rejection, parsed.reference);
        }
    }

    fn offer(&self, item: Outbound) -> bool {
        self.mailbox.offer(item, &self.node.stats)
    }

    fn reply(&self, frame: ServerFrame<'_>) {
        self.offer(Outbound::Frame(frame.encode().into()));
    }

    fn error_text(&self, rejection: &Rejection, reference: Option<&RawValue>) -> Utf8Bytes {
        self.node.stats.error_sent(rejection.code);
        encode_error(rejection, reference).into()
    }

    fn reject(&self, rejection: Rejection, reference: Option<&RawValue>) {
        let text = self.error_text(&rejection, reference);
        self.offer(Outbound::Frame(text));
    }

    async fn serve(
        &mut self,
        request: Request<'_>,
        reference: Option<&RawValue>,
    ) -> Result<(), Rejection> {
        let node = self.node.clone();
        let user = self.identity.user.clone();
        match request {
            Request::Join { room, catch_up } => self.join(&room, catch_up, reference).await,
            Request::Leave { room } => {
                let Some(room) = self.rooms.take(&*room) else {
                    return Err(Rejection::new(
                        ErrorCode::NotFound,
                        format!("not in room \"{room}\""),
                    ));
                };
                node.hub.leave(self.conn, &room).await;
                let text = ServerFrame::Left {
                    room: &room,
                    reason: None,
                    reference,
                }
                .encode();
                self.offer(Outbound::Left {
                    room,
                    text: text.into(),
                });
                Ok(())
            }
            Request::Publish { room, data, key } => {
                if !self.identity.permissions.may_publish(&room) {
                    return Err(forbidden(format!("not allowed to publish to \"{room}\"")));
                }
                let template = MessageTemplate::new(&room, &user, data);
                let started = Instant::now();
                // Keys are the sender's own: another user's key cannot shadow them.
                let key = key.map(|key| format!("{user}/{key}"));
                let stored = node
                    .broker
                    .publish_room(&room, template, key.as_deref())
                    .await
                    .map_err(|err| {
                        Rejection::new(ErrorCode::Unavailable, format!("message not stored: {err}"))
                    })?;
                node.stats.record_publish(started.elapsed());
                if reference.is_some() {
                    self.reply(ServerFrame::Ack {
                        id: Some(stored.id.to_string()),
                        reference,
                    });
                }
                Ok(())
            }
            Request::Direct { to, data } => {
                if !self.identity.permissions.publish {
                    return Err(forbidden("this token is read-only".into()));
                }
                let text = ServerFrame::Direct { from: &user, data }.encode();
                let receivers = node
                    .broker
                    .publish(&Channel::User(Arc::from(&*to)), text.into())
                    .await
                    .map_err(unavailable)?;
                if receivers == 0 {
                    return Err(Rejection::new(
                        ErrorCode::NotFound,
                        format!("user \"{to}\" is not connected"),
                    ));
                }
                self.ack_without_id(reference);
                Ok(())
            }
            Request::Broadcast { data } => {
                if !self.identity.permissions.broadcast {
                    return Err(forbidden(
                        "broadcasting needs the \"broadcast\" permission".into(),
                    ));
                }
                let text = ServerFrame::Broadcast { from: &user, data }.encode();
                node.broker
                    .publish(&Channel::Broadcast, text.into())
                    .await
                    .map_err(unavailable)?;
                self.ack_without_id(reference);
                Ok(())
            }
            Request::Presence { room } => {
                if !self.identity.permissions.may_join(&room) {
                    return Err(forbidden(format!("not allowed in room \"{room}\"")));
                }
                let users = node.broker.presence(&room).await.map_err(unavailable)?;
                let count = users.len();
                let truncated = count > PRESENCE_LIMIT;
                self.reply(ServerFrame::Presence {
                    room: &room,
                    users: &users[..count.min(PRESENCE_LIMIT)],
                    truncated,
                    count: truncated.then_some(count),
                    reference,
                });
                Ok(())
            }
            Request::Ping => {
                self.reply(ServerFrame::Pong { reference });
                Ok(())
            }
            Request::Refresh { token } => self.refresh(&token, reference).await,
        }
    }

    fn ack_without_id(&self, reference: Option<&RawValue>) {
        if reference.is_some() {
            self.reply(ServerFrame::Ack {
                id: None,
                reference,
            });
        }
    }

    async fn join(
        &mut self,
        room: &str,
        catch_up: CatchUp,
        reference: Option<&RawValue>,
    ) -> Result<(), Rejection> {
        if !self.identity.permissions.may_join(room) {
            return Err(forbidden(format!("not allowed to join \"{room}\"")));
        }
        let max_rooms = self.node.config.max_rooms_per_connection;
        let room: Arc<str> = match self.rooms.get(room) {
            Some(joined) => joined.clone(),
            None if self.rooms.len() >= max_rooms => {
                return Err(Rejection::bad_request(format!(
                    "already in {max_rooms} rooms (MAX_ROOMS_PER_CONNECTION); leave one first"
                )))
            }
            None => Arc::from(room),
        };
        let catch_up = match catch_up {
            CatchUp::Last(n) => CatchUp::Last(n.min(self.node.config.history_size)),
            other => other,
        };
        let node = self.node.clone();
        let rejoin = self.rooms.contains(&room);
        if !self.offer(Outbound::JoinStarted(room.clone())) {
            return Ok(());
        }
        let replay = match node.hub.join(self.conn, &room).await {
            Ok(_) => {
                self.rooms.insert(room.clone());
                node.broker.history(&room, catch_up).await
            }
            Err(err) => Err(err),
        };
        match replay {
            Ok(replay) => {
                let joined = ServerFrame::Joined {
                    room: &room,
                    recovered: replay.recovered,
                    replayed: replay.messages.len(),
                    reference,
                }
                .encode();
                let since = match catch_up {
                    CatchUp::Since(since) => Some(since),
                    _ => None,
                };
                self.offer(Outbound::JoinCompleted(Box::new(JoinCompletion {
                    room,
                    since,
                    replay: replay.messages,
                    joined: joined.into(),
                })));
            }
            Err(err) => {
                // A failed re-join keeps the membership it had.
                if !rejoin && self.rooms.remove(&room) {
                    node.hub.leave(self.conn, &room).await;
                }
                let error = self.error_text(&unavailable(err), reference);
                self.offer(Outbound::JoinFailed {
                    room,
                    error,
                    still_member: rejoin,
                });
            }
        }
        Ok(())
    }

    async fn refresh(
        &mut self,
        token: &str,
        reference: Option<&RawValue>,
    ) -> Result<(), Rejection> {
        let identity = self
            .node
            .auth
            .verify(token)
            .map_err(|err| Rejection::new(ErrorCode::Unauthorized, err.to_string()))?;
        if identity.user != self.identity.user {
            return Err(forbidden("the token is for another user".into()));
        }
        self.identity = identity;
        self.expiring_sent_for = None;
        let revoked: Vec<Arc<str>> = self
            .rooms
            .iter()
            .filter(|room| !self.identity.permissions.may_join(room))
            .cloned()
            .collect();
        for room in revoked {
            self.rooms.remove(&room);
            self.node.hub.leave(self.conn, &room).await;
            let text = ServerFrame::Left {
                room: &room,
                reason: Some("not permitted by the refreshed token"),
                reference: None,
            }
            .encode();
            self.offer(Outbound::Left {
                room,
                text: text.into(),
            });
        }
        self.reply(ServerFrame::Refreshed {
            exp: self.identity.expires_at.unwrap_or(0),
            reference,
        });
        Ok(())
    }

    /// When the session must next act on its token's expiry.
    fn next_deadline(&self) -> Option<Instant> {
        let exp = self.identity.expires_at?;
        if self.expiring_sent_for != Some(exp) {
            Some(
                unix_to_instant(exp)
                    .checked_sub(EXPIRING_NOTICE)
                    .unwrap_or_else(Instant::now),
            )
        } else {
            Some(unix_to_instant(exp) + self.node.auth.leeway())
        }
    }

    fn on_deadline(&mut self) {
        let Some(exp) = self.identity.expires_at else {
            return;
        };
        if self.expiring_sent_for != Some(exp) {
            self.expiring_sent_for = Some(exp);
            self.reply(ServerFrame::Expiring { exp });
        } else {
            self.mailbox.close.close(CloseReason::TOKEN_EXPIRED);
        }
    }
}

fn forbidden(message: String) -> Rejection {
    Rejection::new(ErrorCode::Forbidden, message)
}

fn unavailable(err: crate::broker::BrokerError) -> Rejection {
    Rejection::new(ErrorCode::Unavailable, err.to_string())
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

fn unix_to_instant(unix_secs: u64) -> Instant {
    let now = now_ms();
    let target = unix_secs.saturating_mul(1000);
    if target >= now {
        Instant::now() + Duration::from_millis(target - now)
    } else {
        Instant::now()
            .checked_sub(Duration::from_millis(now - target))
            .unwrap_or_else(Instant::now)
    }
}

fn reason_for_read_error(err: axum::Error) -> CloseReason {
    match err.into_inner().downcast::<tungstenite::Error>() {
        Ok(err) => match *err {
            tungstenite::Error::Capacity(_) => CloseReason::TOO_BIG,
            // The peer vanished without a close frame: nothing to tell it.
            tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ) => CloseReason::GONE,
            tungstenite::Error::Utf8(_) => CloseReason::INVALID_PAYLOAD,
            tungstenite::Error::Protocol(_) => CloseReason::PROTOCOL_ERROR,
            _ => CloseReason::GONE,
        },
        Err(_) => CloseReason::GONE,
    }
}

/// The writer's view of each joined room: the last id written (to drop
/// duplicates between a join's replay and live frames) and, while a join's
/// catch-up is being read, the live frames held back until it arrives.
struct Cursors {
    rooms: RoomCursors,
    hold_limit: usize,
    overflowed: bool,
}

/// Cursors by room. A connection is in a few rooms, so a linear scan beats
/// hashing the room name of every frame written.
#[derive(Default)]
struct RoomCursors(Vec<(Arc<str>, RoomCursor)>);

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
    fn pass(&mut self, frame: &RoomFrame, out: &mut Vec<Utf8Bytes>) {
        if let Some(id) = frame.id {
            if self.last.is_some_and(|last| id <= last) {
                return;
            }
            self.last = Some(id);
        }
        out.push(frame.text.clone());
    }
}

impl Cursors {
    fn new(hold_limit: usize) -> Self {
        Cursors {
            rooms: RoomCursors::default(),
            hold_limit,
            overflowed: false,
        }
    }

    /// Turns a queue item into the frames to write, in order.
    fn apply(&mut self, item: Outbound, out: &mut Vec<Utf8Bytes>) {
        match item {
            Outbound::Frame(text) => out.push(text),
            Outbound::Room(frame) => match self.rooms.get_mut(&frame.room) {
                Some(RoomCursor {
                    held: Some(held), ..
                }) => {
                    if held.len() >= self.hold_limit {
                        self.overflowed = true;
                    } else {
                        held.push(frame);
                    }
                }
                Some(cursor) => cursor.pass(&frame, out),
                None => out.push(frame.text.clone()),
            },
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
                    cursor.pass(frame, out);
                }
                out.push(joined);
                for frame in &held {
                    cursor.pass(frame, out);
                }
            }
            Outbound::JoinFailed {
                room,
                error,
                still_member,
            } => {
                out.push(error);
                if !still_member {
                    self.rooms.remove(&room);
                } else if let Some(cursor) = self.rooms.get_mut(&room) {
                    for frame in cursor.held.take().unwrap_or_default() {
                        cursor.pass(&frame, out);
                    }
                }
            }
            Outbound::Left { room, text } => {
                self.rooms.remove(&room);
                out.push(text);
            }
        }
    }
}

struct Writer {
    sink: SplitSink<WebSocket, Message>,
    outbound: Outbox,
    close: Arc<CloseSignal>,
    liveness: Arc<Liveness>,
    heartbeat: Duration,
    write_delay: Duration,
    cursors: Cursors,
    stats: Arc<Stats>,
}

impl Writer {
    async fn run(mut self) {
        let close = self.close.clone();
        let mut ping = tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Vec<Utf8Bytes> = Vec::new();
        // Only kept with a WRITE_DELAY: without one, no clock read per write.
        let mut last_write: Option<Instant> = None;
        let reason = loop {
            tokio::select! {
                biased;
                reason = poll_fn(|cx| close.poll_closed_by_writer(cx)) => break reason,
                _ = ping.tick() => {
                    if self.liveness.silent_for() >= self.heartbeat * 2 {
                        close.close(CloseReason::HEARTBEAT_TIMEOUT);
                        continue;
                    }
                    let sent = tokio::select! {
                        biased;
                        reason = poll_fn(|cx| close.poll_closed_by_writer(cx)) => break reason,
                        sent = self.sink.send(Message::Ping(Bytes::new())) => sent,
                    };
                    if sent.is_err() {
                        close.close(CloseReason::GONE);
                    }
                }
                item = self.outbound.recv() => {
                    let Some(item) = item else {
                        break close.reason().unwrap_or(CloseReason::GONE);
                    };
                    batch.clear();
                    self.cursors.apply(item, &mut batch);
                    let wait = last_write
                        .map(|at| at + self.write_delay)
                        .and_then(|until| until.checked_duration_since(Instant::now()));
                    if let Some(wait) = wait {
                        // Busy: gather what arrives until the delay is up.
                        tokio::select! {
                            biased;
                            reason = poll_fn(|cx| close.poll_closed_by_writer(cx)) => break reason,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    let cursors = &mut self.cursors;
                    self.outbound
                        .drain(MAX_BATCH - 1, |item| cursors.apply(item, &mut batch));
                    if self.cursors.overflowed {
                        if close.close(CloseReason::SLOW_CONSUMER) {
                            self.stats.slow_consumer_closed();
                        }
                        continue;
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    let frames = batch.len() as u64;
                    let bytes = batch.iter().map(|t| t.len() as u64).sum();
                    let sink = &mut self.sink;
                    let written = tokio::select! {
                        biased;
                        reason = poll_fn(|cx| close.poll_closed_by_writer(cx)) => break reason,
                        written = write_all(sink, &mut batch) => written,
                    };
                    match written {
                        Ok(()) => {
                            if !self.write_delay.is_zero() {
                                last_write = Some(Instant::now());
                            }
                            self.stats.sent(frames, bytes);
                        }
                        Err(err) => {
                            if let Ok(err) = err.into_inner().downcast::<tungstenite::Error>() {
                                if matches!(*err, tungstenite::Error::WriteBufferFull(_)) {
                                    tracing::warn!("an outbound frame exceeded the write buffer bound");
                                }
                            }
                            close.close(CloseReason::GONE);
                        }
                    }
                }
            }
        };
        if reason.send_frame {
            let frame = CloseFrame {
                code: reason.code,
                reason: reason.text.into(),
            };
            let _ = timeout(CLOSE_GRACE, self.sink.send(Message::Close(Some(frame)))).await;
        } else if reason != CloseReason::GONE {
            // Flushes the reply to the peer's close frame.
            let _ = timeout(CLOSE_GRACE, self.sink.close()).await;
        }
    }
}

/// Feeds every frame, then flushes once: one write for the whole batch.
async fn write_all(
    sink: &mut SplitSink<WebSocket, Message>,
    batch: &mut Vec<Utf8Bytes>,
) -> Result<(), axum::Error> {
    for text in batch.drain(..) {
        sink.feed(Message::Text(text)).await?;
    }
    sink.flush().await
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

    fn run(cursors: &mut Cursors, items: Vec<Outbound>) -> Vec<String> {
        let mut out = Vec::new();
        for item in items {
            cursors.apply(item, &mut out);
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
                Outbound::JoinCompleted(Box::new(JoinCompletion {
                    room: "r".into(),
                    since: None,
                    replay: vec![frame("r", Some(2), "m2"), frame("r", Some(3), "m3")],
                    joined: "joined".into(),
                })),
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
    fn other_rooms_flow_while_one_is_joining_and_leaving_forgets_the_room() {
        let mut cursors = Cursors::new(100);
        let out = run(
            &mut cursors,
            vec![
                Outbound::JoinStarted("a".into()),
                Outbound::Room(frame("b", Some(1), "b1")),
                Outbound::JoinCompleted(Box::new(JoinCompletion {
                    room: "a".into(),
                    since: None,
                    replay: vec![],
                    joined: "joined a".into(),
                })),
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
        assert_eq!(out, vec!["b1", "joined a", "left a", "error", "a9"]);
        assert!(cursors.rooms.0.is_empty());
    }

    #[test]
    fn a_rejoin_with_since_does_not_repeat_what_was_already_written() {
        let mut cursors = Cursors::new(100);
        let completion = |replay| {
            Outbound::JoinCompleted(Box::new(JoinCompletion {
                room: "r".into(),
                since: None,
                replay,
                joined: "joined".into(),
            }))
        };
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
                Outbound::JoinCompleted(Box::new(JoinCompletion {
                    room: "r".into(),
                    since: None,
                    replay: vec![],
                    joined: "joined".into(),
                })),
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
