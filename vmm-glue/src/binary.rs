//! Finding a hypervisor's binary: an explicit path, else the hypervisor's environment
//! variable, else its file name on `PATH`.
//!
//! ```text
//! explicit (--firecracker PATH) ─▶ $FIRECRACKER (non-empty) ─▶ PATH/firecracker (a file)
//! ```

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

/// No binary was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no {} binary: give {} PATH, set ${}, or put {} on PATH",
    lookup.display_name,
    lookup.option,
    lookup.env,
    lookup.file_name
)]
pub struct BinaryNotFound {
    /// Where it was looked for.
    pub lookup: BinaryLookup,
}

/// The binary of `lookup`: `explicit`, else its environment variable, else its file name on
/// `PATH`.
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
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = env_value.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let not_found = BinaryNotFound { lookup: *lookup };
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
        std::fs::write(with_tool.join("tool-bin"), b"").unwrap();
        let search = std::env::join_paths([&empty, &with_tool]).unwrap();
        let found = |explicit: Option<&Path>, env: Option<&str>| {
            find_in(
                &TOOL,
                explicit,
                env.map(OsString::from),
                Some(search.clone()),
            )
        };
        assert_eq!(
            found(Some(Path::new("/x/given")), Some("/y/env")),
            Ok(PathBuf::from("/x/given"))
        );
        assert_eq!(found(None, Some("/y/env")), Ok(PathBuf::from("/y/env")));
        assert_eq!(found(None, Some("")), Ok(with_tool.join("tool-bin")));
        assert_eq!(found(None, None), Ok(with_tool.join("tool-bin")));
    }

    #[test]
    fn a_missing_binary_says_where_it_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        // A directory of that name is not a binary.
        std::fs::create_dir(dir.path().join("tool-bin")).unwrap();
        let error = find_in(&TOOL, None, None, Some(dir.path().into())).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no Tool binary: give --tool PATH, set $TOOL, or put tool-bin on PATH"
        );
        assert_eq!(find_in(&TOOL, None, None, None), Err(error));
    }
}
