//! Headless Chromium driven over WebDriver: a `chromedriver` process of the
//! test's own on a free loopback port, and pages (one browser session each)
//! that tests fill in, click and read like a person would. The W3C WebDriver
//! protocol is a handful of JSON requests, spoken here over the suite's own
//! HTTP helper rather than through a client crate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{free_port, http_request, WAIT};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The flags this machine's closed network and root user need.
const CHROMIUM_FLAGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
];

/// The WebDriver element reference key of the W3C protocol.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running chromedriver; killed (by PID) on drop, after its pages.
pub struct ChromeDriver {
    child: Child,
    addr: SocketAddr,
    profiles: PathBuf,
}

/// `target/test-artifacts/`, created: screenshots and chromedriver logs.
pub fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

impl ChromeDriver {
    /// Starts chromedriver and waits until it is ready. Panics with a hint
    /// when Chromium is not installed (`scripts/test` installs it).
    pub async fn start() -> ChromeDriver {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: run scripts/test, which installs chromium and chromium-driver"
            );
        }
        // A port found free can be taken by another test before chromedriver
        // binds it; chromedriver then exits, and is started again elsewhere.
        let mut attempts = 0;
        let driver = 'started: loop {
            attempts += 1;
            let port = free_port();
            let log = artifacts_dir().join(format!("chromedriver-{port}.log"));
            let child = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .arg(format!("--log-path={}", log.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts");
            let profiles = std::env::temp_dir()
                .join(format!("roomcast-chromium-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&profiles).expect("profile dir");
            let mut driver = ChromeDriver {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                profiles,
            };
            // Generous: on a loaded machine chromedriver takes seconds to start.
            let deadline = tokio::time::Instant::now() + WAIT * 3;
            loop {
                if tokio::net::TcpStream::connect(driver.addr).await.is_ok() {
                    break 'started driver;
                }
                if let Ok(Some(status)) = driver.child.try_wait() {
                    assert!(
                        attempts < 3,
                        "chromedriver exited ({status}) three times; see {}",
                        log.display()
                    );
                    continue 'started;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "chromedriver never listened; see {}",
                    log.display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let deadline = tokio::time::Instant::now() + WAIT * 3;
        loop {
            if let Ok(Ok((200, body))) = tokio::time::timeout(
                Duration::from_secs(1),
                try_request(driver.addr, "GET", "/status", None),
            )
            .await
            {
                if serde_json::from_str::<Value>(&body)
                    .is_ok_and(|status| status["value"]["ready"] == true)
                {
                    return driver;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver never got ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new browser window with a fresh profile.
    pub async fn page(&self) -> Page {
        let profile = self.profiles.join(format!("profile-{}", fastrand::u64(..)));
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({
            "capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }}
        });
        let created = command(self.addr, "POST", "/session", Some(capabilities)).await;
        let session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session in {created}"))
            .to_string();
        Page {
            driver: self.addr,
            session,
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profiles);
    }
}

/// One browser window. Dropping it ends the session, which closes Chromium.
pub struct Page {
    driver: SocketAddr,
    session: String,
}

impl Page {
    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn resize(&self, width: u32, height: u32) {
        let rect = json!({"width": width, "height": height});
        command(self.driver, "POST", &self.path("/window/rect"), Some(rect)).await;
    }

    pub async fn goto(&self, url: &str) {
        command(
            self.driver,
            "POST",
            &self.path("/url"),
            Some(json!({"url": url})),
        )
        .await;
    }

    /// The first element matching `css`, waiting for it to appear.
    pub async fn find(&self, css: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let found = self.find_all(css).await;
            if let Some(first) = found.into_iter().next() {
                return first;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no element matches {css:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every element matching `css` now.
    pub async fn find_all(&self, css: &str) -> Vec<String> {
        let found = command(
            self.driver,
            "POST",
            &self.path("/elements"),
            Some(json!({"using": "css selector", "value": css})),
        )
        .await;
        found
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT_KEY].as_str().map(str::to_string))
            .collect()
    }

    /// Clicks into the field, clears it and types `text` key by key.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        let at = |rest: &str| self.path(&format!("/element/{element}{rest}"));
        command(self.driver, "POST", &at("/clear"), Some(json!({}))).await;
        command(
            self.driver,
            "POST",
            &at("/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    pub async fn click(&self, css: &str) {
        let element = self.find(css).await;
        command(
            self.driver,
            "POST",
            &self.path(&format!("/element/{element}/click")),
            Some(json!({})),
        )
        .await;
    }

    /// The rendered text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        let element = self.find(css).await;
        self.element_text(&element).await
    }

    pub async fn element_text(&self, element: &str) -> String {
        let value = command(
            self.driver,
            "GET",
            &self.path(&format!("/element/{element}/text")),
            None,
        )
        .await;
        value.as_str().unwrap_or_default().to_string()
    }

    pub async fn attribute(&self, element: &str, name: &str) -> Option<String> {
        let value = command(
            self.driver,
            "GET",
            &self.path(&format!("/element/{element}/attribute/{name}")),
            None,
        )
        .await;
        value.as_str().map(str::to_string)
    }

    /// Waits until the text of `css` is `expected`.
    pub async fn wait_for_text(&self, css: &str, expected: &str) {
        let deadline = tokio::time::Instant::now() + WAIT * 3;
        loop {
            let found = self.find_all(css).await;
            let text = match found.first() {
                Some(element) => self.element_text(element).await,
                None => String::new(),
            };
            if text == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} shows {text:?}, not {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads `attribute` of every element matching `css`, in page order
    /// (one script, so a list cannot change between reads).
    pub async fn attributes(&self, css: &str, attribute: &str) -> Vec<String> {
        let script = "return Array.from(document.querySelectorAll(arguments[0]))\
                      .map(e => e.getAttribute(arguments[1]) || '');";
        let value = command(
            self.driver,
            "POST",
            &self.path("/execute/sync"),
            Some(json!({"script": script, "args": [css, attribute]})),
        )
        .await;
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }

    /// Writes a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let value = command(self.driver, "GET", &self.path("/screenshot"), None).await;
        let png = decode_base64(value.as_str().expect("base64 screenshot"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artifact dir");
        }
        std::fs::write(path, png).expect("screenshot written");
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // Synchronous on purpose: drop cannot await, and the session must
        // end (closing its Chromium) even when the test failed.
        let _ = blocking_delete(self.driver, &format!("/session/{}", self.session));
    }
}

/// One WebDriver command; panics on a WebDriver error, with its message.
async fn command(driver: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let (status, text) = try_request(driver, method, path, body)
        .await
        .unwrap_or_else(|err| panic!("{method} {path}: {err}"));
    let reply: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: {status} {text}"));
    assert_eq!(status, 200, "{method} {path}: {reply}");
    reply["value"].clone()
}

async fn try_request(
    driver: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, String), String> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let headers: &[(&str, &str)] = if body.is_empty() {
        &[]
    } else {
        &[("content-type", "application/json")]
    };
    let (status, text) = http_request(driver, method, path, headers, &body).await;
    if status == 0 {
        return Err("no HTTP answer".into());
    }
    Ok((status, text))
}

fn blocking_delete(driver: SocketAddr, path: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&driver, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "DELETE {path} HTTP/1.1\r\nHost: {driver}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    // The status line is enough: chromedriver answers once the browser is
    // gone, and keeps the connection open afterwards.
    let mut status_line = [0u8; 12];
    stream.read_exact(&mut status_line)?;
    Ok(())
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let sextets: Vec<u8> = text.bytes().filter_map(value).collect();
    sextets
        .chunks(4)
        .flat_map(|chunk| {
            let bits = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, s)| acc | (u32::from(*s) << (18 - 6 * i)));
            let bytes = bits.to_be_bytes();
            bytes[1..chunk.len()].to_vec()
        })
        .collect()
}

#[test]
fn base64_decodes_with_and_without_padding() {
    assert_eq!(decode_base64("aGVsbG8="), b"hello");
    assert_eq!(decode_base64("aGk="), b"hi");
    assert_eq!(decode_base64("YWJj"), b"abc");
}
