//! The remote step cache on an OCI registry: `[cache] remote`, `--cache-from`, `--cache-to`.
//!
//! A team's registry (distribution, Harbor, GHCR, ECR, Artifactory) stores banger's step
//! records as small OCI artifacts, one per definition key, so that a machine that misses a
//! step locally downloads its outputs instead of running it. The format
//! (`docs/remote-cache.md`):
//! - tag `step-v1-<definition key, 64 hex>` in the cache's repository (tags allow 128
//!   characters; a definition key is 64);
//! - an OCI image manifest with `artifactType` [`STEP_ARTIFACT_TYPE`]; its config blob is the
//!   step's record ([`RECORD_MEDIA_TYPE`]: kind, version, params, inputs, outputs with their
//!   sha256 and size, both keys, the output digest), its layers are the outputs
//!   ([`OUTPUT_MEDIA_TYPE`]), each titled with its output name
//!   (`org.opencontainers.image.title`). Outputs are blobs under their own sha256, so the
//!   registry stores each once, whichever steps and images share it.
//!
//! Reading trusts nothing it has not checked: the manifest's layers and the record's outputs
//! must agree name for name, digest for digest and size for size; the engine then recomputes
//! the definition key from the record and checks it against the tag's (`engine::remote`);
//! every output is verified by sha256 and size while it streams. Pushing sends outputs first
//! (skipping blobs the repository has), then the record, then the manifest: a manifest is
//! only ever visible with everything it names.
//!
//! Which steps are shared is [`crate::steps::SHARED_KINDS`]: those that cost more to make
//! than to move (a package recipe, a builder VM's command, the kernel's steps). Layer fetches
//! come from a registry already, and an image's ext4 is rebuilt from its layers
//! deterministically in about a second, so neither is sent.
//!
//! Known weaknesses: no cross-repository blob mount yet (a blob in another repository of the
//! same registry is uploaded again); records are never deleted from the registry (use the
//! registry's own retention rules on `step-v1-*` tags).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{
    BoxFuture, PushedStep, RemoteCache, RemoteError, RemoteScope, TransferProgress,
};
use crate::key::Key;
use crate::oci::{
    ImageReference, OciError, RegistryClient, RegistryOptions, RetryPolicy, registry_digest,
    sha256_digest,
};
use crate::plan::StepNode;
use crate::store::StepRecord;

/// `artifactType` of a step's manifest.
pub const STEP_ARTIFACT_TYPE: &str = "application/vnd.banger.step.v1";
/// Media type of the record (the manifest's config blob).
pub const RECORD_MEDIA_TYPE: &str = "application/vnd.banger.step.record.v1+json";
/// Media type of each output (a manifest layer).
pub const OUTPUT_MEDIA_TYPE: &str = "application/vnd.banger.step.output.v1";
/// Version of the record format, and the prefix of every tag.
const RECORD_FORMAT: u32 = 1;
const TAG_PREFIX: &str = "step-v1-";
/// A record is a few KiB; anything bigger is not one.
const MAX_RECORD_SIZE: u64 = 1 << 20;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const TITLE: &str = "org.opencontainers.image.title";

/// A remote the user named that banger cannot use.
#[derive(Debug, thiserror::Error)]
pub enum RemoteCacheError {
    #[error(
        "`{input}` is not a remote cache: {reason} (write REGISTRY/REPOSITORY, for example \
         registry.example.com/team/banger-cache)"
    )]
    Invalid { input: String, reason: String },
}

impl crate::error::Classify for RemoteCacheError {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::User
    }
}

/// A step cache in one repository of an OCI registry.
pub struct OciRemoteCache {
    client: RegistryClient,
    repository: ImageReference,
    shared: Vec<String>,
}

impl std::fmt::Debug for OciRemoteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciRemoteCache")
            .field("repository", &self.repository.name())
            .finish_non_exhaustive()
    }
}

