//! The HELP text and unit of every metric the server emits: the Prometheus exporter writes
//! `# HELP` only for described metrics, and tests/metrics.rs fails on any series without one.
//! Grouped as the server's parts are: jobs, the request path and models, the machine.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

use super::STREAM_DROP_REASONS;

/// Batch jobs and their published predictions (docs/jobs.md).
fn describe_jobs() {
    describe_gauge!(
        "streamserve_jobs",
        Unit::Count,
        "Batch jobs this server knows, by state (queued, running, succeeded, failed, cancelled)"
    );
    describe_counter!(
        "streamserve_job_rows_total",
        Unit::Count,
        "Rows batch jobs have durably written (answers and error lines), by model"
    );
    describe_gauge!(
        "streamserve_predictions_age_seconds",
        Unit::Seconds,
        "Age of a model's published predictions: seconds since the job that computed them finished"
    );
    describe_gauge!(
        "streamserve_predictions_computed_timestamp_seconds",
        Unit::Seconds,
        "When a model's published predictions were computed (Unix time)"
    );
    describe_gauge!(
        "streamserve_predictions_keys",
        Unit::Count,
        "Keys in a model's published predictions"
    );
    describe_counter!(
        "streamserve_predictions_lookups_total",
        Unit::Count,
        "Lookups of published predictions by key, by model and result (hit, miss, online: a miss answered by online inference)"
    );
    describe_counter!(
        "streamserve_predictions_refresh_failures_total",
        Unit::Count,
        "Publishing jobs that failed, leaving the model's previous predictions serving"
    );
}

