//! Image references (`alpine:3.20`, `127.0.0.1:5000/x@sha256:…`), parsed and normalized the
//! way Docker does: a missing registry is `docker.io`, a one-component name on it gets
//! `library/`, and a reference with neither tag nor digest means `:latest`.
//!
//! The grammar is Docker's (`distribution/reference`), written out by hand rather than as one
//! regular expression so that every rejection can say what is wrong, and so that bracketed IPv6
//! registries (`[::1]:5000/x`) parse, which oci-client's parser refuses.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use super::OciError;

/// The registry used when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Another spelling of [`DEFAULT_REGISTRY`] that normalizes to it, and the host oci-client
/// sends the default registry's API requests to.
const LEGACY_DEFAULT_REGISTRY: &str = "index.docker.io";
const OFFICIAL_REPOSITORY_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
const NAME_MAX_LEN: usize = 255;
const TAG_MAX_LEN: usize = 128;

/// A normalized image reference. Displays in its full form,
/// `registry/repository[:tag][@digest]`; when both are present the digest decides what is
/// fetched and the tag is only a reminder for people.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageReference {
    /// Parses and normalizes `input`; the error names the input and what is wrong with it.
    pub fn parse(input: &str) -> Result<ImageReference, OciError> {
        parse(input).map_err(|reason| OciError::InvalidReference {
            input: input.to_owned(),
            reason,
        })
    }

    /// `docker.io`, `ghcr.io`, `127.0.0.1:5000`, `[::1]:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// `library/alpine`, `o/r`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// `sha256:<64 hex>` when the reference is pinned.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The same image pinned to `digest`; the tag is kept for display.
    pub fn with_digest(&self, digest: &str) -> Result<ImageReference, OciError> {
        validate_digest(digest).map_err(|reason| OciError::InvalidReference {
            input: format!("{}@{digest}", self.name()),
            reason,
        })?;
        Ok(ImageReference {
            digest: Some(digest.to_owned()),
            ..self.clone()
        })
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The host (and port) API requests go to: the default registry's API is reached under
    /// its legacy name, as oci-client does.
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            LEGACY_DEFAULT_REGISTRY
        } else {
            &self.registry
        }
    }

    /// True for `localhost`, `127.0.0.0/8` and `[::1]` registries, which are spoken to over
    /// plain HTTP: a loopback registry is a developer's or a test's, and it has no certificate.
    pub fn is_loopback(&self) -> bool {
        is_loopback_registry(&self.registry)
    }

    /// The oci-client form. Built field by field because oci-client's own parser rejects
    /// bracketed IPv6 registries; oci-client reaches `docker.io` at its API host by itself.
    pub(crate) fn to_client_reference(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (_, Some(digest)) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                digest.clone(),
            ),
            (tag, None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone().unwrap_or_else(|| DEFAULT_TAG.to_owned()),
            ),
        }
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageReference {
    type Err = OciError;

    fn from_str(input: &str) -> Result<ImageReference, OciError> {
        ImageReference::parse(input)
    }
}

/// True when `registry` (`host[:port]`) is on the loopback interface.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = registry_host(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(host);
    unbracketed
        .parse::<IpAddr>()
        .is_ok_and(|address| address.is_loopback())
}

/// `host` of `host[:port]`, brackets kept for IPv6.
fn registry_host(registry: &str) -> &str {
    if registry.starts_with('[') {
        return match registry.find(']') {
            Some(end) => &registry[..=end],
            None => registry,
        };
    }
    registry.split(':').next().unwrap_or(registry)
}

fn parse(input: &str) -> Result<ImageReference, String> {
    if input.is_empty() {
        return Err("the reference is empty".to_owned());
    }
    if let Some(bad) = input.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("it contains the character {bad:?}"));
    }
    let (rest, digest) = match input.split_once('@') {
        Some((rest, digest)) => {
            validate_digest(digest)?;
            (rest, Some(digest.to_owned()))
        }
        None => (input, None),
    };
    // A tag follows the last `:` that comes after the last `/`; an earlier `:` is a port.
    let last_slash = rest.rfind('/').map_or(0, |index| index + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(colon) => {
            let colon = last_slash + colon;
            (&rest[..colon], Some(&rest[colon + 1..]))
        }
        None => (rest, None),
    };
    if let Some(tag) = tag {
        validate_tag(tag)?;
    }
    if name.is_empty() {
        return Err("the repository name is empty".to_owned());
    }
    let (registry, repository) = split_registry(name);
    validate_registry(registry)?;
    let registry = if registry == LEGACY_DEFAULT_REGISTRY {
        DEFAULT_REGISTRY
    } else {
        registry
    };
    let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
        format!("{OFFICIAL_REPOSITORY_PREFIX}{repository}")
    } else {
        repository.to_owned()
    };
    validate_repository(&repository)?;
    if registry.len() + 1 + repository.len() > NAME_MAX_LEN {
        return Err(format!("the name is longer than {NAME_MAX_LEN} characters"));
    }
    let tag = match (tag, &digest) {
        (Some(tag), _) => Some(tag.to_owned()),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_TAG.to_owned()),
    };
    Ok(ImageReference {
        registry: registry.to_owned(),
        repository,
        tag,
        digest,
    })
}

