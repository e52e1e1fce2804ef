//! Stage 1 types: the Bangerfile exactly as written, checked only for shape.
//!
//! Every field is optional and spanned: whether a key is required, and what its value means,
//! is decided in [`super::validate`], where the error can point at the table that lacks it.
//! Serde here only rejects unknown keys and values of the wrong TOML type. Values that can be
//! written two ways (`from`, `kernel`, sizes, modes) have hand-written `Deserialize` impls so a
//! mismatch reads "expected a size like ..." instead of serde's untagged-enum message.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use toml::Spanned;

/// `[project]`
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawProject {
    pub name: Option<Spanned<String>>,
}

/// `[image]` and `[images.NAME]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawImage {
    pub from: Option<Spanned<RawFrom>>,
    pub size: Option<Spanned<RawSize>>,
    pub kernel: Option<Spanned<RawKernel>>,
    /// Read entry by entry by the document reader, so one bad entry cannot hide the errors of
    /// the others; declared here so that unknown-key messages list it.
    #[allow(dead_code)]
    pub provision: Option<IgnoredAny>,
}

/// `[[image.provision]]`
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawProvision {
    pub run: Option<Spanned<String>>,
    pub env: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub init: Option<Spanned<String>>,
    pub copy: Option<Spanned<String>>,
    pub to: Option<Spanned<String>>,
    pub mode: Option<Spanned<RawMode>>,
}

/// `[vm]`
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawVm {
    pub vcpu: Option<Spanned<i64>>,
    pub memory: Option<Spanned<RawSize>>,
    pub disk: Option<Spanned<RawSize>>,
    pub network: Option<Spanned<String>>,
    pub ports: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[workspace]`
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawWorkspace {
    pub host: Option<Spanned<String>>,
    pub guest: Option<Spanned<String>>,
}

/// `[up]`
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawUp {
    pub run: Option<Spanned<String>>,
}

/// `[[file_sync]]`
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawFileSync {
    pub host: Option<Spanned<String>>,
    pub guest: Option<Spanned<String>>,
    pub mode: Option<Spanned<RawMode>>,
}

/// `from = "..."` or `from = { oci | catalog | image | recipe = ... }`.
#[derive(Debug)]
pub(crate) enum RawFrom {
    /// A catalog image name if the catalog has it, else an OCI reference.
    Name(String),
    Table(Box<RawFromTable>),
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFromTable {
    pub oci: Option<Spanned<String>>,
    pub catalog: Option<Spanned<String>>,
    pub image: Option<Spanned<String>>,
    pub recipe: Option<Spanned<String>>,
    pub suite: Option<Spanned<String>>,
    pub packages: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `kernel = "catalog-name"` or `kernel = { local | catalog = ... }`.
#[derive(Debug)]
pub(crate) enum RawKernel {
    Name(String),
    Table(Box<RawKernelTable>),
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKernelTable {
    pub catalog: Option<Spanned<String>>,
    pub local: Option<Spanned<String>>,
}

/// A size: `"4G"` or an integer number of bytes.
#[derive(Debug)]
pub(crate) enum RawSize {
    Text(String),
    Bytes(i64),
}

/// A duration: `"90s"`, `"30m"`, `"2h"` or an integer number of seconds.
#[derive(Debug)]
pub(crate) enum RawDuration {
    Text(String),
    Seconds(i64),
}

/// A file mode: `"0644"` or an integer (which must be written in octal, `0o644`).
#[derive(Debug)]
pub(crate) enum RawMode {
    Text(String),
    Number(i64),
}

macro_rules! string_or_table {
    ($raw:ident, $table:ident, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $raw {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct RawVisitor;
                impl<'de> Visitor<'de> for RawVisitor {
                    type Value = $raw;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }

                    fn visit_str<E: de::Error>(self, value: &str) -> Result<$raw, E> {
                        Ok($raw::Name(value.to_owned()))
                    }

                    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<$raw, A::Error> {
                        $table::deserialize(de::value::MapAccessDeserializer::new(map))
                            .map(|table| $raw::Table(table.into()))
                    }
                }
                deserializer.deserialize_any(RawVisitor)
            }
        }
    };
}

string_or_table!(
    RawFrom,
    RawFromTable,
    "an image name or reference, or a table like `{ oci = \"alpine:3.20\" }`"
);
string_or_table!(
    RawKernel,
    RawKernelTable,
    "a kernel name, or a table like `{ local = \"my-kernel\" }`"
);

macro_rules! string_or_integer {
    ($raw:ident, $text:ident, $number:ident, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $raw {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct RawVisitor;
                impl<'de> Visitor<'de> for RawVisitor {
                    type Value = $raw;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }

                    fn visit_str<E: de::Error>(self, value: &str) -> Result<$raw, E> {
                        Ok($raw::$text(value.to_owned()))
                    }

                    fn visit_i64<E: de::Error>(self, value: i64) -> Result<$raw, E> {
                        Ok($raw::$number(value))
                    }

                    fn visit_u64<E: de::Error>(self, value: u64) -> Result<$raw, E> {
                        i64::try_from(value)
                            .map($raw::$number)
                            .map_err(|_| E::custom(format!("{value} is too large")))
                    }
                }
                deserializer.deserialize_any(RawVisitor)
            }
        }
    };
}

string_or_integer!(
    RawSize,
    Text,
    Bytes,
    "a size like \"4G\" or a number of bytes"
);
string_or_integer!(
    RawDuration,
    Text,
    Seconds,
    "a duration like \"30m\" or a number of seconds"
);
string_or_integer!(
    RawMode,
    Text,
    Number,
    "an octal file mode like \"0644\" or 0o644"
);
