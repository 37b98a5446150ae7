//! The real `guest-probe` binary, not PID 1 (mounts nothing), driven over fd 3.

mod common;

use common::{spawn, status};
use std::time::{Duration, Instant};
use wire::{frame::Body, InvokeStatus, LogStream};

fn exec(handler: &str) -> common::Probe {
    spawn(&["--handler", handler], 0)
}

#[test]
fn hello_reports_the_real_sandbox_and_exec_is_ready() {
    let mut p = exec("cat");
    let h = p.hello();
    assert_eq!(h.protocol_version, wire::PROTOCOL_VERSION);
    assert_eq!(h.sandbox_id, "sb-test");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(h.boot_id, boot_id.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total = guest_probe::procinfo::parse_meminfo(&meminfo).total_kib;
    assert_eq!(h.mem.as_ref().unwrap().total_kib, total);
    assert!(h.cpu.as_ref().unwrap().cores >= 1);
    assert_eq!(h.probe_pid, p.child.id());
    assert_eq!(h.handler_kind, "exec");
    assert_eq!(h.probe_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.host.as_ref().unwrap().host_id_echo, "host-xyz");
    assert!(!h.kernel_release.is_empty());
    assert!(h.uptime_at_init_us > 0);
    let names: Vec<&str> = h.markers.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["init_start", "mounts_done", "procinfo_read", "connected"]
    );
    assert!(h
        .markers
        .windows(2)
        .all(|w| w[0].since_init_ns <= w[1].since_init_ns));
    assert!(h.sent_since_init_ns >= h.markers.last().unwrap().since_init_ns);
    let r = p.ready();
    assert_eq!(r.error, "");
}

#[test]
fn exec_cat_echoes_payload() {
    let mut p = exec("cat");
    p.handshake();
    for i in 0..3 {
        let payload = format!("{{\"n\": {i}}}");
        let (logs, r) = p.invoke(&format!("inv-{i}"), payload.as_bytes(), 5000);
        assert_eq!(status(&r), InvokeStatus::Ok, "{r:?}");
        assert_eq!(r.payload, payload.as_bytes());
        assert_eq!(r.exit_code, 0);
        assert!(logs.is_empty());
        assert_eq!(r.last_log_seq, 0);
        assert!(r.duration_us > 0);
    }
}

#[test]
fn exec_sees_sandbox_id_in_environment() {
    let mut p = exec("printf %s \"$SANDSCOPE_SANDBOX_ID\"");
    p.handshake();
    let (_, r) = p.invoke("env", b"", 5000);
    assert_eq!(r.payload, b"sb-test");
}

#[test]
fn exec_stderr_lines_become_logs_with_consecutive_seq() {
    let mut p = exec("echo one >&2; echo two >&2; printf 'no newline' >&2; echo out");
    p.handshake();
    let mut expect_seq = 1;
    for id in ["a", "b"] {
        let (logs, r) = p.invoke(id, b"", 5000);
        assert_eq!(status(&r), InvokeStatus::Ok);
        assert_eq!(r.payload, b"out\n");
        let lines: Vec<&str> = logs.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(lines, ["one", "two", "no newline"]);
        for l in &logs {
            assert_eq!(l.seq, expect_seq);
            assert_eq!(l.stream, LogStream::Stderr as i32);
            assert_eq!(l.invoke_id, id);
            assert!(!l.truncated);
            expect_seq += 1;
        }
        assert_eq!(r.last_log_seq, logs.last().unwrap().seq);
    }
}

#[test]
fn exec_long_stderr_line_is_truncated() {
    let mut p = exec("head -c 40000 /dev/zero | tr '\\0' x >&2; echo >&2; echo short >&2");
    p.handshake();
    let (logs, r) = p.invoke("long", b"", 5000);
    assert_eq!(status(&r), InvokeStatus::Ok);
    assert_eq!(logs.len(), 2);
    assert_eq!(logs[0].line.len(), wire::MAX_LOG_LINE);
    assert!(logs[0].truncated);
    assert_eq!(logs[1].line, "short");
}

#[test]
fn exec_exit_3_is_function_error() {
    let mut p = exec("echo partial; exit 3");
    p.handshake();
    let (_, r) = p.invoke("x", b"", 5000);
    assert_eq!(status(&r), InvokeStatus::FunctionError);
    assert_eq!(r.exit_code, 3);
    assert_eq!(r.error_type, "Runtime.ExitError");
    assert_eq!(r.error_message, "handler exited with status 3");
    assert_eq!(r.payload, b"partial\n");
}

