//! The registry against what it may hold that nobody meant: a bundled file under a registry
//! version's label, unreadable or mislabelled instance reports, an object larger than its
//! record, a download cut short by a killed process, a model directory whose file is not
//! what its manifest says, terminal escapes in reports, credentials in the URI, and a reader
//! that goes away. On a local directory, with `serve --registry` processes and the
//! `registry` commands.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fleet::*;

const NO_ENV: &[(String, String)] = &[];

fn small() -> String {
    common::repo()
        .join("models/mlp_small/1/model.onnx")
        .display()
        .to_string()
}

fn big() -> String {
    common::repo()
        .join("models/mlp/1/model.onnx")
        .display()
        .to_string()
}

/// A model directory with its own `mlp` 2: the small file, loaded lazily.
fn bundled_mlp_2() -> PathBuf {
    let dir = temp_dir("bundled");
    std::fs::write(
        dir.join("models.toml"),
        format!(
            "[[models]]\nname = \"mlp\"\nversion = \"2\"\nfile = \"{}\"\nsha256 = \"{}\"\nload = \"lazy\"\n",
            small(),
            common::MLP_SMALL_SHA
        ),
    )
    .unwrap();
    dir
}

fn instance(id: &str, registry: &str, models: &Path, cache: &Path) -> Instance {
    Instance::start(InstanceSetup {
        id,
        registry,
        models,
        cache,
        env: NO_ENV,
        extra: &[],
    })
}

/// What `id` reports as the reason `mlp:version` is unavailable, once it does.
fn unavailable(registry: &str, id: &str, version: &str) -> String {
    wait_for("the unavailable report", Duration::from_secs(30), || {
        let status = status(registry, NO_ENV);
        let report = status["instances"]
            .as_array()?
            .iter()
            .find(|r| r["id"] == id)?
            .clone();
        report["models"]["mlp"]["unavailable"][version]
            .as_str()
            .map(str::to_string)
    })
}

