//! A small, fast HTTP/1.1 origin: used by the integration tests and by `examples/origin.rs`
//! (the benchmark's origin).
//!
//! - `GET /big?bytes=N` streams N bytes (64 KiB chunks);
//! - `POST /echo` answers with the number of body bytes it received;
//! - `GET /headers` answers with the names of the request headers it received;
//! - anything else answers `origin: host=<Host> path=<path>`.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Counts what the origin saw.
#[derive(Debug, Default)]
pub struct OriginStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
}

impl OriginStats {
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

const CHUNK: usize = 64 * 1024;

fn big(n: u64) -> OriginBody {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let stream = futures_lite_stream(n, chunk);
    BodyExt::boxed(StreamBody::new(stream))
}

/// A stream of frames totalling `n` bytes, without a futures dependency.
fn futures_lite_stream(
    n: u64,
    chunk: Bytes,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    struct S {
        left: u64,
        chunk: Bytes,
    }
    impl futures_core::Stream for S {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            if self.left == 0 {
                return std::task::Poll::Ready(None);
            }
            let n = self.left.min(self.chunk.len() as u64) as usize;
            self.left -= n as u64;
            let data = self.chunk.slice(..n);
            std::task::Poll::Ready(Some(Ok(Frame::data(data))))
        }
    }
    S { left: n, chunk }
}

fn text(s: String) -> OriginBody {
    BodyExt::boxed(Full::new(Bytes::from(s)))
}

async fn handle(
    req: Request<Incoming>,
    stats: Arc<OriginStats>,
) -> Result<Response<OriginBody>, Infallible> {
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    if path == "/big" {
        let n = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let mut resp = Response::new(big(n));
        resp.headers_mut()
            .insert(hyper::header::CONTENT_LENGTH, n.into());
        return Ok(resp);
    }
    if path == "/headers" {
        let mut names: Vec<String> = req
            .headers()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect();
        names.sort();
        return Ok(Response::new(text(names.join(","))));
    }
    if path == "/echo" {
        let n = match req.into_body().collect().await {
            Ok(b) => b.to_bytes().len(),
            Err(_) => 0,
        };
        return Ok(Response::new(text(format!("received {n} bytes"))));
    }
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    Ok(Response::new(text(format!(
        "origin: host={host} path={pq}"
    ))))
}

/// Serves the origin on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, stats: Arc<OriginStats>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let stats = stats.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, stats.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds `addr` and serves the origin in a background task.
pub async fn spawn(addr: SocketAddr) -> std::io::Result<(SocketAddr, Arc<OriginStats>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let stats = Arc::new(OriginStats::default());
    tokio::spawn(serve(listener, stats.clone()));
    Ok((local, stats))
}