/// Docker's rule: the first component is a registry only when it looks like a host (has a `.`
/// or `:`, is `localhost`, or has upper-case letters, which repository names cannot).
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':', '['])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_REGISTRY, name),
    }
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (address, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("registry `{registry}` has an unclosed `[`"))?;
        address
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("registry `{registry}`: `{address}` is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| {
                format!("registry `{registry}`: expected `:PORT` after the IPv6 address")
            })?),
        };
        (None, port)
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let valid_label = |label: &str| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if !host.split('.').all(valid_label) {
            return Err(format!("registry `{registry}` is not a valid host name"));
        }
    }
    if let Some(port) = port
        && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!(
            "registry `{registry}` has an invalid port `{port}`"
        ));
    }
    Ok(())
}

/// Path components: lower-case alphanumerics joined by `.`, `_`, `__` or runs of `-`.
fn validate_repository(repository: &str) -> Result<(), String> {
    if repository.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("repository `{repository}` must be lower-case"));
    }
    for component in repository.split('/') {
        if !valid_path_component(component) {
            return Err(format!(
                "repository `{repository}`: `{component}` is not a valid path component \
                 (lower-case letters and digits, separated by `.`, `_`, `__` or `-`)"
            ));
        }
    }
    let last = repository.rsplit('/').next().unwrap_or(repository);
    if last.len() == 64 && last.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "repository `{repository}` looks like an image ID; image IDs cannot be pulled"
        ));
    }
    Ok(())
}

fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alphanumeric(bytes[0]) || !alphanumeric(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut index = 0;
    while index < bytes.len() {
        if alphanumeric(bytes[index]) {
            index += 1;
            continue;
        }
        let start = index;
        while index < bytes.len() && !alphanumeric(bytes[index]) {
            index += 1;
        }
        let separator = &component[start..index];
        let allowed = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !allowed {
            return false;
        }
    }
    true
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let mut chars = tag.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok || tag.len() > TAG_MAX_LEN {
        return Err(format!(
            "tag `{tag}` is not valid (letters, digits, `_`, `.`, `-`; not starting with `.` \
             or `-`; at most {TAG_MAX_LEN} characters)"
        ));
    }
    Ok(())
}

