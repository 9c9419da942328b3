//! pagerd as a service: the `sd_notify` protocol spoken for real (a datagram socket as
//! `$NOTIFY_SOCKET`, `READY=1` only once the control socket answers, `STATUS=` lines,
//! `STOPPING=1` at SIGTERM), and the systemd unit shipped in `dist/` checked by
//! `systemd-analyze verify`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use proto::client::Client;
use testkit::{binary, skip, DEADLINE};

/// Reads notification datagrams until one contains `wanted`; returns every line read.
fn read_until(socket: &UnixDatagram, wanted: &str) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {wanted} within the deadline: {lines:?}"
        );
        socket.set_read_timeout(Some(left)).unwrap();
        let n = socket.recv(&mut buf).expect("a notification");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        lines.extend(message.lines().map(str::to_owned));
        if message.lines().any(|l| l == wanted) {
            return lines;
        }
    }
}

#[test]
fn pagerd_says_ready_only_once_it_serves_and_says_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let state = dir.path().join("state");
    let control = state.join("control.sock");
    let mut pagerd = Command::new(binary("pagerd"))
        .args(["--state-dir", state.to_str().unwrap(), "--fuse", "off"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let before_ready = read_until(&notify, "READY=1");
    // Nothing is awaited between READY=1 and this call: it must be answered at once.
    let status = Client::new(&control)
        .status()
        .expect("served when READY=1 arrives");
    assert_eq!(status.pid, pagerd.id());
    assert!(
        before_ready
            .iter()
            .any(|l| l == "STATUS=reconciling the state directory"),
        "{before_ready:?}"
    );
    assert!(
        before_ready
            .iter()
            .any(|l| l.starts_with("STATUS=serving 0 forks")),
        "READY comes with what the daemon serves: {before_ready:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pagerd.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let at_stop = read_until(&notify, "STOPPING=1");
    assert!(
        at_stop.iter().any(|l| l == "STATUS=stopping"),
        "{at_stop:?}"
    );
    let exit = pagerd.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        skip(
            "the_shipped_unit_passes_systemd_analyze_verify",
            "systemd-analyze is not installed (Debian package `systemd`)",
        );
        return;
    };
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/pagerd.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/pagerd "), "{text}");
    assert!(text.contains("Type=notify") && text.contains("KillMode=process"));
    // The packaged unit names /usr/bin/pagerd; here the one just built stands in for it
    // (the package test verifies the installed unit as it is).
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("pagerd.service");
    let pagerd = binary("pagerd");
    std::fs::write(
        &local,
        text.replace("/usr/bin/pagerd", pagerd.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&local)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("pagerd.service"),
        "systemd-analyze has remarks on the unit: {stderr}"
    );
}
