//! The actors of the serving path, and the plain types they share:
//!
//! - [`supervisor`]: starts everything from the manifest; loads, unloads and deploys versions.
//! - [`catalog`]: the catalog of model versions, published by the supervisor.
//! - [`served`]: one serving version's handle, and the one way to run a request on it.
//! - [`router`]: one per model version; queue, admission, dynamic micro-batching, dispatch.
//! - [`worker`]: one per replica, on its own thread; owns a model session; its restarts.
//! - [`pending`]: a request in a queue or a batch, with its exactly-once reply slot.
//! - [`health`]: a version's health and traffic counters, shared lock-free.
//! - [`budget`]: the CPU and memory budgets that every version's replicas share.
//! - [`fleet`]: the fleet agent: follows a model registry's desired state, reports to it.
//! - [`faults`]: faults injected through the admin API, held per replica (pure).
//! - [`stream_session`]: one per speech stream; owns its model state across steps and resumes.
//! - [`stream_hub`]: the directory of live streams, for resuming by id.

pub mod budget;
pub mod catalog;
pub mod faults;
pub mod fleet;
pub mod health;
pub mod pending;
pub mod router;
pub mod served;
pub mod stream_hub;
pub mod stream_session;
pub mod supervisor;
pub mod worker;
