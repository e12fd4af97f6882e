//! One subscriber connection to one Redis server, spoken directly (RESP2).
//!
//! Client libraries keep pub/sub state out of sight; this node needs to see
//! it: when a subscription is confirmed (a join reads history only after
//! that), and when a Redis Cluster node drops a subscription on its own (an
//! unrequested `sunsubscribe` once the channel's slot has moved away), which
//! redis-rs 1.8 folds into its own bookkeeping without telling. A subscriber
//! connection carries nothing but (un)subscribe requests, pings and pushed
//! messages, so the part of the protocol needed here is small: confirmations
//! are matched to requests by order and by channel name, and anything else
//! ends the connection (the broker then subscribes again elsewhere).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use futures::future::{BoxFuture, FutureExt};
use redis::{ConnectionAddr, IntoConnectionInfo};
use tokio::io::BufReader;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};
use tokio::sync::oneshot;

/// Which pub/sub commands a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// SUBSCRIBE and PUBLISH: one Redis.
    Classic,
    /// SSUBSCRIBE and SPUBLISH: Redis Cluster, where a channel lives on the
    /// shard that owns its slot and never crosses the cluster bus.
    Sharded,
}

impl Flavor {
    pub fn publish(self) -> &'static str {
        match self {
            Flavor::Classic => "PUBLISH",
            Flavor::Sharded => "SPUBLISH",
        }
    }

    fn subscribe(self) -> &'static str {
        match self {
            Flavor::Classic => "SUBSCRIBE",
            Flavor::Sharded => "SSUBSCRIBE",
        }
    }

    fn unsubscribe(self) -> &'static str {
        match self {
            Flavor::Classic => "UNSUBSCRIBE",
            Flavor::Sharded => "SUNSUBSCRIBE",
        }
    }

    /// The kinds of pushed arrays: (message, subscribed, unsubscribed).
    fn kinds(self) -> (&'static [u8], &'static [u8], &'static [u8]) {
        match self {
            Flavor::Classic => (b"message", b"subscribe", b"unsubscribe"),
            Flavor::Sharded => (b"smessage", b"ssubscribe", b"sunsubscribe"),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("connection: {0}")]
    Io(String),
    #[error("Redis refused: {0}")]
    Server(String),
    #[error("unexpected reply on the subscriber connection: {0}")]
    Protocol(String),
    #[error("the subscriber connection is closed")]
    Closed,
    #[error("{0} is not a master (any more)")]
    NotMaster(String),
}

impl LinkError {
    /// The slot and `host:port` of a `MOVED` redirection: the channel lives
    /// on another Cluster node.
    pub fn moved(&self) -> Option<(u16, &str)> {
        let LinkError::Server(message) = self else {
            return None;
        };
        let mut words = message.split(' ');
        if words.next()? != "MOVED" {
            return None;
        }
        let slot = words.next()?.parse().ok()?;
        Some((slot, words.next()?))
    }
}

/// Where a subscriber connects, and how it logs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub target: Target,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl Endpoint {
    /// From a `redis://` (or `redis+unix://`) URL.
    pub fn from_url(url: &str) -> Result<Endpoint, String> {
        let info = url.into_connection_info().map_err(|e| e.to_string())?;
        let target = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Target::Tcp {
                host: host.clone(),
                port: *port,
            },
            ConnectionAddr::Unix(path) => Target::Unix(path.clone()),
            _ => return Err("TLS (rediss://) is not built into this server".into()),
        };
        let settings = info.redis_settings();
        Ok(Endpoint {
            target,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
        })
    }

    /// The same credentials at `address` (`host:port`, the way Redis Cluster
    /// names its nodes).
    pub fn at(&self, address: &str) -> Option<Endpoint> {
        let (host, port) = address.rsplit_once(':')?;
        Some(Endpoint {
            target: Target::Tcp {
                host: host.trim_start_matches('[').trim_end_matches(']').into(),
                port: port.parse().ok()?,
            },
            username: self.username.clone(),
            password: self.password.clone(),
        })
    }

    /// `host:port`, or the socket's path: the server's name in maps and logs.
    pub fn address(&self) -> String {
        match &self.target {
            Target::Tcp { host, port } => format!("{host}:{port}"),
            Target::Unix(path) => path.display().to_string(),
        }
    }
}

