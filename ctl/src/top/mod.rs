//! `pagerctl top`: a live view of forks, file users and VMs, the busiest forks first.
//!
//! At a terminal it is a full-screen view (`ratatui`) that fits the window, keeps its header
//! on top and quits on `q` (or Esc, or Ctrl-C); refreshing never blocks the keys for longer
//! than the wait for the next sample. Writing elsewhere it prints plain frames one after
//! another. `frame.rs` turns samples into what is shown, `view.rs` draws it, `plain.rs`
//! writes it as text.

mod frame;
mod plain;
mod view;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use proto::client::{Client, ClientError};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::failure::Report;
use frame::{Rates, Sample};

/// Why `top` stopped early.
pub enum Error {
    /// The first call to the daemon failed.
    Daemon(ClientError),
    /// The terminal could not be driven.
    Terminal(std::io::Error),
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        Self::Daemon(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::Terminal(e)
    }
}

/// Shows `iterations` frames (until quit when `None`), `interval` apart.
pub fn run(
    client: &Client,
    interval: Duration,
    iterations: Option<u64>,
    report: &Report,
) -> Result<(), Error> {
    let mut rates = Rates::default();
    // The daemon must answer once before the screen is taken over.
    let first = rates.frame(&sample(client)?);
    if std::io::stdout().is_terminal() {
        let mut terminal = ratatui::init();
        let result = live(
            &mut terminal,
            client,
            rates,
            first,
            interval,
            iterations,
            report,
        );
        ratatui::restore();
        result
    } else {
        plain(client, rates, first, interval, iterations)
    }
}

/// One sample of the daemon: its status, forks and VMs.
fn sample(client: &Client) -> Result<Sample, ClientError> {
    Ok(Sample {
        status: client.status()?,
        forks: client.forks()?,
        // A daemon that refuses to list VMs still has forks to show.
        vms: match client.vms() {
            Err(ClientError::Refused(_)) => Vec::new(),
            other => other?,
        },
        at: Instant::now(),
    })
}

/// The full-screen view: redraws on every sample and on resizes, reads keys in between.
fn live(
    terminal: &mut ratatui::DefaultTerminal,
    client: &Client,
    mut rates: Rates,
    mut frame: frame::Frame,
    interval: Duration,
    iterations: Option<u64>,
    report: &Report,
) -> Result<(), Error> {
    let mut shown = 1u64;
    let mut error: Option<String> = None;
    let mut next = Instant::now() + interval;
    loop {
        terminal.draw(|f| view::draw(f, &frame, interval, error.as_deref()))?;
        if iterations.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        let now = Instant::now();
        if now < next && event::poll(next - now)? {
            match event::read()? {
                Event::Key(key) if key.kind == KeyEventKind::Press && quits(key) => {
                    return Ok(());
                }
                _ => continue,
            }
        }
        if Instant::now() >= next {
            match sample(client) {
                Ok(sample) => {
                    frame = rates.frame(&sample);
                    error = None;
                }
                Err(e) => error = Some(report.one_line(&e)),
            }
            shown += 1;
            next = Instant::now() + interval;
        }
    }
}

/// Whether `key` ends the view.
fn quits(key: event::KeyEvent) -> bool {
    match key.code {
        KeyCode::Char('q') | KeyCode::Esc => true,
        KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
        _ => false,
    }
}

/// Plain frames on stdout.
fn plain(
    client: &Client,
    mut rates: Rates,
    first: frame::Frame,
    interval: Duration,
    iterations: Option<u64>,
) -> Result<(), Error> {
    crate::emit(&plain::text(&first));
    let mut shown = 1u64;
    while iterations.is_none_or(|n| shown < n) {
        std::thread::sleep(interval);
        let frame = rates.frame(&sample(client)?);
        crate::emit(&format!("\n{}", plain::text(&frame)));
        shown += 1;
    }
    Ok(())
}