/// An instance report as JSON; `extra` adds fields (`"url":"..."`).
fn instance_report(id: &str, heartbeat_ms: u64, extra: &str) -> String {
    format!(
        r#"{{"format":1,"id":"{id}","streamserve":"x","started_at_ms":0,"heartbeat_at_ms":{heartbeat_ms},"poll_ms":300,{extra}"models":{{}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundled_file_under_the_registrys_label_is_never_routed() {
    let registry = seeded_registry();
    // The registry's mlp:2 is the big mlp; this instance's own mlp:2 is the small file.
    registry_ok(
        &registry,
        NO_ENV,
        &["push", "--name", "mlp", "--version", "2", &big()],
    );
    let solo = instance("solo", &registry, &bundled_mlp_2(), &temp_dir("cache"));
    registry_ok(
        &registry,
        NO_ENV,
        &["rollback", "mlp", "--to", "2", "--reason", "pin 2"],
    );
    let reason = unavailable(&registry, "solo", "2");
    assert!(reason.contains("sha256"), "{reason}");
    let load = Load::start(std::slice::from_ref(&solo.url), 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers = load.finish().await;
    assert_all_ok(&answers);
    assert!(
        answers.iter().all(|a| a.version == "1"),
        "another file answered as mlp 2: {:?}",
        answers.iter().map(|a| &a.version).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_and_mislabelled_reports_are_skipped_and_block_nothing_they_should_not() {
    let registry = seeded_registry();
    registry_ok(
        &registry,
        NO_ENV,
        &["push", "--name", "mlp", "--version", "2", &big()],
    );
    let instances = Path::new(&registry).join("instances");
    std::fs::create_dir_all(&instances).unwrap();
    // Gone for half an hour (not yet to be removed), and a stale report that claims its name.
    let now = now_ms();
    std::fs::write(
        instances.join("victim.json"),
        instance_report("victim", now - 1_800_000, ""),
    )
    .unwrap();
    std::fs::write(
        instances.join("evil.json"),
        instance_report("victim", 0, ""),
    )
    .unwrap();
    let a = instance("a", &registry, &temp_dir("no-models"), &temp_dir("cache"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        instances.join("victim.json").exists(),
        "a report that names another instance had that instance's report deleted"
    );

    // Garbage, and terminal escapes in a report: status shows the rest, and says what it
    // skipped.
    std::fs::write(instances.join("zz.json"), r#"{"format":1,"id":"zz","#).unwrap();
    std::fs::write(
        instances.join("esc.json"),
        instance_report(
            "esc",
            now,
            r#""url":"\u001b[2J\u001b[31mOWNED","registry_error":"\u001b]0;title\u0007","#,
        ),
    )
    .unwrap();
    let out = registry_cli(&registry, NO_ENV, &["status"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("  a [live"), "{stdout}");
    assert!(stderr.contains("instances/zz.json"), "{stderr}");
    assert!(
        stderr.contains("instances/evil.json") && stderr.contains("'victim'"),
        "{stderr}"
    );
    assert!(
        stdout.contains("esc [live") && stdout.contains("OWNED"),
        "{stdout}"
    );
    assert!(
        !stdout.contains('\u{1b}') && !stdout.contains('\u{7}'),
        "{stdout:?}"
    );
    std::fs::remove_file(instances.join("esc.json")).unwrap();

    // b cannot take mlp:2 (its own mlp:2 is another file): a blue/green switch waits for it,
    // whatever unreadable report lies beside theirs.
    let b = instance("b", &registry, &bundled_mlp_2(), &temp_dir("cache"));
    registry_ok(
        &registry,
        NO_ENV,
        &["deploy", "mlp", "2", "--strategy", "blue_green"],
    );
    let failed = wait_for("b to say why it blocks", Duration::from_secs(30), || {
        let status = status(&registry, NO_ENV);
        let report = status["instances"]
            .as_array()?
            .iter()
            .find(|r| r["id"] == "b")?
            .clone();
        report["models"]["mlp"]["rollout"]["failed"]
            .as_str()
            .map(str::to_string)
    });
    assert!(failed.contains("sha256"), "{failed}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = status(&registry, NO_ENV);
    let history = events(&status, "mlp");
    assert!(
        !history.contains(&("switched".to_string(), "2".to_string())),
        "switched while b could not take 2: {history:?}"
    );
    assert_eq!(desired(&status, "mlp")["default"], "1");
    let account = admin_registry(&a.url).await;
    assert_eq!(account["reachable"], true, "{account}");
    let error = account["registry_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("instances/zz.json") && !error.contains("unreachable"),
        "{account}"
    );
    assert!(!a.logs().contains("registry unreachable"), "{}", a.logs());
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_object_is_not_downloaded_and_a_dead_download_is_cleaned_up() {
    let registry = seeded_registry();
    registry_ok(
        &registry,
        NO_ENV,
        &["push", "--name", "mlp", "--version", "2", &small()],
    );
    let object = Path::new(&registry).join(format!("models/mlp/2/{}.onnx", common::MLP_SMALL_SHA));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&object)
        .unwrap();
    file.set_len(256 * 1024 * 1024).unwrap();
    let cache = temp_dir("cache");
    let solo = instance("solo", &registry, &temp_dir("no-models"), &cache);
    // What a process killed mid-download leaves: a part that nobody holds.
    let root = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let version_dir = root.join("models/mlp/2");
    std::fs::create_dir_all(&version_dir).unwrap();
    let dead = version_dir.join(format!(".{}.part-00000000deadbeef", common::MLP_SMALL_SHA));
    std::fs::write(&dead, vec![1u8; 4096]).unwrap();

    registry_ok(&registry, NO_ENV, &["deploy", "mlp", "2"]);
    let reason = unavailable(&registry, "solo", "2");
    assert!(
        reason.contains("more than the 35429 its record says"),
        "{reason}"
    );
    assert!(!dead.exists(), "the dead download's part is still there");
    let kept: u64 = std::fs::read_dir(&version_dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        kept < 1024 * 1024,
        "{kept} bytes kept of an oversized object"
    );
    // A corrupt object stays corrupt: it is not fetched again every few seconds.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let tries = solo
        .logs()
        .matches("cannot take the version from the registry")
        .count();
    assert_eq!(tries, 1, "{}", solo.logs());
}

#[test]
fn seed_refuses_a_file_that_is_not_what_its_manifest_says() {
    let models = small_mlp_dir();
    let manifest = std::fs::read_to_string(models.join("models.toml")).unwrap();
    let cut = models.join("cut.onnx");
    std::fs::write(&cut, &std::fs::read(small()).unwrap()[..20_000]).unwrap();
    std::fs::write(
        models.join("models.toml"),
        manifest.replace(&small(), cut.to_str().unwrap()),
    )
    .unwrap();
    let registry = temp_dir("registry").display().to_string();
    let out = registry_cli(
        &registry,
        NO_ENV,
        &["seed", "--models", models.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(common::MLP_SMALL_SHA) && stderr.contains("its manifest says"),
        "{stderr}"
    );
    let list = registry_ok(&registry, NO_ENV, &["list", "--json"]);
    assert_eq!(list.trim(), "[]", "a corrupt copy was published");

    // Seeded with the right file, a rerun with the cut copy names all three hashes.
    let good = seeded_registry();
    let out = registry_cli(
        &good,
        NO_ENV,
        &["seed", "--models", models.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the registry has the manifest's sha: {stderr}"
    );
    std::fs::write(
        models.join("models.toml"),
        manifest
            .replace(&small(), cut.to_str().unwrap())
            .replace(common::MLP_SMALL_SHA, common::MLP_SHA),
    )
    .unwrap();
    let out = registry_cli(
        &good,
        NO_ENV,
        &["seed", "--models", models.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "in the registry with sha256 {}",
            common::MLP_SMALL_SHA
        )) && stderr.contains(&format!("manifest says {}", common::MLP_SHA))
            && stderr.contains("cut.onnx has sha256 "),
        "{stderr}"
    );
}

#[test]
fn credentials_in_the_uri_are_refused_and_not_repeated() {
    let out = registry_cli(
        "s3://AKIALEAKEDKEY:leakedSecretValue123@bucket/reg",
        NO_ENV,
        &["list"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("AWS_SECRET_ACCESS_KEY"), "{stderr}");
    assert!(
        !stderr.contains("leakedSecretValue123") && !stderr.contains("AKIALEAKEDKEY"),
        "{stderr}"
    );
}

#[test]
fn a_reader_that_goes_away_ends_list_and_status_quietly() {
    let registry = seeded_registry();
    for command in ["list", "status"] {
        // The reader is gone before the command writes a byte.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 0.5; exec \"$@\"", "sh"])
            .arg(env!("CARGO_BIN_EXE_streamserve"))
            .args(["registry", "--registry", &registry, command])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{command}: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
    }
}
