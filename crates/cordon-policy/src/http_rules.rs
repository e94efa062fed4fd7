//! Method/path rules for HTTP requests the gateway can read (plain HTTP and intercepted TLS).
//!
//! Guarantees:
//! - A request path is matched only after normalisation: the query and fragment are cut off,
//!   percent-escapes are decoded (an encoded `/` is a `/`, an encoded `.` is a `.`), `\` counts
//!   as `/`, duplicate slashes are collapsed and `.`/`..` segments are resolved (never above the
//!   root). A path that cannot be normalised unambiguously — a bad escape, an escape that decodes
//!   to another escape (double encoding), a control character or NUL — is refused, never matched
//!   in some other form.
//! - A glob is matched against the whole normalised path; `*` matches any run of characters,
//!   `/` included. Globs are written decoded and normalised (the reader refuses `%`, `//`, `.`
//!   and `..` segments in them), so a glob and a path are always compared in the same form.
//! - Methods are compared exactly (HTTP methods are case-sensitive); `"*"` is any method.

use serde::{Serialize, Serializer};

use crate::error::quoted;
use crate::host::HostName;

/// One `[[network.rules]]` entry: requests to `host` are allowed only if some rule for the host
/// allows their method and path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRule {
    #[serde(serialize_with = "serialize_host")]
    pub host: HostName,
    /// Upper-case method tokens, or `["*"]` for any.
    pub methods: Vec<String>,
    /// Globs over the normalised path.
    pub paths: Vec<String>,
}

fn serialize_host<S: Serializer>(host: &HostName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(host.as_str())
}

impl HttpRule {
    /// True if this rule allows `method` on the normalised `path`.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        self.methods.iter().any(|m| m == "*" || m == method)
            && self
                .paths
                .iter()
                .any(|g| glob_match(g.as_bytes(), path.as_bytes()))
    }

    /// The rule id recorded in the audit: `rules:host METHODS PATHS`.
    pub fn id(&self) -> String {
        format!(
            "rules:{} {} {}",
            self.host,
            self.methods.join(","),
            self.paths.join(",")
        )
    }
}

/// Why a request path could not be normalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    #[error("the path is percent-encoded twice")]
    DoubleEncoded,
    #[error("the path holds a control character")]
    Control,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_escape(b: &[u8]) -> bool {
    b.len() >= 3 && b[0] == b'%' && hex(b[1]).is_some() && hex(b[2]).is_some()
}

/// The normalised form of a request target's path (see the module documentation). Non-UTF-8
/// decoded bytes are kept as U+FFFD, which no glob character matches but `*`.
pub fn normalize_path(target: &str) -> Result<String, PathError> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let (h, l) = match (
                raw.get(i + 1).and_then(|&c| hex(c)),
                raw.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(h), Some(l)) => (h, l),
                _ => return Err(PathError::BadEscape),
            };
            decoded.push(h << 4 | l);
            i += 3;
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    if decoded.windows(3).any(is_escape) {
        return Err(PathError::DoubleEncoded);
    }
    if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(PathError::Control);
    }
    let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = text.split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" => trailing_slash = n == last,
            "." => trailing_slash = n == last,
            ".." => {
                out.pop();
                trailing_slash = n == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut norm = String::with_capacity(text.len());
    for seg in &out {
        norm.push('/');
        norm.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        norm.push('/');
    }
    Ok(norm)
}

/// True if `glob` matches all of `text`; `*` matches any run of bytes.
pub fn glob_match(glob: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard matching with one backtrack point: linear in practice, never exponential.
    let (mut g, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if g < glob.len() && glob[g] == b'*' {
            star = Some((g, t));
            g += 1;
        } else if g < glob.len() && glob[g] == text[t] {
            g += 1;
            t += 1;
        } else if let Some((sg, st)) = star {
            g = sg + 1;
            t = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    glob[g..].iter().all(|&c| c == b'*')
}

/// A method in a rule: an HTTP token in upper case, or `*`.
pub(crate) fn method(text: &str) -> Result<String, String> {
    if text == "*" {
        return Ok(text.to_owned());
    }
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "{} is not an HTTP method: use upper-case letters like \"GET\", or \"*\"",
            quoted(text)
        ));
    }
    Ok(text.to_owned())
}

