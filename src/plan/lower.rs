//! Lowering a [`Spec`] into a [`Plan`]. Pure: the same spec, lock and catalogs always give the
//! same plan, and nothing here touches the file system or the network.
//!
//! An image is a stack of layers, as in OCI: its base's layers, then one layer per provision
//! entry, then banger's guest agent; `rootfs` writes the stack as one ext4 image. Shape of the
//! plan for one image (ids in brackets):
//! ```text
//! base layers:    OCI pinned: layer[i]… (parallel fetches)
//!                 OCI unpinned: resolve → fetch-layers  (graph only: build pins first)
//!                 recipe: mmdebstrap (a rootfs tar)
//!                 catalog bundle: fetch-bundle → unpack (an ext4 image, read as a layer)
//!                 another image: its layers (not its agent)
//! provisioning:   copy:  provision[i]                       (a layer of the copied files)
//!                 run:   provision[i]/input → provision[i]  (the stack so far as an ext4 for
//!                        the builder VM, which also reads the kernel; the diff is the layer)
//! the image:      agent (banger's guest assets, one step for the whole plan) → rootfs
//!                 = base layers + provision layers + agent, flattened with whiteouts into
//!                 an ext4 with owners, modes and xattrs, identity files stripped
//!                 (a bundle with nothing on top is used as it is, without a rootfs step)
//! kernel:         fetch-package → extract → initramfs → stage   | fetch-bundle → stage | local
//! sandbox:        vm/boot → vm/file-sync → vm/workspace → vm/up
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use petgraph::graph::NodeIndex;

use super::kinds::{
    AgentLayerParams, FetchBundleParams, KernelInitramfsParams, KernelLocalParams,
    KernelPackageParams, NoParams, OciFetchLayerParams, OciFetchLayersParams, OciResolveParams,
    ProvisionCopyParams, ProvisionRunParams, RecipeParams, RootfsBuildParams, RootfsSize,
    StepParams, VmBootParams, VmFileSyncParams, VmUpCommandParams, VmWorkspaceParams,
};
use super::{Plan, PlanError, StepNode};
use crate::catalog::{Catalogs, Prefer};
use crate::key::Params;
use crate::lock::Lock;
use crate::spec::{ImageSource, ImageSpec, ProvisionStep, RecipeSpec, Spec};
use crate::steps::{self, KindInfo};

/// Block size of every ext4 banger writes (4 KiB was 30 % faster than mke2fs's 1 KiB default
/// for small images); a fixed image size is a whole number of blocks.
pub const EXT4_BLOCK_SIZE: u64 = 4096;
/// Auto-sized images get the content's size plus this percentage. Small: nothing writes into
/// a built image (provisioning makes layers, VMs write to their own disks), and every byte
/// of it is hashed when it is stored; see docs/decisions.md.
pub const EXT4_HEADROOM_PERCENT: u32 = 10;
/// Auto-sized images are never smaller than this.
pub const EXT4_MIN_BYTES: u64 = 64 * 1024 * 1024;

/// The size of an image: fixed, or the content plus headroom.
pub fn image_size(size: Option<u64>) -> RootfsSize {
    match size {
        Some(bytes) => RootfsSize::Fixed(bytes),
        None => RootfsSize::Auto {
            headroom_percent: EXT4_HEADROOM_PERCENT,
            min_bytes: EXT4_MIN_BYTES,
        },
    }
}

/// Step id of the guest agent layer, shared by every image of a plan.
pub const AGENT_LAYER_ID: &str = "banger/agent";

/// A step of kind `info` with its typed params: how lowering adds every step but a copy
/// (planned unfingerprinted), so a kind is always written through its own struct.
fn node<P: StepParams>(info: &KindInfo, id: String, params: &P) -> StepNode {
    debug_assert!(
        P::KINDS.contains(&info.name),
        "{} step {id} given the params of {:?}",
        info.name,
        P::KINDS
    );
    node_with(info, id, params.to_params())
}

fn node_with(info: &KindInfo, id: String, params: Params) -> StepNode {
    StepNode {
        id,
        kind: info.name.to_owned(),
        version: info.version,
        params,
        cache: info.cache,
        resource: info.resource,
        weight: 1,
        summary: String::new(),
        hints: std::collections::BTreeMap::new(),
    }
}

