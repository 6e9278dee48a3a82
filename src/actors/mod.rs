//! The actors of the serving path, one file each:
//!
//! - [`supervisor`]: starts everything from the manifest; restart policy for dead workers.
//! - [`registry`]: the catalog of model versions, published by the supervisor.
//! - [`router`]: one per model version; queue, admission, dynamic micro-batching, dispatch.
//! - [`worker`]: one per replica, on its own thread; owns an ONNX Runtime session.

pub mod registry;
pub mod router;
pub mod supervisor;
pub mod worker;
