//! Lowering a [`Spec`] into a [`Plan`]. Pure: the same spec, lock and catalogs always give the
//! same plan, and nothing here touches the file system or the network.
//!
//! Shape of the plan for one image (ids in brackets):
//! ```text
//! OCI, pinned:    layer[i]… (parallel fetches) → rootfs
//! OCI, unpinned:  resolve → fetch-layers → rootfs      (graph only: build pins first)
//! catalog bundle: fetch-bundle → unpack
//! recipe:         mmdebstrap → rootfs
//! rootfs = flatten with whiteouts → ext4 with owners, modes, xattrs → guest agent, one step
//! local image:    (the other image's last step)
//! then:           provision[0] → provision[1] → …          (each also reads the kernel)
//! kernel:         fetch-package → extract → initramfs → stage   | fetch-bundle → stage | local
//! sandbox:        vm/boot → vm/file-sync → vm/workspace → vm/up
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use petgraph::graph::NodeIndex;

use super::{Plan, PlanError, StepNode};
use crate::catalog::{Catalogs, Prefer};
use crate::key::{ParamValue, Params};
use crate::lock::Lock;
use crate::spec::{ImageSource, ImageSpec, ProvisionStep, RecipeSpec, Spec};
use crate::steps::{self, KindInfo};

/// Block size of every ext4 banger writes (4 KiB was 30 % faster than mke2fs's 1 KiB default
/// for small images, see environment.md).
pub const EXT4_BLOCK_SIZE: u64 = 4096;
/// Auto-sized images get content × this percentage.
pub const EXT4_HEADROOM_PERCENT: u64 = 150;
/// Auto-sized images are never smaller than this. Small, because every byte of an image is
/// hashed when it is stored (holes included) and VMs write to their own layer, not the image;
/// see docs/decisions.md.
pub const EXT4_MIN_BYTES: u64 = 256 * 1024 * 1024;

