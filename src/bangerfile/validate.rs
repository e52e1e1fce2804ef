//! Stage 2: raw sections → a [`Spec`] with every default resolved, collecting every semantic
//! error.
//!
//! Images are validated in three passes because an image's meaning depends on others: first
//! each image alone (its `from`, size, kernel choice, provisioning), then the graph of
//! `{ image = NAME }` references (unknown names, cycles, dependency order), then default
//! kernels, which an image built from another image inherits from it.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::check;
use super::diagnostic::{KeyPath, Report};
use super::document::{RawDocument, RawImageDef, Read};
use super::raw::{
    RawFileSync, RawFrom, RawFromTable, RawKernel, RawMode, RawProject, RawProvision, RawSize,
    RawUp, RawVm, RawWorkspace,
};
use super::{DEFAULT_WORKSPACE_GUEST, ParseContext, PathStatus};
use crate::spec::{
    BuilderInit, ByteSize, FileSyncSpec, ImageSource, ImageSpec, NetworkMode, PortForward,
    ProvisionStep, RecipeSpec, SANDBOX_IMAGE_NAME, Spec, UpCommand, VmShape, WorkspaceSpec,
};

/// Fewest vCPUs and most a VM may ask for.
const VCPU_RANGE: std::ops::RangeInclusive<i64> = 1..=64;
/// Below this no distribution's init and banger's agent fit in memory.
const MIN_MEMORY: u64 = 128 * ByteSize::MIB;
/// Hypervisors take memory in MiB.
const MEMORY_ALIGN: u64 = ByteSize::MIB;
/// Below this the work disk's ext4 journal would crowd out the data.
const MIN_DISK: u64 = 64 * ByteSize::MIB;
const DISK_ALIGN: u64 = ByteSize::MIB;
/// The ext4 block size banger writes (`plan::lower::EXT4_BLOCK_SIZE`; a test keeps them equal).
pub(crate) const IMAGE_SIZE_ALIGN: u64 = 4096;
/// Below this no root file system with banger's guest assets fits.
const MIN_IMAGE_SIZE: u64 = 32 * ByteSize::MIB;
/// The only recipe distribution banger can build today.
const RECIPE_DISTROS: &[&str] = &["debian"];
const NETWORK_MODES: &[&str] = &["user", "tap", "none"];
const RECIPE_EXAMPLE: &str = "for example `from = { recipe = \"debian\", suite = \"bookworm\" }`";

/// Checks and resolves a read document. Returns the spec only if nothing was reported.
pub(crate) fn validate(
    raw: RawDocument,
    file: &Path,
    ctx: &ParseContext<'_>,
    report: &mut Report<'_>,
) -> Option<Spec> {
    let project_dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut validator = Validator {
        ctx,
        report,
        project_dir,
    };
    let name = validator.project_name(raw.project.as_ref());
    let images = validator.images(&raw);
    let vm = match &raw.vm {
        Some(vm) => validator.vm(vm),
        None => Some(ctx.defaults.vm),
    };
    let ports = match &raw.vm {
        Some(vm) => validator.ports(vm),
        None => Some(Vec::new()),
    };
    let workspace = raw.workspace.as_ref().map(|w| validator.workspace(w));
    let up = raw.up.as_ref().map(|up| validator.up(up));
    let file_sync = validator.file_sync(&raw.file_sync);

    if !validator.report.is_empty() {
        return None;
    }
    Some(Spec {
        source_file: file.to_owned(),
        project_dir: validator.project_dir,
        name: name?,
        images: images?,
        sandbox_image: SANDBOX_IMAGE_NAME.to_owned(),
        vm: vm?,
        ports: ports?,
        workspace: match workspace {
            Some(workspace) => Some(workspace?),
            None => None,
        },
        up: match up {
            Some(up) => Some(up?),
            None => None,
        },
        file_sync: file_sync?,
    })
}

struct Validator<'r, 'a> {
    ctx: &'r ParseContext<'r>,
    report: &'r mut Report<'a>,
    project_dir: PathBuf,
}

/// An image between the passes.
struct Draft {
    name: String,
    /// Where the image is defined, for ordering independent images as the file does.
    position: usize,
    path: KeyPath,
    /// The table header, for errors about the image as a whole.
    span: Range<usize>,
    from: Option<DraftFrom>,
    /// Where `from` is written (the table header when it is defaulted).
    from_span: Range<usize>,
    from_path: KeyPath,
    size: Option<ByteSize>,
    kernel: Option<KernelChoice>,
    provision: Vec<ProvisionStep>,
    /// Something about this image was reported; it is not built into a spec.
    broken: bool,
}

impl Draft {
    fn new(name: &str, position: usize, path: KeyPath) -> Draft {
        Draft {
            name: name.to_owned(),
            position,
            span: 0..0,
            from: None,
            from_span: 0..0,
            from_path: path.key("from"),
            size: None,
            kernel: Some(KernelChoice::Default),
            provision: Vec::new(),
            broken: false,
            path,
        }
    }
}

