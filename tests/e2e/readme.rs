//! README.md's examples run for real: its grpcurl and herdctl commands, against a mesh seeded the
//! way `make run` seeds it.

use std::process::Command;
use std::time::Duration;

use herd_tests::{TestMesh, bin_dir, eventually, herdctl};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .unwrap_or_default()
}

/// The README lines that start with `cmd ` inside fenced blocks.
fn commands(cmd: &str) -> Vec<String> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in readme().lines() {
        if line.starts_with("```") {
            inside = !inside;
            continue;
        }
        if inside && line.starts_with(&format!("{cmd} ")) {
            out.push(line.to_string());
        }
    }
    out
}

/// Runs one README line with `bash -c`, failing with its stderr unless it succeeds; returns stdout.
fn run(bash: &mut Command, line: &str) -> anyhow::Result<String> {
    let out = bash.arg("-c").arg(line).output()?;
    assert!(
        out.status.success(),
        "{line}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_grpcurl_examples_work() -> anyhow::Result<()> {
    // Seeded and with mutual TLS, as `make run` starts it.
    let mesh = TestMesh::start_seeded_tls(1).await?;
    let certs = mesh
        .certs
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a TLS mesh has certificates"))?;
    // A second gateway stands in for 127.0.0.1:50052.
    let port = herd_tests::free_port();
    let flags = herd_tests::tls_flags(&certs, "gateway");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let second = herd_tests::start_instance("gateway", &mesh.etcd, port, mesh.dir.path(), &flags)?;
    let g2 = format!("127.0.0.1:{port}");
    eventually(
        "the second gateway to serve",
        Duration::from_secs(20),
        || async { (mesh.health(&g2, "").as_deref() == Some("SERVING")).then_some(()) },
    )
    .await?;

    let lines = commands("grpcurl");
    assert!(
        lines.len() >= 5,
        "README shows too few grpcurl examples: {lines:?}"
    );
    // The caller's bearer token, as README has the reader get it.
    let exports: Vec<String> = commands("export")
        .into_iter()
        .filter(|line| line.contains("JWT"))
        .collect();
    assert_eq!(exports.len(), 1, "README exports JWT once: {exports:?}");
    let herdctl = bin_dir().join("herdctl").to_string_lossy().to_string();
    let secrets = herd_tests::secrets_dir(mesh.dir.path())?;
    let export = exports[0]
        .replace("$(herdctl", &format!("$({herdctl}"))
        .replace(".run/secrets/", &format!("{}/", secrets.display()));
    let jwt = run(
        &mut Command::new("bash"),
        &format!("{export} && printf %s \"$JWT\""),
    )?;
    assert_eq!(jwt.split('.').count(), 3, "not a JWT: {jwt}");

    let mut token = String::new();
    for line in lines {
        let line = line
            .replace("127.0.0.1:50051", &mesh.gateways[0])
            .replace("127.0.0.1:50052", &g2)
            .replace(".run/certs/", &format!("{}/", certs.display()));
        let stdout = run(
            Command::new("bash").env("TOKEN", &token).env("JWT", &jwt),
            &line,
        )?;
        if line.contains("CreateQuote") {
            let v: serde_json::Value = serde_json::from_str(&stdout)?;
            token = v["token"].as_str().unwrap_or_default().to_string();
            assert!(!token.is_empty(), "{stdout}");
            assert_eq!(v["quote"]["lines"][0]["promotionId"], "hammer-3-for-15");
        }
        if line.contains("VerifyQuote") {
            assert!(stdout.contains("quoteId"), "{stdout}");
        }
        if line.contains(" list") {
            assert!(stdout.contains("herd.quote.v1.QuoteService"), "{stdout}");
        }
    }
    // README's caller from outside, on the same mesh: the CA alone, the same token.
    let callers: Vec<String> = commands("printf")
        .into_iter()
        .chain(commands("herd-caller"))
        .collect();
    assert_eq!(callers.len(), 2, "{callers:?}");
    let mut printed = String::new();
    for line in callers {
        let line = line
            .replace(
                ".run/token.jwt",
                &mesh.dir.path().join("token.jwt").to_string_lossy(),
            )
            .replace(".run/certs/", &format!("{}/", certs.display()))
            .replace("http://127.0.0.1:2379", &mesh.etcd.endpoint)
            .replacen(
                "herd-caller",
                &bin_dir().join("herd-caller").to_string_lossy(),
                1,
            );
        printed = run(Command::new("bash").env("JWT", &jwt), &line)?;
    }
    let verified = printed
        .lines()
        .filter(|l| l.ends_with(", verified"))
        .count();
    assert_eq!(verified, 3, "{printed}");
    drop(second);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_herdctl_examples_work_and_put_validates() -> anyhow::Result<()> {
    let mesh = TestMesh::start_seeded(1).await?;
    let dir = mesh.dir.path();
    let limits = dir.join("limits.json");
    std::fs::write(&limits, r#"{"max_items":7,"max_quantity":70}"#)?;
    let lines = commands("herdctl");
    assert!(lines.len() >= 4, "{lines:?}");
    for line in lines {
        let line = line
            .replacen("herdctl", &bin_dir().join("herdctl").to_string_lossy(), 1)
            .replace("http://127.0.0.1:2379", &mesh.etcd.endpoint);
        let stdout = run(Command::new("bash").current_dir(dir), &line)?;
        if line.contains("--output json") {
            let listed: serde_json::Value = serde_json::from_str(&stdout)?;
            let gateways = listed.as_array().map(Vec::len).unwrap_or_default();
            assert_eq!(gateways, 1, "{stdout}");
            assert!(listed[0]["address"].as_str().is_some(), "{stdout}");
        }
        if line.ends_with("instances") {
            for service in ["gateway", "pricing", "tax", "currency"] {
                assert!(stdout.contains(service), "{stdout}");
            }
        }
    }
    let got = mesh.herdctl(&["config", "get", "limits"])?;
    assert!(String::from_utf8_lossy(&got.stdout).contains("\"max_items\": 7"));

    // Invalid files are refused with the reason, and nothing is written.
    for (json, reason) in [
        (r#"{"max_items":0,"max_quantity":70}"#, "max_items"),
        (
            r#"{"max_items":5,"max_quantity":70,"colour":"red"}"#,
            "colour",
        ),
        ("not json", "invalid JSON"),
    ] {
        std::fs::write(&limits, json)?;
        let out = herdctl(
            &mesh.etcd,
            &["config", "put", "limits", &limits.to_string_lossy()],
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && stderr.contains("refused") && stderr.contains(reason),
            "{stderr}"
        );
    }
    // A section that contradicts the rest of the configuration is refused too.
    let fx = dir.join("fx.json");
    std::fs::write(&fx, r#"{"base":"EUR","rates":{"USD":"1.08"}}"#)?;
    let out = mesh.herdctl(&["config", "put", "fx", &fx.to_string_lossy()])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("catalog currency"));
    let got = mesh.herdctl(&["config", "get", "limits"])?;
    assert!(String::from_utf8_lossy(&got.stdout).contains("\"max_items\": 7"));

    // Seeding again keeps what is there.
    let secrets = herd_tests::secrets_dir(dir)?;
    let out = herdctl(
        &mesh.etcd,
        &["config", "seed", "--secrets", &secrets.to_string_lossy()],
    )?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept"));
    let got = mesh.herdctl(&["config", "get", "limits"])?;
    assert!(String::from_utf8_lossy(&got.stdout).contains("\"max_items\": 7"));
    Ok(())
}

/// The fenced `rust` blocks of one README section.
fn rust_blocks(section: &str) -> Vec<Vec<String>> {
    let text = readme();
    let start = text.find(section).unwrap_or(text.len());
    let rest = &text[start..];
    let end = rest[section.len()..]
        .find("\n## ")
        .map_or(rest.len(), |i| i + section.len());
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in rest[..end].lines() {
        match (&mut current, line.trim()) {
            (None, "```rust") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), code) if !code.is_empty() => block.push(code.to_string()),
            _ => {}
        }
    }
    blocks
}

/// Every ```rust block of README's `section` (at least `least` of them) is held, line for line,
/// by one of `files` under the workspace's `example` folder.
fn readme_code_is_held_by(section: &str, example: &str, files: &[&str], least: usize) {
    let root = format!("{}/../{example}", env!("CARGO_MANIFEST_DIR"));
    let sources: Vec<Vec<String>> = files
        .iter()
        .map(|file| {
            std::fs::read_to_string(format!("{root}/{file}"))
                .unwrap_or_default()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect();
    let blocks = rust_blocks(section);
    assert!(blocks.len() >= least, "{blocks:?}");
    for block in blocks {
        let found = sources
            .iter()
            .any(|lines| lines.windows(block.len()).any(|w| w == block.as_slice()));
        assert!(
            found,
            "README shows code that {example} does not hold:\n{}",
            block.join("\n")
        );
    }
}

#[test]
fn readme_code_for_adding_a_service_is_the_example_s() {
    readme_code_is_held_by(
        "## Adding a service of your own",
        "examples/thing",
        &["build.rs", "src/lib.rs", "src/main.rs"],
        5,
    );
}

#[test]
fn readme_code_for_calling_from_outside_is_the_caller_example_s() {
    readme_code_is_held_by(
        "## Calling the mesh from outside it",
        "examples/caller",
        &["src/main.rs"],
        2,
    );
}