/// The plan of some images alone (`banger build`, `banger image pull`): each image's last step
/// is a target, and the map gives it by image name. `images` must be in dependency order, as
/// [`Spec::images`] is.
pub fn lower_images(
    images: &[ImageSpec],
    project_dir: &Path,
    lock: &Lock,
    catalogs: &Catalogs,
) -> Result<(Plan, BTreeMap<String, NodeIndex>), PlanError> {
    let mut lowering = Lowering {
        plan: Plan::new(),
        project_dir,
        lock,
        catalogs,
        image_outputs: HashMap::new(),
        image_layers: HashMap::new(),
        agent_layer: None,
        kernels: HashMap::new(),
        refresh: None,
    };
    let mut finals = BTreeMap::new();
    for image in images {
        lowering.image(image)?;
        let last = lowering.image_outputs[&image.name];
        lowering.plan.add_target(last);
        finals.insert(image.name.clone(), last);
    }
    Ok((lowering.plan, finals))
}

/// The plan of one kernel (`banger kernel pull`), its staging step the target. `refresh`
/// re-keys the fetch (`--force`).
pub fn lower_kernel(
    name: &str,
    catalogs: &Catalogs,
    refresh: Option<u64>,
) -> Result<(Plan, NodeIndex), PlanError> {
    let mut lowering = Lowering {
        plan: Plan::new(),
        project_dir: Path::new("."),
        lock: &Lock::default(),
        catalogs,
        image_outputs: HashMap::new(),
        image_layers: HashMap::new(),
        agent_layer: None,
        kernels: HashMap::new(),
        refresh,
    };
    let staged = lowering.kernel(name)?;
    lowering.plan.add_target(staged);
    Ok((lowering.plan, staged))
}

/// Builds the plan for `banger up`: every image, the kernel(s), the boot and the up command.
pub fn lower(spec: &Spec, lock: &Lock, catalogs: &Catalogs) -> Result<Plan, PlanError> {
    let mut lowering = Lowering {
        plan: Plan::new(),
        project_dir: &spec.project_dir,
        lock,
        catalogs,
        image_outputs: HashMap::new(),
        image_layers: HashMap::new(),
        agent_layer: None,
        kernels: HashMap::new(),
        refresh: None,
    };
    for image in &spec.images {
        lowering.image(image)?;
    }
    let sandbox = spec
        .image(&spec.sandbox_image)
        .expect("validated spec names an existing sandbox image");
    let rootfs = lowering.image_outputs[&sandbox.name];
    let kernel = lowering.kernel(&sandbox.kernel)?;

    let vm = spec.vm;
    let boot = lowering.plan.add_step(
        node(
            &steps::VM_BOOT,
            "vm/boot".into(),
            &VmBootParams {
                shape: vm,
                ports: spec.ports.clone(),
            },
        )
        .summary(format!("boot {} ({vm})", spec.name)),
    )?;
    lowering.plan.add_input(boot, "rootfs", rootfs);
    lowering.plan.add_input(boot, "kernel", kernel);
    let mut last = boot;

    if !spec.file_sync.is_empty() {
        let params = VmFileSyncParams {
            entries: spec.file_sync.clone(),
        };
        let sync = lowering.plan.add_step(
            node(&steps::VM_FILE_SYNC, "vm/file-sync".into(), &params)
                .summary(format!("sync {} host file(s)", spec.file_sync.len())),
        )?;
        lowering.plan.add_input(sync, "vm", last);
        last = sync;
    }
    if let Some(workspace) = &spec.workspace {
        let host = workspace.host.to_string_lossy().into_owned();
        let step = lowering.plan.add_step(
            node(
                &steps::VM_WORKSPACE,
                "vm/workspace".into(),
                &VmWorkspaceParams {
                    host: host.clone(),
                    guest: workspace.guest.clone(),
                },
            )
            .summary(format!("workspace {host} -> {}", workspace.guest)),
        )?;
        lowering.plan.add_input(step, "vm", last);
        last = step;
    }
    if let Some(up) = &spec.up {
        let step = lowering.plan.add_step(
            node(
                &steps::VM_UP_COMMAND,
                "vm/up".into(),
                &VmUpCommandParams {
                    run: up.run.clone(),
                },
            )
            .summary(format!("run: {}", up.run)),
        )?;
        lowering.plan.add_input(step, "vm", last);
        last = step;
    }
    lowering.plan.add_target(last);
    Ok(lowering.plan)
}

struct Lowering<'a> {
    plan: Plan,
    /// Where `copy` sources are read from when the step runs (a hint: not keyed, the
    /// fingerprint of the content is).
    project_dir: &'a Path,
    lock: &'a Lock,
    catalogs: &'a Catalogs,
    /// Last step of each image (its `rootfs.ext4`), by image name.
    image_outputs: HashMap<String, NodeIndex>,
    /// Each image's layers (base and provisioning, not the agent), by image name: what an
    /// image built `from` it continues.
    image_layers: HashMap<String, Base>,
    /// The guest agent layer, once added.
    agent_layer: Option<NodeIndex>,
    /// Staged kernel step, by kernel name (shared by every image that boots it).
    kernels: HashMap<String, NodeIndex>,
    /// `kernel pull --force`: a value that re-keys the kernel's fetch.
    refresh: Option<u64>,
}

