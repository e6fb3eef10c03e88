//! Validated value types. Raw strings stop at the boundary (GraphQL inputs, CLI flags, config,
//! Kafka payloads): they are parsed into these types, whose constructors reject bad input with a
//! reason. Several of these values end up as arguments of `git` or the Docker Engine API, so the
//! rules are deliberately strict: nothing that could be read as an option (`-` prefix), a shell
//! metacharacter, a control character or an exotic git transport gets through.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a raw value was rejected: the rule it broke, in words a user can act on. The boundary
/// that parsed it adds the field name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{rule}")]
pub struct ValueError {
    /// The broken rule, lowercase, no trailing dot.
    pub rule: String,
}

impl ValueError {
    fn new(rule: impl Into<String>) -> Self {
        Self { rule: rule.into() }
    }
}

fn reject<T>(rule: impl Into<String>) -> Result<T, ValueError> {
    Err(ValueError::new(rule))
}

/// Implements the string plumbing shared by every string value type: `as_str`, `Display`,
/// `FromStr`, `TryFrom<String>` and serde through the parser (so a stored value that no longer
/// parses is caught when read, not when used).
macro_rules! string_value {
    ($name:ident) => {
        impl $name {
            /// The value as a string slice.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

const SHELL_METACHARACTERS: &[char] = &['$', '`', ';', '&', '|', '<', '>', '(', ')', '\\', '\'', '"', '\n'];

fn check_length(s: &str, min: usize, max: usize) -> Result<(), ValueError> {
    let len = s.chars().count();
    if len < min {
        return reject(if min == 1 {
            "must not be empty".to_owned()
        } else {
            format!("must be at least {min} characters")
        });
    }
    if len > max {
        return reject(format!("must be at most {max} characters"));
    }
    Ok(())
}

fn check_no_control(s: &str) -> Result<(), ValueError> {
    if s.chars().any(char::is_control) {
        return reject("must not contain control characters");
    }
    Ok(())
}

fn check_no_whitespace(s: &str) -> Result<(), ValueError> {
    if s.chars().any(char::is_whitespace) {
        return reject("must not contain whitespace");
    }
    Ok(())
}

/// A human-readable name of a resource (project, application, server, key, token, team).
/// 1–100 characters, no control characters, no leading or trailing whitespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// Parses a name.
    ///
    /// # Errors
    /// When it is empty, longer than 100 characters, has control characters or surrounding spaces.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 100)?;
        check_no_control(s)?;
        if s.trim() != s {
            return reject("must not start or end with whitespace");
        }
        Ok(Self(s.to_owned()))
    }
}
string_value!(Name);

/// The name of a project's environment (`production`, `staging`, `preview-42`): a slug, because
/// it ends up in container names and labels. 1–63 of `a-z 0-9 -`, starting with a letter or digit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EnvironmentName(String);

impl EnvironmentName {
    /// The environment every project starts with.
    pub const PRODUCTION: &'static str = "production";

    /// Parses an environment name.
    ///
    /// # Errors
    /// When it is not a slug of 1–63 lowercase letters, digits and hyphens.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 63)?;
        if !s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return reject("may contain only lowercase letters, digits and hyphens");
        }
        if s.starts_with('-') || s.ends_with('-') {
            return reject("must not start or end with a hyphen");
        }
        Ok(Self(s.to_owned()))
    }

    /// `production`.
    #[must_use]
    pub fn production() -> Self {
        Self(Self::PRODUCTION.to_owned())
    }
}
string_value!(EnvironmentName);

/// The transport a [`GitUrl`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GitTransport {
    /// `https://…` (or `http://` for a local mirror).
    Https,
    /// `ssh://…` or scp-like `git@host:path`.
    Ssh,
    /// An absolute path or `file:///…` to a repository on the machine.
    Local,
}

/// A git repository location: `https://host/path`, `ssh://[user@]host[:port]/path`,
/// `user@host:path`, or a local repository (`/abs/path`, `file:///abs/path`).
/// Never an option (`-…`), never a remote helper transport (`ext::`, `fd::`), no whitespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GitUrl(String);

