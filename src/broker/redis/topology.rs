//! Which Redis server holds a channel: the one Redis, or, in a Redis
//! Cluster, the master that owns the channel's hash slot. The slot map is
//! read with `CLUSTER SLOTS` when channels need a home, and patched from
//! `MOVED` answers in between.

use std::sync::{Arc, RwLock};

use redis::{RedisError, Value};

use super::commands::Commands;

/// Hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The Cluster hash slot of a key or channel: CRC16 (XMODEM) of its hash
/// tag (the part between the first `{` and the next `}`, when not empty) or
/// of the whole name, modulo 16384.
pub fn slot(name: &[u8]) -> u16 {
    let tagged = hash_tag(name).unwrap_or(name);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS as u16
}

fn hash_tag(name: &[u8]) -> Option<&[u8]> {
    let open = name.iter().position(|&b| b == b'{')?;
    let inner = &name[open + 1..];
    let close = inner.iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &inner[..close])
}

pub enum Topology {
    /// One Redis holds everything.
    Single(Arc<str>),
    /// Slot → address of its master, once known.
    Cluster(RwLock<Vec<Option<Arc<str>>>>),
}

impl Topology {
    pub fn cluster() -> Topology {
        Topology::Cluster(RwLock::new(vec![None; SLOTS]))
    }

    /// The address of the server that serves `channel` now, as far as known.
    pub fn owner(&self, channel: &str) -> Option<Arc<str>> {
        match self {
            Topology::Single(address) => Some(address.clone()),
            Topology::Cluster(slots) => read(slots)[slot(channel.as_bytes()) as usize].clone(),
        }
    }

    /// A `MOVED` answer: `slot` is served by `address` now.
    pub fn learn(&self, slot: u16, address: &str) {
        if let Topology::Cluster(slots) = self {
            if let Some(entry) = write(slots).get_mut(slot as usize) {
                *entry = Some(address.into());
            }
        }
    }

    /// Reads the Cluster's slot map (a no-op with one Redis).
    pub async fn refresh(&self, commands: &Commands) -> Result<(), RedisError> {
        let Topology::Cluster(slots) = self else {
            return Ok(());
        };
        let mut commands = commands.clone();
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut commands)
            .await?;
        let ranges = parse_slots(reply).map_err(|what| {
            RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected CLUSTER SLOTS reply",
                what,
            ))
        })?;
        let mut map = vec![None; SLOTS];
        for (start, end, address) in ranges {
            let address: Arc<str> = address.into();
            let (start, end) = (start as usize, (end as usize).min(SLOTS - 1));
            for entry in map.get_mut(start..=end).unwrap_or_default() {
                *entry = Some(address.clone());
            }
        }
        *write(slots) = map;
        Ok(())
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `CLUSTER SLOTS`: `[[start, end, [host, port, id, …], replicas…], …]` →
/// (start, end, "host:port" of the master). Ranges whose master has no
/// known endpoint (`?` or empty) are left out: their channels wait.
fn parse_slots(reply: Value) -> Result<Vec<(u16, u16, String)>, String> {
    let Value::Array(ranges) = reply else {
        return Err(format!("{reply:?}"));
    };
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    };
    let number = |value: &Value| match value {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let mut parsed = Vec::with_capacity(ranges.len());
    for range in &ranges {
        let Value::Array(parts) = range else {
            return Err(format!("range {range:?}"));
        };
        let (Some(start), Some(end), Some(Value::Array(master))) = (
            parts.first().and_then(number),
            parts.get(1).and_then(number),
            parts.get(2),
        ) else {
            return Err(format!("range {parts:?}"));
        };
        let (Some(host), Some(port)) = (
            master.first().and_then(text),
            master.get(1).and_then(number),
        ) else {
            return Err(format!("master {master:?}"));
        };
        if host.is_empty() || host == "?" {
            continue;
        }
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        parsed.push((start, end, format!("{host}:{port}")));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // Examples from the Redis Cluster specification and its test suite.
        assert_eq!(
            crc16::State::<crc16::XMODEM>::calculate(b"123456789"),
            0x31C3
        );
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(
            slot(b"foo{}{bar}"),
            slot(b"bar"),
            "an empty tag hashes the whole name"
        );
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }

    #[test]
    fn the_slot_map_is_read_from_cluster_slots_and_patched_by_moved() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let range = |start, end, host: &str, port| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                Value::Array(vec![bulk(host), Value::Int(port), bulk("id")]),
                Value::Array(vec![bulk(host), Value::Int(port + 3), bulk("replica")]),
            ])
        };
        let reply = Value::Array(vec![
            range(0, 5460, "127.0.0.1", 7000),
            range(5461, 16383, "::1", 7001),
            range(16383, 16383, "?", 7002),
        ]);
        assert_eq!(
            parse_slots(reply).unwrap(),
            vec![
                (0, 5460, "127.0.0.1:7000".to_string()),
                (5461, 16383, "[::1]:7001".to_string()),
            ]
        );
        assert!(parse_slots(Value::Int(1)).is_err());

        let topology = Topology::cluster();
        assert_eq!(topology.owner("{r}"), None);
        topology.learn(slot(b"r"), "127.0.0.1:7002");
        assert_eq!(topology.owner("x:{r}").as_deref(), Some("127.0.0.1:7002"));
    }
}