fn node(info: &KindInfo, id: String, params: Params) -> StepNode {
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
            Params::new()
                .with("vcpu", vm.vcpu)
                .with("memory", vm.memory.bytes())
                .with("disk", vm.disk.bytes())
                .with("network", vm.network.as_str()),
        )
        .summary(format!("boot {} ({vm})", spec.name)),
    )?;
    lowering.plan.add_input(boot, "rootfs", rootfs);
    lowering.plan.add_input(boot, "kernel", kernel);
    let mut last = boot;

    if !spec.file_sync.is_empty() {
        let entries = spec
            .file_sync
            .iter()
            .map(|entry| {
                let mode = entry.mode.map_or_else(String::new, |m| format!(" {m:04o}"));
                ParamValue::Str(format!("{} -> {}{mode}", entry.host, entry.guest))
            })
            .collect();
        let sync = lowering.plan.add_step(
            node(
                &steps::VM_FILE_SYNC,
                "vm/file-sync".into(),
                Params::new().with("entries", ParamValue::List(entries)),
            )
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
                Params::new()
                    .with("host", host.clone())
                    .with("guest", workspace.guest.clone()),
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
                Params::new().with("run", up.run.clone()),
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
    /// Last step of each image, by image name.
    image_outputs: HashMap<String, NodeIndex>,
    /// Staged kernel step, by kernel name (shared by every image that boots it).
    kernels: HashMap<String, NodeIndex>,
    /// `kernel pull --force`: a value that re-keys the kernel's fetch.
    refresh: Option<u64>,
}

impl Lowering<'_> {
    fn image(&mut self, image: &ImageSpec) -> Result<(), PlanError> {
        let prefix = format!("image:{}", image.name);
        let size = image.size.map(|size| size.bytes());
        let mut rootfs = match &image.from {
            ImageSource::Oci { reference } => self.oci_image(&prefix, reference, size)?,
            ImageSource::Catalog { name } => self.catalog_image(&prefix, name, size)?,
            ImageSource::Recipe(recipe) => self.recipe_image(&prefix, recipe, size)?,
            ImageSource::Image { name } => self.image_outputs[name],
        };
        for (index, step) in image.provision.iter().enumerate() {
            let id = format!("{prefix}/provision[{index}]");
            let next = match step {
                ProvisionStep::Run { command, env } => {
                    let kernel = self.kernel(&image.kernel)?;
                    let params = Params::new()
                        .with("command", command.clone())
                        .with("env", ParamValue::Map(env.clone()));
                    let step = self.plan.add_step(
                        node(&steps::PROVISION_RUN, id, params).summary(format!("run: {command}")),
                    )?;
                    self.plan.add_input(step, "rootfs", rootfs);
                    self.plan.add_input(step, "kernel", kernel);
                    step
                }
                ProvisionStep::Copy { src, dest, mode } => {
                    let mut params = Params::new()
                        .with("src", ParamValue::Source(src.clone()))
                        .with("dest", dest.clone());
                    if let Some(mode) = mode {
                        params.insert("mode", format!("{mode:04o}"));
                    }
                    let step = self.plan.add_step(
                        node(&steps::PROVISION_COPY, id, params)
                            .hint("project_dir", self.project_dir.to_string_lossy())
                            .summary(format!("copy {} -> {dest}", src.display())),
                    )?;
                    self.plan.add_input(step, "rootfs", rootfs);
                    step
                }
            };
            rootfs = next;
        }
        self.image_outputs.insert(image.name.clone(), rootfs);
        Ok(())
    }

    /// The one step that turns layers (OCI blobs or a recipe's tar) into the image: flatten with
    /// whiteouts, write the ext4 with owners/modes/xattrs, inject banger's guest assets. Merged
    /// because the ext4 writer does all of it in one pass over the tars (no tree on the host);
    /// the summary names the phases so `banger graph` still shows what happens.
    fn rootfs_build(
        &mut self,
        prefix: &str,
        layers: &[NodeIndex],
        size: Option<u64>,
    ) -> Result<NodeIndex, PlanError> {
        let mut params = Params::new()
            .with("block_size", EXT4_BLOCK_SIZE)
            .with("assets", crate::assets::guest_assets_digest());
        match size {
            Some(bytes) => params.insert("size", bytes),
            None => {
                params.insert("headroom_percent", EXT4_HEADROOM_PERCENT);
                params.insert("min_size", EXT4_MIN_BYTES);
            }
        }
        let sizing = match size {
            Some(bytes) => format!("ext4 {}", crate::spec::ByteSize(bytes)),
            None => format!(
                "ext4 content × {EXT4_HEADROOM_PERCENT}% (≥ {})",
                crate::spec::ByteSize(EXT4_MIN_BYTES)
            ),
        };
        let summary = format!(
            "flatten {} layer(s) with whiteouts → {sizing} with owners, modes, xattrs → guest agent",
            layers.len()
        );
        let build = self.plan.add_step(
            node(&steps::ROOTFS_BUILD, format!("{prefix}/rootfs"), params).summary(summary),
        )?;
        for (index, layer) in layers.iter().enumerate() {
            self.plan
                .add_input(build, format!("layer[{index}]"), *layer);
        }
        Ok(build)
    }

    fn oci_image(
        &mut self,
        prefix: &str,
        reference: &str,
        size: Option<u64>,
    ) -> Result<NodeIndex, PlanError> {
        let Some(pin) = self.lock.pinned(reference) else {
            // Not pinned yet: `banger build` resolves and pins before it runs anything, so
            // this shape only ever appears in `banger graph`. A tag may move, so the
            // resolution is never cached and neither is anything that depends on it.
            let resolve = self.plan.add_step(
                node(
                    &steps::OCI_RESOLVE,
                    format!("{prefix}/resolve"),
                    Params::new().with("reference", reference),
                )
                .never_cached()
                .summary(format!("{reference} (not pinned yet)")),
            )?;
            let fetch = self.plan.add_step(
                node(
                    &steps::OCI_FETCH_LAYERS,
                    format!("{prefix}/fetch-layers"),
                    Params::new().with("reference", reference),
                )
                .summary("every layer, once the reference is resolved"),
            )?;
            self.plan.add_input(fetch, "manifest", resolve);
            return self.rootfs_build(prefix, &[fetch], size);
        };
        let mut layers = Vec::with_capacity(pin.layers.len());
        for (index, layer) in pin.layers.iter().enumerate() {
            // Keyed by digest alone: the same blob from any repository is the same input.
            let fetch = self.plan.add_step(
                node(
                    &steps::OCI_FETCH_LAYER,
                    format!("{prefix}/layer[{index}]"),
                    Params::new()
                        .with("digest", layer.digest.clone())
                        .with("media_type", layer.media_type.clone())
                        .with("size", layer.size),
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
        self.rootfs_build(prefix, &layers, size)
    }

    fn catalog_image(
        &mut self,
        prefix: &str,
        name: &str,
        size: Option<u64>,
    ) -> Result<NodeIndex, PlanError> {
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
                    Params::new()
                        .with("url", bundle.url.clone())
                        .with("sha256", bundle.sha256.clone())
                        .with("size", bundle.size),
                )
                .summary(format!(
                    "{name} bundle ({})",
                    crate::spec::ByteSize(bundle.size)
                )),
            )?;
            let unpack = self.plan.add_step(
                node(
                    &steps::BUNDLE_UNPACK,
                    format!("{prefix}/unpack"),
                    Params::new(),
                )
                .hint("url", bundle.url.clone())
                .summary("rootfs.ext4 + manifest.json"),
            )?;
            self.plan.add_input(unpack, "bundle", fetch);
            return Ok(unpack);
        }
        let recipe = entry
            .recipe
            .as_ref()
            .map(|recipe| RecipeSpec {
                distro: recipe.distro.clone(),
                suite: recipe.suite.clone(),
                packages: recipe.packages.clone(),
            })
            .expect("catalog entries have a bundle or a recipe (checked by tests)");
        self.recipe_image(prefix, &recipe, size)
    }

    fn recipe_image(
        &mut self,
        prefix: &str,
        recipe: &RecipeSpec,
        size: Option<u64>,
    ) -> Result<NodeIndex, PlanError> {
        let mut names: Vec<&str> = RECIPE_BASE_PACKAGES.to_vec();
        names.extend(recipe.packages.iter().map(String::as_str));
        names.sort_unstable();
        names.dedup();
        let packages = names.into_iter().map(ParamValue::from).collect();
        let bootstrap = self.plan.add_step(
            node(
                &steps::RECIPE_MMDEBSTRAP,
                format!("{prefix}/mmdebstrap"),
                Params::new()
                    .with("distro", recipe.distro.clone())
                    .with("suite", recipe.suite.clone())
                    .with("packages", ParamValue::List(packages)),
            )
            .summary(format!(
                "{} {} + {} package(s)",
                recipe.distro,
                recipe.suite,
                recipe.packages.len()
            )),
        )?;
        self.rootfs_build(prefix, &[bootstrap], size)
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
                    Params::new().with("name", name),
                )
                .summary(format!("{name} from `banger kernel import`")),
            )?;
            self.kernels.insert(name.to_owned(), local);
            return Ok(local);
        };
        let refresh = |mut params: Params, refresh: Option<u64>| {
            // `kernel pull --force`: a new key makes the fetch run again; if it brings the
            // same bytes, early cutoff spares everything after it.
            if let Some(at) = refresh {
                params.insert("refresh", at);
            }
            params
        };
        let use_bundle =
            entry.bundle.is_some() && (entry.recipe.is_none() || entry.prefer == Prefer::Bundle);
        let stage = self.plan.add_step(
            node(
                &steps::KERNEL_STAGE,
                format!("{prefix}/stage"),
                Params::new(),
            )
            .summary("vmlinux + initrd + modules"),
        )?;
        match (&entry.bundle, &entry.recipe) {
            (Some(bundle), _) if use_bundle => {
                let fetch = self.plan.add_step(
                    node(
                        &steps::KERNEL_FETCH_BUNDLE,
                        format!("{prefix}/fetch-bundle"),
                        refresh(
                            Params::new()
                                .with("url", bundle.url.clone())
                                .with("sha256", bundle.sha256.clone())
                                .with("size", bundle.size),
                            self.refresh,
                        ),
                    )
                    .summary(format!(
                        "{name} bundle ({})",
                        crate::spec::ByteSize(bundle.size)
                    )),
                )?;
                let unpack = self.plan.add_step(
                    node(
                        &steps::BUNDLE_UNPACK,
                        format!("{prefix}/unpack"),
                        Params::new(),
                    )
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
                        refresh(
                            Params::new()
                                .with("distro", recipe.distro.clone())
                                .with("suite", recipe.suite.clone())
                                .with("package", recipe.package.clone()),
                            self.refresh,
                        ),
                    )
                    .summary(format!("{} from {}", recipe.package, recipe.suite)),
                )?;
                let extract = self.plan.add_step(
                    node(
                        &steps::KERNEL_EXTRACT,
                        format!("{prefix}/extract"),
                        Params::new(),
                    )
                    .summary("ELF vmlinux with PVH + modules"),
                )?;
                self.plan.add_input(extract, "package", package);
                let initramfs = self.plan.add_step(
                    node(
                        &steps::KERNEL_INITRAMFS,
                        format!("{prefix}/initramfs"),
                        Params::new()
                            .with(
                                "modules",
                                ParamValue::List(
                                    INITRAMFS_MODULES
                                        .iter()
                                        .map(|name| ParamValue::from(*name))
                                        .collect(),
                                ),
                            )
                            .with("agent", crate::assets::agent_digest()),
                    )
                    .summary("banger's agent as /init + virtio, vsock and overlay modules"),
                )?;
                self.plan.add_input(initramfs, "kernel", extract);
                self.plan.add_input(stage, "kernel", extract);
                self.plan.add_input(stage, "initramfs", initramfs);
            }
            (None, None) => unreachable!("catalog kernels have a bundle or a recipe (tested)"),
            (Some(_), None) => unreachable!("a bundle-only entry uses the bundle"),
        }
        self.kernels.insert(name.to_owned(), stage);
        Ok(stage)
    }
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
        assert_eq!(
            changed,
            [
                "image:sandbox/provision[1]",
                "image:sandbox/provision[2]",
                "vm/boot"
            ]
        );
    }
}
