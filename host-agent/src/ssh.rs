//! The SSH endpoint into live sandboxes (russh server).
//!
//! - Public-key authentication only, against an OpenSSH `authorized_keys` file that is
//!   re-read at every login (edits apply at once; a missing or bad file rejects logins
//!   and says why in the agent's log). No other method is advertised.
//! - A persistent Ed25519 host key, generated on first start.
//! - The SSH user names the target: a sandbox id, or a function name (a live sandbox of
//!   it, else one started for the session; the session says which on stderr).
//! - Each session channel becomes one [`ShellSession`]: `shell` (a login shell on a PTY
//!   when the client asked for one) or `exec` (one command; stdout, stderr and the exit
//!   status come back separately). pty-req, env, window-change and signal are honoured.

use crate::agent::Agent;
use crate::config::SshConfig;
use crate::link::ShellEvent;
use crate::shell::{Picked, PtyRequest, ShellRequest, ShellSession};
use russh::keys::ssh_key::{self, HashAlg, LineEnding};
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Handle, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet, Sig};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Where the endpoint listens and who it is (`/v1/ssh`).
#[derive(Debug, Clone, Serialize)]
pub struct SshInfo {
    /// Bound address.
    pub listen: SocketAddr,
    /// Host public key, OpenSSH one-line format (for known_hosts).
    pub host_key: String,
    /// Host key fingerprint (SHA256:...).
    pub host_key_fingerprint: String,
    /// The authorized_keys file consulted at each login.
    pub authorized_keys: PathBuf,
    /// Longest a session may stay open, s.
    pub max_session_s: u64,
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The host key could not be read or created.
    #[error("SSH host key {path}: {reason}")]
    HostKey {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen for SSH on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Read the host key at `path`, or create an Ed25519 one there (mode 0600) if missing.
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, SshError> {
    let err = |reason: String| SshError::HostKey {
        path: path.to_path_buf(),
        reason,
    };
    if path.exists() {
        return PrivateKey::read_openssh_file(path)
            .map_err(|e| err(format!("not a readable OpenSSH private key: {e}")));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| err(format!("reading /dev/urandom: {e}")))?;
    let key = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
    key.write_openssh_file(path, LineEnding::LF)
        .map_err(|e| err(format!("cannot write it: {e}")))?;
    Ok(key)
}

/// Whether `key` is in the authorized_keys file at `path`. Lines that do not parse are
/// skipped and listed (rather than failing every login). Lines with key options
/// (`from=`, `command=`, `no-pty`, ...) are skipped too: the endpoint cannot enforce them,
/// and ignoring a restriction would grant more than the file says.
pub fn authorized(path: &Path, key: &PublicKey) -> Result<(bool, Vec<String>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read authorized_keys {}: {e}", path.display()))?;
    let mut bad = Vec::new();
    let mut found = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        let at = format!("{}:{}", path.display(), i + 1);
        if first.parse::<ssh_key::Algorithm>().is_err() {
            bad.push(format!(
                "{at}: starts with `{first}`, not a key type; key options are not supported \
                 by this endpoint, so the line is skipped"
            ));
            continue;
        }
        match PublicKey::from_openssh(line) {
            Ok(k) => found |= k.key_data() == key.key_data(),
            Err(e) => bad.push(format!("{at}: {e}")),
        }
    }
    Ok((found, bad))
}

/// Bind the endpoint and serve it in the background. The agent's `/v1/ssh` shows where.
pub async fn start(agent: Arc<Agent>, cfg: &SshConfig) -> Result<SshInfo, SshError> {
    let key = load_or_create_host_key(&cfg.host_key)?;
    let public = key.public_key();
    let info = SshInfo {
        listen: cfg.listen,
        host_key: public.to_openssh().map_err(|e| SshError::HostKey {
            path: cfg.host_key.clone(),
            reason: e.to_string(),
        })?,
        host_key_fingerprint: public.fingerprint(HashAlg::Sha256).to_string(),
        authorized_keys: cfg.authorized_keys.clone(),
        max_session_s: cfg.max_session.as_secs(),
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| SshError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let info = SshInfo {
        listen: listener.local_addr().unwrap_or(cfg.listen),
        ..info
    };
    if !cfg.authorized_keys.exists() {
        tracing::warn!(
            "ssh: {} does not exist: every login will be refused until it does",
            cfg.authorized_keys.display()
        );
    }
    let config = Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard(
            format!("SSH-2.0-sandscope_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![key],
        auth_rejection_time: Duration::from_millis(250),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        nodelay: true,
        ..Default::default()
    });
    agent.set_ssh_info(info.clone());
    let keys = Arc::new(cfg.authorized_keys.clone());
    let weak = Arc::downgrade(&agent);
    drop(agent);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("ssh: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(agent) = weak.upgrade() else { break };
            let conn = Conn {
                agent,
                peer,
                keys: keys.clone(),
                who: String::new(),
                user: String::new(),
                channels: HashMap::new(),
            };
            let config = config.clone();
            tokio::spawn(async move {
                match russh::server::run_stream(config, stream, conn).await {
                    Ok(running) => {
                        if let Err(e) = running.await {
                            tracing::debug!(%peer, "ssh connection ended: {e}");
                        }
                    }
                    Err(e) => tracing::debug!(%peer, "ssh handshake failed: {e}"),
                }
            });
        }
    });
    Ok(info)
}

