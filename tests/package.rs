//! The Debian packages as an operator gets them: `scripts/package.sh` builds them; lintian finds
//! no error; the binaries are stripped and their symbols are in `pagerd-dbgsym`; every manual
//! page renders and refers only to installed pages; the completions know the options' values;
//! and the walk-through in `docs/operations.md` runs line by line as written (install, start,
//! add, fork, upgrade in place twice, remove, purge) with what each line promises checked.
//!
//! Where systemd is not running (this project's machines) the walk-through starts the daemon
//! as the unit would (its `Environment=`, `EnvironmentFile=` and `ExecStart=`), and the
//! maintainer scripts take their no-systemd paths (`SIGUSR2` on upgrade, `SIGTERM` on
//! removal); what only systemd can show is a test of its own, skipped loudly here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use proto::client::Client;
use proto::model::ForkState;
use testkit::{skip, wait_until, write_snapshot, Vmm, DEADLINE};

/// The tests here install the same package: one at a time.
static DPKG: Mutex<()> = Mutex::new(());

const STATE_DIR: &str = "/var/lib/pagerd";
const DEFAULTS: &str = "/etc/default/pagerd";
const ENABLED_LINK: &str = "/etc/systemd/system/multi-user.target.wants/pagerd.service";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `program` and panics with its output unless it succeeds; returns its stdout.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The two packages `scripts/package.sh` printed, built once per test process.
fn packages() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = root();
        let built = Command::new("bash")
            .arg(root.join("scripts/package.sh"))
            .output()
            .unwrap();
        assert!(built.status.success(), "{}", text(&built.stderr));
        let paths: Vec<PathBuf> = text(&built.stdout).lines().map(|l| root.join(l)).collect();
        assert_eq!(paths.len(), 2, "{paths:?}");
        (paths[0].clone(), paths[1].clone())
    })
}

/// Why the package cannot be installed here, if it cannot.
fn cannot_install() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() || !Path::new("/usr/bin/dpkg").exists() {
        return Some("installing a package needs root and dpkg");
    }
    if run("dpkg", &["-s", "pagerd"]).status.success() {
        return Some("a pagerd package is already installed here; it is left alone");
    }
    if Path::new(STATE_DIR).exists() {
        return Some("/var/lib/pagerd exists here (another pagerd's state); it is left alone");
    }
    None
}

/// Unpacks a package into a temporary directory.
fn unpack(deb: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ok(
        "dpkg-deb",
        &["-x", deb.to_str().unwrap(), dir.path().to_str().unwrap()],
    );
    dir
}