enum DraftFrom {
    Base(ImageSource),
    Image {
        name: String,
        span: Range<usize>,
        path: KeyPath,
    },
}

enum KernelChoice {
    Named(String),
    /// Derived from the image's source once sources are resolved.
    Default,
}

impl Validator<'_, '_> {
    /// Runs `check` and reports whether it added no diagnostics.
    fn clean<T>(&mut self, check: impl FnOnce(&mut Self) -> T) -> (T, bool) {
        let before = self.report.len();
        let value = check(self);
        (value, self.report.len() == before)
    }

    fn check<T>(
        &mut self,
        result: Result<T, String>,
        span: Range<usize>,
        path: &KeyPath,
    ) -> Option<T> {
        result
            .map_err(|message| self.report.error(span, path, message))
            .ok()
    }

    fn project_name(&mut self, project: Option<&Read<RawProject>>) -> Option<String> {
        let path = KeyPath::root().key("project").key("name");
        if let Some(name) = project.and_then(|project| project.value.name.as_ref()) {
            let checked = check::project_name(name.get_ref());
            return self
                .check(checked, name.span(), &path)
                .map(|()| name.get_ref().clone());
        }
        if project.is_some_and(|project| project.failed("name")) {
            return None;
        }
        let derived = self
            .project_dir
            .file_name()
            .and_then(|dir| dir.to_str())
            .and_then(check::project_name_from_dir);
        if derived.is_none() {
            self.report.error_with_help(
                0..0,
                &path,
                format!(
                    "cannot derive a project name from the directory `{}`",
                    self.project_dir.display()
                ),
                Some("set `name` in `[project]`"),
            );
        }
        derived
    }

    // ----- images -----

    fn images(&mut self, raw: &RawDocument) -> Option<Vec<ImageSpec>> {
        let mut drafts = Vec::new();
        let sandbox_path = KeyPath::root().key("image");
        drafts.push(match &raw.image {
            Some((key_span, def)) => self.draft(
                SANDBOX_IMAGE_NAME,
                key_span.start,
                sandbox_path,
                def.as_ref(),
            ),
            None => self.default_sandbox(sandbox_path),
        });
        for named in &raw.images {
            let path = KeyPath::root().key("images").key(&named.name);
            if named.name == SANDBOX_IMAGE_NAME {
                // Left out of the drafts, so `{ image = "sandbox" }` still means `[image]`.
                self.report.error_with_help(
                    named.name_span.clone(),
                    &path,
                    "the image name `sandbox` is reserved for the `[image]` table",
                    Some(
                        "define the image `banger up` boots under `[image]`, or pick another name",
                    ),
                );
                continue;
            }
            let mut draft = self.draft(
                &named.name,
                named.name_span.start,
                path.clone(),
                named.def.as_ref(),
            );
            if let Err(message) = check::image_name(&named.name) {
                self.report.error(named.name_span.clone(), &path, message);
                draft.broken = true;
            }
            drafts.push(draft);
        }
        drafts.sort_by_key(|draft| draft.position);

        let order = self.image_order(&mut drafts);
        self.default_kernels(&mut drafts, &order);

        if drafts.iter().any(|draft| draft.broken) {
            return None;
        }
        let mut by_index: Vec<Option<Draft>> = drafts.into_iter().map(Some).collect();
        order
            .into_iter()
            .map(|index| {
                let draft = by_index[index].take()?;
                Some(ImageSpec {
                    name: draft.name,
                    from: match draft.from? {
                        DraftFrom::Base(source) => source,
                        DraftFrom::Image { name, .. } => ImageSource::Image { name },
                    },
                    size: draft.size,
                    kernel: match draft.kernel? {
                        KernelChoice::Named(name) => name,
                        KernelChoice::Default => return None,
                    },
                    provision: draft.provision,
                })
            })
            .collect()
    }

    /// Pass 1: one image on its own. `def` is `None` for an `[images.NAME]` that could not be
    /// read at all.
    fn draft(
        &mut self,
        name: &str,
        position: usize,
        path: KeyPath,
        def: Option<&RawImageDef>,
    ) -> Draft {
        let mut draft = Draft::new(name, position, path);
        let Some(def) = def else {
            draft.broken = true;
            return draft;
        };
        let body = &def.body;
        draft.span = body.span.clone();
        let ((), clean) = self.clean(|this| {
            draft.from = match &body.value.from {
                Some(from) => {
                    draft.from_span = from.span();
                    this.source(from, &draft.from_path, body.failed("from"))
                }
                None if body.failed("from") => None,
                None => {
                    draft.from_span = body.span.clone();
                    this.default_from(body.span.clone(), &draft.path)
                }
            };
            if let Some(size) = &body.value.size {
                draft.size = this.image_size(size, &draft.path.key("size"), draft.from.as_ref());
            }
            if let Some(kernel) = &body.value.kernel {
                draft.kernel = this.kernel(kernel, &draft.path.key("kernel"));
            }
            for entry in &def.provision {
                if let Some(step) = this.provision(entry) {
                    draft.provision.push(step);
                }
            }
        });
        draft.broken = !clean || body.any_failed() || def.provision_failed;
        draft
    }

