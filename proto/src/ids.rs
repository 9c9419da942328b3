//! Names of snapshots and forks.
//!
//! Ids end up in file names (the fork's handoff socket, later the state directory), so they are
//! restricted to a safe set: 1 to 64 characters of `A-Z a-z 0-9 _ - .`, not starting with a
//! dot. `../../etc` cannot be an id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest id accepted.
pub const MAX_ID_LEN: usize = 64;

/// A validated snapshot or fork id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Id(String);

/// Why a string is not an id.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid id `{shown}`: use 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 _ - . (not starting with a dot)")]
pub struct InvalidId {
    shown: String,
}

impl Id {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Id {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ID_LEN
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidId {
                shown: s.chars().take(MAX_ID_LEN + 8).collect(),
            })
        }
    }
}

impl TryFrom<String> for Id {
    type Error = InvalidId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Id> for String {
    fn from(id: Id) -> Self {
        id.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_names_and_rejects_the_rest() {
        for good in ["a", "fork-1", "snap_2.v3", &"x".repeat(MAX_ID_LEN)] {
            assert_eq!(good.parse::<Id>().unwrap().as_str(), good);
        }
        for bad in [
            "",
            ".",
            "..",
            "../../etc",
            "a/b",
            ".hidden",
            "sp ace",
            "nul\0",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(bad.parse::<Id>().is_err(), "{bad:?} must be rejected");
        }
    }
}
