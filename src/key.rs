//! Stable step keys.
//!
//! Every step in a plan gets two keys, both blake3 over a canonical, length-prefixed encoding
//! (the [`StableEncode`] trait; derived `Hash` is never used because it is not stable across
//! compiler versions or platforms):
//!
//! | key            | domain tag             | then, in order                                              |
//! |----------------|------------------------|-------------------------------------------------------------|
//! | definition key | `banger/def/v1`        | kind, step `VERSION`, params (sorted by name), for each input in edge order: input name, the input's **definition key** |
//! | content key    | `banger/content/v1`    | kind, step `VERSION`, params (sorted by name), for each input in edge order: input name, the input's **output digest** |
//! | output digest  | `banger/outputs/v1`    | for each output (sorted by name): name, integrity, size     |
//!
//! The definition key is known before anything runs, so a final artifact can hit without
//! fetching its intermediates. The content key is known only once the inputs exist; when an
//! input re-ran but produced identical bytes, its dependants' content keys are unchanged and
//! they are not re-run (early cutoff).
//!
//! A step's *hints* (where to download digest-pinned content from) are deliberately in no key:
//! they do not change what the step produces.
//!
//! Params are a sorted map of named [`ParamValue`]s, so adding a parameter with a default value
//! still changes the key: bump the step's `VERSION` when the meaning of a step changes without its
//! params changing. Project files that a step reads are represented by [`ParamValue::Source`]
//! and replaced by the digest of their content ([`Params::resolve_sources`]) before keying.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A 256-bit blake3 key. Displays as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; 32]);

impl Key {
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
            out.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
        }
        out
    }

    /// The first 12 hex digits: what `banger graph` prints.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_owned()
    }

    pub fn parse_hex(text: &str) -> Option<Key> {
        if text.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (index, chunk) in text.as_bytes().chunks(2).enumerate() {
            let high = (chunk[0] as char).to_digit(16)?;
            let low = (chunk[1] as char).to_digit(16)?;
            bytes[index] = (high * 16 + low) as u8;
        }
        Some(Key(bytes))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.short())
    }
}

impl Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Key::parse_hex(&text).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// Feeds a canonical encoding into blake3. Every value is tagged and length-prefixed, so no two
/// different values encode to the same bytes.
#[derive(Debug)]
pub struct KeyEncoder {
    hasher: blake3::Hasher,
}

impl KeyEncoder {
    /// Starts a key in a domain (`banger/def/v1`), so keys of different kinds never collide.
    pub fn new(domain: &str) -> KeyEncoder {
        let mut encoder = KeyEncoder {
            hasher: blake3::Hasher::new(),
        };
        encoder.str(domain);
        encoder
    }

    pub fn tag(&mut self, tag: u8) {
        self.hasher.update(&[tag]);
    }

    pub fn u64(&mut self, value: u64) {
        self.tag(b'u');
        self.hasher.update(&value.to_le_bytes());
    }

    pub fn bytes(&mut self, value: &[u8]) {
        self.tag(b'b');
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value);
    }

    pub fn str(&mut self, value: &str) {
        self.tag(b's');
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value.as_bytes());
    }

    pub fn finish(&self) -> Key {
        Key(*self.hasher.finalize().as_bytes())
    }
}

/// A value with one canonical byte encoding, for keys.
pub trait StableEncode {
    fn encode(&self, encoder: &mut KeyEncoder);
}

impl StableEncode for str {
    fn encode(&self, encoder: &mut KeyEncoder) {
        encoder.str(self);
    }
}

impl StableEncode for String {
    fn encode(&self, encoder: &mut KeyEncoder) {
        encoder.str(self);
    }
}

impl StableEncode for u64 {
    fn encode(&self, encoder: &mut KeyEncoder) {
        encoder.u64(*self);
    }
}

impl StableEncode for u32 {
    fn encode(&self, encoder: &mut KeyEncoder) {
        encoder.u64(u64::from(*self));
    }
}

