//! The `roomcast` binary: reads the configuration, sets up logging, runs one
//! node until SIGTERM or SIGINT, then drains it.

use std::process::ExitCode;

use clap::Parser;
use roomcast::config::{Command, LogFormat, TokenArgs};
use roomcast::{Config, Node};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = Config::parse().without_empty_entries();
    match &config.command {
        Some(Command::Token(args)) => return print_token(&config, args),
        Some(Command::Healthcheck) => return healthcheck(&config),
        None => {}
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("roomcast: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let node = match Node::start(config).await {
        Ok(node) => node,
        Err(err) => {
            tracing::error!(error = %err, "cannot start");
            eprintln!("roomcast: {err}");
            return ExitCode::FAILURE;
        }
    };
    let addr = node.addr();
    // Plain stdout line, for people and for scripts that start nodes on port 0.
    println!("roomcast listening on http://{addr}/ (WebSocket: ws://{addr}/ws)");
    let signal = shutdown_signal().await;
    tracing::info!(signal, "shutting down");
    node.shutdown().await;
    ExitCode::SUCCESS
}

fn print_token(config: &Config, args: &TokenArgs) -> ExitCode {
    if let Err(err @ roomcast::config::ConfigError::WeakSecret) = config.validate() {
        eprintln!("roomcast token: {err}");
        return ExitCode::FAILURE;
    }
    let Some(secret) = &config.jwt_secret else {
        eprintln!("roomcast token: set JWT_SECRET (tokens for JWT_PUBLIC_KEY are signed by your identity provider)");
        return ExitCode::FAILURE;
    };
    let now = roomcast::protocol::now_ms() / 1000;
    match roomcast::auth::mint_hs256(
        secret,
        args,
        config.jwt_audience.as_deref(),
        config.jwt_issuer.as_deref(),
        now,
    ) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("roomcast token: {err}");
            ExitCode::FAILURE
        }
    }
}

/// GET /healthz on this node's own port, with plain std I/O.
fn healthcheck(config: &Config) -> ExitCode {
    use std::io::{Read, Write};
    let mut addr = config.bind;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = std::time::Duration::from_secs(2);
    let answer = std::net::TcpStream::connect_timeout(&addr, timeout).and_then(|mut stream| {
        stream.set_read_timeout(Some(timeout))?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    });
    match answer {
        Ok(response) if response.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("unhealthy: {}", response.lines().next().unwrap_or(""));
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("unhealthy: {addr}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|err| {
        eprintln!(
            "roomcast: bad log filter {:?} ({err}); using \"info\"",
            config.log_filter
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
