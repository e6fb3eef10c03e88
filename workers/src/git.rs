//! Git, through the `git` program with argument vectors: user values (URLs, refs) come after
//! `--`, never through a shell, and only from validated types (`GitUrl`, `GitRef`).
//!
//! A tenant's git reaches nothing of the worker's host but what the tenant gave:
//! - every git process starts from an empty environment (a short allowlist passes through),
//!   with a fresh empty `HOME`, no system or global configuration and no credential helper of
//!   the host: the worker user's `~/.netrc`, `~/.gitconfig`, agent and keys stay out;
//! - ssh runs with `-F /dev/null`, no agent, and only the application's deploy key (or no key
//!   at all: `IdentityFile=none`, so the user's default `~/.ssh/id_*` are not tried either);
//! - https credentials are the application's own, answered by a credential helper scoped to
//!   the repository's origin, so they never appear in a URL, an argument or git's output;
//! - local repositories only under the operator's roots (`ZPANEL_GIT_LOCAL_ROOTS`), checked
//!   again here before every fetch (the setting may have changed since the URL was accepted,
//!   and a link may have appeared), and the file protocol only for such a repository;
//! - submodules are fetched one level at a time after their URLs are read from
//!   `.gitmodules`, resolved against the repository's URL and checked like the repository's.
//!
//! A deploy key is written to a 0600 file in a private directory only for the duration of the
//! command, and removed after (also on failure or cancellation: its guard removes it when
//! dropped).

use anyhow::Context as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use zpanel_domain::values::{GitLocalRoots, GitRef, GitTransport, GitUrl, RepoPath};

/// How long one git command may run.
const TIMEOUT: Duration = Duration::from_secs(600);

/// How deep submodules may nest.
const MAX_SUBMODULE_DEPTH: usize = 8;

/// Variables of the worker's environment a git process still gets: where programs are, and
/// how the operator's network is reached. Nothing that holds or points at credentials.
const PASSED_THROUGH: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// A private directory (0700), removed with its contents when dropped.
#[derive(Debug)]
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create(parent: &Path, prefix: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new().mode(0o700).recursive(true).create(parent).context("creating the work directory")?;
        let dir = parent.join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).context("creating a private directory")?;
        Ok(Self(dir))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A deploy key on disk for the duration of a clone.
#[derive(Debug)]
pub struct KeyFile {
    _dir: PrivateDir,
    path: PathBuf,
}

impl KeyFile {
    /// Writes `private_key` (OpenSSH format) to a new 0600 file in a new 0700 directory under
    /// `parent`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(parent: &Path, private_key: &str) -> anyhow::Result<Self> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = PrivateDir::create(parent, "key")?;
        let path = dir.0.join("id");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .context("creating the key file")?;
        let mut text = private_key.trim_end().to_owned();
        text.push('\n');
        file.write_all(text.as_bytes()).context("writing the key file")?;
        Ok(Self { _dir: dir, path })
    }
}

/// What a tenant's git commands may use besides the repository's URL.
#[derive(Clone, Copy, Debug)]
pub struct Access<'a> {
    /// The application's deploy key, for ssh; without one, ssh offers no key at all.
    pub key: Option<&'a KeyFile>,
    /// The application's https credentials (`user:token`, percent-encoded as in a URL).
    pub credentials: Option<&'a str>,
    /// Zpanel's own known hosts file (not the user's): host keys are trusted on first use and
    /// checked afterwards.
    pub known_hosts: &'a Path,
    /// Where local repositories may be.
    pub local_roots: &'a GitLocalRoots,
}

/// Which transports one git process may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocols {
    /// The network ones.
    Remote,
    /// The network ones and local repositories (every local URL involved was admitted).
    AlsoLocal,
}

impl Protocols {
    fn of<'u>(urls: impl IntoIterator<Item = &'u GitUrl>) -> Self {
        if urls.into_iter().any(|u| u.transport() == GitTransport::Local) { Self::AlsoLocal } else { Self::Remote }
    }

    /// `GIT_ALLOW_PROTOCOL`: never `ext::` (it runs commands), `fd::` or other helpers.
    const fn allowed(self) -> &'static str {
        match self {
            Self::Remote => "git:http:https:ssh",
            Self::AlsoLocal => "file:git:http:https:ssh",
        }
    }
}

