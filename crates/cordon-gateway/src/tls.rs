//! TLS for interception: the per-session CA, leaf certificates, and upstream verification.
//!
//! Guarantees:
//! - The session CA is generated in memory for one session (ECDSA P-256, valid from one hour
//!   before creation for at most [`CA_LIFETIME`]); its private key never leaves this process —
//!   there is no function that returns it. Only its certificate (PEM) is handed out, for the
//!   sandbox's trust bundle.
//! - The CA carries X.509 name constraints: DNS names only under the interceptable hosts
//!   (permitted subtrees), and no IP address at all (all of IPv4 and IPv6 excluded), with
//!   `pathLenConstraint = 0`. A verifier that honours name constraints (OpenSSL, rustls/webpki,
//!   Go, NSS) refuses any certificate it signs for another name, so a leaked CA key can only
//!   impersonate hosts the policy already sends through the gateway.
//! - Leaf certificates are minted on first use per host name and cached for the session; each
//!   names exactly that host (subjectAltName) and is for server authentication only.
//! - Upstream TLS is verified against the host's trust store (the system bundle) plus the roots
//!   the gateway was explicitly configured with ([`crate::config::InterceptConfig`]), by
//!   rustls with the `ring` provider; there is no option to skip verification.
//! - ALPN: the leaf side offers `h2` and `http/1.1` (the client picks; a client that offers
//!   nothing gets HTTP/1.1). Upstream, [`upstream_config`] offers only `http/1.1` (the HTTP/1.1
//!   path speaks nothing else) and [`offering_h2`] the same verification offering `h2` and
//!   `http/1.1` (for HTTP/2 clients; the server picks).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cordon_policy::host::HostName;
use cordon_policy::InterceptHost;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;

/// How long a session CA (and every leaf it signs) is valid: the longest session is a day.
pub const CA_LIFETIME: Duration = Duration::from_secs(25 * 3600);

/// The ALPN names of HTTP/2 and HTTP/1.1.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_H1: &[u8] = b"http/1.1";

/// Where the host's trust store is read from.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("generating the session CA: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot read the trust store {path}: {source}")]
    TrustStore {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no usable certificate in it")]
    NoCertificates { path: String },
    #[error("nothing to intercept: the session CA needs at least one host")]
    NoHosts,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A session's certificate authority.
pub struct SessionCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// One key for every leaf of the session (as mitmproxy does): minting a leaf costs a
    /// signature, not a key generation.
    leaf_key: KeyPair,
    leaves: Mutex<HashMap<HostName, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for SessionCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCa").finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::seconds(CA_LIFETIME.as_secs() as i64);
}

impl SessionCa {
    /// A new CA whose name constraints permit exactly `hosts` (and their subdomains: an X.509
    /// DNS-name constraint always covers the subtree).
    pub fn generate(session_id: &str, hosts: &[InterceptHost]) -> Result<SessionCa, TlsError> {
        if hosts.is_empty() {
            return Err(TlsError::NoHosts);
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        let shown: String = session_id.chars().take(40).collect();
        dn.push(DnType::CommonName, format!("cordon session CA {shown}"));
        dn.push(DnType::OrganizationName, "cordon");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut permitted: Vec<GeneralSubtree> = Vec::new();
        for h in hosts {
            let name = match h {
                InterceptHost::Name(n) | InterceptHost::Subdomains(n) => n.to_string(),
            };
            if !permitted
                .iter()
                .any(|p| matches!(p, GeneralSubtree::DnsName(d) if *d == name))
            {
                permitted.push(GeneralSubtree::DnsName(name));
            }
        }
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: permitted,
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
        validity(&mut params);
        let cert = params.self_signed(&key)?;
        Ok(SessionCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            leaf_key: KeyPair::generate()?,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM: public, for trust bundles.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The server side of an intercepted connection to `host`: a leaf for it, minted once.
    pub fn server_config(&self, host: &HostName) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut leaves = match self.leaves.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = leaves.get(host) {
            return Ok(c.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, host.to_string());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let leaf = params.signed_by(&self.leaf_key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let chain = vec![leaf.der().clone()];
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_H1.to_vec()];
        let config = Arc::new(config);
        leaves.insert(host.clone(), config.clone());
        Ok(config)
    }
}

/// Certificates from a PEM file.
pub fn read_pem_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::TrustStore {
        path: path.to_owned(),
        source,
    })?;
    let certs = pem_certs(&text);
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Every `CERTIFICATE` block of PEM text; other blocks and malformed ones are skipped.
pub fn pem_certs(text: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(text)
        .filter_map(Result::ok)
        .collect()
}

/// The client side towards real servers: the host's trust store plus `extra_roots`.
pub fn upstream_config(
    system: &[CertificateDer<'static>],
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    // A bundle may hold certificates webpki cannot use; those are skipped, as every TLS client
    // does with the system bundle.
    roots.add_parsable_certificates(system.iter().cloned());
    for root in extra_roots {
        roots.add(root.clone())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H1.to_vec()];
    Ok(Arc::new(config))
}

/// `config` (same roots, same verification) offering `h2` before `http/1.1`.
pub fn offering_h2(config: &rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    let mut c = config.clone();
    c.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_H1.to_vec()];
    Arc::new(c)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn verifier(ca: &SessionCa) -> Arc<rustls::ClientConfig> {
        upstream_config(&[], &pem_certs(ca.cert_pem().as_bytes())).unwrap()
    }

    /// Runs a TLS handshake in memory between `client` (for `name`) and `server`.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        name: &str,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let sn = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut c = rustls::ClientConnection::new(client, sn).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    #[test]
    fn a_minted_leaf_is_trusted_for_its_host() {
        let ca =
            SessionCa::generate("s", &[InterceptHost::parse("api.example.com").unwrap()]).unwrap();
        let host = HostName::parse("api.example.com").unwrap();
        let server = ca.server_config(&host).unwrap();
        handshake(verifier(&ca), "api.example.com", server.clone()).unwrap();
        // Cached: the same config comes back.
        assert!(Arc::ptr_eq(&server, &ca.server_config(&host).unwrap()));
    }

    #[test]
    fn the_name_constraints_refuse_a_leaf_for_another_host() {
        let ca =
            SessionCa::generate("s", &[InterceptHost::parse("api.example.com").unwrap()]).unwrap();
        // Minting for a host outside the constraints is possible (the gateway never asks), but
        // no verifier accepts the result.
        let evil = HostName::parse("bank.example.org").unwrap();
        let server = ca.server_config(&evil).unwrap();
        let err = handshake(verifier(&ca), "bank.example.org", server).unwrap_err();
        assert!(
            format!("{err:?}").contains("NameConstraint")
                || format!("{err:?}").contains("InvalidCertificate"),
            "{err:?}"
        );
    }

    #[test]
    fn the_ca_pem_is_public_and_holds_no_key() {
        let ca =
            SessionCa::generate("s", &[InterceptHost::parse("a.example.com").unwrap()]).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!ca.cert_pem().contains("PRIVATE KEY"));
        assert!(SessionCa::generate("s", &[]).is_err());
    }

    #[test]
    fn an_unknown_upstream_ca_fails_verification() {
        let ca =
            SessionCa::generate("s", &[InterceptHost::parse("a.example.com").unwrap()]).unwrap();
        let other =
            SessionCa::generate("t", &[InterceptHost::parse("a.example.com").unwrap()]).unwrap();
        let host = HostName::parse("a.example.com").unwrap();
        let err = handshake(
            verifier(&other),
            "a.example.com",
            ca.server_config(&host).unwrap(),
        )
        .unwrap_err();
        assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    }
}
