//! Honey tokens for `[detect.canary]`: fresh values for the sandbox's environment, and
//! credential-shaped files for its workspace, made anew for every session.
//!
//! Guarantees:
//! - Every token is fresh kernel randomness (`getrandom`), drawn without bias from its
//!   alphabet, different in every session, with at least 16 random characters: a match in
//!   outbound traffic is never a coincidence.
//! - A file's shape follows its name ([`Shape::of`]) and reads like the real credential file it
//!   imitates; every secret-looking value in it is a token handed to the gateway's scanners.
//! - Tokens outside the key files are letters and digits only, so percent-encoding (a token in
//!   a URL) leaves them as they are.
//! - Nothing here prints a token: [`CanaryFile`]'s `Debug` and the [`CanaryReport`] name paths
//!   and shapes only.

use base64::Engine as _;
use cordon_gateway::detect::canary::{Canary, CanarySource};
use serde::Serialize;

/// Why the tokens could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("canary tokens: no randomness from the kernel: {0}")]
    Random(String),
}

/// What a canary file imitates, decided by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// `credentials`: an AWS shared credentials file (access key id and secret key).
    AwsCredentials,
    /// `.netrc`, `_netrc`: a login and password for a machine.
    Netrc,
    /// `id_*` (but not `*.pub`): an OpenSSH ed25519 private key.
    OpensshKey,
    /// `*.pem`, `*.key`: a PEM PKCS#8 private key.
    PemKey,
    /// `*.json`: Google application-default credentials (`authorized_user`).
    GcloudJson,
    /// Anything else (`.env`, `.env.production`, `secrets.txt`, …): `NAME=value` lines.
    Dotenv,
}

impl Shape {
    /// The shape a file named `path` gets.
    pub fn of(path: &str) -> Shape {
        let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
        match name.as_str() {
            "credentials" => Shape::AwsCredentials,
            ".netrc" | "_netrc" => Shape::Netrc,
            n if n.starts_with("id_") && !n.ends_with(".pub") => Shape::OpensshKey,
            n if n.ends_with(".pem") || n.ends_with(".key") => Shape::PemKey,
            n if n.ends_with(".json") => Shape::GcloudJson,
            _ => Shape::Dotenv,
        }
    }
}

/// One canary file, ready to plant.
#[derive(Clone)]
pub struct CanaryFile {
    /// Relative to `/workspace`, as the policy lists it.
    pub path: String,
    pub shape: Shape,
    pub contents: Vec<u8>,
    /// The values in `contents` the gateway looks for.
    pub tokens: Vec<String>,
}

impl std::fmt::Debug for CanaryFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CanaryFile")
            .field("path", &self.path)
            .field("shape", &self.shape)
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const UPPER_B32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const LOWER_ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const DIGITS: &[u8] = b"0123456789";

/// A source of random bytes: the kernel's, or a fixed one in tests.
struct Random<'a> {
    fill: &'a mut dyn FnMut(&mut [u8]) -> Result<(), CanaryError>,
}

impl Random<'_> {
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, CanaryError> {
        let mut buf = vec![0u8; n];
        (self.fill)(&mut buf)?;
        Ok(buf)
    }

    /// `n` characters of `alphabet`, each uniformly chosen (bytes past the largest multiple of
    /// the alphabet's size are drawn again).
    fn chars(&mut self, alphabet: &[u8], n: usize) -> Result<String, CanaryError> {
        let limit = 256 - 256 % alphabet.len();
        let mut out = String::with_capacity(n);
        while out.len() < n {
            for b in self.bytes(n - out.len() + 8)? {
                if usize::from(b) < limit && out.len() < n {
                    out.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
                }
            }
        }
        Ok(out)
    }
}

/// Makes the canary files the policy lists, each with fresh tokens.
pub fn make_files(paths: &[String]) -> Result<Vec<CanaryFile>, CanaryError> {
    let mut kernel =
        |buf: &mut [u8]| getrandom::fill(buf).map_err(|e| CanaryError::Random(e.to_string()));
    let mut random = Random { fill: &mut kernel };
    paths.iter().map(|p| make_file(p, &mut random)).collect()
}