    /// No `[image]` table: the default image, as if `[image]` were written with no keys.
    fn default_sandbox(&mut self, path: KeyPath) -> Draft {
        let mut draft = Draft::new(SANDBOX_IMAGE_NAME, 0, path);
        let (from, clean) = self.clean(|this| this.default_from(0..0, &draft.path));
        draft.from = from;
        draft.broken = !clean;
        draft
    }

    /// The configured default image, for an image table without `from`.
    fn default_from(&mut self, span: Range<usize>, path: &KeyPath) -> Option<DraftFrom> {
        let name = self.ctx.defaults.image.clone();
        self.named_source(&name, span, path)
    }

    fn source(
        &mut self,
        from: &Spanned<RawFrom>,
        path: &KeyPath,
        failed: bool,
    ) -> Option<DraftFrom> {
        match from.get_ref() {
            RawFrom::Name(name) => self.named_source(name, from.span(), path),
            RawFrom::Table(table) => self.source_table(table, from.span(), path, failed),
        }
    }

    /// `from = "NAME"`: a catalog image if the catalog has it, else an OCI reference.
    fn named_source(
        &mut self,
        name: &str,
        span: Range<usize>,
        path: &KeyPath,
    ) -> Option<DraftFrom> {
        if self.ctx.catalogs.image(name).is_some() {
            return Some(DraftFrom::Base(ImageSource::Catalog {
                name: name.to_owned(),
            }));
        }
        let catalog_names = self
            .ctx
            .catalogs
            .images
            .iter()
            .map(|entry| entry.name.as_str());
        let looks_like_a_name = !name.contains(['/', ':', '@', '.']);
        if looks_like_a_name && let Some(close) = check::closest(name, catalog_names) {
            self.report.error_with_help(
                span,
                path,
                format!("`{name}` is not in the image catalog"),
                Some(format!(
                    "did you mean `{close}`? For the registry image of that name, write `from = {{ oci = \"{name}\" }}`"
                )),
            );
            return None;
        }
        self.oci(name, span, path)
    }

    fn oci(&mut self, reference: &str, span: Range<usize>, path: &KeyPath) -> Option<DraftFrom> {
        self.check(check::oci_reference(reference), span, path)
            .map(|()| {
                DraftFrom::Base(ImageSource::Oci {
                    reference: reference.to_owned(),
                })
            })
    }

    fn source_table(
        &mut self,
        table: &RawFromTable,
        span: Range<usize>,
        path: &KeyPath,
        failed: bool,
    ) -> Option<DraftFrom> {
        let kinds = [
            ("oci", &table.oci),
            ("catalog", &table.catalog),
            ("image", &table.image),
            ("recipe", &table.recipe),
        ];
        let given: Vec<(&str, &Spanned<String>)> = kinds
            .iter()
            .filter_map(|(kind, value)| value.as_ref().map(|value| (*kind, value)))
            .collect();
        if table.recipe.is_none() {
            for (key, value_span) in [
                ("suite", table.suite.as_ref().map(Spanned::span)),
                ("packages", table.packages.as_ref().map(Spanned::span)),
            ] {
                if let Some(value_span) = value_span {
                    self.report.error(
                        value_span,
                        &path.key(key),
                        format!("`{key}` only applies to `recipe` images"),
                    );
                }
            }
        }
        let (kind, value) = match given.as_slice() {
            [] => {
                if !failed {
                    self.report.error_with_help(
                        span,
                        path,
                        "`from` needs one of `oci`, `catalog`, `image` or `recipe`",
                        Some("for example `from = { oci = \"alpine:3.20\" }`"),
                    );
                }
                return None;
            }
            [single] => *single,
            [first, second, ..] => {
                self.report.error(
                    second.1.span(),
                    &path.key(second.0),
                    format!(
                        "`from` takes one of `oci`, `catalog`, `image` or `recipe`, but has both `{}` and `{}`",
                        first.0, second.0
                    ),
                );
                return None;
            }
        };
        let value_path = path.key(kind);
        let name = value.get_ref().as_str();
        match kind {
            "oci" => self.oci(name, value.span(), &value_path),
            "catalog" => {
                if self.ctx.catalogs.image(name).is_some() {
                    return Some(DraftFrom::Base(ImageSource::Catalog {
                        name: name.to_owned(),
                    }));
                }
                let names: Vec<&str> = self
                    .ctx
                    .catalogs
                    .images
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect();
                self.report.error_with_help(
                    value.span(),
                    &value_path,
                    format!(
                        "the image catalog has no image `{name}`; it has {}",
                        check::backticked(names.iter().copied())
                    ),
                    check::closest(name, names.iter().copied())
                        .map(|close| format!("did you mean `{close}`?")),
                );
                None
            }
            "image" => Some(DraftFrom::Image {
                name: name.to_owned(),
                span: value.span(),
                path: value_path,
            }),
            _ => self.recipe(table, value, path, failed),
        }
    }

