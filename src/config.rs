//! The user's config file (`~/.config/banger/config.toml`, see [`crate::paths`]).
//!
//! Every key is optional; a missing file is the built-in defaults. Unknown keys are errors (a
//! typo must not silently keep a default). The format is documented in `docs/config.md`.
//!
//! ```toml
//! [cache]
//! max_size = "20G"          # `banger cache gc` evicts least-recently-used steps above this
//! snapshots_max_size = "2G" # least-recently-used memory snapshots go above this
//! remote = "registry.example.com/team/banger-cache"  # the remote step cache (optional)
//! push = true               # builds also upload their shared steps to it
//!
//! [catalogs]
//! images = "/srv/banger/images.json"   # replaces the embedded image catalog
//! kernels = "/srv/banger/kernels.json" # replaces the embedded kernel catalog
//!
//! [vm_defaults]
//! vcpu = 2
//! memory = "2G"
//! disk = "8G"
//!
//! [network]
//! subnet = "10.213.0.0/24"  # the bridge of `--network tap` VMs (root only)
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::catalog::{CatalogError, Catalogs};
use crate::spec::ByteSize;

/// Size cap of the store when the config sets none.
pub const DEFAULT_CACHE_MAX_SIZE: ByteSize = ByteSize(20 * ByteSize::GIB);

/// Size cap of the memory snapshots when the config sets none: a Debian guest's is about
/// 120 MiB, so this keeps over a dozen (image, kernel, shape) combinations warm.
pub const DEFAULT_SNAPSHOTS_MAX_SIZE: ByteSize = ByteSize(2 * ByteSize::GIB);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message spans lines (the offending line, a caret under it), so it follows the
    /// path on lines of its own instead of being chained.
    #[error("config file {path} is not valid:\n{message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: `{key}` = {value:?}: {message}")]
    Value {
        path: PathBuf,
        key: String,
        value: String,
        message: String,
    },
    #[error("cannot read catalog {path} (set in {config})")]
    CatalogRead {
        path: PathBuf,
        config: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot fetch catalog {url} (set in {config})")]
    CatalogFetch {
        url: String,
        config: PathBuf,
        #[source]
        source: Box<crate::fetch::FetchError>,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(
        "catalog {url} (set in {config}) is plain HTTP, so anyone on the way could rewrite what \
         banger builds and runs; use https://, or pin the catalog's content by appending \
         #sha256=<its sha256> to the URL"
    )]
    InsecureCatalog { url: String, config: PathBuf },
    #[error(
        "catalog URL {url} (set in {config}) ends in `#{fragment}`; the only fragment banger \
         knows is #sha256=<64 lowercase hex digits>, the catalog's pinned digest"
    )]
    BadCatalogPin {
        url: String,
        config: PathBuf,
        fragment: String,
    },
    #[error("catalog {url} (set in {config}) has sha256 {actual}, not the pinned {expected}")]
    CatalogDigest {
        url: String,
        config: PathBuf,
        expected: String,
        actual: String,
    },
}

/// A catalog bigger than this is refused (they are a few KiB).
const CATALOG_MAX_BYTES: u64 = 16 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    catalogs: RawCatalogs,
    #[serde(default)]
    vm_defaults: RawVmDefaults,
    #[serde(default)]
    file_sync: Vec<RawFileSync>,
    #[serde(default)]
    network: RawNetwork,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    subnet: Option<String>,
}

/// `[[file_sync]]`: a host file every `banger up` copies into the project's VM.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSync {
    host: String,
    guest: String,
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_size: Option<String>,
    snapshots_max_size: Option<String>,
    remote: Option<String>,
    #[serde(default)]
    push: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogs {
    images: Option<PathBuf>,
    kernels: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVmDefaults {
    vcpu: Option<u32>,
    memory: Option<String>,
    disk: Option<String>,
}

/// VM shape defaults from `[vm_defaults]`; `None` means "use the host heuristic or built-in".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmDefaults {
    pub vcpu: Option<u32>,
    pub memory: Option<ByteSize>,
    pub disk: Option<ByteSize>,
}

