//! Git, through the `git` program with argument vectors: user values (URLs, refs) come after
//! `--`, never through a shell, and only from validated types (`GitUrl`, `GitRef`).
//!
//! Private repositories over SSH use a deploy key written to a 0600 file in a private
//! directory only for the duration of the command, and removed after (also on failure or
//! cancellation: the file's guard removes it when dropped).

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use zpanel_domain::values::{GitRef, GitUrl};

/// How long one git command may run.
const TIMEOUT: Duration = Duration::from_secs(600);

/// A deploy key on disk for the duration of a clone.
#[derive(Debug)]
pub struct KeyFile {
    dir: PathBuf,
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
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let dir = parent.join(format!("key-{}", uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new().mode(0o700).recursive(true).create(&dir).context("creating the key directory")?;
        let path = dir.join("id");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .context("creating the key file")?;
        let mut text = private_key.trim_end().to_owned();
        text.push('\n');
        file.write_all(text.as_bytes()).context("writing the key file")?;
        Ok(Self { dir, path })
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Git commands for one repository, optionally with a deploy key.
#[derive(Debug)]
pub struct Git<'a> {
    url: &'a GitUrl,
    key: Option<&'a KeyFile>,
    known_hosts: &'a Path,
}

impl<'a> Git<'a> {
    /// Git for `url`, authenticating over SSH with `key` when given, and trusting SSH host keys
    /// on first use in the file `known_hosts` (Zpanel's own, not the user's).
    #[must_use]
    pub const fn new(url: &'a GitUrl, key: Option<&'a KeyFile>, known_hosts: &'a Path) -> Self {
        Self { url, key, known_hosts }
    }

    fn command(&self) -> Command {
        let mut command = Command::new("git");
        command
            // The ext:: transport runs arbitrary commands; plain file, ssh, git and http(s) only.
            .env("GIT_ALLOW_PROTOCOL", "file:git:http:https:ssh")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The key's and the known hosts' paths are Zpanel's own (no user value), so this
        // string is safe to hand to the shell git runs it with. Host keys are trusted on first
        // use and checked afterwards, per data directory.
        let mut ssh = format!(
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={}",
            self.known_hosts.display()
        );
        if let Some(key) = self.key {
            ssh.push_str(&format!(" -o IdentitiesOnly=yes -i {}", key.path.display()));
        }
        command.env("GIT_SSH_COMMAND", ssh);
        command
    }

    /// The commit `git_ref` names in the repository: a branch, else a tag (peeled), else a
    /// commit id given as the ref itself.
    ///
    /// # Errors
    /// When the repository cannot be reached or has no such ref.
    pub async fn resolve(&self, git_ref: &GitRef, mut output: impl FnMut(bool, String)) -> anyhow::Result<String> {
        let name = git_ref.as_str();
        if is_commit_id(name) {
            return Ok(name.to_owned());
        }
        let mut command = self.command();
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
    /// checked out when the repository has them.
    ///
    /// # Errors
    /// When git fails (with its last lines of error output).
    pub async fn checkout(
        &self,
        git_ref: &GitRef,
        commit: &str,
        dir: &Path,
        mut output: impl FnMut(bool, String),
    ) -> anyhow::Result<()> {
        anyhow::ensure!(is_commit_id(commit), "{commit:?} is not a commit id");
        let dir_arg = dir.as_os_str();
        let mut init = self.command();
        init.arg("init").arg("--quiet").arg("--").arg(dir_arg);
        run(init, &mut output).await.context("creating the build directory")?;
        let mut shallow = self.command();
        shallow.arg("-C").arg(dir_arg).args(["fetch", "--depth", "1", "--no-tags", "--", self.url.as_str(), commit]);
        if run(shallow, &mut output).await.is_err() {
            output(true, format!("the server does not serve commits by id; fetching {}", git_ref.as_str()));
            let mut full = self.command();
            full.arg("-C").arg(dir_arg).args(["fetch", "--no-tags", "--", self.url.as_str(), git_ref.as_str()]);
            run(full, &mut output).await.context("fetching the repository")?;
        }
        let mut checkout = self.command();
        checkout.arg("-C").arg(dir_arg).args([
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "--quiet",
            "--detach",
            commit,
        ]);
        run(checkout, &mut output).await.with_context(|| format!("checking out {commit}"))?;
        if dir.join(".gitmodules").exists() {
            let mut submodules = self.command();
            submodules.arg("-C").arg(dir_arg).args(["submodule", "update", "--init", "--recursive", "--depth", "1"]);
            run(submodules, &mut output).await.context("checking out submodules")?;
        }
        Ok(())
    }
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
