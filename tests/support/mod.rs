//! Shared helpers for the integration suite: start a node in-process or as a
//! process on a free loopback port, and a small JSON WebSocket client.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::{SinkExt, StreamExt};
use roomcast::{Config, Node};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod browser;
pub mod redis_cluster;

pub use redis_cluster::{LoneMaster, RedisCluster};

/// Defines each named `async fn(Topology)` test once per topology: one
/// node with the in-process broker, three nodes sharing a Redis, and three
/// nodes on a Redis Cluster of three masters and three replicas.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod one_node {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Topology::OneNode).await
                }
            )*
        }
        mod three_nodes_on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Topology::ThreeNodesOnRedis).await
                }
            )*
        }
        mod three_nodes_on_redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Topology::ThreeNodesOnRedisCluster).await
                }
            )*
        }
    };
}

/// How long a test waits for any one expected frame.
pub const WAIT: Duration = Duration::from_secs(10);

/// A node running inside the test process.
pub struct TestNode {
    node: Option<Node>,
    pub addr: SocketAddr,
}

impl TestNode {
    /// Starts a node on a free loopback port; `args` are CLI flags.
    pub async fn start(args: &[&str]) -> TestNode {
        let mut all = vec!["roomcast", "--bind", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let config = Config::try_parse_from(all).expect("test node flags parse");
        let node = Node::start(config).await.expect("test node starts");
        TestNode {
            addr: node.addr(),
            node: Some(node),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{}", self.addr, query)
    }

    pub async fn connect(&self, user: &str) -> Client {
        Client::connect(&self.ws_url(&format!("user={user}"))).await
    }

    pub async fn connect_with_token(&self, token: &str) -> Client {
        Client::connect(&self.ws_url(&format!("token={token}"))).await
    }

    pub fn state(&self) -> &std::sync::Arc<roomcast::node::NodeState> {
        self.node.as_ref().expect("node running").state()
    }

    pub async fn stats(&self) -> Value {
        http_get(self.addr, "/stats").await.1.parse_json()
    }

    /// Polls `/stats` until `ready` holds; panics after [`WAIT`].
    pub async fn wait_for_stats(&self, ready: impl Fn(&Value) -> bool) -> Value {
        self.poll_json("/stats", ready).await
    }

    /// Polls `/stats?scope=cluster` until `ready` holds; panics after [`WAIT`].
    pub async fn wait_for_cluster_stats(&self, ready: impl Fn(&Value) -> bool) -> Value {
        self.poll_json("/stats?scope=cluster", ready).await
    }

    async fn poll_json(&self, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = http_get(self.addr, path).await;
            assert_eq!(status, 200, "{path}: {body}");
            let value = body.parse_json();
            if ready(&value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never got there: {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
    }
}

trait ParseJson {
    fn parse_json(&self) -> Value;
}

impl ParseJson for String {
    fn parse_json(&self) -> Value {
        serde_json::from_str(self).unwrap_or_else(|e| panic!("not JSON ({e}): {self}"))
    }
}

/// A `redis-server` of the test's own on a free loopback port, without
/// persistence; killed (by PID) on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        let mut server = RedisServer { child: None, port };
        server.launch();
        server
    }

    fn launch(&mut self) {
        self.child = Some(spawn_redis_server(self.port, &[]));
        wait_for_redis(self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs a command with redis-cli; returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// How often Redis ran `command` (from scripts too), per INFO commandstats.
    pub fn command_calls(&self, command: &str) -> u64 {
        command_calls(self.port, command)
    }

    /// Kills the server (its data is gone: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a `redis-server` without persistence on loopback `port`, with
/// `extra` settings.
pub fn spawn_redis_server(port: u16, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts (scripts/test installs it)")
}

/// Waits until the `redis-server` on `port` answers.
pub fn wait_for_redis(port: u16) {
    let deadline = std::time::Instant::now() + WAIT;
    while try_redis_cli(port, &["PING"]).as_deref() != Some("PONG") {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server on {port} did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command with redis-cli against loopback `port`; its output, or
/// `None` when redis-cli failed.
pub fn try_redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Runs a command with redis-cli; panics when redis-cli fails.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    try_redis_cli(port, args).unwrap_or_else(|| panic!("redis-cli -p {port} {args:?} failed"))
}

/// How often the Redis on `port` ran `command` (from scripts too), per
/// INFO commandstats.
pub fn command_calls(port: u16, command: &str) -> u64 {
    let info = redis_cli(port, &["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Ports handed out, from below the kernel's ephemeral range (32768-60999
/// here). A port from `bind(":0")` is an ephemeral one, and with a hundred
/// tests connecting at once another test's outgoing connection can take it
/// as its source port before the server meant for it binds it (chromedriver
/// then exits with "Address already in use"). Ports below the range are
/// never picked as source ports; a counter keeps this process's picks apart.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// `count` distinct ports nobody listens on right now.
pub fn free_ports(count: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let _ = NEXT.compare_exchange(
        0,
        1 + fastrand::u16(..span),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut ports = Vec::with_capacity(count);
    for _ in 0..span {
        if ports.len() == count {
            break;
        }
        let port = PORT_RANGE.start + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), count, "free ports in {PORT_RANGE:?}");
    ports
}

/// Where a conformance test runs: the same tests, the same expectations.
#[derive(Debug, Clone, Copy)]
pub enum Topology {
    /// One node, in-process broker.
    OneNode,
    /// Three nodes sharing a Redis; clients are spread over them.
    ThreeNodesOnRedis,
    /// Three nodes on a Redis Cluster (sharded pub/sub); clients are spread
    /// over them.
    ThreeNodesOnRedisCluster,
}

/// The nodes of a test, and the Redis (or Redis Cluster) they share if any.
pub struct Cluster {
    pub nodes: Vec<TestNode>,
    pub redis: Option<RedisServer>,
    pub redis_cluster: Option<RedisCluster>,
    next: std::sync::atomic::AtomicUsize,
}

impl Topology {
    pub async fn start(self, args: &[&str]) -> Cluster {
        match self {
            Topology::OneNode => Cluster {
                nodes: vec![TestNode::start(args).await],
                redis: None,
                redis_cluster: None,
                next: Default::default(),
            },
            Topology::ThreeNodesOnRedis => Cluster::on_redis(3, args).await,
            Topology::ThreeNodesOnRedisCluster => Cluster::on_redis_cluster(3, args).await,
        }
    }
}

impl Cluster {
    /// `count` nodes on a fresh Redis.
    pub async fn on_redis(count: usize, args: &[&str]) -> Cluster {
        let redis = RedisServer::start();
        let nodes = start_nodes(count, &["--redis-url", &redis.url()], args).await;
        Cluster {
            nodes,
            redis: Some(redis),
            redis_cluster: None,
            next: Default::default(),
        }
    }

    /// `count` nodes on a fresh Redis Cluster.
    pub async fn on_redis_cluster(count: usize, args: &[&str]) -> Cluster {
        let redis_cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("the Redis Cluster starts");
        let seeds = redis_cluster.seeds();
        let nodes = start_nodes(count, &["--redis-cluster-urls", &seeds], args).await;
        Cluster {
            nodes,
            redis: None,
            redis_cluster: Some(redis_cluster),
            next: Default::default(),
        }
    }

    /// The next node, round robin.
    pub fn pick(&self) -> &TestNode {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.nodes[n % self.nodes.len()]
    }

    /// Connects `user` to the next node, round robin.
    pub async fn connect(&self, user: &str) -> Client {
        self.pick().connect(user).await
    }
}

/// `count` nodes named `node-0`… with the shared-broker flags, then `args`.
async fn start_nodes(count: usize, broker: &[&str], args: &[&str]) -> Vec<TestNode> {
    let mut nodes = Vec::with_capacity(count);
    for n in 0..count {
        let id = format!("node-{n}");
        let mut all = broker.to_vec();
        all.extend_from_slice(&["--node-id", &id]);
        all.extend_from_slice(args);
        nodes.push(TestNode::start(&all).await);
    }
    nodes
}

/// A node started as a child process of the built binary, killed on drop.
pub struct NodeProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl NodeProcess {
    /// Starts `roomcast` on a free port and waits for its listening line.
    pub fn spawn(args: &[&str]) -> NodeProcess {
        Self::spawn_at("127.0.0.1:0", args)
    }

    /// Starts `roomcast` listening on `bind` (a fixed port, for restarts
    /// behind a proxy).
    pub fn spawn_at(bind: &str, args: &[&str]) -> NodeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(["--bind", bind])
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("roomcast binary starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reads the listening line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        NodeProcess { child, addr }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `limit`; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], "").await
}

pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let (status, _, body) = http_exchange(addr, method, path, headers, body).await;
    (status, body)
}

/// One HTTP/1.1 request; returns (status, head lowercased, body).
pub async fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("writes");
    // Up to the end of the body by Content-Length when there is one: not
    // every server (chromedriver) closes on `Connection: close`.
    let read = async {
        let mut response = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = stream.read(&mut chunk).await.expect("reads");
            if n == 0 {
                return response;
            }
            response.extend_from_slice(&chunk[..n]);
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&response[..end]).to_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if length.is_some_and(|length| response.len() >= end + 4 + length) {
                    return response;
                }
            }
        }
    };
    let response = tokio::time::timeout(WAIT, read)
        .await
        .expect("response in time");
    let response = String::from_utf8_lossy(&response).to_string();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_lowercase(), body.to_string())
}

fn upgrade_request(url: &str, headers: &[(&str, &str)]) -> Request {
    let mut request = url.into_client_request().expect("valid url");
    for (name, value) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
            HeaderValue::from_str(value).expect("valid header value"),
        );
    }
    request
}

/// Trades a JWT for a ticket at `POST /auth/ticket`; panics unless 200.
pub async fn fetch_ticket(addr: SocketAddr, token: &str) -> String {
    let bearer = format!("Bearer {token}");
    let (status, body) = http_request(
        addr,
        "POST",
        "/auth/ticket",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["expires_in"], 30);
    answer["ticket"].as_str().expect("a ticket").to_string()
}

/// The status of a refused WebSocket upgrade, with its body.
pub async fn refused_upgrade(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match tokio_tungstenite::connect_async(upgrade_request(url, headers)).await {
        Ok(_) => panic!("upgrade to {url} was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            (status, body)
        }
        Err(other) => panic!("unexpected error {other}"),
    }
}

/// A JSON WebSocket client.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
}

/// What a client saw when it stopped reading frames.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    Closed(u16),
    Dropped,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Self::connect_with(url, &[]).await
    }

    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Client {
        let request = upgrade_request(url, headers);
        // Unlimited on the client side: the server's limits are under test.
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async_with_config(request, Some(config), false),
        )
        .await
        .expect("connects in time")
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        let mut client = Client {
            ws,
            welcome: Value::Null,
        };
        client.welcome = client.recv().await;
        assert_eq!(client.welcome["type"], "welcome", "{}", client.welcome);
        client
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a frame; false once the connection is gone.
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        self.ws.send(Message::text(text)).await.is_ok()
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .expect("sends a frame");
    }

    /// The next text frame as JSON; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        match self.try_recv(WAIT).await {
            Ok(value) => value,
            Err(ending) => panic!("connection ended ({ending:?}) while a frame was expected"),
        }
    }

    /// The next text frame, or how the connection ended; panics on timeout.
    pub async fn try_recv(&mut self, wait: Duration) -> Result<Value, Ending> {
        loop {
            let next = tokio::time::timeout(wait, self.ws.next())
                .await
                .expect("a frame arrives in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Ok(serde_json::from_str(&text).expect("server sends JSON"))
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(Ending::Closed(
                        frame.map(|f| u16::from(f.code)).unwrap_or(1005),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(Ending::Dropped),
            }
        }
    }

    /// Nothing but presence events arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(next) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            match next {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).expect("server sends JSON");
                    if frame["type"] != "join" && frame["type"] != "leave" {
                        panic!("unexpected frame {text}");
                    }
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => panic!("connection ended while it should stay open"),
            }
        }
    }

    /// The next frame that is not a presence `join`/`leave` event.
    pub async fn recv_reply(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] != "join" && frame["type"] != "leave" {
                return frame;
            }
        }
    }

    /// The next frame that is neither a presence event nor of type `skip`
    /// (e.g. the sender's own copies of room messages it published).
    pub async fn recv_reply_skipping(&mut self, skip: &str) -> Value {
        loop {
            let frame = self.recv_reply().await;
            if frame["type"] != skip {
                return frame;
            }
        }
    }

    /// Reads frames until one of type `kind` arrives, skipping presence events.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let frame = self.recv_reply().await;
        assert_eq!(frame["type"], kind, "expected {kind}, got {frame}");
        frame
    }

    /// Reads until the server closes; returns the close code.
    pub async fn expect_close(&mut self) -> Ending {
        loop {
            match self.try_recv(WAIT).await {
                Ok(_) => continue,
                Err(ending) => return ending,
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        self.expect("joined").await
    }

    /// Publishes with a ref and waits for the ack; returns the message id.
    pub async fn publish(&mut self, room: &str, data: Value) -> String {
        self.send(json!({"type": "publish", "room": room, "data": data, "ref": "p"}))
            .await;
        loop {
            let frame = self.recv_reply().await;
            if frame["type"] == "ack" {
                return frame["id"].as_str().expect("ack has an id").to_string();
            }
            assert_eq!(frame["type"], "message", "unexpected {frame}");
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Reads `count` room messages (skipping everything else); returns their data.
pub async fn collect_messages(client: &mut Client, count: usize) -> Vec<Value> {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let frame = client.recv().await;
        if frame["type"] == "message" {
            seen.push(frame);
        }
    }
    seen
}

/// Mints an HS256 token.
pub fn token(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token encodes")
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A WebSocket spoken by hand, for frames no well-behaved client sends:
/// invalid UTF-8, unmasked frames, giant headers, endless fragments.
pub struct RawSocket {
    stream: TcpStream,
}

impl RawSocket {
    /// Upgrades `path` (with its query) on `addr`; panics unless 101.
    pub async fn connect(addr: SocketAddr, path: &str) -> RawSocket {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("writes");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream
                .read_exact(&mut byte)
                .await
                .expect("reads the response head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        RawSocket { stream }
    }

    /// Writes one frame; client frames are masked unless `masked` is false.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        self.send_header(fin, opcode, payload.len() as u64, masked)
            .await;
        let mask = [0x11u8, 0x22, 0x33, 0x44];
        let body: Vec<u8> = if masked {
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect()
        } else {
            payload.to_vec()
        };
        use tokio::io::AsyncWriteExt;
        let _ = self.stream.write_all(&body).await;
    }

    /// Writes only a frame header announcing `length` bytes.
    pub async fn send_header(&mut self, fin: bool, opcode: u8, length: u64, masked: bool) {
        use tokio::io::AsyncWriteExt;
        let mut header = vec![(u8::from(fin) << 7) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match length {
            0..=125 => header.push(mask_bit | length as u8),
            126..=65535 => {
                header.push(mask_bit | 126);
                header.extend_from_slice(&(length as u16).to_be_bytes());
            }
            _ => {
                header.push(mask_bit | 127);
                header.extend_from_slice(&length.to_be_bytes());
            }
        }
        if masked {
            header.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
        }
        let _ = self.stream.write_all(&header).await;
    }

    /// Reads server frames until a close frame; its code, or `None` if the
    /// connection ended without one (or it had no code).
    pub async fn close_code(&mut self) -> Option<u16> {
        let payload = self.close_payload().await?;
        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
    }

    /// Reads server frames until a close frame; its payload, or `None` if
    /// the connection ended without one.
    pub async fn close_payload(&mut self) -> Option<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let read = async {
            loop {
                let mut head = [0u8; 2];
                self.stream.read_exact(&mut head).await.ok()?;
                let opcode = head[0] & 0x0f;
                let length = match head[1] & 0x7f {
                    126 => {
                        let mut ext = [0u8; 2];
                        self.stream.read_exact(&mut ext).await.ok()?;
                        u16::from_be_bytes(ext) as usize
                    }
                    127 => {
                        let mut ext = [0u8; 8];
                        self.stream.read_exact(&mut ext).await.ok()?;
                        u64::from_be_bytes(ext) as usize
                    }
                    short => short as usize,
                };
                let mut payload = vec![0u8; length];
                self.stream.read_exact(&mut payload).await.ok()?;
                if opcode == 8 {
                    return Some(payload);
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("the server closes in time")
    }
}

/// nginx of the test's own, configured from the repository's nginx.conf
/// with loopback ports, a fresh self-signed certificate and files in a
/// temporary directory; killed (by PID) on drop.
pub struct Nginx {
    child: Child,
    pub https: SocketAddr,
    pub dir: std::path::PathBuf,
}

impl Nginx {
    /// `nodes[i]` takes the place of `node{i+1}:8080`. `read_timeout`
    /// replaces `proxy_read_timeout` for /ws when given.
    pub fn start(nodes: &[SocketAddr], read_timeout: Option<&str>) -> Nginx {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "roomcast-nginx-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // A throwaway CA and a certificate for localhost signed by it.
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .expect("writes the extensions");
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl runs (scripts/test installs it)");
            assert!(status.success(), "openssl {args:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=roomcast test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "tls.key",
            "-out",
            "tls.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
            "-out",
            "tls.crt",
        ]);
        let template = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nginx.conf"))
            .expect("nginx.conf");
        let https = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dir_text = dir.display().to_string();
        let mut config = template
            .replace(
                "worker_processes auto;",
                &format!("worker_processes 1;\npid {dir_text}/nginx.pid;\nerror_log {dir_text}/error.log;"),
            )
            .replace("worker_rlimit_nofile 65536;", "worker_rlimit_nofile 4096;")
            .replace("worker_connections 16384;", "worker_connections 2048;")
            .replace("listen 80;", &format!("listen {http};"))
            .replace("listen 443 ssl;", &format!("listen {https} ssl;"))
            .replace("/etc/nginx/certs/", &format!("{dir_text}/"))
            .replace("/var/log/nginx/access.log", &format!("{dir_text}/access.log"));
        for (n, node) in nodes.iter().enumerate() {
            config = config.replace(&format!("node{}:8080", n + 1), &node.to_string());
        }
        for n in nodes.len()..3 {
            // Fewer nodes than the template names: drop the extra upstream.
            config = config.replace(&format!("server node{}:8080 max_fails=0;", n + 1), "");
            config = config.replace(
                &format!("http://node{}:8080/", n + 1),
                "http://127.0.0.1:9/",
            );
        }
        if let Some(timeout) = read_timeout {
            config = config.replace(
                "proxy_read_timeout 75s;",
                &format!("proxy_read_timeout {timeout};"),
            );
        }
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).expect("writes the config");
        let check = Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .output()
            .expect("nginx runs (scripts/test installs it)");
        assert!(
            check.status.success(),
            "nginx -t: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(https).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nginx did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, https, dir }
    }

    pub fn wss_url(&self, query: &str) -> String {
        format!("wss://localhost:{}/ws?{query}", self.https.port())
    }

    /// A TLS client configuration that trusts this nginx's certificate.
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        let cert =
            CertificateDer::from_pem_file(self.dir.join("ca.crt")).expect("the CA certificate");
        roots.add(cert).expect("a usable certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Connects through nginx over TLS; the port resolves via 127.0.0.1.
    pub async fn connect(&self, user: &str) -> Client {
        Client::connect_tls(
            &self.wss_url(&format!("user={user}")),
            self.https,
            self.tls(),
        )
        .await
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers; SIGKILL would orphan them.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // KEEP_NGINX=1 keeps its logs and config for a look after a failure.
        if std::env::var_os("KEEP_NGINX").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Client {
    /// Connects to a `wss://` URL on `addr`, trusting `tls`'s roots.
    pub async fn connect_tls(
        url: &str,
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Client {
        Self::try_connect_tls(url, addr, tls)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
    }

    pub async fn try_connect_tls(
        url: &str,
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Client, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async_tls_with_config(
                url,
                tcp,
                Some(config),
                Some(tokio_tungstenite::Connector::Rustls(tls)),
            ),
        )
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let mut client = Client {
            ws,
            welcome: Value::Null,
        };
        client.welcome = client.recv().await;
        Ok(client)
    }
}

/// A client that behaves like the browser client: when its connection
/// ends it reconnects (exponential backoff with full jitter) and re-joins
/// each room with `since` = the last id it saw there.
pub struct ResumingClient {
    pub user: String,
    connect:
        Box<dyn Fn(String) -> futures::future::BoxFuture<'static, Result<Client, String>> + Send>,
    client: Option<Client>,
    rooms: Vec<String>,
    last_ids: HashMap<String, String>,
    /// Every message seen, per room, in arrival order.
    pub messages: HashMap<String, Vec<Value>>,
    pub reconnects: usize,
    pub unrecovered: usize,
    /// Publishes not acked yet, by key: sent again (same key, so stored once)
    /// after every reconnect.
    pending: std::collections::BTreeMap<String, Value>,
    /// Keys of acked publishes.
    pub acked: Vec<String>,
}

impl ResumingClient {
    pub async fn new(
        user: &str,
        connect: impl Fn(String) -> futures::future::BoxFuture<'static, Result<Client, String>>
            + Send
            + 'static,
    ) -> ResumingClient {
        let mut client = ResumingClient {
            user: user.to_string(),
            connect: Box::new(connect),
            client: None,
            rooms: Vec::new(),
            last_ids: HashMap::new(),
            messages: HashMap::new(),
            reconnects: 0,
            unrecovered: 0,
            pending: Default::default(),
            acked: Vec::new(),
        };
        client.reconnect().await;
        client
    }

    async fn reconnect(&mut self) {
        let mut attempt = 0u32;
        let mut last_error = String::new();
        loop {
            match (self.connect)(self.user.clone()).await {
                Ok(mut client) if client.welcome["type"] == "welcome" => {
                    for room in self.rooms.clone() {
                        let mut join = json!({"type": "join", "room": room});
                        if let Some(since) = self.last_ids.get(&room) {
                            join["since"] = json!(since);
                        }
                        if !client.try_send_text(&join.to_string()).await {
                            break;
                        }
                    }
                    for frame in self.pending.values() {
                        if !client.try_send_text(&frame.to_string()).await {
                            break;
                        }
                    }
                    self.client = Some(client);
                    return;
                }
                other => {
                    if let Err(err) = other {
                        last_error = err;
                    }
                    let ceiling = Duration::from_millis(50).saturating_mul(1 << attempt.min(6));
                    tokio::time::sleep(ceiling.mul_f64(fastrand::f64())).await;
                    attempt += 1;
                    assert!(
                        attempt < 60,
                        "{} could not reconnect: {last_error}",
                        self.user
                    );
                }
            }
        }
    }

    pub async fn join(&mut self, room: &str) {
        self.rooms.push(room.to_string());
        let client = self.client.as_mut().expect("connected");
        client.send(json!({"type": "join", "room": room})).await;
    }

    /// Publishes with an idempotency key; retried after reconnects until acked.
    pub async fn publish(&mut self, room: &str, data: Value, key: &str) {
        let frame = json!({"type": "publish", "room": room, "data": data, "key": key, "ref": key});
        self.pending.insert(key.to_string(), frame.clone());
        if let Some(client) = self.client.as_mut() {
            // A failed send is retried after the reconnect.
            let _ = client.try_send_text(&frame.to_string()).await;
        }
    }

    pub fn unacked(&self) -> usize {
        self.pending.len()
    }

    /// Handles frames until `count` messages of `room` were seen or `wait`
    /// passed without any frame; reconnects and resumes whenever the
    /// connection ends.
    pub async fn read_until(&mut self, room: &str, count: usize, wait: Duration) {
        while self.messages.get(room).map_or(0, Vec::len) < count {
            if !self.step(wait).await {
                return;
            }
        }
    }

    /// Handles one frame (or a reconnect); false when `wait` passed first.
    pub async fn step(&mut self, wait: Duration) -> bool {
        let client = self.client.as_mut().expect("connected");
        match tokio::time::timeout(wait, client.ws.next()).await {
            Err(_) => false,
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON");
                match frame["type"].as_str() {
                    Some("message") => {
                        let room = frame["room"].as_str().unwrap_or_default().to_string();
                        if let Some(id) = frame["id"].as_str() {
                            self.last_ids.insert(room.clone(), id.to_string());
                        }
                        self.messages.entry(room).or_default().push(frame);
                    }
                    Some("ack") => {
                        if let Some(key) = frame["ref"].as_str() {
                            if self.pending.remove(key).is_some() {
                                self.acked.push(key.to_string());
                            }
                        }
                    }
                    Some("joined") if frame["recovered"] == false => self.unrecovered += 1,
                    _ => {}
                }
                true
            }
            Ok(Some(Ok(_))) => true,
            Ok(Some(Err(_))) | Ok(None) => {
                self.client = None;
                self.reconnects += 1;
                self.reconnect().await;
                true
            }
        }
    }
}
