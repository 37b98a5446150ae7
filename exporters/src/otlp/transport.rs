//! Sending one encoded request: OTLP/HTTP (protobuf bodies, via reqwest) or OTLP/gRPC
//! (cleartext HTTP/2 with prior knowledge, via hyper's HTTP/2 client; one connection,
//! reused across requests and re-made when it breaks). Both compress with gzip when asked
//! and classify the answer as delivered, worth retrying, or refused for good.

use super::{Compression, OtlpConfig, OtlpError, Protocol, Signal};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use std::io::Write;
use std::time::Duration;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The backend accepted the request.
    Delivered,
    /// A failure that may go away (connection, timeout, overload): retry or spool.
    Retry(String),
    /// The backend refused the data: drop it, never retry or spool.
    Reject(String),
}

/// HTTP statuses worth retrying: 429 and every 5xx.
pub(crate) fn http_retryable(status: u16) -> bool {
    status == 429 || (500..600).contains(&status)
}

/// An HTTP status as an [`Outcome`]: 2xx delivered, 429/5xx retry, anything else refused.
pub(crate) fn classify_http(status: u16) -> Outcome {
    if (200..300).contains(&status) {
        Outcome::Delivered
    } else if http_retryable(status) {
        Outcome::Retry(format!("HTTP {status}"))
    } else {
        Outcome::Reject(format!("HTTP {status}"))
    }
}

/// gRPC status codes worth retrying (the OTLP specification's list): CANCELLED,
/// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS.
pub(crate) fn grpc_retryable(code: u32) -> bool {
    matches!(code, 1 | 4 | 8 | 10 | 11 | 14 | 15)
}

/// A `grpc-status` (with its `grpc-message`) as an [`Outcome`].
pub(crate) fn classify_grpc(code: u32, message: &str) -> Outcome {
    let why = || {
        if message.is_empty() {
            format!("gRPC status {code}")
        } else {
            format!("gRPC status {code}: {message}")
        }
    };
    if code == 0 {
        Outcome::Delivered
    } else if grpc_retryable(code) {
        Outcome::Retry(why())
    } else {
        Outcome::Reject(why())
    }
}

/// gzip `body`.
pub(crate) fn gzip(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = e.write_all(body);
    e.finish().unwrap_or_default()
}

/// One length-prefixed gRPC message: a compressed-flag byte, the length as u32 big-endian,
/// the message.
pub(crate) fn grpc_frame(msg: &[u8], compressed: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + msg.len());
    f.push(u8::from(compressed));
    // Requests are bounded far below 4 GiB by the batch size.
    f.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    f.extend_from_slice(msg);
    f
}

/// `grpc-timeout` in milliseconds (at most 8 digits, as the protocol requires).
pub(crate) fn grpc_timeout(d: Duration) -> String {
    format!("{}m", d.as_millis().clamp(1, 99_999_999))
}

