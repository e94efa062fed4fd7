//! A fast HTTP/1.1 origin for the gateway benchmark (`bench/gateway.sh`).
//!
//! ```text
//! cargo run --release -p cordon-gateway --example origin -- [ADDR] [THREADS]
//! ```
//!
//! ADDR defaults to 127.0.0.1:18080 and must be a loopback address (benchmarks never leave the
//! machine). Endpoints: `GET /` (a small response), `GET /big?bytes=N` (N bytes, streamed in 64 KiB
//! chunks), `POST /echo` (answers with the number of body bytes received).

#[path = "../tests/common/origin.rs"]
mod origin;

use std::net::SocketAddr;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18080".into())
        .parse()?;
    anyhow::ensure!(addr.ip().is_loopback(), "{addr} is not a loopback address");
    let threads: usize = args.next().map_or(Ok(1), |t| t.parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("origin listening on {}", listener.local_addr()?);
        origin::serve(listener, Arc::new(origin::OriginStats::default())).await;
        Ok(())
    })
}