/// What the server pushed that is not a reply to this node's requests.
#[derive(Debug)]
pub enum Pushed {
    /// The channel's name is checked to be UTF-8.
    Message { channel: Bytes, payload: Bytes },
    /// The server ended a subscription nobody asked it to end: the channel's
    /// Cluster slot moved to another node (or this one stopped serving it).
    Dropped(String),
}

/// What a request waits for.
#[derive(Debug)]
enum Expect {
    Subscribed(String),
    Unsubscribed(String),
    Pong,
}

struct Pending {
    expect: Expect,
    reply: oneshot::Sender<Result<(), LinkError>>,
}

/// Requests in flight, in the order they were written; shared by the sending
/// side and the reader. `closed` is set (under the same lock) once the
/// reader is gone, so no request waits for a reply that cannot come.
#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    closed: bool,
}

type Shared = Arc<Mutex<Queue>>;

fn lock(queue: &Shared) -> MutexGuard<'_, Queue> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fail_all(queue: &Shared, error: &LinkError) {
    let mut queue = lock(queue);
    queue.closed = true;
    for pending in queue.pending.drain(..) {
        let _ = pending.reply.send(Err(error.clone()));
    }
}

/// The sending side of a subscriber connection.
pub struct Link {
    flavor: Flavor,
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    queue: Shared,
}

/// The receiving side: yields pushed messages, completes requests.
pub struct Reader {
    flavor: Flavor,
    input: BufReader<Box<dyn AsyncRead + Send + Unpin>>,
    queue: Shared,
}

/// Connects and logs in, within `wait`.
pub async fn connect(
    endpoint: &Endpoint,
    flavor: Flavor,
    wait: Duration,
) -> Result<(Link, Reader), LinkError> {
    let connecting = async {
        let (input, mut output): (
            Box<dyn AsyncRead + Send + Unpin>,
            Box<dyn AsyncWrite + Send + Unpin>,
        ) = match &endpoint.target {
            Target::Tcp { host, port } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| LinkError::Connect(format!("{}: {e}", endpoint.address())))?;
                // Requests are small and someone waits for each.
                let _ = stream.set_nodelay(true);
                let (read, write) = stream.into_split();
                (Box::new(read), Box::new(write))
            }
            Target::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| LinkError::Connect(format!("{}: {e}", endpoint.address())))?;
                let (read, write) = stream.into_split();
                (Box::new(read), Box::new(write))
            }
        };
        let mut input = BufReader::with_capacity(64 * 1024, input);
        if let Some(password) = &endpoint.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = &endpoint.username {
                auth.arg(username);
            }
            auth.arg(password);
            output
                .write_all(&auth.get_packed_command())
                .await
                .map_err(io)?;
            match read_value(&mut input).await? {
                Resp::Simple(_) => {}
                Resp::Error(message) => return Err(LinkError::Server(message)),
                other => return Err(LinkError::Protocol(format!("AUTH answered {other:?}"))),
            }
        }
        if flavor == Flavor::Sharded {
            // A replica accepts SSUBSCRIBE for its shard's slots without a
            // MOVED, but a demoted master gets its new master's messages
            // only once the Cluster has told both: subscribe on masters only.
            output
                .write_all(&redis::cmd("ROLE").get_packed_command())
                .await
                .map_err(io)?;
            match read_value(&mut input).await? {
                Resp::Array(role)
                    if role.first() == Some(&Resp::Bulk(Bytes::from_static(b"master"))) => {}
                Resp::Error(message) => return Err(LinkError::Server(message)),
                _ => return Err(LinkError::NotMaster(endpoint.address())),
            }
        }
        let queue = Shared::default();
        Ok((
            Link {
                flavor,
                writer: tokio::sync::Mutex::new(output),
                queue: queue.clone(),
            },
            Reader {
                flavor,
                input,
                queue,
            },
        ))
    };
    tokio::time::timeout(wait, connecting)
        .await
        .map_err(|_| LinkError::Connect(format!("{}: timed out", endpoint.address())))?
}

