//! The actors of the serving path, one file each:
//!
//! - [`supervisor`]: starts everything from the manifest; restart policy for dead workers.
//! - [`registry`]: the catalog of model versions, published by the supervisor.
//! - [`router`]: one per model version; queue, admission, dynamic micro-batching, dispatch.
//! - [`worker`]: one per replica, on its own thread; owns an ONNX Runtime session.
//! - [`stream_session`]: one per speech stream; owns its model state across steps and resumes.
//! - [`stream_hub`]: the directory of live streams, for resuming by id.

pub mod registry;
pub mod router;
pub mod stream_hub;
pub mod stream_session;
pub mod supervisor;
pub mod worker;