    fn recipe(
        &mut self,
        table: &RawFromTable,
        distro: &Spanned<String>,
        path: &KeyPath,
        failed: bool,
    ) -> Option<DraftFrom> {
        let ((suite, packages), clean) = self.clean(|this| {
            if !RECIPE_DISTROS.contains(&distro.get_ref().as_str()) {
                this.report.error(
                    distro.span(),
                    &path.key("recipe"),
                    format!(
                        "unknown recipe distribution `{}`; banger can build {}",
                        distro.get_ref(),
                        check::backticked(RECIPE_DISTROS.iter().copied())
                    ),
                );
            }
            let suite = match &table.suite {
                Some(suite) => {
                    let checked = check::suite(suite.get_ref());
                    this.check(checked, suite.span(), &path.key("suite"))
                        .map(|()| suite.get_ref().clone())
                }
                None => {
                    if !failed {
                        this.report.error_with_help(
                            distro.span(),
                            path,
                            "a `recipe` image needs `suite`, the release to build",
                            Some(RECIPE_EXAMPLE),
                        );
                    }
                    None
                }
            };
            let mut packages = Vec::new();
            let listed = table.packages.iter().flat_map(|list| list.get_ref().iter());
            for (index, package) in listed.enumerate() {
                let package_path = path.key("packages").index(index);
                let checked = check::package_name(package.get_ref());
                if this.check(checked, package.span(), &package_path).is_some() {
                    packages.push(package.get_ref().clone());
                }
            }
            packages.sort();
            packages.dedup();
            (suite, packages)
        });
        if !clean {
            return None;
        }
        Some(DraftFrom::Base(ImageSource::Recipe(RecipeSpec {
            distro: distro.get_ref().clone(),
            suite: suite?,
            packages,
        })))
    }

    fn image_size(
        &mut self,
        size: &Spanned<RawSize>,
        path: &KeyPath,
        from: Option<&DraftFrom>,
    ) -> Option<ByteSize> {
        if let Some(DraftFrom::Image { name, .. }) = from {
            self.report.error_with_help(
                size.span(),
                path,
                "`size` does not apply to an image built from another image",
                Some(format!(
                    "provisioning continues on the file system of `{name}`; set `size` there"
                )),
            );
            return None;
        }
        let bytes = self.check(check::size(size.get_ref()), size.span(), path)?;
        if bytes.bytes() < MIN_IMAGE_SIZE {
            self.report.error(
                size.span(),
                path,
                format!(
                    "image size {bytes} is too small; the minimum is {}",
                    ByteSize(MIN_IMAGE_SIZE)
                ),
            );
            return None;
        }
        if bytes.bytes() % IMAGE_SIZE_ALIGN != 0 {
            self.report.error(
                size.span(),
                path,
                format!("image size {bytes} is not a whole number of 4K ext4 blocks"),
            );
            return None;
        }
        Some(bytes)
    }

    fn kernel(&mut self, kernel: &Spanned<RawKernel>, path: &KeyPath) -> Option<KernelChoice> {
        let catalog = &self.ctx.catalogs.kernels;
        let names: Vec<&str> = catalog.iter().map(|entry| entry.name.as_str()).collect();
        let (name, span, path, local) = match kernel.get_ref() {
            RawKernel::Name(name) => (name, kernel.span(), path.clone(), false),
            RawKernel::Table(table) => match (&table.catalog, &table.local) {
                (Some(name), None) => (name.get_ref(), name.span(), path.key("catalog"), false),
                (None, Some(name)) => (name.get_ref(), name.span(), path.key("local"), true),
                (Some(_), Some(local)) => {
                    self.report.error(
                        local.span(),
                        &path.key("local"),
                        "`kernel` takes `catalog` or `local`, not both",
                    );
                    return None;
                }
                (None, None) => {
                    self.report
                        .error(kernel.span(), path, "`kernel` needs `catalog` or `local`");
                    return None;
                }
            },
        };
        let in_catalog = names.contains(&name.as_str());
        if local {
            self.check(check::kernel_name(name), span.clone(), &path)?;
            if in_catalog {
                self.report.error_with_help(
                    span,
                    &path,
                    format!("`{name}` is a catalog kernel, and the catalog entry would be used"),
                    Some(format!(
                        "write `kernel = \"{name}\"`, or import the local kernel under another name"
                    )),
                );
                return None;
            }
            return Some(KernelChoice::Named(name.clone()));
        }
        if in_catalog {
            return Some(KernelChoice::Named(name.clone()));
        }
        let help = match check::closest(name, names.iter().copied()) {
            Some(close) => format!("did you mean `{close}`?"),
            None => format!(
                "for a kernel added with `banger kernel import`, write `kernel = {{ local = \"{name}\" }}`"
            ),
        };
        let available = if names.is_empty() {
            "the kernel catalog is empty".to_owned()
        } else {
            format!("it has {}", check::backticked(names.iter().copied()))
        };
        self.report.error_with_help(
            span,
            &path,
            format!("the kernel catalog has no kernel `{name}`; {available}"),
            Some(help),
        );
        None
    }

