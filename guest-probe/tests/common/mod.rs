//! Test harness: runs the real `guest-probe` binary with its link on fd 3 (one end of a
//! socketpair) and drives it with wire frames.

#![allow(dead_code)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use wire::{frame::Body, Frame, FrameDecoder, Invoke, InvokeResult, Log};

pub struct Probe {
    pub child: Child,
    pub sock: UnixStream,
    dec: FrameDecoder,
}

/// Flags for unshare in the child before exec (0 = none).
pub fn spawn(args: &[&str], unshare_flags: i32) -> Probe {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    // GUEST_PROBE_BIN runs the suite against another build (e.g. scripts/build-probe's).
    let bin = std::env::var("GUEST_PROBE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_guest-probe").to_string());
    let mut cmd = Command::new(bin);
    cmd.args([
        "--sandbox-id",
        "sb-test",
        "--fd",
        "3",
        "--host-id",
        "host-xyz",
    ])
    .args(args)
    .stdin(Stdio::null())
    .stderr(Stdio::inherit());
    // SAFETY: only async-signal-safe calls (dup2, fcntl, unshare) in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::fcntl(3, libc::F_SETFD, 0);
            if unshare_flags != 0 && libc::unshare(unshare_flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn guest-probe");
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    Probe {
        child,
        sock: ours,
        dec: FrameDecoder::new(),
    }
}

impl Probe {
    pub fn next(&mut self) -> Frame {
        self.dec
            .read_frame(&mut self.sock)
            .expect("read frame")
            .expect("probe closed the link")
    }

    pub fn next_body(&mut self) -> Body {
        self.next().body.unwrap()
    }

    pub fn send(&mut self, f: impl Into<Frame>) {
        self.sock
            .write_all(&wire::encode_frame(&f.into()).unwrap())
            .unwrap();
    }

    pub fn hello(&mut self) -> wire::Hello {
        match self.next_body() {
            Body::Hello(h) => h,
            b => panic!("expected Hello, got {b:?}"),
        }
    }

    pub fn ready(&mut self) -> wire::Ready {
        match self.next_body() {
            Body::Ready(r) => r,
            b => panic!("expected Ready, got {b:?}"),
        }
    }

    /// Hello then a successful Ready.
    pub fn handshake(&mut self) -> wire::Hello {
        let h = self.hello();
        let r = self.ready();
        assert_eq!(r.error, "", "runtime failed: {}", r.error);
        h
    }

    pub fn invoke(
        &mut self,
        id: &str,
        payload: &[u8],
        timeout_ms: u64,
    ) -> (Vec<Log>, InvokeResult) {
        self.send(Invoke {
            invoke_id: id.into(),
            payload: payload.to_vec(),
            timeout_ms,
            traceparent: String::new(),
        });
        self.collect_result(id)
    }

    pub fn collect_result(&mut self, id: &str) -> (Vec<Log>, InvokeResult) {
        let mut logs = vec![];
        loop {
            match self.next_body() {
                Body::Log(l) => logs.push(l),
                Body::InvokeResult(r) if r.invoke_id == id => return (logs, r),
                b => panic!("unexpected frame while waiting for {id}: {b:?}"),
            }
        }
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let until = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("guest-probe did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn status(r: &InvokeResult) -> wire::InvokeStatus {
    wire::InvokeStatus::try_from(r.status).unwrap()
}
