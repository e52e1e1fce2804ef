//! banger's bridge network as the daemon runs it for `--network tap` VMs: the bridge, NAT and
//! published ports made when the first tap VM starts and kept in step as VMs come and go, a
//! small pool of ready taps, the `.vm` DNS server on the bridge address, and the teardown
//! when the last tap VM is deleted (or on `banger network down`).
//!
//! The privileged commands are [`crate::privileged::bridge`]'s; the address of each VM is
//! the state database's ([`crate::state::State::allocate_address`]); this module holds what
//! lives only while the daemon does: the idle taps, the DNS server task, the name table.
//!
//! Lifecycle:
//! 1. At daemon start, [`BridgeNetwork::reconcile`]: bridge taps no running VM holds are the
//!    idle pool; if the bridge exists, the DNS server starts again.
//! 2. Before a tap VM boots, [`BridgeNetwork::up`] (bridge, forwarding, ruleset, DNS, resolved
//!    routing) and [`BridgeNetwork::take_tap`]; after the boot, [`BridgeNetwork::replenish`]
//!    refills the pool in the background, so the next start needs no `ip tuntap`.
//! 3. When published ports change, [`BridgeNetwork::apply`] rewrites the ruleset.
//! 4. [`BridgeNetwork::down`] stops the DNS server and removes everything; on daemon stop,
//!    [`BridgeNetwork::shutdown`] only stops the DNS server and its resolved routing (the
//!    bridge stays for the VMs that outlive the daemon).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;

use crate::net::dns::{DnsError, DnsServer};
use crate::net::subnet::Subnet;
use crate::privileged::PrivilegedError;
use crate::privileged::bridge;
use crate::spec::PortForward;

/// Idle taps kept ready.
const POOL_SIZE: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Privileged(#[from] PrivilegedError),
    #[error("cannot serve `.vm` names on the bridge")]
    Dns(#[source] DnsError),
}

impl crate::error::Classify for NetworkError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            NetworkError::Privileged(error) => error.class(),
            NetworkError::Dns(error) => error.class(),
        }
    }
}

/// The daemon's side of the bridge network.
#[derive(Debug)]
pub struct BridgeNetwork {
    /// Where the forwarding marker lives (the runtime directory: gone at reboot, like the
    /// bridge).
    runtime_dir: PathBuf,
    idle: Mutex<Vec<String>>,
    /// The DNS server's stop switch, while it runs.
    dns: Mutex<Option<CancellationToken>>,
    /// VM name → address, as the DNS server answers.
    names: Arc<RwLock<HashMap<String, Ipv4Addr>>>,
}

impl BridgeNetwork {
    pub fn new(runtime_dir: PathBuf) -> BridgeNetwork {
        BridgeNetwork {
            runtime_dir,
            idle: Mutex::new(Vec::new()),
            dns: Mutex::new(None),
            names: Arc::new(RwLock::new(HashMap::new())),
        }
    }

    /// At daemon start: the bridge taps not in `in_use` are idle; a bridge that exists gets
    /// its DNS server again.
    pub async fn reconcile(&self, in_use: &[String], subnet: Subnet) -> Result<(), NetworkError> {
        let idle: Vec<String> = bridge::taps()
            .into_iter()
            .filter(|tap| !in_use.contains(tap))
            .collect();
        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = idle;
        if crate::privileged::is_root() && bridge::status(&self.runtime_dir).bridge.is_some() {
            self.start_dns(subnet).await?;
        }
        Ok(())
    }

    /// Replaces the names the DNS server answers.
    pub fn set_names(&self, names: impl IntoIterator<Item = (String, Ipv4Addr)>) {
        let mut table = self.names.write().unwrap_or_else(|e| e.into_inner());
        *table = names.into_iter().collect();
    }

    /// Makes sure the bridge network exists with `published`, and its DNS server runs.
    pub async fn up(
        &self,
        subnet: Subnet,
        published: &[(PortForward, Ipv4Addr)],
    ) -> Result<(), NetworkError> {
        bridge::ensure(subnet, published, &self.runtime_dir)?;
        self.start_dns(subnet).await
    }

    /// Rewrites the ruleset for `published`, if the bridge exists.
    pub fn apply(
        &self,
        subnet: Subnet,
        published: &[(PortForward, Ipv4Addr)],
    ) -> Result<(), NetworkError> {
        if bridge::status(&self.runtime_dir).nft_table {
            bridge::apply_ruleset(&bridge::ruleset(subnet, published, &self.runtime_dir))?;
        }
        Ok(())
    }