/// Git commands for one repository, in an environment of their own.
#[derive(Debug)]
pub struct Git<'a> {
    /// The repository, without credentials.
    url: GitUrl,
    /// Its https credentials: given ones, else those written into the URL.
    credentials: Option<Credentials>,
    access: Access<'a>,
    /// The empty `HOME` every git process gets.
    home: PrivateDir,
}

/// A username and password, decoded; sent by git only to the repository's origin.
struct Credentials {
    origin: String,
    username: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl<'a> Git<'a> {
    /// Git for `url`, using only what `access` gives; its `HOME` is a new empty directory
    /// under `scratch`, removed when this is dropped.
    ///
    /// # Errors
    /// When the directory cannot be created, or the credentials are malformed.
    pub fn new(url: &GitUrl, access: Access<'a>, scratch: &Path) -> anyhow::Result<Self> {
        let bare = url.without_credentials();
        let credentials = match access.credentials.or_else(|| url.credentials()) {
            Some(userinfo) if bare.transport() == GitTransport::Https => {
                let (username, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                Some(Credentials {
                    origin: bare.origin().to_owned(),
                    username: percent_decoded(username).context("the repository's username")?,
                    password: percent_decoded(password).context("the repository's password")?,
                })
            }
            _ => None,
        };
        let home = PrivateDir::create(scratch, "git-home")?;
        Ok(Self { url: bare, credentials, access, home })
    }

    /// The URL git is given: without credentials.
    #[must_use]
    pub const fn url(&self) -> &GitUrl {
        &self.url
    }

    /// Checks `url` against the operator's local roots, as the filesystem is now.
    fn admit(&self, url: &GitUrl) -> anyhow::Result<()> {
        self.access
            .local_roots
            .admit(url, |path| std::fs::canonicalize(path))
            .map_err(|e| anyhow::anyhow!("the repository {} {}", url.redacted(), e.rule))
    }

    fn command(&self, protocols: Protocols) -> Command {
        let mut command = Command::new("git");
        self.isolate(command.as_std_mut(), protocols);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        command
    }

    /// Gives `command` the environment of a tenant's git process, and nothing of the worker's.
    fn isolate(&self, command: &mut std::process::Command, protocols: Protocols) {
        command.env_clear();
        for name in PASSED_THROUGH {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command
            .env("HOME", &self.home.0)
            .env("XDG_CONFIG_HOME", self.home.0.join(".config"))
            .env("GIT_ALLOW_PROTOCOL", protocols.allowed())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false");
        // An empty helper clears any helper configured before (the repository's own config
        // is Zpanel's: it created it); the application's credentials, if any, come from a
        // helper matched to the repository's origin only, so a redirect elsewhere gets none.
        let scoped = self.credentials.as_ref().map(|c| format!("credential.{}.helper", c.origin));
        let mut keys: Vec<(&str, &str)> = vec![("credential.helper", "")];
        if let (Some(key), Some(credentials)) = (&scoped, &self.credentials) {
            keys.push((key, CREDENTIAL_HELPER));
            command.env("ZPANEL_GIT_USERNAME", &credentials.username).env("ZPANEL_GIT_PASSWORD", &credentials.password);
        }
        command.env("GIT_CONFIG_COUNT", keys.len().to_string());
        for (i, (key, value)) in keys.iter().enumerate() {
            command.env(format!("GIT_CONFIG_KEY_{i}"), key).env(format!("GIT_CONFIG_VALUE_{i}"), value);
        }
        command.env("GIT_SSH_COMMAND", self.ssh_command());
    }

    /// The ssh git runs: no configuration file, no agent, only the deploy key. The key's and
    /// the known hosts' paths are Zpanel's own (no user value), so this string is safe to hand
    /// to the shell git runs it with.
    fn ssh_command(&self) -> String {
        let identity = self.access.key.map_or_else(|| "none".to_owned(), |key| key.path.display().to_string());
        format!(
            "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityAgent=none -o IdentityFile={identity} \
             -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={}",
            self.access.known_hosts.display()
        )
    }

    /// The commit `git_ref` names in the repository: a branch, else a tag (peeled), else a
    /// commit id given as the ref itself.
    ///
    /// # Errors
    /// When the repository is not allowed, cannot be reached or has no such ref.
    pub async fn resolve(&self, git_ref: &GitRef, mut output: impl FnMut(bool, String)) -> anyhow::Result<String> {
        let name = git_ref.as_str();
        if is_commit_id(name) {
            return Ok(name.to_owned());
        }
        self.admit(&self.url)?;
        let mut command = self.command(Protocols::of([&self.url]));
        command.args(["ls-remote", "--", self.url.as_str()]);
        for pattern in [format!("refs/heads/{name}"), format!("refs/tags/{name}"), format!("refs/tags/{name}^{{}}")] {
            command.arg(pattern);
        }
        let stdout = run(command, &mut output).await.context("listing the repository's refs")?;
        let refs: Vec<(&str, &str)> = stdout.lines().filter_map(|l| l.split_once('\t')).collect();
        let find = |wanted: String| refs.iter().find(|(_, r)| *r == wanted).map(|(sha, _)| (*sha).to_owned());
        find(format!("refs/heads/{name}"))
            .or_else(|| find(format!("refs/tags/{name}^{{}}")))
            .or_else(|| find(format!("refs/tags/{name}")))
            .with_context(|| format!("the repository has no branch or tag named {name}"))
    }

    /// Checks out `commit` into `dir` (which must not exist): a shallow fetch of that commit,
    /// or a full fetch of `git_ref` when the server won't serve a commit by id. Submodules are
    /// checked out when the repository has them, each URL checked first.
    ///
    /// # Errors
    /// When a repository is not allowed, or git fails (with its last lines of error output).
    pub async fn checkout(
        &self,
        git_ref: &GitRef,
        commit: &str,
        dir: &Path,
        mut output: impl FnMut(bool, String),
    ) -> anyhow::Result<()> {
        anyhow::ensure!(is_commit_id(commit), "{commit:?} is not a commit id");
        self.admit(&self.url)?;
        let fetching = Protocols::of([&self.url]);
        let dir_arg = dir.as_os_str();
        let mut init = self.command(Protocols::Remote);
        init.arg("init").arg("--quiet").arg("--").arg(dir_arg);
        run(init, &mut output).await.context("creating the build directory")?;
        let mut shallow = self.command(fetching);
        shallow.arg("-C").arg(dir_arg).args(["fetch", "--depth", "1", "--no-tags", "--", self.url.as_str(), commit]);
        if run(shallow, &mut output).await.is_err() {
            output(true, format!("the server does not serve commits by id; fetching {}", git_ref.as_str()));
            let mut full = self.command(fetching);
            full.arg("-C").arg(dir_arg).args(["fetch", "--no-tags", "--", self.url.as_str(), git_ref.as_str()]);
            run(full, &mut output).await.context("fetching the repository")?;
        }
        let mut checkout = self.command(Protocols::Remote);
        checkout.arg("-C").arg(dir_arg).args([
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "--quiet",
            "--detach",
            commit,
        ]);
        run(checkout, &mut output).await.with_context(|| format!("checking out {commit}"))?;
        let root = std::fs::canonicalize(dir).context("reading the build directory")?;
        let mut pending = vec![(self.url.clone(), root.clone(), 0)];
        while let Some((url, dir, depth)) = pending.pop() {
            for (url, path) in self.submodules(&url, &root, &dir, depth, &mut output).await? {
                pending.push((url, path, depth + 1));
            }
        }
        Ok(())
    }

    /// Checks out the submodules of the repository at `url`, checked out in `dir` (under
    /// `root`): their URLs are read from `.gitmodules`, resolved against `url`, checked, and
    /// written to the repository's own configuration, so git fetches exactly those. Returns
    /// each submodule's URL and directory, to look into in turn (never `--recursive`: a
    /// nested `.gitmodules` would go unchecked).
    async fn submodules(
        &self,
        url: &GitUrl,
        root: &Path,
        dir: &Path,
        depth: usize,
        output: &mut impl FnMut(bool, String),
    ) -> anyhow::Result<Vec<(GitUrl, PathBuf)>> {
        let gitmodules = dir.join(".gitmodules");
        match std::fs::symlink_metadata(&gitmodules) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).context("reading .gitmodules"),
            Ok(meta) => anyhow::ensure!(meta.is_file(), ".gitmodules is not a regular file"),
        }
        anyhow::ensure!(depth < MAX_SUBMODULE_DEPTH, "submodules nest more than {MAX_SUBMODULE_DEPTH} levels deep");
        let mut list = self.command(Protocols::Remote);
        list.arg("-C").arg(dir).args(["config", "--file", ".gitmodules", "--null", "--list"]);
        let listed = run(list, output).await.context("reading .gitmodules")?;
        let mut found = Vec::new();
        for (name, (raw, path)) in declared_submodules(&listed) {
            let refused = |rule: String| anyhow::anyhow!("the submodule {name:?} is refused: {rule}");
            let raw = raw.ok_or_else(|| refused("it has no url".into()))?;
            let resolved = url.submodule(raw).map_err(|e| refused(format!("its url {}", e.rule)))?;
            self.admit(&resolved).map_err(|e| refused(e.to_string()))?;
            anyhow::ensure!(
                resolved.credentials().is_none(),
                "the submodule {name:?} is refused: its url must not hold credentials"
            );
            let path = path.ok_or_else(|| refused("it has no path".into()))?;
            let path = RepoPath::parse(path).map_err(|e| refused(format!("its path {}", e.rule)))?;
            let mut set = self.command(Protocols::Remote);
            set.arg("-C").arg(dir).args(["config", "--"]).arg(format!("submodule.{name}.url")).arg(resolved.as_str());
            run(set, output).await.context("recording a submodule's url")?;
            found.push((resolved, dir.join(path.as_str())));
        }
        if found.is_empty() {
            return Ok(vec![]);
        }
        let mut update = self.command(Protocols::of(found.iter().map(|(url, _)| url)));
        update.arg("-C").arg(dir).args(["submodule", "update", "--init", "--depth", "1"]);
        run(update, output).await.context("checking out submodules")?;
        let mut inside = Vec::with_capacity(found.len());
        for (url, path) in found {
            // A submodule that was not checked out (no commit recorded for it) has nothing to
            // look into; one that resolves outside the checkout is not looked into either.
            if let Ok(canonical) = std::fs::canonicalize(&path)
                && canonical.starts_with(root)
            {
                inside.push((url, canonical));
            }
        }
        Ok(inside)
    }
}

/// The helper that answers git's credential requests from the variables `isolate` sets: no
/// user value is in it, and `store`/`erase` do nothing.
const CREDENTIAL_HELPER: &str = r#"!f() { test "$1" = get && printf 'username=%s\npassword=%s\n' "$ZPANEL_GIT_USERNAME" "$ZPANEL_GIT_PASSWORD"; }; f"#;

/// The submodules `git config --null --list` of a `.gitmodules` declares: name → (url, path).
fn declared_submodules(listed: &str) -> BTreeMap<&str, (Option<&str>, Option<&str>)> {
    let mut submodules: BTreeMap<&str, (Option<&str>, Option<&str>)> = BTreeMap::new();
    for entry in listed.split('\0').filter(|e| !e.is_empty()) {
        let (key, value) = entry.split_once('\n').unwrap_or((entry, ""));
        let Some(rest) = key.strip_prefix("submodule.") else { continue };
        if let Some(name) = rest.strip_suffix(".url") {
            submodules.entry(name).or_default().0 = Some(value);
        } else if let Some(name) = rest.strip_suffix(".path") {
            submodules.entry(name).or_default().1 = Some(value);
        }
    }
    submodules
}

/// `s` with its `%XX` escapes decoded, as git decodes credentials in a URL.
fn percent_decoded(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).context("a '%' not followed by two hex digits")?;
            out.push(u8::from_str_radix(hex, 16).context("a '%' not followed by two hex digits")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).context("not UTF-8")?;
    // A line break would add lines to git's credential protocol.
    anyhow::ensure!(!decoded.chars().any(char::is_control), "holds a control character");
    Ok(decoded)
}

