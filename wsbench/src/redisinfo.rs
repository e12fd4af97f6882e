//! Calls per Redis command (`INFO commandstats`), to count what a scenario
//! cost Redis (e.g. XRANGE reads during a reconnect storm).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// `cmdstat_NAME:calls=N,...` lines: NAME → N.
pub fn parse_commandstats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// Commands whose call count grew, and by how much.
pub fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, &v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// Asks the Redis at `addr` (`HOST:PORT`) for its command statistics.
pub async fn commandstats(addr: &str) -> Result<BTreeMap<String, u64>, String> {
    let work = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut stream = BufReader::new(stream);
        stream
            .get_mut()
            .write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut header = String::new();
        stream
            .read_line(&mut header)
            .await
            .map_err(|e| e.to_string())?;
        let len: usize = header
            .trim()
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unexpected reply {:?}", header.trim()))?;
        let mut body = vec![0; len];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok(parse_commandstats(&String::from_utf8_lossy(&body)))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_subtracts_commandstats() {
        let before = parse_commandstats(
            "# Commandstats\r\ncmdstat_xadd:calls=10,usec=50,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\ncmdstat_xrange:calls=2,usec=9,usec_per_call=4.50\r\ncmdstat_client|setname:calls=3,usec=1\r\n",
        );
        assert_eq!(before["xadd"], 10);
        assert_eq!(before["client|setname"], 3);
        let after = parse_commandstats(
            "cmdstat_xadd:calls=15,usec=60\r\ncmdstat_xrange:calls=2,usec=9\r\ncmdstat_xrevrange:calls=1,usec=3\r\ncmdstat_client|setname:calls=3,usec=1\r\n",
        );
        let d = delta(&before, &after);
        assert_eq!(d.len(), 2);
        assert_eq!(d["xadd"], 5);
        assert_eq!(d["xrevrange"], 1);
    }
}
