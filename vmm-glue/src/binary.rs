//! Finding a hypervisor's binary: an explicit path, else the hypervisor's environment
//! variable, else its file name on `PATH`.
//!
//! ```text
//! explicit (--firecracker PATH) ─▶ $FIRECRACKER (non-empty) ─▶ PATH/firecracker (a file)
//! ```
//!
//! A path the option or the variable names must be a file: a missing one is reported as
//! such, naming where it came from, rather than failing later when the process is started.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where one hypervisor's binary is looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinaryLookup {
    /// How the hypervisor is named in messages.
    pub display_name: &'static str,
    /// The daemon option that names the binary.
    pub option: &'static str,
    /// The environment variable that names the binary.
    pub env: &'static str,
    /// The file name looked for on `PATH`.
    pub file_name: &'static str,
}

/// Where a named binary came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedBy {
    /// The daemon's option ([`BinaryLookup::option`]).
    Option,
    /// The environment variable ([`BinaryLookup::env`]).
    Env,
}

/// No binary was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryNotFound {
    /// Where it was looked for.
    pub lookup: BinaryLookup,
    /// The path the option or the variable named, which is not a file.
    pub named: Option<(PathBuf, NamedBy)>,
}

impl std::fmt::Display for BinaryNotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let BinaryLookup {
            display_name,
            option,
            env,
            file_name,
        } = self.lookup;
        match &self.named {
            Some((path, NamedBy::Option)) => write!(
                f,
                "no {display_name} binary at {}, which pagerd's daemon option {option} names; \
                 restart pagerd with {option} PATH naming the binary",
                path.display()
            ),
            Some((path, NamedBy::Env)) => write!(
                f,
                "no {display_name} binary at {}, which ${env} in pagerd's environment names; \
                 set ${env} to the binary, or start pagerd with {option} PATH",
                path.display()
            ),
            None => write!(
                f,
                "no {display_name} binary: start pagerd with the daemon option {option} PATH, \
                 set ${env} in its environment, or put {file_name} on its PATH"
            ),
        }
    }
}

impl std::error::Error for BinaryNotFound {}

/// The binary of `lookup`: `explicit`, else its environment variable, else its file name on
/// `PATH`. A path named by the option or the variable must be a file.
pub fn find_binary(
    lookup: &BinaryLookup,
    explicit: Option<&Path>,
) -> Result<PathBuf, BinaryNotFound> {
    find_in(
        lookup,
        explicit,
        std::env::var_os(lookup.env),
        std::env::var_os("PATH"),
    )
}

/// [`find_binary`] with the environment variable's value and `PATH` given.
fn find_in(
    lookup: &BinaryLookup,
    explicit: Option<&Path>,
    env_value: Option<OsString>,
    search_path: Option<OsString>,
) -> Result<PathBuf, BinaryNotFound> {
    let named = explicit
        .map(|path| (path.to_owned(), NamedBy::Option))
        .or_else(|| {
            env_value
                .filter(|p| !p.is_empty())
                .map(|path| (PathBuf::from(path), NamedBy::Env))
        });
    if let Some((path, by)) = named {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(BinaryNotFound {
                lookup: *lookup,
                named: Some((path, by)),
            })
        };
    }
    let not_found = BinaryNotFound {
        lookup: *lookup,
        named: None,
    };
    let search_path = search_path.ok_or_else(|| not_found.clone())?;
    std::env::split_paths(&search_path)
        .map(|dir| dir.join(lookup.file_name))
        .find(|candidate| candidate.is_file())
        .ok_or(not_found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOOL: BinaryLookup = BinaryLookup {
        display_name: "Tool",
        option: "--tool",
        env: "TOOL",
        file_name: "tool-bin",
    };

    #[test]
    fn an_explicit_path_wins_then_the_variable_then_path() {
        let dir = tempfile::tempdir().unwrap();
        let (empty, with_tool) = (dir.path().join("empty"), dir.path().join("bin"));
        std::fs::create_dir(&empty).unwrap();
        std::fs::create_dir(&with_tool).unwrap();
        let tool = with_tool.join("tool-bin");
        std::fs::write(&tool, b"").unwrap();
        let (given, env) = (dir.path().join("given"), dir.path().join("env"));
        std::fs::write(&given, b"").unwrap();
        std::fs::write(&env, b"").unwrap();
        let search = std::env::join_paths([&empty, &with_tool]).unwrap();
        let found = |explicit: Option<&Path>, env: Option<&Path>| {
            find_in(
                &TOOL,
                explicit,
                env.map(OsString::from),
                Some(search.clone()),
            )
        };
        assert_eq!(found(Some(&given), Some(&env)), Ok(given.clone()));
        assert_eq!(found(None, Some(&env)), Ok(env.clone()));
        assert_eq!(found(None, Some(Path::new(""))), Ok(tool.clone()));
        assert_eq!(found(None, None), Ok(tool));
    }

    #[test]
    fn a_missing_binary_says_where_it_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        // A directory of that name is not a binary.
        std::fs::create_dir(dir.path().join("tool-bin")).unwrap();
        let error = find_in(&TOOL, None, None, Some(dir.path().into())).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no Tool binary: start pagerd with the daemon option --tool PATH, set $TOOL in its \
             environment, or put tool-bin on its PATH"
        );
        assert_eq!(find_in(&TOOL, None, None, None), Err(error));
    }

    #[test]
    fn a_named_path_that_is_no_file_is_refused_naming_the_option_or_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tool-bin"), b"").unwrap();
        let search = Some(OsString::from(dir.path()));
        let missing = Path::new("/nonexistent/tool");
        let error = find_in(&TOOL, Some(missing), None, search.clone()).unwrap_err();
        assert_eq!(error.named, Some((missing.to_owned(), NamedBy::Option)));
        assert_eq!(
            error.to_string(),
            "no Tool binary at /nonexistent/tool, which pagerd's daemon option --tool names; \
             restart pagerd with --tool PATH naming the binary"
        );
        let error = find_in(&TOOL, None, Some(missing.into()), search).unwrap_err();
        assert_eq!(error.named, Some((missing.to_owned(), NamedBy::Env)));
        assert_eq!(
            error.to_string(),
            "no Tool binary at /nonexistent/tool, which $TOOL in pagerd's environment names; \
             set $TOOL to the binary, or start pagerd with --tool PATH"
        );
    }
}