impl OciRemoteCache {
    /// The cache at `remote` (`REGISTRY/REPOSITORY`, no tag or digest), reached with
    /// `options` (credentials, proxies, insecure registries). Requests fail over sooner than
    /// pulls do: a remote that does not answer must not hold a build up for minutes.
    pub fn new(
        remote: &str,
        options: &RegistryOptions,
    ) -> Result<OciRemoteCache, RemoteCacheError> {
        let invalid = |reason: String| RemoteCacheError::Invalid {
            input: remote.to_owned(),
            reason,
        };
        let repository = ImageReference::parse(remote).map_err(|error| match error {
            OciError::InvalidReference { reason, .. } => invalid(reason),
            other => invalid(other.to_string()),
        })?;
        let last = remote.rsplit('/').next().unwrap_or(remote);
        if remote.contains('@') || last.contains(':') || !remote.contains('/') {
            return Err(invalid(
                "it needs a registry and a repository, and no tag or digest (banger tags each \
                 step's entry itself)"
                    .to_owned(),
            ));
        }
        let mut options = options.clone();
        options.retry = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
        };
        options.connect_timeout = options.connect_timeout.min(Duration::from_secs(5));
        Ok(OciRemoteCache {
            client: RegistryClient::new(options),
            repository,
            shared: crate::steps::SHARED_KINDS
                .iter()
                .map(|kind| (*kind).to_owned())
                .collect(),
        })
    }

    /// Shares steps of these kinds instead of [`crate::steps::SHARED_KINDS`] (tests, with
    /// kinds of their own).
    pub fn sharing(mut self, kinds: &[&str]) -> OciRemoteCache {
        self.shared = kinds.iter().map(|kind| (*kind).to_owned()).collect();
        self
    }

    /// The tag of a definition key's entry.
    pub fn tag(key: &Key) -> String {
        format!("{TAG_PREFIX}{}", key.to_hex())
    }

    fn entry(&self, key: &Key) -> ImageReference {
        ImageReference::parse(&format!("{}:{}", self.repository.name(), Self::tag(key)))
            .expect("a parsed repository and a hex tag make a valid reference")
    }

    async fn read_entry(&self, key: &Key) -> Result<Option<StepRecord>, RemoteError> {
        let reference = self.entry(key);
        let Some((body, _)) = self
            .client
            .fetch_manifest_bytes(&reference)
            .await
            .map_err(oci_failure)?
        else {
            return Ok(None);
        };
        let manifest: StepManifest = serde_json::from_slice(&body).map_err(|error| {
            RemoteError::step(format!(
                "the manifest of {reference} is not a banger step entry: {error}"
            ))
        })?;
        if manifest.config.media_type != RECORD_MEDIA_TYPE {
            return Err(RemoteError::step(format!(
                "the manifest of {reference} has a `{}` config, not a banger step record",
                manifest.config.media_type
            )));
        }
        let bytes = self
            .client
            .fetch_blob_bytes(
                &reference,
                &manifest.config.digest,
                manifest.config.size,
                MAX_RECORD_SIZE,
            )
            .await
            .map_err(oci_failure)?;
        let stored: StoredRecord = serde_json::from_slice(&bytes).map_err(|error| {
            RemoteError::step(format!(
                "the record of {reference} is not readable: {error}"
            ))
        })?;
        if stored.format != RECORD_FORMAT {
            return Err(RemoteError::step(format!(
                "the record of {reference} has format {}, this banger reads {RECORD_FORMAT}",
                stored.format
            )));
        }
        let record = stored.record;
        let mut layers: BTreeMap<&str, &Descriptor> = BTreeMap::new();
        for layer in &manifest.layers {
            let title = layer
                .annotations
                .get(TITLE)
                .map(String::as_str)
                .unwrap_or_default();
            if layer.media_type != OUTPUT_MEDIA_TYPE || layers.insert(title, layer).is_some() {
                return Err(RemoteError::step(format!(
                    "the manifest of {reference} lists an output that is not a banger output \
                     or lists one twice (`{title}`)"
                )));
            }
        }
        let agree = layers.len() == record.outputs.len()
            && record.outputs.iter().all(|(name, output)| {
                layers.get(name.as_str()).is_some_and(|layer| {
                    layer.size == output.size
                        && registry_digest(&output.integrity).as_deref() == Some(&layer.digest)
                })
            });
        if !agree {
            return Err(RemoteError::step(format!(
                "the manifest and the record of {reference} disagree about the step's outputs"
            )));
        }
        Ok(Some(record))
    }

    async fn write_entry(
        &self,
        record: &StepRecord,
        files: &[(String, PathBuf)],
        progress: TransferProgress<'_>,
    ) -> Result<PushedStep, RemoteError> {
        let reference = self.entry(&record.definition_key);
        let total = record.total_size();
        let mut pushed = PushedStep::default();
        let mut layers = Vec::new();
        let mut before = 0u64;
        for (name, output) in &record.outputs {
            let digest = registry_digest(&output.integrity).ok_or_else(|| {
                RemoteError::step(format!(
                    "output `{name}` has an integrity banger cannot send: {}",
                    output.integrity
                ))
            })?;
            let path = files
                .iter()
                .find(|(file, _)| file == name)
                .map(|(_, path)| path)
                .ok_or_else(|| RemoteError::step(format!("output `{name}` has no file")))?;
            let offset = before;
            let one = move |done: u64, _: u64| progress(offset + done, total);
            let sent = self
                .client
                .push_blob_file(&reference, path, &digest, output.size, &one)
                .await
                .map_err(oci_failure)?;
            if sent {
                pushed.uploaded_bytes += output.size;
            } else {
                pushed.reused_bytes += output.size;
            }
            before += output.size;
            layers.push(Descriptor {
                media_type: OUTPUT_MEDIA_TYPE.to_owned(),
                digest,
                size: output.size,
                annotations: BTreeMap::from([(TITLE.to_owned(), name.clone())]),
            });
        }
        let config = serde_json::to_vec(&StoredRecord {
            format: RECORD_FORMAT,
            record: record.clone(),
        })
        .map_err(|error| RemoteError::step(format!("cannot write the record: {error}")))?;
        let config_digest = sha256_digest(&config);
        self.client
            .push_blob_bytes(&reference, &config, &config_digest)
            .await
            .map_err(oci_failure)?;
        let manifest = StepManifest {
            schema_version: 2,
            media_type: OCI_MANIFEST.to_owned(),
            artifact_type: Some(STEP_ARTIFACT_TYPE.to_owned()),
            config: Descriptor {
                media_type: RECORD_MEDIA_TYPE.to_owned(),
                digest: config_digest,
                size: config.len() as u64,
                annotations: BTreeMap::new(),
            },
            layers,
            annotations: BTreeMap::from([
                ("dev.banger.step.kind".to_owned(), record.kind.clone()),
                (
                    "dev.banger.step.definition-key".to_owned(),
                    record.definition_key.to_hex(),
                ),
            ]),
        };
        let body = serde_json::to_vec(&manifest)
            .map_err(|error| RemoteError::step(format!("cannot write the manifest: {error}")))?;
        self.client
            .push_manifest(&reference, &body, OCI_MANIFEST)
            .await
            .map_err(oci_failure)?;
        Ok(pushed)
    }
}

