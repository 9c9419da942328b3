//! Hostile control clients get an error or are dropped, and a fork that is faulting meanwhile
//! keeps being served: malformed lines, duplicate keys, a line nesting too deep (refused
//! before it ends), an endless line, hundreds of connections at once, and group members
//! (other users, through `setpriv`) holding every connection they may, which neither keeps
//! root out nor another member beyond its own limit.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use proto::control::{request_line, ErrorCode, ForkList, Response, Status};
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
            writeln!(c, "{}", request_line(&Value::from(i), &Status {}.into())).unwrap();
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

#[test]
fn a_duplicate_key_is_refused_and_the_daemon_keeps_serving() {
    let daemon = Daemon::start(&[], &[]);
    for line in [
        r#"{"v":1,"op":"fork.get","fork":"a","fork":"b"}"#,
        r#"{"v":1,"v":1,"op":"status"}"#,
        r#"{"v":1,"op":"status","id":{"k":1,"k":2}}"#,
    ] {
        let reply = daemon.raw_response(line);
        let error = reply.error.unwrap_or_else(|| panic!("{line} was accepted"));
        assert_eq!(error.code, ErrorCode::InvalidArgument, "{line}: {error:?}");
        assert!(error.message.contains("duplicate key"), "{line}: {error:?}");
    }
    assert_eq!(daemon.status().pid, daemon.pid());
}

#[test]
fn deep_nesting_without_a_newline_is_refused_at_once() {
    // The idle timeout is far longer than the read below may wait: an answer at all proves
    // the daemon did not wait for the line to end or for the connection to go idle.
    let daemon = Daemon::start(&[], &["--control-idle-timeout-ms", "60000"]);
    let stream = UnixStream::connect(daemon.control_socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        // The daemon may close before it has read it all.
        std::thread::spawn(move || {
            let _ = stream.write_all(&vec![b'['; 100_000]);
        })
    };
    let reply = read_response(&stream).expect("an answer, well before the idle timeout");
    let error = reply.error.expect("an error");
    assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
    assert!(error.message.contains("deeper than 128"), "{error:?}");
    let mut rest = Vec::new();
    let _ = (&stream).read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "nothing after the error: the connection is closed"
    );
    writer.join().unwrap();
    assert_eq!(daemon.status().pid, daemon.pid());
}

/// A perl client run as another user (through `setpriv`): it opens connections one after
/// the other, sends each a `status` request and keeps those that are answered, then prints
/// `held=N refused=M last=<the last refusal>` and holds them until its stdin closes.
struct Holder {
    child: std::process::Child,
    summary: String,
}

impl Holder {
    fn start(uid: u32, gid: u32, socket: &std::path::Path, count: usize) -> Self {
        let script = r#"
            use IO::Socket::UNIX;
            $SIG{PIPE} = 'IGNORE';
            $| = 1;
            my ($path, $n) = @ARGV;
            my @held;
            my ($refused, $last) = (0, '');
            for (1 .. $n) {
                my $s = IO::Socket::UNIX->new(Peer => $path) or die "connect: $!\n";
                print $s qq({"v":1,"op":"status"}\n);
                my $answer = <$s>;
                if (defined $answer && $answer =~ /"ok":true/) { push @held, $s; next; }
                $refused++;
                $last = defined $answer ? $answer : "closed\n";
                chomp $last;
            }
            print "held=" . scalar(@held) . " refused=$refused last=$last\n";
            my $ignored = <STDIN>;
        "#;
        let mut child = std::process::Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .args(["--", "perl", "-e", script])
            .arg(socket)
            .arg(count.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run perl through setpriv");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let summary = rx
            .recv_timeout(DEADLINE)
            .expect("the holder to report")
            .trim()
            .to_owned();
        Self { child, summary }
    }

    /// How many connections it holds.
    fn held(&self) -> usize {
        let field = self.summary.split_whitespace().next().unwrap_or_default();
        field
            .strip_prefix("held=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad summary {:?}", self.summary))
    }

    /// The last refusal, decoded.
    fn last_refusal(&self) -> Response {
        let last = self
            .summary
            .split_once("last=")
            .map(|(_, last)| last)
            .unwrap_or_else(|| panic!("bad summary {:?}", self.summary));
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{last:?}: {e}"))
    }

