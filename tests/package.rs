//! The Debian package as an operator installs it: `scripts/package.sh` builds it, `dpkg -i`
//! installs it, and the installed binaries, manual pages, completions and unit are there and
//! work. The package is removed again afterwards.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::skip;

const TEST: &str = "the_debian_package_installs_and_its_binaries_run";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// Removes the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "pagerd"]);
    }
}

#[test]
fn the_debian_package_installs_and_its_binaries_run() {
    if !nix::unistd::geteuid().is_root() || !Path::new("/usr/bin/dpkg").exists() {
        skip(TEST, "installing a package needs root and dpkg");
        return;
    }
    if run("dpkg", &["-s", "pagerd"]).status.success() {
        skip(
            TEST,
            "a pagerd package is already installed here; it is left alone",
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = Command::new("bash")
        .arg(root.join("scripts/package.sh"))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&built.stdout).trim().to_owned());
    let deb = root.join(deb);
    let _installed = Installed;
    let install = run("dpkg", &["-i", deb.to_str().unwrap()]);
    assert!(
        install.status.success(),
        "{}",
        String::from_utf8_lossy(&install.stderr)
    );

    let version = run("/usr/bin/pagerd", &["--version"]);
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("pagerd {}", env!("CARGO_PKG_VERSION"))
    );
    let help = run("/usr/bin/pagerctl", &["--help"]);
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for word in ["snapshot", "fork", "status", "completions"] {
        assert!(help.contains(word), "{help}");
    }
    for file in [
        "/lib/systemd/system/pagerd.service",
        "/usr/share/man/man8/pagerd.8.gz",
        "/usr/share/man/man1/pagerctl.1.gz",
        "/usr/share/bash-completion/completions/pagerctl",
        "/usr/share/zsh/vendor-completions/_pagerctl",
        "/usr/share/fish/vendor_completions.d/pagerctl.fish",
        "/usr/share/doc/pagerd/copyright",
    ] {
        assert!(Path::new(file).is_file(), "{file} is installed");
    }
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let verify = run(
            "systemd-analyze",
            &["verify", "--man=no", "/lib/systemd/system/pagerd.service"],
        );
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    let listing = run("dpkg", &["-L", "pagerd"]);
    assert!(String::from_utf8_lossy(&listing.stdout).contains("/usr/bin/pagerctl"));
}
