//! Bangerfile text → Spec, and Bangerfile text → rendered diagnostics. The project's files are
//! faked by [`probe`], so nothing here touches the file system except the tests of [`load`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::catalog::Catalogs;
use crate::lock::Lock;
use crate::spec::{
    FileSyncSpec, ImageSource, ImageSpec, ProvisionStep, RecipeSpec, UpCommand, WorkspaceSpec,
};

const PROJECT: &str = "/work/demo";

/// The fake project: `scripts/setup.sh`, `Makefile`, `src/`, and `escape`, a symlink pointing
/// out of the project.
fn probe(_project_dir: &Path, relative: &Path) -> PathStatus {
    match relative.to_str().unwrap_or_default() {
        "." | "scripts" | "src" => PathStatus::Directory,
        "scripts/setup.sh" | "Makefile" => PathStatus::File,
        "escape" => PathStatus::OutsideProject,
        _ => PathStatus::Missing,
    }
}

fn parse_in(dir: &str, text: &str, defaults: Defaults) -> Result<Spec, BangerfileError> {
    let catalogs = Catalogs::embedded();
    let ctx = ParseContext::new(&catalogs)
        .with_probe(&probe)
        .with_defaults(defaults);
    parse_named(
        text,
        &Path::new(dir).join("Bangerfile"),
        Path::new("Bangerfile"),
        &ctx,
    )
}

fn spec(text: &str) -> Spec {
    match parse_in(PROJECT, text, Defaults::default()) {
        Ok(spec) => spec,
        Err(error) => panic!("expected a valid Bangerfile:\n{error}"),
    }
}

/// The rendered report for an invalid Bangerfile.
fn errors(text: &str) -> String {
    match parse_in(PROJECT, text, Defaults::default()) {
        Ok(spec) => panic!("expected errors, got {spec:#?}"),
        Err(error) => error.to_string(),
    }
}

fn diagnostics(text: &str) -> Vec<Diagnostic> {
    match parse_in(PROJECT, text, Defaults::default()) {
        Err(BangerfileError::Invalid { diagnostics, .. }) => diagnostics,
        other => panic!("expected diagnostics, got {other:?}"),
    }
}

fn debian_bookworm() -> ImageSource {
    ImageSource::Catalog {
        name: "debian-bookworm".into(),
    }
}

const KERNEL: &str = "debian-cloud-amd64";

fn image(name: &str, from: ImageSource) -> ImageSpec {
    ImageSpec {
        name: name.into(),
        from,
        size: None,
        kernel: KERNEL.into(),
        provision: Vec::new(),
    }
}

fn image_names(spec: &Spec) -> Vec<&str> {
    spec.images
        .iter()
        .map(|image| image.name.as_str())
        .collect()
}

// ----- valid Bangerfiles -----

#[test]
fn an_empty_bangerfile_is_the_default_sandbox() {
    assert_eq!(
        spec(""),
        Spec {
            source_file: PathBuf::from("/work/demo/Bangerfile"),
            project_dir: PathBuf::from("/work/demo"),
            name: "demo".into(),
            images: vec![image("sandbox", debian_bookworm())],
            sandbox_image: "sandbox".into(),
            vm: DEFAULT_VM,
            ports: Vec::new(),
            workspace: None,
            up: None,
            file_sync: Vec::new(),
        }
    );
}

#[test]
fn every_section_resolves_to_the_spec() {
    let spec = spec(
        r#"
[project]
name = "demo-app"

[image]
from = "debian-bookworm"
size = "4G"
kernel = "debian-cloud-amd64"

[[image.provision]]
run = "apt-get update && apt-get install -y make"
env = { DEBIAN_FRONTEND = "noninteractive", LANG = "C.UTF-8" }

[[image.provision]]
copy = "./scripts/../scripts/setup.sh"
to = "/usr/local/bin/setup"
mode = "0755"

[vm]
vcpu = 4
memory = "4G"
disk = 17179869184
network = "tap"
ports = ["8080:80", "0.0.0.0:5353:53/udp"]

[workspace]
host = "src/"
guest = "/root/src"

[up]
run = "make test"

[[file_sync]]
host = "~/.gitconfig"
guest = "/root/.gitconfig"
mode = 0o644

[[file_sync]]
host = "/etc/resolv.conf"
guest = "/etc/resolv.conf"
"#,
    );
    let expected = Spec {
        source_file: PathBuf::from("/work/demo/Bangerfile"),
        project_dir: PathBuf::from("/work/demo"),
        name: "demo-app".into(),
        images: vec![ImageSpec {
            size: Some(ByteSize(4 * ByteSize::GIB)),
            provision: vec![
                ProvisionStep::Run {
                    command: "apt-get update && apt-get install -y make".into(),
                    env: BTreeMap::from([
                        ("DEBIAN_FRONTEND".into(), "noninteractive".into()),
                        ("LANG".into(), "C.UTF-8".into()),
                    ]),
                    timeout: crate::spec::DEFAULT_RUN_TIMEOUT,
                    init: crate::spec::BuilderInit::Agent,
                },
                ProvisionStep::Copy {
                    src: PathBuf::from("scripts/setup.sh"),
                    dest: "/usr/local/bin/setup".into(),
                    mode: Some(0o755),
                },
            ],
            ..image("sandbox", debian_bookworm())
        }],
        sandbox_image: "sandbox".into(),
        vm: VmShape {
            vcpu: 4,
            memory: ByteSize(4 * ByteSize::GIB),
            disk: ByteSize(16 * ByteSize::GIB),
            network: NetworkMode::Tap,
        },
        ports: vec![
            crate::spec::PortForward::parse("127.0.0.1:8080:80/tcp").unwrap(),
            crate::spec::PortForward::parse("0.0.0.0:5353:53/udp").unwrap(),
        ],
        workspace: Some(WorkspaceSpec {
            host: PathBuf::from("src"),
            guest: "/root/src".into(),
        }),
        up: Some(UpCommand {
            run: "make test".into(),
        }),
        file_sync: vec![
            FileSyncSpec {
                host: "~/.gitconfig".into(),
                guest: "/root/.gitconfig".into(),
                mode: Some(0o644),
            },
            FileSyncSpec {
                host: "/etc/resolv.conf".into(),
                guest: "/etc/resolv.conf".into(),
                mode: None,
            },
        ],
    };
    assert_eq!(spec, expected);
}