fn io(err: std::io::Error) -> LinkError {
    LinkError::Io(err.to_string())
}

impl Link {
    /// Subscribes to each channel (one command each, written at once: with a
    /// Cluster, channels of different slots may not share a command); one
    /// result per channel, in order.
    pub async fn subscribe(&self, channels: &[String]) -> Vec<Result<(), LinkError>> {
        let requests = channels
            .iter()
            .map(|channel| {
                (
                    redis::cmd(self.flavor.subscribe())
                        .arg(channel)
                        .get_packed_command(),
                    Expect::Subscribed(channel.clone()),
                )
            })
            .collect();
        let replies = self.request(requests).await;
        futures::future::join_all(
            replies
                .into_iter()
                .map(|reply| async { reply.await.unwrap_or(Err(LinkError::Closed)) }),
        )
        .await
    }

    pub async fn unsubscribe(&self, channel: &str) -> Result<(), LinkError> {
        let command = redis::cmd(self.flavor.unsubscribe())
            .arg(channel)
            .get_packed_command();
        self.one(command, Expect::Unsubscribed(channel.to_string()))
            .await
    }

    pub async fn ping(&self) -> Result<(), LinkError> {
        self.one(redis::cmd("PING").get_packed_command(), Expect::Pong)
            .await
    }

    async fn one(&self, command: Vec<u8>, expect: Expect) -> Result<(), LinkError> {
        let mut replies = self.request(vec![(command, expect)]).await;
        match replies.pop() {
            Some(reply) => reply.await.unwrap_or(Err(LinkError::Closed)),
            None => Err(LinkError::Closed),
        }
    }

    /// Writes the commands and queues what each waits for, in one step: the
    /// writer lock keeps the queue in the order of the bytes on the wire.
    async fn request(
        &self,
        requests: Vec<(Vec<u8>, Expect)>,
    ) -> Vec<oneshot::Receiver<Result<(), LinkError>>> {
        let mut writer = self.writer.lock().await;
        let mut bytes = Vec::new();
        let mut replies = Vec::with_capacity(requests.len());
        {
            let mut queue = lock(&self.queue);
            for (command, expect) in requests {
                let (reply, receiver) = oneshot::channel();
                if queue.closed {
                    let _ = reply.send(Err(LinkError::Closed));
                } else {
                    bytes.extend_from_slice(&command);
                    queue.pending.push_back(Pending { expect, reply });
                }
                replies.push(receiver);
            }
        }
        if !bytes.is_empty() {
            let written = async {
                writer.write_all(&bytes).await?;
                writer.flush().await
            };
            if let Err(err) = written.await {
                fail_all(&self.queue, &io(err));
            }
        }
        replies
    }
}

impl Reader {
    /// The next pushed message or dropped subscription; replies to requests
    /// are handed to their waiters on the way. An error ends the connection
    /// and fails every request still waiting.
    pub async fn next(&mut self) -> Result<Pushed, LinkError> {
        loop {
            let handled = match read_value(&mut self.input).await {
                Ok(value) => self.handle(value),
                Err(err) => Err(err),
            };
            match handled {
                Ok(Some(pushed)) => return Ok(pushed),
                Ok(None) => {}
                Err(err) => {
                    fail_all(&self.queue, &err);
                    return Err(err);
                }
            }
        }
    }