    /// Every value present is checked whatever the entry's kind, so one run reports them all;
    /// then the combination of keys.
    fn provision(&mut self, entry: &Read<RawProvision>) -> Option<ProvisionStep> {
        let value = &entry.value;
        let path = &entry.path;
        let (step, clean) = self.clean(|this| {
            let command = value.run.as_ref().and_then(|run| this.command(run, &path.key("run")));
            let env = this.env(value.env.as_ref(), &path.key("env"));
            let timeout = value.timeout.as_ref().and_then(|timeout| {
                this.check(
                    check::duration(timeout.get_ref()),
                    timeout.span(),
                    &path.key("timeout"),
                )
            });
            let init = value.init.as_ref().and_then(|init| match init.get_ref().as_str() {
                "agent" => Some(BuilderInit::Agent),
                "systemd" => Some(BuilderInit::Systemd),
                other => {
                    this.report.error_with_help(
                        init.span(),
                        &path.key("init"),
                        format!("unknown init `{other}`"),
                        Some("use `agent` (the default, fastest) or `systemd`"),
                    );
                    None
                }
            });
            let src = value
                .copy
                .as_ref()
                .and_then(|copy| this.project_entry(copy, &path.key("copy"), false));
            let dest = value.to.as_ref().and_then(|to| this.guest_path(to, &path.key("to")));
            let mode = value.mode.as_ref().and_then(|mode| this.mode(mode, &path.key("mode")));
            match (&value.run, &value.copy) {
                (Some(_), Some(copy)) => {
                    this.report.error_with_help(
                        copy.span(),
                        &path.key("copy"),
                        "a provision entry has `run` or `copy`, not both",
                        Some("split it into two `[[image.provision]]` entries"),
                    );
                    None
                }
                (None, None) => {
                    if !entry.any_failed() {
                        this.report.error(
                            entry.span.clone(),
                            path,
                            "a provision entry needs `run` (a shell command) or `copy` (a project file)",
                        );
                    }
                    None
                }
                (Some(_), None) => {
                    for (key, span) in [
                        ("to", value.to.as_ref().map(Spanned::span)),
                        ("mode", value.mode.as_ref().map(Spanned::span)),
                    ] {
                        if let Some(span) = span {
                            this.report.error(
                                span,
                                &path.key(key),
                                format!("`{key}` only applies to `copy` entries"),
                            );
                        }
                    }
                    Some(ProvisionStep::Run {
                        command: command?,
                        env,
                        timeout: timeout.unwrap_or(crate::spec::DEFAULT_RUN_TIMEOUT),
                        init: init.unwrap_or_default(),
                    })
                }
                (None, Some(_)) => {
                    for (key, span) in [
                        ("env", value.env.as_ref().map(Spanned::span)),
                        ("timeout", value.timeout.as_ref().map(Spanned::span)),
                        ("init", value.init.as_ref().map(Spanned::span)),
                    ] {
                        if let Some(span) = span {
                            this.report.error(
                                span,
                                &path.key(key),
                                format!("`{key}` only applies to `run` entries"),
                            );
                        }
                    }
                    if value.to.is_none() && !entry.failed("to") {
                        this.report.error(
                            entry.span.clone(),
                            path,
                            "a `copy` entry needs `to`, the absolute guest path to copy to",
                        );
                    }
                    Some(ProvisionStep::Copy {
                        src: src?,
                        dest: dest?,
                        mode,
                    })
                }
            }
        });
        step.filter(|_| clean && !entry.any_failed())
    }

    fn command(&mut self, run: &Spanned<String>, path: &KeyPath) -> Option<String> {
        let command = run.get_ref();
        if command.trim().is_empty() {
            self.report.error(run.span(), path, "`run` is empty");
            return None;
        }
        if command.contains('\0') {
            self.report
                .error(run.span(), path, "`run` contains a NUL character");
            return None;
        }
        Some(command.clone())
    }

    fn env(
        &mut self,
        env: Option<&Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
        path: &KeyPath,
    ) -> BTreeMap<String, String> {
        let mut vars = BTreeMap::new();
        for (name, value) in env.iter().flat_map(|env| env.get_ref().iter()) {
            let var_path = path.key(name.get_ref());
            if self
                .check(check::env_name(name.get_ref()), name.span(), &var_path)
                .is_none()
            {
                continue;
            }
            if value.get_ref().contains('\0') {
                self.report
                    .error(value.span(), &var_path, "value contains a NUL character");
                continue;
            }
            vars.insert(name.get_ref().clone(), value.get_ref().clone());
        }
        vars
    }

