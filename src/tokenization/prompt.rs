//! Prompt templates of decoder rerankers: the text around a (query, document) pair that the model was trained to
//! judge, tokenized and truncated as each model's published scoring code does.

use serde::Serialize;
use tokenizers::Tokenizer;

use super::{guarded, PairTokens, Truncation};
use crate::error::RerankError;

/// A reranker's prompt: `prefix` + `body` (with `{instruction}`, `{query}` and `{document}` filled in) + `suffix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptTemplate {
    /// The model family, e.g. `qwen3-reranker`.
    pub family: String,
    pub prefix: String,
    pub body: String,
    pub suffix: String,
    /// The instruction used when a request gives none; None when there is no default.
    pub default_instruction: Option<String>,
    pub layout: PromptLayout,
}

/// How the text between prefix and suffix is tokenized and truncated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PromptLayout {
    /// The body (instruction, query, document) tokenized whole, cut from its end to fit (Qwen3-Reranker).
    WholeBody,
    /// mxbai-rerank-v2: the query part (after an `instruction` line when a request gives one) and the document
    /// part tokenized apart; the query keeps at most 3/4 of the room, the document (after `separator`) the rest;
    /// the suffix's parts are tokenized apart too. Templates use `{instruction}`, `{query}`, `{document}`.
    QueryThenDocument {
        instruction: String,
        query: String,
        document: String,
        separator: String,
        suffix_parts: Vec<String>,
    },
    /// FlagEmbedding's LLM rerankers (bge-reranker-v2-gemma): `lead` (BOS) and the query part, then the
    /// separator and the document part, the pair cut from the document's end, then the separator and `task`.
    /// With S the separator and task tokens, the query part keeps 3/4 of max_length - 2·S, the document part
    /// max_length - 2·S, and the pair max_length - S, as that code's limits come out in a whole prompt.
    Flag {
        lead: String,
        query: String,
        document: String,
        separator: String,
        task: String,
    },
}

/// The body of one pair split around the document: the text before it (instruction and query filled in) and
/// after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptBody {
    pub before_document: String,
    pub after_document: String,
}

impl PromptTemplate {
    /// Whether a request's instruction has a place in this prompt.
    pub fn takes_instruction(&self) -> bool {
        match &self.layout {
            PromptLayout::WholeBody => self.body.contains("{instruction}"),
            PromptLayout::QueryThenDocument { .. } => true,
            PromptLayout::Flag { .. } => false,
        }
    }

    /// The body for a query with the request's instruction (or the default). An instruction given to a template
    /// without one is an error, as is a body without `{document}`.
    pub fn body_for(&self, query: &str, instruction: Option<&str>) -> Result<PromptBody, String> {
        let instruction = instruction
            .or(self.default_instruction.as_deref())
            .unwrap_or_default();
        let (before, after) = self
            .body
            .split_once("{document}")
            .ok_or_else(|| format!("the {} template has no {{document}}", self.family))?;
        let fill = |part: &str| fill(part, &[("{instruction}", instruction), ("{query}", query)]);
        Ok(PromptBody {
            before_document: fill(before),
            after_document: fill(after),
        })
    }
}

/// A template tokenized once for one tokenizer.
pub(super) struct PromptEncoder {
    pub(super) template: PromptTemplate,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    separator: Vec<u32>,
    /// The model's positions (mxbai's document cap counts from them).
    positions: usize,
}

/// A query under a prompt, ready for its pairs.
#[derive(Debug, Clone)]
pub(super) enum PromptedQuery {
    /// The body around the document, and how many tokens come before the document.
    WholeBody(PromptBody, usize),
    /// The query part's ids, already cut to 3/4 of the room.
    QueryThenDocument(Vec<u32>),
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, String> {
    guarded(|| tokenizer.encode_fast(text, false)).map(|e| e.get_ids().to_vec())
}

impl PromptEncoder {
    pub(super) fn new(
        template: PromptTemplate,
        tokenizer: &Tokenizer,
        positions: usize,
    ) -> Result<Self, String> {
        let prefix = encode(tokenizer, &template.prefix)?;
        let (suffix, separator) = match &template.layout {
            PromptLayout::WholeBody => (encode(tokenizer, &template.suffix)?, Vec::new()),
            PromptLayout::Flag {
                separator, task, ..
            } => {
                let separator = encode(tokenizer, separator)?;
                let task = encode(tokenizer, task)?;
                ([separator.as_slice(), &task].concat(), separator)
            }
            PromptLayout::QueryThenDocument {
                separator,
                suffix_parts,
                ..
            } => {
                let parts = suffix_parts
                    .iter()
                    .map(|part| encode(tokenizer, part))
                    .collect::<Result<Vec<_>, _>>()?;
                (parts.concat(), encode(tokenizer, separator)?)
            }
        };
        Ok(Self {
            template,
            prefix,
            suffix,
            separator,
            positions,
        })
    }

