//! The terminal: raw mode + alternate screen, restored by an RAII guard and on panic.

use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use std::io::{self, Stdout};

/// Restore the terminal (idempotent; errors ignored: nothing more can be done).
pub fn restore() {
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(
        io::stdout(),
        crossterm::terminal::LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

/// Owns the terminal in raw mode on the alternate screen; dropping it restores both.
pub struct TermGuard {
    /// The ratatui terminal.
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TermGuard {
    /// Enter raw mode and the alternate screen, and make panics restore the terminal
    /// before the panic message prints.
    pub fn enter() -> io::Result<TermGuard> {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
        crossterm::terminal::enable_raw_mode()?;
        let guard = TermGuard {
            // Built before entering the alternate screen so a failure below still
            // restores raw mode through Drop.
            terminal: Terminal::new(CrosstermBackend::new(io::stdout()))?,
        };
        crossterm::execute!(
            io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        Ok(guard)
    }
}

impl Drop for TermGuard {
    fn drop(&mut self) {
        restore();
    }
}
