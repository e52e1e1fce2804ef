//! `banger ssh-config` and `banger vm proxy`, with the real `ssh` reading the result (`ssh -G`
//! prints the configuration it would use without connecting) and a fake VM whose "SSH
//! server" is the test's own TCP listener. The end-to-end `ssh NAME.vm` against a booted
//! guest is in the slow group (`vm::slow_vm_ssh_name_vm_reaches_the_vm_through_ssh_config`).

use std::io::{Read, Write};

use crate::support::{FakeVm, StopDaemon, TestContext, capable};

fn have_ssh() -> bool {
    capable(
        "ssh (Debian package `openssh-client`)",
        banger::env::find_program("ssh").is_some(),
    )
}

/// `ssh -G HOST` with the sandbox's `~/.ssh/config` (ssh finds the real home's by itself).
fn ssh_settings(context: &TestContext, host: &str) -> String {
    let output = std::process::Command::new("ssh")
        .arg("-F")
        .arg(context.home().join(".ssh/config"))
        .arg("-G")
        .arg(host)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn ssh_config_install_makes_name_vm_a_proxied_host_and_uninstall_restores_the_file() {
    if !have_ssh() {
        return;
    }
    let context = TestContext::new();
    let user_config = context.home().join(".ssh/config");
    std::fs::create_dir_all(user_config.parent().unwrap()).unwrap();
    let original = "Host work\n    User me\n    Port 2222\n";
    std::fs::write(&user_config, original).unwrap();

    let installed = context.run(&["ssh-config", "install"]);
    assert_eq!(installed.code, Some(0), "{installed}");
    let text = std::fs::read_to_string(&user_config).unwrap();
    assert!(
        text.ends_with(original),
        "only lines at the top are added:\n{text}"
    );
    assert_eq!(text.lines().count(), original.lines().count() + 2, "{text}");
    assert_eq!(
        std::fs::read_to_string(context.home().join(".ssh/config.banger-backup")).unwrap(),
        original
    );

    let settings = ssh_settings(&context, "box.vm");
    let banger = std::fs::canonicalize(env!("CARGO_BIN_EXE_banger")).unwrap();
    let state = context.home().join(".local/state/banger");
    for expected in [
        "user root".to_owned(),
        // ssh -G shows the command as written; ssh expands %h and %p when it runs it.
        format!("proxycommand {} vm proxy %h %p", banger.display()),
        format!("identityfile {}", state.join("ssh/id_ed25519").display()),
        format!(
            "userknownhostsfile {}",
            state.join("ssh/known_hosts.vm/box.vm").display()
        ),
        "stricthostkeychecking accept-new".to_owned(),
    ] {
        assert!(
            settings.lines().any(|line| line == expected),
            "`{expected}` not in ssh -G:\n{settings}"
        );
    }
    assert!(
        state.join("ssh/id_ed25519").exists(),
        "the key ssh is told to use"
    );
    // Other hosts are left alone.
    let work = ssh_settings(&context, "work");
    assert!(work.lines().any(|line| line == "port 2222"), "{work}");
    assert!(!work.contains("proxycommand"), "{work}");

    let again = context.run(&["ssh-config", "install"]);
    assert_eq!(again.code, Some(0), "{again}");
    assert_eq!(
        std::fs::read_to_string(&user_config).unwrap(),
        text,
        "idempotent"
    );

    let removed = context.run(&["ssh-config", "uninstall"]);
    assert_eq!(removed.code, Some(0), "{removed}");
    assert_eq!(std::fs::read_to_string(&user_config).unwrap(), original);
    assert!(!context.home().join(".config/banger/ssh_config").exists());
}

#[test]
fn vm_proxy_splices_stdio_to_the_vms_ssh_server_and_refuses_what_it_cannot_reach() {
    let context = TestContext::new();
    let _daemon = StopDaemon(&context);
    // The "SSH server": a banner, then an echo of what the client sends.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let _ = stream.write_all(b"SSH-2.0-fake\r\n");
                let mut buffer = [0u8; 4096];
                while let Ok(read) = stream.read(&mut buffer) {
                    if read == 0 || stream.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let _reachable = FakeVm::adopt(&context, "box", 0, Some(address));
    let _sealed = FakeVm::adopt(&context, "sealed", 1, None);

    let mut proxy = context
        .command(&["vm", "proxy", "box.vm", "22"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    proxy.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    // stdin closed: the server sees end of input, closes, and the proxy ends.
    let output = proxy.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, b"SSH-2.0-fake\r\nhello\n");

    for (args, expected) in [
        (
            ["vm", "proxy", "box", "22"],
            "`box` is not a banger VM name",
        ),
        (["vm", "proxy", "box.vm", "80"], "not port 80"),
        (["vm", "proxy", "nosuch.vm", "22"], "nosuch"),
        (["vm", "proxy", "sealed.vm", "22"], "has no network"),
    ] {
        let refused = context.run(&args);
        assert_eq!(refused.code, Some(1), "{args:?}: {refused}");
        assert!(refused.stderr.contains(expected), "{args:?}: {refused}");
    }
}
