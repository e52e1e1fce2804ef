//! Typed parameters of step kinds: one struct per kind (kinds of one shape share it: the two
//! bundle fetches, which share an executor too, and the three kinds without params), written
//! into a step's [`Params`] by whoever plans the step (lowering, or the CLI for `image
//! import-tar`, `image register` and `kernel import`) and read back by the executor through
//! the same [`StepParams`] impl, so names, types and optional-ness cannot drift between the
//! two. Pure: no I/O.
//!
//! | kind                                              | params                    |
//! |---------------------------------------------------|---------------------------|
//! | `oci.resolve`                                     | [`OciResolveParams`]      |
//! | `oci.fetch-layers`                                | [`OciFetchLayersParams`]  |
//! | `oci.fetch-layer`                                 | [`OciFetchLayerParams`]   |
//! | `import.file`                                     | [`ImportFileParams`]      |
//! | `catalog.fetch-bundle`, `kernel.fetch-bundle`     | [`FetchBundleParams`]     |
//! | `bundle.unpack`, `kernel.extract`, `kernel.stage` | [`NoParams`]              |
//! | `bundle.write`                                    | [`BundleWriteParams`]     |
//! | `recipe.mmdebstrap`                               | [`RecipeParams`]          |
//! | `rootfs.build`                                    | [`RootfsBuildParams`]     |
//! | `agent.layer`                                     | [`AgentLayerParams`]      |
//! | `kernel.fetch-package`                            | [`KernelPackageParams`]   |
//! | `kernel.initramfs`                                | [`KernelInitramfsParams`] |
//! | `kernel.local`                                    | [`KernelLocalParams`]     |
//! | `kernel.import`                                   | [`KernelImportParams`]    |
//! | `provision.run`                                   | [`ProvisionRunParams`]    |
//! | `provision.copy`                                  | [`ProvisionCopyParams`]   |
//! | `vm.boot`                                         | [`VmBootParams`]          |
//! | `vm.file-sync`                                    | [`VmFileSyncParams`]      |
//! | `vm.workspace`                                    | [`VmWorkspaceParams`]     |
//! | `vm.up-command`                                   | [`VmUpCommandParams`]     |
//!
//! Executors read their step's params with [`crate::steps::params`], which turns a
//! [`ParamError`] into a step error naming the step and the parameter.
//!
//! What a struct writes *is* the step's identity: its params go into both keys
//! ([`crate::key`]), so a field's name, its value type and whether it is written at all are
//! part of every stored record. Changing any of them re-keys every step of that kind; the
//! tests pin each kind's encoding to the `Params` literal it must produce.
//!
//! Defaults: none here, and none in executors. Lowering ([`crate::plan::lower`]) and the spec
//! decide every value (image sizing, recipe base packages, initramfs modules,
//! `SOURCE_DATE_EPOCH` from the lock); a struct field is either required, and its absence is
//! a [`ParamError`] naming it, or an `Option` that is written only when `Some` (`mode` of a
//! copy, `refresh` of a kernel fetch), so an absent optional param stays absent. One
//! leniency: `provision.run` reads an absent `env` as empty (lowering always writes it).
//!
//! Hints (download locations, the project directory, a builder's timeout) are not params:
//! they are in no key and stay on [`crate::plan::StepNode::hints`].

use std::collections::BTreeMap;

use crate::key::{ParamValue, Params};
use crate::spec::{BuilderInit, ByteSize, FileSyncSpec, NetworkMode, PortForward, VmShape};
use crate::steps;

/// A parameter was missing or of the wrong type: a plan and its executor disagree, which is
/// a bug in banger, or a record written by another version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step parameter `{name}`: {problem}")]
pub struct ParamError {
    pub name: &'static str,
    pub problem: &'static str,
}

/// The typed params of one or more step kinds.
pub trait StepParams: Sized {
    /// The kinds ([`crate::steps::KindInfo::name`]) whose steps carry these params.
    const KINDS: &'static [&'static str];

    /// The params as keyed: names, value types and optional-ness are fixed per kind.
    fn to_params(&self) -> Params;

    /// Reads them back; a required param that is absent or of another type is an error
    /// naming it. Unknown params are ignored.
    fn from_params(params: &Params) -> Result<Self, ParamError>;
}

fn missing(name: &'static str) -> ParamError {
    ParamError {
        name,
        problem: "missing or not of the expected type",
    }
}

fn string(params: &Params, name: &'static str) -> Result<String, ParamError> {
    params
        .get_str(name)
        .map(str::to_owned)
        .ok_or_else(|| missing(name))
}

fn int(params: &Params, name: &'static str) -> Result<u64, ParamError> {
    params.get_int(name).ok_or_else(|| missing(name))
}

/// An optional integer: absent is `None`, present but not an integer is an error.
fn optional_int(params: &Params, name: &'static str) -> Result<Option<u64>, ParamError> {
    match params.get(name) {
        None => Ok(None),
        Some(ParamValue::Int(value)) => Ok(Some(*value)),
        Some(_) => Err(missing(name)),
    }
}

fn strings(params: &Params, name: &'static str) -> Result<Vec<String>, ParamError> {
    match params.get(name) {
        Some(ParamValue::List(values)) => values
            .iter()
            .map(|value| match value {
                ParamValue::Str(text) => Ok(text.clone()),
                _ => Err(ParamError {
                    name,
                    problem: "holds something other than strings",
                }),
            })
            .collect(),
        _ => Err(missing(name)),
    }
}

fn string_list(values: &[String]) -> ParamValue {
    ParamValue::List(values.iter().map(|value| value.as_str().into()).collect())
}

fn with_optional(params: Params, name: &str, value: Option<u64>) -> Params {
    match value {
        Some(value) => params.with(name, value),
        None => params,
    }
}

