//! pagerctl's manual pages, generated from its command line so that they say what `--help`
//! says: one page per command and subcommand, named as `git` names its pages.
//!
//! ```text
//! pagerctl(1) ─┬─ pagerctl-snapshot(1) ─┬─ pagerctl-snapshot-add(1)
//!              │                        └─ …
//!              ├─ pagerctl-fork(1) ─ …
//!              └─ pagerctl-status(1), pagerctl-daemon-upgrade(1), …
//!
//! every page: NAME, SYNOPSIS, DESCRIPTION, OPTIONS, SUBCOMMANDS   (clap_mangen, from clap)
//!             EXIT STATUS, ENVIRONMENT, FILES, SIGNALS            (the same on every page)
//!             SEE ALSO: the parent page, the subcommands' pages, pagerd(8)
//! ```
//!
//! SEE ALSO names only pages written here and `pagerd(8)`, which the daemon writes beside them
//! (`pagerd --write-docs`); hidden subcommands (this generator) get no page.

use std::io;
use std::path::{Path, PathBuf};

use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;
use proto::control::ErrorCode;
use proto::defaults;

use crate::failure::EXIT_UNREACHABLE;
use crate::EXIT_UNHEALTHY;

/// The manual section of every pagerctl page.
const SECTION: &str = "1";

/// Writes `pagerctl.1` and one page per subcommand into `dir`; returns the files written.
pub(crate) fn write_pages(command: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    write_tree(&command, None, dir, &mut written)?;
    Ok(written)
}

/// Writes the page of `command` and of each of its visible subcommands, depth first.
fn write_tree(
    command: &clap::Command,
    parent: Option<&str>,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let name = page_name(command);
    let path = dir.join(format!("{name}.{SECTION}"));
    std::fs::write(&path, page(command, parent)?)?;
    written.push(path);
    for sub in visible(command) {
        write_tree(sub, Some(&name), dir, written)?;
    }
    Ok(())
}

/// `pagerctl`, `pagerctl-snapshot`, `pagerctl-snapshot-add`, … (set by clap's build).
fn page_name(command: &clap::Command) -> String {
    command
        .get_display_name()
        .unwrap_or_else(|| command.get_name())
        .to_owned()
}

/// The subcommands that get a page of their own.
fn visible(command: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    command.get_subcommands().filter(|c| !c.is_hide_set())
}

/// One page in roff.
fn page(command: &clap::Command, parent: Option<&str>) -> io::Result<Vec<u8>> {
    let name = page_name(command);
    let man = Man::new(command.clone())
        .title(name.to_uppercase())
        .section(SECTION)
        .source(format!("pagerd {}", env!("CARGO_PKG_VERSION")))
        .manual("pagerd manual");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if command.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if visible(command).next().is_some() {
        man.render_subcommands_section(&mut out)?;
    }
    let mut roff = Roff::default();
    exit_status(&mut roff);
    environment(&mut roff);
    files(&mut roff);
    signals(&mut roff);
    roff.to_writer(&mut out)?;
    if command.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    let mut roff = Roff::default();
    see_also(&mut roff, command, parent);
    roff.to_writer(&mut out)?;
    Ok(preamble_once(&String::from_utf8_lossy(&out)).into_bytes())
}

/// `text` with the apostrophe preamble each rendered piece starts with kept only at the top.
fn preamble_once(text: &str) -> String {
    let mut lines = text.lines();
    let preamble: Vec<&str> = lines.by_ref().take(2).collect();
    let mut out = preamble.join("\n") + "\n";
    for line in lines.filter(|l| !preamble.contains(l)) {
        out += line;
        out += "\n";
    }
    out
}

/// A `.TP` item: `term` in bold, then its description.
fn item(roff: &mut Roff, term: &str, text: &str) {
    roff.control("TP", []);
    roff.text([bold(term)]);
    roff.text([roman(text)]);
}

fn exit_status(roff: &mut Roff) {
    roff.control("SH", ["EXIT STATUS"]);
    item(roff, "0", "Done.");
    item(
        roff,
        "1",
        "A manual page or completion script could not be written.",
    );
    item(roff, "2", "A usage error: the command line is not valid.");
    for &code in ErrorCode::ALL {
        let mut text = format!("The daemon refused the request with the code {}.", code);
        if code == ErrorCode::InvalidArgument {
            text += " Also: a file named on the command line cannot be opened here.";
        }
        item(roff, &code.exit_code().to_string(), &text);
    }
    item(
        roff,
        &EXIT_UNREACHABLE.to_string(),
        "The daemon cannot be reached (is it running, and is this its control socket?), or \
         answered something that is not the control protocol.",
    );
    item(
        roff,
        &EXIT_UNHEALTHY.to_string(),
        "status: the daemon answers but is unhealthy (a damaged snapshot or an unreadable fork \
         record, both named in the output).",
    );
}

