//! The daemon's manual page and shell completions, generated from its command line (clap) so
//! that they never drift from `--help`. Packaging runs `pagerd --write-docs DIR`.

use std::io;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::config::Config;

/// Writes `pagerd.8` and completions for bash, zsh and fish into `dir`.
pub(crate) fn write(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let command = Config::command().name("pagerd");
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(dir.join("pagerd.8"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command.clone(), "pagerd", dir)?;
    }
    Ok(())
}
