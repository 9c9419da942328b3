//! Names of snapshots, forks and VMs: one type per kind of object, so a fork's id can never be
//! passed where a snapshot's is meant.
//!
//! Ids end up in file names (the fork's handoff socket, the state directory), so they are
//! restricted to a safe set: 1 to 64 characters of `A-Z a-z 0-9 _ - .`, not starting with a
//! dot. `../../etc` cannot be an id. On the wire every id is a plain string.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest id accepted.
pub const MAX_ID_LEN: usize = 64;

/// What kind of object an [`Id`] names.
pub trait Kind: 'static {
    /// How messages call the object ("snapshot", "fork", "VM").
    const NAME: &'static str;
}

/// Snapshots.
#[derive(Debug)]
pub enum Snapshot {}

/// Forks.
#[derive(Debug)]
pub enum Fork {}

/// Launched VMs.
#[derive(Debug)]
pub enum Vm {}

impl Kind for Snapshot {
    const NAME: &'static str = "snapshot";
}

impl Kind for Fork {
    const NAME: &'static str = "fork";
}

impl Kind for Vm {
    const NAME: &'static str = "VM";
}

/// A snapshot's id.
pub type SnapshotId = Id<Snapshot>;
/// A fork's id.
pub type ForkId = Id<Fork>;
/// A VM's id.
pub type VmId = Id<Vm>;

/// A validated id of an object of kind `K`.
pub struct Id<K: Kind> {
    name: String,
    kind: PhantomData<fn() -> K>,
}

/// Why a string is not an id.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid id `{shown}`: use 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 _ - . (not starting with a dot)")]
pub struct InvalidId {
    shown: String,
}

impl<K: Kind> Id<K> {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The same name as an id of another kind (a VM's fork is named after the VM).
    pub fn to_kind<L: Kind>(&self) -> Id<L> {
        Id {
            name: self.name.clone(),
            kind: PhantomData,
        }
    }
}

/// Whether `s` is a safe id.
fn valid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl<K: Kind> FromStr for Id<K> {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if valid(s) {
            Ok(Self {
                name: s.to_owned(),
                kind: PhantomData,
            })
        } else {
            Err(InvalidId {
                shown: s.chars().take(MAX_ID_LEN + 8).collect(),
            })
        }
    }
}

impl<K: Kind> TryFrom<String> for Id<K> {
    type Error = InvalidId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl<K: Kind> From<Id<K>> for String {
    fn from(id: Id<K>) -> Self {
        id.name
    }
}

impl<K: Kind> AsRef<str> for Id<K> {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl<K: Kind> fmt::Display for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl<K: Kind> fmt::Debug for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({:?})", K::NAME, self.name)
    }
}

impl<K: Kind> Clone for Id<K> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            kind: PhantomData,
        }
    }
}

impl<K: Kind> PartialEq for Id<K> {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl<K: Kind> Eq for Id<K> {}

impl<K: Kind> PartialOrd for Id<K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<K: Kind> Ord for Id<K> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.name.cmp(&other.name)
    }
}

impl<K: Kind> Hash for Id<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl<K: Kind> Serialize for Id<K> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name)
    }
}

impl<'de, K: Kind> Deserialize<'de> for Id<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_names_and_rejects_the_rest() {
        for good in ["a", "fork-1", "snap_2.v3", &"x".repeat(MAX_ID_LEN)] {
            assert_eq!(good.parse::<SnapshotId>().unwrap().as_str(), good);
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
            assert!(bad.parse::<ForkId>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn ids_are_strings_on_the_wire_and_name_their_kind_in_debug() {
        let id: VmId = serde_json::from_str("\"vm-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"vm-1\"");
        assert_eq!(format!("{id:?}"), "VM(\"vm-1\")");
        assert_eq!(id.to_string(), "vm-1");
        assert!(serde_json::from_str::<VmId>("\"../x\"").is_err());
        let fork: ForkId = id.to_kind();
        assert_eq!(fork.as_str(), "vm-1");
    }
}