#[test]
fn the_packages_are_lintian_clean_with_stripped_binaries_and_their_symbols_apart() {
    const TEST: &str =
        "the_packages_are_lintian_clean_with_stripped_binaries_and_their_symbols_apart";
    if !Path::new("/usr/bin/dpkg-deb").exists() || !Path::new("/usr/bin/lintian").exists() {
        skip(
            TEST,
            "needs dpkg-deb and lintian (scripts/setup.sh installs them)",
        );
        return;
    }
    let _one = DPKG.lock().unwrap_or_else(|e| e.into_inner());
    let (deb, dbgsym) = packages();
    for package in [deb, dbgsym] {
        let lint = run(
            "lintian",
            &[
                "--fail-on",
                "error",
                "--tag-display-limit",
                "0",
                package.to_str().unwrap(),
            ],
        );
        let report = text(&lint.stdout) + &text(&lint.stderr);
        assert!(lint.status.success(), "lintian: {report}");
        assert!(!report.lines().any(|l| l.starts_with("E: ")), "{report}");
    }

    let files = unpack(deb);
    let debug = unpack(dbgsym);
    let version = env!("CARGO_PKG_VERSION");
    for name in ["pagerd", "pagerctl"] {
        let binary = files.path().join("usr/bin").join(name);
        let kind = ok("file", &[binary.to_str().unwrap()]);
        assert!(kind.contains(", stripped"), "{kind}");
        let sections = ok("readelf", &["-S", "-n", binary.to_str().unwrap()]);
        for section in [".debug_info", ".debug_line", ".symtab"] {
            assert!(!sections.contains(section), "{name} keeps no {section}");
        }
        assert!(sections.contains(".gnu_debuglink"), "{sections}");
        let id = sections
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .expect("a build id")
            .to_owned();
        let symbols = debug.path().join(format!(
            "usr/lib/debug/.build-id/{}/{}.debug",
            &id[..2],
            &id[2..]
        ));
        let debug_sections = ok("readelf", &["-S", symbols.to_str().unwrap()]);
        assert!(debug_sections.contains(".debug_line"), "{debug_sections}");
    }
    // The stripped daemon still names itself for an upgrade (its ELF section).
    let note = ok(
        "readelf",
        &[
            "-p",
            ".pagerd_version",
            files.path().join("usr/bin/pagerd").to_str().unwrap(),
        ],
    );
    assert!(note.contains(&format!("pagerd {version}")), "{note}");

    // Control data: the conffile, the changelog's version, the maintainer scripts' syntax.
    let control = tempfile::tempdir().unwrap();
    ok(
        "dpkg-deb",
        &[
            "-e",
            deb.to_str().unwrap(),
            control.path().to_str().unwrap(),
        ],
    );
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), DEFAULTS);
    for script in ["postinst", "prerm", "postrm"] {
        ok("sh", &["-n", control.path().join(script).to_str().unwrap()]);
    }
    let changelog = ok(
        "zcat",
        &[files
            .path()
            .join("usr/share/doc/pagerd/changelog.gz")
            .to_str()
            .unwrap()],
    );
    assert!(
        changelog.starts_with(&format!("pagerd ({version}) ")),
        "{changelog}"
    );
    let defaults = std::fs::read_to_string(files.path().join("etc/default/pagerd")).unwrap();
    assert!(defaults.contains("PAGERD_OPTS=") && defaults.contains("FIRECRACKER="));
    let unit =
        std::fs::read_to_string(files.path().join("lib/systemd/system/pagerd.service")).unwrap();
    assert!(
        unit.contains("EnvironmentFile=-/etc/default/pagerd"),
        "{unit}"
    );
    assert!(unit.contains(" $PAGERD_OPTS\n"), "{unit}");

    manual_pages_render_and_refer_to_installed_pages(files.path());
    completions_know_the_values(files.path());
}