/// `oci.resolve`: an OCI reference (a tag) resolved to its linux/amd64 manifest. Appears only
/// in `banger graph` of an unpinned reference: `banger build` pins before it plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciResolveParams {
    /// The reference as written in the Bangerfile.
    pub reference: String,
}

impl StepParams for OciResolveParams {
    const KINDS: &'static [&'static str] = &[steps::OCI_RESOLVE.name];

    fn to_params(&self) -> Params {
        Params::new().with("reference", self.reference.clone())
    }

    fn from_params(params: &Params) -> Result<OciResolveParams, ParamError> {
        Ok(OciResolveParams {
            reference: string(params, "reference")?,
        })
    }
}

/// `oci.fetch-layers`: every layer of an unpinned reference, known once `manifest` (its
/// `oci.resolve` input) is resolved. Graph only, like `oci.resolve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciFetchLayersParams {
    pub reference: String,
}

impl StepParams for OciFetchLayersParams {
    const KINDS: &'static [&'static str] = &[steps::OCI_FETCH_LAYERS.name];

    fn to_params(&self) -> Params {
        Params::new().with("reference", self.reference.clone())
    }

    fn from_params(params: &Params) -> Result<OciFetchLayersParams, ParamError> {
        Ok(OciFetchLayersParams {
            reference: string(params, "reference")?,
        })
    }
}

/// `oci.fetch-layer`: one layer blob. Keyed by the blob alone, so the same blob from any
/// repository is the same step; the repository is a hint (`reference`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciFetchLayerParams {
    /// `sha256:<hex>` of the blob as stored (compressed).
    pub digest: String,
    pub media_type: String,
    /// Size in bytes of the blob as stored.
    pub size: u64,
}

impl StepParams for OciFetchLayerParams {
    const KINDS: &'static [&'static str] = &[steps::OCI_FETCH_LAYER.name];

    fn to_params(&self) -> Params {
        Params::new()
            .with("digest", self.digest.clone())
            .with("media_type", self.media_type.clone())
            .with("size", self.size)
    }

    fn from_params(params: &Params) -> Result<OciFetchLayerParams, ParamError> {
        Ok(OciFetchLayerParams {
            digest: string(params, "digest")?,
            media_type: string(params, "media_type")?,
            size: int(params, "size")?,
        })
    }
}

/// `import.file`: a host file brought into the store (a rootfs tar for `image import-tar`,
/// an ext4 image for `image register`). Keyed by content, not path; the path is a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportFileParams {
    /// `blake3:<hex>` of the file's content, checked again while it is copied.
    pub digest: String,
    /// The name of the step's one output (`rootfs.tar`, `rootfs.ext4`).
    pub name: String,
}

impl StepParams for ImportFileParams {
    const KINDS: &'static [&'static str] = &[steps::IMPORT_FILE.name];

    fn to_params(&self) -> Params {
        Params::new()
            .with("digest", self.digest.clone())
            .with("name", self.name.clone())
    }

    fn from_params(params: &Params) -> Result<ImportFileParams, ParamError> {
        Ok(ImportFileParams {
            digest: string(params, "digest")?,
            name: string(params, "name")?,
        })
    }
}

/// `catalog.fetch-bundle` (an image) and `kernel.fetch-bundle`: a catalog bundle download,
/// verified against its sha256 and size. One executor serves both kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchBundleParams {
    pub url: String,
    /// Hex sha256 of the bundle file.
    pub sha256: String,
    pub size: u64,
    /// `kernel pull --force`: a value (the time it was asked) that re-keys the fetch so it
    /// runs again; early cutoff spares what follows if the bytes are the same. Only lowering
    /// of a kernel sets it; absent otherwise.
    pub refresh: Option<u64>,
}

impl StepParams for FetchBundleParams {
    const KINDS: &'static [&'static str] = &[
        steps::CATALOG_FETCH_BUNDLE.name,
        steps::KERNEL_FETCH_BUNDLE.name,
    ];

    fn to_params(&self) -> Params {
        let params = Params::new()
            .with("url", self.url.clone())
            .with("sha256", self.sha256.clone())
            .with("size", self.size);
        with_optional(params, "refresh", self.refresh)
    }

    fn from_params(params: &Params) -> Result<FetchBundleParams, ParamError> {
        Ok(FetchBundleParams {
            url: string(params, "url")?,
            sha256: string(params, "sha256")?,
            size: int(params, "size")?,
            refresh: optional_int(params, "refresh")?,
        })
    }
}

/// Kinds whose steps are defined by their inputs alone: `bundle.unpack` (input `bundle`),
/// `kernel.extract` (input `package`), `kernel.stage` (inputs `kernel`, `initramfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoParams;

impl StepParams for NoParams {
    const KINDS: &'static [&'static str] = &[
        steps::BUNDLE_UNPACK.name,
        steps::KERNEL_EXTRACT.name,
        steps::KERNEL_STAGE.name,
    ];

    fn to_params(&self) -> Params {
        Params::new()
    }

    fn from_params(_params: &Params) -> Result<NoParams, ParamError> {
        Ok(NoParams)
    }
}

/// `recipe.mmdebstrap`: a root filesystem tar from distribution packages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeParams {
    /// `debian` (the only one the executor runs).
    pub distro: String,
    pub suite: String,
    /// Every package to install, banger's base packages included: lowering merges, sorts and
    /// deduplicates them, so one set of packages is one key.
    pub packages: Vec<String>,
    /// The lock's `SOURCE_DATE_EPOCH`: mmdebstrap clamps times to it.
    pub source_date_epoch: u64,
}

impl RecipeParams {
    /// How `Bangerfile.lock` names the recipe: `debian bookworm: pkg, pkg`.
    pub fn label(&self) -> String {
        format!(
            "{} {}: {}",
            self.distro,
            self.suite,
            self.packages.join(", ")
        )
    }
}

