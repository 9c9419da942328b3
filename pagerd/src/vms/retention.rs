//! How long the records of ended VMs are kept (`--vm-retention`, default 7 days; `0` keeps
//! them forever): an `exited` or `failed` VM whose end lies that far back is deleted as by
//! `vm.delete`, by the VM janitor thread, which looks once a second.
//!
//! ```text
//! live (starting, running)            ─▶ kept
//! ended, retention 0                  ─▶ kept
//! ended at E (else created at C), now ─▶ deleted once now - E ≥ retention
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use proto::model::VmInfo;
use proto::VmId;

use super::{VmError, Vms};

/// `--vm-retention`'s default.
pub(crate) const DEFAULT_RETENTION: &str = "7d";

/// Parses `--vm-retention`: `0` (zero: forever), or a whole number with a unit: `s`, `m`,
/// `h`, `d`.
pub(crate) fn parse_retention(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("`{text}` is not a duration: 0 (forever) or N followed by s, m, h or d");
    let unit = text.chars().last().ok_or_else(bad)?;
    let seconds = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let count: u64 = text[..text.len() - 1].parse().map_err(|_| bad())?;
    let total = count.checked_mul(seconds).ok_or_else(bad)?;
    Ok(Duration::from_secs(total))
}

/// Whether the record of `info` has outlived `retention` (`None`: kept for ever) at `now_ms`
/// (ms since the Unix epoch). A record without an end time counts from its creation.
pub(crate) fn expired(info: &VmInfo, retention: Option<Duration>, now_ms: u64) -> bool {
    let Some(keep) = retention else {
        return false;
    };
    if info.state.is_live() {
        return false;
    }
    let ended = info.ended_unix_ms.unwrap_or(info.created_unix_ms);
    let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
    now_ms.saturating_sub(ended) >= keep_ms
}

impl Vms {
    /// Deletes every ended VM past its retention at `now_ms`; a removal that fails is logged
    /// once (`reported` remembers it) and tried again next time. Returns the VMs deleted.
    pub(super) fn remove_expired(&self, now_ms: u64, reported: &mut BTreeSet<VmId>) -> Vec<VmId> {
        let due: Vec<VmId> = self
            .lock()
            .values()
            .filter(|s| expired(&s.record.info, self.options.retention, now_ms))
            .map(|s| s.record.info.id.clone())
            .collect();
        let mut removed = Vec::new();
        for id in due {
            match self.remove(&id) {
                Ok(info) => {
                    tracing::info!(vm = %id, state = %info.state, "VM record past --vm-retention deleted");
                    reported.remove(&id);
                    removed.push(id);
                }
                // Deleted meanwhile.
                Err(VmError::NotFound(_)) => {}
                Err(e) => {
                    if reported.insert(id.clone()) {
                        tracing::warn!(vm = %id, error = %crate::errors::error_chain(&e), "cannot delete a VM record past --vm-retention");
                    }
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use proto::model::VmState;

    use super::*;

    const DAY_MS: u64 = 86_400_000;

    fn vm(state: VmState, created: u64, ended: Option<u64>) -> VmInfo {
        serde_json::from_value(serde_json::json!({
            "id": "a", "snapshot": "s", "vmm": "firecracker", "backend": "uffd",
            "state": state, "pid": null, "fork": null, "memory_file": null,
            "api_socket": "/v/a/api.sock", "console_log": "/v/a/console.log",
            "vsock": null, "exit_code": null, "exit_signal": null, "reason": null,
            "created_unix_ms": created, "ended_unix_ms": ended,
        }))
        .unwrap()
    }

    #[test]
    fn retention_is_zero_for_ever_or_a_count_of_a_unit() {
        let secs = |s| Ok(Duration::from_secs(s));
        assert_eq!(parse_retention("0"), Ok(Duration::ZERO));
        assert_eq!(parse_retention("0d"), Ok(Duration::ZERO));
        assert_eq!(parse_retention("90s"), secs(90));
        assert_eq!(parse_retention("15m"), secs(900));
        assert_eq!(parse_retention("24h"), secs(86_400));
        assert_eq!(parse_retention(DEFAULT_RETENTION), secs(7 * 86_400));
        for bad in [
            "",
            "d",
            "7",
            "7w",
            "-1d",
            "1.5h",
            "h7",
            "99999999999999999999d",
        ] {
            assert!(parse_retention(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_ended_vms_past_their_retention_expire() {
        let week = Some(Duration::from_secs(7 * 86_400));
        let now = 100 * DAY_MS;
        let ended_at = |state, ended| vm(state, DAY_MS, Some(ended));
        assert!(expired(
            &ended_at(VmState::Exited, now - 7 * DAY_MS),
            week,
            now
        ));
        assert!(expired(
            &ended_at(VmState::Failed, now - 8 * DAY_MS),
            week,
            now
        ));
        assert!(!expired(
            &ended_at(VmState::Exited, now - 6 * DAY_MS),
            week,
            now
        ));
        assert!(
            !expired(&ended_at(VmState::Exited, now + DAY_MS), week, now),
            "a clock that went back keeps it"
        );
        for live in [VmState::Starting, VmState::Running] {
            assert!(!expired(&vm(live, 0, None), week, now), "{live}");
        }
        assert!(
            !expired(&ended_at(VmState::Exited, 0), None, now),
            "0 keeps records for ever"
        );
        assert!(
            expired(&vm(VmState::Exited, now - 7 * DAY_MS, None), week, now),
            "an old record without an end time counts from its creation"
        );
        assert!(!expired(
            &vm(VmState::Exited, now - DAY_MS, None),
            week,
            now
        ));
    }
}
