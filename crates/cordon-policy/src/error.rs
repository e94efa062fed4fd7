//! Policy errors.
//!
//! Guarantees: every error says where the bad input is — the file (when the caller named it),
//! 1-based line and column for policy text, the dotted key (`limits.memory`), or the command-line
//! flag for overrides — and what is wrong with it, in one line. Echoed input is quoted with
//! escapes and truncated, so an error message can never carry control characters or an unbounded
//! amount of attacker-chosen text into a terminal or a log.

use std::fmt;

/// Where in a policy text an error is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    /// The name the caller gave the text (usually its path), if any.
    pub source: Option<String>,
    /// 1-based line and column (in characters), if the error has a position.
    pub position: Option<(usize, usize)>,
}

impl Location {
    /// A location in `text` at byte `offset`, for the text called `source`.
    pub fn at(source: Option<&str>, text: &str, offset: usize) -> Location {
        Location {
            source: source.map(str::to_owned),
            position: Some(line_col(text, offset)),
        }
    }

    /// No position: the error is about the policy as a whole or a value built in code.
    pub fn nowhere() -> Location {
        Location::default()
    }
}

/// Prints the `file:line:col: ` prefix (with its trailing `": "`), or nothing.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source, self.position) {
            (Some(source), Some((line, column))) => write!(f, "{source}:{line}:{column}: "),
            (Some(source), None) => write!(f, "{source}: "),
            (None, Some((line, column))) => write!(f, "line {line}, column {column}: "),
            (None, None) => Ok(()),
        }
    }
}

/// A policy that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not TOML, names a key the policy does not have, or gives a table the wrong
    /// type. `key` is the table or key the problem is in, when it could be found.
    #[error("{at}{}{message}", key_prefix(.key))]
    Syntax {
        at: Location,
        key: Option<String>,
        message: String,
    },
    /// A value is well-formed but not allowed (`limits.pids = 0`, a bad size, a mount over /proc).
    #[error("{at}{key}: {message}")]
    Invalid {
        at: Location,
        key: String,
        message: String,
    },
    /// The policy uses a feature this version of cordon does not implement. It is refused, never
    /// ignored: a policy that asks for something must get it or fail.
    #[error("{at}{key} are not supported by this version of cordon")]
    Unsupported { at: Location, key: String },
    /// A command-line override is not valid; `flag` is the flag as the user typed it (`--memory`).
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
}

fn key_prefix(key: &Option<String>) -> String {
    match key {
        Some(key) => format!("{key}: "),
        None => String::new(),
    }
}

impl PolicyError {
    /// The location in the policy text, if the error came from one.
    pub fn location(&self) -> Option<&Location> {
        match self {
            PolicyError::Syntax { at, .. }
            | PolicyError::Invalid { at, .. }
            | PolicyError::Unsupported { at, .. } => Some(at),
            PolicyError::Flag { .. } => None,
        }
    }

    /// 1-based line of the error in the policy text.
    pub fn line(&self) -> Option<usize> {
        self.location().and_then(|at| at.position).map(|(l, _)| l)
    }

    /// 1-based column (in characters) of the error in the policy text.
    pub fn column(&self) -> Option<usize> {
        self.location().and_then(|at| at.position).map(|(_, c)| c)
    }

    /// The dotted policy key (`limits.memory`) or the flag (`--memory`) the error is about.
    pub fn key(&self) -> Option<&str> {
        match self {
            PolicyError::Syntax { key, .. } => key.as_deref(),
            PolicyError::Invalid { key, .. } | PolicyError::Unsupported { key, .. } => Some(key),
            PolicyError::Flag { flag, .. } => Some(flag),
        }
    }
}

/// 1-based line and column (counted in characters) of byte `offset` in `text`. An offset past the
/// end, or inside a multi-byte character, is moved back to the nearest character boundary.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The longest piece of user input echoed back in a message, in characters.
const QUOTE_MAX: usize = 80;

/// `s` as a quoted, escaped string for messages, cut to [`QUOTE_MAX`] characters.
pub(crate) fn quoted(s: &str) -> String {
    if s.chars().count() <= QUOTE_MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(QUOTE_MAX).collect();
        format!("{head:?}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one_in_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 4), (1, 5));
        assert_eq!(line_col(text, 6), (2, 1));
        // "bé = " is 6 bytes but 5 characters: the quote is column 6.
        assert_eq!(line_col(text, 12), (2, 6));
    }

    #[test]
    fn line_col_clamps_offsets_past_the_end_or_inside_a_character() {
        let text = "é";
        assert_eq!(line_col(text, 1), (1, 1));
        assert_eq!(line_col(text, 99), (1, 2));
    }

    #[test]
    fn location_prefix_names_file_line_and_column() {
        let at = Location {
            source: Some("policy.toml".into()),
            position: Some((3, 10)),
        };
        assert_eq!(at.to_string(), "policy.toml:3:10: ");
        let at = Location {
            source: None,
            position: Some((3, 10)),
        };
        assert_eq!(at.to_string(), "line 3, column 10: ");
        assert_eq!(Location::nowhere().to_string(), "");
    }

    #[test]
    fn quoted_escapes_control_characters_and_truncates_long_input() {
        assert_eq!(quoted("a\u{1b}[31m"), "\"a\\u{1b}[31m\"");
        let long = "x".repeat(500);
        let q = quoted(&long);
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with("\"..."));
    }
}
