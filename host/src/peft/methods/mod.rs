//! One file per peft method: its row of [`PEFT_METHODS`] (which plugin, which keys, peft's
//! defaults, the tensors a saved layer holds). Adding a method is a file here, its row below,
//! and its plugin.
use super::PeftMethod;

pub(crate) mod ia3;
pub(crate) mod loha;
pub(crate) mod lokr;
pub(crate) mod lora;
pub(crate) mod prompt;
pub(crate) mod vera;

/// The peft methods ferrotune loads, by `peft_type`.
pub const PEFT_METHODS: &[PeftMethod] = &[
    lora::METHOD,
    ia3::METHOD,
    loha::METHOD,
    lokr::METHOD,
    vera::METHOD,
    prompt::PROMPT_TUNING,
    prompt::P_TUNING,
    prompt::PREFIX_TUNING,
];