/// Only sha256 digests are accepted: it is the only algorithm banger verifies.
pub(crate) fn validate_digest(digest: &str) -> Result<(), String> {
    let Some((algorithm, encoded)) = digest.split_once(':') else {
        return Err(format!("digest `{digest}` is not `algorithm:hex`"));
    };
    if algorithm != "sha256" {
        return Err(format!(
            "digest `{digest}` uses `{algorithm}`; only sha256 digests are supported"
        ));
    }
    if encoded.len() != 64
        || !encoded
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err(format!(
            "digest `{digest}` must be sha256 followed by 64 lower-case hex digits"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalizes_like_docker() {
        let digest_ref = format!("localhost:5000/x@{DIGEST}");
        let digest_normal = format!("localhost:5000/x@{DIGEST}");
        let both = format!("alpine:3.20@{DIGEST}");
        let both_normal = format!("docker.io/library/alpine:3.20@{DIGEST}");
        let table: &[(&str, &str)] = &[
            ("alpine", "docker.io/library/alpine:latest"),
            ("alpine:3.20", "docker.io/library/alpine:3.20"),
            (
                "docker.io/library/debian:bookworm",
                "docker.io/library/debian:bookworm",
            ),
            (
                "index.docker.io/library/debian",
                "docker.io/library/debian:latest",
            ),
            ("docker.io/debian", "docker.io/library/debian:latest"),
            ("someone/tool:1", "docker.io/someone/tool:1"),
            ("ghcr.io/o/r:tag", "ghcr.io/o/r:tag"),
            ("ghcr.io/o/deep/path/r", "ghcr.io/o/deep/path/r:latest"),
            ("localhost/x", "localhost/x:latest"),
            ("localhost:5000/x", "localhost:5000/x:latest"),
            (&digest_ref, &digest_normal),
            ("127.0.0.1:41234/x:tag", "127.0.0.1:41234/x:tag"),
            ("[::1]:5000/x", "[::1]:5000/x:latest"),
            ("[::1]/x:v1", "[::1]/x:v1"),
            ("Registry/x", "Registry/x:latest"),
            (
                "a.b-c/d__e/f.g_h---i:T_1.2-3",
                "a.b-c/d__e/f.g_h---i:T_1.2-3",
            ),
            (&both, &both_normal),
            // Docker's quirk: with no `/`, a `:` is a tag, so this is an image on docker.io.
            ("localhost:5000", "docker.io/library/localhost:5000"),
        ];
        for (input, expected) in table {
            let parsed =
                ImageReference::parse(input).unwrap_or_else(|error| panic!("{input}: {error}"));
            assert_eq!(parsed.to_string(), *expected, "input {input}");
            let again = ImageReference::parse(&parsed.to_string()).unwrap();
            assert_eq!(again, parsed, "normal form of {input} parses to itself");
        }
    }

    #[test]
    fn exposes_parts() {
        let reference = ImageReference::parse(&format!("[::1]:5000/a/b:t@{DIGEST}")).unwrap();
        assert_eq!(reference.registry(), "[::1]:5000");
        assert_eq!(reference.repository(), "a/b");
        assert_eq!(reference.tag(), Some("t"));
        assert_eq!(reference.digest(), Some(DIGEST));
        assert_eq!(reference.name(), "[::1]:5000/a/b");
        assert!(reference.is_loopback());
        let by_digest = ImageReference::parse(&format!("x@{DIGEST}")).unwrap();
        assert_eq!(
            by_digest.tag(),
            None,
            "a digest alone does not imply :latest"
        );
        let hub = ImageReference::parse("alpine").unwrap();
        assert_eq!(hub.api_host(), "index.docker.io");
        assert!(!hub.is_loopback());
    }

    #[test]
    fn loopback_registries() {
        for registry in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:1",
            "127.8.9.10",
            "[::1]:80",
        ] {
            assert!(is_loopback_registry(registry), "{registry}");
        }
        for registry in [
            "docker.io",
            "10.0.0.1:5000",
            "[::2]:5000",
            "localhost.example:1",
        ] {
            assert!(!is_loopback_registry(registry), "{registry}");
        }
    }

    #[test]
    fn rejects_bad_references_naming_the_input() {
        let table: &[(&str, &str)] = &[
            ("", "empty"),
            ("Alpine", "lower-case"),
            ("alpine:", "tag ``"),
            ("alpine:.x", "tag `.x`"),
            ("alpine@sha256:abc", "64 lower-case hex"),
            ("alpine@md5:abc", "only sha256"),
            ("alpine@nodigest", "algorithm:hex"),
            ("a b", "character ' '"),
            ("ghcr.io/-x/y", "path component"),
            ("ghcr.io//y", "path component"),
            ("ghcr.io/x_/y", "path component"),
            ("host.io:x5/y", "invalid port"),
            ("[::1/x", "unclosed"),
            ("[zz]:1/x", "IPv6"),
            ("ghcr.io:/x", "invalid port"),
            (":tag", "empty"),
            (
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "image ID",
            ),
        ];
        for (input, needle) in table {
            let error = ImageReference::parse(input).expect_err(input).to_string();
            assert!(
                error.contains(&format!("`{input}`")),
                "error for {input:?} names the input: {error}"
            );
            assert!(error.contains(needle), "error for {input:?}: {error}");
        }
    }

    #[test]
    fn with_digest_pins_and_keeps_the_tag() {
        let reference = ImageReference::parse("alpine:3.20").unwrap();
        let pinned = reference.with_digest(DIGEST).unwrap();
        assert_eq!(
            pinned.to_string(),
            format!("docker.io/library/alpine:3.20@{DIGEST}")
        );
        let client = pinned.to_client_reference();
        assert_eq!(client.digest(), Some(DIGEST));
        assert!(reference.with_digest("sha256:short").is_err());
    }
}
