//! Image and kernel catalogs: named, versioned sources of bundles or recipes.
//!
//! The default catalogs are `catalogs/images.json` and `catalogs/kernels.json`, embedded in the
//! binary at compile time, so resolving a catalog name does no I/O. Config can point at another
//! catalog file; loading it is the caller's I/O, parsing is here.
//!
//! An entry says where its artifact comes from: a sha256-pinned `.tar.zst` `bundle` (URL,
//! sha256, size), a `recipe` that builds it from distribution packages, or both, with `prefer`
//! naming the one to try first.

use serde::{Deserialize, Serialize};

/// Errors from reading a catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {origin} is not valid JSON for a banger catalog")]
    Parse {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("catalog {origin} has version {found}; this banger reads version 1")]
    Version { origin: String, found: u32 },
    #[error("catalog {origin}: entry `{name}`: {reason}")]
    Entry {
        origin: String,
        name: String,
        reason: String,
    },
}

const EMBEDDED_IMAGES: &str = include_str!("../catalogs/images.json");
const EMBEDDED_KERNELS: &str = include_str!("../catalogs/kernels.json");

/// A sha256-pinned bundle download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSource {
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

/// Which source of an entry to try first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    Bundle,
    Recipe,
}

/// How to build an image from distribution packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecipe {
    pub distro: String,
    pub suite: String,
    pub packages: Vec<String>,
}

