//! A running node: wires configuration, broker, hub, auth and HTTP together,
//! runs the broker listener task, and drains gracefully on shutdown.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::auth::{Authenticator, KeyError, TokenRules};
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisServers, RedisSettings};
use crate::broker::{Broker, BrokerError, BrokerState, Delivery};
use crate::config::{Config, ConfigError};
use crate::hub::{CloseReason, Dispatcher, Hub};
use crate::limits::{ConnectionCounts, IpNet, KeyedRate, TokenBucket};
use crate::stats::Stats;
use jsonwebtoken::{Algorithm, DecodingKey};

/// How often a node shares its stats snapshot (the dashboard's tick), and
/// how long a snapshot counts when no newer one comes.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
const STATS_TTL: Duration = Duration::from_secs(5);

/// What the HTTP handlers and sessions of a node share.
pub struct NodeState {
    pub config: Config,
    pub node_id: Arc<str>,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub auth: Authenticator,
    pub stats: Arc<Stats>,
    pub sessions: SessionCount,
    /// Admission limits at the upgrade.
    pub connections_per_user: Arc<ConnectionCounts<Arc<str>>>,
    pub connections_per_ip: Arc<ConnectionCounts<IpAddr>>,
    pub upgrades: std::sync::Mutex<TokenBucket>,
    /// `POST /auth/ticket` per user: one user cannot fill the ticket store.
    pub tickets_per_user: KeyedRate,
    /// Upgrades per user: one user reconnecting in a loop cannot spend the
    /// node's `UPGRADE_RATE`.
    pub upgrades_per_user: KeyedRate,
    pub trusted_proxies: Vec<IpNet>,
    draining: AtomicBool,
    next_conn: AtomicU64,
}

impl NodeState {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ready for traffic: not draining and the broker is up.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.state() == BrokerState::Up
    }
}

/// Live sessions, so a drain knows when every socket is gone.
#[derive(Default)]
pub struct SessionCount {
    live: AtomicUsize,
    idle: Notify,
}

pub struct SessionGuard<'a>(&'a SessionCount);

