//! Prometheus metrics scraped from a real pagerd: the numbers move while forks run and agree
//! with `pagerctl stats`; every labelled series exists from the start; control requests,
//! imports and VM start failures are counted; the daemon's process is described; the format
//! is the one the scraper asks for, the classic one passes `promtool check metrics`, and a
//! real Prometheus server computes fault-latency quantiles from it.
//!
//! The Prometheus tests are skipped (and counted as such) where Debian's `prometheus` package
//! is not installed; `scripts/setup.sh` installs it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use proto::control::{ErrorCode, ForkGet, VmStart};
use proto::model::{ForkState, StatsReport, VmBackend, VmState};
use testkit::prometheus::{promtool, promtool_check_metrics, Prometheus};
use testkit::{
    http_get, id, new_uffd, on_path, proc_status_kb, raw_handoff, skip, write_snapshot, Daemon,
    HttpAnswer, Vmm,
};

const MIB: u64 = 1 << 20;

/// The `Accept` header Prometheus 2 scrapes with.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One scrape, which must succeed, with `accept` as its `Accept` header if given.
fn scrape(stream: impl Read + Write, accept: Option<&str>) -> HttpAnswer {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    let answer = http_get(stream, "/metrics", &headers).unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    answer
}

/// The samples of an exposition, by series (name with labels).
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// A scrape as Prometheus makes it, over a Unix socket: OpenMetrics.
fn scrape_unix(socket: &Path) -> BTreeMap<String, f64> {
    let answer = scrape(
        UnixStream::connect(socket).unwrap(),
        Some(PROMETHEUS_ACCEPT),
    );
    assert_eq!(answer.header("content-type"), Some(OPENMETRICS));
    assert!(answer.body.ends_with("# EOF\n"), "{}", answer.body);
    samples(&answer.body)
}

/// The value of `series`, which must be present.
fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

/// A daemon serving a memory file of `size` bytes (pattern `seed`, every other page zero) as
/// `base`, with metrics on a Unix socket.
struct Setup {
    /// Holds the memory file and the socket.
    dir: tempfile::TempDir,
    mem: PathBuf,
    daemon: Daemon,
    socket: PathBuf,
}

fn setup(size: u64, seed: u64, args: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), size, seed, 2, 0);
    let socket = dir.path().join("metrics.sock");
    let addr = format!("unix:{}", socket.display());
    let mut all = vec!["--metrics-addr", &addr];
    all.extend_from_slice(args);
    let daemon = Daemon::start(&[("base", &mem)], &all);
    Setup {
        dir,
        mem,
        daemon,
        socket,
    }
}

