//! Admission limits shared by the HTTP edge and sessions: token buckets,
//! the client's IP behind trusted proxies, and per-key connection counts.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// Token bucket: `rate` per second, bursts of up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A token bucket per key (a user, say), for keys that come and go: buckets
/// that have refilled are forgotten once there are many.
#[derive(Debug)]
pub struct KeyedRate {
    state: Mutex<Buckets>,
    rate: f64,
    burst: f64,
}

#[derive(Debug)]
struct Buckets {
    by_key: HashMap<String, TokenBucket>,
    /// Size at which refilled buckets are swept next: twice what a sweep
    /// left, so sweeping costs O(1) per call even when few buckets go.
    sweep_at: usize,
}

/// Keys tracked before refilled buckets are first swept.
const KEYED_RATE_SWEEP: usize = 10_000;

impl KeyedRate {
    pub fn new(rate: f64, burst: f64) -> Self {
        KeyedRate {
            state: Mutex::new(Buckets {
                by_key: HashMap::new(),
                sweep_at: KEYED_RATE_SWEEP,
            }),
            rate,
            burst,
        }
    }

    pub fn try_take(&self, key: &str, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = state.by_key.get_mut(key) {
            return bucket.try_take(now);
        }
        if state.by_key.len() >= state.sweep_at {
            // A refilled bucket is the same as a new one.
            let full_after = std::time::Duration::from_secs_f64(self.burst / self.rate);
            state
                .by_key
                .retain(|_, bucket| now.saturating_duration_since(bucket.last) < full_after);
            state.sweep_at = (2 * state.by_key.len()).max(KEYED_RATE_SWEEP);
        }
        let mut bucket = TokenBucket::new(self.rate, self.burst);
        let taken = bucket.try_take(now);
        state.by_key.insert(key.to_string(), bucket);
        taken
    }
}

/// An IP address or a CIDR block, as in TRUSTED_PROXIES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(text: &str) -> Option<IpNet> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (
                addr.parse::<IpAddr>().ok()?,
                Some(prefix.parse::<u8>().ok()?),
            ),
            None => (text.parse::<IpAddr>().ok()?, None),
        };
        // An IPv4-mapped IPv6 network is the IPv4 network it maps.
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => (
                    IpAddr::V4(v4),
                    Some(prefix.map_or(Some(32), |p| p.checked_sub(96))?),
                ),
                None => (addr, prefix),
            },
            IpAddr::V4(_) => (addr, prefix),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u8) {
            match ip {
                IpAddr::V4(v4) => (u32::from(v4) as u128, 32),
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => (u32::from(v4) as u128, 32),
                    None => (u128::from(v6), 128),
                },
            }
        };
        let ((net, width), (candidate, candidate_width)) = (bits(self.addr), bits(ip));
        if width != candidate_width {
            return false;
        }
        let Some(shift) = width.checked_sub(self.prefix) else {
            return false;
        };
        if shift >= 128 {
            return true;
        }
        (net >> shift) == (candidate >> shift)
    }
}

/// The client's IP: the peer, or, when the peer is a trusted proxy, the
/// right-most address in X-Forwarded-For that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    for hop in forwarded_for.unwrap_or("").rsplit(',') {
        match parse_hop(hop) {
            Ok(ip) => {
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            // A garbled entry: stop at the last address we could trust.
            Err(_) => break,
        }
    }
    client
}

/// What the per-address connection limit counts: an IPv4 address (also
/// when written IPv4-mapped, `::ffff:a.b.c.d`), or an IPv6 address's /64,
/// the block one subscriber gets, whose addresses a client may rotate freely.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// One X-Forwarded-For entry: an address, possibly with a port or brackets.
fn parse_hop(hop: &str) -> Result<IpAddr, ()> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Ok(ip);
    }
    if let Ok(socket) = hop.parse::<std::net::SocketAddr>() {
        return Ok(socket.ip());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
        .ok_or(())
}

/// Live connections per key (user, IP), with a limit.
#[derive(Debug)]
pub struct ConnectionCounts<K: Eq + Hash> {
    counts: Mutex<HashMap<K, usize>>,
    limit: usize,
}

