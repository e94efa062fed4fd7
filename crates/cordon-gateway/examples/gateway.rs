//! Runs the gateway's explicit proxy on its own, for benchmarks and manual tests.
//!
//! ```text
//! cargo run --release -p cordon-gateway --example gateway -- \
//!     --listen 127.0.0.1:3128 --allow-private 127.0.0.1/32:18080 [--allow ENTRY]... \
//!     [--sink noop|jsonl:PATH|audit:PATH] [--threads N] [--runtime multi|current] [--detect on|off]
//! ```
//!
//! Budgets are set high enough not to interfere with a benchmark. `--sink noop` drops events;
//! `--sink jsonl:PATH` sends them through a `ChannelSink` to a writer thread that appends one
//! JSON line per event to PATH; `--sink audit:PATH` records them in a cordon audit store at PATH
//! through `cordon_audit::AuditWriter` (SQLite, hash-chained, batched on its own thread), with
//! the same conversion the `cordon` binary uses — auditing as in production. `--runtime
//! current` serves on a single-threaded runtime (`--threads` is then ignored). `--detect on`
//! (the default) runs every detection rule at its default thresholds with `response = "log"`
//! and the byte thresholds out of reach, plus four honey tokens to look for, so the rules count
//! every event and every request head is scanned, but nothing changes the data path; `--detect off` disables them all. Ctrl-C stops it and prints the gateway's totals
//! (and the audit writer's).

use std::io::Write;
use std::sync::Arc;

use cordon_gateway::{
    ChannelSink, EventSink, Gateway, GatewayConfig, Listeners, NetEvent, NoopSink, SessionInfo,
};
use cordon_policy::size::ByteSize;
use cordon_policy::{AllowEntry, DetectPolicy, NetworkPolicy, OnExceed, RateLimits, Response};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:3128".to_owned();
    let mut allow = Vec::new();
    let mut allow_private = Vec::new();
    let mut sink_spec = "noop".to_owned();
    let mut threads = 1usize;
    let mut current = false;
    let mut detect = true;
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
            "--detect" => {
                detect = match value()?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => anyhow::bail!("--detect must be on or off, not {other}"),
                }
            }
            "--runtime" => {
                current = match value()?.as_str() {
                    "current" => true,
                    "multi" => false,
                    other => anyhow::bail!("--runtime must be multi or current, not {other}"),
                }
            }
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
    let mut rules = DetectPolicy::default();
    rules.blocked.enabled = false;
    rules.dns_tunnel.enabled = detect;
    rules.exfil.enabled = detect;
    rules.exfil.response = Response::Log;
    rules.exfil.bytes_out = ByteSize(u64::MAX);
    rules.exfil.max_request_body = ByteSize(u64::MAX);
    rules.exfil.distinct_hosts = u32::MAX;
    rules.exfil.small_requests = u32::MAX;
    rules.sandbox.enabled = false;
    let mut config = GatewayConfig::new(policy, rules, session);
    if detect {
        // A session with honey tokens: one canary variable and the three tokens of a `.env`
        // canary file, so every request head is also scanned for them.
        use cordon_gateway::detect::canary::{new_token, Canary, CanarySource};
        let sources = [
            CanarySource::Env("AWS_SECRET_ACCESS_KEY".into()),
            CanarySource::File(".env".into()),
            CanarySource::File(".env".into()),
            CanarySource::File(".env".into()),
        ];
        for source in sources {
            config.canaries.push(Canary {
                source,
                token: new_token()?,
            });
        }
    }

    let mut writer: Option<std::thread::JoinHandle<u64>> = None;
    let mut audit: Option<Arc<cordon_audit::AuditWriter>> = None;
    let sink: Arc<dyn EventSink> = if sink_spec == "noop" {
        Arc::new(NoopSink)
    } else if let Some(path) = sink_spec.strip_prefix("jsonl:") {
        let (sink, rx) = ChannelSink::new();
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        writer = Some(std::thread::spawn(move || {
            let mut n = 0u64;
            for e in rx {
                if serde_json::to_writer(&mut out, &e).is_ok() && out.write_all(b"\n").is_ok() {
                    n += 1;
                }
            }
            let _ = out.flush();
            n
        }));
        Arc::new(sink)
    } else if let Some(path) = sink_spec.strip_prefix("audit:") {
        let w = Arc::new(cordon_audit::AuditWriter::open(path)?);
        audit = Some(w.clone());
        Arc::new(AuditSink(w))
    } else {
        anyhow::bail!("--sink must be noop, jsonl:PATH or audit:PATH");
    };

    let mut builder = if current {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads.max(1));
        b
    };
    let rt = builder.enable_all().build()?;
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
    if let Some(w) = audit {
        match Arc::try_unwrap(w) {
            Ok(w) => eprintln!("audit writer: {:?}", w.close()),
            Err(_) => eprintln!("audit writer still shared; not closed"),
        }
    }
    eprintln!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

/// Gateway events into the audit store, converted as the `cordon` binary does.
struct AuditSink(Arc<cordon_audit::AuditWriter>);

impl EventSink for AuditSink {
    fn record(&self, e: NetEvent) {
        use cordon_audit::{Event, EventKind, Timestamp, Verdict};
        use cordon_gateway::event as gw;
        let kind = match e.kind {
            gw::EventKind::DnsQuery => EventKind::DnsQuery,
            gw::EventKind::Connection => EventKind::Connection,
            gw::EventKind::HttpRequest => EventKind::HttpRequest,
            gw::EventKind::Blocked => EventKind::Blocked,
            gw::EventKind::BudgetExhausted => EventKind::BudgetExhausted,
            gw::EventKind::Alert => EventKind::Alert,
        };
        let mut ev = Event::new(kind, e.session.id, e.session.user, e.session.code_sha256);
        let ms =
            e.ts.duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0);
        ev.ts = Timestamp::from_millis(ms);
        ev.host = e.host;
        ev.ip = e.ip;
        ev.port = e.port;
        ev.method = e.method;
        ev.path = e.path;
        ev.bytes_up = Some(e.bytes_up);
        ev.bytes_down = Some(e.bytes_down);
        ev.duration_ms = Some(e.duration_ms);
        ev.verdict = Some(match e.verdict {
            gw::Verdict::Allow => Verdict::Allow,
            gw::Verdict::Block => Verdict::Block,
            gw::Verdict::ReportWouldBlock => Verdict::ReportWouldBlock,
        });
        ev.rule = Some(e.rule);
        ev.reason = e.reason;
        ev.detail = serde_json::json!({ "via": e.via });
        self.0.record(ev);
    }
}
