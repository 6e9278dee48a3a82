//! Access control at the door, for every inference surface (REST, WebSocket streams, gRPC):
//! who is calling (an API key, or
//! the client's address), which models they may call, and their limits (requests/s with a
//! burst, rows/s, requests in flight, open streams, audio per minute). Off unless
//! `--api-keys` (or `--client-requests-per-sec`) is set, so a first run needs nothing.
//!
//! - [`keys`]: the keys file (hashes, scopes, limits, priority, expiry).
//! - [`limits`]: each key's live token buckets and semaphores.
//! - [`client`]: the client's address, trusting forwarding headers only from known proxies.
//! - [`audit`]: one log event per refusal, itself rate-limited.
//!
//! Keys are never logged nor put in metrics (only their names), and a presented key is
//! compared with every stored hash in constant time. Refusals: 401 (no key, or not a valid
//! one: the answer does not say which keys exist), 403 (a valid key outside its models), 429
//! with Retry-After (over a limit), 400 (one request more than a limit ever lets through).

pub mod audit;
pub mod client;
pub mod keys;
pub mod limits;

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use actix_web::http::header::{HeaderName, AUTHORIZATION};
use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::actors::served::Priority;
use crate::config::Config;
use crate::error::ServeError;
use crate::untrusted::Untrusted;
use limits::Key;

/// Request headers, from whichever protocol: HTTP headers, or gRPC metadata.
pub trait Headers {
    fn first(&self, name: &str) -> Option<&str>;
    fn all(&self, name: &str) -> Vec<&str>;
}

impl Headers for actix_web::http::header::HeaderMap {
    fn first(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
    fn all(&self, name: &str) -> Vec<&str> {
        self.get_all(name).filter_map(|v| v.to_str().ok()).collect()
    }
}

impl Headers for tonic::metadata::MetadataMap {
    fn first(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
    fn all(&self, name: &str) -> Vec<&str> {
        self.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }
}

/// The WebSocket subprotocols a handshake offers (`Sec-WebSocket-Protocol`), in order.
pub fn subprotocols(headers: &dyn Headers) -> Vec<&str> {
    headers
        .all("sec-websocket-protocol")
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect()
}

/// How often the keys file is checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The keys file and the table read from it.
struct KeysFile {
    path: PathBuf,
    table: ArcSwap<Vec<Arc<Key>>>,
    /// What the file held when last read (a hash of its contents), or why it could not be
    /// read: a change is one of the contents, not of the modification time, which a rewrite in
    /// place can leave as it was (coarse clocks, `cp -p`, a file truncated then filled within
    /// one tick), so that the filled file would never be read.
    seen: Mutex<Result<[u8; 32], std::io::ErrorKind>>,
}

pub struct Access {
    keys: Option<KeysFile>,
    /// The server's secret for `hmac_sha256` keys.
    secret: Option<Vec<u8>>,
    header: HeaderName,
    /// Keyed by [`address_bucket`].
    per_address: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_address_rate: u32,
    proxies: client::TrustedProxies,
    /// Shared with each stream's [`StreamPass`], whose audio refusals it counts and logs.
    audit: Arc<audit::Audit>,
}

/// A caller let in, for one request or stream: who it is, and the permits it holds.
pub struct Pass {
    key: Option<Arc<Key>>,
    pub address: Option<IpAddr>,
    /// The model it was let in for, as the request named it (for the audit of a later
    /// refusal: a stream's audio).
    model: String,
    _in_flight: Option<limits::Held>,
}

impl Pass {
    /// The same caller, no longer holding a place among its key's requests in flight (for
    /// checks made later, such as a stream's version on a takeover).
    pub fn without_permit(mut self) -> Pass {
        self._in_flight = None;
        self
    }

    /// Who the caller is, for logs and metrics: the key's name, or `-`.
    pub fn name(&self) -> &str {
        self.key.as_ref().map_or("-", |k| k.spec.name.as_str())
    }

    /// The lane its requests take.
    pub fn priority(&self) -> Priority {
        self.key
            .as_ref()
            .map_or(Priority::Normal, |k| k.spec.priority)
    }
}

/// A stream's place among its key's open streams, given back when dropped: held by what lives
/// as long as the stream, its session (which outlives its connections for the resume window),
/// or a call that is the whole stream.
pub struct StreamPlace {
    _held: Option<limits::Held>,
}

/// A stream's connection let in: the key's audio allowance, and for a stream that lives and
/// dies with its call, the stream's place.
pub struct StreamPass {
    key: Option<Arc<Key>>,
    _place: StreamPlace,
    /// Where an audio refusal is counted and logged, as every refusal is.
    audit: Arc<audit::Audit>,
    model: String,
    address: Option<IpAddr>,
}

impl StreamPass {
    /// `ms` milliseconds of the stream's audio, against the key's audio per minute.
    pub fn audio(&self, ms: u32) -> Result<(), ServeError> {
        let Some(key) = &self.key else { return Ok(()) };
        key.audio(ms).inspect_err(|error| {
            self.audit.refused_as(
                &key.spec.name,
                &self.model,
                self.address,
                audit::RATE_LIMITED,
                error,
            );
        })
    }

