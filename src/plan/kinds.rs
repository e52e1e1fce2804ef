//! Typed parameters of step kinds: one struct per kind, written into a step's [`Params`] by
//! lowering and read back by the executor through the same code, so names and defaults
//! cannot drift between the two. Pure: no I/O.
//!
//! Kinds still read by name (the fetch, kernel and bundle steps) move here as they change.

use std::collections::BTreeMap;

use crate::key::{ParamValue, Params};
use crate::spec::{BuilderInit, ByteSize};

/// A parameter was missing or of the wrong type: a plan and its executor disagree, which is
/// a bug in banger, or a record written by another version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step parameter `{name}`: {problem}")]
pub struct ParamError {
    pub name: &'static str,
    pub problem: &'static str,
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
/// [`crate::rootfs::identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootfsBuildParams {
    pub size: RootfsSize,
}

impl RootfsBuildParams {
    pub fn to_params(&self) -> Params {
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

    pub fn from_params(params: &Params) -> Result<RootfsBuildParams, ParamError> {
        let size = match params.get_int("size") {
            Some(bytes) => RootfsSize::Fixed(bytes),
            None => RootfsSize::Auto {
                headroom_percent: params
                    .get_int("headroom_percent")
                    .and_then(|percent| u32::try_from(percent).ok())
                    .ok_or_else(|| missing("headroom_percent"))?,
                min_bytes: params
                    .get_int("min_size")
                    .ok_or_else(|| missing("min_size"))?,
            },
        };
        Ok(RootfsBuildParams { size })
    }
}

/// `provision.run`: a command run in a builder VM on the `rootfs` input, booted with the
/// `kernel` input; the output is the diff it made, as a layer (`layer.tar`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionRunParams {
    pub command: String,
    pub env: BTreeMap<String, String>,
    pub init: BuilderInit,
    /// Later modification times in the diff are clamped to this (`SOURCE_DATE_EPOCH`), so a
    /// deterministic command gives identical bytes.
    pub source_date_epoch: u64,
}

impl ProvisionRunParams {
    pub fn to_params(&self) -> Params {
        Params::new()
            .with("command", self.command.clone())
            .with("env", ParamValue::Map(self.env.clone()))
            .with("init", self.init.as_str())
            .with("source_date_epoch", self.source_date_epoch)
    }

    pub fn from_params(params: &Params) -> Result<ProvisionRunParams, ParamError> {
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
            source_date_epoch: params
                .get_int("source_date_epoch")
                .ok_or_else(|| missing("source_date_epoch"))?,
        })
    }
}

/// `provision.copy`: a project file or directory as a layer, root-owned at `dest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionCopyParams {
    /// The project path (relative to the project directory) and its content fingerprint.
    pub src: String,
    pub digest: String,
    pub dest: String,
    /// Applied to the copied file or top directory; `None` keeps the host's mode.
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
        let mut params = Params::new()
            .with("src", ParamValue::Source(src.to_owned()))
            .with("dest", dest)
            .with("source_date_epoch", source_date_epoch);
        if let Some(mode) = mode {
            params.insert("mode", format!("{mode:04o}"));
        }
        params
    }

    pub fn from_params(params: &Params) -> Result<ProvisionCopyParams, ParamError> {
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
            source_date_epoch: params
                .get_int("source_date_epoch")
                .ok_or_else(|| missing("source_date_epoch"))?,
        })
    }
}

/// `agent.layer`: banger's guest assets (agent, units, sshd drop-in) as a layer, keyed by
/// their digest, so a new agent re-runs this step and the image builds after it only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLayerParams {
    pub assets: String,
}

impl AgentLayerParams {
    pub fn to_params(&self) -> Params {
        Params::new().with("assets", self.assets.clone())
    }

    pub fn from_params(params: &Params) -> Result<AgentLayerParams, ParamError> {
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

impl BundleWriteParams {
    pub fn to_params(&self) -> Params {
        Params::new()
            .with("name", self.name.clone())
            .with("arch", self.arch.clone())
            .with("kernel_ref", self.kernel_ref.clone())
    }

    pub fn from_params(params: &Params) -> Result<BundleWriteParams, ParamError> {
        Ok(BundleWriteParams {
            name: string(params, "name")?,
            arch: string(params, "arch")?,
            kernel_ref: string(params, "kernel_ref")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_what_lowering_writes() {
        for size in [
            RootfsSize::Fixed(4 << 30),
            RootfsSize::Auto {
                headroom_percent: 10,
                min_bytes: 64 << 20,
            },
        ] {
            let params = RootfsBuildParams { size };
            assert_eq!(
                RootfsBuildParams::from_params(&params.to_params()),
                Ok(params)
            );
        }
        let run = ProvisionRunParams {
            command: "make".into(),
            env: BTreeMap::from([("A".into(), "1".into())]),
            init: BuilderInit::Systemd,
            source_date_epoch: 1_700_000_000,
        };
        assert_eq!(
            ProvisionRunParams::from_params(&run.to_params()),
            Ok(run.clone())
        );
        let bundle = BundleWriteParams {
            name: "demo/sandbox".into(),
            arch: "x86_64".into(),
            kernel_ref: "debian-cloud-amd64".into(),
        };
        assert_eq!(
            BundleWriteParams::from_params(&bundle.to_params()),
            Ok(bundle)
        );
        let agent = AgentLayerParams {
            assets: "blake3:00".into(),
        };
        assert_eq!(AgentLayerParams::from_params(&agent.to_params()), Ok(agent));
        let mut copy = ProvisionCopyParams::unfingerprinted(
            std::path::Path::new("a/b"),
            "/etc/x",
            Some(0o644),
            7,
        );
        copy.insert(
            "src",
            ParamValue::Digest {
                path: "a/b".into(),
                digest: "blake3:11".into(),
            },
        );
        assert_eq!(
            ProvisionCopyParams::from_params(&copy),
            Ok(ProvisionCopyParams {
                src: "a/b".into(),
                digest: "blake3:11".into(),
                dest: "/etc/x".into(),
                mode: Some(0o644),
                source_date_epoch: 7,
            })
        );
    }

    #[test]
    fn a_missing_parameter_is_named() {
        let error =
            ProvisionRunParams::from_params(&Params::new().with("command", "x")).unwrap_err();
        assert_eq!(error.name, "init");
    }
}