/// Every page renders with `man -l` without a warning, has the sections operators look for,
/// and SEE ALSO names only pages in the package.
fn manual_pages_render_and_refer_to_installed_pages(files: &Path) {
    let mut pages = Vec::new();
    for section in ["man1", "man8"] {
        for entry in std::fs::read_dir(files.join("usr/share/man").join(section)).unwrap() {
            pages.push(entry.unwrap().path());
        }
    }
    let names: Vec<String> = pages
        .iter()
        .map(|p| {
            // pagerctl-fork-create.1.gz -> pagerctl-fork-create(1)
            let file = p.file_name().unwrap().to_string_lossy();
            let page = file.strip_suffix(".gz").expect("compressed");
            let (name, section) = page.rsplit_once('.').unwrap();
            format!("{name}({section})")
        })
        .collect();
    for wanted in [
        "pagerd(8)",
        "pagerctl(1)",
        "pagerctl-snapshot-add(1)",
        "pagerctl-fork-create(1)",
        "pagerctl-daemon-upgrade(1)",
        "pagerctl-vm-start(1)",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }
    for page in &pages {
        let rendered = Command::new("man")
            .args(["--warnings", "--nh", "--nj", "-E", "UTF-8", "-l"])
            .arg(page)
            .env("MANWIDTH", "100")
            .env("MAN_KEEP_STDERR", "1")
            .output()
            .unwrap();
        let out = text(&rendered.stdout);
        let warnings = text(&rendered.stderr);
        assert!(rendered.status.success(), "{}: {warnings}", page.display());
        assert!(warnings.trim().is_empty(), "{}: {warnings}", page.display());
        assert!(!out.contains("pagerd-ctl"), "{}", page.display());
        for heading in [
            "NAME",
            "SYNOPSIS",
            "EXIT STATUS",
            "ENVIRONMENT",
            "FILES",
            "SIGNALS",
        ] {
            assert!(
                out.lines().any(|l| l == heading),
                "{heading} in {}:\n{out}",
                page.display()
            );
        }
        let see_also = out
            .split("\nSEE ALSO\n")
            .nth(1)
            .unwrap_or_else(|| panic!("SEE ALSO in {}", page.display()));
        let references: String = see_also
            .lines()
            .take_while(|l| l.starts_with(' ') || l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let references: Vec<&str> = references
            .split([',', ' '])
            .filter(|w| w.ends_with(')'))
            .collect();
        assert!(!references.is_empty(), "{}", page.display());
        for reference in references {
            assert!(
                names.iter().any(|n| n == reference),
                "{} refers to {reference}, which is not installed",
                page.display()
            );
        }
    }
}

/// The completion scripts offer the wire enums' values.
fn completions_know_the_values(files: &Path) {
    let bash =
        std::fs::read_to_string(files.join("usr/share/bash-completion/completions/pagerctl"))
            .unwrap();
    for values in [
        "off working_set graduate",
        "uffd file",
        "firecracker qemu",
        "waiting serving ended detached",
        "starting running exited failed",
    ] {
        assert!(bash.contains(values), "bash completes {values}");
    }
    let zsh =
        std::fs::read_to_string(files.join("usr/share/zsh/vendor-completions/_pagerctl")).unwrap();
    assert!(zsh.contains("working_set") && zsh.contains("graduate"));
    let fish =
        std::fs::read_to_string(files.join("usr/share/fish/vendor_completions.d/pagerctl.fish"))
            .unwrap();
    assert!(fish.contains("working_set") && fish.contains("uffd"));
}

/// Whatever happens, the machine is left as it was: the daemon stopped, the packages purged,
/// the state directory this test made removed.
struct Cleanup {
    daemon: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            if let Ok(None) = child.try_wait() {
                let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait();
        }
        let _ = run("dpkg", &["--purge", "pagerd", "pagerd-dbgsym"]);
        let _ = run("umount", &["-l", &format!("{STATE_DIR}/fuse")]);
        let _ = std::fs::remove_dir_all(STATE_DIR);
        let _ = std::fs::remove_dir_all(BACKUP);
    }
}

/// Where the walk-through exports its snapshot.
const BACKUP: &str = "/tmp/pagerd-backup-base";

/// The walk-through block of `docs/operations.md`: its command lines, comments included.
fn walk_through() -> Vec<String> {
    let doc = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let section = doc
        .split("\n### Walk-through\n")
        .nth(1)
        .expect("docs/operations.md has a walk-through");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block");
    block.lines().map(str::to_owned).collect()
}

