//! `wsbench bare`: a reference server to measure beside roomcast in the same
//! run. It speaks only what wsbench's `fanout` and `rooms` need of protocol
//! v1 (`welcome`; `join` → `joined`; `publish` → a `message` to every member
//! and an `ack`; `leave`; `ping`) and does nothing else a real server must:
//! no auth, history, presence, limits, broker or batching. Each message is
//! encoded once and written to each member with one non-blocking send, from
//! the publisher's task, over a snapshot of the room's members (so two
//! publishers fan out at once, and their messages may reach members in
//! different orders; each publisher's own stay in order); what a socket
//! cannot take waits in its queue, written by the connection's task.
//!
//! It is the naive server the issue's "bare server" figures describe, not
//! a lower bound: below saturation its CPU per delivery is mostly the
//! kernel's cost of one `send`, and its tails show what this host does to a
//! server that does almost nothing; between 100 and 200 frames per second
//! to 1,000 sockets it saturates, where a server that batches does not.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};

use crate::wire::{encode_frame, Decoded, Decoder, WireError, OP_CLOSE, OP_PONG, OP_TEXT};
use crate::{lock, Ctx};

/// Pending connections the kernel keeps (roomcast's nodes use the same).
const LISTEN_BACKLOG: u32 = 4096;
/// How long a client may take to send its upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the close echo may wait behind queued frames.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// A drained queue larger than this gives its memory back, and a queue
/// that has written this much drops the written part.
const KEEP_QUEUE_CAPACITY: usize = 64 << 10;

#[derive(Args)]
pub struct BareArgs {
    /// Address to listen on (port 0: a free port; the address is printed)
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// Bytes a connection may have waiting to be written; past it the
    /// connection is dropped (counted as `dropped_slow`)
    #[arg(long, default_value_t = 8 << 20)]
    pub max_queued: usize,
}

/// Serves until SIGTERM, SIGINT or `--timeout`, then reports its totals.
pub async fn run(ctx: &Ctx, a: BareArgs) -> Value {
    let listener = match listen(a.bind) {
        Ok(l) => l,
        Err(e) => {
            return json!({"scenario": "bare", "error": format!("cannot listen on {}: {e}", a.bind)})
        }
    };
    let addr = listener.local_addr().unwrap_or(a.bind);
    // Before the address is printed: a script may send SIGTERM right after.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    println!("wsbench bare listening on ws://{addr}/ws");
    let deadline = ctx.deadline;
    let stop = async move {
        let terminated = async {
            match term {
                Some(mut term) => {
                    term.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = terminated => {}
            _ = tokio::signal::ctrl_c() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    };
    let server = Arc::new(Server::new(a.max_queued));
    server.clone().serve(listener, stop).await;
    let mut result = server.totals();
    result["scenario"] = json!("bare");
    result["urls"] = json!([format!("ws://{addr}/ws")]);
    result
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    messages: AtomicU64,
    deliveries: AtomicU64,
    dropped_slow: AtomicU64,
    write_errors: AtomicU64,
}

pub struct Server {
    /// Rooms with members; a room's member list is replaced, never edited,
    /// so a publisher can write to a snapshot of it without a lock.
    rooms: Mutex<HashMap<String, Arc<Vec<Arc<Member>>>>>,
    next_message: AtomicU64,
    counts: Counts,
    max_queued: usize,
}

/// One connection's socket, shared by its own task (reads, replies, the
/// queue) and publishers' tasks (deliveries); the `out` lock orders every
/// write.
struct Member {
    id: u64,
    stream: TcpStream,
    out: Mutex<Out>,
    /// Wakes the connection's task: its queue was empty and is not, or the
    /// connection was dropped.
    wake: Notify,
}

#[derive(Default)]
struct Out {
    queued: Vec<u8>,
    /// How much of `queued` is written.
    written: usize,
    ended: Option<Ended>,
    /// A close frame is queued, or the connection's task is done: nothing
    /// more is written after it.
    closing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// More than `max_queued` waited to be written.
    Slow,
    WriteError,
}

impl Out {
    fn backlog(&self) -> usize {
        self.queued.len() - self.written
    }
}

/// A client frame: only the fields this server reads.
#[derive(Deserialize)]
struct ClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default)]
    room: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(rename = "ref", default, borrow)]
    reference: Option<&'a RawValue>,
}