impl RemoteCache for OciRemoteCache {
    fn describe(&self) -> String {
        self.repository.name()
    }

    fn shares(&self, kind: &str) -> bool {
        self.shared.iter().any(|shared| shared == kind)
    }

    fn lookup<'a>(
        &'a self,
        _step: &'a StepNode,
        key: &'a Key,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, RemoteError>> {
        Box::pin(self.read_entry(key))
    }

    fn fetch<'a>(
        &'a self,
        record: &'a StepRecord,
        output: &'a str,
        destination: &'a Path,
        progress: TransferProgress<'a>,
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let reference = self.entry(&record.definition_key);
            let stored = record
                .outputs
                .get(output)
                .ok_or_else(|| RemoteError::step(format!("the record has no output `{output}`")))?;
            let digest = registry_digest(&stored.integrity).ok_or_else(|| {
                RemoteError::step(format!(
                    "output `{output}` has an integrity banger cannot check: {}",
                    stored.integrity
                ))
            })?;
            self.client
                .fetch_blob_to_file(&reference, &digest, stored.size, destination, progress)
                .await
                .map_err(oci_failure)
        })
    }

    fn contains<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<bool, RemoteError>> {
        Box::pin(async move {
            self.client
                .fetch_manifest_bytes(&self.entry(key))
                .await
                .map(|found| found.is_some())
                .map_err(oci_failure)
        })
    }

    fn push<'a>(
        &'a self,
        record: &'a StepRecord,
        files: &'a [(String, PathBuf)],
        progress: TransferProgress<'a>,
    ) -> BoxFuture<'a, Result<PushedStep, RemoteError>> {
        Box::pin(self.write_entry(record, files, progress))
    }
}

/// The remote caches of one run (see [`run_caches`]).
#[derive(Debug, Clone, Default)]
pub struct RunCaches {
    pub from: Option<Arc<dyn RemoteCache>>,
    pub to: Option<Arc<dyn RemoteCache>>,
}

impl RunCaches {
    /// Sets them on a run's options.
    pub fn apply(self, options: &mut crate::engine::RunOptions) {
        options.cache_from = self.from;
        options.cache_to = self.to;
    }
}