/// Starts pagerd the way the installed unit does: its `Environment=`, its `EnvironmentFile=`
/// read as systemd reads it (`KEY=value` lines, quotes removed), its `ExecStart=` with
/// `$VARIABLES` split into words.
fn start_like_the_unit(log: &Path) -> Child {
    let unit = std::fs::read_to_string("/lib/systemd/system/pagerd.service").unwrap();
    let mut script = String::from("set -a\n");
    for line in unit.lines() {
        if let Some(assignment) = line.strip_prefix("Environment=") {
            script += &format!("{assignment}\n");
        } else if let Some(file) = line.strip_prefix("EnvironmentFile=") {
            let file = file.trim_start_matches('-');
            script += &format!("if [ -r {file} ]; then . {file}; fi\n");
        }
    }
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    script += &format!("set +a\nexec {exec}\n");
    Command::new("bash")
        .args(["-c", &script])
        .env_remove("PAGERD_STATE_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap()
}

/// What the installed bash completion offers for `pagerctl WORDS…` (the last word being
/// completed).
fn complete_in_bash(words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let script = format!(
        ". /usr/share/bash-completion/completions/pagerctl\n\
         COMP_WORDS=(pagerctl {})\nCOMP_CWORD={}\n_pagerctl_ids pagerctl\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        quoted.join(" "),
        words.len()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env_remove("PAGERD_STATE_DIR")
        .env_remove("PAGERD_SOCKET")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Waits until the daemon answers with a program started after `since`, under `pid`.
fn wait_for_new_program(client: &Client, pid: u32, since: Instant) {
    wait_until("the daemon to serve with a new program", DEADLINE, || {
        client
            .status()
            .is_ok_and(|s| s.pid == pid && u128::from(s.uptime_ms) <= since.elapsed().as_millis())
    });
}

fn process_gone(pid: u32, daemon: &mut Option<Child>) -> bool {
    if let Some(child) = daemon.as_mut() {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success(), "pagerd stopped cleanly: {status}");
            return true;
        }
        return false;
    }
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn the_walk_through_in_operations_md_runs_as_written() {
    const TEST: &str = "the_walk_through_in_operations_md_runs_as_written";
    let _one = DPKG.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = cannot_install() {
        skip(TEST, why);
        return;
    }
    let systemd = Path::new("/run/systemd/system").exists();
    let dir = tempfile::tempdir().unwrap();
    let memory = write_snapshot(&dir.path().join("base.mem"), 1 << 20, 23, 5, 0);
    let client = Client::new(&Path::new(STATE_DIR).join("control.sock"));
    let mut cleanup = Cleanup { daemon: None };
    let _ = std::fs::remove_dir_all(BACKUP);
    let mut pid = 0;
    let mut vmm: Option<Vmm> = None;
    let mut installs = 0;
    let steps = walk_through();
    let mut ran = Vec::new();
    for line in &steps {
        let command = line.split(" #").next().unwrap().trim();
        let started = Instant::now();
        let out = Command::new("bash")
            .args(["-c", line])
            .current_dir(root())
            .env("MEMORY", &memory)
            .env_remove("PAGERD_STATE_DIR")
            .env_remove("PAGERD_SOCKET")
            .output()
            .unwrap();
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "`{line}` failed: {stdout}{}",
            text(&out.stderr)
        );
        match command {
            "./scripts/package.sh" => {
                let (deb, dbgsym) = packages();
                assert!(stdout.contains(&*deb.file_name().unwrap().to_string_lossy()));
                assert!(stdout.contains(&*dbgsym.file_name().unwrap().to_string_lossy()));
            }
            "dpkg -i target/deb/pagerd_*.deb" if installs == 0 => {
                installs += 1;
                for file in [
                    "/usr/bin/pagerd",
                    "/usr/bin/pagerctl",
                    "/lib/systemd/system/pagerd.service",
                    "/usr/share/man/man8/pagerd.8.gz",
                    "/usr/share/man/man1/pagerctl-daemon-upgrade.1.gz",
                    "/usr/share/bash-completion/completions/pagerctl",
                    DEFAULTS,
                ] {
                    assert!(Path::new(file).is_file(), "{file} is installed");
                }
                assert!(
                    Path::new(ENABLED_LINK).exists(),
                    "the postinst enabled pagerd.service"
                );
                if Path::new("/usr/bin/systemd-analyze").exists() {
                    let verify = run(
                        "systemd-analyze",
                        &["verify", "--man=no", "/lib/systemd/system/pagerd.service"],
                    );
                    let remarks = text(&verify.stderr);
                    assert!(verify.status.success(), "{remarks}");
                    assert!(!remarks.contains("pagerd.service"), "{remarks}");
                }
                let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "pagerd"]);
                assert!(conffiles.contains(DEFAULTS), "{conffiles}");
                if !systemd {
                    // An operator's option, to see the unit read it and an upgrade keep it.
                    let edited = std::fs::read_to_string(DEFAULTS)
                        .unwrap()
                        .replace("PAGERD_OPTS=\"\"", "PAGERD_OPTS=\"--workers 1\"");
                    std::fs::write(DEFAULTS, edited).unwrap();
                    cleanup.daemon = Some(start_like_the_unit(&dir.path().join("pagerd.log")));
                }
                wait_until("the installed daemon to serve", DEADLINE, || {
                    client.status().is_ok()
                });
                let status = client.status().unwrap();
                pid = status.pid;
                if let Some(child) = &cleanup.daemon {
                    assert_eq!(pid, child.id());
                    assert_eq!(status.workers, 1, "PAGERD_OPTS from {DEFAULTS}");
                }
                assert_eq!(
                    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
                    Path::new("/usr/bin/pagerd")
                );
            }
            "pagerctl status" => {
                assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
                assert!(stdout.contains(&pid.to_string()), "{stdout}");
            }
            "pagerctl snapshot add base \"$MEMORY\"" => {
                let snapshots = client.snapshots().unwrap();
                assert_eq!(snapshots.len(), 1);
                assert_eq!(snapshots[0].size, Some(1 << 20));
            }
            "pagerctl fork create base --id vm1" => {
                let socket = PathBuf::from(stdout.trim());
                assert!(socket.starts_with(STATE_DIR), "{socket:?}");
                vmm = Some(Vmm::attach(&memory, &socket, &["verify", "hold"]));
            }
            "pagerctl fork wait vm1 serving" => {
                let vmm = vmm.as_mut().unwrap();
                vmm.expect("verified");
                vmm.expect("holding");
                assert!(stdout.contains("serving"), "{stdout}");
                // The installed bash completion asks the daemon for ids.
                assert_eq!(complete_in_bash(&["fork", "get", ""]), ["vm1"]);
                assert_eq!(complete_in_bash(&["vm", "start", "ba"]), ["base"]);
                assert!(complete_in_bash(&["vm", "get", ""]).is_empty());
            }
            "pagerctl snapshot export base /tmp/pagerd-backup-base" => {
                assert!(
                    stdout.starts_with("exported base to /tmp/pagerd-backup-base"),
                    "{stdout}"
                );
                assert!(Path::new(BACKUP).join("manifest.json").is_file());
            }
            "pagerctl snapshot import /tmp/pagerd-backup-base --id restored" => {
                let restored = client.snapshot("restored").unwrap();
                assert_eq!(restored.size, Some(1 << 20));
                assert!(restored.importing.is_none() && restored.error.is_none());
            }
            "dpkg -i target/deb/pagerd_*.deb" => {
                // The postinst reloaded the daemon: same pid, a program started since.
                wait_for_new_program(&client, pid, started);
                let fork = client.fork("vm1").unwrap();
                assert_eq!((fork.state, fork.recovered), (ForkState::Serving, 1));
                assert!(
                    std::fs::read_to_string(DEFAULTS)
                        .unwrap()
                        .contains("--workers 1")
                        || systemd,
                    "the edited conffile is kept"
                );
            }
            "pagerctl daemon upgrade" => {
                let version = env!("CARGO_PKG_VERSION");
                assert!(
                    stdout.contains(&format!("pagerd {version} serves (pid {pid}, ")),
                    "{stdout}"
                );
                // It returned once the new program served: the next status is that program's.
                let status = client.status().unwrap();
                assert_eq!(status.pid, pid);
                assert!(u128::from(status.uptime_ms) <= started.elapsed().as_millis());
            }
            "pagerctl fork get vm1" => {
                assert!(stdout.contains("serving"), "{stdout}");
                let fork = client.fork("vm1").unwrap();
                assert_eq!((fork.state, fork.recovered), (ForkState::Serving, 1));
            }
            "dpkg -r pagerd" => {
                wait_until("pagerd to stop on removal", DEADLINE, || {
                    process_gone(pid, &mut cleanup.daemon)
                });
                assert!(!Path::new("/usr/bin/pagerd").exists());
                assert!(Path::new(DEFAULTS).exists(), "a removal keeps the conffile");
                assert!(Path::new(STATE_DIR).join("forks/vm1.json").exists());
                // The VMM outlives the daemon: it had its memory, and ends cleanly.
                vmm.take().unwrap().finish();
            }
            "dpkg --purge pagerd" => {
                assert!(
                    !Path::new(DEFAULTS).exists(),
                    "a purge deletes the conffile"
                );
                assert!(!Path::new(ENABLED_LINK).exists(), "and forgets the unit");
                assert!(!run("dpkg", &["-s", "pagerd"]).status.success());
            }
            other => panic!("the walk-through has a line this test does not know: {other}"),
        }
        ran.push(command.to_owned());
    }
    assert_eq!(ran.len(), 13, "every step of the walk-through ran: {ran:?}");
}

