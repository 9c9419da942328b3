//! `pagerctl top` at a real 80×24 terminal (tmux) against a real pagerd with 40 forks, one
//! of them busy, some served and idle, the rest waiting, and a process holding the FUSE
//! memory file: the header stays on the first rows, the busiest fork comes first, no line is
//! wider than the terminal, and `q` quits with status 0.

use proto::model::ForkState;
use testkit::{binary, poll_until, skip, write_snapshot, Daemon, Tmux, Vmm, DEADLINE};

const MIB: u64 = 1 << 20;
const WIDTH: u16 = 80;
const HEIGHT: u16 = 24;

#[test]
fn top_keeps_its_header_shows_the_busiest_fork_first_in_80_columns_and_quits_on_q() {
    if !Tmux::available() {
        skip(
            "top_keeps_its_header_shows_the_busiest_fork_first_in_80_columns_and_quits_on_q",
            "tmux is not installed (scripts/setup.sh --for-tests installs it)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 4 * MIB, 76, 3, 0);
    let daemon = Daemon::start(&[("base", &mem)], &[]);

    // 36 forks wait; 3 are served and idle once they have read everything; the busiest comes
    // last by name, so only sorting by activity puts it first.
    for i in 0..36 {
        daemon.create_fork("base", &format!("idle-{i:02}"));
    }
    let held: Vec<Vmm> = (0..3)
        .map(|i| daemon.attach_holding_vmm("base", &format!("held-{i}"), &mem))
        .collect();
    let socket = daemon.create_fork("base", "zz-busy");
    let mut busy = Vmm::attach(&mem, &socket, &["churn"]);
    busy.expect("churning");
    daemon.wait_fork("zz-busy", ForkState::Serving);
    let mut file = Vmm::map_file(&mem, &daemon.fuse_file("base"), &["verify", "hold"]);
    file.expect("holding");

    let tmux = Tmux::start(
        WIDTH,
        HEIGHT,
        &[
            binary("pagerctl").display().to_string(),
            "--socket".into(),
            daemon.control_socket().display().to_string(),
            "top".into(),
            "--interval-ms".into(),
            "300".into(),
        ],
    );
    // The first frame knows no rates: wait for one that shows zz-busy faulting.
    let mut screen = Vec::new();
    let busiest_first = |screen: &[String]| {
        let header = screen.iter().position(|l| l.starts_with("ID "))?;
        let row: Vec<&str> = screen.get(header + 1)?.split_whitespace().collect();
        let rate: f64 = row.get(5)?.parse().ok()?;
        (header <= 4 && row[0] == "zz-busy" && rate > 0.0).then_some(row[2] == "serving")
    };
    let shown = poll_until(DEADLINE, || {
        screen = tmux.screen();
        screen.first().is_some_and(|l| l.starts_with("pagerd ")) && busiest_first(&screen).is_some()
    });
    assert!(
        shown,
        "no header on top with zz-busy first, faulting:\n{}",
        screen.join("\n")
    );
    assert_eq!(busiest_first(&screen), Some(true), "{}", screen.join("\n"));
    let summary = screen[..4].join("\n");
    assert!(
        summary.contains("4 serving, 36 waiting") && summary.contains("file users: 1"),
        "{summary}"
    );
    assert!(screen.len() <= usize::from(HEIGHT), "{}", screen.join("\n"));
    for line in &screen {
        assert!(
            line.chars().count() <= usize::from(WIDTH),
            "a line wraps past {WIDTH} columns: {line:?}"
        );
    }
    assert!(
        screen.last().unwrap().starts_with("q quit"),
        "{}",
        screen.join("\n")
    );

    tmux.send_keys("q");
    let mut status = None;
    assert!(
        poll_until(DEADLINE, || {
            status = tmux.exit_status();
            status.is_some()
        }),
        "pagerctl top still runs after q:\n{}",
        tmux.screen().join("\n")
    );
    assert_eq!(status, Some(0), "{}", tmux.screen().join("\n"));

    busy.kill();
    for vmm in held {
        vmm.finish();
    }
    file.close_stdin();
    let (status, _) = file.wait_exit();
    assert!(status.success());
}
