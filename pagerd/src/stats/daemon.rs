//! The daemon's own counters, for the metrics: what no fork keeps. A handoff refused, a
//! session ended, a control request answered, a snapshot imported, a VM that failed to start,
//! the daemon ready: none of them is on the fault path, so each is a prometheus-client metric
//! updated as it happens (a short lock at most).
//!
//! Every family is created with every label value it can take, at zero, so that each series
//! exists from the start: `rate()` and `increase()` need a series before its first event.
//! Label values are the wire names the protocol spells, listed from the types themselves
//! (`Request::OPS`, each enum's `VARIANTS`), so a new op or reason gets its series without a
//! list here to update.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use proto::control::{ErrorCode, Request};
use proto::model::{EndReason, ImportMethod, RefusalReason};
use strum::VariantNames;

/// One label: its name and value.
type Label = [(&'static str, &'static str); 1];
/// A histogram per value of one label.
type Histograms = Family<Label, Histogram, fn() -> Histogram>;

/// The `op` of a control line that is not a request of the protocol.
pub(crate) const UNKNOWN_OP: &str = "unknown";
/// The `code` of a request answered without error.
const OK: &str = "ok";

/// Upper bounds of the control-request durations, in seconds (`fork.wait` and `vm.stop` may
/// take minutes).
const REQUEST_BOUNDS: [f64; 12] = [
    0.00025, 0.001, 0.0025, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 60.0, 600.0,
];
/// Upper bounds of the import durations, in seconds (a link takes a millisecond, a copy of a
/// large file minutes).
const IMPORT_BOUNDS: [f64; 11] = [
    0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// Why a `vm.start` failed, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmStartFailure {
    /// No such snapshot.
    NoSnapshot,
    /// The snapshot has no saved hypervisor state.
    NoVmState,
    /// The hypervisor cannot do what was asked.
    Unsupported,
    /// The file backend without the FUSE view.
    NoFuse,
    /// No hypervisor binary.
    NoBinary,
    /// Every uid of `--jail-uids` runs a VM.
    NoJailUid,
    /// The VM id is taken.
    Exists,
    /// A step of the launch failed once the VM was recorded (it is then `failed`, with the
    /// reason): its fork, its files, the hypervisor exiting, its API never coming up, the
    /// restore refused.
    LaunchFailed,
    /// The state directory or an internal error.
    Other,
}

impl VmStartFailure {
    /// Every reason.
    pub const ALL: [Self; 9] = [
        Self::NoSnapshot,
        Self::NoVmState,
        Self::Unsupported,
        Self::NoFuse,
        Self::NoBinary,
        Self::NoJailUid,
        Self::Exists,
        Self::LaunchFailed,
        Self::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSnapshot => "no_snapshot",
            Self::NoVmState => "no_vmstate",
            Self::Unsupported => "unsupported",
            Self::NoFuse => "no_fuse",
            Self::NoBinary => "no_binary",
            Self::NoJailUid => "no_jail_uid",
            Self::Exists => "exists",
            Self::LaunchFailed => "launch_failed",
            Self::Other => "other",
        }
    }
}

/// Counters of the whole daemon since it started.
#[derive(Debug)]
pub(crate) struct DaemonCounters {
    refusals: Family<Label, Counter>,
    endings: Family<Label, Counter>,
    requests: Family<[(&'static str, &'static str); 2], Counter>,
    request_seconds: Histograms,
    import_seconds: Histograms,
    vm_start_failures: Family<Label, Counter>,
    startup_seconds: Gauge<f64, AtomicU64>,
}

impl DaemonCounters {
    fn new() -> Self {
        let counters = Self {
            refusals: Family::default(),
            endings: Family::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(|| Histogram::new(REQUEST_BOUNDS)),
            import_seconds: Family::new_with_constructor(|| Histogram::new(IMPORT_BOUNDS)),
            vm_start_failures: Family::default(),
            startup_seconds: Gauge::default(),
        };
        // Each series is made by asking for it (the guard that answers is let go at once).
        for reason in RefusalReason::VARIANTS {
            drop(counters.refusals.get_or_create(&[("reason", reason)]));
        }
        for reason in EndReason::VARIANTS {
            drop(counters.endings.get_or_create(&[("reason", reason)]));
        }
        let codes = std::iter::once(OK).chain(ErrorCode::ALL.iter().map(|c| c.as_str()));
        for op in Request::OPS.iter().copied().chain([UNKNOWN_OP]) {
            drop(counters.request_seconds.get_or_create(&[("op", op)]));
            for code in codes.clone() {
                drop(
                    counters
                        .requests
                        .get_or_create(&[("op", op), ("code", code)]),
                );
            }
        }
        for method in ImportMethod::VARIANTS {
            drop(counters.import_seconds.get_or_create(&[("method", method)]));
        }
        for reason in VmStartFailure::ALL {
            drop(
                counters
                    .vm_start_failures
                    .get_or_create(&[("reason", reason.as_str())]),
            );
        }
        counters
    }

    /// A handoff was refused.
    pub fn refused(&self, reason: RefusalReason) {
        let label: &'static str = reason.into();
        self.refusals.get_or_create(&[("reason", label)]).inc();
    }

    /// A session ended.
    pub fn ended(&self, reason: EndReason) {
        let label = reason.as_str();
        self.endings.get_or_create(&[("reason", label)]).inc();
    }

