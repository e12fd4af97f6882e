//! Opening client connections: a TCP socket bound to one of several loopback
//! source addresses (each gives its own ~28k ephemeral ports), the WebSocket
//! handshake over it, and the server's `welcome`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::{
    self, client::IntoClientRequest, protocol::WebSocketConfig, Message,
};
use tokio_tungstenite::WebSocketStream;

use crate::frame::{self, Frame, ParseMode};
use crate::hist::Hist;
use crate::wire::{Event, WireError};

/// A client connection after its `welcome`.
pub type Ws = crate::wire::Conn;

/// A node's WebSocket endpoint, `ws://HOST:PORT/PATH`.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    authority: String,
    path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/ws"),
        };
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| format!("{url}: no IPv4 address"))?;
        Ok(Target {
            url: url.to_string(),
            addr,
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }

    fn request_url(&self, user: &str) -> String {
        let sep = if self.path.contains('?') { '&' } else { '?' };
        format!("ws://{}{}{}user={}", self.authority, self.path, sep, user)
    }

    fn loopback(&self) -> bool {
        self.addr.ip().is_loopback()
    }
}

/// Why a connection could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnError {
    Timeout,
    Io(std::io::ErrorKind),
    Http(u16),
    Ws(String),
    /// The connection ended before the expected frame.
    Closed,
    /// The server answered a frame with an `error`.
    Refused(String),
    Wire(WireError),
}

impl ConnError {
    /// A short name to count failures by.
    pub fn kind(&self) -> String {
        match self {
            ConnError::Timeout => "timeout".into(),
            ConnError::Io(k) => format!("io:{k:?}"),
            ConnError::Http(s) => format!("http:{s}"),
            ConnError::Ws(e) => format!("ws:{e}"),
            ConnError::Closed => "closed".into(),
            ConnError::Refused(c) => format!("error:{c}"),
            ConnError::Wire(e) => e.kind(),
        }
    }
}

impl From<tungstenite::Error> for ConnError {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Http(resp) => ConnError::Http(resp.status().as_u16()),
            tungstenite::Error::Io(e) => ConnError::Io(e.kind()),
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                ConnError::Closed
            }
            other => {
                let s = other.to_string();
                ConnError::Ws(s.chars().take(40).collect())
            }
        }
    }
}

/// A connection that got its `welcome`.
pub struct Connected {
    pub ws: Ws,
    /// From the first TCP connect to the `welcome`, retries included.
    pub elapsed: Duration,
    pub retries: u32,
}

pub struct Connector {
    pub targets: Vec<Target>,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+n); 0: let the kernel pick.
    pub source_ips: u32,
    /// Added to a connection's index before picking its source address (so
    /// shards use different addresses).
    pub source_offset: usize,
    pub timeout: Duration,
    /// Retries of an upgrade refused with 503 (the node paces upgrades).
    pub retries: u32,
    pub parse: ParseMode,
}

fn ws_config() -> WebSocketConfig {
    // Small read buffers: thousands of mostly idle sockets.
    WebSocketConfig::default().read_buffer_size(4 * 1024)
}

impl Connector {
    pub fn target(&self, index: usize) -> &Target {
        &self.targets[index % self.targets.len()]
    }