/// A server frame carrying `text`.
fn text_frame(text: &str) -> Vec<u8> {
    let mut frame = Vec::with_capacity(text.len() + 10);
    encode_frame(&mut frame, OP_TEXT, text.as_bytes(), None);
    frame
}

/// `value` as a JSON string literal.
fn quoted(value: &str) -> String {
    Value::from(value).to_string()
}

/// `,"ref":R` when the client gave a `ref`, else nothing.
fn ref_field(reference: Option<&RawValue>) -> String {
    reference.map_or_else(String::new, |r| format!(",\"ref\":{}", r.get()))
}

impl Member {
    /// Writes `frame` now if nothing is queued before it, else queues it;
    /// false if the connection takes no more frames.
    fn send(&self, frame: &[u8], max_queued: usize) -> bool {
        let mut out = lock(&self.out);
        self.send_locked(&mut out, frame, max_queued)
    }

    /// Sends the close frame `frame`, the last thing this connection gets.
    fn send_close(&self, frame: &[u8], max_queued: usize) {
        let mut out = lock(&self.out);
        self.send_locked(&mut out, frame, max_queued);
        out.closing = true;
    }

    /// Takes no more frames (the connection's task is ending).
    fn close(&self) {
        lock(&self.out).closing = true;
    }

    fn send_locked(&self, out: &mut Out, frame: &[u8], max_queued: usize) -> bool {
        if out.ended.is_some() || out.closing {
            return false;
        }
        let idle = out.backlog() == 0;
        let mut rest = frame;
        if idle {
            match self.stream.try_write(frame) {
                Ok(n) => rest = &frame[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => out.ended = Some(Ended::WriteError),
            }
        }
        if out.ended.is_none() && !rest.is_empty() {
            if out.backlog() + rest.len() > max_queued {
                out.ended = Some(Ended::Slow);
            } else {
                out.queued.extend_from_slice(rest);
            }
        }
        // The task only needs waking when there is something new to wait
        // for: a queue that was empty, or the end.
        if out.ended.is_some() || (idle && out.backlog() > 0) {
            self.wake.notify_one();
        }
        out.ended.is_none()
    }

    /// Writes what is queued until the socket is full or the queue empty.
    fn write_queued(&self) -> Result<(), Ended> {
        let mut out = lock(&self.out);
        if let Some(ended) = out.ended {
            return Err(ended);
        }
        while out.backlog() > 0 {
            let at = out.written;
            match self.stream.try_write(&out.queued[at..]) {
                Ok(0) => out.ended = Some(Ended::WriteError),
                Ok(n) => out.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A queue that never quite empties must not keep what
                    // it has written.
                    if out.written >= KEEP_QUEUE_CAPACITY {
                        let written = out.written;
                        out.queued.drain(..written);
                        out.written = 0;
                    }
                    return Ok(());
                }
                Err(_) => out.ended = Some(Ended::WriteError),
            }
            if let Some(ended) = out.ended {
                return Err(ended);
            }
        }
        out.queued.clear();
        out.written = 0;
        if out.queued.capacity() > KEEP_QUEUE_CAPACITY {
            out.queued = Vec::new();
        }
        Ok(())
    }

    fn has_backlog(&self) -> bool {
        lock(&self.out).backlog() > 0
    }

    fn ended(&self) -> Option<Ended> {
        lock(&self.out).ended
    }

    /// Writes the whole queue, waiting for the socket as needed.
    async fn drain(&self) -> Result<(), Ended> {
        while self.has_backlog() {
            self.stream
                .writable()
                .await
                .map_err(|_| Ended::WriteError)?;
            self.write_queued()?;
        }
        Ok(())
    }
}

/// What a connection's task does after a frame.
enum Next {
    Continue,
    Close,
}

/// Takes the `user` query parameter of the upgrade request (as wsbench
/// sends it) into the string it borrows.
struct UserOf<'a>(&'a mut String);

impl Callback for UserOf<'_> {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        let query = request.uri().query().unwrap_or("");
        if let Some(name) = query.split('&').find_map(|kv| kv.strip_prefix("user=")) {
            *self.0 = name.to_string();
        }
        Ok(response)
    }
}

