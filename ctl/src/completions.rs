//! pagerctl's shell completion scripts: clap_complete's (subcommands, options, and the wire
//! enums' values, which the arguments list), and for bash the ids too, asked of the daemon
//! when a subcommand's id argument is completed.
//!
//! ```text
//! pagerctl fork get <TAB>  ─▶ _pagerctl_ids: `fork get` takes a fork id (from the command tree)
//!                          ─▶ pagerctl --json fork ls ─▶ each entry's "id" ─▶ COMPREPLY
//! anything else            ─▶ clap_complete's _pagerctl
//! ```

use std::io::{self, Write};

use clap_complete::Shell;

/// Writes the completion script for `shell` to `out`.
pub(crate) fn write(
    shell: Shell,
    mut command: clap::Command,
    out: &mut dyn Write,
) -> io::Result<()> {
    command.build();
    let kinds = id_arguments(&command);
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command.clone(), "pagerctl", &mut script);
    out.write_all(&script)?;
    if shell == Shell::Bash {
        out.write_all(bash_ids(&kinds).as_bytes())?;
    }
    Ok(())
}

/// `(group, verb, kind)` for every subcommand whose first positional argument is an id:
/// `("fork", "get", "fork")`, `("fork", "create", "snapshot")`, …
fn id_arguments(command: &clap::Command) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for group in command.get_subcommands() {
        let kind = group.get_name();
        if !["snapshot", "fork", "vm"].contains(&kind) {
            continue;
        }
        // `snapshot add ID` names a new id: nothing to complete from the daemon.
        for verb in group.get_subcommands().filter(|v| v.get_name() != "add") {
            let Some(first) = verb.get_positionals().next() else {
                continue;
            };
            let of = match first.get_id().as_str() {
                "snapshot" => "snapshot",
                "id" | "ids" => kind,
                _ => continue,
            };
            found.push((kind.to_owned(), verb.get_name().to_owned(), of.to_owned()));
        }
    }
    found
}

/// A bash function completing ids, registered in place of clap_complete's.
fn bash_ids(kinds: &[(String, String, String)]) -> String {
    let mut cases = String::new();
    for (group, verb, kind) in kinds {
        cases += &format!("        \"{group} {verb}\") kind={kind} ;;\n");
    }
    format!(
        r#"
# Ids: the first argument of a subcommand that takes one is completed from the daemon's lists.
_pagerctl_ids() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} kind=""
    if [[ $COMP_CWORD -eq 3 && $cur != -* ]]; then
        case "${{COMP_WORDS[1]}} ${{COMP_WORDS[2]}}" in
{cases}        esac
    fi
    if [[ -z $kind ]]; then
        _pagerctl "$@"
        return
    fi
    local ids
    ids=$(pagerctl --json "$kind" ls 2>/dev/null | sed -n 's/^    "id": "\([^"]*\)",\{{0,1\}}$/\1/p')
    COMPREPLY=($(compgen -W "$ids" -- "$cur"))
}}
complete -F _pagerctl_ids -o bashdefault -o default pagerctl
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_id_arguments_come_from_the_command_tree() {
        let mut command = crate::Cli::command();
        command.build();
        let kinds = id_arguments(&command);
        let has = |group: &str, verb: &str, kind: &str| {
            kinds
                .iter()
                .any(|(g, v, k)| (g.as_str(), v.as_str(), k.as_str()) == (group, verb, kind))
        };
        assert!(has("fork", "get", "fork"), "{kinds:?}");
        assert!(has("fork", "create", "snapshot"), "{kinds:?}");
        assert!(has("snapshot", "rm", "snapshot"), "{kinds:?}");
        assert!(has("vm", "start", "snapshot"), "{kinds:?}");
        assert!(has("vm", "rm", "vm"), "{kinds:?}");
        assert!(!kinds.iter().any(|(_, v, _)| v == "ls"), "{kinds:?}");
        assert!(!kinds.iter().any(|(g, v, _)| g == "snapshot" && v == "add"));
    }

    #[test]
    fn the_bash_script_is_valid_and_registers_the_id_completer() {
        let mut script = Vec::new();
        write(Shell::Bash, crate::Cli::command(), &mut script).unwrap();
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("\"fork wait\") kind=fork ;;"), "{script}");
        assert!(script.trim_end().ends_with("pagerctl"));
        let check = std::process::Command::new("bash")
            .args(["-n", "-c", &script])
            .status()
            .unwrap();
        assert!(check.success());
    }
}