/// The validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where it was read from (whether or not the file exists).
    pub path: PathBuf,
    pub cache_max_size: ByteSize,
    /// `[cache] snapshots_max_size`: saving a memory snapshot, and `cache gc`, remove the least
    /// recently used ones above it (`docs/snapshots.md`).
    pub cache_snapshots_max_size: ByteSize,
    /// `[cache] remote`: the registry repository of the remote step cache
    /// (`docs/remote-cache.md`), read by every build unless `--cache-from` names another.
    pub cache_remote: Option<String>,
    /// `[cache] push`: builds also upload their shared steps to `cache_remote`.
    pub cache_push: bool,
    pub image_catalog: Option<PathBuf>,
    pub kernel_catalog: Option<PathBuf>,
    pub vm_defaults: VmDefaults,
    /// The bridge subnet of `--network tap` VMs.
    pub subnet: crate::net::subnet::Subnet,
    /// Host files copied into every project's VM on `banger up` (credentials, dotfiles),
    /// after the Bangerfile's own `[[file_sync]]`.
    pub file_sync: Vec<crate::spec::FileSyncSpec>,
}

impl Config {
    /// Built-in defaults, as if `path` did not exist.
    pub fn defaults(path: &Path) -> Config {
        Config {
            path: path.to_owned(),
            cache_max_size: DEFAULT_CACHE_MAX_SIZE,
            cache_snapshots_max_size: DEFAULT_SNAPSHOTS_MAX_SIZE,
            cache_remote: None,
            cache_push: false,
            image_catalog: None,
            kernel_catalog: None,
            vm_defaults: VmDefaults::default(),
            subnet: crate::net::subnet::DEFAULT_SUBNET,
            file_sync: Vec::new(),
        }
    }

