//! Where the audit store lives by default.
//!
//! Guarantees:
//! - root: `/var/lib/cordon/audit.db`; anyone else: `$XDG_STATE_HOME/cordon/audit.db`, or
//!   `$HOME/.local/state/cordon/audit.db` when `XDG_STATE_HOME` is unset, empty or relative (the
//!   XDG spec says to ignore relative values). No home at all is an error, never a guess such as
//!   the current directory.
//! - The decision is a pure function ([`default_path_for`]); [`default_path`] only reads the
//!   environment and the effective uid.

use std::ffi::OsString;
use std::path::PathBuf;

/// Why no default location could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("cannot choose an audit store location: neither XDG_STATE_HOME nor HOME is set to an absolute path; pass --audit PATH")]
    NoHome,
}

/// The default audit store for the current user.
pub fn default_path() -> Result<PathBuf, PathError> {
    default_path_for(
        nix::unistd::geteuid().is_root(),
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// The default audit store for a user who is (or is not) root and has these variables.
pub fn default_path_for(
    is_root: bool,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, PathError> {
    if is_root {
        return Ok(PathBuf::from("/var/lib/cordon/audit.db"));
    }
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(state) = absolute(xdg_state_home) {
        return Ok(state.join("cordon").join("audit.db"));
    }
    match absolute(home) {
        Some(home) => Ok(home.join(".local/state/cordon/audit.db")),
        None => Err(PathError::NoHome),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn root_always_uses_var_lib() {
        assert_eq!(
            default_path_for(/*is_root*/ true, os("/x"), os("/root")).unwrap(),
            PathBuf::from("/var/lib/cordon/audit.db")
        );
    }

    #[test]
    fn a_user_gets_xdg_state_home_then_home() {
        assert_eq!(
            default_path_for(false, os("/s"), os("/home/a")).unwrap(),
            PathBuf::from("/s/cordon/audit.db")
        );
        assert_eq!(
            default_path_for(false, None, os("/home/a")).unwrap(),
            PathBuf::from("/home/a/.local/state/cordon/audit.db")
        );
    }

    #[test]
    fn relative_or_empty_variables_are_ignored_and_no_home_is_an_error() {
        assert_eq!(
            default_path_for(false, os("state"), os("/home/a")).unwrap(),
            PathBuf::from("/home/a/.local/state/cordon/audit.db")
        );
        assert_eq!(
            default_path_for(false, os(""), os("")),
            Err(PathError::NoHome)
        );
        assert_eq!(default_path_for(false, None, None), Err(PathError::NoHome));
    }
}
