//! Shell sessions through the real probe binary: a command on pipes (stdout, stderr and
//! the exit status apart) and an interactive shell on a PTY (state between commands,
//! window size, Ctrl-C, exit status), while invocations keep working.

mod common;

use common::spawn;
use std::time::{Duration, Instant};
use wire::{frame::Body, ShellData, ShellExit, ShellOpen, ShellStream};

fn open(session: u64, command: &str, pty: bool) -> ShellOpen {
    ShellOpen {
        session,
        command: command.into(),
        pty,
        term: "xterm".into(),
        cols: 80,
        rows: 24,
        env: vec!["SHELL_TEST=yes".into()],
    }
}

fn stdin(session: u64, s: &str) -> ShellData {
    ShellData {
        session,
        stream: ShellStream::Stdin as i32,
        data: s.as_bytes().to_vec(),
    }
}

/// Output of `session` collected until `until` holds on it (or ShellExit, or 15 s).
fn collect(
    p: &mut common::Probe,
    session: u64,
    out: &mut (String, String),
    until: impl Fn(&str) -> bool,
) -> Option<ShellExit> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        match p.next_body() {
            Body::ShellData(d) if d.session == session => {
                let text = String::from_utf8_lossy(&d.data).into_owned();
                if d.stream == ShellStream::Stderr as i32 {
                    out.1.push_str(&text);
                } else {
                    out.0.push_str(&text);
                }
                if until(&out.0) {
                    return None;
                }
            }
            Body::ShellExit(e) if e.session == session => return Some(e),
            _ => {}
        }
    }
    panic!("timed out; output so far: {out:?}");
}

#[test]
fn command_on_pipes_keeps_streams_and_exit_status_apart() {
    let mut p = spawn(&["--handler", "cat"], 0);
    p.handshake();
    p.send(open(
        1,
        "echo out:$SHELL_TEST; echo err >&2; read x; echo got:$x; exit 3",
        false,
    ));
    p.send(stdin(1, "hello\n"));
    p.send(stdin(1, ""));
    let mut out = Default::default();
    let exit = collect(&mut p, 1, &mut out, |_| false).expect("exit");
    assert_eq!(exit.code, 3, "{exit:?} {out:?}");
    assert!(exit.error.is_empty());
    assert_eq!(out.0, "out:yes\ngot:hello\n");
    assert_eq!(out.1, "err\n");
    // Invocations still work on the same link.
    let (_, r) = p.invoke("i1", b"ping", 5000);
    assert_eq!(r.payload, b"ping");
}

#[test]
fn pty_shell_keeps_state_resizes_and_takes_ctrl_c() {
    let mut p = spawn(&["--handler", "cat"], 0);
    p.handshake();
    p.send(open(7, "", true));
    let mut out = Default::default();
    p.send(stdin(7, "cd /tmp\n"));
    p.send(stdin(7, "echo at-$(pwd)-$(tty | cut -c1-9)\n"));
    assert!(collect(&mut p, 7, &mut out, |o| o.contains("at-/tmp-/dev/pts/")).is_none());

    p.send(stdin(7, "stty size\n"));
    assert!(collect(&mut p, 7, &mut out, |o| o.contains("24 80")).is_none());
    p.send(wire::ShellResize {
        session: 7,
        cols: 132,
        rows: 40,
    });
    // Give the resize a moment to land before asking.
    std::thread::sleep(Duration::from_millis(50));
    p.send(stdin(7, "stty size\n"));
    assert!(collect(&mut p, 7, &mut out, |o| o.contains("40 132")).is_none());

    // Ctrl-C interrupts a foreground sleep; the shell lives on.
    let t0 = Instant::now();
    p.send(stdin(7, "sleep 30; echo not-interrupted\n"));
    std::thread::sleep(Duration::from_millis(300));
    p.send(stdin(7, "\x03"));
    p.send(stdin(7, "echo after-$((6*7))\n"));
    assert!(collect(&mut p, 7, &mut out, |o| o.contains("after-42")).is_none());
    assert!(t0.elapsed() < Duration::from_secs(10));
    // (the typed line is echoed; the output would be a line of its own)
    assert!(!out.0.contains("\nnot-interrupted"), "{out:?}");

    p.send(stdin(7, "exit 5\n"));
    let exit = collect(&mut p, 7, &mut out, |_| false).expect("exit");
    assert_eq!(exit.code, 5, "{exit:?}");
}

#[test]
fn bad_sessions_are_reported_not_fatal() {
    let mut p = spawn(&["--handler", "cat"], 0);
    p.handshake();
    // Data and signals for sessions that do not exist are ignored.
    p.send(stdin(99, "x\n"));
    p.send(wire::ShellSignal {
        session: 99,
        signal: 9,
    });
    // A duplicate session id is refused with a reason.
    p.send(open(1, "sleep 5", false));
    p.send(open(1, "true", false));
    let t0 = Instant::now();
    let dup = loop {
        assert!(t0.elapsed() < Duration::from_secs(10));
        if let Body::ShellExit(e) = p.next_body() {
            break e;
        }
    };
    assert!(dup.error.contains("already open"), "{dup:?}");
    // A signal ends the running one.
    p.send(wire::ShellSignal {
        session: 1,
        signal: libc::SIGTERM,
    });
    let mut out = Default::default();
    let e = collect(&mut p, 1, &mut out, |_| false).expect("exit");
    assert_eq!(e.signal, libc::SIGTERM, "{e:?}");
    let (_, r) = p.invoke("i1", b"still-here", 5000);
    assert_eq!(r.payload, b"still-here");
}