impl Lowering<'_> {
    fn image(&mut self, image: &ImageSpec) -> Result<(), PlanError> {
        let prefix = format!("image:{}", image.name);
        let size = image.size.map(|size| size.bytes());
        let base = match &image.from {
            ImageSource::Oci { reference } => self.oci_image(&prefix, reference)?,
            ImageSource::Catalog { name } => self.catalog_image(&prefix, name)?,
            ImageSource::Recipe(recipe) => self.recipe_image(&prefix, recipe)?,
            ImageSource::Image { name } => self.image_layers[name].clone(),
        };
        let epoch = self.lock.source_date_epoch();
        let mut layers = base.layers.clone();
        for (index, step) in image.provision.iter().enumerate() {
            let id = format!("{prefix}/provision[{index}]");
            let layer = match step {
                ProvisionStep::Run {
                    command,
                    env,
                    timeout,
                    init,
                } => {
                    let kernel = self.kernel(&image.kernel)?;
                    let input = match (layers.as_slice(), base.finished) {
                        // A finished image with nothing on top boots as it is.
                        ([only], Some(finished)) if *only == finished => finished,
                        _ => self.stage_rootfs(&format!("{id}/input"), &layers)?,
                    };
                    let params = ProvisionRunParams {
                        command: command.clone(),
                        env: env.clone(),
                        init: *init,
                        source_date_epoch: epoch,
                    };
                    let mut step = node(&steps::PROVISION_RUN, id, &params)
                        .hint("timeout_secs", timeout.as_secs().to_string())
                        .summary(format!("run: {command}"));
                    step.weight = steps::provision_run::builder_weight();
                    let step = self.plan.add_step(step)?;
                    self.plan.add_input(step, "rootfs", input);
                    self.plan.add_input(step, "kernel", kernel);
                    step
                }
                ProvisionStep::Copy { src, dest, mode } => {
                    let params = ProvisionCopyParams::unfingerprinted(src, dest, *mode, epoch);
                    self.plan.add_step(
                        node_with(&steps::PROVISION_COPY, id, params)
                            .hint("project_dir", self.project_dir.to_string_lossy())
                            .summary(format!("copy {} -> {dest}", src.display())),
                    )?
                }
            };
            layers.push(layer);
        }
        let unchanged = layers == base.layers;
        let rootfs = match (&image.from, base.finished) {
            // Nothing added: the image is its parent's, or the bundle's, as it is.
            (ImageSource::Image { name }, _) if unchanged && size.is_none() => {
                self.image_outputs[name]
            }
            (_, Some(finished)) if unchanged && size.is_none() => finished,
            _ => {
                let agent = self.agent_layer()?;
                let mut all = layers.clone();
                all.push(agent);
                rootfs_build(
                    &mut self.plan,
                    &format!("{prefix}/rootfs"),
                    &all,
                    image_size(size),
                    "the image",
                )?
            }
        };
        self.image_layers.insert(
            image.name.clone(),
            Base {
                layers,
                finished: base.finished.filter(|_| unchanged),
            },
        );
        self.image_outputs.insert(image.name.clone(), rootfs);
        Ok(())
    }

    /// The image a builder VM boots for a `run` step: the layers so far, as small as they
    /// fit (nothing writes into it), without the agent (the builder's agent is the
    /// initramfs's own).
    fn stage_rootfs(&mut self, id: &str, layers: &[NodeIndex]) -> Result<NodeIndex, PlanError> {
        rootfs_build(
            &mut self.plan,
            id,
            layers,
            image_size(None),
            "the builder's image",
        )
    }

    /// banger's guest assets as a layer: one step, shared by every image of the plan.
    fn agent_layer(&mut self) -> Result<NodeIndex, PlanError> {
        if let Some(agent) = self.agent_layer {
            return Ok(agent);
        }
        let agent = add_agent_layer(&mut self.plan)?;
        self.agent_layer = Some(agent);
        Ok(agent)
    }

    fn oci_image(&mut self, prefix: &str, reference: &str) -> Result<Base, PlanError> {
        let Some(pin) = self.lock.pinned(reference) else {
            // Not pinned yet: `banger build` resolves and pins before it runs anything, so
            // this shape only ever appears in `banger graph`. A tag may move, so the
            // resolution is never cached and neither is anything that depends on it.
            let resolve = self.plan.add_step(
                node(
                    &steps::OCI_RESOLVE,
                    format!("{prefix}/resolve"),
                    &OciResolveParams {
                        reference: reference.to_owned(),
                    },
                )
                .never_cached()
                .summary(format!("{reference} (not pinned yet)")),
            )?;
            let fetch = self.plan.add_step(
                node(
                    &steps::OCI_FETCH_LAYERS,
                    format!("{prefix}/fetch-layers"),
                    &OciFetchLayersParams {
                        reference: reference.to_owned(),
                    },
                )
                .summary("every layer, once the reference is resolved"),
            )?;
            self.plan.add_input(fetch, "manifest", resolve);
            return Ok(Base::layers(vec![fetch]));
        };
        let mut layers = Vec::with_capacity(pin.layers.len());
        for (index, layer) in pin.layers.iter().enumerate() {
            // Keyed by digest alone: the same blob from any repository is the same input.
            let fetch = self.plan.add_step(
                node(
                    &steps::OCI_FETCH_LAYER,
                    format!("{prefix}/layer[{index}]"),
                    &OciFetchLayerParams {
                        digest: layer.digest.clone(),
                        media_type: layer.media_type.clone(),
                        size: layer.size,
                    },
                )
                .hint("reference", reference)
                .summary(format!(
                    "{} ({}) from {reference}",
                    layer.digest,
                    crate::spec::ByteSize(layer.size)
                )),
            )?;
            layers.push(fetch);
        }
        Ok(Base::layers(layers))
    }

    fn catalog_image(&mut self, prefix: &str, name: &str) -> Result<Base, PlanError> {
        let entry = self
            .catalogs
            .image(name)
            .expect("validated spec names an existing catalog image");
        let use_bundle = match (&entry.bundle, &entry.recipe, entry.prefer) {
            (Some(_), None, _) | (Some(_), Some(_), Prefer::Bundle) => true,
            (_, Some(_), _) => false,
            (None, None, _) => true,
        };
        if use_bundle && let Some(bundle) = &entry.bundle {
            let fetch = self.plan.add_step(
                node(
                    &steps::CATALOG_FETCH_BUNDLE,
                    format!("{prefix}/fetch-bundle"),
                    &FetchBundleParams {
                        url: bundle.url.clone(),
                        sha256: bundle.sha256.clone(),
                        size: bundle.size,
                        refresh: None,
                    },
                )
                .summary(format!(
                    "{name} bundle ({})",
                    crate::spec::ByteSize(bundle.size)
                )),
            )?;
            let unpack = self.plan.add_step(
                node(&steps::BUNDLE_UNPACK, format!("{prefix}/unpack"), &NoParams)
                    .hint("url", bundle.url.clone())
                    .summary("rootfs.ext4 + manifest.json"),
            )?;
            self.plan.add_input(unpack, "bundle", fetch);
            return Ok(Base {
                layers: vec![unpack],
                finished: Some(unpack),
            });
        }
        let recipe = entry
            .recipe
            .as_ref()
            .map(|recipe| RecipeSpec {
                distro: recipe.distro.clone(),
                suite: recipe.suite.clone(),
                packages: recipe.packages.clone(),
            })
            .expect(
                "catalog entries have a bundle or a recipe (checked by Catalogs::parse_images)",
            );
        self.recipe_image(prefix, &recipe)
    }

    fn recipe_image(&mut self, prefix: &str, recipe: &RecipeSpec) -> Result<Base, PlanError> {
        let mut names: Vec<&str> = RECIPE_BASE_PACKAGES.to_vec();
        names.extend(recipe.packages.iter().map(String::as_str));
        names.sort_unstable();
        names.dedup();
        let params = RecipeParams {
            distro: recipe.distro.clone(),
            suite: recipe.suite.clone(),
            packages: names.into_iter().map(str::to_owned).collect(),
            source_date_epoch: self.lock.source_date_epoch(),
        };
        let bootstrap = self.plan.add_step(
            node(
                &steps::RECIPE_MMDEBSTRAP,
                format!("{prefix}/mmdebstrap"),
                &params,
            )
            .summary(format!(
                "{} {} + {} package(s)",
                recipe.distro,
                recipe.suite,
                recipe.packages.len()
            )),
        )?;
        Ok(Base::layers(vec![bootstrap]))
    }

    fn kernel(&mut self, name: &str) -> Result<NodeIndex, PlanError> {
        if let Some(&staged) = self.kernels.get(name) {
            return Ok(staged);
        }
        let prefix = format!("kernel:{name}");
        let Some(entry) = self.catalogs.kernel(name) else {
            let local = self.plan.add_step(
                node(
                    &steps::KERNEL_LOCAL,
                    format!("{prefix}/local"),
                    &KernelLocalParams {
                        name: name.to_owned(),
                    },
                )
                .summary(format!("{name} from `banger kernel import`")),
            )?;
            self.kernels.insert(name.to_owned(), local);
            return Ok(local);
        };
        // `kernel pull --force`: a new key makes the fetch run again; if it brings the same
        // bytes, early cutoff spares everything after it.
        let refresh = self.refresh;
        let use_bundle =
            entry.bundle.is_some() && (entry.recipe.is_none() || entry.prefer == Prefer::Bundle);
        let stage = self.plan.add_step(
            node(&steps::KERNEL_STAGE, format!("{prefix}/stage"), &NoParams)
                .summary("vmlinux + initrd + modules"),
        )?;
        match (&entry.bundle, &entry.recipe) {
            (Some(bundle), _) if use_bundle => {
                let fetch = self.plan.add_step(
                    node(
                        &steps::KERNEL_FETCH_BUNDLE,
                        format!("{prefix}/fetch-bundle"),
                        &FetchBundleParams {
                            url: bundle.url.clone(),
                            sha256: bundle.sha256.clone(),
                            size: bundle.size,
                            refresh,
                        },
                    )
                    .summary(format!(
                        "{name} bundle ({})",
                        crate::spec::ByteSize(bundle.size)
                    )),
                )?;
                let unpack = self.plan.add_step(
                    node(&steps::BUNDLE_UNPACK, format!("{prefix}/unpack"), &NoParams)
                        .hint("url", bundle.url.clone())
                        .summary("vmlinux, initrd, modules"),
                )?;
                self.plan.add_input(unpack, "bundle", fetch);
                self.plan.add_input(stage, "kernel", unpack);
            }
            (_, Some(recipe)) => {
                let package = self.plan.add_step(
                    node(
                        &steps::KERNEL_FETCH_PACKAGE,
                        format!("{prefix}/fetch-package"),
                        &KernelPackageParams {
                            distro: recipe.distro.clone(),
                            suite: recipe.suite.clone(),
                            package: recipe.package.clone(),
                            refresh,
                        },
                    )
                    .summary(format!("{} from {}", recipe.package, recipe.suite)),
                )?;
                let extract = self.plan.add_step(
                    node(
                        &steps::KERNEL_EXTRACT,
                        format!("{prefix}/extract"),
                        &NoParams,
                    )
                    .summary("ELF vmlinux with PVH + modules"),
                )?;
                self.plan.add_input(extract, "package", package);
                let initramfs = self.plan.add_step(
                    node(
                        &steps::KERNEL_INITRAMFS,
                        format!("{prefix}/initramfs"),
                        &initramfs_params(),
                    )
                    .summary("banger's agent as /init + virtio, vsock and overlay modules"),
                )?;
                self.plan.add_input(initramfs, "kernel", extract);
                self.plan.add_input(stage, "kernel", extract);
                self.plan.add_input(stage, "initramfs", initramfs);
            }
            (None, None) => unreachable!(
                "catalog kernels have a bundle or a recipe (checked by Catalogs::parse_kernels)"
            ),
            (Some(_), None) => unreachable!("a bundle-only entry uses the bundle"),
        }
        self.kernels.insert(name.to_owned(), stage);
        Ok(stage)
    }
}