/// HELP text and unit for every metric the server emits (the exporter writes `# HELP` only
/// for described ones), and the process-wide series at 0.
pub(super) fn describe() {
    describe_jobs();
    describe_counter!(
        "streamserve_requests_total",
        Unit::Count,
        "Inference requests answered, by model, version and HTTP status (gRPC calls: protocol=\"grpc\", status the HTTP status their code stands for)"
    );
    describe_histogram!(
        "streamserve_request_duration_seconds",
        Unit::Seconds,
        "End-to-end inference request latency inside the server (gRPC calls: protocol=\"grpc\")"
    );
    describe_histogram!(
        "streamserve_queue_duration_seconds",
        Unit::Seconds,
        "Time a request waited in its router's queue before its batch started"
    );
    describe_histogram!(
        "streamserve_inference_duration_seconds",
        Unit::Seconds,
        "Time of one model call (one batch) on a worker"
    );
    describe_histogram!("streamserve_batch_size", Unit::Count, "Rows per model call");
    describe_histogram!(
        "streamserve_batch_requests",
        Unit::Count,
        "Requests per model call"
    );
    describe_histogram!(
        "streamserve_model_load_seconds",
        Unit::Seconds,
        "Time to load a model version on demand (cold start), from the first request to serving"
    );
    describe_gauge!(
        "streamserve_queue_depth",
        Unit::Count,
        "Requests waiting in a router's queue"
    );
    describe_gauge!(
        "streamserve_workers",
        Unit::Count,
        "Healthy workers (replicas) per model version"
    );
    describe_gauge!(
        "streamserve_replicas",
        Unit::Count,
        "Replicas per model version, healthy or being replaced"
    );
    describe_gauge!(
        "streamserve_overloaded",
        Unit::Count,
        "1 while a model version's predicted queue wait is past its SLO (requests go to its fallback), else 0"
    );
    describe_counter!(
        "streamserve_shed_total",
        Unit::Count,
        "Requests refused with 429 (queue full, or past the door's admission limit), by the model the client asked for"
    );
    describe_counter!(
        "streamserve_admission_refused_total",
        Unit::Count,
        "Inference requests (429) and new streams (close 1013) refused at the door's admission limit"
    );
    describe_gauge!(
        "streamserve_admission_limit",
        Unit::Count,
        "The door's admission limit: inference requests let inside at once (adaptive unless admission = static; 0: no limit)"
    );
    describe_gauge!(
        "streamserve_admission_in_flight",
        Unit::Count,
        "Inference requests inside the door's admission limit now"
    );
    describe_counter!(
        "streamserve_admission_fallback_total",
        Unit::Count,
        "Inference requests past the door's admission limit sent to their model's fallback instead of refused (answered flagged degraded, unless the fallback shed them): the CPU around the models was short"
    );
    describe_gauge!(
        "streamserve_admission_fallback_limit",
        Unit::Count,
        "The door's second limit: inference requests past the admission limit that may go to their models' fallbacks at once (moved by the same rule on their own answers, from the floor up)"
    );
    describe_gauge!(
        "streamserve_admission_fallback_in_flight",
        Unit::Count,
        "Inference requests past the door's admission limit inside now, on their way to their model's fallback"
    );
    describe_histogram!(
        "streamserve_admission_wait_seconds",
        Unit::Seconds,
        "Time inference requests let in at the door (within its limit, or past it to a fallback) spent inside the server besides their model's queue and compute (reading, decoding, waiting for the HTTP thread, encoding): what the adaptive limits hold to admission_target_ms"
    );
    describe_counter!(
        "streamserve_access_refused_total",
        Unit::Count,
        "Requests and streams refused at the door: no or no valid API key (401), outside the key's models (403), over a key's or a client address's limit (429); by key name ('-' without one) and reason"
    );
    describe_counter!(
        "streamserve_degraded_total",
        Unit::Count,
        "Requests a fallback model took in for the model the client asked for (served_by: the fallback); not those it then shed"
    );
    describe_counter!(
        "streamserve_retries_total",
        Unit::Count,
        "Requests retried on another replica because the worker running their batch was lost"
    );
    describe_counter!(
        "streamserve_deadline_exceeded_total",
        Unit::Count,
        "Requests answered 504 because their deadline passed while they were queued"
    );
    describe_counter!(
        "streamserve_worker_restarts_total",
        Unit::Count,
        "Workers replaced after dying or hanging"
    );
    describe_counter!(
        "streamserve_inference_failures_total",
        Unit::Count,
        "Model calls that failed (a request the model refused as invalid input is a 400, not counted)"
    );
    describe_counter!(
        "streamserve_scale_events_total",
        Unit::Count,
        "Replicas added (direction up) or removed (down) by the autoscaler"
    );
    describe_counter!(
        "streamserve_rollout_events_total",
        Unit::Count,
        "Deployment events per model: deploy_started, deploy_failed, switched, canary_started, canary_step, promoted, rolled_back, unloaded"
    );
    describe_gauge!(
        "streamserve_streams_open",
        Unit::Count,
        "Live speech streams, connected or waiting for a resume"
    );
    describe_gauge!(
        "streamserve_stream_connections",
        Unit::Count,
        "Open WebSocket stream connections"
    );
    describe_counter!(
        "streamserve_stream_chunks_total",
        Unit::Count,
        "Audio chunks (model steps) run for streams"
    );
    describe_counter!(
        "streamserve_stream_stage_steps_total",
        Unit::Count,
        "Steps run by each stage of a declared stream (model: the stream's model, stage: the stage's)"
    );
    describe_counter!(
        "streamserve_stream_stage_skips_total",
        Unit::Count,
        "Steps of a gated stage skipped because the stream's gate heard no speech around them (model, stage)"
    );
    describe_counter!(
        "streamserve_stream_keywords_total",
        Unit::Count,
        "Keyword events sent by keyword-spotting streams"
    );
    describe_counter!(
        "streamserve_streams_refused_behind_total",
        Unit::Count,
        "New streams refused (close 1013) because the open streams were behind real time"
    );
    describe_counter!(
        "streamserve_stream_behind_chunks_total",
        Unit::Count,
        "Stream chunks completed while their stream was behind real time (its steps went to the fallback model, where it has one)"
    );
    describe_counter!(
        "streamserve_stream_degraded_chunks_total",
        Unit::Count,
        "Stream chunks answered by the fallback model"
    );
    describe_counter!(
        "streamserve_stream_resumes_total",
        Unit::Count,
        "Streams resumed by a reconnecting client"
    );
    describe_counter!(
        "streamserve_stream_drops_total",
        Unit::Count,
        "Streams dropped, by reason: slow_consumer, inference_error, not_resumed, idle, write_timeout"
    );
    describe_histogram!(
        "streamserve_stream_chunk_latency_seconds",
        Unit::Seconds,
        "Time from a chunk's audio arriving in full to its result"
    );
    describe_counter!(
        "streamserve_body_timeouts_total",
        Unit::Count,
        "Request bodies that arrived too slowly or stalled (answered 408)"
    );
    describe_counter!(
        "streamserve_body_memory_refusals_total",
        Unit::Count,
        "Request bodies refused because bodies in flight held the memory bound (answered 503)"
    );
    describe_gauge!(
        "streamserve_registry_up",
        Unit::Count,
        "1 when the model registry answered every read and write of this instance's last poll, 0 when it did not (the instance serves what it has)"
    );
    describe_counter!(
        "streamserve_registry_polls_total",
        Unit::Count,
        "Polls of the model registry, by outcome (ok, error)"
    );
    describe_counter!(
        "streamserve_registry_fetches_total",
        Unit::Count,
        "Versions taken from the registry into the local cache, by outcome (ok; failed: unreachable, corrupt, sha256 mismatch)"
    );
    describe_gauge!(
        "streamserve_fleet_instances_live",
        Unit::Count,
        "Instances of the fleet whose heartbeat is recent, this one included, as this instance last read them"
    );
    describe_gauge!(
        "streamserve_fleet_duplicate_instance_id",
        Unit::Count,
        "1 while another process writes this instance's registry report: two processes were given one --instance-id"
    );
    describe_counter!(
        "streamserve_fleet_decisions_total",
        Unit::Count,
        "Rollout steps this instance recorded in the registry, by decision (switch, promote, rolled_out, join, abort)"
    );
    describe_counter!(
        "streamserve_stream_checkpoints_total",
        Unit::Count,
        "Checkpoints (signed resume tokens) sent to stream clients, by model"
    );
    describe_counter!(
        "streamserve_stream_handovers_total",
        Unit::Count,
        "Streams told at shutdown to resume from their last checkpoint elsewhere, by model"
    );
    describe_counter!(
        "streamserve_stream_takeovers_total",
        Unit::Count,
        "Streams this instance took over from a checkpoint made elsewhere (or before a restart), by model"
    );
    describe_counter!(
        "streamserve_stream_resume_refused_total",
        Unit::Count,
        "Stream resumes refused, by reason: malformed, too_long, unknown_key, tampered, expired, other_stream, wrong_model, last_seq, superseded, ended, unknown_stream"
    );
    describe_machine();
    for &reason in crate::stream::resume::RESUME_REFUSAL_REASONS {
        metrics::counter!("streamserve_stream_resume_refused_total", "reason" => reason)
            .increment(0);
    }
    metrics::counter!("streamserve_body_timeouts_total").increment(0);
    metrics::counter!("streamserve_body_memory_refusals_total").increment(0);
    metrics::counter!("streamserve_admission_refused_total").increment(0);
    metrics::counter!("streamserve_streams_refused_behind_total").increment(0);
    metrics::counter!("streamserve_admission_fallback_total").increment(0);
    for &reason in STREAM_DROP_REASONS {
        metrics::counter!("streamserve_stream_drops_total", "reason" => reason).increment(0);
    }
    metrics::gauge!("streamserve_streams_open").set(0.0);
    metrics::gauge!("streamserve_stream_connections").increment(0.0);
}

