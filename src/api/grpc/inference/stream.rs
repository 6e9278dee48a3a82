//! `ModelStreamInfer`: one call, many requests, answered in the order they came. Up to
//! [`STREAM_IN_FLIGHT`] of them are in flight at once, so a call's requests batch with each
//! other and with other clients'; a request of a speech sequence goes to its sequence
//! (`sequence/`), any other is one inference (`Inference::infer`). The call's requests count
//! against the memory REST bodies share, from when they are read until answered, and its
//! answers until the transport takes them. Unended sequences wait for a resume when the call
//! ends; in a shutdown they hand over, after every answer asked for.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt as _};
use futures_util::stream::{FuturesOrdered, StreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status, Streaming};

use super::super::draining;
use super::super::proto::inference::*;
use super::super::sequence::{self, Sequences, SEQUENCE_ID};
use super::{Caller, Inference};
use crate::api::body::StreamHold;
use crate::error::ServeError;

/// Requests of one stream being decoded, queued or run at once; beyond it the stream is not
/// read until an answer is sent (HTTP/2 flow control then holds the client back).
const STREAM_IN_FLIGHT: usize = 64;

/// The answers of one `ModelStreamInfer` call.
pub(super) type Answers =
    Pin<Box<dyn futures_util::Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

/// Reads the call's requests and answers each, in order, on a task of its own.
pub(super) fn answer_in_order(
    this: Arc<Inference>,
    request: Request<Streaming<ModelInferRequest>>,
) -> Answers {
    // Every request of the stream is let in (or not) on the stream's own metadata.
    let peer = request.remote_addr().map(|a| a.ip());
    let (metadata, _, mut incoming) = request.into_parts();
    let metadata = Arc::new(metadata);
    let (tx, rx) = mpsc::channel::<Result<Held, Status>>(STREAM_IN_FLIGHT);
    // The stream's requests count against `--max-body-memory-mb` from when they are read
    // (while they wait their turn, a cold model loading, say) until answered, and its
    // answers until the transport takes them: a client that stops reading pins them.
    let memory = Arc::new(Mutex::new(StreamHold::new(&this.state.body_memory)));
    let sent = memory.clone();
    tokio::spawn(async move {
        let _work = this.state.work.begin();
        let mut pending: FuturesOrdered<BoxFuture<'static, Held>> = FuturesOrdered::new();
        let mut sequences = Sequences::new(
            this.state.clone(),
            this.stop.clone(),
            metadata.clone(),
            peer,
        );
        let stop = draining(this.stop.clone());
        tokio::pin!(stop);
        let (mut open, mut stopping) = (true, false);
        while (open && !stopping) || !pending.is_empty() {
            tokio::select! {
                Some(answer) = pending.next(), if !pending.is_empty() => {
                    if tx.send(Ok(answered(&memory, answer, this.max_message))).await.is_err() {
                        return; // the client went away
                    }
                }
                message = incoming.message(), if open && !stopping && pending.len() < STREAM_IN_FLIGHT => {
                    match message {
                        Ok(Some(request)) => {
                            let size = request.encoded_len();
                            let counted = memory.lock().expect("stream memory").add(size);
                            let held = if counted.is_ok() { size } else { 0 };
                            let answer: BoxFuture<'static, ModelStreamInferResponse> = match counted {
                                Err(full) if sequence::is_sequence(&request) => {
                                    Box::pin(std::future::ready(sequence::refused_unread(&request, full.to_string())))
                                }
                                Err(full) => Box::pin(std::future::ready(error_answer(
                                    request.model_name.clone(),
                                    request.model_version.clone(),
                                    request.id.clone(),
                                    full,
                                ))),
                                Ok(()) if sequence::is_sequence(&request) => sequences.route(request),
                                Ok(()) => Box::pin(this.clone().stream_one(request, metadata.clone(), peer)),
                            };
                            pending.push_back(Box::pin(answer.map(move |answer| (answer, held))));
                        }
                        Ok(None) => open = false,
                        Err(status) => {
                            // The transport failed (e.g. a message over the limit): answer
                            // what was read, then end the stream with the error.
                            while let Some(answer) = pending.next().await {
                                let answer = answered(&memory, answer, this.max_message);
                                let _ = tx.send(Ok(answer)).await;
                            }
                            for handover in sequences.finish().await {
                                let _ = tx.send(Ok((handover, 0))).await;
                            }
                            let _ = tx.send(Err(super::super::transport_status(status))).await;
                            return;
                        }
                    }
                }
                _ = &mut stop, if !stopping => stopping = true,
            }
        }
        // Unended sequences wait for a resume; in a shutdown they hand over, after every
        // answer asked for.
        for handover in sequences.finish().await {
            let _ = tx.send(Ok((handover, 0))).await;
        }
        if stopping && open {
            let _ = tx
                .send(Err(Status::unavailable(
                    "the server is shutting down; reconnect and send the rest again",
                )))
                .await;
        }
    });
    let answers = ReceiverStream::new(rx).map(move |held| {
        held.map(|(answer, size)| {
            sent.lock().expect("stream memory").remove(size);
            answer
        })
    });
    Box::pin(answers)
}