impl StepParams for RecipeParams {
    const KINDS: &'static [&'static str] = &[steps::RECIPE_MMDEBSTRAP.name];

    fn to_params(&self) -> Params {
        Params::new()
            .with("distro", self.distro.clone())
            .with("suite", self.suite.clone())
            .with("packages", string_list(&self.packages))
            .with("source_date_epoch", self.source_date_epoch)
    }

    fn from_params(params: &Params) -> Result<RecipeParams, ParamError> {
        Ok(RecipeParams {
            distro: string(params, "distro")?,
            suite: string(params, "suite")?,
            packages: strings(params, "packages")?,
            source_date_epoch: int(params, "source_date_epoch")?,
        })
    }
}

/// How large `rootfs.build` makes the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsSize {
    /// Exactly this many bytes (`size` in the Bangerfile).
    Fixed(u64),
    /// What the content needs plus `headroom_percent` of it, at least `min_bytes`.
    Auto {
        headroom_percent: u32,
        min_bytes: u64,
    },
}

impl RootfsSize {
    pub fn to_sizing(self) -> crate::ext4::Sizing {
        match self {
            RootfsSize::Fixed(bytes) => crate::ext4::Sizing::Fixed(bytes),
            RootfsSize::Auto {
                headroom_percent,
                min_bytes,
            } => crate::ext4::Sizing::Auto {
                headroom_percent,
                min_bytes,
            },
        }
    }

    /// `ext4 4G`, or `ext4 content + 10 % (≥ 64M)`.
    pub fn describe(self) -> String {
        match self {
            RootfsSize::Fixed(bytes) => format!("ext4 {}", ByteSize(bytes)),
            RootfsSize::Auto {
                headroom_percent,
                min_bytes,
            } => format!(
                "ext4 content + {headroom_percent} % (≥ {})",
                ByteSize(min_bytes)
            ),
        }
    }
}

/// `rootfs.build`: layers (`layer[0]`, `layer[1]`, … in order; tars, or one ext4 image as
/// the first) → one ext4 image. Identity files are always stripped (see
/// [`crate::rootfs::identity`]). Written as `size`, or as `headroom_percent` and `min_size`
/// (whose values lowering decides: [`crate::plan::lower::image_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootfsBuildParams {
    pub size: RootfsSize,
}

impl StepParams for RootfsBuildParams {
    const KINDS: &'static [&'static str] = &[steps::ROOTFS_BUILD.name];

    fn to_params(&self) -> Params {
        match self.size {
            RootfsSize::Fixed(bytes) => Params::new().with("size", bytes),
            RootfsSize::Auto {
                headroom_percent,
                min_bytes,
            } => Params::new()
                .with("headroom_percent", u64::from(headroom_percent))
                .with("min_size", min_bytes),
        }
    }

    fn from_params(params: &Params) -> Result<RootfsBuildParams, ParamError> {
        let size = match params.get_int("size") {
            Some(bytes) => RootfsSize::Fixed(bytes),
            None => RootfsSize::Auto {
                headroom_percent: params
                    .get_int("headroom_percent")
                    .and_then(|percent| u32::try_from(percent).ok())
                    .ok_or_else(|| missing("headroom_percent"))?,
                min_bytes: int(params, "min_size")?,
            },
        };
        Ok(RootfsBuildParams { size })
    }
}

/// `provision.run`: a command run in a builder VM on the `rootfs` input, booted with the
/// `kernel` input; the output is the diff it made, as a layer (`layer.tar`). Its timeout is
/// a hint, not a param: it does not change what the command makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionRunParams {
    pub command: String,
    /// Always written (an empty map when the entry has none); read as empty when absent.
    pub env: BTreeMap<String, String>,
    pub init: BuilderInit,
    /// Later modification times in the diff are clamped to this (`SOURCE_DATE_EPOCH`), so a
    /// deterministic command gives identical bytes.
    pub source_date_epoch: u64,
}

impl StepParams for ProvisionRunParams {
    const KINDS: &'static [&'static str] = &[steps::PROVISION_RUN.name];

    fn to_params(&self) -> Params {
        Params::new()
            .with("command", self.command.clone())
            .with("env", ParamValue::Map(self.env.clone()))
            .with("init", self.init.as_str())
            .with("source_date_epoch", self.source_date_epoch)
    }

    fn from_params(params: &Params) -> Result<ProvisionRunParams, ParamError> {
        let env = match params.get("env") {
            Some(ParamValue::Map(env)) => env.clone(),
            None => BTreeMap::new(),
            Some(_) => return Err(missing("env")),
        };
        let init = match params.get_str("init") {
            Some("agent") => BuilderInit::Agent,
            Some("systemd") => BuilderInit::Systemd,
            Some(_) => {
                return Err(ParamError {
                    name: "init",
                    problem: "neither `agent` nor `systemd`",
                });
            }
            None => return Err(missing("init")),
        };
        Ok(ProvisionRunParams {
            command: string(params, "command")?,
            env,
            init,
            source_date_epoch: int(params, "source_date_epoch")?,
        })
    }
}

/// `provision.copy`: a project file or directory as a layer, root-owned at `dest`.
///
/// Planned unfingerprinted ([`ProvisionCopyParams::unfingerprinted`]: `src` is a
/// [`ParamValue::Source`]); [`crate::sources`] replaces it with its digest before the plan is
/// keyed, and that fingerprinted form is what [`StepParams`] writes and reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionCopyParams {
    /// The project path (relative to the project directory) and its content fingerprint.
    pub src: String,
    pub digest: String,
    pub dest: String,
    /// Applied to the copied file or top directory; `None` keeps the host's mode (and the
    /// param is absent). Written as four octal digits (`"0644"`).
    pub mode: Option<u32>,
    /// The modification time of every entry.
    pub source_date_epoch: u64,
}

impl ProvisionCopyParams {
    /// The params before fingerprinting: `src` is a [`ParamValue::Source`], which
    /// [`crate::sources`] replaces with its digest before the plan is keyed.
    pub fn unfingerprinted(
        src: &std::path::Path,
        dest: &str,
        mode: Option<u32>,
        source_date_epoch: u64,
    ) -> Params {
        copy_params(
            ParamValue::Source(src.to_owned()),
            dest,
            mode,
            source_date_epoch,
        )
    }
}

