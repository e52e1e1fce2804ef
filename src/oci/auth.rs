//! Registry credentials from the Docker config file (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`), read afresh for every operation so a `docker login` takes effect
//! without restarting the daemon.
//!
//! As Docker does: a `credHelpers` entry for the registry, else a `credsStore`, names a
//! credential helper, run as `docker-credential-NAME get` with the server on stdin and its
//! `{"Username", "Secret"}` answer on stdout (a helper that has nothing for the server falls
//! through to `auths`). In `auths`: an `auth` field (base64 of `user:password`),
//! `username`/`password` fields, or a `registrytoken` (a bearer token). Keys may be a bare
//! `host[:port]` or a URL (`https://host/v1/`); the default registry's keys have several
//! spellings, all accepted. Secrets never appear in errors or `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::OciError;
use super::reference::DEFAULT_REGISTRY;

/// Spellings of the default registry in `auths` keys.
const DEFAULT_REGISTRY_ALIASES: &[&str] =
    &[DEFAULT_REGISTRY, "index.docker.io", "registry-1.docker.io"];

/// `config.json` in `docker_config_dir` (the `DOCKER_CONFIG` variable) if given, else in
/// `home/.docker`. `None` when neither is known.
pub fn docker_config_path(
    docker_config_dir: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    docker_config_dir
        .or_else(|| home.map(|home| home.join(".docker")))
        .map(|dir| dir.join("config.json"))
}

/// Which credentials a request used, for "not authorized" errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// No credentials: none configured for the registry.
    Anonymous {
        registry: String,
        /// The Docker config file that was searched, if there is one to search.
        searched: Option<PathBuf>,
    },
    /// An `auths` entry of the Docker config file.
    DockerConfig {
        registry: String,
        path: PathBuf,
        /// `None` for a `registrytoken` entry.
        username: Option<String>,
    },
    /// A credential helper the Docker config file names.
    Helper {
        registry: String,
        path: PathBuf,
        helper: String,
        username: String,
    },
}

impl fmt::Display for CredentialSource {
    /// What was tried and how to fix it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Anonymous {
                registry,
                searched: Some(path),
            } => write!(
                f,
                "anonymous access (no credentials for {registry} in {}); add them with \
                 `docker login {registry}` or an `auths` entry in that file (DOCKER_CONFIG \
                 names its directory)",
                path.display()
            ),
            CredentialSource::Anonymous {
                registry,
                searched: None,
            } => write!(
                f,
                "anonymous access (no Docker config file to read credentials from); set \
                 DOCKER_CONFIG to a directory whose config.json has credentials for {registry}"
            ),
            CredentialSource::DockerConfig {
                registry,
                path,
                username: Some(username),
            } => write!(
                f,
                "user `{username}` from the {registry} entry of {}; check that user's password \
                 there and that it may pull this repository",
                path.display()
            ),
            CredentialSource::Helper {
                registry,
                path,
                helper,
                username,
            } => write!(
                f,
                "user `{username}` from the credential helper docker-credential-{helper} (named \
                 for {registry} by {}); check the credentials it holds",
                path.display()
            ),
            CredentialSource::DockerConfig {
                registry,
                path,
                username: None,
            } => write!(
                f,
                "the token in the {registry} entry of {}; it may have expired: log in again",
                path.display()
            ),
        }
    }
}

/// Credentials for one registry and where they came from.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub auth: RegistryAuth,
    pub source: CredentialSource,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // RegistryAuth's own Debug redacts secrets.
        f.debug_struct("Credentials")
            .field("auth", &self.auth)
            .field("source", &self.source)
            .finish()
    }
}

