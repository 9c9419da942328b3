//! A program at a real terminal: a `tmux` server of the test's own (its socket in a temporary
//! directory, no configuration read) running one command in a detached session of a given
//! size, its screen read with `capture-pane` and keys typed with `send-keys`.
//!
//! The command runs under `sh`, which writes its exit status to a file once it ends: tmux
//! itself may take its time to reap a finished pane.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::on_path;

/// The session every [`Tmux`] runs its command in.
const SESSION: &str = "test";

/// A tmux server running one command at a terminal of a fixed size.
pub struct Tmux {
    socket: PathBuf,
    status: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmux {
    /// Whether tmux is installed.
    pub fn available() -> bool {
        on_path("tmux").is_some()
    }

    /// Runs `command` in a `width`×`height` terminal.
    pub fn start(width: u16, height: u16, command: &[String]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pagerd-tmux")
            .tempdir()
            .expect("tempdir");
        let tmux = Self {
            socket: dir.path().join("tmux.sock"),
            status: dir.path().join("status"),
            _dir: dir,
        };
        let (width, height) = (width.to_string(), height.to_string());
        // The status goes to a temporary name first, so that it is never read half written.
        let script = format!(
            "\"$@\"; echo $? >'{0}.new' && mv '{0}.new' '{0}'",
            tmux.status.display()
        );
        let mut args = vec![
            "new-session",
            "-d",
            "-s",
            SESSION,
            "-x",
            &width,
            "-y",
            &height,
            "--",
            "sh",
            "-c",
            &script,
            "sh",
        ];
        args.extend(command.iter().map(String::as_str));
        tmux.ok(&args);
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(["-f", "/dev/null"])
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The screen, one string per row; a row the terminal wrapped is joined back into one.
    pub fn screen(&self) -> Vec<String> {
        self.ok(&["capture-pane", "-p", "-J", "-t", SESSION])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Types `keys` (tmux key names, e.g. `q` or `Enter`).
    pub fn send_keys(&self, keys: &str) {
        self.ok(&["send-keys", "-t", SESSION, keys]);
    }

    /// The command's exit status (128 + N for signal N), or `None` while it runs.
    pub fn exit_status(&self) -> Option<i32> {
        std::fs::read_to_string(&self.status)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}
