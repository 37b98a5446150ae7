//! Failed starts leave nothing behind (issue 16, fault 8): cold starts that run out of
//! open files part way (cgroup setup, socketpair, spawn, link) end without a cgroup or a
//! state directory left. A test binary of its own: it lowers the process's open-file
//! limit, which every test sharing the process would feel.

mod common;

use common::{func, leftover_cgroups};
use host_agent::agent::InvokeOptions;
use std::time::{Duration, Instant};

fn nofile() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    (r.rlim_cur, r.rlim_max)
}

fn set_soft_nofile(soft: u64) {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: nofile().1,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_starts_failing_for_lack_of_open_files_leave_no_cgroup_or_state_dir() {
    if !common::can_run() {
        return;
    }
    const F: &str = "fail-nofile";
    const N: usize = 30;
    common::clear_stale_cgroups(F);
    let mut a = common::start(
        &[func(
            F,
            "cat",
            "[functions.pool]\nmax_sandboxes = 30\nqueue = 30\nprewarm = 0",
        )],
        "",
    )
    .await;
    // Room for about a dozen sandboxes: the other starts fail wherever the next open file
    // is refused.
    let soft = nofile().0;
    set_soft_nofile(open_fds() + 60);
    let mut starts = tokio::task::JoinSet::new();
    for i in 0..N {
        let agent = a.agent.clone();
        starts.spawn(async move {
            let r = agent
                .invoke(
                    F,
                    format!("{{\"i\":{i}}}").into_bytes(),
                    InvokeOptions::default(),
                )
                .await;
            matches!(r, Ok(inv) if inv.status == host_agent::agent::Status::Ok)
        });
    }
    let mut ok = 0;
    while let Some(r) = starts.join_next().await {
        ok += usize::from(r.unwrap());
    }
    set_soft_nofile(soft);
    assert!(
        ok < N,
        "every start succeeded: the limit provoked no failure"
    );
    assert!(ok > 0, "no start succeeded at all");

    // Failed starts are gone at once; the agent's stop ends the rest.
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), a.halt())
        .await
        .expect("agent stop hung");
    let mut left = (Vec::new(), Vec::new());
    while t0.elapsed() < Duration::from_secs(10) {
        left = (leftover_cgroups(F), a.leftover_state_dirs());
        if left.0.is_empty() && left.1.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        left,
        (Vec::<String>::new(), Vec::<String>::new()),
        "{ok}/{N} starts succeeded; cgroups and state dirs left"
    );
}