    /// [`audio`](Self::audio) for `samples` samples at `sample_rate`, rounded up to a ms.
    pub fn audio_samples(&self, samples: usize, sample_rate: u32) -> Result<(), ServeError> {
        let ms = (samples as u64 * 1000).div_ceil(u64::from(sample_rate.max(1)));
        self.audio(ms.min(u64::from(u32::MAX)) as u32)
    }
}

impl Access {
    /// Whether callers need an API key (the server has a keys file).
    pub fn requires_keys(&self) -> bool {
        self.keys.is_some()
    }

    pub fn from_config(config: &Config) -> Result<Access, String> {
        let secret = config
            .api_key_secret_file
            .as_deref()
            .map(keys::read_secret)
            .transpose()?;
        let keys = match &config.api_keys {
            None => None,
            Some(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("cannot read API keys file {}: {e}", path.display()))?;
                let specs = keys::from_bytes(path, &bytes, secret.is_some())?;
                tracing::info!(file = %path.display(), keys = specs.len(), "API keys required for inference");
                Some(KeysFile {
                    path: path.clone(),
                    table: ArcSwap::from_pointee(Key::rebuild(specs, &[])),
                    seen: Mutex::new(Ok(Sha256::digest(&bytes).into())),
                })
            }
        };
        let header =
            HeaderName::from_bytes(config.api_key_header.trim().as_bytes()).map_err(|_| {
                format!(
                    "api_key_header '{}' is not a header name",
                    config.api_key_header
                )
            })?;
        let per_address = NonZeroU32::new(config.client_requests_per_sec).map(|rate| {
            let burst = rate.saturating_mul(NonZeroU32::new(2).expect("2 is not 0"));
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Ok(Access {
            keys,
            secret,
            header,
            per_address,
            per_address_rate: config.client_requests_per_sec,
            proxies: client::TrustedProxies::parse(
                config.trusted_proxies.as_deref().unwrap_or(""),
            )?,
            audit: Arc::default(),
        })
    }

    /// Re-reads the keys file if its contents changed since it was read; a file that cannot be
    /// read or no longer parses (or declares no keys) leaves the table as it was, and says why
    /// in the log, once for each change.
    pub fn reload_if_changed(&self) {
        let Some(file) = &self.keys else { return };
        let read = std::fs::read(&file.path);
        let now = read
            .as_ref()
            .map(|bytes| Sha256::digest(bytes).into())
            .map_err(std::io::Error::kind);
        let mut seen = file.seen.lock().unwrap_or_else(|e| e.into_inner());
        if now == *seen {
            return;
        }
        *seen = now;
        let loaded = read
            .map_err(|e| format!("cannot read API keys file {}: {e}", file.path.display()))
            .and_then(|bytes| keys::from_bytes(&file.path, &bytes, self.secret.is_some()));
        match loaded {
            Ok(specs) => {
                let table = Key::rebuild(specs, &file.table.load());
                tracing::info!(file = %file.path.display(), keys = table.len(), "API keys reloaded");
                file.table.store(Arc::new(table));
            }
            Err(reason) => {
                tracing::error!(%reason, "API keys file not reloaded; the previous keys stay in force")
            }
        }
    }

    /// The key a request presents, if any: `Authorization: Bearer <key>`, or the configured
    /// header's bare value; for a WebSocket handshake also a `bearer.<key>` subprotocol,
    /// since browsers cannot set headers there.
    fn presented<'a>(&self, headers: &'a dyn Headers) -> Option<&'a str> {
        let value = headers.first(self.header.as_str());
        let from_header = if self.header == AUTHORIZATION {
            value.and_then(bearer)
        } else {
            value.map(str::trim)
        };
        from_header.or_else(|| {
            subprotocols(headers)
                .into_iter()
                .find_map(|p| p.strip_prefix("bearer."))
        })
    }

    /// Creates at 0 `streamserve_access_refused_total` of every key name and reason that a
    /// refusal can have here (each key's, `-` for a caller without a valid key), so that
    /// `rate()` sees a first burst of refusals. Called for each scrape: a reload's new keys
    /// are there from the next.
    pub fn register_refusal_series(&self) {
        match &self.keys {
            Some(file) => {
                audit::register_series("-", &[audit::UNAUTHENTICATED]);
                for key in file.table.load().iter() {
                    audit::register_series(&key.spec.name, &audit::KEY_REASONS);
                }
            }
            None if self.per_address.is_some() => {
                audit::register_series("-", &[audit::RATE_LIMITED]);
            }
            None => {}
        }
    }