    /// A tap on the bridge for a VM: an idle one, else a new one.
    pub fn take_tap(&self) -> Result<String, NetworkError> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                // Gone since (a `network down` by hand): take another.
                Some(tap) if !bridge::taps().contains(&tap) => continue,
                Some(tap) => return Ok(tap),
                None => return Ok(self.new_tap()?),
            }
        }
    }

    /// Adds taps until [`POOL_SIZE`] are idle (errors only leave the pool short: the next
    /// start makes its tap itself and reports the error then).
    pub fn replenish(&self) {
        while self.idle.lock().unwrap_or_else(|e| e.into_inner()).len() < POOL_SIZE {
            match self.new_tap() {
                Ok(tap) => self
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(tap),
                Err(_) => return,
            }
        }
    }

    /// The lowest free `bgtapN`, made on the bridge. Taps are made only here, in the daemon,
    /// under the pool's use: two makers racing for one name would fail, not share it.
    fn new_tap(&self) -> Result<String, PrivilegedError> {
        static MAKING: Mutex<()> = Mutex::new(());
        let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        let existing = bridge::taps();
        let name = (0u32..)
            .map(|number| format!("{}{number}", bridge::TAP_PREFIX))
            .find(|name| !existing.contains(name))
            .unwrap_or_else(|| format!("{}0", bridge::TAP_PREFIX));
        // Owned by root: QEMU runs as the daemon's user. (A jailed Firecracker's tap would
        // need the jail's uid: see the known weaknesses in docs/networking.md.)
        bridge::create_tap(&name, nix::unistd::geteuid().as_raw())?;
        Ok(name)
    }

    async fn start_dns(&self, subnet: Subnet) -> Result<(), NetworkError> {
        if self.dns.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return Ok(());
        }
        let gateway = subnet.gateway();
        let upstream = upstream_resolvers(gateway);
        let names = Arc::clone(&self.names);
        let lookup: crate::net::dns::Lookup = Arc::new(move |name: &str| {
            names
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .copied()
        });
        let server = DnsServer::bind(SocketAddr::new(IpAddr::V4(gateway), 53), lookup, upstream)
            .await
            .map_err(NetworkError::Dns)?;
        let cancel = CancellationToken::new();
        tokio::spawn(server.serve(cancel.clone()));
        *self.dns.lock().unwrap_or_else(|e| e.into_inner()) = Some(cancel);
        // Without systemd-resolved (or in a network namespace, which it does not see) the
        // host resolves `NAME.vm` through `ssh-config` only; guests use the server directly.
        let _ = bridge::route_dns(gateway);
        Ok(())
    }

    fn stop_dns(&self) {
        if let Some(cancel) = self.dns.lock().unwrap_or_else(|e| e.into_inner()).take() {
            cancel.cancel();
            bridge::unroute_dns();
        }
    }

    /// Removes the whole bridge network (the caller made sure no tap VM runs).
    pub fn down(&self) -> Result<(), NetworkError> {
        self.stop_dns();
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        bridge::teardown(&self.runtime_dir)?;
        Ok(())
    }

    /// At daemon stop: the DNS server and its routing go, the bridge stays for the VMs.
    pub fn shutdown(&self) {
        self.stop_dns();
    }

    /// What exists of the bridge network.
    pub fn status(&self) -> bridge::NetworkStatus {
        bridge::status(&self.runtime_dir)
    }
}

/// What exists of the bridge network on this host (read-only; without root, the nft table
/// reads as absent).
pub fn status(runtime_dir: &std::path::Path) -> bridge::NetworkStatus {
    bridge::status(runtime_dir)
}

/// The resolvers the DNS server forwards other names to: the host's, from resolv.conf;
/// systemd-resolved's real upstreams instead of its stub when the stub is all there is
/// (the stub listens on the host's loopback, which a daemon in another namespace lacks).
fn upstream_resolvers(gateway: Ipv4Addr) -> Vec<SocketAddr> {
    let exclude = [IpAddr::V4(gateway)];
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|text| crate::net::dns::upstream_from_resolv_conf(&text, &exclude))
            .unwrap_or_default()
    };
    let system = read("/etc/resolv.conf");
    let only_stub = !system.is_empty() && system.iter().all(|server| server.ip().is_loopback());
    if only_stub {
        let real = read("/run/systemd/resolve/resolv.conf");
        if !real.is_empty() {
            return real;
        }
    }
    system
}