impl Inference {
    /// One request of a stream, answered in the stream: its answer, or its error in
    /// `error_message` beside its id, model and version so that the client can tell which.
    async fn stream_one(
        self: Arc<Self>,
        request: ModelInferRequest,
        metadata: Arc<MetadataMap>,
        peer: Option<IpAddr>,
    ) -> ModelStreamInferResponse {
        let (id, model_name, model_version) = (
            request.id.clone(),
            request.model_name.clone(),
            request.model_version.clone(),
        );
        // Logged as a unary call's is: visible ASCII, capped (not the stream's one
        // `x-request-id`, which would name every request of the stream alike).
        let request_id =
            crate::untrusted::request_id(&id).unwrap_or_else(crate::untrusted::new_request_id);
        match self
            .infer(
                "ModelStreamInfer",
                request,
                None,
                request_id,
                Caller {
                    metadata: &metadata,
                    peer,
                },
            )
            .await
        {
            Ok(answer) => ModelStreamInferResponse {
                error_message: String::new(),
                infer_response: Some(answer),
            },
            Err(e) => {
                let e = self.sequence_hint(&model_name, e);
                error_answer(model_name, model_version, id, e)
            }
        }
    }

    /// A request of a speech model's stream input sent without the sequence parameters ran
    /// as one plain inference, and failed on an input the model does not have: says how the
    /// stream is sent instead.
    fn sequence_hint(&self, model: &str, error: ServeError) -> ServeError {
        let ServeError::InvalidRequest(message) = &error else {
            return error;
        };
        let streams = self
            .state
            .catalog
            .snapshot()
            .resolve(model, None)
            .is_ok_and(|served| served.info.stream.is_some());
        if !streams || !message.contains("has no input") {
            return error;
        }
        ServeError::invalid(format!(
            "{message}; a speech stream of '{}' is a sequence: send its audio with a non-zero \
             sequence_id, sequence_start on the first request and sequence_end on the last \
             (docs/streaming.md)",
            crate::untrusted::Untrusted(model)
        ))
    }
}

/// A streamed answer and the bytes of the stream's memory it holds.
type Held = (ModelStreamInferResponse, usize);

/// The answer to a streamed request that failed (or was not run), naming what it was for.
fn error_answer(
    model_name: String,
    model_version: String,
    id: String,
    error: ServeError,
) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: error.to_string(),
        infer_response: Some(ModelInferResponse {
            model_name,
            model_version,
            id,
            ..Default::default()
        }),
    }
}

