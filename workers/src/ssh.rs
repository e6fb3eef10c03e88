//! SSH to a team's servers, on russh: connect with a deadline, check the host key (trust on first
//! use), log in with a private key, then run fixed commands on exec channels and reach the
//! Docker Engine's Unix socket through a forwarded stream — several channels on one connection.
//!
//! Nothing a user typed is ever part of a command line run here: commands are constants of the
//! caller, and the Docker Engine is spoken to over its HTTP API, not through the `docker` CLI.
//! Every failure is an [`SshError`] whose message says what to do about it.

use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Where the Docker Engine listens on a server unless told otherwise.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// The most output kept from one command or one Docker API answer.
const MAX_OUTPUT: usize = 1 << 20;

/// Why talking to a server failed, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The host name did not resolve.
    #[error("the host {host} could not be resolved: check its name")]
    UnknownHost {
        /// The host as configured.
        host: String,
    },
    /// Nothing listens on the port (or a firewall rejects).
    #[error("connection refused by {address}: is sshd running there, and is that its port?")]
    ConnectionRefused {
        /// `host:port`.
        address: String,
    },
    /// No answer in time.
    #[error("no answer from {address} within {seconds} s ({during}): check the host, the port and any firewall")]
    Timeout {
        /// `host:port`.
        address: String,
        /// The deadline.
        seconds: u64,
        /// What was under way: `connecting`, `the SSH handshake`, …
        during: &'static str,
    },
    /// The connection failed otherwise.
    #[error("could not connect to {address}: {reason}")]
    Unreachable {
        /// `host:port`.
        address: String,
        /// The operating system's reason.
        reason: String,
    },
    /// The server presented another host key than the one recorded at first use.
    #[error(
        "the host key of {address} changed: expected {expected}, the server presented {presented}; \
         if the server was reinstalled, check the new key and update the server, otherwise someone may be \
         intercepting the connection"
    )]
    HostKeyChanged {
        /// `host:port`.
        address: String,
        /// The fingerprint recorded before.
        expected: String,
        /// The fingerprint seen now.
        presented: String,
    },
    /// The server refused the key.
    #[error(
        "authentication as {user} failed: the server did not accept the key {fingerprint}; \
         add its public half to ~{user}/.ssh/authorized_keys on the server"
    )]
    AuthenticationFailed {
        /// The login account.
        user: String,
        /// The key's fingerprint.
        fingerprint: String,
    },
    /// The stored private key did not parse (never quoted).
    #[error("the private key could not be read as an OpenSSH key")]
    BadKey,
    /// The Docker Engine's socket could not be reached through the connection.
    #[error(
        "the Docker Engine is not reachable at {socket} on {address}: install Docker and start it, \
         and make sure {user} may use its socket"
    )]
    DockerMissing {
        /// `host:port`.
        address: String,
        /// The login account.
        user: String,
        /// The socket path tried.
        socket: String,
    },
    /// The Docker Engine answered, but not as expected.
    #[error("the Docker Engine on {address} answered unexpectedly: {reason}")]
    DockerAnswer {
        /// `host:port`.
        address: String,
        /// What was wrong.
        reason: String,
    },
    /// The server would not open a stream to an address it should reach.
    #[error(
        "{address} could not reach {to} for Zpanel ({reason}): is the service running there, and does sshd \
         allow TCP forwarding (AllowTcpForwarding)?"
    )]
    Forward {
        /// `host:port` of the server.
        address: String,
        /// The address asked for, as seen from the server.
        to: String,
        /// The server's reason.
        reason: String,
    },
    /// A command could not be run or failed.
    #[error("`{command}` on {address} failed: {reason}")]
    Command {
        /// `host:port`.
        address: String,
        /// The fixed command.
        command: String,
        /// Its exit status or the channel's error.
        reason: String,
    },
    /// The SSH protocol failed (the server hung up, no common algorithm, …).
    #[error("the SSH session with {address} failed: {reason}")]
    Protocol {
        /// `host:port`.
        address: String,
        /// russh's reason.
        reason: String,
    },
}