fn copy_params(src: ParamValue, dest: &str, mode: Option<u32>, source_date_epoch: u64) -> Params {
    let mut params = Params::new()
        .with("src", src)
        .with("dest", dest)
        .with("source_date_epoch", source_date_epoch);
    if let Some(mode) = mode {
        params.insert("mode", format!("{mode:04o}"));
    }
    params
}

impl StepParams for ProvisionCopyParams {
    const KINDS: &'static [&'static str] = &[steps::PROVISION_COPY.name];

    fn to_params(&self) -> Params {
        copy_params(
            ParamValue::Digest {
                path: self.src.clone(),
                digest: self.digest.clone(),
            },
            &self.dest,
            self.mode,
            self.source_date_epoch,
        )
    }

    fn from_params(params: &Params) -> Result<ProvisionCopyParams, ParamError> {
        let (src, digest) = match params.get("src") {
            Some(ParamValue::Digest { path, digest }) => (path.clone(), digest.clone()),
            _ => {
                return Err(ParamError {
                    name: "src",
                    problem: "not fingerprinted",
                });
            }
        };
        let mode = match params.get_str("mode") {
            Some(text) => Some(u32::from_str_radix(text, 8).map_err(|_| ParamError {
                name: "mode",
                problem: "not an octal number",
            })?),
            None => None,
        };
        Ok(ProvisionCopyParams {
            src,
            digest,
            dest: string(params, "dest")?,
            mode,
            source_date_epoch: int(params, "source_date_epoch")?,
        })
    }
}

/// `agent.layer`: banger's guest assets (agent, units, sshd drop-in) as a layer, keyed by
/// their digest, so a new agent re-runs this step and the image builds after it only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLayerParams {
    pub assets: String,
}

impl StepParams for AgentLayerParams {
    const KINDS: &'static [&'static str] = &[steps::AGENT_LAYER.name];

    fn to_params(&self) -> Params {
        Params::new().with("assets", self.assets.clone())
    }

    fn from_params(params: &Params) -> Result<AgentLayerParams, ParamError> {
        Ok(AgentLayerParams {
            assets: string(params, "assets")?,
        })
    }
}

/// `bundle.write`: the `rootfs` input as a golden bundle (`bundle.tar.zst`), its manifest
/// naming the image, its architecture and kernel; the distribution is read from the image's
/// `/etc/os-release`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleWriteParams {
    pub name: String,
    pub arch: String,
    pub kernel_ref: String,
}

impl StepParams for BundleWriteParams {
    const KINDS: &'static [&'static str] = &[steps::BUNDLE_WRITE.name];

    fn to_params(&self) -> Params {
        Params::new()
            .with("name", self.name.clone())
            .with("arch", self.arch.clone())
            .with("kernel_ref", self.kernel_ref.clone())
    }

    fn from_params(params: &Params) -> Result<BundleWriteParams, ParamError> {
        Ok(BundleWriteParams {
            name: string(params, "name")?,
            arch: string(params, "arch")?,
            kernel_ref: string(params, "kernel_ref")?,
        })
    }
}

/// `kernel.fetch-package`: a distribution's packaged kernel, downloaded from the archive of
/// `suite` by mmdebstrap whatever the host runs (`suite` is keyed, so another suite is another
/// step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackageParams {
    /// `debian` (the only one the executor runs).
    pub distro: String,
    pub suite: String,
    pub package: String,
    /// `kernel pull --force`, as [`FetchBundleParams::refresh`].
    pub refresh: Option<u64>,
}

impl StepParams for KernelPackageParams {
    const KINDS: &'static [&'static str] = &[steps::KERNEL_FETCH_PACKAGE.name];

    fn to_params(&self) -> Params {
        let params = Params::new()
            .with("distro", self.distro.clone())
            .with("suite", self.suite.clone())
            .with("package", self.package.clone());
        with_optional(params, "refresh", self.refresh)
    }

    fn from_params(params: &Params) -> Result<KernelPackageParams, ParamError> {
        Ok(KernelPackageParams {
            distro: string(params, "distro")?,
            suite: string(params, "suite")?,
            package: string(params, "package")?,
            refresh: optional_int(params, "refresh")?,
        })
    }
}

/// `kernel.initramfs`: banger's initramfs for the `kernel` input's modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInitramfsParams {
    /// Modules to load (their dependencies are resolved when it is built); lowering's
    /// [`crate::plan::lower::INITRAMFS_MODULES`].
    pub modules: Vec<String>,
    /// The agent binary's digest: it is the initramfs's `/init`, so a new agent re-keys it.
    pub agent: String,
}

impl StepParams for KernelInitramfsParams {
    const KINDS: &'static [&'static str] = &[steps::KERNEL_INITRAMFS.name];

    fn to_params(&self) -> Params {
        Params::new()
            .with("modules", string_list(&self.modules))
            .with("agent", self.agent.clone())
    }

    fn from_params(params: &Params) -> Result<KernelInitramfsParams, ParamError> {
        Ok(KernelInitramfsParams {
            modules: strings(params, "modules")?,
            agent: string(params, "agent")?,
        })
    }
}

/// `kernel.local`: a kernel recorded by `banger kernel import`, by name (never cached: the
/// state database changes outside any plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLocalParams {
    pub name: String,
}

impl StepParams for KernelLocalParams {
    const KINDS: &'static [&'static str] = &[steps::KERNEL_LOCAL.name];

    fn to_params(&self) -> Params {
        Params::new().with("name", self.name.clone())
    }

    fn from_params(params: &Params) -> Result<KernelLocalParams, ParamError> {
        Ok(KernelLocalParams {
            name: string(params, "name")?,
        })
    }
}