/// Where an image starts: layers, and, for a catalog bundle, the finished image that can be
/// used as it is when nothing is added on top.
#[derive(Debug, Clone)]
struct Base {
    layers: Vec<NodeIndex>,
    finished: Option<NodeIndex>,
}

impl Base {
    fn layers(layers: Vec<NodeIndex>) -> Base {
        Base {
            layers,
            finished: None,
        }
    }
}

/// Adds a `rootfs.build` step over `layers` (in order) with id `id`. `what` names the image
/// in its summary.
pub fn rootfs_build(
    plan: &mut Plan,
    id: &str,
    layers: &[NodeIndex],
    size: RootfsSize,
    what: &str,
) -> Result<NodeIndex, PlanError> {
    let params = RootfsBuildParams { size };
    let summary = format!(
        "{what}: {} layer(s) flattened with whiteouts → {} with owners, modes, xattrs",
        layers.len(),
        size.describe()
    );
    let build =
        plan.add_step(node(&steps::ROOTFS_BUILD, id.to_owned(), &params).summary(summary))?;
    for (index, layer) in layers.iter().enumerate() {
        plan.add_input(build, format!("layer[{index}]"), *layer);
    }
    Ok(build)
}

/// Adds the guest agent layer step ([`AGENT_LAYER_ID`]), keyed by the assets' digest.
pub fn add_agent_layer(plan: &mut Plan) -> Result<NodeIndex, PlanError> {
    let params = AgentLayerParams {
        assets: crate::assets::guest_assets_digest(),
    };
    plan.add_step(
        node(&steps::AGENT_LAYER, AGENT_LAYER_ID.to_owned(), &params)
            .summary("banger's guest agent, units and sshd settings"),
    )
}

