//! Real users for multi-tenant tests: a group (`pagerd-tenants`) with two member users and a
//! user outside it, created on the host with `groupadd`/`useradd` the first time a test asks,
//! and commands run as them through `setpriv` (their own uid, the group as primary group, no
//! other groups), so pagerd sees exactly what it would see from another login.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::binary;
use crate::daemon::{CtlRun, Daemon};

/// The tenants' group, passed to pagerd as `--group`.
pub const GROUP: &str = "pagerd-tenants";

/// One user of the host.
#[derive(Debug, Clone)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// The group's id and its users.
#[derive(Debug, Clone)]
pub struct Tenants {
    /// The group's id.
    pub gid: u32,
    /// A member: the attacker in most tests.
    pub member: User,
    /// Another member: the victim of a member's attack on other tenants.
    pub other_member: User,
    /// A user outside the group.
    pub outsider: User,
}

/// Runs `program args`, panicking with its output if it fails.
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The numeric id `id -FLAG NAME` prints.
fn id_of(flag: &str, name: &str) -> u32 {
    run_ok("id", &[flag, name])
        .parse()
        .expect("id prints a number")
}

/// Creates user `name` (no home, no login shell) with primary group `group` if it is missing.
fn ensure_user(name: &str, group: &str) -> User {
    let exists = Command::new("id")
        .arg(name)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        run_ok(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                group,
                name,
            ],
        );
    }
    User {
        name: name.to_owned(),
        uid: id_of("-u", name),
        gid: id_of("-g", name),
    }
}

/// The tenants, created on the host the first time (idempotent across test processes).
pub fn tenants() -> &'static Tenants {
    static TENANTS: OnceLock<Tenants> = OnceLock::new();
    TENANTS.get_or_init(|| {
        // -f: success if the group exists already.
        run_ok("groupadd", &["-f", "--system", GROUP]);
        run_ok("groupadd", &["-f", "--system", "pagerd-outsiders"]);
        let gid = run_ok("getent", &["group", GROUP])
            .split(':')
            .nth(2)
            .and_then(|g| g.parse().ok())
            .expect("the group's id");
        Tenants {
            gid,
            member: ensure_user("pagerd-member", GROUP),
            other_member: ensure_user("pagerd-member2", GROUP),
            outsider: ensure_user("pagerd-outsider", "pagerd-outsiders"),
        }
    })
}

impl User {
    /// A command that runs `program` as this user (its uid and primary group, no others).
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        command
    }

    /// Runs `pagerctl args` as this user against `daemon`.
    pub fn pagerctl(&self, daemon: &Daemon, args: &[&str]) -> CtlRun {
        let out = self
            .command(&binary("pagerctl"))
            .args(args)
            .env(proto::defaults::SOCKET_ENV, daemon.control_socket())
            .env_remove(proto::defaults::STATE_DIR_ENV)
            .output()
            .expect("run pagerctl as another user");
        CtlRun::from(out)
    }

    /// A directory this user owns (mode 0755) inside `parent`, which is opened up (0755) so
    /// the user can reach it.
    pub fn own_dir(&self, parent: &Path, name: &str) -> std::path::PathBuf {
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .expect("open up the parent");
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).expect("create the directory");
        std::os::unix::fs::chown(&dir, Some(self.uid), Some(self.gid)).expect("chown");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the directory");
        dir
    }

    /// Writes `bytes` to `path` as this user's file (owned by it, mode `mode`).
    pub fn own_file(&self, path: &Path, bytes: &[u8], mode: u32) {
        std::fs::write(path, bytes).expect("write the file");
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).expect("chown");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

/// A process of another user holding idle connections to a Unix socket until dropped.
#[derive(Debug)]
pub struct HeldConnections {
    child: std::process::Child,
    /// How many connects succeeded.
    pub connected: usize,
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl User {
    /// Opens `count` connections to `socket` as this user, one after another, sending nothing,
    /// and keeps them until the result is dropped; returns once every connect has returned.
    pub fn hold_connections(&self, socket: &Path, count: usize) -> HeldConnections {
        use std::io::BufRead;
        let script = r#"
            use IO::Socket::UNIX;
            $| = 1;
            my @held; my $n = 0;
            for (1 .. $ARGV[1]) {
                my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or next;
                push @held, $s; $n++;
            }
            print "connected $n\n";
            <STDIN>;
        "#;
        let mut child = self
            .command(Path::new("/usr/bin/perl"))
            .args(["-e", script])
            .arg(socket)
            .arg(count.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run perl as another user");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the count");
        let connected = line
            .trim()
            .strip_prefix("connected ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the connecting process said {line:?}"));
        HeldConnections { child, connected }
    }
}

/// A process of another user trickling a request to a TCP address over many connections.
#[derive(Debug)]
pub struct SlowClients {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Drop for SlowClients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SlowClients {
    /// Waits until every connection was closed by the server; returns the seconds the slowest
    /// lasted, by the client's count.
    pub fn wait_all_closed(&mut self) -> u64 {
        let line = self
            .lines
            .next()
            .expect("a line")
            .expect("read the slow clients");
        line.strip_prefix("closed after ")
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("the slow clients said {line:?}"))
    }
}

impl User {
    /// Opens `count` TCP connections to `addr` as this user and sends each one byte of a
    /// request (`GET /metrics …`) per second, for ever, until the server closes them all.
    pub fn slow_clients(&self, addr: &str, count: usize) -> SlowClients {
        use std::io::BufRead;
        let script = r#"
            use IO::Socket::INET; use IO::Select;
            $| = 1; $SIG{PIPE} = 'IGNORE';
            my @s = map { IO::Socket::INET->new(PeerAddr => $ARGV[0]) or die "connect: $!\n" } 1 .. $ARGV[1];
            print "open\n";
            my $request = "GET /metrics HTTP/1.1\r\nHost: x\r\n";
            my (%closed, $at, $seconds) = ((), 0, 0);
            while (keys %closed < @s) {
                for my $i (0 .. $#s) {
                    next if $closed{$i};
                    if (IO::Select->new($s[$i])->can_read(0)) {
                        my $n = sysread($s[$i], my $buf, 4096);
                        if (!$n) { $closed{$i} = 1; next; }
                    }
                    $closed{$i} = 1 unless defined syswrite($s[$i], substr($request, $at % length($request), 1));
                }
                $at++; sleep 1; $seconds++;
            }
            print "closed after $seconds\n";
            <STDIN>;
        "#;
        let mut child = self
            .command(Path::new("/usr/bin/perl"))
            .args(["-e", script, addr])
            .arg(count.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run perl as another user");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().expect("a line").expect("read");
        assert_eq!(first, "open", "the slow clients could not connect");
        SlowClients { child, lines }
    }
}

impl From<Output> for CtlRun {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}
