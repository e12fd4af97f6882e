//! The Lua scripts of the Redis broker. Every script names all its keys in
//! KEYS and they share one hash slot (a room's, or a single key), so the
//! same scripts run on one Redis and on a Redis Cluster; only the publish
//! command differs (PUBLISH, or SPUBLISH so a room's channel stays on its
//! shard). Presence is kept per room, plus a set of rooms per node, so
//! reaping a dead node and rewriting a node's own presence go room by room.

use redis::Script;

use super::link::Flavor;

/// Stores a room message and publishes it, atomically.
/// KEYS: stream, [idempotency key]. ARGV: channel, maxlen, ttl ms, prefix, suffix.
/// The published payload is `<id> <frame>`; the frame is `prefix .. id .. suffix`.
const PUBLISH: &str = r"
local idem = KEYS[2]
if idem then
  local existing = redis.call('GET', idem)
  if existing then return {existing, 1} end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'p', ARGV[4], 's', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if idem then redis.call('SET', idem, id, 'PX', ARGV[3]) end
redis.call(PUBLISH_COMMAND, ARGV[1], id .. ' ' .. ARGV[4] .. id .. ARGV[5])
return {id, 0}
";

/// Reads a room's stream: where it is complete from, and its newest entries.
/// KEYS: stream. ARGV: count. Returns {max-deleted-entry-id, first id,
/// entries newest first}, or {} when the stream does not exist.
const READ: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local deleted, first = '0-0', ''
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
  if info[i] == 'first-entry' and info[i + 1] then first = info[i + 1][1] end
end
return {deleted, first, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])}
";

/// A connection of `user` enters a room. KEYS: room presence, this node's
/// presence in the room. ARGV: user, channel, event. Publishes the event
/// when the user is new to the room.
const PRESENCE_ADD: &str = r"
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
if redis.call('HINCRBY', KEYS[1], ARGV[1], 1) == 1 then
  redis.call(PUBLISH_COMMAND, ARGV[2], '- ' .. ARGV[3])
  return 1
end
return 0
";

/// A connection of `user` leaves a room; same keys and arguments.
const PRESENCE_REMOVE: &str = r"
local mine = redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
if mine <= 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
if mine < 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call(PUBLISH_COMMAND, ARGV[2], '- ' .. ARGV[3])
  return 1
end
return 0
";

/// Marks this node alive. KEYS: nodes. ARGV: node, ttl ms. Returns
/// {whether Redis still knew the node, {nodes silent for longer than the
/// TTL}}; those are reaped room by room, then forgotten.
const LIVENESS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local registered = redis.call('ZSCORE', KEYS[1], ARGV[1]) and 1 or 0
redis.call('ZADD', KEYS[1], now, ARGV[1])
return {registered, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))}
";

/// A dead node's users leave one room (with a `leave` event each when it
/// was their last connection). KEYS: room presence, the dead node's
/// presence in the room. ARGV: channel, room. Returns how many left.
/// The frame is built here, not by the node that left, because that node
/// is gone; names never contain characters JSON would escape.
const REAP_ROOM: &str = r#"
local fields = redis.call('HGETALL', KEYS[2])
local left = 0
for i = 1, #fields, 2 do
  local user = fields[i]
  if redis.call('HINCRBY', KEYS[1], user, -tonumber(fields[i + 1])) <= 0 then
    redis.call('HDEL', KEYS[1], user)
    redis.call(PUBLISH_COMMAND, ARGV[1],
      '- {"type":"leave","room":"' .. ARGV[2] .. '","user":"' .. user .. '"}')
    left = left + 1
  end
end
redis.call('DEL', KEYS[2])
return left
"#;

/// Makes this node's recorded presence in one room what it really is,
/// after Redis lost it (restarted empty) or reaped the node during an
/// outage. KEYS: room presence, this node's presence in the room.
/// ARGV: (user, connections) pairs.
const RESYNC_ROOM: &str = r"
local recorded = redis.call('HGETALL', KEYS[2])
for i = 1, #recorded, 2 do
  if redis.call('HINCRBY', KEYS[1], recorded[i], -tonumber(recorded[i + 1])) <= 0 then
    redis.call('HDEL', KEYS[1], recorded[i])
  end
end
redis.call('DEL', KEYS[2])
for i = 1, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
";

/// Replaces a set's members. KEYS: set. ARGV: members.
const REPLACE_SET: &str = r"
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 1000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return 1
";

pub struct Scripts {
    pub publish: Script,
    pub read: Script,
    pub presence_add: Script,
    pub presence_remove: Script,
    pub liveness: Script,
    pub reap_room: Script,
    pub resync_room: Script,
    pub replace_set: Script,
}

impl Scripts {
    pub fn new(flavor: Flavor) -> Scripts {
        let publishing = |body: &str| {
            Script::new(&format!(
                "local PUBLISH_COMMAND = '{}'\n{body}",
                flavor.publish()
            ))
        };
        Scripts {
            publish: publishing(PUBLISH),
            read: Script::new(READ),
            presence_add: publishing(PRESENCE_ADD),
            presence_remove: publishing(PRESENCE_REMOVE),
            liveness: Script::new(LIVENESS),
            reap_room: publishing(REAP_ROOM),
            resync_room: Script::new(RESYNC_ROOM),
            replace_set: Script::new(REPLACE_SET),
        }
    }
}
