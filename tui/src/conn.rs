//! Polling one agent's JSON API, with reconnect backoff.
//!
//! One task per agent polls `/v1/stats`, `/v1/sandboxes`, `/v1/alerts` and the selected
//! sandbox's `/v1/sandboxes/{id}` every interval and sends [`Update`]s to the UI loop.
//! A failed poll reports [`ConnState::Disconnected`] and retries with exponential
//! backoff (250 ms doubling, capped at 4 s).

use crate::model::{Alerts, SandboxDetail, Sandboxes, Stats};
use crate::state::{ConnState, Update};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// First retry delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// Failures of one poll.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP request failed or the body did not parse.
    #[error("GET {path}")]
    Get {
        /// Path requested.
        path: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
}

/// Backoff before retry number `attempt` (1-based).
pub fn backoff(attempt: u32) -> Duration {
    let d = BACKOFF_MIN.saturating_mul(1u32 << attempt.saturating_sub(1).min(8));
    d.min(BACKOFF_MAX)
}

/// Error text with its causes, for the status line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn get<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    base: &str,
    path: &str,
) -> Result<T, Error> {
    let err = |source| Error::Get {
        path: path.to_string(),
        source,
    };
    client
        .get(format!("{base}{path}"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(err)?
        .json::<T>()
        .await
        .map_err(err)
}

/// Poll `base` (e.g. `http://127.0.0.1:9000`) every `interval` until `tx` closes.
/// `detail` carries the id of the sandbox whose detail to fetch (for this agent).
pub async fn poll(
    agent: usize,
    base: String,
    interval: Duration,
    tx: mpsc::Sender<Update>,
    detail: watch::Receiver<Option<String>>,
) {
    let base = base.trim_end_matches('/').to_string();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let state = ConnState::Disconnected {
                error: chain(&e),
                attempt: 1,
                retry_in: BACKOFF_MAX,
            };
            let _ = tx.send(Update::Conn { agent, state }).await;
            return;
        }
    };
    let mut attempt = 0u32;
    loop {
        let id = detail.borrow().clone();
        let r = tokio::try_join!(
            get::<Stats>(&client, &base, "/v1/stats"),
            get::<Sandboxes>(&client, &base, "/v1/sandboxes"),
        );
        let wait = match r {
            Ok((stats, sandboxes)) => {
                attempt = 0;
                // Optional views: an agent without them (or a sandbox that just ended)
                // still counts as connected.
                let alerts = get::<Alerts>(&client, &base, "/v1/alerts").await.ok();
                let detail = match id {
                    Some(id) => {
                        get::<SandboxDetail>(&client, &base, &format!("/v1/sandboxes/{id}"))
                            .await
                            .ok()
                    }
                    None => None,
                };
                let u = Update::Data {
                    agent,
                    stats,
                    sandboxes,
                    alerts,
                    detail,
                };
                if tx.send(u).await.is_err() {
                    return;
                }
                interval
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let retry_in = backoff(attempt);
                tracing::debug!(agent = %base, error = %chain(&e), "poll failed");
                let state = ConnState::Disconnected {
                    error: chain(&e),
                    attempt,
                    retry_in,
                };
                if tx.send(Update::Conn { agent, state }).await.is_err() {
                    return;
                }
                retry_in
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(1));
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    /// A minimal HTTP/1.1 server answering every GET with canned JSON per path.
    async fn fake_agent(listener: tokio::net::TcpListener) {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let body = match path {
                    "/v1/stats" => r#"{"functions":[{"name":"hello","invocations":3}]}"#,
                    "/v1/sandboxes" => r#"{"sandboxes":[{"id":"hello-1"}],"hosts":[]}"#,
                    _ => "{}",
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    }

    #[tokio::test]
    async fn poller_reports_disconnected_then_recovers_on_the_same_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let (tx, mut rx) = mpsc::channel(16);
        let (_dtx, drx) = watch::channel(None);
        let task = tokio::spawn(poll(
            0,
            format!("http://{addr}"),
            Duration::from_millis(50),
            tx,
            drx,
        ));
        match rx.recv().await.unwrap() {
            Update::Conn {
                state: ConnState::Disconnected { attempt: 1, .. },
                ..
            } => {}
            other => panic!("expected disconnected, got {other:?}"),
        }
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let server = tokio::spawn(fake_agent(listener));
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Update::Data {
                    stats, sandboxes, ..
                } = rx.recv().await.unwrap()
                {
                    return (stats, sandboxes);
                }
            }
        })
        .await
        .expect("poller reconnects");
        assert_eq!(got.0.functions[0].name, "hello");
        assert_eq!(got.1.sandboxes[0].id, "hello-1");
        task.abort();
        server.abort();
    }
}
