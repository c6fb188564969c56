//! Prompt templates of decoder rerankers: the text around a (query, document) pair that the model was trained to
//! judge, tokenized as the published scoring code does (prefix and suffix apart; the body alone truncated).

use serde::Serialize;

/// A reranker's prompt: `prefix` + `body` (with `{instruction}`, `{query}` and `{document}` filled in) + `suffix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptTemplate {
    /// The model family, e.g. `qwen3-reranker`.
    pub family: String,
    pub prefix: String,
    pub body: String,
    pub suffix: String,
    /// The instruction used when a request gives none; None when the template takes no instruction.
    pub default_instruction: Option<String>,
}

/// The body of one pair split around the document: the text before it (instruction and query filled in) and
/// after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptBody {
    pub before_document: String,
    pub after_document: String,
}

impl PromptTemplate {
    /// The body for a query with the request's instruction (or the default). An instruction given to a template
    /// without one is an error, as is a body without `{document}`.
    pub fn body_for(&self, query: &str, instruction: Option<&str>) -> Result<PromptBody, String> {
        let instruction = match (instruction, &self.default_instruction) {
            (Some(given), Some(_)) => given,
            (None, Some(default)) => default.as_str(),
            (Some(_), None) => return Err(format!("{} takes no instruction", self.family)),
            (None, None) => "",
        };
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

    #[test]
    fn an_instruction_for_a_template_without_one_is_refused() {
        let mut plain = template();
        plain.default_instruction = None;
        assert!(plain.body_for("q", Some("x")).is_err());
    }
}