#[test]
fn every_form_of_from_resolves() {
    let spec = spec(
        r#"
[images.named-catalog]
from = "debian-bookworm"
[images.named-oci]
from = "docker.io/library/alpine:3.20"
[images.bare-oci]
from = "alpine"
[images.oci]
from = { oci = "alpine:3.20" }
[images.catalog]
from = { catalog = "debian-bookworm" }
[images.recipe]
from = { recipe = "debian", suite = "bookworm", packages = ["make", "git", "make", "curl"] }
[images.header-table.from]
oci = "ghcr.io/org/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
[images.default]
"#,
    );
    let sources: Vec<(&str, &ImageSource)> = spec
        .images
        .iter()
        .map(|image| (image.name.as_str(), &image.from))
        .collect();
    let oci = |reference: &str| ImageSource::Oci {
        reference: reference.into(),
    };
    assert_eq!(
        sources,
        vec![
            ("sandbox", &debian_bookworm()),
            ("named-catalog", &debian_bookworm()),
            ("named-oci", &oci("docker.io/library/alpine:3.20")),
            ("bare-oci", &oci("alpine")),
            ("oci", &oci("alpine:3.20")),
            ("catalog", &debian_bookworm()),
            (
                "recipe",
                &ImageSource::Recipe(RecipeSpec {
                    distro: "debian".into(),
                    suite: "bookworm".into(),
                    packages: vec!["curl".into(), "git".into(), "make".into()],
                })
            ),
            (
                "header-table",
                &oci(
                    "ghcr.io/org/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                )
            ),
            ("default", &debian_bookworm()),
        ]
    );
    // Non-catalog sources boot the first catalog kernel.
    assert!(spec.images.iter().all(|image| image.kernel == KERNEL));
}

#[test]
fn images_come_out_dependencies_first_then_as_written() {
    let spec = spec(
        r#"
[image]
from = { image = "tools" }

[images.unrelated]
from = { oci = "alpine:3.20" }

[images.tools]
from = { image = "base" }
[[images.tools.provision]]
run = "apt-get install -y make"

[images.base]
from = { oci = "debian:bookworm" }
kernel = { local = "my-kernel" }
"#,
    );
    assert_eq!(
        image_names(&spec),
        ["base", "tools", "sandbox", "unrelated"]
    );
    // An image built from another boots its parent's kernel unless it says otherwise.
    let kernels: Vec<&str> = spec.images.iter().map(|i| i.kernel.as_str()).collect();
    assert_eq!(kernels, ["my-kernel", "my-kernel", "my-kernel", KERNEL]);
    assert_eq!(
        spec.image("sandbox").map(|image| &image.from),
        Some(&ImageSource::Image {
            name: "tools".into()
        })
    );
}

#[test]
fn provision_entries_can_be_an_inline_array() {
    let spec = spec(
        r#"
[image]
provision = [
    { run = "true" },
    { copy = "Makefile", to = "/root/Makefile" },
]
"#,
    );
    assert_eq!(
        spec.images[0].provision,
        [
            ProvisionStep::Run {
                command: "true".into(),
                env: BTreeMap::new(),
                timeout: crate::spec::DEFAULT_RUN_TIMEOUT,
                init: crate::spec::BuilderInit::Agent,
            },
            ProvisionStep::Copy {
                src: "Makefile".into(),
                dest: "/root/Makefile".into(),
                mode: None
            },
        ]
    );
}

#[test]
fn an_empty_workspace_table_imports_the_project() {
    assert_eq!(
        spec("[workspace]").workspace,
        Some(WorkspaceSpec {
            host: PathBuf::from("."),
            guest: DEFAULT_WORKSPACE_GUEST.into(),
        })
    );
}

#[test]
fn the_project_name_defaults_to_a_dns_safe_directory_name() {
    let spec = parse_in("/home/me/My Project (v2)", "", Defaults::default()).unwrap();
    assert_eq!(spec.name, "my-project-v2");
}

#[test]
fn configured_defaults_fill_what_the_bangerfile_leaves_out() {
    let defaults = Defaults {
        vm: VmShape {
            vcpu: 8,
            memory: ByteSize(ByteSize::GIB),
            disk: ByteSize(20 * ByteSize::GIB),
            network: NetworkMode::None,
        },
        image: "alpine:3.20".into(),
    };
    let spec = parse_in(PROJECT, "[vm]\nvcpu = 1\n[images.b]\n", defaults).unwrap();
    assert_eq!(
        spec.vm,
        VmShape {
            vcpu: 1,
            memory: ByteSize(ByteSize::GIB),
            disk: ByteSize(20 * ByteSize::GIB),
            network: NetworkMode::None,
        }
    );
    for image in &spec.images {
        assert_eq!(
            image.from,
            ImageSource::Oci {
                reference: "alpine:3.20".into()
            }
        );
    }
}

#[test]
fn sizes_and_modes_accept_both_spellings() {
    let spec = spec(
        r#"
[image]
size = 1073741824
[[image.provision]]
copy = "scripts"
to = "/opt/scripts"
mode = 0o4755
[vm]
memory = "1536MiB"
disk = "1T"
"#,
    );
    assert_eq!(spec.images[0].size, Some(ByteSize(ByteSize::GIB)));
    assert_eq!(
        spec.images[0].provision[0],
        ProvisionStep::Copy {
            src: "scripts".into(),
            dest: "/opt/scripts".into(),
            mode: Some(0o4755)
        }
    );
    assert_eq!(spec.vm.memory, ByteSize(1536 * ByteSize::MIB));
    assert_eq!(spec.vm.disk, ByteSize(1024 * ByteSize::GIB));
}

#[test]
fn the_image_size_alignment_matches_the_block_size_lowering_writes() {
    assert_eq!(
        validate::IMAGE_SIZE_ALIGN,
        crate::plan::lower::EXT4_BLOCK_SIZE
    );
}

// ----- diagnostics -----

#[test]
fn an_unknown_key_names_the_expected_ones() {
    insta::assert_snapshot!(errors("[vm]\nvcpus = 4\n"), @r"
        error: unknown key `vcpus`, expected one of `vcpu`, `memory`, `disk`, `network`, `ports`
         --> Bangerfile:2:1 (vm.vcpus)
          |
        2 | vcpus = 4
          | ^^^^^
          = help: did you mean `vcpu`?

        error: could not read Bangerfile: 1 error
        ");
}

#[test]
fn every_error_in_the_file_is_reported_in_one_run() {
    let text = r#"
[vm]
vcpus = 4
memory = "1G"

[[image.provision]]
run = "make"

[[image.provision]]
run = ["make"]

[workspace]
guest = "root/project"
"#;
    insta::assert_snapshot!(errors(text), @r#"
        error: unknown key `vcpus`, expected one of `vcpu`, `memory`, `disk`, `network`, `ports`
         --> Bangerfile:3:1 (vm.vcpus)
          |
        3 | vcpus = 4
          | ^^^^^
          = help: did you mean `vcpu`?

        error: expected a string, found an array
          --> Bangerfile:10:7 (image.provision[1].run)
           |
        10 | run = ["make"]
           |       ^^^^^^^^

        error: guest path `root/project` is relative; guest paths are absolute, like `/root/project`
          --> Bangerfile:13:9 (workspace.guest)
           |
        13 | guest = "root/project"
           |         ^^^^^^^^^^^^^^

        error: could not read Bangerfile: 3 errors
        "#);
    let found: Vec<(String, usize, usize)> = diagnostics(text)
        .into_iter()
        .map(|d| (d.key_path, d.line, d.column))
        .collect();
    assert_eq!(
        found,
        [
            ("vm.vcpus".to_owned(), 3, 1),
            ("image.provision[1].run".to_owned(), 10, 7),
            ("workspace.guest".to_owned(), 13, 9),
        ]
    );
}

#[test]
fn bad_published_ports_are_reported_at_their_entry() {
    insta::assert_snapshot!(errors(r#"
[vm]
ports = ["8080:80", "80", "0.0.0.0:8080:81", "1:2/sctp"]
"#), @r#"
    error: `80`: expected [HOST_IP:]HOST_PORT:GUEST_PORT[/udp], e.g. `8080:80` or `0.0.0.0:5353:53/udp`
     --> Bangerfile:3:21 (vm.ports[1])
      |
    3 | ports = ["8080:80", "80", "0.0.0.0:8080:81", "1:2/sctp"]
      |                     ^^^^

    error: `0.0.0.0:8080:81/tcp` publishes host port 8080/tcp again (`127.0.0.1:8080:80/tcp` has it)
     --> Bangerfile:3:27 (vm.ports[2])
      |
    3 | ports = ["8080:80", "80", "0.0.0.0:8080:81", "1:2/sctp"]
      |                           ^^^^^^^^^^^^^^^^^

    error: `1:2/sctp`: unknown protocol `sctp` (use `tcp` or `udp`)
     --> Bangerfile:3:46 (vm.ports[3])
      |
    3 | ports = ["8080:80", "80", "0.0.0.0:8080:81", "1:2/sctp"]
      |                                              ^^^^^^^^^^

    error: could not read Bangerfile: 3 errors
    "#);
}

#[test]
fn several_errors_in_one_table_are_all_reported() {
    insta::assert_snapshot!(errors(r#"
[vm]
vcpus = 4
memory = 2048
disk = "0G"
network = "usr"

[image]
from = { oci = 1, tag = "x" }
"#), @r#"
        error: unknown key `vcpus`, expected one of `vcpu`, `memory`, `disk`, `network`, `ports`
         --> Bangerfile:3:1 (vm.vcpus)
          |
        3 | vcpus = 4
          | ^^^^^
          = help: did you mean `vcpu`?

        error: memory 2K is too small; the minimum is 128M
         --> Bangerfile:4:10 (vm.memory)
          |
        4 | memory = 2048
          |          ^^^^
          = help: a plain integer is a number of bytes; write "2048M" for 2048 MiB

        error: size is zero; sizes are greater than zero
         --> Bangerfile:5:8 (vm.disk)
          |
        5 | disk = "0G"
          |        ^^^^

        error: unknown network mode `usr`, expected one of `user`, `tap`, `none`
         --> Bangerfile:6:11 (vm.network)
          |
        6 | network = "usr"
          |           ^^^^^
          = help: did you mean `user`?

        error: expected a string, found integer `1`
         --> Bangerfile:9:16 (image.from.oci)
          |
        9 | from = { oci = 1, tag = "x" }
          |                ^

        error: unknown key `tag`, expected one of `oci`, `catalog`, `image`, `recipe`, `suite`, `packages`
         --> Bangerfile:9:19 (image.from.tag)
          |
        9 | from = { oci = 1, tag = "x" }
          |                   ^^^

        error: could not read Bangerfile: 6 errors
        "#);
}

#[test]
fn a_toml_syntax_error_is_located() {
    insta::assert_snapshot!(errors("[vm]\nvcpu = 2\nmemory = \"2G\n"), @r#"
        error: invalid TOML: invalid basic string, expected `"`
         --> Bangerfile:3:13 (vm.memory)
          |
        3 | memory = "2G
          |             ^

        error: could not read Bangerfile: 1 error
        "#);
    insta::assert_snapshot!(errors("[vm\nvcpu = 2\n"), @r"
        error: invalid TOML: unclosed table, expected `]`
         --> Bangerfile:1:4
          |
        1 | [vm
          |    ^

        error: could not read Bangerfile: 1 error
        ");
    insta::assert_snapshot!(errors("[vm]\n[vm]\n"), @r"
        error: invalid TOML: duplicate key `vm`
         --> Bangerfile:2:2 (vm)
          |
        2 | [vm]
          |  ^^

        error: could not read Bangerfile: 1 error
        ");
    insta::assert_snapshot!(errors("[vm]\nvcpu = 2\nvcpu = 3\n"), @r"
        error: invalid TOML: duplicate key `vcpu`
         --> Bangerfile:3:1 (vm.vcpu)
          |
        3 | vcpu = 3
          | ^^^^
          = help: `vm.vcpu` is first defined on line 2

        error: could not read Bangerfile: 1 error
        ");
}

#[test]
fn an_image_cycle_is_one_error_naming_the_whole_cycle() {
    insta::assert_snapshot!(errors(r#"
[image]
from = { image = "a" }

[images.a]
from = { image = "c" }

[images.b]
from = { image = "a" }

[images.c]
from = { image = "b" }

[images.self]
from = { image = "self" }
"#), @r#"
        error: image cycle: a -> c -> b -> a
         --> Bangerfile:6:8 (images.a.from)
          |
        6 | from = { image = "c" }
          |        ^^^^^^^^^^^^^^^

        error: image cycle: self -> self
          --> Bangerfile:15:8 (images.self.from)
           |
        15 | from = { image = "self" }
           |        ^^^^^^^^^^^^^^^^^^

        error: could not read Bangerfile: 2 errors
        "#);
}

#[test]
fn references_to_images_and_catalogs_suggest_close_names() {
    insta::assert_snapshot!(errors(r#"
[image]
from = { image = "bsae" }

[images.base]
from = { catalog = "debian-bookwrom" }

[images.typo]
from = "debian-bookwrom"

[images.other]
from = { image = "nothing-like-it" }
"#), @r#"
        error: image `bsae` is not defined
         --> Bangerfile:3:18 (image.from.image)
          |
        3 | from = { image = "bsae" }
          |                  ^^^^^^
          = help: images are `base`, `other`, `sandbox`, `typo`; define more under `[images.NAME]`

        error: the image catalog has no image `debian-bookwrom`; it has `debian-bookworm`
         --> Bangerfile:6:20 (images.base.from.catalog)
          |
        6 | from = { catalog = "debian-bookwrom" }
          |                    ^^^^^^^^^^^^^^^^^
          = help: did you mean `debian-bookworm`?

        error: `debian-bookwrom` is not in the image catalog
         --> Bangerfile:9:8 (images.typo.from)
          |
        9 | from = "debian-bookwrom"
          |        ^^^^^^^^^^^^^^^^^
          = help: did you mean `debian-bookworm`? For the registry image of that name, write `from = { oci = "debian-bookwrom" }`

        error: image `nothing-like-it` is not defined
          --> Bangerfile:12:18 (images.other.from.image)
           |
        12 | from = { image = "nothing-like-it" }
           |                  ^^^^^^^^^^^^^^^^^
           = help: images are `base`, `other`, `sandbox`, `typo`; define more under `[images.NAME]`

        error: could not read Bangerfile: 4 errors
        "#);
}

#[test]
fn from_tables_take_exactly_one_source() {
    insta::assert_snapshot!(errors(r#"
[images.none]
from = {}

[images.two]
from = { oci = "alpine", image = "none" }

[images.suite]
from = { oci = "alpine", suite = "bookworm" }

[images.recipe]
from = { recipe = "ubuntu", packages = ["Make"] }

[images.bad-oci]
from = { oci = "Alpine:3.20" }

[images.sized]
from = { image = "bad-oci" }
size = "2G"
"#), @r#"
        error: `from` needs one of `oci`, `catalog`, `image` or `recipe`
         --> Bangerfile:3:8 (images.none.from)
          |
        3 | from = {}
          |        ^^
          = help: for example `from = { oci = "alpine:3.20" }`

        error: `from` takes one of `oci`, `catalog`, `image` or `recipe`, but has both `oci` and `image`
         --> Bangerfile:6:34 (images.two.from.image)
          |
        6 | from = { oci = "alpine", image = "none" }
          |                                  ^^^^^^

        error: `suite` only applies to `recipe` images
         --> Bangerfile:9:34 (images.suite.from.suite)
          |
        9 | from = { oci = "alpine", suite = "bookworm" }
          |                                  ^^^^^^^^^^

        error: unknown recipe distribution `ubuntu`; banger can build `debian`
          --> Bangerfile:12:19 (images.recipe.from.recipe)
           |
        12 | from = { recipe = "ubuntu", packages = ["Make"] }
           |                   ^^^^^^^^

        error: a `recipe` image needs `suite`, the release to build
          --> Bangerfile:12:19 (images.recipe.from)
           |
        12 | from = { recipe = "ubuntu", packages = ["Make"] }
           |                   ^^^^^^^^
           = help: for example `from = { recipe = "debian", suite = "bookworm" }`

        error: `Make` is not a Debian package name (lowercase letters, digits, `+`, `-`, `.`; optionally `:arch` and `=version`)
          --> Bangerfile:12:41 (images.recipe.from.packages[0])
           |
        12 | from = { recipe = "ubuntu", packages = ["Make"] }
           |                                         ^^^^^^

        error: `Alpine:3.20` is not a valid OCI reference: repository names are lowercase
          --> Bangerfile:15:16 (images.bad-oci.from.oci)
           |
        15 | from = { oci = "Alpine:3.20" }
           |                ^^^^^^^^^^^^^

        error: `size` does not apply to an image built from another image
          --> Bangerfile:19:8 (images.sized.size)
           |
        19 | size = "2G"
           |        ^^^^
           = help: provisioning continues on the file system of `bad-oci`; set `size` there

        error: could not read Bangerfile: 8 errors
        "#);
}

#[test]
fn image_names_are_identifiers_and_sandbox_is_reserved() {
    insta::assert_snapshot!(errors(r#"
[images.sandbox]
[images."two words"]
"#), @r#"
        error: the image name `sandbox` is reserved for the `[image]` table
         --> Bangerfile:2:9 (images.sandbox)
          |
        2 | [images.sandbox]
          |         ^^^^^^^
          = help: define the image `banger up` boots under `[image]`, or pick another name

        error: `two words` is not a valid image name: use up to 63 letters, digits, `-` and `_`, starting with a letter
         --> Bangerfile:3:9 (images."two words")
          |
        3 | [images."two words"]
          |         ^^^^^^^^^^^

        error: could not read Bangerfile: 2 errors
        "#);
}

#[test]
fn kernels_must_be_in_the_catalog_or_marked_local() {
    insta::assert_snapshot!(errors(r#"
[images.a]
kernel = "debian-cloud-amd46"
[images.b]
kernel = "my-kernel"
[images.c]
kernel = { local = "debian-cloud-amd64" }
"#), @r#"
        error: the kernel catalog has no kernel `debian-cloud-amd46`; it has `debian-cloud-amd64`
         --> Bangerfile:3:10 (images.a.kernel)
          |
        3 | kernel = "debian-cloud-amd46"
          |          ^^^^^^^^^^^^^^^^^^^^
          = help: did you mean `debian-cloud-amd64`?

        error: the kernel catalog has no kernel `my-kernel`; it has `debian-cloud-amd64`
         --> Bangerfile:5:10 (images.b.kernel)
          |
        5 | kernel = "my-kernel"
          |          ^^^^^^^^^^^
          = help: for a kernel added with `banger kernel import`, write `kernel = { local = "my-kernel" }`

        error: `debian-cloud-amd64` is a catalog kernel, and the catalog entry would be used
         --> Bangerfile:7:20 (images.c.kernel.local)
          |
        7 | kernel = { local = "debian-cloud-amd64" }
          |                    ^^^^^^^^^^^^^^^^^^^^
          = help: write `kernel = "debian-cloud-amd64"`, or import the local kernel under another name

        error: could not read Bangerfile: 3 errors
        "#);
}

#[test]
fn run_entries_take_a_timeout_and_an_init() {
    insta::assert_snapshot!(errors(r#"
[[image.provision]]
run = "make"
timeout = "soon"
init = "openrc"

[[image.provision]]
copy = "Makefile"
to = "/root/Makefile"
timeout = "1h"
init = "systemd"
"#), @r#"
        error: `soon` is not a duration like "90s", "30m" or "2h"
         --> Bangerfile:4:11 (image.provision[0].timeout)
          |
        4 | timeout = "soon"
          |           ^^^^^^

        error: unknown init `openrc`
         --> Bangerfile:5:8 (image.provision[0].init)
          |
        5 | init = "openrc"
          |        ^^^^^^^^
          = help: use `agent` (the default, fastest) or `systemd`

        error: `timeout` only applies to `run` entries
          --> Bangerfile:10:11 (image.provision[1].timeout)
           |
        10 | timeout = "1h"
           |           ^^^^

        error: `init` only applies to `run` entries
          --> Bangerfile:11:8 (image.provision[1].init)
           |
        11 | init = "systemd"
           |        ^^^^^^^^^

        error: could not read Bangerfile: 4 errors
        "#);
}

#[test]
fn provision_entries_are_checked_as_a_whole() {
    insta::assert_snapshot!(errors(r#"
[[image.provision]]
run = "make"
copy = "Makefile"

[[image.provision]]
env = { A = "1" }

[[image.provision]]
run = "  "
to = "/x"
mode = "0644"

[[image.provision]]
copy = "Makefile"
env = { A = "1" }

[[image.provision]]
rnu = "make"
"#), @r#"
        error: a provision entry has `run` or `copy`, not both
         --> Bangerfile:4:8 (image.provision[0].copy)
          |
        4 | copy = "Makefile"
          |        ^^^^^^^^^^
          = help: split it into two `[[image.provision]]` entries

        error: a provision entry needs `run` (a shell command) or `copy` (a project file)
         --> Bangerfile:6:1 (image.provision[1])
          |
        6 | [[image.provision]]
          | ^^^^^^^^^^^^^^^^^^^

        error: `run` is empty
          --> Bangerfile:10:7 (image.provision[2].run)
           |
        10 | run = "  "
           |       ^^^^

        error: `to` only applies to `copy` entries
          --> Bangerfile:11:6 (image.provision[2].to)
           |
        11 | to = "/x"
           |      ^^^^

        error: `mode` only applies to `copy` entries
          --> Bangerfile:12:8 (image.provision[2].mode)
           |
        12 | mode = "0644"
           |        ^^^^^^

        error: a `copy` entry needs `to`, the absolute guest path to copy to
          --> Bangerfile:14:1 (image.provision[3])
           |
        14 | [[image.provision]]
           | ^^^^^^^^^^^^^^^^^^^

        error: `env` only applies to `run` entries
          --> Bangerfile:16:7 (image.provision[3].env)
           |
        16 | env = { A = "1" }
           |       ^^^^^^^^^^^

        error: unknown key `rnu`, expected one of `run`, `env`, `timeout`, `init`, `copy`, `to`, `mode`
          --> Bangerfile:19:1 (image.provision[4].rnu)
           |
        19 | rnu = "make"
           | ^^^

        error: could not read Bangerfile: 8 errors
        "#);
}

#[test]
fn copy_sources_must_exist_inside_the_project() {
    insta::assert_snapshot!(errors(r#"
[[image.provision]]
copy = "scripts/missing.sh"
to = "/x"
[[image.provision]]
copy = "../outside"
to = "/x"
[[image.provision]]
copy = "/etc/passwd"
to = "/x"
[[image.provision]]
copy = "escape"
to = "/x"
[workspace]
host = "Makefile"
"#), @r#"
        error: `scripts/missing.sh` does not exist in the project directory `/work/demo`
         --> Bangerfile:3:8 (image.provision[0].copy)
          |
        3 | copy = "scripts/missing.sh"
          |        ^^^^^^^^^^^^^^^^^^^^

        error: `../outside` leaves the project directory
         --> Bangerfile:6:8 (image.provision[1].copy)
          |
        6 | copy = "../outside"
          |        ^^^^^^^^^^^^

        error: `/etc/passwd` is absolute; project paths are relative to the Bangerfile's directory
         --> Bangerfile:9:8 (image.provision[2].copy)
          |
        9 | copy = "/etc/passwd"
          |        ^^^^^^^^^^^^^

        error: `escape` resolves, through a symbolic link, to a path outside the project directory
          --> Bangerfile:12:8 (image.provision[3].copy)
           |
        12 | copy = "escape"
           |        ^^^^^^^^

        error: `Makefile` is a file; a directory is expected here
          --> Bangerfile:15:8 (workspace.host)
           |
        15 | host = "Makefile"
           |        ^^^^^^^^^^

        error: could not read Bangerfile: 5 errors
        "#);
}

#[test]
fn guest_paths_and_modes_are_checked() {
    insta::assert_snapshot!(errors(r#"
[[image.provision]]
copy = "Makefile"
to = "/root/../Makefile"
mode = 644
[[image.provision]]
copy = "Makefile"
to = "/proc/x"
mode = "0999"
[workspace]
guest = "/"
[[file_sync]]
host = "~/.gitconfig"
guest = "/root/.gitconfig/"
mode = "17777"
"#), @r#"
        error: guest path `/root/../Makefile` is not normalized; write `/Makefile`
         --> Bangerfile:4:6 (image.provision[0].to)
          |
        4 | to = "/root/../Makefile"
          |      ^^^^^^^^^^^^^^^^^^^

        error: mode `644` is a decimal number; write it in octal, as `0o644` or "644"
         --> Bangerfile:5:8 (image.provision[0].mode)
          |
        5 | mode = 644
          |        ^^^

        error: guest path `/proc/x` is inside `/proc`, a virtual file system in the guest
         --> Bangerfile:8:6 (image.provision[1].to)
          |
        8 | to = "/proc/x"
          |      ^^^^^^^^^

        error: mode "0999" is not an octal number like "0644" or "0755"
         --> Bangerfile:9:8 (image.provision[1].mode)
          |
        9 | mode = "0999"
          |        ^^^^^^

        error: guest path `/` is the guest's root; name a file or directory below it
          --> Bangerfile:11:9 (workspace.guest)
           |
        11 | guest = "/"
           |         ^^^

        error: guest path `/root/.gitconfig/` is not normalized; write `/root/.gitconfig`
          --> Bangerfile:14:9 (file_sync[0].guest)
           |
        14 | guest = "/root/.gitconfig/"
           |         ^^^^^^^^^^^^^^^^^^^

        error: mode "17777" is larger than 0o7777
          --> Bangerfile:15:8 (file_sync[0].mode)
           |
        15 | mode = "17777"
           |        ^^^^^^^

        error: could not read Bangerfile: 7 errors
        "#);
}

#[test]
fn vm_values_are_range_checked() {
    insta::assert_snapshot!(errors(r#"
[vm]
vcpu = 0
memory = "1000000"
disk = "1.5G"
"#), @r#"
        error: `vcpu` must be between 1 and 64, found 0
         --> Bangerfile:3:8 (vm.vcpu)
          |
        3 | vcpu = 0
          |        ^

        error: memory 1000000 is too small; the minimum is 128M
         --> Bangerfile:4:10 (vm.memory)
          |
        4 | memory = "1000000"
          |          ^^^^^^^^^

        error: `1.5G` is not a whole number; use a smaller unit, as in `1536M` for 1.5G
         --> Bangerfile:5:8 (vm.disk)
          |
        5 | disk = "1.5G"
          |        ^^^^^^

        error: could not read Bangerfile: 3 errors
        "#);
    insta::assert_snapshot!(errors("[vm]\nvcpu = 65\nmemory = \"64M\"\n"), @r#"
        error: `vcpu` must be between 1 and 64, found 65
         --> Bangerfile:2:8 (vm.vcpu)
          |
        2 | vcpu = 65
          |        ^^

        error: memory 64M is too small; the minimum is 128M
         --> Bangerfile:3:10 (vm.memory)
          |
        3 | memory = "64M"
          |          ^^^^^

        error: could not read Bangerfile: 2 errors
        "#);
}

#[test]
fn sections_of_the_wrong_shape_say_how_to_write_them() {
    insta::assert_snapshot!(errors(r#"
project = "demo"
images = ["a"]

[[vm]]
vcpu = 2

[file_sync]
host = "~/.x"

[image]
provision = "make"

[unknown]
"#), @r#"
        error: `project` must be a table like `[project]`, found a string
         --> Bangerfile:2:11 (project)
          |
        2 | project = "demo"
          |           ^^^^^^

        error: `images` must be a table of named images, found an array
         --> Bangerfile:3:10 (images)
          |
        3 | images = ["a"]
          |          ^^^^^
          = help: write `[images.NAME]` for each image

        error: `vm` must be a table like `[vm]`, found an array
         --> Bangerfile:5:1 (vm)
          |
        5 | [[vm]]
          | ^^^^^^

        error: `file_sync` must be an array of tables, found a table
         --> Bangerfile:8:1 (file_sync)
          |
        8 | [file_sync]
          | ^^^^^^^^^^^
          = help: write `[[file_sync]]` before each entry

        error: `image.provision` must be an array of tables, found a string
          --> Bangerfile:12:13 (image.provision)
           |
        12 | provision = "make"
           |             ^^^^^^
           = help: write `[[image.provision]]` before each entry

        error: unknown key `unknown`, expected one of `project`, `image`, `images`, `vm`, `workspace`, `up`, `file_sync`
          --> Bangerfile:14:2 (unknown)
           |
        14 | [unknown]
           |  ^^^^^^^

        error: could not read Bangerfile: 6 errors
        "#);
}

#[test]
fn file_sync_entries_are_checked() {
    insta::assert_snapshot!(errors(r#"
[[file_sync]]
host = ".gitconfig"
guest = "/root/.gitconfig"

[[file_sync]]
host = "~other/.x"
guest = "/root/.gitconfig"

[[file_sync]]
mode = "0600"

[up]
"#), @r#"
        error: host path `.gitconfig` is relative; file sync host paths are absolute or start with `~/`
         --> Bangerfile:3:8 (file_sync[0].host)
          |
        3 | host = ".gitconfig"
          |        ^^^^^^^^^^^^
          = help: project files belong in an `[[image.provision]]` `copy` or in `[workspace]`

        error: `~other/.x`: only `~/` (your own home) is expanded
         --> Bangerfile:7:8 (file_sync[1].host)
          |
        7 | host = "~other/.x"
          |        ^^^^^^^^^^^

        error: `/root/.gitconfig` is already the guest path of `file_sync[0]`
         --> Bangerfile:8:9 (file_sync[1].guest)
          |
        8 | guest = "/root/.gitconfig"
          |         ^^^^^^^^^^^^^^^^^^

        error: missing `host`, the host file to copy (absolute or `~/...`)
          --> Bangerfile:10:1 (file_sync[2])
           |
        10 | [[file_sync]]
           | ^^^^^^^^^^^^^

        error: missing `guest`, the absolute guest path to copy to
          --> Bangerfile:10:1 (file_sync[2])
           |
        10 | [[file_sync]]
           | ^^^^^^^^^^^^^

        error: `[up]` needs `run`, the command `banger up` runs in the sandbox
          --> Bangerfile:13:1 (up)
           |
        13 | [up]
           | ^^^^

        error: could not read Bangerfile: 6 errors
        "#);
}

#[test]
fn project_names_are_dns_labels() {
    insta::assert_snapshot!(errors("[project]\nname = \"My App\"\n"), @r#"
        error: `My App` is not a valid project name: use up to 63 lowercase letters, digits and `-`, not starting or ending with `-`
         --> Bangerfile:2:8 (project.name)
          |
        2 | name = "My App"
          |        ^^^^^^^^

        error: could not read Bangerfile: 1 error
        "#);
    let report = match parse_in("/", "", Defaults::default()) {
        Err(error) => error.to_string(),
        Ok(spec) => panic!("{spec:?}"),
    };
    insta::assert_snapshot!(report, @r"
        error: cannot derive a project name from the directory `/`
         --> Bangerfile:1:1 (project.name)
          |
        1 |
          | ^
          = help: set `name` in `[project]`

        error: could not read Bangerfile: 1 error
        ");
}

#[test]
fn env_names_are_checked() {
    insta::assert_snapshot!(errors(r#"
[[image.provision]]
run = "make"
env = { "1X" = "a", "MY VAR" = "b", OK = 3 }
"#), @r#"
        error: `1X` is not a valid environment variable name: use letters, digits and `_`, not starting with a digit
         --> Bangerfile:4:9 (image.provision[0].env.1X)
          |
        4 | env = { "1X" = "a", "MY VAR" = "b", OK = 3 }
          |         ^^^^

        error: `MY VAR` is not a valid environment variable name: use letters, digits and `_`, not starting with a digit
         --> Bangerfile:4:21 (image.provision[0].env."MY VAR")
          |
        4 | env = { "1X" = "a", "MY VAR" = "b", OK = 3 }
          |                     ^^^^^^^^

        error: expected a string, found integer `3`
         --> Bangerfile:4:42 (image.provision[0].env.OK)
          |
        4 | env = { "1X" = "a", "MY VAR" = "b", OK = 3 }
          |                                          ^

        error: could not read Bangerfile: 3 errors
        "#);
}

#[test]
fn diagnostics_can_be_inspected_without_rendering() {
    let found = diagnostics("\n[vm]\nvcpus = 4\n");
    assert_eq!(
        found,
        [Diagnostic {
            file: PathBuf::from("Bangerfile"),
            key_path: "vm.vcpus".into(),
            line: 3,
            column: 1,
            message:
                "unknown key `vcpus`, expected one of `vcpu`, `memory`, `disk`, `network`, `ports`"
                    .into(),
            help: Some("did you mean `vcpu`?".into()),
            snippet: Snippet {
                line_text: "vcpus = 4".into(),
                start: 0,
                len: 5,
            },
        }]
    );
}

// ----- load -----

#[test]
fn a_missing_bangerfile_names_its_path() {
    let catalogs = Catalogs::embedded();
    let path = Path::new("/nonexistent/banger-test/Bangerfile");
    let error = load(path, &ParseContext::new(&catalogs)).unwrap_err();
    assert!(matches!(error, BangerfileError::Read { .. }));
    assert_eq!(
        crate::error::error_chain(&error),
        "cannot read Bangerfile /nonexistent/banger-test/Bangerfile: No such file or directory (os error 2)"
    );
}

#[test]
fn the_example_bangerfile_parses_and_lowers() {
    let catalogs = Catalogs::embedded();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Bangerfile.example");
    let spec = match load(&path, &ParseContext::new(&catalogs)) {
        Ok(spec) => spec,
        Err(error) => panic!("Bangerfile.example is invalid:\n{error}"),
    };
    let repo = std::fs::canonicalize(env!("CARGO_MANIFEST_DIR")).expect("the repository exists");
    assert_eq!(spec.project_dir, repo);
    assert_eq!(spec.source_file, repo.join("Bangerfile.example"));
    assert_eq!(spec.name, "banger-example");
    assert_eq!(image_names(&spec), ["base", "sandbox"]);
    let plan = crate::plan::lower::lower(&spec, &Lock::default(), &catalogs)
        .expect("the example lowers to a plan");
    for id in [
        "image:base/provision[0]",
        "image:sandbox/provision[1]",
        "vm/boot",
        "vm/file-sync",
        "vm/workspace",
        "vm/up",
    ] {
        assert!(plan.find(id).is_ok(), "the plan has no step {id}");
    }
}

#[test]
fn values_of_the_wrong_type_name_the_expected_type() {
    insta::assert_snapshot!(errors(r#"
[vm]
vcpu = "4"
memory = true

[image]
from = { recipe = "debian", suite = "bookworm", packages = "make" }
size = "100000000"
kernel = 3

[images.x]
from = 3

[images.y]
from = { catalog = 3 }

[images.z]
kernel = {}
"#), @r#"
        error: expected an integer, found string "4"
         --> Bangerfile:3:8 (vm.vcpu)
          |
        3 | vcpu = "4"
          |        ^^^

        error: expected a size like "4G" or a number of bytes, found boolean `true`
         --> Bangerfile:4:10 (vm.memory)
          |
        4 | memory = true
          |          ^^^^

        error: expected an array, found string "make"
         --> Bangerfile:7:60 (image.from.packages)
          |
        7 | from = { recipe = "debian", suite = "bookworm", packages = "make" }
          |                                                            ^^^^^^

        error: image size 100000000 is not a whole number of 4K ext4 blocks
         --> Bangerfile:8:8 (image.size)
          |
        8 | size = "100000000"
          |        ^^^^^^^^^^^

        error: expected a kernel name, or a table like `{ local = "my-kernel" }`, found integer `3`
         --> Bangerfile:9:10 (image.kernel)
          |
        9 | kernel = 3
          |          ^

        error: expected an image name or reference, or a table like `{ oci = "alpine:3.20" }`, found integer `3`
          --> Bangerfile:12:8 (images.x.from)
           |
        12 | from = 3
           |        ^

        error: expected a string, found integer `3`
          --> Bangerfile:15:20 (images.y.from.catalog)
           |
        15 | from = { catalog = 3 }
           |                    ^

        error: `kernel` needs `catalog` or `local`
          --> Bangerfile:18:10 (images.z.kernel)
           |
        18 | kernel = {}
           |          ^^

        error: could not read Bangerfile: 8 errors
        "#);
}

#[test]
fn a_cycle_through_the_sandbox_image_is_named_from_it() {
    insta::assert_snapshot!(errors(r#"
[image]
from = { image = "a" }

[images.a]
from = { image = "sandbox" }
"#), @r#"
        error: image cycle: sandbox -> a -> sandbox
         --> Bangerfile:3:8 (image.from)
          |
        3 | from = { image = "a" }
          |        ^^^^^^^^^^^^^^^

        error: could not read Bangerfile: 1 error
        "#);
}

#[test]
fn parse_names_the_file_as_given() {
    let catalogs = Catalogs::embedded();
    let ctx = ParseContext::new(&catalogs).with_probe(&probe);
    let error = parse("[vm]\nvcpu = 0\n", Path::new("/work/demo/Bangerfile"), &ctx).unwrap_err();
    let BangerfileError::Invalid { file, diagnostics } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(file, Path::new("/work/demo/Bangerfile"));
    assert_eq!(diagnostics[0].file, Path::new("/work/demo/Bangerfile"));
    assert!(
        error
            .to_string()
            .contains(" --> /work/demo/Bangerfile:2:8 (vm.vcpu)"),
        "{error}"
    );
}

#[test]
fn a_directory_is_not_a_bangerfile() {
    let catalogs = Catalogs::embedded();
    let error = load(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        &ParseContext::new(&catalogs),
    )
    .unwrap_err();
    assert!(matches!(error, BangerfileError::Read { .. }), "{error:?}");
}

#[test]
fn the_filesystem_probe_tells_files_from_directories() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(
        probe_filesystem(repo, Path::new("examples/motd.sh")),
        PathStatus::File
    );
    assert_eq!(
        probe_filesystem(repo, Path::new("examples")),
        PathStatus::Directory
    );
    assert_eq!(
        probe_filesystem(repo, Path::new("no-such-file")),
        PathStatus::Missing
    );
}
