//! `story_grounding`: how well a StoryReasoning-style completion is grounded. The expected
//! shape (the StoryReasoning data set, arXiv 2505.10292) is a `<think>…</think>` chain of
//! thought holding, per frame (`## Image N`), Markdown tables whose rows start with an id
//! (`| char1 | Grum | … |` under `### Characters`, `| obj1 | … |`, `| bg1 | … |` under
//! `### Objects`), then a story in which each frame is `<gdi imageN>…</gdi>` and mentions are
//! grounded with `<gdo ids>…</gdo>` (objects/characters), `<gda ids>…</gda>` (actions) and
//! `<gdl ids>…</gdl>` (locations), `ids` being space-separated table ids.
//!
//! Four checks, each scored in [0, 1]; the reward is their mean (in [0, 1]), or with
//! `strict: true` 1 when all four are 1 and else 0:
//! * `think`: exactly one `<think>…</think>` block, before the story, holding at least one
//!   id row;
//! * `well_formed`: at least one `<gdi imageN>` block; every grounding tag opened and closed
//!   in order, `gdo`/`gda`/`gdl` only inside a `gdi` and not inside each other, `gdi`
//!   not nested, ids of the form `letters+digits` (`imageN` for `gdi`), no frame twice, no
//!   stray text-level tag (1 or 0);
//! * `declared_ids`: the fraction of ids referenced by `gdo`/`gda`/`gdl` that appear as a
//!   row id in the think tables (0 when nothing is referenced);
//! * `consistent_ids`: the fraction of character names (from the `char…` rows) that keep
//!   one id across frames, with no id shared by two names (0 when there are no character rows).
use ferrotune_plugin_api::prelude::*;
use regex::Regex;
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// Configuration (`rewards: [{plugin: story_grounding, ...}]`).
#[derive(Deserialize, JsonSchema, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct StoryGroundingConfig {
    /// 1 only when every check passes fully, else 0. Default false (the mean of the checks).
    #[serde(default)]
    pub strict: bool,
}

pub struct StoryGrounding {
    strict: bool,
    tag: Regex,
    id: Regex,
    image_id: Regex,
}

impl Plugin for StoryGrounding {
    const NAME: &'static str = "story_grounding";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "reward for StoryReasoning grounding: well-formed gdi/gdo/gda/gdl tags, ids declared and consistent";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<StoryGroundingConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: StoryGroundingConfig = parse_config(config_json)?;
        let re = |p: &str| {
            Regex::new(p).map_err(|e| PluginError::runtime(format!("internal regex {p}: {e}")))
        };
        Ok(Self {
            strict: cfg.strict,
            tag: re(r"<(/?)(gdi|gdo|gda|gdl)\b([^>]*)>")?,
            id: re(r"^[A-Za-z]+[0-9]+$")?,
            image_id: re(r"^image([0-9]+)$")?,
        })
    }
}

/// The scores of the four checks of one completion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroundingChecks {
    pub think: f64,
    pub well_formed: f64,
    pub declared_ids: f64,
    pub consistent_ids: f64,
}

impl GroundingChecks {
    pub fn mean(&self) -> f64 {
        (self.think + self.well_formed + self.declared_ids + self.consistent_ids) / 4.0
    }
    pub fn all_pass(&self) -> bool {
        [self.think, self.well_formed, self.declared_ids, self.consistent_ids]
            .iter()
            .all(|v| *v == 1.0)
    }
}

/// The rows of the Markdown tables in `think` whose first cell is an id: (id, second cell).
fn table_rows(think: &str, id: &Regex) -> Vec<(String, String)> {
    think
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            if !line.starts_with('|') {
                return None;
            }
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let first = cells.first()?;
            id.is_match(first)
                .then(|| (first.to_string(), cells.get(1).map_or(String::new(), |s| s.to_string())))
        })
        .collect()
}

impl StoryGrounding {
    pub fn checks(&self, completion: &str) -> GroundingChecks {
        let (open, close) = ("<think>", "</think>");
        let think_ok = completion.matches(open).count() == 1
            && completion.matches(close).count() == 1
            && completion.find(open) < completion.find(close);
        let (think_text, story) = if think_ok {
            let s = completion.find(open).unwrap_or(0) + open.len();
            let e = completion.find(close).unwrap_or(s);
            (&completion[s..e], &completion[e + close.len()..])
        } else {
            ("", completion)
        };
        let rows = table_rows(think_text, &self.id);
        let think =
            if think_ok && !rows.is_empty() && !self.tag.is_match(think_text) { 1.0 } else { 0.0 };

        // Grounding tags of the story.
        let mut well_formed = true;
        let mut stack: Vec<&str> = Vec::new();
        let mut frames = BTreeSet::new();
        let mut referenced = BTreeSet::new();
        let mut gdi_count = 0;
        for cap in self.tag.captures_iter(story) {
            let closing = !cap[1].is_empty();
            let name = cap.get(2).map_or("", |m| m.as_str());
            let attrs: Vec<&str> = cap[3].split_whitespace().collect();
            if closing {
                if !attrs.is_empty() || stack.pop() != Some(name) {
                    well_formed = false;
                }
                continue;
            }
            if name == "gdi" {
                gdi_count += 1;
                let frame = (attrs.len() == 1).then(|| self.image_id.captures(attrs[0])).flatten();
                match frame {
                    Some(c) if stack.is_empty() && frames.insert(c[1].to_string()) => {}
                    _ => well_formed = false,
                }
            } else {
                if stack != ["gdi"]
                    || attrs.is_empty()
                    || !attrs.iter().all(|a| self.id.is_match(a))
                {
                    well_formed = false;
                }
                referenced.extend(attrs.iter().map(|a| a.to_string()));
            }
            stack.push(name);
        }
        if !stack.is_empty() || gdi_count == 0 {
            well_formed = false;
        }

        let declared: BTreeSet<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
        let declared_ids = if referenced.is_empty() {
            0.0
        } else {
            referenced.iter().filter(|r| declared.contains(r.as_str())).count() as f64
                / referenced.len() as f64
        };

        // One id per character name, one name per id, across every frame's table.
        let mut ids_of: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        let mut names_of: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (id, name) in rows.iter().filter(|(id, _)| id.starts_with("char")) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
            ids_of.entry(name.clone()).or_default().insert(id.as_str());
            names_of.entry(id.as_str()).or_default().insert(name);
        }
        let consistent_ids = if ids_of.is_empty() {
            0.0
        } else {
            let good = ids_of
                .values()
                .filter(|ids| ids.len() == 1 && ids.iter().all(|id| names_of[id].len() == 1))
                .count();
            good as f64 / ids_of.len() as f64
        };
        GroundingChecks {
            think,
            well_formed: if well_formed { 1.0 } else { 0.0 },
            declared_ids,
            consistent_ids,
        }
    }
}