    /// A project-relative file or directory that must exist inside the project.
    fn project_entry(
        &mut self,
        value: &Spanned<String>,
        path: &KeyPath,
        directory_only: bool,
    ) -> Option<PathBuf> {
        let relative = self.check(check::project_path(value.get_ref()), value.span(), path)?;
        let problem = match (self.ctx.probe)(&self.project_dir, &relative) {
            PathStatus::File if directory_only => Some(format!(
                "`{}` is a file; a directory is expected here",
                relative.display()
            )),
            PathStatus::File | PathStatus::Directory => None,
            PathStatus::Missing => Some(format!(
                "`{}` does not exist in the project directory `{}`",
                relative.display(),
                self.project_dir.display()
            )),
            PathStatus::OutsideProject => Some(format!(
                "`{}` resolves, through a symbolic link, to a path outside the project directory",
                relative.display()
            )),
        };
        match problem {
            Some(message) => {
                self.report.error(value.span(), path, message);
                None
            }
            None => Some(relative),
        }
    }

    fn guest_path(&mut self, value: &Spanned<String>, path: &KeyPath) -> Option<String> {
        self.check(check::guest_path(value.get_ref()), value.span(), path)
            .map(|()| value.get_ref().clone())
    }

    fn mode(&mut self, mode: &Spanned<RawMode>, path: &KeyPath) -> Option<u32> {
        let literal = self.report.text().get(mode.span()).unwrap_or_default();
        self.check(check::mode(mode.get_ref(), literal), mode.span(), path)
    }

    /// Pass 2: unknown `{ image = NAME }` references, cycles, and the order images are built
    /// in (dependencies first, otherwise as written). Images that are or depend on a broken
    /// reference are marked broken; only the reference itself is reported.
    fn image_order(&mut self, drafts: &mut [Draft]) -> Vec<usize> {
        let index_of: HashMap<String, usize> = drafts
            .iter()
            .enumerate()
            .map(|(index, draft)| (draft.name.clone(), index))
            .collect();
        let mut parent: Vec<Option<usize>> = vec![None; drafts.len()];
        for (index, draft) in drafts.iter_mut().enumerate() {
            let Some(DraftFrom::Image { name, span, path }) = &draft.from else {
                continue;
            };
            match index_of.get(name) {
                Some(&target) => parent[index] = Some(target),
                None => {
                    let mut names: Vec<&str> = index_of.keys().map(String::as_str).collect();
                    names.sort();
                    let help = check::closest(name, names.iter().copied())
                        .map(|close| format!("did you mean `{close}`?"))
                        .unwrap_or_else(|| {
                            format!(
                                "images are {}; define more under `[images.NAME]`",
                                check::backticked(names.iter().copied())
                            )
                        });
                    self.report.error_with_help(
                        span.clone(),
                        path,
                        format!("image `{name}` is not defined"),
                        Some(help),
                    );
                    draft.broken = true;
                }
            }
        }

        #[derive(Clone, Copy, PartialEq)]
        enum State {
            New,
            OnWalk,
            Done,
        }
        let mut state = vec![State::New; drafts.len()];
        for start in 0..drafts.len() {
            let mut walk = Vec::new();
            let mut current = Some(start);
            while let Some(index) = current {
                match state[index] {
                    State::Done => break,
                    State::OnWalk => {
                        let from = walk.iter().position(|&i| i == index).unwrap_or(0);
                        let mut cycle: Vec<usize> = walk[from..].to_vec();
                        // Name the cycle from the image defined first, wherever the walk began.
                        let first = (0..cycle.len())
                            .min_by_key(|&i| drafts[cycle[i]].position)
                            .unwrap_or(0);
                        cycle.rotate_left(first);
                        let mut names: Vec<&str> =
                            cycle.iter().map(|&i| drafts[i].name.as_str()).collect();
                        names.push(names[0]);
                        let head = &drafts[cycle[0]];
                        self.report.error(
                            head.from_span.clone(),
                            &head.from_path,
                            format!("image cycle: {}", names.join(" -> ")),
                        );
                        for &member in &cycle {
                            drafts[member].broken = true;
                        }
                        break;
                    }
                    State::New => {
                        state[index] = State::OnWalk;
                        walk.push(index);
                        current = parent[index];
                    }
                }
            }
            for index in walk {
                state[index] = State::Done;
            }
        }

        let mut placed = vec![false; drafts.len()];
        let mut order = Vec::new();
        for start in 0..drafts.len() {
            let mut chain = Vec::new();
            let mut current = Some(start);
            while let Some(index) = current {
                if placed[index] || chain.contains(&index) {
                    break;
                }
                chain.push(index);
                current = parent[index];
            }
            for &index in chain.iter().rev() {
                if let Some(parent) = parent[index]
                    && drafts[parent].broken
                {
                    drafts[index].broken = true;
                }
                placed[index] = true;
                order.push(index);
            }
        }
        order
    }

