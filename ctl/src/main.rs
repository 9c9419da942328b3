//! `ctl`: the command-line client of pagerd's control socket.
fn main() {}