/// Holds one counted connection; dropping it gives the slot back.
#[derive(Debug)]
pub struct CountedConnection<K: Eq + Hash + Clone> {
    counts: Arc<ConnectionCounts<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> ConnectionCounts<K> {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ConnectionCounts {
            counts: Mutex::new(HashMap::new()),
            limit,
        })
    }

    /// Counts one more connection for `key`, or `None` at the limit.
    pub fn admit(self: &Arc<Self>, key: K) -> Option<CountedConnection<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        // A refused key leaves no entry behind.
        if counts.get(&key).is_some_and(|count| *count >= self.limit) {
            return None;
        }
        *counts.entry(key.clone()).or_insert(0) += 1;
        Some(CountedConnection {
            counts: self.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash + Clone> Drop for CountedConnection<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_token_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3.0);
        bucket.last = start;
        assert!((0..3).all(|_| bucket.try_take(start)));
        assert!(!bucket.try_take(start));
        assert!(!bucket.try_take(start + Duration::from_millis(50)));
        assert!(bucket.try_take(start + Duration::from_millis(110)));
        assert!(!bucket.try_take(start + Duration::from_millis(120)));
        // Idle time refills up to the burst, not beyond.
        let later = start + Duration::from_secs(10);
        assert!((0..3).all(|_| bucket.try_take(later)));
        assert!(!bucket.try_take(later));
    }

    #[test]
    fn cidrs_match_their_addresses_only() {
        let net = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one = IpNet::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(IpNet::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        // IPv4-mapped networks are their IPv4 network, not "everything".
        let mapped = IpNet::parse("::ffff:10.0.0.1").unwrap();
        assert!(mapped.contains("10.0.0.1".parse().unwrap()));
        assert!(!mapped.contains("10.0.0.2".parse().unwrap()));
        let mapped_net = IpNet::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped_net.contains("10.9.9.9".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "nope", "1.2.3.4/x", "::ffff:10.0.0.0/64"] {
            assert!(IpNet::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let trusted = [
            IpNet::parse("127.0.0.1").unwrap(),
            IpNet::parse("10.0.0.0/8").unwrap(),
        ];
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(stranger, Some("1.1.1.1"), &trusted), stranger);
        assert_eq!(
            client_ip(proxy, Some("198.51.100.7, 10.0.0.5"), &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // A client cannot pick its IP by prepending to the header.
        assert_eq!(
            client_ip(proxy, Some("1.2.3.4, 198.51.100.7"), &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, None, &trusted), proxy);
        assert_eq!(
            client_ip(proxy, Some("198.51.100.7:4711"), &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(proxy, Some("[2001:db8::1]"), &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, Some("garbage"), &trusted), proxy);
    }

    #[test]
    fn a_keyed_rate_limits_each_key_alone() {
        let rate = KeyedRate::new(1.0, 2.0);
        let now = Instant::now();
        assert!(rate.try_take("amy", now) && rate.try_take("amy", now));
        assert!(!rate.try_take("amy", now), "amy's burst is spent");
        assert!(rate.try_take("bob", now), "bob has his own");
        assert!(rate.try_take("amy", now + std::time::Duration::from_secs(1)));
    }

    #[test]
    fn addresses_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let key = |ip: &str| address_key(ip.parse().unwrap()).to_string();
        assert_eq!(key("198.51.100.9"), "198.51.100.9");
        assert_eq!(key("::ffff:198.51.100.9"), "198.51.100.9");
        assert_eq!(key("2001:db8:1:2::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
    }

    #[test]
    fn connection_counts_stop_at_the_limit_and_free_slots_on_drop() {
        let counts = ConnectionCounts::new(2);
        let a = counts.admit("alice");
        let b = counts.admit("alice");
        assert!(a.is_some() && b.is_some());
        assert!(counts.admit("alice").is_none());
        assert!(counts.admit("bob").is_some());
        drop(a);
        assert!(counts.admit("alice").is_some());
    }
}