    fn source(&self, index: usize, target: &Target) -> Option<Ipv4Addr> {
        if self.source_ips == 0 || !target.loopback() || !target.addr.is_ipv4() {
            return None;
        }
        let k = ((index + self.source_offset) % self.source_ips as usize) as u32;
        Some(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + k))
    }

    async fn tcp(&self, index: usize, target: &Target) -> Result<TcpStream, ConnError> {
        let socket = TcpSocket::new_v4().map_err(|e| ConnError::Io(e.kind()))?;
        if let Some(src) = self.source(index, target) {
            socket
                .bind(SocketAddr::new(IpAddr::V4(src), 0))
                .map_err(|e| ConnError::Io(e.kind()))?;
        }
        let stream = socket
            .connect(target.addr)
            .await
            .map_err(|e| ConnError::Io(e.kind()))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn attempt(&self, index: usize, user: &str) -> Result<Ws, ConnError> {
        let ws = self.handshake(index, user).await?;
        // Nothing else is sent before the client speaks, so tungstenite's
        // buffer is empty after the welcome: the socket goes on bare.
        Ok(crate::wire::Conn::new(
            ws.into_inner(),
            index as u32 ^ 0x9E37_79B9,
        ))
    }

    async fn handshake(
        &self,
        index: usize,
        user: &str,
    ) -> Result<WebSocketStream<TcpStream>, ConnError> {
        let target = self.target(index);
        let stream = self.tcp(index, target).await?;
        let request = target
            .request_url(user)
            .into_client_request()
            .map_err(ConnError::from)?;
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return match frame::parse(self.parse, t.as_str()) {
                        Frame::Welcome => Ok(ws),
                        Frame::Error { code, .. } => Err(ConnError::Refused(code)),
                        _ => Err(ConnError::Ws("no welcome".into())),
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Err(ConnError::Closed),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(_)) => {}
            }
        }
    }

    /// Connects client `index` as `user` (to target `index % targets`) and
    /// waits for its `welcome`, retrying upgrades refused with 503.
    pub async fn connect(&self, index: usize, user: &str) -> Result<Connected, ConnError> {
        let start = Instant::now();
        let mut retries = 0;
        loop {
            let result = timeout(self.timeout, self.attempt(index, user))
                .await
                .unwrap_or(Err(ConnError::Timeout));
            match result {
                Ok(ws) => {
                    return Ok(Connected {
                        ws,
                        elapsed: start.elapsed(),
                        retries,
                    })
                }
                Err(ConnError::Http(503)) if retries < self.retries => {
                    retries += 1;
                    // Retry-After is 1 s; spread the retries over the next second.
                    let jitter = (index as u64).wrapping_mul(2654435761) % 1000;
                    tokio::time::sleep(Duration::from_millis(1000 + jitter)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Sends `join` (resuming after `since` if given) and waits for `joined`,
/// skipping presence events. Returns (recovered, replayed).
pub async fn join(
    ws: &mut Ws,
    room: &str,
    parse: ParseMode,
    wait: Duration,
) -> Result<(bool, u64), ConnError> {
    ws.send_text(&frame::join_frame(room, None, 1))
        .await
        .map_err(ConnError::Wire)?;
    let work = async {
        loop {
            let text = text_or_end(ws.recv().await).map_err(|_| ConnError::Closed)?;
            match frame::parse(parse, text) {
                Frame::Joined {
                    recovered,
                    replayed,
                } => return Ok((recovered, replayed)),
                Frame::Error { code, .. } => return Err(ConnError::Refused(code)),
                _ => {}
            }
        }
    };
    timeout(wait, work).await.unwrap_or(Err(ConnError::Timeout))
}

/// The text of a received message, or why the connection ended (`eof`,
/// `close:CODE`, `io:...`).
pub fn text_or_end(r: Result<Event<'_>, WireError>) -> Result<&str, String> {
    match r {
        Ok(Event::Text(t)) => Ok(t),
        Ok(Event::Close(Some(code))) => Err(format!("close:{code}")),
        Ok(Event::Close(None)) => Err("close".into()),
        Ok(Event::Eof) => Err("eof".into()),
        Err(e) => Err(e.kind()),
    }
}

/// Outcome of opening many connections.
#[derive(Default)]
pub struct ConnectPhase {
    pub attempted: u64,
    pub ok: u64,
    pub failures: BTreeMap<String, u64>,
    pub retries: u64,
    pub hist: Hist,
    pub elapsed: Duration,
    /// Growth of TCP counters such as ListenOverflows (accept queue full).
    pub tcp_counters: BTreeMap<String, u64>,
}

impl ConnectPhase {
    pub fn to_json(&self) -> Value {
        let secs = self.elapsed.as_secs_f64();
        json!({
            "attempted": self.attempted,
            "ok": self.ok,
            "failed": self.attempted - self.ok,
            "failures": self.failures,
            "retries_503": self.retries,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "per_second": if secs > 0.0 { (self.ok as f64 / secs).round() } else { 0.0 },
            "ms": self.hist.summary().to_json_ms(),
            "tcp_counters": self.tcp_counters,
        })
    }

    pub fn merge(&mut self, other: &ConnectPhase) {
        self.attempted += other.attempted;
        self.ok += other.ok;
        for (k, v) in &other.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        self.retries += other.retries;
        self.hist.merge(&other.hist);
        self.elapsed += other.elapsed;
        for (k, v) in &other.tcp_counters {
            *self.tcp_counters.entry(k.clone()).or_default() += v;
        }
    }
}

/// What opening one connection gives: its state, connect time and retries.
type Opened<T> = Result<(T, Duration, u32), ConnError>;

/// Runs `open(index)` for every index, at most `concurrency` at once (0:
/// all at once), each as its own task, until `deadline`. `open` returns the
/// connection's state with its connect time and retries. Results come back in
/// index order (None where it failed).
pub async fn open_many<T, F, Fut>(
    indices: Vec<usize>,
    concurrency: usize,
    deadline: Instant,
    open: F,
) -> (Vec<Option<T>>, ConnectPhase)
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(T, Duration, u32), ConnError>> + Send + 'static,
{
    let start = Instant::now();
    let netstat_before = crate::procstat::netstat_sample();
    let n = indices.len();
    let permits = Arc::new(Semaphore::new(if concurrency == 0 {
        n.max(1)
    } else {
        concurrency
    }));
    let mut set = JoinSet::new();
    let mut phase = ConnectPhase {
        attempted: n as u64,
        ..Default::default()
    };
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut collect = |res: Result<(usize, Opened<T>), tokio::task::JoinError>,
                       phase: &mut ConnectPhase| {
        match res {
            Ok((slot, Ok((t, elapsed, retries)))) => {
                phase.ok += 1;
                phase.retries += u64::from(retries);
                phase.hist.record(elapsed.as_micros() as u64);
                out[slot] = Some(t);
            }
            Ok((_, Err(e))) => *phase.failures.entry(e.kind()).or_default() += 1,
            Err(_) => *phase.failures.entry("panic".into()).or_default() += 1,
        }
    };
    for (slot, index) in indices.into_iter().enumerate() {
        let permit = loop {
            // Reap finished tasks while waiting for a slot.
            tokio::select! {
                biased;
                p = permits.clone().acquire_owned() => break p.ok(),
                Some(res) = set.join_next() => collect(res, &mut phase),
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        let Some(permit) = permit else {
            *phase.failures.entry("deadline".into()).or_default() += 1;
            continue;
        };
        let fut = open(index);
        set.spawn(async move {
            let r = timeout_at(deadline, fut)
                .await
                .unwrap_or(Err(ConnError::Timeout));
            drop(permit);
            (slot, r)
        });
    }
    while let Some(res) = set.join_next().await {
        collect(res, &mut phase);
    }
    phase.elapsed = start.elapsed();
    for (k, v) in crate::procstat::netstat_sample() {
        let d = v.saturating_sub(netstat_before.get(&k).copied().unwrap_or(0));
        if d > 0 {
            phase
                .tcp_counters
                .insert(k.trim_start_matches("TcpExt.").to_string(), d);
        }
    }
    (out, phase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_source_addresses() {
        let t = Target::parse("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(t.request_url("sub-1"), "ws://127.0.0.1:8080/ws?user=sub-1");
        let t2 = Target::parse("ws://localhost:9000/ws?x=1").unwrap();
        assert_eq!(t2.request_url("a"), "ws://localhost:9000/ws?x=1&user=a");
        assert!(Target::parse("wss://x/ws").is_err());
        let c = Connector {
            targets: vec![t.clone(), t2],
            source_ips: 3,
            source_offset: 0,
            timeout: Duration::from_secs(1),
            retries: 0,
            parse: ParseMode::Fast,
        };
        assert_eq!(c.source(0, &t), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(c.source(4, &t), Some(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(c.target(3).addr.port(), 9000);
    }
}