impl Reward for StoryGrounding {
    fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
        Ok(inputs
            .iter()
            .map(|i| {
                let c = self.checks(&i.completion);
                if self.strict {
                    if c.all_pass() {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    c.mean()
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "<think>\n## Image 1\n\n### Characters\n| Character ID | Name | Description |\n|---|---|---|\n| char1 | Grum | giant |\n| char2 | Pip | small |\n\n### Objects\n| Object ID | Description |\n|---|---|\n| bg1 | pines |\n\n## Image 2\n\n### Characters\n| Character ID | Name | Description |\n|---|---|---|\n| char1 | Grum | giant |\n</think>\n<gdi image1>\n<gdo char1>Grum</gdo> <gda char1>walks</gda> to <gdl bg1>the pines</gdl> with <gdo char2>Pip</gdo>.\n</gdi>\n<gdi image2>\n<gdo char1 char2>They</gdo> rest.\n</gdi>";

    fn sg() -> StoryGrounding {
        StoryGrounding::from_config("{}").unwrap()
    }

    #[test]
    fn good_story_scores_one() {
        let c = sg().checks(GOOD);
        assert_eq!(
            c,
            GroundingChecks {
                think: 1.0,
                well_formed: 1.0,
                declared_ids: 1.0,
                consistent_ids: 1.0
            }
        );
    }

    #[test]
    fn each_defect_lowers_its_check() {
        let s = sg();
        // Unclosed gdo.
        let c = s.checks(&GOOD.replace("Grum</gdo> <gda", "Grum <gda"));
        assert_eq!((c.well_formed, c.think), (0.0, 1.0));
        // gdo outside any gdi.
        assert_eq!(s.checks(&format!("{GOOD} <gdo char1>Grum</gdo>")).well_formed, 0.0);
        // Nested gdi, repeated frame, bad frame id.
        assert_eq!(s.checks(&GOOD.replace("<gdi image2>", "<gdi image1>")).well_formed, 0.0);
        assert_eq!(s.checks(&GOOD.replace("<gdi image2>", "<gdi frame2>")).well_formed, 0.0);
        // An undeclared id: of the referenced char1, char2 (in "They"), bg1 and char3, char3
        // is in no table.
        let c = s.checks(&GOOD.replace("<gdo char2>Pip</gdo>", "<gdo char3>Pip</gdo>"));
        assert_eq!(c.well_formed, 1.0);
        assert_eq!(c.declared_ids, 0.75, "{c:?}");
        // Grum is char1 in frame 1 and char3 in frame 2: Grum inconsistent, Pip fine.
        let c =
            s.checks(&GOOD.replace(
                "| char1 | Grum | giant |\n</think>",
                "| char3 | Grum | giant |\n</think>",
            ));
        assert!((c.consistent_ids - 0.5).abs() < 1e-12, "{c:?}");
        // Two names (Grum, Bob) for char1: both inconsistent, Pip fine.
        let c = s.checks(
            &GOOD
                .replace("| char1 | Grum | giant |\n</think>", "| char1 | Bob | giant |\n</think>"),
        );
        assert!((c.consistent_ids - 1.0 / 3.0).abs() < 1e-12, "{c:?}");
        // No think block at all.
        let c = s.checks(&GOOD.replace("<think>", ""));
        assert_eq!((c.think, c.declared_ids, c.consistent_ids), (0.0, 0.0, 0.0));
        assert_eq!(s.checks("Once upon a time.").mean(), 0.0);
    }

    #[test]
    fn strict_mode_is_all_or_nothing() {
        let s = StoryGrounding::from_config(r#"{"strict": true}"#).unwrap();
        let inputs = [GOOD.to_string(), GOOD.replace("</gdi>\n<gdi image2>", "<gdi image2>")];
        let inputs: Vec<RewardInput> = inputs
            .iter()
            .map(|c| RewardInput { completion: c.clone(), ..Default::default() })
            .collect();
        assert_eq!(s.score(&inputs).unwrap(), vec![1.0, 0.0]);
        assert!(StoryGrounding::from_config(r#"{"strict": 1}"#).is_err());
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schema_matches_the_parser() {
        let s = assert_schema_matches::<StoryGrounding>(json!({}));
        assert_eq!(s["properties"]["strict"]["default"], false);
    }
}