    /// The stored key whose hash matches, compared with every key in constant time.
    fn find(&self, table: &[Arc<Key>], presented: &str) -> Option<Arc<Key>> {
        let plain = keys::hash(presented);
        let keyed = self
            .secret
            .as_deref()
            .map(|s| keys::keyed_hash(s, presented));
        let mut found = None;
        for key in table {
            let hash = match (&keyed, key.spec.keyed) {
                (Some(keyed), true) => keyed,
                _ => &plain,
            };
            if bool::from(key.spec.hash.ct_eq(hash)) {
                found = Some(key.clone());
            }
        }
        found
    }

    /// Lets a request for `model` in, or says why not. `peer` is the socket's address.
    pub fn admit(
        &self,
        headers: &dyn Headers,
        peer: Option<IpAddr>,
        model: &str,
    ) -> Result<Pass, ServeError> {
        let address = self.proxies.client(peer, headers);
        let refuse = |name: &str, error: ServeError| {
            self.audit.refused(name, model, address, &error);
            error
        };
        let Some(file) = &self.keys else {
            if let (Some(limiter), Some(ip)) = (&self.per_address, address) {
                limiter.check_key(&address_bucket(ip)).map_err(|_| {
                    refuse(
                        "-",
                        ServeError::RateLimited {
                            what: format!(
                                "this client address is over its limit of {} requests/s",
                                self.per_address_rate
                            ),
                            retry_after: Duration::from_secs(1),
                        },
                    )
                })?;
            }
            return Ok(Pass {
                key: None,
                address,
                model: model.to_string(),
                _in_flight: None,
            });
        };
        let Some(presented) = self.presented(headers) else {
            return Err(refuse(
                "-",
                ServeError::Unauthenticated(format!(
                    "an API key is required: send it as {}",
                    self.how_to_send()
                )),
            ));
        };
        let table = file.table.load();
        let Some(key) = self.find(&table, presented) else {
            return Err(refuse(
                "-",
                ServeError::Unauthenticated("the API key is not valid".into()),
            ));
        };
        let name = key.spec.name.as_str();
        if key.spec.expires.is_some_and(|t| t <= SystemTime::now()) {
            return Err(refuse(
                name,
                ServeError::Unauthenticated("the API key has expired".into()),
            ));
        }
        if !key.spec.scopes.iter().any(|s| s.names(model)) {
            return Err(refuse(
                name,
                ServeError::Forbidden(format!(
                    "this API key may not call model '{}'",
                    Untrusted(model)
                )),
            ));
        }
        let in_flight = key.request().map_err(|e| refuse(name, e))?;
        Ok(Pass {
            key: Some(key),
            address,
            model: model.to_string(),
            _in_flight: in_flight,
        })
    }

    /// Who a refused request is, for its access line, as its audit event names it: the name
    /// of the stored key it presents (refused for its scope, a limit or its expiry, or let in
    /// and then refused further on), `-` for no key or one that is not valid. Never the key.
    /// A refusal's [`admit`](Self::admit) has no [`Pass`] to ask; this looks the key up again
    /// (a hash and the constant-time comparisons: only refusals pay it).
    pub fn caller_name(&self, headers: &dyn Headers) -> String {
        let (Some(file), Some(presented)) = (&self.keys, self.presented(headers)) else {
            return "-".into();
        };
        self.find(&file.table.load(), presented)
            .map_or_else(|| "-".into(), |key| key.spec.name.clone())
    }

    fn how_to_send(&self) -> String {
        if self.header == AUTHORIZATION {
            "Authorization: Bearer <key>".into()
        } else {
            format!("{}: <key>", self.header)
        }
    }

    /// After the version is resolved: whether the key may call that version.
    pub fn check_version(&self, pass: &Pass, model: &str, version: &str) -> Result<(), ServeError> {
        let Some(key) = &pass.key else { return Ok(()) };
        if key.spec.scopes.iter().any(|s| s.covers(model, version)) {
            return Ok(());
        }
        let error = ServeError::Forbidden(format!(
            "this API key may not call version '{version}' of model '{model}'"
        ));
        self.audit
            .refused(&key.spec.name, model, pass.address, &error);
        Err(error)
    }

