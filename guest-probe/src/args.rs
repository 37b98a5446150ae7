//! Command-line parsing, by hand (the probe stays small and starts fast).
//!
//! `guest-probe --sandbox-id ID (--fd N | --connect unix:PATH | --connect vsock:CID:PORT)
//! [--host-id HOSTID] [--handler-kind exec|persistent|lambda] --handler 'SHELL COMMAND'
//! [--init-timeout-ms MS] [--runtime-api ADDR] [--fork-init] [--root-dir DIR --code-dir DIR]
//! [--env KEY=VALUE]...`
//!
//! As a microVM's init (PID 1 with `/etc/sandscope/probe.args` in the initramfs) the
//! arguments come from that file, one per line, and the sandbox id from the kernel command
//! line (`sandscope.id=ID`): see [`vm_init_args`].

use std::path::PathBuf;
use std::time::Duration;

/// Default bound on the persistent runtime's start (until it prints `ready`).
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the Lambda Runtime API listens by default (inside the sandbox's net namespace).
pub const DEFAULT_RUNTIME_API: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9001),
);

/// Why a command line was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// An option that takes a value came last.
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// An option that is not known.
    #[error("unknown argument {0:?} (see guest-probe --help)")]
    Unknown(String),
    /// An option given twice.
    #[error("option {0} given more than once")]
    Repeated(String),
    /// A required option is absent.
    #[error("missing required option {0}")]
    Required(&'static str),
    /// A value could not be parsed.
    #[error("invalid value {value:?} for {option}: {reason}")]
    InvalidValue {
        /// The option.
        option: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Options that cannot be combined, or one that needs another.
    #[error("{0}")]
    Conflict(&'static str),
    /// `--help` was asked for (not an error for the user; main prints [`USAGE`]).
    #[error("help requested")]
    Help,
}

/// Usage text printed for `--help` and after an argument error.
pub const USAGE: &str = "usage: guest-probe --sandbox-id ID \
(--fd N | --connect unix:PATH | --connect vsock:CID:PORT) \
[--host-id HOSTID] [--handler-kind exec|persistent|lambda] --handler 'SHELL COMMAND' \
[--init-timeout-ms MS] [--runtime-api ADDR] [--fork-init] [--root-dir DIR --code-dir DIR] \
[--env KEY=VALUE]...\n\
As a microVM's init, the arguments come from /etc/sandscope/probe.args and the sandbox id \
from sandscope.id= on the kernel command line.";

/// Where the link to the agent comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An inherited, already-connected stream socket.
    Fd(i32),
    /// Connect to a Unix socket path.
    Unix(PathBuf),
    /// Connect over AF_VSOCK (microVMs; CID 2 is the host).
    Vsock {
        /// Context id (2 = host).
        cid: u32,
        /// Port.
        port: u32,
    },
}

pub use wire::HandlerKind;

/// Filesystem to build for a process sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    /// Empty directory that becomes `/` (a tmpfs is mounted on it).
    pub root_dir: PathBuf,
    /// Function code, bound read-only at `/var/task`.
    pub code_dir: PathBuf,
}

/// The validated command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Sandbox id (also the hostname when a root is built).
    pub sandbox_id: String,
    /// Link to the agent.
    pub endpoint: Endpoint,
    /// Host id handed over by the agent, echoed in Hello.
    pub host_id: String,
    /// Handler kind.
    pub handler_kind: HandlerKind,
    /// The shell command of the handler.
    pub handler: String,
    /// Bound on the persistent runtime's start.
    pub init_timeout: Duration,
    /// Listen address of the Lambda Runtime API (`lambda` handlers).
    pub runtime_api: std::net::SocketAddr,
    /// Fork once so the child is PID 1 of the (already unshared) pid namespace.
    pub fork_init: bool,
    /// Build and pivot into a sandbox root.
    pub root: Option<RootSpec>,
    /// Environment for handlers (set in the probe's own environment at start).
    pub env: Vec<(String, String)>,
}

/// Where a microVM image carries the probe's arguments.
pub const VM_ARGS_FILE: &str = "/etc/sandscope/probe.args";

/// A microVM init's command line: the arguments in `args_file` (one per line), then
/// `--sandbox-id ID` from `sandscope.id=ID` (and `--host-id H` from `sandscope.host=H`) on
/// the kernel command line, then `extra`
/// (what the kernel passed after `--`).
pub fn vm_init_args(args_file: &str, kernel_cmdline: &str) -> Vec<String> {
    let mut v: Vec<String> = args_file
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    for (param, option) in [
        ("sandscope.id=", "--sandbox-id"),
        ("sandscope.host=", "--host-id"),
    ] {
        if let Some(val) = kernel_cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(param))
        {
            v.push(option.into());
            v.push(val.to_string());
        }
    }
    v
}