/// A path glob in a rule: absolute, written in normalised, decoded form.
pub(crate) fn path_glob(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!(
            "{} must start with '/' (a path glob like \"/repos/*\")",
            quoted(text)
        ));
    }
    if text.contains(['%', '?', '#', '\\']) || text.chars().any(char::is_control) {
        return Err(format!(
            "{} must be written decoded, without '%', '?', '#' or '\\' (paths are percent-decoded before matching)",
            quoted(text)
        ));
    }
    if text.contains("//") || text.split('/').any(|s| s == "." || s == "..") {
        return Err(format!(
            "{} must be normalised: no \"//\", \".\" or \"..\" segments (requests are normalised before matching)",
            quoted(text)
        ));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_decodes_escapes_collapses_slashes_and_resolves_dot_segments() {
        let n = |p| normalize_path(p).unwrap();
        assert_eq!(n("/repos/a"), "/repos/a");
        assert_eq!(n("/repos/a?x=1#f"), "/repos/a");
        assert_eq!(n("//repos///a"), "/repos/a");
        assert_eq!(n("/repos/./a/../b"), "/repos/b");
        assert_eq!(n("/repos/../../admin"), "/admin");
        assert_eq!(n("/%72epos/a"), "/repos/a");
        assert_eq!(n("/repos%2F..%2Fadmin"), "/admin");
        assert_eq!(n("/repos/%2e%2e/admin"), "/admin");
        assert_eq!(n("/repos\\..\\admin"), "/admin");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/a/"), "/a/");
        assert_eq!(n("/a/.."), "/");
        assert_eq!(n("/a/b/.."), "/a/");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(normalize_path("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(
            normalize_path("/a%252e%252e/x"),
            Err(PathError::DoubleEncoded)
        );
        assert_eq!(normalize_path("/a%00b"), Err(PathError::Control));
        assert_eq!(normalize_path("/a%0d%0ab"), Err(PathError::Control));
        assert_eq!(normalize_path("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn globs_match_the_whole_path_and_star_crosses_slashes() {
        assert!(glob_match(b"/repos/*", b"/repos/a/b"));
        assert!(glob_match(b"/zen", b"/zen"));
        assert!(!glob_match(b"/zen", b"/zen/x"));
        assert!(!glob_match(b"/repos/*", b"/repos"));
        assert!(glob_match(b"/*/issues", b"/a/b/issues"));
        assert!(!glob_match(b"/*/issues", b"/a/b/issues/1"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"/a*b*c", b"/aXXbYYc"));
        assert!(!glob_match(b"/a*b*c", b"/aXXbYYd"));
    }

    #[test]
    fn a_rule_allows_its_methods_on_its_paths_only() {
        let rule = HttpRule {
            host: HostName::parse("api.github.com").unwrap(),
            methods: vec!["GET".into()],
            paths: vec!["/repos/*".into(), "/zen".into()],
        };
        assert!(rule.allows("GET", "/zen"));
        assert!(rule.allows("GET", "/repos/x"));
        assert!(!rule.allows("POST", "/zen"));
        assert!(!rule.allows("get", "/zen"));
        assert!(!rule.allows("GET", "/user"));
    }

    #[test]
    fn rule_values_are_checked() {
        assert!(method("GET").is_ok());
        assert!(method("*").is_ok());
        assert!(method("get").is_err());
        assert!(method("").is_err());
        assert!(path_glob("/repos/*").is_ok());
        assert!(path_glob("repos").is_err());
        assert!(path_glob("/a%2Fb").is_err());
        assert!(path_glob("/a//b").is_err());
        assert!(path_glob("/a/../b").is_err());
    }

    proptest::proptest! {
        #[test]
        fn normalised_paths_are_fixed_points(path in "/[a-z./%2Ee\\\\]{0,24}") {
            if let Ok(n) = normalize_path(&path) {
                proptest::prop_assert_eq!(normalize_path(&n), Ok(n.clone()));
                proptest::prop_assert!(!n.contains("//"));
                proptest::prop_assert!(!n.split('/').any(|s| s == "." || s == ".."));
            }
        }
    }
}