/// An answer ready to send: its request's bytes are let go of, its own counted if they fit. An
/// answer that does not fit is sent all the same, uncounted: it is computed, and refusing it
/// would lose it (a sequence's results with it). One over the message limit (`max_message`)
/// is sent as [`too_large`] in its place: tonic would refuse to encode it and end the whole
/// call, every answer after it lost.
fn answered(memory: &Mutex<StreamHold>, (answer, request_size): Held, max_message: usize) -> Held {
    let answer = within_limit(answer, max_message);
    let mut memory = memory.lock().expect("stream memory");
    memory.remove(request_size);
    let size = answer.encoded_len();
    let size = if memory.add(size).is_ok() { size } else { 0 };
    (answer, size)
}

/// `answer`, or [`too_large`] in its place when its message is over `max_message`. The check
/// is on the streamed message, the answer with its wrapping: an answer just under the limit,
/// wrapped, can be just over it.
fn within_limit(answer: ModelStreamInferResponse, max_message: usize) -> ModelStreamInferResponse {
    let size = answer.encoded_len();
    if size <= max_message {
        return answer;
    }
    too_large(answer, size, max_message)
}

/// The error answer that stands for an answer of `size` bytes over the limit: its request's
/// model, version, id and sequence id (Triton's clients match answers by them), without the
/// id if even that is too large (the answers stay in order all the same).
fn too_large(
    answer: ModelStreamInferResponse,
    size: usize,
    limit: usize,
) -> ModelStreamInferResponse {
    let response = answer.infer_response.unwrap_or_default();
    let mut error = error_answer(
        response.model_name,
        response.model_version,
        response.id,
        ServeError::ResponseTooLarge { size, limit },
    );
    if let (Some(sequence), Some(error)) = (
        response.parameters.get(SEQUENCE_ID),
        error.infer_response.as_mut(),
    ) {
        error
            .parameters
            .insert(SEQUENCE_ID.into(), sequence.clone());
    }
    if error.encoded_len() > limit {
        if let Some(error) = error.infer_response.as_mut() {
            error.id.clear();
        }
    }
    error
}

#[cfg(test)]
mod tests {
    use super::super::super::convert::parameter;
    use super::super::super::proto::inference::infer_parameter::ParameterChoice;
    use super::*;

    fn answer(id: &str, raw: usize) -> ModelStreamInferResponse {
        let mut response = ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: id.into(),
            raw_output_contents: vec![vec![7; raw]],
            ..Default::default()
        };
        response.parameters.insert(
            SEQUENCE_ID.into(),
            parameter(ParameterChoice::Uint64Param(42)),
        );
        ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(response),
        }
    }

    #[test]
    fn an_answer_over_the_limit_only_once_wrapped_is_replaced_by_an_error() {
        let fits = answer("a", 100);
        let limit = fits.encoded_len();
        assert_eq!(
            within_limit(fits.clone(), limit),
            fits,
            "at the limit: sent"
        );
        // Its inner message fits the limit; the streamed one, wrapped, does not.
        let over = answer("a", 102);
        assert!(over.infer_response.as_ref().unwrap().encoded_len() <= limit);
        let sent = within_limit(over.clone(), limit);
        assert!(sent.encoded_len() <= limit);
        assert_eq!(
            sent.error_message,
            format!(
                "the answer of {} bytes exceeds the message limit of {limit} bytes (ask for \
                 fewer rows or outputs)",
                over.encoded_len()
            )
        );
        let response = sent.infer_response.unwrap();
        assert_eq!(
            (
                response.model_name.as_str(),
                response.model_version.as_str()
            ),
            ("m", "1")
        );
        assert_eq!(response.id, "a", "it names its request");
        assert_eq!(
            response.parameters[SEQUENCE_ID],
            parameter(ParameterChoice::Uint64Param(42))
        );
        assert!(response.raw_output_contents.is_empty());
    }

    #[test]
    fn an_id_too_long_for_the_error_is_left_out() {
        let id = "i".repeat(300);
        let sent = within_limit(answer(&id, 10), 250);
        assert!(sent
            .error_message
            .contains("exceeds the message limit of 250 bytes"));
        assert_eq!(sent.infer_response.unwrap().id, "");
    }
}
