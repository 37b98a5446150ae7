//! Keys to state changes.

use crate::state::{State, Tab};
use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// Apply one key press to the state.
pub fn on_key(s: &mut State, k: KeyEvent) {
    if k.kind == KeyEventKind::Release {
        return;
    }
    if k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL) {
        s.quit = true;
        return;
    }
    if s.editing_filter {
        match k.code {
            KeyCode::Enter => s.editing_filter = false,
            KeyCode::Esc => {
                s.editing_filter = false;
                s.filter.clear();
            }
            KeyCode::Backspace => {
                s.filter.pop();
            }
            KeyCode::Char(c) => s.filter.push(c),
            _ => {}
        }
        s.clamp();
        return;
    }
    if s.show_help {
        // Any key closes the help; q still quits.
        s.show_help = false;
        if k.code != KeyCode::Char('q') {
            return;
        }
    }
    let on_table = matches!(s.tab, Tab::Hosts | Tab::Sandbox);
    match k.code {
        KeyCode::Char('q') => s.quit = true,
        KeyCode::Char('?') => s.show_help = true,
        KeyCode::Tab | KeyCode::Right | KeyCode::Char('l') => s.tab = s.tab.step(false),
        KeyCode::BackTab | KeyCode::Left | KeyCode::Char('h') => s.tab = s.tab.step(true),
        KeyCode::Char(c @ '1'..='5') => s.tab = Tab::ALL[c as usize - '1' as usize],
        KeyCode::Down | KeyCode::Char('j') => {
            if on_table {
                s.selected_sb = s.selected_sb.saturating_add(1);
            } else {
                s.selected_fn = s.selected_fn.saturating_add(1);
            }
        }
        KeyCode::Up | KeyCode::Char('k') => {
            if on_table {
                s.selected_sb = s.selected_sb.saturating_sub(1);
            } else {
                s.selected_fn = s.selected_fn.saturating_sub(1);
            }
        }
        KeyCode::Char('g') | KeyCode::Home => {
            s.selected_sb = 0;
            s.selected_fn = 0;
        }
        KeyCode::Char('G') | KeyCode::End => {
            if on_table {
                s.selected_sb = usize::MAX;
            } else {
                s.selected_fn = usize::MAX;
            }
        }
        KeyCode::Char('s') => s.sort = s.sort.next(),
        KeyCode::Char('S') => s.sort_desc = !s.sort_desc,
        KeyCode::Char('/') => s.editing_filter = true,
        KeyCode::Esc => s.filter.clear(),
        KeyCode::Enter if s.tab == Tab::Hosts => s.tab = Tab::Sandbox,
        _ => {}
    }
    s.clamp();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use crate::state::SortKey;

    fn key(s: &mut State, c: KeyCode) {
        on_key(s, KeyEvent::new(c, KeyModifiers::NONE));
    }

    #[test]
    fn keys_switch_tabs_select_sort_filter_and_quit() {
        let mut s = fixtures::many(5, 12);
        key(&mut s, KeyCode::Tab);
        assert_eq!(s.tab, Tab::Waterfall);
        key(&mut s, KeyCode::BackTab);
        assert_eq!(s.tab, Tab::Latency);
        key(&mut s, KeyCode::Char('j'));
        key(&mut s, KeyCode::Char('j'));
        assert_eq!(s.selected_fn, 2);
        key(&mut s, KeyCode::Char('G'));
        assert_eq!(s.selected_fn, 4, "clamped to the last function");
        key(&mut s, KeyCode::Char('3'));
        assert_eq!(s.tab, Tab::Hosts);
        key(&mut s, KeyCode::Char('s'));
        assert_eq!(s.sort, SortKey::Function);
        key(&mut s, KeyCode::Char('S'));
        assert!(s.sort_desc);
        key(&mut s, KeyCode::Enter);
        assert_eq!(s.tab, Tab::Sandbox);
        key(&mut s, KeyCode::Char('/'));
        for c in "fn-003".chars() {
            key(&mut s, KeyCode::Char(c));
        }
        key(&mut s, KeyCode::Enter);
        assert_eq!(s.functions().len(), 1);
        assert!(s.sandboxes().iter().all(|(_, sb)| sb.function == "fn-003"));
        key(&mut s, KeyCode::Esc);
        assert_eq!(s.functions().len(), 5);
        key(&mut s, KeyCode::Char('?'));
        assert!(s.show_help);
        key(&mut s, KeyCode::Char('x'));
        assert!(!s.show_help && !s.quit);
        key(&mut s, KeyCode::Char('q'));
        assert!(s.quit);
    }
}
