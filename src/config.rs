//! Every knob of a node: a CLI flag and an environment variable each, with
//! the defaults documented in `--help` and the README.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A horizontally scalable WebSocket broadcast server.
///
/// Clients connect to /ws and exchange JSON frames (protocol v1, see
/// docs/PROTOCOL.md): rooms with history and resume, direct messages to a
/// user, broadcast to everybody, presence. Without JWT_SECRET the node runs
/// in dev mode: anybody may connect as any user (`/ws?user=alice`).
/// Durations take a unit: 500ms, 25s, 10m, 1h.
#[derive(Debug, Clone, Parser)]
#[command(name = "roomcast", version, max_term_width = 100)]
pub struct Config {
    /// Address and port to listen on.
    #[arg(long, env = "BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// This node's name, shown in `welcome` and /stats [default: <hostname>-<pid>].
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,

    /// Redis URL (e.g. redis://127.0.0.1:6379): makes this node one of many sharing
    /// that Redis. Unset: one node with an in-process broker and in-memory history.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Redis Cluster seed nodes, comma-separated (e.g.
    /// redis://10.0.0.1:6379,redis://10.0.0.2:6379): like REDIS_URL, on a Redis Cluster
    /// (≥ 7.0) whose shards share the traffic; rooms and users use sharded pub/sub. Not
    /// together with REDIS_URL.
    #[arg(
        long,
        env = "REDIS_CLUSTER_URLS",
        hide_env_values = true,
        value_delimiter = ',',
        conflicts_with = "redis_url"
    )]
    pub redis_cluster_urls: Vec<String>,

    /// Prefix of every Redis key and channel, so deployments can share a Redis.
    #[arg(long, env = "REDIS_PREFIX", default_value = "roomcast")]
    pub redis_prefix: String,

    /// With Redis: a node silent for this long (crashed) drops out of presence.
    #[arg(long, env = "NODE_TTL", default_value = "15s", value_parser = parse_duration)]
    pub node_ttl: Duration,

    /// HS256 secret: when set, every connection needs a JWT whose `sub` is the user.
    /// Unset: dev mode (no auth, every permission granted).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with an RSA or EC public key: tokens are then RS256 or ES256 (instead of
    /// HS256 with JWT_SECRET; set one of the two).
    #[arg(long, env = "JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// Required `aud` claim, when set.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim, when set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Clock skew tolerated when checking a token's `exp`, at connect and on live sessions.
    #[arg(long, env = "JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// Allow dev mode (no JWT_SECRET) on a non-loopback address.
    #[arg(long, env = "INSECURE")]
    pub insecure: bool,

    /// Largest frame a client may send, in bytes; larger ones close the connection with 1009.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Outbound queue per connection, in messages (a join's catch-up comes on top); a client that
    /// lets it fill is closed with 4008.
    #[arg(long, env = "CLIENT_QUEUE", default_value_t = 1024)]
    pub client_queue: usize,

    /// A room whose frames were written less than this long ago holds its
    /// next frames until this much time has passed since, then writes them
    /// all with one write per connection: busy rooms share one syscall among
    /// many frames (3 ms cut CPU per delivery from 4.2 to 1.2 µs at 2,000
    /// frames per second), quiet ones are still written at once. A frame
    /// waits at most this long (plus the timer's 1 ms resolution); other
    /// frames for a connection with held frames queue behind them. 0 (the
    /// default) writes every frame at once.
    #[arg(long, env = "WRITE_DELAY", default_value = "0ms", value_parser = parse_duration)]
    pub write_delay: Duration,

    /// An HTTP connection must send a complete request head within this
    /// long of connecting, or of its previous response (an idle keep-alive
    /// connection), or it is closed: sockets that never finish a request
    /// cannot pile up to the file limit. A `POST /api/publish` body must
    /// arrive within it too. 0 disables it.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// An HTTP connection not upgraded to a WebSocket is closed this long after
    /// it opened (after the response under way, or at once if the client does
    /// not take that within 3 s): a client that never reads its responses
    /// cannot hold a socket forever. WebSocket sessions are not affected. 0
    /// disables it.
    #[arg(long, env = "HTTP_CONNECTION_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub http_connection_timeout: Duration,

    /// Interval of WebSocket pings; a peer silent for two intervals is disconnected.
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Messages kept per room for resume and backlog.
    #[arg(long, env = "HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,

    /// Embedded mode: bytes of history kept in memory over all rooms (messages,
    /// idempotency keys and their bookkeeping); past it the rooms
    /// silent the longest are dropped (their resumes say recovered:false). With Redis,
    /// bound the streams with Redis's own maxmemory instead.
    #[arg(long, env = "HISTORY_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub history_max_bytes: usize,

    /// A room's history (and its idempotency keys) is dropped after this long without a message.
    #[arg(long, env = "HISTORY_TTL", default_value = "1h", value_parser = parse_duration)]
    pub history_ttl: Duration,

    /// Frames per second a connection may send (token bucket refill rate).
    #[arg(long, env = "RATE_LIMIT", default_value_t = 50.0)]
    pub rate_limit: f64,

    /// Token bucket size: frames a connection may send in a burst. This many refused
    /// frames in a row close the connection with 4029.
    #[arg(long, env = "RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,

    /// Rooms one connection may be in at once.
    #[arg(long, env = "MAX_ROOMS_PER_CONNECTION", default_value_t = 100)]
    pub max_rooms_per_connection: usize,

    /// Connections one user may hold on this node; more get HTTP 429.
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: usize,

    /// Connections one client IP may hold on this node; more get HTTP 429.
    #[arg(long, env = "MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    pub max_connections_per_ip: usize,

    /// WebSocket upgrades per second this node admits (token bucket, bursts of twice
    /// this); beyond it, HTTP 503 with Retry-After, so a reconnect storm is paced.
    #[arg(long, env = "UPGRADE_RATE", default_value_t = 1000.0)]
    pub upgrade_rate: f64,

    /// WebSocket upgrades per second one user may make on this node (bursts of ten
    /// times this, e.g. many tabs reconnecting at once); beyond it, HTTP 429 with
    /// Retry-After, so one user reconnecting in a loop cannot spend UPGRADE_RATE.
    #[arg(long, env = "UPGRADE_RATE_PER_USER", default_value_t = 5.0)]
    pub upgrade_rate_per_user: f64,

    /// Comma-separated proxy addresses or CIDRs (e.g. 127.0.0.1,10.0.0.0/8) whose
    /// X-Forwarded-For names the client IP. Others' X-Forwarded-For is ignored.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Comma-separated API keys for POST /api/publish. Empty: the API is off (404).
    #[arg(long, env = "API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,

    /// Comma-separated browser origins allowed to connect (e.g. https://app.example.com),
    /// or `*`. Empty: any. Requests without an Origin header (not browsers) are always allowed.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,roomcast=debug`).
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// On SIGTERM/SIGINT, clients are closed with 1012 spread over this window, then the node exits.
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Print a token for testing, signed with JWT_SECRET (and JWT_AUDIENCE / JWT_ISSUER if set).
    Token(TokenArgs),
    /// Exit 0 if the node at BIND answers GET /healthz with 200 (for container health checks).
    Healthcheck,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The user (`sub`).
    #[arg(long)]
    pub user: String,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Comma-separated room patterns the user may join and publish to (e.g. 'chat:*'); default: all.
    #[arg(long, value_delimiter = ',')]
    pub rooms: Vec<String>,
    /// Allow `broadcast`.
    #[arg(long)]
    pub broadcast: bool,
    /// Forbid publishing and direct messages.
    #[arg(long)]
    pub read_only: bool,
}