    fn handle(&mut self, value: Resp) -> Result<Option<Pushed>, LinkError> {
        let (message, subscribed, unsubscribed) = self.flavor.kinds();
        match value {
            Resp::Array(items) => {
                let mut items = items.into_iter();
                let kind = match items.next() {
                    Some(Resp::Bulk(kind)) => kind,
                    other => return Err(LinkError::Protocol(format!("push kind {other:?}"))),
                };
                if kind.eq_ignore_ascii_case(b"pong") {
                    return self.complete(|expect| matches!(expect, Expect::Pong));
                }
                let name = match items.next() {
                    Some(Resp::Bulk(name)) => name,
                    other => return Err(LinkError::Protocol(format!("channel {other:?}"))),
                };
                let Ok(channel) = std::str::from_utf8(&name) else {
                    return Err(LinkError::Protocol("a channel name is not UTF-8".into()));
                };
                if kind == message {
                    let Some(Resp::Bulk(payload)) = items.next() else {
                        return Err(LinkError::Protocol("a message without payload".into()));
                    };
                    // Most pushes are messages: no copy of the name for them.
                    return Ok(Some(Pushed::Message {
                        channel: name.clone(),
                        payload,
                    }));
                }
                let channel = channel.to_string();
                if kind == subscribed {
                    self.complete(|expect| matches!(expect, Expect::Subscribed(c) if *c == channel))
                } else if kind == unsubscribed {
                    let requested = matches!(
                        lock(&self.queue).pending.front(),
                        Some(Pending { expect: Expect::Unsubscribed(c), .. }) if *c == channel
                    );
                    if requested {
                        self.complete(|_| true)
                    } else {
                        Ok(Some(Pushed::Dropped(channel)))
                    }
                } else {
                    Err(LinkError::Protocol(format!(
                        "push {:?}",
                        String::from_utf8_lossy(&kind)
                    )))
                }
            }
            // PING outside subscribed mode (no channel left on the connection).
            Resp::Simple(text) if text.eq_ignore_ascii_case("PONG") => {
                self.complete(|expect| matches!(expect, Expect::Pong))
            }
            // A refused request (MOVED, CROSSSLOT, NOPERM…): its waiter learns why.
            Resp::Error(message) => match lock(&self.queue).pending.pop_front() {
                Some(pending) => {
                    let _ = pending.reply.send(Err(LinkError::Server(message)));
                    Ok(None)
                }
                None => Err(LinkError::Server(message)),
            },
            other => Err(LinkError::Protocol(format!("{other:?}"))),
        }
    }

    /// Completes the oldest request, which must be the one `fits` this reply.
    fn complete(
        &mut self,
        fits: impl FnOnce(&Expect) -> bool,
    ) -> Result<Option<Pushed>, LinkError> {
        let mut queue = lock(&self.queue);
        match queue.pending.pop_front() {
            Some(pending) if fits(&pending.expect) => {
                let _ = pending.reply.send(Ok(()));
                Ok(None)
            }
            other => Err(LinkError::Protocol(format!(
                "a confirmation for {:?}",
                other.map(|p| p.expect)
            ))),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Nobody reads replies any more: no request may wait for one.
        fail_all(&self.queue, &LinkError::Closed);
    }
}

/// A RESP2 value.
#[derive(Debug, PartialEq)]
enum Resp {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Bytes),
    Nil,
    Array(Vec<Resp>),
}

/// Redis's own limit on a bulk string (`proto-max-bulk-len`).
const MAX_BULK: usize = 512 * 1024 * 1024;