/// How to build a kernel from a distribution's packaged kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelRecipe {
    pub distro: String,
    pub suite: String,
    pub package: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub distro: String,
    pub arch: String,
    pub kernel_ref: String,
    pub prefer: Prefer,
    #[serde(default)]
    pub bundle: Option<BundleSource>,
    #[serde(default)]
    pub recipe: Option<ImageRecipe>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelEntry {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub arch: String,
    pub prefer: Prefer,
    #[serde(default)]
    pub bundle: Option<BundleSource>,
    #[serde(default)]
    pub recipe: Option<KernelRecipe>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageCatalogFile {
    version: u32,
    images: Vec<ImageEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KernelCatalogFile {
    version: u32,
    kernels: Vec<KernelEntry>,
}

/// The image and kernel catalogs in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogs {
    pub images: Vec<ImageEntry>,
    pub kernels: Vec<KernelEntry>,
}

impl Catalogs {
    /// The catalogs compiled into this binary.
    pub fn embedded() -> Catalogs {
        // The embedded files are checked by a unit test, so this cannot fail in a release.
        Catalogs::parse(EMBEDDED_IMAGES, "embedded", EMBEDDED_KERNELS, "embedded")
            .expect("embedded catalogs are valid (checked by tests)")
    }

    /// Parses catalog texts; `*_origin` names the file or URL in errors.
    pub fn parse(
        images: &str,
        images_origin: &str,
        kernels: &str,
        kernels_origin: &str,
    ) -> Result<Catalogs, CatalogError> {
        Ok(Catalogs {
            images: Catalogs::parse_images(images, images_origin)?,
            kernels: Catalogs::parse_kernels(kernels, kernels_origin)?,
        })
    }

    /// Parses an image catalog file (`{"version": 1, "images": [...]}`).
    pub fn parse_images(text: &str, origin: &str) -> Result<Vec<ImageEntry>, CatalogError> {
        let file: ImageCatalogFile = parse_json(text, origin)?;
        check_version(file.version, origin)?;
        for entry in &file.images {
            let recipe = entry.recipe.as_ref().map(|recipe| {
                check_suite(&recipe.suite)?;
                recipe
                    .packages
                    .iter()
                    .try_for_each(|package| check_package_name(package))
            });
            check_entry(
                origin,
                &entry.name,
                entry.bundle.is_some(),
                entry.prefer,
                recipe,
            )?;
        }
        Ok(file.images)
    }

    /// Parses a kernel catalog file (`{"version": 1, "kernels": [...]}`).
    pub fn parse_kernels(text: &str, origin: &str) -> Result<Vec<KernelEntry>, CatalogError> {
        let file: KernelCatalogFile = parse_json(text, origin)?;
        check_version(file.version, origin)?;
        for entry in &file.kernels {
            let recipe = entry.recipe.as_ref().map(|recipe| {
                check_suite(&recipe.suite)?;
                check_package_name(&recipe.package)
            });
            check_entry(
                origin,
                &entry.name,
                entry.bundle.is_some(),
                entry.prefer,
                recipe,
            )?;
        }
        Ok(file.kernels)
    }

    pub fn image(&self, name: &str) -> Option<&ImageEntry> {
        self.images.iter().find(|entry| entry.name == name)
    }

    pub fn kernel(&self, name: &str) -> Option<&KernelEntry> {
        self.kernels.iter().find(|entry| entry.name == name)
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, CatalogError> {
    serde_json::from_str(text).map_err(|source| CatalogError::Parse {
        origin: origin.to_owned(),
        source,
    })
}

/// An entry's name and sources: something to build it from, the one `prefer` names among
/// them, and recipe words that are Debian names (they reach mmdebstrap's command line).
fn check_entry(
    origin: &str,
    name: &str,
    has_bundle: bool,
    prefer: Prefer,
    recipe: Option<Result<(), String>>,
) -> Result<(), CatalogError> {
    let reason = if name.is_empty()
        || !name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
    {
        Some("the name must be letters, digits, `-`, `_` and `.`".to_owned())
    } else if !has_bundle && recipe.is_none() {
        Some("it has neither a `bundle` nor a `recipe`, so it cannot be built".to_owned())
    } else if let Some(Err(reason)) = &recipe {
        Some(format!("recipe: {reason}"))
    } else {
        match prefer {
            Prefer::Bundle if !has_bundle => Some("it prefers `bundle` but has none".to_owned()),
            Prefer::Recipe if recipe.is_none() => {
                Some("it prefers `recipe` but has none".to_owned())
            }
            _ => None,
        }
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(CatalogError::Entry {
            origin: origin.to_owned(),
            name: name.to_owned(),
            reason,
        }),
    }
}

fn check_version(found: u32, origin: &str) -> Result<(), CatalogError> {
    if found == 1 {
        Ok(())
    } else {
        Err(CatalogError::Version {
            origin: origin.to_owned(),
            found,
        })
    }
}

/// A Debian package name (policy §5.6.7), optionally pinned: `make`, `libc6:amd64`,
/// `git=1:2.39.2-1.1`.
pub fn check_package_name(spec: &str) -> Result<(), String> {
    let (name_arch, version) = match spec.split_once('=') {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    };
    let name = name_arch
        .split_once(':')
        .map_or(name_arch, |(name, _)| name);
    let arch_ok = name_arch.split_once(':').is_none_or(|(_, arch)| {
        !arch.is_empty() && arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    let mut chars = name.chars();
    let name_ok = name.len() >= 2
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'));
    let version_ok = version.is_none_or(|version| {
        !version.is_empty()
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~' | '-' | ':'))
    });
    if name_ok && arch_ok && version_ok {
        Ok(())
    } else {
        Err(format!(
            "`{spec}` is not a Debian package name (lowercase letters, digits, `+`, `-`, `.`; optionally `:arch` and `=version`)"
        ))
    }
}

/// A distribution release name such as `bookworm` or `stable`.
pub fn check_suite(suite: &str) -> Result<(), String> {
    let mut chars = suite.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{suite}` is not a release name like `bookworm` (lowercase letters, digits, `-`, `.`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalogs_parse_and_reference_known_kernels() {
        let catalogs = Catalogs::embedded();
        assert!(catalogs.image("debian-bookworm").is_some());
        for image in &catalogs.images {
            assert!(
                catalogs.kernel(&image.kernel_ref).is_some(),
                "image {} names unknown kernel {}",
                image.name,
                image.kernel_ref
            );
            assert!(image.bundle.is_some() || image.recipe.is_some());
        }
    }

    #[test]
    fn entries_that_cannot_be_built_or_smuggle_options_are_refused() {
        let image = |fields: &str| {
            format!(
                r#"{{"version": 1, "images": [{{"name": "x", "distro": "debian", "arch": "x86_64",
                    "kernel_ref": "k", {fields}}}]}}"#
            )
        };
        let recipe = |suite: &str, package: &str| {
            format!(
                r#""prefer": "recipe", "recipe": {{"distro": "debian", "suite": "{suite}",
                    "packages": ["{package}"]}}"#
            )
        };
        for (fields, expected) in [
            (
                r#""prefer": "bundle""#.to_owned(),
                "neither a `bundle` nor a `recipe`",
            ),
            (
                recipe("--setup-hook=touch /pwned", "make"),
                "not a release name",
            ),
            (
                recipe("bookworm", "--customize-hook=id"),
                "not a Debian package name",
            ),
            (
                r#""prefer": "bundle", "recipe": {"distro": "debian", "suite": "bookworm",
                    "packages": []}"#
                    .to_owned(),
                "prefers `bundle` but has none",
            ),
        ] {
            let error = Catalogs::parse_images(&image(&fields), "/c.json").unwrap_err();
            let text = error.to_string();
            assert!(text.starts_with("catalog /c.json: entry `x`: "), "{text}");
            assert!(text.contains(expected), "{expected}: {text}");
        }
        let kernels = r#"{"version": 1, "kernels": [{"name": "k", "arch": "x86_64",
            "prefer": "recipe", "recipe": {"distro": "debian", "suite": "-x",
            "package": "linux-image-amd64"}}]}"#;
        let error = Catalogs::parse_kernels(kernels, "/k.json").unwrap_err();
        assert!(error.to_string().contains("not a release name"), "{error}");
        assert!(Catalogs::parse_images(&image(&recipe("bookworm", "make")), "/c.json").is_ok());
    }

    #[test]
    fn wrong_version_is_reported_with_its_origin() {
        let err = Catalogs::parse(
            r#"{"version": 2, "images": []}"#,
            "/tmp/x.json",
            EMBEDDED_KERNELS,
            "embedded",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "catalog /tmp/x.json has version 2; this banger reads version 1"
        );
    }
}