fn make_file(path: &str, r: &mut Random<'_>) -> Result<CanaryFile, CanaryError> {
    let shape = Shape::of(path);
    let (text, tokens) = match shape {
        Shape::AwsCredentials => {
            let id = format!("AKIA{}", r.chars(UPPER_B32, 16)?);
            let secret = r.chars(ALNUM, 40)?;
            let text = format!(
                "[default]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\nregion = us-east-1\n"
            );
            (text, vec![id, secret])
        }
        Shape::Netrc => {
            // A machine under `.internal` (reserved for private use): no tool of a benign
            // workload sends this login anywhere on its own.
            let password = r.chars(ALNUM, 40)?;
            let text =
                format!("machine git.corp.internal\n  login deploy\n  password {password}\n");
            (text, vec![password])
        }
        Shape::OpensshKey => {
            let blob = openssh_ed25519(r)?;
            pem("OPENSSH PRIVATE KEY", &blob, 70)
        }
        Shape::PemKey => {
            // The DER header of a 2048-bit RSA key in PKCS#8, then random bytes.
            const HEAD: [u8; 38] = [
                0x30, 0x82, 0x04, 0xbd, 0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48,
                0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00, 0x04, 0x82, 0x04, 0xa7, 0x30, 0x82,
                0x04, 0xa3, 0x02, 0x01, 0x00, 0x02, 0x82, 0x01, 0x01, 0x00,
            ];
            let mut der = HEAD.to_vec();
            der.extend(r.bytes(1217 - HEAD.len())?);
            pem("PRIVATE KEY", &der, 64)
        }
        Shape::GcloudJson => {
            let client = format!(
                "{}-{}.apps.googleusercontent.com",
                r.chars(DIGITS, 12)?,
                r.chars(LOWER_ALNUM, 32)?
            );
            let secret = r.chars(ALNUM, 28)?;
            let refresh = r.chars(ALNUM, 100)?;
            let project = r.chars(DIGITS, 6)?;
            let text = format!(
                "{{\n  \"account\": \"\",\n  \"client_id\": \"{client}\",\n  \"client_secret\": \"GOCSPX-{secret}\",\n  \"quota_project_id\": \"prod-data-{project}\",\n  \"refresh_token\": \"1//0{refresh}\",\n  \"type\": \"authorized_user\",\n  \"universe_domain\": \"googleapis.com\"\n}}\n"
            );
            (text, vec![secret, refresh])
        }
        Shape::Dotenv => {
            let db = r.chars(ALNUM, 24)?;
            let api = r.chars(ALNUM, 40)?;
            let secret = r.chars(ALNUM, 50)?;
            let text = format!(
                "# Production settings. Do not commit.\nAPP_ENV=production\nDATABASE_URL=postgres://app:{db}@db.corp.internal:5432/app\nAPI_KEY={api}\nSECRET_KEY={secret}\n"
            );
            (text, vec![db, api, secret])
        }
    };
    Ok(CanaryFile {
        path: path.to_owned(),
        shape,
        contents: text.into_bytes(),
        tokens,
    })
}

/// `-----BEGIN LABEL-----`, the base64 of `der` in lines of `width`, `-----END LABEL-----`.
/// The tokens are the second to fourth lines: the first holds mostly fixed header bytes, and
/// an exfiltrated key starts at its beginning (a body prefix is what the gateway sees first).
fn pem(label: &str, der: &[u8], width: usize) -> (String, Vec<String>) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(width)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    let mut text = format!("-----BEGIN {label}-----\n");
    for l in &lines {
        text.push_str(l);
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    let tokens = lines
        .iter()
        .skip(1)
        .take(3)
        .map(|l| (*l).to_owned())
        .collect();
    (text, tokens)
}

/// An unencrypted OpenSSH private key file's binary form (`openssh-key-v1`) for a random
/// ed25519 key pair-shaped value. It parses as a key file; it is not a usable key.
fn openssh_ed25519(r: &mut Random<'_>) -> Result<Vec<u8>, CanaryError> {
    fn string(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend((bytes.len() as u32).to_be_bytes());
        out.extend(bytes);
    }
    let public = r.bytes(32)?;
    let seed = r.bytes(32)?;
    let check = r.bytes(4)?;
    let mut pubblob = Vec::new();
    string(&mut pubblob, b"ssh-ed25519");
    string(&mut pubblob, &public);
    let mut private = Vec::new();
    private.extend(&check);
    private.extend(&check);
    string(&mut private, b"ssh-ed25519");
    string(&mut private, &public);
    string(&mut private, &[seed.as_slice(), public.as_slice()].concat());
    string(&mut private, b"deploy@build-01");
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }
    let mut blob = b"openssh-key-v1\0".to_vec();
    string(&mut blob, b"none");
    string(&mut blob, b"none");
    string(&mut blob, b"");
    blob.extend(1u32.to_be_bytes());
    string(&mut blob, &pubblob);
    string(&mut blob, &private);
    Ok(blob)
}

/// The honey tokens of a session, by where they were placed, for the gateway.
pub fn for_gateway(env: &[(String, String)], files: &[CanaryFile]) -> Vec<Canary> {
    let env = env.iter().map(|(name, token)| Canary {
        source: CanarySource::Env(name.clone()),
        token: token.clone(),
    });
    let files = files.iter().flat_map(|f| {
        f.tokens.iter().map(|t| Canary {
            source: CanarySource::File(f.path.clone()),
            token: t.clone(),
        })
    });
    env.chain(files).collect()
}

/// A canary file that was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlantedFile {
    pub path: String,
    pub shape: Shape,
}

/// A canary file that was not placed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedFile {
    pub path: String,
    pub reason: String,
}