impl StableEncode for bool {
    fn encode(&self, encoder: &mut KeyEncoder) {
        encoder.tag(if *self { b'T' } else { b'F' });
    }
}

impl StableEncode for Key {
    fn encode(&self, encoder: &mut KeyEncoder) {
        encoder.tag(b'k');
        encoder.hasher.update(&self.0);
    }
}

impl<T: StableEncode> StableEncode for [T] {
    fn encode(&self, encoder: &mut KeyEncoder) {
        encoder.tag(b'[');
        encoder.u64(self.len() as u64);
        for item in self {
            item.encode(encoder);
        }
    }
}

impl<T: StableEncode> StableEncode for Vec<T> {
    fn encode(&self, encoder: &mut KeyEncoder) {
        self.as_slice().encode(encoder);
    }
}

impl<T: StableEncode> StableEncode for Option<T> {
    fn encode(&self, encoder: &mut KeyEncoder) {
        match self {
            None => encoder.tag(b'0'),
            Some(value) => {
                encoder.tag(b'1');
                value.encode(encoder);
            }
        }
    }
}

impl<V: StableEncode> StableEncode for BTreeMap<String, V> {
    fn encode(&self, encoder: &mut KeyEncoder) {
        encoder.tag(b'{');
        encoder.u64(self.len() as u64);
        for (name, value) in self {
            encoder.str(name);
            value.encode(encoder);
        }
    }
}

/// One parameter of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamValue {
    Str(String),
    Int(u64),
    Bool(bool),
    List(Vec<ParamValue>),
    Map(BTreeMap<String, String>),
    /// A project path whose content feeds the key; replaced by [`ParamValue::Digest`] before
    /// keying.
    Source(PathBuf),
    /// A content digest (`blake3:…`, `sha256:…`) with the path it was taken from.
    Digest {
        path: String,
        digest: String,
    },
}

impl StableEncode for ParamValue {
    fn encode(&self, encoder: &mut KeyEncoder) {
        match self {
            ParamValue::Str(value) => {
                encoder.tag(1);
                encoder.str(value);
            }
            ParamValue::Int(value) => {
                encoder.tag(2);
                encoder.u64(*value);
            }
            ParamValue::Bool(value) => {
                encoder.tag(3);
                value.encode(encoder);
            }
            ParamValue::List(values) => {
                encoder.tag(4);
                values.encode(encoder);
            }
            ParamValue::Map(map) => {
                encoder.tag(5);
                map.encode(encoder);
            }
            ParamValue::Source(path) => {
                // Unresolved sources only reach here in plans keyed without fingerprints
                // (`banger graph` of a plan whose files are missing); keying by path keeps the
                // key stable and `graph` marks such steps as "will run".
                encoder.tag(6);
                encoder.str(&path.to_string_lossy());
            }
            ParamValue::Digest { path, digest } => {
                encoder.tag(7);
                encoder.str(path);
                encoder.str(digest);
            }
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Str(value) => write!(f, "{value:?}"),
            ParamValue::Int(value) => write!(f, "{value}"),
            ParamValue::Bool(value) => write!(f, "{value}"),
            ParamValue::List(values) => {
                f.write_str("[")?;
                for (index, value) in values.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{value}")?;
                }
                f.write_str("]")
            }
            ParamValue::Map(map) => {
                f.write_str("{")?;
                for (index, (name, value)) in map.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{name} = {value:?}")?;
                }
                f.write_str("}")
            }
            ParamValue::Source(path) => write!(f, "{} (not yet hashed)", path.display()),
            ParamValue::Digest { path, digest } => {
                let short = digest.get(..digest.find(':').map_or(0, |i| i + 1) + 12);
                write!(f, "{path} ({})", short.unwrap_or(digest))
            }
        }
    }
}

