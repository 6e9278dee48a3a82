//! Static checks of the image: the Dockerfile pins the ONNX Runtime the binary is built for,
//! its runtime stages put binary, models and library where the server looks and make the
//! directories it writes for its user, and `.dockerignore` keeps what the build needs.

use toml::Value;

use super::dockerfile::{dockerfile, grpc_port, words, Dockerfile, Stage};
use super::{read, repo};

#[test]
fn dockerfile_pins_the_onnx_runtime_the_binary_is_built_for() {
    let docker = dockerfile();
    let version = docker
        .global_args
        .get("ORT_VERSION")
        .expect("ARG ORT_VERSION before the first FROM");
    assert_eq!(version, streamserve::runtime::ORT_VERSION);
    let requirements = read("requirements.txt");
    assert!(
        requirements
            .lines()
            .any(|l| l.trim() == format!("onnxruntime=={version}")),
        "requirements.txt pins onnxruntime=={version}"
    );
    for (stage, package) in [("ort-cpu", "onnxruntime"), ("ort-gpu", "onnxruntime-gpu")] {
        let stage = docker.stage(stage);
        let pip = stage.all("RUN").find(|r| r.contains("pip install"));
        let pip = pip.unwrap_or_else(|| panic!("{} runs pip install", stage.label()));
        assert!(
            words(pip).contains(&format!("{package}=={version}")),
            "{}: {pip}",
            stage.label()
        );
    }
}

/// Where `src/runtime/mod.rs` looks for the library when no path is configured.
fn library_search_paths() -> Vec<String> {
    let source = read("src/runtime/mod.rs");
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with('/') && s.ends_with("/libonnxruntime.so"))
        .map(str::to_string)
        .collect()
}

fn check_runtime_stage(docker: &Dockerfile, stage: &Stage, ort_stage: &str) {
    let label = stage.label();
    let env = stage.env();
    let copies = stage.copies();
    let version = &docker.global_args["ORT_VERSION"];

    // The binary, built by the build stage, is what CMD runs.
    let build = docker
        .stages
        .iter()
        .find(|s| {
            s.all("RUN")
                .any(|r| r.contains("cargo build --release --locked --bin streamserve"))
        })
        .expect("a stage runs cargo build --release --locked --bin streamserve");
    let binary = copies
        .iter()
        .find(|c| {
            c.from.as_deref() == build.name.as_deref() && c.dest == "/usr/local/bin/streamserve"
        })
        .unwrap_or_else(|| panic!("{label}: COPY --from=build ... /usr/local/bin/streamserve"));
    assert_eq!(binary.sources.len(), 1);
    let cmd = stage.cmd();
    assert!(
        cmd[0] == "streamserve" || cmd[0] == "/usr/local/bin/streamserve",
        "{label}: CMD runs the copied binary: {cmd:?}"
    );
    assert_eq!(
        cmd.get(1).map(String::as_str),
        Some("serve"),
        "{label}: {cmd:?}"
    );

    // models/ lands where STREAMSERVE_MODELS points.
    let models = env
        .get("STREAMSERVE_MODELS")
        .unwrap_or_else(|| panic!("{label}: ENV STREAMSERVE_MODELS"));
    assert!(
        copies.iter().any(|c| c.from.is_none()
            && c.sources
                .iter()
                .any(|s| s.trim_end_matches('/') == "models")
            && c.dest.trim_end_matches('/') == models.trim_end_matches('/')),
        "{label}: COPY models/ {models}"
    );

    // libonnxruntime lands where the binary looks by default, taken from the pinned wheel.
    assert!(
        !env.contains_key("ORT_DYLIB_PATH"),
        "{label}: the library is found at its default path, no ORT_DYLIB_PATH needed"
    );
    let search = library_search_paths();
    assert!(
        search.contains(&"/usr/local/lib/libonnxruntime.so".to_string()),
        "src/runtime/mod.rs no longer looks in /usr/local/lib: {search:?}"
    );
    let lib = copies
        .iter()
        .find(|c| c.dest == "/usr/local/lib/libonnxruntime.so")
        .unwrap_or_else(|| panic!("{label}: COPY ... /usr/local/lib/libonnxruntime.so"));
    assert_eq!(lib.from.as_deref(), Some(ort_stage), "{label}");
    assert_eq!(lib.sources.len(), 1);
    assert!(
        lib.sources[0].ends_with(&format!("/onnxruntime/capi/libonnxruntime.so.{version}")),
        "{label}: {:?}",
        lib.sources
    );
    let pip = docker
        .stage(ort_stage)
        .all("RUN")
        .find(|r| r.contains("pip install"))
        .unwrap();
    let pip_words = words(pip);
    let target = pip_words
        .iter()
        .position(|w| w == "--target")
        .map(|i| pip_words[i + 1].clone())
        .expect("pip install --target <dir>");
    assert!(
        lib.sources[0].starts_with(&format!("{}/", target.trim_end_matches('/'))),
        "{label}: the library comes from the wheel installed in {target}"
    );

    // Runs as a user, serves on the port it exposes, stops on SIGTERM.
    let user = stage
        .last("USER")
        .unwrap_or_else(|| panic!("{label}: USER"));
    let uid = user.split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "{label}: runs as root");
    let port: u16 = env["STREAMSERVE_PORT"].parse().unwrap();
    assert_eq!(
        stage.exposed_ports(),
        vec![port, grpc_port(&env)],
        "{label}: EXPOSE (HTTP, gRPC)"
    );
    assert_eq!(stage.last("STOPSIGNAL"), Some("SIGTERM"), "{label}");

    // What the server writes is at absolute paths the image makes for its user: the defaults
    // are relative, and WORKDIR belongs to root (batch jobs failed there with 400).
    let gid = user.split(':').nth(1).unwrap_or(uid);
    let made = directories_made_for(stage, uid, gid);
    for key in ["STREAMSERVE_JOBS_DIR", "STREAMSERVE_REGISTRY_CACHE"] {
        let dir = env
            .get(key)
            .unwrap_or_else(|| panic!("{label}: ENV {key} (the default is relative to WORKDIR)"));
        assert!(dir.starts_with('/'), "{label}: {key}={dir} is not absolute");
        assert!(
            made.iter().any(|m| m.trim_end_matches('/') == dir.trim_end_matches('/')),
            "{label}: {key}={dir} is not made for {uid}:{gid} by `install -d -o {uid} -g {gid}` (made: {made:?})"
        );
    }
    assert_eq!(
        env["STREAMSERVE_HOST"], "0.0.0.0",
        "{label}: reachable from outside"
    );
    assert_eq!(env["STREAMSERVE_LOG_FORMAT"], "json", "{label}");
}