impl SshError {
    /// Whether it happened before Zpanel was logged in. Such an error tells what is at the
    /// address — nothing, something that is not SSH, an SSH server that refuses the key — which
    /// is a port scanner's answer, so it is told in detail only about a server the team has
    /// logged in to before.
    #[must_use]
    pub fn before_login(&self) -> bool {
        matches!(
            self,
            Self::UnknownHost { .. }
                | Self::ConnectionRefused { .. }
                | Self::Timeout { .. }
                | Self::Unreachable { .. }
                | Self::HostKeyChanged { .. }
                | Self::AuthenticationFailed { .. }
                | Self::Forward { .. }
                | Self::Protocol { .. }
        )
    }
}

/// Where and as whom to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    /// Host name or IP address (validated by the domain).
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// Login account.
    pub user: String,
}

impl SshTarget {
    /// `host:port`, IPv6 literals bracketed.
    #[must_use]
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses a private key in OpenSSH (or PEM) form for logging in.
///
/// # Errors
/// [`SshError::BadKey`] when it does not parse; the error never quotes the key.
pub fn parse_private_key(pem: &str) -> Result<PrivateKey, SshError> {
    russh::keys::decode_secret_key(pem.trim(), None).map_err(|_| SshError::BadKey)
}

/// `SHA256:…` of a public key, as `ssh-keygen -l` prints it.
#[must_use]
pub fn fingerprint(key: &russh::keys::PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The russh client handler: checks the host key against the one expected, remembers what it saw.
struct HostKeyCheck {
    address: String,
    expected: Option<String>,
    seen: Arc<std::sync::Mutex<Option<String>>>,
}

/// The handler's error: russh's, or a host key that must not be accepted.
#[derive(Debug)]
enum CheckError {
    Ssh(russh::Error),
    HostKeyChanged(SshError),
}

impl From<russh::Error> for CheckError {
    fn from(e: russh::Error) -> Self {
        Self::Ssh(e)
    }
}

impl client::Handler for HostKeyCheck {
    type Error = CheckError;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let presented = fingerprint(&key.public_key());
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(presented.clone());
        }
        match &self.expected {
            // Trust on first use: no key recorded yet, so this one is, by the caller.
            None => Ok(true),
            Some(expected) if *expected == presented => Ok(true),
            Some(expected) => Err(CheckError::HostKeyChanged(SshError::HostKeyChanged {
                address: self.address.clone(),
                expected: expected.clone(),
                presented,
            })),
        }
    }
}

/// A logged-in SSH connection to a server; channels are opened on it as needed.
pub struct SshSession {
    target: SshTarget,
    handle: client::Handle<HostKeyCheck>,
    host_key_fingerprint: String,
    timeout: Duration,
    /// The jump host's session this one runs inside, kept open while this one is.
    via: Option<Arc<SshSession>>,
}

/// A jump host to go through, and the host key it must present (`None`: trust on first use).
#[derive(Clone, Copy, Debug)]
pub struct Jump<'a> {
    /// Where and as whom.
    pub target: &'a SshTarget,
    /// Its recorded host key, `SHA256:…`.
    pub expected_host_key: Option<&'a str>,
}

impl std::fmt::Debug for SshSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSession")
            .field("target", &self.target)
            .field("host_key_fingerprint", &self.host_key_fingerprint)
            .finish_non_exhaustive()
    }
}

/// What a command printed and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Standard output (at most 1 MiB).
    pub stdout: String,
    /// Standard error (at most 1 MiB).
    pub stderr: String,
    /// The exit status, if the server sent one.
    pub status: Option<u32>,
}

