//! Names of the keys and channels a node uses in Redis, all under
//! `REDIS_PREFIX`. Room and user names sit in `{…}` hash tags, so in a
//! Redis Cluster everything of one room (its channel, stream, idempotency
//! keys, presence) lives in one slot: the atomic publish script touches one
//! shard, and rooms spread over the shards by their names.

use crate::broker::Channel;

pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn channel(&self, channel: &Channel) -> String {
        match channel {
            Channel::Room(room) => format!("{}:room:{{{room}}}", self.prefix),
            Channel::User(user) => format!("{}:user:{{{user}}}", self.prefix),
            Channel::Broadcast => format!("{}:broadcast", self.prefix),
        }
    }

    pub fn room_channel(&self, room: &str) -> String {
        format!("{}:room:{{{room}}}", self.prefix)
    }

    pub fn parse_channel(&self, name: &str) -> Option<Channel> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix(':')?;
        if rest == "broadcast" {
            return Some(Channel::Broadcast);
        }
        let (kind, tagged) = rest.split_once(':')?;
        let inner = tagged.strip_prefix('{')?.strip_suffix('}')?;
        match kind {
            "room" => Some(Channel::Room(inner.into())),
            "user" => Some(Channel::User(inner.into())),
            _ => None,
        }
    }

    pub fn stream(&self, room: &str) -> String {
        format!("{}:stream:{{{room}}}", self.prefix)
    }

    pub fn idempotency(&self, room: &str, key: &str) -> String {
        format!("{}:key:{{{room}}}:{key}", self.prefix)
    }

    /// user → connections in the room, over all nodes. (Not the
    /// `presence:` name of the release before the Cluster broker, whose
    /// per-node record was laid out differently: its leftovers are ignored.)
    pub fn presence(&self, room: &str) -> String {
        format!("{}:members:{{{room}}}", self.prefix)
    }

    /// user → `node`'s connections in the room: what to take back when the
    /// node dies. In the room's slot, so one script changes both hashes.
    pub fn node_presence(&self, room: &str, node: &str) -> String {
        format!("{}:members:{{{room}}}:node:{node}", self.prefix)
    }

    /// The rooms where `node` has (or recently had) connections: where to
    /// look when it dies. In the node's own slot, kept apart from the rooms.
    pub fn node_rooms(&self, node: &str) -> String {
        format!("{}:node-rooms:{node}", self.prefix)
    }

    pub fn ticket(&self, ticket: &str) -> String {
        format!("{}:ticket:{ticket}", self.prefix)
    }

    /// One hash, node → "<expiry ms> <snapshot>": a single key, so it lives
    /// on one shard of a cluster too.
    pub fn node_stats(&self) -> String {
        format!("{}:node-stats", self.prefix)
    }

    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::super::topology::{slot, SLOTS};
    use super::*;

    fn keys() -> Keys {
        Keys {
            prefix: "rc".into(),
        }
    }

    #[test]
    fn channel_names_round_trip_and_foreign_ones_are_ignored() {
        let keys = keys();
        for channel in [
            Channel::Room("chat:1".into()),
            Channel::User("bob@example.com".into()),
            Channel::Broadcast,
        ] {
            assert_eq!(keys.parse_channel(&keys.channel(&channel)), Some(channel));
        }
        assert_eq!(keys.channel(&Channel::Room("r".into())), "rc:room:{r}");
        assert_eq!(keys.room_channel("r"), "rc:room:{r}");
        assert_eq!(keys.parse_channel("other:room:{r}"), None);
        assert_eq!(keys.parse_channel("rc:room:r"), None);
    }

    #[test]
    fn everything_of_a_room_shares_the_slot_of_its_name() {
        let keys = keys();
        for room in ["lobby", "chat:1", "a/b@c.d"] {
            let expected = slot(room.as_bytes());
            for name in [
                keys.room_channel(room),
                keys.stream(room),
                keys.idempotency(room, "k-1"),
                keys.presence(room),
                keys.node_presence(room, "node-{7}"),
            ] {
                assert_eq!(slot(name.as_bytes()), expected, "{name}");
            }
        }
    }

    /// The measurement behind docs/ARCHITECTURE.md: 10,000 random room
    /// names over the three equal slot ranges `redis-cli --cluster create`
    /// gives three masters. Run with `--nocapture` to see the shares.
    #[test]
    fn ten_thousand_random_rooms_spread_evenly_over_three_shards() {
        const ROOMS: usize = 10_000;
        let keys = keys();
        let mut random = fastrand::Rng::with_seed(7);
        let bounds = [0, 5461, 10923, SLOTS];
        let mut per_shard = [0usize; 3];
        for _ in 0..ROOMS {
            let length = random.usize(4..16);
            let room: String = (0..length).map(|_| random.alphanumeric()).collect();
            let slot = slot(keys.stream(&room).as_bytes()) as usize;
            let shard = (0..3)
                .find(|&s| (bounds[s]..bounds[s + 1]).contains(&slot))
                .unwrap_or(2);
            per_shard[shard] += 1;
        }
        let shares: Vec<f64> = per_shard
            .iter()
            .map(|&n| n as f64 * 100.0 / ROOMS as f64)
            .collect();
        println!("rooms per shard of {ROOMS}: {per_shard:?}, shares (%): {shares:.2?}");
        for share in shares {
            // One third each; a 2-point band is more than four standard
            // deviations of a fair 10,000-draw sample.
            assert!((share - 100.0 / 3.0).abs() < 2.0, "share {share:.2} %");
        }
    }
}