/// The remote caches of one run: `--cache-from` else `[cache] remote`; `--cache-to` else
/// `[cache] remote` when `[cache] push = true`. One cache when both are the same.
pub fn run_caches(
    cache_from: Option<&str>,
    cache_to: Option<&str>,
    config: &crate::config::Config,
    options: &RegistryOptions,
) -> Result<RunCaches, RemoteCacheError> {
    let from = cache_from.or(config.cache_remote.as_deref());
    let to = cache_to.or(config
        .cache_push
        .then_some(config.cache_remote.as_deref())
        .flatten());
    let from_cache: Option<Arc<dyn RemoteCache>> = match from {
        Some(remote) => Some(Arc::new(OciRemoteCache::new(remote, options)?)),
        None => None,
    };
    let to_cache: Option<Arc<dyn RemoteCache>> = match (to, &from_cache) {
        (Some(remote), Some(cache)) if Some(remote) == from => Some(Arc::clone(cache)),
        (Some(remote), _) => Some(Arc::new(OciRemoteCache::new(remote, options)?)),
        (None, _) => None,
    };
    Ok(RunCaches {
        from: from_cache,
        to: to_cache,
    })
}

/// The error's reach: a blob or manifest that fails verification is this entry's fault;
/// anything else (the network, credentials, the registry's errors) is the remote's.
fn oci_failure(error: OciError) -> RemoteError {
    let scope = match &error {
        OciError::BlobDigestMismatch { .. }
        | OciError::BlobTruncated { .. }
        | OciError::BlobTooLarge { .. }
        | OciError::BlobNotFound { .. }
        | OciError::BlobWrite { .. }
        | OciError::ManifestDigestMismatch { .. }
        | OciError::ManifestTooLarge { .. }
        | OciError::InvalidManifest { .. } => RemoteScope::Step,
        _ => RemoteScope::Remote,
    };
    RemoteError {
        scope,
        message: crate::error::error_chain(&error),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredRecord {
    format: u32,
    #[serde(flatten)]
    record: StepRecord,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StepManifest {
    schema_version: u32,
    media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_config_and_one_remote_serves_both_ways() {
        let options = RegistryOptions::default();
        let path = Path::new("/config.toml");
        let config = crate::config::Config::parse(
            "[cache]\nremote = \"127.0.0.1:5000/config/cache\"\n",
            path,
        )
        .unwrap();
        let shown = |cache: &Option<Arc<dyn RemoteCache>>| cache.as_ref().map(|c| c.describe());
        let caches = run_caches(None, None, &config, &options).unwrap();
        assert_eq!(
            shown(&caches.from).as_deref(),
            Some("127.0.0.1:5000/config/cache")
        );
        assert_eq!(shown(&caches.to), None, "the config does not push");
        let caches = run_caches(
            Some("127.0.0.1:5000/flag/cache"),
            Some("127.0.0.1:5000/flag/cache"),
            &config,
            &options,
        )
        .unwrap();
        assert_eq!(
            shown(&caches.from).as_deref(),
            Some("127.0.0.1:5000/flag/cache")
        );
        assert!(Arc::ptr_eq(
            caches.from.as_ref().unwrap(),
            caches.to.as_ref().unwrap()
        ));
        let pushing = crate::config::Config::parse(
            "[cache]\nremote = \"127.0.0.1:5000/config/cache\"\npush = true\n",
            path,
        )
        .unwrap();
        let caches = run_caches(None, None, &pushing, &options).unwrap();
        assert_eq!(
            shown(&caches.to).as_deref(),
            Some("127.0.0.1:5000/config/cache")
        );
        let error = run_caches(Some("bad:tag"), None, &config, &options)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`bad:tag`"), "{error}");
    }

    #[test]
    fn remotes_are_repositories_without_tag_or_digest() {
        let options = RegistryOptions::default();
        let cache = OciRemoteCache::new("127.0.0.1:5000/team/cache", &options).unwrap();
        assert_eq!(cache.describe(), "127.0.0.1:5000/team/cache");
        let key = Key::from_bytes([7; 32]);
        let tag = OciRemoteCache::tag(&key);
        assert!(tag.len() <= 128, "{tag}");
        assert_eq!(
            cache.entry(&key).to_string(),
            format!("127.0.0.1:5000/team/cache:{tag}")
        );
        for bad in [
            "127.0.0.1:5000/team/cache:latest",
            "127.0.0.1:5000/team/cache@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "registry.example.com/Team/cache",
            "cache",
            "",
        ] {
            let error = OciRemoteCache::new(bad, &options)
                .map(|cache| format!("accepted {bad:?} as {cache:?}"))
                .unwrap_or_else(|error| error.to_string());
            assert!(error.contains(&format!("`{bad}`")), "{error}");
        }
    }
}