    /// After decoding: the request's rows against the key's rows/s (429 over it; 400 for a
    /// request of more rows than it ever lets through, counted as `rate_limited` too).
    pub fn check_rows(&self, pass: &Pass, model: &str, rows: usize) -> Result<(), ServeError> {
        let Some(key) = &pass.key else { return Ok(()) };
        key.rows(rows).inspect_err(|error| {
            self.audit.refused_as(
                &key.spec.name,
                model,
                pass.address,
                audit::RATE_LIMITED,
                error,
            );
        })
    }

    /// A stream that lives and dies with its call (a whole file, a `Speech` call): its key's
    /// audio allowance, holding a place among the key's open streams.
    pub fn stream(&self, pass: &Pass, model: &str) -> Result<StreamPass, ServeError> {
        Ok(StreamPass {
            key: pass.key.clone(),
            _place: self.stream_place(pass, model)?,
            audit: self.audit.clone(),
            model: model.to_string(),
            address: pass.address,
        })
    }

    /// A connection to a stream whose session holds its place ([`stream_place`](Self::stream_place)):
    /// the key's audio allowance alone. A resume of a stream the key holds is never refused
    /// for the key's open streams.
    pub fn stream_allowance(&self, pass: &Pass) -> StreamPass {
        StreamPass {
            key: pass.key.clone(),
            _place: StreamPlace { _held: None },
            audit: self.audit.clone(),
            model: pass.model.clone(),
            address: pass.address,
        }
    }

    /// A new stream's place among its key's open streams, or the refusal (429) at its limit.
    pub fn stream_place(&self, pass: &Pass, model: &str) -> Result<StreamPlace, ServeError> {
        let Some(key) = &pass.key else {
            return Ok(StreamPlace { _held: None });
        };
        let held = key.stream().inspect_err(|error| {
            self.audit
                .refused(&key.spec.name, model, pass.address, error);
        })?;
        Ok(StreamPlace { _held: held })
    }

    /// The place of a stream taken over from its checkpoint: counted, even past the key's
    /// limit, never refused (the key was let in when the stream began, on whichever instance).
    pub fn resumed_stream_place(&self, pass: &Pass) -> StreamPlace {
        StreamPlace {
            _held: pass.key.as_ref().and_then(|key| key.resumed_stream()),
        }
    }

    /// Forgets addresses not seen lately (the per-address buckets would otherwise grow with
    /// every client ever seen).
    pub fn forget_idle_addresses(&self) {
        if let Some(limiter) = &self.per_address {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The key of `Authorization: <scheme> <key>` when the scheme is Bearer, which is
/// case-insensitive (RFC 7235: `bearer` and `BEARER` are Bearer too).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Whose per-address bucket a client's requests count in: its address, an IPv4 one written as
/// IPv6 (`::ffff:a.b.c.d`, from a dual-stack socket) as IPv4, and an IPv6 one by its /64, as a
/// host is given a whole /64 and could otherwise take a fresh address, and so a fresh bucket,
/// for every request.
fn address_bucket(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer ssk_1"), Some("ssk_1"));
        assert_eq!(bearer("bearer ssk_1"), Some("ssk_1"));
        assert_eq!(bearer("BEARER   ssk_1 "), Some("ssk_1"));
        assert_eq!(bearer("Bearer\tssk_1"), Some("ssk_1"));
        assert_eq!(bearer("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer("Bearerssk_1"), None);
        assert_eq!(bearer("ssk_1"), None);
    }

    #[test]
    fn a_refused_caller_is_named_by_its_key_and_an_unknown_key_is_not() {
        use actix_web::http::header::{HeaderMap, HeaderValue};
        let key = keys::new_key().unwrap();
        let dir = std::env::temp_dir().join(format!("access-name-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys.toml");
        let sha = hex::encode(keys::hash(&key));
        let entry = format!("[[keys]]\nname = \"web\"\nsha256 = \"{sha}\"\nmodels = [\"mlp\"]\n");
        std::fs::write(&file, entry).unwrap();
        let access = Access::from_config(&Config {
            api_keys: Some(file),
            ..Config::default()
        })
        .unwrap();
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        // Outside its scope: refused, and named.
        let headers = with(&format!("Bearer {key}"));
        assert!(access.admit(&headers, None, "other").is_err());
        assert_eq!(access.caller_name(&headers), "web");
        assert_eq!(access.caller_name(&with("Bearer ssk_nope")), "-");
        assert_eq!(access.caller_name(&HeaderMap::new()), "-");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64_and_mapped_ipv4_is_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            address_bucket(ip("2001:db8:1:2:aaaa::1")),
            address_bucket(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            address_bucket(ip("2001:db8:1:2::1")),
            address_bucket(ip("2001:db8:1:3::1"))
        );
        assert_eq!(address_bucket(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_ne!(
            address_bucket(ip("::ffff:192.0.2.7")),
            address_bucket(ip("::ffff:192.0.2.8"))
        );
    }
}
