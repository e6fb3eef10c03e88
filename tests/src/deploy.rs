//! What deployment tests need besides Zpanel: a Caddy of their own (admin API and application
//! server on free loopback ports), the base image test applications build `FROM`, and local
//! git repositories to deploy from.

use crate::TempDir;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The base image of test applications: busybox, imported from Debian's `busybox-static`
/// (nothing can be pulled here).
pub const BASE_IMAGE: &str = "zpanel-test/busybox:latest";

/// A free loopback port (bound, then released for the service to take).
///
/// # Panics
/// When no port can be bound.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port()
}

/// A Caddy on loopback, stopped on drop.
#[derive(Debug)]
pub struct Caddy {
    /// `http://127.0.0.1:PORT` of its admin API.
    pub admin: String,
    /// `127.0.0.1:PORT`, where Zpanel's server in it listens (for `ZPANEL_PROXY_LISTEN`).
    pub listen: String,
    child: Child,
    _dir: TempDir,
}

impl Caddy {
    /// Starts `caddy run` with only an admin API; Zpanel creates its server through it.
    ///
    /// # Panics
    /// When Caddy is missing or does not come up.
    pub fn start() -> Self {
        let dir = TempDir::new();
        let admin_port = free_port();
        let config = dir.0.join("caddy.json");
        std::fs::write(&config, format!(r#"{{"admin":{{"listen":"127.0.0.1:{admin_port}"}}}}"#)).expect("config");
        let child = caddy_in(&dir.0)
            .args(["run", "--config"])
            .arg(&config)
            .spawn()
            .expect("caddy is installed (scripts/test installs it)");
        let admin = format!("http://127.0.0.1:{admin_port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
            assert!(Instant::now() < deadline, "caddy's admin API did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { admin, listen: format!("127.0.0.1:{}", free_port()), child, _dir: dir }
    }

    /// The environment that points Zpanel at this Caddy (and shortens the grace period
    /// before an old release is stopped), with the base image as one of the operator's local
    /// images (nothing can be pulled here).
    #[must_use]
    pub fn env(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("ZPANEL_CADDY_ADMIN", self.admin.as_str()),
            ("ZPANEL_PROXY_LISTEN", self.listen.as_str()),
            ("ZPANEL_DEPLOY_GRACE_SECONDS", "1"),
            ("ZPANEL_LOCAL_IMAGES", BASE_IMAGE),
        ]
    }
}

/// A `caddy` command whose home, data and saved configuration live under `dir`, quiet.
#[must_use]
pub fn caddy_in(dir: &Path) -> Command {
    let mut command = Command::new("caddy");
    command
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes sure the base image exists, importing it from the machine's busybox when missing.
///
/// # Panics
/// When Docker is not running or busybox is missing.
pub fn ensure_base_image() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let present = Command::new("docker").args(["image", "inspect", BASE_IMAGE]).output().expect("docker CLI");
        if present.status.success() {
            return;
        }
        let root = TempDir::new();
        let rootfs = root.0.join("rootfs");
        for dir in ["bin", "www", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.join(dir)).expect("rootfs dir");
        }
        let busybox =
            ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| Path::new(p).exists()).expect("busybox");
        std::fs::copy(busybox, rootfs.join("bin/busybox")).expect("copies busybox");
        for applet in
            ["sh", "httpd", "echo", "cat", "sleep", "ls", "mkdir", "touch", "env", "wget", "true", "false", "printf"]
        {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).expect("applet link");
        }
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
        let tar = root.0.join("rootfs.tar");
        let packed = Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".").status().expect("tar");
        assert!(packed.success(), "packing the base image");
        let imported = Command::new("docker").arg("import").arg(&tar).arg(BASE_IMAGE).output().expect("docker import");
        assert!(imported.status.success(), "docker import: {}", String::from_utf8_lossy(&imported.stderr));
    });
}

