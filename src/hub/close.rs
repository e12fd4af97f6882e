//! The signal that tells a connection to close, and why. Set once; the first
//! reason wins.

use std::sync::OnceLock;
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use crate::protocol::close;

/// Why a connection closes: the code and text of the close frame the server
/// sends, the peer's code when it closed first, or none when it vanished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub text: &'static str,
    /// False when the peer is gone: nothing can be sent.
    pub send_frame: bool,
    /// The peer closed first: what is queued still goes out, then the
    /// server's close frame answers the peer's (RFC 6455 §5.5.1), and no
    /// further close is awaited from the peer.
    pub by_peer: bool,
}

impl CloseReason {
    const fn server(code: u16, text: &'static str) -> Self {
        CloseReason {
            code,
            text,
            send_frame: true,
            by_peer: false,
        }
    }

    pub const SLOW_CONSUMER: CloseReason =
        CloseReason::server(close::SLOW_CONSUMER, "slow consumer: outbound queue full");
    pub const TOO_BIG: CloseReason =
        CloseReason::server(close::TOO_BIG, "frame larger than MAX_MESSAGE_BYTES");
    pub const RATE_LIMITED: CloseReason =
        CloseReason::server(close::RATE_LIMITED, "rate limit exceeded repeatedly");
    pub const TOKEN_EXPIRED: CloseReason =
        CloseReason::server(close::TOKEN_EXPIRED, "token expired");
    pub const DRAINING: CloseReason =
        CloseReason::server(close::DRAINING, "node draining: reconnect");
    pub const RESYNC: CloseReason = CloseReason::server(
        close::DRAINING,
        "messages may be missing: reconnect and resume",
    );
    pub const HEARTBEAT_TIMEOUT: CloseReason =
        CloseReason::server(close::HEARTBEAT_TIMEOUT, "heartbeat timeout");
    pub const INTERNAL: CloseReason = CloseReason::server(close::INTERNAL, "internal error");
    pub const INVALID_PAYLOAD: CloseReason =
        CloseReason::server(close::INVALID_PAYLOAD, "text frame is not valid UTF-8");
    pub const PROTOCOL_ERROR: CloseReason =
        CloseReason::server(close::PROTOCOL, "WebSocket protocol error");

    /// The peer sent a close frame (with this code, 1005 when it had none).
    pub fn by_peer(code: u16) -> Self {
        CloseReason {
            code,
            text: "closed by client",
            send_frame: true,
            by_peer: true,
        }
    }

    /// The connection broke without a close frame.
    pub const GONE: CloseReason = CloseReason {
        code: 1006,
        text: "connection lost",
        send_frame: false,
        by_peer: false,
    };
}

/// Read and written from any thread; waited on by the connection's one task
/// (its reading and writing halves share that task's waker).
#[derive(Debug, Default)]
pub struct CloseSignal {
    reason: OnceLock<CloseReason>,
    task: AtomicWaker,
}

impl CloseSignal {
    /// Asks the connection to close; true if this call decided the reason.
    pub fn close(&self, reason: CloseReason) -> bool {
        let decided = self.reason.set(reason).is_ok();
        if decided {
            self.task.wake();
        }
        decided
    }

    /// For the connection's task: ready once a reason is set.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        if let Some(reason) = self.reason() {
            return Poll::Ready(reason);
        }
        self.task.register(cx.waker());
        match self.reason() {
            Some(reason) => Poll::Ready(reason),
            None => Poll::Pending,
        }
    }

    pub fn reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    /// Resolves once a reason is set.
    pub async fn closed(&self) -> CloseReason {
        std::future::poll_fn(|cx| self.poll_closed(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_first_reason_wins_and_wakes_the_waiting_task() {
        let signal = Arc::new(CloseSignal::default());
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.closed().await }
        });
        tokio::task::yield_now().await;
        assert!(signal.close(CloseReason::SLOW_CONSUMER));
        assert!(!signal.close(CloseReason::DRAINING));
        assert_eq!(waiter.await.unwrap(), CloseReason::SLOW_CONSUMER);
        assert_eq!(signal.closed().await, CloseReason::SLOW_CONSUMER);
    }
}
