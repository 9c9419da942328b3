//! `scripts/setup.sh`: the demo's set-up installs only what the demo uses (the tests' tools,
//! cargo-fuzz above all, come with `--for-tests`, which `scripts/test.sh` passes), and the
//! bookworm-backports suite is added from the mirror apt's own sources name, never a
//! guessed one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

/// Runs `scripts/setup.sh ARGS` with apt's configuration in `apt_dir`.
fn setup(args: &[&str], apt_dir: &Path) -> Output {
    Command::new("bash")
        .arg(repo().join("scripts/setup.sh"))
        .args(args)
        .env("PAGERD_APT_DIR", apt_dir)
        .output()
        .expect("run setup.sh")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The arguments a script passes to `scripts/setup.sh`.
fn setup_call(script: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("scripts").join(script)).unwrap();
    let calls: Vec<Vec<String>> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("bash scripts/setup.sh"))
        .map(|rest| rest.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(calls.len(), 1, "{script} runs setup.sh once: {calls:?}");
    calls.into_iter().next().unwrap()
}

#[test]
fn the_demo_sets_up_only_what_the_demo_uses_and_the_tests_ask_for_the_rest() {
    let apt = tempfile::tempdir().unwrap();
    let demo_args = setup_call("demo.sh");
    assert!(demo_args.is_empty(), "demo.sh: {demo_args:?}");
    assert_eq!(setup_call("test.sh"), ["--for-tests"]);

    let out = setup(&["--plan"], apt.path());
    assert!(out.status.success(), "{out:?}");
    let demo = stdout(&out);
    assert!(demo.contains("apt libclang-dev"), "{demo}");
    for tests_only in [
        "cargo-fuzz",
        "nightly",
        "qemu",
        "prometheus",
        "tmux",
        "systemd",
    ] {
        assert!(
            !demo.contains(tests_only),
            "the demo installs {tests_only}:\n{demo}"
        );
    }
    let out = setup(&["--for-tests", "--plan"], apt.path());
    assert!(out.status.success(), "{out:?}");
    let tests = stdout(&out);
    for needed in [
        "apt libclang-dev",
        "apt tmux",
        "apt prometheus",
        "qemu-system-x86",
        "cargo-fuzz",
    ] {
        assert!(tests.contains(needed), "the tests need {needed}:\n{tests}");
    }
}

#[test]
fn backports_come_from_the_mirror_apts_own_sources_use_or_setup_says_there_is_none() {
    let apt = tempfile::tempdir().unwrap();
    let lists = apt.path().join("sources.list.d");
    std::fs::create_dir(&lists).unwrap();

    // None at all, or only the security archive: no mirror, said plainly, nothing printed.
    for security_only in [false, true] {
        if security_only {
            std::fs::write(
                lists.join("security.sources"),
                "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n",
            )
            .unwrap();
        }
        let out = setup(&["--mirror"], apt.path());
        assert!(!out.status.success(), "{out:?}");
        assert!(stdout(&out).is_empty(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("no Debian mirror in apt's sources"),
            "{stderr}"
        );
    }

    // A one-line entry with options.
    std::fs::write(
        apt.path().join("sources.list"),
        "# a comment\ndeb [signed-by=/usr/share/keyrings/x.gpg] http://one-line.invalid/debian bookworm main\n",
    )
    .unwrap();
    let out = setup(&["--mirror"], apt.path());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "http://one-line.invalid/debian\n");

    // A deb822 entry comes first.
    std::fs::write(
        lists.join("debian.sources"),
        "Types: deb\nURIs: http://deb822.invalid/debian\nSuites: bookworm bookworm-updates\n",
    )
    .unwrap();
    let out = setup(&["--mirror"], apt.path());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "http://deb822.invalid/debian\n");
}
