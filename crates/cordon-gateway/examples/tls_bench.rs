//! HTTPS through an explicit proxy, for bench/tls.sh: a TLS origin, the gateway with and without
//! interception, a keep-alive HTTPS client that measures requests/s and latency through any
//! CONNECT proxy (mitmproxy included), and the DLP scanner's throughput. Loopback only.
//!
//!   tls_bench origin DIR                 HTTPS origin (HTTP/1.1 and HTTP/2, by ALPN) for
//!                                        `localhost` on 127.0.0.1; writes
//!                                        DIR/origin-ca.pem, prints its port, serves until stdin
//!                                        closes
//!   tls_bench gateway MODE ORIGIN_CA DIR gateway on 127.0.0.1 (MODE: intercept | tunnel), no
//!                                        audit sink; writes DIR/session-ca.pem (intercept),
//!                                        prints its port, serves until stdin closes
//!   tls_bench client PROXY PORT CA CONNS SECS
//!                                        CONNS keep-alive connections through PROXY (CONNECT
//!                                        localhost:PORT), GET /small for SECS; prints one JSON line
//!   tls_bench client-h2 PROXY PORT CA CONNS SECS STREAMS
//!                                        the same over HTTP/2 (ALPN `h2` only, hyper's client):
//!                                        STREAMS requests in flight on each connection
//!   tls_bench dlp MIB                    scans MIB MiB through the request-body scanner; prints
//!                                        one JSON line

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cordon_gateway::creds::{LiveCredential, Secret};
use cordon_gateway::dlp::{Kind, Scanner, Stream};
use cordon_gateway::resolve::{Resolve, ResolveFuture};
use cordon_gateway::tls::{pem_certs, upstream_config, SessionCa};
use cordon_gateway::{
    Gateway, GatewayConfig, InterceptConfig, Listeners, NoopSink, SessionInfo, Upstream,
};
use cordon_policy::host::HostName;
use cordon_policy::{AllowEntry, ByteSize, NetworkPolicy, RateLimits};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn wait_stdin_closed() {
    let mut buf = [0u8; 64];
    while std::io::stdin()
        .read(&mut buf)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
}

async fn origin(dir: &str) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    // Distinct subject names: OpenSSL (mitmproxy) takes a leaf whose subject equals its issuer
    // for a self-signed certificate.
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tls_bench origin CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).unwrap();
    std::fs::write(format!("{dir}/origin-ca.pem"), ca.pem()).unwrap();
    let issuer = Issuer::new(params, key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"hello from the benchmark origin: sixty-four bytes of body......\n",
                    ))))
                });
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                }
            });
        }
    });
    tokio::task::spawn_blocking(wait_stdin_closed)
        .await
        .unwrap();
}

struct Loopback;

impl Resolve for Loopback {
    fn resolve<'a>(&'a self, _name: &'a HostName) -> ResolveFuture<'a> {
        Box::pin(async { Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]) })
    }
}

async fn gateway(mode: &str, origin_ca: &str, dir: &str) {
    let entry = |s: &str| AllowEntry::parse(s).unwrap();
    let policy = NetworkPolicy {
        allow: vec![entry("localhost:*")],
        allow_private: vec![entry("127.0.0.1/32:*")],
        rate: RateLimits {
            requests_per_minute: u32::MAX,
            requests_per_minute_per_host: u32::MAX,
            max_connections: 100_000,
            max_bytes_out: ByteSize(1 << 50),
            max_bytes_in: ByteSize(1 << 50),
            ..RateLimits::default()
        },
        ..NetworkPolicy::default()
    };
    let session = SessionInfo {
        id: "bench".into(),
        user: "bench".into(),
        code_sha256: String::new(),
    };
    // The detection rules judge traffic volume per session; a benchmark is all volume. Off, so
    // that what is measured is the proxy path itself.
    let mut detect = cordon_policy::DetectPolicy::default();
    detect.blocked.enabled = false;
    detect.dns_tunnel.enabled = false;
    detect.exfil.enabled = false;
    let mut config = GatewayConfig::new(policy.clone(), detect, session);
    config.upstream = Upstream::Custom(Arc::new(Loopback));
    if mode == "intercept" {
        let hosts = vec![cordon_policy::InterceptHost::parse("localhost").unwrap()];
        let ca = SessionCa::generate("bench", &hosts).unwrap();
        std::fs::write(format!("{dir}/session-ca.pem"), ca.cert_pem()).unwrap();
        let origin_roots = pem_certs(&std::fs::read(origin_ca).unwrap());
        // One credential, so that the swap and the response redaction are on the measured path.
        let cred = LiveCredential {
            spec: cordon_policy::Credential {
                name: "bench".into(),
                hosts: vec![HostName::parse("localhost").unwrap()],
                inject: cordon_policy::Injection::Header("Authorization".into()),
                format: "Bearer {secret}".into(),
                source: cordon_policy::SecretSource::Env("X".into()),
                env: "X".into(),
                require: false,
            },
            placeholder: "cordon-placeholder-00000000000000000000000000000000".into(),
            secret: Secret::new("bench-secret-value-0123456789"),
        };
        config.intercept = Some(Arc::new(InterceptConfig {
            ca,
            hosts,
            credentials: vec![cred],
            upstream: upstream_config(&[], &origin_roots).unwrap(),
            max_scan_bytes: cordon_gateway::DEFAULT_MAX_SCAN_BYTES,
        }));
    }
    let gw = Gateway::new(config).unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", http.local_addr().unwrap().port());
    let cancel = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn({
        let (gw, cancel) = (gw.clone(), cancel.clone());
        async move {
            gw.serve(
                Listeners {
                    http: Some(http),
                    ..Listeners::default()
                },
                Arc::new(NoopSink),
                cancel,
            )
            .await
        }
    });
    tokio::task::spawn_blocking(wait_stdin_closed)
        .await
        .unwrap();
    cancel.cancel();
    let _ = served.await;
}