impl GitUrl {
    /// Parses a repository URL.
    ///
    /// # Errors
    /// When the URL is not one of the accepted forms or contains forbidden characters.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 2048)?;
        check_no_control(s)?;
        check_no_whitespace(s)?;
        if s.starts_with('-') {
            return reject("must not start with '-'");
        }
        if s.contains("::") {
            return reject("must not use a remote-helper transport such as ext::");
        }
        if s.chars().any(|c| SHELL_METACHARACTERS.contains(&c)) {
            return reject("must not contain shell metacharacters");
        }
        Self::transport_of(s)?;
        Ok(Self(s.to_owned()))
    }

    fn transport_of(s: &str) -> Result<GitTransport, ValueError> {
        if let Some(rest) = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")) {
            check_url_rest(rest)?;
            return Ok(GitTransport::Https);
        }
        if let Some(rest) = s.strip_prefix("ssh://") {
            check_url_rest(rest)?;
            let authority = rest.split('/').next().unwrap_or_default();
            if let Some((user, _)) = authority.rsplit_once('@')
                && !user.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                // A password in an ssh URL is never used, only shown.
                return reject("the user before '@' may contain only letters, digits, '.', '_' and '-'");
            }
            return Ok(GitTransport::Ssh);
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return reject("a file:// url must name an absolute path");
            }
            check_local_path(path)?;
            return Ok(GitTransport::Local);
        }
        if s.starts_with('/') {
            check_local_path(s)?;
            return Ok(GitTransport::Local);
        }
        if s.contains("://") {
            return reject("must use https://, ssh://, file:// or the user@host:path form");
        }
        // scp-like: user@host:path (git treats `host:path` without a slash before the colon as ssh).
        if let Some((user_host, path)) = s.split_once(':') {
            let (user, host) = user_host.split_once('@').unwrap_or(("", user_host));
            if user_host.contains('/') || host.is_empty() || path.is_empty() {
                return reject("must be https://host/path, ssh://host/path, user@host:path or an absolute path");
            }
            if !user.is_empty() && !user.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                return reject("the user before '@' may contain only letters, digits, '.', '_' and '-'");
            }
            Host::parse(host).map_err(|e| ValueError::new(format!("the host {}", e.rule)))?;
            return Ok(GitTransport::Ssh);
        }
        reject("must be https://host/path, ssh://host/path, user@host:path or an absolute path")
    }

    /// Which transport the URL uses.
    #[must_use]
    pub fn transport(&self) -> GitTransport {
        // The constructor checked it.
        Self::transport_of(&self.0).unwrap_or(GitTransport::Https)
    }

    /// The path of a local repository (`/abs/path`, or `file:///abs/path` without its scheme);
    /// `None` for a remote one.
    #[must_use]
    pub fn local_path(&self) -> Option<&str> {
        match self.transport() {
            GitTransport::Local => Some(self.0.strip_prefix("file://").unwrap_or(&self.0)),
            GitTransport::Https | GitTransport::Ssh => None,
        }
    }

    /// The URL a submodule URL `raw` from `.gitmodules` names, read as git reads it: a relative
    /// one (`./x`, `../x`) against this repository's URL (`../x` is a sibling of the
    /// repository), any other as a URL of its own. Either way it must be a valid [`GitUrl`].
    ///
    /// # Errors
    /// When the result is not a valid repository URL, or a relative URL climbs above the
    /// repository's host (or above `/` for a local one).
    pub fn submodule(&self, raw: &str) -> Result<Self, ValueError> {
        if !(raw.starts_with("./") || raw.starts_with("../")) {
            return Self::parse(raw);
        }
        let (prefix, path) = self.split_path();
        let absolute = path.starts_with('/');
        let mut segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if segments.pop().is_none() {
                        return reject("a relative submodule url must not climb above the repository's host");
                    }
                }
                part => segments.push(part),
            }
        }
        let slash = if absolute { "/" } else { "" };
        Self::parse(&format!("{prefix}{slash}{}", segments.join("/")))
    }

    /// What names the host: `https://host:port`, `ssh://user@host`, `user@host:`, `file://`,
    /// or nothing for a local path. Credentials for `https` are scoped to it.
    #[must_use]
    pub fn origin(&self) -> &str {
        self.split_path().0
    }

    /// The URL split into its [origin](Self::origin) and the repository's path there.
    fn split_path(&self) -> (&str, &str) {
        let s = self.0.as_str();
        if let Some((scheme, rest)) = s.split_once("://") {
            let at = rest.find('/').map_or(s.len(), |i| scheme.len() + 3 + i);
            return s.split_at(at);
        }
        match self.transport() {
            GitTransport::Local => ("", s),
            // scp-like: the constructor checked that there is a ':'.
            GitTransport::Https | GitTransport::Ssh => s.split_at(s.find(':').map_or(0, |i| i + 1)),
        }
    }

    /// The credentials written into an `http(s)` URL (`https://user:token@host/…`), which
    /// must never be shown or passed on a command line.
    #[must_use]
    pub fn credentials(&self) -> Option<&str> {
        let rest = self.0.strip_prefix("https://").or_else(|| self.0.strip_prefix("http://"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        authority.rsplit_once('@').map(|(userinfo, _)| userinfo)
    }

    /// The URL without its [credentials](Self::credentials).
    #[must_use]
    pub fn without_credentials(&self) -> Self {
        match self.credentials() {
            Some(userinfo) => Self(self.0.replacen(&format!("{userinfo}@"), "", 1)),
            None => self.clone(),
        }
    }

    /// The URL as it may be shown: its credentials, if any, replaced by `***`.
    #[must_use]
    pub fn redacted(&self) -> String {
        match self.credentials() {
            Some(userinfo) => self.0.replacen(&format!("{userinfo}@"), &format!("{}@", Self::MASK), 1),
            None => self.0.clone(),
        }
    }

    /// The URL as it may be shown, for a repository that has `sealed` credentials besides:
    /// `https://***@host/path`, so a reader knows some are set (and giving this back as
    /// `gitUrl` keeps them), but never what they are.
    #[must_use]
    pub fn shown(&self, sealed: bool) -> String {
        match self.0.split_once("://") {
            Some((scheme, rest)) if sealed && self.credentials().is_none() && scheme.starts_with("http") => {
                format!("{scheme}://{}@{rest}", Self::MASK)
            }
            _ => self.redacted(),
        }
    }

    /// What [`redacted`](Self::redacted) shows in place of credentials.
    pub const MASK: &'static str = "***";
}
string_value!(GitUrl);

/// The directories an operator lets tenants clone local repositories from
/// (`ZPANEL_GIT_LOCAL_ROOTS`), with symbolic links resolved. None by default: a local path
/// reaches whatever the worker's user can read on its host, other teams' files among them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GitLocalRoots(Vec<std::path::PathBuf>);

impl GitLocalRoots {
    /// Roots given as canonical absolute paths (the caller resolves them when it reads its
    /// settings: the domain does no I/O).
    #[must_use]
    pub fn new(roots: Vec<std::path::PathBuf>) -> Self {
        Self(roots.into_iter().filter(|r| r.is_absolute()).collect())
    }

    /// The roots.
    #[must_use]
    pub fn roots(&self) -> &[std::path::PathBuf] {
        &self.0
    }

    /// Whether a local repository at `path` (its symbolic links resolved) lies under a root.
    #[must_use]
    pub fn contain(&self, path: &std::path::Path) -> bool {
        path.is_absolute() && self.0.iter().any(|root| path.starts_with(root))
    }

    /// Checks that `url` may be cloned here: any remote URL; a local one only when its path,
    /// with every symbolic link resolved by `canonicalize` (`std::fs::canonicalize`, passed in
    /// since the domain does no I/O), lies under a root. A path that does not exist yet is
    /// judged by its deepest existing ancestor, so a link created there later is caught by the
    /// check the worker makes again before it clones.
    ///
    /// # Errors
    /// When `url` is local and outside every root, or its path cannot be read.
    pub fn admit(
        &self,
        url: &GitUrl,
        canonicalize: impl Fn(&std::path::Path) -> std::io::Result<std::path::PathBuf>,
    ) -> Result<(), ValueError> {
        let Some(path) = url.local_path() else { return Ok(()) };
        if self.0.is_empty() {
            return reject("must not be a local path: this installation allows no local repositories");
        }
        let outside = || reject("must lie under a directory this installation allows local repositories from");
        let mut existing = std::path::Path::new(path);
        let mut missing = Vec::new();
        let canonical = loop {
            match canonicalize(existing) {
                Ok(canonical) => break canonical,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                        return outside();
                    };
                    missing.push(name);
                    existing = parent;
                }
                Err(_) => return outside(),
            }
        };
        // No '..' in the missing part: GitUrl refuses it.
        let full = missing.iter().rev().fold(canonical, |path, name| path.join(name));
        if self.contain(&full) { Ok(()) } else { outside() }
    }
}

