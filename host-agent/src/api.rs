//! The agent's HTTP API: the Lambda Invoke API shape plus `/v1/...` JSON views.

use crate::agent::{chain, Agent, InvokeError, InvokeOptions, Status};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Duration;

/// Header telling whether an invocation started a new sandbox.
pub const HDR_COLDSTART: &str = "x-sandscope-coldstart";
/// Header naming the sandbox that ran the invocation.
pub const HDR_SANDBOX: &str = "x-sandscope-sandbox-id";

/// Build the router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        .route("/v1/functions", get(functions))
        .route("/v1/sandboxes", get(sandboxes))
        .route("/v1/sandboxes/{id}", get(sandbox))
        .route("/v1/stats", get(stats))
        .route("/v1/health", get(health))
        .route("/v1/alerts", get(alerts))
        .route("/v1/rules/reload", post(reload_rules))
        .route("/v1/sessions", get(sessions))
        .route("/v1/ssh", get(ssh))
        .layer(DefaultBodyLimit::max(wire::MAX_PAYLOAD))
        .with_state(agent)
}

/// Longest a client may take to send a request's head (request line and headers): a
/// client that trickles them (slowloris) is cut off instead of holding a connection and
/// its task for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve HTTP/1 on `listener` until `shutdown` resolves, then let open connections finish
/// their requests. Like `axum::serve`, plus [`HEADER_READ_TIMEOUT`].
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let app = router(agent);
    let (closing, _) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => {
                let tcp = match r {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of open files, most likely: wait for some to be freed.
                        tracing::warn!(error = %e, "accepting an API connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let mut closing = closing.subscribe();
                conns.spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades();
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = closing.wait_for(|c| *c) => conn.as_mut().graceful_shutdown(),
                    }
                    let _ = conn.await;
                });
            }
        }
    }
    closing.send_replace(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

fn service_error(status: StatusCode, kind: &str, message: String) -> Response {
    let mut r = (
        status,
        Json(serde_json::json!({"Type": "User", "message": message})),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(kind) {
        r.headers_mut().insert("x-amzn-errortype", v);
    }
    r
}

async fn invoke(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let hdr = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let opts = InvokeOptions {
        traceparent: hdr("traceparent"),
        log_tail: match hdr("x-amz-log-type").as_str() {
            "" | "None" => false,
            "Tail" => true,
            other => {
                return service_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValueException",
                    format!("unknown X-Amz-Log-Type `{other}` (None or Tail)"),
                )
            }
        },
    };
    match hdr("x-amz-invocation-type").as_str() {
        "" | "RequestResponse" => {}
        "Event" => {
            if !agent.config().functions.iter().any(|f| f.name == name) {
                return not_found(&name);
            }
            let a = agent.clone();
            let payload = body.to_vec();
            tokio::spawn(async move {
                if let Err(e) = a.invoke(&name, payload, opts).await {
                    tracing::warn!("async invocation of {name} failed: {e}");
                }
            });
            return StatusCode::ACCEPTED.into_response();
        }
        "DryRun" => return StatusCode::NO_CONTENT.into_response(),
        other => {
            return service_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                format!(
                    "unknown X-Amz-Invocation-Type `{other}` (RequestResponse, Event or DryRun)"
                ),
            )
        }
    }
    let res = agent.invoke(&name, body.to_vec(), opts).await;
    let inv = match res {
        Ok(inv) => inv,
        Err(InvokeError::NotFound(n)) => return not_found(&n),
        Err(e @ InvokeError::Throttled(_)) => {
            return service_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                e.to_string(),
            )
        }
        Err(e @ InvokeError::PayloadTooLarge { .. }) => {
            return service_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLargeException",
                e.to_string(),
            )
        }
        Err(e @ InvokeError::Platform(_)) => {
            return service_error(StatusCode::BAD_GATEWAY, "ServiceException", chain(&e))
        }
    };
    let mut resp = if inv.status == Status::Ok {
        (StatusCode::OK, inv.payload).into_response()
    } else if is_lambda_error_body(&inv.payload) {
        // A Lambda runtime's own error document goes out as the runtime posted it.
        let mut r = (StatusCode::OK, inv.payload).into_response();
        r.headers_mut().insert(
            "x-amz-function-error",
            HeaderValue::from_static("Unhandled"),
        );
        r
    } else {
        let body = serde_json::json!({
            "errorMessage": inv.error_message,
            "errorType": inv.error_type,
            "output": String::from_utf8_lossy(&inv.payload),
        });
        let mut r = (StatusCode::OK, Json(body)).into_response();
        r.headers_mut().insert(
            "x-amz-function-error",
            HeaderValue::from_static("Unhandled"),
        );
        r
    };
    let h = resp.headers_mut();
    h.insert(
        HDR_COLDSTART,
        HeaderValue::from_static(if inv.cold { "true" } else { "false" }),
    );
    if let Ok(v) = HeaderValue::from_str(&inv.sandbox_id) {
        h.insert(HDR_SANDBOX, v);
    }
    if let Ok(v) = HeaderValue::from_str(&inv.invoke_id) {
        h.insert("x-amzn-requestid", v);
    }
    h.insert(
        "x-amz-executed-version",
        HeaderValue::from_static("$LATEST"),
    );
    if let Some(tail) = &inv.log_tail {
        if let Ok(v) = HeaderValue::from_str(&crate::util::base64(tail.as_bytes())) {
            h.insert("x-amz-log-result", v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", inv.total_us as f64 / 1000.0)) {
        h.insert("x-sandscope-duration-ms", v);
    }
    if let Some(init) = inv.init_us {
        if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", init as f64 / 1000.0)) {
            h.insert("x-sandscope-init-duration-ms", v);
        }
    }
    resp
}

