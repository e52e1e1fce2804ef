//! The catalogue of step kinds: name, version, cache policy and resource class of each.
//!
//! Plans name steps by kind; the engine finds an executor for each kind at run time. The
//! executors of the image and kernel kinds are here ([`with_executors`]); those of the
//! sandbox's `vm.*` kinds (boot, file sync, workspace, up command) need the daemon's VMs and
//! live in `ops::up`, which registers them on the engine it runs `banger up` with.
//!
//! Bump a kind's `version` whenever what it produces changes for the same params: every key of
//! that kind, and of everything downstream, changes with it.

pub mod agent_layer;
pub mod bundle_steps;
pub mod fetch_layer;
pub mod import_file;
pub mod kernel_extract;
pub mod kernel_import;
pub mod kernel_initramfs;
pub mod kernel_local;
pub mod kernel_package;
pub mod kernel_stage;
pub mod mmdebstrap;
pub mod provision_copy;
pub mod provision_run;
pub mod rootfs_build;

use std::sync::Arc;

use crate::engine::{Engine, EngineBuilder, ResourceLimits, StepContext, StepError};
use crate::oci::RegistryClient;
use crate::plan::kinds::StepParams;
use crate::plan::{CachePolicy, ResourceClass};
use crate::store::Store;

/// Static facts about one step kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    pub name: &'static str,
    pub version: u32,
    pub cache: CachePolicy,
    pub resource: ResourceClass,
    /// One line for `banger graph --format json` and the docs.
    pub description: &'static str,
}

const fn kind(
    name: &'static str,
    version: u32,
    cache: CachePolicy,
    resource: ResourceClass,
    description: &'static str,
) -> KindInfo {
    KindInfo {
        name,
        version,
        cache,
        resource,
        description,
    }
}

use CachePolicy::{Cached, Never};
use ResourceClass::{Cpu, Disk, Network, Vm};

pub const OCI_RESOLVE: KindInfo = kind(
    "oci.resolve",
    1,
    Cached,
    Network,
    "resolve an OCI reference to the linux/amd64 manifest digest",
);
pub const OCI_FETCH_LAYERS: KindInfo = kind(
    "oci.fetch-layers",
    1,
    Never,
    Network,
    "fetch every layer of an unpinned reference (layers are known once resolved)",
);
pub const OCI_FETCH_LAYER: KindInfo = kind(
    "oci.fetch-layer",
    1,
    Cached,
    Network,
    "download one layer blob, verified against its digest",
);
pub const IMPORT_FILE: KindInfo = kind(
    "import.file",
    1,
    Cached,
    Disk,
    "bring a host file (a rootfs tar, an ext4 image) into the store, keyed by its content",
);
pub const CATALOG_FETCH_BUNDLE: KindInfo = kind(
    "catalog.fetch-bundle",
    1,
    Cached,
    Network,
    "download a catalog bundle, verified against its sha256",
);
pub const BUNDLE_UNPACK: KindInfo = kind(
    "bundle.unpack",
    1,
    Cached,
    Disk,
    "unpack rootfs.ext4 and manifest.json from a bundle",
);
pub const BUNDLE_WRITE: KindInfo = kind(
    "bundle.write",
    1,
    Cached,
    Cpu,
    "pack an image and its manifest as a golden bundle (.tar.zst)",
);
pub const RECIPE_MMDEBSTRAP: KindInfo = kind(
    "recipe.mmdebstrap",
    2,
    Cached,
    Network,
    "build a root filesystem tar from distribution packages",
);
pub const ROOTFS_BUILD: KindInfo = kind(
    "rootfs.build",
    2,
    Cached,
    Disk,
    "flatten layers (tars, or an ext4 image first) with whiteouts into an ext4 image: owners, modes, xattrs kept, per-instance identity removed",
);
pub const AGENT_LAYER: KindInfo = kind(
    "agent.layer",
    1,
    Cached,
    Cpu,
    "inject agents: banger's guest agent, units and sshd settings as a layer",
);
pub const KERNEL_FETCH_BUNDLE: KindInfo = kind(
    "kernel.fetch-bundle",
    1,
    Cached,
    Network,
    "download a kernel bundle, verified against its sha256",
);
pub const KERNEL_FETCH_PACKAGE: KindInfo = kind(
    "kernel.fetch-package",
    2,
    Cached,
    Network,
    "download the distribution's kernel package",
);
pub const KERNEL_EXTRACT: KindInfo = kind(
    "kernel.extract",
    1,
    Cached,
    Cpu,
    "turn the packaged kernel into an ELF vmlinux with PVH and collect modules",
);
pub const KERNEL_INITRAMFS: KindInfo = kind(
    "kernel.initramfs",
    2,
    Cached,
    Cpu,
    "build banger's small initramfs that loads virtio modules and mounts the root",
);
pub const KERNEL_LOCAL: KindInfo = kind(
    "kernel.local",
    1,
    Never,
    Disk,
    "read a kernel imported with `banger kernel import`",
);
pub const KERNEL_IMPORT: KindInfo = kind(
    "kernel.import",
    1,
    Cached,
    Disk,
    "bring a kernel directory (vmlinux, initrd, modules) into the store",
);
pub const KERNEL_STAGE: KindInfo = kind(
    "kernel.stage",
    1,
    Cached,
    Disk,
    "stage vmlinux, initrd and modules for booting",
);
pub const PROVISION_RUN: KindInfo = kind(
    "provision.run",
    1,
    Cached,
    Vm,
    "run a command in a builder VM; what it changed is the output, as a layer",
);
pub const PROVISION_COPY: KindInfo = kind(
    "provision.copy",
    2,
    Cached,
    Disk,
    "a project file or directory as a layer",
);
pub const VM_BOOT: KindInfo = kind(
    "vm.boot",
    1,
    Never,
    Vm,
    "boot the sandbox VM and wait for its agent",
);
pub const VM_FILE_SYNC: KindInfo = kind(
    "vm.file-sync",
    2,
    Never,
    Disk,
    "copy [[file_sync]] host files into the guest",
);
pub const VM_WORKSPACE: KindInfo = kind(
    "vm.workspace",
    1,
    Never,
    Disk,
    "import the workspace directory into the guest",
);
pub const VM_UP_COMMAND: KindInfo = kind(
    "vm.up-command",
    1,
    Never,
    Vm,
    "run the [up] command in the sandbox",
);

