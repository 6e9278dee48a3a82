//! Precomputed predictions served by key (docs/jobs.md, "Serving the results"): a job
//! submitted with `publish: true` becomes, when it succeeds, its model's lookup table; `GET
//! /v2/models/{name}/predictions/{key}` then answers from the job's output file with the time
//! the answer was computed and its age. The table is an index of the output (key → the byte
//! span of its line) over an open handle, so a lookup is one positioned read; a newer job
//! that succeeds replaces the table whole, one that fails leaves the previous one serving,
//! older by the hour, which `streamserve_predictions_age_seconds` shows.
//!
//! Which job each model publishes is kept in `<jobs_dir>/published.json`, so the tables are
//! back after a restart.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::now_ms;

/// The file, in the jobs directory, that names each model's published table.
pub(super) const PUBLISHED_FILE: &str = "published.json";

/// What `published.json` keeps per model.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Publication {
    job: String,
    output: PathBuf,
    computed_unix_ms: u64,
}

/// Where a key's line is in the output.
#[derive(Clone, Copy, Debug)]
struct Span {
    offset: u64,
    len: u32,
    /// The row was written as an error line (`on_error: skip`).
    failed: bool,
}

/// One model's published predictions.
struct Table {
    publication: Publication,
    /// Open for the table's life: replacing or removing the file does not change what is
    /// served until another job publishes.
    file: File,
    index: HashMap<String, Span>,
    /// Lines whose key repeats an earlier one (the last one is served).
    duplicates: u64,
    /// Lines without a string or number key (not served).
    unkeyed: u64,
}

/// A job's output indexed, not yet serving ([`Tables::index`]).
pub struct Indexed(Table);

/// What a lookup found.
pub enum Lookup {
    /// The answer, as `GET .../predictions/{key}` shows it, and its age in seconds.
    Found { answer: Value, age_secs: u64 },
    /// The table has no answer for the key: no such row, or its row failed (the reason).
    Missing(String),
    /// The model has no published predictions.
    NoTable,
}

/// Every model's published predictions.
pub struct Tables {
    file: PathBuf,
    tables: RwLock<HashMap<String, Arc<Table>>>,
    /// Publishing jobs that failed since start, per model: their tables were kept.
    failures: RwLock<HashMap<String, (String, u64)>>,
}

/// A key as a table holds it: a string as it is, a number as JSON writes it.
fn key_text(key: &Value) -> Option<String> {
    match key {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Table {
    fn open(publication: Publication) -> Result<Table, String> {
        let path = &publication.output;
        let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
        let file = File::open(path).map_err(cannot)?;
        let mut reader = BufReader::with_capacity(1 << 20, file.try_clone().map_err(cannot)?);
        #[derive(Deserialize)]
        struct Keyed {
            #[serde(default)]
            key: Value,
            #[serde(default)]
            error: Option<serde::de::IgnoredAny>,
        }
        let (mut index, mut duplicates, mut unkeyed) = (HashMap::new(), 0, 0);
        let (mut offset, mut line) = (0u64, Vec::new());
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(cannot)?;
            if n == 0 {
                break;
            }
            let keyed: Keyed = serde_json::from_slice(&line)
                .map_err(|e| format!("{} at byte {offset}: {e}", path.display()))?;
            match key_text(&keyed.key) {
                Some(key) => {
                    let span = Span {
                        offset,
                        len: u32::try_from(n).map_err(|_| "a line longer than 4 GiB")?,
                        failed: keyed.error.is_some(),
                    };
                    duplicates += u64::from(index.insert(key, span).is_some());
                }
                None => unkeyed += 1,
            }
            offset += n as u64;
        }
        if index.is_empty() {
            return Err(format!(
                "{} has no row with a key (a string or a number in the input's key field)",
                path.display()
            ));
        }
        Ok(Table {
            publication,
            file,
            index,
            duplicates,
            unkeyed,
        })
    }

    fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.publication.computed_unix_ms) / 1000
    }

    fn info(&self, now_ms: u64) -> Value {
        json!({
            "job": self.publication.job,
            "output": self.publication.output,
            "computed_unix_ms": self.publication.computed_unix_ms,
            "age_secs": self.age_secs(now_ms),
            "keys": self.index.len(),
            "duplicate_keys": self.duplicates,
            "unkeyed_rows": self.unkeyed,
        })
    }
}