/// A TCP connection through the proxy's CONNECT to localhost:`port`.
async fn connect_through(proxy: SocketAddr, port: u16) -> TcpStream {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(
        format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

async fn one_connection(
    proxy: SocketAddr,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    until: Instant,
) -> Vec<u32> {
    let tcp = connect_through(proxy, port).await;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut s = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let req = format!(
        "GET /small HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer cordon-placeholder-00000000000000000000000000000000\r\n\r\n"
    );
    let mut lat = Vec::new();
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    while Instant::now() < until {
        let t = Instant::now();
        s.write_all(req.as_bytes()).await.unwrap();
        buf.clear();
        let (head_end, len) = loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                assert!(text.starts_with("http/1.1 200"), "{text}");
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                break (i + 4, len);
            }
        };
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        lat.push(t.elapsed().as_micros() as u32);
    }
    lat
}

/// One HTTP/2 connection with `streams` request loops on it.
async fn one_h2_connection(
    proxy: SocketAddr,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    until: Instant,
    streams: usize,
) -> Vec<u32> {
    let tcp = connect_through(proxy, port).await;
    let s = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "no HTTP/2");
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let loops: Vec<_> = (0..streams)
        .map(|_| {
            let mut send = send.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let req = hyper::Request::get(format!("https://localhost:{port}/small"))
                        .header(
                            "authorization",
                            "Bearer cordon-placeholder-00000000000000000000000000000000",
                        )
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let resp = send.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                    lat.push(t.elapsed().as_micros() as u32);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for l in loops {
        lat.extend(l.await.unwrap());
    }
    lat
}

async fn client(proxy: &str, port: u16, ca: &str, conns: usize, secs: u64, h2: Option<usize>) {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(&std::fs::read(ca).unwrap()) {
        roots.add(c).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = match h2 {
        Some(_) => vec![b"h2".to_vec()],
        None => vec![b"http/1.1".to_vec()],
    };
    let config = Arc::new(config);
    let proxy: SocketAddr = proxy.parse().unwrap();
    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| match h2 {
            Some(streams) => tokio::spawn(one_h2_connection(
                proxy,
                port,
                config.clone(),
                until,
                streams,
            )),
            None => tokio::spawn(one_connection(proxy, port, config.clone(), until)),
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!(
        "{{\"requests\":{},\"rps\":{:.0},\"p50_us\":{},\"p99_us\":{}}}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
}

fn dlp(mib: usize) {
    let scanner = std::sync::Arc::new(Scanner::new(
        vec![
            (
                Kind::Secret,
                "secret:a".into(),
                b"bench-secret-value-0123456789".to_vec(),
            ),
            (
                Kind::Placeholder,
                "placeholder:a".into(),
                b"cordon-placeholder-00000000000000000000000000000000".to_vec(),
            ),
        ],
        /*formats*/ true,
    ));
    // JSON-ish text: letters, digits, quotes and separators, no match.
    let unit: Vec<u8> = (0..64 * 1024u32)
        .map(|i| b"{\"key\": \"value-abcdefghij\", \"n\": 12345}, "[(i % 40) as usize])
        .collect();
    let total = mib * 1024 * 1024;
    let t = Instant::now();
    let mut st = Stream::new(scanner, u64::MAX, false);
    let mut done = 0;
    let mut out = 0;
    while done < total {
        out += st.push(&unit).unwrap().len();
        done += unit.len();
    }
    out += st.finish().unwrap().len();
    assert_eq!(out, done);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"mib\":{mib},\"seconds\":{secs:.3},\"mib_per_s\":{:.1},\"ms_per_mib\":{:.2}}}",
        mib as f64 / secs,
        secs * 1000.0 / mib as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The gateway gets what `cordon run` gives it (crates/cordon/src/gateway_run.rs: two
    // workers); the client and the origin one each.
    let workers = if args.get(1).map(String::as_str) == Some("gateway") {
        2
    } else {
        1
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    match args.get(1).map(String::as_str) {
        Some("origin") => rt.block_on(origin(&args[2])),
        Some("gateway") => rt.block_on(gateway(&args[2], &args[3], &args[4])),
        Some("client") => rt.block_on(client(
            &args[2],
            args[3].parse().unwrap(),
            &args[4],
            args[5].parse().unwrap(),
            args[6].parse().unwrap(),
            None,
        )),
        Some("client-h2") => rt.block_on(client(
            &args[2],
            args[3].parse().unwrap(),
            &args[4],
            args[5].parse().unwrap(),
            args[6].parse().unwrap(),
            Some(args[7].parse().unwrap()),
        )),
        Some("dlp") => dlp(args[2].parse().unwrap()),
        _ => {
            eprintln!("usage: see the header of examples/tls_bench.rs");
            std::process::exit(2);
        }
    }
}