/// Every kind banger plans, for docs and `banger graph --format json`.
pub const ALL_KINDS: &[KindInfo] = &[
    OCI_RESOLVE,
    OCI_FETCH_LAYERS,
    OCI_FETCH_LAYER,
    IMPORT_FILE,
    CATALOG_FETCH_BUNDLE,
    BUNDLE_UNPACK,
    BUNDLE_WRITE,
    RECIPE_MMDEBSTRAP,
    ROOTFS_BUILD,
    AGENT_LAYER,
    KERNEL_FETCH_BUNDLE,
    KERNEL_FETCH_PACKAGE,
    KERNEL_EXTRACT,
    KERNEL_INITRAMFS,
    KERNEL_LOCAL,
    KERNEL_IMPORT,
    KERNEL_STAGE,
    PROVISION_RUN,
    PROVISION_COPY,
    VM_BOOT,
    VM_FILE_SYNC,
    VM_WORKSPACE,
    VM_UP_COMMAND,
];

/// Kinds the remote step cache shares (`crate::remote`): those that cost more to make than
/// to move. Not layer fetches (they come from a registry already), nor an image's ext4 (its
/// layers rebuild it, byte for byte, in about a second), nor cheap local work.
pub const SHARED_KINDS: &[&str] = &[
    RECIPE_MMDEBSTRAP.name,
    PROVISION_RUN.name,
    KERNEL_FETCH_PACKAGE.name,
    KERNEL_EXTRACT.name,
    KERNEL_INITRAMFS.name,
    KERNEL_STAGE.name,
];

/// The output every image step ends with: an ext4 image.
pub const ROOTFS_OUTPUT: &str = "rootfs.ext4";

/// Memory per permit of the `vm` resource class: a VM step's weight is its memory in these
/// units, and the class's limit is the host's memory in them (see
/// [`crate::engine::ResourceLimits::for_host`]), so VMs run side by side only when memory
/// allows.
pub const VM_MEMORY_PERMIT_MIB: u32 = 64;