fn environment(roff: &mut Roff) {
    roff.control("SH", ["ENVIRONMENT"]);
    item(
        roff,
        defaults::STATE_DIR_ENV,
        &format!(
            "The daemon's state directory, as --state-dir (default {}).",
            defaults::STATE_DIR
        ),
    );
    item(
        roff,
        defaults::SOCKET_ENV,
        &format!(
            "The control socket, as --socket (default STATE_DIR/{}).",
            defaults::CONTROL_SOCKET_NAME
        ),
    );
}

fn files(roff: &mut Roff) {
    roff.control("SH", ["FILES"]);
    item(
        roff,
        &defaults::control_socket(Path::new(defaults::STATE_DIR))
            .display()
            .to_string(),
        "The control socket of a daemon running on the default state directory, where \
         pagerctl looks when no option or variable says otherwise.",
    );
    item(
        roff,
        "/etc/default/pagerd",
        "The daemon's options when it runs as the systemd service pagerd.service (pagerd(8)).",
    );
}

fn signals(roff: &mut Roff) {
    roff.control("SH", ["SIGNALS"]);
    roff.text([roman(
        "pagerctl handles no signal itself: SIGINT or SIGTERM end it (top runs until one \
         arrives; wait commands until their state or their timeout). The daemon's signals are \
         in pagerd(8): SIGTERM and SIGINT stop it, keeping every fork's record; SIGUSR2 makes \
         it execute its program again in place, as pagerctl daemon upgrade does.",
    )]);
}

/// The parent page, the subcommands' pages and pagerd(8).
fn see_also(roff: &mut Roff, command: &clap::Command, parent: Option<&str>) {
    let mut pages: Vec<(String, &str)> = parent
        .map(|p| (p.to_owned(), SECTION))
        .into_iter()
        .collect();
    pages.extend(visible(command).map(|c| (page_name(c), SECTION)));
    pages.push(("pagerd".to_owned(), "8"));
    roff.control("SH", ["SEE ALSO"]);
    let last = pages.len() - 1;
    let mut line = Vec::new();
    for (n, (name, section)) in pages.into_iter().enumerate() {
        let sep = if n == last { "" } else { ", " };
        line.push(bold(name));
        line.push(roman(format!("({section}){sep}")));
    }
    roff.text(line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every page is written, titled after its command, with the sections operators look
    /// for, and SEE ALSO names only pages that exist.
    #[test]
    fn every_command_has_a_page_with_its_sections_and_no_dangling_references() {
        let dir = std::env::temp_dir().join(format!("pagerctl-man-{}", std::process::id()));
        let written = write_pages(crate::Cli::command(), &dir).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for page in [
            "pagerctl.1",
            "pagerctl-snapshot.1",
            "pagerctl-snapshot-add.1",
            "pagerctl-fork-create.1",
            "pagerctl-vm-start.1",
            "pagerctl-daemon-upgrade.1",
            "pagerctl-status.1",
        ] {
            assert!(names.iter().any(|n| n == page), "{page} in {names:?}");
        }
        assert!(!names
            .iter()
            .any(|n| n.contains("man") || n.contains("help")));
        for path in &written {
            let text = std::fs::read_to_string(path).unwrap();
            let name = path.file_stem().unwrap().to_string_lossy().to_uppercase();
            let title = text.lines().find(|l| l.starts_with(".TH ")).unwrap();
            assert!(title.starts_with(&format!(".TH {name} 1 ")), "{title}");
            assert_eq!(text.matches(".ds Aq").count(), 2, "one preamble");
            assert!(!text.contains("pagerd-ctl"), "{}", path.display());
            for section in ["EXIT STATUS", "ENVIRONMENT", "FILES", "SIGNALS", "SEE ALSO"] {
                assert!(
                    text.contains(&format!(".SH \"{section}\"\n"))
                        || text.contains(&format!(".SH {section}\n")),
                    "{section} in {}",
                    path.display()
                );
            }
            let see_also = text
                .split(".SH \"SEE ALSO\"\n")
                .nth(1)
                .and_then(|rest| rest.lines().next())
                .unwrap()
                .replace("\\-", "-")
                .replace("\\fB", "")
                .replace("\\fR", "");
            for reference in see_also.split(", ") {
                match reference.strip_suffix("(1)") {
                    Some(page) => assert!(
                        names.contains(&format!("{page}.1")),
                        "{} refers to {reference}, which is not written",
                        path.display()
                    ),
                    None => assert_eq!(reference, "pagerd(8)"),
                }
            }
        }
        let top = std::fs::read_to_string(dir.join("pagerctl.1")).unwrap();
        assert!(
            top.contains("PAGERD_SOCKET") && top.contains("SIGUSR2"),
            "{top}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
