//! A program at a real terminal: a `tmux` server of the test's own (its socket in a temporary
//! directory, no configuration read) running one command in a detached session of a given
//! size, its screen read with `capture-pane` and keys typed with `send-keys`.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::on_path;

/// The session every [`Tmux`] runs its command in.
const SESSION: &str = "test";

/// A tmux server running one command at a terminal of a fixed size.
pub struct Tmux {
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// How the command in the pane ended, once it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaneExit {
    /// Its exit status.
    pub status: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
}

impl Tmux {
    /// Whether tmux is installed.
    pub fn available() -> bool {
        on_path("tmux").is_some()
    }

    /// Runs `command` in a `width`×`height` terminal. The pane stays after the command ends,
    /// so that its exit status can be read.
    pub fn start(width: u16, height: u16, command: &[String]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pagerd-tmux")
            .tempdir()
            .expect("tempdir");
        let tmux = Self {
            socket: dir.path().join("tmux.sock"),
            _dir: dir,
        };
        let (width, height) = (width.to_string(), height.to_string());
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
        ];
        args.extend(command.iter().map(String::as_str));
        tmux.ok(&args);
        tmux.ok(&["set-option", "-t", SESSION, "-w", "remain-on-exit", "on"]);
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

    /// How the command ended, or `None` while it runs (or while tmux has seen its terminal
    /// close but not yet reaped it).
    pub fn exited(&self) -> Option<PaneExit> {
        let out = self.ok(&[
            "display-message",
            "-p",
            "-t",
            SESSION,
            "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}",
        ]);
        let mut fields = out.trim().split(':');
        if fields.next() != Some("1") {
            return None;
        }
        let exit = PaneExit {
            status: fields.next().and_then(|s| s.parse().ok()),
            signal: fields.next().and_then(|s| s.parse().ok()),
        };
        (exit.status.is_some() || exit.signal.is_some()).then_some(exit)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}
