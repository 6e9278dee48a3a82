//! Triton's model repository extension, which `/v2` advertises: the index (`ready` filter),
//! load and unload, over REST and gRPC against the real server on the bundled models. Load
//! and unload take the admin token; what cannot be honoured (a configuration or files sent
//! with a load, another repository) is refused, and a client inferring meanwhile is unharmed.

use crate::common;

use common::*;
use serde_json::{json, Value};
use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use streamserve::api::grpc::proto::inference::model_repository_parameter::ParameterChoice;
use streamserve::api::grpc::proto::inference::*;
use tonic::Code;

const TOKEN: &str = "repository-test-token";

/// POSTs `body` (None: no body) with `token` as the bearer, and returns the status and text.
async fn call(
    c: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut request = c.post(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn ready_rows(c: &reqwest::Client, base: &str, body: Option<Value>) -> Vec<Value> {
    let (status, text) = call(c, &format!("{base}/v2/repository/index"), None, body).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn has(rows: &[Value], name: &str) -> bool {
    rows.iter().any(|row| row["name"] == name)
}

#[tokio::test]
async fn load_and_unload_over_rest_follow_the_triton_extension() {
    let base = start(&repo().join("models"), |config| {
        config.admin_token = Some(TOKEN.into());
    });
    let c = client();
    let load = format!("{base}/v2/repository/models/mlp/load");
    let unload = format!("{base}/v2/repository/models/mlp/unload");

    // Load and unload change what the server holds: the admin token, always.
    let (status, text) = call(&c, &unload, None, None).await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = call(&c, &unload, Some("wrong"), None).await;
    assert_eq!(status, 401, "{text}");
    let (status, _) = post(
        &c,
        &format!("{base}/v2/models/mlp/infer"),
        &mlp_request(&features(1, 1)),
    )
    .await;
    assert_eq!(status, 200, "a refused unload unloads nothing");

    // tritonclient's unload_model sends exactly this body.
    let (status, text) = call(
        &c,
        &unload,
        Some(TOKEN),
        Some(json!({"parameters": {"unload_dependents": false}})),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (200, ""),
        "Triton answers an empty 200"
    );
    let all = ready_rows(&c, &base, None).await;
    let ready = ready_rows(&c, &base, Some(json!({"ready": true}))).await;
    assert!(
        has(&all, "mlp") && !has(&ready, "mlp"),
        "unloaded: listed, not ready: {ready:?}"
    );
    assert!(has(&ready, "mlp_small"), "other models stay ready");
    let row = all.iter().find(|row| row["name"] == "mlp").unwrap();
    assert_eq!(row["state"], "UNLOADED", "{row}");

    // tritonclient's load_model sends `{}`; answered once the version serves.
    let (status, text) = call(&c, &load, Some(TOKEN), Some(json!({}))).await;
    assert_eq!((status, text.as_str()), (200, ""));
    assert!(has(
        &ready_rows(&c, &base, Some(json!({"ready": true}))).await,
        "mlp"
    ));

    // What cannot be honoured is refused, naming what was sent.
    let refused = [
        (
            json!({"parameters": {"config": "{\"max_batch_size\": 8}"}}),
            400,
            "'config'",
        ),
        (
            json!({"parameters": {"file:1/model.onnx": "AAAA"}}),
            400,
            "'file:1/model.onnx'",
        ),
        (json!({"model": "mlp"}), 400, "unknown field"),
        (json!([1, 2]), 400, "malformed repository request"),
    ];
    for (body, code, needle) in refused {
        let (status, text) = call(&c, &load, Some(TOKEN), Some(body.clone())).await;
        assert_eq!(status, code, "{body}: {text}");
        assert!(text.contains(needle), "{body}: {text}");
    }
    let (status, text) = call(
        &c,
        &unload,
        Some(TOKEN),
        Some(json!({"parameters": {"unload_dependents": "yes"}})),
    )
    .await;
    assert!(
        status == 400 && text.contains("true or false"),
        "{status} {text}"
    );
    let (status, text) = call(
        &c,
        &format!("{base}/v2/repository/models/nope/load"),
        Some(TOKEN),
        None,
    )
    .await;
    assert!(status == 404 && text.contains("nope"), "{status} {text}");
    let (status, _) = c
        .get(&load)
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 405, "a known path with the wrong method");

    // The refusals left the version serving.
    let (status, _) = post(
        &c,
        &format!("{base}/v2/models/mlp/infer"),
        &mlp_request(&features(2, 1)),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn without_an_admin_token_load_and_unload_are_off() {
    let base = start(&repo().join("models"), |_| {});
    let c = client();
    for action in ["load", "unload"] {
        let url = format!("{base}/v2/repository/models/mlp/{action}");
        let (status, text) = call(&c, &url, Some("anything"), None).await;
        assert!(
            status == 404 && text.contains("--admin-token"),
            "{action}: {status} {text}"
        );
    }
    // The index stays public, as /v2/models is.
    assert!(has(
        &ready_rows(&c, &base, Some(json!({"ready": true}))).await,
        "mlp"
    ));
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn unload_request(repository: &str, dependents: ParameterChoice) -> RepositoryModelUnloadRequest {
    RepositoryModelUnloadRequest {
        repository_name: repository.into(),
        model_name: "mlp".into(),
        parameters: [(
            "unload_dependents".to_string(),
            ModelRepositoryParameter {
                parameter_choice: Some(dependents),
            },
        )]
        .into(),
    }
}

async fn ready_names(c: &mut GrpcInferenceServiceClient<tonic::transport::Channel>) -> Vec<String> {
    c.repository_index(RepositoryIndexRequest {
        repository_name: String::new(),
        ready: true,
    })
    .await
    .unwrap()
    .into_inner()
    .models
    .into_iter()
    .map(|m| m.name)
    .collect()
}

#[tokio::test]
async fn load_and_unload_over_grpc_take_the_admin_token() {
    let running = start_running(&repo().join("models"), |config| {
        config.admin_token = Some(TOKEN.into());
    });
    let endpoint = format!("http://{}", running.grpc_addr.expect("gRPC is on"));
    let mut c = GrpcInferenceServiceClient::connect(endpoint).await.unwrap();
    let dependents = || ParameterChoice::BoolParam(false);

    let refused = c
        .repository_model_unload(unload_request("", dependents()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = c
        .repository_model_unload(with_token(unload_request("", dependents()), "wrong"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = c
        .repository_model_unload(with_token(unload_request("elsewhere", dependents()), TOKEN))
        .await
        .unwrap_err();
    assert!(
        refused.code() == Code::InvalidArgument && refused.message().contains("elsewhere"),
        "{refused:?}"
    );
    let refused = c
        .repository_model_unload(with_token(
            unload_request("", ParameterChoice::StringParam("no".into())),
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(ready_names(&mut c).await.contains(&"mlp".to_string()));

    c.repository_model_unload(with_token(unload_request("", dependents()), TOKEN))
        .await
        .expect("unloaded");
    assert!(!ready_names(&mut c).await.contains(&"mlp".to_string()));

    let load = |parameters: Vec<(&str, ParameterChoice)>| RepositoryModelLoadRequest {
        repository_name: String::new(),
        model_name: "mlp".into(),
        parameters: parameters
            .into_iter()
            .map(|(name, choice)| {
                (
                    name.to_string(),
                    ModelRepositoryParameter {
                        parameter_choice: Some(choice),
                    },
                )
            })
            .collect(),
    };
    let refused = c
        .repository_model_load(with_token(
            load(vec![("config", ParameterChoice::StringParam("{}".into()))]),
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert!(
        refused.code() == Code::InvalidArgument && refused.message().contains("'config'"),
        "{refused:?}"
    );
    c.repository_model_load(with_token(load(vec![]), TOKEN))
        .await
        .expect("loaded");
    assert!(ready_names(&mut c).await.contains(&"mlp".to_string()));
}

/// Triton's unload takes the model out, not one version of it: with two versions of `mlp`
/// serving, both are unloaded (each drained), where before only the default was and the other
/// went on serving. A request for either version loads it again, as after an idle unload.
#[tokio::test]
async fn an_unload_takes_every_loaded_version_out() {
    let manifest = mlp_entry("1", "max_batch_size = 64") + &mlp_entry("2", "max_batch_size = 64");
    let base = start(&model_dir(&manifest), |config| {
        config.admin_token = Some(TOKEN.into());
    });
    let c = client();
    let states = |rows: Vec<Value>| -> Vec<(String, String)> {
        rows.iter()
            .filter(|row| row["name"] == "mlp")
            .map(|row| {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (text(&row["version"]), text(&row["state"]))
            })
            .collect()
    };
    let ready = |v: &str| (v.to_string(), "READY".to_string());
    let unloaded = |v: &str| (v.to_string(), "UNLOADED".to_string());
    assert_eq!(
        states(ready_rows(&c, &base, None).await),
        [ready("1"), ready("2")]
    );

    let unload = format!("{base}/v2/repository/models/mlp/unload");
    let (status, text) = call(&c, &unload, Some(TOKEN), None).await;
    assert_eq!((status, text.as_str()), (200, ""));
    assert_eq!(
        states(ready_rows(&c, &base, None).await),
        [unloaded("1"), unloaded("2")],
        "every version is unloaded, not only the default"
    );

    for version in ["1", "2"] {
        let (status, body) = post(
            &c,
            &format!("{base}/v2/models/mlp/versions/{version}/infer"),
            &mlp_request(&features(7, 1)),
        )
        .await;
        assert_eq!(status, 200, "version {version} loads again: {body}");
    }
    // Unloading a model that is not loaded at all is a no-op, as Triton's is.
    let (status, _) = call(&c, &unload, Some(TOKEN), None).await;
    assert_eq!(status, 200);
    let (status, _) = call(&c, &unload, Some(TOKEN), None).await;
    assert_eq!(status, 200);
}
