//! What each policy value may be: the one definition, shared by the TOML reader (which adds line
//! and column), the command-line overrides (which add the flag) and [`crate::Policy::validate`]
//! (which checks a policy built in code).
//!
//! Guarantees: a value that passes these rules is safe to hand to the sandbox and the gateway as
//! is — no limit is zero where the kernel reads zero as "unlimited", no uid is 0 or -1, no mount
//! covers the sandbox's own /, /proc, /dev, /sys, /tmp or /workspace, no environment name is
//! malformed or overrides HOME, and no `allow` entry names only addresses the gateway would refuse
//! anyway (those belong in `allow_private`, and saying so beats silently never matching).

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::allow::{AllowEntry, AllowError, AllowHost};
use crate::duration::{parse_duration, DurationError};
use crate::error::{quoted, Location, PolicyError};
use crate::model::{ExtraMount, Policy, UnknownChoice};
use crate::size::{ByteSize, SizeError};
use crate::ssrf::{blocked_range, blocked_range_covering};

/// Why one value is not allowed. Displayed after the key or flag: `limits.pids: must be ...`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ValueError {
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error(transparent)]
    Duration(#[from] DurationError),
    #[error(transparent)]
    Allow(#[from] AllowError),
    #[error(transparent)]
    Choice(#[from] UnknownChoice),
    #[error("expected {expected}, found {found}")]
    Type {
        expected: &'static str,
        found: &'static str,
    },
    #[error("must be {expected}, got {got}")]
    Range { expected: String, got: String },
    #[error(transparent)]
    Syslog(#[from] crate::model::SyslogTargetError),
    #[error("{0}")]
    Other(String),
}

/// A syslog receiver address (`udp://…` or `tcp://…`).
pub(crate) fn syslog(text: &str) -> Result<crate::model::SyslogTarget, ValueError> {
    Ok(text.parse()?)
}

fn range(expected: impl Into<String>, got: impl ToString) -> ValueError {
    ValueError::Range {
        expected: expected.into(),
        got: got.to_string(),
    }
}

/// The longest session.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
pub(crate) const MIN_MEMORY: ByteSize = ByteSize::mib(16);
pub(crate) const MAX_PIDS: i128 = 4_194_304;
pub(crate) const MIN_NOFILE: i128 = 16;
pub(crate) const MAX_NOFILE: i128 = 1_048_576;
/// The kernel's smallest CFS quota is 1ms per 100ms period.
pub(crate) const MIN_CPU: f64 = 0.01;
pub(crate) const MAX_CPU: f64 = 1024.0;
/// tmpfs reads size=0 as "unlimited", so the disk caps have a floor.
pub(crate) const MIN_DISK: ByteSize = ByteSize::mib(1);
pub(crate) const MIN_FILE_SIZE: ByteSize = ByteSize::kib(1);
/// Longest hostname the kernel takes (`__NEW_UTS_LEN`).
pub(crate) const MAX_HOSTNAME: usize = 64;
/// Sandbox paths a mount may not cover or go under: cordon builds them.
pub(crate) const RESERVED_SANDBOX_PATHS: [&str; 5] =
    ["/proc", "/dev", "/sys", "/tmp", "/workspace"];

pub(crate) fn timeout_text(text: &str) -> Result<Duration, ValueError> {
    timeout(parse_duration(text)?)
}

pub(crate) fn timeout(d: Duration) -> Result<Duration, ValueError> {
    if d.is_zero() || d > MAX_TIMEOUT {
        return Err(range(
            "more than 0 and at most 24h",
            crate::duration::format_duration(d),
        ));
    }
    Ok(d)
}

pub(crate) fn memory(size: ByteSize) -> Result<ByteSize, ValueError> {
    if size < MIN_MEMORY {
        return Err(range(format!("at least {MIN_MEMORY}"), size));
    }
    Ok(size)
}

pub(crate) fn disk(size: ByteSize) -> Result<ByteSize, ValueError> {
    if size < MIN_DISK {
        return Err(range(format!("at least {MIN_DISK}"), size));
    }
    Ok(size)
}

/// The workspace is its own ext4 volume: below 16M ext4's own metadata is most of it.
pub(crate) const MIN_WORKSPACE: ByteSize = ByteSize::mib(16);

pub(crate) fn workspace_size(size: ByteSize) -> Result<ByteSize, ValueError> {
    if size < MIN_WORKSPACE {
        return Err(range(format!("at least {MIN_WORKSPACE}"), size));
    }
    if size > ByteSize(1 << 40) {
        return Err(range("at most 1T".to_string(), size));
    }
    Ok(size)
}

pub(crate) fn file_size(size: ByteSize) -> Result<ByteSize, ValueError> {
    if size < MIN_FILE_SIZE {
        return Err(range(format!("at least {MIN_FILE_SIZE}"), size));
    }
    Ok(size)
}

/// A positive byte count for the gateway's traffic limits.
pub(crate) fn traffic(size: ByteSize) -> Result<ByteSize, ValueError> {
    if size.0 == 0 {
        return Err(range("at least 1 byte (there is no \"unlimited\")", size));
    }
    Ok(size)
}

fn int_between(n: i128, min: i128, max: i128) -> Result<i128, ValueError> {
    if n < min || n > max {
        return Err(range(format!("between {min} and {max}"), n));
    }
    Ok(n)
}

pub(crate) fn pids(n: i128) -> Result<u64, ValueError> {
    int_between(n, 1, MAX_PIDS).map(|n| n as u64)
}

pub(crate) fn nofile(n: i128) -> Result<u64, ValueError> {
    int_between(n, MIN_NOFILE, MAX_NOFILE).map(|n| n as u64)
}

pub(crate) fn cpu(cores: f64) -> Result<f64, ValueError> {
    // `contains` is false for NaN, so NaN is refused too.
    if !(MIN_CPU..=MAX_CPU).contains(&cores) {
        return Err(range(
            format!("between {MIN_CPU} and {MAX_CPU} cores"),
            cores,
        ));
    }
    Ok(cores)
}

/// A rate limit: positive, 32 bits.
pub(crate) fn rate(n: i128) -> Result<u32, ValueError> {
    int_between(n, 1, i128::from(u32::MAX)).map(|n| n as u32)
}

/// A count where 0 means "never".
pub(crate) fn count(n: i128) -> Result<u32, ValueError> {
    int_between(n, 0, i128::from(u32::MAX)).map(|n| n as u32)
}

/// A host uid or gid: not root, and not -1 (which `setresuid` reads as "unchanged").
pub(crate) fn host_id(n: i128) -> Result<u32, ValueError> {
    if n == 0 {
        return Err(ValueError::Other(
            "must not be 0: the sandbox is never host root".to_owned(),
        ));
    }
    int_between(n, 1, i128::from(u32::MAX) - 1).map(|n| n as u32)
}

pub(crate) fn hostname(name: &str) -> Result<String, ValueError> {
    let bad = || {
        ValueError::Other(format!(
            "{} is not a valid hostname: use letters, digits, '-' and '.', at most {MAX_HOSTNAME} characters",
            quoted(name)
        ))
    };
    if name.is_empty()
        || name.len() > MAX_HOSTNAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        || name
            .split('.')
            .any(|label| label.is_empty() || label.starts_with('-') || label.ends_with('-'))
    {
        return Err(bad());
    }
    Ok(name.to_owned())
}

pub(crate) fn env_name(name: &str) -> Result<(), ValueError> {
    env_name_syntax(name)?;
    if name == "HOME" {
        return Err(ValueError::Other(
            "HOME cannot be set: it is always /workspace".to_owned(),
        ));
    }
    Ok(())
}

/// A well-formed variable name (one cordon only reads, like a credential's `from_env`).
pub(crate) fn env_name_syntax(name: &str) -> Result<(), ValueError> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(ValueError::Other(format!(
            "{} is not a valid environment variable name: use letters, digits and '_', not starting with a digit",
            quoted(name)
        )));
    }
    Ok(())
}

pub(crate) fn env_value(value: &str) -> Result<(), ValueError> {
    if value.contains('\0') {
        return Err(ValueError::Other(
            "an environment value cannot contain a NUL character".to_owned(),
        ));
    }
    Ok(())
}

/// A path with no NUL and no `..` component; `absolute` requires a leading `/`.
fn clean_path(text: &str, what: &str, absolute: bool) -> Result<PathBuf, ValueError> {
    if text.is_empty() {
        return Err(ValueError::Other(format!("{what} cannot be empty")));
    }
    if text.contains('\0') {
        return Err(ValueError::Other(format!(
            "{what} cannot contain a NUL character"
        )));
    }
    let path = PathBuf::from(text);
    if absolute && !path.is_absolute() {
        return Err(ValueError::Other(format!(
            "{what} {} must be an absolute path",
            quoted(text)
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(ValueError::Other(format!(
            "{what} {} must not contain \"..\"",
            quoted(text)
        )));
    }
    Ok(path)
}

pub(crate) fn workspace(text: &str) -> Result<PathBuf, ValueError> {
    if text.is_empty() {
        return Err(ValueError::Other(
            "the workspace path cannot be empty".to_owned(),
        ));
    }
    if text.contains('\0') {
        return Err(ValueError::Other(
            "the workspace path cannot contain a NUL character".to_owned(),
        ));
    }
    Ok(PathBuf::from(text))
}

pub(crate) fn mount_host(text: &str) -> Result<PathBuf, ValueError> {
    clean_path(text, "the host path", /*absolute*/ true)
}

/// Is `path` `root` or under it? Compared by components, so `/tmpfoo` is not under `/tmp`.
fn is_at_or_under(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
}

pub(crate) fn mount_path(text: &str) -> Result<PathBuf, ValueError> {
    let path = clean_path(text, "the sandbox path", /*absolute*/ true)?;
    if path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::CurDir))
    {
        return Err(ValueError::Other(
            "a mount cannot cover the sandbox's root \"/\"".to_owned(),
        ));
    }
    for reserved in RESERVED_SANDBOX_PATHS {
        if is_at_or_under(&path, Path::new(reserved)) {
            return Err(ValueError::Other(format!(
                "{} is at or under {reserved}, which cordon sets up itself",
                quoted(text)
            )));
        }
    }
    Ok(path)
}

/// Cross-checks the mounts: no two at the same sandbox path, and a mount inside another mount's
/// path comes after it (a parent mounted later would hide the child). Returns the index of the
/// offending mount and why.
pub(crate) fn mounts_consistent(mounts: &[ExtraMount]) -> Result<(), (usize, ValueError)> {
    for (i, mount) in mounts.iter().enumerate() {
        for (j, other) in mounts.iter().enumerate().skip(i + 1) {
            if normalized(&mount.path) == normalized(&other.path) {
                return Err((
                    j,
                    ValueError::Other(format!(
                        "{} is already mounted by sandbox.mounts[{i}]",
                        quoted(&other.path.to_string_lossy())
                    )),
                ));
            }
            if is_at_or_under(&mount.path, &other.path) {
                return Err((
                    j,
                    ValueError::Other(format!(
                        "{} is mounted after sandbox.mounts[{i}] ({}), which is inside it and would be hidden; list it first",
                        quoted(&other.path.to_string_lossy()),
                        quoted(&mount.path.to_string_lossy())
                    )),
                ));
            }
        }
    }
    Ok(())
}

fn normalized(path: &Path) -> Vec<Component<'_>> {
    path.components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

/// An `allow` entry: parsed, and not one that only names blocked addresses.
pub(crate) fn allow_entry(text: &str) -> Result<AllowEntry, ValueError> {
    let entry = AllowEntry::parse(text)?;
    let blocked = match entry.host() {
        AllowHost::Ip(addr) => blocked_range(*addr),
        AllowHost::Cidr(net) => blocked_range_covering(net),
        AllowHost::Name(_) | AllowHost::Subdomains(_) => None,
    };
    if let Some(range) = blocked {
        return Err(ValueError::Other(format!(
            "{} is in a blocked range ({range}), so the gateway would never connect to it; list it in network.allow_private to reach it",
            quoted(text)
        )));
    }
    Ok(entry)
}

/// An `allow_private` entry: any valid entry.
pub(crate) fn allow_private_entry(text: &str) -> Result<AllowEntry, ValueError> {
    Ok(AllowEntry::parse(text)?)
}

/// Checks a whole policy, however it was built. Errors name the key; there is no position.
pub(crate) fn policy(p: &Policy) -> Result<(), PolicyError> {
    fn at<T>(key: &str, r: Result<T, ValueError>) -> Result<T, PolicyError> {
        r.map_err(|e| PolicyError::Invalid {
            at: Location::nowhere(),
            key: key.to_owned(),
            message: e.to_string(),
        })
    }
    let s = &p.sandbox;
    if let Some(path) = &s.workspace {
        at("sandbox.workspace", utf8(path).and_then(workspace))?;
    }
    at("sandbox.timeout", timeout(s.timeout))?;
    at("sandbox.hostname", hostname(&s.hostname))?;
    at("sandbox.host_uid", host_id(i128::from(s.host_uid)))?;
    at("sandbox.host_gid", host_id(i128::from(s.host_gid)))?;
    for (name, value) in &s.env {
        at("sandbox.env", env_name(name))?;
        at(&format!("sandbox.env.{name}"), env_value(value))?;
    }
    for (i, m) in s.mounts.iter().enumerate() {
        at(
            &format!("sandbox.mounts[{i}].host"),
            utf8(&m.host).and_then(mount_host),
        )?;
        at(
            &format!("sandbox.mounts[{i}].path"),
            utf8(&m.path).and_then(mount_path),
        )?;
    }
    mounts_consistent(&s.mounts).map_err(|(i, e)| PolicyError::Invalid {
        at: Location::nowhere(),
        key: format!("sandbox.mounts[{i}].path"),
        message: e.to_string(),
    })?;

    let l = &p.limits;
    at("limits.memory", memory(l.memory))?;
    at("limits.pids", pids(i128::from(l.pids)))?;
    at("limits.cpu", cpu(l.cpu))?;
    at("limits.nofile", nofile(i128::from(l.nofile)))?;
    at("limits.tmp", disk(l.tmp))?;
    at("limits.workspace", disk(l.workspace))?;
    at("limits.file_size", file_size(l.file_size))?;

    let n = &p.network;
    for (i, entry) in n.allow.iter().enumerate() {
        at(&format!("network.allow[{i}]"), allow_entry(entry.raw()))?;
    }
    for (i, entry) in n.allow_private.iter().enumerate() {
        at(
            &format!("network.allow_private[{i}]"),
            allow_private_entry(entry.raw()),
        )?;
    }
    let r = &n.rate;
    at(
        "network.rate.requests_per_minute",
        rate(i128::from(r.requests_per_minute)),
    )?;
    at(
        "network.rate.requests_per_minute_per_host",
        rate(i128::from(r.requests_per_minute_per_host)),
    )?;
    at(
        "network.rate.max_connections",
        rate(i128::from(r.max_connections)),
    )?;
    at("network.rate.max_bytes_out", traffic(r.max_bytes_out))?;
    at("network.rate.max_bytes_in", traffic(r.max_bytes_in))?;
    let reachable = |host: &crate::host::HostName| -> Result<(), ValueError> {
        if n.allow
            .iter()
            .any(|e| e.matches_host(crate::decide::Target::Name(host)))
        {
            Ok(())
        } else {
            Err(ValueError::Other(format!(
                "{} is not in network.allow, so the sandbox could never reach it",
                quoted(host.as_str())
            )))
        }
    };
    for (i, rule) in n.rules.iter().enumerate() {
        at(&format!("network.rules[{i}].host"), reachable(&rule.host))?;
        let other = |m: String| ValueError::Other(m);
        for m in &rule.methods {
            at(
                &format!("network.rules[{i}].methods"),
                crate::http_rules::method(m).map_err(other),
            )?;
        }
        for g in &rule.paths {
            at(
                &format!("network.rules[{i}].paths"),
                crate::http_rules::path_glob(g).map_err(other),
            )?;
        }
        if rule.methods.is_empty() || rule.paths.is_empty() {
            at(
                &format!("network.rules[{i}]"),
                Err::<(), _>(other(
                    "a rule with no methods or no paths allows nothing".into(),
                )),
            )?;
        }
    }
    let mut names = std::collections::BTreeSet::new();
    let mut envs = std::collections::BTreeSet::new();
    for (i, c) in p.credentials.iter().enumerate() {
        let key = |f: &str| format!("credentials[{i}].{f}");
        let other = |m: String| ValueError::Other(m);
        at(
            &key("name"),
            crate::credentials::name(&c.name).map_err(other),
        )?;
        if !names.insert(c.name.as_str()) {
            at(
                &key("name"),
                Err::<(), _>(other(format!(
                    "another credential is already called {}",
                    quoted(&c.name)
                ))),
            )?;
        }
        if c.hosts.is_empty() {
            at(
                &key("hosts"),
                Err::<(), _>(other("bind the credential to at least one host".into())),
            )?;
        }
        for h in &c.hosts {
            at(&key("hosts"), reachable(h))?;
        }
        at(
            &key("format"),
            crate::credentials::format(&c.format).map_err(other),
        )?;
        at(&key("env"), env_name(&c.env))?;
        if !envs.insert(c.env.as_str()) || s.env.contains_key(&c.env) {
            at(
                &key("env"),
                Err::<(), _>(other(format!(
                    "{} is already set by sandbox.env or another credential",
                    quoted(&c.env)
                ))),
            )?;
        }
    }
    crate::detect::check(&p.detect, &p.alerts, &s.env).map_err(|(key, e)| {
        PolicyError::Invalid {
            at: Location::nowhere(),
            key,
            message: e.to_string(),
        }
    })?;
    Ok(())
}

/// Paths are carried as text in policies and audit records: they must be UTF-8.
pub(crate) fn utf8(path: &Path) -> Result<&str, ValueError> {
    path.to_str().ok_or_else(|| {
        ValueError::Other(format!(
            "{} is not valid UTF-8",
            quoted(&path.to_string_lossy())
        ))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mount(path: &str) -> ExtraMount {
        ExtraMount {
            host: PathBuf::from("/srv"),
            path: PathBuf::from(path),
            writable: false,
        }
    }

    #[test]
    fn mount_paths_over_what_cordon_builds_are_refused() {
        for bad in [
            "/",
            "/.",
            "//",
            "/proc",
            "/proc/x",
            "/dev",
            "/dev/shm",
            "/sys/fs",
            "/tmp",
            "/tmp/",
            "/workspace",
            "/workspace/a",
            "//proc",
            "/./proc",
        ] {
            assert!(mount_path(bad).is_err(), "{bad}");
        }
        for good in ["/data", "/tmpfoo", "/procs", "/opt/data", "/workspaces"] {
            assert_eq!(mount_path(good), Ok(PathBuf::from(good)), "{good}");
        }
    }

    #[test]
    fn mount_paths_must_be_absolute_and_without_dot_dot() {
        assert_eq!(
            mount_path("data").unwrap_err().to_string(),
            "the sandbox path \"data\" must be an absolute path"
        );
        assert_eq!(
            mount_path("/data/../proc").unwrap_err().to_string(),
            "the sandbox path \"/data/../proc\" must not contain \"..\""
        );
        assert!(mount_host("relative/dir").is_err());
        assert!(mount_host("/a/../b").is_err());
        assert!(mount_host("/a\0b").is_err());
        assert!(mount_host("").is_err());
    }

    #[test]
    fn duplicate_and_misordered_mounts_are_found() {
        assert_eq!(mounts_consistent(&[mount("/a"), mount("/b")]), Ok(()));
        assert_eq!(mounts_consistent(&[mount("/a"), mount("/a/b")]), Ok(()));
        assert_eq!(
            mounts_consistent(&[mount("/a"), mount("/a/")])
                .unwrap_err()
                .0,
            1
        );
        assert_eq!(
            mounts_consistent(&[mount("/a/b"), mount("/c"), mount("/a")])
                .unwrap_err()
                .0,
            2
        );
    }

    #[test]
    fn numeric_limits_have_floors_and_ceilings() {
        assert!(pids(0).is_err());
        assert_eq!(pids(1), Ok(1));
        assert!(pids(MAX_PIDS + 1).is_err());
        assert!(nofile(15).is_err());
        assert!(cpu(0.0).is_err());
        assert!(cpu(-1.0).is_err());
        assert!(cpu(f64::NAN).is_err());
        assert!(cpu(f64::INFINITY).is_err());
        assert!(cpu(1024.5).is_err());
        assert_eq!(cpu(0.5), Ok(0.5));
        assert!(memory(ByteSize::mib(15)).is_err());
        assert!(disk(ByteSize(0)).is_err());
        assert!(traffic(ByteSize(0)).is_err());
        assert!(rate(0).is_err());
        assert_eq!(count(0), Ok(0));
        assert!(host_id(0).is_err());
        assert!(host_id(i128::from(u32::MAX)).is_err());
        assert_eq!(host_id(1000), Ok(1000));
        assert!(timeout(Duration::ZERO).is_err());
        assert!(timeout(MAX_TIMEOUT + Duration::from_nanos(1)).is_err());
        assert_eq!(timeout(MAX_TIMEOUT), Ok(MAX_TIMEOUT));
    }

    #[test]
    fn env_names_follow_posix_and_home_is_fixed() {
        assert_eq!(env_name("LANG"), Ok(()));
        assert_eq!(env_name("_x1"), Ok(()));
        assert_eq!(env_name("PATH"), Ok(()));
        for bad in ["", "1A", "A-B", "A=B", "A B", "é"] {
            assert!(env_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            env_name("HOME").unwrap_err().to_string(),
            "HOME cannot be set: it is always /workspace"
        );
        assert!(env_value("a\0b").is_err());
    }

    #[test]
    fn hostnames_are_plain_ascii_labels() {
        assert_eq!(hostname("cordon"), Ok("cordon".to_owned()));
        assert_eq!(hostname("box-1.local"), Ok("box-1.local".to_owned()));
        for bad in ["", "-a", "a-", "a..b", "a_b", "a b", &"a".repeat(65)] {
            assert!(hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn allow_entries_that_only_name_blocked_addresses_point_to_allow_private() {
        assert_eq!(
            allow_entry("10.0.0.5:8080").unwrap_err().to_string(),
            "\"10.0.0.5:8080\" is in a blocked range (private 10.0.0.0/8), so the gateway would never connect to it; list it in network.allow_private to reach it"
        );
        assert!(allow_entry("198.51.100.0/24:443").is_err());
        assert!(allow_entry("[::1]:80").is_err());
        assert!(allow_entry("0.0.0.0/0:443").is_ok());
        assert!(allow_entry("localhost:8080").is_ok());
        assert!(allow_private_entry("10.0.0.5:8080").is_ok());
    }
}
