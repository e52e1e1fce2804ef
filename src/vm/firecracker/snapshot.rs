//! Firecracker snapshots: a running VM paused and written to two files (its device and vCPU
//! state, and its guest memory), and a new Firecracker that loads them and carries on where
//! the guest left off, with its own disks and tap.
//!
//! What Firecracker (v1.12) records and what banger does about it:
//! - **Drives** are recorded by their host paths, and `PUT /snapshot/load` opens those very
//!   files, so they must still exist at load. The restored VM then gets its own disks through
//!   `PATCH /drives/{id}` before it is resumed: the load asks for a paused VM, the spec's
//!   drives replace the recorded ones, and only then does the guest run again.
//! - **Taps** are replaced at load (`network_overrides`, one per interface in the spec).
//! - **The vsock socket** comes back at the path it had when saved: Firecracker 1.12 offers
//!   no override. A restore whose spec names another path is refused (checked against
//!   `GET /vm/config` before the guest runs), so two restored VMs cannot share one socket
//!   unnoticed.
//! - **Relative paths** are how many VMs restore one snapshot: a VM booted with
//!   [`FirecrackerSpec::work_dir`] and its drives and vsock socket named relative to it is
//!   recorded with those relative names, and a restore run in another VM's directory opens
//!   that VM's disks and makes its socket there. The saved VM's files need not exist any more
//!   (tested with two restores of one snapshot running at once). Jailed VMs are not
//!   snapshotted yet ([`FirecrackerError::SnapshotJailed`]).
//! - **Memory** is loaded from the file with `mmap(MAP_PRIVATE)`: the file must stay while the
//!   restored VM runs, and is never written by it.
//!
//! The two files are written under temporary names beside their final ones and renamed into
//! place only once Firecracker has answered, the state file last: a state file present means
//! a whole snapshot, and a failed create leaves neither.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::api::encode_segment;
use super::{
    ApiClient, ApiRequest, Drive, FirecrackerError, FirecrackerProcess, FirecrackerSpec, utf8,
};

/// Where a snapshot's two files are (host paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The microVM state: devices, vCPUs, and the configuration the VM was booted with.
    pub state: PathBuf,
    /// The guest's memory, as large as the VM's memory (sparse where the guest never wrote).
    pub memory: PathBuf,
}

/// `PATCH /vm`.
#[derive(Debug, Serialize)]
struct VmStateBody {
    state: &'static str,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Serialize)]
struct SnapshotCreateBody<'a> {
    snapshot_type: &'static str,
    snapshot_path: &'a str,
    mem_file_path: &'a str,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Serialize)]
struct SnapshotLoadBody<'a> {
    snapshot_path: &'a str,
    mem_backend: MemoryBackendBody<'a>,
    resume_vm: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    network_overrides: Vec<NetworkOverrideBody<'a>>,
}

#[derive(Debug, Serialize)]
struct MemoryBackendBody<'a> {
    backend_type: &'static str,
    backend_path: &'a str,
}

#[derive(Debug, Serialize)]
struct NetworkOverrideBody<'a> {
    iface_id: &'a str,
    host_dev_name: &'a str,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Serialize)]
struct DrivePathBody<'a> {
    drive_id: &'a str,
    path_on_host: &'a str,
}

impl ApiRequest {
    /// `PATCH /vm {"state": "Paused"}`: the vCPUs stop; devices stay.
    pub fn pause() -> ApiRequest {
        ApiRequest::patch("/vm", &VmStateBody { state: "Paused" })
    }

    /// `PATCH /vm {"state": "Resumed"}`.
    pub fn resume() -> ApiRequest {
        ApiRequest::patch("/vm", &VmStateBody { state: "Resumed" })
    }