impl SshSession {
    /// Connects to `target`, checks its host key against `expected_host_key` (`SHA256:…`; `None`
    /// accepts the key presented, which the caller then records: trust on first use), and logs
    /// in with `key`. Connecting, the handshake and logging in each have `timeout`.
    ///
    /// # Errors
    /// An [`SshError`] naming what to fix: unknown host, refused, timeout, host key changed,
    /// authentication failed, or a protocol failure.
    pub async fn connect(
        target: &SshTarget,
        key: PrivateKey,
        expected_host_key: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, SshError> {
        let address = target.address();
        let timed_out =
            |during: &'static str| SshError::Timeout { address: address.clone(), seconds: timeout.as_secs(), during };
        let socket = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((target.host.as_str(), target.port)))
            .await
            .map_err(|_| timed_out("connecting"))?
            .map_err(|e| connect_error(target, &address, &e, timeout))?;
        let _ = socket.set_nodelay(true);
        Self::handshake(socket, target, key, expected_host_key, timeout, None).await
    }

    /// Connects to `target` through `jump` (a bastion, OpenSSH's `ProxyJump`): logs in there
    /// first, with the same key, checking its host key against `jump.expected_host_key`, then
    /// runs the SSH session with `target` inside a stream forwarded from there. Without
    /// `jump`, as [`Self::connect`].
    ///
    /// # Errors
    /// As [`Self::connect`], for either host; [`SshError::Forward`] when the jump host cannot
    /// reach the target.
    pub async fn connect_via(
        jump: Option<Jump<'_>>,
        target: &SshTarget,
        key: PrivateKey,
        expected_host_key: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, SshError> {
        let Some(jump) = jump else {
            return Self::connect(target, key, expected_host_key, timeout).await;
        };
        let bastion = Arc::new(Self::connect(jump.target, key.clone(), jump.expected_host_key, timeout).await?);
        let stream = bastion.open_tcp(&target.host, target.port).await?;
        Self::handshake(stream, target, key, expected_host_key, timeout, Some(bastion)).await
    }

    /// The SSH session over `stream`: handshake, host key check, login.
    async fn handshake<S>(
        stream: S,
        target: &SshTarget,
        key: PrivateKey,
        expected_host_key: Option<&str>,
        timeout: Duration,
        via: Option<Arc<SshSession>>,
    ) -> Result<Self, SshError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let address = target.address();
        let timed_out =
            |during: &'static str| SshError::Timeout { address: address.clone(), seconds: timeout.as_secs(), during };
        let config = client::Config {
            // A dead peer is noticed within a minute even while no channel is busy.
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            ..client::Config::default()
        };
        let seen = Arc::new(std::sync::Mutex::new(None));
        let check = HostKeyCheck {
            address: address.clone(),
            expected: expected_host_key.map(str::to_owned),
            seen: Arc::clone(&seen),
        };
        let mut handle = tokio::time::timeout(timeout, client::connect_stream(Arc::new(config), stream, check))
            .await
            .map_err(|_| timed_out("the SSH handshake"))?
            .map_err(|e| match e {
                CheckError::HostKeyChanged(changed) => changed,
                CheckError::Ssh(e) => protocol(&address, &e),
            })?;
        let host_key_fingerprint = seen.lock().ok().and_then(|s| s.clone()).ok_or_else(|| SshError::Protocol {
            address: address.clone(),
            reason: "no host key was presented".into(),
        })?;
        let key_fingerprint = fingerprint(key.public_key());
        let login = async {
            // RSA keys sign with the best hash the server lists (SHA-1 only if it lists no other;
            // SHA-512 if it lists nothing). Asking waits up to a second, so other keys do not ask.
            let hash = if key.algorithm().is_rsa() {
                match handle.best_supported_rsa_hash().await.map_err(|e| protocol(&address, &e))? {
                    Some(listed) => listed,
                    None => Some(HashAlg::Sha512),
                }
            } else {
                None
            };
            handle
                .authenticate_publickey(target.user.clone(), PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                .await
                .map_err(|e| protocol(&address, &e))
        };
        let outcome = tokio::time::timeout(timeout, login).await.map_err(|_| timed_out("logging in"))??;
        if !outcome.success() {
            return Err(SshError::AuthenticationFailed { user: target.user.clone(), fingerprint: key_fingerprint });
        }
        Ok(Self { target: target.clone(), handle, host_key_fingerprint, timeout, via })
    }

    /// The server's host key, `SHA256:…`.
    #[must_use]
    pub fn host_key_fingerprint(&self) -> &str {
        &self.host_key_fingerprint
    }

    /// The jump host's host key, when the session runs through one.
    #[must_use]
    pub fn jump_host_key_fingerprint(&self) -> Option<&str> {
        self.via.as_deref().map(Self::host_key_fingerprint)
    }

    /// Whether the connection is gone: this one's, or the jump host's it runs through.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed() || self.via.as_deref().is_some_and(Self::is_closed)
    }

