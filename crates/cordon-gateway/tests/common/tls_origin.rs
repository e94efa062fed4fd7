//! A fake HTTPS origin with its own CA, for interception tests: it records every request it
//! receives (head and body) and answers with a JSON-ish echo of the `Authorization` header, the
//! query and the body — so a test can see both what reached it and what the client got back.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A CA for fake origins.
pub struct TestCa {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.to_owned());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server config for `names`, signed by this CA, speaking only HTTP/1.1.
    pub fn server(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        self.server_alpn(names, &[b"http/1.1"])
    }

    /// Like [`TestCa::server`], offering `h2` before `http/1.1` (the origin speaks what the
    /// client picks).
    pub fn server_h2(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        self.server_alpn(names, &[b"h2", b"http/1.1"])
    }

    /// Like [`TestCa::server`], accepting only the key exchange `groups` (a client whose first
    /// key share is another group gets a HelloRetryRequest).
    pub fn server_groups(
        &self,
        names: &[&str],
        groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
    ) -> Arc<rustls::ServerConfig> {
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: groups,
            ..rustls::crypto::ring::default_provider()
        };
        self.server_with(names, &[b"http/1.1"], provider)
    }

    fn server_alpn(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        self.server_with(names, alpn, rustls::crypto::ring::default_provider())
    }

    fn server_with(
        &self,
        names: &[&str],
        alpn: &[&[u8]],
        provider: rustls::crypto::CryptoProvider,
    ) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

fn never(n: Infallible) -> hyper::Error {
    match n {}
}

/// A body of one data frame and a trailers frame.
struct WithTrailers(Option<Bytes>, Option<hyper::HeaderMap>);

impl hyper::body::Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let frame = match self.0.take() {
            Some(d) => Some(hyper::body::Frame::data(d)),
            None => self.1.take().map(hyper::body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

/// One request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct TlsOrigin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsOrigin {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Serves HTTPS with `config` on `addr`.
    pub async fn start(addr: SocketAddr, config: Arc<rustls::ServerConfig>) -> TlsOrigin {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let acceptor = TlsAcceptor::from(config);
        let log = seen.clone();
        let accepted: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let acceptor = acceptor.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            if req.uri().path().ends_with("/duplex") {
                                // Full duplex: the request body streams straight back as the
                                // response body, the head going out at once.
                                return Ok(hyper::Response::new(req.into_body().boxed()));
                            }
                            let version = format!("{:?}", req.version());
                            let method = req.method().to_string();
                            let uri = req.uri().to_string();
                            let headers: Vec<(String, String)> = req
                                .headers()
                                .iter()
                                .map(|(n, v)| {
                                    (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                                })
                                .collect();
                            let body = req.into_body().collect().await?.to_bytes().to_vec();
                            let auth = headers
                                .iter()
                                .find(|(n, _)| n == "authorization")
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default();
                            let echo = format!(
                                "method={method} uri={uri} version={version} authorization={auth} body={}",
                                String::from_utf8_lossy(&body)
                            );
                            let te = headers
                                .iter()
                                .find(|(n, _)| n == "te")
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default();
                            let grpc = uri.ends_with("/grpc");
                            log.lock().unwrap().push(Seen {
                                version,
                                method,
                                uri,
                                headers,
                                body,
                            });
                            let builder = hyper::Response::builder().header("x-echo-auth", &auth);
                            let resp = if grpc {
                                // gRPC-shaped: the status (and an echo) in trailers.
                                let mut trailers = hyper::HeaderMap::new();
                                trailers.insert("grpc-status", "0".parse().unwrap());
                                trailers.insert("x-echo-auth-trailer", auth.parse().unwrap());
                                builder
                                    .header("x-echo-te", te)
                                    .header("content-type", "application/grpc")
                                    .body(
                                        WithTrailers(Some(Bytes::from(echo)), Some(trailers))
                                            .map_err(never)
                                            .boxed(),
                                    )
                                    .unwrap()
                            } else {
                                builder
                                    .body(Full::new(Bytes::from(echo)).map_err(never).boxed())
                                    .unwrap()
                            };
                            Ok::<_, hyper::Error>(resp)
                        }
                    });
                    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
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
        TlsOrigin {
            addr,
            seen,
            accepted,
        }
    }
}
