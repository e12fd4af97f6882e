//! One client socket, served by one task: a reading half that parses and
//! serves the client's frames, and a writing half that sends heartbeat pings,
//! takes over writing when the socket is full (frames are otherwise written
//! by whoever queues them: see [`Mailbox`]) and closes with the right code.

use std::collections::HashSet;
use std::future::poll_fn;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::Message;

use crate::auth::Identity;
use crate::broker::Channel;
use crate::config::Config;
use crate::hub::{
    CloseReason, ConnId, JoinCompletion, Mailbox, MailboxSettings, Outbound, SocketIo,
};
use crate::limits::TokenBucket;
use crate::node::NodeState;
use crate::protocol::{
    close, encode_error, now_ms, parse_client_frame, sender_key, CatchUp, ErrorCode,
    MessageTemplate, Parsed, Rejection, Request, ServerFrame,
};

/// The socket as this session's WebSocket parser sees it.
type Io = SocketIo;

/// Read buffer per socket, allocated up front and also the most read per
/// syscall. tungstenite's default (128 KiB) would dominate the memory of an
/// idle connection; client frames are mostly small, and a large one costs a
/// few more reads, not more memory.
const READ_BUFFER_BYTES: usize = 512;
/// How long a closing socket waits for its close frame to go out and for
/// the peer's reply. A slow consumer's close frame waits behind everything
/// already in its socket buffers, so this is seconds, not milliseconds.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Most users listed in a `presence` reply; beyond it the reply says
/// `"truncated":true` and gives the `count`.
const PRESENCE_LIMIT: usize = 1000;
/// How long before `exp` a session is told its token is expiring.
const EXPIRING_NOTICE: Duration = Duration::from_secs(30);

/// The parser's limits and buffer sizes for this node's sockets. Its write
/// buffer only ever holds its own replies (pongs, the close reply): every
/// other frame goes through the [`Mailbox`].
pub fn websocket_config(config: &Config) -> WebSocketConfig {
    let max = config.max_message_bytes;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * max + 4096)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
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

/// Serves one connection, once hyper hands it over, until it closes, holding
/// `admission` (the connection's slots in the node's limits) until then.
///
/// One async fn that builds its large values in place: a value moved into a
/// nested future keeps its old slot too, and this future is the task's whole
/// memory for the connection's whole life.
pub async fn serve(
    on_upgrade: OnUpgrade,
    node: Arc<NodeState>,
    identity: Identity,
    client: IpAddr,
    _admission: impl Send + 'static,
) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(err) => {
            tracing::debug!(%client, error = %err, "the upgrade did not complete");
            return;
        }
    };
    let _live = node.sessions.enter();
    let started = Instant::now();
    let conn = node.next_conn_id();
    let user = identity.user.clone();
    node.stats.connection_opened();
    let liveness = Liveness::new();
    tracing::info!(conn = %conn_name(conn), %user, %client, "connected");

    // The node serves HTTP over bare TCP streams (`node::serve_http`); the
    // mailbox takes this one, and fan-out writes to it.
    let hyper::upgrade::Parts { io, read_buf, .. } = match upgraded.downcast::<TokioIo<TcpStream>>()
    {
        Ok(parts) => parts,
        Err(_) => {
            tracing::error!(%client, "the upgraded connection is not a TCP stream");
            return;
        }
    };
    // Bytes the client sent right behind its upgrade request, if any. Copied
    // out: `read_buf` is a view of hyper's whole read buffer (8 KiB), which
    // it would keep alive for the connection's life.
    let early = (!read_buf.is_empty()).then(|| read_buf.to_vec());
    drop(read_buf);
    let mailbox = Mailbox::new(
        MailboxSettings {
            capacity: node.config.client_queue,
            stats: node.stats.clone(),
        },
        Some(io.into_inner()),
    );
    // `welcome` is queued first and written only once the hub (and, with
    // Redis, the user's channel) has the connection: a client that has its
    // welcome is reachable, and nothing is ever written before it.
    let welcome = ServerFrame::Welcome {
        conn: &conn_name(conn),
        user: &user,
        node: &node.node_id,
        heartbeat_ms: node.config.heartbeat_interval.as_millis() as u64,
    }
    .encode();
    mailbox.offer(Outbound::Frame(welcome.into()));
    // Boxed, like the disconnect: one-off futures that would otherwise
    // size this connection's whole task for its whole life.
    let registered = Box::pin(node.hub.connect(conn, user.clone(), mailbox.clone())).await;
    mailbox.start();
    let heartbeat = node.config.heartbeat_interval;
    let reason = match registered {
        Ok(()) => {
            if node.is_draining() {
                mailbox.close().close(CloseReason::DRAINING);
            }
            let config = Some(websocket_config(&node.config));
            let io = mailbox.socket_io();
            let mut reader = Reader {
                socket: match early {
                    None => WebSocketStream::from_raw_socket(io, Role::Server, config).await,
                    Some(early) => {
                        WebSocketStream::from_partially_read(io, early, Role::Server, config).await
                    }
                },
                bucket: TokenBucket::new(node.config.rate_limit, node.config.rate_burst as f64),
                node: node.clone(),
                conn,
                identity,
                mailbox: mailbox.clone(),
                liveness: &liveness,
                refused_in_row: 0,
                rooms: HashSet::new(),
                expiring_sent_for: None,
            };
            tokio::join!(
                reader.run(),
                write_until_closed(&mailbox, &liveness, heartbeat)
            )
            .0
        }
        Err(err) => {
            tracing::error!(conn = %conn_name(conn), %user, error = %err, "registering the connection failed");
            mailbox.close().close(CloseReason::INTERNAL);
            write_until_closed(&mailbox, &liveness, heartbeat).await;
            CloseReason::INTERNAL
        }
    };
    Box::pin(node.hub.disconnect(conn)).await;
    node.stats.connection_closed(reason.code);
    tracing::info!(
        conn = %conn_name(conn),
        %user,
        duration_ms = started.elapsed().as_millis() as u64,
        close_code = reason.code,
        close_reason = reason.text,
        "disconnected"
    );
}

