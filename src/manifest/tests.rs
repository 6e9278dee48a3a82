//! Tests of manifest parsing: defaults and overrides, refused manifests with their reasons,
//! input declarations, and version order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const HASH: &str = "00000000000000000000000000000000000000000000000000000000000000aa";

#[test]
fn defaults_apply_and_entries_override() {
    let text = format!(
        r#"
        [defaults]
        replicas = 2
        max_queue_delay_ms = 3

        [[models]]
        name = "a"
        version = "1"
        file = "a/1/model.onnx"
        sha256 = "{HASH}"
        max_batch_size = 8
        device = "cuda:1"
        fallback = "b"
        batch_axes = {{ state = 1, sr = "shared" }}

        [[models]]
        name = "b"
        version = "1"
        file = "b.onnx"
        sha256 = "{HASH}"
        replicas = 1
        "#
    );
    let m = Manifest::parse(Path::new("/m"), &text).unwrap();
    let a = &m.models[0];
    assert_eq!(a.replicas, 2);
    assert_eq!(a.device, Device::Cuda(1));
    assert_eq!(a.batching.max_batch_size, 8);
    assert_eq!(a.batching.max_queue_delay, Duration::from_millis(3));
    assert_eq!(a.file, PathBuf::from("/m/a/1/model.onnx"));
    assert_eq!(a.batch_axes["state"], BatchAxis::Axis(1));
    assert_eq!(a.batch_axes["sr"], BatchAxis::Shared);
    assert_eq!(m.models[1].replicas, 1);
    assert_eq!(m.models[1].batching.max_batch_size, 0);
}

#[test]
fn bad_manifests_are_refused_with_reasons() {
    let unknown_fallback =
        format!("[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\nfallback='zz'\n");
    let err = Manifest::parse(Path::new("."), &unknown_fallback).unwrap_err();
    assert!(err.to_string().contains("fallback 'zz'"), "{err}");
    let bad_device =
        format!("[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\ndevice='tpu'\n");
    let err = Manifest::parse(Path::new("."), &bad_device).unwrap_err();
    assert!(err.to_string().contains("cuda:N"), "{err}");
    let bad_hash = "[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='abc'\n";
    assert!(Manifest::parse(Path::new("."), bad_hash).is_err());
    let misspelt =
        format!("[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\nreplica=2\n");
    let err = Manifest::parse(Path::new("."), &misspelt).unwrap_err();
    assert!(err.to_string().contains("unknown field `replica`"), "{err}");
}

#[test]
fn input_declarations_and_non_finite_flag() {
    let text = format!(
        r#"
        [defaults]
        allow_non_finite = true

        [[models]]
        name = "vad"
        version = "1"
        file = "v.onnx"
        sha256 = "{HASH}"
        inputs.input = {{ shapes = [[-1, 576], [-1, 288]], paired_with = "sr" }}
        inputs.sr = {{ values = [16000, 8000] }}

        [[models]]
        name = "b"
        version = "1"
        file = "b.onnx"
        sha256 = "{HASH}"
        allow_non_finite = false
        "#
    );
    let m = Manifest::parse(Path::new("/m"), &text).unwrap();
    let vad = &m.models[0];
    assert!(vad.allow_non_finite, "from [defaults]");
    assert!(!m.models[1].allow_non_finite, "the entry overrides");
    assert_eq!(
        vad.inputs["input"].shapes,
        vec![vec![-1, 576], vec![-1, 288]]
    );
    assert_eq!(vad.inputs["input"].paired_with.as_deref(), Some("sr"));
    assert_eq!(
        vad.inputs["sr"].values,
        vec![AllowedValue::Int(16000), AllowedValue::Int(8000)]
    );
    assert!(m.models[1].inputs.is_empty());
    let plain = format!("[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\n");
    assert!(!Manifest::parse(Path::new("."), &plain).unwrap().models[0].allow_non_finite);
}

#[test]
fn bad_input_declarations_are_refused() {
    let refused = |decl: &str| {
        let text =
            format!("[[models]]\nname='a'\nversion='1'\nfile='a'\nsha256='{HASH}'\n{decl}\n");
        Manifest::parse(Path::new("."), &text)
            .unwrap_err()
            .to_string()
    };
    assert!(refused("inputs.x = { shape = [[1]] }").contains("unknown field `shape`"));
    assert!(refused("inputs.x = {}").contains("neither shapes nor values"));
    assert!(refused("inputs.x = { shapes = [[-2, 3]] }").contains("below -1"));
    assert!(refused("inputs.x = { values = [1, 1] }").contains("listed twice"));
    assert!(
        refused("inputs.x = { shapes = [[1], [2]], paired_with = 'y' }")
            .contains("must be another input declared with values")
    );
    assert!(
        refused("inputs.x = { shapes = [[1]], paired_with = 'x', values = [1] }")
            .contains("must be another input")
    );
    let mismatch = refused(
        "inputs.x = { shapes = [[1], [2]], paired_with = 'y' }\ninputs.y = { values = [1] }",
    );
    assert!(
        mismatch.contains("one shape per value of 'y' (2 shapes, 1 values)"),
        "{mismatch}"
    );
    assert!(refused("allow_non_finite = 'yes'").contains("allow_non_finite"));
}

#[test]
fn versions_order_numerically() {
    assert_eq!(compare_versions("10", "9"), std::cmp::Ordering::Greater);
    assert_eq!(compare_versions("b", "a"), std::cmp::Ordering::Greater);
}