    /// Tokens every pair carries besides its query and document parts (the separator between them is part of
    /// the room, as in mxbai's code).
    pub(super) fn fixed_tokens(&self) -> usize {
        match self.template.layout {
            // The query and document limits of FlagEmbedding's code leave the suffix's length twice.
            PromptLayout::Flag { .. } => self.prefix.len() + 2 * self.suffix.len(),
            _ => self.prefix.len() + self.suffix.len(),
        }
    }

    /// The query's part of every pair, and its length in tokens (for estimates before the documents).
    pub(super) fn query(
        &self,
        tokenizer: &Tokenizer,
        query: &str,
        instruction: Option<&str>,
        room: usize,
    ) -> Result<(PromptedQuery, usize), RerankError> {
        let failed = |e: String| RerankError::invalid(format!("query could not be tokenized: {e}"));
        match &self.template.layout {
            PromptLayout::WholeBody => {
                let body = self
                    .template
                    .body_for(query, instruction)
                    .map_err(RerankError::invalid)?;
                let len = encode(tokenizer, &body.before_document)
                    .map_err(failed)?
                    .len();
                Ok((PromptedQuery::WholeBody(body, len), len))
            }
            PromptLayout::Flag {
                lead,
                query: template,
                ..
            } => {
                let text = fill(template, &[("{query}", query)]);
                let mut ids = encode(tokenizer, &text).map_err(failed)?;
                ids.truncate(room * 3 / 4);
                let ids = [encode(tokenizer, lead).map_err(failed)?, ids].concat();
                let len = ids.len();
                Ok((PromptedQuery::QueryThenDocument(ids), len))
            }
            PromptLayout::QueryThenDocument {
                instruction: line,
                query: template,
                separator,
                ..
            } => {
                let mut text = fill(template, &[("{query}", query)]);
                if let Some(instruction) =
                    instruction.or(self.template.default_instruction.as_deref())
                {
                    text = [
                        fill(line, &[("{instruction}", instruction)]),
                        separator.clone(),
                        text,
                    ]
                    .concat();
                }
                let mut ids = encode(tokenizer, &text).map_err(failed)?;
                ids.truncate(room * 3 / 4);
                let len = ids.len();
                Ok((PromptedQuery::QueryThenDocument(ids), len))
            }
        }
    }

    /// One pair's ids. `room` is max_length less `fixed_tokens`. Type id 1 marks the pair's first segment: the
    /// prompt, instruction and query every pair of the request shares (where the document begins in a body
    /// tokenized whole, as the body before it tokenizes alone); the model ignores type ids otherwise, and keeps
    /// that run's keys and values for the request's other pairs.
    pub(super) fn pair(
        &self,
        tokenizer: &Tokenizer,
        query: &PromptedQuery,
        document: &str,
        truncation: Truncation,
        room: usize,
        index: usize,
    ) -> Result<PairTokens, RerankError> {
        let (first, second, whole) = self.segments(tokenizer, query, document, room, index)?;
        if truncation == Truncation::Reject && whole > room {
            return Err(RerankError::invalid(format!(
                "documents[{index}]: the prompted pair is {} tokens, over max_length {} (truncation is REJECT)",
                whole + self.fixed_tokens(),
                room + self.fixed_tokens()
            )));
        }
        let before_document = match query {
            PromptedQuery::WholeBody(_, len) => (*len).min(first.len()),
            PromptedQuery::QueryThenDocument(_) => first.len(),
        };
        let input_ids = [self.prefix.as_slice(), &first, &second, &self.suffix].concat();
        let shared = self.prefix.len() + before_document;
        let mut type_ids = vec![0; input_ids.len()];
        type_ids[..shared.min(input_ids.len())].fill(1);
        Ok(PairTokens {
            type_ids,
            input_ids,
        })
    }