impl Args {
    /// Parse the arguments after the program name.
    pub fn parse<I, S>(args: I) -> Result<Args, ArgsError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut it = args.into_iter().map(Into::into);
        let mut sandbox_id = None;
        let mut fd = None;
        let mut connect = None;
        let mut host_id = None;
        let mut kind = None;
        let mut handler = None;
        let mut init_timeout = None;
        let mut runtime_api = None;
        let mut fork_init = false;
        let mut root_dir = None;
        let mut code_dir = None;
        let mut env = Vec::new();

        fn set<T>(slot: &mut Option<T>, name: &str, v: T) -> Result<(), ArgsError> {
            if slot.is_some() {
                return Err(ArgsError::Repeated(name.to_string()));
            }
            *slot = Some(v);
            Ok(())
        }

        while let Some(arg) = it.next() {
            // Accept both `--opt value` and `--opt=value`.
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String, ArgsError> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => it
                        .next()
                        .ok_or_else(|| ArgsError::MissingValue(name.to_string())),
                }
            };
            match name.as_str() {
                "--sandbox-id" => set(&mut sandbox_id, &name, value(&name)?)?,
                "--fd" => {
                    let v = value(&name)?;
                    let n: i32 = v.parse().map_err(|_| ArgsError::InvalidValue {
                        option: "--fd",
                        value: v.clone(),
                        reason: "not a file descriptor number",
                    })?;
                    if n < 0 {
                        return Err(ArgsError::InvalidValue {
                            option: "--fd",
                            value: v,
                            reason: "must be >= 0",
                        });
                    }
                    set(&mut fd, &name, n)?
                }
                "--connect" => set(&mut connect, &name, parse_connect(&value(&name)?)?)?,
                "--host-id" => set(&mut host_id, &name, value(&name)?)?,
                "--handler-kind" => {
                    let v = value(&name)?;
                    let Some(k) = HandlerKind::parse(&v) else {
                        return Err(ArgsError::InvalidValue {
                            option: "--handler-kind",
                            value: v,
                            reason: "expected exec, persistent or lambda",
                        });
                    };
                    set(&mut kind, &name, k)?
                }
                "--handler" => set(&mut handler, &name, value(&name)?)?,
                "--init-timeout-ms" => {
                    let v = value(&name)?;
                    let ms: u64 = v.parse().map_err(|_| ArgsError::InvalidValue {
                        option: "--init-timeout-ms",
                        value: v.clone(),
                        reason: "not a number of milliseconds",
                    })?;
                    set(&mut init_timeout, &name, Duration::from_millis(ms))?
                }
                "--runtime-api" => {
                    let v = value(&name)?;
                    let a = v.parse().map_err(|_| ArgsError::InvalidValue {
                        option: "--runtime-api",
                        value: v.clone(),
                        reason: "expected IP:PORT",
                    })?;
                    set(&mut runtime_api, &name, a)?
                }
                "--fork-init" if inline.is_none() => {
                    if fork_init {
                        return Err(ArgsError::Repeated(name));
                    }
                    fork_init = true
                }
                "--root-dir" => set(&mut root_dir, &name, PathBuf::from(value(&name)?))?,
                "--code-dir" => set(&mut code_dir, &name, PathBuf::from(value(&name)?))?,
                "--env" => {
                    let v = value(&name)?;
                    match v.split_once('=') {
                        Some((k, val)) if !k.is_empty() => env.push((k.into(), val.into())),
                        _ => {
                            return Err(ArgsError::InvalidValue {
                                option: "--env",
                                value: v,
                                reason: "expected KEY=VALUE",
                            })
                        }
                    }
                }
                "--help" | "-h" => return Err(ArgsError::Help),
                _ => return Err(ArgsError::Unknown(arg)),
            }
        }

        let sandbox_id = sandbox_id.ok_or(ArgsError::Required("--sandbox-id"))?;
        if sandbox_id.is_empty() {
            return Err(ArgsError::InvalidValue {
                option: "--sandbox-id",
                value: sandbox_id,
                reason: "must not be empty",
            });
        }
        let endpoint = match (fd, connect) {
            (Some(n), None) => Endpoint::Fd(n),
            (None, Some(e)) => e,
            (Some(_), Some(_)) => {
                return Err(ArgsError::Conflict("give --fd or --connect, not both"))
            }
            (None, None) => return Err(ArgsError::Required("--fd or --connect")),
        };
        let handler = handler.ok_or(ArgsError::Required("--handler"))?;
        if handler.trim().is_empty() {
            return Err(ArgsError::InvalidValue {
                option: "--handler",
                value: handler,
                reason: "must not be empty",
            });
        }
        let root = match (root_dir, code_dir) {
            (Some(root_dir), Some(code_dir)) => Some(RootSpec { root_dir, code_dir }),
            (None, None) => None,
            _ => return Err(ArgsError::Conflict("--root-dir and --code-dir go together")),
        };
        Ok(Args {
            sandbox_id,
            endpoint,
            host_id: host_id.unwrap_or_default(),
            handler_kind: kind.unwrap_or(HandlerKind::Exec),
            handler,
            init_timeout: init_timeout.unwrap_or(DEFAULT_INIT_TIMEOUT),
            runtime_api: runtime_api.unwrap_or(DEFAULT_RUNTIME_API),
            fork_init,
            root,
            env,
        })
    }
}

