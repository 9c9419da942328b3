//! Prometheus metrics scraped from a real pagerd while forks run: the numbers move, and they
//! agree with `pagerctl stats`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use proto::model::{ForkState, StatsReport};
use testkit::{new_uffd, raw_handoff, write_snapshot, Daemon, Vmm};

const MIB: u64 = 1 << 20;

/// One scrape over HTTP/1.1: the status line and the body.
fn scrape(mut stream: impl Read + Write) -> (String, String) {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: pagerd\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
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

fn scrape_unix(socket: &Path) -> BTreeMap<String, f64> {
    let (status, body) = scrape(UnixStream::connect(socket).unwrap());
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.ends_with("# EOF\n"), "{body}");
    samples(&body)
}

#[test]
fn metrics_move_while_forks_run_and_agree_with_pagerctl_stats() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 8 * MIB, 91, 2, 0);
    let socket = dir.path().join("metrics.sock");
    let addr = format!("unix:{}", socket.display());
    let daemon = Daemon::start(&[("base", &mem)], &["--metrics-addr", &addr]);

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
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

#[test]
fn metrics_are_served_on_loopback_tcp_too() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 2 * MIB, 92, 0, 0);
    let addr = testkit::free_loopback_addr();
    let _daemon = Daemon::start(&[("base", &mem)], &["--metrics-addr", &addr]);
    let (status, body) = scrape(TcpStream::connect(&addr).unwrap());
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(samples(&body)["pagerd_snapshots"], 1.0);
}