#[test]
fn metrics_move_while_forks_run_and_agree_with_pagerctl_stats() {
    let Setup {
        mem,
        daemon,
        socket,
        dir: _dir,
    } = setup(8 * MIB, 91, &[]);

    let before = scrape_unix(&socket);
    assert_eq!(before["pagerd_faults_total"], 0.0);
    assert_eq!(before["pagerd_snapshots"], 1.0);
    assert_eq!(before["pagerd_healthy"], 1.0);
    assert_eq!(before[r#"pagerd_forks{state="serving"}"#], 0.0);
    assert_eq!(before[r#"pagerd_vms{state="running"}"#], 0.0);

    let mut vmms = Vec::new();
    for fork in ["a", "b"] {
        let handoff = daemon.create_fork("base", fork);
        let mut vmm = Vmm::attach(&mem, &handoff, &["verify", "hold"]);
        vmm.expect("verified");
        vmm.expect("holding");
        vmms.push(vmm);
    }
    // A refused handoff is counted by its reason.
    let refused = daemon.create_fork("base", "refused");
    let uffd = new_uffd();
    assert!(
        !raw_handoff(&refused, b"not json", &[uffd.as_fd()])
            .unwrap()
            .ok
    );

    let during = scrape_unix(&socket);
    assert_eq!(during[r#"pagerd_forks{state="serving"}"#], 2.0);
    assert_eq!(during[r#"pagerd_forks{state="waiting"}"#], 1.0);
    assert_eq!(
        during[r#"pagerd_snapshot_references{snapshot="base"}"#],
        3.0
    );
    assert_eq!(
        during[r#"pagerd_handoff_refusals_total{reason="invalid_json"}"#],
        1.0
    );
    assert!(during["pagerd_faults_total"] > 0.0, "the numbers move");
    let run = daemon.pagerctl(&["--json", "stats"]);
    let stats: StatsReport = run.json();
    let t = &stats.totals;
    for (series, value) in [
        ("pagerd_faults_total", t.faults),
        ("pagerd_pages_copied_total", t.pages_copied),
        ("pagerd_bytes_copied_total", t.bytes_copied),
        ("pagerd_zero_pages_total", t.zero_pages),
        ("pagerd_fault_latency_seconds_count", t.latency_ns.count),
    ] {
        assert_eq!(
            during[series], value as f64,
            "{series} against pagerctl stats"
        );
    }
    assert_eq!(
        during["pagerd_bytes_copied_total"],
        during["pagerd_pages_copied_total"] * 4096.0
    );

    // Ended sessions are counted by reason, and closed forks' counters stay in the totals.
    for vmm in vmms {
        vmm.finish();
    }
    for fork in ["a", "b"] {
        daemon.wait_fork(fork, ForkState::Ended);
        daemon.close_fork(fork);
    }
    let after = scrape_unix(&socket);
    assert_eq!(
        after[r#"pagerd_sessions_ended_total{reason="vmm_exited"}"#],
        2.0
    );
    assert_eq!(after["pagerd_faults_total"], during["pagerd_faults_total"]);
    assert_eq!(daemon.status().forks.serving, 0);

    // Anything but GET /metrics is told where to look.
    let answer = http_get(UnixStream::connect(&socket).unwrap(), "/", &[]).unwrap();
    assert_eq!(answer.status, 404, "{answer:?}");
}

#[test]
fn a_fresh_daemon_has_every_labelled_series_at_zero() {
    let fresh = scrape_unix(&setup(2 * MIB, 93, &[]).socket);
    let codes = std::iter::once("ok").chain(ErrorCode::ALL.iter().map(|c| c.as_str()));
    for op in [
        "status",
        "snapshot.register",
        "fork.create",
        "fork.close",
        "vm.start",
        "vm.stop",
        "daemon.upgrade",
        "unknown",
    ] {
        for code in codes.clone() {
            let series = format!(r#"pagerd_control_requests_total{{op="{op}",code="{code}"}}"#);
            assert_eq!(value(&fresh, &series), 0.0, "{series}");
        }
        let series = format!(r#"pagerd_control_request_duration_seconds_count{{op="{op}"}}"#);
        assert_eq!(value(&fresh, &series), 0.0, "{series}");
    }
    for reason in [
        "no_snapshot",
        "no_vmstate",
        "unsupported",
        "no_fuse",
        "no_binary",
        "no_jail_uid",
        "exists",
        "launch_failed",
        "other",
    ] {
        let series = format!(r#"pagerd_vm_start_failures_total{{reason="{reason}"}}"#);
        assert_eq!(value(&fresh, &series), 0.0, "{series}");
    }
    for series in [
        r#"pagerd_handoff_refusals_total{reason="no_fd"}"#,
        r#"pagerd_handoff_refusals_total{reason="invalid_json"}"#,
        r#"pagerd_sessions_ended_total{reason="vmm_exited"}"#,
        r#"pagerd_fault_errors_total{kind="poisoned"}"#,
        r#"pagerd_snapshot_import_duration_seconds_count{method="hardlink"}"#,
        "pagerd_fault_latency_seconds_count",
        r#"pagerd_fault_latency_seconds_bucket{le="+Inf"}"#,
    ] {
        assert_eq!(value(&fresh, series), 0.0, "{series}");
    }
    for state in ForkState::ALL {
        assert_eq!(
            value(&fresh, &format!(r#"pagerd_forks{{state="{state}"}}"#)),
            0.0
        );
    }
    for state in VmState::ALL {
        assert_eq!(
            value(&fresh, &format!(r#"pagerd_vms{{state="{state}"}}"#)),
            0.0
        );
    }
    // `base` was registered at start, by a copy (or a reflink where the disk can).
    let imports = value(
        &fresh,
        r#"pagerd_snapshot_import_duration_seconds_count{method="copy"}"#,
    ) + value(
        &fresh,
        r#"pagerd_snapshot_import_duration_seconds_count{method="reflink"}"#,
    );
    assert_eq!(imports, 1.0);
}

#[test]
fn the_daemon_describes_its_process_build_and_start_up() {
    let Setup {
        daemon,
        socket,
        dir: _dir,
        ..
    } = setup(2 * MIB, 94, &[]);
    let m = scrape_unix(&socket);
    let version = format!(
        r#"pagerd_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&m, &version), 1.0);
    let startup = value(&m, "pagerd_startup_duration_seconds");
    assert!(startup > 0.0 && startup < 60.0, "start-up took {startup} s");

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value(&m, "process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 120.0,
        "started at {started}, now {now}"
    );
    let cpu = value(&m, "process_cpu_seconds_total");
    assert!((0.0..120.0).contains(&cpu), "{cpu} s of CPU");
    let rss = value(&m, "process_resident_memory_bytes");
    let kernel_rss = proc_status_kb(daemon.pid(), "VmRSS") as f64 * 1024.0;
    assert!(
        rss > kernel_rss / 2.0 && rss < kernel_rss * 2.0,
        "RSS {rss} against the kernel's {kernel_rss}"
    );
    assert!(value(&m, "process_virtual_memory_bytes") >= rss);
    // The scrape's own connection is open while it is answered.
    let fds = value(&m, "process_open_fds");
    let now_fds = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count() as f64;
    assert!(
        (fds - now_fds).abs() <= 2.0,
        "{fds} descriptors reported, {now_fds} open"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let soft: f64 = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("the soft limit on open files");
    assert_eq!(value(&m, "process_max_fds"), soft);
}

#[test]
fn control_requests_imports_and_vm_start_failures_are_counted() {
    // A hypervisor that exits as soon as it starts.
    let exits = on_path("false").expect("false(1)");
    let Setup {
        dir,
        mem,
        daemon,
        socket,
    } = setup(2 * MIB, 95, &["--firecracker", exits.to_str().unwrap()]);
    let before = scrape_unix(&socket);

    assert_eq!(
        daemon.error_code(ForkGet { fork: id("nope") }),
        ErrorCode::NotFound
    );
    let answer = daemon.raw_request(r#"{"v":1,"id":1,"op":"no.such.op"}"#);
    assert_eq!(answer["error"]["code"], "invalid_argument", "{answer}");
    let start = |snapshot: &str| VmStart {
        snapshot: id(snapshot),
        vm: None,
        backend: VmBackend::Uffd,
        network_overrides: Vec::new(),
        vsock: None,
        prefetch: None,
    };
    assert_eq!(daemon.error_code(start("base")), ErrorCode::InvalidArgument);
    let vmstate = dir.path().join("vmstate");
    std::fs::write(&vmstate, b"device state").unwrap();
    let added = daemon.pagerctl(&[
        "snapshot",
        "add",
        "launchable",
        mem.to_str().unwrap(),
        "--vmstate",
        vmstate.to_str().unwrap(),
        "--vmm",
        "firecracker",
    ]);
    assert!(added.success(), "{added:?}");
    assert_eq!(daemon.error_code(start("launchable")), ErrorCode::Internal);

    let after = scrape_unix(&socket);
    let grew = |series: &str| value(&after, series) - value(&before, series);
    for (series, by) in [
        (
            r#"pagerd_control_requests_total{op="fork.get",code="not_found"}"#,
            1.0,
        ),
        (
            r#"pagerd_control_requests_total{op="fork.get",code="ok"}"#,
            0.0,
        ),
        (
            r#"pagerd_control_requests_total{op="unknown",code="invalid_argument"}"#,
            1.0,
        ),
        (
            r#"pagerd_control_requests_total{op="vm.start",code="invalid_argument"}"#,
            1.0,
        ),
        (
            r#"pagerd_control_requests_total{op="vm.start",code="internal"}"#,
            1.0,
        ),
        (
            r#"pagerd_control_requests_total{op="snapshot.register",code="ok"}"#,
            1.0,
        ),
        (
            r#"pagerd_control_request_duration_seconds_count{op="vm.start"}"#,
            2.0,
        ),
        (
            r#"pagerd_control_request_duration_seconds_bucket{le="+Inf",op="vm.start"}"#,
            2.0,
        ),
        (
            r#"pagerd_vm_start_failures_total{reason="no_vmstate"}"#,
            1.0,
        ),
        (
            r#"pagerd_vm_start_failures_total{reason="launch_failed"}"#,
            1.0,
        ),
        (r#"pagerd_vm_start_failures_total{reason="no_binary"}"#, 0.0),
    ] {
        assert_eq!(grew(series), by, "{series}");
    }
    assert!(grew(r#"pagerd_control_request_duration_seconds_sum{op="vm.start"}"#) > 0.0);
    let imports = |m: &BTreeMap<String, f64>| {
        ["hardlink", "reflink", "copy"]
            .map(|method| {
                value(
                    m,
                    &format!(
                        r#"pagerd_snapshot_import_duration_seconds_count{{method="{method}"}}"#
                    ),
                )
            })
            .iter()
            .sum::<f64>()
    };
    assert_eq!(imports(&after) - imports(&before), 1.0, "the new snapshot");
    // The VM that failed is listed as such.
    assert_eq!(value(&after, r#"pagerd_vms{state="failed"}"#), 1.0);
    assert_eq!(value(&after, r#"pagerd_vms{state="running"}"#), 0.0);
}

#[test]
fn metrics_come_in_the_format_asked_for_and_the_classic_one_passes_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 92, 0, 0);
    let addr = testkit::free_loopback_addr();
    let daemon = Daemon::start(&[("base", &mem)], &["--metrics-addr", &addr]);
    let handoff = daemon.create_fork("base", "a");
    let mut vmm = Vmm::attach(&mem, &handoff, &["verify", "hold"]);
    vmm.expect("verified");
    vmm.expect("holding");

    let openmetrics = scrape(TcpStream::connect(&addr).unwrap(), Some(PROMETHEUS_ACCEPT));
    assert_eq!(openmetrics.header("content-type"), Some(OPENMETRICS));
    let body = &openmetrics.body;
    assert!(body.ends_with("# EOF\n"));
    assert!(body.contains("# TYPE pagerd_faults counter\n"), "{body}");
    assert!(body.contains("# UNIT pagerd_fault_latency_seconds seconds\n"));
    let om = samples(body);
    let faults = value(&om, "pagerd_fault_latency_seconds_count");
    assert!(faults > 0.0);
    assert_eq!(
        value(&om, r#"pagerd_fault_latency_seconds_bucket{le="+Inf"}"#),
        faults,
        "the last bucket holds every fault"
    );
    assert!(!body.contains("e308"), "no huge finite bound for +Inf");

    for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
        let classic = scrape(TcpStream::connect(&addr).unwrap(), accept);
        assert_eq!(classic.header("content-type"), Some(CLASSIC), "{accept:?}");
        let body = &classic.body;
        assert!(
            !body.contains("# EOF") && !body.contains("# UNIT"),
            "{body}"
        );
        assert!(
            body.contains("# TYPE pagerd_faults_total counter\n"),
            "{body}"
        );
        assert!(body.contains("# TYPE pagerd_build_info gauge\n"), "{body}");
        assert_eq!(value(&samples(body), "pagerd_snapshots"), 1.0);
    }
    let classic = scrape(TcpStream::connect(&addr).unwrap(), None).body;
    vmm.finish();
    match promtool() {
        Ok(promtool) => {
            if let Err(complaints) = promtool_check_metrics(&promtool, &classic) {
                panic!("{complaints}\n{classic}");
            }
        }
        Err(why) => skip(
            "metrics_come_in_the_format_asked_for_and_the_classic_one_passes_promtool",
            &why,
        ),
    }
}

#[test]
fn prometheus_scrapes_pagerd_and_computes_fault_latency_quantiles() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 8 * MIB, 96, 2, 0);
    let addr = testkit::free_loopback_addr();
    let daemon = Daemon::start(&[("base", &mem)], &["--metrics-addr", &addr]);
    let prometheus = match Prometheus::start(&addr) {
        Ok(prometheus) => prometheus,
        Err(why) => {
            skip(
                "prometheus_scrapes_pagerd_and_computes_fault_latency_quantiles",
                &why,
            );
            return;
        }
    };
    // A scrape before any fault, so that the rate over the next ones sees the buckets grow.
    prometheus.wait_for("pagerd to be up", r#"up{job="pagerd"}"#, |v| v == [1.0]);
    prometheus.wait_for(
        "a scrape of pagerd",
        "pagerd_fault_latency_seconds_count",
        |v| v == [0.0],
    );
    let handoff = daemon.create_fork("base", "a");
    let mut vmm = Vmm::attach(&mem, &handoff, &["verify", "hold"]);
    vmm.expect("verified");
    vmm.expect("holding");
    let faults = daemon.pagerctl(&["--json", "stats"]).json::<StatsReport>();
    let faults = faults.totals.latency_ns.count as f64;
    assert!(faults > 0.0);
    prometheus.wait_for(
        "the faults to be scraped",
        "pagerd_fault_latency_seconds_count",
        |v| v == [faults],
    );
    let p99 = prometheus.wait_for(
        "a fault-latency quantile",
        "histogram_quantile(0.99, sum by (le) (rate(pagerd_fault_latency_seconds_bucket[1m])))",
        |v| v.len() == 1 && v[0].is_finite(),
    )[0];
    assert!(p99 > 0.0 && p99 < 60.0, "p99 {p99} s");
    let p50 = prometheus.query(
        "histogram_quantile(0.5, sum by (le) (rate(pagerd_fault_latency_seconds_bucket[1m])))",
    )[0];
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50} s, p99 {p99} s");
    // The labelled families as Prometheus stored them: every VM start failure reason, at 0.
    let reasons = prometheus.query("pagerd_vm_start_failures_total");
    assert_eq!(reasons, vec![0.0; 9], "every reason, none yet");
    vmm.finish();
}