/// `kernel.import`: a kernel directory from the host, keyed by its fingerprint (content,
/// names, modes); the directory is a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImportParams {
    pub fingerprint: String,
}

impl StepParams for KernelImportParams {
    const KINDS: &'static [&'static str] = &[steps::KERNEL_IMPORT.name];

    fn to_params(&self) -> Params {
        Params::new().with("fingerprint", self.fingerprint.clone())
    }

    fn from_params(params: &Params) -> Result<KernelImportParams, ParamError> {
        Ok(KernelImportParams {
            fingerprint: string(params, "fingerprint")?,
        })
    }
}

/// `vm.boot`: the sandbox VM's shape (`vcpu`, `memory` and `disk` in bytes, `network`) and
/// its published ports (`ports`, each in canonical form; written only when there are some).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmBootParams {
    pub shape: VmShape,
    pub ports: Vec<PortForward>,
}

impl StepParams for VmBootParams {
    const KINDS: &'static [&'static str] = &[steps::VM_BOOT.name];

    fn to_params(&self) -> Params {
        let shape = self.shape;
        let params = Params::new()
            .with("vcpu", shape.vcpu)
            .with("memory", shape.memory.bytes())
            .with("disk", shape.disk.bytes())
            .with("network", shape.network.as_str());
        if self.ports.is_empty() {
            return params;
        }
        params.with(
            "ports",
            ParamValue::List(
                self.ports
                    .iter()
                    .map(|port| ParamValue::Str(port.to_string()))
                    .collect(),
            ),
        )
    }

    fn from_params(params: &Params) -> Result<VmBootParams, ParamError> {
        let vcpu = u32::try_from(int(params, "vcpu")?).map_err(|_| ParamError {
            name: "vcpu",
            problem: "too large",
        })?;
        let network = params
            .get_str("network")
            .ok_or_else(|| missing("network"))?;
        Ok(VmBootParams {
            shape: VmShape {
                vcpu,
                memory: ByteSize(int(params, "memory")?),
                disk: ByteSize(int(params, "disk")?),
                network: NetworkMode::from_name(network).ok_or(ParamError {
                    name: "network",
                    problem: "not `user`, `tap` or `none`",
                })?,
            },
            ports: match params.get("ports") {
                None => Vec::new(),
                Some(ParamValue::List(items)) => items
                    .iter()
                    .map(|item| match item {
                        ParamValue::Str(text) => PortForward::parse(text).ok(),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or(ParamError {
                        name: "ports",
                        problem: "not a list of published ports",
                    })?,
                Some(_) => {
                    return Err(ParamError {
                        name: "ports",
                        problem: "not a list",
                    });
                }
            },
        })
    }
}

/// `vm.file-sync`: `[[file_sync]]` host files copied into the guest, each entry a map of
/// `host`, `guest` and (when set) `mode` as four octal digits, so any path reads back exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFileSyncParams {
    pub entries: Vec<FileSyncSpec>,
}

impl VmFileSyncParams {
    fn entry_value(entry: &FileSyncSpec) -> ParamValue {
        let mut map = BTreeMap::new();
        map.insert("host".to_owned(), entry.host.clone());
        map.insert("guest".to_owned(), entry.guest.clone());
        if let Some(mode) = entry.mode {
            map.insert("mode".to_owned(), format!("{mode:04o}"));
        }
        ParamValue::Map(map)
    }

    fn read_entry(value: &ParamValue) -> Result<FileSyncSpec, ParamError> {
        let bad = |problem| ParamError {
            name: "entries",
            problem,
        };
        let ParamValue::Map(map) = value else {
            return Err(bad("an entry is not a map"));
        };
        let field = |name: &str| {
            map.get(name)
                .cloned()
                .ok_or_else(|| bad("an entry lacks `host` or `guest`"))
        };
        let mode = match map.get("mode") {
            None => None,
            Some(digits) => Some(
                u32::from_str_radix(digits, 8)
                    .map_err(|_| bad("an entry's `mode` is not octal"))?,
            ),
        };
        if map
            .keys()
            .any(|key| !matches!(key.as_str(), "host" | "guest" | "mode"))
        {
            return Err(bad(
                "an entry holds a field other than host, guest and mode",
            ));
        }
        Ok(FileSyncSpec {
            host: field("host")?,
            guest: field("guest")?,
            mode,
        })
    }
}

impl StepParams for VmFileSyncParams {
    const KINDS: &'static [&'static str] = &[steps::VM_FILE_SYNC.name];

    fn to_params(&self) -> Params {
        let entries = self.entries.iter().map(Self::entry_value).collect();
        Params::new().with("entries", ParamValue::List(entries))
    }

    fn from_params(params: &Params) -> Result<VmFileSyncParams, ParamError> {
        let Some(ParamValue::List(values)) = params.get("entries") else {
            return Err(missing("entries"));
        };
        let entries = values
            .iter()
            .map(Self::read_entry)
            .collect::<Result<_, _>>()?;
        Ok(VmFileSyncParams { entries })
    }
}

/// `vm.workspace`: the project directory (or a part of it) imported into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmWorkspaceParams {
    /// Host path relative to the project directory, as text.
    pub host: String,
    /// Absolute guest path.
    pub guest: String,
}

impl StepParams for VmWorkspaceParams {
    const KINDS: &'static [&'static str] = &[steps::VM_WORKSPACE.name];

    fn to_params(&self) -> Params {
        Params::new()
            .with("host", self.host.clone())
            .with("guest", self.guest.clone())
    }

    fn from_params(params: &Params) -> Result<VmWorkspaceParams, ParamError> {
        Ok(VmWorkspaceParams {
            host: string(params, "host")?,
            guest: string(params, "guest")?,
        })
    }
}

/// `vm.up-command`: the `[up]` command, run with `sh -c` in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUpCommandParams {
    pub run: String,
}

