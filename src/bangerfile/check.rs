//! Value checks: one pure function per kind of value, each returning the normalized value or a
//! message that quotes the offending text. The validator attaches locations.

use std::path::{Component, Path, PathBuf};

use super::raw::{RawDuration, RawMode, RawSize};
use crate::spec::ByteSize;

/// Guest directories that are virtual file systems: nothing copied there survives or makes sense.
const VIRTUAL_GUEST_DIRS: &[&str] = &["/proc", "/sys", "/dev"];

/// An absolute, normalized guest path below `/` (not `/` itself, not inside `/proc`, `/sys`,
/// `/dev`).
pub(crate) fn guest_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("guest path is empty".into());
    }
    if path.contains('\0') {
        return Err(format!("guest path {path:?} contains a NUL character"));
    }
    if !path.starts_with('/') {
        return Err(format!(
            "guest path `{path}` is relative; guest paths are absolute, like `/{path}`"
        ));
    }
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let normalized = normalize_guest(&parts);
    if normalized.as_deref() != Some(path) {
        return Err(match normalized {
            Some(normalized) => {
                format!("guest path `{path}` is not normalized; write `{normalized}`")
            }
            None => format!("guest path `{path}` climbs above `/`"),
        });
    }
    if path == "/" {
        return Err("guest path `/` is the guest's root; name a file or directory below it".into());
    }
    if let Some(dir) = VIRTUAL_GUEST_DIRS
        .iter()
        .find(|dir| path == **dir || path.starts_with(&format!("{dir}/")))
    {
        return Err(format!(
            "guest path `{path}` is inside `{dir}`, a virtual file system in the guest"
        ));
    }
    Ok(())
}

/// `None` when `..` climbs above the root.
fn normalize_guest(parts: &[&str]) -> Option<String> {
    let mut kept: Vec<&str> = Vec::new();
    for part in parts {
        match *part {
            "" | "." => {}
            ".." => {
                kept.pop()?;
            }
            name => kept.push(name),
        }
    }
    Some(format!("/{}", kept.join("/")))
}

/// A project-relative path, normalized lexically (`./a/../b` → `b`, `./` → `.`). Rejects
/// absolute paths, `~`, and `..` that leaves the project directory.
pub(crate) fn project_path(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("path is empty; use `.` for the project directory".into());
    }
    if path.contains('\0') {
        return Err(format!("path {path:?} contains a NUL character"));
    }
    if path.starts_with('~') {
        return Err(format!(
            "`{path}` is outside the project: project paths are relative to the Bangerfile's directory, and `~` is not expanded"
        ));
    }
    let mut normalized = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "`{path}` is absolute; project paths are relative to the Bangerfile's directory"
                ));
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if !normalized.pop() {
                    return Err(format!("`{path}` leaves the project directory"));
                }
            }
            Component::Normal(name) => normalized.push(name),
        }
    }
    if normalized.as_os_str().is_empty() {
        normalized.push(".");
    }
    Ok(normalized)
}

/// Largest mode banger applies: permission bits plus setuid, setgid and sticky.
const MAX_MODE: u32 = 0o7777;

/// `"0644"`, `"644"`, `"0o644"` or the TOML integer `0o644`. `literal` is the value as written
/// in the file: a decimal integer such as `644` is refused because it means 0o1204, which is
/// never what anyone intended.
pub(crate) fn mode(raw: &RawMode, literal: &str) -> Result<u32, String> {
    let digits = match raw {
        RawMode::Text(text) => text.strip_prefix("0o").unwrap_or(text).to_owned(),
        RawMode::Number(number) => {
            if *number < 0 {
                return Err(format!("mode `{literal}` is negative"));
            }
            let Some(octal) = literal.trim().strip_prefix("0o") else {
                if *number == 0 {
                    return Ok(0);
                }
                return Err(format!(
                    "mode `{literal}` is a decimal number; write it in octal, as `0o{literal}` or \"{literal}\""
                ));
            };
            octal.replace('_', "")
        }
    };
    let shown = match raw {
        RawMode::Text(text) => format!("\"{text}\""),
        RawMode::Number(_) => literal.trim().to_owned(),
    };
    if digits.is_empty() || !digits.chars().all(|c| matches!(c, '0'..='7')) {
        return Err(format!(
            "mode {shown} is not an octal number like \"0644\" or \"0755\""
        ));
    }
    match u32::from_str_radix(&digits, 8) {
        Ok(value) if value <= MAX_MODE => Ok(value),
        _ => Err(format!("mode {shown} is larger than 0o7777")),
    }
}