impl From<&str> for ParamValue {
    fn from(value: &str) -> Self {
        ParamValue::Str(value.to_owned())
    }
}

impl From<String> for ParamValue {
    fn from(value: String) -> Self {
        ParamValue::Str(value)
    }
}

impl From<u64> for ParamValue {
    fn from(value: u64) -> Self {
        ParamValue::Int(value)
    }
}

impl From<u32> for ParamValue {
    fn from(value: u32) -> Self {
        ParamValue::Int(u64::from(value))
    }
}

impl From<bool> for ParamValue {
    fn from(value: bool) -> Self {
        ParamValue::Bool(value)
    }
}

/// A step's parameters, by name. Sorted, so the encoding is canonical.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Params(BTreeMap<String, ParamValue>);

impl Params {
    pub fn new() -> Params {
        Params::default()
    }

    /// Builder-style insert.
    pub fn with(mut self, name: &str, value: impl Into<ParamValue>) -> Params {
        self.0.insert(name.to_owned(), value.into());
        self
    }

    pub fn insert(&mut self, name: &str, value: impl Into<ParamValue>) {
        self.0.insert(name.to_owned(), value.into());
    }

    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.0.get(name)
    }

    pub fn get_str(&self, name: &str) -> Option<&str> {
        match self.0.get(name) {
            Some(ParamValue::Str(value)) => Some(value),
            _ => None,
        }
    }

    pub fn get_int(&self, name: &str) -> Option<u64> {
        match self.0.get(name) {
            Some(ParamValue::Int(value)) => Some(*value),
            _ => None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamValue)> {
        self.0.iter().map(|(name, value)| (name.as_str(), value))
    }

    /// Project paths this step reads, which must be fingerprinted before keying.
    pub fn sources(&self) -> impl Iterator<Item = &PathBuf> {
        self.0.values().filter_map(|value| match value {
            ParamValue::Source(path) => Some(path),
            _ => None,
        })
    }

    /// Replaces every [`ParamValue::Source`] whose digest `lookup` knows with a
    /// [`ParamValue::Digest`].
    pub fn resolve_sources(&mut self, lookup: &dyn Fn(&PathBuf) -> Option<String>) {
        for value in self.0.values_mut() {
            if let ParamValue::Source(path) = value
                && let Some(digest) = lookup(path)
            {
                *value = ParamValue::Digest {
                    path: path.to_string_lossy().into_owned(),
                    digest,
                };
            }
        }
    }

    /// Field-by-field differences from `old` to `self`, for `banger graph --why`.
    pub fn diff(&self, old: &Params) -> Vec<ParamChange> {
        let mut names: Vec<&String> = self.0.keys().chain(old.0.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter_map(|name| {
                let new = self.0.get(name);
                let was = old.0.get(name);
                (new != was).then(|| ParamChange {
                    name: name.clone(),
                    old: was.cloned(),
                    new: new.cloned(),
                })
            })
            .collect()
    }
}

impl StableEncode for Params {
    fn encode(&self, encoder: &mut KeyEncoder) {
        self.0.encode(encoder);
    }
}

/// One changed parameter between two runs of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamChange {
    pub name: String,
    pub old: Option<ParamValue>,
    pub new: Option<ParamValue>,
}

impl fmt::Display for ParamChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.old, &self.new) {
            (Some(old), Some(new)) => write!(f, "{}: {old} → {new}", self.name),
            (None, Some(new)) => write!(f, "{}: added, {new}", self.name),
            (Some(old), None) => write!(f, "{}: removed, was {old}", self.name),
            (None, None) => write!(f, "{}: unchanged", self.name),
        }
    }
}

/// The definition key of a step: kind, version, params and its inputs' definition keys.
pub fn definition_key(kind: &str, version: u32, params: &Params, inputs: &[(&str, Key)]) -> Key {
    let mut encoder = KeyEncoder::new("banger/def/v1");
    step_header(&mut encoder, kind, version, params);
    encoder.u64(inputs.len() as u64);
    for (name, key) in inputs {
        encoder.str(name);
        key.encode(&mut encoder);
    }
    encoder.finish()
}

