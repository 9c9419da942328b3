//! The daemon's manual page and shell completions, generated from its command line (clap) so
//! that they never drift from `--help`. Packaging runs `pagerd --write-docs DIR`.
//!
//! The page is clap's (NAME, SYNOPSIS, DESCRIPTION, OPTIONS, VERSION) followed by what clap
//! does not know: EXIT STATUS, ENVIRONMENT, FILES, SIGNALS and SEE ALSO (`pagerctl(1)`,
//! which `pagerctl man` writes beside it).

use std::io;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{bold, roman, Roff};

use crate::config::Config;

/// Writes `pagerd.8` and completions for bash, zsh and fish into `dir`.
pub(crate) fn write(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let command = Config::command().name("pagerd");
    std::fs::write(dir.join("pagerd.8"), page(command.clone())?)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command.clone(), "pagerd", dir)?;
    }
    Ok(())
}

/// The page in roff.
fn page(command: clap::Command) -> io::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .title("PAGERD")
        .section("8")
        .manual("pagerd manual")
        .render(&mut page)?;
    let mut roff = Roff::default();
    sections(&mut roff);
    // The first two lines define the apostrophe string the page already defines at its top.
    for line in roff.render().lines().skip(2) {
        page.extend_from_slice(line.as_bytes());
        page.push(b'\n');
    }
    Ok(page)
}

/// A term in bold, then what it means.
fn entry(roff: &mut Roff, term: &str, meaning: &str) {
    roff.control("TP", [])
        .text([bold(term)])
        .text([roman(meaning)]);
}

fn sections(roff: &mut Roff) {
    roff.control("SH", ["EXIT STATUS"]);
    entry(
        roff,
        "0",
        "Stopped by SIGTERM or SIGINT, every fork's record kept.",
    );
    entry(
        roff,
        "1",
        "It could not start (state directory, lock held by another pagerd, control socket, \
         FUSE mount, …) or failed while running; the error and its causes are on stderr.",
    );
    entry(roff, "2", "A usage error: the command line is not valid.");

    roff.control("SH", ["ENVIRONMENT"]);
    entry(
        roff,
        proto::defaults::STATE_DIR_ENV,
        &format!(
            "The state directory, as --state-dir (default {}).",
            proto::defaults::STATE_DIR
        ),
    );
    entry(
        roff,
        "RUST_LOG",
        "The log filter; it overrides --log (e.g. pagerd=debug).",
    );
    entry(
        roff,
        vmm_glue::firecracker::FIRECRACKER_ENV,
        "The Firecracker binary vm.start launches, unless --firecracker says otherwise \
         (default: firecracker on PATH).",
    );
    entry(
        roff,
        vmm_glue::qemu::QEMU_ENV,
        "The QEMU binary vm.start launches, unless --qemu says otherwise.",
    );
    entry(
        roff,
        "NOTIFY_SOCKET",
        "Set by systemd (Type=notify): pagerd sends READY=1 once it serves, STATUS= lines \
         while it runs and STOPPING=1 when it stops.",
    );

    roff.control("SH", ["FILES"]);
    entry(
        roff,
        "/etc/default/pagerd",
        "Read by the systemd unit: PAGERD_OPTS (options added to the command line), \
         FIRECRACKER, QEMU and RUST_LOG. A configuration file of the package: kept on \
         upgrade and removal, deleted on purge.",
    );
    entry(
        roff,
        "/lib/systemd/system/pagerd.service",
        "The systemd unit: systemctl reload pagerd upgrades in place (SIGUSR2).",
    );
    entry(
        roff,
        proto::defaults::STATE_DIR,
        "The state directory: control.sock, snapshots/, forks/, sockets/, vms/, the FUSE \
         view fuse/ and the lock. Kept when the package is removed or purged.",
    );

    roff.control("SH", ["SIGNALS"]);
    entry(
        roff,
        "SIGTERM, SIGINT",
        "Stop: the control socket closes, serving stops, every fork's record is kept, and \
         VMMs keep running; the next pagerd recovers their forks.",
    );
    entry(
        roff,
        "SIGUSR2",
        "Upgrade in place: execute the program the daemon was started from again (the new \
         file, if it was replaced), same pid, every fork recovered; what pagerctl daemon \
         upgrade and systemctl reload pagerd do.",
    );

    roff.control("SH", ["SEE ALSO"]);
    roff.text([bold("pagerctl"), roman("(1)")]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_the_sections_operators_look_for_and_one_preamble() {
        let page = page(Config::command().name("pagerd")).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains(".TH PAGERD 8 "), "{page}");
        for section in ["EXIT STATUS", "ENVIRONMENT", "FILES", "SIGNALS", "SEE ALSO"] {
            assert!(
                page.contains(&format!(".SH \"{section}\"\n"))
                    || page.contains(&format!(".SH {section}\n")),
                "{section}"
            );
        }
        assert!(page.contains("SIGUSR2") && page.contains("FIRECRACKER"));
        assert_eq!(page.matches(".ds Aq").count(), 2, "one preamble");
    }
}