impl Credentials {
    /// A stable identity for caching clients per credentials without keeping secrets around
    /// in clear as map keys.
    pub fn fingerprint(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        match &self.auth {
            RegistryAuth::Anonymous => {
                hasher.update(b"anonymous");
            }
            RegistryAuth::Basic(user, password) => {
                hasher.update(b"basic\0");
                hasher.update(user.as_bytes());
                hasher.update(b"\0");
                hasher.update(password.as_bytes());
            }
            RegistryAuth::Bearer(token) => {
                hasher.update(b"bearer\0");
                hasher.update(token.as_bytes());
            }
        }
        hasher.finalize().to_hex().to_string()
    }
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

/// A credential helper's answer to `get`.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// The server name a helper is asked about: what `docker login` stored it under.
fn helper_server(registry: &str) -> String {
    if DEFAULT_REGISTRY_ALIASES
        .iter()
        .any(|alias| alias.eq_ignore_ascii_case(registry))
    {
        "https://index.docker.io/v1/".to_owned()
    } else {
        registry.to_owned()
    }
}

/// Runs `docker-credential-HELPER get` for `registry`: `Ok(None)` when the helper has nothing
/// for it (Docker's helpers then say "credentials not found" and exit 1).
fn ask_helper(
    helper: &str,
    registry: &str,
    config: &Path,
    helper_path: Option<&std::ffi::OsStr>,
) -> Result<Option<(String, String)>, OciError> {
    use std::io::Write;
    let program = format!("docker-credential-{helper}");
    let failed = |message: String| OciError::CredentialHelper {
        argv: format!("{program} get"),
        config: config.to_owned(),
        registry: registry.to_owned(),
        message,
    };
    let mut command = std::process::Command::new(&program);
    if let Some(path) = helper_path {
        // The child's PATH is also where `program` is looked up.
        command.env("PATH", path);
    }
    let mut child = command
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| {
            failed(format!(
                "cannot run it ({error}); install it, or remove `{helper}` from the config file"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its stdin is judged by its exit status below.
        let _ = stdin.write_all(helper_server(registry).as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|error| failed(format!("cannot wait for it: {error}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        if stdout
            .to_ascii_lowercase()
            .contains("credentials not found")
        {
            return Ok(None);
        }
        return Err(failed(format!(
            "{}; stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let answer: HelperAnswer = serde_json::from_str(stdout.trim()).map_err(|error| {
        failed(format!(
            "its answer is not `{{\"Username\": …, \"Secret\": …}}` (JSON error at line {} \
             column {})",
            error.line(),
            error.column()
        ))
    })?;
    if answer.username == "<token>" {
        return Err(failed(
            "it holds an identity token, which banger cannot use yet; store a user and \
             password (or an access token as the password) instead"
                .to_owned(),
        ));
    }
    Ok(Some((answer.username, answer.secret)))
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    registrytoken: Option<String>,
}

/// Credentials for `registry` (as written in references, `host[:port]`) from the Docker config
/// at `config_path`; anonymous when there is no file or no entry.
pub(crate) fn lookup(
    config_path: Option<&Path>,
    registry: &str,
    helper_path: Option<&std::ffi::OsStr>,
) -> Result<Credentials, OciError> {
    let anonymous = || Credentials {
        auth: RegistryAuth::Anonymous,
        source: CredentialSource::Anonymous {
            registry: registry.to_owned(),
            searched: config_path.map(Path::to_owned),
        },
    };
    let Some(path) = config_path else {
        return Ok(anonymous());
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(anonymous()),
        Err(error) => {
            return Err(OciError::DockerConfig {
                path: path.to_owned(),
                message: error.to_string(),
            });
        }
    };
    // serde's messages can quote values, which may be secrets: report only the position.
    let file: DockerConfigFile =
        serde_json::from_str(&text).map_err(|error| OciError::DockerConfig {
            path: path.to_owned(),
            message: format!(
                "not a valid Docker config (JSON {:?} error at line {} column {})",
                error.classify(),
                error.line(),
                error.column()
            ),
        })?;
    let helper = file
        .cred_helpers
        .iter()
        .find(|(key, _)| key_matches(key, registry))
        .map(|(_, helper)| helper)
        .or(file.creds_store.as_ref())
        .filter(|helper| !helper.is_empty());
    if let Some(helper) = helper
        && let Some((username, secret)) = ask_helper(helper, registry, path, helper_path)?
    {
        return Ok(Credentials {
            auth: RegistryAuth::Basic(username.clone(), secret),
            source: CredentialSource::Helper {
                registry: registry.to_owned(),
                path: path.to_owned(),
                helper: helper.clone(),
                username,
            },
        });
    }
    let Some((key, entry)) = file
        .auths
        .iter()
        .find(|(key, _)| key_matches(key, registry))
    else {
        return Ok(anonymous());
    };
    let invalid = |what: &str| OciError::DockerConfig {
        path: path.to_owned(),
        message: format!("the `auths` entry `{key}` {what}"),
    };
    let source = |username: Option<String>| CredentialSource::DockerConfig {
        registry: registry.to_owned(),
        path: path.to_owned(),
        username,
    };
    if let Some(encoded) = entry.auth.as_deref().filter(|auth| !auth.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| invalid("has an `auth` that is not base64 of `user:password`"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| invalid("has an `auth` that is not base64 of `user:password`"))?;
        return Ok(Credentials {
            auth: RegistryAuth::Basic(username.to_owned(), password.to_owned()),
            source: source(Some(username.to_owned())),
        });
    }
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Credentials {
            auth: RegistryAuth::Basic(username.clone(), password.clone()),
            source: source(Some(username.clone())),
        });
    }
    if let Some(token) = entry.registrytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Credentials {
            auth: RegistryAuth::Bearer(token.to_owned()),
            source: source(None),
        });
    }
    if helper.is_some() {
        // `docker login` with a credential store leaves an empty `auths` entry behind.
        return Ok(anonymous());
    }
    Err(invalid(
        "has no usable credentials (`auth`, `username`/`password` or `registrytoken`); \
         identity tokens are not supported",
    ))
}

/// `https://host:port/v1/` and `host:port` both name `host:port`.
fn key_matches(key: &str, registry: &str) -> bool {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or(without_scheme);
    let is_default = |name: &str| {
        DEFAULT_REGISTRY_ALIASES
            .iter()
            .any(|alias| alias.eq_ignore_ascii_case(name))
    };
    host.eq_ignore_ascii_case(registry) || (is_default(registry) && is_default(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn config_path_prefers_docker_config_dir() {
        assert_eq!(
            docker_config_path(Some("/d".into()), Some("/h".into())),
            Some(PathBuf::from("/d/config.json"))
        );
        assert_eq!(
            docker_config_path(None, Some("/h".into())),
            Some(PathBuf::from("/h/.docker/config.json"))
        );
        assert_eq!(docker_config_path(None, None), None);
    }

    #[test]
    fn reads_auth_and_username_password_entries() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        let (_dir, path) = write_config(&format!(
            r#"{{"auths": {{
                "https://127.0.0.1:5000/v1/": {{"auth": "{encoded}"}},
                "[::1]:6000": {{"username": "bob", "password": "pw"}},
                "https://index.docker.io/v1/": {{"registrytoken": "tok"}}
            }}}}"#
        ));
        let found = lookup(Some(&path), "127.0.0.1:5000", None).unwrap();
        assert_eq!(
            found.auth,
            RegistryAuth::Basic("alice".into(), "s3cr:et".into())
        );
        let found = lookup(Some(&path), "[::1]:6000", None).unwrap();
        assert_eq!(found.auth, RegistryAuth::Basic("bob".into(), "pw".into()));
        let found = lookup(Some(&path), "docker.io", None).unwrap();
        assert_eq!(found.auth, RegistryAuth::Bearer("tok".into()));
        let found = lookup(Some(&path), "ghcr.io", None).unwrap();
        assert_eq!(found.auth, RegistryAuth::Anonymous);
        assert!(found.source.to_string().contains("docker login ghcr.io"));
    }

    #[test]
    fn missing_file_is_anonymous_and_bad_files_do_not_leak_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("config.json");
        let found = lookup(Some(&missing), "r.example:1", None).unwrap();
        assert_eq!(found.auth, RegistryAuth::Anonymous);
        assert!(
            found
                .source
                .to_string()
                .contains(&missing.display().to_string())
        );

        let (_dir, path) = write_config(r#"{"auths": "hunter2-secret"}"#);
        let error = lookup(Some(&path), "r.example:1", None)
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("line 1"), "{error}");

        let (_dir, path) = write_config(r#"{"auths": {"r.example:1": {"auth": "!!hunter2"}}}"#);
        let error = lookup(Some(&path), "r.example:1", None)
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("base64"), "{error}");
    }

    #[test]
    fn debug_output_redacts_passwords() {
        let credentials = Credentials {
            auth: RegistryAuth::Basic("alice".into(), "hunter2".into()),
            source: CredentialSource::DockerConfig {
                registry: "r:1".into(),
                path: "/c.json".into(),
                username: Some("alice".into()),
            },
        };
        let shown = format!("{credentials:?} {}", credentials.source);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"));
    }
}
