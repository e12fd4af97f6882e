//! A connection's outbound queue, between the hub's fan-out (many senders)
//! and the connection's writer (one receiver). Bounded, and the sending side
//! never waits: a full queue makes the connection a slow consumer. Empty, it
//! holds no buffer at all, because most connections are idle most of the
//! time and a channel's preallocated block would be most of their memory.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use super::close::{CloseReason, CloseSignal};
use super::Outbound;
use crate::stats::Stats;

/// A queue that grew past this while busy is freed once it is drained.
const KEEP_CAPACITY: usize = 64;

/// The sending side, held by the hub (once per room joined) and the reader.
#[derive(Debug)]
pub struct Mailbox {
    shared: Arc<Shared>,
    pub close: Arc<CloseSignal>,
}

/// The receiving side, owned by the writer.
#[derive(Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    capacity: usize,
}

#[derive(Debug)]
struct State {
    items: VecDeque<Outbound>,
    senders: usize,
    receiver_alive: bool,
    waker: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A queue of `capacity` items for one connection, closed through `close`.
pub fn mailbox(capacity: usize, close: Arc<CloseSignal>) -> (Mailbox, Outbox) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiver_alive: true,
            waker: None,
        }),
        capacity,
    });
    (
        Mailbox {
            shared: shared.clone(),
            close,
        },
        Outbox { shared },
    )
}

impl Mailbox {
    /// Queues `item` without waiting; a full queue closes the connection as a
    /// slow consumer. Returns false when the item was not queued.
    pub fn offer(&self, item: Outbound, stats: &Stats) -> bool {
        let mut state = self.shared.lock();
        if !state.receiver_alive {
            return false;
        }
        if state.items.len() >= self.shared.capacity {
            drop(state);
            if self.close.close(CloseReason::SLOW_CONSUMER) {
                stats.slow_consumer_closed();
            }
            return false;
        }
        state.items.push_back(item);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }
}

impl Clone for Mailbox {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Mailbox {
            shared: self.shared.clone(),
            close: self.close.clone(),
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        // The last sender gone ends the writer's `recv`.
        let waker = if state.senders == 0 {
            state.waker.take()
        } else {
            None
        };
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Outbox {
    /// The next item; `None` once it is empty and every sender is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        poll_fn(|cx| {
            let mut state = self.shared.lock();
            if let Some(item) = state.items.pop_front() {
                release_if_drained(&mut state.items);
                return Poll::Ready(Some(item));
            }
            if state.senders == 0 {
                return Poll::Ready(None);
            }
            match &state.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => state.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Hands up to `max` queued items to `take`, under one lock.
    pub fn drain(&mut self, max: usize, mut take: impl FnMut(Outbound)) {
        let mut state = self.shared.lock();
        let n = state.items.len().min(max);
        for item in state.items.drain(..n) {
            take(item);
        }
        release_if_drained(&mut state.items);
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_alive = false;
        state.items = VecDeque::new();
    }
}

/// A burst grew the queue; once it is empty again the memory goes back.
fn release_if_drained(items: &mut VecDeque<Outbound>) {
    if items.is_empty() && items.capacity() > KEEP_CAPACITY {
        *items = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Outbound {
        Outbound::Frame(text.to_string().into())
    }

    fn text(item: Outbound) -> String {
        match item {
            Outbound::Frame(text) => text.to_string(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn items_arrive_in_order_and_recv_ends_with_the_last_sender() {
        let (mailbox, mut outbox) = mailbox(4, Arc::new(CloseSignal::default()));
        let stats = Stats::new();
        let other = mailbox.clone();
        assert!(mailbox.offer(frame("a"), &stats));
        assert!(other.offer(frame("b"), &stats));
        assert_eq!(text(outbox.recv().await.unwrap()), "a");
        drop(mailbox);
        assert_eq!(text(outbox.recv().await.unwrap()), "b");
        drop(other);
        assert!(outbox.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_an_offer_from_another_task() {
        let (mailbox, mut outbox) = mailbox(4, Arc::new(CloseSignal::default()));
        let waiting = tokio::spawn(async move { outbox.recv().await.map(text) });
        tokio::task::yield_now().await;
        assert!(mailbox.offer(frame("late"), &Stats::new()));
        assert_eq!(waiting.await.unwrap().as_deref(), Some("late"));
    }

    #[test]
    fn a_full_queue_closes_the_connection_as_a_slow_consumer() {
        let close = Arc::new(CloseSignal::default());
        let (mailbox, _outbox) = mailbox(2, close.clone());
        let stats = Stats::new();
        assert!(mailbox.offer(frame("1"), &stats));
        assert!(mailbox.offer(frame("2"), &stats));
        assert!(!mailbox.offer(frame("3"), &stats));
        assert_eq!(close.reason(), Some(CloseReason::SLOW_CONSUMER));
        assert_eq!(stats.snapshot_counters().slow_consumer_closes, 1);
    }

    #[test]
    fn drain_takes_at_most_max_and_a_drained_burst_frees_its_buffer() {
        let (mailbox, mut outbox) = mailbox(1000, Arc::new(CloseSignal::default()));
        let stats = Stats::new();
        for n in 0..200 {
            mailbox.offer(frame(&n.to_string()), &stats);
        }
        let mut taken = Vec::new();
        outbox.drain(150, |item| taken.push(text(item)));
        assert_eq!(taken.len(), 150);
        assert_eq!(taken[149], "149");
        outbox.drain(150, |item| taken.push(text(item)));
        assert_eq!(taken.len(), 200);
        assert_eq!(outbox.shared.lock().items.capacity(), 0);
    }

    #[test]
    fn offers_to_a_gone_writer_are_refused() {
        let (mailbox, outbox) = mailbox(4, Arc::new(CloseSignal::default()));
        drop(outbox);
        assert!(!mailbox.offer(frame("nobody"), &Stats::new()));
    }
}