/// Shortest JWT_SECRET accepted.
pub const MIN_SECRET_BYTES: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "refusing to listen on {0} in dev mode (no JWT_SECRET): anybody could connect as anybody. \
         Set JWT_SECRET, bind a loopback address, or pass --insecure"
    )]
    DevModeOnPublicAddress(SocketAddr),
    #[error("{0} must be at least {1}")]
    TooSmall(&'static str, u64),
    #[error("RATE_LIMIT must be a positive number of frames per second")]
    BadRateLimit,
    #[error("UPGRADE_RATE must be a positive number of upgrades per second")]
    BadUpgradeRate,
    #[error("UPGRADE_RATE_PER_USER must be a positive number of upgrades per second")]
    BadUpgradeRatePerUser,
    #[error("set JWT_SECRET (HS256) or JWT_PUBLIC_KEY (RS256/ES256), not both")]
    TwoKeys,
    #[error(
        "JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (32 random bytes recommended): \
         a short or empty secret lets anybody sign tokens"
    )]
    WeakSecret,
    #[error("TRUSTED_PROXIES entry {0:?} is not an IP address or CIDR")]
    BadProxy(String),
    #[error("API_KEYS entries must be at least 16 characters")]
    WeakApiKey,
    #[error(
        "REDIS_PREFIX must not contain '{{' or '}}' with a Redis Cluster: it would put every key in one slot"
    )]
    BracesInClusterPrefix,
}

