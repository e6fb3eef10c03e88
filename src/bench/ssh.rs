//! `bench ssh`: the latency of one Docker API call (`GET /version`) through a server's pooled
//! SSH connection, beside the same call on the local socket, one SSH round trip (a channel
//! opened and confirmed), and a fresh `ssh host docker version`, all in the same run.
//!
//! The server is an `sshd` this benchmark starts on a loopback port with keys of its own
//! (OpenSSH must be installed), reaching this machine's Docker Engine.

use anyhow::Context as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::process::Command;
use zpanel_workers::docker::Engine;
use zpanel_workers::remote::{Dial, Link};
use zpanel_workers::ssh::{DOCKER_SOCKET, SshSession, SshTarget};

use super::{ms, percentiles};

const TIMEOUT: Duration = Duration::from_secs(10);

/// An `sshd` on a free loopback port letting in one key, stopped (and its files removed) on
/// [`Sshd::stop`].
struct Sshd {
    dir: PathBuf,
    port: u16,
    child: tokio::process::Child,
}

impl Sshd {
    async fn start(dir: PathBuf) -> anyhow::Result<Self> {
        tokio::fs::create_dir_all(&dir).await.context("creating the scratch directory")?;
        for key in ["host", "client"] {
            let made = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .status()
                .await
                .context("running ssh-keygen (openssh-client)")?;
            anyhow::ensure!(made.success(), "ssh-keygen failed");
        }
        tokio::fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nStrictModes no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nUsePAM no\n",
            dir.join("host").display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display(),
        );
        tokio::fs::write(dir.join("sshd_config"), config).await?;
        // Privilege separation needs this folder (Debian makes it at boot, under systemd).
        let _ = tokio::fs::create_dir_all("/run/sshd").await;
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting /usr/sbin/sshd (openssh-server)")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "sshd did not listen on 127.0.0.1:{port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { dir, port, child })
    }

    fn key(&self) -> PathBuf {
        self.dir.join("client")
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = tokio::fs::remove_dir_all(&self.dir).await;
    }
}

