//! Hostile control clients get an error or are dropped, and a fork that is faulting meanwhile
//! keeps being served.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use proto::control::{request_line, ErrorCode, Request, Response};
use proto::model::{ForkState, StatusReport};
use serde_json::Value;
use testkit::{wait_until, write_snapshot, Daemon, Vmm, DEADLINE};

const MIB: u64 = 1 << 20;

/// How long the daemon keeps an idle control connection in this test. Long enough that no
/// connection below that has sent its request is dropped for being slow on a busy machine;
/// only the silent client waits for it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

fn read_response(stream: &UnixStream) -> Option<Response> {
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}")),
        ),
    }
}

#[test]
fn hostile_clients_are_refused_while_a_faulting_fork_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 8 * MIB, 41, 0, 0);
    let idle_ms = IDLE_TIMEOUT.as_millis().to_string();
    let daemon = Daemon::start(&[("base", &mem)], &["--control-idle-timeout-ms", &idle_ms]);
    // A client that connects and says nothing: dropped after the idle timeout (checked below,
    // while the rest runs meanwhile).
    let silent = UnixStream::connect(daemon.control_socket()).unwrap();
    silent.set_read_timeout(Some(DEADLINE)).unwrap();

    let socket = daemon.create_fork("base", "busy");
    let mut vmm = Vmm::attach(&mem, &socket, &["churn"]);
    vmm.expect("churning");
    let faults = || daemon.fork("busy").stats.faults;
    let faults_before = faults();

    let bad_lines = [
        "not json",
        "[]",
        r#"{"op":"status"}"#,
        r#"{"v":"1","op":"status"}"#,
        r#"{"v":1,"op":"explode"}"#,
        r#"{"v":1,"op":"fork.get","fork":42}"#,
        r#"{"v":1,"op":"fork.get","fork":"../../etc"}"#,
        r#"{"v":1,"op":"fork.create","snapshot":"base","fork":"../../etc/passwd"}"#,
        r#"{"v":1,"op":"snapshot.register","snapshot":"x","path":"/etc/passwd"}"#,
        r#"{"v":1,"op":"snapshot.delete","snapshot":"base","defer":"yes"}"#,
        r#"{"v":1,"op":"fork.wait","fork":"busy","state":"dancing"}"#,
    ];
    for line in bad_lines {
        let reply = daemon.raw_response(line);
        assert!(!reply.ok, "{line}: {reply:?}");
        let error = reply
            .error
            .clone()
            .unwrap_or_else(|| panic!("{line}: {reply:?}"));
        assert_eq!(error.code, ErrorCode::InvalidArgument, "{line}: {reply:?}");
        assert!(!error.message.is_empty());
    }
    assert!(!daemon.state_dir().join("forks/passwd.json").exists());

    // A 100 MB line: an error, then the connection is closed.
    let mut flood = UnixStream::connect(daemon.control_socket()).unwrap();
    flood.set_read_timeout(Some(DEADLINE)).unwrap();
    let writer = {
        let mut flood = flood.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..100 {
                if flood.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let reply = read_response(&flood).expect("an error line before the close");
    let error = reply.error.expect("an error");
    assert_eq!(error.code, ErrorCode::InvalidArgument);
    assert!(error.message.contains("longer than"), "{error:?}");
    let mut rest = Vec::new();
    let _ = flood.read_to_end(&mut rest);
    writer.join().unwrap();

    // Two hundred connections open at once, each answered. Each sends its request as soon as
    // it is connected, and all stay open until every answer is read.
    let conns: Vec<UnixStream> = (0..200)
        .map(|i| {
            let mut c = UnixStream::connect(daemon.control_socket()).unwrap();
            c.set_read_timeout(Some(DEADLINE)).unwrap();
            writeln!(c, "{}", request_line(&Value::from(i), &Request::Status {})).unwrap();
            c
        })
        .collect();
    for (i, c) in conns.iter().enumerate() {
        let reply = read_response(c).expect("a reply");
        assert!(reply.ok, "{reply:?}");
        assert_eq!(reply.id, i, "the request id is echoed");
        let status: StatusReport = serde_json::from_value(reply.result.unwrap()).unwrap();
        assert_eq!(status.pid, daemon.pid());
    }
    drop(conns);

    // The silent client was dropped.
    let mut buf = [0u8; 1];
    assert_eq!(
        (&silent).read(&mut buf).unwrap(),
        0,
        "the idle connection is closed"
    );

    // The fork was served all along and still is.
    wait_until(
        "the busy fork to keep faulting",
        Duration::from_secs(30),
        || faults() > faults_before,
    );
    let busy = daemon.fork("busy");
    assert_eq!(busy.state, ForkState::Serving);
    assert_eq!(busy.stats.errors, 0);
    vmm.kill();
}
