//! Sustained insert rate through `AuditWriter` (quoted in docs/benchmarks.md).
//!
//! ```text
//! cargo run --release -p cordon-audit --example insert_rate -- [EVENTS] [--producers N] [--sync-full] [--path FILE] [--process]
//! ```
//!
//! Producers record realistic `http_request` events as fast as the writer commits them: each
//! producer keeps the backlog (recorded − committed) under half the channel, so the number is the
//! writer's sustained rate, not the rate of filling a queue. It also reports how long `record`
//! itself takes (sampled), which is what the gateway's data path pays. `--process` gives every
//! event a process attribution (pid, exe, a three-argument command line), as `cordon run`'s
//! network events have.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_audit::{
    Attribution, AuditWriter, EventKind, Store, StoreOptions, Verdict, WriterConfig,
};

struct Args {
    events: usize,
    producers: usize,
    sync_full: bool,
    path: Option<std::path::PathBuf>,
    process: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        events: 500_000,
        producers: 1,
        sync_full: false,
        path: None,
        process: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--producers" => {
                args.producers = it
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--producers needs a number"))?
                    .parse()?;
            }
            "--sync-full" => args.sync_full = true,
            "--process" => args.process = true,
            "--path" => {
                args.path = Some(
                    it.next()
                        .ok_or_else(|| anyhow::anyhow!("--path needs a file"))?
                        .into(),
                );
            }
            n => args.events = n.parse()?,
        }
    }
    anyhow::ensure!(args.producers > 0, "--producers must be at least 1");
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dir = tempfile::tempdir()?;
    let path = args
        .path
        .clone()
        .unwrap_or_else(|| dir.path().join("audit.db"));
    let config = WriterConfig {
        store: StoreOptions {
            synchronous_full: args.sync_full,
            ..StoreOptions::default()
        },
        ..WriterConfig::default()
    };
    let backlog_limit = (config.capacity / 2) as u64;
    let writer = Arc::new(AuditWriter::open_with(&path, config)?);
    let per_producer = args.events / args.producers;
    let total = per_producer * args.producers;

    let started = Instant::now();
    let producers: Vec<_> = (0..args.producers)
        .map(|p| {
            let writer = Arc::clone(&writer);
            let process = args.process.then(|| cordon_audit::ProcessInfo {
                pid: 42,
                exe: "/usr/bin/python3.11".into(),
                cmdline: vec!["python3".into(), "fetch.py".into(), "--all".into()],
            });
            std::thread::spawn(move || {
                let who = Attribution {
                    session_id: format!("01JBENCH{p:04}"),
                    user_id: "bench".into(),
                    code_sha256: cordon_audit::sha256_hex(b"bench"),
                };
                let mut samples = Vec::with_capacity(per_producer / 100 + 1);
                for i in 0..per_producer {
                    while {
                        let s = writer.stats();
                        s.recorded.saturating_sub(s.committed) > backlog_limit
                    } {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    let mut e = who.event(EventKind::HttpRequest);
                    e.host = Some("api.github.com".into());
                    e.ip = Some(std::net::IpAddr::from([140, 82, 121, 6]));
                    e.port = Some(443);
                    e.method = Some("GET".into());
                    e.path = Some(format!("/repos/cordon/cordon/releases/{i}"));
                    e.bytes_up = Some(312);
                    e.bytes_down = Some(4096 + i as u64 % 1000);
                    e.duration_ms = Some(12);
                    e.verdict = Some(Verdict::Allow);
                    e.rule = Some("allow api.github.com:443".into());
                    e.process = process.clone();
                    if i % 100 == 0 {
                        let t = Instant::now();
                        writer.record(e);
                        samples.push(t.elapsed());
                    } else {
                        writer.record(e);
                    }
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for p in producers {
        samples.extend(p.join().map_err(|_| anyhow::anyhow!("producer panicked"))?);
    }
    let writer = Arc::into_inner(writer).ok_or_else(|| anyhow::anyhow!("writer still shared"))?;
    let stats = writer.close()?;
    let elapsed = started.elapsed();

    samples.sort_unstable();
    let pct = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "insert_rate: {total} events{}, {} producer(s), synchronous={}: {rate:.0} events/s \
         ({:.2} s; {} transactions, {:.0} events/transaction; dropped {}, failed {})",
        if args.process { " with a process" } else { "" },
        args.producers,
        if args.sync_full { "FULL" } else { "NORMAL" },
        elapsed.as_secs_f64(),
        stats.batches,
        stats.committed as f64 / stats.batches.max(1) as f64,
        stats.dropped,
        stats.failed,
    );
    println!(
        "record() latency (sampled 1/100): p50 {:?}, p99 {:?}, max {:?}",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    let store = Store::open_existing(&path)?;
    let verify_started = Instant::now();
    let report = store.verify()?;
    anyhow::ensure!(report.is_ok(), "chain does not verify: {report:?}");
    println!(
        "verify: {} records in {:.2} s; file {:.1} MiB",
        report.checked,
        verify_started.elapsed().as_secs_f64(),
        std::fs::metadata(&path)?.len() as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