    /// The pair's two segments as the layout cuts them (prefix and suffix apart), and the untruncated length.
    fn segments(
        &self,
        tokenizer: &Tokenizer,
        query: &PromptedQuery,
        document: &str,
        room: usize,
        index: usize,
    ) -> Result<(Vec<u32>, Vec<u32>, usize), RerankError> {
        let segments = match (query, &self.template.layout) {
            (PromptedQuery::WholeBody(body, _), _) => {
                let text = [
                    body.before_document.as_str(),
                    document,
                    body.after_document.as_str(),
                ]
                .concat();
                encode(tokenizer, &text).map(|ids| {
                    let whole = ids.len();
                    (ids.into_iter().take(room).collect(), Vec::new(), whole)
                })
            }
            (
                PromptedQuery::QueryThenDocument(query_ids),
                PromptLayout::QueryThenDocument {
                    document: template, ..
                },
            ) => encode(tokenizer, &fill(template, &[("{document}", document)]))
                .map(|doc| self.cut_only_second(query_ids, doc, room)),
            (
                PromptedQuery::QueryThenDocument(query_ids),
                PromptLayout::Flag {
                    document: template, ..
                },
            ) => encode(tokenizer, &fill(template, &[("{document}", document)]))
                .map(|doc| self.cut_flag(query_ids, doc, room)),
            (PromptedQuery::QueryThenDocument(_), PromptLayout::WholeBody) => {
                return Err(RerankError::internal(
                    "a query prepared for another prompt layout",
                ))
            }
        };
        segments.map_err(|e| {
            RerankError::invalid(format!("documents[{index}] could not be tokenized: {e}"))
        })
    }

    /// The document's own cap, then the pair's: only the document part is cut (only_second).
    fn cut_only_second(
        &self,
        query_ids: &[u32],
        mut doc: Vec<u32>,
        room: usize,
    ) -> (Vec<u32>, Vec<u32>, usize) {
        let whole = query_ids.len() + self.separator.len() + doc.len();
        let fixed = self.fixed_tokens();
        doc.truncate(
            self.positions
                .saturating_sub(query_ids.len() + fixed)
                .min(room),
        );
        let mut second = [self.separator.as_slice(), &doc].concat();
        second.truncate(room.saturating_sub(query_ids.len()));
        (query_ids.to_vec(), second, whole)
    }

    /// FlagEmbedding's cut: the passage to `room`, then separator and passage to what the pair limit leaves.
    fn cut_flag(
        &self,
        query_ids: &[u32],
        mut doc: Vec<u32>,
        room: usize,
    ) -> (Vec<u32>, Vec<u32>, usize) {
        let whole = query_ids.len() + self.separator.len() + doc.len();
        doc.truncate(room);
        let mut second = [self.separator.as_slice(), &doc].concat();
        second.truncate((room + self.suffix.len()).saturating_sub(query_ids.len()));
        (query_ids.to_vec(), second, whole)
    }
}

/// Refuses what a tokenizer with (or without) `prompt` cannot honour: chunk windows and a per-document token cut
/// of prompted pairs (a document's tokens are not apart from the rest), and an instruction without a prompt.
pub(super) fn check_options(
    prompt: Option<&PromptEncoder>,
    truncation: Truncation,
    max_document_tokens: Option<usize>,
    instruction: Option<&str>,
) -> Result<(), RerankError> {
    let Some(prompt) = prompt else {
        return match instruction {
            Some(_) => Err(RerankError::invalid(
                "instruction is only for instruction-following rerankers; this model takes none",
            )),
            None => Ok(()),
        };
    };
    let family = &prompt.template.family;
    if instruction.is_some() && !prompt.template.takes_instruction() {
        return Err(RerankError::invalid(format!(
            "{family} models take no instruction"
        )));
    }
    if matches!(truncation, Truncation::ChunkMax { .. }) {
        return Err(RerankError::invalid(format!(
            "chunk-max truncation is not available for {family} models"
        )));
    }
    if max_document_tokens.is_some() {
        return Err(RerankError::invalid(format!(
            "max_tokens_per_doc is not available for {family} models (the whole pair is truncated to max_length)"
        )));
    }
    Ok(())
}

/// Replaces each placeholder in one pass, as Python's str.format: text put in is never searched again.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        match values.iter().find(|(name, _)| rest[at..].starts_with(name)) {
            Some((name, value)) => {
                out.push_str(value);
                rest = &rest[at + name.len()..];
            }
            None => {
                out.push('{');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> PromptTemplate {
        PromptTemplate {
            family: "test".into(),
            prefix: "P".into(),
            body: "<I>: {instruction}\n<Q>: {query}\n<D>: {document}!".into(),
            suffix: "S".into(),
            default_instruction: Some("judge".into()),
            layout: PromptLayout::WholeBody,
        }
    }

    #[test]
    fn fills_the_instruction_and_query_around_the_document() {
        let body = template().body_for("what?", None).expect("body");
        assert_eq!(body.before_document, "<I>: judge\n<Q>: what?\n<D>: ");
        assert_eq!(body.after_document, "!");
        let own = template().body_for("q", Some("mine")).expect("body");
        assert!(own.before_document.starts_with("<I>: mine\n"));
    }

    #[test]
    fn text_holding_a_placeholder_is_not_filled_again() {
        let body = template()
            .body_for("{instruction}", Some("{query}"))
            .expect("body");
        assert_eq!(
            body.before_document,
            "<I>: {query}\n<Q>: {instruction}\n<D>: "
        );
    }
}