fn check_url_rest(rest: &str) -> Result<(), ValueError> {
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            if !port.is_empty() {
                Port::parse(port).map_err(|e| ValueError::new(format!("the port {}", e.rule)))?;
            }
            host
        }
        _ => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Host::parse(host).map_err(|e| ValueError::new(format!("the host {}", e.rule)))?;
    Ok(())
}

fn check_local_path(path: &str) -> Result<(), ValueError> {
    if path.split('/').any(|segment| segment == "..") {
        return reject("a local path must not contain '..'");
    }
    Ok(())
}

/// A git ref (branch, tag, or commit) following `git check-ref-format`'s rules, plus: no shell
/// metacharacters and no leading `-`, so it can never be mistaken for an option.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GitRef(String);

impl GitRef {
    /// Parses a ref name.
    ///
    /// # Errors
    /// When it breaks one of git's ref-name rules or contains a shell metacharacter.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 255)?;
        // Git itself refuses only ASCII controls; C1 controls (U+0080–U+009F, e.g. the 8-bit CSI
        // U+009B) go too, since refs end up in logs shown on terminals.
        check_no_control(s)?;
        if let Some(c) = s.chars().find(|c| SHELL_METACHARACTERS.contains(c)) {
            return reject(format!("must not contain the shell metacharacter {c:?}"));
        }
        if let Some(c) = s.chars().find(|c| [' ', '~', '^', ':', '?', '*', '['].contains(c)) {
            return reject(format!("must not contain {c:?}"));
        }
        if s.starts_with('-') {
            return reject("must not start with '-'");
        }
        if s == "@" {
            return reject("must not be '@' alone");
        }
        if s.contains("@{") {
            return reject("must not contain '@{'");
        }
        if s.contains("..") {
            return reject("must not contain '..'");
        }
        if s.starts_with('/') || s.ends_with('/') || s.contains("//") {
            return reject("must not start or end with '/' or contain '//'");
        }
        if s.ends_with('.') {
            return reject("must not end with '.'");
        }
        for component in s.split('/') {
            if component.starts_with('.') {
                return reject("no part between slashes may start with '.'");
            }
            if component.ends_with(".lock") {
                return reject("no part between slashes may end with '.lock'");
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// Whether it is a full 40-hex commit id rather than a name.
    #[must_use]
    pub fn is_commit(&self) -> bool {
        self.0.len() == 40 && self.0.chars().all(|c| c.is_ascii_hexdigit())
    }
}
string_value!(GitRef);

/// A Docker image reference: `[registry[:port]/]path[:tag][@algo:digest]`, following the
/// distribution reference grammar (lowercase path components, tag of at most 128 characters).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef(String);

impl ImageRef {
    /// Parses an image reference.
    ///
    /// # Errors
    /// When it does not follow the reference grammar.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 512)?;
        check_no_control(s)?;
        check_no_whitespace(s)?;
        if s.starts_with('-') {
            return reject("must not start with '-'");
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        if let Some(digest) = digest {
            let Some((algo, hex)) = digest.split_once(':') else {
                return reject("a digest must look like sha256:<hex>");
            };
            let algo_ok = !algo.is_empty()
                && algo.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
            let hex_ok = hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
            if !algo_ok || !hex_ok {
                return reject("a digest must look like sha256:<hex>");
            }
        }
        // The tag is after the last ':' that follows the last '/'.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
            None => (name_tag, None),
        };
        if let Some(tag) = tag {
            let mut chars = tag.chars();
            let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if !first_ok || tag.len() > 128 || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
                return reject("a tag must be 1–128 of letters, digits, '_', '.', '-', not starting with '.' or '-'");
            }
        }
        let mut components: Vec<&str> = name.split('/').collect();
        if components.len() > 1 {
            let first = components[0];
            if first.contains('.') || first.contains(':') || first == "localhost" {
                let (host, port) = first.split_once(':').map_or((first, None), |(h, p)| (h, Some(p)));
                Host::parse(host).map_err(|e| ValueError::new(format!("the registry {}", e.rule)))?;
                if let Some(port) = port {
                    Port::parse(port).map_err(|e| ValueError::new(format!("the registry port {}", e.rule)))?;
                }
                components.remove(0);
            }
        }
        if components.is_empty() {
            return reject("must name a repository");
        }
        for component in components {
            if !is_path_component(component) {
                return reject(
                    "each path component must be lowercase letters and digits, separated by '.', '_', '__' or '-'",
                );
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// Parses a reference an application may name: [`ImageRef::parse`], outside Zpanel's own
    /// repositories (`zpanel/…` on Docker Hub, where it tags the images it builds), and not
    /// something the Docker Engine could take for an image id. Either would let a tenant run,
    /// or overwrite, an image Zpanel built for another application.
    ///
    /// # Errors
    /// When it does not follow the reference grammar or names what Zpanel keeps for itself.
    pub fn parse_runnable(s: &str) -> Result<Self, ValueError> {
        let image = Self::parse(s)?;
        if image.is_zpanel_owned() {
            return reject("must not name Zpanel's own images (zpanel/…)");
        }
        if image.may_name_an_image_id() {
            return reject("must name a repository, not an image id (add a tag, e.g. :latest)");
        }
        Ok(image)
    }

    /// The registry (`ghcr.io`, `localhost:5000`), the repository path in it, the tag and the
    /// digest. `None` for the registry means Docker Hub.
    fn parts(&self) -> (Option<&str>, &str, Option<&str>, Option<&str>) {
        let (name_tag, digest) = match self.0.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (self.0.as_str(), None),
        };
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
            None => (name_tag, None),
        };
        match name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                let registry = (first != "docker.io" && first != "index.docker.io").then_some(first);
                (registry, rest, tag, digest)
            }
            _ => (None, name, tag, digest),
        }
    }

    /// The repository as the Docker Engine names it locally (`nginx`, `ghcr.io/org/app`): Docker
    /// Hub's domain and its `library/` left out.
    #[must_use]
    pub fn repository(&self) -> String {
        match self.parts() {
            (Some(registry), path, _, _) => format!("{registry}/{path}"),
            (None, path, _, _) => path.strip_prefix("library/").filter(|p| !p.contains('/')).unwrap_or(path).to_owned(),
        }
    }

    /// The tag (`latest` when none is given and no digest pins the image).
    #[must_use]
    pub fn tag(&self) -> Option<&str> {
        match self.parts() {
            (_, _, Some(tag), _) => Some(tag),
            (_, _, None, None) => Some("latest"),
            (_, _, None, Some(_)) => None,
        }
    }

    /// The digest (`sha256:…`), when the reference pins one.
    #[must_use]
    pub fn digest(&self) -> Option<&str> {
        self.parts().3
    }

    /// Whether it names one of Zpanel's own repositories: `zpanel/…` on Docker Hub, which the
    /// engine stores under the same local name as the images Zpanel builds.
    #[must_use]
    pub fn is_zpanel_owned(&self) -> bool {
        matches!(self.parts(), (None, path, _, _) if path.starts_with("zpanel/"))
    }

    /// Whether the Docker Engine could take it for an image id or a prefix of one: a Docker
    /// Hub name of hex digits alone with no tag (looked up as an id when no such repository is
    /// stored), or `sha256:<hex>`.
    #[must_use]
    pub fn may_name_an_image_id(&self) -> bool {
        let hex = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit());
        match self.parts() {
            (None, path, None, None) => hex(path),
            (None, "sha256", Some(tag), None) => hex(tag),
            _ => false,
        }
    }
}
string_value!(ImageRef);