impl Server {
    pub fn new(max_queued: usize) -> Server {
        Server {
            rooms: Mutex::new(HashMap::new()),
            next_message: AtomicU64::new(0),
            counts: Counts::default(),
            max_queued,
        }
    }

    /// Accepts connections on `listener` until `stop` resolves.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut next_id = 0u64;
        loop {
            tokio::select! {
                () = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        next_id += 1;
                        tokio::spawn(self.clone().connection(next_id, stream));
                    }
                    // Out of files, most likely: let some connections end.
                    Err(_) => tokio::select! {
                        () = &mut stop => break,
                        () = tokio::time::sleep(Duration::from_millis(10)) => {}
                    },
                },
            }
        }
    }

    pub fn totals(&self) -> Value {
        let c = &self.counts;
        json!({
            "connections": c.connections.load(Ordering::Relaxed),
            "messages": c.messages.load(Ordering::Relaxed),
            "deliveries": c.deliveries.load(Ordering::Relaxed),
            "dropped_slow": c.dropped_slow.load(Ordering::Relaxed),
            "write_errors": c.write_errors.load(Ordering::Relaxed),
            "rooms": lock(&self.rooms).len(),
        })
    }

    fn join(&self, room: &str, member: &Arc<Member>) {
        let mut rooms = lock(&self.rooms);
        let members = rooms.entry(room.to_string()).or_default();
        if !members.iter().any(|m| m.id == member.id) {
            let mut more = Vec::with_capacity(members.len() + 1);
            more.extend(members.iter().cloned());
            more.push(member.clone());
            *members = Arc::new(more);
        }
    }

    fn leave(&self, room: &str, id: u64) {
        let mut rooms = lock(&self.rooms);
        let Some(members) = rooms.get_mut(room) else {
            return;
        };
        let rest: Vec<Arc<Member>> = members.iter().filter(|m| m.id != id).cloned().collect();
        if rest.is_empty() {
            rooms.remove(room);
        } else {
            *members = Arc::new(rest);
        }
    }

    /// Sends `data` from `from` to every member of `room`; the message's id.
    fn publish(&self, room: &str, from: &str, data: &RawValue) -> String {
        let seq = self.next_message.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("{}-{seq}", crate::frame::now_us() / 1000);
        let members = lock(&self.rooms).get(room).cloned();
        let mut delivered = 0;
        if let Some(members) = members {
            let frame = text_frame(&format!(
                "{{\"type\":\"message\",\"room\":{},\"id\":\"{id}\",\"from\":{from},\"data\":{}}}",
                quoted(room),
                data.get()
            ));
            for member in members.iter() {
                delivered += u64::from(member.send(&frame, self.max_queued));
            }
        }
        self.counts.messages.fetch_add(1, Ordering::Relaxed);
        self.counts
            .deliveries
            .fetch_add(delivered, Ordering::Relaxed);
        id
    }

    async fn connection(self: Arc<Self>, id: u64, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let mut user = String::from("anon");
        let handshake = tokio_tungstenite::accept_hdr_async(stream, UserOf(&mut user));
        // The client says nothing before the welcome, so nothing is left
        // in tungstenite's buffer: the socket goes on bare.
        let Ok(Ok(ws)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await else {
            return;
        };
        self.counts.connections.fetch_add(1, Ordering::Relaxed);
        let member = Arc::new(Member {
            id,
            stream: ws.into_inner(),
            out: Mutex::new(Out::default()),
            wake: Notify::new(),
        });
        let from = quoted(&user);
        member.send(
            &text_frame(&format!(
                "{{\"type\":\"welcome\",\"conn\":\"c-{id}\",\"user\":{from},\"node\":\"bare\",\"heartbeat_ms\":0}}"
            )),
            self.max_queued,
        );
        let mut joined: Vec<String> = Vec::new();
        let mut decoder = Decoder::default();
        loop {
            let backlog = member.has_backlog();
            tokio::select! {
                readable = member.stream.readable() => {
                    if readable.is_err() {
                        break;
                    }
                    match member.stream.try_read(decoder.spare()) {
                        Ok(0) => break,
                        Ok(n) => {
                            decoder.filled(n);
                            match self.frames(&member, &from, &mut decoder, &mut joined) {
                                Ok(Next::Continue) => {}
                                Ok(Next::Close) => {
                                    let _ = tokio::time::timeout(CLOSE_GRACE, member.drain()).await;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                writable = member.stream.writable(), if backlog => {
                    if writable.is_err() || member.write_queued().is_err() {
                        break;
                    }
                }
                // Frames were queued, or the connection dropped: look again.
                () = member.wake.notified() => {
                    if member.ended().is_some() {
                        break;
                    }
                }
            }
        }
        // Publishers holding an older member list write nothing more.
        member.close();
        match member.ended() {
            Some(Ended::Slow) => self.counts.dropped_slow.fetch_add(1, Ordering::Relaxed),
            Some(Ended::WriteError) => self.counts.write_errors.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        for room in &joined {
            self.leave(room, id);
        }
    }

    /// Handles every complete frame read so far.
    fn frames(
        &self,
        member: &Arc<Member>,
        from: &str,
        decoder: &mut Decoder,
        joined: &mut Vec<String>,
    ) -> Result<Next, WireError> {
        while let Some(decoded) = decoder.next()? {
            match decoded {
                Decoded::Text(span) => {
                    let reply = self.handle(member, from, decoder.text(span)?, joined);
                    member.send(&text_frame(&reply), self.max_queued);
                }
                Decoded::Ping(span) => {
                    let mut pong = Vec::new();
                    encode_frame(&mut pong, OP_PONG, decoder.bytes(span), None);
                    member.send(&pong, self.max_queued);
                }
                Decoded::Pong => {}
                Decoded::Close(_, echo) => {
                    let mut close = Vec::new();
                    encode_frame(&mut close, OP_CLOSE, decoder.bytes(echo), None);
                    member.send_close(&close, self.max_queued);
                    return Ok(Next::Close);
                }
            }
        }
        Ok(Next::Continue)
    }

    /// The reply to one client frame.
    fn handle(
        &self,
        member: &Arc<Member>,
        from: &str,
        text: &str,
        joined: &mut Vec<String>,
    ) -> String {
        let error = |code: &str, message: &str, reference: Option<&RawValue>| {
            format!(
                "{{\"type\":\"error\",\"code\":\"{code}\",\"message\":{}{}}}",
                quoted(message),
                ref_field(reference)
            )
        };
        let frame: ClientFrame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => return error("bad_request", &format!("not a protocol frame: {e}"), None),
        };
        let reference = frame.reference;
        match (frame.ty.as_ref(), frame.room.as_deref()) {
            ("ping", _) => format!("{{\"type\":\"pong\"{}}}", ref_field(reference)),
            ("join", Some(name)) => {
                self.join(name, member);
                if !joined.iter().any(|r| r == name) {
                    joined.push(name.to_string());
                }
                format!(
                    "{{\"type\":\"joined\",\"room\":{},\"recovered\":false,\"replayed\":0{}}}",
                    quoted(name),
                    ref_field(reference)
                )
            }
            ("leave", Some(name)) => {
                self.leave(name, member.id);
                joined.retain(|r| r != name);
                format!(
                    "{{\"type\":\"left\",\"room\":{}{}}}",
                    quoted(name),
                    ref_field(reference)
                )
            }
            ("publish", Some(name)) => match frame.data {
                Some(data) => {
                    let id = self.publish(name, from, data);
                    format!(
                        "{{\"type\":\"ack\",\"id\":\"{id}\"{}}}",
                        ref_field(reference)
                    )
                }
                None => error(
                    "bad_request",
                    "publish needs data (the bare reference server takes no null)",
                    reference,
                ),
            },
            ("join" | "leave" | "publish", None) => {
                error("bad_request", "this frame needs a room", reference)
            }
            (other, _) => error(
                "bad_request",
                &format!("the bare reference server does not serve {other} frames"),
                reference,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    use super::*;
    use crate::conn::{join, Connector, Target, Ws};
    use crate::frame::{parse, publish_frame, Frame, ParseMode};
    use crate::wire::Event;

    const WAIT: Duration = Duration::from_secs(10);

    /// A bare server on a free port, and a connector for it.
    async fn start(max_queued: usize) -> (Arc<Server>, Connector, SocketAddr) {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(Server::new(max_queued));
        tokio::spawn(server.clone().serve(listener, std::future::pending()));
        let connector = Connector {
            targets: vec![Target::parse(&format!("ws://{addr}/ws")).unwrap()],
            source_ips: 0,
            source_offset: 0,
            timeout: WAIT,
            retries: 0,
            parse: ParseMode::Fast,
        };
        (server, connector, addr)
    }

    async fn next_text(ws: &mut Ws) -> String {
        let wait = tokio::time::timeout(WAIT, ws.recv());
        match wait.await.expect("a frame within 10 s").expect("a frame") {
            Event::Text(t) => t.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    async fn next_frame(ws: &mut Ws) -> Frame {
        parse(ParseMode::Fast, &next_text(ws).await)
    }

    /// Waits until `totals()[key]` is `want` (a connection's task may
    /// still be ending).
    async fn totals_reach(server: &Server, key: &str, want: u64) {
        let started = std::time::Instant::now();
        while server.totals()[key] != json!(want) && started.elapsed() < WAIT {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.totals()[key], json!(want), "{key}");
    }

    #[tokio::test]
    async fn a_published_message_reaches_every_member_and_is_acked() {
        let (server, connector, _) = start(1 << 20).await;
        let mut members = Vec::new();
        for i in 0..3 {
            let mut ws = connector.connect(i, "sub").await.unwrap().ws;
            join(&mut ws, "r", ParseMode::Fast, WAIT).await.unwrap();
            members.push(ws);
        }
        let mut publisher = connector.connect(3, "pub").await.unwrap().ws;
        publisher
            .send_text(&publish_frame("r", &[0, 7, 123], "", 5))
            .await
            .unwrap();
        assert_eq!(
            next_frame(&mut publisher).await,
            Frame::Ack { reference: Some(5) }
        );
        for ws in &mut members {
            match next_frame(ws).await {
                Frame::Message { id, data: Some(p) } => {
                    assert!(id.is_some(), "the message has an id");
                    assert_eq!(p.message(), Some((0, 7, 123)));
                }
                other => panic!("expected the message, got {other:?}"),
            }
        }
        let totals = server.totals();
        assert_eq!(
            (&totals["messages"], &totals["deliveries"]),
            (&json!(1), &json!(3))
        );
    }

    #[tokio::test]
    async fn a_room_is_forgotten_when_its_last_member_leaves() {
        let (server, connector, _) = start(1 << 20).await;
        let mut ws = connector.connect(0, "amy").await.unwrap().ws;
        join(&mut ws, "r", ParseMode::Fast, WAIT).await.unwrap();
        assert_eq!(server.totals()["rooms"], json!(1));
        ws.send_text(r#"{"type":"leave","room":"r"}"#)
            .await
            .unwrap();
        assert!(next_text(&mut ws).await.starts_with(r#"{"type":"left""#));
        assert_eq!(server.totals()["rooms"], json!(0));
        ws.send_text(&publish_frame("r", &[0, 1, 0], "", 2))
            .await
            .unwrap();
        assert_eq!(
            next_frame(&mut ws).await,
            Frame::Ack { reference: Some(2) },
            "a room without members takes the message and delivers it to nobody"
        );
        assert_eq!(server.totals()["deliveries"], json!(0));
        join(&mut ws, "q", ParseMode::Fast, WAIT).await.unwrap();
        drop(ws);
        totals_reach(&server, "rooms", 0).await;
    }

    #[tokio::test]
    async fn frames_it_does_not_serve_get_an_error_naming_them() {
        let (_, connector, _) = start(1 << 20).await;
        let mut ws = connector.connect(0, "amy").await.unwrap().ws;
        ws.send_text(r#"{"type":"presence","room":"r","ref":9}"#)
            .await
            .unwrap();
        let text = next_text(&mut ws).await;
        assert!(text.contains("presence"), "{text}");
        assert_eq!(
            parse(ParseMode::Fast, &text),
            Frame::Error {
                code: "bad_request".into(),
                reference: Some(9)
            }
        );
        ws.send_text("not json").await.unwrap();
        assert!(matches!(
            next_frame(&mut ws).await,
            Frame::Error {
                reference: None,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn pings_are_answered_and_a_close_is_echoed() {
        let (_, _, addr) = start(1 << 20).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
            .await
            .unwrap();
        let welcome = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
        assert!(welcome
            .unwrap()
            .unwrap()
            .to_text()
            .unwrap()
            .contains("\"welcome\""));
        ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
        let pong = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
        assert_eq!(pong.unwrap().unwrap(), Message::Pong(b"hi".to_vec().into()));
        ws.close(None).await.unwrap();
        let closed = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
        assert!(
            matches!(closed, Some(Ok(Message::Close(_)))),
            "the close is echoed: {closed:?}"
        );
    }

    /// A member on one end of a loopback connection, and the other end.
    async fn member_and_peer(peer_rcvbuf: u32) -> (Member, TcpStream) {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let peer = TcpSocket::new_v4().unwrap();
        peer.set_recv_buffer_size(peer_rcvbuf).unwrap();
        let peer = peer.connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let member = Member {
            id: 1,
            stream,
            out: Mutex::new(Out::default()),
            wake: Notify::new(),
        };
        (member, peer)
    }

    #[tokio::test]
    async fn nothing_is_written_after_a_close_frame() {
        let (member, _peer) = member_and_peer(64 << 10).await;
        assert!(member.send(b"\x81\x01a", 1 << 20));
        member.send_close(b"\x88\x00", 1 << 20);
        assert!(
            !member.send(b"\x81\x01b", 1 << 20),
            "refused after the close"
        );
        let (member, _peer) = member_and_peer(64 << 10).await;
        member.close();
        assert!(
            !member.send(b"\x81\x01c", 1 << 20),
            "refused once the task ended"
        );
    }

    #[tokio::test]
    async fn a_queue_that_never_empties_does_not_keep_what_it_wrote() {
        // Fixed, small socket buffers (no autotuning): what the peer does
        // not read stays in the member's queue.
        let (member, peer) = member_and_peer(64 << 10).await;
        let sndbuf: libc::c_int = 64 << 10;
        // SAFETY: a valid socket descriptor and an int option of its size.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&member.stream),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&sndbuf as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_SNDBUF");
        let frame = vec![b'x'; 100 << 10];
        let wait_writable =
            || tokio::time::timeout(Duration::from_millis(5), member.stream.writable());
        // Fill the socket's buffers until frames stay queued.
        for _ in 0..1000 {
            assert!(member.send(&frame, 64 << 20));
            let _ = wait_writable().await;
            member.write_queued().unwrap();
            if member.has_backlog() {
                break;
            }
        }
        assert!(member.has_backlog(), "the socket is full");
        let mut read = vec![0u8; 40 << 10];
        for _ in 0..200 {
            // The peer reads less than is sent: the queue never empties,
            // and without trimming it would keep all it ever wrote.
            assert!(member.send(&frame, 64 << 20));
            let mut got = 0;
            while got < 40 << 10 {
                match peer.try_read(&mut read[..(40 << 10) - got]) {
                    Ok(n) => got += n,
                    Err(_) => peer.readable().await.unwrap(),
                }
            }
            let _ = wait_writable().await;
            member.write_queued().unwrap();
            let out = lock(&member.out);
            assert!(out.backlog() > 0, "the peer is behind");
            assert!(out.written < KEEP_QUEUE_CAPACITY + frame.len());
            assert!(out.queued.len() <= out.backlog() + KEEP_QUEUE_CAPACITY + frame.len());
        }
    }

    #[tokio::test]
    async fn a_member_that_does_not_read_is_dropped_past_its_queue_limit() {
        let (server, connector, _) = start(64 << 10).await;
        let mut slow = connector.connect(0, "slow").await.unwrap().ws;
        join(&mut slow, "r", ParseMode::Fast, WAIT).await.unwrap();
        let mut publisher = connector.connect(1, "pub").await.unwrap().ws;
        let pad = "x".repeat(60_000);
        // Far more than the socket buffers and the 64 KiB queue hold.
        for seq in 0..400 {
            publisher
                .send_text(&publish_frame("r", &[0, seq, 0], &pad, seq))
                .await
                .unwrap();
            assert!(matches!(
                next_frame(&mut publisher).await,
                Frame::Ack { .. }
            ));
            if server.totals()["dropped_slow"] == json!(1) {
                break;
            }
        }
        totals_reach(&server, "dropped_slow", 1).await;
        assert_eq!(server.totals()["write_errors"], json!(0));
        totals_reach(&server, "rooms", 0).await;
    }
}