fn read_value<'a, R>(input: &'a mut R) -> BoxFuture<'a, Result<Resp, LinkError>>
where
    R: AsyncBufRead + Unpin + Send,
{
    async move {
        let mut line = Vec::new();
        let read = input.read_until(b'\n', &mut line).await.map_err(io)?;
        if read == 0 {
            return Err(LinkError::Io("Redis closed the connection".into()));
        }
        let Some(body) = line.strip_suffix(b"\r\n") else {
            return Err(LinkError::Protocol("a line without CRLF".into()));
        };
        let Some((&kind, rest)) = body.split_first() else {
            return Err(LinkError::Protocol("an empty line".into()));
        };
        let text = || String::from_utf8_lossy(rest).into_owned();
        let length = || -> Result<i64, LinkError> {
            std::str::from_utf8(rest)
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| LinkError::Protocol(format!("a bad length {:?}", text())))
        };
        match kind {
            b'+' => Ok(Resp::Simple(text())),
            b'-' => Ok(Resp::Error(text())),
            b':' => Ok(Resp::Integer(length()?)),
            b'$' => {
                let Ok(size) = usize::try_from(length()?) else {
                    return Ok(Resp::Nil);
                };
                if size > MAX_BULK {
                    return Err(LinkError::Protocol(format!(
                        "a bulk string of {size} bytes"
                    )));
                }
                let mut bulk = vec![0; size + 2];
                input.read_exact(&mut bulk).await.map_err(io)?;
                if !bulk.ends_with(b"\r\n") {
                    return Err(LinkError::Protocol("a bulk string without CRLF".into()));
                }
                bulk.truncate(size);
                Ok(Resp::Bulk(Bytes::from(bulk)))
            }
            b'*' => {
                let Ok(count) = usize::try_from(length()?) else {
                    return Ok(Resp::Nil);
                };
                let mut items = Vec::with_capacity(count.min(16));
                for _ in 0..count {
                    items.push(read_value(input).await?);
                }
                Ok(Resp::Array(items))
            }
            other => Err(LinkError::Protocol(format!("type byte {other:#x}"))),
        }
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Resp, LinkError> {
        let mut input = BufReader::new(bytes);
        read_value(&mut input).await
    }

    #[tokio::test]
    async fn resp_values_parse_and_damaged_ones_are_refused() {
        assert_eq!(parse(b"+OK\r\n").await.unwrap(), Resp::Simple("OK".into()));
        assert_eq!(parse(b":12\r\n").await.unwrap(), Resp::Integer(12));
        assert_eq!(parse(b"$-1\r\n").await.unwrap(), Resp::Nil);
        assert_eq!(
            parse(b"*3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$5\r\na\r\nb!\r\n")
                .await
                .unwrap(),
            Resp::Array(vec![
                Resp::Bulk(Bytes::from_static(b"smessage")),
                Resp::Bulk(Bytes::from_static(b"c")),
                Resp::Bulk(Bytes::from_static(b"a\r\nb!")),
            ])
        );
        assert!(matches!(
            parse(b"$3\r\nabcde").await,
            Err(LinkError::Protocol(_))
        ));
        assert!(matches!(parse(b"+OK\n").await, Err(LinkError::Protocol(_))));
        assert!(matches!(parse(b"?\r\n").await, Err(LinkError::Protocol(_))));
        assert!(matches!(parse(b"").await, Err(LinkError::Io(_))));
    }

    #[test]
    fn a_moved_refusal_names_the_slot_and_the_new_owner() {
        let moved = LinkError::Server("MOVED 3999 127.0.0.1:6381".into());
        assert_eq!(moved.moved(), Some((3999, "127.0.0.1:6381")));
        assert_eq!(LinkError::Server("CROSSSLOT".into()).moved(), None);
        assert_eq!(LinkError::Closed.moved(), None);
    }

    #[test]
    fn endpoints_keep_their_credentials_on_other_cluster_nodes() {
        let seed = Endpoint::from_url("redis://user:secret@10.0.0.1:7000").unwrap();
        assert_eq!(seed.address(), "10.0.0.1:7000");
        let other = seed.at("10.0.0.2:7001").unwrap();
        assert_eq!(other.address(), "10.0.0.2:7001");
        assert_eq!(other.username.as_deref(), Some("user"));
        assert_eq!(other.password.as_deref(), Some("secret"));
        assert!(seed.at("no-port").is_none());
        assert!(Endpoint::from_url("redis+unix:///tmp/redis.sock").is_ok());
    }
}
