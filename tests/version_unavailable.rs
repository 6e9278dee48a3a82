//! A version the manifest lists but that cannot serve (refused at load: here a malformed
//! `probe.json`) is visible in `/metrics`: `streamserve_model_version_up` is 0 for it (1 for
//! the version beside it that serves), and the 503s its requests get are counted under its own
//! model and version, not with the 404s of unknown names, which still fold into `_unknown`.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_version_shows_as_down_and_its_refusals_under_its_own_name() {
    let dir = model_dir("");
    for version in ["1", "2"] {
        let target = dir.join("gone_mlp").join(version);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::copy(
            repo().join("models/mlp/1/model.onnx"),
            target.join("model.onnx"),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("gone_mlp/2/probe.json"),
        r#"{"inputs": [], "outputs": []}"#,
    )
    .unwrap();
    let entry = |v: &str| {
        format!("[[models]]\nname = \"gone_mlp\"\nversion = \"{v}\"\nfile = \"gone_mlp/{v}/model.onnx\"\nsha256 = \"{MLP_SHA}\"\nmax_batch_size = 64\n")
    };
    std::fs::write(
        dir.join("models.toml"),
        format!("{}\n{}", entry("1"), entry("2")),
    )
    .unwrap();
    let url = start(&dir, |_| {});
    let c = client();

    let text = metrics_text(&c, &url).await;
    let up = |text: &str, v: &str| {
        sample(
            text,
            &format!("streamserve_model_version_up{{model=\"gone_mlp\",version=\"{v}\"}}"),
        )
    };
    assert_eq!(up(&text, "2"), Some(0.0), "{text}");
    assert_eq!(up(&text, "1"), Some(1.0), "{text}");
    assert!(text.contains("# TYPE streamserve_model_version_up gauge"));

    let request = mlp_request(&features(1, 1));
    for _ in 0..3 {
        let (status, body) = post(
            &c,
            &format!("{url}/v2/models/gone_mlp/versions/2/infer"),
            &request,
        )
        .await;
        assert_eq!(status, 503, "{body}");
    }
    for i in 0..5 {
        let (status, _) = post(&c, &format!("{url}/v2/models/scan{i}/infer"), &request).await;
        assert_eq!(status, 404);
    }
    let text = metrics_text(&c, &url).await;
    assert_eq!(
        sample(
            &text,
            r#"streamserve_requests_total{model="gone_mlp",version="2",status="503"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"streamserve_requests_total{model="_unknown",version="",status="404"}"#
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"streamserve_requests_total{model="_unknown",version="",status="503"}"#
        ),
        None,
        "{text}"
    );
    assert!(
        !text.contains("scan0"),
        "a client's name mints no series:\n{text}"
    );
    assert_eq!(undescribed(&text), Vec::<String>::new(), "{text}");
}
