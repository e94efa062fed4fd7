//! Attribution of traffic to sessions: one fixed session (sandbox mode), or proxy tokens
//! (standalone mode).
//!
//! Guarantees:
//! - Tokens are 256 bits from the OS random source, so they cannot be guessed.
//! - A request is attributed to a session only by an exact token match; a missing, malformed or
//!   unknown token never falls back to some default session.
//! - Each token's session has its own budgets and blocked-attempt count.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use thiserror::Error;

use crate::budget::BudgetLimits;
use crate::event::SessionInfo;
use crate::session::Session;

/// The user name clients put in `Proxy-Authorization: Basic base64(cordon:<token>)`.
pub const TOKEN_USER: &str = "cordon";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the OS random source failed: {0}")]
    Random(String),
}

#[derive(Debug)]
pub(crate) enum Attribution {
    Fixed(Arc<Session>),
    Tokens {
        sessions: RwLock<HashMap<String, Arc<Session>>>,
        limits: BudgetLimits,
        enforce: bool,
        detect: Box<cordon_policy::DetectPolicy>,
    },
}

/// Why a request could not be attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    Missing,
    Invalid,
}

impl Attribution {
    /// The session for a request carrying `proxy_authorization` (the header value, if any).
    pub fn session_for(
        &self,
        proxy_authorization: Option<&[u8]>,
    ) -> Result<Arc<Session>, AuthFailure> {
        match self {
            Attribution::Fixed(s) => Ok(s.clone()),
            Attribution::Tokens { sessions, .. } => {
                let header = proxy_authorization.ok_or(AuthFailure::Missing)?;
                let token = token_from_header(header).ok_or(AuthFailure::Invalid)?;
                let map = match sessions.read() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                map.get(&token).cloned().ok_or(AuthFailure::Invalid)
            }
        }
    }

    /// The only session, in sandbox mode.
    pub fn fixed(&self) -> Option<&Arc<Session>> {
        match self {
            Attribution::Fixed(s) => Some(s),
            Attribution::Tokens { .. } => None,
        }
    }

    /// The session whose id is `id` (sandbox mode: the one session; standalone: any issued one).
    pub fn by_id(&self, id: &str) -> Option<Arc<Session>> {
        match self {
            Attribution::Fixed(s) => (s.info.id == id).then(|| s.clone()),
            Attribution::Tokens { sessions, .. } => {
                let map = match sessions.read() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                map.values().find(|s| s.info.id == id).cloned()
            }
        }
    }

    /// Makes a new session with its own budgets and returns its token.
    pub fn issue(&self, info: SessionInfo) -> Result<String, TokenError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        if let Attribution::Tokens {
            sessions,
            limits,
            enforce,
            detect,
        } = self
        {
            let detector = crate::detect::Detector::new((**detect).clone(), &[]);
            let session = Arc::new(Session::new(info, *limits, *enforce, detector));
            let mut map = match sessions.write() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            map.insert(token.clone(), session);
        }
        Ok(token)
    }

    /// Forgets a token; later requests carrying it get 407.
    pub fn revoke(&self, token: &str) -> bool {
        match self {
            Attribution::Fixed(_) => false,
            Attribution::Tokens { sessions, .. } => {
                let mut map = match sessions.write() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                match map.remove(token) {
                    Some(session) => {
                        session.revoke();
                        true
                    }
                    None => false,
                }
            }
        }
    }
}

/// Extracts the token from `Basic base64(cordon:<token>)` or `Bearer <token>`.
pub(crate) fn token_from_header(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then(|| rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, token) = decoded.split_once(':')?;
        return (user == TOKEN_USER && !token.is_empty()).then(|| token.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Attribution {
        Attribution::Tokens {
            sessions: RwLock::new(HashMap::new()),
            limits: BudgetLimits::default(),
            enforce: true,
            detect: Default::default(),
        }
    }

    fn info(id: &str) -> SessionInfo {
        SessionInfo {
            id: id.into(),
            user: "u".into(),
            code_sha256: "c".into(),
        }
    }

    #[test]
    fn basic_and_bearer_headers_carry_the_token() {
        let basic = base64::engine::general_purpose::STANDARD.encode("cordon:tok123");
        assert_eq!(
            token_from_header(format!("Basic {basic}").as_bytes()),
            Some("tok123".into())
        );
        assert_eq!(token_from_header(b"Bearer tok123"), Some("tok123".into()));
        let wrong_user = base64::engine::general_purpose::STANDARD.encode("root:tok123");
        assert_eq!(
            token_from_header(format!("Basic {wrong_user}").as_bytes()),
            None
        );
        assert_eq!(token_from_header(b"Digest x"), None);
        assert_eq!(token_from_header(b"Basic !!!"), None);
    }

    #[test]
    fn issued_tokens_name_their_own_session_and_unknown_ones_name_none() {
        let a = tokens();
        let t1 = a.issue(info("s1")).unwrap();
        let t2 = a.issue(info("s2")).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(t1.len(), 43);
        let s1 = a
            .session_for(Some(format!("Bearer {t1}").as_bytes()))
            .unwrap();
        let s2 = a
            .session_for(Some(format!("Bearer {t2}").as_bytes()))
            .unwrap();
        assert_eq!(s1.info.id, "s1");
        assert_eq!(s2.info.id, "s2");
        assert_eq!(a.session_for(None).err(), Some(AuthFailure::Missing));
        assert_eq!(
            a.session_for(Some(b"Bearer nope")).err(),
            Some(AuthFailure::Invalid)
        );
        assert!(a.revoke(&t1));
        assert_eq!(
            a.session_for(Some(format!("Bearer {t1}").as_bytes())).err(),
            Some(AuthFailure::Invalid)
        );
    }
}