/// A size that is greater than zero.
pub(crate) fn size(raw: &RawSize) -> Result<ByteSize, String> {
    let size = match raw {
        RawSize::Text(text) => {
            if text.trim().starts_with(|c: char| c.is_ascii_digit()) && text.contains(['.', ',']) {
                return Err(format!(
                    "`{text}` is not a whole number; use a smaller unit, as in `1536M` for 1.5G"
                ));
            }
            ByteSize::parse(text)?
        }
        RawSize::Bytes(bytes) => {
            let bytes = u64::try_from(*bytes)
                .map_err(|_| format!("size {bytes} is negative; sizes are greater than zero"))?;
            ByteSize(bytes)
        }
    };
    if size.bytes() == 0 {
        return Err("size is zero; sizes are greater than zero".into());
    }
    Ok(size)
}

/// A duration greater than zero: `"90s"`, `"30m"`, `"2h"`, `"1d"`, or a number of seconds.
pub(crate) fn duration(raw: &RawDuration) -> Result<std::time::Duration, String> {
    let seconds = match raw {
        RawDuration::Seconds(seconds) => u64::try_from(*seconds).map_err(|_| {
            format!("duration {seconds} is negative; durations are greater than zero")
        })?,
        RawDuration::Text(text) => {
            let trimmed = text.trim();
            let split = trimmed
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(trimmed.len());
            let (digits, unit) = trimmed.split_at(split);
            let multiplier = match unit.trim() {
                "" | "s" => 1,
                "m" => 60,
                "h" => 3600,
                "d" => 86_400,
                _ => 0,
            };
            let value: Option<u64> = digits.parse().ok();
            match value {
                Some(value) if multiplier > 0 => value.saturating_mul(multiplier),
                _ => {
                    return Err(format!(
                        "`{text}` is not a duration like \"90s\", \"30m\" or \"2h\""
                    ));
                }
            }
        }
    };
    if seconds == 0 {
        return Err("duration is zero; durations are greater than zero".into());
    }
    if seconds > crate::spec::MAX_TIMEOUT_SECS {
        return Err(format!(
            "duration of {seconds} s is longer than the longest banger waits, 7 days"
        ));
    }
    Ok(std::time::Duration::from_secs(seconds))
}

/// A POSIX-style environment variable name.
pub(crate) fn env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid environment variable name: use letters, digits and `_`, not starting with a digit"
        ))
    }
}

/// `[images.NAME]`: a letter, then letters, digits, `-` and `_` (it becomes part of step ids).
pub(crate) fn image_name(name: &str) -> Result<(), String> {
    identifier(name, "image name")
}

fn identifier(name: &str, what: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.len() <= 63;
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid {what}: use up to 63 letters, digits, `-` and `_`, starting with a letter"
        ))
    }
}

/// A kernel name as the local kernel store spells it.
pub(crate) fn kernel_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid kernel name: use letters, digits, `-`, `_` and `.`"
        ))
    }
}

/// A project name must work as a DNS label (the VM answers to `<name>.vm`).
pub(crate) fn project_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid project name: use up to 63 lowercase letters, digits and `-`, not starting or ending with `-`"
        ))
    }
}

/// A project name derived from a directory name: lowercased, other characters turned into
/// `-`, trimmed to a DNS label. `None` if nothing usable is left.
pub(crate) fn project_name_from_dir(dir_name: &str) -> Option<String> {
    let mut name = String::new();
    for c in dir_name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name: String = name.trim_matches('-').chars().take(63).collect();
    let name = name.trim_end_matches('-').to_owned();
    (!name.is_empty()).then_some(name)
}

pub(crate) use crate::catalog::{check_package_name as package_name, check_suite as suite};