/// The directory test repositories are made in, which every Zpanel the tests start allows
/// local repositories from (`ZPANEL_GIT_LOCAL_ROOTS`); anything elsewhere on the machine is
/// out of a tenant's reach.
///
/// # Panics
/// When it cannot be created.
#[must_use]
pub fn repositories_root() -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let root = std::env::temp_dir().join("zpanel-e2e-repositories");
    std::fs::create_dir_all(&root).expect("the repositories' directory");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    root
}

/// A local git repository holding a test application: busybox `httpd` serving `/www`.
#[derive(Debug)]
pub struct Repo {
    dir: TempDir,
}

impl Repo {
    /// A repository on branch `main` whose app answers `page` at `/`.
    ///
    /// # Panics
    /// When git fails.
    #[must_use]
    pub fn new(page: &str) -> Self {
        let repo = Self { dir: TempDir::within(&repositories_root()) };
        repo.git(&["init", "-q", "-b", "main"]);
        repo.commit_app(page, "");
        repo
    }

    /// The repository's path (its `gitUrl`).
    #[must_use]
    pub fn path(&self) -> PathBuf {
        self.dir.0.clone()
    }

    /// The path as a string.
    #[must_use]
    pub fn url(&self) -> String {
        self.dir.0.display().to_string()
    }

    /// Commits an app answering `page`, with `extra` Dockerfile lines before its `CMD`.
    /// Returns the commit.
    pub fn commit_app(&self, page: &str, extra: &str) -> String {
        let dockerfile = format!(
            "FROM {BASE_IMAGE}\nCOPY index.html /www/index.html\n{extra}\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
        );
        self.commit_files(&[("Dockerfile", &dockerfile), ("index.html", page)], page)
    }

    /// Commits `files` (path, content) with `message`; returns the commit.
    pub fn commit_files(&self, files: &[(&str, &str)], message: &str) -> String {
        for (path, content) in files {
            let file = self.dir.0.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).expect("dir");
            }
            std::fs::write(file, content).expect("writes");
        }
        self.git(&["add", "-A"]);
        self.git(&["-c", "user.email=test@zpanel.invalid", "-c", "user.name=test", "commit", "-q", "-m", message]);
        self.git(&["rev-parse", "HEAD"]).trim().to_owned()
    }

    /// Commits a submodule at `path` whose `.gitmodules` URL is `url` (written as given, so
    /// it may be relative, local or anything git accepts) and whose recorded commit is
    /// `commit`. Returns the commit.
    pub fn commit_submodule(&self, path: &str, url: &str, commit: &str) -> String {
        let gitmodules = format!("[submodule \"{path}\"]\n\tpath = {path}\n\turl = {url}\n");
        std::fs::write(self.dir.0.join(".gitmodules"), gitmodules).expect("writes .gitmodules");
        self.git(&["add", ".gitmodules"]);
        self.git(&["update-index", "--add", "--cacheinfo", &format!("160000,{commit},{path}")]);
        self.git(&["-c", "user.email=test@zpanel.invalid", "-c", "user.name=test", "commit", "-q", "-m", "submodule"]);
        self.git(&["rev-parse", "HEAD"]).trim().to_owned()
    }

    /// A bare copy of the repository in `dir`, ready to be served over git's dumb HTTP
    /// protocol (plain files).
    pub fn export_bare(&self, dir: &Path) {
        let out = Command::new("git").arg("clone").arg("--bare").arg("-q").arg(&self.dir.0).arg(dir).output();
        assert!(out.expect("git clone").status.success(), "cloning bare");
        let out = Command::new("git").arg("-C").arg(dir).arg("update-server-info").output();
        assert!(out.expect("git update-server-info").status.success(), "update-server-info");
    }

    fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git").arg("-C").arg(&self.dir.0).args(args).output().expect("git runs");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    }
}

/// The deployment's log so far, one string per line.
///
/// # Panics
/// When the id is not a UUID or the database fails.
pub async fn deployment_log(pool: &sqlx::PgPool, deployment: &str) -> Vec<String> {
    let id: uuid::Uuid = deployment.parse().expect("uuid");
    sqlx::query_scalar("select text from deployment_logs where deployment_id = $1 order by sequence")
        .bind(id)
        .fetch_all(pool)
        .await
        .expect("log lines")
}