/// What executors share: clients with their connection pools and credentials.
#[derive(Debug, Clone)]
pub struct Services {
    pub registry: Arc<RegistryClient>,
    pub fetcher: Arc<crate::fetch::Fetcher>,
    /// Where the state database lives (`kernel.local` reads imported kernels from it).
    pub state_dir: std::path::PathBuf,
}

impl Services {
    /// Services configured from the environment (Docker config, insecure registries).
    pub fn from_env(state_dir: &std::path::Path) -> Result<Services, crate::fetch::FetchError> {
        crate::oci::install_tls_provider();
        let registry = crate::oci::RegistryOptions::from_env();
        let fetch = crate::fetch::FetchOptions {
            retry: registry.retry.clone(),
            proxies: registry.proxies.clone(),
            ..crate::fetch::FetchOptions::default()
        };
        Ok(Services {
            registry: Arc::new(RegistryClient::new(registry)),
            fetcher: Arc::new(crate::fetch::Fetcher::new(fetch)?),
            state_dir: state_dir.to_owned(),
        })
    }
}

/// Registers an executor for every kind this build of banger can run. Kinds without one
/// (the sandbox's `vm.*` steps) are reported by the engine before anything runs.
pub fn with_executors(builder: EngineBuilder, services: &Services) -> EngineBuilder {
    builder
        .executor(
            OCI_FETCH_LAYER.name,
            fetch_layer::FetchLayer {
                client: Arc::clone(&services.registry),
            },
        )
        .executor(IMPORT_FILE.name, import_file::ImportFile)
        .executor(RECIPE_MMDEBSTRAP.name, mmdebstrap::Mmdebstrap)
        .executor(ROOTFS_BUILD.name, rootfs_build::RootfsBuild)
        .executor(PROVISION_COPY.name, provision_copy::ProvisionCopy)
        .executor(PROVISION_RUN.name, provision_run::ProvisionRun::from_env())
        .executor(AGENT_LAYER.name, agent_layer::AgentLayer)
        .executor(
            CATALOG_FETCH_BUNDLE.name,
            bundle_steps::FetchBundle {
                fetcher: Arc::clone(&services.fetcher),
            },
        )
        .executor(BUNDLE_UNPACK.name, bundle_steps::UnpackBundle)
        .executor(BUNDLE_WRITE.name, bundle_steps::WriteBundle)
        .executor(
            KERNEL_FETCH_BUNDLE.name,
            bundle_steps::FetchBundle {
                fetcher: Arc::clone(&services.fetcher),
            },
        )
        .executor(
            KERNEL_FETCH_PACKAGE.name,
            kernel_package::FetchKernelPackage,
        )
        .executor(KERNEL_EXTRACT.name, kernel_extract::ExtractKernel)
        .executor(KERNEL_INITRAMFS.name, kernel_initramfs::BuildInitramfs)
        .executor(KERNEL_IMPORT.name, kernel_import::ImportKernel)
        .executor(
            KERNEL_LOCAL.name,
            kernel_local::LocalKernel {
                state_dir: services.state_dir.clone(),
            },
        )
        .executor(KERNEL_STAGE.name, kernel_stage::StageKernel)
}

/// An engine over `store` with every executor this build has and the host's resource limits:
/// the one the CLI and the daemon run plans on.
pub fn engine(store: &Store, services: &Services) -> Engine {
    with_executors(
        Engine::builder(store.clone()).limits(ResourceLimits::for_host()),
        services,
    )
    .build()
}

/// The running step's params as its kind's struct ([`crate::plan::kinds`]): a missing or
/// mistyped one fails the step with an error naming the step and the parameter.
pub fn params<T: StepParams>(ctx: &StepContext) -> Result<T, StepError> {
    T::from_params(&ctx.params).map_err(|error| {
        StepError::with_source(
            format!(
                "step {} has parameters this banger cannot read",
                ctx.step_id
            ),
            error,
        )
    })
}

pub fn kind_info(name: &str) -> Option<&'static KindInfo> {
    ALL_KINDS.iter().find(|info| info.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_unique() {
        let mut names: Vec<_> = ALL_KINDS.iter().map(|info| info.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL_KINDS.len());
    }
}