/// An OCI image reference, `[registry[:port]/]path[:tag][@algorithm:hex]`, following the
/// grammar of the distribution project's `reference` package.
pub(crate) fn oci_reference(reference: &str) -> Result<(), String> {
    let invalid = |why: &str| Err(format!("`{reference}` is not a valid OCI reference: {why}"));
    if reference.is_empty() {
        return Err("OCI reference is empty".into());
    }
    if reference
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return invalid("it contains whitespace");
    }
    let (name_tag, digest) = match reference.split_once('@') {
        Some((name_tag, digest)) => (name_tag, Some(digest)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return invalid("a digest looks like `sha256:<64 hex digits>`");
        };
        let algorithm_ok = !algorithm.is_empty()
            && algorithm.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '.' | '_' | '-')
            });
        let hex_ok = hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit());
        let sha256_ok = algorithm != "sha256" || hex.len() == 64;
        if !(algorithm_ok && hex_ok && sha256_ok) {
            return invalid("a digest looks like `sha256:<64 hex digits>`");
        }
    }
    let last_slash = name_tag.rfind('/').map_or(0, |slash| slash + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(colon) => (
            &name_tag[..last_slash + colon],
            Some(&name_tag[last_slash + colon + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let mut chars = tag.chars();
        let valid = tag.len() <= 128
            && chars
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return invalid("a tag is up to 128 letters, digits, `_`, `.` and `-`");
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let first = components[0];
    let has_registry = components.len() > 1
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry {
        let (host, port) = match first.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (first, None),
        };
        let host_ok = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        let port_ok =
            port.is_none_or(|port| !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()));
        if !(host_ok && port_ok) {
            return invalid("the registry must be a host name with an optional port");
        }
        components.remove(0);
    }
    for component in components {
        if component.chars().any(|c| c.is_ascii_uppercase()) {
            return invalid("repository names are lowercase");
        }
        if !path_component(component) {
            return invalid(
                "repository path components are lowercase letters and digits, separated by `.`, `_`, `__` or `-`",
            );
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut index = 0;
    while index < bytes.len() {
        if alnum(bytes[index]) {
            index += 1;
            continue;
        }
        let start = index;
        while index < bytes.len() && !alnum(bytes[index]) {
            index += 1;
        }
        let separator = &component[start..index];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// The candidate closest to `name`, if it is close enough to be a plausible typo.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|candidate| *candidate != name)
        .map(|candidate| {
            let distance = if candidate.eq_ignore_ascii_case(name) {
                0
            } else {
                edit_distance(name, candidate)
            };
            (distance, candidate)
        })
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// `` `a`, `b`, `c` ``
pub(crate) fn backticked<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_must_be_absolute_and_normalized() {
        assert_eq!(guest_path("/root/project"), Ok(()));
        assert_eq!(
            guest_path("root/x").unwrap_err(),
            "guest path `root/x` is relative; guest paths are absolute, like `/root/x`"
        );
        assert_eq!(
            guest_path("/root//x/").unwrap_err(),
            "guest path `/root//x/` is not normalized; write `/root/x`"
        );
        assert_eq!(
            guest_path("/root/../etc/./x").unwrap_err(),
            "guest path `/root/../etc/./x` is not normalized; write `/etc/x`"
        );
        assert_eq!(
            guest_path("/..").unwrap_err(),
            "guest path `/..` climbs above `/`"
        );
        assert!(guest_path("/").is_err());
        assert!(
            guest_path("/proc/1/environ")
                .unwrap_err()
                .contains("virtual")
        );
        assert_eq!(guest_path("/devices"), Ok(()));
    }

    #[test]
    fn project_paths_normalize_and_stay_inside() {
        assert_eq!(project_path("./a/../b/c.sh"), Ok(PathBuf::from("b/c.sh")));
        assert_eq!(project_path("./"), Ok(PathBuf::from(".")));
        assert_eq!(project_path("a/.."), Ok(PathBuf::from(".")));
        assert_eq!(
            project_path("a/../../x").unwrap_err(),
            "`a/../../x` leaves the project directory"
        );
        assert!(
            project_path("/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            project_path("~/x")
                .unwrap_err()
                .contains("outside the project")
        );
    }

    #[test]
    fn modes_are_octal() {
        let text = |text: &str| RawMode::Text(text.to_owned());
        assert_eq!(mode(&text("0755"), "\"0755\""), Ok(0o755));
        assert_eq!(mode(&text("644"), "\"644\""), Ok(0o644));
        assert_eq!(mode(&text("0o4755"), "\"0o4755\""), Ok(0o4755));
        assert_eq!(mode(&RawMode::Number(0o644), "0o644"), Ok(0o644));
        assert_eq!(
            mode(&RawMode::Number(644), "644").unwrap_err(),
            "mode `644` is a decimal number; write it in octal, as `0o644` or \"644\""
        );
        assert_eq!(
            mode(&text("0789"), "\"0789\"").unwrap_err(),
            "mode \"0789\" is not an octal number like \"0644\" or \"0755\""
        );
        assert_eq!(
            mode(&text("17777"), "\"17777\"").unwrap_err(),
            "mode \"17777\" is larger than 0o7777"
        );
    }

    #[test]
    fn durations_take_a_unit_or_are_seconds() {
        let secs = std::time::Duration::from_secs;
        let text = |text: &str| RawDuration::Text(text.to_owned());
        assert_eq!(duration(&text("90s")), Ok(secs(90)));
        assert_eq!(duration(&text("30m")), Ok(secs(1800)));
        assert_eq!(duration(&text("2h")), Ok(secs(7200)));
        assert_eq!(duration(&text("45")), Ok(secs(45)));
        assert_eq!(duration(&RawDuration::Seconds(600)), Ok(secs(600)));
        assert_eq!(duration(&text("7d")), Ok(secs(7 * 86_400)));
        for long in ["8d", "18446744073709551615", "99999999999999999d"] {
            let error = duration(&text(long)).unwrap_err();
            assert!(
                error.contains("longer than the longest banger waits"),
                "{long}: {error}"
            );
        }
        assert!(duration(&text("1.5h")).unwrap_err().contains("`1.5h`"));
        assert!(duration(&text("soon")).is_err());
        assert!(duration(&text("0s")).is_err());
        assert!(duration(&RawDuration::Seconds(-3)).is_err());
    }

    #[test]
    fn sizes_are_positive() {
        assert_eq!(
            size(&RawSize::Text("4G".into())),
            Ok(ByteSize(4 * ByteSize::GIB))
        );
        assert_eq!(size(&RawSize::Bytes(4096)), Ok(ByteSize(4096)));
        assert!(size(&RawSize::Bytes(0)).is_err());
        assert!(size(&RawSize::Bytes(-1)).is_err());
        assert!(size(&RawSize::Text("0G".into())).is_err());
    }

    #[test]
    fn oci_references_follow_the_distribution_grammar() {
        for good in [
            "alpine",
            "alpine:3.20",
            "docker.io/library/alpine:3.20",
            "localhost:5000/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "ghcr.io/org/my_app__x-y:v1.2.3-rc.1",
            "registry.example.com:443/a/b/c",
        ] {
            assert_eq!(oci_reference(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("Alpine:3.20", "lowercase"),
            ("alpine:3.20 ", "whitespace"),
            ("alpine:", "tag"),
            ("alpine@sha256:abc", "digest"),
            ("ghcr.io/a//b", "path components"),
            ("a-/b", "path components"),
            ("exa_mple.com/x", "registry"),
        ] {
            let err = oci_reference(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(project_name("my-demo2"), Ok(()));
        assert!(project_name("My Demo").is_err());
        assert_eq!(
            project_name_from_dir("My Demo (v2)"),
            Some("my-demo-v2".into())
        );
        assert_eq!(project_name_from_dir("..."), None);
        assert_eq!(image_name("base_2"), Ok(()));
        assert!(image_name("2base").is_err());
        assert!(image_name("a/b").is_err());
        assert_eq!(env_name("_A1"), Ok(()));
        assert!(env_name("1A").is_err());
        assert!(env_name("A-B").is_err());
        assert_eq!(package_name("g++"), Ok(()));
        assert_eq!(package_name("libc6:amd64"), Ok(()));
        assert_eq!(package_name("git=1:2.39.2-1.1"), Ok(()));
        assert!(package_name("Make").is_err());
        assert!(package_name("x").is_err());
        assert!(package_name("make=").is_err());
    }

    #[test]
    fn suggestions_are_close_matches_only() {
        let keys = ["vcpu", "memory", "disk", "network"];
        assert_eq!(closest("vcpus", keys), Some("vcpu"));
        assert_eq!(closest("mem", keys), None);
        assert_eq!(closest("Disk", keys), Some("disk"));
        assert_eq!(closest("zzzz", keys), None);
    }
}