impl Tables {
    /// The tables `<dir>/published.json` names, each indexed again from its output. A table
    /// whose output is gone or does not read is dropped with a warning.
    pub fn load(dir: &Path) -> Tables {
        let tables = Tables {
            file: dir.join(PUBLISHED_FILE),
            tables: RwLock::default(),
            failures: RwLock::default(),
        };
        let published: BTreeMap<String, Publication> = match std::fs::read(&tables.file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %tables.file.display(), error = %e, "published predictions do not read; none are served");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        for (model, publication) in published {
            match Table::open(publication) {
                Ok(table) => {
                    tables.set(&model, table);
                }
                Err(e) => {
                    tracing::warn!(model = %model, error = %e, "published predictions dropped")
                }
            }
        }
        tables
    }

    /// Makes `table` the one `model` serves: the table it replaced, if any.
    fn set(&self, model: &str, table: Table) -> Option<Arc<Table>> {
        self.expect_refresh(model);
        ::metrics::gauge!("streamserve_predictions_keys", "model" => model.to_string())
            .set(table.index.len() as f64);
        ::metrics::gauge!("streamserve_predictions_computed_timestamp_seconds", "model" => model.to_string())
            .set(table.publication.computed_unix_ms as f64 / 1000.0);
        self.tables
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.to_string(), Arc::new(table))
    }

    /// Whether a table serves the file at `path`.
    pub(super) fn serves(&self, path: &Path) -> bool {
        self.tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|t| t.publication.output == path)
    }

    /// Removes a replaced table's output when it is the local copy of an uploaded output
    /// (`<jobs_dir>/<id>.output.jsonl`): kept only while it served, it would otherwise stay
    /// in the jobs directory for good, one more copy at every refresh. An output the user
    /// named is never removed. Lookups still reading the old table keep their open handle.
    fn discard_copy(&self, replaced: &Publication) {
        let Some(dir) = self.file.parent() else {
            return;
        };
        let copy = super::record::staged_output(dir, &replaced.job);
        if replaced.output != copy || self.serves(&copy) {
            return;
        }
        match std::fs::remove_file(&copy) {
            Ok(()) => {
                tracing::info!(job = %replaced.job, file = %copy.display(), "replaced published predictions' local copy removed")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %copy.display(), error = %e, "cannot remove replaced published predictions' local copy")
            }
        }
    }

    /// Makes job `job`'s finished output the table of `model`, replacing the previous one,
    /// and records it for the next start ([`index`](Self::index), then
    /// [`install`](Self::install)).
    #[cfg(test)]
    pub fn publish(&self, model: &str, job: &str, output: &Path) -> Result<(), String> {
        self.install(model, Tables::index(job, output)?)
    }

    /// Reads job `job`'s finished output into a table, to [`install`](Self::install): a read
    /// of the whole output, so done by the caller without holding any lock.
    pub fn index(job: &str, output: &Path) -> Result<Indexed, String> {
        Table::open(Publication {
            job: job.to_string(),
            output: output.to_path_buf(),
            computed_unix_ms: now_ms(),
        })
        .map(Indexed)
    }

    /// Makes an indexed output the table of `model`, replacing the previous one, and records
    /// it for the next start.
    pub fn install(&self, model: &str, Indexed(table): Indexed) -> Result<(), String> {
        let job = table.publication.job.clone();
        let keys = table.index.len();
        let replaced = self.set(model, table);
        self.save()?;
        // Only once `published.json` no longer names it: a restart must find what it names.
        if let Some(replaced) = replaced {
            self.discard_copy(&replaced.publication);
        }
        self.failures
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(model);
        tracing::info!(model = %model, job = %job, keys, "predictions published");
        Ok(())
    }

    /// A job will publish `model`'s predictions: its failures counter exists from 0 (a counter
    /// that appears with its first failure hides that failure from `increase()`).
    pub fn expect_refresh(&self, model: &str) {
        ::metrics::counter!("streamserve_predictions_refresh_failures_total", "model" => model.to_string())
            .increment(0);
    }

    /// A job that was to publish `model`'s predictions failed: the previous table stays.
    pub fn refresh_failed(&self, model: &str, job: &str) {
        ::metrics::counter!("streamserve_predictions_refresh_failures_total", "model" => model.to_string())
            .increment(1);
        self.failures
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.to_string(), (job.to_string(), now_ms()));
    }

    fn save(&self) -> Result<(), String> {
        let published: BTreeMap<String, Publication> = self
            .tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(model, table)| (model.clone(), table.publication.clone()))
            .collect();
        let bytes = serde_json::to_vec_pretty(&published).map_err(|e| e.to_string())?;
        crate::files::write_atomically(&self.file, &bytes)
            .map_err(|e| format!("cannot write {}: {e}", self.file.display()))
    }

    fn get(&self, model: &str) -> Option<Arc<Table>> {
        self.tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .cloned()
    }

    /// The stored answer for `key`, with when it was computed and by which job.
    pub fn lookup(&self, model: &str, key: &str) -> Lookup {
        let Some(table) = self.get(model) else {
            return Lookup::NoTable;
        };
        let Some(span) = table.index.get(key) else {
            return Lookup::Missing(format!(
                "no prediction for key '{key}' in the results of {}",
                table.publication.job
            ));
        };
        let mut bytes = vec![0u8; span.len as usize];
        let line: Value = match table
            .file
            .read_exact_at(&mut bytes, span.offset)
            .map_err(|e| e.to_string())
            .and_then(|()| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        {
            Ok(line) => line,
            Err(e) => {
                return Lookup::Missing(format!(
                    "the result for key '{key}' cannot be read from {}: {e}",
                    table.publication.output.display()
                ))
            }
        };
        if span.failed {
            return Lookup::Missing(format!(
                "key '{key}' failed in {}: {}",
                table.publication.job,
                line["error"].as_str().unwrap_or("")
            ));
        }
        let now = now_ms();
        let age_secs = table.age_secs(now);
        let answer = json!({
            "model_name": line["model"],
            "model_version": line["model_version"],
            "sha256": line["sha256"],
            "key": line["key"],
            "outputs": line["outputs"],
            "job": table.publication.job,
            "computed_unix_ms": table.publication.computed_unix_ms,
            "age_secs": age_secs,
        });
        Lookup::Found { answer, age_secs }
    }

    /// What `model` serves: its table's job, time, age and size, and a newer publishing job
    /// that failed. `None`: nothing published.
    pub fn info(&self, model: &str) -> Option<Value> {
        let table = self.get(model)?;
        let mut info = table.info(now_ms());
        if let Some((job, at)) = self
            .failures
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            info["newer_job_failed"] = json!({"job": job, "failed_unix_ms": at});
        }
        Some(info)
    }

    /// Every model's [`info`](Self::info), by model name.
    pub fn all_info(&self) -> Vec<Value> {
        let mut models: Vec<String> = self
            .tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        models.sort();
        models
            .into_iter()
            .filter_map(|model| {
                let mut info = self.info(&model)?;
                info["model"] = json!(model);
                // The status page shows no server paths.
                info.as_object_mut()?.remove("output");
                Some(info)
            })
            .collect()
    }

    /// Sets each table's age gauge, for a scrape.
    pub fn record_ages(&self) {
        let now = now_ms();
        for (model, table) in self.tables.read().unwrap_or_else(|e| e.into_inner()).iter() {
            ::metrics::gauge!("streamserve_predictions_age_seconds", "model" => model.clone())
                .set(now.saturating_sub(table.publication.computed_unix_ms) as f64 / 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_serves_the_last_line_of_a_key_and_names_failed_rows() {
        let dir = std::env::temp_dir().join(format!("jobs-lookup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let output = dir.join("out.jsonl");
        std::fs::write(
            &output,
            concat!(
                r#"{"line":1,"key":"a","model":"m","model_version":"1","sha256":"s","outputs":[1]}"#,
                "\n",
                r#"{"line":2,"key":7,"model":"m","model_version":"1","sha256":"s","outputs":[2]}"#,
                "\n",
                r#"{"line":3,"key":"bad","error":"not a JSON object"}"#,
                "\n",
                r#"{"line":4,"key":null,"model":"m","model_version":"1","sha256":"s","outputs":[4]}"#,
                "\n",
                r#"{"line":5,"key":"a","model":"m","model_version":"2","sha256":"t","outputs":[5]}"#,
                "\n",
            ),
        )
        .unwrap();
        let tables = Tables::load(&dir);
        assert!(matches!(tables.lookup("m", "a"), Lookup::NoTable));
        tables.publish("m", "job-1", &output).unwrap();
        let Lookup::Found { answer, .. } = tables.lookup("m", "a") else {
            panic!("key a is published")
        };
        assert_eq!(answer["outputs"], json!([5]));
        assert_eq!(answer["model_version"], "2");
        assert!(matches!(tables.lookup("m", "7"), Lookup::Found { .. }));
        let Lookup::Missing(why) = tables.lookup("m", "bad") else {
            panic!("a failed row is not served")
        };
        assert!(why.contains("not a JSON object"), "{why}");
        assert!(matches!(tables.lookup("m", "zzz"), Lookup::Missing(_)));
        let info = tables.info("m").unwrap();
        assert_eq!(info["keys"], 3);
        assert_eq!(info["duplicate_keys"], 1);
        assert_eq!(info["unkeyed_rows"], 1);

        // Back after a restart, from published.json.
        let again = Tables::load(&dir);
        assert!(matches!(again.lookup("m", "a"), Lookup::Found { .. }));
        std::fs::write(dir.join("empty.jsonl"), "{\"line\":1,\"key\":null}\n").unwrap();
        assert!(again
            .publish("m", "job-2", &dir.join("empty.jsonl"))
            .unwrap_err()
            .contains("no row with a key"));
        assert!(matches!(again.lookup("m", "a"), Lookup::Found { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The local copy of an uploaded output goes once a newer table replaces it (each
    /// refresh would otherwise leave one more in the jobs directory); an output the user
    /// named stays.
    #[test]
    fn a_replaced_tables_local_copy_is_removed_and_a_named_output_kept() {
        let dir = std::env::temp_dir().join(format!("jobs-lookup-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let row = concat!(
            r#"{"line":1,"key":"a","model":"m","model_version":"1","sha256":"s","outputs":[1]}"#,
            "\n"
        );
        let copy = |id: &str| {
            let path = super::super::record::staged_output(&dir, id);
            std::fs::write(&path, row).unwrap();
            path
        };
        let (first, second) = (copy("job-1"), copy("job-2"));
        let named = dir.join("answers.jsonl");
        std::fs::write(&named, row).unwrap();
        let tables = Tables::load(&dir);
        tables.publish("m", "job-1", &first).unwrap();
        tables.publish("m", "job-2", &second).unwrap();
        assert!(!first.exists(), "the replaced copy is removed");
        assert!(second.exists(), "the serving copy stays");
        assert!(matches!(tables.lookup("m", "a"), Lookup::Found { .. }));
        tables.publish("m", "job-3", &named).unwrap();
        assert!(!second.exists());
        tables.publish("m", "job-4", &copy("job-4")).unwrap();
        assert!(named.exists(), "an output the user named is never removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