    /// Closes its stdin: it hangs up every connection and exits.
    fn release(mut self) {
        drop(self.child.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

#[test]
fn group_members_hit_their_connection_limits_and_root_is_still_answered() {
    const PER_UID: usize = 30;
    let daemon = Daemon::start(
        &[],
        &[
            "--group",
            "65534",
            "--max-connections-per-uid",
            "30",
            "--control-idle-timeout-ms",
            "60000",
        ],
    );
    // Let other users through the test's directory, so that only pagerd's modes decide.
    std::fs::set_permissions(
        daemon.scratch(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let socket = daemon.control_socket().to_owned();
    // Eight members, 65534 down to 65527 (primary group 65534), each asking for one more
    // connection than it may hold: 240 held in all, which leaves only the reserve, so the
    // last one's extra connection is refused for that rather than for its own limit.
    let mut holders = Vec::new();
    for i in 0..8 {
        let holder = Holder::start(65534 - i, 65534, &socket, PER_UID + 1);
        assert_eq!(holder.held(), PER_UID, "{}", holder.summary);
        let refusal = holder.last_refusal().error.expect("an error");
        assert_eq!(refusal.code, ErrorCode::Unavailable, "{refusal:?}");
        let why = if i < 7 {
            "--max-connections-per-uid"
        } else {
            "too many control connections (240 open)"
        };
        assert!(refusal.message.contains(why), "{refusal:?}");
        // Root is answered throughout.
        assert_eq!(daemon.status().pid, daemon.pid());
        holders.push(holder);
    }
    // (Root's last request may still be closing.)
    wait_until(
        "the members' connections alone to be open",
        DEADLINE,
        || daemon.control_connections() == 8 * PER_UID,
    );

    // A ninth member gets no connection at all: what is left is kept for root.
    let ninth = Holder::start(65526, 65534, &socket, 1);
    assert_eq!(ninth.held(), 0, "{}", ninth.summary);
    let refusal = ninth.last_refusal().error.expect("an error");
    assert_eq!(refusal.code, ErrorCode::Unavailable, "{refusal:?}");
    assert!(refusal.message.contains("too many"), "{refusal:?}");
    ninth.release();

    // Root gets the whole reserve, all connections open at once, each answered.
    let conns: Vec<UnixStream> = (0..16)
        .map(|i| {
            let mut c = UnixStream::connect(&socket).unwrap();
            c.set_read_timeout(Some(DEADLINE)).unwrap();
            writeln!(c, "{}", request_line(&Value::from(i), &Status {}.into())).unwrap();
            c
        })
        .collect();
    for c in &conns {
        let reply = read_response(c).expect("a reply");
        assert!(reply.ok, "{reply:?}");
    }
    drop(conns);

    // Once the members hang up, they are served again.
    for holder in holders {
        holder.release();
    }
    wait_until(
        "the daemon to close the members' connections",
        DEADLINE,
        || daemon.control_connections() == 0,
    );
    let again = Holder::start(65534, 65534, &socket, 1);
    assert_eq!(again.held(), 1, "{}", again.summary);
    again.release();
}

#[test]
fn a_client_that_reads_its_answers_late_gets_them_all() {
    // Found by the end-to-end fuzzer: answers were written one JSON token per write, so a
    // single large answer filled the socket with hundreds of tiny packets. A client still
    // sending (it reads its answers once it is done, as pipelining clients do) then blocked
    // the daemon's write, the daemon stopped reading, and both waited for the idle timeout.
    let dir = tempfile::tempdir().unwrap();
    let mem = write_snapshot(&dir.path().join("mem"), MIB, 5, 0, 0);
    let daemon = Daemon::start(&[("base", &mem)], &["--control-idle-timeout-ms", "60000"]);
    for i in 0..20 {
        daemon.create_fork("base", &format!("vm-{i}"));
    }
    let stream = UnixStream::connect(daemon.control_socket()).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    // Far less than the idle timeout: a send stalled behind unread answers fails here.
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let list = request_line(&Value::from(1), &ForkList {}.into()) + "\n";
    let mut batch = list.repeat(4);
    // Blank lines get no answer; they only make the batch larger than the socket's buffer.
    batch.push_str(&" \n".repeat(200_000));
    (&stream)
        .write_all(batch.as_bytes())
        .expect("the whole batch is read while its answers wait");
    let mut answers = BufReader::new(&stream);
    for _ in 0..4 {
        let mut line = String::new();
        answers.read_line(&mut line).expect("an answer");
        let reply: Response = serde_json::from_str(&line).unwrap();
        assert!(reply.ok, "{reply:?}");
        let forks = reply.result.unwrap();
        assert_eq!(forks.as_array().map(Vec::len), Some(20));
    }
}
