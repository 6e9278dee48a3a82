//! What a store must never show: credentials. An `object_store` error is cut to one line
//! without presigned queries and with every credential of the environment replaced
//! ([`short`]), and a registry URI that carries credentials itself is refused
//! ([`refuse_userinfo`]), since the URI is logged, reported and shown.

use super::RegistryError;

/// Schemes whose URI names a container as `container@account` (Azure): a user part without
/// a password is no credential there.
const ACCOUNT_SCHEMES: &[&str] = &["az", "azure", "abfs", "abfss", "adl"];

/// Refuses a URI with credentials in it (`s3://KEY:SECRET@bucket/prefix`): the URI is logged,
/// reported and shown by `registry status`, so it must hold no secret. The error does not
/// repeat the URI.
pub(super) fn refuse_userinfo(uri: &str) -> Result<(), RegistryError> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Ok(());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return Ok(());
    };
    let account = ACCOUNT_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str());
    if account && !userinfo.contains(':') {
        return Ok(());
    }
    Err(RegistryError::Config(
        "the registry URI has credentials in it (user:password@); they would be logged and \
         shown: remove them from the URI and give them in the environment instead \
         (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; GOOGLE_SERVICE_ACCOUNT; \
         AZURE_STORAGE_ACCOUNT_KEY)"
            .into(),
    ))
}

/// Environment variables whose values must never reach a log line or an answer, even when a
/// store quotes them back (S3 names the access key in some error bodies).
const SECRET_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
];

/// An `object_store` error in one line, without the request's URL query (which may carry a
/// signature), the debug chains that repeat it, or any credential.
pub(super) fn short(e: &object_store::Error) -> String {
    let secrets: Vec<String> = SECRET_VARS
        .iter()
        .filter_map(|var| std::env::var(var).ok())
        .collect();
    scrub(&e.to_string(), &secrets)
}

/// `text`'s first line, at most 300 characters, cut before a presigned query, with every
/// secret (of 4 characters or more) replaced.
fn scrub(text: &str, secrets: &[String]) -> String {
    let mut line = text.lines().next().unwrap_or_default().to_string();
    // Redact before cutting: a secret across the cut would leave its first characters.
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        line = line.replace(secret.as_str(), "<redacted>");
    }
    if let Some(at) = line.find("X-Amz-") {
        line.truncate(at);
    }
    line.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::{refuse_userinfo, scrub};
    use crate::registry::Store;

    #[test]
    fn credentials_in_the_uri_are_refused_without_being_repeated() {
        for uri in [
            "s3://AKIALEAKED:leakedSecret123@bucket/reg",
            "s3://AKIALEAKED@bucket/reg",
            "gs://user:leakedSecret123@bucket/reg",
            "az://container:leakedSecret123@account/reg",
        ] {
            let Err(e) = Store::open(uri) else {
                panic!("{uri} was accepted")
            };
            let text = e.to_string();
            assert!(text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");
            assert!(
                !text.contains("leaked") && !text.contains("AKIA"),
                "the error repeats the URI: {text}"
            );
        }
        // A container in an Azure URI is no credential.
        assert!(refuse_userinfo("abfss://fs@account.dfs.core.windows.net/reg").is_ok());
    }

    #[test]
    fn errors_lose_credentials_signatures_and_length() {
        let secrets = vec!["AKIAEXAMPLE".to_string(), "s3cr3t/key+value".to_string()];
        let text = "Error performing GET http://s3/bucket/x?X-Amz-Signature=abc: <AWSAccessKeyId>AKIAEXAMPLE</AWSAccessKeyId>";
        assert_eq!(
            scrub(text, &secrets),
            "Error performing GET http://s3/bucket/x?"
        );
        let text = "403 Forbidden: key AKIAEXAMPLE with s3cr3t/key+value\nsecond line";
        assert_eq!(
            scrub(text, &secrets),
            "403 Forbidden: key <redacted> with <redacted>"
        );
        assert_eq!(scrub(&"x".repeat(1000), &[]).len(), 300);
    }
}
