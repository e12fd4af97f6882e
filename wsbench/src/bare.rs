//! `wsbench bare`: a reference server to measure beside roomcast in the same
//! run. It speaks only what wsbench's `fanout` and `rooms` need of protocol
//! v1 (`welcome`; `join` → `joined`; `publish` → a `message` to every member
//! and an `ack`; `leave`; `ping`) and does nothing else a real server must:
//! no auth, history, presence, limits or broker. Each message is encoded
//! once and written to each member with one non-blocking send, from the
//! publisher's task; what a socket cannot take waits in its queue.
//!
//! So its figures are what this machine and kernel cost on their own (the
//! "bare server" of the targets): roomcast's latency or CPU per delivery
//! divided by the bare server's, measured minutes apart, says how much of a
//! figure is roomcast's own, whatever the host does that hour.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use clap::Args;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};

use crate::wire::{encode_frame, Decoded, Decoder, WireError, OP_CLOSE, OP_PONG, OP_TEXT};
use crate::Ctx;

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
    let listener = match TcpListener::bind(a.bind).await {
        Ok(l) => l,
        Err(e) => {
            return json!({"scenario": "bare", "error": format!("cannot listen on {}: {e}", a.bind)})
        }
    };
    let addr = listener.local_addr().map_or(a.bind, |addr| addr);
    // For people and for scripts that start it on port 0.
    println!("wsbench bare listening on ws://{addr}/ws");
    let server = Arc::new(Server::new(a.max_queued));
    let stop = async {
        let deadline = tokio::time::sleep_until(ctx.deadline);
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
                () = deadline => {}
            },
            Err(_) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = deadline => {}
            },
        }
    };
    server.clone().serve(listener, stop).await;
    let mut result = server.totals();
    result["scenario"] = json!("bare");
    result["addr"] = json!(addr.to_string());
    result
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    messages: AtomicU64,
    deliveries: AtomicU64,
    dropped_slow: AtomicU64,
}

pub struct Server {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    counts: Counts,
    max_queued: usize,
}

#[derive(Default)]
struct Room {
    state: Mutex<RoomState>,
}

#[derive(Default)]
struct RoomState {
    members: Vec<Arc<Member>>,
    seq: u64,
}

/// One connection's socket, shared by its own task (reads, replies) and
/// publishers' tasks (deliveries); the `out` lock orders every write.
struct Member {
    id: u64,
    stream: TcpStream,
    out: Mutex<Out>,
    /// Wakes the connection's task: bytes are queued, or it was dropped.
    wake: Notify,
}