/// What the session's honey tokens are, by name (never a token): the result's `canaries` and
/// the `session_start` record's `detail.canaries`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CanaryReport {
    /// Variables that hold a token.
    pub env: Vec<String>,
    /// Files planted in `/workspace`.
    pub files: Vec<PlantedFile>,
    /// Files of the policy that were not planted.
    pub skipped: Vec<SkippedFile>,
}

impl CanaryReport {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.files.is_empty() && self.skipped.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> impl FnMut(&mut [u8]) -> Result<(), CanaryError> {
        let mut n = 0u8;
        move |buf: &mut [u8]| {
            for b in buf {
                *b = n;
                n = n.wrapping_add(97);
            }
            Ok(())
        }
    }

    fn make(path: &str) -> CanaryFile {
        let mut f = fixed();
        make_file(path, &mut Random { fill: &mut f }).unwrap()
    }

    fn text(f: &CanaryFile) -> String {
        String::from_utf8(f.contents.clone()).unwrap()
    }

    #[test]
    fn the_shape_follows_the_file_name() {
        for (path, shape) in [
            (".aws/credentials", Shape::AwsCredentials),
            ("deploy/.netrc", Shape::Netrc),
            ("_netrc", Shape::Netrc),
            (".ssh/id_ed25519", Shape::OpensshKey),
            (".ssh/id_rsa", Shape::OpensshKey),
            (".ssh/id_rsa.pub", Shape::Dotenv),
            ("certs/server.key", Shape::PemKey),
            ("tls.PEM", Shape::PemKey),
            (
                ".config/gcloud/application_default_credentials.json",
                Shape::GcloudJson,
            ),
            (".env", Shape::Dotenv),
            (".env.production", Shape::Dotenv),
            ("secrets.txt", Shape::Dotenv),
        ] {
            assert_eq!(Shape::of(path), shape, "{path}");
        }
    }

    #[test]
    fn every_token_is_in_its_file_and_long_enough_to_be_unique() {
        for path in [
            ".aws/credentials",
            ".netrc",
            ".ssh/id_ed25519",
            "server.pem",
            "adc.json",
            ".env",
        ] {
            let f = make(path);
            let body = text(&f);
            assert!(!f.tokens.is_empty(), "{path}");
            for t in &f.tokens {
                assert!(body.contains(t.as_str()), "{path}: token not in the file");
                assert!(t.len() >= 16, "{path}: {t}");
            }
        }
    }

    #[test]
    fn files_read_like_the_credentials_they_imitate() {
        let aws = text(&make(".aws/credentials"));
        let lines: Vec<&str> = aws.lines().collect();
        assert_eq!(lines[0], "[default]");
        let id = lines[1].strip_prefix("aws_access_key_id = AKIA").unwrap();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| UPPER_B32.contains(&b)));
        let secret = lines[2].strip_prefix("aws_secret_access_key = ").unwrap();
        assert_eq!(secret.len(), 40);

        let env = text(&make(".env"));
        assert!(env
            .lines()
            .any(|l| l.starts_with("API_KEY=") && l.len() == 48));

        let netrc = text(&make(".netrc"));
        assert!(netrc.starts_with("machine git.corp.internal\n  login deploy\n  password "));

        let json: serde_json::Value = serde_json::from_slice(&make("adc.json").contents).unwrap();
        assert_eq!(json["type"], "authorized_user");
        assert!(json["client_secret"]
            .as_str()
            .unwrap()
            .starts_with("GOCSPX-"));

        let key = text(&make(".ssh/id_ed25519"));
        assert!(key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(key.ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
        let b64: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert!(blob.starts_with(b"openssh-key-v1\0\0\0\0\x04none\0\0\0\x04none"));
        assert!(key
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .all(|l| l.len() <= 70));

        let pem = text(&make("server.key"));
        assert!(pem.starts_with(
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ"
        ));
    }

    #[test]
    fn random_characters_come_only_from_their_alphabet() {
        let mut f = fixed();
        let mut r = Random { fill: &mut f };
        let s = r.chars(DIGITS, 500).unwrap();
        assert_eq!(s.len(), 500);
        assert!(s.bytes().all(|b| b.is_ascii_digit()));
    }

    #[test]
    fn kernel_tokens_differ_between_sessions() {
        let a = make_files(&[".env".into()]).unwrap();
        let b = make_files(&[".env".into()]).unwrap();
        assert_ne!(a[0].tokens, b[0].tokens);
        assert!(!format!("{:?}", a[0]).contains(&a[0].tokens[0]));
    }

    #[test]
    fn the_gateway_gets_every_token_under_its_source() {
        let files = vec![make(".env"), make(".aws/credentials")];
        let all = for_gateway(&[("X_KEY".into(), "t0ken-value-0123".into())], &files);
        assert_eq!(all.len(), 1 + 3 + 2);
        assert_eq!(all[0].source, CanarySource::Env("X_KEY".into()));
        assert_eq!(all[1].source, CanarySource::File(".env".into()));
        assert_eq!(all[5].source, CanarySource::File(".aws/credentials".into()));
    }
}