    /// Runs `command` — a constant of the caller, never built from user input — on a channel of
    /// its own, and collects its output, within the session's timeout.
    ///
    /// # Errors
    /// When the channel cannot be opened, the command does not finish in time, or it exits
    /// with a status other than 0.
    pub async fn run(&self, command: &'static str) -> Result<Output, SshError> {
        let failed =
            |reason: String| SshError::Command { address: self.target.address(), command: command.to_owned(), reason };
        let running = async {
            let mut channel = self.handle.channel_open_session().await.map_err(|e| failed(e.to_string()))?;
            channel.exec(true, command).await.map_err(|e| failed(e.to_string()))?;
            let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), None);
            while let Some(message) = channel.wait().await {
                match message {
                    russh::ChannelMsg::Data { data } => append_capped(&mut stdout, &data),
                    russh::ChannelMsg::ExtendedData { data, ext: 1 } => append_capped(&mut stderr, &data),
                    russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    russh::ChannelMsg::Failure => return Err(failed("the server refused to run it".into())),
                    _ => {}
                }
            }
            Ok(Output {
                stdout: String::from_utf8_lossy(&stdout).into_owned(),
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
                status,
            })
        };
        let output = tokio::time::timeout(self.timeout, running)
            .await
            .map_err(|_| failed(format!("no answer within {} s", self.timeout.as_secs())))??;
        match output.status {
            Some(0) => Ok(output),
            Some(code) => Err(failed(format!("exit status {code}: {}", output.stderr.trim()))),
            None => Err(failed("it ended without an exit status".into())),
        }
    }

    /// The Docker Engine's version (`Version` of `GET /version`), asked through a stream
    /// forwarded to its Unix socket at `socket`.
    ///
    /// # Errors
    /// [`SshError::DockerMissing`] when the socket cannot be reached; [`SshError::DockerAnswer`]
    /// when the answer is not the engine's.
    pub async fn docker_version(&self, socket: &str) -> Result<String, SshError> {
        let address = self.target.address();
        let bad = |reason: String| SshError::DockerAnswer { address: address.clone(), reason };
        let asking = async {
            let mut stream = self.open_socket(socket).await?;
            // HTTP/1.0: the engine closes the stream after its answer, which is not chunked.
            stream
                .write_all(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n")
                .await
                .map_err(|e| bad(format!("sending the request: {e}")))?;
            let mut answer = Vec::new();
            (&mut stream)
                .take(MAX_OUTPUT as u64)
                .read_to_end(&mut answer)
                .await
                .map_err(|e| bad(format!("reading the answer: {e}")))?;
            Ok(answer)
        };
        let answer = tokio::time::timeout(self.timeout, asking)
            .await
            .map_err(|_| bad(format!("no answer within {} s", self.timeout.as_secs())))??;
        parse_version_answer(&answer).map_err(bad)
    }

    /// A stream to the Unix socket at `path` on the server (`direct-streamlocal`), opened
    /// within the session's timeout.
    ///
    /// # Errors
    /// [`SshError::DockerMissing`] when the server refuses it (no such socket, or not
    /// allowed); [`SshError::Protocol`] when the connection failed.
    pub async fn open_socket(&self, path: &str) -> Result<russh::ChannelStream<client::Msg>, SshError> {
        let address = self.target.address();
        let opening = self.handle.channel_open_direct_streamlocal(path);
        match tokio::time::timeout(self.timeout, opening).await {
            Ok(Ok(channel)) => Ok(channel.into_stream()),
            Ok(Err(russh::Error::ChannelOpenFailure(_))) => {
                Err(SshError::DockerMissing { address, user: self.target.user.clone(), socket: path.to_owned() })
            }
            Ok(Err(e)) => Err(protocol(&address, &e)),
            Err(_) => Err(SshError::Timeout { address, seconds: self.timeout.as_secs(), during: "opening a channel" }),
        }
    }

    /// A stream to `host:port` as seen from the server (`direct-tcpip`): its loopback
    /// services, such as Caddy's admin API or a container's published port.
    ///
    /// # Errors
    /// [`SshError::Forward`] when the server refuses it (nothing listens there, or
    /// forwarding is not allowed); [`SshError::Protocol`] when the connection failed.
    pub async fn open_tcp(&self, host: &str, port: u16) -> Result<russh::ChannelStream<client::Msg>, SshError> {
        let address = self.target.address();
        let opening = self.handle.channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0);
        match tokio::time::timeout(self.timeout, opening).await {
            Ok(Ok(channel)) => Ok(channel.into_stream()),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => Err(SshError::Forward {
                address,
                to: if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") },
                reason: format!("{reason:?}"),
            }),
            Ok(Err(e)) => Err(protocol(&address, &e)),
            Err(_) => Err(SshError::Timeout { address, seconds: self.timeout.as_secs(), during: "opening a channel" }),
        }
    }

    /// Says goodbye; the connection (and the jump host's, if only this one used it) closes.
    pub async fn close(self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
        if let Some(bastion) = self.via.and_then(Arc::into_inner) {
            Box::pin(bastion.close()).await;
        }
    }
}