/// Polls the deployment's log until a line contains `needle` (60 s at most).
///
/// # Panics
/// When no line does by then.
pub async fn until_log_shows(pool: &sqlx::PgPool, deployment: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !deployment_log(pool, deployment).await.iter().any(|l| l.contains(needle)) {
        assert!(Instant::now() < deadline, "the log of {deployment} never showed {needle:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /` with `Host: domain` through the Caddy server listening at `listen`: the status and
/// the body, or why there was no answer.
pub async fn page(http: &reqwest::Client, listen: &str, domain: &str) -> Result<(u16, String), String> {
    let answer =
        http.get(format!("http://{listen}/")).header("host", domain).send().await.map_err(|e| e.to_string())?;
    let status = answer.status().as_u16();
    Ok((status, answer.text().await.map_err(|e| e.to_string())?))
}

/// Removes every container and image Zpanel made for `application_id`, and its team's
/// network once no container uses it (tests clean up after themselves; the engine is shared,
/// and its address pools hold a few dozen networks).
pub fn remove_application(application_id: &str) {
    let label = format!("label=zpanel.application={application_id}");
    let ids = Command::new("docker").args(["ps", "-aq", "--filter", &label]).output().expect("docker ps");
    let mut teams = std::collections::BTreeSet::new();
    for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
        let team = Command::new("docker")
            .args(["inspect", "-f", "{{index .Config.Labels \"zpanel.team\"}}", id])
            .output()
            .expect("docker inspect");
        teams.insert(String::from_utf8_lossy(&team.stdout).trim().to_owned());
        let _ = Command::new("docker").args(["rm", "-f", id]).output();
    }
    for team in teams.into_iter().filter(|t| !t.is_empty()) {
        // Refused while another application of the team still runs: its removal takes it.
        let _ = Command::new("docker").args(["network", "rm", &format!("zpanel-team-{team}")]).output();
    }
    let repo = format!("zpanel/{application_id}");
    let images = Command::new("docker").args(["images", "-q", &repo]).output().expect("docker images");
    for id in String::from_utf8_lossy(&images.stdout).split_whitespace() {
        let _ = Command::new("docker").args(["rmi", "-f", id]).output();
    }
}

/// OpenSSH's `sshd` on a free loopback port, with its own host key, letting in the keys
/// written to its `authorized_keys` (as the user running the tests); stopped on drop. It can be
/// stopped and started again on the same port, and given a new host key.
#[derive(Debug)]
pub struct Sshd {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The file of keys it lets in.
    pub authorized_keys: PathBuf,
    config: PathBuf,
    host_key: PathBuf,
    child: Option<Child>,
    _dir: TempDir,
}

impl Sshd {
    /// Starts `sshd -D` with a configuration of its own.
    ///
    /// # Panics
    /// When sshd or ssh-keygen are missing, or sshd does not listen.
    pub fn start() -> Self {
        let dir = TempDir::new();
        let host_key = dir.0.join("host_ed25519");
        new_host_key(&host_key);
        let authorized_keys = dir.0.join("authorized_keys");
        std::fs::write(&authorized_keys, "").expect("authorized_keys");
        let port = free_port();
        let config = dir.0.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\n",
                host_key.display(),
                authorized_keys.display(),
                dir.0.join("sshd.pid").display()
            ),
        )
        .expect("sshd_config");
        // Privilege separation needs this folder (Debian makes it at boot, under systemd).
        let _ = std::fs::create_dir_all("/run/sshd");
        let mut sshd = Self { port, authorized_keys, config, host_key, child: None, _dir: dir };
        sshd.resume();
        sshd
    }

    /// Starts it again after [`Sshd::stop`], on the same port with the same host key; waits
    /// until it listens.
    ///
    /// # Panics
    /// When sshd cannot be started or does not listen.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "sshd is running");
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd (openssh-server; scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it: connections to its port are refused until [`Sshd::resume`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Cuts every open connection (kills the processes sshd runs for them, as a crashed or
    /// rebooted network path would end them); sshd itself keeps listening. Returns how many
    /// processes it killed.
    ///
    /// # Panics
    /// When sshd is not running.
    pub fn drop_connections(&self) -> usize {
        let master = self.child.as_ref().expect("sshd is running").id();
        let mut killed = 0;
        for pid in descendants(master) {
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        killed
    }

    /// Gives it a new host key (as a reinstalled server would have), restarting it.
    ///
    /// # Panics
    /// When ssh-keygen fails or sshd does not come back.
    pub fn replace_host_key(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.host_key);
        let _ = std::fs::remove_file(self.host_key.with_extension("pub"));
        new_host_key(&self.host_key);
        self.resume();
    }

    /// Its host key's fingerprint, `SHA256:…`, as `ssh-keygen -l` prints it.
    ///
    /// # Panics
    /// When ssh-keygen fails.
    #[must_use]
    pub fn host_key_fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen").arg("-lf").arg(&self.host_key).output().expect("ssh-keygen -l");
        assert!(out.status.success(), "ssh-keygen -l: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).expect("a fingerprint").to_owned()
    }

    /// Lets `public_key` (OpenSSH one-line form) in.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn authorize(&self, public_key: &str) {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new().append(true).open(&self.authorized_keys).expect("authorized_keys");
        writeln!(file, "{}", public_key.trim()).expect("writes");
    }
}

/// Every process below `root` (children, their children, …), read from `/proc`.
fn descendants(root: u32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parents.push((pid, ppid));
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![i32::try_from(root).unwrap_or(i32::MAX)];
    while let Some(parent) = frontier.pop() {
        for &(pid, _) in parents.iter().filter(|(_, ppid)| *ppid == parent) {
            found.push(pid);
            frontier.push(pid);
        }
    }
    found
}

fn new_host_key(path: &Path) {
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (openssh-client)");
    assert!(made.success(), "ssh-keygen");
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A git server on loopback speaking git's dumb HTTP protocol (the repositories' files) and
/// answering only requests that carry one of its accepted Basic credentials; it remembers
/// every `Authorization` it was sent.
#[derive(Debug)]
pub struct GitHttpServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl GitHttpServer {
    /// Serves the files under `root` to requests authenticated as one of `accepted`
    /// (`user:password`).
    ///
    /// # Panics
    /// When it cannot listen.
    pub async fn start(root: PathBuf, accepted: &[&str]) -> Self {
        use base64::Engine as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listens");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let accepted: Vec<String> =
            accepted.iter().map(|c| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(c))).collect();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = std::sync::Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (root, accepted, log) = (root.clone(), accepted.clone(), std::sync::Arc::clone(&log));
                tokio::spawn(async move { Self::answer(stream, &root, &accepted, &log).await });
            }
        });
        Self { url, seen, task }
    }

    async fn answer(
        mut stream: tokio::net::TcpStream,
        root: &Path,
        accepted: &[String],
        seen: &std::sync::Mutex<Vec<String>>,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 65_536 {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_owned();
        let authorization = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("authorization").then(|| value.trim().to_owned())
        });
        if let Some(value) = &authorization
            && let Ok(mut seen) = seen.lock()
        {
            seen.push(value.clone());
        }
        let file = root.join(path.trim_start_matches('/'));
        let response = if !authorization.is_some_and(|a| accepted.contains(&a)) {
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
        } else if path.contains("..") || !file.is_file() {
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
        } else {
            let body = std::fs::read(&file).unwrap_or_default();
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            response.extend(body);
            response
        };
        let _ = stream.write_all(&response).await;
        let _ = stream.shutdown().await;
    }

    /// Every `Authorization` header it was sent, as sent.
    ///
    /// # Panics
    /// When a request handler panicked.
    #[must_use]
    pub fn authorizations(&self) -> Vec<String> {
        self.seen.lock().expect("the log").clone()
    }

    /// The `Authorization` header `credentials` (`user:password`) make.
    #[must_use]
    pub fn basic(credentials: &str) -> String {
        use base64::Engine as _;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials))
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
