//! The scenarios, one module each.

pub mod conns;
pub mod fanout;
pub mod resume;
pub mod rooms;
pub mod stalls;

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

/// Tells many tasks to stop. Each task waits on a receiver of its own: tasks
/// sharing one `watch` channel took its mutex on every poll of their wait,
/// that is once per frame received, from every task at once.
#[derive(Default)]
pub struct Stop(std::sync::Mutex<Vec<oneshot::Sender<()>>>);

impl Stop {
    /// Resolves once [`stop`](Self::stop) is called or the `Stop` dropped.
    pub fn subscribe(&self) -> oneshot::Receiver<()> {
        let (stop, stopped) = oneshot::channel();
        crate::lock(&self.0).push(stop);
        stopped
    }

    pub fn stop(&self) {
        for stop in crate::lock(&self.0).drain(..) {
            let _ = stop.send(());
        }
    }
}

/// Waits for every task until `deadline`, then tells the rest to stop
/// (`stop`) and waits up to `grace` more; tasks still running after that are
/// aborted and count as None.
pub async fn join_all<T: Send + 'static>(
    tasks: Vec<JoinHandle<T>>,
    deadline: Instant,
    stop: &Stop,
    grace: Duration,
) -> Vec<Option<T>> {
    let mut out = Vec::with_capacity(tasks.len());
    let mut limit = deadline;
    let mut stopped = false;
    for mut task in tasks {
        let r = match timeout_at(limit, &mut task).await {
            Ok(r) => r.ok(),
            Err(_) if !stopped => {
                stop.stop();
                stopped = true;
                limit = Instant::now() + grace;
                match timeout_at(limit, &mut task).await {
                    Ok(r) => r.ok(),
                    Err(_) => {
                        task.abort();
                        None
                    }
                }
            }
            Err(_) => {
                task.abort();
                None
            }
        };
        out.push(r);
    }
    out
}

/// User name of client `i` when `users` distinct names are shared
/// round-robin.
pub fn user_name(prefix: &str, i: usize, users: usize) -> String {
    format!("{prefix}-{}", i % users.max(1))
}

/// A room name unique to this run, unless one was given.
pub fn room_name(given: &Option<String>, scenario: &str) -> Result<String, String> {
    match given {
        Some(r) if crate::frame::valid_name(r, 100) => Ok(r.clone()),
        Some(r) => Err(format!(
            "--room {r:?}: 1-100 characters of A-Z a-z 0-9 _ - . : @ /"
        )),
        None => Ok(format!("{scenario}-{}", crate::frame::now_us() / 1000)),
    }
}