fn parse_connect(v: &str) -> Result<Endpoint, ArgsError> {
    let bad = |reason| ArgsError::InvalidValue {
        option: "--connect",
        value: v.to_string(),
        reason,
    };
    if let Some(path) = v.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("empty socket path"));
        }
        return Ok(Endpoint::Unix(PathBuf::from(path)));
    }
    if let Some(rest) = v.strip_prefix("vsock:") {
        let (cid, port) = rest
            .split_once(':')
            .ok_or_else(|| bad("expected vsock:CID:PORT"))?;
        let cid = cid.parse().map_err(|_| bad("vsock CID is not a number"))?;
        let port = port
            .parse()
            .map_err(|_| bad("vsock port is not a number"))?;
        return Ok(Endpoint::Vsock { cid, port });
    }
    Err(bad("expected unix:PATH or vsock:CID:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[&str]) -> Result<Args, ArgsError> {
        Args::parse(s.iter().copied())
    }

    #[test]
    fn full_command_line() {
        let a = parse(&[
            "--sandbox-id",
            "sb-1",
            "--fd",
            "3",
            "--host-id",
            "h1",
            "--handler-kind",
            "persistent",
            "--handler",
            "python3 -u rt.py",
            "--fork-init",
            "--root-dir",
            "/run/sb/root",
            "--code-dir=/srv/code",
            "--init-timeout-ms",
            "500",
        ])
        .unwrap();
        assert_eq!(a.sandbox_id, "sb-1");
        assert_eq!(a.endpoint, Endpoint::Fd(3));
        assert_eq!(a.host_id, "h1");
        assert_eq!(a.handler_kind, HandlerKind::Persistent);
        assert_eq!(a.handler, "python3 -u rt.py");
        assert!(a.fork_init);
        assert_eq!(a.init_timeout, Duration::from_millis(500));
        let root = a.root.unwrap();
        assert_eq!(root.root_dir, PathBuf::from("/run/sb/root"));
        assert_eq!(root.code_dir, PathBuf::from("/srv/code"));
    }

    #[test]
    fn defaults() {
        let a = parse(&[
            "--sandbox-id",
            "x",
            "--connect",
            "unix:/tmp/s",
            "--handler",
            "cat",
        ])
        .unwrap();
        assert_eq!(a.endpoint, Endpoint::Unix("/tmp/s".into()));
        assert_eq!(a.handler_kind, HandlerKind::Exec);
        assert_eq!(a.host_id, "");
        assert!(!a.fork_init);
        assert_eq!(a.root, None);
        assert_eq!(a.init_timeout, DEFAULT_INIT_TIMEOUT);
    }

    #[test]
    fn env_and_vm_init_args() {
        let v = vm_init_args(
            "--connect\nvsock:2:52\n--handler\n./handler.sh --flag\n--env\nA=b=c\n",
            "console=ttyS0 quiet sandscope.id=sb-7 sandscope.host=h1 tsc_early_khz=2000",
        );
        let a = Args::parse(v).unwrap();
        assert_eq!(a.sandbox_id, "sb-7");
        assert_eq!(a.host_id, "h1");
        assert_eq!(a.endpoint, Endpoint::Vsock { cid: 2, port: 52 });
        assert_eq!(a.handler, "./handler.sh --flag");
        assert_eq!(a.env, vec![("A".to_string(), "b=c".to_string())]);
        // No id on the command line: the parser says what is missing.
        let v = vm_init_args("--connect\nvsock:2:52\n--handler\nx\n", "quiet");
        assert_eq!(Args::parse(v), Err(ArgsError::Required("--sandbox-id")));
        let e = Args::parse([
            "--sandbox-id",
            "s",
            "--fd",
            "3",
            "--handler",
            "x",
            "--env",
            "NOEQ",
        ]);
        assert!(
            matches!(
                e,
                Err(ArgsError::InvalidValue {
                    option: "--env",
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn vsock_endpoint_parses() {
        let a = parse(&[
            "--sandbox-id",
            "x",
            "--connect",
            "vsock:2:52",
            "--handler",
            "cat",
        ])
        .unwrap();
        assert_eq!(a.endpoint, Endpoint::Vsock { cid: 2, port: 52 });
    }

    #[test]
    fn bad_command_lines() {
        use ArgsError::*;
        let cases: &[(&[&str], ArgsError)] = &[
            (&["--fd", "3", "--handler", "cat"], Required("--sandbox-id")),
            (
                &["--sandbox-id", "x", "--handler", "cat"],
                Required("--fd or --connect"),
            ),
            (&["--sandbox-id", "x", "--fd", "3"], Required("--handler")),
            (&["--sandbox-id", "x", "--fd"], MissingValue("--fd".into())),
            (&["--sandbox-id", "x", "--bogus"], Unknown("--bogus".into())),
            (
                &["--sandbox-id", "x", "--sandbox-id", "y"],
                Repeated("--sandbox-id".into()),
            ),
            (
                &[
                    "--sandbox-id",
                    "x",
                    "--fd",
                    "3",
                    "--connect",
                    "unix:/s",
                    "--handler",
                    "c",
                ],
                Conflict("give --fd or --connect, not both"),
            ),
            (
                &[
                    "--sandbox-id",
                    "x",
                    "--fd",
                    "3",
                    "--handler",
                    "c",
                    "--root-dir",
                    "/r",
                ],
                Conflict("--root-dir and --code-dir go together"),
            ),
            (&["--help"], Help),
        ];
        for (argv, want) in cases {
            assert_eq!(&parse(argv).unwrap_err(), want, "argv {argv:?}");
        }
        for argv in [
            &["--sandbox-id", "x", "--fd", "three", "--handler", "c"][..],
            &["--sandbox-id", "x", "--fd", "-1", "--handler", "c"],
            &[
                "--sandbox-id",
                "x",
                "--connect",
                "tcp:1.2.3.4",
                "--handler",
                "c",
            ],
            &[
                "--sandbox-id",
                "x",
                "--connect",
                "vsock:2",
                "--handler",
                "c",
            ],
            &[
                "--sandbox-id",
                "x",
                "--fd",
                "3",
                "--handler",
                "c",
                "--handler-kind",
                "wasm",
            ],
            &[
                "--sandbox-id",
                "x",
                "--fd",
                "3",
                "--handler",
                "c",
                "--init-timeout-ms",
                "1s",
            ],
            &["--sandbox-id", "", "--fd", "3", "--handler", "c"],
            &["--sandbox-id", "x", "--fd", "3", "--handler", "  "],
        ] {
            let e = parse(argv).unwrap_err();
            assert!(matches!(e, InvalidValue { .. }), "argv {argv:?} gave {e:?}");
            assert!(e.to_string().contains("invalid value"), "{e}");
        }
    }

    #[test]
    fn lambda_kind_and_runtime_api() {
        let a = parse(&["--sandbox-id", "x", "--fd", "3", "--handler", "c"]).unwrap();
        assert_eq!(a.runtime_api, DEFAULT_RUNTIME_API);
        assert_eq!(a.runtime_api.to_string(), "127.0.0.1:9001");
        let a = parse(&[
            "--sandbox-id",
            "x",
            "--fd",
            "3",
            "--handler",
            "c",
            "--handler-kind",
            "lambda",
            "--runtime-api",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(a.handler_kind, HandlerKind::Lambda);
        assert_eq!(a.runtime_api.port(), 0);
        let e = parse(&[
            "--sandbox-id",
            "x",
            "--fd",
            "3",
            "--handler",
            "c",
            "--runtime-api",
            "localhost",
        ])
        .unwrap_err();
        assert!(matches!(e, ArgsError::InvalidValue { .. }), "{e:?}");
    }
}
