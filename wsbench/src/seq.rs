//! Per-publisher sequence tracking: which numbers a subscriber got, how
//! often, and whether they came in order.

/// Sequence numbers above this are treated as garbage (never tracked), so a
/// corrupt payload cannot make the bitmap huge.
pub const MAX_SEQ: u64 = 1 << 28;

/// What one subscriber saw of one publisher's numbered stream (0, 1, 2, ...).
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    seen: Vec<u64>,
    max: Option<u64>,
    /// Different sequence numbers received.
    pub distinct: u64,
    /// Receipts of a number already received.
    pub duplicated: u64,
    /// First receipts of a number lower than one received before.
    pub out_of_order: u64,
    /// Numbers past [`MAX_SEQ`], ignored.
    pub invalid: u64,
}

/// How one receipt was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    InOrder,
    OutOfOrder,
    Duplicate,
    Invalid,
}

impl SeqTracker {
    pub fn record(&mut self, seq: u64) -> Receipt {
        if seq >= MAX_SEQ {
            self.invalid += 1;
            return Receipt::Invalid;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return Receipt::Duplicate;
        }
        self.seen[word] |= 1 << bit;
        self.distinct += 1;
        match self.max {
            Some(max) if seq < max => {
                self.out_of_order += 1;
                Receipt::OutOfOrder
            }
            _ => {
                self.max = Some(seq);
                Receipt::InOrder
            }
        }
    }

    /// Different numbers received below `expected` (the publisher sent
    /// 0..expected).
    pub fn distinct_below(&self, expected: u64) -> u64 {
        let full = (expected / 64) as usize;
        let mut n: u64 = self
            .seen
            .iter()
            .take(full)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rest = expected % 64;
        if rest > 0 {
            if let Some(w) = self.seen.get(full) {
                n += u64::from((w & ((1u64 << rest) - 1)).count_ones());
            }
        }
        n
    }
}

/// Delivery counts summed over subscribers and publishers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub expected: u64,
    /// Different messages received (what counts as delivered).
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub unexpected: u64,
    /// Subscribers (times publishers) that got everything, once, in order.
    pub exact_streams: u64,
    pub streams: u64,
}

impl Delivery {
    /// Adds one subscriber's view of one publisher that sent 0..sent, of
    /// which `failed` were refused by the server (never to be delivered).
    pub fn add(&mut self, tracker: &SeqTracker, sent: u64, failed: u64) {
        let below = tracker.distinct_below(sent);
        let expected = sent.saturating_sub(failed);
        self.expected += expected;
        self.delivered += below;
        self.lost += expected.saturating_sub(below);
        self.duplicated += tracker.duplicated;
        self.out_of_order += tracker.out_of_order;
        let unexpected = tracker.distinct - below + tracker.invalid;
        self.unexpected += unexpected;
        self.streams += 1;
        if below == expected
            && tracker.duplicated == 0
            && tracker.out_of_order == 0
            && unexpected == 0
        {
            self.exact_streams += 1;
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "expected": self.expected,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "unexpected": self.unexpected,
            "exact_streams": self.exact_streams,
            "streams": self.streams,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_is_exact() {
        let mut t = SeqTracker::default();
        for s in 0..1000 {
            assert_eq!(t.record(s), Receipt::InOrder);
        }
        assert_eq!(t.distinct_below(1000), 1000);
        let mut d = Delivery::default();
        d.add(&t, 1000, 0);
        assert_eq!(d.delivered, 1000);
        assert_eq!(d.exact_streams, 1);
    }

    #[test]
    fn counts_lost_duplicated_and_out_of_order() {
        let mut t = SeqTracker::default();
        // 0 1 3 2 2 5 (4 and 6..10 lost, 2 once late and once twice)
        for s in [0, 1, 3, 2, 2, 5] {
            t.record(s);
        }
        assert_eq!(t.distinct, 5);
        assert_eq!(t.duplicated, 1);
        assert_eq!(t.out_of_order, 1);
        assert_eq!(t.distinct_below(10), 5);
        let mut d = Delivery::default();
        d.add(&t, 10, 0);
        assert_eq!(
            (
                d.expected,
                d.delivered,
                d.lost,
                d.duplicated,
                d.out_of_order
            ),
            (10, 5, 5, 1, 1)
        );
        assert_eq!(d.exact_streams, 0);
    }

    #[test]
    fn numbers_past_expected_are_unexpected_not_delivered() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 64, 200] {
            t.record(s);
        }
        assert_eq!(t.distinct_below(2), 2);
        assert_eq!(t.distinct_below(65), 3);
        assert_eq!(t.distinct - t.distinct_below(2), 2);
        assert_eq!(t.record(MAX_SEQ), Receipt::Invalid);
        let mut d = Delivery::default();
        d.add(&t, 2, 0);
        assert_eq!((d.delivered, d.lost, d.unexpected), (2, 0, 3));
        assert_eq!(d.exact_streams, 0);
    }

    #[test]
    fn refused_publishes_are_not_lost() {
        let mut t = SeqTracker::default();
        // 10 sent, 3 and 7 refused by the server.
        for s in [0, 1, 2, 4, 5, 6, 8, 9] {
            t.record(s);
        }
        let mut d = Delivery::default();
        d.add(&t, 10, 2);
        assert_eq!(
            (d.expected, d.delivered, d.lost, d.exact_streams),
            (8, 8, 0, 1)
        );
        let mut d = Delivery::default();
        d.add(&SeqTracker::default(), 10, 2);
        assert_eq!((d.expected, d.delivered, d.lost), (8, 0, 8));
    }

    #[test]
    fn distinct_below_handles_word_edges() {
        let mut t = SeqTracker::default();
        for s in 0..128 {
            t.record(s);
        }
        assert_eq!(t.distinct_below(0), 0);
        assert_eq!(t.distinct_below(63), 63);
        assert_eq!(t.distinct_below(64), 64);
        assert_eq!(t.distinct_below(65), 65);
        assert_eq!(t.distinct_below(1000), 128);
    }
}
