//! The heartbeat write, and how it notices a second process under this instance's id.
//!
//! Two processes started with the same `--instance-id` would otherwise overwrite each other's
//! report in silence: the fleet would count them as one instance, and read each one's part in
//! a rollout only half the time. So each process writes its report with a nonce of its own
//! (`boot`), and conditionally on the version it wrote last (`If-Match`): a write refused
//! because the report changed meanwhile is read back, and a report there with another boot
//! is another process. Both processes find it (each overwrites the other in turn); each
//! warns, puts it in its report (`duplicate`, which `registry status` shows) and in
//! `GET /admin/registry`. The check costs nothing while there is no second process: the write
//! was made every poll already, conditional or not.

use super::Agent;
use crate::registry::records::InstanceReport;
use crate::registry::store::{Read, WriteIf};
use crate::registry::{instance_key, rfc3339, RegistryError};
use crate::untrusted::Untrusted;

/// A duplicate is forgotten once no other process has written the report for this many
/// polls (at least [`DUPLICATE_HOLD_MIN_MS`]): two processes that poll at different rates do
/// not overwrite each other at every poll of the faster one.
const DUPLICATE_HOLD_POLLS: u64 = 10;
const DUPLICATE_HOLD_MIN_MS: u64 = 10_000;

impl Agent {
    /// Writes this instance's report (see the module header).
    pub(super) async fn write_report(&mut self, now: u64) {
        let store = self.fleet.shared.store.clone();
        let key = instance_key(self.me());
        let condition = match &self.report_tag {
            Some(tag) if tag.etag.is_some() => WriteIf::Matches(tag.clone()),
            _ => WriteIf::Always,
        };
        let mut written = store.write_json(&key, &self.mine, condition).await;
        if let Err(RegistryError::Conflict(_)) = written {
            self.someone_else_wrote(&key, now).await;
            self.mine.duplicate = self.duplicate.as_ref().map(|(text, _)| text.clone());
            written = store.write_json(&key, &self.mine, WriteIf::Always).await;
        }
        match written {
            Ok(tag) => self.report_tag = Some(tag),
            Err(e) => {
                // Whether it was written is unknown: the next write cannot be conditional.
                self.report_tag = None;
                self.unreachable(e);
            }
        }
        self.forget_duplicate(now);
    }

    /// The report changed since this process wrote it: by another process under this id, or
    /// taken out (by the others, as stale; by an operator).
    async fn someone_else_wrote(&mut self, key: &str, now: u64) {
        let store = self.fleet.shared.store.clone();
        let Ok(Read::Found(found)) = store.read_json::<InstanceReport>(key, None).await else {
            return;
        };
        let other = found.value;
        if other.boot == self.boot {
            return;
        }
        let boot = if other.boot.is_empty() {
            "unknown".to_string()
        } else {
            Untrusted(&other.boot).to_string()
        };
        let url = other
            .url
            .as_deref()
            .map(|url| format!(", url {}", Untrusted(url)))
            .unwrap_or_default();
        let text = format!(
            "another process reports as this instance (boot {boot}, started {}{url}): two \
             processes were given the same --instance-id; give each its own",
            rfc3339(other.started_at_ms)
        );
        if self.duplicate.as_ref().map(|(t, _)| t) != Some(&text) {
            tracing::warn!(
                instance = %self.me(),
                boot = %self.boot,
                other_boot = %boot,
                other_started = %rfc3339(other.started_at_ms),
                "another process writes this instance's report: a duplicate --instance-id; \
                 the fleet counts the two as one instance"
            );
        }
        self.duplicate = Some((text, now));
        metrics::gauge!("streamserve_fleet_duplicate_instance_id").set(1.0);
    }

    fn forget_duplicate(&mut self, now: u64) {
        let poll_ms = self.fleet.shared.options.poll.as_millis() as u64;
        let hold = (DUPLICATE_HOLD_POLLS * poll_ms).max(DUPLICATE_HOLD_MIN_MS);
        if let Some((_, seen)) = &self.duplicate {
            if now.saturating_sub(*seen) > hold {
                tracing::info!(
                    instance = %self.me(),
                    "no other process has written this instance's report for a while"
                );
                self.duplicate = None;
                metrics::gauge!("streamserve_fleet_duplicate_instance_id").set(0.0);
            }
        }
    }
}
