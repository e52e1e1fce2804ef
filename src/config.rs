//! The user's config file (`~/.config/banger/config.toml`, see [`crate::paths`]).
//!
//! Every key is optional; a missing file is the built-in defaults. Unknown keys are errors (a
//! typo must not silently keep a default). The format is documented in `docs/config.md`.
//!
//! ```toml
//! [cache]
//! max_size = "20G"          # `banger cache gc` evicts least-recently-used steps above this
//!
//! [catalogs]
//! images = "/srv/banger/images.json"   # replaces the embedded image catalog
//! kernels = "/srv/banger/kernels.json" # replaces the embedded kernel catalog
//!
//! [vm_defaults]
//! vcpu = 2
//! memory = "2G"
//! disk = "8G"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::catalog::{CatalogError, Catalogs};
use crate::spec::ByteSize;

/// Size cap of the store when the config sets none.
pub const DEFAULT_CACHE_MAX_SIZE: ByteSize = ByteSize(20 * ByteSize::GIB);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid:\n{source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config file {path}: `{key}` = {value:?}: {message}")]
    Value {
        path: PathBuf,
        key: String,
        value: String,
        message: String,
    },
    #[error("cannot read catalog {path} (set in {config}): {source}")]
    CatalogRead {
        path: PathBuf,
        config: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    catalogs: RawCatalogs,
    #[serde(default)]
    vm_defaults: RawVmDefaults,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_size: Option<String>,
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
    pub image_catalog: Option<PathBuf>,
    pub kernel_catalog: Option<PathBuf>,
    pub vm_defaults: VmDefaults,
}

impl Config {
    /// Built-in defaults, as if `path` did not exist.
    pub fn defaults(path: &Path) -> Config {
        Config {
            path: path.to_owned(),
            cache_max_size: DEFAULT_CACHE_MAX_SIZE,
            image_catalog: None,
            kernel_catalog: None,
            vm_defaults: VmDefaults::default(),
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
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
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
        let relative_to_config = |file: PathBuf| match path.parent() {
            Some(dir) if file.is_relative() => dir.join(file),
            _ => file,
        };
        if raw.vm_defaults.vcpu == Some(0) {
            return Err(ConfigError::Value {
                path: path.to_owned(),
                key: "vm_defaults.vcpu".into(),
                value: "0".into(),
                message: "a VM needs at least one vcpu".into(),
            });
        }
        Ok(Config {
            path: path.to_owned(),
            cache_max_size: size("cache.max_size", &raw.cache.max_size)?
                .unwrap_or(DEFAULT_CACHE_MAX_SIZE),
            image_catalog: raw.catalogs.images.map(relative_to_config),
            kernel_catalog: raw.catalogs.kernels.map(relative_to_config),
            vm_defaults: VmDefaults {
                vcpu: raw.vm_defaults.vcpu,
                memory: size("vm_defaults.memory", &raw.vm_defaults.memory)?,
                disk: size("vm_defaults.disk", &raw.vm_defaults.disk)?,
            },
        })
    }

    /// The catalogs in force: the embedded ones, each replaced by a configured file.
    pub fn catalogs(&self) -> Result<Catalogs, ConfigError> {
        let embedded = Catalogs::embedded();
        let read = |file: &Path| {
            std::fs::read_to_string(file).map_err(|source| ConfigError::CatalogRead {
                path: file.to_owned(),
                config: self.path.clone(),
                source,
            })
        };
        let mut catalogs = embedded.clone();
        if let Some(file) = &self.image_catalog {
            let text = read(file)?;
            catalogs.images = Catalogs::parse_images(&text, &file.display().to_string())?;
        }
        if let Some(file) = &self.kernel_catalog {
            let text = read(file)?;
            catalogs.kernels = Catalogs::parse_kernels(&text, &file.display().to_string())?;
        }
        Ok(catalogs)
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
            "[cache]\nmax_size = \"5G\"\n[catalogs]\nimages = \"cat/images.json\"\n\
             [vm_defaults]\nvcpu = 4\nmemory = \"4G\"\n",
            Path::new("/etc/banger/config.toml"),
        )
        .unwrap();
        assert_eq!(config.cache_max_size, ByteSize(5 * ByteSize::GIB));
        assert_eq!(
            config.image_catalog.as_deref(),
            Some(Path::new("/etc/banger/cat/images.json"))
        );
        assert_eq!(config.vm_defaults.vcpu, Some(4));
        assert_eq!(config.vm_defaults.memory, Some(ByteSize(4 * ByteSize::GIB)));
        assert_eq!(config.vm_defaults.disk, None);
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
