//! gRPC over TLS: with `--grpc-tls-cert` and `--grpc-tls-key` the gRPC listener takes TLS
//! only (a tonic client trusting the certificate is served; a plaintext one is not), and a
//! certificate or key that cannot be read or parsed stops the start with the file's name and
//! never the key.

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use streamserve::api::grpc::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use streamserve::api::grpc::proto::inference::model_infer_request::InferInputTensor;
use streamserve::api::grpc::proto::inference::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A self-signed certificate for localhost and 127.0.0.1, and its key, as PEM files.
fn certificate() -> (PathBuf, PathBuf, String) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let made = rcgen::generate_simple_self_signed(names).unwrap();
    let dir = common::fleet::temp_dir("grpc-tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let pem = made.cert.pem();
    std::fs::write(&cert, &pem).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key, pem)
}

fn infer_request() -> ModelInferRequest {
    let x = features(5, 1);
    ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![1, 256],
            ..Default::default()
        }],
        raw_input_contents: vec![x.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    }
}

#[tokio::test]
async fn grpc_over_tls_serves_a_client_that_trusts_the_certificate_and_no_plaintext_one() {
    let (cert, key, pem) = certificate();
    let running = start_running(&repo().join("models"), |config| {
        config.grpc_tls_cert = Some(cert.clone());
        config.grpc_tls_key = Some(key.clone());
    });
    let port = running.grpc_addr.unwrap().port();

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("a TLS client connects");
    let mut c = GrpcInferenceServiceClient::new(channel);
    let ready = c.server_ready(ServerReadyRequest {}).await.unwrap();
    assert!(ready.into_inner().ready);
    let answer = c.model_infer(infer_request()).await.unwrap().into_inner();
    assert_eq!(answer.model_name, "mlp");
    assert_eq!(answer.raw_output_contents[0].len(), 16 * 4, "16 logits");

    // Plaintext HTTP/2 to the TLS port gets nowhere.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let refused = GrpcInferenceServiceClient::new(channel)
            .server_ready(ServerReadyRequest {})
            .await;
        assert!(refused.is_err(), "a plaintext call must fail: {refused:?}");
    }

    // A client that does not trust the certificate is refused by its own TLS check.
    let stranger = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().domain_name("localhost"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = stranger {
        let refused = GrpcInferenceServiceClient::new(channel)
            .server_ready(ServerReadyRequest {})
            .await;
        assert!(
            refused.is_err(),
            "an untrusted certificate must fail: {refused:?}"
        );
    }
}

#[test]
fn a_certificate_or_key_that_cannot_be_used_stops_the_start() {
    let (cert, key, _) = certificate();
    let garbage = cert.with_file_name("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN PRIVATE KEY-----\nnot a key\n").unwrap();
    let start = |cert: &PathBuf, key: &PathBuf| {
        let output = Command::new(env!("CARGO_BIN_EXE_streamserve"))
            // Neither ONNX Runtime nor a model directory exists: the TLS files must be
            // found unusable before either is looked for, as a taken port is.
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--models"])
            .arg("/nonexistent-models")
            .arg("--grpc-tls-cert")
            .arg(cert)
            .arg("--grpc-tls-key")
            .arg(key)
            .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
            .output()
            .unwrap();
        assert!(!output.status.success(), "the start must fail");
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            !log.contains("onnxruntime") && !log.contains("manifest"),
            "the TLS files are checked before the models load: {log}"
        );
        log
    };
    let missing = start(&cert, &cert.with_file_name("nosuch.pem"));
    assert!(
        missing.contains("cannot read the gRPC TLS key") && missing.contains("nosuch.pem"),
        "{missing}"
    );
    let malformed = start(&cert, &garbage);
    assert!(
        malformed.contains("gRPC TLS") && malformed.contains("garbage.pem"),
        "{malformed}"
    );
    assert!(
        !malformed.contains("not a key"),
        "the key's text is never printed"
    );
    let _ = std::fs::remove_file(&key);
}