/// Decode a percent-encoded `grpc-message`; bad escapes are kept as they are.
pub(crate) fn grpc_message(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            let hex = std::str::from_utf8(&raw[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(b) = hex {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Sends request bodies of one signal.
#[derive(Debug)]
pub(crate) enum Transport {
    /// OTLP/HTTP.
    Http(HttpTransport),
    /// OTLP/gRPC.
    Grpc(GrpcTransport),
}

impl Transport {
    /// A transport for `signal` as `cfg` says (`cfg` already validated).
    pub(crate) fn new(cfg: &OtlpConfig, signal: Signal) -> Result<Self, OtlpError> {
        let gzip = cfg.compression == Compression::Gzip;
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|_| OtlpError::Header(k.clone()))?;
            let value = HeaderValue::from_str(v).map_err(|_| OtlpError::Header(k.clone()))?;
            headers.append(name, value);
        }
        match cfg.protocol {
            Protocol::Http => {
                let mut b = reqwest::Client::builder();
                if let Some(ca) = &cfg.ca_file {
                    let pem =
                        std::fs::read(ca).map_err(|e| OtlpError::Ca(ca.clone(), e.to_string()))?;
                    let certs = reqwest::Certificate::from_pem_bundle(&pem)
                        .map_err(|e| OtlpError::Ca(ca.clone(), e.to_string()))?;
                    for c in certs {
                        b = b.add_root_certificate(c);
                    }
                }
                let client = b.build().map_err(OtlpError::Client)?;
                headers.insert(
                    hyper::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-protobuf"),
                );
                if gzip {
                    headers.insert(
                        hyper::header::CONTENT_ENCODING,
                        HeaderValue::from_static("gzip"),
                    );
                }
                Ok(Transport::Http(HttpTransport {
                    client,
                    url: cfg.url(signal),
                    headers,
                    gzip,
                    timeout: cfg.timeout,
                }))
            }
            Protocol::Grpc => {
                let url = cfg.url(signal);
                let uri: hyper::Uri = url
                    .parse()
                    .map_err(|e| OtlpError::Endpoint(cfg.endpoint.clone(), format!("{e}")))?;
                let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
                let has_port = authority
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| !p.ends_with(']'));
                let addr = if has_port {
                    authority.to_string()
                } else {
                    format!("{authority}:80")
                };
                headers.insert(
                    hyper::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                headers.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
                if let Ok(v) = HeaderValue::from_str(&grpc_timeout(cfg.timeout)) {
                    headers.insert("grpc-timeout", v);
                }
                if gzip {
                    headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
                }
                Ok(Transport::Grpc(GrpcTransport {
                    addr,
                    uri,
                    headers,
                    gzip,
                    timeout: cfg.timeout,
                    conn: None,
                }))
            }
        }
    }

    /// Send one (uncompressed) request body, once.
    pub(crate) async fn export(&mut self, body: &[u8]) -> Outcome {
        match self {
            Transport::Http(t) => t.export(body).await,
            Transport::Grpc(t) => t.export(body).await,
        }
    }
}

/// OTLP/HTTP: `POST {endpoint}/v1/{signal}`.
#[derive(Debug)]
pub(crate) struct HttpTransport {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    gzip: bool,
    timeout: Duration,
}

impl HttpTransport {
    async fn export(&mut self, body: &[u8]) -> Outcome {
        let body = if self.gzip { gzip(body) } else { body.to_vec() };
        let req = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .timeout(self.timeout)
            .body(body);
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                // Read the (small) answer so the connection can be reused.
                let _ = r.bytes().await;
                classify_http(status)
            }
            Err(e) if e.is_builder() => Outcome::Reject(chain(&e)),
            Err(e) => Outcome::Retry(chain(&e)),
        }
    }
}

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// OTLP/gRPC over one HTTP/2 connection.
pub(crate) struct GrpcTransport {
    /// `host:port` to connect to.
    addr: String,
    /// `http://host:port/{service}/Export`.
    uri: hyper::Uri,
    /// Everything but the body: user metadata, content-type, te, grpc-timeout,
    /// grpc-encoding.
    headers: HeaderMap,
    gzip: bool,
    timeout: Duration,
    conn: Option<Sender>,
}