    /// Reads the config at `path`; a missing file is the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Ok(Config::defaults(path))
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
        let size = |key: &str, value: &Option<String>| -> Result<Option<ByteSize>, ConfigError> {
            value
                .as_deref()
                .map(|text| {
                    ByteSize::parse(text).map_err(|message| ConfigError::Value {
                        path: path.to_owned(),
                        key: key.to_owned(),
                        value: text.to_owned(),
                        message,
                    })
                })
                .transpose()
        };
        let relative_to_config = |file: PathBuf| {
            let is_url = file.to_string_lossy().contains("://");
            match path.parent() {
                Some(dir) if file.is_relative() && !is_url => dir.join(file),
                _ => file,
            }
        };
        let mut file_sync = Vec::new();
        for (index, entry) in raw.file_sync.iter().enumerate() {
            let bad = |key: &str, value: &str, message: &str| ConfigError::Value {
                path: path.to_owned(),
                key: format!("file_sync[{index}].{key}"),
                value: value.to_owned(),
                message: message.to_owned(),
            };
            if !entry.guest.starts_with('/') {
                return Err(bad("guest", &entry.guest, "a guest path is absolute"));
            }
            if !(entry.host.starts_with('/') || entry.host.starts_with("~/")) {
                return Err(bad(
                    "host",
                    &entry.host,
                    "a host path is absolute or starts with ~/",
                ));
            }
            let mode = match &entry.mode {
                Some(text) => Some(
                    u32::from_str_radix(text.trim_start_matches("0o"), 8)
                        .ok()
                        .filter(|mode| *mode <= 0o7777)
                        .ok_or_else(|| bad("mode", text, "an octal mode like \"0600\""))?,
                ),
                None => None,
            };
            file_sync.push(crate::spec::FileSyncSpec {
                host: entry.host.clone(),
                guest: entry.guest.clone(),
                mode,
            });
        }
        if raw.vm_defaults.vcpu == Some(0) {
            return Err(ConfigError::Value {
                path: path.to_owned(),
                key: "vm_defaults.vcpu".into(),
                value: "0".into(),
                message: "a VM needs at least one vcpu".into(),
            });
        }
        if raw.cache.push && raw.cache.remote.is_none() {
            return Err(ConfigError::Value {
                path: path.to_owned(),
                key: "cache.push".into(),
                value: "true".into(),
                message: "pushing needs a remote: set `remote` in [cache] too".into(),
            });
        }
        let subnet = match &raw.network.subnet {
            None => crate::net::subnet::DEFAULT_SUBNET,
            Some(text) => {
                crate::net::subnet::Subnet::parse(text).map_err(|message| ConfigError::Value {
                    path: path.to_owned(),
                    key: "network.subnet".into(),
                    value: text.clone(),
                    message,
                })?
            }
        };
        Ok(Config {
            path: path.to_owned(),
            cache_max_size: size("cache.max_size", &raw.cache.max_size)?
                .unwrap_or(DEFAULT_CACHE_MAX_SIZE),
            cache_snapshots_max_size: size(
                "cache.snapshots_max_size",
                &raw.cache.snapshots_max_size,
            )?
            .unwrap_or(DEFAULT_SNAPSHOTS_MAX_SIZE),
            cache_remote: raw.cache.remote,
            cache_push: raw.cache.push,
            image_catalog: raw.catalogs.images.map(relative_to_config),
            kernel_catalog: raw.catalogs.kernels.map(relative_to_config),
            vm_defaults: VmDefaults {
                vcpu: raw.vm_defaults.vcpu,
                memory: size("vm_defaults.memory", &raw.vm_defaults.memory)?,
                disk: size("vm_defaults.disk", &raw.vm_defaults.disk)?,
            },
            subnet,
            file_sync,
        })
    }

    /// The catalogs in force: the embedded ones, each replaced by a configured file or URL.
    /// A URL is fetched (`cache_dir/catalogs/` keeps the last good copy, used with a warning on
    /// `warn` when the URL cannot be reached).
    pub fn catalogs(&self) -> Result<Catalogs, ConfigError> {
        self.catalogs_with(None, &|_| {})
    }

    /// [`Config::catalogs`], fetching URL catalogs into `cache_dir` when one is given.
    pub fn catalogs_with(
        &self,
        cache_dir: Option<&Path>,
        warn: &dyn Fn(&str),
    ) -> Result<Catalogs, ConfigError> {
        let mut catalogs = Catalogs::embedded();
        if let Some(source) = &self.image_catalog {
            let text = self.read_catalog(source, cache_dir, warn)?;
            catalogs.images = Catalogs::parse_images(&text, &source.display().to_string())?;
        }
        if let Some(source) = &self.kernel_catalog {
            let text = self.read_catalog(source, cache_dir, warn)?;
            catalogs.kernels = Catalogs::parse_kernels(&text, &source.display().to_string())?;
        }
        Ok(catalogs)
    }

    fn read_catalog(
        &self,
        source: &Path,
        cache_dir: Option<&Path>,
        warn: &dyn Fn(&str),
    ) -> Result<String, ConfigError> {
        let text = source.to_string_lossy();
        let is_url = ["http://", "https://", "file://"]
            .iter()
            .any(|scheme| text.starts_with(scheme));
        if !is_url {
            return std::fs::read_to_string(source).map_err(|source_error| {
                ConfigError::CatalogRead {
                    path: source.to_owned(),
                    config: self.path.clone(),
                    source: source_error,
                }
            });
        }
        let (url, pin) = self.catalog_pin(&text)?;
        let cached = cache_dir.map(|dir| {
            dir.join("catalogs").join(format!(
                "{}.json",
                &blake3::hash(text.as_bytes()).to_hex()[..32]
            ))
        });
        // On a thread of its own with its own runtime: callers may be sync (the CLI) or
        // inside a runtime (the daemon), where blocking on another runtime would panic.
        let fetched = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let fetcher = crate::fetch::Fetcher::new(crate::fetch::FetchOptions {
                        proxies: crate::oci::Proxies::from_env(),
                        ..crate::fetch::FetchOptions::default()
                    })?;
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|error| crate::fetch::FetchError::ClientSetup {
                            message: error.to_string(),
                        })?
                        .block_on(fetcher.fetch_text(&url, CATALOG_MAX_BYTES))
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(crate::fetch::FetchError::ClientSetup {
                        message: "the catalog fetch panicked".to_owned(),
                    })
                })
        });
        // A copy that does not match the pin is no copy at all.
        let fetched = match fetched {
            Ok(text) => Ok(self.check_catalog_pin(&url, pin.as_deref(), text)?),
            Err(error) => Err(error),
        };
        match (fetched, &cached) {
            (Ok(text), Some(cached)) => {
                // A failed cache write only costs the offline fallback.
                if let Some(dir) = cached.parent()
                    && std::fs::create_dir_all(dir).is_ok()
                    && let Ok(mut temp) = tempfile::NamedTempFile::new_in(dir)
                    && std::io::Write::write_all(&mut temp, text.as_bytes()).is_ok()
                {
                    let _ = temp.persist(cached);
                }
                Ok(text)
            }
            (Ok(text), None) => Ok(text),
            (Err(error), Some(cached)) if cached.exists() => {
                warn(&format!(
                    "cannot fetch catalog {url} ({error}); using the copy fetched earlier"
                ));
                let text =
                    std::fs::read_to_string(cached).map_err(|source| ConfigError::CatalogRead {
                        path: cached.clone(),
                        config: self.path.clone(),
                        source,
                    })?;
                self.check_catalog_pin(&url, pin.as_deref(), text)
            }
            (Err(error), _) => Err(ConfigError::CatalogFetch {
                url,
                config: self.path.clone(),
                source: Box::new(error),
            }),
        }
    }

    /// Splits a catalog URL from its `#sha256=HEX` pin, and refuses plain HTTP without one
    /// (except on loopback, where nobody else is on the way).
    fn catalog_pin(&self, text: &str) -> Result<(String, Option<String>), ConfigError> {
        let (url, fragment) = match text.split_once('#') {
            Some((url, fragment)) => (url.to_owned(), Some(fragment)),
            None => (text.to_owned(), None),
        };
        let pin = match fragment {
            None => None,
            Some(fragment) => {
                let digest = fragment.strip_prefix("sha256=").filter(|digest| {
                    digest.len() == 64
                        && digest
                            .bytes()
                            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
                });
                match digest {
                    Some(digest) => Some(digest.to_owned()),
                    None => {
                        return Err(ConfigError::BadCatalogPin {
                            url,
                            config: self.path.clone(),
                            fragment: fragment.to_owned(),
                        });
                    }
                }
            }
        };
        if url.starts_with("http://") && pin.is_none() && !loopback_url(&url) {
            return Err(ConfigError::InsecureCatalog {
                url,
                config: self.path.clone(),
            });
        }
        Ok((url, pin))
    }

    fn check_catalog_pin(
        &self,
        url: &str,
        pin: Option<&str>,
        text: String,
    ) -> Result<String, ConfigError> {
        let Some(expected) = pin else {
            return Ok(text);
        };
        let actual: String = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        if actual == expected {
            Ok(text)
        } else {
            Err(ConfigError::CatalogDigest {
                url: url.to_owned(),
                config: self.path.clone(),
                expected: expected.to_owned(),
                actual,
            })
        }
    }
}

