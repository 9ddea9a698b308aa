//! The columns alpaca and sharegpt rows have in common, checked and read the same way by
//! both: the `chosen` / `rejected` preference pair of `ranking`, the boolean `kto_tag` and
//! the `images` and `videos` columns.
use ferrotune_plugin_api::{Message, PluginError, PluginResult, Sample};
use serde_json::{Map, Value};

use crate::source::{bool_column, images_column, videos_column};

/// With `ranking: true`: `columns.chosen` and `columns.rejected` must name a column each.
pub fn check_pair_columns(chosen: &Option<String>, rejected: &Option<String>) -> PluginResult<()> {
    for (key, col) in [("columns.chosen", chosen), ("columns.rejected", rejected)] {
        if col.is_none() {
            return Err(PluginError::config(key, "`ranking: true` needs this column"));
        }
    }
    Ok(())
}

/// A preference row's optional margin (TRL's `RewardTrainer` column), kept in `extra`.
pub const MARGIN_COLUMN: &str = "margin";

/// A row's sample before its conversation: with `ranking`, the candidate responses that
/// `candidate` reads from the `chosen` column, then the `rejected` one; the KTO tag of the
/// `kto_tag` column as [`Sample::label`]; a pair's numeric `margin` column to `extra`.
pub fn pair_and_label(
    row: &Map<String, Value>,
    ranking: bool,
    [chosen, rejected]: [Option<&str>; 2],
    kto_tag: Option<&str>,
    candidate: impl Fn(Option<&str>) -> Result<Message, String>,
) -> Result<Sample, String> {
    let mut sample = Sample::default();
    if ranking {
        sample.chosen = Some(candidate(chosen)?);
        sample.rejected = Some(candidate(rejected)?);
        // TRL's reward-modelling `margin` column: how far chosen should out-score rejected.
        match row.get(MARGIN_COLUMN) {
            None | Some(Value::Null) => {}
            Some(v) if v.as_f64().is_some_and(f64::is_finite) => {
                sample.extra.insert(MARGIN_COLUMN.into(), v.clone());
            }
            Some(v) => {
                return Err(format!(
                    "column `{MARGIN_COLUMN}`: expected a finite number, found {v}"
                ))
            }
        }
    }
    sample.label = bool_column(row, kto_tag)?;
    Ok(sample)
}

/// `sample` with its conversation `messages`, the paths of the `images` column, one per
/// `<image>` placeholder in those turns, and of the `videos` column, one per `<video>` (a
/// preference pair shares the prompt's images and videos).
pub fn with_messages(
    row: &Map<String, Value>,
    [images, videos]: [Option<&str>; 2],
    mut sample: Sample,
    messages: Vec<Message>,
) -> Result<Sample, String> {
    let texts: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    sample.images = images_column(row, images, &texts)?;
    sample.videos = videos_column(row, videos, &texts)?;
    sample.messages = messages;
    Ok(sample)
}