/// The name a connection is known by in frames and logs.
fn conn_name(conn: ConnId) -> String {
    format!("c-{conn}")
}

/// The writing half: heartbeats, the socket when it is full, and the close
/// frame. Returns once the last frame is out.
async fn write_until_closed(mailbox: &Mailbox, liveness: &Liveness, heartbeat: Duration) {
    let close = mailbox.close();
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        tokio::select! {
            biased;
            reason = poll_fn(|cx| close.poll_closed(cx)) => break reason,
            _ = ping.tick() => {
                if liveness.silent_for() >= heartbeat * 2 {
                    close.close(CloseReason::HEARTBEAT_TIMEOUT);
                } else {
                    mailbox.ping();
                }
            }
            () = poll_fn(|cx| mailbox.poll_blocked(cx)) => tokio::select! {
                biased;
                reason = poll_fn(|cx| close.poll_closed(cx)) => break reason,
                _ = mailbox.writable() => {
                    mailbox.unblock();
                }
            },
        }
    };
    mailbox.finish(reason);
    let _ = timeout(CLOSE_GRACE, async {
        while !mailbox.unblock() {
            mailbox.writable().await;
        }
    })
    .await;
}

struct Reader<'a> {
    socket: WebSocketStream<Io>,
    node: Arc<NodeState>,
    conn: ConnId,
    identity: Identity,
    mailbox: Mailbox,
    liveness: &'a Liveness,
    bucket: TokenBucket,
    refused_in_row: u32,
    rooms: HashSet<Arc<str>>,
    /// The `exp` an `expiring` notice was sent for.
    expiring_sent_for: Option<u64>,
}

impl Reader<'_> {
    /// Reads until the connection closes; returns why it closed.
    async fn run(&mut self) -> CloseReason {
        let mailbox = self.mailbox.clone();
        let close = mailbox.close();
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                reason = poll_fn(|cx| close.poll_closed(cx)) => {
                    if reason.send_frame && !reason.by_peer {
                        Box::pin(await_peer_close(&mut self.socket)).await;
                    }
                    return reason;
                }
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    self.on_deadline();
                }
                message = self.socket.next() => match message {
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
            Message::Close(frame) => Some(CloseReason::by_peer(
                frame.map_or(close::NO_STATUS, |f| u16::from(f.code)),
            )),
            // Pings and pongs count against the rate limit too, without an
            // `error` (the library has answered the ping already): a flood
            // of them is closed with 4029 like any other.
            Message::Ping(_) | Message::Pong(_) => self.take_token().err().flatten(),
            Message::Frame(_) => None,
        }
    }

    /// Takes a token for one frame. `Err(None)`: over the limit;
    /// `Err(Some(close))`: refused too often in a row.
    fn take_token(&mut self) -> Result<(), Option<CloseReason>> {
        if self.bucket.try_take(Instant::now()) {
            self.refused_in_row = 0;
            return Ok(());
        }
        self.refused_in_row += 1;
        if self.refused_in_row >= self.node.config.rate_burst {
            return Err(Some(CloseReason::RATE_LIMITED));
        }
        Err(None)
    }

    /// Takes a token for one data frame; one over the limit is refused with
    /// an `error`.
    fn within_rate(&mut self, reference: Option<&RawValue>) -> Result<(), Option<CloseReason>> {
        let taken = self.take_token();
        if taken == Err(None) {
            let message = format!(
                "rate limit: at most {} frames per second, bursts of {}; this frame was dropped",
                self.node.config.rate_limit, self.node.config.rate_burst
            );
            self.reject(Rejection::new(ErrorCode::RateLimited, message), reference);
        }
        taken
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
        self.mailbox.offer(item)
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
                let key = key.map(|key| sender_key(&user, &key));
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
            None => self.node.hub.room_name(room),
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
                // Trusted as what the client has only when history vouches
                // for it: a `since` it could not place (from before a
                // restart, or made up) must not hide the replay or live frames.
                let since = match catch_up {
                    CatchUp::Since(since) if replay.recovered => Some(since),
                    _ => None,
                };
                // What goes out: each message reaches a connection once, so a
                // re-join skips what this connection was already sent.
                let floor = self.mailbox.last_written(&room).max(since);
                let replayed = replay.messages.iter().filter(|m| m.id > floor).count();
                let joined = ServerFrame::Joined {
                    room: &room,
                    recovered: replay.recovered,
                    replayed,
                    reference,
                }
                .encode();
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
            self.mailbox.close().close(CloseReason::TOKEN_EXPIRED);
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

/// After the server's close frame, give the peer a moment to answer.
async fn await_peer_close(socket: &mut WebSocketStream<Io>) {
    let _ = timeout(CLOSE_GRACE, async {
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn reason_for_read_error(err: tungstenite::Error) -> CloseReason {
    {
        match err {
            tungstenite::Error::Capacity(_) => CloseReason::TOO_BIG,
            // The peer vanished without a close frame: nothing to tell it.
            tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ) => CloseReason::GONE,
            tungstenite::Error::Utf8(_) => CloseReason::INVALID_PAYLOAD,
            tungstenite::Error::Protocol(_) => CloseReason::PROTOCOL_ERROR,
            _ => CloseReason::GONE,
        }
    }
}