fn is_path_component(c: &str) -> bool {
    let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
    if c.is_empty() || !c.starts_with(alnum) || !c.ends_with(alnum) {
        return false;
    }
    // Separators: '.', '_', '__', or any run of '-'.
    let bytes = c.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let ch = bytes[i] as char;
        if alnum(ch) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i] as char) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|s| s == '-');
        if !ok {
            return false;
        }
    }
    true
}

/// A domain name an application answers on: lowercase DNS labels of `a-z 0-9 -` (1–63 each, not
/// starting or ending with a hyphen), at least two labels, at most 253 characters. A leading
/// `*.` label asks for a wildcard. Input is lowercased.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(String);

impl DomainName {
    /// Parses a domain name.
    ///
    /// # Errors
    /// When a label or the whole breaks the DNS hostname rules.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let lower = s.to_ascii_lowercase();
        let s = lower.strip_suffix('.').unwrap_or(&lower);
        check_length(s, 1, 253)?;
        let rest = s.strip_prefix("*.").unwrap_or(s);
        let labels: Vec<&str> = rest.split('.').collect();
        if labels.len() + usize::from(rest.len() != s.len()) < 2 {
            return reject("must have at least two labels, like example.com");
        }
        for label in &labels {
            check_label(label)?;
        }
        if labels.last().is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit())) {
            return reject("must be a name, not an IP address");
        }
        Ok(Self(s.to_owned()))
    }
}
string_value!(DomainName);

impl DomainName {
    /// Whether it is a wildcard (`*.example.com`), which matches any one label in place of `*`
    /// (as Caddy's host matcher and wildcard certificates do): `a.example.com`, not
    /// `example.com` nor `b.a.example.com`.
    #[must_use]
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// The zone a claim on this name is decided in: the parent of an exact host
    /// (`example.com` for `a.example.com`), the base of a wildcard (`example.com` for
    /// `*.example.com`). Two names that overlap always share it, so claims are serialized per
    /// scope and only names of one scope are compared.
    #[must_use]
    pub fn scope(&self) -> &str {
        match self.0.strip_prefix("*.") {
            Some(base) => base,
            None => self.0.split_once('.').map_or(self.0.as_str(), |(_, parent)| parent),
        }
    }

    /// Whether some host is matched by both: equal names, or a wildcard and a host one label
    /// below its base.
    #[must_use]
    pub fn overlaps(&self, other: &Self) -> bool {
        match (self.is_wildcard(), other.is_wildcard()) {
            (false, false) | (true, true) => self == other,
            (true, false) => other.scope() == self.scope(),
            (false, true) => self.scope() == other.scope(),
        }
    }