    /// `PUT /snapshot/create`: a full snapshot of a paused VM into `state` and `memory`.
    pub fn create_snapshot(state: &Path, memory: &Path) -> Result<ApiRequest, FirecrackerError> {
        Ok(ApiRequest::put(
            "/snapshot/create",
            &SnapshotCreateBody {
                snapshot_type: "Full",
                snapshot_path: utf8("snapshot state file", state)?,
                mem_file_path: utf8("snapshot memory file", memory)?,
            },
        ))
    }

    /// `PUT /snapshot/load`, left paused, with `spec`'s taps in place of the recorded ones.
    pub fn load_snapshot(
        spec: &FirecrackerSpec,
        files: &SnapshotFiles,
    ) -> Result<ApiRequest, FirecrackerError> {
        Ok(ApiRequest::put(
            "/snapshot/load",
            &SnapshotLoadBody {
                snapshot_path: utf8("snapshot state file", &files.state)?,
                mem_backend: MemoryBackendBody {
                    backend_type: "File",
                    backend_path: utf8("snapshot memory file", &files.memory)?,
                },
                resume_vm: false,
                network_overrides: spec
                    .network_interfaces
                    .iter()
                    .map(|interface| NetworkOverrideBody {
                        iface_id: &interface.id,
                        host_dev_name: &interface.tap,
                    })
                    .collect(),
            },
        ))
    }

    /// `PATCH /drives/{id}`: the drive's backing file becomes `drive.path`.
    pub fn replace_drive(drive: &Drive) -> Result<ApiRequest, FirecrackerError> {
        Ok(ApiRequest::patch(
            format!("/drives/{}", encode_segment(&drive.id)),
            &DrivePathBody {
                drive_id: &drive.id,
                path_on_host: utf8("drive", &drive.path)?,
            },
        ))
    }
}

/// `path` with `.partial-<pid>` appended: where a file is written before it is renamed.
fn partial(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".partial-{}", std::process::id()));
    PathBuf::from(name)
}

impl FirecrackerProcess {
    /// Pauses the guest's vCPUs.
    pub async fn pause(&mut self) -> Result<(), FirecrackerError> {
        self.request(&ApiRequest::pause()).await.map(drop)
    }

    /// Resumes a paused guest.
    pub async fn resume(&mut self) -> Result<(), FirecrackerError> {
        self.request(&ApiRequest::resume()).await.map(drop)
    }

    /// Pauses the VM and writes a full snapshot of it to `files`; the VM stays paused (resume
    /// or stop it). Nothing is left at either path when it fails.
    pub async fn create_snapshot(&mut self, files: &SnapshotFiles) -> Result<(), FirecrackerError> {
        if self.jail_dir.is_some() {
            return Err(FirecrackerError::SnapshotJailed {
                id: self.inside.id.clone(),
            });
        }
        write_snapshot(&self.api, files).await
    }

    /// Starts a Firecracker for `spec` from `files` instead of booting: loads the snapshot
    /// paused, puts `spec`'s drives in place of the recorded ones (the recorded files must
    /// exist, resolved in `spec.work_dir` when relative: Firecracker opens them to load),
    /// checks the vsock socket, and resumes.
    /// `spec`'s machine, kernel and boot arguments are not used: they are the snapshot's. On
    /// failure nothing is left running.
    pub async fn restore(
        spec: &FirecrackerSpec,
        files: &SnapshotFiles,
    ) -> Result<FirecrackerProcess, FirecrackerError> {
        if spec.jailer.is_some() {
            return Err(FirecrackerError::SnapshotJailed {
                id: spec.id.clone(),
            });
        }
        let load = ApiRequest::load_snapshot(spec, files)?;
        let drives = spec
            .drives
            .iter()
            .map(ApiRequest::replace_drive)
            .collect::<Result<Vec<_>, _>>()?;
        let mut process = FirecrackerProcess::spawn(spec).await?;
        let result = async {
            // Only the logger may be configured before a load.
            if let Some(logger) = process
                .inside
                .configuration_requests()?
                .into_iter()
                .find(|request| request.path == "/logger")
            {
                process.request(&logger).await?;
            }
            process.request(&load).await?;
            process.started = true;
            process.check_vsock(spec).await?;
            for drive in &drives {
                process.request(drive).await?;
            }
            process.resume().await
        }
        .await;
        process.kept_if(result).await
    }

