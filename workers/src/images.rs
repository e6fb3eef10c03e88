//! Which images a deployment may use on a shared Docker Engine.
//!
//! The engine stores every tenant's images side by side, and resolves a name against all of
//! them (a short id prefix too). So a deployment uses an image only when it is one of:
//! - pulled for this deployment by its full reference, and then referred to by the digest the
//!   pull reported (never by a name that could resolve to another image);
//! - one the operator put on the engine and lets tenants use (`ZPANEL_LOCAL_IMAGES`), found by
//!   its name alone; such images are never pulled for a tenant, so nobody can replace them;
//! - built by Zpanel for the application, referred to by its id.
//!
//! Zpanel's own repositories (`zpanel/…`) and anything the engine could take for an image id
//! are never pulled or named for a tenant.

use zpanel_domain::values::ImageRef;

/// The images the operator put on the engine for tenants to use without a pull
/// (`ZPANEL_LOCAL_IMAGES`): references, or prefixes ending in `*`, such as
/// `registry.internal/base/*,busybox:1.36`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalImages {
    patterns: Vec<Pattern>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    /// `repository:tag` or `repository@digest`, as the engine names it.
    Exact(String),
    /// A prefix of that.
    Prefix(String),
}

impl LocalImages {
    /// Parses the comma-separated list.
    ///
    /// # Errors
    /// When an entry is not an image reference (or a prefix of one followed by `*`), or names
    /// Zpanel's own images.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let pattern = match entry.strip_suffix('*') {
                Some(prefix) => {
                    // A prefix is checked as a reference with a placeholder completing it.
                    let probe = if prefix.is_empty() || prefix.ends_with('/') {
                        format!("{prefix}x")
                    } else {
                        prefix.trim_end_matches([':', '-', '.', '_']).to_owned()
                    };
                    let image = ImageRef::parse(&probe).map_err(|e| format!("{entry}: {}", e.rule))?;
                    if image.is_zpanel_owned() || "zpanel/".starts_with(prefix) {
                        return Err(format!("{entry}: Zpanel's own images (zpanel/…) cannot be shared"));
                    }
                    Pattern::Prefix(normalized_prefix(prefix))
                }
                None => {
                    let image = ImageRef::parse_runnable(entry).map_err(|e| format!("{entry}: {}", e.rule))?;
                    Pattern::Exact(local_name(&image))
                }
            };
            patterns.push(pattern);
        }
        Ok(Self { patterns })
    }

    /// Whether `image` is one of them. Zpanel's own images never are.
    #[must_use]
    pub fn allows(&self, image: &ImageRef) -> bool {
        if image.is_zpanel_owned() || image.may_name_an_image_id() {
            return false;
        }
        let name = local_name(image);
        self.patterns.iter().any(|p| match p {
            Pattern::Exact(exact) => *exact == name,
            Pattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        })
    }

    /// Whether the list is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// `repository:tag` (or `repository@digest`) as the engine lists it among an image's tags
/// (digests).
#[must_use]
pub fn local_name(image: &ImageRef) -> String {
    match (image.tag(), image.digest()) {
        (_, Some(digest)) => format!("{}@{digest}", image.repository()),
        (Some(tag), None) => format!("{}:{tag}", image.repository()),
        (None, None) => image.repository(),
    }
}

/// A prefix as the engine names repositories: Docker Hub's domain and `library/` left out.
fn normalized_prefix(prefix: &str) -> String {
    let prefix =
        prefix.strip_prefix("docker.io/").or_else(|| prefix.strip_prefix("index.docker.io/")).unwrap_or(prefix);
    prefix.strip_prefix("library/").unwrap_or(prefix).to_owned()
}

/// Why a deployment may not use `image` at all, if it may not.
#[must_use]
pub fn refusal(image: &ImageRef) -> Option<&'static str> {
    if image.is_zpanel_owned() {
        Some("Zpanel's own images (zpanel/…) belong to the applications they were built for")
    } else if image.may_name_an_image_id() {
        Some("it could name an image id; name a repository and tag")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(s: &str) -> ImageRef {
        ImageRef::parse(s).expect("a reference")
    }

    #[test]
    fn local_images_match_by_the_name_the_engine_stores() {
        let local = LocalImages::parse("zpanel-test/*, busybox:1.36 ,docker.io/library/alpine").expect("parses");
        assert!(local.allows(&image("zpanel-test/busybox:latest")));
        assert!(local.allows(&image("zpanel-test/busybox")));
        assert!(local.allows(&image("docker.io/zpanel-test/busybox")));
        assert!(local.allows(&image("library/busybox:1.36")));
        assert!(local.allows(&image("alpine")));
        assert!(!local.allows(&image("alpine:3")));
        assert!(!local.allows(&image("busybox")));
        assert!(!local.allows(&image("evil.com/zpanel-test/busybox")));
        assert!(!LocalImages::default().allows(&image("alpine")));
    }

    #[test]
    fn zpanels_own_images_are_never_local_images() {
        for bad in ["*", "z*", "zpanel/*", "zpanel*", "zpanel/app:x", "docker.io/zpanel/*", "not an image"] {
            assert!(LocalImages::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn zpanels_images_and_image_ids_are_refused() {
        assert!(refusal(&image("zpanel/x:1")).is_some());
        assert!(refusal(&image("abcdef012345")).is_some());
        assert!(refusal(&image("nginx:1.27")).is_none());
    }
}