    /// Checks that an application may claim this name: not a wildcard at a public suffix
    /// (`*.com`, `*.co.uk`, `*.github.io`: every registrant's names at once), and not
    /// overlapping a host `reserved` for the control plane itself.
    ///
    /// # Errors
    /// The rule it breaks.
    pub fn check_claimable<'a>(&self, reserved: impl IntoIterator<Item = &'a Self>) -> Result<(), ValueError> {
        if self.is_wildcard() && is_public_suffix(self.scope()) {
            return reject(format!(
                "{self} is a wildcard over a public suffix, which would take every name registered under it"
            ));
        }
        if let Some(host) = reserved.into_iter().find(|host| self.overlaps(host)) {
            return reject(format!("{self} would route {host}, which is reserved for the control plane"));
        }
        Ok(())
    }
}

/// Whether `name` is a public suffix by the public suffix list (its private section included),
/// or by the list's default rule, under which an unknown top-level name is one.
fn is_public_suffix(name: &str) -> bool {
    psl::suffix(name.as_bytes()).is_some_and(|suffix| suffix.as_bytes() == name.as_bytes())
}

fn check_label(label: &str) -> Result<(), ValueError> {
    if label.is_empty() {
        return reject("must not have empty labels");
    }
    if label.len() > 63 {
        return reject("each label must be at most 63 characters");
    }
    if !label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        return reject("labels may contain only letters, digits and hyphens");
    }
    if label.starts_with('-') || label.ends_with('-') {
        return reject("labels must not start or end with a hyphen");
    }
    Ok(())
}

/// A server's address: a DNS hostname (one label allowed, e.g. `localhost`) or an IP address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Host(String);

impl Host {
    /// Parses a host.
    ///
    /// # Errors
    /// When it is neither an IP address nor a valid hostname.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 253)?;
        if s.parse::<std::net::IpAddr>().is_ok() {
            return Ok(Self(s.to_owned()));
        }
        if s.starts_with('-') {
            return reject("must not start with '-'");
        }
        let lower = s.to_ascii_lowercase();
        for label in lower.split('.') {
            check_label(label).map_err(|_| {
                ValueError::new("must be an IP address or a hostname of letters, digits, hyphens and dots")
            })?;
        }
        Ok(Self(lower))
    }
}
string_value!(Host);

/// An environment variable name: a letter or `_`, then letters, digits or `_`; at most 255.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EnvKey(String);

impl EnvKey {
    /// Parses a variable name.
    ///
    /// # Errors
    /// When it does not match `[A-Za-z_][A-Za-z0-9_]*` or is longer than 255.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 255)?;
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok {
            return reject("must start with a letter or '_'");
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return reject("may contain only letters, digits and '_'");
        }
        Ok(Self(s.to_owned()))
    }
}
string_value!(EnvKey);

/// A TCP port, 1–65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u16")]
pub struct Port(u16);

impl Port {
    /// Parses a port from text.
    ///
    /// # Errors
    /// When it is not a number from 1 to 65535.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let n: u32 = s.parse().map_err(|_| ValueError::new("must be a number from 1 to 65535"))?;
        Self::try_from(n)
    }

    /// The port number.
    #[must_use]
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u32> for Port {
    type Error = ValueError;
    fn try_from(n: u32) -> Result<Self, Self::Error> {
        match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(Self(p)),
            _ => reject("must be a number from 1 to 65535"),
        }
    }
}

impl TryFrom<i64> for Port {
    type Error = ValueError;
    fn try_from(n: i64) -> Result<Self, Self::Error> {
        u32::try_from(n).map_err(|_| ValueError::new("must be a number from 1 to 65535")).and_then(Self::try_from)
    }
}

impl From<Port> for u16 {
    fn from(p: Port) -> u16 {
        p.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The path of an HTTP health check: starts with `/`, printable ASCII without spaces or `#`,
/// at most 1024 characters. A query string is allowed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HealthPath(String);

impl HealthPath {
    /// Parses a health-check path.
    ///
    /// # Errors
    /// When it does not start with `/`, contains spaces, `#`, a `..` segment, shell
    /// metacharacters (`` $ ` ; | < > ( ) \ ' " ``) or non-printable characters.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 1024)?;
        if !s.starts_with('/') {
            return reject("must start with '/'");
        }
        if !s.chars().all(|c| c.is_ascii_graphic()) {
            return reject("may contain only printable ASCII characters without spaces");
        }
        if s.contains('#') {
            return reject("must not contain a fragment ('#')");
        }
        if s.chars().any(|c| "$`;|<>()\\'\"".contains(c)) {
            return reject("must not contain shell metacharacters ($ ` ; | < > ( ) \\ ' \")");
        }
        if s.split(['/', '?']).any(|segment| segment == "..") {
            return reject("must not contain '..' segments");
        }
        Ok(Self(s.to_owned()))
    }

    /// `/`.
    #[must_use]
    pub fn root() -> Self {
        Self("/".to_owned())
    }
}
string_value!(HealthPath);

/// A path inside the repository (the Dockerfile, the build context): relative, no `..`, no
/// leading `-`, no control characters; at most 1024 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoPath(String);

impl RepoPath {
    /// Parses a path inside a repository.
    ///
    /// # Errors
    /// When it is absolute, climbs out with `..`, starts with `-`, or has a character other
    /// than letters, digits and `. _ - / @ + = , :` (no spaces, no shell metacharacters).
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 1024)?;
        check_no_control(s)?;
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || "._-/@+=,:".contains(c)) {
            return reject("may contain only letters, digits and . _ - / @ + = , :");
        }
        if s.starts_with('/') {
            return reject("must be relative to the repository root");
        }
        if s.starts_with('-') {
            return reject("must not start with '-'");
        }
        if s.split('/').any(|segment| segment == "..") {
            return reject("must not contain '..'");
        }
        Ok(Self(s.to_owned()))
    }

    /// `Dockerfile`, the default.
    #[must_use]
    pub fn dockerfile() -> Self {
        Self("Dockerfile".to_owned())
    }
}
string_value!(RepoPath);

/// A Unix account name on a server (`root`, `deploy`): `[a-z_][a-z0-9_-]*`, at most 32.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UnixUser(String);

