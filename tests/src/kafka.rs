//! A Kafka-compatible broker for one test: `tansu` on a loopback port of its own, with
//! in-memory storage, which the test can stop and start again on the same port.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `tansu` binary: `ZPANEL_TANSU`, else `tansu` on the `PATH`, else cargo's bin folder.
#[must_use]
pub fn tansu_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("ZPANEL_TANSU") {
        return PathBuf::from(bin);
    }
    if let Some(found) = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("tansu")).find(|bin| bin.is_file()))
    {
        return found;
    }
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("tansu"), |home| PathBuf::from(home).join(".cargo/bin/tansu"))
}

/// A running (or stopped) broker.
#[derive(Debug)]
pub struct Broker {
    port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker on a free loopback port and waits until it accepts connections.
    ///
    /// # Panics
    /// When it cannot be started.
    #[must_use]
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut broker = Self { port, child: None };
        broker.resume();
        broker
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    #[must_use]
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (its in-memory topics go with it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port.
    ///
    /// # Panics
    /// When it does not accept connections within 30 s.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let url = format!("tcp://{}", self.address());
        let child = Command::new(tansu_bin())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (scripts/test installs tansu)", tansu_bin().display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.address()).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {} within 30 s", self.address());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