impl SessionCount {
    pub fn enter(&self) -> SessionGuard<'_> {
        self.live.fetch_add(1, Ordering::AcqRel);
        SessionGuard(self)
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.live() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// A started node. Dropping it does not stop it; call [`Node::shutdown`].
pub struct Node {
    state: Arc<NodeState>,
    addr: SocketAddr,
    stop_server: oneshot::Sender<()>,
    server: JoinHandle<()>,
    listener: JoinHandle<()>,
    stats_sharer: JoinHandle<()>,
}

impl Node {
    /// Binds the listener and starts serving.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        let config = config.without_empty_entries();
        config.validate()?;
        let listener = listen(config.bind).map_err(|e| NodeError::Bind(config.bind, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| NodeError::Bind(config.bind, e))?;
        let stats = Arc::new(Stats::new());
        let node_id: Arc<str> = config.node_name().into();
        let servers = match (&config.redis_url, config.redis_cluster_urls.is_empty()) {
            (Some(url), _) => Some(RedisServers::One(url.clone())),
            (None, false) => Some(RedisServers::Cluster(config.redis_cluster_urls.clone())),
            (None, true) => None,
        };
        let (broker, incoming): (Arc<dyn Broker>, mpsc::UnboundedReceiver<Delivery>) = match servers
        {
            Some(servers) => {
                let (redis, incoming) = RedisBroker::start(RedisSettings {
                    servers,
                    prefix: config.redis_prefix.clone(),
                    node_id: node_id.to_string(),
                    history_size: config.history_size,
                    history_ttl: config.history_ttl,
                    node_ttl: config.node_ttl,
                })
                .await?;
                (redis, incoming)
            }
            None => {
                let (memory, incoming) = MemoryBroker::start(
                    config.history_size,
                    config.history_ttl,
                    config.history_max_bytes,
                );
                (memory, incoming)
            }
        };
        let hub = Arc::new(Hub::new(broker.clone(), stats.clone()));
        let listener_task =
            tokio::spawn(Dispatcher::new(hub.clone(), config.write_delay).run(incoming));

        let rules = TokenRules {
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            leeway: config.jwt_leeway,
        };
        let auth = match (&config.jwt_secret, &config.jwt_public_key) {
            (Some(secret), _) => Authenticator::jwt(
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
                &rules,
            ),
            (None, Some(path)) => Authenticator::from_public_key_file(path, &rules)?,
            (None, None) => {
                tracing::warn!(
                    bind = %addr,
                    "dev mode: no JWT_SECRET, so anybody may connect as any user (?user=name) with every permission"
                );
                Authenticator::Dev
            }
        };
        let state = Arc::new(NodeState {
            node_id,
            hub,
            broker,
            auth,
            stats,
            sessions: SessionCount::default(),
            connections_per_user: ConnectionCounts::new(config.max_connections_per_user),
            connections_per_ip: ConnectionCounts::new(config.max_connections_per_ip),
            upgrades: std::sync::Mutex::new(TokenBucket::new(
                config.upgrade_rate,
                // At least one whole upgrade, however low the rate.
                (config.upgrade_rate * 2.0).max(1.0),
            )),
            tickets_per_user: KeyedRate::new(TICKETS_PER_USER_RATE, TICKETS_PER_USER_BURST),
            upgrades_per_user: KeyedRate::new(
                config.upgrade_rate_per_user,
                // Many tabs reconnecting at once; at least one whole upgrade.
                (config.upgrade_rate_per_user * 10.0).max(1.0),
            ),
            trusted_proxies: config
                .trusted_proxies
                .iter()
                .filter_map(|p| IpNet::parse(p))
                .collect(),
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            config,
        });
        let app = crate::http::router(state.clone());
        let (stop_server, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(
            listener,
            app,
            HttpTimeouts {
                header: state.config.http_header_timeout,
                connection: state.config.http_connection_timeout,
            },
            stopped,
        ));
        let stats_sharer = tokio::spawn(share_stats(state.clone()));
        tracing::info!(node = %state.node_id, %addr, broker = state.broker.kind(), "node started");
        Ok(Node {
            state,
            addr,
            stop_server,
            server,
            listener: listener_task,
            stats_sharer,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    /// Drains the node: `/readyz` turns 503 and upgrades are refused, every
    /// client is closed with 1012 at a moment spread over `DRAIN_TIMEOUT`
    /// (so they do not all reconnect at once), then the server stops.
    pub async fn shutdown(self) {
        let state = &self.state;
        state.draining.store(true, Ordering::Release);
        let started = Instant::now();
        let window = state.config.drain_timeout;
        let mut mailboxes = state.hub.mailboxes();
        fastrand::shuffle(&mut mailboxes);
        tracing::info!(
            connections = mailboxes.len(),
            window_ms = window.as_millis() as u64,
            "draining"
        );
        let count = mailboxes.len() as u32;
        for (i, mailbox) in mailboxes.iter().enumerate() {
            let at = started + window.mul_f64(0.9) * i as u32 / count.max(1);
            tokio::time::sleep_until(at).await;
            mailbox.close().close(CloseReason::DRAINING);
        }
        let deadline = started + window + crate::session::CLOSE_GRACE + Duration::from_secs(1);
        if tokio::time::timeout_at(deadline, state.sessions.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                live = state.sessions.live(),
                "drain timeout: dropping remaining sockets"
            );
        }
        let _ = self.stop_server.send(());
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        self.listener.abort();
        self.stats_sharer.abort();
        tracing::info!(node = %state.node_id, "stopped");
    }
}

/// Serves HTTP/1 on `listener` until `stopped`, then lets every connection
/// finish its request. Like `axum::serve`, but each connection is hyper's
/// HTTP/1 connection over the bare `TcpStream`: a WebSocket upgrade then
/// hands the session that very `TcpStream` (axum's server wraps it in a
/// private type that cannot be unwrapped), which the fan-out writes to.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    timeouts: HttpTimeouts,
    mut stopped: oneshot::Receiver<()>,
) {
    let HttpTimeouts {
        header: header_timeout,
        connection: connection_timeout,
    } = timeouts;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout((!header_timeout.is_zero()).then_some(header_timeout));
    let (closing, closing_seen) = tokio::sync::watch::channel(());
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // Out of file descriptors, typically: wait for some to close.
                tracing::error!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // No Nagle: a frame written while an earlier one is unacknowledged
        // would otherwise wait for the peer's delayed ACK (up to 40 ms).
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "TCP_NODELAY not set");
        }
        let service = app.clone().map_request(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request.map(axum::body::Body::new)
            },
        );
        let service = hyper_util::service::TowerToHyperService::new(service);
        let mut closing_seen = closing_seen.clone();
        let connection = http
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        tokio::spawn(async move {
            tokio::pin!(connection);
            // Ends once the connection is upgraded: the session lives on.
            let lifetime = async {
                if connection_timeout.is_zero() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(connection_timeout).await;
            };
            let outcome = tokio::select! {
                outcome = connection.as_mut() => Some(outcome),
                _ = closing_seen.changed() => None,
                () = lifetime => None,
            };
            let outcome = match outcome {
                Some(outcome) => outcome,
                None => {
                    // After the response under way, if the client takes it.
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(crate::session::CLOSE_GRACE, connection).await {
                        Ok(outcome) => outcome,
                        Err(_) => return,
                    }
                }
            };
            if let Err(err) = outcome {
                tracing::trace!(error = %err, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = closing.send(());
    // Every connection holds a receiver until it is done.
    closing.closed().await;
}

/// How long an HTTP connection may take: to send a request head, and in all
/// before it is upgraded (0: no limit).
struct HttpTimeouts {
    header: Duration,
    connection: Duration,
}

fn is_connection_error(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Tickets a user may take per second on a node, and in a burst: a browser
/// needs one per connection.
const TICKETS_PER_USER_RATE: f64 = 5.0;
const TICKETS_PER_USER_BURST: f64 = 20.0;

/// Pending connections the kernel queues before `accept`. std's 128 overflows
/// in a reconnect storm (each overflow is a client retrying a second later);
/// the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(bind: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if bind.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(bind)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Every [`STATS_INTERVAL`]: closes the latency window and shares this
/// node's snapshot through the broker, for `/stats?scope=cluster`.
async fn share_stats(state: Arc<NodeState>) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.stats.roll_latency_window();
        let snapshot = crate::http::monitoring::snapshot(&state);
        let Ok(text) = serde_json::to_string(&snapshot) else {
            continue;
        };
        if let Err(err) = state
            .broker
            .put_node_stats(&state.node_id, text, STATS_TTL)
            .await
        {
            tracing::debug!(error = %err, "sharing stats failed");
        }
    }
}
