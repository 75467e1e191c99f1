//! Words for verdicts: the template answers and replies and the check that refuses a model answer
//! contradicting the findings ([`template`]), the language-model back ends ([`llm`]) and the
//! [`explainer`] that runs them off the frame path.

pub mod explainer;
pub mod llm;
pub mod template;