/// The machine's series (`machine/`): the standard `process_*` ones, devices' memory, bytes
/// and connections per protocol, GPUs; then their handles, and their first values.
fn describe_machine() {
    describe_gauge!(
        "process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory size in bytes."
    );
    describe_gauge!(
        "process_virtual_memory_bytes",
        Unit::Bytes,
        "Virtual memory size in bytes."
    );
    describe_gauge!(
        "process_open_fds",
        Unit::Count,
        "Number of open file descriptors."
    );
    describe_gauge!(
        "process_max_fds",
        Unit::Count,
        "Maximum number of open file descriptors (0: unlimited)."
    );
    describe_gauge!(
        "process_threads",
        Unit::Count,
        "Number of OS threads in the process."
    );
    describe_gauge!(
        "process_start_time_seconds",
        Unit::Seconds,
        "Start time of the process since unix epoch in seconds."
    );
    // process_cpu_seconds_total is written with its HELP by machine::render_extra.
    describe_gauge!(
        "streamserve_device_memory_bytes",
        Unit::Bytes,
        "Memory the loaded replicas hold on a device (device=cpu: RAM, cuda:N: that GPU's VRAM), as the memory budget estimates it (twice each replica's model file)"
    );
    describe_gauge!(
        "streamserve_device_memory_budget_bytes",
        Unit::Bytes,
        "A device's memory budget (--memory-budget-mb for cpu, --vram-budget-mb per GPU); absent for a GPU whose VRAM is not budgeted"
    );
    describe_counter!(
        "streamserve_received_bytes_total",
        Unit::Bytes,
        "Bytes received, by protocol: http request bodies (not headers), websocket frame payloads, grpc everything its connections read (HTTP/2 frames)"
    );
    describe_counter!(
        "streamserve_sent_bytes_total",
        Unit::Bytes,
        "Bytes sent, by protocol: http response bodies (not headers), websocket frame payloads, grpc everything its connections wrote (HTTP/2 frames)"
    );
    describe_gauge!(
        "streamserve_open_connections",
        Unit::Count,
        "Open client connections, by protocol (http: WebSocket streams included; grpc)"
    );
    describe_gauge!(
        "streamserve_gpu_utilization_ratio",
        Unit::Count,
        "Share of the last sample period in which a GPU ran a kernel (0 to 1), from NVML; GPU hosts only"
    );
    describe_gauge!(
        "streamserve_gpu_memory_used_bytes",
        Unit::Bytes,
        "A GPU's memory in use by any process, from NVML; GPU hosts only"
    );
    describe_gauge!(
        "streamserve_gpu_memory_total_bytes",
        Unit::Bytes,
        "A GPU's memory, from NVML; GPU hosts only"
    );
    crate::machine::install();
}
