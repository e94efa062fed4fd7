//! What the store costs per audited event, for measuring under `valgrind --tool=callgrind`
//! (instruction counts do not depend on the machine's load; docs/benchmarks.md).
//!
//! ```text
//! cargo build --release -p cordon-audit --example append_cost
//! valgrind --tool=callgrind target/release/examples/append_cost EVENTS [--batch N] [--process]
//! ```
//!
//! Appends EVENTS events shaped like the standalone gateway's (`http_request`, one session,
//! host/ip/port/method/path, bytes, verdict, rule, `{"via":"proxy"}` detail) to a new store in
//! temp space, `--batch` events per transaction (default 256: about what the audit writer commits
//! per 5 ms window at 50,000 requests/s), through [`Store::append`] directly, so the count is
//! deterministic. Run it for two sizes and divide the difference by the difference in events to
//! get the per-event cost without start-up. `--process` gives every event a process attribution,
//! as `cordon run`'s network events have.

use cordon_audit::{Attribution, Event, EventKind, ProcessInfo, Store, Timestamp, Verdict};

fn main() -> anyhow::Result<()> {
    let mut events = 10_000usize;
    let mut batch = 256usize;
    let mut process = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--batch" => {
                batch = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--batch needs a number"))?
                    .parse()?;
            }
            "--process" => process = true,
            n => events = n.parse()?,
        }
    }
    anyhow::ensure!(batch > 0, "--batch must be at least 1");
    let dir = tempfile::tempdir()?;
    let mut store = Store::open(dir.path().join("audit.db"))?;
    let who = Attribution {
        session_id: "01JD5Q7Z8X9Y0ABCDEFGHJKMNP".into(),
        user_id: "bench".into(),
        code_sha256: cordon_audit::sha256_hex(b"gateway"),
    };
    let base = Timestamp::now().as_millis();
    let event = |i: usize| -> Event {
        let mut e = who.event(EventKind::HttpRequest);
        e.ts = Timestamp::from_millis(base + (i / 50) as i64);
        e.host = Some("127.0.0.1".into());
        e.ip = "127.0.0.1".parse().ok();
        e.port = Some(34567);
        e.method = Some("GET".into());
        e.path = Some("/".into());
        e.bytes_up = Some(118);
        e.bytes_down = Some(163);
        e.duration_ms = Some(0);
        e.verdict = Some(Verdict::Allow);
        e.rule = Some("allow_private 127.0.0.1/32:34567".into());
        e.detail = serde_json::json!({ "via": "proxy" });
        if process {
            e.process = Some(ProcessInfo {
                pid: 42,
                exe: "/usr/bin/python3.11".into(),
                cmdline: vec!["python3".into(), "fetch.py".into(), "--all".into()],
            });
        }
        e
    };
    let mut done = 0;
    while done < events {
        let n = batch.min(events - done);
        let chunk: Vec<Event> = (done..done + n).map(event).collect();
        store.append(&chunk)?;
        done += n;
    }
    Ok(())
}