    /// A control request `op` ([`control_op`]) was answered after `took`, with `error` if it
    /// failed.
    pub fn answered(&self, op: &'static str, error: Option<ErrorCode>, took: Duration) {
        let code = error.map_or(OK, ErrorCode::as_str);
        self.requests
            .get_or_create(&[("op", op), ("code", code)])
            .inc();
        self.request_seconds
            .get_or_create(&[("op", op)])
            .observe(took.as_secs_f64());
    }

    /// A snapshot's files were brought in by `method`, in `took`.
    pub fn imported(&self, method: ImportMethod, took: Duration) {
        let label: &'static str = method.into();
        self.import_seconds
            .get_or_create(&[("method", label)])
            .observe(took.as_secs_f64());
    }

    /// A `vm.start` failed.
    pub fn vm_start_failed(&self, reason: VmStartFailure) {
        self.vm_start_failures
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    /// The daemon serves, `took` after it started (this program, after an upgrade).
    pub fn ready(&self, took: Duration) {
        self.startup_seconds.set(took.as_secs_f64());
    }

    /// Adds every family to `registry` (prefixed `pagerd_` by the caller).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "handoff_refusals",
            "Handoffs refused, by reason",
            self.refusals.clone(),
        );
        registry.register(
            "sessions_ended",
            "Fork sessions ended, by reason",
            self.endings.clone(),
        );
        registry.register(
            "control_requests",
            "Control requests answered, by op and error code (ok when none)",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "control_request_duration",
            "Time from a control request read to its answer, by op",
            Unit::Seconds,
            self.request_seconds.clone(),
        );
        registry.register_with_unit(
            "snapshot_import_duration",
            "Time to bring a registered snapshot's files in, by import method",
            Unit::Seconds,
            self.import_seconds.clone(),
        );
        registry.register(
            "vm_start_failures",
            "vm.start requests that failed, by reason",
            self.vm_start_failures.clone(),
        );
        registry.register_with_unit(
            "startup_duration",
            "Time from the program's start to serving (0 until then)",
            Unit::Seconds,
            self.startup_seconds.clone(),
        );
    }
}

/// The daemon's counters.
pub(crate) static DAEMON: LazyLock<DaemonCounters> = LazyLock::new(DaemonCounters::new);

/// The `op` label of a control line: the request's op, or [`UNKNOWN_OP`] for a line that is
/// not a request.
pub(crate) fn control_op(request: Option<&Request>) -> &'static str {
    request.map_or(UNKNOWN_OP, Request::op)
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn label_values_are_those_the_protocol_spells() {
        let ops = Request::OPS;
        for op in ["status", "fork.create", "snapshot.register", "vm.start"] {
            assert!(ops.contains(&op), "{op} in {ops:?}");
        }
        assert_eq!(ImportMethod::VARIANTS, ["hardlink", "reflink", "copy"]);
        assert!(EndReason::VARIANTS.contains(&"vmm_exited"));
        assert!(RefusalReason::VARIANTS.contains(&"invalid_json"));
        let status = Request::from(proto::control::Status {});
        assert_eq!(control_op(Some(&status)), "status");
        assert_eq!(control_op(None), UNKNOWN_OP);
    }

    #[test]
    fn every_series_exists_at_zero_and_events_count() {
        let counters = DaemonCounters::new();
        let text = |counters: &DaemonCounters| {
            let mut registry = Registry::default();
            counters.register(&mut registry);
            let mut out = String::new();
            encode(&mut out, &registry).unwrap();
            out
        };
        let fresh = text(&counters);
        for series in [
            r#"control_requests_total{op="vm.start",code="permission_denied"} 0"#,
            r#"control_requests_total{op="unknown",code="invalid_argument"} 0"#,
            r#"control_request_duration_seconds_count{op="fork.create"} 0"#,
            r#"snapshot_import_duration_seconds_count{method="reflink"} 0"#,
            r#"vm_start_failures_total{reason="launch_failed"} 0"#,
            r#"sessions_ended_total{reason="vmm_exited"} 0"#,
            r#"handoff_refusals_total{reason="no_fd"} 0"#,
            "startup_duration_seconds 0.0",
        ] {
            assert!(fresh.contains(series), "{series} in\n{fresh}");
        }
        counters.answered(
            "vm.start",
            Some(ErrorCode::PermissionDenied),
            Duration::ZERO,
        );
        counters.answered("status", None, Duration::from_millis(5));
        counters.imported(ImportMethod::Copy, Duration::from_secs(2));
        counters.vm_start_failed(VmStartFailure::NoBinary);
        counters.ended(EndReason::VmmExited);
        counters.ready(Duration::from_millis(1500));
        let after = text(&counters);
        for series in [
            r#"control_requests_total{op="vm.start",code="permission_denied"} 1"#,
            r#"control_requests_total{op="status",code="ok"} 1"#,
            r#"control_request_duration_seconds_bucket{le="0.01",op="status"} 1"#,
            r#"control_request_duration_seconds_bucket{le="0.0025",op="status"} 0"#,
            r#"snapshot_import_duration_seconds_bucket{le="+Inf",method="copy"} 1"#,
            r#"vm_start_failures_total{reason="no_binary"} 1"#,
            r#"sessions_ended_total{reason="vmm_exited"} 1"#,
            "startup_duration_seconds 1.5",
        ] {
            assert!(after.contains(series), "{series} in\n{after}");
        }
    }
}
