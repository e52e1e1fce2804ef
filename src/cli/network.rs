//! `banger network show|down`: banger's bridge for `--network tap` VMs.

use serde_json::json;

use super::Context;
use super::exit::ExitStatus;
use super::vm::{Session, refused};
use banger::daemon::protocol::{Request, Response};

#[derive(Debug, clap::Subcommand)]
pub enum NetworkCommand {
    /// What exists of the bridge network: the bridge and its address, taps, NAT, forwarding.
    Show,
    /// Remove the bridge, its taps, the `inet banger` nftables table and the `.vm` DNS server,
    /// and switch IPv4 forwarding off again if banger switched it on (root; no tap VM may
    /// run). Deleting the last tap VM does the same.
    Down,
}

pub fn run(context: &mut Context, command: &NetworkCommand) -> anyhow::Result<ExitStatus> {
    match command {
        NetworkCommand::Show => {
            let status = banger::ops::network::status(&context.paths()?.runtime_dir);
            let printer = &context.printer;
            if printer.json {
                printer.record(
                    "network",
                    json!({
                        "bridge": banger::privileged::bridge::BRIDGE,
                        "address": status.bridge,
                        "taps": status.taps,
                        "nft_table": status.nft_table,
                        "forwarding": status.forwarding,
                        "forwarding_by_banger": status.forwarding_by_banger,
                    }),
                )?;
                return Ok(ExitStatus::Success);
            }
            let bridge = banger::privileged::bridge::BRIDGE;
            printer.data(&format!(
                "bridge:      {}\ntaps:        {}\nnft table:   {}\nforwarding:  {}\n",
                status.bridge.map_or_else(
                    || "none".to_owned(),
                    |address| format!("{bridge} {address}")
                ),
                if status.taps.is_empty() {
                    "none".to_owned()
                } else {
                    status.taps.join(" ")
                },
                if status.nft_table {
                    "inet banger"
                } else {
                    "none (or not readable without root)"
                },
                match (status.forwarding, status.forwarding_by_banger) {
                    (true, true) => "on (switched on by banger)",
                    (true, false) => "on",
                    (false, _) => "off",
                },
            ))?;
            Ok(ExitStatus::Success)
        }
        NetworkCommand::Down => {
            let runtime = super::runtime()?;
            let mut session = Session::connect(context, &runtime)?;
            match session.call(context, &runtime, &Request::NetworkDown)? {
                Ok(Response::NetworkDown {
                    bridge,
                    taps,
                    nft_table,
                }) => {
                    let printer = &context.printer;
                    if printer.json {
                        printer.record(
                            "network_down",
                            json!({ "bridge": bridge, "taps": taps, "nft_table": nft_table }),
                        )?;
                    } else if bridge.is_none() && taps.is_empty() && !nft_table {
                        printer.info("no bridge network to remove");
                    } else {
                        printer.info(&format!(
                            "removed {}{} tap(s){}",
                            bridge.map_or_else(String::new, |address| format!(
                                "bridge {} ({address}), ",
                                banger::privileged::bridge::BRIDGE
                            )),
                            taps.len(),
                            if nft_table { ", table inet banger" } else { "" }
                        ));
                    }
                    Ok(ExitStatus::Success)
                }
                Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
                Err(error) => Ok(refused(context, &error)),
            }
        }
    }
}