/// Client input for one channel's session task.
enum Input {
    Data(Vec<u8>),
    Eof,
    Resize(u32, u32),
    Signal(i32),
}

#[derive(Default)]
struct Chan {
    pty: Option<PtyRequest>,
    env: Vec<String>,
    input: Option<mpsc::UnboundedSender<Input>>,
}

/// One SSH connection.
struct Conn {
    agent: Arc<Agent>,
    peer: SocketAddr,
    keys: Arc<PathBuf>,
    who: String,
    user: String,
    channels: HashMap<ChannelId, Chan>,
}

impl Conn {
    fn check_key(&self, user: &str, key: &PublicKey) -> bool {
        let fp = key.fingerprint(HashAlg::Sha256);
        match authorized(&self.keys, key) {
            Ok((ok, bad)) => {
                for b in bad {
                    tracing::warn!("ssh: skipping unparsable authorized_keys line {b}");
                }
                if !ok {
                    tracing::info!(peer = %self.peer, %user, "ssh: key {fp} is not authorized");
                }
                ok
            }
            Err(e) => {
                tracing::warn!(peer = %self.peer, %user, "ssh: refusing key {fp}: {e}");
                false
            }
        }
    }

    fn send(&mut self, ch: ChannelId, input: Input) {
        if let Some(tx) = self.channels.get(&ch).and_then(|c| c.input.as_ref()) {
            let _ = tx.send(input);
        }
    }