impl Config {
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key.is_none()
    }

    /// Drops empty entries from the comma-separated lists: `ALLOWED_ORIGINS=`
    /// (set but empty) means any origin, as unset does, and a trailing comma
    /// adds nothing.
    pub fn without_empty_entries(mut self) -> Self {
        for list in [
            &mut self.trusted_proxies,
            &mut self.api_keys,
            &mut self.allowed_origins,
        ] {
            list.retain(|entry| !entry.trim().is_empty());
        }
        self
    }

    /// Checks what clap cannot: combinations and lower bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.dev_mode() && !self.bind.ip().is_loopback() && !self.insecure {
            return Err(ConfigError::DevModeOnPublicAddress(self.bind));
        }
        if self.jwt_secret.is_some() && self.jwt_public_key.is_some() {
            return Err(ConfigError::TwoKeys);
        }
        if self
            .jwt_secret
            .as_ref()
            .is_some_and(|s| s.len() < MIN_SECRET_BYTES)
        {
            return Err(ConfigError::WeakSecret);
        }
        for proxy in &self.trusted_proxies {
            crate::limits::IpNet::parse(proxy)
                .ok_or_else(|| ConfigError::BadProxy(proxy.clone()))?;
        }
        if !(self.upgrade_rate.is_finite() && self.upgrade_rate > 0.0) {
            return Err(ConfigError::BadUpgradeRate);
        }
        if !(self.upgrade_rate_per_user.is_finite() && self.upgrade_rate_per_user > 0.0) {
            return Err(ConfigError::BadUpgradeRatePerUser);
        }
        api_keys_strong(&self.api_keys)?;
        if !self.redis_cluster_urls.is_empty() && self.redis_prefix.contains(['{', '}']) {
            return Err(ConfigError::BracesInClusterPrefix);
        }
        let at_least = |name, value: u64, min| {
            if value < min {
                Err(ConfigError::TooSmall(name, min))
            } else {
                Ok(())
            }
        };
        at_least("MAX_MESSAGE_BYTES", self.max_message_bytes as u64, 256)?;
        at_least("CLIENT_QUEUE", self.client_queue as u64, 1)?;
        at_least("HISTORY_SIZE", self.history_size as u64, 1)?;
        at_least("RATE_BURST", self.rate_burst as u64, 1)?;
        at_least(
            "MAX_CONNECTIONS_PER_USER",
            self.max_connections_per_user as u64,
            1,
        )?;
        at_least(
            "MAX_CONNECTIONS_PER_IP",
            self.max_connections_per_ip as u64,
            1,
        )?;
        at_least(
            "MAX_ROOMS_PER_CONNECTION",
            self.max_rooms_per_connection as u64,
            1,
        )?;
        at_least(
            "HEARTBEAT_INTERVAL (ms)",
            self.heartbeat_interval.as_millis() as u64,
            10,
        )?;
        at_least("HISTORY_TTL (ms)", self.history_ttl.as_millis() as u64, 1)?;
        at_least("NODE_TTL (ms)", self.node_ttl.as_millis() as u64, 300)?;
        if !(self.rate_limit.is_finite() && self.rate_limit > 0.0) {
            return Err(ConfigError::BadRateLimit);
        }
        Ok(())
    }

    /// NODE_ID, or `<hostname>-<pid>`.
    pub fn node_name(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "node".to_string());
            format!("{host}-{}", std::process::id())
        })
    }
}