#[test]
fn exec_killed_by_signal_is_killed() {
    let mut p = exec("kill -9 $$");
    p.handshake();
    let (_, r) = p.invoke("k", b"", 5000);
    assert_eq!(status(&r), InvokeStatus::Killed, "{r:?}");
    assert_eq!(r.signal, 9);
    assert_eq!(r.exit_code, -1);
    assert!(r.error_message.contains("signal 9"), "{}", r.error_message);
}

#[test]
fn exec_timeout_kills_the_whole_group() {
    let mut p = exec("sleep 5 & echo $! >&2; wait");
    p.handshake();
    let t = Instant::now();
    let (logs, r) = p.invoke("slow", b"", 300);
    let took = t.elapsed();
    assert_eq!(status(&r), InvokeStatus::Timeout, "{r:?}");
    assert_eq!(r.error_type, "Sandbox.Timeout");
    assert_eq!(r.error_message, "Task timed out after 0.30 seconds");
    assert!(took < Duration::from_secs(1), "timeout took {took:?}");
    let sleep_pid: i32 = logs[0].line.trim().parse().unwrap();
    let until = Instant::now() + Duration::from_secs(1);
    // The probe is a subreaper, so the killed sleep is reaped by it, not left a zombie.
    while std::path::Path::new(&format!("/proc/{sleep_pid}")).exists() {
        assert!(
            Instant::now() < until,
            "sleep {sleep_pid} still exists after the timeout"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn exec_reports_max_rss_and_cpu() {
    let mut p = exec("x=$(head -c 30000000 /dev/zero | tr '\\0' a); echo ${#x}");
    p.handshake();
    let (_, r) = p.invoke("mem", b"", 30_000);
    assert_eq!(status(&r), InvokeStatus::Ok, "{r:?}");
    assert_eq!(r.payload, b"30000000\n");
    assert!(r.max_rss_kib > 20_000, "max_rss_kib {}", r.max_rss_kib);
    assert!(r.cpu_user_us + r.cpu_system_us > 0);
}

#[test]
fn exec_response_too_large() {
    let mut p = exec("head -c 2000000 /dev/zero");
    p.handshake();
    let (_, r) = p.invoke("big", b"", 10_000);
    assert_eq!(status(&r), InvokeStatus::ResponseTooLarge, "{r:?}");
    assert!(
        r.error_message.contains(&wire::MAX_PAYLOAD.to_string()),
        "{}",
        r.error_message
    );
    assert!(r.payload.is_empty());
}

#[test]
fn second_invoke_while_busy_is_rejected_and_frames_still_served() {
    let mut p = exec("sleep 0.5; echo done");
    p.handshake();
    p.send(wire::Invoke {
        invoke_id: "first".into(),
        timeout_ms: 5000,
        ..Default::default()
    });
    p.send(wire::Invoke {
        invoke_id: "second".into(),
        timeout_ms: 5000,
        ..Default::default()
    });
    p.send(wire::Ping { nonce: 7 });
    match p.next_body() {
        Body::InvokeResult(r) => {
            assert_eq!(r.invoke_id, "second");
            assert_eq!(status(&r), InvokeStatus::RuntimeError);
            assert_eq!(r.error_type, "Sandbox.Busy");
        }
        b => panic!("{b:?}"),
    }
    match p.next_body() {
        Body::Pong(pong) => assert_eq!(pong.nonce, 7),
        b => panic!("{b:?}"),
    }
    let (_, r) = p.collect_result("first");
    assert_eq!(status(&r), InvokeStatus::Ok);
    assert_eq!(r.payload, b"done\n");
}

// stderr before the response line: that is what the protocol attributes to the invoke.
const COUNTER: &str = "echo ready; n=0; while read l; do n=$((n+1)); echo \"log $n\" >&2; \
                       echo \"got:$n:$l\"; done";

#[test]
fn persistent_answers_in_order_and_keeps_state() {
    let mut p = spawn(&["--handler-kind", "persistent", "--handler", COUNTER], 0);
    let h = p.hello();
    assert_eq!(h.handler_kind, "persistent");
    let ready = p.ready();
    assert_eq!(ready.error, "");
    assert!(ready.runtime_init_us > 0);
    let (logs, r) = p.invoke("i1", b"{\"a\":\n1}", 5000);
    assert_eq!(status(&r), InvokeStatus::Ok, "{r:?}");
    assert_eq!(r.payload, b"got:1:{\"a\": 1}");
    assert_eq!(
        logs.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
        ["log 1"]
    );
    assert_eq!(logs[0].invoke_id, "i1");
    assert_eq!(r.last_log_seq, logs[0].seq);
    assert!(r.max_rss_kib > 0);
    let (logs, r) = p.invoke("i2", b"second", 5000);
    assert_eq!(r.payload, b"got:2:second");
    assert_eq!(logs[0].line, "log 2");
    assert_eq!(r.last_log_seq, logs[0].seq);
}

#[test]
fn persistent_error_line_is_function_error() {
    let h = "echo ready; while read l; do echo \"!error bad input: $l\"; done";
    let mut p = spawn(&["--handler-kind", "persistent", "--handler", h], 0);
    p.handshake();
    let (_, r) = p.invoke("e", b"x", 5000);
    assert_eq!(status(&r), InvokeStatus::FunctionError);
    assert_eq!(r.error_message, "bad input: x");
}

#[test]
fn persistent_runtime_exit_mid_invoke() {
    let h = "echo ready; read l; echo dying >&2; exit 4";
    let mut p = spawn(&["--handler-kind", "persistent", "--handler", h], 0);
    p.handshake();
    let (logs, r) = p.invoke("d", b"x", 5000);
    assert_eq!(status(&r), InvokeStatus::FunctionError, "{r:?}");
    assert_eq!(r.exit_code, 4);
    assert!(logs.iter().any(|l| l.line == "dying"), "{logs:?}");
    let (_, r) = p.invoke("after", b"x", 5000);
    assert_eq!(status(&r), InvokeStatus::RuntimeError);
}

#[test]
fn persistent_timeout() {
    let h = "echo ready; while read l; do sleep 5; done";
    let mut p = spawn(&["--handler-kind", "persistent", "--handler", h], 0);
    p.handshake();
    let t = Instant::now();
    let (_, r) = p.invoke("t", b"x", 300);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(status(&r), InvokeStatus::Timeout);
    assert_eq!(r.error_type, "Sandbox.Timeout");
}

#[test]
fn persistent_without_ready_reports_error_and_keeps_serving() {
    let h = "echo booting >&2; sleep 30";
    let args = [
        "--handler-kind",
        "persistent",
        "--handler",
        h,
        "--init-timeout-ms",
        "300",
    ];
    let mut p = spawn(&args, 0);
    p.hello();
    let t = Instant::now();
    let mut ready = None;
    while ready.is_none() {
        match p.next_body() {
            Body::Ready(r) => ready = Some(r),
            Body::Log(_) => {}
            b => panic!("{b:?}"),
        }
    }
    let ready = ready.unwrap();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(
        ready.error.contains("did not print ready within 300 ms"),
        "{}",
        ready.error
    );
    assert!(ready.error.contains("booting"), "{}", ready.error);
    let (_, r) = p.invoke("x", b"", 1000);
    assert_eq!(status(&r), InvokeStatus::RuntimeError);
    p.send(wire::Ping { nonce: 1 });
    assert!(matches!(p.next_body(), Body::Pong(_)));
}

#[test]
fn persistent_runtime_that_exits_at_start() {
    let h = "echo cannot start >&2; exit 7";
    let mut p = spawn(&["--handler-kind", "persistent", "--handler", h], 0);
    p.hello();
    let ready = loop {
        match p.next_body() {
            Body::Ready(r) => break r,
            Body::Log(_) => {}
            b => panic!("{b:?}"),
        }
    };
    assert!(
        ready.error.contains("exited with status 7"),
        "{}",
        ready.error
    );
    assert!(ready.error.contains("cannot start"), "{}", ready.error);
}

#[test]
fn ping_pong_and_stats() {
    let mut p = exec("cat");
    p.handshake();
    p.send(wire::Ping { nonce: 42 });
    match p.next_body() {
        Body::Pong(pong) => {
            assert_eq!(pong.nonce, 42);
            assert!(pong.since_init_ns > 0);
        }
        b => panic!("{b:?}"),
    }
    p.invoke("warm", b"x", 5000);
    p.send(wire::StatsRequest {});
    match p.next_body() {
        Body::Stats(s) => {
            assert!(s.processes >= 1);
            assert!(s.rss_kib > 0);
            assert!(s.since_init_ns > 0);
        }
        b => panic!("{b:?}"),
    }
}

#[test]
fn shutdown_exits_zero_promptly_and_kills_runtime() {
    let h = "echo ready; trap '' TERM; while read l; do echo $l; done";
    let mut p = spawn(&["--handler-kind", "persistent", "--handler", h], 0);
    p.handshake();
    let t = Instant::now();
    p.send(wire::Shutdown {
        reason: "test".into(),
        grace_ms: 200,
    });
    let st = p.wait_exit(Duration::from_secs(3));
    assert_eq!(st.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn agent_closing_the_socket_ends_the_probe() {
    let mut p = exec("cat");
    p.handshake();
    p.sock.shutdown(std::net::Shutdown::Both).unwrap();
    let st = p.wait_exit(Duration::from_secs(3));
    assert_eq!(st.code(), Some(0));
}

#[test]
fn garbage_from_the_agent_exits_1() {
    use std::io::Write;
    let mut p = exec("cat");
    p.handshake();
    p.sock.write_all(&[0xff, 0xff, 0xff, 0x7f]).unwrap();
    let st = p.wait_exit(Duration::from_secs(3));
    assert_eq!(st.code(), Some(1));
}

#[test]
fn bad_command_line_exits_2_with_usage() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_guest-probe"))
        .args(["--sandbox-id", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing required option --fd or --connect"),
        "{err}"
    );
    assert!(err.contains("usage:"), "{err}");
}

#[test]
fn stderr_flood_is_rate_limited_and_drops_are_reported() {
    let mut p = exec("seq 1 40000 >&2; echo done");
    p.handshake();
    let (logs, r) = p.invoke("flood", b"", 30_000);
    assert_eq!(status(&r), InvokeStatus::Ok);
    let kept = logs
        .iter()
        .filter(|l| l.stream == LogStream::Stderr as i32)
        .count() as u64;
    let dropped: u64 = logs
        .iter()
        .filter(|l| l.stream == LogStream::Platform as i32)
        .map(|l| {
            let n = l.line.strip_prefix("dropped ").expect("drop report");
            n.split(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert!(dropped > 0, "nothing dropped ({kept} lines kept)");
    assert_eq!(kept + dropped, 40_000);
    assert!(logs.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    assert_eq!(r.last_log_seq, logs.last().unwrap().seq);
}

#[test]
fn a_dialing_probe_reconnects_when_the_link_drops() {
    use std::os::unix::net::UnixListener;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_guest-probe"))
        .args(["--sandbox-id", "redial", "--handler", "cat", "--connect"])
        .arg(format!("unix:{}", path.display()))
        .spawn()
        .unwrap();
    let hello = |listener: &UnixListener| {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut dec = wire::FrameDecoder::new();
        match dec.read_frame(&mut s).unwrap().unwrap().body.unwrap() {
            wire::frame::Body::Hello(h) => (s, h),
            other => panic!("expected Hello, got {other:?}"),
        }
    };
    let (first, h1) = hello(&listener);
    assert_eq!(h1.sandbox_id, "redial");
    drop(first); // the link drops without a Shutdown
    let (mut second, h2) = hello(&listener);
    assert_eq!(h2.sandbox_id, "redial");
    assert_eq!(h2.probe_pid, h1.probe_pid, "the same probe dialed again");
    use std::io::Write;
    second
        .write_all(
            &wire::encode_frame(
                &wire::Shutdown {
                    reason: "test".into(),
                    grace_ms: 0,
                }
                .into(),
            )
            .unwrap(),
        )
        .unwrap();
    let t = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "probe did not exit after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Regression: closing the agent's end with frames still unread (the probe's Ready) makes
/// the probe's next read fail with ECONNRESET instead of EOF; that is a lost link too, and
/// the probe must dial again instead of exiting with an error.
#[test]
fn a_dialing_probe_reconnects_after_a_connection_reset() {
    use std::os::unix::net::UnixListener;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_guest-probe"))
        .args(["--sandbox-id", "reset", "--handler", "cat", "--connect"])
        .arg(format!("unix:{}", path.display()))
        .spawn()
        .unwrap();
    let (mut first, _) = listener.accept().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut dec = wire::FrameDecoder::new();
    assert!(matches!(
        dec.read_frame(&mut first).unwrap().unwrap().body,
        Some(wire::frame::Body::Hello(_))
    ));
    // Let the Ready frame arrive and stay unread, then close: the probe sees a reset.
    std::thread::sleep(Duration::from_millis(200));
    drop(first);
    listener.set_nonblocking(true).unwrap();
    let t = std::time::Instant::now();
    let second = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("the probe exited ({st}) instead of dialing again");
                }
                assert!(t.elapsed() < Duration::from_secs(10), "no second dial");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    drop(second);
    let _ = child.kill();
    let _ = child.wait();
}