    /// Start the session task of a channel (shell or exec).
    fn start(&mut self, ch: ChannelId, command: String, session: &mut Session) -> bool {
        let Some(c) = self.channels.get_mut(&ch) else {
            return false;
        };
        if c.input.is_some() {
            return false;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        c.input = Some(tx);
        let req = ShellRequest {
            command,
            pty: c.pty.clone(),
            env: std::mem::take(&mut c.env),
            who: self.who.clone(),
            peer: self.peer.to_string(),
        };
        tokio::spawn(run_channel(
            self.agent.clone(),
            self.user.clone(),
            req,
            session.handle(),
            ch,
            rx,
        ));
        true
    }
}

fn reply(session: &mut Session, ch: ChannelId, ok: bool) -> Result<(), russh::Error> {
    if ok {
        session.channel_success(ch)
    } else {
        session.channel_failure(ch)
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.check_key(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.check_key(user, key.public_key) {
            return Ok(Auth::reject());
        }
        self.who = key.public_key.fingerprint(HashAlg::Sha256).to_string();
        self.user = user.to_string();
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Requests arrive through the callbacks below; the channel object is not read.
        self.channels.insert(channel.id(), Chan::default());
        reply.accept().await;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        ch: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = match self.channels.get_mut(&ch) {
            Some(c) if c.input.is_none() => {
                c.pty = Some(PtyRequest {
                    term: term.to_string(),
                    cols,
                    rows,
                });
                true
            }
            _ => false,
        };
        reply(session, ch, ok)
    }

    async fn env_request(
        &mut self,
        ch: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && value.len() <= 4096
            && !value.contains('\0')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        let ok = match self.channels.get_mut(&ch) {
            Some(c) if valid && c.env.len() < 64 => {
                c.env.push(format!("{name}={value}"));
                true
            }
            _ => false,
        };
        reply(session, ch, ok)
    }

    async fn shell_request(
        &mut self,
        ch: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.start(ch, String::new(), session);
        reply(session, ch, ok)
    }

    async fn exec_request(
        &mut self,
        ch: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        let ok = !command.is_empty() && self.start(ch, command, session);
        reply(session, ch, ok)
    }

    async fn subsystem_request(
        &mut self,
        ch: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // No sftp/scp subsystems: sandboxes are for looking, `cat` covers reading.
        session.channel_failure(ch)
    }

    async fn data(
        &mut self,
        ch: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(ch, Input::Data(data.to_vec()));
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        ch: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(ch, Input::Eof);
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        ch: ChannelId,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(ch, Input::Resize(cols, rows));
        Ok(())
    }

    async fn signal(
        &mut self,
        ch: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(n) = sig_number(&signal) {
            self.send(ch, Input::Signal(n));
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        ch: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the input sender ends the session task, which hangs the session up.
        self.channels.remove(&ch);
        Ok(())
    }
}

const SIGNALS: &[(&str, i32)] = &[
    ("ABRT", libc::SIGABRT),
    ("ALRM", libc::SIGALRM),
    ("FPE", libc::SIGFPE),
    ("HUP", libc::SIGHUP),
    ("ILL", libc::SIGILL),
    ("INT", libc::SIGINT),
    ("KILL", libc::SIGKILL),
    ("PIPE", libc::SIGPIPE),
    ("QUIT", libc::SIGQUIT),
    ("SEGV", libc::SIGSEGV),
    ("TERM", libc::SIGTERM),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
];

fn sig_name(s: &Sig) -> &str {
    match s {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(c) => c,
    }
}

/// SSH signal name (RFC 4254 §6.10, without "SIG") → number.
fn sig_number(s: &Sig) -> Option<i32> {
    let name = sig_name(s);
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Signal number → SSH signal. On the wire a signal is its name, so `Custom` carries
/// the standard names as well as any other.
fn sig_of(n: i32) -> Sig {
    match SIGNALS.iter().find(|(_, v)| *v == n) {
        Some((name, _)) => Sig::Custom(name.to_string()),
        None => Sig::Custom(format!("SIG{n}")),
    }
}

/// A line for the client's stderr (CRLF on a terminal).
fn notice(pty: bool, text: &str) -> Vec<u8> {
    let nl = if pty { "\r\n" } else { "\n" };
    format!("sandscope: {text}{nl}").into_bytes()
}

/// Exit status for a session that did not exit by itself (could not start, sandbox
/// ended, lifetime reached): what OpenSSH's client uses for its own failures.
const PLATFORM_EXIT: u32 = 255;

/// One session channel: open the session, then pump both ways until it exits or the
/// client goes away (dropping the session hangs it up).
async fn run_channel(
    agent: Arc<Agent>,
    target: String,
    req: ShellRequest,
    handle: Handle,
    ch: ChannelId,
    mut input: mpsc::UnboundedReceiver<Input>,
) {
    let pty = req.pty.is_some();
    let finish = |status: u32| {
        let handle = &handle;
        async move {
            let _ = handle.exit_status_request(ch, status).await;
            let _ = handle.eof(ch).await;
            let _ = handle.close(ch).await;
        }
    };
    let mut s: ShellSession = match agent.open_shell(&target, req).await {
        Ok(s) => s,
        Err(e) => {
            let _ = handle
                .extended_data(ch, 1, notice(pty, &crate::agent::chain(&e)))
                .await;
            finish(PLATFORM_EXIT).await;
            return;
        }
    };
    match s.picked() {
        Picked::Named => {}
        how => {
            let how = if how == Picked::Started {
                "started for this session"
            } else {
                "live"
            };
            let text = format!(
                "attached to sandbox {} of function {} ({how})",
                s.sandbox_id(),
                s.function()
            );
            let _ = handle.extended_data(ch, 1, notice(pty, &text)).await;
        }
    }
    loop {
        tokio::select! {
            ev = s.next() => match ev {
                Some(ShellEvent::Stdout(d)) => {
                    if handle.data(ch, d).await.is_err() {
                        return;
                    }
                }
                Some(ShellEvent::Stderr(d)) => {
                    if handle.extended_data(ch, 1, d).await.is_err() {
                        return;
                    }
                }
                Some(ShellEvent::Exit { code, signal, error }) => {
                    if !error.is_empty() {
                        let _ = handle.extended_data(ch, 1, notice(pty, &error)).await;
                    }
                    if signal != 0 {
                        let _ = handle
                            .exit_signal_request(ch, sig_of(signal), false, String::new(), String::new())
                            .await;
                        let _ = handle.eof(ch).await;
                        let _ = handle.close(ch).await;
                    } else {
                        finish(u32::try_from(code).unwrap_or(PLATFORM_EXIT)).await;
                    }
                    return;
                }
                None => return,
            },
            inp = input.recv() => {
                let r = match inp {
                    Some(Input::Data(d)) => s.input(&d).await,
                    Some(Input::Eof) => s.input(&[]).await,
                    Some(Input::Resize(c, r)) => s.resize(c, r).await,
                    Some(Input::Signal(n)) => s.signal(n).await,
                    // The client closed the channel or the connection.
                    None => return,
                };
                // A failed send means the link is down; its Exit event follows.
                let _ = r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_both_ways() {
        assert_eq!(sig_number(&Sig::INT), Some(libc::SIGINT));
        assert_eq!(sig_number(&Sig::Custom("USR2".into())), Some(libc::SIGUSR2));
        assert_eq!(sig_number(&Sig::Custom("WINCH".into())), None);
        assert_eq!(sig_name(&sig_of(libc::SIGKILL)), "KILL");
        assert_eq!(sig_number(&sig_of(libc::SIGINT)), Some(libc::SIGINT));
        assert!(matches!(sig_of(libc::SIGUSR2), Sig::Custom(ref s) if s == "USR2"));
        assert!(matches!(sig_of(40), Sig::Custom(ref s) if s == "SIG40"));
    }

    #[test]
    fn host_key_is_created_once_then_reused_and_junk_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/ssh_host_ed25519_key");
        let a = load_or_create_host_key(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_host_key(&p).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        std::fs::write(&p, "not a key").unwrap();
        let e = load_or_create_host_key(&p).unwrap_err().to_string();
        assert!(
            e.contains("ssh_host_ed25519_key") && e.contains("OpenSSH"),
            "{e}"
        );
    }

    #[test]
    fn authorized_keys_match_by_key_and_skip_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create_host_key(&dir.path().join("k1")).unwrap();
        let k2 = load_or_create_host_key(&dir.path().join("k2")).unwrap();
        let f = dir.path().join("authorized_keys");
        std::fs::write(
            &f,
            format!(
                "# comment\n\nthis is junk\nno-pty {}\n{}\nssh-ed25519 !!!\n",
                k2.public_key().to_openssh().unwrap(),
                k1.public_key().to_openssh().unwrap()
            ),
        )
        .unwrap();
        let (ok, bad) = authorized(&f, k1.public_key()).unwrap();
        assert!(ok, "{bad:?}");
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].contains(":3: starts with `this`"), "{bad:?}");
        assert!(
            bad[1].contains(":4:") && bad[1].contains("options"),
            "{bad:?}"
        );
        assert!(bad[2].contains(":6:"), "{bad:?}");
        // k2 is only on a line with options: not authorized.
        assert!(!authorized(&f, k2.public_key()).unwrap().0);
        let e = authorized(&dir.path().join("missing"), k1.public_key()).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }
}