/// Whether a function-error payload is already a Lambda error document
/// (`{"errorMessage": ...}`), as a Lambda runtime posts it.
fn is_lambda_error_body(payload: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(payload)
        .map(|v| v.get("errorMessage").is_some())
        .unwrap_or(false)
}

fn not_found(name: &str) -> Response {
    service_error(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        format!("Function not found: {name}"),
    )
}

async fn functions(State(agent): State<Arc<Agent>>) -> Response {
    Json(serde_json::json!({ "functions": agent.functions_view() })).into_response()
}

async fn sandboxes(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.sandboxes_view()).into_response()
}

async fn sandbox(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Response {
    match agent.sandbox_detail(&id) {
        Some(d) => Json(d).into_response(),
        None => service_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("no live sandbox `{id}`"),
        ),
    }
}

async fn stats(State(agent): State<Arc<Agent>>) -> Response {
    let snap = agent.stats().await;
    let mut v = serde_json::to_value(&snap).unwrap_or_default();
    v["agent"] = agent.metrics().to_json();
    v["fds"] = serde_json::to_value(agent.fd_budget()).unwrap_or_default();
    Json(v).into_response()
}

async fn health(State(agent): State<Arc<Agent>>) -> Response {
    let (driver, why) = agent.driver();
    Json(serde_json::json!({"status": "ok", "driver": driver, "driver_reason": why}))
        .into_response()
}

async fn sessions(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.sessions_view()).into_response()
}

async fn ssh(State(agent): State<Arc<Agent>>) -> Response {
    match agent.ssh_info() {
        Some(i) => Json(i).into_response(),
        None => service_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "the SSH endpoint is off: start the agent with --ssh or an [ssh] table".into(),
        ),
    }
}

async fn alerts(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.alerts().view()).into_response()
}

/// Re-read the rules file; on error the old rules stay active and the error is returned.
async fn reload_rules(State(agent): State<Arc<Agent>>) -> Response {
    match agent.alerts().reload() {
        Ok(n) => Json(serde_json::json!({"ok": true, "rules": n})).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"ok": false, "error": chain(&e), "kept_old_rules": true})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_error_documents_are_recognised() {
        assert!(is_lambda_error_body(
            br#"{"errorMessage":"x","errorType":"E"}"#
        ));
        assert!(!is_lambda_error_body(b"plain output"));
        assert!(!is_lambda_error_body(br#"{"count":1}"#));
    }
}