/// The content key of a step: kind, version, params and its inputs' output digests.
pub fn content_key(kind: &str, version: u32, params: &Params, inputs: &[(&str, Key)]) -> Key {
    let mut encoder = KeyEncoder::new("banger/content/v1");
    step_header(&mut encoder, kind, version, params);
    encoder.u64(inputs.len() as u64);
    for (name, digest) in inputs {
        encoder.str(name);
        digest.encode(&mut encoder);
    }
    encoder.finish()
}

fn step_header(encoder: &mut KeyEncoder, kind: &str, version: u32, params: &Params) {
    encoder.str(kind);
    encoder.u64(u64::from(version));
    params.encode(encoder);
}

/// The digest of a step's outputs, as seen by its dependants' content keys.
pub fn output_digest<'a>(outputs: impl IntoIterator<Item = (&'a str, &'a str, u64)>) -> Key {
    let mut encoder = KeyEncoder::new("banger/outputs/v1");
    let mut sorted: Vec<_> = outputs.into_iter().collect();
    sorted.sort();
    encoder.u64(sorted.len() as u64);
    for (name, integrity, size) in sorted {
        encoder.str(name);
        encoder.str(integrity);
        encoder.u64(size);
    }
    encoder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_across_releases() {
        // A change here invalidates every user's cache: bump the domain tag on purpose instead.
        let params = Params::new().with("command", "make").with("size", 4u64);
        let key = definition_key("provision.run", 1, &params, &[]);
        assert_eq!(
            key.to_hex(),
            definition_key("provision.run", 1, &params.clone(), &[]).to_hex()
        );
        insta::assert_snapshot!(key.to_hex(), @"497f821c60a8059182ab91397386a89b6dc1098f67243d07a1d3469028da65b6");
    }

    #[test]
    fn every_field_changes_the_key() {
        let params = Params::new().with("command", "make");
        let input = definition_key("a", 1, &Params::new(), &[]);
        let base = definition_key("k", 1, &params, &[("rootfs", input)]);
        assert_ne!(base, definition_key("j", 1, &params, &[("rootfs", input)]));
        assert_ne!(base, definition_key("k", 2, &params, &[("rootfs", input)]));
        assert_ne!(
            base,
            definition_key(
                "k",
                1,
                &params.clone().with("command", "make all"),
                &[("rootfs", input)]
            )
        );
        assert_ne!(base, definition_key("k", 1, &params, &[("other", input)]));
        assert_ne!(base, definition_key("k", 1, &params, &[("rootfs", base)]));
        assert_ne!(base, content_key("k", 1, &params, &[("rootfs", input)]));
    }

    #[test]
    fn length_prefixes_prevent_concatenation_collisions() {
        let split_one = Params::new().with("a", "bc").with("d", "");
        let split_two = Params::new().with("a", "b").with("d", "c");
        assert_ne!(
            definition_key("k", 1, &split_one, &[]),
            definition_key("k", 1, &split_two, &[])
        );
    }

    #[test]
    fn params_diff_names_each_changed_field() {
        let old = Params::new().with("command", "make").with("user", "root");
        let new = Params::new().with("command", "make all").with("env", "X=1");
        let changes: Vec<String> = new.diff(&old).iter().map(ToString::to_string).collect();
        assert_eq!(
            changes,
            [
                "command: \"make\" → \"make all\"",
                "env: added, \"X=1\"",
                "user: removed, was \"root\""
            ]
        );
    }

    #[test]
    fn key_hex_round_trips() {
        let key = definition_key("k", 1, &Params::new(), &[]);
        assert_eq!(Key::parse_hex(&key.to_hex()), Some(key));
        assert_eq!(Key::parse_hex("xyz"), None);
    }
}
