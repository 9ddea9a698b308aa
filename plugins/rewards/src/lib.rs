//! Reward plugins for online objectives (GRPO): `format`, `exact_match`, `length` and
//! `story_grounding`.
//!
//! Every reward returns one finite score per completion, in order; the host checks that
//! (`RewardHandle`) and refuses a NaN or a wrong count. Score ranges:
//!
//! | reward | range | meaning |
//! | --- | --- | --- |
//! | `format` | [0, 1] | 1 when the completion matches the pattern and holds every required tag pair; with `partial: true`, the fraction of those checks passed |
//! | `exact_match` | {0, 1} | 1 when the answer extracted from the completion equals the sample's reference answer (after normalisation) |
//! | `length` | [0, 1] (`target`) or [−1, 0] (`penalty`) | closeness to a target length, or DAPO's soft overlong punishment |
//! | `story_grounding` | [0, 1] | mean of four StoryReasoning checks (think block, well-formed grounding tags, ids declared in the think tables, one id per character name); `strict: true` gives 1 only when all pass |
use ferrotune_plugin_api::prelude::*;

pub mod exact_match;
pub mod format;
pub mod length;
pub mod story;

pub use exact_match::ExactMatch;
pub use format::Format;
pub use length::Length;
pub use story::StoryGrounding;

export_plugin!(reward: Format, reward: ExactMatch, reward: Length, reward: StoryGrounding);