    /// The loaded snapshot's vsock socket is where `spec` says the VM's is.
    async fn check_vsock(&self, spec: &FirecrackerSpec) -> Result<(), FirecrackerError> {
        let config = self.api.get_json("/vm/config").await?;
        let recorded = config["vsock"]["uds_path"].as_str().map(PathBuf::from);
        let wanted = spec.vsock.as_ref().map(|vsock| vsock.uds_path.clone());
        if recorded != wanted {
            return Err(FirecrackerError::SnapshotVsockMoved { recorded, wanted });
        }
        Ok(())
    }
}

/// How long writing a snapshot may take: the guest's whole memory goes to a local file
/// (the default request timeout is for answers that need no I/O).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// [`FirecrackerProcess::create_snapshot`] for an unjailed Firecracker known by its API
/// socket only (a VM the daemon launched and detached). The VM stays paused: call
/// [`resume_at`].
///
/// Firecracker resets the guest's vsock connections when it writes a snapshot (a
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, so that no half-sent packet is saved): a connection
/// to the guest made before this call is closed once the guest runs again. Listening
/// sockets in the guest stay.
pub async fn create_snapshot_at(
    api_socket: &Path,
    files: &SnapshotFiles,
) -> Result<(), FirecrackerError> {
    write_snapshot(&ApiClient::new(api_socket), files).await
}

/// Resumes the paused guest of the Firecracker at `api_socket`.
pub async fn resume_at(api_socket: &Path) -> Result<(), FirecrackerError> {
    ApiClient::new(api_socket)
        .send(&ApiRequest::resume())
        .await
        .map(drop)
}

async fn write_snapshot(api: &ApiClient, files: &SnapshotFiles) -> Result<(), FirecrackerError> {
    let (state, memory) = (partial(&files.state), partial(&files.memory));
    let request = ApiRequest::create_snapshot(&state, &memory)?;
    api.send(&ApiRequest::pause()).await?;
    let writer = api.clone().with_timeout(SNAPSHOT_TIMEOUT);
    let written = async {
        writer.send(&request).await?;
        rename(&memory, &files.memory)?;
        rename(&state, &files.state)
    }
    .await;
    if written.is_err() {
        for path in [&state, &memory, &files.memory] {
            let _ = std::fs::remove_file(path);
        }
    }
    written
}

fn rename(from: &Path, to: &Path) -> Result<(), FirecrackerError> {
    std::fs::rename(from, to).map_err(|source| FirecrackerError::Prepare {
        what: "move the snapshot file into place at",
        path: to.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::firecracker::NetworkInterface;

    #[test]
    fn a_load_keeps_the_vm_paused_and_replaces_every_tap() {
        let spec = FirecrackerSpec {
            network_interfaces: vec![NetworkInterface {
                id: "eth0".into(),
                tap: "tap7".into(),
                guest_mac: None,
            }],
            ..crate::vm::firecracker::tests::spec()
        };
        let files = SnapshotFiles {
            state: "/s/vm.state".into(),
            memory: "/s/vm.mem".into(),
        };
        let body = ApiRequest::load_snapshot(&spec, &files)
            .unwrap()
            .body_json()
            .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "snapshot_path": "/s/vm.state",
                "mem_backend": {"backend_type": "File", "backend_path": "/s/vm.mem"},
                "resume_vm": false,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
            })
        );
    }

    #[test]
    fn partial_names_sit_beside_the_final_file() {
        let name = partial(Path::new("/s/vm.state"));
        assert_eq!(name.parent(), Some(Path::new("/s")));
        assert!(name.to_str().unwrap().starts_with("/s/vm.state.partial-"));
    }
}