impl std::fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransport")
            .field("addr", &self.addr)
            .field("uri", &self.uri)
            .field("gzip", &self.gzip)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl GrpcTransport {
    async fn export(&mut self, body: &[u8]) -> Outcome {
        let frame = if self.gzip {
            grpc_frame(&gzip(body), true)
        } else {
            grpc_frame(body, false)
        };
        match tokio::time::timeout(self.timeout, self.call(Bytes::from(frame))).await {
            Ok(o) => o,
            Err(_) => {
                // A backend that hangs: start over on a fresh connection next time.
                self.conn = None;
                Outcome::Retry(format!("timed out after {:?}", self.timeout))
            }
        }
    }

    async fn connect(&self) -> Result<Sender, String> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect to {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .map_err(|e| format!("HTTP/2 handshake with {}: {}", self.addr, chain(&e)))?;
        // The connection task ends when the peer goes away or every sender is dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn call(&mut self, frame: Bytes) -> Outcome {
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => match self.connect().await {
                Ok(s) => s,
                Err(e) => return Outcome::Retry(e),
            },
        };
        if let Err(e) = sender.ready().await {
            return Outcome::Retry(chain(&e));
        }
        let mut req = hyper::Request::new(Full::new(frame));
        *req.method_mut() = hyper::Method::POST;
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            // The connection (or this stream) broke: reconnect next time.
            Err(e) => return Outcome::Retry(chain(&e)),
        };
        self.conn = Some(sender);
        let (parts, body) = resp.into_parts();
        let collected = match body.collect().await {
            Ok(c) => c,
            Err(e) => {
                self.conn = None;
                return Outcome::Retry(chain(&e));
            }
        };
        if parts.status != hyper::StatusCode::OK {
            return classify_http(parts.status.as_u16());
        }
        // Trailers normally; the response headers for a trailers-only answer.
        let from = |h: &HeaderMap| {
            let code = h.get("grpc-status")?;
            let code = std::str::from_utf8(code.as_bytes())
                .ok()?
                .trim()
                .parse()
                .ok();
            let msg = h
                .get("grpc-message")
                .map(|m| grpc_message(m.as_bytes()))
                .unwrap_or_default();
            Some((code, msg))
        };
        let status = collected
            .trailers()
            .and_then(from)
            .or_else(|| from(&parts.headers));
        match status {
            Some((Some(code), msg)) => classify_grpc(code, &msg),
            Some((None, _)) => Outcome::Retry("unparsable grpc-status".into()),
            None => Outcome::Retry("answer without grpc-status".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[test]
    fn retry_classification_follows_the_otlp_specification() {
        for (status, want) in [
            (200, "ok"),
            (204, "ok"),
            (400, "reject"),
            (401, "reject"),
            (404, "reject"),
            (413, "reject"),
            (429, "retry"),
            (500, "retry"),
            (502, "retry"),
            (503, "retry"),
            (504, "retry"),
            (301, "reject"),
        ] {
            let got = match classify_http(status) {
                Outcome::Delivered => "ok",
                Outcome::Retry(_) => "retry",
                Outcome::Reject(_) => "reject",
            };
            assert_eq!(got, want, "HTTP {status}");
        }
        let retry: Vec<u32> = (0..=16).filter(|c| grpc_retryable(*c)).collect();
        assert_eq!(retry, [1, 4, 8, 10, 11, 14, 15]);
        assert_eq!(classify_grpc(0, ""), Outcome::Delivered);
        assert_eq!(
            classify_grpc(14, "down"),
            Outcome::Retry("gRPC status 14: down".into())
        );
        assert_eq!(
            classify_grpc(3, ""),
            Outcome::Reject("gRPC status 3".into())
        );
        assert!(matches!(classify_grpc(16, ""), Outcome::Reject(_)));
    }

    #[test]
    fn grpc_messages_are_length_prefixed_with_a_compression_flag() {
        assert_eq!(grpc_frame(b"abc", false), [0, 0, 0, 0, 3, b'a', b'b', b'c']);
        let big = vec![7u8; 70_000];
        let f = grpc_frame(&big, true);
        assert_eq!(&f[..5], &[1, 0, 1, 0x11, 0x70]);
        assert_eq!(&f[5..], &big[..]);
        assert_eq!(grpc_timeout(Duration::from_secs(10)), "10000m");
        assert_eq!(grpc_timeout(Duration::from_secs(10_000_000)), "99999999m");
        assert_eq!(grpc_timeout(Duration::ZERO), "1m");
        assert_eq!(grpc_message(b"no%20such%2Fthing%zz%"), "no such/thing%zz%");
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gzip(b"hello hello hello")[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"hello hello hello");
    }

    /// How the fake gRPC server answers.
    #[derive(Clone, Copy, Debug)]
    enum Reply {
        /// HTTP 200, data frame, `grpc-status` in trailers.
        Trailers(u32),
        /// HTTP 200 ending with the headers, which carry `grpc-status`.
        TrailersOnly(u32),
        /// HTTP 200 without any status.
        NoStatus,
        /// A plain HTTP status.
        Http(u16),
    }

    struct Got {
        path: String,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    struct Server {
        port: u16,
        reply: Arc<Mutex<Reply>>,
        got: Arc<Mutex<Vec<Got>>>,
        conns: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn server(port: u16, reply: Reply) -> Server {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = l.local_addr().unwrap().port();
        let reply = Arc::new(Mutex::new(reply));
        let got = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let (r2, g2, c2) = (reply.clone(), got.clone(), conns.clone());
        let task = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            while let Ok((s, _)) = l.accept().await {
                c2.fetch_add(1, Ordering::SeqCst);
                let (r3, g3) = (r2.clone(), g2.clone());
                tasks.spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(s).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let (r3, g3) = (r3.clone(), g3.clone());
                        tokio::spawn(async move {
                            let (parts, mut body) = req.into_parts();
                            let mut data = Vec::new();
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                data.extend_from_slice(&chunk);
                            }
                            g3.lock().unwrap().push(Got {
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body: data,
                            });
                            let reply = *r3.lock().unwrap();
                            let mut resp = hyper::Response::builder()
                                .header("content-type", "application/grpc");
                            match reply {
                                Reply::Trailers(code) => {
                                    let mut send = respond
                                        .send_response(resp.body(()).unwrap(), false)
                                        .unwrap();
                                    // An empty ExportLogsServiceResponse.
                                    send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false)
                                        .unwrap();
                                    let mut t = HeaderMap::new();
                                    t.insert("grpc-status", code.to_string().parse().unwrap());
                                    t.insert("grpc-message", "a%20reason".parse().unwrap());
                                    send.send_trailers(t).unwrap();
                                }
                                Reply::TrailersOnly(code) => {
                                    resp = resp.header("grpc-status", code.to_string());
                                    respond.send_response(resp.body(()).unwrap(), true).unwrap();
                                }
                                Reply::NoStatus => {
                                    respond.send_response(resp.body(()).unwrap(), true).unwrap();
                                }
                                Reply::Http(s) => {
                                    let resp =
                                        hyper::Response::builder().status(s).body(()).unwrap();
                                    respond.send_response(resp, true).unwrap();
                                }
                            }
                        });
                    }
                });
            }
        });
        Server {
            port,
            reply,
            got,
            conns,
            task,
        }
    }

    fn grpc(port: u16, gzip: bool) -> Transport {
        let mut c = OtlpConfig::new(&format!("http://127.0.0.1:{port}/ignored/path"));
        c.protocol = Protocol::Grpc;
        c.timeout = Duration::from_secs(2);
        c.headers.push(("X-Api-Key".into(), "secret".into()));
        if gzip {
            c.compression = Compression::Gzip;
        }
        Transport::new(&c, Signal::Logs).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_requests_carry_the_framed_message_and_metadata_over_one_connection() {
        let s = server(0, Reply::Trailers(0)).await;
        for gzip in [false, true] {
            let mut t = grpc(s.port, gzip);
            assert_eq!(t.export(b"request-body").await, Outcome::Delivered);
            assert_eq!(t.export(b"second").await, Outcome::Delivered);
        }
        assert_eq!(
            s.conns.load(Ordering::SeqCst),
            2,
            "one connection per transport"
        );
        let got = s.got.lock().unwrap();
        assert_eq!(got.len(), 4);
        for (i, g) in got.iter().enumerate() {
            assert_eq!(
                g.path,
                "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
            );
            let h = |k: &str| g.headers.get(k).map(|v| v.to_str().unwrap().to_string());
            assert_eq!(h("content-type").as_deref(), Some("application/grpc"));
            assert_eq!(h("te").as_deref(), Some("trailers"));
            assert_eq!(h("grpc-timeout").as_deref(), Some("2000m"));
            assert_eq!(h("x-api-key").as_deref(), Some("secret"));
            let gz = i >= 2;
            assert_eq!(h("grpc-encoding").as_deref(), gz.then_some("gzip"));
            assert_eq!(g.body[0], u8::from(gz));
            let len = u32::from_be_bytes(g.body[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, g.body.len() - 5);
            let mut msg = g.body[5..].to_vec();
            if gz {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&msg[..])
                    .read_to_end(&mut out)
                    .unwrap();
                msg = out;
            }
            let want: &[u8] = if i % 2 == 0 {
                b"request-body"
            } else {
                b"second"
            };
            assert_eq!(msg, want);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_status_is_read_from_trailers_or_headers_and_classified() {
        let s = server(0, Reply::Trailers(0)).await;
        let mut t = grpc(s.port, false);
        for (reply, want) in [
            (Reply::Trailers(0), "ok"),
            (Reply::Trailers(14), "retry"),
            (Reply::Trailers(3), "reject"),
            (Reply::TrailersOnly(8), "retry"),
            (Reply::TrailersOnly(7), "reject"),
            (Reply::TrailersOnly(0), "ok"),
            (Reply::NoStatus, "retry"),
            (Reply::Http(503), "retry"),
            (Reply::Http(404), "reject"),
        ] {
            *s.reply.lock().unwrap() = reply;
            let out = t.export(b"x").await;
            let got = match &out {
                Outcome::Delivered => "ok",
                Outcome::Retry(_) => "retry",
                Outcome::Reject(_) => "reject",
            };
            assert_eq!(got, want, "{reply:?}: {out:?}");
        }
        *s.reply.lock().unwrap() = Reply::Trailers(3);
        assert_eq!(
            t.export(b"x").await,
            Outcome::Reject("gRPC status 3: a reason".into())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_grpc_transport_reconnects_after_the_server_comes_back() {
        let s = server(0, Reply::Trailers(0)).await;
        let port = s.port;
        let mut t = grpc(port, false);
        assert_eq!(t.export(b"x").await, Outcome::Delivered);
        s.task.abort();
        let _ = s.task.await;
        // Connections die with the server's task set.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(t.export(b"x").await, Outcome::Retry(_)));
        let s2 = server(port, Reply::Trailers(0)).await;
        assert_eq!(t.export(b"y").await, Outcome::Delivered);
        assert_eq!(s2.conns.load(Ordering::SeqCst), 1);
        assert_eq!(s2.got.lock().unwrap()[0].body[5..], *b"y");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_grpc_server_times_out_as_retryable() {
        // Accepts TCP and never speaks HTTP/2.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let mut c = OtlpConfig::new(&format!("http://127.0.0.1:{port}"));
        c.protocol = Protocol::Grpc;
        c.timeout = Duration::from_millis(300);
        let mut t = Transport::new(&c, Signal::Logs).unwrap();
        let t0 = std::time::Instant::now();
        assert!(matches!(t.export(b"x").await, Outcome::Retry(m) if m.contains("timed out")));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