/// Whether an `http://` URL's host is on the loopback interface.
fn loopback_url(url: &str) -> bool {
    reqwest::Url::parse(url)
        .is_ok_and(|url| url.host_str().is_some_and(crate::oci::is_loopback_registry))
}

impl crate::error::Classify for ConfigError {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::User
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::defaults(&path));
    }

    #[test]
    fn values_are_parsed_and_catalog_paths_are_relative_to_the_file() {
        let config = Config::parse(
            "[cache]\nmax_size = \"5G\"\nsnapshots_max_size = \"300M\"\n[catalogs]\nimages = \"cat/images.json\"\n\
             [vm_defaults]\nvcpu = 4\nmemory = \"4G\"\n",
            Path::new("/etc/banger/config.toml"),
        )
        .unwrap();
        assert_eq!(config.cache_max_size, ByteSize(5 * ByteSize::GIB));
        assert_eq!(config.cache_snapshots_max_size, ByteSize(300 << 20));
        assert_eq!(
            config.image_catalog.as_deref(),
            Some(Path::new("/etc/banger/cat/images.json"))
        );
        assert_eq!(config.vm_defaults.vcpu, Some(4));
        assert_eq!(config.vm_defaults.memory, Some(ByteSize(4 * ByteSize::GIB)));
        assert_eq!(config.vm_defaults.disk, None);
        assert_eq!(config.subnet, crate::net::subnet::DEFAULT_SUBNET);
    }

    #[test]
    fn the_remote_cache_and_pushing_to_it_are_configurable() {
        let path = Path::new("/etc/banger/config.toml");
        let config = Config::parse(
            "[cache]\nremote = \"registry.example.com/team/cache\"\npush = true\n",
            path,
        )
        .unwrap();
        assert_eq!(
            config.cache_remote.as_deref(),
            Some("registry.example.com/team/cache")
        );
        assert!(config.cache_push);
        let defaults = Config::parse("", path).unwrap();
        assert_eq!((defaults.cache_remote, defaults.cache_push), (None, false));
        let error = Config::parse("[cache]\npush = true\n", path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("cache.push") && error.contains("remote"),
            "{error}"
        );
    }

    #[test]
    fn the_bridge_subnet_is_configurable_and_a_bad_one_names_the_key() {
        let path = Path::new("/etc/banger/config.toml");
        let config = Config::parse("[network]\nsubnet = \"192.168.77.0/24\"\n", path).unwrap();
        assert_eq!(config.subnet.to_string(), "192.168.77.0/24");
        let error = Config::parse("[network]\nsubnet = \"192.168.77.1/24\"\n", path).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("`network.subnet`") && text.contains("192.168.77.0/24"),
            "{text}"
        );
    }

    #[test]
    fn catalogs_come_from_urls_and_fall_back_to_the_last_good_copy() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("images.json");
        std::fs::write(
            &catalog,
            r#"{"version": 1, "images": [{"name": "mine", "distro": "debian", "arch": "x86_64",
                "kernel_ref": "debian-cloud-amd64", "prefer": "bundle",
                "bundle": {"url": "file:///x.tar.zst", "sha256": "00", "size": 1}}]}"#,
        )
        .unwrap();
        let config = Config::parse(
            &format!("[catalogs]\nimages = \"file://{}\"\n", catalog.display()),
            &dir.path().join("config.toml"),
        )
        .unwrap();
        let cache = dir.path().join("cache");
        let catalogs = config.catalogs_with(Some(&cache), &|_| {}).unwrap();
        assert!(catalogs.image("mine").is_some());
        std::fs::remove_file(&catalog).unwrap();
        let warnings = std::cell::RefCell::new(Vec::new());
        let fallback = config
            .catalogs_with(Some(&cache), &|text| {
                warnings.borrow_mut().push(text.to_owned())
            })
            .unwrap();
        assert!(fallback.image("mine").is_some());
        assert_eq!(warnings.borrow().len(), 1);
        let error = config.catalogs().unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot fetch catalog file://"),
            "{error}"
        );
    }

    #[test]
    fn plain_http_catalogs_need_loopback_or_a_pin_and_a_pin_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("images.json");
        let text = r#"{"version": 1, "images": []}"#;
        std::fs::write(&catalog, text).unwrap();
        let digest: String = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let config_with = |url: &str| {
            Config::parse(
                &format!("[catalogs]\nimages = \"{url}\"\n"),
                &dir.path().join("config.toml"),
            )
            .unwrap()
        };
        // Refused before anything is fetched (the host does not resolve).
        let error = config_with("http://catalogs.invalid/images.json")
            .catalogs()
            .unwrap_err();
        assert!(
            matches!(error, ConfigError::InsecureCatalog { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("#sha256="), "{error}");
        // Loopback needs no pin: the refusal is gone, the fetch fails on a closed port.
        for url in [
            "http://127.0.0.1:9/images.json",
            "http://[::1]:9/images.json",
            "http://localhost:9/c.json",
        ] {
            let error = config_with(url).catalogs().unwrap_err();
            assert!(
                matches!(error, ConfigError::CatalogFetch { .. }),
                "{url}: {error}"
            );
        }
        // A malformed pin is named.
        let error = config_with("https://example.invalid/c.json#sha256=XYZ")
            .catalogs()
            .unwrap_err();
        assert!(
            matches!(error, ConfigError::BadCatalogPin { .. }),
            "{error}"
        );
        // A pin is checked against what was read (file:// here, the same path as http).
        let url = format!("file://{}", catalog.display());
        let pinned = config_with(&format!("{url}#sha256={digest}"));
        assert!(pinned.catalogs().is_ok());
        let wrong = "0".repeat(64);
        let error = config_with(&format!("{url}#sha256={wrong}"))
            .catalogs()
            .unwrap_err();
        assert!(
            matches!(&error, ConfigError::CatalogDigest { actual, .. } if *actual == digest),
            "{error}"
        );
    }

    #[test]
    fn a_url_catalog_can_be_read_from_inside_a_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("images.json");
        std::fs::write(&catalog, r#"{"version": 1, "images": []}"#).unwrap();
        let config = Config::parse(
            &format!("[catalogs]\nimages = \"file://{}\"\n", catalog.display()),
            &dir.path().join("config.toml"),
        )
        .unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let catalogs = runtime.block_on(async { config.catalogs() }).unwrap();
        assert!(catalogs.images.is_empty());
    }

    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("../docs/config.md");
        let example = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/config.md has a toml example");
        let config = Config::parse(example, Path::new("/etc/banger/config.toml")).unwrap();
        assert_eq!(config.file_sync.len(), 2);
        assert_eq!(config.file_sync[1].mode, Some(0o600));
        assert_eq!(config.vm_defaults.vcpu, Some(2));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file() {
        let path = Path::new("/c.toml");
        let error = Config::parse("[cache]\nmax_sise = \"5G\"\n", path).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("/c.toml") && text.contains("max_sise"),
            "{text}"
        );
        let error = Config::parse("[cache]\nmax_size = \"5Q\"\n", path).unwrap_err();
        assert_eq!(
            error.to_string(),
            "config file /c.toml: `cache.max_size` = \"5Q\": `5Q` has an unknown unit `Q`: use K, M, G or T"
        );
    }
}