/// The directories a stage's RUN instructions make with `install -d -o <uid> -g <gid>`.
fn directories_made_for(stage: &Stage, uid: &str, gid: &str) -> Vec<String> {
    let mut made = Vec::new();
    for run in stage.all("RUN") {
        let words = words(run);
        for command in words.split(|w| w == "&&" || w == ";" || w == "||") {
            let [install, args @ ..] = command else {
                continue;
            };
            if install != "install" || !args.iter().any(|a| a == "-d") {
                continue;
            }
            let value = |flag: &str| args.iter().position(|a| a == flag).map(|i| &args[i + 1]);
            if value("-o").map(String::as_str) != Some(uid)
                || value("-g").map(String::as_str) != Some(gid)
            {
                continue;
            }
            let mut rest = args.iter();
            while let Some(arg) = rest.next() {
                if matches!(arg.as_str(), "-o" | "-g" | "-m") {
                    rest.next();
                } else if !arg.starts_with('-') {
                    made.push(arg.clone());
                }
            }
        }
    }
    made
}

#[test]
fn runtime_stages_put_binary_models_and_library_where_the_server_looks() {
    let docker = dockerfile();
    let cpu = docker.target(None);
    assert_eq!(
        cpu.name.as_deref(),
        Some("cpu"),
        "the default (last) stage is the CPU image"
    );
    assert_eq!(cpu.base, "debian:bookworm-slim");
    check_runtime_stage(&docker, cpu, "ort-cpu");

    let gpu = docker.stage("gpu");
    assert!(
        gpu.base.starts_with("nvidia/cuda:") && gpu.base.contains("cudnn-runtime"),
        "{}",
        gpu.base
    );
    check_runtime_stage(&docker, gpu, "ort-gpu");
    // The CUDA provider is loaded from libonnxruntime's own directory.
    let copied: Vec<String> = gpu
        .copies()
        .iter()
        .filter(|c| c.from.as_deref() == Some("ort-gpu"))
        .flat_map(|c| {
            c.sources
                .iter()
                .map(|s| Stage::copied_to(c, s))
                .collect::<Vec<_>>()
        })
        .collect();
    for lib in [
        "libonnxruntime_providers_shared.so",
        "libonnxruntime_providers_cuda.so",
    ] {
        assert!(
            copied.contains(&format!("/usr/local/lib/{lib}")),
            "{copied:?}"
        );
    }
    // Both images run the same server the same way.
    assert_eq!(gpu.env(), cpu.env());
    assert_eq!(gpu.cmd(), cpu.cmd());
}

#[test]
fn docker_context_keeps_what_the_build_needs() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect();
    assert!(
        !patterns.iter().any(|p| p.starts_with('!')),
        "exceptions are not understood by this check"
    );
    // A pattern excludes a path when it names the path or one of its parent directories
    // (`**/` matches at any depth); `*` is not used for anything the build needs.
    let excluded = |path: &str| {
        patterns.iter().any(|p| {
            let p = p.strip_prefix("**/").unwrap_or(p);
            let components: Vec<&str> = path.split('/').collect();
            (1..=components.len()).any(|n| {
                let prefix = components[..n].join("/");
                prefix == p || components[n - 1] == p
            })
        })
    };
    for heavy in ["target", ".venv", ".git"] {
        assert!(excluded(heavy), ".dockerignore should leave out {heavy}");
    }
    let cargo: Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".to_string(),
        "build.rs".to_string(),
        "proto/inference/grpc_service.proto".to_string(),
        "proto/grpc/health/v1/health.proto".to_string(),
        "src/main.rs".to_string(),
        "models/models.toml".to_string(),
    ];
    if let Some(members) = cargo
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(Value::as_array)
    {
        for member in members
            .iter()
            .filter_map(Value::as_str)
            .filter(|m| *m != ".")
        {
            needed.push(format!("{member}/Cargo.toml"));
            needed.push(format!("{member}/src"));
        }
    }
    for entry in std::fs::read_dir(repo().join("models")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        needed.push(format!("models/{name}"));
    }
    for path in needed {
        assert!(repo().join(&path).exists(), "{path} does not exist");
        assert!(
            !excluded(&path),
            ".dockerignore leaves out {path}, which the build needs"
        );
    }
}