impl StepParams for VmUpCommandParams {
    const KINDS: &'static [&'static str] = &[steps::VM_UP_COMMAND.name];

    fn to_params(&self) -> Params {
        Params::new().with("run", self.run.clone())
    }

    fn from_params(params: &Params) -> Result<VmUpCommandParams, ParamError> {
        Ok(VmUpCommandParams {
            run: string(params, "run")?,
        })
    }
}

/// Reads a `kind` step's params through that kind's struct and writes them again: `None` for
/// a kind no struct claims. The identity on whatever a planner wrote (tested over lowered
/// plans).
#[cfg(test)]
pub(crate) fn reencode(kind: &str, params: &Params) -> Option<Result<Params, ParamError>> {
    every_kind()
        .into_iter()
        .find(|(kinds, _)| kinds.contains(&kind))
        .map(|(_, reencode)| reencode(params))
}

#[cfg(test)]
type Reencode = fn(&Params) -> Result<Params, ParamError>;

/// Every params struct with the kinds it claims.
#[cfg(test)]
fn every_kind() -> Vec<(&'static [&'static str], Reencode)> {
    fn via<T: StepParams>(params: &Params) -> Result<Params, ParamError> {
        Ok(T::from_params(params)?.to_params())
    }
    fn entry<T: StepParams>() -> (&'static [&'static str], Reencode) {
        (T::KINDS, via::<T>)
    }
    vec![
        entry::<OciResolveParams>(),
        entry::<OciFetchLayersParams>(),
        entry::<OciFetchLayerParams>(),
        entry::<ImportFileParams>(),
        entry::<FetchBundleParams>(),
        entry::<NoParams>(),
        entry::<RecipeParams>(),
        entry::<RootfsBuildParams>(),
        entry::<ProvisionRunParams>(),
        entry::<ProvisionCopyParams>(),
        entry::<AgentLayerParams>(),
        entry::<BundleWriteParams>(),
        entry::<KernelPackageParams>(),
        entry::<KernelInitramfsParams>(),
        entry::<KernelLocalParams>(),
        entry::<KernelImportParams>(),
        entry::<VmBootParams>(),
        entry::<VmFileSyncParams>(),
        entry::<VmWorkspaceParams>(),
        entry::<VmUpCommandParams>(),
    ]
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use super::*;
    use crate::key::{Key, KeyEncoder, StableEncode};

    fn encoding(params: &Params) -> Key {
        let mut encoder = KeyEncoder::new("banger/test/params");
        params.encode(&mut encoder);
        encoder.finish()
    }

    /// A kind's params as written, and how to read them back.
    struct Case {
        kinds: &'static [&'static str],
        written: Params,
        read: fn(&Params) -> Result<(), ParamError>,
    }

    /// `typed` must write exactly `expected` (what banger wrote by hand before the kind had
    /// a struct: same names, value types and absent optionals, so the same keys), and read
    /// back as itself.
    fn pinned<T: StepParams + PartialEq + Debug + Clone>(typed: T, expected: Params) -> Case {
        let written = typed.to_params();
        assert_eq!(
            encoding(&written),
            encoding(&expected),
            "{:?}: wrote {written:?}, keys were made of {expected:?}",
            T::KINDS
        );
        assert_eq!(written, expected);
        assert_eq!(T::from_params(&written), Ok(typed));
        Case {
            kinds: T::KINDS,
            written,
            read: |params| T::from_params(params).map(|_| ()),
        }
    }

    fn strs(values: &[&str]) -> ParamValue {
        ParamValue::List(
            values
                .iter()
                .map(|value| ParamValue::from(*value))
                .collect(),
        )
    }

    /// One case or more per kind, each against the `Params` literal of the code that wrote
    /// the kind before it was typed.
    fn cases() -> Vec<Case> {
        vec![
            pinned(
                OciResolveParams {
                    reference: "debian:bookworm".into(),
                },
                Params::new().with("reference", "debian:bookworm"),
            ),
            pinned(
                OciFetchLayersParams {
                    reference: "debian:bookworm".into(),
                },
                Params::new().with("reference", "debian:bookworm"),
            ),
            pinned(
                OciFetchLayerParams {
                    digest: "sha256:aa".into(),
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                    size: 29_000_000,
                },
                Params::new()
                    .with("digest", "sha256:aa".to_owned())
                    .with(
                        "media_type",
                        "application/vnd.oci.image.layer.v1.tar+gzip".to_owned(),
                    )
                    .with("size", 29_000_000u64),
            ),
            pinned(
                ImportFileParams {
                    digest: "blake3:bb".into(),
                    name: "rootfs.tar".into(),
                },
                Params::new()
                    .with("digest", "blake3:bb")
                    .with("name", "rootfs.tar"),
            ),
            pinned(
                FetchBundleParams {
                    url: "https://example.org/a.tar.zst".into(),
                    sha256: "cc".into(),
                    size: 1 << 30,
                    refresh: None,
                },
                Params::new()
                    .with("url", "https://example.org/a.tar.zst".to_owned())
                    .with("sha256", "cc".to_owned())
                    .with("size", 1u64 << 30),
            ),
            pinned(
                FetchBundleParams {
                    url: "file:///k.tar.zst".into(),
                    sha256: "dd".into(),
                    size: 9,
                    refresh: Some(1_700_000_000_123),
                },
                {
                    let mut params = Params::new()
                        .with("url", "file:///k.tar.zst".to_owned())
                        .with("sha256", "dd".to_owned())
                        .with("size", 9u64);
                    params.insert("refresh", 1_700_000_000_123u64);
                    params
                },
            ),
            pinned(NoParams, Params::new()),
            pinned(
                BundleWriteParams {
                    name: "demo/sandbox".into(),
                    arch: "x86_64".into(),
                    kernel_ref: "debian-cloud-amd64".into(),
                },
                Params::new()
                    .with("name", "demo/sandbox")
                    .with("arch", "x86_64")
                    .with("kernel_ref", "debian-cloud-amd64"),
            ),
            pinned(
                RecipeParams {
                    distro: "debian".into(),
                    suite: "bookworm".into(),
                    packages: vec!["ca-certificates".into(), "make".into()],
                    source_date_epoch: 1_700_000_000,
                },
                Params::new()
                    .with("distro", "debian".to_owned())
                    .with("suite", "bookworm".to_owned())
                    .with("packages", strs(&["ca-certificates", "make"]))
                    .with("source_date_epoch", 1_700_000_000u64),
            ),
            pinned(
                RootfsBuildParams {
                    size: RootfsSize::Fixed(4 << 30),
                },
                Params::new().with("size", 4u64 << 30),
            ),
            pinned(
                RootfsBuildParams {
                    size: RootfsSize::Auto {
                        headroom_percent: 10,
                        min_bytes: 64 << 20,
                    },
                },
                Params::new()
                    .with("headroom_percent", 10u64)
                    .with("min_size", 64u64 << 20),
            ),
            pinned(
                AgentLayerParams {
                    assets: "blake3:00".into(),
                },
                Params::new().with("assets", "blake3:00"),
            ),
            pinned(
                KernelPackageParams {
                    distro: "debian".into(),
                    suite: "bookworm".into(),
                    package: "linux-image-cloud-amd64".into(),
                    refresh: None,
                },
                Params::new()
                    .with("distro", "debian".to_owned())
                    .with("suite", "bookworm".to_owned())
                    .with("package", "linux-image-cloud-amd64".to_owned()),
            ),
            pinned(
                KernelPackageParams {
                    distro: "debian".into(),
                    suite: "trixie".into(),
                    package: "linux-image-amd64".into(),
                    refresh: Some(5),
                },
                {
                    let mut params = Params::new()
                        .with("distro", "debian".to_owned())
                        .with("suite", "trixie".to_owned())
                        .with("package", "linux-image-amd64".to_owned());
                    params.insert("refresh", 5u64);
                    params
                },
            ),
            pinned(
                KernelInitramfsParams {
                    modules: vec!["overlay".into(), "vsock".into()],
                    agent: "blake3:ee".into(),
                },
                Params::new()
                    .with("modules", strs(&["overlay", "vsock"]))
                    .with("agent", "blake3:ee".to_owned()),
            ),
            pinned(
                KernelLocalParams {
                    name: "mine".into(),
                },
                Params::new().with("name", "mine"),
            ),
            pinned(
                KernelImportParams {
                    fingerprint: "blake3:ff".into(),
                },
                Params::new().with("fingerprint", "blake3:ff".to_owned()),
            ),
            pinned(
                ProvisionRunParams {
                    command: "make".into(),
                    env: BTreeMap::from([("A".into(), "1".into())]),
                    init: BuilderInit::Systemd,
                    source_date_epoch: 1_700_000_000,
                },
                Params::new()
                    .with("command", "make".to_owned())
                    .with(
                        "env",
                        ParamValue::Map(BTreeMap::from([("A".into(), "1".into())])),
                    )
                    .with("init", "systemd")
                    .with("source_date_epoch", 1_700_000_000u64),
            ),
            pinned(
                ProvisionCopyParams {
                    src: "etc/motd".into(),
                    digest: "blake3:11".into(),
                    dest: "/etc/motd".into(),
                    mode: Some(0o644),
                    source_date_epoch: 7,
                },
                Params::new()
                    .with(
                        "src",
                        ParamValue::Digest {
                            path: "etc/motd".into(),
                            digest: "blake3:11".into(),
                        },
                    )
                    .with("dest", "/etc/motd")
                    .with("source_date_epoch", 7u64)
                    .with("mode", "0644".to_owned()),
            ),
            pinned(
                ProvisionCopyParams {
                    src: "tree".into(),
                    digest: "blake3:12".into(),
                    dest: "/opt/tree".into(),
                    mode: None,
                    source_date_epoch: 7,
                },
                Params::new()
                    .with(
                        "src",
                        ParamValue::Digest {
                            path: "tree".into(),
                            digest: "blake3:12".into(),
                        },
                    )
                    .with("dest", "/opt/tree")
                    .with("source_date_epoch", 7u64),
            ),
            pinned(
                VmBootParams {
                    shape: VmShape {
                        vcpu: 2,
                        memory: ByteSize(2048 * ByteSize::MIB),
                        disk: ByteSize(8 * ByteSize::GIB),
                        network: NetworkMode::Tap,
                    },
                    ports: Vec::new(),
                },
                Params::new()
                    .with("vcpu", 2u32)
                    .with("memory", 2048 * ByteSize::MIB)
                    .with("disk", 8 * ByteSize::GIB)
                    .with("network", "tap"),
            ),
            pinned(
                VmBootParams {
                    shape: VmShape {
                        vcpu: 1,
                        memory: ByteSize(512 * ByteSize::MIB),
                        disk: ByteSize(ByteSize::GIB),
                        network: NetworkMode::User,
                    },
                    ports: vec![
                        PortForward::parse("8080:80").unwrap(),
                        PortForward::parse("0.0.0.0:53:53/udp").unwrap(),
                    ],
                },
                Params::new()
                    .with("vcpu", 1u32)
                    .with("memory", 512 * ByteSize::MIB)
                    .with("disk", ByteSize::GIB)
                    .with("network", "user")
                    .with(
                        "ports",
                        ParamValue::List(vec![
                            ParamValue::Str("127.0.0.1:8080:80/tcp".into()),
                            ParamValue::Str("0.0.0.0:53:53/udp".into()),
                        ]),
                    ),
            ),
            pinned(
                VmFileSyncParams {
                    entries: vec![
                        FileSyncSpec {
                            host: "~/.gitconfig".into(),
                            guest: "/root/.gitconfig".into(),
                            mode: None,
                        },
                        FileSyncSpec {
                            host: "/home/me/.aws/credentials".into(),
                            guest: "/root/.aws/credentials".into(),
                            mode: Some(0o600),
                        },
                    ],
                },
                Params::new().with(
                    "entries",
                    ParamValue::List(vec![
                        ParamValue::Map(BTreeMap::from([
                            ("host".into(), "~/.gitconfig".into()),
                            ("guest".into(), "/root/.gitconfig".into()),
                        ])),
                        ParamValue::Map(BTreeMap::from([
                            ("host".into(), "/home/me/.aws/credentials".into()),
                            ("guest".into(), "/root/.aws/credentials".into()),
                            ("mode".into(), "0600".into()),
                        ])),
                    ]),
                ),
            ),
            pinned(
                VmWorkspaceParams {
                    host: ".".into(),
                    guest: "/root/project".into(),
                },
                Params::new()
                    .with("host", ".".to_owned())
                    .with("guest", "/root/project".to_owned()),
            ),
            pinned(
                VmUpCommandParams {
                    run: "make serve".into(),
                },
                Params::new().with("run", "make serve".to_owned()),
            ),
        ]
    }

    #[test]
    fn every_kind_writes_the_params_its_keys_were_made_of_and_reads_them_back() {
        let cases = cases();
        for info in steps::ALL_KINDS {
            assert!(
                cases.iter().any(|case| case.kinds.contains(&info.name)),
                "no pinned case for {}",
                info.name
            );
        }
    }

    #[test]
    fn every_kind_has_exactly_one_params_struct() {
        let claimed: Vec<&str> = every_kind()
            .iter()
            .flat_map(|(kinds, _)| kinds.iter().copied())
            .collect();
        for info in steps::ALL_KINDS {
            let count = claimed.iter().filter(|name| **name == info.name).count();
            assert_eq!(count, 1, "{} is claimed by {count} structs", info.name);
        }
        assert_eq!(claimed.len(), steps::ALL_KINDS.len(), "{claimed:?}");
    }

    #[test]
    fn a_missing_required_parameter_is_named() {
        // Absent when the planner has nothing to say: never an error.
        const OPTIONAL: &[&str] = &["refresh", "mode", "env", "ports"];
        for case in cases() {
            for (name, _) in case.written.iter() {
                let without = case
                    .written
                    .iter()
                    .filter(|(other, _)| *other != name)
                    .fold(Params::new(), |params, (other, value)| {
                        params.with(other, value.clone())
                    });
                match (case.read)(&without) {
                    Ok(()) => assert!(
                        OPTIONAL.contains(&name),
                        "{:?} reads without `{name}`",
                        case.kinds
                    ),
                    // Without `size`, a rootfs is auto-sized and lacks its headroom.
                    Err(error) if name == "size" && case.kinds == RootfsBuildParams::KINDS => {
                        assert_eq!(error.name, "headroom_percent")
                    }
                    Err(error) => assert_eq!(error.name, name, "{:?}", case.kinds),
                }
            }
        }
        let error =
            ProvisionRunParams::from_params(&Params::new().with("command", "x")).unwrap_err();
        assert_eq!(error.name, "init");
    }

    #[test]
    fn a_parameter_of_another_type_is_named() {
        let error = OciFetchLayerParams::from_params(
            &Params::new()
                .with("digest", "sha256:aa")
                .with("media_type", "x")
                .with("size", "12"),
        )
        .unwrap_err();
        assert_eq!(error.name, "size");
        let error = FetchBundleParams::from_params(
            &Params::new()
                .with("url", "u")
                .with("sha256", "s")
                .with("size", 1u64)
                .with("refresh", "now"),
        )
        .unwrap_err();
        assert_eq!(error.name, "refresh");
        let error = KernelInitramfsParams::from_params(
            &Params::new()
                .with("modules", ParamValue::List(vec![ParamValue::Int(1)]))
                .with("agent", "a"),
        )
        .unwrap_err();
        assert_eq!(error.name, "modules");
    }

    #[test]
    fn copy_params_planned_unfingerprinted_read_back_once_fingerprinted() {
        let mut copy = ProvisionCopyParams::unfingerprinted(
            std::path::Path::new("a/b"),
            "/etc/x",
            Some(0o644),
            7,
        );
        assert_eq!(
            ProvisionCopyParams::from_params(&copy).unwrap_err().name,
            "src"
        );
        copy.resolve_sources(&|_| Some("blake3:11".to_owned()));
        let typed = ProvisionCopyParams {
            src: "a/b".into(),
            digest: "blake3:11".into(),
            dest: "/etc/x".into(),
            mode: Some(0o644),
            source_date_epoch: 7,
        };
        assert_eq!(ProvisionCopyParams::from_params(&copy), Ok(typed.clone()));
        assert_eq!(typed.to_params(), copy);
    }

    #[test]
    fn file_sync_entries_read_back_exactly_whatever_their_paths_hold() {
        let typed = VmFileSyncParams {
            entries: vec![
                FileSyncSpec {
                    host: "/a -> b".into(),
                    guest: "/c 0644".into(),
                    mode: None,
                },
                FileSyncSpec {
                    host: "~/.gitconfig".into(),
                    guest: "/root/.gitconfig".into(),
                    mode: Some(0o600),
                },
            ],
        };
        assert_eq!(
            VmFileSyncParams::from_params(&typed.to_params()),
            Ok(typed.clone())
        );
        let mut other = typed.clone();
        other.entries[0].guest = "/c".into();
        other.entries[0].mode = Some(0o644);
        assert_ne!(other.to_params(), typed.to_params());
    }

    #[test]
    fn recipe_label_names_distro_suite_and_packages() {
        let recipe = RecipeParams {
            distro: "debian".into(),
            suite: "bookworm".into(),
            packages: vec!["git".into(), "make".into()],
            source_date_epoch: 0,
        };
        assert_eq!(recipe.label(), "debian bookworm: git, make");
    }
}