fn append_capped(buffer: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_OUTPUT.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
}

fn connect_error(target: &SshTarget, address: &str, e: &std::io::Error, timeout: Duration) -> SshError {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => SshError::ConnectionRefused { address: address.to_owned() },
        std::io::ErrorKind::TimedOut => {
            SshError::Timeout { address: address.to_owned(), seconds: timeout.as_secs(), during: "connecting" }
        }
        // Resolution failures come back as `Other` with the resolver's words.
        _ if e.to_string().contains("failed to lookup address") => SshError::UnknownHost { host: target.host.clone() },
        _ => SshError::Unreachable { address: address.to_owned(), reason: e.to_string() },
    }
}

fn protocol(address: &str, e: &russh::Error) -> SshError {
    SshError::Protocol { address: address.to_owned(), reason: e.to_string() }
}

/// The `Version` of a raw HTTP answer to `GET /version`.
fn parse_version_answer(answer: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("not an HTTP answer")?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("GET /version answered {status}"));
    }
    let version: serde_json::Value = serde_json::from_str(body.trim()).map_err(|e| format!("GET /version: {e}"))?;
    version["Version"]
        .as_str()
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| "GET /version has no Version".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_version_is_read_from_its_answer() {
        let answer = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Version\":\"26.1.5\",\"ApiVersion\":\"1.45\"}\n";
        assert_eq!(parse_version_answer(answer), Ok("26.1.5".to_owned()));
        let refused = b"HTTP/1.0 404 Not Found\r\n\r\n{}";
        assert!(parse_version_answer(refused).is_err_and(|e| e.contains("404")));
        assert!(parse_version_answer(b"SSH-2.0-x").is_err());
    }

    #[test]
    fn an_ipv6_address_is_bracketed() {
        let target = SshTarget { host: "::1".into(), port: 22, user: "root".into() };
        assert_eq!(target.address(), "[::1]:22");
        assert_eq!(SshTarget { host: "example.com".into(), ..target }.address(), "example.com:22");
    }

    #[test]
    fn a_bad_key_is_refused_without_being_quoted() {
        let err = parse_private_key("-----BEGIN OPENSSH PRIVATE KEY-----\nsecretgarbage\n").expect_err("refused");
        assert!(!err.to_string().contains("secretgarbage"));
    }
}
