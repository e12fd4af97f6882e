//! A Redis Cluster of the test's own: three masters and three replicas,
//! `redis-server` processes on free loopback ports, each in its own
//! temporary directory (for its nodes.conf), joined by `redis-cli --cluster
//! create`; every process is killed by PID on drop. Also the topology
//! changes the tests inflict: a master killed (its replica takes over) and
//! a slot moved to another master, step by step like `redis-cli --cluster
//! reshard` does it.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{
    command_calls, free_ports, redis_cli, spawn_redis_server, try_redis_cli, wait_for_redis,
};

/// Long enough for a failover (node timeout, then an election) on a busy
/// two-core machine.
const CLUSTER_WAIT: Duration = Duration::from_secs(30);

struct Process {
    child: Option<Child>,
    port: u16,
}

pub struct RedisCluster {
    processes: Vec<Process>,
    dir: PathBuf,
}

/// A master in `CLUSTER NODES`: its port and slot ranges.
#[derive(Debug)]
struct Master {
    id: String,
    port: u16,
    slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "roomcast-redis-cluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut cluster = RedisCluster {
            processes: Vec::new(),
            dir,
        };
        for _ in 0..6 {
            let process = cluster.spawn_node();
            cluster.processes.push(process);
        }
        let addresses: Vec<String> = cluster
            .ports()
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_until_healthy();
        cluster
    }

    /// Starts one cluster-enabled `redis-server` and waits until it answers.
    /// Its ports are free when picked but may be taken before it binds them
    /// (other tests, other programs): then it exits, and is started again
    /// on other ports.
    fn spawn_node(&self) -> Process {
        for _ in 0..5 {
            // Each node needs a second port for the cluster bus; by default
            // it is port + 10000, which can be taken or past 65535.
            let ports = free_ports(2);
            let (port, bus) = (ports[0], ports[1]);
            let dir = self.dir.join(port.to_string());
            std::fs::create_dir_all(&dir).expect("a temporary directory");
            let mut child = spawn_redis_server(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--dir",
                    &dir.display().to_string(),
                    // Replicas sync at once instead of waiting for company.
                    "--repl-diskless-sync-delay",
                    "0",
                ],
            );
            let deadline = Instant::now() + CLUSTER_WAIT;
            while Instant::now() < deadline {
                // Ours, not another test's server that got the port first.
                let pid = format!("process_id:{}", child.id());
                let info = try_redis_cli(port, &["INFO", "server"]).unwrap_or_default();
                if info.lines().any(|line| line.trim() == pid) {
                    return Process {
                        child: Some(child),
                        port,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("no redis-server of the cluster came up");
    }

    /// Seed URLs for `--redis-cluster-urls`: every master.
    pub fn seeds(&self) -> String {
        self.masters()
            .iter()
            .map(|m| format!("redis://127.0.0.1:{}", m.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ports of the processes still running.
    pub fn ports(&self) -> Vec<u16> {
        self.processes
            .iter()
            .filter(|p| p.child.is_some())
            .map(|p| p.port)
            .collect()
    }

    /// Ports of the masters serving slots, as the cluster sees them now.
    pub fn master_ports(&self) -> Vec<u16> {
        self.masters().iter().map(|m| m.port).collect()
    }

    fn try_cli(&self, port: u16, args: &[&str]) -> Option<String> {
        try_redis_cli(port, args)
    }

    /// Runs a command on one node with redis-cli; returns its output.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        redis_cli(port, args)
    }

    /// How often a node ran `command` (from scripts too), per INFO commandstats.
    pub fn command_calls(&self, port: u16, command: &str) -> u64 {
        command_calls(port, command)
    }

    /// A numeric field of INFO (e.g. `total_net_output_bytes`).
    pub fn info_number(&self, port: u16, field: &str) -> u64 {
        let info = self.cli(port, &["INFO"]);
        let prefix = format!("{field}:");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in INFO of {port}"))
    }

    /// The slot of a key or channel name.
    pub fn slot(&self, name: &str) -> u16 {
        let port = self.ports()[0];
        self.cli(port, &["CLUSTER", "KEYSLOT", name])
            .parse()
            .expect("a slot number")
    }

    /// The port of the master serving `slot`.
    pub fn owner(&self, slot: u16) -> u16 {
        self.masters()
            .iter()
            .find(|m| m.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|m| m.port)
            .unwrap_or_else(|| panic!("nobody serves slot {slot}"))
    }

    /// Kills a node with SIGKILL: no goodbye to anybody.
    pub fn kill(&mut self, port: u16) {
        for process in &mut self.processes {
            if process.port == port {
                if let Some(mut child) = process.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    /// Promotes the replica of the master on `port` with `CLUSTER FAILOVER`
    /// (the graceful kind, as for maintenance): the master hands over and
    /// becomes a replica. The promoted replica's port.
    pub fn fail_over(&self, port: u16) -> u16 {
        let master_id = self.cli(port, &["CLUSTER", "MYID"]);
        let nodes = self.cli(port, &["CLUSTER", "NODES"]);
        let replica = nodes
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|fields| {
                fields.get(2).is_some_and(|flags| flags.contains("slave"))
                    && fields.get(3) == Some(&master_id.as_str())
            })
            .and_then(|fields| {
                fields[1]
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no replica of {port}: {nodes}"));
        assert_eq!(self.cli(replica, &["CLUSTER", "FAILOVER"]), "OK");
        self.wait_until("the replica to take over", || {
            self.try_cli(replica, &["ROLE"])
                .is_some_and(|role| role.starts_with("master"))
        });
        self.wait_until_healthy();
        replica
    }

    /// Waits until a live master serves every slot, every live node says
    /// `cluster_state:ok`, and every replica is in sync with its master.
    pub fn wait_until_healthy(&self) {
        self.wait_until("the cluster to be healthy", || {
            let live = self.ports();
            let masters = self.masters();
            let covered: usize = masters
                .iter()
                .flat_map(|m| &m.slots)
                .map(|&(a, b)| (b - a) as usize + 1)
                .sum();
            covered == 16384
                && masters.iter().all(|m| live.contains(&m.port))
                && live.iter().all(|&port| {
                    let info = self.try_cli(port, &["CLUSTER", "INFO"]).unwrap_or_default();
                    let replication = self
                        .try_cli(port, &["INFO", "replication"])
                        .unwrap_or_default();
                    info.contains("cluster_state:ok")
                        && (replication.contains("role:master")
                            || replication.contains("master_link_status:up"))
                })
        });
    }

    /// Moves `slot` to the master on port `to`, the way `redis-cli --cluster
    /// reshard` does: importing/migrating, the keys with MIGRATE, then the
    /// new owner announced to every master. `pause` is spent twice while
    /// the slot is open (keys still on the source, then already on the
    /// target), so traffic meets both halves of a migration.
    pub fn move_slot(&self, slot: u16, to: u16, pause: Duration) {
        let from = self.owner(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let id = |port| self.cli(port, &["CLUSTER", "MYID"]);
        let (from_id, to_id) = (id(from), id(to));
        let slot_arg = slot.to_string();
        let ok = |port, args: &[&str]| {
            let answer = self.cli(port, args);
            assert_eq!(answer, "OK", "{args:?} on {port}");
        };
        ok(
            to,
            &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id],
        );
        ok(
            from,
            &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id],
        );
        std::thread::sleep(pause);
        loop {
            let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_port = to.to_string();
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            migrate.extend(keys);
            ok(from, &migrate);
        }
        std::thread::sleep(pause);
        // The target first, so it never answers MOVED for a slot it has.
        let mut order = vec![to, from];
        order.extend(
            self.master_ports()
                .into_iter()
                .filter(|p| *p != to && *p != from),
        );
        for port in order {
            ok(port, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
        }
        self.wait_until("every node to agree on the moved slot", || {
            self.ports().iter().all(|&port| {
                self.try_cli(port, &["CLUSTER", "NODES"])
                    .map(|nodes| owner_in(&parse_masters(&nodes), slot) == Some(to_id.clone()))
                    .unwrap_or(false)
            })
        });
    }

    fn masters(&self) -> Vec<Master> {
        for port in self.ports() {
            if let Some(nodes) = self.try_cli(port, &["CLUSTER", "NODES"]) {
                return parse_masters(&nodes);
            }
        }
        panic!("no cluster node answers");
    }

    fn wait_until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + CLUSTER_WAIT;
        while !done() {
            assert!(Instant::now() < deadline, "waited too long for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Masters that serve slots and are not marked failed, from `CLUSTER NODES`.
fn parse_masters(nodes: &str) -> Vec<Master> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            if !flags.contains("master") || flags.contains("fail") {
                return None;
            }
            let port = fields
                .get(1)?
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let slots: Vec<(u16, u16)> = fields
                .iter()
                .skip(8)
                .filter(|f| !f.starts_with('['))
                .filter_map(|range| match range.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => range.parse().ok().map(|s| (s, s)),
                })
                .collect();
            (!slots.is_empty()).then(|| Master {
                id: fields[0].to_string(),
                port,
                slots,
            })
        })
        .collect()
}

fn owner_in(masters: &[Master], slot: u16) -> Option<String> {
    masters
        .iter()
        .find(|m| m.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
        .map(|m| m.id.clone())
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for process in &mut self.processes {
            if let Some(mut child) = process.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of one master that owns every slot and has no replica:
/// it can be paused (SIGSTOP) for longer than the node timeout without a
/// failover, as a master stalls in a fork or a slow fsync.
pub struct LoneMaster {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl LoneMaster {
    pub fn start() -> LoneMaster {
        let ports = free_ports(2);
        let (port, bus) = (ports[0], ports[1]);
        let dir = std::env::temp_dir().join(format!(
            "roomcast-lone-master-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("creates the master's directory");
        let child = spawn_redis_server(
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-config-file",
                "nodes.conf",
                "--dir",
                &dir.display().to_string(),
            ],
        );
        let master = LoneMaster { child, port, dir };
        wait_for_redis(port);
        redis_cli(port, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        let deadline = Instant::now() + CLUSTER_WAIT;
        while !redis_cli(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(Instant::now() < deadline, "the lone master never got ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        master
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops (`true`) or continues (`false`) the process.
    pub fn pause(&self, paused: bool) {
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }
}

impl Drop for LoneMaster {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
