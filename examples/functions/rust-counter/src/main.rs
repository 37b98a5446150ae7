//! A Lambda function built with the official `lambda_runtime` crate. `COUNT` is global
//! state: it survives warm invocations of the same sandbox.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNT: AtomicU64 = AtomicU64::new(0);

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let (payload, ctx) = event.into_parts();
    let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    println!("invocation {n} of this sandbox ({})", ctx.request_id);
    if payload.get("fail").is_some() {
        return Err("asked to fail".into());
    }
    Ok(json!({
        "count": n,
        "event": payload,
        "function": std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_default(),
        "request_id": ctx.request_id,
    }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    println!("init: runtime starting");
    lambda_runtime::run(service_fn(handler)).await
}
