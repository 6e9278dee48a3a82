//! A stream taken over from a verified checkpoint token (docs/streaming.md, "Resume on any
//! instance"): the live copy here if it is as far along as the token, else a session restored
//! from the checkpoint on the checkpoint's own version (loaded if need be), or on the model's
//! default version from a fresh state where that one is not served here or was taken out of
//! service under the stream; two takeovers of one stream that race end with one copy.

use std::sync::Arc;

use actix::prelude::*;

use super::{
    ended, lookup, params, replay_ended, stage_models, Caller, OpenError, Opened, Opening, Outcome,
};
use crate::actors::catalog::ServedModel;
use crate::actors::stream_hub::{Adopt, Found};
use crate::actors::stream_session::{Abandon, AttachRefused, Progress, Retire, StreamSession};
use crate::actors::supervisor::EnsureLoaded;
use crate::api::ws::StreamsConfig;
use crate::stream::checkpoint::Checkpoint;
use crate::stream::protocol::StartMessage;
use crate::stream::resume::ResumeRefusal;
use crate::untrusted::Untrusted;

/// A stream from a verified checkpoint: the live session if it is here and as far along as
/// the token (exact: it sends again what the client missed), else a session restored from the
/// checkpoint, on the checkpoint's own model version (loaded if need be); or, if the stream
/// ended here, what the client missed of its end.
pub(super) async fn take_over(
    checkpoint: Checkpoint,
    last_seq: Option<u64>,
    caller: Caller,
    config: &StreamsConfig,
) -> Result<Outcome, OpenError> {
    let name = caller.served.info.name.clone();
    let refused = |reason, message| Err(OpenError::Resume(reason, message));
    if checkpoint.model != name {
        return refused(
            ResumeRefusal::WrongModel,
            format!(
                "the resume token is for a stream on model '{}', not '{name}'",
                Untrusted(&checkpoint.model)
            ),
        );
    }
    caller
        .access
        .check_version(&caller.pass, &name, &checkpoint.version)
        .map_err(|e| e.to_string())?;
    // The client must have every result before the checkpoint: they are not in it.
    if checkpoint.next_seq > 0 && last_seq.is_none_or(|last| last + 1 < checkpoint.next_seq) {
        return refused(
            ResumeRefusal::LastSeq,
            format!(
                "the checkpoint starts at seq {}; resume with last_seq {} or later (the results before it are not in the token)",
                checkpoint.next_seq,
                checkpoint.next_seq - 1
            ),
        );
    }
    let token_counter = Some(checkpoint.counter);
    let id: Arc<str> = checkpoint.stream_id.as_str().into();
    let found = |session, opening, last_seq| {
        Outcome::Session(Opened {
            session,
            id: id.clone(),
            model: name.clone(),
            opening,
            last_seq,
            token_counter,
            created: opening == Opening::TakenOver,
            catalog: config.catalog.clone(),
            hub: config.hub.clone(),
        })
    };
    let ended_here = |tail| {
        let refused = OpenError::Resume(ResumeRefusal::Ended, ended(&id));
        replay_ended(id.clone(), tail, last_seq, refused)
    };
    let mut stale = None;
    match lookup(&config.hub, &id).await {
        Found::Live(session) => {
            let copy = session.send(Progress).await.unwrap_or_default();
            // A token older than one this copy was resumed with would roll the stream back to
            // it, and close the client that resumed with the newer one.
            if let Some(redeemed) = copy.redeemed.filter(|&r| checkpoint.counter < r) {
                let refusal = AttachRefused::Superseded {
                    redeemed,
                    token: checkpoint.counter,
                };
                return refused(ResumeRefusal::Superseded, refusal.to_string());
            }
            // This copy can go on if it needs no audio the client no longer keeps (before the
            // checkpoint) and has every result the client has (it sends again what follows).
            let has_results = last_seq.is_none_or(|last| copy.results > last);
            if copy.received >= checkpoint.samples_done && has_results {
                return Ok(found(session, Opening::Resumed, last_seq));
            }
            // A copy of the stream went further elsewhere: this one is behind; it goes.
            session.do_send(Retire);
            stale = Some(session);
        }
        Found::Finished(tail) => return ended_here(tail),
        Found::Unknown | Found::Stopping => {}
    }
    let (model, mut fresh_state) = checkpoint_model(&checkpoint, caller.served, config).await;
    let params = params(
        config,
        checkpoint.sample_rate,
        &StartMessage::default(),
        true,
    );
    let hub = Some(config.hub.clone().recipient());
    let models = stage_models(model, checkpoint.gate, config).await?;
    // A stream handed over because a version it ran on was retired, with models besides its
    // own: the retired one may have been one of theirs, and each now runs its default
    // version, whose state the checkpoint's is not (it does not say which versions made it).
    if checkpoint.retired && (models.stages.len() > 1 || models.gate.is_some()) {
        fresh_state = true;
    }
    // The key was let in when the stream began: a takeover is counted, never refused.
    let place = caller.access.resumed_stream_place(&caller.pass);
    let restored = StreamSession::restore(checkpoint, models, params, last_seq, fresh_state, hub)?
        .holding(place)
        .start();
    // Two takeovers of one stream may race: the hub keeps one, the other goes.
    let adopted = config
        .hub
        .send(Adopt {
            id: id.clone(),
            session: restored.clone(),
            replacing: stale,
        })
        .await
        .map_err(|_| "the server is stopping".to_string())?;
    let Some(session) = adopted else {
        // The stream ended here while this restored it (the live copy found above finished):
        // the copy goes, unattached, and the token is answered as one of an ended stream.
        restored.do_send(Abandon { generation: 0 });
        let tail = match lookup(&config.hub, &id).await {
            Found::Finished(tail) => tail,
            _ => None,
        };
        return ended_here(tail);
    };
    if session != restored {
        restored.do_send(Retire);
        return Ok(found(session, Opening::Resumed, last_seq));
    }
    metrics::counter!("streamserve_stream_takeovers_total", "model" => name.clone()).increment(1);
    Ok(found(session, Opening::TakenOver, None))
}

/// The checkpoint's own model version, loaded here if it is listed but cold; when this
/// instance cannot serve that version, or it was taken out of service under the stream (a
/// [`Checkpoint::retired`] handover: loading it again would undo the rollout or unload), the
/// default one with a fresh state (`true`).
async fn checkpoint_model(
    checkpoint: &Checkpoint,
    default: ServedModel,
    config: &StreamsConfig,
) -> (ServedModel, bool) {
    if default.info.version == checkpoint.version {
        return (default, false);
    }
    if checkpoint.retired {
        tracing::info!(model = %checkpoint.model, version = %checkpoint.version,
            default = %default.info.version,
            "the stream's version was taken out of service; it goes on from a fresh state on the default version");
        return (default, true);
    }
    let load = config.supervisor.send(EnsureLoaded {
        name: checkpoint.model.clone(),
        version: Some(checkpoint.version.clone()),
    });
    match load.await {
        Ok(Ok(served)) => (served, false),
        Ok(Err(e)) => {
            tracing::warn!(model = %checkpoint.model, version = %checkpoint.version, error = %e,
                "the stream's version is not served here; it goes on from a fresh state on the default version");
            (default, true)
        }
        Err(_) => (default, true),
    }
}