/// Where systemd runs: the postinst enables and starts the unit, an upgrade reloads it (same
/// main pid, a new program), a removal stops it. Skipped, loudly, where it does not.
#[test]
fn the_maintainer_scripts_drive_systemd_where_it_runs() {
    const TEST: &str = "the_maintainer_scripts_drive_systemd_where_it_runs";
    let _one = DPKG.lock().unwrap_or_else(|e| e.into_inner());
    if !Path::new("/run/systemd/system").exists() {
        skip(
            TEST,
            "systemd is not running here (not PID 1): systemctl enable, start, reload and \
             stop from the maintainer scripts cannot be seen; the walk-through test covers \
             the no-systemd paths",
        );
        return;
    }
    if let Some(why) = cannot_install() {
        skip(TEST, why);
        return;
    }
    let _cleanup = Cleanup { daemon: None };
    let (deb, _) = packages();
    let deb = deb.to_str().unwrap();
    let main_pid = || {
        ok("systemctl", &["show", "-P", "MainPID", "pagerd.service"])
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    ok("dpkg", &["-i", deb]);
    assert_eq!(
        ok("systemctl", &["is-enabled", "pagerd.service"]).trim(),
        "enabled"
    );
    let client = Client::new(&Path::new(STATE_DIR).join("control.sock"));
    wait_until("the service to serve", DEADLINE, || client.status().is_ok());
    let pid = main_pid();
    assert_eq!(client.status().unwrap().pid, pid);
    let upgraded = Instant::now();
    ok("dpkg", &["-i", deb]);
    wait_for_new_program(&client, pid, upgraded);
    assert_eq!(main_pid(), pid, "reloaded in place, not restarted");
    ok("dpkg", &["-r", "pagerd"]);
    assert!(
        !run("systemctl", &["is-active", "--quiet", "pagerd.service"])
            .status
            .success()
    );
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

/// What the shipped documentation says agrees with what pagerd does: an upgrade fails no
/// control request (`daemon upgrade --help` and the operator's guide alike), and a `uffd` VM
/// does not freeze after a restart (its fork is recovered).
#[test]
fn the_shipped_docs_and_help_agree_with_the_behaviour() {
    let help = Command::new(testkit::binary("pagerctl"))
        .args(["daemon", "upgrade", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = text(&help.stdout).replace('\n', " ");
    assert!(!help.contains("requests fail"), "{help}");
    assert!(help.contains("none fails"), "{help}");
    assert!(help.contains("wait until the new program serves"), "{help}");
    let operations = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    assert!(operations.contains("none fails"));
    let launching = std::fs::read_to_string(root().join("docs/launching.md"))
        .unwrap()
        .replace('\n', " ");
    let restart = launching
        .split("After a restart")
        .nth(1)
        .expect("launching.md says what a restart does");
    let paragraph = restart.split("## ").next().unwrap();
    assert!(paragraph.contains("does not freeze"), "{paragraph}");
    assert!(
        !paragraph.contains("so such a guest freezes"),
        "{paragraph}"
    );
}