    /// Pass 3: an image without `kernel` boots its catalog entry's kernel, its parent image's
    /// kernel, or the first kernel in the catalog.
    fn default_kernels(&mut self, drafts: &mut [Draft], order: &[usize]) {
        let index_of: HashMap<String, usize> = drafts
            .iter()
            .enumerate()
            .map(|(index, draft)| (draft.name.clone(), index))
            .collect();
        for &index in order {
            if !matches!(drafts[index].kernel, Some(KernelChoice::Default)) || drafts[index].broken
            {
                continue;
            }
            let derived = match &drafts[index].from {
                Some(DraftFrom::Base(ImageSource::Catalog { name })) => self
                    .ctx
                    .catalogs
                    .image(name)
                    .map(|entry| entry.kernel_ref.clone()),
                Some(DraftFrom::Image { name, .. }) => {
                    match index_of.get(name).map(|&i| &drafts[i].kernel) {
                        Some(Some(KernelChoice::Named(kernel))) => Some(kernel.clone()),
                        _ => {
                            drafts[index].broken = true;
                            continue;
                        }
                    }
                }
                Some(DraftFrom::Base(_)) => self
                    .ctx
                    .catalogs
                    .kernels
                    .first()
                    .map(|entry| entry.name.clone()),
                None => continue,
            };
            match derived {
                Some(kernel) => drafts[index].kernel = Some(KernelChoice::Named(kernel)),
                None => {
                    let draft = &mut drafts[index];
                    self.report.error_with_help(
                        draft.span.clone(),
                        &draft.path,
                        format!(
                            "no default kernel for image `{}`: the kernel catalog is empty",
                            draft.name
                        ),
                        Some("set `kernel`, for example `kernel = { local = \"my-kernel\" }`"),
                    );
                    draft.broken = true;
                }
            }
        }
    }

    // ----- the VM and what runs in it -----

    fn vm(&mut self, vm: &Read<RawVm>) -> Option<VmShape> {
        let defaults = self.ctx.defaults.vm;
        let raw = &vm.value;
        let ((vcpu, memory, disk, network), clean) = self.clean(|this| {
            let vcpu = raw.vcpu.as_ref().map_or(Some(defaults.vcpu), |vcpu| {
                let count = *vcpu.get_ref();
                if VCPU_RANGE.contains(&count) {
                    u32::try_from(count).ok()
                } else {
                    this.report.error(
                        vcpu.span(),
                        &vm.path.key("vcpu"),
                        format!(
                            "`vcpu` must be between {} and {}, found {count}",
                            VCPU_RANGE.start(),
                            VCPU_RANGE.end()
                        ),
                    );
                    None
                }
            });
            let memory = raw.memory.as_ref().map_or(Some(defaults.memory), |memory| {
                this.vm_size(
                    memory,
                    &vm.path.key("memory"),
                    "memory",
                    MIN_MEMORY,
                    MEMORY_ALIGN,
                )
            });
            let disk = raw.disk.as_ref().map_or(Some(defaults.disk), |disk| {
                this.vm_size(disk, &vm.path.key("disk"), "disk", MIN_DISK, DISK_ALIGN)
            });
            let network = raw
                .network
                .as_ref()
                .map_or(Some(defaults.network), |network| {
                    match network.get_ref().as_str() {
                        "user" => Some(NetworkMode::User),
                        "tap" => Some(NetworkMode::Tap),
                        "none" => Some(NetworkMode::None),
                        other => {
                            this.report.error_with_help(
                                network.span(),
                                &vm.path.key("network"),
                                format!(
                                    "unknown network mode `{other}`, expected one of {}",
                                    check::backticked(NETWORK_MODES.iter().copied())
                                ),
                                check::closest(other, NETWORK_MODES.iter().copied())
                                    .map(|close| format!("did you mean `{close}`?")),
                            );
                            None
                        }
                    }
                });
            (vcpu, memory, disk, network)
        });
        if !clean {
            return None;
        }
        Some(VmShape {
            vcpu: vcpu?,
            memory: memory?,
            disk: disk?,
            network: network?,
        })
    }

    /// `[vm] ports`: each entry a published port, no two on one host port.
    fn ports(&mut self, vm: &Read<RawVm>) -> Option<Vec<PortForward>> {
        let Some(list) = &vm.value.ports else {
            return Some(Vec::new());
        };
        let path = vm.path.key("ports");
        let mut ports = Vec::new();
        let mut clean = true;
        for (index, entry) in list.get_ref().iter().enumerate() {
            match PortForward::parse(entry.get_ref()) {
                Ok(port) => {
                    if let Some(other) = ports
                        .iter()
                        .find(|other: &&PortForward| other.clashes_with(&port))
                    {
                        self.report.error(
                            entry.span(),
                            &path.index(index),
                            format!(
                                "`{port}` publishes host port {}/{} again (`{other}` has it)",
                                port.host_port,
                                port.protocol.as_str()
                            ),
                        );
                        clean = false;
                    }
                    ports.push(port);
                }
                Err(problem) => {
                    self.report.error(entry.span(), &path.index(index), problem);
                    clean = false;
                }
            }
        }
        clean.then_some(ports)
    }