/// The image of `layers` with banger's guest agent on top: the agent layer, then
/// `rootfs.build` with id `id`. For plans made outside a Bangerfile (`image import`).
pub fn image_with_agent(
    plan: &mut Plan,
    id: &str,
    layers: &[NodeIndex],
    size: Option<u64>,
) -> Result<NodeIndex, PlanError> {
    let agent = add_agent_layer(plan)?;
    let mut all = layers.to_vec();
    all.push(agent);
    rootfs_build(plan, id, &all, image_size(size), "the image")
}

/// Step id of the golden bundle of the image `image`.
pub fn bundle_step_id(image: &str) -> String {
    format!("image:{image}/bundle")
}

/// Adds a `bundle.write` step packing the image built by `rootfs` (`banger build --bundle`).
pub fn add_bundle(
    plan: &mut Plan,
    image: &str,
    rootfs: NodeIndex,
    params: &super::kinds::BundleWriteParams,
) -> Result<NodeIndex, PlanError> {
    let bundle = plan.add_step(
        node(&steps::BUNDLE_WRITE, bundle_step_id(image), params)
            .summary(format!("{} → .tar.zst (zstd level 3)", params.name)),
    )?;
    plan.add_input(bundle, "rootfs", rootfs);
    Ok(bundle)
}