/// Whether `s` is a full commit id (40 lowercase hex digits).
#[must_use]
pub fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Runs `command`, passing each line of its error output to `output`; returns its standard
/// output. Fails with the last error lines when it exits unsuccessfully or runs too long.
async fn run(mut command: Command, output: &mut impl FnMut(bool, String)) -> anyhow::Result<String> {
    let mut child = command.spawn().context("running git (is it installed?)")?;
    let stderr = child.stderr.take().context("git's error output")?;
    let mut stdout = child.stdout.take().context("git's output")?;
    let collect = async {
        use tokio::io::AsyncReadExt as _;
        let mut out = String::new();
        let read = stdout.read_to_string(&mut out);
        let mut last = std::collections::VecDeque::new();
        let mut lines = BufReader::new(stderr).lines();
        let errors = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if last.len() == 5 {
                    last.pop_front();
                }
                last.push_back(line.clone());
                output(true, line);
            }
        };
        let (read, ()) = tokio::join!(read, errors);
        read.context("reading git's output")?;
        let status = child.wait().await.context("waiting for git")?;
        anyhow::Ok((status, out, last))
    };
    let (status, out, last) = tokio::time::timeout(TIMEOUT, collect)
        .await
        .map_err(|_| anyhow::anyhow!("git took longer than {} s", TIMEOUT.as_secs()))??;
    if !status.success() {
        let last: Vec<String> = last.into_iter().collect();
        anyhow::bail!("git failed ({status}): {}", last.join(" / "));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder under the system's temp folder, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("zpanel-git-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).expect("scratch");
            Self(std::fs::canonicalize(&dir).expect("canonical"))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn url(s: &str) -> GitUrl {
        GitUrl::parse(s).expect("valid url")
    }

    fn access<'a>(known_hosts: &'a Path, roots: &'a GitLocalRoots) -> Access<'a> {
        Access { key: None, credentials: None, known_hosts, local_roots: roots }
    }

    /// What `program` sees of its environment when started as a git process of `git`.
    fn environment_seen(git: &Git<'_>) -> BTreeMap<String, String> {
        let mut command = std::process::Command::new("env");
        git.isolate(&mut command, Protocols::Remote);
        let out = command.output().expect("env runs");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn sh(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("git").arg("-C").arg(dir).args(args).output().expect("git runs");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A repository at `dir` with `files` committed on `main`; returns the commit.
    fn repository(dir: &Path, files: &[(&str, &str)]) -> String {
        std::fs::create_dir_all(dir).expect("repo dir");
        sh(dir, &["init", "-q", "-b", "main"]);
        for (path, content) in files {
            std::fs::write(dir.join(path), content).expect("file");
        }
        sh(dir, &["add", "-A"]);
        sh(dir, &["-c", "user.email=t@zpanel.invalid", "-c", "user.name=t", "commit", "-q", "-m", "files"]);
        head(dir)
    }

    fn head(dir: &Path) -> String {
        let out = std::process::Command::new("git").arg("-C").arg(dir).args(["rev-parse", "HEAD"]).output();
        String::from_utf8(out.expect("rev-parse").stdout).expect("utf-8").trim().to_owned()
    }

    #[test]
    fn a_git_process_sees_an_empty_home_and_nothing_else_of_the_workers_environment() {
        let scratch = Scratch::new();
        let roots = GitLocalRoots::default();
        let known_hosts = scratch.0.join("known_hosts");
        let git = Git::new(&url("https://h.io/a.git"), access(&known_hosts, &roots), &scratch.0).expect("git");
        let seen = environment_seen(&git);
        assert_eq!(seen.get("HOME").map(PathBuf::from), Some(git.home.0.clone()));
        assert_eq!(std::fs::read_dir(&git.home.0).expect("home").count(), 0, "HOME is empty");
        let ours = [
            "HOME",
            "XDG_CONFIG_HOME",
            "GIT_ALLOW_PROTOCOL",
            "GIT_TERMINAL_PROMPT",
            "GIT_CONFIG_NOSYSTEM",
            "GIT_CONFIG_GLOBAL",
            "GIT_ASKPASS",
            "SSH_ASKPASS",
            "GIT_CONFIG_COUNT",
            "GIT_CONFIG_KEY_0",
            "GIT_CONFIG_VALUE_0",
            "GIT_SSH_COMMAND",
        ];
        for name in seen.keys() {
            assert!(
                ours.contains(&name.as_str()) || PASSED_THROUGH.contains(&name.as_str()),
                "{name} reached git from the worker's environment"
            );
        }
        // cargo runs tests with variables of its own: none of them got through.
        assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO")), "the test runs under cargo");
        assert_eq!(seen.get("GIT_CONFIG_KEY_0").map(String::as_str), Some("credential.helper"));
        assert_eq!(seen.get("GIT_CONFIG_VALUE_0").map(String::as_str), Some(""));
        assert_eq!(seen.get("GIT_ALLOW_PROTOCOL").map(String::as_str), Some("git:http:https:ssh"));
    }

    #[test]
    fn ssh_uses_no_configuration_no_agent_and_only_the_deploy_key() {
        let scratch = Scratch::new();
        let roots = GitLocalRoots::default();
        let known_hosts = scratch.0.join("known_hosts");
        let without = Git::new(&url("git@h.io:a/b"), access(&known_hosts, &roots), &scratch.0).expect("git");
        let ssh = without.ssh_command();
        for flag in ["-F /dev/null", "IdentitiesOnly=yes", "IdentityAgent=none", "IdentityFile=none", "BatchMode=yes"] {
            assert!(ssh.contains(flag), "{ssh} lacks {flag}");
        }
        assert!(ssh.contains(&format!("UserKnownHostsFile={}", known_hosts.display())));
        let key = KeyFile::write(&scratch.0, "KEY").expect("key");
        let with =
            Git::new(&url("git@h.io:a/b"), Access { key: Some(&key), ..access(&known_hosts, &roots) }, &scratch.0)
                .expect("git");
        let ssh = with.ssh_command();
        assert!(ssh.contains(&format!("IdentityFile={}", key.path.display())), "{ssh}");
        assert!(!ssh.contains("IdentityFile=none"), "{ssh}");
    }

    #[test]
    fn credentials_reach_git_only_through_a_helper_scoped_to_the_origin() {
        let scratch = Scratch::new();
        let roots = GitLocalRoots::default();
        let known_hosts = scratch.0.join("known_hosts");
        let written = url("https://bot:p%40ss@git.example.com:8443/acme/web.git");
        let git = Git::new(&written, access(&known_hosts, &roots), &scratch.0).expect("git");
        assert_eq!(git.url().as_str(), "https://git.example.com:8443/acme/web.git", "git is given no credentials");
        let seen = environment_seen(&git);
        assert_eq!(
            seen.get("GIT_CONFIG_KEY_1").map(String::as_str),
            Some("credential.https://git.example.com:8443.helper")
        );
        assert_eq!(seen.get("ZPANEL_GIT_USERNAME").map(String::as_str), Some("bot"));
        assert_eq!(seen.get("ZPANEL_GIT_PASSWORD").map(String::as_str), Some("p@ss"));
        let given = Git::new(
            &url("https://git.example.com/acme/web.git"),
            Access { credentials: Some("x-token:t0k"), ..access(&known_hosts, &roots) },
            &scratch.0,
        )
        .expect("git");
        assert_eq!(environment_seen(&given).get("ZPANEL_GIT_PASSWORD").map(String::as_str), Some("t0k"));
        let plain = Git::new(&url("https://git.example.com/a"), access(&known_hosts, &roots), &scratch.0).expect("git");
        let seen = environment_seen(&plain);
        assert!(!seen.contains_key("ZPANEL_GIT_PASSWORD") && !seen.contains_key("GIT_CONFIG_KEY_1"), "{seen:?}");
        assert!(percent_decoded("a%0Ab").is_err(), "a line break in a credential is refused");
    }

    #[tokio::test]
    async fn a_local_repository_outside_the_roots_is_never_read() {
        let scratch = Scratch::new();
        let allowed = scratch.0.join("allowed");
        std::fs::create_dir_all(&allowed).expect("root");
        let secret = scratch.0.join("secret");
        let commit = repository(&secret, &[("secret.txt", "the host's secret")]);
        let roots = GitLocalRoots::new(vec![allowed.clone()]);
        let known_hosts = scratch.0.join("known_hosts");
        std::os::unix::fs::symlink(&secret, allowed.join("link")).expect("link");
        for outside in [secret.display().to_string(), allowed.join("link").display().to_string()] {
            let git = Git::new(&url(&outside), access(&known_hosts, &roots), &scratch.0).expect("git");
            let main = GitRef::parse("main").expect("ref");
            let resolved = git.resolve(&main, |_, _| {}).await;
            assert!(format!("{:#}", resolved.expect_err("refused")).contains("allows local repositories"));
            let dir = scratch.0.join(format!("out-{}", uuid::Uuid::new_v4().simple()));
            let checkout = git.checkout(&main, &commit, &dir, |_, _| {}).await;
            assert!(checkout.is_err(), "{outside} was checked out");
            assert!(!dir.exists(), "nothing was fetched from {outside}");
        }
    }

    #[tokio::test]
    async fn submodules_pointing_outside_the_roots_are_refused_before_any_is_fetched() {
        let scratch = Scratch::new();
        let allowed = scratch.0.join("allowed");
        let secret = scratch.0.join("secret");
        repository(&secret, &[("secret.txt", "the host's secret")]);
        let lib = allowed.join("lib");
        repository(&lib, &[("lib.txt", "a library")]);
        let roots = GitLocalRoots::new(vec![allowed.clone()]);
        let known_hosts = scratch.0.join("known_hosts");
        let main = GitRef::parse("main").expect("ref");
        let outside = [
            secret.display().to_string(),
            format!("file://{}", secret.display()),
            // relative to allowed/app: ../../secret
            "../../secret".to_owned(),
        ];
        for (i, submodule_url) in outside.iter().chain([&"../lib".to_owned()]).enumerate() {
            let app = allowed.join(format!("app{i}"));
            let lib_commit = repository(&lib, &[("n", &i.to_string())]);
            std::fs::create_dir_all(&app).expect("app dir");
            sh(&app, &["init", "-q", "-b", "main"]);
            let gitmodules = format!("[submodule \"sub\"]\n\tpath = sub\n\turl = {submodule_url}\n");
            std::fs::write(app.join(".gitmodules"), gitmodules).expect("gitmodules");
            sh(&app, &["add", ".gitmodules"]);
            sh(&app, &["update-index", "--add", "--cacheinfo", &format!("160000,{lib_commit},sub")]);
            sh(&app, &["-c", "user.email=t@zpanel.invalid", "-c", "user.name=t", "commit", "-q", "-m", "app"]);
            let commit = head(&app);
            let git =
                Git::new(&url(&app.display().to_string()), access(&known_hosts, &roots), &scratch.0).expect("git");
            let dir = scratch.0.join(format!("out{i}"));
            let mut lines = Vec::new();
            let checkout = git.checkout(&main, &commit, &dir, |_, line| lines.push(line)).await;
            if submodule_url == "../lib" {
                checkout.expect("a submodule under the root is checked out");
                assert!(dir.join("sub/lib.txt").exists());
                continue;
            }
            let error = format!("{:#}", checkout.expect_err("refused"));
            assert!(error.contains("submodule \"sub\" is refused"), "{error}");
            assert!(!dir.join("sub/secret.txt").exists(), "{submodule_url} was fetched");
            assert!(!lines.iter().chain([&error]).any(|l| l.contains("the host's secret")));
        }
    }
}
