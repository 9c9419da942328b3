//! Working sets and prefetch: what a fork gets installed before it asks.
//!
//! pagerd records which pages a snapshot's first forks touch (its *working set*), stores the
//! set beside the snapshot, and installs it in every later fork as soon as the fork's VMM
//! attaches (*replay*). Optionally it goes on to fill every other page in the background
//! (*graduation*), after which the fork needs nothing more from pagerd.

use serde::{Deserialize, Serialize};

/// What pagerd installs in a uffd fork before the guest asks for it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Prefetch {
    /// Nothing: every page is served when the guest faults on it.
    Off,
    /// The snapshot's recorded working set, if it has one.
    #[default]
    WorkingSet,
    /// The working set, then every other page at low priority; once all are present the
    /// fork no longer needs pagerd (its session ends `graduated`).
    Graduate,
}

impl Prefetch {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Whether the recorded working set is replayed.
    pub fn replays(self) -> bool {
        !matches!(self, Self::Off)
    }
}

/// A snapshot's recorded working set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSetInfo {
    /// Format version of the stored file.
    pub version: u32,
    /// 4 KiB pages in the set.
    pub pages: u64,
    /// Of them, pages that are all zeros (installed as zero pages, not stored).
    pub zero_pages: u64,
    /// Contiguous runs the set installs in (one `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` each).
    pub runs: u64,
    /// Size of the stored file (index plus the pages' contents, contiguous).
    pub file_bytes: u64,
    /// Forks whose touches were merged into it.
    pub forks_recorded: u32,
    /// When it was stored, ms since the Unix epoch.
    pub recorded_unix_ms: u64,
}

/// A recording in progress: the next uffd forks of the snapshot record what they touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingInfo {
    /// Forks still to record (attached forks count once they attach).
    pub forks_wanted: u32,
    /// Forks recording now.
    pub forks_recording: u32,
    /// Forks whose touches are already collected.
    pub forks_done: u32,
    /// Whether pagerd started it by itself (the snapshot had no working set).
    pub automatic: bool,
}