/// Times `calls` runs of `op`, after `warm` untimed ones.
async fn timed<F, Fut>(warm: usize, calls: usize, mut op: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    for _ in 0..warm {
        op().await?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        op().await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

fn report(name: &str, samples: &mut [Duration]) -> (Duration, Duration) {
    let (p50, p99) = percentiles(samples);
    println!("{name:<44} p50 {:>8.3} ms   p99 {:>8.3} ms   ({} calls)", ms(p50), ms(p99), samples.len());
    (p50, p99)
}

/// Runs the benchmark: `calls` timed calls per way (`fresh` for the `ssh` process, which takes
/// far longer).
///
/// # Errors
/// When sshd, the engine or the `ssh` client cannot be run.
pub async fn latency(docker_host: &str, calls: usize, fresh: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("zpanel-bench-ssh-{}", uuid::Uuid::now_v7().simple()));
    let sshd = Sshd::start(dir).await?;
    let result = measure(&sshd, docker_host, calls, fresh).await;
    sshd.stop().await;
    result
}

async fn measure(sshd: &Sshd, docker_host: &str, calls: usize, fresh: usize) -> anyhow::Result<()> {
    let pem = tokio::fs::read_to_string(sshd.key()).await?;
    let key = zpanel_workers::ssh::parse_private_key(&pem)?;
    let target = SshTarget { host: "127.0.0.1".into(), port: sshd.port, user: whoami().await? };
    // Trust on first use, as a validation records it.
    let probe = SshSession::connect(&target, key.clone(), None, TIMEOUT).await?;
    let host_key = probe.host_key_fingerprint().to_owned();
    println!("sshd on 127.0.0.1:{} (host key {host_key}), Docker Engine at {docker_host}", sshd.port);

    let local = Engine::connect(docker_host).await?;
    let link = std::sync::Arc::new(Link::new("bench", target.clone(), key, &host_key, TIMEOUT));
    let pooled = Engine::over(Dial::ssh(std::sync::Arc::clone(&link)).to_socket(DOCKER_SOCKET)).await?;
    let version = local.version().await?;
    anyhow::ensure!(pooled.version().await? == version, "the pooled connection reached another engine");
    println!("Docker Engine {version}; {calls} calls each, after 50 of warm-up\n");

    // Alternating blocks, so drift on this machine touches both sides alike.
    let (mut on_socket, mut over_ssh, mut round_trips) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pings_local, mut pings_pooled) = (Vec::new(), Vec::new());
    let block = (calls / 10).max(1);
    let mut warm = 50;
    while on_socket.len() < calls {
        on_socket.extend(timed(warm, block, || async { local.version().await.map(drop) }).await?);
        over_ssh.extend(timed(warm, block, || async { pooled.version().await.map(drop) }).await?);
        round_trips.extend(
            timed(warm, block, || async {
                probe.open_socket(DOCKER_SOCKET).await?;
                Ok(())
            })
            .await?,
        );
        pings_local.extend(timed(warm, block, || async { local.ping().await }).await?);
        pings_pooled.extend(timed(warm, block, || async { pooled.ping().await }).await?);
        warm = 0;
    }
    let mut spawned = timed(1, fresh, || fresh_ssh(sshd, &target)).await?;

    let (local_p50, local_p99) = report("docker version, local socket", &mut on_socket);
    let (rtt_p50, rtt_p99) = report("SSH round trip (a channel opened)", &mut round_trips);
    let (pooled_p50, pooled_p99) = report("docker version, pooled SSH connection", &mut over_ssh);
    let (fresh_p50, _) = report("ssh host docker version (fresh process)", &mut spawned);
    // `/version` makes the engine ask its runtimes for theirs; `/_ping` shows the transport alone.
    let (ping_local, _) = report("docker _ping, local socket", &mut pings_local);
    let (ping_pooled, _) = report("docker _ping, pooled SSH connection", &mut pings_pooled);
    let bound = |local: Duration, rtt: Duration| 2.0 * ms(local) + ms(rtt);
    println!(
        "\npooled / local: p50 {:.2}; pooled / (2 × local + round trip): p50 {:.2}, p99 {:.2} (target ≤ 1.00); \
         fresh ssh / pooled: {:.0}×",
        ms(pooled_p50) / ms(local_p50),
        ms(pooled_p50) / bound(local_p50, rtt_p50),
        ms(pooled_p99) / bound(local_p99, rtt_p99),
        ms(fresh_p50) / ms(pooled_p50)
    );
    println!(
        "_ping: pooled − local {:.3} ms, pooled / (2 × local + round trip) {:.2}",
        ms(ping_pooled) - ms(ping_local),
        ms(ping_pooled) / bound(ping_local, rtt_p50)
    );
    println!("the connection was made {} time(s)", link.connects());
    probe.close().await;
    Ok(())
}

/// One `ssh … docker version` as an operator would run it: a new process, connection and
/// login each time. The command is a constant; the key is the benchmark's throwaway one.
async fn fresh_ssh(sshd: &Sshd, target: &SshTarget) -> anyhow::Result<()> {
    let out = Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o"])
        .arg("UserKnownHostsFile=/dev/null")
        .args(["-o", "LogLevel=ERROR", "-p", &target.port.to_string(), "-i"])
        .arg(sshd.key())
        .arg(format!("{}@{}", target.user, target.host))
        .args(["docker", "version", "--format", "{{.Server.Version}}"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running ssh (openssh-client)")?;
    anyhow::ensure!(out.status.success(), "ssh … docker version: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// The account this process runs as (the benchmark's sshd lets it in with the client key).
async fn whoami() -> anyhow::Result<String> {
    let out = Command::new("id").arg("-un").output().await.context("running id -un")?;
    anyhow::ensure!(out.status.success(), "id -un failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