fn api_keys_strong(keys: &[String]) -> Result<(), ConfigError> {
    if keys.iter().any(|k| k.len() < 16) {
        return Err(ConfigError::WeakApiKey);
    }
    Ok(())
}

/// Parses `500ms`, `25s`, `10m`, `1h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 25s, 10m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?}: use ms, s, m or h"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["roomcast"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).unwrap()
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 days").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn dev_mode_refuses_public_addresses_unless_insecure() {
        let public = config(&["--bind", "0.0.0.0:8080"]);
        assert_eq!(
            public.validate(),
            Err(ConfigError::DevModeOnPublicAddress(
                "0.0.0.0:8080".parse().unwrap()
            ))
        );
        assert!(config(&["--bind", "0.0.0.0:8080", "--insecure"])
            .validate()
            .is_ok());
        assert!(config(&[
            "--bind",
            "0.0.0.0:8080",
            "--jwt-secret",
            "a-long-enough-secret"
        ])
        .validate()
        .is_ok());
        assert_eq!(
            config(&["--jwt-secret", ""]).validate(),
            Err(ConfigError::WeakSecret)
        );
        assert!(config(&[]).validate().is_ok());
    }

    #[test]
    fn redis_cluster_seeds_are_a_list_and_exclude_redis_url() {
        let cluster = config(&[
            "--redis-cluster-urls",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        ]);
        assert_eq!(cluster.redis_cluster_urls.len(), 2);
        assert!(cluster.validate().is_ok());
        assert!(Config::try_parse_from([
            "roomcast",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-cluster-urls",
            "redis://127.0.0.1:7000",
        ])
        .is_err());
        assert_eq!(
            config(&[
                "--redis-cluster-urls",
                "redis://127.0.0.1:7000",
                "--redis-prefix",
                "{app}"
            ])
            .validate(),
            Err(ConfigError::BracesInClusterPrefix)
        );
        assert!(config(&["--redis-prefix", "{app}"]).validate().is_ok());
    }

    #[test]
    fn empty_list_entries_are_dropped_and_zero_connection_limits_refused() {
        let lists = config(&["--allowed-origins", "", "--trusted-proxies", "10.0.0.1,"])
            .without_empty_entries();
        assert!(lists.allowed_origins.is_empty(), "empty means any origin");
        assert_eq!(lists.trusted_proxies, vec!["10.0.0.1"]);
        assert!(lists.validate().is_ok());
        for flag in ["--max-connections-per-user", "--max-connections-per-ip"] {
            assert!(config(&[flag, "0"]).validate().is_err(), "{flag} 0");
        }
    }

    #[test]
    fn lower_bounds_are_checked() {
        assert!(config(&["--client-queue", "0"]).validate().is_err());
        assert!(config(&["--rate-limit", "0"]).validate().is_err());
        assert!(
            config(&["--allowed-origins", "https://a.example,https://b.example"])
                .allowed_origins
                .len()
                == 2
        );
    }
}