/// Packages every recipe image gets, whatever the recipe lists: what banger's guest side
/// needs (systemd to run the agent's units, sshd for `vm ssh`, `ip` for the network, CA
/// certificates for anything that fetches).
pub const RECIPE_BASE_PACKAGES: &[&str] = &[
    "ca-certificates",
    "iproute2",
    "openssh-server",
    "systemd-sysv",
];

/// Modules banger's initramfs loads (their dependencies are resolved when it is built).
pub const INITRAMFS_MODULES: &[&str] = &[
    "overlay",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport",
];

/// The params of every `kernel.initramfs` step: [`INITRAMFS_MODULES`] and this build's agent
/// (a catalog kernel's recipe, and `banger kernel import` of modules without an initrd).
pub fn initramfs_params() -> KernelInitramfsParams {
    KernelInitramfsParams {
        modules: INITRAMFS_MODULES
            .iter()
            .map(|name| (*name).to_owned())
            .collect(),
        agent: crate::assets::agent_digest(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::path::PathBuf;

    use super::*;
    use crate::spec::{ByteSize, NetworkMode, SANDBOX_IMAGE_NAME, VmShape};

    fn spec(commands: &[&str]) -> Spec {
        Spec {
            source_file: PathBuf::from("/p/Bangerfile"),
            project_dir: PathBuf::from("/p"),
            name: "p".into(),
            images: vec![ImageSpec {
                name: SANDBOX_IMAGE_NAME.into(),
                from: ImageSource::Oci {
                    reference: "docker.io/library/debian:bookworm".into(),
                },
                size: None,
                kernel: "debian-cloud-amd64".into(),
                provision: commands
                    .iter()
                    .map(|command| ProvisionStep::Run {
                        command: (*command).into(),
                        env: BTreeMap::new(),
                        timeout: crate::spec::DEFAULT_RUN_TIMEOUT,
                        init: crate::spec::BuilderInit::Agent,
                    })
                    .collect(),
            }],
            sandbox_image: SANDBOX_IMAGE_NAME.into(),
            vm: VmShape {
                vcpu: 2,
                memory: ByteSize(2048 * ByteSize::MIB),
                disk: ByteSize(8 * ByteSize::GIB),
                network: NetworkMode::User,
            },
            ports: Vec::new(),
            workspace: None,
            up: None,
            file_sync: vec![],
        }
    }

    fn keys_by_id(commands: &[&str]) -> HashMap<String, crate::key::Key> {
        let plan = lower(&spec(commands), &Lock::default(), &Catalogs::embedded()).unwrap();
        let keys = plan.definition_keys().unwrap();
        plan.node_indices()
            .map(|node| (plan.node(node).id.clone(), keys[node.index()]))
            .collect()
    }

    #[test]
    fn changing_one_provision_step_rekeys_it_and_what_follows_only() {
        let before = keys_by_id(&["a", "b", "c"]);
        let after = keys_by_id(&["a", "B", "c"]);
        assert_eq!(before.len(), after.len());
        let mut changed: Vec<&str> = before
            .iter()
            .filter(|(id, key)| after[*id] != **key)
            .map(|(id, _)| id.as_str())
            .collect();
        changed.sort();
        // provision[0] and the image it boots on keep their keys; the builder image of
        // provision[2] holds provision[1]'s layer, so it changes too.
        assert_eq!(
            changed,
            [
                "image:sandbox/provision[1]",
                "image:sandbox/provision[2]",
                "image:sandbox/provision[2]/input",
                "image:sandbox/rootfs",
                "vm/boot"
            ]
        );
    }

    fn changed_ids(before: &Plan, after: &Plan) -> Vec<String> {
        let (old, new) = (
            before.definition_keys().unwrap(),
            after.definition_keys().unwrap(),
        );
        let mut changed: Vec<String> = before
            .node_indices()
            .filter(|node| old[node.index()] != new[node.index()])
            .map(|node| before.node(node).id.clone())
            .collect();
        changed.sort();
        changed
    }

    #[test]
    fn new_guest_assets_rekey_the_agent_layer_and_the_image_only() {
        let before = lower(&spec(&["a", "b"]), &Lock::default(), &Catalogs::embedded()).unwrap();
        let mut after = before.clone();
        let agent = after.find(AGENT_LAYER_ID).unwrap();
        after.graph[agent].params = AgentLayerParams {
            assets: "blake3:another-agent".into(),
        }
        .to_params();
        assert_eq!(
            changed_ids(&before, &after),
            ["banger/agent", "image:sandbox/rootfs", "vm/boot"],
            "no provision step or builder image may depend on the agent"
        );
    }

    #[test]
    fn a_copy_layer_does_not_depend_on_the_steps_before_it() {
        let with = |command: &str| {
            let mut spec = spec(&[command]);
            spec.images[0].provision.push(ProvisionStep::Copy {
                src: PathBuf::from("motd"),
                dest: "/etc/motd".into(),
                mode: None,
            });
            let mut plan = lower(&spec, &Lock::default(), &Catalogs::embedded()).unwrap();
            plan.resolve_sources(&HashMap::from([(
                PathBuf::from("motd"),
                "blake3:00".to_owned(),
            )]));
            plan
        };
        let changed = changed_ids(&with("a"), &with("b"));
        assert!(
            !changed.iter().any(|id| id == "image:sandbox/provision[1]"),
            "{changed:?}"
        );
        assert!(changed.iter().any(|id| id == "image:sandbox/provision[0]"));
    }

    /// Every kind lowering writes reads back through its params struct as exactly the
    /// params it was written as: a spec with every image source, both provision entries,
    /// every kernel path and every sandbox step.
    #[test]
    fn every_step_lowered_reads_back_as_the_params_it_was_written_as() {
        let mut catalogs = Catalogs::embedded();
        catalogs.images.extend(
            Catalogs::parse_images(
                r#"{"version": 1, "images": [{"name": "golden", "distro": "debian",
                    "arch": "x86_64", "kernel_ref": "bundled", "prefer": "bundle",
                    "bundle": {"url": "file:///golden.tar.zst", "sha256": "00", "size": 1}}]}"#,
                "test",
            )
            .unwrap(),
        );
        catalogs.kernels.extend(
            Catalogs::parse_kernels(
                r#"{"version": 1, "kernels": [{"name": "bundled", "arch": "x86_64",
                    "prefer": "bundle",
                    "bundle": {"url": "file:///k.tar.zst", "sha256": "01", "size": 2}}]}"#,
                "test",
            )
            .unwrap(),
        );
        let mut spec = spec(&["make"]);
        spec.images[0].provision.push(ProvisionStep::Copy {
            src: PathBuf::from("motd"),
            dest: "/etc/motd".into(),
            mode: Some(0o644),
        });
        // Every image boots a builder, so each image's kernel is planned.
        let image = |name: &str, from: ImageSource, kernel: &str| ImageSpec {
            name: name.into(),
            from,
            size: None,
            kernel: kernel.into(),
            provision: spec.images[0].provision[..1].to_vec(),
        };
        spec.images.extend([
            image(
                "unpinned",
                ImageSource::Oci {
                    reference: "docker.io/library/alpine:3.20".into(),
                },
                "mine",
            ),
            image(
                "golden",
                ImageSource::Catalog {
                    name: "golden".into(),
                },
                "bundled",
            ),
            image(
                "catalog-recipe",
                ImageSource::Catalog {
                    name: "debian-bookworm".into(),
                },
                "debian-cloud-amd64",
            ),
            image(
                "recipe",
                ImageSource::Recipe(RecipeSpec {
                    distro: "debian".into(),
                    suite: "trixie".into(),
                    packages: vec!["make".into()],
                }),
                "debian-cloud-amd64",
            ),
            ImageSpec {
                size: Some(ByteSize(4 * ByteSize::GIB)),
                ..image(
                    "child",
                    ImageSource::Image {
                        name: SANDBOX_IMAGE_NAME.into(),
                    },
                    "debian-cloud-amd64",
                )
            },
        ]);
        spec.file_sync = vec![crate::spec::FileSyncSpec {
            host: "~/.gitconfig".into(),
            guest: "/root/.gitconfig".into(),
            mode: Some(0o600),
        }];
        spec.workspace = Some(crate::spec::WorkspaceSpec {
            host: PathBuf::from("."),
            guest: "/root/project".into(),
        });
        spec.up = Some(crate::spec::UpCommand { run: "make".into() });
        let mut lock = Lock::default();
        lock.insert(crate::lock::PinnedReference {
            reference: "docker.io/library/debian:bookworm".into(),
            manifest_digest: "sha256:0m".into(),
            config_digest: None,
            config_size: None,
            layers: vec![crate::lock::PinnedLayer {
                digest: "sha256:0l".into(),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                size: 3,
            }],
        });
        let mut plan = lower(&spec, &lock, &catalogs).unwrap();
        plan.resolve_sources(&HashMap::from([(
            PathBuf::from("motd"),
            "blake3:00".to_owned(),
        )]));
        let mut kernel_plans = Vec::new();
        for name in ["debian-cloud-amd64", "bundled"] {
            kernel_plans.push(
                lower_kernel(name, &catalogs, Some(1_700_000_000_000))
                    .unwrap()
                    .0,
            );
        }
        let mut kinds = std::collections::BTreeSet::new();
        for plan in std::iter::once(&plan).chain(&kernel_plans) {
            for node in plan.node_indices() {
                let step = plan.node(node);
                let read = crate::plan::kinds::reencode(&step.kind, &step.params)
                    .unwrap_or_else(|| panic!("{}: no params struct for {}", step.id, step.kind));
                assert_eq!(read.as_ref(), Ok(&step.params), "{}", step.id);
                kinds.insert(step.kind.as_str());
            }
        }
        // Every kind but those only the CLI plans (`image import-tar`, `image register`,
        // `kernel import`) and `bundle.write` (`build --bundle`).
        let planned_elsewhere = ["import.file", "kernel.import", "bundle.write"];
        for info in steps::ALL_KINDS {
            assert_eq!(
                kinds.contains(info.name),
                !planned_elsewhere.contains(&info.name),
                "{}",
                info.name
            );
        }
        let refresh = |id: &str| {
            let plan = &kernel_plans;
            plan.iter()
                .find_map(|plan| {
                    plan.find(id)
                        .ok()
                        .map(|node| plan.node(node).params.clone())
                })
                .and_then(|params| params.get_int("refresh"))
        };
        assert_eq!(
            refresh("kernel:debian-cloud-amd64/fetch-package"),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            refresh("kernel:bundled/fetch-bundle"),
            Some(1_700_000_000_000)
        );
        let fetch = plan.find("kernel:bundled/fetch-bundle").unwrap();
        assert_eq!(plan.node(fetch).params.get("refresh"), None);
    }

    #[test]
    fn a_bundle_base_boots_its_builder_as_it_is_and_is_used_as_it_is_without_provisioning() {
        let mut catalogs = Catalogs::embedded();
        catalogs.images = Catalogs::parse_images(
            r#"{"version": 1, "images": [{"name": "golden", "distro": "debian",
                "arch": "x86_64", "kernel_ref": "debian-cloud-amd64", "prefer": "bundle",
                "bundle": {"url": "file:///golden.tar.zst", "sha256": "00", "size": 1}}]}"#,
            "test",
        )
        .unwrap();
        let mut spec = spec(&["make"]);
        spec.images[0].from = ImageSource::Catalog {
            name: "golden".into(),
        };
        let plan = lower(&spec, &Lock::default(), &catalogs).unwrap();
        let run = plan.find("image:sandbox/provision[0]").unwrap();
        let (_, input) = plan
            .inputs(run)
            .into_iter()
            .find(|(name, _)| *name == "rootfs")
            .unwrap();
        assert_eq!(plan.node(input).id, "image:sandbox/unpack");
        spec.images[0].provision.clear();
        let plan = lower(&spec, &Lock::default(), &catalogs).unwrap();
        assert!(plan.find("image:sandbox/rootfs").is_err());
    }
}