impl UnixUser {
    /// Parses a Unix user name.
    ///
    /// # Errors
    /// When it does not match `[a-z_][a-z0-9_-]*` or is longer than 32.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        check_length(s, 1, 32)?;
        let mut chars = s.chars();
        if !chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_') {
            return reject("must start with a lowercase letter or '_'");
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-') {
            return reject("may contain only lowercase letters, digits, '_' and '-'");
        }
        Ok(Self(s.to_owned()))
    }
}
string_value!(UnixUser);

/// What an API token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Ability {
    /// Queries.
    #[serde(rename = "read")]
    Read,
    /// Secret values unmasked.
    #[serde(rename = "read:sensitive")]
    ReadSensitive,
    /// Configuration mutations.
    #[serde(rename = "write")]
    Write,
    /// Deploy, cancel, roll back.
    #[serde(rename = "deploy")]
    Deploy,
    /// Everything, tokens included.
    #[serde(rename = "root")]
    Root,
}

impl Ability {
    /// Every ability, in order.
    pub const ALL: [Self; 5] = [Self::Read, Self::ReadSensitive, Self::Write, Self::Deploy, Self::Root];

    /// The wire name (`read:sensitive`).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::ReadSensitive => "read:sensitive",
            Self::Write => "write",
            Self::Deploy => "deploy",
            Self::Root => "root",
        }
    }

    /// Parses a wire name.
    ///
    /// # Errors
    /// When it is not one of `read`, `read:sensitive`, `write`, `deploy`, `root`.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| ValueError::new("must be one of read, read:sensitive, write, deploy, root"))
    }
}

impl fmt::Display for Ability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of abilities. `root` implies every other.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Abilities(std::collections::BTreeSet<Ability>);

impl Abilities {
    /// From a list, deduplicated.
    #[must_use]
    pub fn new(abilities: impl IntoIterator<Item = Ability>) -> Self {
        Self(abilities.into_iter().collect())
    }

    /// Whether these abilities allow `ability` (directly, or through `root`).
    #[must_use]
    pub fn allows(&self, ability: Ability) -> bool {
        self.0.contains(&Ability::Root) || self.0.contains(&ability)
    }

    /// Whether every ability in `other` is allowed by these.
    #[must_use]
    pub fn covers(&self, other: &Self) -> bool {
        other.0.iter().all(|a| self.allows(*a))
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The abilities, in order.
    pub fn iter(&self) -> impl Iterator<Item = Ability> + '_ {
        self.0.iter().copied()
    }
}

/// Container resource limits. `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Memory limit in bytes; at least 6 MiB (Docker's minimum).
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU (1000 = one CPU); 1 to 1,024,000.
    pub cpu_millis: Option<u32>,
}

impl ResourceLimits {
    /// Docker refuses a memory limit below 6 MiB.
    pub const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;

    /// Checks the limits.
    ///
    /// # Errors
    /// When memory is under 6 MiB or the CPU limit is 0 or over 1024 CPUs.
    pub fn new(memory_bytes: Option<u64>, cpu_millis: Option<u32>) -> Result<Self, ValueError> {
        if memory_bytes.is_some_and(|m| m < Self::MIN_MEMORY_BYTES) {
            return reject("memory must be at least 6 MiB (6291456 bytes)");
        }
        if cpu_millis.is_some_and(|c| c == 0 || c > 1_024_000) {
            return reject("cpu must be between 0.001 and 1024 CPUs");
        }
        Ok(Self { memory_bytes, cpu_millis })
    }
}

/// How the deploy worker checks that a new container is healthy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    /// HTTP path requested through the container's published port.
    pub path: HealthPath,
    /// Seconds between attempts (1–300).
    pub interval_secs: u32,
    /// Seconds one attempt may take (1–300, at most the interval).
    pub timeout_secs: u32,
    /// Failed attempts tolerated after the start period (1–100).
    pub retries: u32,
    /// Seconds after start during which failures don't count (0–3600).
    pub start_period_secs: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self { path: HealthPath::root(), interval_secs: 2, timeout_secs: 2, retries: 15, start_period_secs: 0 }
    }
}