#[derive(Default)]
struct Out {
    queued: Vec<u8>,
    dropped: bool,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    /// Writes `frame` now if nothing is queued before it, else queues it.
    fn send(&self, frame: &[u8], max_queued: usize) {
        let mut out = lock(&self.out);
        if out.dropped {
            return;
        }
        let mut rest = frame;
        if out.queued.is_empty() {
            match self.stream.try_write(frame) {
                Ok(n) => rest = &frame[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => out.dropped = true,
            }
        }
        if !out.dropped && !rest.is_empty() {
            if out.queued.len() + rest.len() > max_queued {
                out.dropped = true;
            } else {
                out.queued.extend_from_slice(rest);
            }
        }
        if out.dropped || !out.queued.is_empty() {
            self.wake.notify_one();
        }
    }

    /// Writes what is queued, waiting for the socket as needed; an error
    /// once the connection was dropped.
    async fn flush(&self) -> io::Result<()> {
        loop {
            {
                let mut out = lock(&self.out);
                if out.dropped {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                while !out.queued.is_empty() {
                    match self.stream.try_write(&out.queued) {
                        Ok(n) => {
                            out.queued.drain(..n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            out.dropped = true;
                            return Err(e);
                        }
                    }
                }
                if out.queued.is_empty() {
                    out.queued = Vec::new();
                    return Ok(());
                }
            }
            // A publisher may drop the connection meanwhile: wake for that too.
            tokio::select! {
                writable = self.stream.writable() => writable?,
                () = self.wake.notified() => {}
            }
        }
    }

    fn is_dropped(&self) -> bool {
        lock(&self.out).dropped
    }
}

impl Room {
    /// Sends `data` from `from` to every member; the message's id.
    fn publish(&self, name: &str, from: &str, data: &RawValue, server: &Server) -> String {
        let mut state = lock(&self.state);
        state.seq += 1;
        let id = format!("{}-{}", crate::frame::now_us() / 1000, state.seq);
        let frame = text_frame(&format!(
            "{{\"type\":\"message\",\"room\":{},\"id\":\"{id}\",\"from\":{from},\"data\":{}}}",
            quoted(name),
            data.get()
        ));
        for member in &state.members {
            member.send(&frame, server.max_queued);
        }
        let members = state.members.len() as u64;
        drop(state);
        server.counts.messages.fetch_add(1, Ordering::Relaxed);
        server
            .counts
            .deliveries
            .fetch_add(members, Ordering::Relaxed);
        id
    }

    fn join(&self, member: &Arc<Member>) {
        let mut state = lock(&self.state);
        if !state.members.iter().any(|m| m.id == member.id) {
            state.members.push(member.clone());
        }
    }

    fn leave(&self, id: u64) {
        lock(&self.state).members.retain(|m| m.id != id);
    }
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

/// What a connection's task does after a frame.
enum Next {
    Continue,
    Close,
}

impl Server {
    pub fn new(max_queued: usize) -> Server {
        Server {
            rooms: Mutex::new(HashMap::new()),
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
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
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
        })
    }

    fn room(&self, name: &str) -> Arc<Room> {
        let mut rooms = lock(&self.rooms);
        match rooms.get(name) {
            Some(room) => room.clone(),
            None => rooms.entry(name.to_string()).or_default().clone(),
        }
    }

    async fn connection(self: Arc<Self>, id: u64, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let mut user = String::from("anon");
        let handshake = tokio_tungstenite::accept_hdr_async(stream, UserOf(&mut user)).await;
        // The client says nothing before the welcome, so nothing is left
        // in tungstenite's buffer: the socket goes on bare.
        let Ok(ws) = handshake else { return };
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
        let mut joined: Vec<Arc<Room>> = Vec::new();
        let mut decoder = Decoder::default();
        loop {
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
                                Ok(Next::Close) | Err(_) => break,
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                () = member.wake.notified() => {
                    if member.flush().await.is_err() {
                        break;
                    }
                }
            }
        }
        if member.is_dropped() {
            self.counts.dropped_slow.fetch_add(1, Ordering::Relaxed);
        }
        for room in joined {
            room.leave(id);
        }
    }

    /// Handles every complete frame read so far.
    fn frames(
        &self,
        member: &Arc<Member>,
        from: &str,
        decoder: &mut Decoder,
        joined: &mut Vec<Arc<Room>>,
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
                    member.send(&close, self.max_queued);
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
        joined: &mut Vec<Arc<Room>>,
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
        let room_name = frame.room.as_deref();
        match (frame.ty.as_ref(), room_name) {
            ("ping", _) => format!("{{\"type\":\"pong\"{}}}", ref_field(reference)),
            ("join", Some(name)) => {
                let room = self.room(name);
                room.join(member);
                if !joined.iter().any(|r| Arc::ptr_eq(r, &room)) {
                    joined.push(room);
                }
                format!(
                    "{{\"type\":\"joined\",\"room\":{},\"recovered\":false,\"replayed\":0{}}}",
                    quoted(name),
                    ref_field(reference)
                )
            }
            ("leave", Some(name)) => {
                let room = lock(&self.rooms).get(name).cloned();
                if let Some(room) = room {
                    room.leave(member.id);
                    joined.retain(|r| !Arc::ptr_eq(r, &room));
                }
                format!(
                    "{{\"type\":\"left\",\"room\":{}{}}}",
                    quoted(name),
                    ref_field(reference)
                )
            }
            ("publish", Some(name)) => match frame.data {
                Some(data) => {
                    let id = self.room(name).publish(name, from, data, self);
                    format!(
                        "{{\"type\":\"ack\",\"id\":\"{id}\"{}}}",
                        ref_field(reference)
                    )
                }
                None => error("bad_request", "publish needs data", reference),
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
    use std::time::Duration;

    use super::*;
    use crate::conn::{join, Connector, Target, Ws};
    use crate::frame::{parse, publish_frame, Frame, ParseMode};
    use crate::wire::Event;

    /// A bare server on a free port, and a connector for it.
    async fn start(max_queued: usize) -> (Arc<Server>, Connector, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(Server::new(max_queued));
        tokio::spawn(server.clone().serve(listener, std::future::pending()));
        let connector = Connector {
            targets: vec![Target::parse(&format!("ws://{addr}/ws")).unwrap()],
            source_ips: 0,
            source_offset: 0,
            timeout: Duration::from_secs(10),
            retries: 0,
            parse: ParseMode::Fast,
        };
        (server, connector, addr)
    }

    async fn next_frame(ws: &mut Ws) -> Frame {
        let wait = tokio::time::timeout(Duration::from_secs(10), ws.recv());
        match wait.await.expect("a frame within 10 s").expect("a frame") {
            Event::Text(t) => parse(ParseMode::Fast, t),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_published_message_reaches_every_member_and_is_acked() {
        let (server, connector, _) = start(1 << 20).await;
        let mut members = Vec::new();
        for i in 0..3 {
            let mut ws = connector.connect(i, "sub").await.unwrap().ws;
            join(&mut ws, "r", ParseMode::Fast, Duration::from_secs(10))
                .await
                .unwrap();
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
    async fn frames_it_does_not_serve_get_an_error_naming_them() {
        let (_, connector, _) = start(1 << 20).await;
        let mut ws = connector.connect(0, "amy").await.unwrap().ws;
        ws.send_text(r#"{"type":"presence","room":"r","ref":9}"#)
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), ws.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Text(t) => {
                assert!(t.contains("presence"), "{t}");
                assert_eq!(
                    parse(ParseMode::Fast, t),
                    Frame::Error {
                        code: "bad_request".into(),
                        reference: Some(9)
                    }
                );
            }
            other => panic!("{other:?}"),
        }
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
    async fn a_member_that_does_not_read_is_dropped_past_its_queue_limit() {
        let (server, connector, _) = start(64 << 10).await;
        let mut slow = connector.connect(0, "slow").await.unwrap().ws;
        join(&mut slow, "r", ParseMode::Fast, Duration::from_secs(10))
            .await
            .unwrap();
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
        let started = std::time::Instant::now();
        while server.totals()["dropped_slow"] != json!(1) && started.elapsed().as_secs() < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.totals()["dropped_slow"], json!(1));
    }
}
