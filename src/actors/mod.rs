//! The actors of the serving path, one file each:
//!
//! - [`supervisor`]: starts everything from the manifest; restarts dead workers.
//! - [`restart_policy`]: how long a dead worker's replacement waits (pure).
//! - [`faults`]: faults injected through the admin API, held per replica (pure).
//! - [`registry`]: the catalog of model versions, published by the supervisor.
//! - [`router`]: one per model version; queue, admission, dynamic micro-batching, dispatch.
//! - [`worker`]: one per replica, on its own thread; owns an ONNX Runtime session.
//! - [`stream_session`]: one per speech stream; owns its model state across steps and resumes.
//! - [`stream_hub`]: the directory of live streams, for resuming by id.

pub mod faults;
pub mod registry;
pub mod restart_policy;
pub mod router;
pub mod stream_hub;
pub mod stream_session;
pub mod supervisor;
pub mod worker;