    fn vm_size(
        &mut self,
        size: &Spanned<RawSize>,
        path: &KeyPath,
        what: &str,
        min: u64,
        align: u64,
    ) -> Option<ByteSize> {
        let bytes = self.check(check::size(size.get_ref()), size.span(), path)?;
        // `memory = 2048` is almost always meant as MiB; say so rather than only "too small".
        let bare_integer_help = match size.get_ref() {
            RawSize::Bytes(count) if (*count as u64) < ByteSize::MIB => Some(format!(
                "a plain integer is a number of bytes; write \"{count}M\" for {count} MiB"
            )),
            _ => None,
        };
        if bytes.bytes() < min {
            self.report.error_with_help(
                size.span(),
                path,
                format!(
                    "{what} {bytes} is too small; the minimum is {}",
                    ByteSize(min)
                ),
                bare_integer_help,
            );
            return None;
        }
        if bytes.bytes() % align != 0 {
            self.report.error(
                size.span(),
                path,
                format!(
                    "{what} {bytes} is not a whole number of {}",
                    ByteSize(align)
                ),
            );
            return None;
        }
        Some(bytes)
    }

    fn workspace(&mut self, workspace: &Read<RawWorkspace>) -> Option<WorkspaceSpec> {
        let raw = &workspace.value;
        let ((host, guest), clean) = self.clean(|this| {
            let host = match &raw.host {
                Some(host) => this.project_entry(host, &workspace.path.key("host"), true),
                None => Some(PathBuf::from(".")),
            };
            let guest = match &raw.guest {
                Some(guest) => this.guest_path(guest, &workspace.path.key("guest")),
                None => Some(DEFAULT_WORKSPACE_GUEST.to_owned()),
            };
            (host, guest)
        });
        if !clean || workspace.any_failed() {
            return None;
        }
        Some(WorkspaceSpec {
            host: host?,
            guest: guest?,
        })
    }

    fn up(&mut self, up: &Read<RawUp>) -> Option<UpCommand> {
        match &up.value.run {
            Some(run) => self
                .command(run, &up.path.key("run"))
                .map(|run| UpCommand { run }),
            None => {
                if !up.any_failed() {
                    self.report.error(
                        up.span.clone(),
                        &up.path,
                        "`[up]` needs `run`, the command `banger up` runs in the sandbox",
                    );
                }
                None
            }
        }
    }

    fn file_sync(&mut self, entries: &[Read<RawFileSync>]) -> Option<Vec<FileSyncSpec>> {
        let mut synced: Vec<FileSyncSpec> = Vec::new();
        let mut guests: HashMap<String, KeyPath> = HashMap::new();
        let mut all_clean = true;
        for entry in entries {
            let raw = &entry.value;
            let (spec, clean) = self.clean(|this| {
                let host = match &raw.host {
                    Some(host) => this.sync_host(host, &entry.path.key("host")),
                    None => {
                        this.missing(entry, "host", "the host file to copy (absolute or `~/...`)");
                        None
                    }
                };
                let guest = match &raw.guest {
                    Some(guest) => {
                        this.guest_path(guest, &entry.path.key("guest"))
                            .and_then(|path| {
                                if let Some(first) = guests.get(&path) {
                                    this.report.error(
                                        guest.span(),
                                        &entry.path.key("guest"),
                                        format!("`{path}` is already the guest path of `{first}`"),
                                    );
                                    return None;
                                }
                                guests.insert(path.clone(), entry.path.clone());
                                Some(path)
                            })
                    }
                    None => {
                        this.missing(entry, "guest", "the absolute guest path to copy to");
                        None
                    }
                };
                let mode = raw
                    .mode
                    .as_ref()
                    .map(|mode| this.mode(mode, &entry.path.key("mode")));
                Some(FileSyncSpec {
                    host: host?,
                    guest: guest?,
                    mode: mode.flatten(),
                })
            });
            match spec {
                Some(spec) if clean && !entry.any_failed() => synced.push(spec),
                _ => all_clean = false,
            }
        }
        all_clean.then_some(synced)
    }

    /// Reports a required key that is absent, unless it was present but unreadable.
    fn missing<T>(&mut self, entry: &Read<T>, key: &str, what: &str) {
        if !entry.failed(key) {
            self.report.error(
                entry.span.clone(),
                &entry.path,
                format!("missing `{key}`, {what}"),
            );
        }
    }

    /// A host path for file sync: absolute or under `~/`, expanded when the sync runs.
    fn sync_host(&mut self, host: &Spanned<String>, path: &KeyPath) -> Option<String> {
        let value = host.get_ref();
        let message = if value.is_empty() {
            "host path is empty".to_owned()
        } else if value.contains('\0') {
            "host path contains a NUL character".to_owned()
        } else if value.starts_with('/') || value.starts_with("~/") {
            return Some(value.clone());
        } else if value.starts_with('~') {
            format!("`{value}`: only `~/` (your own home) is expanded")
        } else {
            self.report.error_with_help(
                host.span(),
                path,
                format!("host path `{value}` is relative; file sync host paths are absolute or start with `~/`"),
                Some("project files belong in an `[[image.provision]]` `copy` or in `[workspace]`"),
            );
            return None;
        };
        self.report.error(host.span(), path, message);
        None
    }
}
