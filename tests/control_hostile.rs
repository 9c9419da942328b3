//! Hostile control clients get an error or are dropped, and a fork that is faulting meanwhile
//! keeps being served.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;
use testkit::{wait_until, write_snapshot, Daemon, Vmm, DEADLINE};

const MIB: u64 = 1 << 20;

fn read_line(stream: &UnixStream) -> Option<Value> {
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(serde_json::from_str(&line).unwrap()),
    }
}

#[test]
fn hostile_clients_are_refused_while_a_faulting_fork_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), 8 * MIB, 41, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--control-idle-timeout-ms", "1000"]);
    let socket = daemon.create_fork("base", "busy");
    let mut vmm = Vmm::attach(&mem, &socket, &["churn"]);
    vmm.expect("churning");
    let faults = || daemon.fork("busy")["stats"]["faults"].as_u64().unwrap();
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
        let reply = daemon.raw_request(line);
        assert_eq!(reply["ok"], false, "{line}: {reply}");
        assert_eq!(
            reply["error"]["code"], "invalid_argument",
            "{line}: {reply}"
        );
        assert!(!reply["error"]["message"].as_str().unwrap().is_empty());
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
    let reply = read_line(&flood).expect("an error line before the close");
    assert_eq!(reply["error"]["code"], "invalid_argument");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("longer than"),
        "{reply}"
    );
    let mut rest = Vec::new();
    let _ = flood.read_to_end(&mut rest);
    writer.join().unwrap();

    // A client that connects and says nothing is dropped after the idle timeout.
    let silent = UnixStream::connect(daemon.control_socket()).unwrap();
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        (&silent).read(&mut buf).unwrap(),
        0,
        "the idle connection is closed"
    );

    // Two hundred connections at once, each answered.
    let conns: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(daemon.control_socket()).unwrap())
        .collect();
    for (i, mut c) in conns.iter().enumerate() {
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        writeln!(c, r#"{{"v":1,"id":{i},"op":"status"}}"#).unwrap();
    }
    for (i, c) in conns.iter().enumerate() {
        let reply = read_line(c).expect("a reply");
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["id"], i);
    }
    drop(conns);

    // The fork was served all along and still is.
    wait_until(
        "the busy fork to keep faulting",
        Duration::from_secs(30),
        || faults() > faults_before,
    );
    let busy = daemon.fork("busy");
    assert_eq!(busy["state"], "serving");
    assert_eq!(busy["stats"]["errors"], 0);
    vmm.kill();
}