impl HealthCheck {
    /// Checks the timings.
    ///
    /// # Errors
    /// When a timing is out of range or the timeout exceeds the interval.
    pub fn new(
        path: HealthPath,
        interval_secs: u32,
        timeout_secs: u32,
        retries: u32,
        start_period_secs: u32,
    ) -> Result<Self, ValueError> {
        if !(1..=300).contains(&interval_secs) {
            return reject("interval must be between 1 and 300 seconds");
        }
        if !(1..=300).contains(&timeout_secs) {
            return reject("timeout must be between 1 and 300 seconds");
        }
        if timeout_secs > interval_secs {
            return reject("timeout must not exceed the interval");
        }
        if !(1..=100).contains(&retries) {
            return reject("retries must be between 1 and 100");
        }
        if start_period_secs > 3600 {
            return reject("start period must be at most 3600 seconds");
        }
        Ok(Self { path, interval_secs, timeout_secs, retries, start_period_secs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_urls_of_every_accepted_form_parse() {
        for ok in [
            "https://github.com/zpanel/zpanel.git",
            "http://127.0.0.1:3000/repo.git",
            "ssh://git@github.com:22/zpanel/zpanel.git",
            "git@github.com:zpanel/zpanel.git",
            "/srv/repos/app.git",
            "file:///srv/repos/app.git",
        ] {
            assert!(GitUrl::parse(ok).is_ok(), "{ok} should parse");
        }
        assert_eq!(GitUrl::parse("/srv/app").map(|u| u.transport()), Ok(GitTransport::Local));
        assert_eq!(GitUrl::parse("git@h.io:a/b").map(|u| u.transport()), Ok(GitTransport::Ssh));
    }

    #[test]
    fn dangerous_git_urls_are_rejected() {
        for bad in [
            "-uhttps://x",
            "--upload-pack=touch /tmp/pwn",
            "ext::sh -c touch% /tmp/pwned",
            "fd::17",
            "https://exa mple.com/x",
            "https://example.com/x\n",
            "https://example.com/$(id)",
            "ftp://example.com/x",
            "relative/path",
            "/srv/../etc",
            "",
        ] {
            assert!(GitUrl::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    fn url(s: &str) -> GitUrl {
        GitUrl::parse(s).expect("valid url")
    }

    #[test]
    fn relative_submodule_urls_resolve_against_the_repository_as_git_resolves_them() {
        for (base, raw, resolved) in [
            ("https://h.io/acme/web.git", "../lib.git", "https://h.io/acme/lib.git"),
            ("https://h.io/acme/web.git", "./vendor/x", "https://h.io/acme/web.git/vendor/x"),
            ("https://h.io:8443/acme/web", "../../other/lib", "https://h.io:8443/other/lib"),
            ("git@h.io:acme/web.git", "../lib.git", "git@h.io:acme/lib.git"),
            ("ssh://git@h.io/acme/web.git", "../lib", "ssh://git@h.io/acme/lib"),
            ("/srv/repos/web", "../lib", "/srv/repos/lib"),
            ("/srv/repos/web", "../../../etc/secrets", "/etc/secrets"),
            ("file:///srv/repos/web", "../lib", "file:///srv/repos/lib"),
            ("https://h.io/acme/web.git", "https://other.io/lib.git", "https://other.io/lib.git"),
            ("https://h.io/acme/web.git", "/etc/secrets", "/etc/secrets"),
        ] {
            assert_eq!(url(base).submodule(raw).map(String::from), Ok(resolved.to_owned()), "{raw} in {base}");
        }
        for (base, raw) in [
            ("https://h.io/acme/web.git", "../../../x"),
            ("git@h.io:acme/web.git", "../../../x"),
            ("/srv/web", "../../../x"),
            ("https://h.io/acme/web.git", "ext::sh -c id"),
            ("https://h.io/acme/web.git", "-uhttps://x"),
            ("https://h.io/acme/web.git", "relative/without/dot"),
        ] {
            assert!(url(base).submodule(raw).is_err(), "{raw:?} in {base} should be refused");
        }
    }

    #[test]
    fn credentials_in_a_url_are_found_removed_and_masked() {
        let with = url("https://oauth2:glpat-s3cr3t@gitlab.example.com/acme/web.git");
        assert_eq!(with.credentials(), Some("oauth2:glpat-s3cr3t"));
        assert_eq!(with.without_credentials().as_str(), "https://gitlab.example.com/acme/web.git");
        assert_eq!(with.redacted(), "https://***@gitlab.example.com/acme/web.git");
        let token_only = url("http://ghp_token@127.0.0.1:3000/repo.git");
        assert_eq!(token_only.credentials(), Some("ghp_token"));
        assert_eq!(token_only.redacted(), "http://***@127.0.0.1:3000/repo.git");
        for plain in ["https://h.io/a@b", "git@h.io:a/b", "ssh://git@h.io/a", "/srv/a@b"] {
            assert_eq!(url(plain).credentials(), None, "{plain}");
            assert_eq!(url(plain).redacted(), plain);
        }
        assert!(GitUrl::parse("ssh://git:password@h.io/a").is_err(), "an ssh password is refused");
    }

    fn no_links(path: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
        Ok(path.to_path_buf())
    }

    #[test]
    fn local_repositories_are_admitted_only_under_a_root() {
        let roots = GitLocalRoots::new(vec!["/srv/repos".into()]);
        assert_eq!(roots.admit(&url("/srv/repos/web"), no_links), Ok(()));
        assert_eq!(roots.admit(&url("file:///srv/repos/a/b"), no_links), Ok(()));
        assert_eq!(roots.admit(&url("https://h.io/a"), no_links), Ok(()));
        for outside in ["/srv/repos-other/web", "/etc", "file:///root/.ssh", "/srv"] {
            assert!(roots.admit(&url(outside), no_links).is_err(), "{outside} should be refused");
        }
        let none = GitLocalRoots::default();
        assert!(none.admit(&url("/srv/repos/web"), no_links).is_err(), "no roots: no local repositories");
        assert_eq!(none.admit(&url("git@h.io:a/b"), no_links), Ok(()));
    }

    #[test]
    fn a_link_under_a_root_is_judged_by_where_it_leads() {
        let roots = GitLocalRoots::new(vec!["/srv/repos".into()]);
        // /srv/repos/link -> /etc; /srv/repos/new does not exist yet.
        let resolve = |path: &std::path::Path| -> std::io::Result<std::path::PathBuf> {
            let s = path.to_str().unwrap_or_default();
            if let Some(rest) = s.strip_prefix("/srv/repos/link") {
                return Ok(format!("/etc{rest}").into());
            }
            if s.starts_with("/srv/repos/new") {
                return Err(std::io::ErrorKind::NotFound.into());
            }
            Ok(path.to_path_buf())
        };
        assert!(roots.admit(&url("/srv/repos/link/shadow"), resolve).is_err());
        assert_eq!(roots.admit(&url("/srv/repos/new/web.git"), resolve), Ok(()));
        let denied = |_: &std::path::Path| -> std::io::Result<std::path::PathBuf> {
            Err(std::io::ErrorKind::PermissionDenied.into())
        };
        assert!(roots.admit(&url("/srv/repos/web"), denied).is_err(), "unreadable: refused");
    }

    #[test]
    fn git_refs_follow_git_rules() {
        for ok in ["main", "feature/login", "v1.2.3", "release-2024.01", "0123456789abcdef0123456789abcdef01234567"] {
            assert!(GitRef::parse(ok).is_ok(), "{ok} should parse");
        }
        for bad in [
            "",
            "-main",
            "a..b",
            "a/.hidden",
            "x.lock",
            "a//b",
            "/a",
            "a/",
            "a.",
            "@",
            "a@{1}",
            "a b",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[",
            "$(id)",
            "a;b",
            "a|b",
            "a&b",
            "a`b`",
            "a>b",
            "a'b",
            "a\"b",
            "a\\b",
            "a\nb",
            "a\u{9b}b",
        ] {
            assert!(GitRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn image_references_follow_the_distribution_grammar() {
        for ok in [
            "nginx",
            "nginx:1.27-alpine",
            "library/nginx:latest",
            "ghcr.io/zpanel/app:v1",
            "localhost:5000/app",
            "registry.example.com:5000/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "zpanel/app_name__x",
        ] {
            assert!(ImageRef::parse(ok).is_ok(), "{ok} should parse");
        }
        for bad in ["", "Nginx", "-nginx", "nginx:", "nginx:-x", "a//b", "nginx latest", "app@sha256:xyz", "a..b"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn an_application_image_cannot_name_zpanels_own_repositories_or_an_image_id() {
        for reserved in [
            "zpanel/0190c6d2-8c1e-7000-8000-000000000000:build-abc",
            "docker.io/zpanel/app",
            "index.docker.io/zpanel/app:v1",
            "abc123",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(ImageRef::parse(reserved).is_ok(), "{reserved} is a reference");
            assert!(ImageRef::parse_runnable(reserved).is_err(), "{reserved} should be refused");
        }
        for ok in ["nginx", "abc123:1", "ghcr.io/zpanel/app:v1", "zpanel-test/busybox", "myorg/zpanel", "cafe/app"] {
            assert!(ImageRef::parse_runnable(ok).is_ok(), "{ok} should be allowed");
        }
    }

    #[test]
    fn an_image_reference_splits_as_the_docker_engine_names_it() {
        let parse = |s: &str| ImageRef::parse(s).expect("valid");
        assert_eq!(parse("docker.io/library/nginx").repository(), "nginx");
        assert_eq!(parse("docker.io/library/nginx").tag(), Some("latest"));
        assert_eq!(parse("library/nginx:1.27").repository(), "nginx");
        assert_eq!(parse("localhost:5000/a/b:v1").repository(), "localhost:5000/a/b");
        assert_eq!(parse("localhost:5000/a/b:v1").tag(), Some("v1"));
        let pinned = parse("ghcr.io/o/a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
        assert_eq!(pinned.repository(), "ghcr.io/o/a");
        assert_eq!(pinned.tag(), None);
        assert!(pinned.digest().is_some_and(|d| d.starts_with("sha256:")));
    }

    #[test]
    fn domain_names_are_lowercased_and_checked() {
        assert_eq!(DomainName::parse("App.Example.COM").map(String::from), Ok("app.example.com".to_owned()));
        assert!(DomainName::parse("*.example.com").is_ok());
        assert!(DomainName::parse("app.localhost").is_ok());
        for bad in ["", "localhost", "-a.com", "a-.com", "a..com", "a_b.com", "1.2.3.4", "a.com/x", "a b.com"] {
            assert!(DomainName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn a_wildcard_overlaps_the_hosts_one_label_below_it_and_nothing_else() {
        let d = |s: &str| DomainName::parse(s).expect("valid domain");
        let wildcard = d("*.example.com");
        assert!(wildcard.overlaps(&d("a.example.com")) && d("a.example.com").overlaps(&wildcard));
        assert!(wildcard.overlaps(&d("*.example.com")));
        assert!(d("a.example.com").overlaps(&d("a.example.com")));
        for apart in ["example.com", "b.a.example.com", "*.a.example.com", "a.example.org"] {
            assert!(!d("a.example.com").overlaps(&d(apart)), "{apart}");
            assert!(!wildcard.overlaps(&d(apart)), "{apart}");
        }
        assert!(!d("a.example.com").overlaps(&d("b.example.com")));
        // Overlapping names share a scope: claims are compared within one.
        assert_eq!(wildcard.scope(), d("a.example.com").scope());
        assert_eq!(d("example.com").scope(), "com");
    }

    #[test]
    fn a_wildcard_at_a_public_suffix_or_over_the_control_plane_cannot_be_claimed() {
        let d = |s: &str| DomainName::parse(s).expect("valid domain");
        let reserved = [d("zpanel.example.com")];
        for refused in ["*.com", "*.co.uk", "*.github.io", "*.example", "*.example.com", "zpanel.example.com"] {
            let claim = d(refused).check_claimable(&reserved);
            assert!(claim.is_err(), "{refused} should be refused");
        }
        for fine in ["*.example.co.uk", "*.apps.example.com", "example.com", "a.example.com", "a.zpanel.example.com"] {
            assert_eq!(d(fine).check_claimable(&reserved), Ok(()), "{fine}");
        }
    }

    #[test]
    fn env_keys_ports_and_paths_have_their_rules() {
        assert!(EnvKey::parse("DATABASE_URL").is_ok());
        assert!(EnvKey::parse("_x1").is_ok());
        assert!(EnvKey::parse("1X").is_err());
        assert!(EnvKey::parse("A-B").is_err());
        assert_eq!(Port::parse("8080").map(Port::get), Ok(8080));
        assert!(Port::parse("0").is_err());
        assert!(Port::parse("65536").is_err());
        assert!(HealthPath::parse("/health?full=1").is_ok());
        assert!(HealthPath::parse("health").is_err());
        assert!(RepoPath::parse("docker/Dockerfile.prod").is_ok());
        assert!(RepoPath::parse("../Dockerfile").is_err());
    }

    #[test]
    fn root_allows_everything_and_covers_every_set() {
        let root = Abilities::new([Ability::Root]);
        let read = Abilities::new([Ability::Read]);
        assert!(root.covers(&Abilities::new(Ability::ALL)));
        assert!(!read.covers(&Abilities::new([Ability::Write])));
        assert!(read.covers(&Abilities::default()));
    }
}
