//! Open files (issue 16, faults 8 and 9): cold starts that run out of open files part
//! way (cgroup setup, socketpair, spawn, link) end without a cgroup or a state directory
//! left; the agent raises its open-file limit and says how many sandboxes fit. A test
//! binary of its own: these tests change the process's open-file limit, which every test
//! sharing the process would feel, so they also take turns.

mod common;

use common::{func, leftover_cgroups};
use host_agent::agent::InvokeOptions;
use std::time::{Duration, Instant};

/// Held by each test for its whole run: the limit is the process's.
static RLIMIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _turn = RLIMIT.lock().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_raises_its_open_file_limit_and_says_how_many_sandboxes_fit() {
    if !common::can_run() {
        return;
    }
    let _turn = RLIMIT.lock().await;
    const F: &str = "fds-fit";
    const N: u64 = 4;
    common::clear_stale_cgroups(F);
    let (soft, hard) = nofile();
    // The common default: a soft limit of 1024 under a higher hard one.
    set_soft_nofile(1024.min(hard / 2));
    let mut a = common::start(
        &[func(
            F,
            "cat >/dev/null; sleep 0.3; echo '{}'",
            "[functions.pool]\nmax_sandboxes = 4",
        )],
        "",
    )
    .await;
    let raised = nofile().0;
    set_soft_nofile(soft);
    assert_eq!(
        raised, hard,
        "the agent left its soft limit below the hard one"
    );
    set_soft_nofile(hard);

    // What N sandboxes really hold, against what the agent counts per sandbox.
    let warm = a.invoke(F, "{}").await;
    assert_eq!(warm.status, 200, "{warm:?}");
    let before = open_fds();
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..N {
        let agent = a.agent.clone();
        starts.spawn(async move {
            agent
                .invoke(F, b"{}".to_vec(), InvokeOptions::default())
                .await
                .map(|inv| inv.status)
        });
    }
    while let Some(r) = starts.join_next().await {
        assert!(matches!(r.unwrap(), Ok(host_agent::agent::Status::Ok)));
    }
    let live = a.live_ids().await.len() as u64;
    assert_eq!(live, N, "{:?}", a.live_ids().await);
    let held = open_fds().saturating_sub(before);
    let fds = a.get("/v1/stats").await["fds"].clone();
    set_soft_nofile(soft);
    let n = |k: &str| {
        fds[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no fds.{k}: {fds}"))
    };
    assert_eq!(n("limit"), hard, "{fds}");
    // N - 1 sandboxes are new (one was warm already).
    assert!(
        held <= (N - 1) * n("per_sandbox"),
        "{N} sandboxes hold {held} more fds than 1 did; per_sandbox is {fds}"
    );
    assert_eq!(
        n("sandboxes_fit"),
        N + (n("limit") - n("open")) / n("per_sandbox"),
        "{fds}"
    );
    assert!(n("sandboxes_fit") > hard / 10, "{fds}");
    tokio::time::timeout(Duration::from_secs(10), a.halt())
        .await
        .expect("agent stop hung");
}
