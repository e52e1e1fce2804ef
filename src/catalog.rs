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
        Ok(file.images)
    }

    /// Parses a kernel catalog file (`{"version": 1, "kernels": [...]}`).
    pub fn parse_kernels(text: &str, origin: &str) -> Result<Vec<KernelEntry>, CatalogError> {
        let file: KernelCatalogFile = parse_json(text, origin)?;
        check_version(file.version, origin)?;
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
