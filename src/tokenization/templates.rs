//! The prompts of the decoder rerankers, as their published scoring code builds them, beside the layouts
//! (`PromptLayout`) that say how a pair fills and truncates each.

use super::{PromptLayout, PromptTemplate};

/// Qwen3-Reranker's prompt, from its model card: the chat frame, the judging system message, the instruction,
/// query and document, and an empty thinking block before the answer.
pub fn qwen3_reranker_prompt() -> PromptTemplate {
    PromptTemplate {
        family: "qwen3-reranker".into(),
        prefix: "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the \
                 Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
            .into(),
        body: "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}".into(),
        suffix: "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n".into(),
        default_instruction: Some(
            "Given a web search query, retrieve relevant passages that answer the query".into(),
        ),
        layout: PromptLayout::WholeBody,
    }
}

/// mxbai-rerank-v2's prompt, from its published scoring code (the mxbai-rerank package): Qwen's chat frame, the
/// query (after an instruction line when a request gives one) and the document tokenized apart, then the task.
pub fn mxbai_rerank_v2_prompt() -> PromptTemplate {
    let prefix = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
                  <|im_start|>user\n";
    let task = "You are a search relevance expert who evaluates how well documents match search queries. For each \
                query-document pair, carefully analyze the semantic relationship between them, then provide your \
                binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:";
    let chat_suffix = "<|im_end|>\n<|im_start|>assistant\n";
    PromptTemplate {
        family: "mxbai-rerank-v2".into(),
        prefix: prefix.into(),
        body: "[instruction: {instruction}\n]query: {query}\ndocument: {document}".into(),
        suffix: ["\n", task, chat_suffix].concat(),
        default_instruction: None,
        layout: PromptLayout::QueryThenDocument {
            instruction: "instruction: {instruction}".into(),
            query: "query: {query}".into(),
            document: "document: {document}".into(),
            separator: "\n".into(),
            suffix_parts: vec!["\n".into(), task.into(), chat_suffix.into()],
        },
    }
}

/// FlagEmbedding's LLM reranker question, shared by its Gemma and layerwise MiniCPM rerankers.
const FLAG_TASK: &str =
    "Given a query A and a passage B, determine whether the passage contains an answer to the \
                         query by providing a prediction of either 'Yes' or 'No'.";

/// The prompt FlagEmbedding's LLM rerankers build: the tokenizer's BOS (`bos`), `A: {query}`, a newline,
/// `B: {passage}`, a newline and the yes/no question, each part tokenized on its own.
fn flag_llm_reranker_prompt(family: &str, bos: &str) -> PromptTemplate {
    PromptTemplate {
        family: family.into(),
        prefix: String::new(),
        body: format!("{bos}A: {{query}}\nB: {{document}}"),
        suffix: ["\n", FLAG_TASK].concat(),
        default_instruction: None,
        layout: PromptLayout::Flag {
            lead: bos.into(),
            query: "A: {query}".into(),
            document: "B: {document}".into(),
            separator: "\n".into(),
            task: FLAG_TASK.into(),
        },
    }
}

/// bge-reranker-v2-gemma's prompt (FlagEmbedding's `FlagLLMReranker`).
pub fn bge_reranker_gemma_prompt() -> PromptTemplate {
    flag_llm_reranker_prompt("bge-reranker-v2-gemma", "<bos>")
}

/// bge-reranker-v2-minicpm-layerwise's prompt (FlagEmbedding's `LayerWiseFlagLLMReranker`): the same parts after
/// MiniCPM's BOS.
pub fn bge_reranker_minicpm_layerwise_prompt() -> PromptTemplate {
    flag_llm_reranker_prompt("bge-reranker-v2-minicpm-layerwise", "<s>")
}
