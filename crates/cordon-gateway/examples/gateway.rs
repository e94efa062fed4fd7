//! Runs the gateway's explicit proxy on its own, for benchmarks and manual tests.
//!
//! ```text
//! cargo run --release -p cordon-gateway --example gateway -- \
//!     --listen 127.0.0.1:3128 --allow-private 127.0.0.1/32:18080 [--allow ENTRY]... \
//!     [--sink noop|jsonl:PATH] [--threads N]
//! ```
//!
//! Budgets are set high enough not to interfere with a benchmark. `--sink noop` drops events;
//! `--sink jsonl:PATH` sends them through a `ChannelSink` to a writer thread that appends one
//! JSON line per event to PATH (the same shape of work as the audit writer: a channel hop and a
//! serialisation per event). Ctrl-C stops it and prints the gateway's totals.

use std::io::Write;
use std::sync::Arc;

use cordon_gateway::{
    ChannelSink, EventSink, Gateway, GatewayConfig, Listeners, NoopSink, SessionInfo,
};
use cordon_policy::size::ByteSize;
use cordon_policy::{AllowEntry, NetworkPolicy, OnExceed, RateLimits, ResponsePolicy};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:3128".to_owned();
    let mut allow = Vec::new();
    let mut allow_private = Vec::new();
    let mut sink_spec = "noop".to_owned();
    let mut threads = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--listen" => listen = value()?,
            "--allow" => allow.push(AllowEntry::parse(&value()?)?),
            "--allow-private" => allow_private.push(AllowEntry::parse(&value()?)?),
            "--sink" => sink_spec = value()?,
            "--threads" => threads = value()?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let policy = NetworkPolicy {
        allow,
        allow_private,
        rate: RateLimits {
            requests_per_minute: u32::MAX,
            requests_per_minute_per_host: u32::MAX,
            max_connections: 100_000,
            max_bytes_out: ByteSize(u64::MAX),
            max_bytes_in: ByteSize(u64::MAX),
            on_exceed: OnExceed::Block,
        },
        ..NetworkPolicy::default()
    };
    let session = SessionInfo {
        id: "bench".into(),
        user: "bench".into(),
        code_sha256: String::new(),
    };
    let config = GatewayConfig::new(
        policy,
        ResponsePolicy {
            terminate_after_blocked: 0,
        },
        session,
    );

    let (sink, writer): (Arc<dyn EventSink>, Option<std::thread::JoinHandle<u64>>) = match sink_spec
        .strip_prefix("jsonl:")
    {
        None if sink_spec == "noop" => (Arc::new(NoopSink), None),
        None => anyhow::bail!("--sink must be noop or jsonl:PATH"),
        Some(path) => {
            let (sink, rx) = ChannelSink::new();
            let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
            let handle = std::thread::spawn(move || {
                let mut n = 0u64;
                for e in rx {
                    if serde_json::to_writer(&mut out, &e).is_ok() && out.write_all(b"\n").is_ok() {
                        n += 1;
                    }
                }
                let _ = out.flush();
                n
            });
            (Arc::new(sink), Some(handle))
        }
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let stats = rt.block_on(async move {
        let gateway = Gateway::new(config)?;
        let http = std::net::TcpListener::bind(&listen)?;
        eprintln!("gateway proxy listening on {}", http.local_addr()?);
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            c.cancel();
        });
        let listeners = Listeners {
            http: Some(http),
            ..Listeners::default()
        };
        anyhow::Ok(gateway.serve(listeners, sink, cancel).await?)
    })?;
    drop(rt);
    if let Some(w) = writer {
        let written = w
            .join()
            .map_err(|_| anyhow::anyhow!("event writer panicked"))?;
        eprintln!("{written} events written");
    }
    eprintln!("{}", serde_json::to_string(&stats)?);
    Ok(())
}
